//! The plugin's counters in Prometheus' text format (OpenMetrics 1.0, what `prometheus-client`
//! writes and Prometheus scrapes).
//!
//! The counters live as plain atomics in [`crate::metrics::Metrics`] (the hot paths never lock);
//! each scrape copies them into a fresh registry. Names follow Prometheus' conventions: a
//! `kvplugin_` prefix, counters end in `_total`, units in the name (`_seconds`, `_bytes`).
//! Where vLLM or LMCache count the same thing, the help text names their metric.

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{counter::ConstCounter, family::Family, gauge::ConstGauge, MetricType, TypedMetric},
    registry::{Registry, Unit},
};

use crate::{
    codec::Level,
    metrics::{MetricsSnapshot, LOOKUP_SECONDS_BUCKETS},
};

/// The media type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one store moved, for the `store` label.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreTraffic {
    /// Object bytes read.
    pub bytes_read: u64,
    /// Object bytes written.
    pub bytes_written: u64,
    /// Objects loads refused (seal), found corrupt, and repaired by a save.
    pub objects_refused: u64,
    /// See `objects_refused`.
    pub objects_corrupt: u64,
    /// See `objects_refused`.
    pub objects_repaired: u64,
    /// Requests the circuit breaker refused while open, the times it opened, and whether it
    /// is open now (`None`: no breaker).
    pub breaker: Option<(u64, u64, bool)>,
}

/// Everything one scrape reports.
pub struct Scrape<'a> {
    /// The hook's counters (`None`: the server runs without the plugin).
    pub metrics: Option<&'a MetricsSnapshot>,
    /// The store's kind (`local`, `s3`, `memory`) and its traffic.
    pub store: Option<(&'a str, StoreTraffic)>,
    /// Seconds since the server started.
    pub uptime_s: f64,
    /// Objects and bytes the store's GC (sweeper and admin calls) deleted.
    pub gc_deleted: Option<(u64, u64)>,
}

