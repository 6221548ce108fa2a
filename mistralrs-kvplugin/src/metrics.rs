//! Counters the plugin keeps, readable at any time through [`Metrics::snapshot`]. All counters
//! only grow; they are plain atomics so that the hot paths never lock (the lookup latency
//! histogram too: fixed buckets, [`LOOKUP_SECONDS_BUCKETS`]). `kvplugin serve` exposes them in
//! Prometheus format (`crate::server::prometheus`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::Level;

/// Live counters of one plugin hook.
#[derive(Debug, Default)]
pub struct Metrics {
    lookups: AtomicU64,
    hits: AtomicU64,
    hit_tokens: AtomicU64,
    lookup_failures: AtomicU64,
    failures_backend: AtomicU64,
    failures_denied: AtomicU64,
    failures_corrupt: AtomicU64,
    failures_unauthenticated: AtomicU64,
    failures_timeout: AtomicU64,
    load_micros: AtomicU64,
    stream_loads: AtomicU64,
    stream_chunks_loaded: AtomicU64,
    stream_chunks_text: AtomicU64,
    stream_chunks_failed: AtomicU64,
    blends: AtomicU64,
    blend_failures: AtomicU64,
    blend_chunks_memory: AtomicU64,
    blend_chunks_store: AtomicU64,
    blend_chunks_computed: AtomicU64,
    saves: AtomicU64,
    saved_tokens: AtomicU64,
    save_failures: AtomicU64,
    dropped_saves: AtomicU64,
    finished_sequences: AtomicU64,
    refused_engines: AtomicU64,
    skipped_lookups: AtomicU64,
    lookups_over_budget: AtomicU64,
    engine_prefix_hits: AtomicU64,
    engine_evictions: AtomicU64,
    scheduled_sequences: AtomicU64,
    scheduled_prompt_tokens: AtomicU64,
    scheduled_reused_tokens: AtomicU64,
    text_blends: AtomicU64,
    text_blends_skipped: AtomicU64,
    last_prompt_tokens: AtomicU64,
    last_reused_tokens: AtomicU64,
    lookup_seconds_buckets: [AtomicU64; LOOKUP_SECONDS_BUCKETS.len() + 1],
    lookup_micros_sum: AtomicU64,
    stream_fetches_by_level: [AtomicU64; Level::ALL.len()],
}

/// Upper bounds (seconds) of the lookup latency histogram's buckets; one more bucket counts
/// everything above the last.
pub const LOOKUP_SECONDS_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Lookups the engine asked for.
    pub lookups: u64,
    /// Lookups that returned a prefix.
    pub hits: u64,
    /// Tokens covered by the prefixes returned.
    pub hit_tokens: u64,
    /// Lookups that failed (each one a recompute), all reasons together.
    pub lookup_failures: u64,
    /// Failures because the backend failed (server down, network, disk).
    pub failures_backend: u64,
    /// Failures because the backend refused the credentials.
    pub failures_denied: u64,
    /// Failures because an object was corrupt, for another model, or of an unknown version.
    pub failures_corrupt: u64,
    /// Failures because an object's seal did not hold: written without the deployment's key,
    /// under another key, or moved to another name (`crate::store::seal`).
    pub failures_unauthenticated: u64,
    /// Lookups that took longer than the load timeout.
    pub failures_timeout: u64,
    /// Time spent in lookups that hit (finding, fetching, decoding), in microseconds.
    pub load_micros: u64,
    /// Lookups streamed chunk by chunk under a policy.
    pub stream_loads: u64,
    /// Chunks of streamed lookups fetched and installed.
    pub stream_chunks_loaded: u64,
    /// Chunks of streamed lookups left to recompute by choice (budget or bandwidth).
    pub stream_chunks_text: u64,
    /// Chunks of streamed lookups that failed (each ends its lookup; the rest is recomputed).
    pub stream_chunks_failed: u64,
    /// Blended lookups (CacheBlend) that returned a cache.
    pub blends: u64,
    /// Blended lookups that failed (each one a full prefill).
    pub blend_failures: u64,
    /// Document caches of blends found in memory.
    pub blend_chunks_memory: u64,
    /// Document caches of blends loaded from the store.
    pub blend_chunks_store: u64,
    /// Document caches of blends computed (and stored for next time).
    pub blend_chunks_computed: u64,
    /// Prefixes written to the store.
    pub saves: u64,
    /// Tokens covered by the prefixes written.
    pub saved_tokens: u64,
    /// Writes that failed.
    pub save_failures: u64,
    /// Saves dropped because the write queue was full.
    pub dropped_saves: u64,
    /// Sequences the engine reported as finished.
    pub finished_sequences: u64,
    /// Engines that refused to attach the hook (a cache layout it cannot install exactly).
    pub refused_engines: u64,
    /// Prompts the engine did not look up because the hook's synchronous filter said no.
    pub skipped_lookups: u64,
    /// Lookups not made because the buffers they would decode into did not fit in what is left
    /// of the lookup memory budget (`HookConfig::lookup_memory_bytes`); each a recompute.
    pub lookups_over_budget: u64,
    /// Prompts the engine's own in-memory prefix cache served (no store prefix installed).
    pub engine_prefix_hits: u64,
    /// Prefixes the engine dropped from its own prefix cache.
    pub engine_evictions: u64,
    /// Sequences the engine scheduled while the hook was attached (text prompts only).
    pub scheduled_sequences: u64,
    /// Prompt tokens of those sequences (what the caches were asked for).
    pub scheduled_prompt_tokens: u64,
    /// Prompt tokens of those sequences that came from a cache (the engine's or the store's).
    pub scheduled_reused_tokens: u64,
    /// Prompts with blend separators in their text turned into blends.
    pub text_blends: u64,
    /// Prompts with blend separators in their text run without blending (separators removed):
    /// malformed markup, or a model without layer access.
    pub text_blends_skipped: u64,
    /// Prompt length of the last finished sequence.
    pub last_prompt_tokens: u64,
    /// Prompt tokens of the last finished sequence that came from a cache instead of prefill.
    pub last_reused_tokens: u64,
    /// Lookups (hits, misses and failures) by latency: `lookup_seconds_buckets[i]` counts those
    /// within `LOOKUP_SECONDS_BUCKETS[i]` and above the bound before it; the last, those above
    /// every bound (not cumulative).
    pub lookup_seconds_buckets: [u64; LOOKUP_SECONDS_BUCKETS.len() + 1],
    /// Total latency of those lookups, in microseconds.
    pub lookup_micros_sum: u64,
    /// Chunks streamed lookups chose to fetch, by codec level (`Level::ALL`'s order); the
    /// chunks chose to recompute are `stream_chunks_text`.
    pub stream_fetches_by_level: [u64; Level::ALL.len()],
}

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        impl Metrics {
            $(
                pub(crate) fn $name(&self, n: u64) {
                    self.$name.fetch_add(n, Ordering::Relaxed);
                }
            )*

            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    last_prompt_tokens: self.last_prompt_tokens.load(Ordering::Relaxed),
                    last_reused_tokens: self.last_reused_tokens.load(Ordering::Relaxed),
                    lookup_seconds_buckets: std::array::from_fn(|i| {
                        self.lookup_seconds_buckets[i].load(Ordering::Relaxed)
                    }),
                    lookup_micros_sum: self.lookup_micros_sum.load(Ordering::Relaxed),
                    stream_fetches_by_level: std::array::from_fn(|i| {
                        self.stream_fetches_by_level[i].load(Ordering::Relaxed)
                    }),
                }
            }
        }
    };
}

