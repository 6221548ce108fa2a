//! Object-store specifics that need no backend variety: dtypes survive a round trip, and bad
//! settings are refused by name. The behaviour suite every backend runs is in
//! `integration-tests/src/store_suite.rs`.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use mistralrs_core::{KvPrefix, LayerKv};
use mistralrs_kvplugin::{
    codec::Level,
    store::{ObjectPrefixStore, ObjectStoreConfig, PrefixStore},
    ModelFingerprint,
};
use object_store::{memory::InMemory, ObjectStore};

const LAYERS: usize = 3;
const HEADS: usize = 2;
const DIM: usize = 8;

fn model(n: u8) -> ModelFingerprint {
    ModelFingerprint::from_bytes([n; 32])
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + salt) % 1000).collect()
}

fn prefix(tokens: &[u32], seed: f32) -> KvPrefix {
    let n = tokens.len();
    let layer = |l: usize, kv: f32| {
        let values: Vec<f32> = (0..HEADS * n * DIM)
            .map(|i| (i as f32 * 0.37 + l as f32 + kv + seed).sin() * 3.0)
            .collect();
        Tensor::from_vec(values, (1, HEADS, n, DIM), &Device::Cpu).unwrap()
    };
    KvPrefix {
        tokens: tokens.to_vec(),
        layers: (0..LAYERS)
            .map(|l| LayerKv {
                k: layer(l, 0.0),
                v: layer(l, 0.5),
            })
            .collect(),
    }
}

fn store_over(backend: Arc<dyn ObjectStore>, level: Level) -> ObjectPrefixStore {
    ObjectPrefixStore::new(
        backend,
        ObjectStoreConfig {
            chunk_tokens: 64,
            level,
            ..Default::default()
        },
    )
    .unwrap()
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
