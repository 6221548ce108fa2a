//! Lossless coding of one tensor: transpose to channel-major, split the elements into byte
//! planes, compress with zstd.
//!
//! Channel-major order puts a channel's values for consecutive tokens side by side (similar
//! magnitudes, so similar exponent bytes); the byte planes then group the slowly varying high
//! bytes together, which zstd compresses far better than interleaved raw floats.

use super::{
    quant::{Dest, Dims},
    reader::Reader,
    CodecError, KvDType,
};

const ZSTD_LEVEL: i32 = 1;

/// Appends the compressed tensor (`[heads, tokens, channels]` elements of `elem` bytes).
pub fn encode(bytes: &[u8], dims: Dims, elem: usize, out: &mut Vec<u8>) {
    let n = dims.heads * dims.tokens * dims.channels;
    let mut planes = vec![0u8; n * elem];
    for (k, src) in channel_major(dims).enumerate() {
        for b in 0..elem {
            planes[b * n + k] = bytes[src * elem + b];
        }
    }
    let compressed = zstd::bulk::compress(&planes, ZSTD_LEVEL).expect("in-memory zstd cannot fail");
    out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
    out.extend_from_slice(&compressed);
}

/// The byte planes of a tensor of `n` elements of `elem` bytes: plane `b` is byte `b` of every
/// element, in channel-major order.
fn read_planes(r: &mut Reader<'_>, n: usize, elem: usize) -> Result<Vec<u8>, CodecError> {
    let len = r.u32()? as usize;
    let compressed = r.bytes(len)?;
    let planes = zstd::bulk::decompress(compressed, n * elem)
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
    let n = dims.heads * dims.tokens * dims.channels;
    let planes = read_planes(r, n, elem)?;
    for (k, dst) in channel_major(dims).enumerate() {
        for b in 0..elem {
            out[dst * elem + b] = planes[b * n + k];
        }
    }
    Ok(())
}

/// Decodes a tensor written by [`encode`] straight into `dest` as f32 (the store's fast path):
/// the byte planes are joined into elements in the loop that places them, tokens at or after
/// `dest.take` are skipped.
pub fn decode_f32_into(
    r: &mut Reader<'_>,
    dims: Dims,
    dtype: KvDType,
    dest: &mut Dest<'_>,
) -> Result<(), CodecError> {
    let elem = dtype.size();
    let n = dims.heads * dims.tokens * dims.channels;
    let planes = read_planes(r, n, elem)?;
    let kept = dest.take.min(dims.tokens);
    let (channels, tokens) = (dims.channels, dims.tokens);
    for h in 0..dims.heads {
        let base = (h * dest.tokens + dest.token_offset) * channels;
        for c in 0..channels {
            // Plane index of (h, c, token 0); the tokens of a channel are contiguous.
            let k0 = (h * channels + c) * tokens;
            let out = &mut dest.data[base + c..];
            match dtype {
                KvDType::F32 => {
                    let (p0, p1, p2, p3) = (
                        &planes[k0..k0 + kept],
                        &planes[n + k0..n + k0 + kept],
                        &planes[2 * n + k0..2 * n + k0 + kept],
                        &planes[3 * n + k0..3 * n + k0 + kept],
                    );
                    for t in 0..kept {
                        out[t * channels] =
                            f32::from_bits(u32::from_le_bytes([p0[t], p1[t], p2[t], p3[t]]));
                    }
                }
                KvDType::F16 | KvDType::BF16 => {
                    let (p0, p1) = (&planes[k0..k0 + kept], &planes[n + k0..n + k0 + kept]);
                    for t in 0..kept {
                        let bits = u16::from_le_bytes([p0[t], p1[t]]);
                        out[t * channels] = match dtype {
                            KvDType::F16 => half::f16::from_bits(bits).to_f32(),
                            _ => half::bf16::from_bits(bits).to_f32(),
                        };
                    }
                }
            }
        }
    }
    Ok(())
}

/// Element indices of a `[heads, tokens, channels]` tensor in channel-major order
/// (`[head, channel, token]`): the order both directions walk.
fn channel_major(dims: Dims) -> impl Iterator<Item = usize> {
    (0..dims.heads).flat_map(move |h| {
        (0..dims.channels).flat_map(move |c| {
            (0..dims.tokens).map(move |t| (h * dims.tokens + t) * dims.channels + c)
        })
    })
}
