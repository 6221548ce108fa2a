//! The KV-cache codec: CacheGen-style compression of one chunk of KV (all layers' K and V for a
//! span of tokens), pure and synchronous: bytes in, bytes out. The byte format is specified in
//! `FORMAT.md` beside this file; format constants live in [`format`].
//!
//! Levels: [`Level::Lossless`] (bit-exact: byte planes + zstd) and lossy levels built from
//! entropy-coded scalar quantisation ([`quant`]): steps differ between K and V (see
//! [`Level::lossy_spec`] for what was measured); keys and values are normalised per channel;
//! the sequence's first token (the attention sink) is kept exact ([`SINK_TOKENS`]);
//! token-locality differences are used per tensor only where they shrink the stream; a
//! hand-written rANS coder ([`rans`], four independent lanes) spends the bits.
//!
//! Versions: this build writes format version 2 and reads 1 and 2 (version 1's lossy reader is
//! frozen in `v1.rs`). Speed: decoding is scalar (the rANS lanes); the encoder's normalisation and
//! quantisation loops are compiled a second time for AVX2 and chosen at run time
//! (`quant::encode`), the crate's only `unsafe` call.
//!
//! Invariants:
//! - [`decode`] never panics on any input: every problem is a typed [`CodecError`], checked in the
//!   order magic, version, length, checksum, model, then the payload itself.
//! - A lossless chunk decodes bit for bit; a lossy one within `s * step / 2` of each input value,
//!   `s` being its normalisation group's scale (see [`quant`]).
//! - Tensors are coded independently, so encode and decode use all rayon threads.

mod chunk;
pub mod format;
mod lossless;
mod quant;
pub mod rans;
pub mod reader;
mod v1;

pub use chunk::{ChunkShape, KvChunk, KvDType};
pub use quant::{Dest, Grouping};

use rayon::prelude::*;

use format::Header;
use quant::Dims;
use reader::Reader;

/// Errors of the codec. Decoding errors are never worth retrying: the bytes are wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The input ends before the format says it should.
    #[error("truncated: needed {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the format needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The input does not start with the format's magic bytes.
    #[error("not a KV chunk: magic {found:02x?}")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The format version is not one this build reads.
    #[error("unsupported format version {version} (this build reads 1 to {supported})")]
    UnsupportedVersion {
        /// The chunk's version.
        version: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// The checksum does not match: the bytes were damaged.
    #[error("checksum mismatch: stored {stored:016x}, computed {computed:016x}")]
    ChecksumMismatch {
        /// The stored checksum.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// The chunk belongs to another model.
    #[error("chunk is for model {actual}, expected {expected}")]
    WrongModel {
        /// Hex fingerprint expected.
        expected: String,
        /// Hex fingerprint in the chunk.
        actual: String,
    },
    /// Unknown codec level.
    #[error("unknown codec level {id}")]
    UnknownLevel {
        /// The level id.
        id: u8,
    },
    /// Unknown element type.
    #[error("unknown dtype code {code}")]
    UnknownDType {
        /// The dtype code.
        code: u8,
    },
    /// Data length and shape disagree.
    #[error("shape needs {expected} elements/bytes, got {actual}")]
    ShapeMismatch {
        /// What the shape needs.
        expected: usize,
        /// What was given.
        actual: usize,
    },
    /// The shape cannot be coded (zero or too large dimensions).
    #[error("invalid shape: {reason}")]
    InvalidShape {
        /// What is wrong.
        reason: String,
    },
    /// The payload is malformed although the checksum matched (a writer bug).
    #[error("corrupt payload: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
}

impl CodecError {
    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        Self::Corrupt {
            reason: reason.into(),
        }
    }
}

/// How K or V of a layer band is quantised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// Step in units of the group scale, for the first, middle and last third of the layers.
    pub steps: [f32; 3],
    /// Normalisation groups.
    pub grouping: Grouping,
}

/// A lossy level: quantisation of keys and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossySpec {
    /// Keys.
    pub keys: QuantSpec,
    /// Values.
    pub values: QuantSpec,
}

