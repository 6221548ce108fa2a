//! Streamed loads: chunk-by-chunk fetches at the level a policy chooses, through a bandwidth-
//! shaped store. Timing is never asserted here except as "it ended": speed is the benchmark's.

use std::{sync::Arc, time::Duration};

use futures::TryStreamExt;
use integration_tests::store_suite::{
    damage_last_byte, max_abs, max_diff, model, prefix, tokens, CHUNK,
};
use mistralrs_core::KvPrefix;
use mistralrs_kvplugin::{
    codec::{Level, SINK_TOKENS},
    store::{
        BandwidthTrace, ObjectPrefixStore, ObjectStoreConfig, PrefixStore, ShapedStore, TraceClock,
    },
    stream::{Choice, ChunkOutcome, PlannerInputs, PrefillModel, StreamPolicy},
    ModelFingerprint,
};
use object_store::{memory::InMemory, path::Path, ObjectStore};

/// 4 full chunks and a 20-token tail.
const SAVED: usize = 4 * CHUNK + 20;

struct Fixture {
    backend: Arc<dyn ObjectStore>,
    model: ModelFingerprint,
    saved: KvPrefix,
    /// The saved tokens and one more (the engine always prefills the last prompt token).
    prompt: Vec<u32>,
}

fn config() -> ObjectStoreConfig {
    ObjectStoreConfig {
        chunk_tokens: CHUNK,
        level: Level::High,
        extra_levels: vec![Level::Lossless, Level::Coarse],
        ..Default::default()
    }
}

async fn saved() -> Fixture {
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = ObjectPrefixStore::new(backend.clone(), config()).unwrap();
    let model = model(7);
    let saved_tokens = tokens(SAVED, 3);
    let saved = prefix(&saved_tokens, 0.25);
    store.save(&model, saved.clone()).await.unwrap();
    let mut prompt = saved_tokens;
    prompt.push(5);
    Fixture {
        backend,
        model,
        saved,
        prompt,
    }
}

fn shaped(backend: &Arc<dyn ObjectStore>, mbit_s: Vec<f64>) -> ObjectPrefixStore {
    let trace = BandwidthTrace {
        mbit_s,
        clock: TraceClock::PerRequest,
    };
    let shaped = ShapedStore::new(backend.clone(), trace, Duration::from_millis(1));
    ObjectPrefixStore::new(Arc::new(shaped), config()).unwrap()
}

fn adaptive(budget: Duration, prefill: PrefillModel, prior_mbit_s: f64) -> StreamPolicy {
    StreamPolicy::Adaptive(PlannerInputs {
        budget,
        prefill,
        engine_overhead: Duration::ZERO,
        decode_bytes_per_s: 1e9,
        prior_bytes_per_s: prior_mbit_s * 1e6 / 8.0,
    })
}

/// A prefill so slow that any fetch beats it.
fn slow_prefill() -> PrefillModel {
    PrefillModel::linear(1.0)
}

#[tokio::test]
async fn a_fast_link_streams_every_chunk_at_the_best_level_equal_to_a_whole_load() {
    let f = saved().await;
    let store = shaped(&f.backend, vec![100_000.0]);
    let policy = adaptive(Duration::from_secs(60), slow_prefill(), 100_000.0);
    let loaded = store
        .load_streamed(&f.model, &f.prompt, 0, &policy)
        .await
        .unwrap();
    assert_eq!(loaded.report.summary(), "LLLLL", "{:?}", loaded.report);
    assert_eq!(loaded.report.covered_tokens, SAVED);
    let hit = loaded.prefix.expect("a hit");
    assert_eq!(hit.tokens, f.prompt[..SAVED]);
    assert_eq!(max_diff(&hit, &f.saved, SAVED), 0.0, "lossless is exact");
    assert_eq!(hit.approximate_from, None, "and marked exact");
    let whole = store
        .load_at(&f.model, &f.prompt, 0, Level::Lossless)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(max_diff(&hit, &whole, SAVED), 0.0);
    // The planner saw every transfer: its estimate is in the report, and every chunk's bytes.
    assert!(loaded.report.bandwidth_bytes_s > 0.0);
    assert!(loaded.report.chunks.iter().all(|c| c.bytes > 0));
}

