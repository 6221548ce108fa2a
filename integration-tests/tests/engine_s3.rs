//! The real engine with its caches in a real S3 server (s3s-fs on 127.0.0.1): a fresh engine hits
//! what another engine stored, with output equal to a stock engine's, and when the server dies
//! engines keep serving correct answers by recomputing.

use std::sync::Arc;

use integration_tests::{document, gguf_path, question_prompt, s3::S3Server, wait_for};
use mistralrs_kvplugin::{
    engine::{EngineOptions, LocalEngine, ModelSource},
    store::common_prefix_len,
    KvPluginHook, PrefixStore,
};

const NEW_TOKENS: usize = 16;

fn options() -> EngineOptions {
    EngineOptions::new(ModelSource::Gguf(gguf_path()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_share_a_bucket_and_survive_losing_it() {
    let mut server = S3Server::start_s3s_fs();
    let mut config = server.config();
    config.level = "lossless".into();
    config.chunk_tokens = 128;
    let hook = || {
        let store: Arc<dyn PrefixStore> = Arc::new(config.build_store().unwrap());
        Arc::new(KvPluginHook::new(store, config.hook_config()))
    };

    let stock = LocalEngine::start(options()).await.unwrap();
    let doc = document(&stock, 300);
    let prompt_a = question_prompt(&stock, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&stock, &doc, "What does the license say about patents?");
    let expected = stock.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    drop(stock);

    // Engine A stores its cache in the bucket.
    let hook_a = hook();
    let engine_a = LocalEngine::start(options().with_kv_hook(hook_a.clone()))
        .await
        .unwrap();
    engine_a.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    let a = wait_for(&hook_a, 1, 1).await;
    assert_eq!((a.saves, a.save_failures), (1, 0), "{a:?}");
    drop(engine_a);

    // Engine B, with a store of its own over the same bucket, hits it.
    let hook_b = hook();
    let engine_b = LocalEngine::start(options().with_kv_hook(hook_b.clone()))
        .await
        .unwrap();
    let got = engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    let b = wait_for(&hook_b, 1, 1).await;
    let shared = common_prefix_len(&prompt_a, &prompt_b);
    assert_eq!(b.hits, 1, "{b:?}");
    assert_eq!(b.last_reused_tokens, shared as u64, "{b:?}");
    assert_eq!(got.tokens, expected.tokens);

    // The server dies: engine B keeps serving, and a fresh engine recomputes, both correctly.
    server.kill();
    let again = engine_b.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    assert!(!again.tokens.is_empty());
    let hook_c = hook();
    let engine_c = LocalEngine::start(options().with_kv_hook(hook_c.clone()))
        .await
        .unwrap();
    let got = engine_c.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    assert_eq!(
        got.tokens, expected.tokens,
        "recomputed answer equals stock"
    );
    let c = wait_for(&hook_c, 1, 1).await;
    assert_eq!(c.hits, 0, "{c:?}");
    assert_eq!(c.lookup_failures, 1, "the failed lookup is counted: {c:?}");
    assert_eq!(c.failures_backend, 1, "with its reason: {c:?}");
    assert_eq!(c.last_reused_tokens, 0);
    assert_eq!(c.save_failures, 1, "the failed save is counted: {c:?}");
}