/// A codec level, from largest to smallest output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Bit-exact.
    Lossless,
    /// Lossy, near-lossless: about 7.3 bits per value on SmolLM2 (2.2x smaller than 16-bit),
    /// greedy continuations unchanged; what the store writes by default.
    High,
    /// Lossy, fine.
    Fine,
    /// Lossy, the default: about 3.6 bits per value on SmolLM2, perplexity within 0.1%.
    Default,
    /// Lossy, the smallest.
    Coarse,
}

impl Level {
    /// Every level, largest output first.
    pub const ALL: [Level; 5] = [
        Level::Lossless,
        Level::High,
        Level::Fine,
        Level::Default,
        Level::Coarse,
    ];

    /// The level's name (as on the command line).
    pub fn name(self) -> &'static str {
        match self {
            Level::Lossless => "lossless",
            Level::High => "high",
            Level::Fine => "fine",
            Level::Default => "default",
            Level::Coarse => "coarse",
        }
    }

    /// The level called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Most tokens one chunk of this level may hold: a lossy level's finest step bounds the
    /// group length (see [`quant`]); lossless chunks are bounded only by the format.
    pub fn max_chunk_tokens(self) -> usize {
        let limit = match self.lossy_spec() {
            None => usize::MAX,
            Some(spec) => spec
                .keys
                .steps
                .iter()
                .chain(&spec.values.steps)
                .map(|&step| quant::max_group_len(step))
                .min()
                .unwrap_or(usize::MAX),
        };
        limit.min(format::MAX_TOKENS)
    }

    /// The id stored in the format.
    pub fn id(self) -> u8 {
        match self {
            Level::Lossless => 0,
            Level::Fine => 1,
            Level::Default => 2,
            Level::Coarse => 3,
            // Added after 1-3; ids are never renumbered (they are in stored chunks).
            Level::High => 4,
        }
    }

    /// The level with format id `id`.
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.id() == id)
    }

    /// The quantisation of a lossy level; `None` for lossless.
    pub fn lossy_spec(self) -> Option<LossySpec> {
        let spec = |k: [f32; 3], v: [f32; 3]| LossySpec {
            keys: QuantSpec {
                steps: k,
                grouping: Grouping::PerChannel,
            },
            values: QuantSpec {
                steps: v,
                grouping: Grouping::PerChannel,
            },
        };
        // Steps chosen with `kvplugin bench codec --spec` on SmolLM2-135M (1,024 cached tokens,
        // perplexity over the next 1,024): values need finer steps than keys (quantising only
        // the values cost 3x the perplexity of only the keys), and on this model the deeper
        // two thirds of the layers are more sensitive than the first (the opposite of CacheGen's
        // 7B models), so the steps are flat across depth; per-channel groups beat per-token and
        // per-head groups for both K and V at equal size.
        // `high` (steps a tenth of `default`'s) is where greedy continuations stop changing:
        // 64 of 64 tokens equal and perplexity +0.01% at 7.3 bits per value, against 16 of 64
        // at 5.9 bits (steps 0.1 / 0.06).
        match self {
            Level::Lossless => None,
            Level::High => Some(spec([0.04; 3], [0.025; 3])),
            Level::Fine => Some(spec([0.35; 3], [0.2; 3])),
            Level::Default => Some(spec([0.5; 3], [0.3; 3])),
            Level::Coarse => Some(spec([0.8; 3], [0.5; 3])),
        }
    }
}

/// Leading tokens of a sequence that lossy levels keep exact: the first token is the attention
/// sink, and quantising it costs SmolLM2 most of the perplexity loss (measured with
/// `kvplugin bench codec --sensitivity`: 41.9% with it quantised, 7.5% with it exact; keeping
/// tokens 1-3 exact too changed nothing).
pub const SINK_TOKENS: usize = 1;

/// How to encode a chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    /// The level.
    pub level: Level,
    /// Leading tokens of the chunk to keep exact in lossy levels.
    pub exact_leading_tokens: usize,
    /// Quantisation to use instead of the level's (for experiments).
    pub spec: Option<LossySpec>,
}

