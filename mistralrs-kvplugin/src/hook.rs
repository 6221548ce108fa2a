//! The engine hook adapter: implements [`mistralrs_core::KvHook`] on top of a [`PrefixStore`].
//!
//! Invariants:
//! - The hook is bound to one model: [`KvHook::register`] fingerprints it, and every save and load
//!   uses that fingerprint. Registering a second, different model is refused.
//! - Saves never block the engine and never grow memory without bound: at most
//!   [`HookConfig::max_pending_saves`] saves are in flight; further ones are dropped and counted.
//!   Copying the engine's tensors to the host runs on the blocking pool, not on the async runtime.
//! - Every failure in a load is a miss (counted and logged with its reason), never an error the
//!   engine sees; the engine then recomputes from text.

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use mistralrs_core::{FinishedPrefix, KvHook, KvModelInfo, KvPrefix, LayerKv};
use tokio::sync::Semaphore;

use crate::{
    fingerprint::ModelFingerprint,
    metrics::{Metrics, MetricsSnapshot},
    store::{PrefixStore, StoreError},
};

/// Settings of a [`KvPluginHook`].
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Saves in flight at once; more are dropped (and counted) rather than queued.
    pub max_pending_saves: usize,
    /// How long the engine waits for a lookup before prefilling without it.
    pub load_timeout: Duration,
    /// Prefixes shorter than this are neither saved nor looked up: below it, recomputing is cheaper
    /// than any store round trip.
    pub min_prefix_tokens: usize,
    /// Only look up, never save (an engine that reads a cache others fill).
    pub read_only: bool,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            max_pending_saves: 4,
            load_timeout: Duration::from_secs(10),
            min_prefix_tokens: 16,
            read_only: false,
        }
    }
}

