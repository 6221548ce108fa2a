//! The store behaviour suite: one set of expectations every object-store backend must meet
//! (memory, local disk, s3s-fs, Garage). `tests/store_backends.rs` runs it against each.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use mistralrs_core::{KvPrefix, LayerKv};
use mistralrs_kvplugin::{
    codec::{Level, SINK_TOKENS},
    store::{ObjectPrefixStore, ObjectStoreConfig, PrefixStore, SaveOutcome, StoreError, StoreKey},
    ModelFingerprint,
};
use object_store::{path::Path, ObjectStore};

/// The suite's cache shape.
pub const LAYERS: usize = 3;
/// See [`LAYERS`].
pub const HEADS: usize = 2;
/// See [`LAYERS`].
pub const DIM: usize = 8;
/// Tokens per chunk of the suite's stores.
pub const CHUNK: usize = 64;

/// A made-up model fingerprint.
pub fn model(n: u8) -> ModelFingerprint {
    ModelFingerprint::from_bytes([n; 32])
}

/// A deterministic prefix cache for `tokens`.
pub fn prefix(tokens: &[u32], seed: f32) -> KvPrefix {
    let n = tokens.len();
    let layer = |l: usize, kv: f32| {
        let values: Vec<f32> = (0..HEADS * n * DIM)
            .map(|i| (i as f32 * 0.37 + l as f32 + kv + seed).sin() * 3.0)
            .collect();
        Tensor::from_vec(values, (1, HEADS, n, DIM), &Device::Cpu).unwrap()
    };
    KvPrefix {
        tokens: tokens.to_vec(),
        approximate_from: None,
        layers: (0..LAYERS)
            .map(|l| LayerKv {
                k: layer(l, 0.0),
                v: layer(l, 0.5),
            })
            .collect(),
    }
}

/// `n` deterministic token ids.
pub fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + salt) % 1000).collect()
}

/// Largest absolute value of an F32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference between the first `n` tokens of two prefixes, over every tensor.
pub fn max_diff(a: &KvPrefix, b: &KvPrefix, n: usize) -> f32 {
    let mut max = 0f32;
    for (x, y) in a.layers.iter().zip(&b.layers) {
        for (s, t) in [(&x.k, &y.k), (&x.v, &y.v)] {
            let d = max_abs(&(s.narrow(2, 0, n).unwrap() - t.narrow(2, 0, n).unwrap()).unwrap());
            max = max.max(d);
        }
    }
    max
}

