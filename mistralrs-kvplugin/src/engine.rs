//! Running the patched mistral.rs engine on a local model: what the tests, the demo and the
//! benchmarks drive.
//!
//! Always local and offline (`TokenSource::None`, model files from disk). Defaults to F32 on the
//! CPU: the engine's automatic dtype picks BF16 on CPUs that support it, which is 4-8x slower here.
//! Requests are sent as token ids so that what is compared across engines is exactly the same
//! prompt; generation is greedy (top-k 1).

use std::{
    num::NonZeroUsize,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use candle_core::Device;
use mistralrs_core::{
    Constraint, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig,
    IsqOrganization, KvHook, Loader, MemoryGpuConfig, MistralRs, MistralRsBuilder, ModelDType,
    NormalLoaderBuilder, NormalLoaderType, NormalRequest, NormalSpecificConfig,
    PagedAttentionConfig, PagedCacheType, Request, RequestMessage, Response, SamplingParams,
    SchedulerConfig, TokenSource,
};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A GGUF file (llama.cpp format), loaded with the engine's GGUF path (interleaved RoPE).
    Gguf(PathBuf),
    /// A Hugging Face style folder (`config.json`, `model.safetensors`, `tokenizer.json`), loaded
    /// with the engine's safetensors Llama path (neox RoPE).
    HfDir(PathBuf),
}

/// How to start a [`LocalEngine`].
#[derive(Clone)]
pub struct EngineOptions {
    /// The model.
    pub model: ModelSource,
    /// Activation and KV-cache dtype.
    pub dtype: ModelDType,
    /// The KV hook to register, if any.
    pub kv_hook: Option<Arc<dyn KvHook>>,
    /// Whether the engine keeps its own in-memory prefix cache.
    pub prefix_cache: bool,
    /// Sequences the scheduler runs at once.
    pub max_running: usize,
    /// Runs without a KV cache at all (every step recomputes; hooks are refused).
    pub no_kv_cache: bool,
    /// Prefixes the engine's own prefix cache keeps (`None`: mistral.rs's default, 16).
    pub prefix_cache_n: Option<usize>,
    /// The model's id in the engine (what OpenAI clients name in `model`); default: the model
    /// path.
    pub model_id: Option<String>,
    /// PagedAttention (the engine's block manager and block prefix cache) instead of one cache
    /// per sequence; `None`: the non-paged path.
    pub paged: Option<PagedOptions>,
}

/// The paged KV cache of an engine on the CPU (the engine patch's `paged-attn-cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedOptions {
    /// Tokens per block: 8, 16 or 32 (the engine's default, 32).
    pub block_size: usize,
    /// Tokens the block pool holds, every sequence together (rounded up to whole blocks). The
    /// pool is allocated up front: SmolLM2-135M in F32 takes 46,080 bytes per token.
    pub cache_tokens: usize,
}

impl PagedOptions {
    /// Blocks of `block_size` tokens and a pool for two sequences of up to `tokens` tokens each
    /// (prompt and answer) plus a margin for the chat template: room for one sequence running
    /// while the blocks of the one before stay in the pool for prefix hits.
    pub fn room_for(tokens: usize, block_size: usize) -> Self {
        Self {
            block_size,
            cache_tokens: (tokens + 512).next_multiple_of(block_size) * 2,
        }
    }
}

impl Default for PagedOptions {
    /// Blocks of 32 tokens, room for 16,384 tokens (720 MiB with SmolLM2-135M in F32).
    fn default() -> Self {
        Self {
            block_size: 32,
            cache_tokens: 16_384,
        }
    }
}

impl EngineOptions {
    /// F32, no hook, the engine's own prefix cache on, 4 sequences at once.
    pub fn new(model: ModelSource) -> Self {
        Self {
            model,
            dtype: ModelDType::F32,
            kv_hook: None,
            prefix_cache: true,
            max_running: 4,
            no_kv_cache: false,
            prefix_cache_n: None,
            model_id: None,
            paged: None,
        }
    }

    /// Registers `hook` with the engine.
    pub fn with_kv_hook(mut self, hook: Arc<dyn KvHook>) -> Self {
        self.kv_hook = Some(hook);
        self
    }
}

/// The result of one greedy generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text.
    pub text: String,
    /// The generated tokens, as the engine reports them (one string per token).
    pub tokens: Vec<String>,
    /// The generated token ids (`None` where the engine did not report one).
    pub token_ids: Vec<Option<u32>>,
    /// The "logprob" the engine reports for each generated token. For greedy sampling mistral.rs
    /// 0.8.1 reports log10 of the raw logit (NaN for a negative one), not a log-probability:
    /// equal values still mean equal logits, but differences are not probabilities.
    pub logprobs: Vec<f32>,
    /// Time from sending the request to the first generated token.
    pub ttft: Duration,
    /// Time from sending the request to the last token.
    pub total: Duration,
}

