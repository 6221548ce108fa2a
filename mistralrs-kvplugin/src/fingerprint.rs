//! Model fingerprints: the identity a cache entry is keyed under.
//!
//! Two engines may share a cache entry only if everything that determines the K/V values matches:
//! the weights (hashed byte for byte), the model's `config.json` (where the pipeline has one: rope
//! scaling, norms), how the weights were quantized after loading (in-situ quantization, UQFF), the
//! tokenizer (its full serialized form), the model kind (loader, quantization family, adapters;
//! it fixes the rope style: GGUF models use interleaved RoPE, safetensors Llama models neox), the
//! engine version, the cache shape and the cache dtype. The model's path or name is deliberately
//! left out, so the same weights found under another path still hit.
//!
//! The hash is BLAKE3 over a versioned, length-prefixed encoding, so it is stable across
//! processes, machines and Rust releases (unlike `DefaultHasher`).
//!
//! A fingerprint of a registered model also carries the cache's layout ([`KvLayout`]: layers, KV
//! heads, head size, dtype), which the hash covers: stores size every buffer from it and refuse an
//! object whose header claims another shape before allocating anything, so a small hostile object
//! cannot make a load allocate gigabytes. Equality and hashing look at the hash alone (equal
//! hashes of registered models imply equal layouts).

use std::{fmt, fs::File, hash, io, path::PathBuf};

use candle_core::DType;
use mistralrs_core::KvModelInfo;

use crate::codec::KvDType;

/// Version of the fingerprint encoding; bump it when the hashed fields change.
const FINGERPRINT_VERSION: &str = "mistralrs-kvplugin/fingerprint/v2";

/// Why a model could not be fingerprinted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    /// The engine reported no weight files, so the weights cannot be identified.
    #[error("the engine reported no weight files for model `{model_id}`")]
    NoWeightFiles {
        /// The model id the engine was loaded with.
        model_id: String,
    },
    /// The engine reported no tokenizer.
    #[error("the engine reported no tokenizer for model `{model_id}`")]
    NoTokenizer {
        /// The model id the engine was loaded with.
        model_id: String,
    },
    /// A weight file could not be read.
    #[error("cannot read weight file {path}: {source}")]
    WeightFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The tokenizer could not be serialized.
    #[error("cannot serialize the tokenizer: {reason}")]
    Tokenizer {
        /// What failed.
        reason: String,
    },
}

/// A stable 256-bit identity of a model as the KV cache sees it, with its cache layout when it
/// comes from a registered model.
#[derive(Clone, Copy)]
pub struct ModelFingerprint {
    hash: [u8; 32],
    layout: Option<KvLayout>,
}

/// The shape of one token's cache: what every stored chunk of the model must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Values per head (keys and values alike).
    pub head_dim: usize,
    /// The cache's dtype.
    pub dtype: KvDType,
}

impl KvLayout {
    /// K and V values per token, over every layer.
    pub fn values_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim
    }

    /// The layout of a model's cache; `None` where the store cannot keep it (keys and values of
    /// different sizes, a dtype the codec does not store).
    pub fn of_model(model: &KvModelInfo) -> Option<Self> {
        let dtype = match model.dtype {
            DType::F32 => KvDType::F32,
            DType::F16 => KvDType::F16,
            DType::BF16 => KvDType::BF16,
            _ => return None,
        };
        (model.k_head_dim == model.v_head_dim).then_some(Self {
            n_layers: model.num_layers,
            n_kv_heads: model.num_kv_heads,
            head_dim: model.k_head_dim,
            dtype,
        })
    }
}

impl PartialEq for ModelFingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl Eq for ModelFingerprint {}

impl hash::Hash for ModelFingerprint {
    fn hash<H: hash::Hasher>(&self, state: &mut H) {
        self.hash.hash(state);
    }
}

impl ModelFingerprint {
    /// Fingerprints the model an engine reports. Reads every weight file once (BLAKE3, memory
    /// mapped, multithreaded: about 1 GB/s per core).
    pub fn of_model(model: &KvModelInfo) -> Result<Self, FingerprintError> {
        if model.weight_files.is_empty() {
            return Err(FingerprintError::NoWeightFiles {
                model_id: model.model_id.clone(),
            });
        }
        let tokenizer = model
            .tokenizer
            .as_ref()
            .ok_or_else(|| FingerprintError::NoTokenizer {
                model_id: model.model_id.clone(),
            })?;
        let tokenizer_json =
            tokenizer
                .to_string(false)
                .map_err(|e| FingerprintError::Tokenizer {
                    reason: e.to_string(),
                })?;

        let mut hasher = blake3::Hasher::new();
        let mut field = |name: &str, value: &[u8]| {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(&(value.len() as u64).to_le_bytes());
            hasher.update(value);
        };
        field("version", FINGERPRINT_VERSION.as_bytes());
        field("model_kind", model.model_kind.as_bytes());
        field("engine_version", model.engine_version.as_bytes());
        field(
            "config_json",
            model.config_json.as_deref().unwrap_or_default().as_bytes(),
        );
        field(
            "quantization",
            model.quantization.as_deref().unwrap_or("none").as_bytes(),
        );
        field("num_layers", &(model.num_layers as u64).to_le_bytes());
        field("num_kv_heads", &(model.num_kv_heads as u64).to_le_bytes());
        field("k_head_dim", &(model.k_head_dim as u64).to_le_bytes());
        field("v_head_dim", &(model.v_head_dim as u64).to_le_bytes());
        field("dtype", model.dtype.as_str().as_bytes());
        field(
            "tokenizer",
            blake3::hash(tokenizer_json.as_bytes()).as_bytes(),
        );
        for path in &model.weight_files {
            field("weights", hash_file(path)?.as_bytes());
        }
        Ok(Self {
            hash: *hasher.finalize().as_bytes(),
            layout: KvLayout::of_model(model),
        })
    }

    /// Builds a fingerprint from raw bytes (for stores that read one back), with no layout.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            hash: bytes,
            layout: None,
        }
    }

    /// The same fingerprint with a cache layout (tools and tests that make fingerprints up).
    pub fn with_layout(self, layout: KvLayout) -> Self {
        Self {
            layout: Some(layout),
            ..self
        }
    }

    /// The cache layout of the model, when known.
    pub fn layout(&self) -> Option<KvLayout> {
        self.layout
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.hash
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelFingerprint({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hash_file(path: &PathBuf) -> Result<blake3::Hash, FingerprintError> {
    let wrap = |source| FingerprintError::WeightFile {
        path: path.clone(),
        source,
    };
    // Open first so that a missing file gives a plain NotFound rather than an mmap error.
    File::open(path).map_err(wrap)?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).map_err(wrap)?;
    Ok(hasher.finalize())
}
