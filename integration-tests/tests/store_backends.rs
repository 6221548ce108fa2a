//! The store behaviour suite against every backend: object_store's memory store, the local
//! filesystem, and real S3 servers on 127.0.0.1 (s3s-fs and a single-node Garage; `make setup`
//! installs both); then what needs no backend variety (dtypes, settings) and the S3 failure modes.

use std::sync::Arc;

use candle_core::DType;
use integration_tests::{
    s3::S3Server,
    store_suite::{behaviour_suite, model, prefix, store_over, tokens},
};
use mistralrs_kvplugin::{
    codec::Level,
    store::{durable::SyncedLocal, ObjectPrefixStore, ObjectStoreConfig, PrefixStore},
};
use object_store::{local::LocalFileSystem, memory::InMemory, ObjectStore};

#[tokio::test]
async fn memory_backend() {
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let same = backend.clone();
    behaviour_suite(backend, move || same.clone()).await;
}

#[tokio::test]
async fn local_filesystem_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // As `[store] url` opens a folder: writes synced before they are acknowledged.
    let open = move || -> Arc<dyn ObjectStore> {
        Arc::new(SyncedLocal::new(
            LocalFileSystem::new_with_prefix(&path).unwrap(),
        ))
    };
    behaviour_suite(open(), open).await;
}

#[tokio::test]
async fn s3s_fs_backend() {
    suite_on_server(S3Server::start_s3s_fs()).await;
}

#[tokio::test]
async fn garage_backend() {
    suite_on_server(S3Server::start_garage()).await;
}

/// The suite over `server`'s bucket; a fresh client plays the restarted process.
async fn suite_on_server(server: S3Server) {
    let config = server.config();
    behaviour_suite(config.open_backend().unwrap(), || {
        config.open_backend().unwrap()
    })
    .await;
}

#[tokio::test]
async fn wrong_credentials_are_a_clear_error() {
    for server in [S3Server::start_s3s_fs(), S3Server::start_garage()] {
        wrong_credentials_are_denied(server).await;
    }
}

async fn wrong_credentials_are_denied(server: S3Server) {
    use mistralrs_kvplugin::store::StoreError;
    let mut config = server.config();
    config.store.secret_access_key = Some("not-the-secret".into());
    let store = config.build_store().unwrap();
    let saved = tokens(100, 0);
    match store.save(&model(1), prefix(&saved, 0.0)).await {
        Err(StoreError::Denied { reason }) => assert!(!reason.is_empty()),
        other => panic!("save with a wrong secret gave {other:?}"),
    }
    assert!(matches!(
        store.load(&model(1), &saved, 0).await,
        Err(StoreError::Denied { .. })
    ));
}

