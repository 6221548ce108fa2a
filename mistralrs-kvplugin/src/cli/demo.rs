//! `kvplugin demo`: the main job, end to end on the real model.
//!
//! A stock engine answers question 1 and then question 2 on a long document (the second is its
//! in-memory prefix hit). Then plugin engine 1 answers question 1 from cold and saves the cache,
//! chunked and compressed, to a local-disk store (lossless, and at a lossy level too); a fresh
//! plugin engine 2, sharing only that folder, answers question 2 with an exact store hit, and a
//! fresh engine 3 answers it from the lossy chunks: side by side, what the bytes saved cost in
//! TTFT and answers. Answers are compared with the stock engine's.
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
    store::{durable::SyncedLocal, layout::ObjectName, ObjectPrefixStore, ObjectStoreConfig},
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
    /// Codec level of engine 2's hit (the store's default: `lossless`, a hit that answers as a
    /// miss does).
    #[arg(long, default_value = "lossless")]
    level: String,
    /// A lossy level for engine 3's hit, shown next to the exact one (`none`: no engine 3).
    #[arg(long, default_value = "high")]
    lossy_level: String,
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
    /// The level of engine 2's hit (`ttft_hit_s`, `bytes_stored`, `answers_match_stock`).
    level: &'static str,
    /// Engine 3's hit from lossy chunks, if one was asked for.
    lossy: Option<LossyHit>,
}

#[derive(Debug, Serialize)]
struct LossyHit {
    level: &'static str,
    ttft_hit_s: f64,
    prefilled_tokens_hit: usize,
    /// The prefix's objects at this level (its full chunks, and the lossless tail).
    bytes_stored: u64,
    answers_match_stock: bool,
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
    let lossy_level = match args.lossy_level.as_str() {
        "none" => None,
        name => Some(
            Level::from_name(name)
                .filter(|l| *l != Level::Lossless)
                .ok_or_else(|| anyhow::anyhow!("--lossy-level `{name}` is not a lossy level"))?,
        ),
    };
    if args.store.exists() {
        std::fs::remove_dir_all(&args.store)?;
    }
    std::fs::create_dir_all(&args.store)?;
    let backend: Arc<dyn object_store::ObjectStore> = Arc::new(SyncedLocal::new(
        object_store::local::LocalFileSystem::new_with_prefix(&args.store)?,
    ));
    // One store writes every level at once; each reader loads at its own.
    let store_at = |level: Level, extra: Vec<Level>| -> anyhow::Result<Arc<ObjectPrefixStore>> {
        Ok(Arc::new(ObjectPrefixStore::new(
            backend.clone(),
            ObjectStoreConfig {
                level,
                extra_levels: extra,
                ..Default::default()
            },
        )?))
    };
    let store = store_at(level, lossy_level.into_iter().collect())?;
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
    let sizes = bytes_by_level(backend.as_ref()).await?;
    let size_at = |l: Level| sizes.chunks.get(l.name()).copied().unwrap_or(0) + sizes.tails;

    let ask = |n: usize, store: Arc<ObjectPrefixStore>, level: Level| {
        let options = options();
        let prompt = prompt_2.clone();
        let max_new = args.document.max_new_tokens;
        async move {
            println!(
                "== plugin engine {n} (fresh, shares only the store): question 2, {} chunks",
                level.name()
            );
            let hook = Arc::new(KvPluginHook::new(store, HookConfig::default()));
            let engine = LocalEngine::start(options.with_kv_hook(hook.clone())).await?;
            let hit = engine.complete(&prompt, max_new).await?;
            let finished = hook.wait_for_finished(prompt.len(), WAIT).await?;
            println!(
                "   TTFT {:.2} s: {}",
                hit.ttft.as_secs_f64(),
                hit.text.trim()
            );
            let prefilled = (finished.last_prompt_tokens - finished.last_reused_tokens) as usize;
            anyhow::Ok((hit, prefilled))
        }
    };
    let (hit, prefilled) = ask(2, store.clone(), level).await?;
    let lossy = match lossy_level {
        Some(lossy_level) => {
            let (lossy_hit, prefilled) =
                ask(3, store_at(lossy_level, Vec::new())?, lossy_level).await?;
            Some(LossyHit {
                level: lossy_level.name(),
                ttft_hit_s: lossy_hit.ttft.as_secs_f64(),
                prefilled_tokens_hit: prefilled,
                bytes_stored: size_at(lossy_level),
                answers_match_stock: lossy_hit.text == stock_2.text,
            })
        }
        None => None,
    };
    println!("   stock answer: {}", stock_2.text.trim());

    let bytes_raw = store
        .counters()
        .raw_16bit_bytes_written
        .load(std::sync::atomic::Ordering::Relaxed);
    let report = DemoReport {
        prompt_tokens: prompt_2.len(),
        ttft_cold_s: cold.ttft.as_secs_f64(),
        ttft_hit_s: hit.ttft.as_secs_f64(),
        ttft_memory_hit_s: stock_2.ttft.as_secs_f64(),
        prefilled_tokens_hit: prefilled,
        // Counted once per level written: the 16-bit size of the prefix itself.
        bytes_raw_16bit: bytes_raw / (1 + lossy_level.is_some() as u64),
        bytes_stored: size_at(level),
        answers_match_stock: hit.text == stock_2.text,
        paged: args.paged,
        level: level.name(),
        lossy,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Object bytes in a store: full chunks per level, and tails (written once, lossless).
struct StoredBytes {
    chunks: std::collections::HashMap<&'static str, u64>,
    tails: u64,
}

async fn bytes_by_level(backend: &dyn object_store::ObjectStore) -> anyhow::Result<StoredBytes> {
    use futures::TryStreamExt;
    let mut sizes = StoredBytes {
        chunks: Default::default(),
        tails: 0,
    };
    let objects: Vec<_> = backend.list(None).try_collect().await?;
    for object in objects {
        let Some(name) = object.location.filename().and_then(ObjectName::parse) else {
            continue;
        };
        match name {
            ObjectName::Chunk { level, .. } => {
                *sizes.chunks.entry(level.name()).or_default() += object.size
            }
            ObjectName::Tail { .. } => sizes.tails += object.size,
        }
    }
    Ok(sizes)
}
