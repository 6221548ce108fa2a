//! `kvplugin demo`: the main job, end to end on the real model.
//!
//! A stock engine answers question 1 and then question 2 on a long document (the second is its
//! in-memory prefix hit). Then plugin engine 1 answers question 1 from cold and saves the cache,
//! chunked and compressed, to a local-disk store; a fresh plugin engine 2, sharing only that
//! folder, answers question 2 with a store hit. Its answer is compared with the stock engine's.
//! The demo starts from an empty store folder (it deletes its own folder first). With `--paged`
//! every engine runs PagedAttention (the block manager): the stock engine's second answer is its
//! own block prefix hit, and the store hit is installed into blocks.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use serde::Serialize;

use crate::{
    codec::Level,
    corpus,
    engine::{document_prompt, EngineOptions, LocalEngine, PagedOptions},
    hook::{HookConfig, KvPluginHook},
    model,
    store::{ObjectPrefixStore, ObjectStoreConfig},
};

/// Arguments of `kvplugin demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    document: super::DocumentArgs,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The model: `gguf` (the shipped Q4_1 GGUF) or `hf` (its F32 Hugging Face conversion).
    #[arg(long, default_value = "hf")]
    model: String,
    /// The store folder (emptied first).
    #[arg(long, default_value = ".kvplugin/demo-store")]
    store: PathBuf,
    /// Codec level of the stored chunks (the store's default: `high`).
    #[arg(long, default_value = "high")]
    level: String,
    /// Run every engine with PagedAttention (the engine's block manager) on the CPU.
    #[arg(long)]
    paged: bool,
    /// Tokens per block with `--paged` (8, 16 or 32).
    #[arg(long, default_value_t = 32)]
    block_size: usize,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    prompt_tokens: usize,
    ttft_cold_s: f64,
    ttft_hit_s: f64,
    ttft_memory_hit_s: f64,
    prefilled_tokens_hit: usize,
    bytes_raw_16bit: u64,
    bytes_stored: u64,
    answers_match_stock: bool,
    paged: bool,
}

/// How long the demo waits for a save or a finished sequence to be reported.
const WAIT: Duration = Duration::from_secs(60);

pub(crate) const QUESTION_1: &str =
    "What does this license say about distributing copies of the program?";
pub(crate) const QUESTION_2: &str = "What does this license say about warranty?";

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> anyhow::Result<()> {
    let source = model::shipped_source(&args.model)?;
    let text = corpus::text_or_default(args.document.text.as_deref())?;
    let paged = args.paged.then(|| {
        PagedOptions::room_for(
            args.document.tokens + args.document.max_new_tokens,
            args.block_size,
        )
    });
    let options = || EngineOptions {
        paged,
        ..EngineOptions::new(source.clone())
    };

    if args.paged {
        println!("== stock engine (no plugin, paged): cold, then its own block prefix hit");
    } else {
        println!("== stock engine (no plugin): cold, then an in-memory prefix hit");
    }
    let stock = LocalEngine::start(options()).await?;
    let document = stock.truncate_to_tokens(&text, args.document.tokens)?;
    let prompt_1 = stock.encode(&document_prompt(&document, QUESTION_1))?;
    let prompt_2 = stock.encode(&document_prompt(&document, QUESTION_2))?;
    let stock_1 = stock
        .complete(&prompt_1, args.document.max_new_tokens)
        .await?;
    let stock_2 = stock
        .complete(&prompt_2, args.document.max_new_tokens)
        .await?;
    println!(
        "   cold TTFT {:.2} s, memory-hit TTFT {:.2} s ({} prompt tokens)",
        stock_1.ttft.as_secs_f64(),
        stock_2.ttft.as_secs_f64(),
        prompt_2.len()
    );
    drop(stock);

    let level = Level::from_name(&args.level)
        .ok_or_else(|| anyhow::anyhow!("unknown --level `{}`", args.level))?;
    if args.store.exists() {
        std::fs::remove_dir_all(&args.store)?;
    }
    std::fs::create_dir_all(&args.store)?;
    let backend = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
        &args.store,
    )?);
    let store = Arc::new(ObjectPrefixStore::new(
        backend,
        ObjectStoreConfig {
            level,
            ..Default::default()
        },
    )?);
    println!("== plugin engine 1: question 1 from cold, cache saved to the store");
    let hook_1 = Arc::new(KvPluginHook::new(store.clone(), HookConfig::default()));
    let engine_1 = LocalEngine::start(options().with_kv_hook(hook_1.clone())).await?;
    let cold = engine_1
        .complete(&prompt_1, args.document.max_new_tokens)
        .await?;
    hook_1.wait_for_saves(1, WAIT).await?;
    println!(
        "   TTFT {:.2} s: {}",
        cold.ttft.as_secs_f64(),
        cold.text.trim()
    );
    drop(engine_1);

    println!("== plugin engine 2 (fresh, shares only the store): question 2");
    let hook_2 = Arc::new(KvPluginHook::new(store.clone(), HookConfig::default()));
    let engine_2 = LocalEngine::start(options().with_kv_hook(hook_2.clone())).await?;
    let hit = engine_2
        .complete(&prompt_2, args.document.max_new_tokens)
        .await?;
    let finished = hook_2.wait_for_finished(prompt_2.len(), WAIT).await?;
    let prefilled = finished.last_prompt_tokens - finished.last_reused_tokens;
    println!(
        "   TTFT {:.2} s: {}",
        hit.ttft.as_secs_f64(),
        hit.text.trim()
    );
    println!("   stock answer: {}", stock_2.text.trim());

    let counters = store.counters();
    let bytes_stored = counters
        .bytes_written
        .load(std::sync::atomic::Ordering::Relaxed);
    let bytes_raw = counters
        .raw_16bit_bytes_written
        .load(std::sync::atomic::Ordering::Relaxed);
    let report = DemoReport {
        prompt_tokens: prompt_2.len(),
        ttft_cold_s: cold.ttft.as_secs_f64(),
        ttft_hit_s: hit.ttft.as_secs_f64(),
        ttft_memory_hit_s: stock_2.ttft.as_secs_f64(),
        prefilled_tokens_hit: prefilled as usize,
        bytes_raw_16bit: bytes_raw,
        bytes_stored,
        answers_match_stock: hit.text == stock_2.text,
        paged: args.paged,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