counters!(
    lookups,
    hits,
    hit_tokens,
    lookup_failures,
    failures_backend,
    failures_denied,
    failures_corrupt,
    failures_unauthenticated,
    failures_timeout,
    load_micros,
    stream_loads,
    stream_chunks_loaded,
    stream_chunks_text,
    stream_chunks_failed,
    blends,
    blend_failures,
    blend_chunks_memory,
    blend_chunks_store,
    blend_chunks_computed,
    saves,
    saved_tokens,
    save_failures,
    dropped_saves,
    finished_sequences,
    refused_engines,
    skipped_lookups,
    lookups_over_budget,
    engine_prefix_hits,
    engine_evictions,
    scheduled_sequences,
    scheduled_prompt_tokens,
    scheduled_reused_tokens,
    text_blends,
    text_blends_skipped,
);

impl Metrics {
    /// Records the prompt and reused-token counts of a finished sequence, then counts it.
    pub(crate) fn record_finished(&self, prompt_tokens: usize, reused_tokens: usize) {
        self.last_prompt_tokens
            .store(prompt_tokens as u64, Ordering::Relaxed);
        self.last_reused_tokens
            .store(reused_tokens as u64, Ordering::Relaxed);
        self.finished_sequences(1);
    }

    /// Counts a streamed chunk chosen to be fetched at `level`.
    pub(crate) fn stream_fetch(&self, level: Level) {
        let i = Level::ALL.iter().position(|&l| l == level).unwrap_or(0);
        self.stream_fetches_by_level[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one lookup's latency in the histogram.
    pub(crate) fn observe_lookup(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let bucket = LOOKUP_SECONDS_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LOOKUP_SECONDS_BUCKETS.len());
        self.lookup_seconds_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.lookup_micros_sum
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lookup_latency_lands_in_the_bucket_of_its_upper_bound() {
        let m = Metrics::default();
        m.observe_lookup(Duration::from_micros(1000)); // exactly the first bound
        m.observe_lookup(Duration::from_millis(30)); // (0.025, 0.05]
        m.observe_lookup(Duration::from_secs(60)); // above every bound
        let s = m.snapshot();
        assert_eq!(s.lookup_seconds_buckets[0], 1);
        assert_eq!(s.lookup_seconds_buckets[5], 1);
        assert_eq!(s.lookup_seconds_buckets[LOOKUP_SECONDS_BUCKETS.len()], 1);
        assert_eq!(s.lookup_seconds_buckets.iter().sum::<u64>(), 3);
        assert_eq!(s.lookup_micros_sum, 1000 + 30_000 + 60_000_000);
    }
}
