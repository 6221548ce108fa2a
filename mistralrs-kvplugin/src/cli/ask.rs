//! `kvplugin ask`: one engine process answers one question about a document, with the plugin
//! configured from a TOML file and the environment (or without the plugin, for reference).
//!
//! It waits until the engine has reported the finished sequence and the hook has finished saving
//! its cache, so that when the process exits the store holds everything it will ever write for
//! this request: another process (or this one, restarted) can then hit it.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use serde::Serialize;

use crate::{
    config::PluginConfig,
    corpus,
    engine::{document_prompt, EngineOptions, LocalEngine, ModelSource},
    hook::KvPluginHook,
    metrics::MetricsSnapshot,
    model,
};

/// Arguments of `kvplugin ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question.
    #[arg(long)]
    question: String,
    /// The plugin's TOML config [default: the defaults, a store in .kvplugin/store]; the
    /// KVPLUGIN_* and AWS_* environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run stock mistral.rs, without the plugin.
    #[arg(long)]
    no_plugin: bool,
    #[command(flatten)]
    document: super::DocumentArgs,
    /// Write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What `kvplugin ask` reports.
#[derive(Debug, Serialize)]
struct AskReport {
    answer: String,
    answer_tokens: Vec<String>,
    prompt_tokens: usize,
    /// Prompt tokens that came from a cache instead of prefill (plugin only).
    reused_tokens: Option<u64>,
    ttft_s: f64,
    metrics: Option<MetricsSnapshot>,
}

/// How long to wait for the engine's report and the save.
const WAIT: Duration = Duration::from_secs(120);

/// Runs the command.
pub fn run(args: AskArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: AskArgs) -> anyhow::Result<()> {
    let source = ModelSource::HfDir(model::smollm2_hf(&model::models_dir()));
    let text = corpus::text_or_default(args.document.text.as_deref())?;
    let hook = if args.no_plugin {
        None
    } else {
        let config = match &args.config {
            Some(path) => PluginConfig::load(path)?,
            None => {
                let mut c = PluginConfig::default();
                c.apply_env(|k| std::env::var(k).ok())?;
                c
            }
        };
        let store = Arc::new(config.build_store()?);
        let hook_config = config.hook_config();
        Some((
            Arc::new(KvPluginHook::new(store, hook_config.clone())),
            hook_config,
        ))
    };
    let mut options = EngineOptions::new(source);
    if let Some((hook, _)) = &hook {
        options = options.with_kv_hook(hook.clone());
    }
    let engine = LocalEngine::start(options).await?;
    let document = engine.truncate_to_tokens(&text, args.document.tokens)?;
    let prompt = engine.encode(&document_prompt(&document, &args.question))?;
    let answer = engine
        .complete(&prompt, args.document.max_new_tokens)
        .await?;
    let metrics = match &hook {
        Some((hook, config)) => {
            let finished = hook.wait_for_finished(prompt.len(), WAIT).await?;
            // This is the engine's only request long enough to save (its warm-up request has
            // one token), and its save ends after the engine reports it finished.
            let saves = !config.read_only && prompt.len() >= config.min_prefix_tokens;
            Some(if saves {
                hook.wait_for_saves(1, WAIT).await?
            } else {
                finished
            })
        }
        None => None,
    };
    let report = AskReport {
        answer: answer.text.clone(),
        answer_tokens: answer.tokens.clone(),
        prompt_tokens: prompt.len(),
        reused_tokens: metrics.map(|m| m.last_reused_tokens),
        ttft_s: answer.ttft.as_secs_f64(),
        metrics,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}
