//! `kvplugin eval blend-qa` and `kvplugin bench blend`: CacheBlend on RAG questions.
//!
//! Both read a JSONL data set (`{"id", "chunks": [...], "question", "answers": [...]}` per line;
//! the project's own is `data/blend-qa.jsonl`, built by `scripts/make-blend-qa.py` from Python's
//! language reference). Each item becomes a chat prompt: a fixed system prefix, the documents
//! (each tokenized on its own, so that its cache is the same in every prompt), then the question.
//! Every mode sees exactly the same tokens.
//!
//! Modes: `full` (a stock engine, full prefill), `prefix` (a stock engine with its prefix cache,
//! after the same documents were asked about in another order), `reuse` (documents' caches moved
//! into place, only the question computed), `blend-R` (recompute the share R of document rows
//! selected at layer 1 by value deviation; `-k` selects by key deviation, `-gradual` selects over
//! layers 1-3 keeping 3R, 2R, then R), `blend-store-R` (as `blend-R`, with the documents loaded
//! from the store instead of memory). `-alone` computes documents' caches alone rather than after
//! the prompt's first token (see [`BlendConfig::document_sink`]). Documents are cached before the timed requests (they were
//! retrieved and indexed earlier); the first question of each item is untimed warm-up for none.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use serde::{Deserialize, Serialize};

use super::{mean, median, percentile, Say};
use crate::{
    blend::{BlendConfig, BlendPlan, BlendPrompt, Deviation, SelectStep},
    codec::Level,
    engine::{EngineOptions, Generation, LocalEngine, ModelSource},
    model,
    store::{ObjectPrefixStore, ObjectStoreConfig, PrefixStore},
    HookConfig, KvPluginHook,
};

/// One question of a data set.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct QaItem {
    /// Identifier.
    pub id: String,
    /// The retrieved documents, in prompt order.
    pub chunks: Vec<String>,
    /// The question.
    pub question: String,
    /// Accepted answers.
    pub answers: Vec<String>,
}

/// Reads a JSONL data set; errors name the line.
pub fn read_dataset(path: &Path) -> anyhow::Result<Vec<QaItem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("data set {}: {e}", path.display()))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: QaItem = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("data set {} line {}: {e}", path.display(), i + 1))?;
        if item.chunks.is_empty() || item.answers.is_empty() || item.question.trim().is_empty() {
            anyhow::bail!(
                "data set {} line {}: an item needs chunks, a question and answers",
                path.display(),
                i + 1
            );
        }
        items.push(item);
    }
    if items.is_empty() {
        anyhow::bail!("data set {} has no items", path.display());
    }
    Ok(items)
}

/// The shipped data set.
pub fn default_dataset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/blend-qa.jsonl")
}

const SYSTEM: &str = "Answer the question using the documents.";