/// A [`KvHook`] that keeps prefix caches in a [`PrefixStore`]. Create one per engine; several
/// hooks may share one store (that is how engines share caches).
pub struct KvPluginHook {
    store: Arc<dyn PrefixStore>,
    config: HookConfig,
    model: OnceLock<ModelFingerprint>,
    save_slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl KvPluginHook {
    /// A hook over `store`.
    pub fn new(store: Arc<dyn PrefixStore>, config: HookConfig) -> Self {
        Self {
            save_slots: Arc::new(Semaphore::new(config.max_pending_saves)),
            store,
            config,
            model: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The hook's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The fingerprint of the model this hook is registered for, once an engine registered it.
    pub fn model_fingerprint(&self) -> Option<ModelFingerprint> {
        self.model.get().copied()
    }

    /// Waits until `n` saves have ended (written, failed or dropped), polling the counters.
    pub async fn wait_for_saves(
        &self,
        n: u64,
        timeout: Duration,
    ) -> anyhow::Result<MetricsSnapshot> {
        self.wait_until(timeout, |m| {
            m.saves + m.save_failures + m.dropped_saves >= n
        })
        .await
        .map_err(|m| anyhow::anyhow!("{n} saves did not end within {timeout:?}: {m:?}"))
    }

    /// Waits until the engine reports the finished sequence of a `prompt_tokens`-token prompt
    /// (the engine's own start-up warm-up request finishes too, with a one-token prompt).
    pub async fn wait_for_finished(
        &self,
        prompt_tokens: usize,
        timeout: Duration,
    ) -> anyhow::Result<MetricsSnapshot> {
        self.wait_until(timeout, |m| m.last_prompt_tokens == prompt_tokens as u64)
            .await
            .map_err(|m| {
                anyhow::anyhow!(
                    "no finished {prompt_tokens}-token sequence within {timeout:?}: {m:?}"
                )
            })
    }

    async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&MetricsSnapshot) -> bool,
    ) -> Result<MetricsSnapshot, MetricsSnapshot> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics.snapshot();
            if done(&m) {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Err(m);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn save(&self, model: ModelFingerprint, prefix: KvPrefix) {
        let n_tokens = prefix.tokens.len() as u64;
        // Copying out of the engine's cache is CPU work proportional to the prefix: keep it off
        // the async runtime.
        let host = tokio::task::spawn_blocking(move || to_host(prefix)).await;
        let host = match host {
            Ok(Ok(host)) => host,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kvplugin: cannot copy a finished cache; not saved");
                self.metrics.save_failures(1);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kvplugin: copy task failed; not saved");
                self.metrics.save_failures(1);
                return;
            }
        };
        match self.store.save(&model, host).await {
            Ok(outcome) => {
                tracing::debug!(?outcome, n_tokens, "kvplugin: saved prefix");
                self.metrics.saves(1);
                self.metrics.saved_tokens(n_tokens);
            }
            Err(e) => {
                tracing::warn!(error = %e, "kvplugin: saving a prefix failed");
                self.metrics.save_failures(1);
            }
        }
    }
}

/// Deep copies of the engine's views on the host, so that the store never holds (or keeps alive)
/// the engine's cache buffers.
fn to_host(prefix: KvPrefix) -> candle_core::Result<KvPrefix> {
    let copy = |t: &Tensor| t.to_device(&Device::Cpu)?.force_contiguous();
    let layers = prefix
        .layers
        .iter()
        .map(|l| {
            Ok(LayerKv {
                k: copy(&l.k)?,
                v: copy(&l.v)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(KvPrefix {
        tokens: prefix.tokens,
        layers,
    })
}

#[async_trait]
impl KvHook for KvPluginHook {
    fn register(&self, model: &KvModelInfo) -> anyhow::Result<()> {
        let fingerprint = ModelFingerprint::of_model(model)?;
        let registered = *self.model.get_or_init(|| fingerprint);
        if registered != fingerprint {
            anyhow::bail!(
                "this hook is registered for model {registered}; model `{}` ({fingerprint}) needs a hook of its own",
                model.model_id
            );
        }
        tracing::info!(model = %model.model_id, %fingerprint, "kvplugin: hook registered");
        Ok(())
    }

    async fn save_prefix(&self, finished: FinishedPrefix) {
        self.metrics
            .record_finished(finished.prompt_tokens, finished.reused_tokens);
        let Some(model) = self.model.get().copied() else {
            return;
        };
        if self.config.read_only || finished.prefix.tokens.len() < self.config.min_prefix_tokens {
            return;
        }
        let Ok(_slot) = self.save_slots.clone().try_acquire_owned() else {
            tracing::debug!("kvplugin: save queue full; dropping a prefix");
            self.metrics.dropped_saves(1);
            return;
        };
        self.save(model, finished.prefix).await;
    }

    async fn load_prefix(&self, prompt: &[u32], cached_tokens: usize) -> Option<KvPrefix> {
        let model = self.model.get().copied()?;
        let min_tokens = cached_tokens.max(self.config.min_prefix_tokens.saturating_sub(1));
        if prompt.len() <= min_tokens + 1 {
            return None;
        }
        self.metrics.lookups(1);
        let started = Instant::now();
        let loaded = tokio::time::timeout(
            self.config.load_timeout,
            self.store.load(&model, prompt, min_tokens),
        )
        .await;
        let elapsed = started.elapsed();
        let failure = match loaded {
            Ok(Ok(Some(prefix))) => {
                self.metrics.hits(1);
                self.metrics.hit_tokens(prefix.tokens.len() as u64);
                self.metrics.load_micros(elapsed.as_micros() as u64);
                tracing::info!(
                    tokens = prefix.tokens.len(),
                    load_ms = elapsed.as_secs_f64() * 1e3,
                    "kvplugin: store hit"
                );
                return Some(prefix);
            }
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => e,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.config.load_timeout.as_millis() as u64,
                    "kvplugin: lookup timed out; recomputing"
                );
                self.metrics.lookup_failures(1);
                self.metrics.failures_timeout(1);
                return None;
            }
        };
        tracing::warn!(error = %failure, "kvplugin: lookup failed; recomputing");
        self.metrics.lookup_failures(1);
        match failure {
            StoreError::Denied { .. } => self.metrics.failures_denied(1),
            StoreError::Backend { .. } => self.metrics.failures_backend(1),
            _ => self.metrics.failures_corrupt(1),
        }
        None
    }

    fn load_timeout(&self) -> Duration {
        // The hook enforces `load_timeout` itself (and counts it); the engine's own limit is a
        // backstop for a lookup that does not yield.
        self.config.load_timeout + Duration::from_secs(1)
    }
}
