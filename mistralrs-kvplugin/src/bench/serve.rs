//! `kvplugin bench serve`: workloads sent over HTTP to running OpenAI-compatible servers
//! (`kvplugin serve`, `kvplugin serve --no-plugin`, or any mistral.rs server), by concurrent
//! clients, side by side.
//!
//! Workloads (generated from the corpus text, deterministic for a seed; every run starts its
//! documents with a tag of its own so nothing cached by an earlier run is reused):
//! - `chat`: multi-round long-document chat. Each client has a document of its own
//!   (`--doc-chars` characters of the text, at its own offset) and asks `--rounds` questions in
//!   one conversation (the history grows with each answer). Round 1 is a prompt the server has
//!   never seen (what the plugin must not slow down); later rounds extend the conversation.
//! - `rag`: retrieval-augmented questions. A pool of `--rag-docs` passages of `--rag-doc-chars`
//!   characters; each request puts three passages (drawn per request) in the system message,
//!   then a question. Servers with the plugin get the passages between blend separators
//!   (`[[KVBLEND]]`), so they blend; stock servers get the same text without separators.
//!   By default every passage is first sent once, alone, untimed, to every server (the
//!   documents a RAG deployment ingests before questions arrive: CacheBlend and LMCache assume
//!   document caches computed ahead); `--rag-warmup false` times the cold start too.
//! - `share`: two servers on one store (the first two `--url`s). Per repetition, a fresh
//!   `--share-doc-chars` document: server 1 answers question 1 (cold, then saved), then
//!   question 2 (its own in-memory prefix hit); once its save is in the store (seen in its
//!   `/metrics`), server 2 answers question 2 (a store hit). Reported: both TTFTs and their ratio.
//!
//! TTFT is the time from sending a streamed request to the first content chunk. Medians and
//! p90 are over all requests of a server and workload; requests per minute over the workload's
//! wall time. A request that fails is counted and reported, never retried.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::{json, Value};

use super::{median, percentile};
use crate::{blend::DEFAULT_SEPARATOR, corpus, server::prometheus::sample};