#[tokio::test]
async fn fixed_levels_load_what_they_name_and_planned_choices_replay_a_load() {
    let f = saved().await;
    let store = ObjectPrefixStore::new(f.backend.clone(), config()).unwrap();
    let coarse = store
        .load_streamed(&f.model, &f.prompt, 0, &StreamPolicy::Fixed(Level::Coarse))
        .await
        .unwrap();
    // Full chunks at coarse; the tail is stored lossless only.
    assert_eq!(coarse.report.summary(), "CCCCL");
    let whole = store
        .load_at(&f.model, &f.prompt, 0, Level::Coarse)
        .await
        .unwrap()
        .unwrap();
    let coarse_hit = coarse.prefix.expect("hit");
    assert_eq!(max_diff(&coarse_hit, &whole, SAVED), 0.0);
    assert!(max_diff(&coarse_hit, &f.saved, SAVED) > 0.0);
    // Lossy rows are never handed out as exact: both loads are approximate after the first
    // token (the attention sink, stored exactly at every level).
    assert_eq!(coarse_hit.approximate_from, Some(SINK_TOKENS));
    assert_eq!(whole.approximate_from, Some(SINK_TOKENS));

    // A mixed plan: two exact chunks, one coarse, then text.
    let plan = vec![
        Choice::Fetch(Level::Lossless),
        Choice::Fetch(Level::Lossless),
        Choice::Fetch(Level::Coarse),
    ];
    let mixed = store
        .load_streamed(&f.model, &f.prompt, 0, &StreamPolicy::Planned(plan.clone()))
        .await
        .unwrap();
    assert_eq!(mixed.report.summary(), "LLCT");
    assert_eq!(mixed.report.choices(), plan);
    let hit = mixed.prefix.expect("hit");
    assert_eq!(hit.tokens.len(), 3 * CHUNK);
    assert_eq!(max_diff(&hit, &f.saved, 2 * CHUNK), 0.0);
    assert_eq!(
        hit.approximate_from,
        Some(2 * CHUNK),
        "exact up to the coarse chunk"
    );
    let third = |p: &KvPrefix| p.layers[0].k.narrow(2, 2 * CHUNK, CHUNK).unwrap();
    assert_eq!(
        max_abs(&(third(&hit) - third(&coarse_hit)).unwrap()),
        0.0,
        "the third chunk is the coarse one"
    );
    // A level never written is a miss, not an error.
    let none = store
        .load_streamed(&f.model, &f.prompt, 0, &StreamPolicy::Fixed(Level::Fine))
        .await
        .unwrap();
    assert!(none.prefix.is_none());
}

#[tokio::test]
async fn recomputing_is_chosen_when_it_is_faster_than_any_fetch() {
    let f = saved().await;
    // 0.1 Mbit/s and an engine that prefills a million tokens a second: every object takes
    // longer than the 5 ms budget, recomputing all 277 tokens 0.3 ms.
    let store = shaped(&f.backend, vec![0.1]);
    let policy = adaptive(Duration::from_millis(5), PrefillModel::linear(1e6), 0.1);
    let loaded = store
        .load_streamed(&f.model, &f.prompt, 0, &policy)
        .await
        .unwrap();
    assert_eq!(loaded.report.summary(), "T");
    assert!(loaded.prefix.is_none());
    assert_eq!(loaded.report.covered_tokens, 0);
}

#[tokio::test]
async fn a_link_going_down_mid_load_keeps_the_chunks_that_arrived() {
    let f = saved().await;
    // Two transfers, then the link is down (HEADs do not use up trace values).
    let store = shaped(&f.backend, vec![10_000.0, 10_000.0, 0.0]);
    let policy = adaptive(Duration::from_secs(60), slow_prefill(), 10_000.0);
    let loaded = store
        .load_streamed(&f.model, &f.prompt, 0, &policy)
        .await
        .unwrap();
    assert_eq!(loaded.report.summary(), "LL!", "{:?}", loaded.report);
    assert!(matches!(
        &loaded.report.chunks[2].outcome,
        ChunkOutcome::Failed {
            kind: "backend",
            ..
        }
    ));
    let hit = loaded.prefix.expect("the first two chunks");
    assert_eq!(hit.tokens, f.prompt[..2 * CHUNK]);
    assert_eq!(max_diff(&hit, &f.saved, 2 * CHUNK), 0.0);
}

