//! The chunk format, versions 1 and 2 (specified in `FORMAT.md`): constants, the header, and the checks
//! `parse` makes, in order: magic, version, length, checksum, model, then the fields.

use super::{chunk::ChunkShape, reader::Reader, CodecError, KvDType, Level};

/// First four bytes of every chunk.
pub const MAGIC: [u8; 4] = *b"KVCG";
/// The format version this build writes; it reads every version from 1 to this one.
pub const VERSION: u16 = 2;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 68;
/// Bytes the checksum covers before the payload (everything but the checksum itself).
const CHECKSUMMED_HEADER: usize = 60;
/// Most tokens in one chunk.
pub const MAX_TOKENS: usize = 1 << 16;
/// Most values in one chunk (bounds what a decoder allocates for any input).
pub const MAX_VALUES: usize = 1 << 27;

/// The fixed-size header of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version the chunk was written in.
    pub version: u16,
    /// Codec level.
    pub level: Level,
    /// Element type of the decoded chunk.
    pub dtype: KvDType,
    /// Dimensions.
    pub shape: ChunkShape,
    /// Fingerprint of the model the chunk belongs to.
    pub model: [u8; 32],
    /// Leading tokens stored exactly in lossy chunks (attention-sink tokens).
    pub exact_tokens: usize,
}

/// Rejects shapes the format cannot hold.
pub fn check_shape(shape: &ChunkShape) -> Result<(), CodecError> {
    let bad = |reason: String| Err(CodecError::InvalidShape { reason });
    let dims = [shape.n_layers, shape.n_kv_heads, shape.head_dim];
    if dims.iter().any(|&d| d == 0 || d > u16::MAX as usize) {
        return bad(format!(
            "layers, heads and head_dim must be 1..=65535: {shape:?}"
        ));
    }
    if shape.n_tokens == 0 || shape.n_tokens > MAX_TOKENS {
        return bad(format!("{} tokens (1..={MAX_TOKENS})", shape.n_tokens));
    }
    let values = dims
        .iter()
        .chain([&2, &shape.n_tokens])
        .try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if values.is_none_or(|v| v > MAX_VALUES) {
        return bad(format!("more than {MAX_VALUES} values: {shape:?}"));
    }
    Ok(())
}

/// Header, section table and sections, checksummed.
pub fn assemble(header: &Header, sections: &[Vec<u8>]) -> Vec<u8> {
    let payload_len = 4 * sections.len() + sections.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&header.version.to_le_bytes());
    out.push(header.level.id());
    out.push(header.dtype.code());
    out.extend_from_slice(&(header.shape.n_layers as u16).to_le_bytes());
    out.extend_from_slice(&(header.shape.n_kv_heads as u16).to_le_bytes());
    out.extend_from_slice(&(header.shape.head_dim as u16).to_le_bytes());
    out.extend_from_slice(&(header.exact_tokens as u16).to_le_bytes());
    out.extend_from_slice(&(header.shape.n_tokens as u32).to_le_bytes());
    out.extend_from_slice(&header.model);
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    debug_assert_eq!(out.len(), CHECKSUMMED_HEADER);
    out.extend_from_slice(&[0; 8]);
    for s in sections {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    for s in sections {
        out.extend_from_slice(s);
    }
    let checksum = checksum(&out[..CHECKSUMMED_HEADER], &out[HEADER_LEN..]);
    out[CHECKSUMMED_HEADER..HEADER_LEN].copy_from_slice(&checksum.to_le_bytes());
    out
}

fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(header);
    h.update(payload);
    h.digest()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a chunk and splits it into its header and tensor sections.
pub fn parse<'a>(bytes: &'a [u8], model: &[u8; 32]) -> Result<(Header, Vec<&'a [u8]>), CodecError> {
    let mut r = Reader::new(bytes);
    let magic: [u8; 4] = r.bytes(4)?.try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    let version = r.u16()?;
    if !(1..=VERSION).contains(&version) {
        return Err(CodecError::UnsupportedVersion {
            version,
            supported: VERSION,
        });
    }
    let level_id = r.u8()?;
    let dtype_code = r.u8()?;
    let n_layers = r.u16()? as usize;
    let n_kv_heads = r.u16()? as usize;
    let head_dim = r.u16()? as usize;
    let exact_tokens = r.u16()? as usize;
    let n_tokens = r.u32()? as usize;
    let chunk_model: [u8; 32] = r.bytes(32)?.try_into().expect("32 bytes");
    let payload_len = r.u64()?;
    let stored = r.u64()?;
    let available = bytes.len() - HEADER_LEN;
    if payload_len > available as u64 {
        return Err(CodecError::Truncated {
            needed: HEADER_LEN.saturating_add(payload_len.min(usize::MAX as u64) as usize),
            available: bytes.len(),
        });
    }
    if payload_len < available as u64 {
        return Err(CodecError::corrupt(format!(
            "{} bytes after the payload",
            available as u64 - payload_len
        )));
    }
    let computed = checksum(&bytes[..CHECKSUMMED_HEADER], &bytes[HEADER_LEN..]);
    if computed != stored {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }
    if &chunk_model != model {
        return Err(CodecError::WrongModel {
            expected: hex(model),
            actual: hex(&chunk_model),
        });
    }
    let level = Level::from_id(level_id).ok_or(CodecError::UnknownLevel { id: level_id })?;
    let dtype =
        KvDType::from_code(dtype_code).ok_or(CodecError::UnknownDType { code: dtype_code })?;
    if exact_tokens > n_tokens {
        return Err(CodecError::corrupt(format!(
            "{exact_tokens} exact tokens in a {n_tokens}-token chunk"
        )));
    }
    let shape = ChunkShape {
        n_layers,
        n_kv_heads,
        head_dim,
        n_tokens,
    };
    check_shape(&shape)?;
    let lens = (0..shape.n_tensors())
        .map(|_| r.u32().map(|l| l as usize))
        .collect::<Result<Vec<_>, _>>()?;
    let sections = lens
        .into_iter()
        .map(|len| r.bytes(len))
        .collect::<Result<Vec<_>, _>>()?;
    if !r.is_empty() {
        return Err(CodecError::corrupt("bytes after the last section"));
    }
    Ok((
        Header {
            version,
            level,
            dtype,
            shape,
            model: chunk_model,
            exact_tokens,
        },
        sections,
    ))
}
