//! The engine hook adapter: implements [`mistralrs_core::KvHook`] on top of a [`PrefixStore`].
//!
//! Invariants:
//! - The hook is bound to one model: [`KvHook::register`] fingerprints it, and every save and load
//!   uses that fingerprint. Registering a second, different model is refused.
//! - Saves never block the engine and never grow memory without bound: at most
//!   [`HookConfig::max_pending_saves`] saves are in flight; further ones are dropped and counted.
//!   Copying the engine's tensors to the host runs on the blocking pool, not on the async runtime.
//! - Every failure in a load is a miss (counted and logged with its reason), never an error the
//!   engine sees; the engine then recomputes from text. A streamed load that fails part-way
//!   installs the chunks that arrived and leaves the rest to the engine.
//! - With an adaptive streaming policy, each load starts from the bandwidth the previous one
//!   measured.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use mistralrs_core::{FinishedPrefix, KvHook, KvModelInfo, KvPrefix, LayerKv};
use tokio::sync::Semaphore;

use crate::{
    fingerprint::ModelFingerprint,
    metrics::{Metrics, MetricsSnapshot},
    store::PrefixStore,
    stream::{ChunkOutcome, StreamPolicy, StreamReport},
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
    /// How lookups load: `None`, whole prefixes at the store's level; otherwise chunk by chunk
    /// under this policy (see [`crate::stream`]). Changeable at run time with
    /// [`KvPluginHook::set_stream_policy`].
    pub stream: Option<StreamPolicy>,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            max_pending_saves: 4,
            load_timeout: Duration::from_secs(10),
            min_prefix_tokens: 16,
            read_only: false,
            stream: None,
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
    stream_policy: Mutex<Option<StreamPolicy>>,
    last_stream: Mutex<Option<StreamReport>>,
}

impl KvPluginHook {
    /// A hook over `store`.
    pub fn new(store: Arc<dyn PrefixStore>, config: HookConfig) -> Self {
        Self {
            save_slots: Arc::new(Semaphore::new(config.max_pending_saves)),
            stream_policy: Mutex::new(config.stream.clone()),
            last_stream: Mutex::new(None),
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

    /// Changes how later lookups load (see [`HookConfig::stream`]).
    pub fn set_stream_policy(&self, policy: Option<StreamPolicy>) {
        *lock(&self.stream_policy) = policy;
    }

    /// The report of the last streamed lookup.
    pub fn last_stream_report(&self) -> Option<StreamReport> {
        lock(&self.last_stream).clone()
    }

    /// Counts and logs a streamed lookup, and carries its bandwidth estimate over to the next.
    fn record_stream(&self, report: &StreamReport) {
        self.metrics.stream_loads(1);
        for chunk in &report.chunks {
            match &chunk.outcome {
                ChunkOutcome::Loaded => self.metrics.stream_chunks_loaded(1),
                ChunkOutcome::Failed { .. } => self.metrics.stream_chunks_failed(1),
                ChunkOutcome::Text => self.metrics.stream_chunks_text(1),
            }
        }
        tracing::info!(
            chunks = %report.summary(),
            covered = report.covered_tokens,
            prompt = report.prompt_tokens,
            budget_ms = report.budget_s * 1e3,
            elapsed_ms = report.elapsed_s * 1e3,
            bandwidth_mbit_s = report.bandwidth_bytes_s * 8e-6,
            "kvplugin: streamed lookup (L/H/F/D/C = level, T = recompute, ! = failed)"
        );
        if let Some(StreamPolicy::Adaptive(inputs)) = lock(&self.stream_policy).as_mut() {
            if report.bandwidth_bytes_s > 0.0 {
                inputs.prior_bytes_per_s = report.bandwidth_bytes_s;
            }
        }
        *lock(&self.last_stream) = Some(report.clone());
    }

    fn count_failure(&self, kind: &str) {
        self.metrics.lookup_failures(1);
        match kind {
            "denied" => self.metrics.failures_denied(1),
            "backend" | "missing" => self.metrics.failures_backend(1),
            "timeout" => self.metrics.failures_timeout(1),
            _ => self.metrics.failures_corrupt(1),
        }
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
        tracing::debug!(n_tokens, head = ?&prefix.tokens[..prefix.tokens.len().min(4)], "kvplugin: saving a prefix");
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
        let policy = lock(&self.stream_policy).clone();
        if policy.is_some() {
            // A lookup that times out leaves no report: never show the previous one instead.
            *lock(&self.last_stream) = None;
        }
        let lookup = async {
            match &policy {
                Some(policy) => self
                    .store
                    .load_streamed(&model, prompt, min_tokens, policy)
                    .await
                    .map(|l| (l.prefix, Some(l.report))),
                None => self
                    .store
                    .load(&model, prompt, min_tokens)
                    .await
                    .map(|prefix| (prefix, None)),
            }
        };
        let loaded = tokio::time::timeout(self.config.load_timeout, lookup).await;
        let elapsed = started.elapsed();
        let failure = match loaded {
            Ok(Ok((prefix, report))) => {
                if let Some(report) = &report {
                    self.record_stream(report);
                }
                let Some(prefix) = prefix else {
                    // A streamed lookup whose first chunk failed is a failure, not a miss.
                    let first_failure =
                        report
                            .iter()
                            .flat_map(|r| &r.chunks)
                            .find_map(|c| match &c.outcome {
                                ChunkOutcome::Failed { kind, .. } => Some(*kind),
                                _ => None,
                            });
                    if let Some(kind) = first_failure {
                        tracing::warn!(kind, "kvplugin: streamed lookup failed; recomputing");
                        self.count_failure(kind);
                    }
                    return None;
                };
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
            Ok(Err(e)) => e,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.config.load_timeout.as_millis() as u64,
                    "kvplugin: lookup timed out; recomputing"
                );
                self.count_failure("timeout");
                return None;
            }
        };
        tracing::warn!(error = %failure, "kvplugin: lookup failed; recomputing");
        self.count_failure(failure.kind());
        None
    }

    fn load_timeout(&self) -> Duration {
        // The hook enforces `load_timeout` itself (and counts it); the engine's own limit is a
        // backstop for a lookup that does not yield.
        self.config.load_timeout + Duration::from_secs(1)
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain values, replaced whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