/// Arguments of `kvplugin bench serve`.
#[derive(Debug, Args)]
pub struct ServeBenchArgs {
    /// A server's base URL (`http://127.0.0.1:1234`). Repeat to compare servers; `share` uses
    /// the first two (which must share a store).
    #[arg(long, required = true)]
    url: Vec<String>,
    /// Workloads, comma-separated: chat, rag, share.
    #[arg(long, default_value = "chat,rag", value_delimiter = ',')]
    workload: Vec<String>,
    /// Concurrent clients (chat and rag).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Questions per chat conversation.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Characters of each chat document (about 4.4 per token for the default text).
    #[arg(long, default_value_t = 4000)]
    doc_chars: usize,
    /// Requests per client in `rag`.
    #[arg(long, default_value_t = 4)]
    rag_requests: usize,
    /// Passages in the `rag` pool.
    #[arg(long, default_value_t = 8)]
    rag_docs: usize,
    /// Characters per passage.
    #[arg(long, default_value_t = 1200)]
    rag_doc_chars: usize,
    /// Before `rag`'s timed requests, send each passage of the pool once, alone with a question,
    /// to every server (one at a time, not timed): the documents a RAG deployment ingests before
    /// it is asked about them. `--rag-warmup false` times the cold start as well (each passage's
    /// first use then computes its cache inside a timed request).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rag_warmup: bool,
    /// Characters of the `share` document (13,000: about 3,000 tokens).
    #[arg(long, default_value_t = 13_000)]
    share_doc_chars: usize,
    /// Repetitions of `share`.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tokens generated per answer.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Seed of the passage draws.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

const QUESTIONS: [&str; 5] = [
    "Who may copy this text?",
    "What does it say about warranty?",
    "What does it say about patents?",
    "Summarize the previous answer in one sentence.",
    "What must a distributor give to recipients?",
];

/// One timed request.
#[derive(Debug, Clone)]
struct Timed {
    ttft_s: f64,
    prompt_tokens: u64,
    cached_tokens: Option<u64>,
    round: usize,
    text: String,
}

/// A server's results on one workload.
#[derive(Debug, Serialize)]
struct WorkloadResult {
    url: String,
    plugin: bool,
    workload: String,
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    ttft_p50_s: f64,
    ttft_p90_s: f64,
    /// Round 1 of `chat` only: prompts the server had never seen.
    unseen_ttft_p50_s: Option<f64>,
    requests_per_min: f64,
    cached_tokens_mean: Option<f64>,
    wall_s: f64,
    /// `rag` only: seconds of the untimed warm-up (`None`: no warm-up, the cold start is timed).
    warmup_s: Option<f64>,
}

/// `share`'s repetitions.
#[derive(Debug, Serialize)]
struct ShareResult {
    first_url: String,
    second_url: String,
    prompt_tokens: u64,
    first_cold_ttft_s: Vec<f64>,
    first_memory_hit_ttft_s: Vec<f64>,
    second_store_hit_ttft_s: Vec<f64>,
    second_cached_tokens: Vec<Option<u64>>,
    median_ratio_store_to_memory: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    workloads: Vec<WorkloadResult>,
    share: Option<ShareResult>,
}

/// Runs the command.
pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: ServeBenchArgs) -> anyhow::Result<()> {
    let text = corpus::text_or_default(args.text.as_deref())?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()?;
    let tag = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let mut report = Report {
        machine: machine(),
        workloads: Vec::new(),
        share: None,
    };
    for workload in &args.workload {
        match workload.as_str() {
            "chat" | "rag" => {
                for url in &args.url {
                    let plugin = plugin_enabled(&http, url).await?;
                    let result = run_clients(&http, url, plugin, workload, &args, &text, tag).await;
                    print_result(&result);
                    report.workloads.push(result);
                }
            }
            "share" => {
                anyhow::ensure!(
                    args.url.len() >= 2,
                    "the share workload needs two --url (two servers on one store)"
                );
                let result = run_share(&http, &args, &text, tag).await?;
                println!(
                    "share: {} -> {}: memory hit {:.3} s, store hit {:.3} s, median ratio {:.2}x ({} prompt tokens)",
                    result.first_url,
                    result.second_url,
                    median(&result.first_memory_hit_ttft_s),
                    median(&result.second_store_hit_ttft_s),
                    result.median_ratio_store_to_memory,
                    result.prompt_tokens
                );
                report.share = Some(result);
            }
            other => anyhow::bail!("unknown workload `{other}` (chat, rag, share)"),
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs, {model}")
}

fn print_result(r: &WorkloadResult) {
    println!(
        "{:<5} {:<28} plugin={:<5} requests {:>3} (errors {}), TTFT p50 {:.3} s p90 {:.3} s{}, {:.2} req/min{}",
        r.workload,
        r.url,
        r.plugin,
        r.requests,
        r.errors,
        r.ttft_p50_s,
        r.ttft_p90_s,
        r.unseen_ttft_p50_s
            .map_or(String::new(), |t| format!(", unseen p50 {t:.3} s")),
        r.requests_per_min,
        r.cached_tokens_mean
            .map_or(String::new(), |c| format!(", cached tokens mean {c:.0}")),
    );
}

async fn plugin_enabled(http: &reqwest::Client, url: &str) -> anyhow::Result<bool> {
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await
        .unwrap_or_default();
    // A server without our /metrics (stock mistral.rs) is stock.
    Ok(sample(&metrics, "kvplugin_plugin_enabled") == Some(1.0))
}

async fn counter(http: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<f64> {
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    sample(&metrics, name).ok_or_else(|| anyhow::anyhow!("{url}/metrics has no {name}"))
}

/// A slice of `text` of `chars` characters from `offset` (wrapping around), behind `tag`.
fn passage(text: &str, offset: usize, chars: usize, tag: &str) -> String {
    let all: Vec<char> = text.chars().collect();
    let body: String = (0..chars)
        .map(|i| all[(offset + i) % all.len().max(1)])
        .collect();
    format!("[{tag}]\n{body}")
}

/// A tiny deterministic generator (SplitMix64) for the passage draws.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `k` distinct indices below `n`.
    fn pick(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut picked = Vec::with_capacity(k);
        while picked.len() < k.min(n) {
            let i = (self.next() % n as u64) as usize;
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked
    }
}

/// The `rag` pool: `--rag-docs` passages of `--rag-doc-chars` characters, each behind its tag.
fn rag_pool(args: &ServeBenchArgs, text: &str, tag: &str) -> Vec<String> {
    (0..args.rag_docs)
        .map(|d| {
            passage(
                text,
                d * 2 * args.rag_doc_chars,
                args.rag_doc_chars,
                &format!("{tag} passage {d}"),
            )
        })
        .collect()
}

/// A `rag` request: the passages in the system message (between blend separators for a plugin
/// server, the same text without them for a stock one), then the question.
fn rag_messages(passages: &[&String], plugin: bool, question: &str) -> Value {
    let sep = if plugin { DEFAULT_SEPARATOR } else { "" };
    let mut system = String::from("Answer the question from these passages.\n\n");
    for passage in passages {
        system.push_str(sep);
        system.push_str(passage);
        system.push_str("\n\n");
    }
    system.push_str(sep);
    json!([
        {"role": "system", "content": system},
        {"role": "user", "content": question}
    ])
}

/// The messages of every `rag` request of one client, in order: three passages of the pool,
/// then a question.
fn rag_requests(
    args: &ServeBenchArgs,
    text: &str,
    tag: &str,
    plugin: bool,
    client: usize,
) -> Vec<Value> {
    let pool = rag_pool(args, text, tag);
    let mut draws = Draws(args.seed ^ (client as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
    (0..args.rag_requests)
        .map(|r| {
            let picked: Vec<&String> = draws
                .pick(pool.len(), 3)
                .into_iter()
                .map(|d| &pool[d])
                .collect();
            rag_messages(&picked, plugin, QUESTIONS[(client + r) % QUESTIONS.len()])
        })
        .collect()
}

async fn run_clients(
    http: &reqwest::Client,
    url: &str,
    plugin: bool,
    workload: &str,
    args: &ServeBenchArgs,
    text: &str,
    tag: u128,
) -> WorkloadResult {
    let per_client = if workload == "chat" {
        args.rounds
    } else {
        args.rag_requests
    };
    let warmup_s = if workload == "rag" && args.rag_warmup {
        Some(rag_warmup(http, url, plugin, args, text, &format!("run {tag}")).await)
    } else {
        None
    };
    let bar = super::progress_bar(
        (args.clients * per_client) as u64,
        &format!("{workload} {url}"),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.clients)
        .map(|client| {
            let http = http.clone();
            let url = url.to_string();
            let bar = bar.clone();
            let run_tag = format!("run {tag} client {client}");
            let work: ClientWork = if workload == "chat" {
                ClientWork::Chat {
                    document: passage(text, client * args.doc_chars, args.doc_chars, &run_tag),
                    rounds: args.rounds,
                }
            } else {
                ClientWork::Rag(rag_requests(
                    args,
                    text,
                    &format!("run {tag}"),
                    plugin,
                    client,
                ))
            };
            let max_tokens = args.max_tokens;
            tokio::spawn(async move { client_loop(&http, &url, work, max_tokens, &bar).await })
        })
        .collect();
    let mut timed = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok((t, e)) => {
                timed.extend(t);
                errors.extend(e);
            }
            Err(e) => errors.push(format!("client task: {e}")),
        }
    }
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    let ttfts: Vec<f64> = timed.iter().map(|t| t.ttft_s).collect();
    let unseen: Vec<f64> = timed
        .iter()
        .filter(|t| t.round == 1)
        .map(|t| t.ttft_s)
        .collect();
    let cached: Vec<f64> = timed
        .iter()
        .filter_map(|t| t.cached_tokens.map(|c| c as f64))
        .collect();
    WorkloadResult {
        url: url.to_string(),
        plugin,
        workload: workload.to_string(),
        requests: timed.len(),
        errors: errors.len(),
        first_error: errors.first().cloned(),
        ttft_p50_s: if ttfts.is_empty() {
            0.0
        } else {
            median(&ttfts)
        },
        ttft_p90_s: if ttfts.is_empty() {
            0.0
        } else {
            percentile(&ttfts, 0.9)
        },
        unseen_ttft_p50_s: (workload == "chat" && !unseen.is_empty()).then(|| median(&unseen)),
        requests_per_min: timed.len() as f64 * 60.0 / wall_s.max(1e-9),
        cached_tokens_mean: (!cached.is_empty()).then(|| super::mean(&cached)),
        wall_s,
        warmup_s,
    }
}

/// `rag`'s warm-up (see `--rag-warmup`): every passage of the pool once, alone, then a
/// question, one request at a time. Failures here are not counted; the timed run reports its own.
/// Returns the seconds it took.
async fn rag_warmup(
    http: &reqwest::Client,
    url: &str,
    plugin: bool,
    args: &ServeBenchArgs,
    text: &str,
    tag: &str,
) -> f64 {
    let started = Instant::now();
    let pool = rag_pool(args, text, tag);
    let bar = super::progress_bar(pool.len() as u64, &format!("rag warm-up {url}"));
    for (d, passage) in pool.iter().enumerate() {
        let messages = rag_messages(&[passage], plugin, QUESTIONS[d % QUESTIONS.len()]);
        if let Err(e) = chat(http, url, &messages, args.max_tokens).await {
            tracing::warn!(error = %e, "bench serve: a warm-up request failed");
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    started.elapsed().as_secs_f64()
}

enum ClientWork {
    Chat { document: String, rounds: usize },
    Rag(Vec<Value>),
}

async fn client_loop(
    http: &reqwest::Client,
    url: &str,
    work: ClientWork,
    max_tokens: usize,
    bar: &ProgressBar,
) -> (Vec<Timed>, Vec<String>) {
    let mut timed = Vec::new();
    let mut errors = Vec::new();
    match work {
        ClientWork::Chat { document, rounds } => {
            let mut messages = vec![json!({
                "role": "system",
                "content": format!("Answer questions about this document.\n\n{document}")
            })];
            for round in 1..=rounds {
                messages.push(
                    json!({"role": "user", "content": QUESTIONS[(round - 1) % QUESTIONS.len()]}),
                );
                match chat(http, url, &Value::Array(messages.clone()), max_tokens).await {
                    Ok(mut t) => {
                        t.round = round;
                        messages.push(json!({"role": "assistant", "content": t.text}));
                        timed.push(t);
                    }
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
                bar.inc(1);
            }
        }
        ClientWork::Rag(requests) => {
            for messages in requests {
                match chat(http, url, &messages, max_tokens).await {
                    Ok(t) => timed.push(t),
                    Err(e) => errors.push(e.to_string()),
                }
                bar.inc(1);
            }
        }
    }
    (timed, errors)
}

/// One streamed, greedy chat request: TTFT at the first content chunk; usage from the last.
async fn chat(
    http: &reqwest::Client,
    url: &str,
    messages: &Value,
    max_tokens: usize,
) -> anyhow::Result<Timed> {
    let body = json!({
        "model": "default",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let mut response = http
        .post(format!("{url}/v1/chat/completions"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "HTTP {}: {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    let mut buffer = Vec::new();
    let mut ttft = None;
    let mut text = String::new();
    let mut usage = None;
    while let Some(bytes) = response.chunk().await? {
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event);
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(value) = serde_json::from_str::<Value>(data) else {
                    anyhow::bail!("the server sent an error in the stream: {data}");
                };
                if let Some(delta) = value["choices"][0]["delta"]["content"].as_str() {
                    if !delta.is_empty() {
                        ttft.get_or_insert_with(|| started.elapsed());
                        text.push_str(delta);
                    }
                }
                if value["usage"].is_object() {
                    usage = Some(value["usage"].clone());
                }
            }
        }
    }
    let total = started.elapsed();
    let usage = usage.ok_or_else(|| anyhow::anyhow!("the stream ended without usage"))?;
    Ok(Timed {
        ttft_s: ttft.unwrap_or(total).as_secs_f64(),
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"].as_u64(),
        round: 0,
        text,
    })
}

/// Saves that ended on a server: written, failed or dropped.
async fn settled_saves(http: &reqwest::Client, url: &str) -> anyhow::Result<f64> {
    Ok(counter(http, url, "kvplugin_saves_total").await?
        + counter(http, url, "kvplugin_save_failures_total").await?
        + counter(http, url, "kvplugin_dropped_saves_total").await?)
}

async fn run_share(
    http: &reqwest::Client,
    args: &ServeBenchArgs,
    text: &str,
    tag: u128,
) -> anyhow::Result<ShareResult> {
    let (first, second) = (&args.url[0], &args.url[1]);
    anyhow::ensure!(
        plugin_enabled(http, first).await? && plugin_enabled(http, second).await?,
        "share needs two servers with the plugin on one store"
    );
    let ask = |document: &str, question: &str| {
        json!([
            {"role": "system", "content": format!("Answer questions about this document.\n\n{document}")},
            {"role": "user", "content": question}
        ])
    };
    let bar = super::progress_bar(3 * args.reps as u64, "share");
    let mut result = ShareResult {
        first_url: first.clone(),
        second_url: second.clone(),
        prompt_tokens: 0,
        first_cold_ttft_s: Vec::new(),
        first_memory_hit_ttft_s: Vec::new(),
        second_store_hit_ttft_s: Vec::new(),
        second_cached_tokens: Vec::new(),
        median_ratio_store_to_memory: 0.0,
    };
    let mut ratios = Vec::new();
    for rep in 0..args.reps {
        let document = passage(
            text,
            0,
            args.share_doc_chars,
            &format!("run {tag} share {rep}"),
        );
        let saves_before = settled_saves(http, first).await?;
        let cold = chat(http, first, &ask(&document, QUESTIONS[0]), args.max_tokens).await?;
        bar.inc(1);
        let memory = chat(http, first, &ask(&document, QUESTIONS[1]), args.max_tokens).await?;
        bar.inc(1);
        // Both answers' saves have ended (written, failed or dropped): the document's chunks
        // are in the store unless a save failed, which the second server then shows as a miss.
        let deadline = Instant::now() + Duration::from_secs(300);
        while settled_saves(http, first).await? < saves_before + 2.0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{first} did not save within 300 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let store = chat(http, second, &ask(&document, QUESTIONS[1]), args.max_tokens).await?;
        bar.inc(1);
        result.prompt_tokens = store.prompt_tokens;
        ratios.push(store.ttft_s / memory.ttft_s.max(1e-9));
        result.first_cold_ttft_s.push(cold.ttft_s);
        result.first_memory_hit_ttft_s.push(memory.ttft_s);
        result.second_store_hit_ttft_s.push(store.ttft_s);
        result.second_cached_tokens.push(store.cached_tokens);
    }
    bar.finish_and_clear();
    result.median_ratio_store_to_memory = median(&ratios);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_distinct_and_repeatable() {
        let mut a = Draws(7);
        let mut b = Draws(7);
        let x = a.pick(8, 3);
        assert_eq!(x, b.pick(8, 3));
        assert_eq!(x.len(), 3);
        assert!(x.iter().all(|&i| i < 8));
        assert!(x[0] != x[1] && x[1] != x[2] && x[0] != x[2]);
        assert_eq!(a.pick(2, 3).len(), 2, "never more than the pool");
    }

    #[test]
    fn passages_wrap_and_carry_their_tag() {
        assert_eq!(passage("abc", 2, 4, "t"), "[t]\ncabc");
    }
}
