//! The engine hook adapter: implements [`mistralrs_core::KvHook`] on top of a [`PrefixStore`].
//!
//! Invariants:
//! - The hook is bound to one model: [`KvHook::register`] fingerprints it, and every save and load
//!   uses that fingerprint. Registering a second, different model is refused.
//! - Saves never block the engine and never grow memory without bound: at most
//!   [`HookConfig::max_pending_saves`] saves are in flight; further ones are dropped and counted.
//!   Copying the engine's tensors to the host runs on the blocking pool, not on the async runtime.
//! - Lookups in flight never hold more than [`HookConfig::lookup_memory_bytes`] of decode
//!   buffers together: each reserves its buffers' bytes (from the registered model's layout)
//!   before it starts, and one that does not fit is not made (a recompute, counted), never
//!   queued.
//! - Every failure in a load is a miss (counted and logged with its reason), never an error the
//!   engine sees; the engine then recomputes from text. A streamed load that fails part-way
//!   installs the chunks that arrived and leaves the rest to the engine.
//! - With an adaptive streaming policy, each load starts from the bandwidth the previous one
//!   measured.
//! - A lookup whose prompt was announced with [`KvPluginHook::expect_blend`] is blended
//!   ([`crate::blend`]); its cache is approximate, so only its exact rows are ever saved. A chat
//!   or completion prompt whose text holds the blend separator is announced by the hook itself
//!   (`prepare_prompt`): the separators are removed and each part tokenized alone; the model never
//!   sees a separator, with or without a blend.
//! - How many prompt tokens each scheduled sequence took from a cache is kept for the last
//!   [`MAX_REUSE_RECORDS`] sequences, by sequence id (the `id` of the engine's responses), for
//!   the server to report as `usage.prompt_tokens_details.cached_tokens`.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use indexmap::IndexMap;
use mistralrs_core::{
    kv_blend::KvLayerModel, FinishedPrefix, KvHook, KvModelInfo, KvPrefix, LayerKv,
};
use tokio::sync::Semaphore;

use crate::{
    blend::{
        chunk_key,
        forward::{self, KvSupply, Segment, SegmentKv},
        rope::Rope,
        BlendConfig, BlendPlan, BlendPrompt, BlendReport, ChunkCache, ChunkSource, PlanBook,
        RatioController,
    },
    codec::KvDType,
    fingerprint::ModelFingerprint,
    metrics::{Metrics, MetricsSnapshot},
    store::PrefixStore,
    stream::{Choice, ChunkOutcome, StreamPolicy, StreamReport},
};

/// Settings of a [`KvPluginHook`].
#[derive(Debug, Clone)]
pub struct HookConfig {
    /// Saves in flight at once; more are dropped (and counted) rather than queued.
    pub max_pending_saves: usize,
    /// How long a store lookup may take before the engine prefills without it.
    pub load_timeout: Duration,
    /// How long a blended lookup may take (loading and computing its documents' caches, then
    /// recomputing the selected rows). A blend that computes documents does about a prefill's
    /// work; cutting it at a store lookup's timeout would throw that work away and prefill
    /// again, so it gets a bound of its own.
    pub blend_timeout: Duration,
    /// Prefixes shorter than this are neither saved nor looked up: below it, recomputing is cheaper
    /// than any store round trip.
    pub min_prefix_tokens: usize,
    /// Only look up, never save (an engine that reads a cache others fill).
    pub read_only: bool,
    /// Bytes of decode buffers every lookup in flight may hold together (see the module docs).
    pub lookup_memory_bytes: u64,
    /// How lookups load: `None`, whole prefixes at the store's level; otherwise chunk by chunk
    /// under this policy (see [`crate::stream`]). Changeable at run time with
    /// [`KvPluginHook::set_stream_policy`].
    pub stream: Option<StreamPolicy>,
    /// How blended lookups select rows, and the memory for document caches. Changeable at run
    /// time with [`KvPluginHook::set_blend_config`].
    pub blend: BlendConfig,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            max_pending_saves: 4,
            load_timeout: Duration::from_secs(10),
            blend_timeout: Duration::from_secs(120),
            min_prefix_tokens: 16,
            read_only: false,
            lookup_memory_bytes: 4 << 30,
            stream: None,
            blend: BlendConfig::default(),
        }
    }
}