/// A running engine on a local model.
pub struct LocalEngine {
    runner: Arc<MistralRs>,
    tokenizer: Arc<Tokenizer>,
    next_id: AtomicUsize,
}

impl LocalEngine {
    /// Loads the model and starts the engine.
    pub async fn start(options: EngineOptions) -> Result<Self> {
        let (runner, tokenizer) = build_runner(options).await?;
        Ok(Self {
            runner,
            tokenizer,
            next_id: AtomicUsize::new(0),
        })
    }

    /// The engine's runner, for what this wrapper does not offer (other request kinds).
    pub fn runner(&self) -> &Arc<MistralRs> {
        &self.runner
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of `text`, special tokens written in it (such as `<|im_start|>`) included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Engine(anyhow::anyhow!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The first `n_tokens` tokens of `text`, as text (an error if it has fewer).
    pub fn truncate_to_tokens(&self, text: &str, n_tokens: usize) -> Result<String> {
        let ids = self.encode(text)?;
        if ids.len() < n_tokens {
            return Err(Error::Engine(anyhow::anyhow!(
                "the text has {} tokens, fewer than {n_tokens}",
                ids.len()
            )));
        }
        self.tokenizer
            .decode(&ids[..n_tokens], false)
            .map_err(|e| Error::Engine(anyhow::anyhow!("tokenizer: {e}")))
    }

    /// Greedy generation of at most `max_new_tokens` tokens after `prompt`.
    pub async fn complete(&self, prompt: &[u32], max_new_tokens: usize) -> Result<Generation> {
        self.submit(prompt, max_new_tokens).await?.finish().await
    }

    /// Sends a greedy request and returns at once; [`PendingCompletion::finish`] reads its answer.
    pub async fn submit(&self, prompt: &[u32], max_new_tokens: usize) -> Result<PendingCompletion> {
        let (request, pending) = self.request(prompt, max_new_tokens);
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| Error::Engine(anyhow::anyhow!("{e}")))?;
        sender
            .send(request)
            .await
            .map_err(|_| Error::Engine(anyhow::anyhow!("the engine stopped")))?;
        Ok(pending)
    }

    /// A greedy request of at most `max_new_tokens` tokens after `prompt`, and where its answer
    /// arrives, for a caller that sends it on a sender of its own; the clock starts now.
    pub fn request(&self, prompt: &[u32], max_new_tokens: usize) -> (Request, PendingCompletion) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut sampling = SamplingParams::deterministic();
        sampling.max_len = Some(max_new_tokens);
        // The most likely token is the greedy choice: its id comes back with the logprobs.
        sampling.top_n_logprobs = 1;
        let request = NormalRequest {
            messages: RequestMessage::CompletionTokens(prompt.to_vec()),
            sampling_params: sampling,
            response: tx,
            return_logprobs: true,
            is_streaming: true,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: None,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        };
        (
            Request::Normal(Box::new(request)),
            PendingCompletion {
                rx,
                start: Instant::now(),
            },
        )
    }
}