/// The lookup latency histogram, from the snapshot's fixed buckets.
#[derive(Debug)]
struct LatencyHistogram {
    buckets: Vec<(f64, u64)>,
    count: u64,
    sum_s: f64,
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum_s, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

type Labels = Vec<(&'static str, String)>;

fn labelled(
    values: &[(&'static str, &str, u64)],
) -> Family<Labels, prometheus_client::metrics::counter::Counter> {
    let family = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
    for (key, value, n) in values {
        family
            .get_or_create(&vec![(*key, value.to_string())])
            .inc_by(*n);
    }
    family
}

/// The scrape in Prometheus text format.
pub fn encode(scrape: &Scrape<'_>) -> String {
    let mut r = Registry::with_prefix("kvplugin");
    r.register(
        "plugin_enabled",
        "1 when the server runs with the KV plugin, 0 when stock (--no-plugin)",
        ConstGauge::new(i64::from(scrape.metrics.is_some())),
    );
    r.register_with_unit(
        "uptime",
        "Seconds since the server started",
        Unit::Seconds,
        ConstGauge::new(scrape.uptime_s),
    );
    if let Some(m) = scrape.metrics {
        register_hook(&mut r, m);
    }
    if let Some((kind, traffic)) = scrape.store {
        r.register_with_unit(
            "store_read",
            "Object bytes read from the store (LMCache: the remote backend's read bytes)",
            Unit::Bytes,
            labelled(&[("store", kind, traffic.bytes_read)]),
        );
        r.register_with_unit(
            "store_written",
            "Object bytes written to the store, after compression",
            Unit::Bytes,
            labelled(&[("store", kind, traffic.bytes_written)]),
        );
        r.register(
            "store_bad_objects",
            "Store objects a load found bad, by problem: refused (no MAC of this deployment's key, \
             or moved to another name) or corrupt; each ends its hit where it starts",
            labelled(&[
                ("problem", "refused", traffic.objects_refused),
                ("problem", "corrupt", traffic.objects_corrupt),
            ]),
        );
        r.register(
            "store_repaired_objects",
            "Bad store objects a save has overwritten",
            counter(traffic.objects_repaired),
        );
        if let Some((skipped, opened, open)) = traffic.breaker {
            r.register(
                "store_breaker_skipped_requests",
                "Store requests refused at once because the store was failing (circuit open)",
                counter(skipped),
            );
            r.register(
                "store_breaker_opened",
                "Times the store was skipped for a cool-down after failing requests in a row",
                counter(opened),
            );
            r.register(
                "store_breaker_open",
                "1 while the store is skipped (circuit open), else 0",
                ConstGauge::new(u64::from(open) as i64),
            );
        }
    }
    if let Some((objects, bytes)) = scrape.gc_deleted {
        r.register(
            "gc_deleted_objects",
            "Store objects deleted by the GC and by removals (sweeper and admin routes)",
            counter(objects),
        );
        r.register_with_unit(
            "gc_deleted",
            "Store bytes deleted by the GC and by removals",
            Unit::Bytes,
            counter(bytes),
        );
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)
        .expect("writing to a String does not fail");
    out
}

fn register_hook(r: &mut Registry, m: &MetricsSnapshot) {
    r.register(
        "scheduled_sequences",
        "Text sequences the engine scheduled with the hook attached (vLLM: vllm:request_success counts finished ones)",
        counter(m.scheduled_sequences),
    );
    r.register(
        "prompt_tokens",
        "Prompt tokens of those sequences, what the caches were queried for (vLLM: vllm:prefix_cache_queries; LMCache: lmcache:num_requested_tokens)",
        counter(m.scheduled_prompt_tokens),
    );
    r.register(
        "cached_prompt_tokens",
        "Prompt tokens taken from a cache (the engine's or the store) instead of prefilled; what usage.prompt_tokens_details.cached_tokens reports (vLLM: vllm:prefix_cache_hits plus vllm:external_prefix_cache_hits)",
        counter(m.scheduled_reused_tokens),
    );
    r.register(
        "engine_prefix_hits",
        "Prompts the engine's own in-memory prefix cache served",
        counter(m.engine_prefix_hits),
    );
    r.register(
        "engine_evictions",
        "Prefixes the engine dropped from its own prefix cache",
        counter(m.engine_evictions),
    );
    r.register(
        "skipped_lookups",
        "Prompts not looked up in the store (too short beyond what the engine's cache covers)",
        counter(m.skipped_lookups),
    );
    r.register(
        "lookups_over_budget",
        "Lookups not made because their buffers did not fit in the lookup memory budget",
        counter(m.lookups_over_budget),
    );
    r.register(
        "lookups",
        "Store lookups (LMCache: lmcache:num_retrieve_requests)",
        counter(m.lookups),
    );
    r.register(
        "lookup_hits",
        "Store lookups that returned a prefix",
        counter(m.hits),
    );
    r.register(
        "lookup_hit_tokens",
        "Prompt tokens covered by the store's prefixes (LMCache: lmcache:num_hit_tokens)",
        counter(m.hit_tokens),
    );
    r.register(
        "lookup_failures",
        "Store lookups that failed and were recomputed, by reason",
        labelled(&[
            ("reason", "backend", m.failures_backend),
            ("reason", "denied", m.failures_denied),
            ("reason", "corrupt", m.failures_corrupt),
            ("reason", "unauthenticated", m.failures_unauthenticated),
            ("reason", "timeout", m.failures_timeout),
        ]),
    );
    let mut per_bucket = Vec::with_capacity(LOOKUP_SECONDS_BUCKETS.len() + 1);
    for (i, bound) in LOOKUP_SECONDS_BUCKETS.iter().enumerate() {
        per_bucket.push((*bound, m.lookup_seconds_buckets[i]));
    }
    per_bucket.push((
        f64::INFINITY,
        m.lookup_seconds_buckets[LOOKUP_SECONDS_BUCKETS.len()],
    ));
    r.register_with_unit(
        "lookup_duration",
        "Latency of store lookups: find, fetch, decode (LMCache: lmcache:time_to_retrieve)",
        Unit::Seconds,
        LatencyHistogram {
            count: m.lookup_seconds_buckets.iter().sum(),
            sum_s: m.lookup_micros_sum as f64 * 1e-6,
            buckets: per_bucket,
        },
    );
    let mut decisions: Vec<(&'static str, &str, u64)> = Level::ALL
        .iter()
        .zip(m.stream_fetches_by_level)
        .map(|(level, n)| ("level", level.name(), n))
        .collect();
    decisions.push(("level", "text", m.stream_chunks_text));
    r.register(
        "stream_decisions",
        "Chunks of streamed lookups by what the loader chose: a codec level, or text (recompute)",
        labelled(&decisions),
    );
    r.register(
        "stream_chunk_failures",
        "Chunks of streamed lookups whose fetch failed (the rest of that prompt is recomputed)",
        counter(m.stream_chunks_failed),
    );
    r.register(
        "blends",
        "Blended prompts (CacheBlend) that ran from document caches",
        counter(m.blends),
    );
    r.register(
        "blend_failures",
        "Blended prompts that fell back to a full prefill",
        counter(m.blend_failures),
    );
    r.register(
        "text_blends",
        "Prompts with blend separators in their text planned as blends",
        counter(m.text_blends),
    );
    r.register(
        "text_blends_skipped",
        "Prompts with blend separators run unblended (separators removed)",
        counter(m.text_blends_skipped),
    );
    r.register(
        "blend_documents",
        "Document caches of blends, by where they came from",
        labelled(&[
            ("source", "memory", m.blend_chunks_memory),
            ("source", "store", m.blend_chunks_store),
            ("source", "computed", m.blend_chunks_computed),
        ]),
    );
    r.register(
        "saves",
        "Prefixes written to the store (LMCache: lmcache:num_store_requests)",
        counter(m.saves),
    );
    r.register(
        "saved_tokens",
        "Tokens of the prefixes written (LMCache: lmcache:num_stored_tokens)",
        counter(m.saved_tokens),
    );
    r.register(
        "save_failures",
        "Writes to the store that failed",
        counter(m.save_failures),
    );
    r.register(
        "dropped_saves",
        "Saves dropped because the write queue was full",
        counter(m.dropped_saves),
    );
    r.register(
        "refused_engines",
        "Engines that refused the hook (a cache layout it cannot install exactly)",
        counter(m.refused_engines),
    );
}

/// Reads one sample from text [`encode`] wrote: the value of the line starting with `name`
/// followed by a space or `{labels}` (first match). For tests and `bench serve`.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name_and_labels)?;
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A compact one-line view of a few counters, for logs.
pub fn summary(m: &MetricsSnapshot) -> String {
    format!(
        "lookups {} (hits {}, failures {}), cached prompt tokens {}/{}, saves {}, blends {}",
        m.lookups,
        m.hits,
        m.lookup_failures,
        m.scheduled_reused_tokens,
        m.scheduled_prompt_tokens,
        m.saves,
        m.blends
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histogram_and_labels_follow_prometheus_names() {
        let mut m = MetricsSnapshot {
            lookups: 3,
            hits: 2,
            failures_timeout: 1,
            scheduled_prompt_tokens: 100,
            scheduled_reused_tokens: 64,
            lookup_micros_sum: 1_500_000,
            ..MetricsSnapshot::default()
        };
        m.lookup_seconds_buckets[0] = 1; // <= 1 ms
        m.lookup_seconds_buckets[LOOKUP_SECONDS_BUCKETS.len()] = 2; // > 10 s
        m.stream_fetches_by_level[1] = 5; // high
        let text = encode(&Scrape {
            metrics: Some(&m),
            store: Some((
                "s3",
                StoreTraffic {
                    bytes_read: 10,
                    bytes_written: 20,
                    objects_refused: 3,
                    objects_corrupt: 0,
                    objects_repaired: 2,
                    breaker: Some((7, 1, true)),
                },
            )),
            uptime_s: 1.0,
            gc_deleted: Some((4, 400)),
        });
        assert_eq!(sample(&text, "kvplugin_lookups_total"), Some(3.0), "{text}");
        assert_eq!(sample(&text, "kvplugin_lookup_hits_total"), Some(2.0));
        assert_eq!(
            sample(&text, "kvplugin_cached_prompt_tokens_total"),
            Some(64.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_lookup_failures_total{reason=\"timeout\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_store_read_bytes_total{store=\"s3\"}"),
            Some(10.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_stream_decisions_total{level=\"high\"}"),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                "kvplugin_store_bad_objects_total{problem=\"refused\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_store_repaired_objects_total"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_store_breaker_skipped_requests_total"),
            Some(7.0)
        );
        assert_eq!(sample(&text, "kvplugin_store_breaker_open"), Some(1.0));
        // Buckets are cumulative in the output.
        assert_eq!(
            sample(
                &text,
                "kvplugin_lookup_duration_seconds_bucket{le=\"0.001\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "kvplugin_lookup_duration_seconds_bucket{le=\"10.0\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "kvplugin_lookup_duration_seconds_bucket{le=\"+Inf\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_lookup_duration_seconds_count"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "kvplugin_lookup_duration_seconds_sum"),
            Some(1.5)
        );
        assert_eq!(sample(&text, "kvplugin_plugin_enabled"), Some(1.0));
        assert_eq!(
            sample(&text, "kvplugin_gc_deleted_bytes_total"),
            Some(400.0)
        );
        assert!(text.trim_end().ends_with("# EOF"));

        let stock = encode(&Scrape {
            metrics: None,
            store: None,
            uptime_s: 0.0,
            gc_deleted: None,
        });
        assert_eq!(sample(&stock, "kvplugin_plugin_enabled"), Some(0.0));
        assert!(!stock.contains("kvplugin_lookups_total"));
    }
}
