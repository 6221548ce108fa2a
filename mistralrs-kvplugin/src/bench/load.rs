//! `kvplugin bench load`: many concurrent sessions of long prompts on one engine with the
//! plugin, store hits and misses mixed: lost requests, wrong answers (against stock), TTFT
//! percentiles, and the process's peak memory next to the lookup memory budget.
//!
//! Method:
//! 1. `--documents` documents of `--context` tokens (the text's opening behind a line naming the
//!    document). Session `i` asks question `i / documents` (of four) about document
//!    `i % documents`.
//! 2. A stock engine (no hook) answers every session's prompt one after the other: the
//!    reference answers.
//! 3. A writer engine saves the caches of the first half of the documents into the store (a
//!    fresh namespace): the requests about them are store hits, the others misses (saved as
//!    they finish).
//! 4. A fresh engine with the plugin (its own prefix cache off, so every prompt asks the store)
//!    gets all sessions at once; each must be answered within a deadline. The resident memory of
//!    the process is sampled every 50 ms while they run.
//!
//! What the budget bounds: `lookup_memory_mb` bounds the decode buffers of the lookups in flight
//! (a lookup that does not fit is not made: `lookups_over_budget`); the engine's own KV cache
//! for the sequences it runs and the model's weights are outside it, so the peak RSS is reported
//! beside the budget, with the RSS before the load began.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use serde::Serialize;

use super::{
    faults::{outcome_within, store_from_spec, Outcome},
    percentile, Say,
};
use crate::{
    corpus,
    engine::{chat_prompt, EngineOptions, LocalEngine, ModelSource},
    hook::KvPluginHook,
    model,
};

/// Arguments of `kvplugin bench load`.
#[derive(Debug, Args)]
pub struct LoadBenchArgs {
    /// The store: a folder, `file:///path`, `s3://bucket` (endpoint and credentials from the
    /// environment) or a kvplugin config file (`.toml`: its `[store]` and `lookup_memory_mb`).
    #[arg(long, default_value = ".kvplugin/bench-load")]
    pub store: String,
    /// Concurrent sessions (one request each, all sent at once).
    #[arg(long, default_value_t = 64)]
    pub sessions: usize,
    /// Distinct documents; the first half are in the store before the load starts.
    #[arg(long, default_value_t = 16)]
    pub documents: usize,
    /// Document tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Sequences the engine runs at once.
    #[arg(long, default_value_t = 8)]
    pub max_running: usize,
    /// Tokens generated per answer.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The load run's results.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered with stock's answer.
    pub answered: usize,
    /// Answers that differ from stock's.
    pub wrong_answers: usize,
    /// Requests with no answer by the deadline, or an error where stock answered.
    pub lost_requests: usize,
    /// Store hits among the requests.
    pub store_hits: u64,
    /// Lookups not made because their buffers did not fit the budget (recomputed).
    pub lookups_over_budget: u64,
    /// The process's resident memory before the sessions started, MB.
    pub baseline_rss_mb: f64,
    /// The process's peak resident memory while they ran, MB.
    pub peak_rss_mb: f64,
    /// The lookup memory budget (`lookup_memory_mb`).
    pub memory_budget_mb: u64,
    /// TTFT median over the requests, seconds (queueing included).
    pub ttft_p50_s: f64,
    /// TTFT 99th percentile (nearest rank), seconds.
    pub ttft_p99_s: f64,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
}

const QUESTIONS: [&str; 4] = [
    "What is this document about?",
    "Who may copy this document?",
    "Summarise the first paragraph.",
    "Which rights does the document mention?",
];