/// Flips the bits of `mask` in the last byte of the object at `path` (inside the payload the
/// checksum covers, past the envelope's token ids).
pub async fn damage_last_byte(backend: &dyn ObjectStore, path: &Path, mask: u8) {
    let mut bytes = backend
        .get(path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= mask;
    backend.put(path, bytes.into()).await.unwrap();
}

/// A chunked store with small chunks over `backend`.
pub fn store_over(backend: Arc<dyn ObjectStore>, level: Level) -> ObjectPrefixStore {
    ObjectPrefixStore::new(
        backend,
        ObjectStoreConfig {
            chunk_tokens: CHUNK,
            level,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Runs the suite on `backend`. `reopen` gives a second store over the same backend data (a restarted process).
pub async fn behaviour_suite(
    backend: Arc<dyn ObjectStore>,
    reopen: impl Fn() -> Arc<dyn ObjectStore>,
) {
    let store = store_over(backend.clone(), Level::Lossless);
    let m = model(1);
    let saved_tokens = tokens(200, 0); // 3 full chunks and a tail of 8
    let saved = prefix(&saved_tokens, 0.0);

    // A miss on an empty store.
    let mut prompt = saved_tokens.clone();
    prompt.extend([5, 6, 7]);
    assert!(store.load(&m, &prompt, 0).await.unwrap().is_none());

    // Save, then load: everything the prompt shares, exactly (lossless).
    assert!(matches!(
        store.save(&m, saved.clone()).await.unwrap(),
        SaveOutcome::Written { .. }
    ));
    let hit = store.load(&m, &prompt, 0).await.unwrap().expect("hit");
    assert_eq!(hit.tokens, saved_tokens);
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);
    assert_eq!(hit.layers[0].k.dims(), &[1, HEADS, 200, DIM]);
    assert_eq!(hit.approximate_from, None);

    // Saving again writes nothing.
    assert_eq!(
        store.save(&m, saved.clone()).await.unwrap(),
        SaveOutcome::AlreadyPresent
    );

    // A shorter prefix of the same tokens leaves the longer tail in place (only the tail's
    // token ids are read to decide).
    assert_eq!(
        store
            .save(&m, prefix(&saved_tokens[..196], 0.0))
            .await
            .unwrap(),
        SaveOutcome::AlreadyPresent
    );
    let hit = store.load(&m, &prompt, 0).await.unwrap().expect("hit");
    assert_eq!(hit.tokens.len(), 200, "the longer tail is still there");

    // The prompt itself leaves its last token to the engine.
    let hit = store
        .load(&m, &saved_tokens, 0)
        .await
        .unwrap()
        .expect("hit");
    assert_eq!(hit.tokens.len(), 199);

    // Divergence inside the tail: the shared part of the tail is used.
    let mut diverging = saved_tokens[..195].to_vec();
    diverging.extend([999, 998, 997]);
    let hit = store.load(&m, &diverging, 0).await.unwrap().expect("hit");
    assert_eq!(hit.tokens.len(), 195);
    assert_eq!(max_diff(&hit, &saved, 195), 0.0);

    // Divergence inside a full chunk: the chunks before it.
    let mut early = saved_tokens[..100].to_vec();
    early.extend(tokens(50, 3));
    let hit = store.load(&m, &early, 0).await.unwrap().expect("hit");
    assert_eq!(hit.tokens.len(), CHUNK);

    // Into buffers of the engine's capacity: the prefix in the first rows and zeros after it; a
    // hit that ends early (here inside the second chunk) gets the capacity of what it covers.
    let capacity = |n: usize| n.div_ceil(96) * 96;
    let hit = store
        .load_with_capacity(&m, &prompt, 0, &capacity)
        .await
        .unwrap()
        .expect("hit");
    assert_eq!(hit.tokens, saved_tokens);
    assert_eq!(hit.layers[0].k.dims(), &[1, HEADS, 288, DIM]);
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);
    for layer in &hit.layers {
        assert_eq!(max_abs(&layer.v.narrow(2, 200, 88).unwrap()), 0.0);
    }
    let hit = store
        .load_with_capacity(&m, &early, 0, &capacity)
        .await
        .unwrap()
        .expect("hit");
    assert_eq!(hit.tokens.len(), CHUNK);
    assert_eq!(hit.layers[0].k.dims(), &[1, HEADS, capacity(CHUNK), DIM]);
    assert_eq!(max_diff(&hit, &saved, CHUNK), 0.0);

    // Not longer than what the caller already has: nothing.
    assert!(store.load(&m, &prompt, 200).await.unwrap().is_none());
    // Another model: nothing.
    assert!(store.load(&model(2), &prompt, 0).await.unwrap().is_none());

    // A restarted process finds everything.
    let again = store_over(reopen(), Level::Lossless);
    let hit = again
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("hit after restart");
    assert_eq!(hit.tokens.len(), 200);

    // Lossy level: same coverage, values close.
    let lossy = store_over(backend.clone(), Level::Default);
    lossy.save(&m, saved.clone()).await.unwrap();
    let hit = lossy
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("lossy hit");
    assert_eq!(hit.tokens.len(), 200);
    // The codec's bound is s * step / 2 per value: the group scale s is at most the amplitude 3
    // and the default level's largest step is 0.5.
    let d = max_diff(&hit, &saved, 200);
    assert!(d > 0.0 && d <= 3.0 * 0.5 / 2.0 * 1.01, "lossy error {d}");
    // Marked approximate from the first lossy row (the first token is stored exactly); an exact
    // hit is marked exact.
    assert_eq!(hit.approximate_from, Some(SINK_TOKENS));

    // A damaged object is an error, never a wrong answer or a panic.
    let objects: Vec<_> = {
        use futures::TryStreamExt;
        backend.list(None).try_collect::<Vec<_>>().await.unwrap()
    };
    let victim: Path = objects
        .iter()
        .map(|o| o.location.clone())
        .find(|p| p.as_ref().contains("/c-") && p.as_ref().ends_with(".lossless"))
        .expect("a lossless chunk");
    assert!(victim.as_ref().contains("/c-0-"), "{victim}");
    damage_last_byte(&*backend, &victim, 0xff).await;
    match store.load(&m, &prompt, 0).await {
        Err(StoreError::Codec(_)) | Err(StoreError::Corrupt { .. }) => {}
        other => panic!("damaged object gave {other:?}"),
    }
    assert_eq!(count(&store.counters().objects_corrupt), 1);

    // The load remembered it: the next save of its chain replaces it (an intact chunk would be
    // left alone), and the whole prefix hits again.
    store.save(&m, saved.clone()).await.unwrap();
    assert_eq!(count(&store.counters().objects_repaired), 1);
    let hit = store.load(&m, &prompt, 0).await.unwrap().expect("repaired");
    assert_eq!(hit.tokens.len(), 200);
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);

    // A damaged later chunk ends the hit where it starts: the chunk before it is used.
    let second = objects
        .iter()
        .map(|o| o.location.clone())
        .find(|p| p.as_ref().contains("/c-1-") && p.as_ref().ends_with(".lossless"))
        .expect("the second lossless chunk");
    damage_last_byte(&*backend, &second, 0x01).await;
    let hit = store
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("first chunk");
    assert_eq!(hit.tokens, saved_tokens[..CHUNK]);
    assert_eq!(max_diff(&hit, &saved, CHUNK), 0.0);
    assert_eq!(count(&store.counters().objects_corrupt), 2);

    keyed_suite(backend).await;
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// Stores with a deployment key: sealed objects, keyed names, forgeries refused and repaired.
async fn keyed_suite(backend: Arc<dyn ObjectStore>) {
    const NAMESPACE: &str = "keyed";
    let store_encrypting = |secret: Option<&str>, encrypt: bool| {
        ObjectPrefixStore::new(
            backend.clone(),
            ObjectStoreConfig {
                namespace: NAMESPACE.into(),
                chunk_tokens: CHUNK,
                level: Level::Lossless,
                key: secret.map(|s| {
                    Arc::new(
                        StoreKey::from_secret(s.as_bytes())
                            .unwrap()
                            .encrypting(encrypt),
                    )
                }),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let store = |secret| store_encrypting(secret, true);
    let secret = "the deployment's shared secret";
    let m = model(1);
    let saved_tokens = tokens(200, 11);
    let saved = prefix(&saved_tokens, 1.0);
    let mut prompt = saved_tokens.clone();
    prompt.push(4);

    let writer = store(Some(secret));
    writer.save(&m, saved.clone()).await.unwrap();
    // Another process with the same secret finds everything, exactly.
    let reader = store(Some(secret));
    let hit = reader
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("keyed hit");
    assert_eq!(hit.tokens, saved_tokens);
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);
    // Encrypted: a reader of the bucket finds no run of the prompt's token ids in any object.
    let id_runs: std::collections::HashSet<Vec<u8>> = saved_tokens
        .windows(4)
        .map(|w| w.iter().flat_map(|t| t.to_le_bytes()).collect())
        .collect();
    let written = list(&*backend, NAMESPACE).await;
    assert!(written.len() >= 2, "{written:?}");
    for path in &written {
        let bytes = backend.get(path).await.unwrap().bytes().await.unwrap();
        assert!(
            !bytes.windows(16).any(|w| id_runs.contains(w)),
            "{path} holds the prompt's token ids in the clear"
        );
    }
    // Another secret, or none: the names are keyed, so there is nothing to find (not even a
    // way to test whether the prompt was seen), and nothing is counted as bad.
    for stranger in [store(Some("another tenant's secret")), store(None)] {
        assert!(stranger.load(&m, &prompt, 0).await.unwrap().is_none());
        assert_eq!(count(&stranger.counters().objects_refused), 0);
    }

    // A writer without the secret who can list the bucket plants its own object (a valid
    // checksum, the right tokens, other values) under the name of the keyed second chunk.
    let second_chunk = |listed: Vec<Path>| -> Path {
        listed
            .into_iter()
            .find(|p| p.as_ref().rsplit('/').next().unwrap().starts_with("c-1-"))
            .expect("a second chunk")
    };
    let ours = second_chunk(list(&*backend, NAMESPACE).await);
    let keyless = store(None);
    keyless.save(&m, prefix(&saved_tokens, 9.0)).await.unwrap();
    let theirs = second_chunk(
        list(&*backend, NAMESPACE)
            .await
            .into_iter()
            .filter(|p| p != &ours)
            .collect(),
    );
    let plant = backend.get(&theirs).await.unwrap().bytes().await.unwrap();
    backend.put(&ours, plant.into()).await.unwrap();

    // Refused before decoding: the hit ends at the first chunk, the refusal is counted.
    let hit = reader
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("first chunk");
    assert_eq!(hit.tokens, saved_tokens[..CHUNK]);
    assert_eq!(max_diff(&hit, &saved, CHUNK), 0.0);
    assert_eq!(count(&reader.counters().objects_refused), 1);
    // The reader's next save of the chain replaces the plant.
    reader.save(&m, saved.clone()).await.unwrap();
    assert_eq!(count(&reader.counters().objects_repaired), 1);
    let hit = reader
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("repaired");
    assert_eq!(hit.tokens, saved_tokens);
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);
    // A process with the same secret that writes MAC-sealed clear objects (`encrypt = false`)
    // shares the cache both ways.
    let other_tokens = tokens(200, 12);
    let other = prefix(&other_tokens, 2.0);
    let clear_writer = store_encrypting(Some(secret), false);
    clear_writer.save(&m, other.clone()).await.unwrap();
    let hit = reader
        .load(&m, &other_tokens, 0)
        .await
        .unwrap()
        .expect("a MAC-sealed object under the same secret");
    assert_eq!(max_diff(&hit, &other, 199), 0.0);
    let hit = clear_writer
        .load(&m, &prompt, 0)
        .await
        .unwrap()
        .expect("an encrypted object under the same secret");
    assert_eq!(max_diff(&hit, &saved, 200), 0.0);
}

/// Every object under `namespace`.
async fn list(backend: &dyn ObjectStore, namespace: &str) -> Vec<Path> {
    use futures::TryStreamExt;
    backend
        .list(Some(&Path::from(namespace)))
        .map_ok(|o| o.location)
        .try_collect()
        .await
        .unwrap()
}
