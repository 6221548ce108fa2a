//! `kvplugin bench paged`: PagedAttention on the CPU (the engine patch's `paged-attn-cpu`) against
//! the non-paged path: full prefill, the engine's own prefix hit, and decode speed, per context
//! length, as medians of several runs; and whether both paths give the same greedy answer.
//!
//! Method, per context length and repetition, the two engines interleaved (this machine's speed
//! drifts from minute to minute; interleaving spreads the drift over both):
//! 1. A document of that many tokens behind a line naming the run (no two runs share a prefix)
//!    and a question on it.
//! 2. On each engine: the prompt from cold (its time to first token is the full prefill; the
//!    time per token after the first is the decode speed), then a second question on the same
//!    document (the engine's own prefix cache serves the document: the non-paged sequence cache,
//!    or the paged block pool, which serves whole blocks and recomputes from the block where the
//!    questions part). The same prompt twice would not do: when a cached sequence covers every
//!    token of the prompt, 0.8.1's non-paged cache (`PrefixCacheManagerV2`) finds nothing left
//!    to compute and answers a miss instead of backing off one token.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use serde::Serialize;

use super::Say;
use crate::{
    cli::{QUESTION_1, QUESTION_2},
    corpus,
    engine::{chat_prompt, EngineOptions, Generation, LocalEngine, ModelSource, PagedOptions},
    model,
};

/// Arguments of `kvplugin bench paged`.
#[derive(Debug, Args)]
pub struct PagedBenchArgs {
    /// Document lengths in tokens, comma-separated.
    #[arg(long, default_value = "512,2048,4096", value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Tokens generated per answer (the decode speed is measured over them).
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Tokens per block of the paged engine (8, 16 or 32).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
    /// The model: a GGUF file or a converted folder [default: the converted SmolLM2 folder].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One path's figures at one context length (medians).
#[derive(Debug, Serialize)]
struct PathResult {
    prefill_s: f64,
    prefix_hit_s: f64,
    decode_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct ContextResult {
    prompt_tokens: usize,
    non_paged: PathResult,
    paged: PathResult,
    /// Paged time over non-paged time (prefill), and paged speed over non-paged speed (decode).
    paged_prefill_time_ratio: f64,
    paged_decode_speed_ratio: f64,
    /// Runs whose paged answer had the non-paged answer's tokens, cold and from the prefix cache.
    answers_match: usize,
    runs: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    reps: usize,
    block_size: usize,
    decode_tokens: usize,
    contexts: Vec<ContextResult>,
}

/// Every run's raw figures on one path.
#[derive(Default)]
struct Samples {
    prefill: Vec<f64>,
    hit: Vec<f64>,
    decode: Vec<f64>,
}

impl Samples {
    fn add(&mut self, cold: &Generation, hit: &Generation) {
        self.prefill.push(cold.ttft.as_secs_f64());
        self.hit.push(hit.ttft.as_secs_f64());
        if let Some(speed) = decode_speed(cold) {
            self.decode.push(speed);
        }
    }

    fn result(&self) -> PathResult {
        PathResult {
            prefill_s: super::median(&self.prefill),
            prefix_hit_s: super::median(&self.hit),
            decode_tokens_per_s: if self.decode.is_empty() {
                0.0
            } else {
                super::median(&self.decode)
            },
        }
    }
}

/// Tokens per second after the first one (`None` for an answer of one token).
fn decode_speed(generation: &Generation) -> Option<f64> {
    let tokens = generation.token_ids.len();
    let decode: Duration = generation.total.checked_sub(generation.ttft)?;
    (tokens > 1 && !decode.is_zero()).then(|| (tokens - 1) as f64 / decode.as_secs_f64())
}

/// Runs the benchmark.
pub fn run(args: PagedBenchArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: PagedBenchArgs) -> anyhow::Result<()> {
    if args.reps == 0 || args.contexts.is_empty() || args.decode_tokens == 0 {
        anyhow::bail!("--reps, --contexts and --decode-tokens must not be empty or zero");
    }
    let source = match &args.model {
        Some(path) if path.is_file() => ModelSource::Gguf(path.clone()),
        Some(path) => ModelSource::HfDir(path.clone()),
        None => ModelSource::HfDir(model::smollm2_hf(&model::models_dir())),
    };
    let text = corpus::text_or_default(args.text.as_deref())?;
    let longest = *args.contexts.iter().max().expect("not empty");
    let non_paged = LocalEngine::start(EngineOptions::new(source.clone())).await?;
    let paged = LocalEngine::start(EngineOptions {
        paged: Some(PagedOptions::room_for(
            longest + args.decode_tokens,
            args.block_size,
        )),
        ..EngineOptions::new(source.clone())
    })
    .await?;

    let bar = super::progress_bar((args.contexts.len() * args.reps * 4) as u64, "bench paged");
    bar.say(format!(
        "{:>7} | {:>14} {:>14} | {:>12} {:>12} | {:>13} {:>13} | same answer",
        "tokens", "prefill s", "(paged)", "hit s", "(paged)", "decode tok/s", "(paged)"
    ));
    let mut contexts = Vec::new();
    for &context in &args.contexts {
        let document = non_paged.truncate_to_tokens(&text, context)?;
        let (mut flat, mut blocks) = (Samples::default(), Samples::default());
        let mut answers_match = 0;
        let mut prompt_tokens = 0;
        for rep in 0..args.reps {
            let system = format!(
                "Run {rep} of the {context}-token paged measurement. Answer questions about this document.\n\n{document}"
            );
            let prompt = non_paged.encode(&chat_prompt(&system, QUESTION_1))?;
            let follow_up = non_paged.encode(&chat_prompt(&system, QUESTION_2))?;
            prompt_tokens = prompt.len();
            let mut answers = Vec::new();
            for (engine, samples) in [(&non_paged, &mut flat), (&paged, &mut blocks)] {
                let cold = engine.complete(&prompt, args.decode_tokens).await?;
                bar.inc(1);
                let hit = engine.complete(&follow_up, args.decode_tokens).await?;
                bar.inc(1);
                samples.add(&cold, &hit);
                answers.push((cold.token_ids, hit.token_ids));
            }
            if answers[0].0 == answers[1].0 && answers[0].1 == answers[1].1 {
                answers_match += 1;
            }
        }
        let (flat, blocks) = (flat.result(), blocks.result());
        bar.say(format!(
            "{prompt_tokens:>7} | {:>14.3} {:>14.3} | {:>12.3} {:>12.3} | {:>13.1} {:>13.1} | {answers_match}/{}",
            flat.prefill_s,
            blocks.prefill_s,
            flat.prefix_hit_s,
            blocks.prefix_hit_s,
            flat.decode_tokens_per_s,
            blocks.decode_tokens_per_s,
            args.reps
        ));
        contexts.push(ContextResult {
            prompt_tokens,
            paged_prefill_time_ratio: blocks.prefill_s / flat.prefill_s,
            paged_decode_speed_ratio: blocks.decode_tokens_per_s / flat.decode_tokens_per_s,
            non_paged: flat,
            paged: blocks,
            answers_match,
            runs: args.reps,
        });
    }
    bar.finish_and_clear();
    for c in &contexts {
        println!(
            "{} tokens: paged prefill {:.2}x the non-paged time, paged decode {:.2}x the non-paged speed",
            c.prompt_tokens, c.paged_prefill_time_ratio, c.paged_decode_speed_ratio
        );
    }
    if let Some(path) = &args.json {
        let report = Report {
            model: format!("{source:?}"),
            reps: args.reps,
            block_size: args.block_size,
            decode_tokens: args.decode_tokens,
            contexts,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