impl EncodeOptions {
    /// Options for a chunk that starts at token `start` of its sequence: the sequence's first
    /// [`SINK_TOKENS`] tokens are kept exact.
    pub fn for_chunk(level: Level, start: usize) -> Self {
        Self {
            level,
            exact_leading_tokens: SINK_TOKENS.saturating_sub(start),
            spec: None,
        }
    }
}

/// Encodes `chunk` at `level`, tagged with the model fingerprint `model` (as a chunk that does not
/// start its sequence; see [`encode_with`]).
pub fn encode(chunk: &KvChunk, level: Level, model: &[u8; 32]) -> Result<Vec<u8>, CodecError> {
    encode_with(chunk, &EncodeOptions::for_chunk(level, usize::MAX), model)
}

/// Encodes `chunk` with explicit options.
pub fn encode_with(
    chunk: &KvChunk,
    options: &EncodeOptions,
    model: &[u8; 32],
) -> Result<Vec<u8>, CodecError> {
    let shape = chunk.shape();
    format::check_shape(&shape)?;
    let level = options.level;
    let spec = options.spec.or(level.lossy_spec());
    let exact_tokens = match spec {
        Some(_) if level != Level::Lossless => options.exact_leading_tokens.min(shape.n_tokens),
        _ => 0,
    };
    let dims = Dims {
        heads: shape.n_kv_heads,
        tokens: shape.n_tokens,
        channels: shape.head_dim,
    };
    let elem = chunk.dtype().size();
    let sections: Vec<Vec<u8>> = match spec.filter(|_| level != Level::Lossless) {
        None => (0..shape.n_tensors())
            .into_par_iter()
            .map(|t| {
                let mut out = Vec::new();
                lossless::encode(chunk.tensor_bytes(t), dims, elem, &mut out);
                out
            })
            .collect(),
        Some(spec) => {
            let quantised = shape.n_tokens - exact_tokens;
            let check = |q: &QuantSpec| -> Result<(), CodecError> {
                for step in q.steps {
                    let group_len = match q.grouping {
                        Grouping::PerChannel => quantised,
                        Grouping::PerToken => shape.head_dim,
                        Grouping::PerHead => quantised * shape.head_dim,
                    };
                    if !(step.is_finite() && step > 0.0) || group_len > quant::max_group_len(step) {
                        return Err(CodecError::InvalidShape {
                            reason: format!(
                                "{group_len} values per group is too many for step {step}"
                            ),
                        });
                    }
                }
                Ok(())
            };
            check(&spec.keys)?;
            check(&spec.values)?;
            let rest = Dims {
                tokens: quantised,
                ..dims
            };
            (0..shape.n_tensors())
                .into_par_iter()
                .map(|t| {
                    let (layer, is_value) = (t / 2, t % 2 == 1);
                    let q = if is_value { spec.values } else { spec.keys };
                    let band = (layer * 3 / shape.n_layers).min(2);
                    let bytes = chunk.tensor_bytes(t);
                    let row = dims.channels * elem;
                    let mut out = Vec::new();
                    // Exact tokens first, as raw elements, head by head.
                    for h in 0..dims.heads {
                        let start = h * dims.tokens * row;
                        out.extend_from_slice(&bytes[start..start + exact_tokens * row]);
                    }
                    if quantised > 0 {
                        let x = chunk.tensor_f32_cow(t);
                        let heads: Vec<&[f32]> = x
                            .chunks_exact(dims.tokens * dims.channels)
                            .map(|head| &head[exact_tokens * dims.channels..])
                            .collect();
                        quant::encode(&heads, rest, q.grouping, q.steps[band], &mut out);
                    }
                    out
                })
                .collect()
        }
    };
    let header = Header {
        version: format::VERSION,
        level,
        dtype: chunk.dtype(),
        shape,
        model: *model,
        exact_tokens,
    };
    Ok(format::assemble(&header, &sections))
}

