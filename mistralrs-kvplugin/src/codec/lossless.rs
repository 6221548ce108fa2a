//! Lossless coding of one tensor: transpose to channel-major, split the elements into byte
//! planes, compress with zstd.
//!
//! Channel-major order puts a channel's values for consecutive tokens side by side (similar
//! magnitudes, so similar exponent bytes); the byte planes then group the slowly varying high
//! bytes together, which zstd compresses far better than interleaved raw floats.
//!
//! Each plane is its own zstd frame (the frames are concatenated, which zstd decodes as one
//! stream): on SmolLM2's F32 KV only the sign-and-exponent plane compresses (to about 2.9 bits a
//! byte); the three mantissa planes are noise (8.002 bits a byte at zstd level 1), and zstd gives
//! up on a plane of noise within microseconds when it is alone, but spent most of the encoder's
//! time searching it when the planes were one frame.
//!
//! Both directions work on whole elements (u32 for F32, u16 for F16 and BF16): the transpose
//! moves one element per load and store, in square tiles so that both sides stay in cache, and
//! splitting into (or joining from) byte planes is a contiguous pass the compiler vectorises.

use std::cell::RefCell;

use super::{
    quant::{Dest, Dims},
    reader::Reader,
    CodecError, KvDType,
};

const ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// zstd contexts, one per thread, reused across tensors (setting one up cost about a
    /// twentieth of a tensor's decompression).
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `dst[c * dst_stride + r] = f(src[r * src_stride + c])` for `r < rows`, `c < cols`, in square
/// tiles.
#[inline(always)]
fn transpose<S: Copy, D>(
    src: &[S],
    src_stride: usize,
    dst: &mut [D],
    dst_stride: usize,
    (rows, cols): (usize, usize),
    f: impl Fn(S) -> D,
) {
    const TILE: usize = 16;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let src_row = &src[r * src_stride + c0..r * src_stride + (c0 + TILE).min(cols)];
                for (i, &s) in src_row.iter().enumerate() {
                    dst[(c0 + i) * dst_stride + r] = f(s);
                }
            }
        }
    }
}

/// An element type of the byte planes: `BYTES` little-endian bytes.
trait Element: Copy + Default {
    const BYTES: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn byte(self, b: usize) -> u8;
    fn with_byte(self, b: usize, byte: u8) -> Self;
}

impl Element for u32 {
    const BYTES: usize = 4;
    fn from_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
    fn byte(self, b: usize) -> u8 {
        (self >> (8 * b)) as u8
    }
    fn with_byte(self, b: usize, byte: u8) -> Self {
        self | (byte as u32) << (8 * b)
    }
}

impl Element for u16 {
    const BYTES: usize = 2;
    fn from_le(bytes: &[u8]) -> Self {
        u16::from_le_bytes([bytes[0], bytes[1]])
    }
    fn byte(self, b: usize) -> u8 {
        (self >> (8 * b)) as u8
    }
    fn with_byte(self, b: usize, byte: u8) -> Self {
        self | (byte as u16) << (8 * b)
    }
}

/// The byte planes of a tensor in channel-major order (plane `b` is byte `b` of every element).
fn split<E: Element>(bytes: &[u8], dims: Dims) -> Vec<u8> {
    let (n, tokens, channels) = (dims.len(), dims.tokens, dims.channels);
    let elements: Vec<E> = bytes.chunks_exact(E::BYTES).map(E::from_le).collect();
    let mut channel_major = vec![E::default(); n];
    let head_len = tokens * channels;
    for (src, dst) in elements
        .chunks_exact(head_len)
        .zip(channel_major.chunks_exact_mut(head_len))
    {
        transpose(src, channels, dst, tokens, (tokens, channels), |e| e);
    }
    let mut planes = vec![0u8; n * E::BYTES];
    for (b, plane) in planes.chunks_exact_mut(n).enumerate() {
        for (p, &e) in plane.iter_mut().zip(&channel_major) {
            *p = e.byte(b);
        }
    }
    planes
}

/// Joins byte planes back into channel-major elements.
fn join<E: Element>(planes: &[u8], n: usize) -> Vec<E> {
    let mut elements = vec![E::default(); n];
    for (b, plane) in planes.chunks_exact(n).enumerate() {
        for (e, &p) in elements.iter_mut().zip(plane) {
            *e = e.with_byte(b, p);
        }
    }
    elements
}

