//! `kvplugin bench offload`: time to first token against context length for stock mistral.rs
//! (full prefill, and its own in-memory prefix hit) and for a plugin store hit at each codec
//! level, from each store given (local disk, an S3 server), as medians of several runs.
//!
//! Method, per context length and repetition:
//! 1. A document of that many tokens (the text's opening, behind a line naming the run, so no
//!    two runs share a prefix and no cache carries over between them) and two questions on it.
//! 2. Stock engine (prefix cache on, no hook): question 1 (full prefill), then question 2 (its
//!    in-memory prefix hit: the limit for any store, no I/O at all). Question 2's answer is the
//!    reference.
//! 3. Writer engine (hook, prefix cache off): question 1 from cold; the hook saves the cache to
//!    every store at every level (bytes per level are counted here).
//! 4. For each store and level, a reader engine (read-only hook on that store and level only,
//!    prefix cache off, so every prompt goes to the store): question 2. Its TTFT is the store
//!    hit; its answer is compared with the reference.
//!
//! With `--paged` every engine runs PagedAttention (the engine's block manager) on the CPU: the
//! stock engine's second answer is its own block prefix hit, and store hits are installed into
//! blocks (whole blocks after the engine's own hit; the rest of the prompt is prefilled).
//!
//! The stores are written under a fresh namespace that is deleted at the end. A local-disk
//! store read right after it was written is served from the OS page cache: these are warm-cache
//! figures.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use clap::Args;
use futures::TryStreamExt;
use mistralrs_core::KvPrefix;
use object_store::ObjectStore;
use serde::Serialize;

use super::Say;
use crate::{
    cli::{QUESTION_1, QUESTION_2},
    codec::Level,
    config::PluginConfig,
    corpus,
    engine::{chat_prompt, EngineOptions, LocalEngine, ModelSource, PagedOptions},
    fingerprint::ModelFingerprint,
    hook::{HookConfig, KvPluginHook},
    model,
    store::{ObjectPrefixStore, PrefixStore, SaveOutcome, StoreError},
};

/// Arguments of `kvplugin bench offload`.
#[derive(Debug, Args)]
pub struct OffloadBenchArgs {
    /// A store to read from: a folder, `file:///path`, `memory://` or `s3://bucket` (S3 endpoint
    /// and credentials from KVPLUGIN_S3_ENDPOINT, KVPLUGIN_S3_ALLOW_HTTP, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY). Repeat to compare stores in one run.
    #[arg(long, default_value = ".kvplugin/bench-store")]
    store: Vec<String>,
    /// Codec levels to store and read, comma-separated.
    #[arg(
        long,
        default_value = "lossless,fine,default,coarse",
        value_delimiter = ','
    )]
    levels: Vec<String>,
    /// Document lengths in tokens, comma-separated.
    #[arg(long, default_value = "512,1024,2048,3072,6000", value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tokens generated per answer (compared with the stock answer).
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw TTFT against prompt length (stock full prefill, stock memory hit, each store and
    /// level) as SVG into this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Run every engine with PagedAttention (the engine's block manager) on the CPU.
    #[arg(long)]
    paged: bool,
    /// Tokens per block with `--paged` (8, 16 or 32).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
}

/// Results of one context length.
#[derive(Debug, Serialize)]
struct ContextResult {
    prompt_tokens: usize,
    stock_full_prefill_s: f64,
    stock_memory_hit_s: f64,
    plugin_cold_s: f64,
    hits: Vec<HitResult>,
}

/// A store hit at one level from one store.
#[derive(Debug, Serialize)]
struct HitResult {
    store: String,
    level: String,
    ttft_s: f64,
    vs_memory_hit: f64,
    vs_full_prefill: f64,
    load_s: f64,
    reused_tokens: usize,
    bytes_stored: u64,
    bytes_raw_16bit: u64,
    answers_match_stock: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    paged: bool,
    reps: usize,
    contexts: Vec<ContextResult>,
}

/// One store at one level.
struct Target {
    store_url: String,
    level: Level,
    backend: Arc<dyn ObjectStore>,
    store: Arc<ObjectPrefixStore>,
}