/// Decodes a chunk, checking that it was written for `model`.
pub fn decode(bytes: &[u8], model: &[u8; 32]) -> Result<KvChunk, CodecError> {
    let parsed = ParsedChunk::parse(bytes, model)?;
    let header = parsed.header.clone();
    let shape = header.shape;
    let dims = parsed.dims();
    let elem = header.dtype.size();
    let tensor_bytes = shape.tensor_len() * elem;
    let mut data = vec![0u8; shape.n_values() * elem];
    data.par_chunks_mut(tensor_bytes).enumerate().try_for_each(
        |(t, out)| -> Result<(), CodecError> {
            if header.level == Level::Lossless {
                let mut r = Reader::new(parsed.sections[t]);
                lossless::decode(&mut r, dims, elem, out)?;
                return finish(&r);
            }
            let mut values = vec![0f32; shape.tensor_len()];
            parsed.decode_tensor_into(
                t,
                &mut Dest {
                    data: &mut values,
                    tokens: dims.tokens,
                    token_offset: 0,
                    take: dims.tokens,
                },
            )?;
            chunk::write_f32_into(header.dtype, &values, out);
            Ok(())
        },
    )?;
    KvChunk::from_bytes(shape, header.dtype, data)
}

fn finish(r: &Reader<'_>) -> Result<(), CodecError> {
    if r.is_empty() {
        Ok(())
    } else {
        Err(CodecError::corrupt("tensor section has trailing bytes"))
    }
}

/// A chunk whose header and checksum have been checked, decoded tensor by tensor straight into
/// the caller's f32 buffers: the fast path for assembling a long prefix from many chunks without
/// intermediate copies (each value is written once, where it belongs).
#[derive(Debug)]
pub struct ParsedChunk<'a> {
    header: Header,
    sections: Vec<&'a [u8]>,
}

impl<'a> ParsedChunk<'a> {
    /// Checks magic, version, length, checksum and model (see [`decode`]).
    pub fn parse(bytes: &'a [u8], model: &[u8; 32]) -> Result<Self, CodecError> {
        let (header, sections) = format::parse(bytes, model)?;
        Ok(Self { header, sections })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn dims(&self) -> Dims {
        let s = self.header.shape;
        Dims {
            heads: s.n_kv_heads,
            tokens: s.n_tokens,
            channels: s.head_dim,
        }
    }

    /// Decodes tensor `t` (`2 * layer + kv`) into `dest`, as f32. Rounded to the chunk's dtype,
    /// the values are exactly [`decode`]'s (which rounds dequantised values to the dtype).
    pub fn decode_tensor_into(&self, t: usize, dest: &mut Dest<'_>) -> Result<(), CodecError> {
        let section = self
            .sections
            .get(t)
            .ok_or_else(|| CodecError::InvalidShape {
                reason: format!("tensor {t} of {}", self.sections.len()),
            })?;
        let dims = self.dims();
        dest.check(dims)?;
        let dtype = self.header.dtype;
        let elem = dtype.size();
        let row = dims.channels * elem;
        let mut r = Reader::new(section);
        if self.header.level == Level::Lossless {
            lossless::decode_f32_into(&mut r, dims, dtype, dest)?;
            return finish(&r);
        }
        // Exact leading tokens: raw elements, head by head.
        let exact = self.header.exact_tokens;
        let raw = r.bytes(dims.heads * exact * row)?;
        let rows = exact.min(dest.take);
        for h in 0..dims.heads {
            let src = &raw[h * exact * row..][..rows * row];
            let at = (h * dest.tokens + dest.token_offset) * dims.channels;
            chunk::read_f32_into(dtype, src, &mut dest.data[at..at + rows * dims.channels]);
        }
        let quantised = dims.tokens - exact;
        if quantised > 0 {
            let rest = Dims {
                tokens: quantised,
                ..dims
            };
            let mut rest_dest = Dest {
                data: &mut *dest.data,
                tokens: dest.tokens,
                token_offset: dest.token_offset + exact,
                take: dest.take.saturating_sub(exact),
            };
            if self.header.version == 1 {
                v1::decode(&mut r, rest, &mut rest_dest)?;
            } else {
                quant::decode(&mut r, rest, &mut rest_dest)?;
            }
        }
        finish(&r)
    }
}

/// Reads and checks only the header (magic, version, length, checksum, model).
pub fn inspect(bytes: &[u8], model: &[u8; 32]) -> Result<Header, CodecError> {
    format::parse(bytes, model).map(|(h, _)| h)
}
