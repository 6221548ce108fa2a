//! Lossless coding of one tensor: transpose to channel-major, split the elements into byte
//! planes, compress with zstd.
//!
//! Channel-major order puts a channel's values for consecutive tokens side by side (similar
//! magnitudes, so similar exponent bytes); the byte planes then group the slowly varying high
//! bytes together, which zstd compresses far better than interleaved raw floats.

use super::{quant::Dims, reader::Reader, CodecError};

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

/// Decodes a tensor written by [`encode`] into `out` (raw element bytes, engine order).
pub fn decode(
    r: &mut Reader<'_>,
    dims: Dims,
    elem: usize,
    out: &mut [u8],
) -> Result<(), CodecError> {
    let len = r.u32()? as usize;
    let compressed = r.bytes(len)?;
    let n = dims.heads * dims.tokens * dims.channels;
    let planes = zstd::bulk::decompress(compressed, n * elem)
        .map_err(|e| CodecError::corrupt(format!("zstd: {e}")))?;
    if planes.len() != n * elem {
        return Err(CodecError::corrupt("zstd frame has the wrong size"));
    }
    for (k, dst) in channel_major(dims).enumerate() {
        for b in 0..elem {
            out[dst * elem + b] = planes[b * n + k];
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