#[tokio::test]
async fn a_stopped_server_gives_errors_not_answers_or_hangs() {
    use mistralrs_kvplugin::store::StoreError;
    let mut server = S3Server::start_s3s_fs();
    let store = server.config().build_store().unwrap();
    let saved = tokens(150, 0);
    store.save(&model(1), prefix(&saved, 0.0)).await.unwrap();
    assert!(store.load(&model(1), &saved, 0).await.unwrap().is_some());
    server.kill();
    // The guard only turns a hang into a failure; the store's own timeouts end it far sooner.
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        store.load(&model(1), &saved, 0),
    )
    .await
    .expect("load after the server stopped must not hang");
    assert!(
        matches!(result, Err(StoreError::Backend { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn f16_caches_round_trip_in_their_dtype() {
    let store = store_over(Arc::new(InMemory::new()), Level::Lossless);
    let t = tokens(70, 1);
    let mut p = prefix(&t, 1.0);
    for l in &mut p.layers {
        l.k = l.k.to_dtype(DType::F16).unwrap();
        l.v = l.v.to_dtype(DType::F16).unwrap();
    }
    store.save(&model(1), p.clone()).await.unwrap();
    let mut prompt = t.clone();
    prompt.push(1);
    let hit = store.load(&model(1), &prompt, 0).await.unwrap().unwrap();
    assert_eq!(hit.layers[0].k.dtype(), DType::F16);
    let (a, b) = (
        hit.layers[2].v.to_dtype(DType::F32).unwrap(),
        p.layers[2].v.to_dtype(DType::F32).unwrap(),
    );
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[tokio::test]
async fn invalid_settings_name_the_field() {
    let err = ObjectPrefixStore::new(
        Arc::new(InMemory::new()),
        ObjectStoreConfig {
            chunk_tokens: 0,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("chunk_tokens"), "{err}");
}

#[tokio::test]
async fn chunks_written_at_several_levels_are_read_at_any_of_them() {
    use futures::TryStreamExt;
    use integration_tests::store_suite::{max_diff, CHUNK};
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let writer = ObjectPrefixStore::new(
        backend.clone(),
        ObjectStoreConfig {
            chunk_tokens: CHUNK,
            level: Level::High,
            extra_levels: vec![Level::Coarse, Level::High, Level::Default],
            ..Default::default()
        },
    )
    .unwrap();
    let m = model(1);
    let saved_tokens = tokens(200, 0);
    let saved = prefix(&saved_tokens, 0.0);
    assert_eq!(writer.counters().compression_ratio(), None);
    writer.save(&m, saved.clone()).await.unwrap();
    let objects: Vec<_> = backend.list(None).try_collect().await.unwrap();
    let stored: u64 = objects.iter().map(|o| o.size).sum();
    let ratio = writer.counters().compression_ratio().expect("written");
    let raw = std::sync::atomic::AtomicU64::load(
        &writer.counters().raw_16bit_bytes_written,
        std::sync::atomic::Ordering::Relaxed,
    );
    assert!(
        (ratio - raw as f64 / stored as f64).abs() < 1e-9,
        "the ratio is 16-bit bytes over the bytes the backend holds"
    );
    let full = 200 / CHUNK;
    assert_eq!(
        objects.len(),
        3 * full + 1,
        "every full chunk once per distinct level, the tail once"
    );

    let mut prompt = saved_tokens.clone();
    prompt.push(1);
    let mut errors = Vec::new();
    for level in [Level::High, Level::Default, Level::Coarse] {
        let hit = writer
            .load_at(&m, &prompt, 0, level)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("a hit at {level:?}"));
        assert_eq!(hit.tokens, saved_tokens, "{level:?}");
        errors.push(max_diff(&hit, &saved, full * CHUNK));
    }
    assert!(
        0.0 < errors[0] && errors[0] < errors[1] && errors[1] < errors[2],
        "coarser levels err more: {errors:?}"
    );
    // A level that was not written is a miss, not an error.
    assert!(writer
        .load_at(&m, &prompt, 0, Level::Fine)
        .await
        .unwrap()
        .is_none());
    // A store whose main level is one of the extra levels reads them as its own, and finds the
    // (lossless) tail the writer left: the whole prefix, not only its full chunks.
    let coarse = store_over(backend, Level::Coarse);
    let hit = coarse.load(&m, &prompt, 0).await.unwrap().expect("hit");
    assert_eq!(hit.tokens, saved_tokens);
    assert_eq!(max_diff(&hit, &saved, full * CHUNK), errors[2]);
}

/// A whole load of a long run whose first chunk is damaged ends with an error: the decoder stops
/// at chunk 0 while more chunks are fetched than the fetch queue holds, and the fetcher must stop
/// with it instead of waiting forever to hand over the rest. Before the decoder owned its end of
/// the queue, this load hung. A load that could not beat what the caller has (`min_tokens`)
/// decodes nothing, so the same damage is then no error but a plain miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_first_chunk_of_a_long_run_is_an_error_not_a_hang() {
    use futures::TryStreamExt;
    use integration_tests::store_suite::{damage_last_byte, CHUNK};
    use mistralrs_kvplugin::store::StoreError;
    use object_store::path::Path;

    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = store_over(backend.clone(), Level::Lossless);
    let m = model(1);
    // More chunks than the eight fetches in flight and the eight queued for the decoder.
    let n_chunks = 20;
    let saved_tokens = tokens(n_chunks * CHUNK, 0);
    store
        .save(&m, prefix(&saved_tokens, 0.0))
        .await
        .expect("saved");
    let first: Path = backend
        .list(None)
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.location)
        .find(|p| p.as_ref().contains("/c-0-"))
        .expect("chunk 0");
    damage_last_byte(&*backend, &first, 0xff).await;

    let mut prompt = saved_tokens.clone();
    prompt.extend([5, 6, 7]);
    let load = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        store.load(&m, &prompt, 0),
    )
    .await
    .expect("the load ends");
    assert!(
        matches!(
            load,
            Err(StoreError::Codec(_)) | Err(StoreError::Corrupt { .. })
        ),
        "damaged chunk 0 gave {load:?}"
    );
    let not_longer = store.load(&m, &prompt, saved_tokens.len()).await;
    assert!(
        matches!(not_longer, Ok(None)),
        "a run no longer than min_tokens is a miss: {not_longer:?}"
    );
}

#[tokio::test]
async fn hostile_objects_are_refused_before_anything_is_allocated() {
    use integration_tests::store_suite::{CHUNK, DIM, HEADS, LAYERS};
    use mistralrs_kvplugin::{
        codec::{self, ChunkShape, KvChunk, KvDType},
        fingerprint::KvLayout,
        store::{seal, StoreError},
    };
    use object_store::path::Path;

    // A registered model's fingerprint carries its cache layout.
    let m = model(1).with_layout(KvLayout {
        n_layers: LAYERS,
        n_kv_heads: HEADS,
        head_dim: DIM,
        dtype: KvDType::F32,
    });
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = store_over(backend.clone(), Level::Lossless);
    let saved = tokens(200, 5);
    store.save(&m, prefix(&saved, 0.0)).await.unwrap();
    let mut prompt = saved.clone();
    prompt.push(1);
    assert_eq!(
        store
            .load(&m, &prompt, 0)
            .await
            .unwrap()
            .unwrap()
            .tokens
            .len(),
        200
    );
    let objects: Vec<Path> = {
        use futures::TryStreamExt;
        let listed: Vec<_> = backend.list(None).try_collect().await.unwrap();
        listed.into_iter().map(|o| o.location).collect()
    };
    let named = |prefix: &str| {
        objects
            .iter()
            .find(|p| p.filename().unwrap().starts_with(prefix))
            .unwrap()
            .clone()
    };

    // A writer without a key replaces the second chunk with one whose header claims 64 times
    // the model's heads: its tokens, binding and checksum are all valid (nothing of them is
    // secret), so only the model's layout tells it apart. Refused, nothing decoded: the hit
    // ends at the first chunk.
    let shape = ChunkShape {
        n_layers: LAYERS,
        n_kv_heads: HEADS * 64,
        head_dim: DIM,
        n_tokens: CHUNK,
    };
    let huge = KvChunk::from_f32_tensors(
        shape,
        KvDType::F32,
        &vec![vec![0.5; shape.tensor_len()]; shape.n_tensors()],
    )
    .unwrap();
    let encoded = codec::encode(&huge, Level::Lossless, m.as_bytes()).unwrap();
    let plant = |path: Path| {
        let (backend, encoded) = (backend.clone(), encoded.clone());
        async move {
            let honest = backend.get(&path).await.unwrap().bytes().await.unwrap();
            let (binding, _) = seal::claimed_binding(&honest).unwrap();
            let tokens = seal::peek_tokens(&honest, None).unwrap();
            let hostile = seal::seal(binding, &tokens, &encoded, None).unwrap();
            backend.put(&path, hostile.into()).await.unwrap();
        }
    };
    plant(named("c-1-")).await;
    let hit = store
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("the first chunk");
    assert_eq!(hit.tokens.len(), CHUNK);
    assert_eq!(hit.layers[0].k.dims(), &[1, HEADS, CHUNK, DIM]);
    let corrupt = |store: &ObjectPrefixStore| {
        store
            .counters()
            .objects_corrupt
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(corrupt(&store), 1);
    // The same in the first chunk: nothing to keep, an error that says why.
    let again = store_over(backend.clone(), Level::Lossless);
    plant(named("c-0-")).await;
    match again.load(&m, &prompt, 0).await {
        Err(StoreError::Corrupt { reason }) => {
            assert!(reason.contains("the model's cache has"), "{reason}")
        }
        other => panic!("a hostile header gave {other:?}"),
    }

    // An object larger than any chunk of the model can be is refused unread.
    let first = named("c-0-");
    backend
        .put(&first, vec![7u8; 200 * 1024].into())
        .await
        .unwrap();
    match store.load(&m, &prompt, 0).await {
        Err(StoreError::Corrupt { reason }) => assert!(reason.contains("more than"), "{reason}"),
        other => panic!("an oversized object gave {other:?}"),
    }
    // Without a layout (a fingerprint made up by a tool) the same object is still corrupt,
    // found by its seal instead.
    assert!(matches!(
        store.load(&model(1), &prompt, 0).await,
        Err(StoreError::Corrupt { .. })
    ));

    // An oversized tail: the full chunks before it still make the hit, and the next save
    // replaces it.
    let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = store_over(backend.clone(), Level::Lossless);
    store.save(&m, prefix(&saved, 0.0)).await.unwrap();
    let listed: Vec<Path> = {
        use futures::TryStreamExt;
        let listed: Vec<_> = backend.list(None).try_collect().await.unwrap();
        listed.into_iter().map(|o| o.location).collect()
    };
    let tail = listed
        .iter()
        .find(|p| p.filename().unwrap().starts_with("t-"))
        .unwrap();
    backend
        .put(tail, vec![7u8; 200 * 1024].into())
        .await
        .unwrap();
    let hit = store
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("the chunks");
    assert_eq!(hit.tokens.len(), 200 / CHUNK * CHUNK);
    assert_eq!(corrupt(&store), 1);
    store.save(&m, prefix(&saved, 0.0)).await.unwrap();
    let hit = store.load(&m, &prompt, 0).await.unwrap().expect("repaired");
    assert_eq!(hit.tokens.len(), 200);
}

#[tokio::test]
async fn a_three_node_garage_cluster_answers_through_a_dead_node_and_absorbs_its_return() {
    use integration_tests::s3::GarageCluster;
    let mut cluster = GarageCluster::start();
    let store = cluster.s3.config().build_store().unwrap();
    let m = model(1);
    let saved: Vec<(Vec<u32>, f32)> = (0..3).map(|i| (tokens(200, 100 + i), i as f32)).collect();
    for (t, seed) in &saved {
        store.save(&m, prefix(t, *seed)).await.unwrap();
    }

    // A node dies mid-run: two of three replicas answer every read and take every write.
    cluster.kill(2);
    for (t, seed) in &saved {
        loads_exactly(&store, &m, t, *seed).await;
    }
    let written_while_down = (tokens(200, 200), 7.0);
    store
        .save(&m, prefix(&written_while_down.0, written_while_down.1))
        .await
        .unwrap();
    loads_exactly(&store, &m, &written_while_down.0, written_while_down.1).await;

    // It comes back on its own data; then another node dies: everything still loads, what was
    // written while the first was down included.
    cluster.restart(2);
    cluster.kill(1);
    for (t, seed) in saved.iter().chain([&written_while_down]) {
        loads_exactly(&store, &m, t, *seed).await;
    }
}

/// `store` holds the suite's prefix of `tokens` (with `seed`) exactly.
async fn loads_exactly(
    store: &ObjectPrefixStore,
    m: &mistralrs_kvplugin::ModelFingerprint,
    tokens: &[u32],
    seed: f32,
) {
    let mut prompt = tokens.to_vec();
    prompt.push(1);
    let hit = store.load(m, &prompt, 0).await.unwrap().expect("a hit");
    assert_eq!(hit.tokens, tokens);
    assert_eq!(
        integration_tests::store_suite::max_diff(&hit, &prefix(tokens, seed), tokens.len()),
        0.0
    );
}

/// A chunk holding another prompt's tokens ends the hit after the good chunks before it, also
/// when they all arrive in one batch (the good ones waiting to be decoded were once dropped with
/// it: found by `kvplugin bench faults` on s3s-fs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_another_prompt_ends_the_hit_after_the_good_ones_that_came_with_it() {
    use integration_tests::store_suite::{max_diff, CHUNK};
    use mistralrs_kvplugin::store::{
        faulty::{Fault, FaultSwitch, FaultyStore},
        seal,
    };
    use std::sync::atomic::Ordering;

    let memory: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let switch = FaultSwitch::default();
    let store = store_over(
        Arc::new(FaultyStore::new(memory.clone(), switch.clone())),
        Level::Lossless,
    );
    let m = model(1);
    let (a, b) = (tokens(3 * CHUNK + 5, 1), tokens(3 * CHUNK + 5, 2));
    let saved_b = prefix(&b, 2.0);
    store.save(&m, prefix(&a, 1.0)).await.unwrap();
    store.save(&m, saved_b.clone()).await.unwrap();
    // b's third chunk is replaced with a's (a valid object, bound to another name).
    let mut third = (None, None);
    let paths: Vec<_> = {
        use futures::TryStreamExt;
        memory
            .list(None)
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .unwrap()
    };
    for path in paths {
        if !path.filename().unwrap().starts_with("c-2-") {
            continue;
        }
        let bytes = memory.get(&path).await.unwrap().bytes().await.unwrap();
        if seal::peek_tokens(&bytes, None).unwrap() == a[2 * CHUNK..3 * CHUNK] {
            third.0 = Some(bytes);
        } else {
            third.1 = Some(path);
        }
    }
    let (Some(a_third), Some(b_third)) = third else {
        panic!("each prompt has a third chunk")
    };
    memory.put(&b_third, a_third.into()).await.unwrap();

    // Equal delays: every fetch of the run completes at once and the decoder takes them in one
    // batch.
    switch.set(Fault::SlowReads(std::time::Duration::from_millis(50)));
    let hit = store
        .load(&m, &b, 0)
        .await
        .unwrap()
        .expect("two good chunks");
    assert_eq!(hit.tokens, b[..2 * CHUNK]);
    assert_eq!(max_diff(&hit, &saved_b, 2 * CHUNK), 0.0);
    assert_eq!(store.counters().objects_corrupt.load(Ordering::Relaxed), 1);
}
