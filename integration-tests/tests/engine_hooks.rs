//! The `kv-hooks` patch on the real engine and model (SmolLM2-135M-Instruct, F32, CPU).
//!
//! - A fresh engine that shares only the plugin's store with an earlier engine prefills only the
//!   suffix of a longer prompt, and its greedy output is token-identical to a stock engine's.
//! - A different model (the same weights through the safetensors loader) or dtype never hits.
//! - With no hook registered the engine behaves as stock (same outputs, its own prefix cache).
//! - A misbehaving hook (panics, hangs, returns a wrong prefix) costs a recompute, never a wrong
//!   answer or a stuck engine.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use integration_tests::{document, gguf_path, hf_dir, question_prompt, wait_for};
use mistralrs_core::{KvHook, KvModelInfo, KvPrefix, LayerKv, ModelDType};
use mistralrs_kvplugin::{
    engine::{EngineOptions, Generation, LocalEngine, ModelSource},
    store::common_prefix_len,
    HookConfig, KvPluginHook, MemoryPrefixStore, PrefixStore,
};

const DOC_TOKENS: usize = 400;
const NEW_TOKENS: usize = 24;

fn gguf_options() -> EngineOptions {
    EngineOptions::new(ModelSource::Gguf(gguf_path()))
}

fn hook_over(store: &Arc<MemoryPrefixStore>) -> Arc<KvPluginHook> {
    Arc::new(KvPluginHook::new(
        store.clone() as Arc<dyn PrefixStore>,
        HookConfig::default(),
    ))
}

/// Two questions on one document, stock's answer to the second, and a store holding the cache
/// engine A left after answering the first.
struct Saved {
    prompt_a: Vec<u32>,
    prompt_b: Vec<u32>,
    expected: Generation,
    store: Arc<MemoryPrefixStore>,
}