/// A [`KvHook`] that keeps prefix caches in a [`PrefixStore`]. Create one per engine; several
/// hooks may share one store (that is how engines share caches).
pub struct KvPluginHook {
    store: Arc<dyn PrefixStore>,
    config: HookConfig,
    model: OnceLock<ModelFingerprint>,
    /// What the engine reported at registration (its cache capacity rule, for loads it can take
    /// without a copy).
    engine_model: OnceLock<Arc<KvModelInfo>>,
    save_slots: Arc<Semaphore>,
    /// The lookup memory budget, in MiB permits.
    lookup_memory: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    stream_policy: Mutex<Option<StreamPolicy>>,
    last_stream: Mutex<Option<StreamReport>>,
    layers: OnceLock<BlendModel>,
    plans: PlanBook,
    chunk_cache: Arc<ChunkCache>,
    blend_config: Mutex<BlendConfig>,
    controller: Arc<Mutex<RatioController>>,
    last_blend: Mutex<Option<BlendReport>>,
    reuse_by_sequence: Mutex<IndexMap<usize, usize>>,
}

/// Sequences whose reused-token count is kept for [`KvPluginHook::take_reused_tokens`]: a
/// response read later than this many sequences after its own start reports none.
pub const MAX_REUSE_RECORDS: usize = 4096;

/// The registered model's layers, for blends.
#[derive(Clone)]
struct BlendModel {
    layers: Arc<dyn KvLayerModel>,
    rope: Rope,
    /// Bytes of K and V per token, all layers.
    bytes_per_token: usize,
}

