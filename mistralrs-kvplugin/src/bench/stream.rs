//! `kvplugin bench stream`: replays a bandwidth trace against the engine and compares, in one
//! run, the adaptive loader with each fixed codec level, always-lossless and always-text (full
//! prefill): budget-violation rate, mean and p90 time to first token, and the quality of what
//! each policy installed.
//!
//! Method:
//! 1. Requests: `--requests` prompts of `--tokens` tokens of real text, each starting `--stride`
//!    tokens after the previous one (so no two share a stored chunk), each followed by
//!    `--eval-tokens` tokens of the same text for the quality measurement.
//! 2. Stock engine (no hook, prefix cache off): every prompt from scratch, plus prompts of a
//!    quarter and half the length; a [`PrefillModel`] is fitted
//!    to these (the planner's price of recomputing), and printed for the `[stream]` config.
//! 3. Writer engine (hook on a local-disk store, every level in `--levels`): saves every prompt.
//! 4. Calibration: a reader engine on the unshaped store loads every prompt at the smallest
//!    level; the median of TTFT minus load time is the engine's overhead of a hit (installing
//!    the cache, the first step), which the adaptive planner reserves out of the budget.
//! 5. Reader engine (hook, prefix cache off) over the same store behind a [`ShapedStore`]
//!    replaying the trace: per policy, every request; before request `r` the trace is moved to
//!    `(r + 1) * --trace-stride` (per-request traces), so every policy sees the same bandwidths.
//!    The adaptive policy first makes one unmeasured lookup at the trace's start (position 0),
//!    as a deployed hook carries its bandwidth estimate over from earlier lookups.
//!    Fixed policies wait for their chunks up to the hook's load timeout (the full-prefill time:
//!    past it a load cannot win).
//! 6. Quality, per policy and request: the choices the load made are replayed on the unshaped
//!    store ([`StreamPolicy::Planned`]), the rest of the prompt is recomputed over that cache
//!    with the reference forward pass (as the engine does), and perplexity of the following text
//!    and greedy agreement over 64 tokens are compared with the exact cache's.
//!
//! The store is written under a fresh namespace that is deleted at the end.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use futures::TryStreamExt;
use object_store::ObjectStore;
use serde::Serialize;

use super::{codec::Quality, mean, median, percentile, Say};
use crate::{
    codec::Level,
    config::PluginConfig,
    corpus,
    engine::{EngineOptions, LocalEngine, ModelSource},
    eval::{LlamaEval, PastKv},
    fingerprint::ModelFingerprint,
    hook::{HookConfig, KvPluginHook},
    model,
    store::{BandwidthTrace, ObjectPrefixStore, ObjectStoreConfig, ShapedStore},
    stream::{Choice, PlannerInputs, PrefillModel, StreamPolicy},
};

/// Arguments of `kvplugin bench stream`.
#[derive(Debug, Args)]
pub struct StreamBenchArgs {
    /// A bandwidth trace (one Mbit/s value per line; see `traces/`). Repeat to replay several
    /// in one run (the engine measurements and the store are shared).
    #[arg(long, required = true)]
    trace: Vec<PathBuf>,
    /// Time-to-first-token budget in milliseconds [default: a quarter of the measured full
    /// prefill, so that always-text misses it].
    #[arg(long)]
    budget_ms: Option<u64>,
    /// Prompt tokens per request [default: 4 chunks of 256 and the last token, which the
    /// engine always prefills].
    #[arg(long, default_value_t = 1025)]
    tokens: usize,
    /// Requests per policy.
    #[arg(long, default_value_t = 5)]
    requests: usize,
    /// Tokens between the starts of consecutive requests' prompts in the text.
    #[arg(long, default_value_t = 384)]
    stride: usize,
    /// Trace values each request moves on by (per-request traces); request `r` starts at value
    /// `(r + 1) * trace_stride`, the first stretch warms the adaptive loader up.
    #[arg(long, default_value_t = 8)]
    trace_stride: usize,
    /// Tokens of following text for the quality measurement.
    #[arg(long, default_value_t = 256)]
    eval_tokens: usize,
    /// Levels written, offered to the adaptive loader, and each replayed as a fixed policy.
    #[arg(
        long,
        default_value = "lossless,high,default,coarse",
        value_delimiter = ','
    )]
    levels: Vec<String>,
    /// Tokens per stored chunk.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
    /// Latency added to every read, milliseconds.
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// The local-disk store to write under (a fresh namespace, deleted at the end).
    #[arg(long, default_value = ".kvplugin/bench-store")]
    store: String,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Write the results as JSON to this file (one object per trace; an array for several).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw each request's TTFT per policy, and the budget, as SVG into this file (with several
    /// traces: one file per trace, the trace's name appended).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One policy's results on one trace.
