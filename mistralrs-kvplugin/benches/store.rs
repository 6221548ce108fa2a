//! Criterion benchmarks of whole-prefix store loads from local disk: a 6,042-token prefix with
//! SmolLM2-135M's shape (30 layers, 3 KV heads of 64, F32) saved at `high` and `lossless`, then
//! loaded into buffers of the engine's capacity (rows rounded up to 512) as the hook does, from a
//! store without a key (objects sealed by checksum) and with a key (encrypted, the default with
//! one, or keyed MACs in the clear with `encrypt = false`). This is
//! the store's share of a hit's TTFT, without the engine (`kvplugin bench offload` measures the
//! whole hit on the real model); run it under `perf record` to see where a load's time goes.
//!
//! The data is synthetic but KV-like (as in `benches/codec.rs`), so the compressed sizes are near
//! the real model's, not equal to them.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mistralrs_core::{KvPrefix, LayerKv};
use mistralrs_kvplugin::{
    codec::{KvDType, Level},
    fingerprint::{KvLayout, ModelFingerprint},
    store::{ObjectPrefixStore, ObjectStoreConfig, PrefixStore, StoreKey},
};
use object_store::local::LocalFileSystem;

const LAYERS: usize = 30;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const TOKENS: usize = 6_042;
/// `NormalCache::CACHE_GROW_SIZE` in mistral.rs 0.8.1.
const GROW: usize = 512;

fn kv_like_prefix(tokens: Vec<u32>) -> KvPrefix {
    let mut state = 0x2545f4914f6cdd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let n = tokens.len();
    let mut tensor = |layer: usize| {
        let mut t = Vec::with_capacity(KV_HEADS * n * HEAD_DIM);
        for h in 0..KV_HEADS {
            for tok in 0..n {
                for c in 0..HEAD_DIM {
                    let scale = if (c + layer + h) % 17 == 3 { 8.0 } else { 1.0 };
                    t.push(scale * ((tok as f32 * 0.03 + c as f32).sin() + noise()));
                }
            }
        }
        Tensor::from_vec(t, (1, KV_HEADS, n, HEAD_DIM), &Device::Cpu).unwrap()
    };
    let layers = (0..LAYERS)
        .map(|l| LayerKv {
            k: tensor(l),
            v: tensor(l + 100),
        })
        .collect();
    KvPrefix {
        tokens,
        layers,
        approximate_from: None,
    }
}

fn store_load(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("kvplugin-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backend = Arc::new(LocalFileSystem::new_with_prefix(&dir).unwrap());
    let model = ModelFingerprint::from_bytes([7; 32]).with_layout(KvLayout {
        n_layers: LAYERS,
        n_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        dtype: KvDType::F32,
    });
    // One more token than the prefix: a hit is always shorter than its prompt.
    let prompt: Vec<u32> = (0..TOKENS as u32 + 1)
        .map(|i| (i * 7919) % 49_152)
        .collect();
    let prefix = kv_like_prefix(prompt[..TOKENS].to_vec());
    let capacity = |n: usize| n.div_ceil(GROW) * GROW;

    let mut group = c.benchmark_group("store_load");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TOKENS as u64));
    let key = StoreKey::from_secret(b"a benchmark's deployment secret").unwrap();
    // With a key: encrypted (the default) or MAC-sealed in the clear.
    let (encrypted, clear) = (
        Arc::new(key.encrypting(true)),
        Arc::new(key.encrypting(false)),
    );
    for (level, key) in [
        (Level::High, None),
        (Level::Lossless, None),
        (Level::Lossless, Some(clear)),
        (Level::Lossless, Some(encrypted)),
    ] {
        let name = match &key {
            Some(key) if key.encrypts() => format!("{}-encrypted", level.name()),
            Some(_) => format!("{}-keyed", level.name()),
            None => level.name().to_string(),
        };
        let store = ObjectPrefixStore::new(
            backend.clone(),
            ObjectStoreConfig {
                namespace: format!("bench-{name}"),
                level,
                key,
                ..ObjectStoreConfig::default()
            },
        )
        .unwrap();
        runtime
            .block_on(store.save(&model, prefix.clone()))
            .unwrap();
        group.bench_with_input(BenchmarkId::new("disk", &name), &store, |b, store| {
            b.iter(|| {
                let loaded = runtime
                    .block_on(store.load_with_capacity(&model, &prompt, 0, &capacity))
                    .unwrap()
                    .expect("a hit");
                assert_eq!(loaded.tokens.len(), TOKENS);
                loaded
            })
        });
    }
    group.finish();
    std::fs::remove_dir_all(&dir).ok();
}

// The macro defines an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, store_load);
}
use group::benches;
criterion_main!(benches);
