//! Streamed lookups on the real engine and model: the hook loads a stored prefix chunk by chunk
//! under an adaptive policy through a bandwidth-shaped store; when the link goes down part-way,
//! the hook hands the engine the chunks that arrived, the engine prefills the rest, and answers
//! exactly as stock.

use std::{sync::Arc, time::Duration};

use integration_tests::{document, gguf_path, question_prompt, wait_for};
use mistralrs_kvplugin::{
    codec::Level,
    engine::{EngineOptions, LocalEngine, ModelSource},
    store::{
        BandwidthTrace, ObjectPrefixStore, ObjectStoreConfig, PrefixStore, ShapedStore, TraceClock,
    },
    stream::{PlannerInputs, PrefillModel, StreamPolicy},
    HookConfig, KvPluginHook,
};
use object_store::{memory::InMemory, ObjectStore};

const CHUNK: usize = 64;
const NEW_TOKENS: usize = 16;

fn options() -> EngineOptions {
    EngineOptions::new(ModelSource::Gguf(gguf_path()))
}

fn store_over(backend: Arc<dyn ObjectStore>) -> Arc<ObjectPrefixStore> {
    Arc::new(
        ObjectPrefixStore::new(
            backend,
            ObjectStoreConfig {
                chunk_tokens: CHUNK,
                level: Level::Lossless,
                extra_levels: vec![Level::Coarse],
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_lost_mid_stream_installs_what_arrived_and_answers_as_stock() {
    let stock = LocalEngine::start(options()).await.unwrap();
    let doc = document(&stock, 400);
    let prompt_a = question_prompt(&stock, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&stock, &doc, "What does the license say about patents?");
    let expected = stock.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    drop(stock);

    // Engine A stores its cache (lossless and coarse chunks).
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = Arc::new(KvPluginHook::new(
        store_over(backend.clone()) as Arc<dyn PrefixStore>,
        HookConfig::default(),
    ));
    let engine_a = LocalEngine::start(options().with_kv_hook(writer.clone()))
        .await
        .unwrap();
    engine_a.complete(&prompt_a, NEW_TOKENS).await.unwrap();
    wait_for(&writer, 1, 1).await;
    drop(engine_a);

    // Engine B reads through a link that carries two transfers and then goes down. The budget
    // is generous and recomputing priced slow, so the planner asks for lossless chunks.
    let shaped = ShapedStore::new(
        backend,
        BandwidthTrace {
            mbit_s: vec![10_000.0, 10_000.0, 0.0],
            clock: TraceClock::PerRequest,
        },
        Duration::from_millis(1),
    );
    let policy = StreamPolicy::Adaptive(PlannerInputs {
        budget: Duration::from_secs(30),
        prefill: PrefillModel::linear(10.0),
        engine_overhead: Duration::ZERO,
        decode_bytes_per_s: 300e6,
        prior_bytes_per_s: 1e9,
    });
    let reader = Arc::new(KvPluginHook::new(
        store_over(Arc::new(shaped)) as Arc<dyn PrefixStore>,
        HookConfig {
            stream: Some(policy),
            read_only: true,
            ..HookConfig::default()
        },
    ));
    let engine_b = LocalEngine::start(options().with_kv_hook(reader.clone()))
        .await
        .unwrap();
    let got = engine_b.complete(&prompt_b, NEW_TOKENS).await.unwrap();
    let m = wait_for(&reader, 1, 0).await;

    let report = reader.last_stream_report().expect("a streamed lookup");
    assert_eq!(report.summary(), "LL!", "{report:?}");
    assert_eq!(report.covered_tokens, 2 * CHUNK);
    // (`last_reused_tokens` is not checked: the engine's start-up warm-up sequence may be
    // reported after this one and overwrite it; `engine_hooks.rs` checks what the engine reuses.)
    assert_eq!(
        (m.hits, m.hit_tokens),
        (1, 2 * CHUNK as u64),
        "the two chunks that arrived were handed to the engine: {m:?}"
    );
    assert_eq!(
        (
            m.stream_loads,
            m.stream_chunks_loaded,
            m.stream_chunks_failed
        ),
        (1, 2, 1),
        "{m:?}"
    );
    assert_eq!(m.lookup_failures, 0, "a partial hit is a hit: {m:?}");
    assert_eq!(got.tokens, expected.tokens, "greedy output equals stock");
}
