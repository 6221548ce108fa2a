//! The store behaviour suite: one set of expectations every object-store backend must meet
//! (memory, local disk, s3s-fs, Garage). `tests/store_backends.rs` runs it against each.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use mistralrs_core::{KvPrefix, LayerKv};
use mistralrs_kvplugin::{
    codec::Level,
    store::{ObjectPrefixStore, ObjectStoreConfig, PrefixStore, SaveOutcome, StoreError},
    ModelFingerprint,
};
use object_store::{path::Path, ObjectStore};

const LAYERS: usize = 3;
const HEADS: usize = 2;
const DIM: usize = 8;
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
    damage_last_byte(&*backend, &victim, 0xff).await;
    match store.load(&m, &prompt, 0).await {
        Err(StoreError::Codec(_)) | Err(StoreError::Corrupt { .. }) => {}
        other => panic!("damaged object gave {other:?}"),
    }
}
