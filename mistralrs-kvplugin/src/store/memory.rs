//! An in-memory [`PrefixStore`], bounded in bytes with least-recently-used eviction.
//!
//! It holds whole prefixes (not chunks) and finds the longest match by a scan over the entries of
//! the model, which is fine for the few hundred entries a memory budget allows. It is the
//! reference behaviour the persistent stores are tested against, and serves engines in one process.

use std::sync::Mutex;

use async_trait::async_trait;
use indexmap::IndexMap;
use mistralrs_core::{KvPrefix, LayerKv};

use super::{common_prefix_len, validate_prefix, PrefixStore, SaveOutcome, StoreError};
use crate::fingerprint::ModelFingerprint;

struct Entry {
    prefix: KvPrefix,
    bytes: u64,
}

#[derive(Default)]
struct Inner {
    /// Insertion order is recency order: the front is evicted first.
    entries: IndexMap<(ModelFingerprint, Vec<u32>), Entry>,
    used_bytes: u64,
}

/// Prefix caches in host memory, at most `capacity_bytes` of tensor data.
pub struct MemoryPrefixStore {
    inner: Mutex<Inner>,
    capacity_bytes: u64,
}

impl MemoryPrefixStore {
    /// A store holding at most `capacity_bytes` of K/V data.
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity_bytes,
        }
    }

    /// Bytes of K/V data held.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    /// Number of prefixes held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated in a way that matters
        // more than losing cache entries, so a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl PrefixStore for MemoryPrefixStore {
    async fn save(
        &self,
        model: &ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<SaveOutcome, StoreError> {
        let bytes = validate_prefix(&prefix)?;
        if bytes > self.capacity_bytes {
            return Ok(SaveOutcome::AlreadyPresent);
        }
        let mut inner = self.lock();
        let covered = inner.entries.keys().any(|(fp, tokens)| {
            fp == model
                && tokens.len() >= prefix.tokens.len()
                && tokens[..prefix.tokens.len()] == prefix.tokens[..]
        });
        if covered {
            return Ok(SaveOutcome::AlreadyPresent);
        }
        // Shorter prefixes of this one are now redundant.
        let redundant: Vec<_> = inner
            .entries
            .keys()
            .filter(|(fp, tokens)| {
                fp == model
                    && tokens.len() < prefix.tokens.len()
                    && prefix.tokens[..tokens.len()] == tokens[..]
            })
            .cloned()
            .collect();
        for key in redundant {
            if let Some(old) = inner.entries.shift_remove(&key) {
                inner.used_bytes -= old.bytes;
            }
        }
        while inner.used_bytes + bytes > self.capacity_bytes {
            let Some((_, old)) = inner.entries.shift_remove_index(0) else {
                break;
            };
            inner.used_bytes -= old.bytes;
        }
        inner.used_bytes += bytes;
        inner
            .entries
            .insert((*model, prefix.tokens.clone()), Entry { prefix, bytes });
        Ok(SaveOutcome::Written { bytes })
    }

    async fn load(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
    ) -> Result<Option<KvPrefix>, StoreError> {
        let mut inner = self.lock();
        let usable = prompt.len().saturating_sub(1);
        let best = inner
            .entries
            .iter()
            .enumerate()
            .filter(|(_, ((fp, _), _))| fp == model)
            .map(|(idx, ((_, tokens), _))| (idx, common_prefix_len(tokens, prompt).min(usable)))
            .max_by_key(|&(_, len)| len);
        let Some((idx, n_tokens)) = best.filter(|&(_, len)| len > min_tokens) else {
            return Ok(None);
        };
        // Mark as recently used.
        let last = inner.entries.len() - 1;
        inner.entries.move_index(idx, last);
        let entry = &inner.entries[last];
        let layers = entry
            .prefix
            .layers
            .iter()
            .map(|l| {
                Ok(LayerKv {
                    k: l.k.narrow(2, 0, n_tokens)?,
                    v: l.v.narrow(2, 0, n_tokens)?,
                })
            })
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(Some(KvPrefix {
            tokens: prompt[..n_tokens].to_vec(),
            layers,
            approximate_from: None,
        }))
    }
}