/// Appends the compressed tensor (`[heads, tokens, channels]` elements of `elem` bytes).
pub fn encode(bytes: &[u8], dims: Dims, elem: usize, out: &mut Vec<u8>) {
    let planes = match elem {
        4 => split::<u32>(bytes, dims),
        2 => split::<u16>(bytes, dims),
        _ => unreachable!("elements are 2 or 4 bytes"),
    };
    let len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    COMPRESSOR.with_borrow_mut(|c| {
        let c =
            c.get_or_insert_with(|| zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd context"));
        for plane in planes.chunks_exact(dims.len()) {
            out.extend_from_slice(&c.compress(plane).expect("in-memory zstd cannot fail"));
        }
    });
    let len = (out.len() - len_at - 4) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
}

/// The byte planes of a tensor of `n` elements of `elem` bytes: plane `b` is byte `b` of every
/// element, in channel-major order.
fn read_planes(r: &mut Reader<'_>, n: usize, elem: usize) -> Result<Vec<u8>, CodecError> {
    let len = r.u32()? as usize;
    let compressed = r.bytes(len)?;
    let planes = DECOMPRESSOR
        .with_borrow_mut(|d| {
            d.get_or_insert_with(|| zstd::bulk::Decompressor::new().expect("zstd context"))
                .decompress(compressed, n * elem)
        })
        .map_err(|e| CodecError::corrupt(format!("zstd: {e}")))?;
    if planes.len() != n * elem {
        return Err(CodecError::corrupt("zstd frame has the wrong size"));
    }
    Ok(planes)
}

/// Decodes a tensor written by [`encode`] into `out` (raw element bytes, engine order).
pub fn decode(
    r: &mut Reader<'_>,
    dims: Dims,
    elem: usize,
    out: &mut [u8],
) -> Result<(), CodecError> {
    fn place<E: Element>(planes: &[u8], dims: Dims, out: &mut [u8]) {
        let (tokens, channels) = (dims.tokens, dims.channels);
        let channel_major: Vec<E> = join(planes, dims.len());
        let mut elements = vec![E::default(); dims.len()];
        let head_len = tokens * channels;
        for (src, dst) in channel_major
            .chunks_exact(head_len)
            .zip(elements.chunks_exact_mut(head_len))
        {
            transpose(src, tokens, dst, channels, (channels, tokens), |e| e);
        }
        for (o, e) in out.chunks_exact_mut(E::BYTES).zip(&elements) {
            for (b, byte) in o.iter_mut().enumerate() {
                *byte = e.byte(b);
            }
        }
    }
    let planes = read_planes(r, dims.len(), elem)?;
    match elem {
        4 => place::<u32>(&planes, dims, out),
        2 => place::<u16>(&planes, dims, out),
        _ => unreachable!("elements are 2 or 4 bytes"),
    }
    Ok(())
}

/// Decodes a tensor written by [`encode`] straight into `dest` as f32 (the store's fast path):
/// the joined elements are transposed into place, tokens at or after `dest.take` are skipped.
pub fn decode_f32_into(
    r: &mut Reader<'_>,
    dims: Dims,
    dtype: KvDType,
    dest: &mut Dest<'_>,
) -> Result<(), CodecError> {
    fn place<E: Element>(
        planes: &[u8],
        dims: Dims,
        dest: &mut Dest<'_>,
        to_f32: impl Fn(E) -> f32 + Copy,
    ) {
        let (tokens, channels) = (dims.tokens, dims.channels);
        let kept = dest.take.min(tokens);
        let channel_major: Vec<E> = join(planes, dims.len());
        for (h, src) in channel_major.chunks_exact(tokens * channels).enumerate() {
            let at = dest.at(channels, h, 0);
            let dst = &mut dest.data[at..at + kept * channels];
            transpose(src, tokens, dst, channels, (channels, kept), to_f32);
        }
    }
    let planes = read_planes(r, dims.len(), dtype.size())?;
    match dtype {
        KvDType::F32 => place(&planes, dims, dest, f32::from_bits),
        KvDType::F16 => place(&planes, dims, dest, |e: u16| {
            half::f16::from_bits(e).to_f32()
        }),
        KvDType::BF16 => place(&planes, dims, dest, |e: u16| {
            half::bf16::from_bits(e).to_f32()
        }),
    }
    Ok(())
}