impl KvPluginHook {
    /// A hook over `store`.
    pub fn new(store: Arc<dyn PrefixStore>, config: HookConfig) -> Self {
        Self {
            save_slots: Arc::new(Semaphore::new(config.max_pending_saves)),
            lookup_memory: Arc::new(Semaphore::new(
                (config.lookup_memory_bytes >> 20).min(Semaphore::MAX_PERMITS as u64) as usize,
            )),
            stream_policy: Mutex::new(config.stream.clone()),
            last_stream: Mutex::new(None),
            layers: OnceLock::new(),
            plans: PlanBook::default(),
            chunk_cache: Arc::new(ChunkCache::new(config.blend.memory_bytes)),
            blend_config: Mutex::new(config.blend.clone()),
            controller: Arc::default(),
            last_blend: Mutex::new(None),
            reuse_by_sequence: Mutex::new(IndexMap::new()),
            store,
            config,
            model: OnceLock::new(),
            engine_model: OnceLock::new(),
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

    /// Announces a blended prompt: the lookup of exactly `plan.tokens` will blend its documents'
    /// caches instead of looking for a prefix. Send the request as these tokens.
    pub fn expect_blend(&self, plan: BlendPlan) {
        self.plans.insert(plan);
    }

    /// How later blends select rows.
    pub fn set_blend_config(&self, config: BlendConfig) {
        *lock(&self.blend_config) = config;
    }

    /// The report of the last blended lookup.
    pub fn last_blend_report(&self) -> Option<BlendReport> {
        lock(&self.last_blend).clone()
    }

    /// The in-memory document caches.
    pub fn chunk_cache(&self) -> &ChunkCache {
        &self.chunk_cache
    }

    /// Whether blends can run: an engine registered a model whose file offers layer access.
    pub fn can_blend(&self) -> bool {
        self.layers.get().is_some()
    }

    /// Makes sure the prefix and every document of `plan` have a cache in memory and in the
    /// store, computing those that have none (documents indexed ahead of their first question).
    /// Returns where each came from.
    pub async fn prepare_blend(&self, plan: &BlendPlan) -> crate::Result<Vec<ChunkSource>> {
        let (Some(model), Some(blend_model)) =
            (self.model.get().copied(), self.layers.get().cloned())
        else {
            return Err(crate::Error::InvalidInput(
                "no engine with layer access registered this hook".into(),
            ));
        };
        let mut sources = Vec::new();
        let sink = lock(&self.blend_config).document_sink;
        for part in plan.cache_parts(sink) {
            let tokens = part.cache_tokens;
            let key = chunk_key(&model, &tokens);
            if self.chunk_cache.get(&key).is_some() {
                sources.push(ChunkSource::Memory);
                continue;
            }
            if let Some(kv) = load_chunk(&*self.store, &model, &tokens).await {
                self.chunk_cache.insert(key, kv);
                sources.push(ChunkSource::Store);
                continue;
            }
            let task_model = blend_model.clone();
            let task_tokens = tokens.clone();
            let kv = tokio::task::spawn_blocking(move || {
                forward::standalone(&*task_model.layers, &task_model.rope, &task_tokens)
            })
            .await
            .map_err(|e| crate::Error::Engine(anyhow::anyhow!("document forward: {e}")))??;
            let kv = Arc::new(kv);
            self.chunk_cache.insert(key, kv.clone());
            self.store
                .save(
                    &model,
                    KvPrefix {
                        tokens,
                        layers: kv.to_vec(),
                        approximate_from: None,
                    },
                )
                .await?;
            self.metrics.blend_chunks_computed(1);
            sources.push(ChunkSource::Computed);
        }
        Ok(sources)
    }

    /// The cache a blended lookup of `plan.tokens` hands the engine (all but the last token),
    /// computed now; `None` when the blend cannot run (see the log). Benchmarks and tests use it
    /// to look at the cache itself.
    pub async fn blend_now(&self, plan: BlendPlan) -> Option<KvPrefix> {
        let model = self.model.get().copied()?;
        let prompt = plan.tokens.clone();
        self.load_blended(model, plan, &prompt).await
    }

    /// The blended lookup of `prompt` under `plan` (see [`crate::blend`]).
    async fn load_blended(
        &self,
        model: ModelFingerprint,
        plan: BlendPlan,
        prompt: &[u32],
    ) -> Option<KvPrefix> {
        let started = Instant::now();
        let Some(blend_model) = self.layers.get().cloned() else {
            tracing::warn!(
                "kvplugin: this model file offers no layer access; blend skipped, prefilling"
            );
            self.metrics.blend_failures(1);
            return None;
        };
        let config = lock(&self.blend_config).clone();
        let rows = prompt.len() - 1;
        let n_layers = blend_model.layers.num_layers();
        // Parts: the exact prefix, the documents, then the question up to the last token.
        let parts = plan.cache_parts(config.document_sink);
        let question = plan.chunks.last().map_or(plan.prefix_len, |r| r.end)..rows;
        let sources = Arc::new(Mutex::new(vec![ChunkSource::Memory; parts.len()]));
        let mut segments = Vec::with_capacity(parts.len() + 1);
        let mut load_bytes = 0u64;
        let mut reused_rows = 0;
        for (i, part) in parts.iter().enumerate() {
            let tokens = part.cache_tokens.clone();
            let key = chunk_key(&model, &tokens);
            if !part.exact {
                reused_rows += part.range.len();
            }
            let supply = match self.chunk_cache.get(&key) {
                Some(kv) => {
                    self.metrics.blend_chunks_memory(1);
                    KvSupply::Ready(kv)
                }
                None => {
                    let (tx, rx) = std::sync::mpsc::channel();
                    // A document's load holds decode buffers like a lookup's: from the same
                    // budget. Over it, the document is computed instead.
                    match self.reserve_lookup_memory(&model, tokens.len()) {
                        None => {
                            self.metrics.lookups_over_budget(1);
                            lock(&sources)[i] = ChunkSource::Computed;
                            let _ = tx.send(None);
                        }
                        Some(reserved) => {
                            load_bytes += (tokens.len() * blend_model.bytes_per_token) as u64;
                            let (store, cache, metrics) = (
                                self.store.clone(),
                                self.chunk_cache.clone(),
                                self.metrics.clone(),
                            );
                            let (sources, controller) = (sources.clone(), self.controller.clone());
                            let bytes = (tokens.len() * blend_model.bytes_per_token) as u64;
                            tokio::spawn(async move {
                                let _reserved = reserved;
                                let t0 = Instant::now();
                                let kv = load_chunk(&*store, &model, &tokens).await;
                                if let Some(kv) = &kv {
                                    lock(&controller)
                                        .record_load(bytes, t0.elapsed().as_secs_f64());
                                    cache.insert(key, kv.clone());
                                    metrics.blend_chunks_store(1);
                                    lock(&sources)[i] = ChunkSource::Store;
                                } else {
                                    lock(&sources)[i] = ChunkSource::Computed;
                                }
                                let _ = tx.send(kv);
                            });
                        }
                    }
                    KvSupply::Pending(rx)
                }
            };
            segments.push(Segment {
                len: part.range.len(),
                kv: if part.exact {
                    SegmentKv::Exact(supply)
                } else {
                    SegmentKv::Reused {
                        supply,
                        lead: part.cache_tokens[..part.lead].to_vec(),
                    }
                },
            });
        }
        if !question.is_empty() {
            segments.push(Segment {
                len: question.len(),
                kv: SegmentKv::Fresh,
            });
        }
        let mut steps = config.steps.clone();
        let mut ratio = config.ratio();
        if config.adaptive_ratio {
            let after = n_layers.saturating_sub(steps.last().map_or(0, |s| s.layer + 1));
            ratio = lock(&self.controller).ratio(ratio, load_bytes, reused_rows, after);
            for step in &mut steps {
                step.keep = step.keep.max(ratio);
            }
        }
        let tokens = prompt[..rows].to_vec();
        let deviation = config.deviation;
        let task_model = blend_model.clone();
        let blended = tokio::task::spawn_blocking(move || {
            forward::blend(
                &*task_model.layers,
                &task_model.rope,
                &tokens,
                segments,
                &steps,
                deviation,
            )
        })
        .await;
        let blended = match blended {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kvplugin: blend failed; prefilling");
                self.metrics.blend_failures(1);
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kvplugin: blend task failed; prefilling");
                self.metrics.blend_failures(1);
                return None;
            }
        };
        let report = blended.report;
        let row_layers: usize = report.active_per_layer.iter().sum();
        lock(&self.controller).record_compute(report.compute_s, row_layers);
        // Documents computed because their load gave nothing: keep them for next time.
        for (i, kv) in &report.computed {
            let doc = parts[*i].cache_tokens.clone();
            self.chunk_cache.insert(chunk_key(&model, &doc), kv.clone());
            self.metrics.blend_chunks_computed(1);
            if self.config.read_only {
                continue;
            }
            // A save slot like any other save: beyond `max_pending_saves` it is dropped and
            // counted, never queued without bound.
            let Ok(slot) = self.save_slots.clone().try_acquire_owned() else {
                self.metrics.dropped_saves(1);
                continue;
            };
            let (store, kv, metrics) = (self.store.clone(), kv.clone(), self.metrics.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let prefix = KvPrefix {
                    tokens: doc,
                    layers: kv.to_vec(),
                    approximate_from: None,
                };
                match store.save(&model, prefix).await {
                    Ok(_) => metrics.saves(1),
                    Err(e) => {
                        tracing::warn!(error = %e, "kvplugin: saving a document cache failed");
                        metrics.save_failures(1);
                    }
                }
            });
        }
        self.metrics.blends(1);
        let exact_tokens = plan.prefix_len;
        let summary = BlendReport {
            prompt_tokens: prompt.len(),
            exact_tokens,
            reused_tokens: reused_rows,
            ratio,
            active_per_layer: report.active_per_layer,
            sources: lock(&sources).clone(),
            load_wait_s: report.load_wait_s,
            compute_s: report.compute_s,
            total_s: started.elapsed().as_secs_f64(),
            last_attention: report.last_attention,
            deviations: report.deviations,
        };
        tracing::info!(
            prompt = summary.prompt_tokens,
            documents = plan.chunks.len(),
            ratio = summary.ratio,
            sources = ?summary.sources,
            wait_ms = summary.load_wait_s * 1e3,
            compute_ms = summary.compute_s * 1e3,
            "kvplugin: blended lookup"
        );
        *lock(&self.last_blend) = Some(summary);
        Some(KvPrefix {
            tokens: prompt[..rows].to_vec(),
            layers: blended.layers,
            approximate_from: (reused_rows > 0).then_some(exact_tokens),
        })
    }

