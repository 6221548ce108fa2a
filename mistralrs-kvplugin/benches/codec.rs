//! Criterion benchmarks of the codec on one thread: encode and decode of a 256-token chunk with
//! SmolLM2-135M's shape (30 layers, 3 KV heads of 64) at every level, and the raw rANS coder.
//! Throughput is reported in bytes of 16-bit KV (2 bytes a value), the unit of the codec targets.
//! The data is synthetic but KV-like (per-channel offsets and outlier channels, smooth along
//! tokens); `kvplugin bench codec` measures the same on the real model's cache. The `rans` group
//! compares our coders (version 2's eight lanes, version 1's four states) with `constriction`'s ANS coder on the same symbols.

use constriction::{
    stream::{
        model::{DefaultContiguousCategoricalEntropyModel, SmallContiguousCategoricalEntropyModel},
        stack::{DefaultAnsCoder, SmallAnsCoder},
        Decode,
    },
    UnwrapInfallible,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mistralrs_kvplugin::codec::{
    self,
    rans::{self, FreqTable},
    reader::Reader,
    ChunkShape, KvChunk, KvDType, Level,
};

fn kv_like_chunk() -> KvChunk {
    let shape = ChunkShape {
        n_layers: 30,
        n_kv_heads: 3,
        head_dim: 64,
        n_tokens: 256,
    };
    let mut state = 0x2545f4914f6cdd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let tensors: Vec<Vec<f32>> = (0..shape.n_tensors())
        .map(|_| {
            let mut t = Vec::with_capacity(shape.tensor_len());
            for _h in 0..shape.n_kv_heads {
                for tok in 0..shape.n_tokens {
                    for c in 0..shape.head_dim {
                        let scale = if c % 17 == 3 { 8.0 } else { 1.0 };
                        t.push(scale * ((tok as f32 * 0.03 + c as f32).sin() + noise()));
                    }
                }
            }
            t
        })
        .collect();
    KvChunk::from_f32_tensors(shape, KvDType::F32, &tensors).unwrap()
}

fn codec_levels(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let chunk = kv_like_chunk();
    let model = [0u8; 32];
    let mut group = c.benchmark_group("codec-1-thread");
    group.throughput(Throughput::Bytes(chunk.shape().n_values() as u64 * 2));
    group.sample_size(10);
    for level in Level::ALL {
        let encoded = codec::encode(&chunk, level, &model).unwrap();
        group.bench_function(BenchmarkId::new("encode", level.name()), |b| {
            b.iter(|| pool.install(|| codec::encode(&chunk, level, &model).unwrap()))
        });
        group.bench_function(BenchmarkId::new("decode", level.name()), |b| {
            b.iter(|| pool.install(|| codec::decode(&encoded, &model).unwrap()))
        });
        // The store's path: every tensor decoded straight into (here, reused) f32 buffers.
        group.bench_function(BenchmarkId::new("decode-into", level.name()), |b| {
            let shape = chunk.shape();
            let mut buffers = vec![vec![0f32; shape.tensor_len()]; shape.n_tensors()];
            b.iter(|| {
                let parsed = codec::ParsedChunk::parse(&encoded, &model).unwrap();
                for (t, data) in buffers.iter_mut().enumerate() {
                    let mut dest = codec::Dest {
                        data,
                        tokens: shape.n_tokens,
                        token_offset: 0,
                        take: shape.n_tokens,
                    };
                    parsed.decode_tensor_into(t, &mut dest).unwrap();
                }
            })
        });
    }
    group.finish();
}

fn rans_coder(c: &mut Criterion) {
    // A peaked distribution over 15 symbols, like quantised KV.
    let n = 1 << 20;
    let mut state = 12345u64;
    let symbols: Vec<u16> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let u = (state >> 33) as f64 / (1u64 << 31) as f64;
            (7.0 + (u - 0.5) * (u - 0.5).abs() * 28.0).round() as u16
        })
        .collect();
    let mut counts = vec![0u32; 15];
    symbols.iter().for_each(|&s| counts[s as usize] += 1);
    let table = FreqTable::from_counts(&counts).unwrap();
    let mut group = c.benchmark_group("rans");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    type Encoder = fn(&[u16], &FreqTable, &mut Vec<u8>);
    type Decoder = fn(&mut Reader<'_>, &FreqTable, &mut [u16]) -> Result<(), codec::CodecError>;
    let coders: [(&str, Encoder, Decoder); 2] = [
        ("lanes", rans::encode_lanes, rans::decode_lanes),
        ("four-states", rans::encode4, rans::decode4),
    ];
    for (name, encode, decode) in coders {
        let mut stream = Vec::new();
        encode(&symbols, &table, &mut stream);
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| {
                let mut out = Vec::with_capacity(stream.len());
                encode(&symbols, &table, &mut out);
                out
            })
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            let mut out = vec![0u16; n];
            b.iter(|| decode(&mut Reader::new(&stream), &table, &mut out).unwrap())
        });
    }

    // The well-kept alternative: constriction's ANS coder with a categorical model of the same
    // distribution, both its presets (24-bit probabilities on 32-bit words, and 12-bit
    // probabilities on 16-bit words, the precision of ours).
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    let probabilities: Vec<f64> = counts.iter().map(|&c| c as f64 / total).collect();
    let message: Vec<usize> = symbols.iter().map(|&s| s as usize).collect();
    let default_model =
        DefaultContiguousCategoricalEntropyModel::from_floating_point_probabilities_fast(
            &probabilities,
            None,
        )
        .unwrap();
    let small_model =
        SmallContiguousCategoricalEntropyModel::from_floating_point_probabilities_fast(
            &probabilities,
            None,
        )
        .unwrap();
    group.bench_function("constriction-default-encode", |b| {
        b.iter(|| {
            let mut coder = DefaultAnsCoder::new();
            coder
                .encode_iid_symbols_reverse(message.iter().copied(), default_model.as_view())
                .unwrap();
            coder.into_compressed().unwrap_infallible()
        })
    });
    let mut coder = DefaultAnsCoder::new();
    coder
        .encode_iid_symbols_reverse(message.iter().copied(), default_model.as_view())
        .unwrap();
    let compressed = coder.into_compressed().unwrap_infallible();
    group.bench_function("constriction-default-decode", |b| {
        b.iter(|| {
            let mut decoder = DefaultAnsCoder::from_compressed(compressed.clone()).unwrap();
            decoder
                .decode_iid_symbols(n, default_model.as_view())
                .map(UnwrapInfallible::unwrap_infallible)
                .fold(0usize, |acc, s| acc ^ s)
        })
    });
    let mut coder = SmallAnsCoder::new();
    coder
        .encode_iid_symbols_reverse(message.iter().copied(), small_model.as_view())
        .unwrap();
    let compressed = coder.into_compressed().unwrap_infallible();
    group.bench_function("constriction-small-decode", |b| {
        b.iter(|| {
            let mut decoder = SmallAnsCoder::from_compressed(compressed.clone()).unwrap();
            decoder
                .decode_iid_symbols(n, small_model.as_view())
                .map(UnwrapInfallible::unwrap_infallible)
                .fold(0usize, |acc, s| acc ^ s)
        })
    });
    group.finish();
}

// The macro defines an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, codec_levels, rans_coder);
}
use group::benches;
criterion_main!(benches);
