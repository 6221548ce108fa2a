//! [`KvChunk`]: the unit the codec compresses, all layers' K and V for a span of tokens.
//!
//! Layout invariant: `data` holds little-endian elements of `dtype`, ordered by (layer, K then V,
//! head, token, channel), i.e. each tensor is the engine's `[kv_heads, n_tokens, head_dim]` slice
//! of batch 0. `data.len()` always equals `shape.n_values() * dtype.size()`.

use std::borrow::Cow;

use half::{bf16, f16};

use super::CodecError;

/// Element type of a KV cache, as the engine stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl KvDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            2 => Some(Self::BF16),
            _ => None,
        }
    }
}

/// Dimensions of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkShape {
    /// Layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Tokens in the chunk.
    pub n_tokens: usize,
}

impl ChunkShape {
    /// Values in one tensor (one layer's K or V).
    pub fn tensor_len(&self) -> usize {
        self.n_kv_heads * self.n_tokens * self.head_dim
    }

    /// Tensors in the chunk (K and V of every layer).
    pub fn n_tensors(&self) -> usize {
        2 * self.n_layers
    }

    /// Values in the chunk.
    pub fn n_values(&self) -> usize {
        self.n_tensors() * self.tensor_len()
    }
}

/// All layers' K and V for a span of tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct KvChunk {
    shape: ChunkShape,
    dtype: KvDType,
    data: Vec<u8>,
}

impl KvChunk {
    /// A chunk from raw little-endian bytes in the layout described in the module docs.
    pub fn from_bytes(
        shape: ChunkShape,
        dtype: KvDType,
        data: Vec<u8>,
    ) -> Result<Self, CodecError> {
        let expected = shape.n_values() * dtype.size();
        if data.len() != expected {
            return Err(CodecError::ShapeMismatch {
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { shape, dtype, data })
    }

    /// A chunk from f32 tensors (`tensors[2 * layer + kv]`), stored as `dtype`.
    pub fn from_f32_tensors(
        shape: ChunkShape,
        dtype: KvDType,
        tensors: &[Vec<f32>],
    ) -> Result<Self, CodecError> {
        if tensors.len() != shape.n_tensors()
            || tensors.iter().any(|t| t.len() != shape.tensor_len())
        {
            return Err(CodecError::ShapeMismatch {
                expected: shape.n_values(),
                actual: tensors.iter().map(Vec::len).sum(),
            });
        }
        let mut data = Vec::with_capacity(shape.n_values() * dtype.size());
        for t in tensors {
            write_f32(dtype, t, &mut data);
        }
        Ok(Self { shape, dtype, data })
    }

    /// The dimensions.
    pub fn shape(&self) -> ChunkShape {
        self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Consumes the chunk, giving its raw bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Raw bytes of tensor `idx` (`2 * layer + kv`, kv 0 = K, 1 = V).
    pub fn tensor_bytes(&self, idx: usize) -> &[u8] {
        let len = self.shape.tensor_len() * self.dtype.size();
        &self.data[idx * len..(idx + 1) * len]
    }

    /// Tensor `idx` as f32.
    pub fn tensor_f32(&self, idx: usize) -> Vec<f32> {
        read_f32(self.dtype, self.tensor_bytes(idx))
    }

    /// Tensor `idx` as f32, borrowed without a copy when the chunk is F32 and its bytes are
    /// aligned for f32 (on a little-endian target, where the stored bytes are the native ones).
    pub fn tensor_f32_cow(&self, idx: usize) -> Cow<'_, [f32]> {
        let bytes = self.tensor_bytes(idx);
        if cfg!(target_endian = "little") && self.dtype == KvDType::F32 {
            if let Ok(values) = bytemuck::try_cast_slice(bytes) {
                return Cow::Borrowed(values);
            }
        }
        Cow::Owned(read_f32(self.dtype, bytes))
    }
}

/// Decodes little-endian elements of `dtype` into f32.
pub(crate) fn read_f32(dtype: KvDType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        KvDType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        KvDType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        KvDType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Decodes little-endian elements of `dtype` into `out` (exactly as many).
pub(crate) fn read_f32_into(dtype: KvDType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        KvDType::F32 => out
            .iter_mut()
            .zip(bytes.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        KvDType::F16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        KvDType::BF16 => out
            .iter_mut()
            .zip(bytes.chunks_exact(2))
            .for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
    }
}

/// Appends `values` as little-endian elements of `dtype`.
pub(crate) fn write_f32(dtype: KvDType, values: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + values.len() * dtype.size(), 0);
    write_f32_into(dtype, values, &mut out[start..]);
}

/// Writes `values` as little-endian elements of `dtype` into `out` (exactly that long).
pub(crate) fn write_f32_into(dtype: KvDType, values: &[f32], out: &mut [u8]) {
    match dtype {
        KvDType::F32 => out
            .chunks_exact_mut(4)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        KvDType::F16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
        KvDType::BF16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes())),
    }
}