async fn saved_by_engine_a(doc_tokens: usize) -> Saved {
    let stock = LocalEngine::start(gguf_options()).await.unwrap();
    let doc = document(&stock, doc_tokens);
    let prompt_a = question_prompt(&stock, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&stock, &doc, "What does the license say about patents?");
    let expected = stock.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    drop(stock);

    let store = Arc::new(MemoryPrefixStore::new(1 << 30));
    let hook_a = hook_over(&store);
    let engine_a = LocalEngine::start(gguf_options().with_kv_hook(hook_a.clone()))
        .await
        .unwrap();
    engine_a.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    let a = wait_for(&hook_a, 1, 1).await;
    assert_eq!(a.saves, 1, "engine A saved its cache: {a:?}");
    assert_eq!(a.last_reused_tokens, 0, "engine A started cold");
    Saved {
        prompt_a,
        prompt_b,
        expected,
        store,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_engine_prefills_only_the_suffix_and_matches_stock() {
    let Saved {
        prompt_a,
        prompt_b,
        expected,
        store,
    } = saved_by_engine_a(DOC_TOKENS).await;

    let hook_b = hook_over(&store);
    let engine_b = LocalEngine::start(gguf_options().with_kv_hook(hook_b.clone()))
        .await
        .unwrap();
    let got = engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    let b = wait_for(&hook_b, 1, 1).await;

    let shared = common_prefix_len(&prompt_a, &prompt_b);
    assert!(shared > DOC_TOKENS, "prompts share the document ({shared})");
    assert_eq!(b.hits, 1, "{b:?}");
    assert_eq!(
        b.hit_tokens, shared as u64,
        "the hit covers the shared prefix"
    );
    assert_eq!(b.last_prompt_tokens, prompt_b.len() as u64);
    assert_eq!(
        b.last_reused_tokens,
        shared as u64,
        "engine B prefilled only the {} suffix tokens",
        prompt_b.len() - shared
    );
    assert_eq!(got.tokens, expected.tokens, "greedy output equals stock");
    assert_eq!(got.text, expected.text);
    assert!(!got.tokens.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_model_or_dtype_never_hits() {
    let store = Arc::new(MemoryPrefixStore::new(1 << 30));
    let hook_a = hook_over(&store);
    let engine_a = LocalEngine::start(gguf_options().with_kv_hook(hook_a.clone()))
        .await
        .unwrap();
    let doc = document(&engine_a, 120);
    let prompt = question_prompt(&engine_a, &doc, "Who may copy this license?");
    engine_a.complete(&prompt, 4).await.unwrap();
    assert_eq!(wait_for(&hook_a, 1, 1).await.saves, 1);
    drop(engine_a);

    // Same prompt, same store: a hit for the same model proves the entry is usable ...
    let hook_same = hook_over(&store);
    let same = LocalEngine::start(gguf_options().with_kv_hook(hook_same.clone()))
        .await
        .unwrap();
    same.complete(&prompt, 4).await.unwrap();
    assert_eq!(wait_for(&hook_same, 1, 1).await.hits, 1);
    drop(same);

    // ... and another dtype of the same weights misses.
    let hook_f16 = hook_over(&store);
    let mut f16 = gguf_options().with_kv_hook(hook_f16.clone());
    f16.dtype = ModelDType::F16;
    let engine = LocalEngine::start(f16).await.unwrap();
    engine.complete(&prompt, 4).await.unwrap();
    let m = wait_for(&hook_f16, 1, 0).await;
    assert_eq!((m.lookups, m.hits), (1, 0), "F16 engine must miss: {m:?}");
    assert_ne!(hook_f16.model_fingerprint(), hook_a.model_fingerprint());
    drop(engine);

    // The same weights through the safetensors loader (neox rope, other files) miss too.
    let hook_hf = hook_over(&store);
    let hf = LocalEngine::start(
        EngineOptions::new(ModelSource::HfDir(hf_dir())).with_kv_hook(hook_hf.clone()),
    )
    .await
    .unwrap();
    let hf_prompt = question_prompt(&hf, &doc, "Who may copy this license?");
    hf.complete(&hf_prompt, 4).await.unwrap();
    let m = wait_for(&hook_hf, 1, 0).await;
    assert_eq!((m.lookups, m.hits), (1, 0), "HF model must miss: {m:?}");
    assert_ne!(hook_hf.model_fingerprint(), hook_a.model_fingerprint());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_hook_the_engine_behaves_as_stock() {
    // An engine with no hook keeps its own prefix cache: the second prompt is a memory hit, and
    // outputs equal those of an engine whose hook never answers.
    let plain = LocalEngine::start(gguf_options()).await.unwrap();
    let doc = document(&plain, 200);
    let prompt_a = question_prompt(&plain, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&plain, &doc, "What does the license say about patents?");
    let plain_a = plain.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    let plain_b = plain.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    drop(plain);

    let idle = Arc::new(FaultyHook::new(Fault::NeverHits));
    let hooked = LocalEngine::start(gguf_options().with_kv_hook(idle.clone()))
        .await
        .unwrap();
    let hooked_a = hooked.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    let hooked_b = hooked.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    assert_eq!(plain_a.tokens, hooked_a.tokens);
    assert_eq!(plain_b.tokens, hooked_b.tokens);
    // The in-memory prefix cache still served the second prompt beside the hook.
    let reused = idle.finished(2).await;
    assert_eq!(reused.len(), 2);
    assert_eq!(reused[0], 0);
    assert!(
        reused[1] > 200,
        "second prompt reused the memory prefix: {reused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_hook_costs_a_recompute_only() {
    let stock = LocalEngine::start(gguf_options()).await.unwrap();
    let doc = document(&stock, 150);
    let prompt = question_prompt(&stock, &doc, "Who may copy this license?");
    let expected = stock.complete(&prompt, NEW_TOKENS).await.unwrap();
    drop(stock);

    for fault in [
        Fault::Panics,
        Fault::Hangs,
        Fault::WrongTokens,
        Fault::WrongShape,
        Fault::WholePrompt,
    ] {
        let hook = Arc::new(FaultyHook::new(fault));
        let engine = LocalEngine::start(gguf_options().with_kv_hook(hook.clone()))
            .await
            .unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(120),
            engine.complete(&prompt, NEW_TOKENS),
        )
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: engine stuck"))
        .unwrap_or_else(|e| panic!("{fault:?}: request failed: {e}"));
        assert_eq!(got.tokens, expected.tokens, "{fault:?}: output differs");
        assert_eq!(
            hook.loads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "{fault:?}"
        );
        // The engine prefilled everything itself.
        assert_eq!(hook.finished(1).await, vec![0], "{fault:?}");
    }
}

/// How a [`FaultyHook`] misbehaves on `load_prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    NeverHits,
    Panics,
    Hangs,
    /// A prefix whose tokens are not the prompt's.
    WrongTokens,
    /// The prompt's tokens with tensors of the wrong shape.
    WrongShape,
    /// A "prefix" as long as the whole prompt (leaves nothing to prefill).
    WholePrompt,
}

struct FaultyHook {
    fault: Fault,
    model: std::sync::OnceLock<KvModelInfo>,
    loads: std::sync::atomic::AtomicUsize,
    reused: std::sync::Mutex<Vec<usize>>,
}

impl FaultyHook {
    fn new(fault: Fault) -> Self {
        Self {
            fault,
            model: Default::default(),
            loads: Default::default(),
            reused: Default::default(),
        }
    }

    /// Reused-token counts of the first `n` finished test sequences, once the engine reported
    /// them (saves run in tasks of their own, after the response).
    async fn finished(&self, n: usize) -> Vec<usize> {
        for _ in 0..1200 {
            let reused = self.reused.lock().unwrap().clone();
            if reused.len() >= n {
                return reused;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{:?}: the engine reported fewer than {n} finished sequences",
            self.fault
        );
    }

    fn prefix(&self, tokens: &[u32], heads: usize) -> KvPrefix {
        let model = self.model.get().expect("registered");
        let zeros = || {
            Tensor::zeros(
                (1, heads, tokens.len(), model.k_head_dim),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        KvPrefix {
            tokens: tokens.to_vec(),
            approximate_from: None,
            layers: (0..model.num_layers)
                .map(|_| LayerKv {
                    k: zeros(),
                    v: zeros(),
                })
                .collect(),
        }
    }
}

#[async_trait]
impl KvHook for FaultyHook {
    fn register(&self, model: &KvModelInfo) -> anyhow::Result<()> {
        let _ = self.model.set(model.clone());
        Ok(())
    }

    async fn save_prefix(&self, finished: mistralrs_core::FinishedPrefix) {
        // The engine's start-up warm-up request (a one-token prompt) is not one of the test's.
        if finished.prompt_tokens > 1 {
            self.reused.lock().unwrap().push(finished.reused_tokens);
        }
    }

    async fn load_prefix(&self, prompt: &[u32], _cached: usize) -> Option<KvPrefix> {
        if prompt.len() > 1 {
            self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let heads = self.model.get().expect("registered").num_kv_heads;
        match self.fault {
            Fault::NeverHits => None,
            Fault::Panics => panic!("hook panics on purpose"),
            Fault::Hangs => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                None
            }
            Fault::WrongTokens => {
                let mut tokens = prompt[..prompt.len() / 2].to_vec();
                tokens[1] ^= 1;
                Some(self.prefix(&tokens, heads))
            }
            Fault::WrongShape => Some(self.prefix(&prompt[..prompt.len() / 2], heads + 1)),
            Fault::WholePrompt => Some(self.prefix(prompt, heads)),
        }
    }

    fn load_timeout(&self) -> Duration {
        Duration::from_millis(300)
    }
}

/// A store that holds a real cache but answers lookups only after `delay`.
struct SlowStore {
    inner: Arc<MemoryPrefixStore>,
    delay: Duration,
}

#[async_trait]
impl PrefixStore for SlowStore {
    async fn save(
        &self,
        model: &mistralrs_kvplugin::ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<mistralrs_kvplugin::store::SaveOutcome, mistralrs_kvplugin::store::StoreError> {
        self.inner.save(model, prefix).await
    }

    async fn load(
        &self,
        model: &mistralrs_kvplugin::ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
    ) -> Result<Option<KvPrefix>, mistralrs_kvplugin::store::StoreError> {
        tokio::time::sleep(self.delay).await;
        self.inner.load(model, prompt, min_tokens).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_the_load_timeout_costs_a_recompute_counted_as_a_timeout() {
    // The cache is in the store (saved by engine A); the slow store serves it too late.
    let Saved {
        prompt_b,
        expected,
        store,
        ..
    } = saved_by_engine_a(150).await;

    let slow = Arc::new(SlowStore {
        inner: store,
        // Far longer than a recompute takes even beside other tests on 2 cores, so that the
        // bound below tells waiting for the timeout from waiting for the store.
        delay: Duration::from_secs(600),
    });
    let hook_b = Arc::new(KvPluginHook::new(
        slow,
        HookConfig {
            load_timeout: Duration::from_millis(300),
            ..HookConfig::default()
        },
    ));
    let engine_b = LocalEngine::start(gguf_options().with_kv_hook(hook_b.clone()))
        .await
        .unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(300),
        engine_b.complete(&prompt_b, NEW_TOKENS),
    )
    .await
    .expect("the engine waits at most the load timeout, not the store")
    .unwrap();
    assert_eq!(got.tokens, expected.tokens);
    let b = wait_for(&hook_b, 1, 1).await;
    assert_eq!(
        (b.hits, b.lookup_failures, b.failures_timeout),
        (0, 1, 1),
        "{b:?}"
    );
    assert_eq!(b.last_reused_tokens, 0, "recomputed from text");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_hit_is_approximate_and_neither_saved_again_nor_kept_by_the_engine() {
    use mistralrs_kvplugin::{
        codec::Level,
        store::{ObjectPrefixStore, ObjectStoreConfig},
    };
    let stock = LocalEngine::start(gguf_options()).await.unwrap();
    let doc = document(&stock, DOC_TOKENS);
    let prompt_a = question_prompt(&stock, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&stock, &doc, "What does the license say about patents?");
    drop(stock);
    let store = Arc::new(
        ObjectPrefixStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            ObjectStoreConfig {
                chunk_tokens: 64,
                level: Level::Coarse,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let hook = || {
        Arc::new(KvPluginHook::new(
            store.clone() as Arc<dyn PrefixStore>,
            HookConfig::default(),
        ))
    };
    let hook_a = hook();
    let engine_a = LocalEngine::start(gguf_options().with_kv_hook(hook_a.clone()))
        .await
        .unwrap();
    engine_a.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    assert_eq!(wait_for(&hook_a, 1, 1).await.saves, 1);
    drop(engine_a);
    let written = store.counters().bytes_written.load(Ordering::Relaxed);

    // Engine B loads the coarse chunks: a hit, marked approximate, so the engine keeps the
    // sequence out of its own prefix cache and offers its cache marked approximate; the hook
    // keeps only its exact rows (the first token), too few to save.
    let hook_b = hook();
    let engine_b = LocalEngine::start(gguf_options().with_kv_hook(hook_b.clone()))
        .await
        .unwrap();
    engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    wait_for(&hook_b, 1, 0).await;
    // The same prompt again: not the engine's own prefix hit (an approximate cache never enters
    // it), but the store's lossy chunks again.
    engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = hook_b.metrics().snapshot();
    assert_eq!((b.lookups, b.hits), (2, 2), "{b:?}");
    assert_eq!(b.engine_prefix_hits, 0, "{b:?}");
    assert_eq!(b.saves + b.save_failures, 0, "{b:?}");
    assert_eq!(
        store.counters().bytes_written.load(Ordering::Relaxed),
        written,
        "nothing of the lossy sequences was written back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_whose_buffers_exceed_the_memory_budget_is_not_made_and_answers_as_stock() {
    let Saved {
        prompt_b,
        expected,
        store,
        ..
    } = saved_by_engine_a(DOC_TOKENS).await;
    // A 400-token SmolLM2 cache decodes into about 18 MB of F32: more than a 16 MiB budget.
    let hook_b = Arc::new(KvPluginHook::new(
        store.clone() as Arc<dyn PrefixStore>,
        HookConfig {
            lookup_memory_bytes: 16 << 20,
            ..HookConfig::default()
        },
    ));
    let engine_b = LocalEngine::start(gguf_options().with_kv_hook(hook_b.clone()))
        .await
        .unwrap();
    let got = engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    let b = wait_for(&hook_b, 1, 1).await;
    assert_eq!((b.lookups_over_budget, b.hits), (1, 0), "{b:?}");
    assert_eq!(b.lookup_failures, 0, "not a failure: {b:?}");
    assert_eq!(got.tokens, expected.tokens, "a recompute answers as stock");
}