#[derive(Debug, Serialize)]
struct PolicyResult {
    name: String,
    violation_rate: f64,
    ttft_mean_s: f64,
    ttft_p90_s: f64,
    ppl_delta_pct: f64,
    greedy_agreement: f64,
    /// Per request: the TTFT and the chunks' choices (level initials, `T` text, `!` failed).
    requests: Vec<RequestResult>,
}

#[derive(Debug, Serialize)]
struct RequestResult {
    ttft_s: f64,
    load_s: f64,
    chunks: String,
    covered_tokens: usize,
}

#[derive(Debug, Serialize)]
struct TraceReport {
    trace: String,
    budget_ms: u64,
    model: String,
    prompt_tokens: usize,
    full_prefill_median_s: f64,
    prefill: PrefillModel,
    engine_overhead_s: f64,
    policies: Vec<PolicyResult>,
}

/// Runs the benchmark.
pub fn run(args: StreamBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

#[derive(Clone)]
enum Policy {
    Adaptive,
    Fixed(Level),
    Text,
}

impl Policy {
    fn name(&self) -> String {
        match self {
            Self::Adaptive => "adaptive".into(),
            Self::Fixed(Level::Lossless) => "always-lossless".into(),
            Self::Fixed(level) => format!("fixed-{}", level.name()),
            Self::Text => "always-text".into(),
        }
    }
}

struct Request {
    prompt: Vec<u32>,
    following: Vec<u32>,
}

async fn run_async(args: StreamBenchArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.tokens < 2 * args.chunk_tokens || args.eval_tokens < 2 {
        anyhow::bail!("need --requests >= 1, --tokens >= 2 chunks and --eval-tokens >= 2");
    }
    let levels = args
        .levels
        .iter()
        .map(|n| Level::from_name(n).ok_or_else(|| anyhow::anyhow!("unknown level `{n}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let traces = args
        .trace
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("trace {}: {e}", path.display()))?;
            BandwidthTrace::parse(&text)
                .map(|t| (path.clone(), t))
                .map_err(|e| anyhow::anyhow!("trace {}: {e}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model_dir = model::smollm2_hf(&model::models_dir());
    let source = ModelSource::HfDir(model_dir.clone());
    let text = corpus::text_or_default(args.text.as_deref())?;

    // 1-2. Requests, full prefill, the prefill model.
    let stock = LocalEngine::start(EngineOptions {
        prefix_cache: false,
        ..EngineOptions::new(source.clone())
    })
    .await?;
    let tokens = stock.encode(&text)?;
    let needed = (args.requests - 1) * args.stride + args.tokens + args.eval_tokens;
    if tokens.len() < needed {
        anyhow::bail!(
            "the text has {} tokens; {} requests of {} + {} tokens at a stride of {} need {needed}",
            tokens.len(),
            args.requests,
            args.tokens,
            args.eval_tokens,
            args.stride
        );
    }
    let requests: Vec<Request> = (0..args.requests)
        .map(|r| {
            let at = r * args.stride;
            Request {
                prompt: tokens[at..at + args.tokens].to_vec(),
                following: tokens[at + args.tokens..at + args.tokens + args.eval_tokens].to_vec(),
            }
        })
        .collect();
    // Every engine request of the run: the prefill fit (2 + n), the writer (n), the calibration
    // (n), and per trace one adaptive warm-up plus n per policy (adaptive, each level, text).
    let n_requests = requests.len();
    let bar = super::progress_bar(
        (2 + 3 * n_requests + traces.len() * (1 + (levels.len() + 2) * n_requests)) as u64,
        "bench stream",
    );
    bar.say("== stock engine: full prefill of every prompt, prefill model fit");
    let mut samples = Vec::new();
    for n in [args.tokens / 4, args.tokens / 2] {
        let t = stock.complete(&tokens[..n], 1).await?.ttft;
        bar.inc(1);
        samples.push((n, t.as_secs_f64()));
    }
    let mut full_prefill = Vec::new();
    for request in &requests {
        let t = stock.complete(&request.prompt, 1).await?.ttft;
        bar.inc(1);
        samples.push((request.prompt.len(), t.as_secs_f64()));
        full_prefill.push(t.as_secs_f64());
    }
    drop(stock);
    let prefill =
        PrefillModel::fit(&samples).ok_or_else(|| anyhow::anyhow!("no prefill samples"))?;
    let full_median = median(&full_prefill);
    bar.say(format!(
        "   full prefill of {} tokens: median {full_median:.3} s; fit T(n) = {:.3e} n + {:.3e} n^2 s \
         (for [stream]: prefill_secs_per_token = {:.3e}, prefill_secs_per_token_sq = {:.3e})",
        args.tokens,
        prefill.secs_per_token,
        prefill.secs_per_token_sq,
        prefill.secs_per_token,
        prefill.secs_per_token_sq
    ));
    let budget = Duration::from_millis(
        args.budget_ms
            .unwrap_or((full_median * 1000.0 / 4.0).round() as u64),
    );

    // 3. The store, written by an engine with the hook.
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let mut config = PluginConfig::default();
    config.store.url = args.store.clone();
    config.namespace = format!("kvplugin-bench-stream-{stamp}");
    config.chunk_tokens = args.chunk_tokens;
    config.level = levels[0].name().into();
    config.extra_levels = levels[1..].iter().map(|l| l.name().to_string()).collect();
    config.validate()?;
    let backend = config.open_backend()?;
    let store_config = ObjectStoreConfig {
        namespace: config.namespace.clone(),
        chunk_tokens: args.chunk_tokens,
        level: levels[0],
        extra_levels: levels[1..].to_vec(),
        ..ObjectStoreConfig::default()
    };
    let writer_store = Arc::new(ObjectPrefixStore::new(
        backend.clone(),
        store_config.clone(),
    )?);
    let writer_hook = Arc::new(KvPluginHook::new(writer_store, HookConfig::default()));
    bar.say(format!(
        "== writer engine: every prompt saved at {}",
        args.levels.join(", ")
    ));
    let writer = LocalEngine::start(
        EngineOptions {
            prefix_cache: false,
            ..EngineOptions::new(source.clone())
        }
        .with_kv_hook(writer_hook.clone()),
    )
    .await?;
    for request in &requests {
        writer.complete(&request.prompt, 1).await?;
        bar.inc(1);
    }
    let fingerprint = writer_hook
        .model_fingerprint()
        .ok_or_else(|| anyhow::anyhow!("the writer registered no model"))?;
    // The engine may offer a sequence's cache more than once (at its last prompt token and
    // after one more step), so saves are not counted: the store is polled until every request
    // is there at the last level written (each save writes its levels in order).
    let quality_store = ObjectPrefixStore::new(backend.clone(), store_config.clone())?;
    let last_level = *levels.last().expect("levels");
    for (r, request) in requests.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        loop {
            let m = writer_hook.metrics().snapshot();
            if m.save_failures + m.dropped_saves > 0 {
                anyhow::bail!("the writer failed to save a cache: {m:?}");
            }
            let stored = quality_store
                .load_at(&fingerprint, &request.prompt, 0, last_level)
                .await?
                .map_or(0, |p| p.tokens.len());
            if stored + 1 >= request.prompt.len() {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("request {r}: the writer did not store it within 600 s: {m:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(writer);

    bar.say("== calibration: what a hit costs the engine besides the load (unshaped store)");
    let calibration_hook = Arc::new(KvPluginHook::new(
        Arc::new(ObjectPrefixStore::new(
            backend.clone(),
            store_config.clone(),
        )?),
        HookConfig {
            read_only: true,
            stream: Some(StreamPolicy::Fixed(last_level)),
            ..HookConfig::default()
        },
    ));
    let calibration = LocalEngine::start(
        EngineOptions {
            prefix_cache: false,
            ..EngineOptions::new(source.clone())
        }
        .with_kv_hook(calibration_hook.clone()),
    )
    .await?;
    let mut overheads = Vec::new();
    for request in &requests {
        let ttft = calibration.complete(&request.prompt, 1).await?.ttft;
        bar.inc(1);
        let report = calibration_hook
            .last_stream_report()
            .filter(|r| r.covered_tokens > 0)
            .ok_or_else(|| anyhow::anyhow!("calibration: expected a store hit"))?;
        overheads.push((ttft.as_secs_f64() - report.elapsed_s).max(0.0));
    }
    drop(calibration);
    let engine_overhead = Duration::from_secs_f64(median(&overheads));
    bar.say(format!(
        "   engine overhead of a hit: median {:.3} s (for [stream]: engine_overhead_ms = {})",
        engine_overhead.as_secs_f64(),
        engine_overhead.as_millis()
    ));

    // Exact caches and their quality, per request.
    let reference = LlamaEval::load(&model_dir)?;
    let exact: Vec<Quality> = requests
        .iter()
        .map(|r| {
            let (_, kv) = reference.forward(&r.prompt, None)?;
            Quality::measure(&reference, &kv, &r.prompt, &r.following, None)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut quality_cache: HashMap<(usize, Vec<Choice>), (f64, f64)> = HashMap::new();

    let mut policies = vec![Policy::Adaptive];
    policies.extend(levels.iter().map(|&l| Policy::Fixed(l)));
    policies.push(Policy::Text);

    let mut reports = Vec::new();
    for (path, trace) in &traces {
        bar.say(format!(
            "== trace {}: budget {} ms",
            path.display(),
            budget.as_millis()
        ));
        let shaped = Arc::new(ShapedStore::new(
            backend.clone(),
            trace.clone(),
            Duration::from_millis(args.latency_ms),
        ));
        let reader_store = Arc::new(ObjectPrefixStore::new(
            shaped.clone() as Arc<dyn ObjectStore>,
            store_config.clone(),
        )?);
        let reader_hook = Arc::new(KvPluginHook::new(
            reader_store,
            HookConfig {
                read_only: true,
                // Past a full prefill's time a load cannot win; fixed policies wait that long.
                load_timeout: Duration::from_secs_f64(full_median),
                ..HookConfig::default()
            },
        ));
        let reader = LocalEngine::start(
            EngineOptions {
                prefix_cache: false,
                ..EngineOptions::new(source.clone())
            }
            .with_kv_hook(reader_hook.clone()),
        )
        .await?;
        let mut results = Vec::new();
        for policy in &policies {
            let adaptive = PlannerInputs {
                budget,
                prefill,
                engine_overhead,
                decode_bytes_per_s: 300e6,
                // A first guess the estimate replaces after one transfer.
                prior_bytes_per_s: 100e6 / 8.0,
            };
            reader_hook.set_stream_policy(Some(match policy {
                Policy::Adaptive => StreamPolicy::Adaptive(adaptive),
                Policy::Fixed(level) => StreamPolicy::Fixed(*level),
                // Every chunk left to the engine: a full prefill on the same engine, under the
                // same conditions as the other policies (discovery's HEADs cost milliseconds).
                Policy::Text => StreamPolicy::Planned(Vec::new()),
            }));
            if matches!(policy, Policy::Adaptive) {
                // One unmeasured lookup at the trace's start: a deployed hook carries its
                // bandwidth estimate from lookup to lookup, so a cold prior is the benchmark's
                // artefact, not the loader's.
                shaped.seek(0);
                reader.complete(&requests[0].prompt, 1).await?;
                bar.inc(1);
            }
            let mut ttfts = Vec::new();
            let mut per_request = Vec::new();
            let (mut ppl_deltas, mut greedy) = (Vec::new(), Vec::new());
            for (r, request) in requests.iter().enumerate() {
                shaped.seek((r + 1) * args.trace_stride);
                let before = reader_hook.metrics().snapshot().lookups;
                let ttft = reader
                    .complete(&request.prompt, 1)
                    .await?
                    .ttft
                    .as_secs_f64();
                let after = reader_hook.metrics().snapshot().lookups;
                if after != before + 1 {
                    anyhow::bail!("expected one lookup per request, got {}", after - before);
                }
                // No report: the lookup failed before choosing anything, or timed out.
                let report = reader_hook.last_stream_report().unwrap_or_default();
                let choices = report.choices();
                let (delta, agree) = match quality_cache.get(&(r, choices.clone())) {
                    Some(&q) => q,
                    None => {
                        let q = quality_of(
                            &quality_store,
                            &fingerprint,
                            &reference,
                            request,
                            &choices,
                            &exact[r],
                        )
                        .await?;
                        quality_cache.insert((r, choices), q);
                        q
                    }
                };
                bar.inc(1);
                ttfts.push(ttft);
                ppl_deltas.push(delta);
                greedy.push(agree);
                per_request.push(RequestResult {
                    ttft_s: ttft,
                    load_s: report.elapsed_s,
                    chunks: report.summary(),
                    covered_tokens: report.covered_tokens,
                });
            }
            let result = PolicyResult {
                name: policy.name(),
                violation_rate: ttfts.iter().filter(|&&t| t > budget.as_secs_f64()).count() as f64
                    / ttfts.len() as f64,
                ttft_mean_s: mean(&ttfts),
                ttft_p90_s: percentile(&ttfts, 0.9),
                ppl_delta_pct: mean(&ppl_deltas),
                greedy_agreement: mean(&greedy),
                requests: per_request,
            };
            bar.say(format!(
                "   {:16} violations {:>4.0}%  TTFT mean {:.3} s p90 {:.3} s  ppl {:+.3}%  greedy {:.3}  [{}]",
                result.name,
                100.0 * result.violation_rate,
                result.ttft_mean_s,
                result.ttft_p90_s,
                result.ppl_delta_pct,
                result.greedy_agreement,
                result
                    .requests
                    .iter()
                    .map(|r| r.chunks.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            results.push(result);
        }
        reports.push(TraceReport {
            trace: path.display().to_string(),
            budget_ms: budget.as_millis() as u64,
            model: "SmolLM2-135M-Instruct (F32, CPU)".into(),
            prompt_tokens: args.tokens,
            full_prefill_median_s: full_median,
            prefill,
            engine_overhead_s: engine_overhead.as_secs_f64(),
            policies: results,
        });
    }

    bar.finish_and_clear();
    for report in &reports {
        print_table(report);
    }
    if let Some(path) = &args.plot {
        for report in &reports {
            let file = if reports.len() == 1 {
                path.clone()
            } else {
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("stream");
                let trace = std::path::Path::new(&report.trace)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("trace");
                path.with_file_name(format!("{stem}-{trace}.svg"))
            };
            ttft_plot(report).write(&file)?;
        }
    }
    if let Some(path) = &args.json {
        let json = if reports.len() == 1 {
            serde_json::to_vec_pretty(&reports[0])?
        } else {
            serde_json::to_vec_pretty(&reports)?
        };
        std::fs::write(path, json)?;
    }

    // Leave the store as it was.
    let prefix = object_store::path::Path::from(config.namespace.as_str());
    let paths: Vec<_> = backend
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    for path in paths {
        backend.delete(&path).await?;
    }
    Ok(())
}

/// Perplexity change (percent) and greedy agreement of the cache a load with `choices` installs,
/// the rest of the prompt recomputed over it.
async fn quality_of(
    store: &ObjectPrefixStore,
    model: &ModelFingerprint,
    reference: &LlamaEval,
    request: &Request,
    choices: &[Choice],
    exact: &Quality,
) -> anyhow::Result<(f64, f64)> {
    let loaded = store
        .load_streamed(
            model,
            &request.prompt,
            0,
            &StreamPolicy::Planned(choices.to_vec()),
        )
        .await?;
    let past = loaded.prefix.map(|p| PastKv {
        k: p.layers.iter().map(|l| l.k.clone()).collect(),
        v: p.layers.iter().map(|l| l.v.clone()).collect(),
    });
    let covered = past.as_ref().map_or(0, PastKv::len);
    let (_, kv) = reference.forward(&request.prompt[covered..], past.as_ref())?;
    let q = Quality::measure(
        reference,
        &kv,
        &request.prompt,
        &request.following,
        Some(exact),
    )?;
    Ok((100.0 * (q.ppl / exact.ppl - 1.0), q.greedy_agreement))
}

fn print_table(report: &TraceReport) {
    println!(
        "\nTrace {}: budget {} ms, {} prompt tokens (SmolLM2-135M F32, this machine)",
        report.trace, report.budget_ms, report.prompt_tokens
    );
    println!("| policy | violation rate | TTFT mean (s) | TTFT p90 (s) | ppl change | greedy agreement |");
    println!("|---|---|---|---|---|---|");
    for p in &report.policies {
        println!(
            "| {} | {:.0}% | {:.3} | {:.3} | {:+.3}% | {:.3} |",
            p.name,
            100.0 * p.violation_rate,
            p.ttft_mean_s,
            p.ttft_p90_s,
            p.ppl_delta_pct,
            p.greedy_agreement
        );
    }
}

/// Each request's TTFT per policy, with the budget as a flat line.
fn ttft_plot(report: &TraceReport) -> super::plot::LinePlot {
    use super::plot::{LinePlot, Scale, Series};
    let n = report
        .policies
        .iter()
        .map(|p| p.requests.len())
        .max()
        .unwrap_or(0);
    let mut series: Vec<Series> = report
        .policies
        .iter()
        .map(|p| Series {
            name: p.name.clone(),
            points: p
                .requests
                .iter()
                .enumerate()
                .map(|(i, r)| ((i + 1) as f64, r.ttft_s))
                .collect(),
        })
        .collect();
    if report.budget_ms > 0 && n > 0 {
        let budget = report.budget_ms as f64 / 1e3;
        series.push(Series {
            name: "budget".into(),
            points: vec![(1.0, budget), (n as f64, budget)],
        });
    }
    LinePlot {
        title: format!(
            "TTFT per request on {} ({} prompt tokens)",
            report.trace, report.prompt_tokens
        ),
        x_label: "request".into(),
        y_label: "TTFT, seconds".into(),
        x_scale: Scale::Linear,
        y_scale: Scale::Linear,
        series,
    }
}