/// Loads the model and starts an engine on it: the runner that [`LocalEngine`] and
/// `kvplugin serve` drive, and the model's tokenizer.
pub async fn build_runner(options: EngineOptions) -> Result<(Arc<MistralRs>, Arc<Tokenizer>)> {
    let EngineOptions {
        model,
        dtype,
        kv_hook,
        prefix_cache,
        max_running,
        no_kv_cache,
        prefix_cache_n,
        model_id,
        paged,
    } = options;
    // A path that does not exist would be taken for a hub id: refuse it here instead.
    match &model {
        ModelSource::Gguf(path) | ModelSource::HfDir(path) => {
            crate::model::require_model(path)?;
        }
    }
    let loader: Box<dyn Loader> = match &model {
        ModelSource::Gguf(path) => {
            let (dir, file) = split_file(path)?;
            GGUFLoaderBuilder::new(
                None,
                None,
                dir,
                vec![file],
                GGUFSpecificConfig { topology: None },
                false,
                None,
            )
            .build()
        }
        ModelSource::HfDir(dir) => {
            let config = NormalSpecificConfig {
                topology: None,
                organization: IsqOrganization::Default,
                write_uqff: None,
                from_uqff: None,
                imatrix: None,
                calibration_file: None,
                hf_cache_path: None,
                matformer_config_path: None,
                matformer_slice_name: None,
            };
            NormalLoaderBuilder::new(
                config,
                None,
                None,
                Some(dir.display().to_string()),
                false,
                None,
            )
            .build(Some(NormalLoaderType::Llama))
            .map_err(Error::Engine)?
        }
    };
    let paged_config = paged
        .map(|paged| {
            PagedAttentionConfig::new(
                Some(paged.block_size),
                MemoryGpuConfig::ContextSize(paged.cache_tokens),
                PagedCacheType::Auto,
            )
        })
        .transpose()
        .map_err(Error::Engine)?;
    let pipeline = loader
        .load_model_from_hf(
            None,
            TokenSource::None,
            &dtype,
            &Device::Cpu,
            true,
            DeviceMapSetting::dummy(),
            None,
            paged_config,
        )
        .map_err(Error::Engine)?;
    let tokenizer = pipeline
        .lock()
        .await
        .tokenizer()
        .ok_or_else(|| Error::Engine(anyhow::anyhow!("the model has no tokenizer")))?;
    let max_running = NonZeroUsize::new(max_running.max(1)).expect("max(1) is non-zero");
    let cache_config = pipeline.lock().await.get_metadata().cache_config.clone();
    let scheduler = match (paged, cache_config) {
        (None, _) => SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_running),
        },
        (Some(_), Some(config)) => SchedulerConfig::PagedAttentionMeta {
            max_num_seqs: max_running.get(),
            config,
        },
        // The loader turns paged attention off for models and device mixes it cannot run:
        // never fall back silently to the other path.
        (Some(_), None) => {
            return Err(Error::Engine(anyhow::anyhow!(
                "the engine refused PagedAttention for this model (see its log)"
            )))
        }
    };
    let mut builder = MistralRsBuilder::new(pipeline, scheduler, false, None)
        .with_no_prefix_cache(!prefix_cache)
        .with_no_kv_cache(no_kv_cache);
    if let Some(hook) = kv_hook {
        builder = builder.with_kv_hook(hook);
    }
    if let Some(n) = prefix_cache_n {
        builder = builder.with_prefix_cache_n(n);
    }
    if let Some(id) = model_id {
        builder = builder.with_model_id(id);
    }
    Ok((builder.build().await, tokenizer))
}

/// A request sent with [`LocalEngine::submit`], not yet answered.
pub struct PendingCompletion {
    rx: tokio::sync::mpsc::Receiver<Response>,
    start: Instant,
}

impl PendingCompletion {
    /// Reads the streamed answer to its end. A channel that closes before the last chunk is an
    /// error: the engine dropped the request without answering it.
    pub async fn finish(self) -> Result<Generation> {
        let PendingCompletion { mut rx, start } = self;
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        let mut token_ids = Vec::new();
        let mut ttft = None;
        loop {
            match rx.recv().await {
                Some(Response::CompletionChunk(chunk)) => {
                    ttft.get_or_insert_with(|| start.elapsed());
                    let Some(choice) = chunk.choices.into_iter().next() else {
                        continue;
                    };
                    text.push_str(&choice.text);
                    if let Some(logprob) = choice.logprobs {
                        token_ids.push(logprob.top_logprobs.first().map(|top| top.token));
                        tokens.push(logprob.token);
                        logprobs.push(logprob.logprob);
                    }
                    if choice.finish_reason.is_some() {
                        break;
                    }
                }
                Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                    return Err(Error::Engine(anyhow::anyhow!("{e}")));
                }
                Some(Response::CompletionModelError(e, _)) => {
                    return Err(Error::Engine(anyhow::anyhow!("{e}")));
                }
                Some(_) => {
                    return Err(Error::Engine(anyhow::anyhow!("unexpected response kind")));
                }
                None => {
                    return Err(Error::Engine(anyhow::anyhow!(
                        "the engine dropped the request without a final response (lost request)"
                    )));
                }
            }
        }
        let total = start.elapsed();
        Ok(Generation {
            text,
            tokens,
            token_ids,
            logprobs,
            ttft: ttft.unwrap_or(total),
            total,
        })
    }
}

/// A prompt in SmolLM2's chat format (ChatML), ready for generation.
pub fn chat_prompt(system: &str, user: &str) -> String {
    format!(
        "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

/// A chat prompt asking `question` about `document` (the prompt the demo, `kvplugin ask` and the
/// end-to-end tests use).
pub fn document_prompt(document: &str, question: &str) -> String {
    chat_prompt(
        &format!("Answer questions about this document.\n\n{document}"),
        question,
    )
}

fn split_file(path: &std::path::Path) -> Result<(String, String)> {
    let bad = |reason: &str| Error::ModelFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if !path.is_file() {
        return Err(bad("not found (run `make setup` to fetch the model)"));
    }
    let dir = path.parent().ok_or_else(|| bad("has no parent folder"))?;
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| bad("file name is not UTF-8"))?;
    let dir = if dir.as_os_str().is_empty() {
        ".".to_string()
    } else {
        dir.display().to_string()
    };
    Ok((dir, file.to_string()))
}