    /// The report of the last streamed lookup.
    pub fn last_stream_report(&self) -> Option<StreamReport> {
        lock(&self.last_stream).clone()
    }

    /// Counts and logs a streamed lookup, and carries its bandwidth estimate over to the next.
    fn record_stream(&self, report: &StreamReport) {
        self.metrics.stream_loads(1);
        for chunk in &report.chunks {
            if let Choice::Fetch(level) = chunk.choice {
                self.metrics.stream_fetch(level);
            }
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

    /// Reserves, from the lookup memory budget, what decoding `rows` rows takes: the store's F32
    /// buffers, and a copy in the cache's dtype when that is another. `None` when it does not
    /// fit now. A model without a known layout reserves nothing.
    fn reserve_lookup_memory(
        &self,
        model: &ModelFingerprint,
        rows: usize,
    ) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        let Some(layout) = model.layout() else {
            return Some(None);
        };
        let per_value = 4 + if layout.dtype == KvDType::F32 {
            0
        } else {
            layout.dtype.size()
        };
        let bytes = rows as u64 * layout.values_per_token() as u64 * per_value as u64;
        let mib = u32::try_from(bytes.div_ceil(1 << 20)).ok()?;
        self.lookup_memory
            .clone()
            .try_acquire_many_owned(mib)
            .ok()
            .map(Some)
    }

    fn count_failure(&self, kind: &str) {
        self.metrics.lookup_failures(1);
        match kind {
            "denied" => self.metrics.failures_denied(1),
            "backend" | "missing" => self.metrics.failures_backend(1),
            "timeout" => self.metrics.failures_timeout(1),
            "unauthenticated" => self.metrics.failures_unauthenticated(1),
            _ => self.metrics.failures_corrupt(1),
        }
    }

    /// How many prompt tokens sequence `seq_id` (the `id` of its responses) took from a cache,
    /// once: the record is removed. `None` for a sequence the hook did not see scheduled (or
    /// one more than [`MAX_REUSE_RECORDS`] sequences ago).
    pub fn take_reused_tokens(&self, seq_id: usize) -> Option<usize> {
        lock(&self.reuse_by_sequence).swap_remove(&seq_id)
    }

    /// Waits until no save is in flight (each one written, failed or dropped), at most `timeout`;
    /// `false` if saves were still running then. For a clean stop: after the last request was
    /// answered, the store then holds everything this process will write.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let all = self.config.max_pending_saves as u32;
        let deadline = Instant::now() + timeout;
        // A finished sequence's save task may not have taken its slot yet: wait until the count
        // of finished sequences stops moving too.
        let mut finished = self.metrics.snapshot().finished_sequences;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.save_slots.acquire_many(all)).await {
                Ok(Ok(permits)) => drop(permits),
                _ => return false,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.metrics.snapshot().finished_sequences;
            if now == finished && self.save_slots.available_permits() == all as usize {
                return true;
            }
            finished = now;
        }
    }

    /// The blend plan for a prompt whose text holds the blend separator, and the tokens and text
    /// to run (separators removed). `None` when the text holds no separator or blending from
    /// text is off. Without a usable plan (malformed markup, no layer access) the separators are
    /// still removed and the text re-encoded as the engine encodes it: the answer is then stock's
    /// for the text without separators.
    fn plan_from_text(&self, text: &str, tokens: &[u32]) -> Option<(Vec<u32>, String)> {
        // Called for every chat and completion prompt: copy the separator only when it is there.
        let separator = {
            let config = lock(&self.blend_config);
            let marked = config.from_text
                && !config.separator.is_empty()
                && text.contains(&config.separator);
            marked.then(|| config.separator.clone())?
        };
        let tokenizer = self.engine_model.get()?.tokenizer.clone()?;
        let plain_text = text.replace(&separator, "");
        let skip = |why: &str| {
            tracing::warn!(reason = why, "kvplugin: separators removed; not blended");
            self.metrics.text_blends_skipped(1);
            let encoded = tokenizer.encode(plain_text.as_str(), true).ok()?;
            Some((encoded.get_ids().to_vec(), plain_text.clone()))
        };
        if !self.can_blend() {
            return skip("the model offers no layer access");
        }
        let prompt = match BlendPrompt::from_marked(text, &separator) {
            Ok(prompt) => prompt,
            Err(e) => return skip(&e.to_string()),
        };
        let mut plan = match prompt.tokenize(&tokenizer) {
            Ok(plan) => plan,
            Err(e) => return skip(&e.to_string()),
        };
        // The engine encoded with the tokenizer's special tokens (a BOS, say): keep those it
        // added around the text.
        let Ok(bare) = tokenizer.encode(text, false) else {
            return skip("the tokenizer failed");
        };
        let bare = bare.get_ids();
        let Some(lead) = (0..=tokens.len().saturating_sub(bare.len()))
            .find(|&lead| tokens[lead..].starts_with(bare))
        else {
            return skip("the engine's tokens do not contain the text's");
        };
        let trail = &tokens[lead + bare.len()..];
        plan.wrap(&tokens[..lead], trail);
        self.metrics.text_blends(1);
        let run = plan.tokens.clone();
        self.plans.insert(plan);
        Some((run, prompt.text()))
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

    /// The length a store prefix of `prompt` must exceed to be worth loading (what the engine's
    /// own cache covers, and `min_prefix_tokens`), or `None` when the prompt leaves no room for
    /// one: the rule both the engine's synchronous filter and the lookup apply.
    fn min_store_tokens(&self, prompt: &[u32], cached_tokens: usize) -> Option<usize> {
        let min_tokens = cached_tokens.max(self.config.min_prefix_tokens.saturating_sub(1));
        (prompt.len() > min_tokens + 1).then_some(min_tokens)
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
        approximate_from: prefix.approximate_from,
    })
}