/// Runs `kvplugin bench load`.
pub fn run(args: LoadBenchArgs) -> anyhow::Result<()> {
    let report = tokio::runtime::Runtime::new()?.block_on(run_async(&args))?;
    println!(
        "\nLoad: {} sessions of {}-token prompts at once (SmolLM2-135M F32, this machine)",
        report.sessions, report.prompt_tokens
    );
    println!("| requests | answered | wrong | lost | store hits | over budget | TTFT p50 s | TTFT p99 s | RSS before MB | peak RSS MB | lookup budget MB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
        report.requests,
        report.answered,
        report.wrong_answers,
        report.lost_requests,
        report.store_hits,
        report.lookups_over_budget,
        report.ttft_p50_s,
        report.ttft_p99_s,
        report.baseline_rss_mb,
        report.peak_rss_mb,
        report.memory_budget_mb
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if report.wrong_answers + report.lost_requests > 0 {
        anyhow::bail!(
            "{} wrong answers and {} lost requests under load",
            report.wrong_answers,
            report.lost_requests
        );
    }
    Ok(())
}

async fn run_async(args: &LoadBenchArgs) -> anyhow::Result<LoadReport> {
    if args.sessions == 0 || args.documents == 0 || args.max_running == 0 {
        anyhow::bail!("--sessions, --documents and --max-running must be at least 1");
    }
    let mut store = store_from_spec(&args.store)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    store.config.namespace = format!("kvl{}", stamp % 1_000_000_000);
    let source = ModelSource::HfDir(model::smollm2_hf(&model::models_dir()));
    let options = |hook: Option<Arc<KvPluginHook>>| {
        let mut options = EngineOptions {
            prefix_cache: false,
            max_running: args.max_running,
            ..EngineOptions::new(source.clone())
        };
        if let Some(hook) = hook {
            options = options.with_kv_hook(hook);
        }
        options
    };
    let text = corpus::text_or_default(args.text.as_deref())?;
    let bar = super::progress_bar(
        (2 * args.sessions + args.documents / 2) as u64,
        "bench load",
    );

    bar.say("== stock engine: every session's answer, one at a time");
    let stock = LocalEngine::start(options(None)).await?;
    let document = stock.truncate_to_tokens(&text, args.context)?;
    let prompt_of = |i: usize| -> anyhow::Result<Vec<u32>> {
        let system = format!(
            "Load run {stamp}, document {}. Answer questions about this document.\n\n{document}",
            i % args.documents
        );
        Ok(stock.encode(&chat_prompt(
            &system,
            QUESTIONS[(i / args.documents) % QUESTIONS.len()],
        ))?)
    };
    let prompts = (0..args.sessions)
        .map(prompt_of)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut references = Vec::new();
    let mut full = Vec::new();
    for prompt in &prompts {
        let answer = stock.complete(prompt, args.max_new_tokens).await?;
        full.push(answer.ttft);
        references.push(Outcome::Answer(answer.token_ids));
        bar.inc(1);
    }
    drop(stock);

    bar.say("== writer engine: half of the documents saved to the store");
    let writer_hook = Arc::new(KvPluginHook::new(
        Arc::new(store.config.build_store()?),
        store.config.hook_config(),
    ));
    let writer = LocalEngine::start(options(Some(writer_hook.clone()))).await?;
    let saved = args.documents.div_ceil(2).min(args.sessions);
    for (i, prompt) in prompts.iter().take(saved).enumerate() {
        writer.complete(prompt, args.max_new_tokens).await?;
        writer_hook
            .wait_for_saves(i as u64 + 1, Duration::from_secs(300))
            .await?;
        bar.inc(1);
    }
    drop(writer);

    bar.say(format!(
        "== {} sessions at once on an engine with the plugin",
        args.sessions
    ));
    let hook = Arc::new(KvPluginHook::new(
        Arc::new(store.config.build_store()?),
        store.config.hook_config(),
    ));
    let engine = Arc::new(LocalEngine::start(options(Some(hook.clone()))).await?);
    // Everything at once on `max_running` slots: the last waits for all the others.
    let slowest = full.iter().max().copied().unwrap_or_default();
    let deadline = slowest * (args.sessions as u32).div_ceil(args.max_running as u32) * 3
        + Duration::from_secs(120);
    let baseline_rss_mb = rss_mb();
    let sampling = Arc::new(AtomicBool::new(true));
    let peak_kb = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, peak_kb) = (sampling.clone(), peak_kb.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak_kb.fetch_max((rss_mb() * 1024.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let sessions = prompts.iter().cloned().map(|prompt| {
        let engine = engine.clone();
        let max_new = args.max_new_tokens;
        tokio::spawn(async move { outcome_within(&engine, &prompt, max_new, deadline).await })
    });
    let outcomes = futures::future::join_all(sessions).await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let (mut answered, mut wrong, mut lost, mut ttfts) = (0, 0, 0, Vec::new());
    for (outcome, reference) in outcomes.into_iter().zip(&references) {
        bar.inc(1);
        match outcome? {
            Ok((Outcome::Answer(tokens), ttft)) => {
                answered += 1;
                ttfts.push(ttft.as_secs_f64());
                if Outcome::Answer(tokens) != *reference {
                    wrong += 1;
                }
            }
            Ok((Outcome::Refused(why), _)) | Err(why) => {
                tracing::warn!(%why, "kvplugin: a lost request under load");
                lost += 1;
            }
        }
    }
    let metrics = hook.metrics().snapshot();
    drop(engine);
    bar.finish_and_clear();
    // Leave the store as it was.
    if let Ok(backend) = store.config.open_backend() {
        super::faults::delete_under(&*backend, &store.config.namespace).await;
    }
    Ok(LoadReport {
        sessions: args.sessions,
        requests: prompts.len(),
        answered,
        wrong_answers: wrong,
        lost_requests: lost,
        store_hits: metrics.hits,
        lookups_over_budget: metrics.lookups_over_budget,
        baseline_rss_mb,
        peak_rss_mb: peak_kb.load(Ordering::Relaxed) as f64 / 1024.0,
        memory_budget_mb: store.config.lookup_memory_mb,
        ttft_p50_s: if ttfts.is_empty() {
            f64::NAN
        } else {
            percentile(&ttfts, 0.5)
        },
        ttft_p99_s: if ttfts.is_empty() {
            f64::NAN
        } else {
            percentile(&ttfts, 0.99)
        },
        prompt_tokens: prompts[0].len(),
    })
}

/// The process's resident memory, MB (Linux; 0 elsewhere).
fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