#[tokio::test]
async fn a_collapsed_link_times_out_the_fetch_instead_of_waiting_for_it() {
    let f = saved().await;
    // 0.01 Mbit/s: the first lossless chunk (~20 kB) would take over 15 s; the estimate says
    // 1 Gbit/s, the budget is 200 ms and recomputing everything takes 0.28 s, so the fetch is
    // given up once the budget is lost (0.2 s).
    let store = shaped(&f.backend, vec![0.01]);
    let policy = adaptive(
        Duration::from_millis(200),
        PrefillModel::linear(1000.0),
        1000.0,
    );
    let started = std::time::Instant::now();
    let loaded = store
        .load_streamed(&f.model, &f.prompt, 0, &policy)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the load waited for the collapsed link: {:?}",
        started.elapsed()
    );
    assert_eq!(loaded.report.summary(), "!");
    assert!(matches!(
        &loaded.report.chunks[0].outcome,
        ChunkOutcome::Failed {
            kind: "timeout",
            ..
        }
    ));
    assert!(loaded.prefix.is_none());
    // A dead link fails discovery at once: an error, which the hook counts as a recompute.
    let dead = shaped(&f.backend, vec![0.0]);
    let err = dead
        .load_streamed(&f.model, &f.prompt, 0, &policy)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "backend", "{err}");
}

#[tokio::test]
async fn a_corrupt_chunk_ends_the_load_at_the_chunk_before_it() {
    let f = saved().await;
    // Find chunk 2's objects: save 2 chunks, then 3, in a fresh store; the new `c-` objects
    // are chunk 2's, whose names are the same in the fixture's store.
    let scratch: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = ObjectPrefixStore::new(scratch.clone(), config()).unwrap();
    let names = |backend: Arc<dyn ObjectStore>| async move {
        let list: Vec<_> = backend.list(None).try_collect().await.unwrap();
        list.into_iter()
            .map(|m| m.location)
            .filter(|p| p.filename().is_some_and(|n| n.starts_with("c-")))
            .collect::<Vec<Path>>()
    };
    store
        .save(&f.model, prefix(&f.prompt[..2 * CHUNK], 0.25))
        .await
        .unwrap();
    let before = names(scratch.clone()).await;
    store
        .save(&f.model, prefix(&f.prompt[..3 * CHUNK], 0.25))
        .await
        .unwrap();
    let third: Vec<Path> = names(scratch)
        .await
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(third.len(), 3, "chunk 2 at three levels: {third:?}");
    for path in &third {
        damage_last_byte(&*f.backend, path, 0x55).await;
    }

    let store = ObjectPrefixStore::new(f.backend.clone(), config()).unwrap();
    let loaded = store
        .load_streamed(&f.model, &f.prompt, 0, &StreamPolicy::Fixed(Level::High))
        .await
        .unwrap();
    assert_eq!(loaded.report.summary(), "HH!");
    assert!(matches!(
        &loaded.report.chunks[2].outcome,
        ChunkOutcome::Failed {
            kind: "corrupt",
            ..
        }
    ));
    let hit = loaded.prefix.expect("the chunks before the corrupt one");
    assert_eq!(hit.tokens, f.prompt[..2 * CHUNK]);
    let whole = store
        .load_at(&f.model, &f.prompt[..2 * CHUNK + 1], 0, Level::High)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(max_diff(&hit, &whole, 2 * CHUNK), 0.0);
}

#[tokio::test]
async fn another_models_chunks_are_never_streamed() {
    let f = saved().await;
    let store = ObjectPrefixStore::new(f.backend.clone(), config()).unwrap();
    let loaded = store
        .load_streamed(&model(8), &f.prompt, 0, &StreamPolicy::Fixed(Level::High))
        .await
        .unwrap();
    assert!(loaded.prefix.is_none());
    assert!(loaded.report.chunks.is_empty());
}