/// Saves every prefix to each of several stores (the writer engine's hook).
struct FanOut(Vec<Arc<ObjectPrefixStore>>);

#[async_trait]
impl PrefixStore for FanOut {
    fn chunk_tokens(&self) -> Option<usize> {
        self.0.first().and_then(|store| store.chunk_tokens())
    }

    async fn save(
        &self,
        model: &ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<SaveOutcome, StoreError> {
        let mut bytes = 0;
        for store in &self.0 {
            if let SaveOutcome::Written { bytes: b } = store.save(model, prefix.clone()).await? {
                bytes += b;
            }
        }
        Ok(SaveOutcome::Written { bytes })
    }

    async fn load(
        &self,
        _model: &ModelFingerprint,
        _prompt: &[u32],
        _min_tokens: usize,
    ) -> Result<Option<KvPrefix>, StoreError> {
        Ok(None)
    }
}

/// How long to wait for a save or a finished sequence.
const WAIT: Duration = Duration::from_secs(300);

/// Runs the benchmark.
pub fn run(args: OffloadBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: OffloadBenchArgs) -> anyhow::Result<()> {
    if args.reps == 0 || args.contexts.is_empty() || args.store.is_empty() {
        anyhow::bail!("--reps, --contexts and --store must not be empty");
    }
    let levels = args
        .levels
        .iter()
        .map(|n| Level::from_name(n).ok_or_else(|| anyhow::anyhow!("unknown level `{n}`")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let source = ModelSource::HfDir(model::smollm2_hf(&model::models_dir()));
    let longest = *args.contexts.iter().max().expect("not empty");
    let paged = args
        .paged
        .then(|| PagedOptions::room_for(longest + args.max_new_tokens, args.block_size));
    let options = |prefix_cache: bool| EngineOptions {
        paged,
        prefix_cache,
        ..EngineOptions::new(source.clone())
    };
    let text = corpus::text_or_default(args.text.as_deref())?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let namespace = format!("kvplugin-bench-{stamp}");

    let mut targets = Vec::new();
    for url in &args.store {
        for &level in &levels {
            let mut config = PluginConfig::default();
            config.apply_env(|k| std::env::var(k).ok())?;
            config.store.url = url.clone();
            config.namespace = namespace.clone();
            config.level = level.name().into();
            config.validate()?;
            let backend = config.open_backend()?;
            let store = Arc::new(config.build_store()?);
            targets.push(Target {
                store_url: url.clone(),
                level,
                backend,
                store,
            });
        }
    }

    // Documents and prompts: [context][rep] -> (question 1, question 2).
    let stock = LocalEngine::start(options(true)).await?;
    let mut prompts = Vec::new();
    for &context in &args.contexts {
        let document = stock.truncate_to_tokens(&text, context)?;
        let mut per_rep = Vec::new();
        for rep in 0..args.reps {
            let system = format!(
                "Run {rep} of the {context}-token measurement. Answer questions about this document.\n\n{document}"
            );
            per_rep.push((
                stock.encode(&chat_prompt(&system, QUESTION_1))?,
                stock.encode(&chat_prompt(&system, QUESTION_2))?,
            ));
        }
        prompts.push(per_rep);
    }

    let bar = super::progress_bar(
        (prompts.len() * args.reps.max(1) * (3 + targets.len())) as u64,
        "bench offload",
    );
    bar.say(if args.paged {
        "== stock engine (paged): full prefill, then its own block prefix hit"
    } else {
        "== stock engine: full prefill, then its in-memory prefix hit"
    });
    let mut stock_full = vec![Vec::new(); prompts.len()];
    let mut stock_hit = vec![Vec::new(); prompts.len()];
    let mut reference = vec![Vec::new(); prompts.len()];
    for (c, per_rep) in prompts.iter().enumerate() {
        for (q1, q2) in per_rep {
            stock_full[c].push(stock.complete(q1, args.max_new_tokens).await?.ttft);
            bar.inc(1);
            let hit = stock.complete(q2, args.max_new_tokens).await?;
            bar.inc(1);
            stock_hit[c].push(hit.ttft);
            reference[c].push(hit.tokens);
        }
        bar.say(format!(
            "   {} tokens: full {:.3} s, memory hit {:.3} s",
            per_rep[0].1.len(),
            secs(median(&stock_full[c])),
            secs(median(&stock_hit[c]))
        ));
    }
    drop(stock);

    bar.say("== writer engine: cold prefill, cache saved to every store at every level");
    let fan_out = Arc::new(FanOut(targets.iter().map(|t| t.store.clone()).collect()));
    let writer_hook = Arc::new(KvPluginHook::new(fan_out, HookConfig::default()));
    let writer = LocalEngine::start(options(false).with_kv_hook(writer_hook.clone())).await?;
    let mut plugin_cold = vec![Vec::new(); prompts.len()];
    // [context][target] -> (bytes stored, raw 16-bit bytes), summed over reps.
    let mut bytes = vec![vec![(0u64, 0u64); targets.len()]; prompts.len()];
    let mut saves = writer_hook.metrics().snapshot().saves;
    for (c, per_rep) in prompts.iter().enumerate() {
        for (q1, _) in per_rep {
            let before: Vec<(u64, u64)> = targets.iter().map(|t| counters(&t.store)).collect();
            plugin_cold[c].push(writer.complete(q1, args.max_new_tokens).await?.ttft);
            bar.inc(1);
            saves += 1;
            let m = writer_hook.wait_for_saves(saves, WAIT).await?;
            if m.save_failures + m.dropped_saves > 0 {
                anyhow::bail!("the writer failed to save a cache: {m:?}");
            }
            for (t, target) in targets.iter().enumerate() {
                let after = counters(&target.store);
                bytes[c][t].0 += after.0 - before[t].0;
                bytes[c][t].1 += after.1 - before[t].1;
            }
        }
        bar.say(format!(
            "   {} tokens: cold {:.3} s",
            per_rep[0].0.len(),
            secs(median(&plugin_cold[c]))
        ));
    }
    drop(writer);

    let mut hits: Vec<Vec<HitResult>> = (0..prompts.len()).map(|_| Vec::new()).collect();
    for (t, target) in targets.iter().enumerate() {
        bar.say(format!(
            "== reader engine: store hits from {} at level {}",
            target.store_url,
            target.level.name()
        ));
        let hook = Arc::new(KvPluginHook::new(
            target.store.clone(),
            HookConfig {
                read_only: true,
                load_timeout: Duration::from_secs(120),
                ..HookConfig::default()
            },
        ));
        let reader = LocalEngine::start(options(false).with_kv_hook(hook.clone())).await?;
        for (c, per_rep) in prompts.iter().enumerate() {
            let (mut ttfts, mut loads, mut matches, mut reused) = (Vec::new(), Vec::new(), 0, 0);
            for (rep, (_, q2)) in per_rep.iter().enumerate() {
                let before = hook.metrics().snapshot();
                let answer = reader.complete(q2, args.max_new_tokens).await?;
                bar.inc(1);
                let after = hook.wait_for_finished(q2.len(), WAIT).await?;
                if after.hits != before.hits + 1 {
                    anyhow::bail!(
                        "{} tokens from {} at {}: expected a store hit, got {after:?}",
                        q2.len(),
                        target.store_url,
                        target.level.name()
                    );
                }
                ttfts.push(answer.ttft);
                loads.push(Duration::from_micros(
                    after.load_micros - before.load_micros,
                ));
                reused = after.last_reused_tokens as usize;
                matches += usize::from(answer.tokens == reference[c][rep]);
            }
            let ttft = secs(median(&ttfts));
            let memory = secs(median(&stock_hit[c]));
            let full = secs(median(&stock_full[c]));
            bar.say(format!(
                "   {} tokens: hit {ttft:.3} s ({:.2}x memory hit, 1/{:.0} of full prefill), load {:.3} s, {}/{} answers as stock",
                per_rep[0].1.len(),
                ttft / memory,
                full / ttft,
                secs(median(&loads)),
                matches,
                per_rep.len()
            ));
            hits[c].push(HitResult {
                store: target.store_url.clone(),
                level: target.level.name().into(),
                ttft_s: ttft,
                vs_memory_hit: ttft / memory,
                vs_full_prefill: ttft / full,
                load_s: secs(median(&loads)),
                reused_tokens: reused,
                bytes_stored: bytes[c][t].0 / per_rep.len() as u64,
                bytes_raw_16bit: bytes[c][t].1 / per_rep.len() as u64,
                answers_match_stock: matches as f64 / per_rep.len() as f64,
            });
        }
    }

    let report = Report {
        model: "SmolLM2-135M-Instruct (F32, CPU)".into(),
        paged: args.paged,
        reps: args.reps,
        contexts: prompts
            .iter()
            .zip(hits)
            .enumerate()
            .map(|(c, (per_rep, hits))| ContextResult {
                prompt_tokens: per_rep[0].1.len(),
                stock_full_prefill_s: secs(median(&stock_full[c])),
                stock_memory_hit_s: secs(median(&stock_hit[c])),
                plugin_cold_s: secs(median(&plugin_cold[c])),
                hits,
            })
            .collect(),
    };
    bar.finish_and_clear();
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &args.plot {
        plot(&report).write(path)?;
    }

    // Leave the stores as they were.
    for target in targets.iter().filter(|t| t.level == levels[0]) {
        let prefix = object_store::path::Path::from(namespace.as_str());
        let paths: Vec<_> = target
            .backend
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for path in paths {
            target.backend.delete(&path).await?;
        }
    }
    Ok(())
}

fn counters(store: &ObjectPrefixStore) -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = store.counters();
    (
        c.bytes_written.load(Relaxed),
        c.raw_16bit_bytes_written.load(Relaxed),
    )
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn print_table(report: &Report) {
    println!(
        "\nTTFT in seconds, median of {} runs (SmolLM2-135M F32, this machine{})",
        report.reps,
        if report.paged {
            "; every engine paged: the memory hit is the block pool's"
        } else {
            ""
        }
    );
    println!(
        "| prompt tokens | stock full prefill | stock memory hit | plugin cold (miss + save) | store | level | store hit | vs memory hit | vs full | MB stored / MB 16-bit | answers = stock |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for c in &report.contexts {
        for h in &c.hits {
            println!(
                "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {:.3} | {:.2}x | 1/{:.0} | {:.1} / {:.1} | {:.0}% |",
                c.prompt_tokens,
                c.stock_full_prefill_s,
                c.stock_memory_hit_s,
                c.plugin_cold_s,
                h.store,
                h.level,
                h.ttft_s,
                h.vs_memory_hit,
                1.0 / h.vs_full_prefill,
                h.bytes_stored as f64 / 1e6,
                h.bytes_raw_16bit as f64 / 1e6,
                100.0 * h.answers_match_stock
            );
        }
    }
}

/// TTFT against prompt length: one line for stock's full prefill, one for its memory hit, one per
/// store and level.
fn plot(report: &Report) -> super::plot::LinePlot {
    use super::plot::{LinePlot, Scale, Series};
    let line = |name: &str, y: &dyn Fn(&ContextResult) -> Option<f64>| Series {
        name: name.to_string(),
        points: report
            .contexts
            .iter()
            .filter_map(|c| y(c).map(|y| (c.prompt_tokens as f64, y)))
            .collect(),
    };
    let own_hit = if report.paged {
        "stock: block prefix hit"
    } else {
        "stock: in-memory prefix hit"
    };
    let mut series = vec![
        line("stock: full prefill", &|c| Some(c.stock_full_prefill_s)),
        line(own_hit, &|c| Some(c.stock_memory_hit_s)),
    ];
    let mut seen = Vec::new();
    for hit in report.contexts.iter().flat_map(|c| &c.hits) {
        let key = (hit.store.clone(), hit.level.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        series.push(line(&format!("store hit: {} ({})", key.0, key.1), &|c| {
            c.hits
                .iter()
                .find(|h| h.store == key.0 && h.level == key.1)
                .map(|h| h.ttft_s)
        }));
    }
    LinePlot {
        title: format!(
            "Time to first token ({}{}, medians of {})",
            report.model,
            if report.paged { ", paged" } else { "" },
            report.reps
        ),
        x_label: "prompt tokens".into(),
        y_label: "TTFT, seconds (log)".into(),
        x_scale: Scale::Linear,
        y_scale: Scale::Log,
        series,
    }
}
