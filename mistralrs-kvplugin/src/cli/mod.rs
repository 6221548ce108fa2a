//! The `kvplugin` command line: argument parsing and the subcommands.

mod ask;
mod demo;
mod serve;
mod store;

pub(crate) use demo::{QUESTION_1, QUESTION_2};

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::model;

/// The document questions are asked about, and the answers' length (`demo` and `ask`).
#[derive(Debug, clap::Args)]
pub(crate) struct DocumentArgs {
    /// The document [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the document to use.
    #[arg(long, default_value_t = 3000)]
    tokens: usize,
    /// Tokens to generate per answer.
    #[arg(long, default_value_t = 40)]
    max_new_tokens: usize,
}

/// KV-cache offload and reuse for mistral.rs.
#[derive(Debug, Parser)]
#[command(name = "kvplugin", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert the shipped GGUF into a Hugging Face style folder (config.json, model.safetensors,
    /// tokenizer.json).
    Convert {
        /// The GGUF file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf].
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// The output folder [default: models/SmolLM2-135M-Instruct-f32].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Weight dtype: f32 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// The main job: engine 1 answers a question about a long document from cold and stores the
    /// cache; a fresh engine 2 answers another question on the same document with a store hit.
    Demo(demo::DemoArgs),
    /// One engine process answers one question about a document, with the plugin configured
    /// from a TOML file (or stock, without it); prints the answer and the plugin's counters.
    Ask(ask::AskArgs),
    /// An OpenAI-compatible server (mistral.rs's routes) with the plugin: chat and completions
    /// reuse stored caches, `/metrics` for Prometheus, blending of prompts with separators.
    Serve(serve::ServeArgs),
    /// What a store holds, removal by model, garbage collection by age and size.
    Store(store::StoreArgs),
    /// Benchmarks on the real model.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Quality evaluations on the real model.
    #[command(subcommand)]
    Eval(EvalCommand),
}

#[derive(Debug, Subcommand)]
enum EvalCommand {
    /// RAG questions with documents cached separately: full prefill, reuse and CacheBlend at
    /// several ratios (TTFT, token F1, exact match, agreement with full prefill).
    BlendQa(crate::bench::blend::EvalBlendArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The codec's levels against zstd, 8-bit, KIVI 2-bit and LMCache's CacheGen on real KV.
    Codec(crate::bench::codec::CodecBenchArgs),
    /// Time to first token against context length: stock full prefill, stock in-memory prefix
    /// hit, and a store hit per codec level from each store given.
    Offload(crate::bench::offload::OffloadBenchArgs),
    /// PagedAttention on the CPU against the non-paged path: full prefill, the engine's own
    /// prefix hit and decode speed per context length, and whether the answers are the same.
    Paged(crate::bench::paged::PagedBenchArgs),
    /// Replays bandwidth traces: the adaptive loader against each fixed level, always-lossless
    /// and always-text (violation rate, TTFT mean and p90, perplexity change, greedy agreement).
    Stream(crate::bench::stream::StreamBenchArgs),
    /// Workloads over HTTP against running servers (`kvplugin serve`, `--no-plugin`): a
    /// multi-round long-document chat and RAG questions from concurrent clients, and two servers
    /// sharing a store (TTFT p50/p90, requests per minute).
    Serve(crate::bench::serve::ServeBenchArgs),
    /// CacheBlend: TTFT and throughput of full prefill, prefix caching, reuse and blend on RAG
    /// prompts, and the selection diagnostics (attention deviation against the ratio, rank
    /// correlation of deviations between layers).
    Blend(crate::bench::blend::BlendBenchArgs),
    /// The fault matrix: the real engine and model against each store with a failure in it
    /// (server down or silent, slow, corrupt, truncated, hostile or planted objects, full
    /// disk, wrong credentials, bad prompts, ...): answers against stock, lost requests, TTFT.
    Faults(crate::bench::faults::FaultsBenchArgs),
    /// Many concurrent sessions of long prompts (store hits and misses) on one engine: lost
    /// requests, wrong answers, TTFT p50/p99, peak memory beside the lookup memory budget.
    Load(crate::bench::load::LoadBenchArgs),
}

/// Runs the command line; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Convert { gguf, out, dtype } => convert(gguf, out, &dtype),
        Command::Demo(args) => demo::run(args),
        Command::Ask(args) => ask::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Store(args) => store::run(args),
        Command::Bench(BenchCommand::Codec(args)) => crate::bench::codec::run(args),
        Command::Bench(BenchCommand::Offload(args)) => crate::bench::offload::run(args),
        Command::Bench(BenchCommand::Paged(args)) => crate::bench::paged::run(args),
        Command::Bench(BenchCommand::Stream(args)) => crate::bench::stream::run(args),
        Command::Bench(BenchCommand::Blend(args)) => crate::bench::blend::run_bench(args),
        Command::Bench(BenchCommand::Serve(args)) => crate::bench::serve::run(args),
        Command::Bench(BenchCommand::Faults(args)) => crate::bench::faults::run(args),
        Command::Bench(BenchCommand::Load(args)) => crate::bench::load::run(args),
        Command::Eval(EvalCommand::BlendQa(args)) => crate::bench::blend::run_eval(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvplugin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,mistralrs_kvplugin=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn convert(gguf: Option<PathBuf>, out: Option<PathBuf>, dtype: &str) -> anyhow::Result<()> {
    let models = model::models_dir();
    let gguf = gguf.unwrap_or_else(|| model::smollm2_gguf(&models));
    let out = out.unwrap_or_else(|| model::smollm2_hf(&models));
    let dtype = match dtype {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        other => anyhow::bail!("--dtype must be f32 or f16, not `{other}`"),
    };
    model::convert_gguf_to_hf(&gguf, &out, dtype)?;
    println!("wrote {}", out.display());
    Ok(())
}