#[async_trait]
impl KvHook for KvPluginHook {
    fn register(&self, model: &KvModelInfo) -> anyhow::Result<()> {
        // A paged engine installs whole blocks: a chunk that ended inside a block would leave
        // the block's loaded rows unusable, and its saved rows misaligned with the next load.
        if let (Some(block), Some(chunk)) = (model.paged_block_size, self.store.chunk_tokens()) {
            if chunk % block != 0 {
                anyhow::bail!(
                    "chunk_tokens = {chunk} is not a whole number of the paged engine's \
                     {block}-token blocks; use a multiple of {block} (256 is one)"
                );
            }
        }
        let fingerprint = ModelFingerprint::of_model(model)?;
        let registered = *self.model.get_or_init(|| fingerprint);
        if registered != fingerprint {
            anyhow::bail!(
                "this hook is registered for model {registered}; model `{}` ({fingerprint}) needs a hook of its own",
                model.model_id
            );
        }
        let _ = self.engine_model.set(Arc::new(model.clone()));
        tracing::info!(model = %model.model_id, %fingerprint, "kvplugin: hook registered");
        match &model.layers {
            Some(layers) => match layers
                .rope()
                .and_then(|r| Rope::from_model(&r, layers.head_dim()))
            {
                Ok(rope) => {
                    let bytes_per_token = layers.num_layers()
                        * layers.num_kv_heads()
                        * (model.k_head_dim + model.v_head_dim)
                        * model.dtype.size_in_bytes();
                    let _ = self.layers.set(BlendModel {
                        layers: layers.clone(),
                        rope,
                        bytes_per_token,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "kvplugin: blends disabled for this model"),
            },
            None => {
                tracing::info!("kvplugin: the model file offers no layer access; blends disabled")
            }
        }
        Ok(())
    }

    fn on_refused(&self, model_id: &str, reason: &str) {
        tracing::warn!(
            model = model_id,
            reason,
            "kvplugin: the engine refused the hook"
        );
        self.metrics.refused_engines(1);
    }

    /// The engine's synchronous filter: a prompt is looked up only if the hook is registered and
    /// the prompt leaves at least `min_prefix_tokens` beyond what the engine's own cache covers
    /// (or it was announced as a blend). Everything else is scheduled at once, as stock.
    fn should_lookup(&self, prompt: &[u32], cached_tokens: usize) -> bool {
        if self.model.get().is_none() {
            return false;
        }
        let worth_it =
            self.min_store_tokens(prompt, cached_tokens).is_some() || self.plans.contains(prompt);
        if !worth_it {
            self.metrics.skipped_lookups(1);
        }
        worth_it
    }

    fn prepare_prompt(&self, text: &str, tokens: &[u32]) -> Option<(Vec<u32>, String)> {
        self.plan_from_text(text, tokens)
    }

    fn on_scheduled(&self, seq_id: usize, prompt: &[u32], reused_tokens: usize) {
        self.metrics.scheduled_sequences(1);
        self.metrics.scheduled_prompt_tokens(prompt.len() as u64);
        self.metrics.scheduled_reused_tokens(reused_tokens as u64);
        let mut records = lock(&self.reuse_by_sequence);
        if records.len() >= MAX_REUSE_RECORDS {
            records.drain(..MAX_REUSE_RECORDS / 2);
        }
        records.insert(seq_id, reused_tokens);
    }

    fn on_local_hit(&self, _prompt: &[u32], _cached_tokens: usize) {
        self.metrics.engine_prefix_hits(1);
    }

    fn on_evict(&self, _tokens: &[u32]) {
        self.metrics.engine_evictions(1);
    }

    async fn save_prefix(&self, finished: FinishedPrefix) {
        self.metrics
            .record_finished(finished.prompt_tokens, finished.reused_tokens);
        let Some(model) = self.model.get().copied() else {
            return;
        };
        // Of an approximate (blended) cache only the exact rows may be kept.
        let prefix = match finished.prefix.approximate_from {
            None => finished.prefix,
            Some(exact) => match truncate(finished.prefix, exact) {
                Ok(prefix) => prefix,
                Err(_) => return,
            },
        };
        if self.config.read_only || prefix.tokens.len() < self.config.min_prefix_tokens {
            return;
        }
        let Ok(_slot) = self.save_slots.clone().try_acquire_owned() else {
            tracing::debug!("kvplugin: save queue full; dropping a prefix");
            self.metrics.dropped_saves(1);
            return;
        };
        self.save(model, prefix).await;
    }

    async fn load_prefix(&self, prompt: &[u32], cached_tokens: usize) -> Option<KvPrefix> {
        let model = self.model.get().copied()?;
        if let Some(plan) = self.plans.take(prompt) {
            let blend = self.load_blended(model, plan, prompt);
            return match tokio::time::timeout(self.config.blend_timeout, blend).await {
                Ok(prefix) => prefix,
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = self.config.blend_timeout.as_millis() as u64,
                        "kvplugin: blend timed out; prefilling"
                    );
                    self.metrics.blend_failures(1);
                    self.count_failure("timeout");
                    None
                }
            };
        }
        let min_tokens = self.min_store_tokens(prompt, cached_tokens)?;
        self.metrics.lookups(1);
        let started = Instant::now();
        let policy = lock(&self.stream_policy).clone();
        if policy.is_some() {
            // A lookup that times out leaves no report: never show the previous one instead.
            *lock(&self.last_stream) = None;
        }
        // Decoded straight into buffers of the engine's capacity: the engine takes them as its
        // cache without a copy.
        let engine_model = self.engine_model.get().cloned();
        let capacity = move |n: usize| engine_model.as_ref().map_or(n, |m| m.cache_capacity(n));
        // Held until the load is handed over (the engine then owns the buffers as its cache).
        let Some(_reserved) = self.reserve_lookup_memory(&model, capacity(prompt.len() - 1)) else {
            tracing::debug!(
                prompt_tokens = prompt.len(),
                "kvplugin: the lookup memory budget is spent; recomputing"
            );
            self.metrics.lookups_over_budget(1);
            return None;
        };
        let lookup = async {
            match &policy {
                Some(policy) => self
                    .store
                    .load_streamed_with_capacity(&model, prompt, min_tokens, policy, &capacity)
                    .await
                    .map(|l| (l.prefix, Some(l.report))),
                None => self
                    .store
                    .load_with_capacity(&model, prompt, min_tokens, &capacity)
                    .await
                    .map(|prefix| (prefix, None)),
            }
        };
        let loaded = tokio::time::timeout(self.config.load_timeout, lookup).await;
        let elapsed = started.elapsed();
        self.metrics.observe_lookup(elapsed);
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
        // The hook enforces `load_timeout` (store lookups) and `blend_timeout` (blends) itself
        // and counts them; the engine's own limit is a backstop for a lookup that does not yield.
        self.config.load_timeout.max(self.config.blend_timeout) + Duration::from_secs(1)
    }
}