/// The chat prompt of `item`, its documents cut to `chunk_tokens` tokens when given.
pub fn item_prompt(
    engine: &LocalEngine,
    item: &QaItem,
    chunk_tokens: Option<usize>,
) -> anyhow::Result<BlendPrompt> {
    let chunks = item
        .chunks
        .iter()
        .map(|c| {
            let c = match chunk_tokens {
                Some(n) if engine.encode(c)?.len() > n => engine.truncate_to_tokens(c, n)?,
                _ => c.clone(),
            };
            Ok(format!("{}\n\n", c.trim()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(BlendPrompt {
        prefix: format!("<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"),
        chunks,
        suffix: format!(
            "Question: {}\nAnswer in a few words.<|im_end|>\n<|im_start|>assistant\n",
            item.question.trim()
        ),
    })
}

/// What a mode runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Stock engine, full prefill.
    Full,
    /// Stock engine with its prefix cache, documents seen before in another order.
    Prefix,
    /// Blend with this configuration; documents from memory, or from the store.
    Blend {
        /// The configuration.
        config: BlendConfig,
        /// Documents loaded from the store (memory cleared before each request).
        from_store: bool,
    },
}

/// Parses a mode name (see the module docs).
pub fn parse_mode(name: &str) -> anyhow::Result<Mode> {
    let bad = || {
        anyhow::anyhow!(
            "unknown mode `{name}` (full, prefix, reuse[-alone], blend-R[-k][-gradual][-alone], blend-store-R)"
        )
    };
    match name {
        "full" => return Ok(Mode::Full),
        "prefix" => return Ok(Mode::Prefix),
        "reuse" | "reuse-alone" => {
            return Ok(Mode::Blend {
                config: BlendConfig {
                    document_sink: name == "reuse",
                    ..BlendConfig::reuse_only()
                },
                from_store: false,
            })
        }
        _ => {}
    }
    let rest = name.strip_prefix("blend-").ok_or_else(bad)?;
    let (from_store, rest) = match rest.strip_prefix("store-") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let mut parts = rest.split('-');
    let ratio: f32 = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(bad());
    }
    // From memory a load costs nothing, so the controller would keep the ratio anyway; from the
    // store it may raise it (loads slower than recomputing).
    let mut config = BlendConfig {
        adaptive_ratio: from_store,
        ..BlendConfig::with_ratio(ratio)
    };
    for flag in parts {
        match flag {
            "k" => config.deviation = Deviation::Key,
            "alone" => config.document_sink = false,
            "v" => config.deviation = Deviation::Value,
            "gradual" => {
                config.steps = [(1, 3.0), (2, 2.0), (3, 1.0)]
                    .iter()
                    .map(|&(layer, m)| SelectStep {
                        layer,
                        keep: (ratio * m).min(1.0),
                    })
                    .collect()
            }
            _ => return Err(bad()),
        }
    }
    Ok(Mode::Blend { config, from_store })
}

/// SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Token F1 of `prediction` against the best of `answers` (SQuAD).
pub fn token_f1(prediction: &str, answers: &[String]) -> f64 {
    let pred = normalize_answer(prediction);
    let pred: Vec<&str> = pred.split_whitespace().collect();
    answers
        .iter()
        .map(|a| {
            let gold = normalize_answer(a);
            let gold: Vec<&str> = gold.split_whitespace().collect();
            if pred.is_empty() || gold.is_empty() {
                return f64::from(u8::from(pred == gold));
            }
            let mut remaining = gold.clone();
            let mut common = 0usize;
            for w in &pred {
                if let Some(i) = remaining.iter().position(|g| g == w) {
                    remaining.swap_remove(i);
                    common += 1;
                }
            }
            if common == 0 {
                return 0.0;
            }
            let p = common as f64 / pred.len() as f64;
            let r = common as f64 / gold.len() as f64;
            2.0 * p * r / (p + r)
        })
        .fold(0.0, f64::max)
}

/// The answer in a generation: its first line (generation runs on past it; QA evaluations stop
/// at a newline).
pub fn answer_of(generated: &str) -> &str {
    generated.trim().lines().next().unwrap_or("").trim()
}

/// Exact match after normalisation.
pub fn exact_match(prediction: &str, answers: &[String]) -> bool {
    let pred = normalize_answer(prediction);
    answers.iter().any(|a| normalize_answer(a) == pred)
}

/// The engines and hook a run needs.
struct Rig {
    stock: Arc<LocalEngine>,
    prefix: Option<Arc<LocalEngine>>,
    blend: Arc<LocalEngine>,
    hook: Arc<KvPluginHook>,
}

impl Rig {
    async fn start(
        source: &ModelSource,
        store: Arc<dyn PrefixStore>,
        with_prefix: bool,
    ) -> anyhow::Result<Self> {
        let stock = Arc::new(
            LocalEngine::start(EngineOptions {
                prefix_cache: false,
                ..EngineOptions::new(source.clone())
            })
            .await?,
        );
        let prefix = if with_prefix {
            Some(Arc::new(
                LocalEngine::start(EngineOptions::new(source.clone())).await?,
            ))
        } else {
            None
        };
        let hook = Arc::new(KvPluginHook::new(
            store,
            HookConfig {
                load_timeout: Duration::from_secs(600),
                ..HookConfig::default()
            },
        ));
        let blend = Arc::new(
            LocalEngine::start(
                EngineOptions {
                    prefix_cache: false,
                    ..EngineOptions::new(source.clone())
                }
                .with_kv_hook(hook.clone()),
            )
            .await?,
        );
        if !hook.can_blend() {
            anyhow::bail!("this model file offers no layer access: blends cannot run");
        }
        Ok(Self {
            stock,
            prefix,
            blend,
            hook,
        })
    }

    /// Runs `plan` in `mode` (documents already prepared).
    async fn ask(
        &self,
        mode: &Mode,
        plan: &BlendPlan,
        max_new: usize,
    ) -> anyhow::Result<Generation> {
        Ok(match mode {
            Mode::Full => self.stock.complete(&plan.tokens, max_new).await?,
            Mode::Prefix => {
                let engine = self.prefix.as_ref().expect("a prefix engine was started");
                engine.complete(&plan.tokens, max_new).await?
            }
            Mode::Blend { config, from_store } => {
                self.hook.set_blend_config(config.clone());
                if *from_store {
                    self.hook.chunk_cache().clear();
                }
                self.hook.expect_blend(plan.clone());
                let answer = self.blend.complete(&plan.tokens, max_new).await?;
                if self.hook.last_blend_report().is_none() {
                    anyhow::bail!("the blend did not run (see the log)");
                }
                answer
            }
        })
    }
}

fn memory_store() -> anyhow::Result<Arc<dyn PrefixStore>> {
    Ok(Arc::new(ObjectPrefixStore::new(
        Arc::new(object_store::memory::InMemory::new()),
        ObjectStoreConfig {
            level: Level::High,
            ..ObjectStoreConfig::default()
        },
    )?))
}

/// Arguments of `kvplugin eval blend-qa`.
#[derive(Debug, Args)]
pub struct EvalBlendArgs {
    /// The data set (JSONL: `{"id", "chunks": [...], "question", "answers": [...]}` per line).
    #[arg(long)]
    dataset: PathBuf,
    /// Modes, in order (`full` is always run first: agreement is measured against it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,reuse,blend-0.05,blend-0.10,blend-0.15,blend-0.25"
    )]
    modes: Vec<String>,
    /// Items to use [default: all].
    #[arg(long)]
    limit: Option<usize>,
    /// Cut each document to this many tokens [default: as given].
    #[arg(long)]
    chunk_tokens: Option<usize>,
    /// Tokens to generate per answer (the answer is the first line).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Model file: `hf` (safetensors, llama.rs) or `gguf` (quantized_llama.rs).
    #[arg(long, default_value = "hf")]
    model: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw token F1 and TTFT (relative to full prefill) against the recompute ratio as SVG into
    /// this file (`full` is ratio 1, `reuse` ratio 0).
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// One mode's results.
#[derive(Debug, Serialize)]
struct ModeResult {
    name: String,
    ttft_mean_s: f64,
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    f1: f64,
    em: f64,
    agreement_with_full: f64,
}

#[derive(Debug, Serialize)]
struct EvalReport {
    model: String,
    n_items: usize,
    modes: Vec<ModeResult>,
    /// Per item and mode: the answer given.
    answers: Vec<serde_json::Value>,
}

/// Runs `kvplugin eval blend-qa`.
pub fn run_eval(args: EvalBlendArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(eval(args))
}

async fn eval(args: EvalBlendArgs) -> anyhow::Result<()> {
    let mut items = read_dataset(&args.dataset)?;
    if let Some(n) = args.limit {
        items.truncate(n.max(1));
    }
    let mut names = vec!["full".to_string()];
    names.extend(args.modes.iter().filter(|m| *m != "full").cloned());
    let modes = names
        .iter()
        .map(|n| parse_mode(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if modes.contains(&Mode::Prefix) {
        anyhow::bail!("`prefix` is a `bench blend` mode");
    }
    let source = model::shipped_source(&args.model)?;
    let rig = Rig::start(&source, memory_store()?, false).await?;
    let mut ttfts = vec![Vec::new(); modes.len()];
    let mut f1s = vec![Vec::new(); modes.len()];
    let mut ems = vec![Vec::new(); modes.len()];
    let mut agree = vec![Vec::new(); modes.len()];
    let mut answers = Vec::new();
    let bar = super::progress_bar((items.len() * modes.len()) as u64, "eval blend-qa");
    for (i, item) in items.iter().enumerate() {
        let prompt = item_prompt(&rig.stock, item, args.chunk_tokens)?;
        let plan = prompt.tokenize(rig.stock.tokenizer())?;
        rig.hook.prepare_blend(&plan).await?;
        let mut full_answer = String::new();
        let mut given = serde_json::Map::new();
        for (m, mode) in modes.iter().enumerate() {
            let g = rig.ask(mode, &plan, args.max_new_tokens).await?;
            let answer = answer_of(&g.text);
            if m == 0 {
                full_answer = normalize_answer(answer);
            }
            ttfts[m].push(g.ttft.as_secs_f64());
            f1s[m].push(token_f1(answer, &item.answers));
            ems[m].push(f64::from(u8::from(exact_match(answer, &item.answers))));
            agree[m].push(f64::from(u8::from(normalize_answer(answer) == full_answer)));
            given.insert(
                names[m].clone(),
                serde_json::Value::String(answer.to_string()),
            );
            bar.note(format!(
                "[{}/{}] {} {:>12}: {:6.2} s  {:?}",
                i + 1,
                items.len(),
                item.id,
                names[m],
                g.ttft.as_secs_f64(),
                answer
            ));
            bar.inc(1);
        }
        given.insert("id".into(), item.id.clone().into());
        given.insert("tokens".into(), plan.tokens.len().into());
        answers.push(serde_json::Value::Object(given));
    }
    bar.finish_and_clear();
    let results: Vec<ModeResult> = names
        .iter()
        .enumerate()
        .map(|(m, name)| ModeResult {
            name: name.clone(),
            ttft_mean_s: mean(&ttfts[m]),
            ttft_p50_s: median(&ttfts[m]),
            ttft_p90_s: percentile(&ttfts[m], 0.9),
            f1: mean(&f1s[m]),
            em: mean(&ems[m]),
            agreement_with_full: mean(&agree[m]),
        })
        .collect();
    println!(
        "{} items, {} (documents cached beforehand)",
        items.len(),
        args.model
    );
    println!("| mode | TTFT mean (s) | p50 | p90 | F1 | EM | agreement with full |");
    println!("|---|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} |",
            r.name, r.ttft_mean_s, r.ttft_p50_s, r.ttft_p90_s, r.f1, r.em, r.agreement_with_full
        );
    }
    if let Some(path) = &args.plot {
        ratio_plot(&results).write(path)?;
    }
    if let Some(path) = &args.json {
        let report = EvalReport {
            model: format!("SmolLM2-135M-Instruct ({}, F32)", args.model),
            n_items: items.len(),
            modes: results,
            answers,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// Arguments of `kvplugin bench blend`.
#[derive(Debug, Args)]
pub struct BlendBenchArgs {
    /// The data set [default: data/blend-qa.jsonl].
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Requests per mode for the TTFT table (one item each).
    #[arg(long, default_value_t = 3)]
    requests: usize,
    /// Requests in flight at once for the throughput table.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Requests per mode for the throughput table.
    #[arg(long, default_value_t = 8)]
    throughput_requests: usize,
    /// The recompute ratio of the blend modes.
    #[arg(long, default_value_t = 0.15)]
    ratio: f32,
    /// Cut each document to this many tokens [default: as given].
    #[arg(long)]
    chunk_tokens: Option<usize>,
    /// Tokens to generate per answer.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Model file: `hf` (safetensors, llama.rs) or `gguf` (quantized_llama.rs).
    #[arg(long, default_value = "hf")]
    model: String,
    /// The local-disk store documents are kept in for `blend-store` (a fresh namespace).
    #[arg(long, default_value = ".kvplugin/bench-blend-store")]
    store: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct TtftRow {
    name: String,
    ttft_mean_s: f64,
    ttft_p50_s: f64,
    ttfts_s: Vec<f64>,
    /// Blend modes: the ratio used and the seconds the forward waited for loads, per request.
    blend_ratios: Vec<f32>,
    load_wait_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    name: String,
    requests: usize,
    concurrency: usize,
    wall_s: f64,
    requests_per_min: f64,
}

#[derive(Debug, Serialize)]
struct DeviationRow {
    name: String,
    /// Relative L2 distance of the last row's last-layer attention output from ratio 1's.
    attention_deviation: f64,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    model: String,
    prompt_tokens: Vec<usize>,
    ttft: Vec<TtftRow>,
    throughput: Vec<ThroughputRow>,
    attention_deviation: Vec<DeviationRow>,
    /// Spearman correlation of per-row deviation between layer l and l + 1 (value deviation).
    neighbour_rank_correlation: Vec<(usize, f64)>,
}

/// Runs `kvplugin bench blend`.
pub fn run_bench(args: BlendBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(bench(args))
}

async fn bench(args: BlendBenchArgs) -> anyhow::Result<()> {
    let items = read_dataset(&args.dataset.clone().unwrap_or_else(default_dataset))?;
    let n_needed = args.requests.max(args.throughput_requests).max(1);
    let items: Vec<QaItem> = items.iter().cycle().take(n_needed).cloned().collect();
    let source = model::shipped_source(&args.model)?;
    std::fs::create_dir_all(&args.store)?;
    let backend = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
        &args.store,
    )?);
    let namespace = format!("bench-blend-{}", std::process::id());
    let store: Arc<dyn PrefixStore> = Arc::new(ObjectPrefixStore::new(
        backend.clone(),
        ObjectStoreConfig {
            namespace: namespace.clone(),
            ..ObjectStoreConfig::default()
        },
    )?);
    let rig = Rig::start(&source, store, true).await?;
    let mut plans = Vec::new();
    for item in &items {
        let prompt = item_prompt(&rig.stock, item, args.chunk_tokens)?;
        plans.push(prompt.tokenize(rig.stock.tokenizer())?);
    }
    for plan in &plans {
        rig.hook.prepare_blend(plan).await?;
    }
    let ratio = args.ratio;
    let ttft_modes = [
        "full".to_string(),
        "prefix".to_string(),
        "reuse".to_string(),
        format!("blend-{ratio:.2}"),
        format!("blend-store-{ratio:.2}"),
        "blend-1.00".to_string(),
    ];
    let mut ttft = Vec::new();
    let n_throughput = 2 * args.throughput_requests.min(plans.len());
    let bar = super::progress_bar(
        (ttft_modes.len() * args.requests.min(plans.len()) + n_throughput) as u64,
        "bench blend",
    );
    for name in &ttft_modes {
        let mode = parse_mode(name)?;
        let mut times = Vec::new();
        let (mut ratios, mut waits) = (Vec::new(), Vec::new());
        for (i, plan) in plans.iter().take(args.requests).enumerate() {
            if mode == Mode::Prefix {
                // The same documents asked about before, in another order.
                let engine = rig.prefix.as_ref().expect("started");
                let mut other = items[i].clone();
                other.chunks.reverse();
                let other = item_prompt(&rig.stock, &other, args.chunk_tokens)?
                    .tokenize(rig.stock.tokenizer())?;
                engine.complete(&other.tokens, 1).await?;
            }
            let g = rig.ask(&mode, plan, args.max_new_tokens).await?;
            bar.note(format!(
                "{name:>16} request {}: TTFT {:.2} s",
                i + 1,
                g.ttft.as_secs_f64()
            ));
            bar.inc(1);
            times.push(g.ttft.as_secs_f64());
            if let (Mode::Blend { .. }, Some(r)) = (&mode, rig.hook.last_blend_report()) {
                ratios.push(r.ratio);
                waits.push(r.load_wait_s);
            }
        }
        ttft.push(TtftRow {
            name: name.clone(),
            ttft_mean_s: mean(&times),
            ttft_p50_s: median(&times),
            ttfts_s: times,
            blend_ratios: ratios,
            load_wait_s: waits,
        });
    }

    // Throughput: `concurrency` requests in flight, distinct items.
    let mut throughput = Vec::new();
    for name in ["full".to_string(), format!("blend-{ratio:.2}")] {
        let mode = parse_mode(&name)?;
        if let Mode::Blend { config, .. } = &mode {
            rig.hook.set_blend_config(config.clone());
        }
        let queue = Arc::new(std::sync::Mutex::new(
            plans
                .iter()
                .take(args.throughput_requests)
                .cloned()
                .collect::<Vec<_>>(),
        ));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let queue = queue.clone();
            let (engine, hook) = match mode {
                Mode::Full => (rig.stock.clone(), None),
                _ => (rig.blend.clone(), Some(rig.hook.clone())),
            };
            let max_new = args.max_new_tokens;
            let bar = bar.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(plan) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    if let Some(hook) = &hook {
                        hook.expect_blend(plan.clone());
                    }
                    engine.complete(&plan.tokens, max_new).await?;
                    bar.inc(1);
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
        let wall = started.elapsed().as_secs_f64();
        let n = args.throughput_requests.min(plans.len());
        bar.note(format!(
            "{name:>16} throughput: {n} requests in {wall:.1} s"
        ));
        throughput.push(ThroughputRow {
            name,
            requests: n,
            concurrency: args.concurrency,
            wall_s: wall,
            requests_per_min: n as f64 * 60.0 / wall,
        });
    }

    bar.finish_and_clear();

    // Diagnostics on the first item: attention deviation against the ratio, K vs V, one
    // selection vs gradual; rank correlation of deviations between neighbouring layers.
    let plan = &plans[0];
    let attention = |config: BlendConfig| {
        let hook = rig.hook.clone();
        let plan = plan.clone();
        async move {
            hook.set_blend_config(config);
            hook.blend_now(plan)
                .await
                .ok_or_else(|| anyhow::anyhow!("blend failed"))?;
            Ok::<_, anyhow::Error>(hook.last_blend_report().expect("a report").last_attention)
        }
    };
    let reference = attention(parse_config("blend-1.00")?).await?;
    let mut deviation = Vec::new();
    for name in [
        "reuse",
        "blend-0.05",
        "blend-0.10",
        "blend-0.15",
        "blend-0.25",
        "blend-0.50",
        "blend-0.15-k",
        "blend-0.15-gradual",
        "blend-0.15-k-gradual",
    ] {
        let got = attention(parse_config(name)?).await?;
        deviation.push(DeviationRow {
            name: name.to_string(),
            attention_deviation: relative_l2(&got, &reference),
        });
    }
    let n_layers = rig
        .hook
        .last_blend_report()
        .map_or(0, |r| r.active_per_layer.len());
    rig.hook.set_blend_config(BlendConfig {
        steps: (1..n_layers)
            .map(|layer| SelectStep { layer, keep: 1.0 })
            .collect(),
        adaptive_ratio: false,
        ..BlendConfig::default()
    });
    rig.hook
        .blend_now(plan.clone())
        .await
        .ok_or_else(|| anyhow::anyhow!("blend failed"))?;
    let deviations = rig.hook.last_blend_report().expect("a report").deviations;
    let correlation: Vec<(usize, f64)> = deviations
        .windows(2)
        .map(|w| (w[0].0, spearman(&w[0].1, &w[1].1)))
        .collect();

    println!(
        "{} ({} requests per mode, documents cached beforehand)",
        args.model, args.requests
    );
    println!("| mode | TTFT mean (s) | TTFT p50 (s) | speed-up vs full (mean) | ratio used | load wait (s, mean) |");
    println!("|---|---|---|---|---|---|");
    let full_mean = ttft[0].ttft_mean_s;
    for r in &ttft {
        let ratios = r
            .blend_ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        let wait = if r.load_wait_s.is_empty() {
            "-".to_string()
        } else {
            format!("{:.3}", mean(&r.load_wait_s))
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.1}x | {} | {} |",
            r.name,
            r.ttft_mean_s,
            r.ttft_p50_s,
            full_mean / r.ttft_mean_s,
            if ratios.is_empty() { "-" } else { &ratios },
            wait
        );
    }
    println!("| mode | requests | in flight | wall (s) | requests/min |");
    println!("|---|---|---|---|---|");
    for r in &throughput {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} |",
            r.name, r.requests, r.concurrency, r.wall_s, r.requests_per_min
        );
    }
    println!("| mode | attention-output deviation from ratio 1 |");
    println!("|---|---|");
    for r in &deviation {
        println!("| {} | {:.4} |", r.name, r.attention_deviation);
    }
    let mean_corr = mean(&correlation.iter().map(|c| c.1).collect::<Vec<_>>());
    println!(
        "rank correlation of per-row value deviation, neighbouring layers: mean {mean_corr:.3}, first pairs {:?}",
        correlation.iter().take(4).map(|c| (c.0, (c.1 * 1000.0).round() / 1000.0)).collect::<Vec<_>>()
    );
    if let Some(path) = &args.json {
        let report = BenchReport {
            model: format!("SmolLM2-135M-Instruct ({}, F32)", args.model),
            prompt_tokens: plans
                .iter()
                .take(args.requests)
                .map(|p| p.tokens.len())
                .collect(),
            ttft,
            throughput,
            attention_deviation: deviation,
            neighbour_rank_correlation: correlation,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    // The documents written for `blend-store`.
    let prefix = object_store::path::Path::from(namespace);
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let objects: Vec<_> = backend.list(Some(&prefix)).try_collect().await?;
    for o in objects {
        backend.delete(&o.location).await?;
    }
    Ok(())
}

fn parse_config(name: &str) -> anyhow::Result<BlendConfig> {
    match parse_mode(name)? {
        Mode::Blend { config, .. } => Ok(config),
        _ => anyhow::bail!("`{name}` is not a blend mode"),
    }
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Spearman rank correlation of two deviation lists over the rows they share.
fn spearman(a: &[(usize, f32)], b: &[(usize, f32)]) -> f64 {
    let b_map: std::collections::HashMap<usize, f32> = b.iter().copied().collect();
    let pairs: Vec<(f32, f32)> = a
        .iter()
        .filter_map(|(r, x)| b_map.get(r).map(|y| (*x, *y)))
        .collect();
    let rank = |xs: Vec<f32>| -> Vec<f64> {
        let mut idx: Vec<usize> = (0..xs.len()).collect();
        idx.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
        let mut ranks = vec![0.0; xs.len()];
        for (r, i) in idx.into_iter().enumerate() {
            ranks[i] = r as f64;
        }
        ranks
    };
    let ra = rank(pairs.iter().map(|p| p.0).collect());
    let rb = rank(pairs.iter().map(|p| p.1).collect());
    let n = ra.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt().max(1e-30)
}

/// F1 and relative TTFT against the recompute ratio, one pair of lines per mode variant (`blend-R`
/// with the same suffix; `full` and `reuse` join every variant at ratio 1 and 0).
fn ratio_plot(results: &[ModeResult]) -> super::plot::LinePlot {
    use super::plot::{LinePlot, Scale, Series};
    let full_ttft = results
        .iter()
        .find(|r| r.name == "full")
        .map(|r| r.ttft_p50_s);
    let ratio_of = |name: &str| -> Option<(f64, String)> {
        match name {
            "full" => Some((1.0, String::new())),
            "reuse" => Some((0.0, String::new())),
            _ => {
                let rest = name.strip_prefix("blend-")?;
                let rest = rest.strip_prefix("store-").unwrap_or(rest);
                let (ratio, variant) = rest.split_once('-').unwrap_or((rest, ""));
                Some((ratio.parse().ok()?, variant.to_string()))
            }
        }
    };
    let mut variants: Vec<String> = results
        .iter()
        .filter_map(|r| ratio_of(&r.name).map(|(_, v)| v))
        .collect();
    variants.sort();
    variants.dedup();
    let mut series = Vec::new();
    for variant in &variants {
        let mut f1 = Vec::new();
        let mut ttft = Vec::new();
        for r in results {
            let Some((ratio, v)) = ratio_of(&r.name) else {
                continue;
            };
            if v.is_empty() || v == *variant {
                f1.push((ratio, r.f1));
                if let Some(full) = full_ttft {
                    ttft.push((ratio, r.ttft_p50_s / full.max(1e-9)));
                }
            }
        }
        f1.sort_by(|a, b| a.0.total_cmp(&b.0));
        ttft.sort_by(|a, b| a.0.total_cmp(&b.0));
        let suffix = if variant.is_empty() {
            String::new()
        } else {
            format!(" ({variant})")
        };
        series.push(Series {
            name: format!("token F1{suffix}"),
            points: f1,
        });
        series.push(Series {
            name: format!("TTFT p50 / full prefill's{suffix}"),
            points: ttft,
        });
    }
    LinePlot {
        title: "CacheBlend: quality and TTFT against the recompute ratio".into(),
        x_label: "recompute ratio (0 = reuse only, 1 = full prefill)".into(),
        y_label: "F1, or TTFT relative to full prefill".into(),
        x_scale: Scale::Linear,
        y_scale: Scale::Linear,
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f1_and_exact_match_follow_squad() {
        let gold = vec!["the \"dict\" class".to_string()];
        assert!(exact_match("The dict class.", &gold));
        assert!((token_f1("dict class", &gold) - 1.0).abs() < 1e-9);
        assert!((token_f1("a dict", &gold) - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(token_f1("list", &gold), 0.0);
    }

    #[test]
    fn modes_parse_and_bad_ones_are_named() {
        assert_eq!(parse_mode("full").unwrap(), Mode::Full);
        let Mode::Blend { config, from_store } = parse_mode("blend-store-0.25-k-gradual").unwrap()
        else {
            panic!("a blend");
        };
        assert!(from_store);
        assert_eq!(config.deviation, Deviation::Key);
        assert_eq!(config.steps.len(), 3);
        assert!((config.ratio() - 0.25).abs() < 1e-6 && config.validate().is_ok());
        let err = parse_mode("blend-x").unwrap_err().to_string();
        assert!(err.contains("blend-x"), "{err}");
        assert!(parse_mode("blend-1.5").is_err());
    }

    #[test]
    fn rank_correlation_of_equal_and_reversed_orders() {
        let a: Vec<(usize, f32)> = (0..10).map(|i| (i, i as f32)).collect();
        let rev: Vec<(usize, f32)> = (0..10).map(|i| (i, -(i as f32))).collect();
        assert!((spearman(&a, &a) - 1.0).abs() < 1e-9);
        assert!((spearman(&a, &rev) + 1.0).abs() < 1e-9);
    }

    #[test]
    fn the_shipped_data_set_reads() {
        let items = read_dataset(&default_dataset()).unwrap();
        assert!(items.len() >= 20);
        assert!(items.iter().all(|i| i.chunks.len() == 6));
    }
}
