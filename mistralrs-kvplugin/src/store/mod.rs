//! Prefix stores: where the plugin keeps prefix KV caches between requests.
//!
//! A [`PrefixStore`] saves a prefix (its tokens and every layer's K/V, on the host) under a model
//! fingerprint, and finds the longest saved prefix of a prompt. Invariants every store keeps:
//! - a prefix saved under one fingerprint is never returned under another;
//! - [`PrefixStore::load`] returns `Ok(None)` on a miss; errors are for failures only, and the
//!   caller treats them as a miss (recompute), never as an answer;
//! - a returned prefix is a prefix of the prompt, longer than `min_tokens`, and leaves at least
//!   one prompt token for the engine to prefill (the engine needs logits for the last token).

pub mod admin;
pub mod breaker;
pub mod durable;
pub mod faulty;
pub mod layout;
mod memory;
mod object;
pub mod seal;
pub mod shaped;
mod streaming;

pub use memory::MemoryPrefixStore;
pub(crate) use object::{chunk_of, tensors_of};
pub use object::{ObjectPrefixStore, ObjectStoreConfig, ObjectStoreCounters};
pub use seal::StoreKey;
pub use shaped::{BandwidthTrace, ShapedStore, TraceClock};
pub use streaming::StreamedLoad;

use async_trait::async_trait;
use mistralrs_core::KvPrefix;

use crate::{
    fingerprint::ModelFingerprint,
    stream::{StreamPolicy, StreamReport},
};

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A prefix is malformed (layers of different lengths, tokens and rows disagree).
    #[error("invalid prefix: {reason}")]
    InvalidPrefix {
        /// What is wrong.
        reason: String,
    },
    /// A setting is invalid.
    #[error("invalid store setting `{field}`: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The backend failed (server down, disk full, timeout).
    #[error("store backend: {reason}")]
    Backend {
        /// The backend's message.
        reason: String,
    },
    /// The store took longer than allowed.
    #[error("store timed out: {reason}")]
    Timeout {
        /// What took too long.
        reason: String,
    },
    /// The backend refused the credentials or the permission.
    #[error("store refused access (check the credentials): {reason}")]
    Denied {
        /// The backend's message.
        reason: String,
    },
    /// An object's seal does not hold: written without this store's key, under another key, or
    /// moved to another name (see [`seal`]). Never decoded; a miss.
    #[error("object refused: {reason}")]
    Unauthenticated {
        /// What is wrong.
        reason: String,
    },
    /// An object is not what the store wrote.
    #[error("corrupt object: {reason}")]
    Corrupt {
        /// What is wrong.
        reason: String,
    },
    /// A chunk failed to decode.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl StoreError {
    pub(crate) fn backend(e: impl std::fmt::Display) -> Self {
        Self::Backend {
            reason: e.to_string(),
        }
    }

    /// Classifies an object_store error (a missing object is not an error: callers handle it).
    pub(crate) fn from_object_store(e: object_store::Error) -> Self {
        match e {
            object_store::Error::Unauthenticated { .. }
            | object_store::Error::PermissionDenied { .. } => Self::Denied {
                reason: e.to_string(),
            },
            other => Self::backend(other),
        }
    }

    /// The failure's kind, as metrics and reports count it: `backend`, `timeout`, `denied`,
    /// `unauthenticated` (an object whose seal does not hold), `corrupt` (bad or foreign data) or
    /// `invalid` (a bad prefix or setting).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Backend { .. } => "backend",
            Self::Timeout { .. } => "timeout",
            Self::Denied { .. } => "denied",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Corrupt { .. } | Self::Codec(_) => "corrupt",
            Self::InvalidPrefix { .. } | Self::Config { .. } | Self::Tensor(_) => "invalid",
        }
    }

    /// Whether trying the same operation again may succeed (a backend failure may be passing;
    /// bad data and bad settings are not).
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Backend { .. } | Self::Timeout { .. })
    }
}

/// What [`PrefixStore::save`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// The prefix was written.
    Written {
        /// Bytes the store now holds for it.
        bytes: u64,
    },
    /// The store already held this prefix (or a longer one covering it); nothing was written.
    AlreadyPresent,
}