/// The first `n` rows of `prefix` (exact rows of an approximate cache); an error for `n == 0`.
fn truncate(prefix: KvPrefix, n: usize) -> candle_core::Result<KvPrefix> {
    if n == 0 || n > prefix.tokens.len() {
        candle_core::bail!("no exact rows to keep");
    }
    let layers = prefix
        .layers
        .iter()
        .map(|l| {
            Ok(LayerKv {
                k: l.k.narrow(2, 0, n)?,
                v: l.v.narrow(2, 0, n)?,
            })
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(KvPrefix {
        tokens: prefix.tokens[..n].to_vec(),
        layers,
        approximate_from: None,
    })
}

/// A document's cache from the store: the stored prefix of exactly its tokens, or `None` (a
/// miss or any failure, logged).
async fn load_chunk(
    store: &dyn PrefixStore,
    model: &ModelFingerprint,
    tokens: &[u32],
) -> Option<Arc<Vec<LayerKv>>> {
    // `load` returns prefixes shorter than the prompt: one sentinel token past the document.
    let mut prompt = tokens.to_vec();
    prompt.push(u32::MAX);
    match store.load(model, &prompt, tokens.len() - 1).await {
        Ok(Some(prefix)) if prefix.tokens.len() == tokens.len() => Some(Arc::new(prefix.layers)),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "kvplugin: loading a document cache failed; computing it");
            None
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain values, replaced whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