/// Rows to allocate for a loaded prefix of `n` tokens: the engine's cache capacity for `n`
/// (`KvModelInfo::cache_capacity`). A store that decodes into buffers of that many rows hands the
/// engine tensors it takes as its cache without a copy; the rows past `n` stay unused. It must
/// not decrease as `n` grows (stores size their buffers for the longest hit a prompt allows and
/// hand a shorter hit the first `capacity(n)` rows).
pub type RowCapacity = dyn Fn(usize) -> usize + Send + Sync;

/// A place to keep prefix KV caches.
#[async_trait]
pub trait PrefixStore: Send + Sync {
    /// Saves `prefix` (host tensors, `[1, kv_heads, n, head_dim]` per layer) under `model`.
    async fn save(
        &self,
        model: &ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<SaveOutcome, StoreError>;

    /// Tokens per stored chunk, for a store that keeps prefixes in chunks; `None` for one that
    /// keeps whole prefixes. A paged engine takes loads in whole blocks: the hook refuses to
    /// register where a chunk boundary would fall inside a block.
    fn chunk_tokens(&self) -> Option<usize> {
        None
    }

    /// Finds the longest saved prefix of `prompt` under `model` that is longer than `min_tokens`
    /// and shorter than `prompt`.
    async fn load(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
    ) -> Result<Option<KvPrefix>, StoreError>;

    /// [`PrefixStore::load`] into tensors of `capacity(n)` rows for a prefix of `n` tokens (the
    /// prefix in the first `n`). A store that cannot (the default method) returns exactly `n`
    /// rows; the engine then copies the prefix once.
    async fn load_with_capacity(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        _capacity: &RowCapacity,
    ) -> Result<Option<KvPrefix>, StoreError> {
        self.load(model, prompt, min_tokens).await
    }

    /// [`PrefixStore::load_streamed`] into tensors of `capacity(n)` rows when every planned chunk
    /// arrived (see [`PrefixStore::load_with_capacity`]).
    async fn load_streamed_with_capacity(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        policy: &StreamPolicy,
        _capacity: &RowCapacity,
    ) -> Result<StreamedLoad, StoreError> {
        self.load_streamed(model, prompt, min_tokens, policy).await
    }

    /// [`PrefixStore::load`] chunk by chunk, each chunk fetched at the level `policy` chooses or
    /// left to the engine to recompute (see [`StreamedLoad`]). A store that does not keep chunks
    /// (the default method) loads whole, as `load` does, whatever the policy.
    async fn load_streamed(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        _policy: &StreamPolicy,
    ) -> Result<StreamedLoad, StoreError> {
        let prefix = self.load(model, prompt, min_tokens).await?;
        Ok(StreamedLoad {
            report: StreamReport {
                prompt_tokens: prompt.len(),
                covered_tokens: prefix.as_ref().map_or(0, |p| p.tokens.len()),
                ..StreamReport::default()
            },
            prefix,
        })
    }
}

/// Checks the shape invariants of a prefix to save: one K and V per layer, `[1, heads, n, dim]`
/// with `n == tokens.len()`. Returns the bytes its tensors hold.
pub(crate) fn validate_prefix(prefix: &KvPrefix) -> Result<u64, StoreError> {
    let n = prefix.tokens.len();
    if n == 0 || prefix.layers.is_empty() {
        return Err(StoreError::InvalidPrefix {
            reason: "empty prefix".into(),
        });
    }
    let mut bytes = 0u64;
    for (layer_idx, layer) in prefix.layers.iter().enumerate() {
        for t in [&layer.k, &layer.v] {
            let dims = t.dims();
            if dims.len() != 4 || dims[0] != 1 || dims[2] != n {
                return Err(StoreError::InvalidPrefix {
                    reason: format!("layer {layer_idx}: shape {dims:?} for {n} tokens"),
                });
            }
            bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        }
    }
    Ok(bytes)
}

/// Length of the common prefix of two token slices.
pub fn common_prefix_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
