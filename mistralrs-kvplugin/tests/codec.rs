//! Codec behaviour: round trips (proptest), error bounds, every rejection path, golden files of
//! every format version, and arbitrary bytes never panicking the decoder.

use half::f16;
use mistralrs_kvplugin::codec::{
    self, format, ChunkShape, CodecError, EncodeOptions, Grouping, KvChunk, KvDType, Level,
};
use proptest::prelude::*;

const MODEL: [u8; 32] = [7; 32];

/// A deterministic chunk with KV-like structure: per-channel offsets and scales (some outlier
/// channels), smooth variation along tokens, and noise.
fn synthetic_chunk(shape: ChunkShape, dtype: KvDType, seed: u64) -> KvChunk {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    let tensors: Vec<Vec<f32>> = (0..shape.n_tensors())
        .map(|_| {
            let channel: Vec<(f32, f32)> = (0..shape.n_kv_heads * shape.head_dim)
                .map(|c| {
                    let outlier = if c % 17 == 3 { 12.0 } else { 1.0 };
                    (next() * 2.0 * outlier, (0.2 + next().abs()) * outlier)
                })
                .collect();
            let mut t = Vec::with_capacity(shape.tensor_len());
            for h in 0..shape.n_kv_heads {
                for tok in 0..shape.n_tokens {
                    for c in 0..shape.head_dim {
                        let (mu, s) = channel[h * shape.head_dim + c];
                        let smooth = (tok as f32 * 0.05 + c as f32).sin();
                        t.push(mu + s * (0.7 * smooth + 0.5 * next()));
                    }
                }
            }
            t
        })
        .collect();
    KvChunk::from_f32_tensors(shape, dtype, &tensors).unwrap()
}

fn shape(n_layers: usize, n_kv_heads: usize, head_dim: usize, n_tokens: usize) -> ChunkShape {
    ChunkShape {
        n_layers,
        n_kv_heads,
        head_dim,
        n_tokens,
    }
}

/// Largest error the format allows for each value of tensor `t` (its group's `s * step / 2`,
/// recomputed here from the specification); 0 for the `exact` leading tokens.
fn error_bounds(
    chunk: &KvChunk,
    t: usize,
    step: f32,
    grouping: Grouping,
    exact: usize,
) -> Vec<f32> {
    let s = chunk.shape();
    let x = chunk.tensor_f32(t);
    let mut bounds = vec![0f32; x.len()];
    let at = |h: usize, tok: usize, c: usize| (h * s.n_tokens + tok) * s.head_dim + c;
    let groups: Vec<Vec<usize>> = match grouping {
        Grouping::PerChannel => (0..s.n_kv_heads * s.head_dim)
            .map(|g| {
                let (h, c) = (g / s.head_dim, g % s.head_dim);
                (exact..s.n_tokens).map(|tok| at(h, tok, c)).collect()
            })
            .collect(),
        Grouping::PerToken => (0..s.n_kv_heads)
            .flat_map(|h| (exact..s.n_tokens).map(move |tok| (h, tok)))
            .map(|(h, tok)| (0..s.head_dim).map(|c| at(h, tok, c)).collect())
            .collect(),
        Grouping::PerHead => (0..s.n_kv_heads)
            .map(|h| {
                (exact..s.n_tokens)
                    .flat_map(|tok| (0..s.head_dim).map(move |c| at(h, tok, c)))
                    .collect()
            })
            .collect(),
    };
    for idx in groups.into_iter().filter(|g| !g.is_empty()) {
        let mean = idx.iter().map(|&i| x[i] as f64).sum::<f64>() / idx.len() as f64;
        let mu = f16::from_f64(mean).to_f32();
        let rms = (idx
            .iter()
            .map(|&i| ((x[i] - mu) as f64).powi(2))
            .sum::<f64>()
            / idx.len() as f64)
            .sqrt() as f32;
        // s is rms rounded up to an f16 (relative step 2^-10); allow f32 arithmetic slack.
        let s_max = if rms > 0.0 {
            rms * (1.0 + 1.0 / 512.0)
        } else {
            1.0
        };
        for &i in &idx {
            bounds[i] = s_max * step / 2.0 * 1.001 + (mu.abs() + x[i].abs()) * 1e-6;
        }
    }
    bounds
}

fn check_lossy_bound(chunk: &KvChunk, level: Level, start: usize) {
    let spec = level.lossy_spec().unwrap();
    let options = EncodeOptions::for_chunk(level, start);
    let encoded = codec::encode_with(chunk, &options, &MODEL).unwrap();
    let decoded = codec::decode(&encoded, &MODEL).unwrap();
    let s = chunk.shape();
    let exact = options.exact_leading_tokens.min(s.n_tokens);
    for t in 0..s.n_tensors() {
        let q = if t % 2 == 1 { spec.values } else { spec.keys };
        let step = q.steps[((t / 2) * 3 / s.n_layers).min(2)];
        let bounds = error_bounds(chunk, t, step, q.grouping, exact);
        let (x, y) = (chunk.tensor_f32(t), decoded.tensor_f32(t));
        for i in 0..x.len() {
            let token = (i / s.head_dim) % s.n_tokens;
            if token < exact {
                assert_eq!(
                    x[i].to_bits(),
                    y[i].to_bits(),
                    "{level:?} exact token {token}"
                );
                continue;
            }
            let rounding = match chunk.dtype() {
                KvDType::F32 => 0.0,
                // the decoded value is stored in the chunk's dtype again
                KvDType::F16 => y[i].abs() / 1024.0,
                KvDType::BF16 => y[i].abs() / 128.0,
            };
            assert!(
                (x[i] - y[i]).abs() <= bounds[i] + rounding,
                "{level:?} tensor {t} value {i}: {} vs {} (bound {})",
                x[i],
                y[i],
                bounds[i]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn lossless_round_trips_bit_exactly(
        layers in 1usize..4, heads in 1usize..4, dim in 1usize..20, tokens in 1usize..40,
        dtype in prop_oneof![Just(KvDType::F32), Just(KvDType::F16), Just(KvDType::BF16)],
        seed in any::<u64>(),
    ) {
        let chunk = synthetic_chunk(shape(layers, heads, dim, tokens), dtype, seed);
        let encoded = codec::encode(&chunk, Level::Lossless, &MODEL).unwrap();
        prop_assert_eq!(codec::decode(&encoded, &MODEL).unwrap(), chunk);
    }

    #[test]
    fn lossless_keeps_arbitrary_bit_patterns(bytes in proptest::collection::vec(any::<u8>(), 1..400)) {
        // NaNs, infinities and denormals included: lossless is about bytes, not numbers.
        let n = bytes.len() / 4;
        prop_assume!(n > 0);
        // One layer: K and V are both the given bytes.
        let data = [&bytes[..n * 4], &bytes[..n * 4]].concat();
        let chunk = KvChunk::from_bytes(shape(1, 1, n, 1), KvDType::F32, data).unwrap();
        let encoded = codec::encode(&chunk, Level::Lossless, &MODEL).unwrap();
        prop_assert_eq!(codec::decode(&encoded, &MODEL).unwrap(), chunk);
    }

    #[test]
    fn lossy_levels_stay_within_their_error_bound(
        layers in 1usize..5, heads in 1usize..3, dim in 1usize..17, tokens in 1usize..70,
        dtype in prop_oneof![Just(KvDType::F32), Just(KvDType::F16), Just(KvDType::BF16)],
        seed in any::<u64>(),
    ) {
        let chunk = synthetic_chunk(shape(layers, heads, dim, tokens), dtype, seed);
        for level in [Level::Fine, Level::Default, Level::Coarse] {
            // The sequence's first chunk (sink token exact) and a later one.
            check_lossy_bound(&chunk, level, 0);
            check_lossy_bound(&chunk, level, 256);
        }
    }

    #[test]
    fn decoding_into_a_prefix_buffer_matches_decode(
        heads in 1usize..3, dim in 1usize..17, tokens in 1usize..40,
        dtype in prop_oneof![Just(KvDType::F32), Just(KvDType::F16), Just(KvDType::BF16)],
        grouping in prop_oneof![Just(Grouping::PerChannel), Just(Grouping::PerToken), Just(Grouping::PerHead)],
        level in prop_oneof![Just(Level::Lossless), Just(Level::Fine), Just(Level::Coarse)],
        before in 0usize..5, after in 0usize..5, take_frac in 0.0f64..=1.0, start in 0usize..3,
        seed in any::<u64>(),
    ) {
        // The store's fast path: a chunk decoded straight into a longer buffer, at an offset,
        // keeping only its first `take` tokens, must equal `decode`'s values there and leave
        // every other value untouched.
        let chunk = synthetic_chunk(shape(2, heads, dim, tokens), dtype, seed);
        let spec = level.lossy_spec().map(|mut s| {
            s.keys.grouping = grouping;
            s.values.grouping = grouping;
            s
        });
        let options = EncodeOptions { spec, ..EncodeOptions::for_chunk(level, start) };
        let encoded = codec::encode_with(&chunk, &options, &MODEL).unwrap();
        let decoded = codec::decode(&encoded, &MODEL).unwrap();
        let parsed = codec::ParsedChunk::parse(&encoded, &MODEL).unwrap();
        let take = ((tokens as f64 * take_frac).round() as usize).min(tokens);
        let total = before + tokens + after;
        for t in 0..4 {
            let mut buffer = vec![f32::NAN; heads * total * dim];
            parsed
                .decode_tensor_into(t, &mut codec::Dest {
                    data: &mut buffer,
                    tokens: total,
                    token_offset: before,
                    take,
                })
                .unwrap();
            let want = decoded.tensor_f32(t);
            for h in 0..heads {
                for tok in 0..total {
                    for c in 0..dim {
                        // Dequantised values come out in f32; rounded to the chunk's dtype (as
                        // the store does when it builds the engine's tensors) they are decode's.
                        let raw = buffer[(h * total + tok) * dim + c];
                        let got = match dtype {
                            KvDType::F32 => raw,
                            KvDType::F16 => f16::from_f32(raw).to_f32(),
                            KvDType::BF16 => half::bf16::from_f32(raw).to_f32(),
                        };
                        if tok >= before && tok < before + take {
                            let w = want[(h * tokens + tok - before) * dim + c];
                            prop_assert_eq!(got.to_bits(), w.to_bits(), "h {} tok {} c {}", h, tok, c);
                        } else {
                            prop_assert!(got.is_nan(), "wrote outside its span at h {} tok {}", h, tok);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn decoding_into_a_buffer_of_the_wrong_size_is_an_error() {
    let chunk = synthetic_chunk(shape(1, 2, 8, 10), KvDType::F32, 1);
    let encoded = codec::encode(&chunk, Level::Default, &MODEL).unwrap();
    let parsed = codec::ParsedChunk::parse(&encoded, &MODEL).unwrap();
    let mut small = vec![0f32; 2 * 10 * 8 - 1];
    let mut dest = codec::Dest {
        data: &mut small,
        tokens: 10,
        token_offset: 0,
        take: 10,
    };
    assert!(matches!(
        parsed.decode_tensor_into(0, &mut dest),
        Err(CodecError::ShapeMismatch { .. })
    ));
    let mut exact = vec![0f32; 2 * 10 * 8];
    let mut past_end = codec::Dest {
        data: &mut exact,
        tokens: 10,
        token_offset: 1,
        take: 10,
    };
    assert!(parsed.decode_tensor_into(0, &mut past_end).is_err());
    let mut ok = codec::Dest {
        data: &mut exact,
        tokens: 10,
        token_offset: 0,
        take: 10,
    };
    assert!(
        parsed.decode_tensor_into(2, &mut ok).is_err(),
        "tensor index past the chunk"
    );
}

#[test]
fn lossy_levels_get_smaller_and_coarser_in_order() {
    let chunk = synthetic_chunk(shape(6, 3, 64, 256), KvDType::F32, 1);
    let mut last_size = usize::MAX;
    let mut last_err = 0.0f64;
    for level in Level::ALL {
        let encoded = codec::encode(&chunk, level, &MODEL).unwrap();
        let decoded = codec::decode(&encoded, &MODEL).unwrap();
        let err: f64 = (0..12)
            .flat_map(|t| {
                chunk
                    .tensor_f32(t)
                    .into_iter()
                    .zip(decoded.tensor_f32(t))
                    .map(|(a, b)| ((a - b) as f64).powi(2))
            })
            .sum();
        assert!(encoded.len() < last_size, "{level:?} is not smaller");
        assert!(err >= last_err, "{level:?} is not coarser");
        last_size = encoded.len();
        last_err = err;
    }
}

#[test]
fn every_header_problem_has_its_own_error() {
    let chunk = synthetic_chunk(shape(2, 1, 8, 16), KvDType::F32, 3);
    let good = codec::encode(&chunk, Level::Default, &MODEL).unwrap();
    assert!(codec::decode(&good, &MODEL).is_ok());

    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    assert!(matches!(
        codec::decode(&bad_magic, &MODEL),
        Err(CodecError::BadMagic { .. })
    ));

    let mut future = good.clone();
    future[4] = 99;
    assert_eq!(
        codec::decode(&future, &MODEL),
        Err(CodecError::UnsupportedVersion {
            version: 99,
            supported: format::VERSION
        })
    );

    for cut in [0, 3, 5, 40, format::HEADER_LEN, good.len() - 1] {
        assert!(
            matches!(
                codec::decode(&good[..cut], &MODEL),
                Err(CodecError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }

    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        codec::decode(&longer, &MODEL),
        Err(CodecError::Corrupt { .. })
    ));

    for i in [8, 30, format::HEADER_LEN + 5, good.len() - 3] {
        let mut flipped = good.clone();
        flipped[i] ^= 0x10;
        assert!(
            matches!(
                codec::decode(&flipped, &MODEL),
                Err(CodecError::ChecksumMismatch { .. })
            ),
            "flip at {i}"
        );
    }

    assert!(matches!(
        codec::decode(&good, &[8; 32]),
        Err(CodecError::WrongModel { .. })
    ));
}

#[test]
fn arbitrary_and_mutated_bytes_never_panic_the_decoder() {
    // The cargo-fuzz target (fuzz/fuzz_targets/decode.rs) explores this further; this bounded
    // version runs in CI. Mutations are re-checksummed so that they reach the payload parser.
    let chunk = synthetic_chunk(shape(2, 2, 8, 24), KvDType::F16, 5);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for level in Level::ALL {
        let good = codec::encode(&chunk, level, &MODEL).unwrap();
        for _ in 0..400 {
            let mut m = good.clone();
            for _ in 0..1 + rand() % 4 {
                let i = (rand() as usize) % m.len();
                m[i] = rand() as u8;
            }
            if rand() % 3 == 0 {
                let keep = (rand() as usize) % m.len();
                m.truncate(keep.max(format::HEADER_LEN));
                let payload = (m.len() - format::HEADER_LEN) as u64;
                m[52..60].copy_from_slice(&payload.to_le_bytes());
            }
            let _ = codec::decode(&refresh_checksum(m), &MODEL);
        }
    }
    for len in 0..200 {
        let junk: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
        let _ = codec::decode(&junk, &MODEL);
    }
}

/// Recomputes a chunk's checksum after a mutation (mirrors `format::assemble`).
fn refresh_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() >= format::HEADER_LEN {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&bytes[..60]);
        h.update(&bytes[format::HEADER_LEN..]);
        let sum = h.digest();
        bytes[60..68].copy_from_slice(&sum.to_le_bytes());
    }
    bytes
}

#[test]
fn lossless_is_smaller_than_zstd_on_the_raw_bytes() {
    for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
        let chunk = synthetic_chunk(shape(4, 3, 64, 256), dtype, 11);
        let ours = codec::encode(&chunk, Level::Lossless, &MODEL)
            .unwrap()
            .len();
        let zstd = zstd::bulk::compress(chunk.as_bytes(), 3).unwrap().len();
        assert!(ours < zstd, "{dtype:?}: lossless {ours} bytes, zstd {zstd}");
    }
}

#[test]
fn shapes_the_format_cannot_hold_are_rejected() {
    let chunk = synthetic_chunk(shape(1, 1, 4, 2), KvDType::F32, 1);
    assert!(codec::encode(&chunk, Level::Default, &MODEL).is_ok());
    assert!(matches!(
        KvChunk::from_bytes(shape(1, 1, 4, 2), KvDType::F32, vec![0; 3]),
        Err(CodecError::ShapeMismatch { .. })
    ));
    let too_long = shape(1, 1, 1, format::MAX_TOKENS + 1);
    let chunk = KvChunk::from_bytes(
        too_long,
        KvDType::F16,
        vec![0; 4 * (format::MAX_TOKENS + 1)],
    )
    .unwrap();
    assert!(matches!(
        codec::encode(&chunk, Level::Lossless, &MODEL),
        Err(CodecError::InvalidShape { .. })
    ));
}

/// Golden files: chunks written by each released format version must decode, forever, to the
/// same values. Set `KVPLUGIN_BLESS=1` to write the files of the current version (only when
/// adding a version; existing files are never rewritten).
#[test]
fn golden_files_of_every_version_still_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("KVPLUGIN_BLESS").is_some();
    let mut checked = 0;
    for (version, level) in (1..=format::VERSION).flat_map(|v| Level::ALL.map(|l| (v, l))) {
        for dtype in [KvDType::F32, KvDType::F16] {
            let name = format!(
                "v{}-{}-{}",
                version,
                level.name(),
                match dtype {
                    KvDType::F32 => "f32",
                    KvDType::F16 => "f16",
                    KvDType::BF16 => "bf16",
                }
            );
            let (chunk_path, hash_path) = (
                dir.join(format!("{name}.kvc")),
                dir.join(format!("{name}.b3")),
            );
            if bless && version == format::VERSION && !chunk_path.exists() {
                let chunk = synthetic_chunk(shape(3, 2, 16, 40), dtype, 42);
                // A sequence's first chunk, so lossy files carry an exact sink token.
                let options = EncodeOptions::for_chunk(level, 0);
                let encoded = codec::encode_with(&chunk, &options, &MODEL).unwrap();
                let decoded = codec::decode(&encoded, &MODEL).unwrap();
                std::fs::write(&chunk_path, &encoded).unwrap();
                std::fs::write(
                    &hash_path,
                    blake3::hash(decoded.as_bytes()).to_hex().as_str(),
                )
                .unwrap();
            }
            let encoded = std::fs::read(&chunk_path).unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = std::fs::read_to_string(&hash_path).unwrap();
            let decoded = codec::decode(&encoded, &MODEL).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(codec::inspect(&encoded, &MODEL).unwrap().version, version);
            assert_eq!(
                blake3::hash(decoded.as_bytes()).to_hex().as_str(),
                want.trim(),
                "{name}"
            );
            if level == Level::Lossless {
                assert_eq!(
                    decoded,
                    synthetic_chunk(shape(3, 2, 16, 40), dtype, 42),
                    "{name}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * Level::ALL.len() * format::VERSION as usize);
}

// Hand-made lossy chunks with a valid checksum: what a hostile or foreign writer can put in a
// store. Their tensor sections code every value with one symbol (a one-symbol frequency table:
// every rANS state stays at 2^16, so the stream is its initial states alone).

const FLAGS_PER_TOKEN: u8 = 1;
const FLAGS_DELTA: u8 = 2;
const FLAGS_PER_HEAD: u8 = 4;

/// A lossy tensor section (`FORMAT.md`) of `groups` groups (centre `g` for group `g`, scale 1,
/// step 1) whose every symbol is 0, so every coded integer is `-offset`.
fn one_symbol_section(version: u16, flags: u8, groups: usize, offset: u16) -> Vec<u8> {
    let mut s = vec![flags];
    s.extend(1f32.to_le_bytes());
    for g in 0..groups {
        s.extend(f16::from_f32(g as f32).to_le_bytes());
    }
    for _ in 0..groups {
        s.extend(f16::ONE.to_le_bytes());
    }
    s.extend(offset.to_le_bytes());
    s.extend(1u16.to_le_bytes()); // alphabet size
    s.extend(4096u16.to_le_bytes()); // its one frequency
    if version == 1 {
        // Four states, each as two u16 (high half first), and no words.
        s.extend(16u32.to_le_bytes());
        for _ in 0..4 {
            s.extend(1u16.to_le_bytes());
            s.extend(0u16.to_le_bytes());
        }
    } else {
        // Four lane states, four word counts of 0, no words.
        s.extend(32u32.to_le_bytes());
        for _ in 0..4 {
            s.extend((1u32 << 16).to_le_bytes());
        }
        s.extend([0u8; 16]);
    }
    s
}

/// A one-layer F32 chunk at level `default` of format `version` with `section` as both its K
/// and V tensors.
fn handmade_chunk(version: u16, heads: u16, head_dim: u16, tokens: u32, section: &[u8]) -> Vec<u8> {
    let mut bytes = b"KVCG".to_vec();
    bytes.extend(version.to_le_bytes());
    bytes.push(2); // level: default
    bytes.push(0); // dtype: f32
    for field in [1u16, heads, head_dim, 0] {
        bytes.extend(field.to_le_bytes()); // layers, heads, head_dim, exact_tokens
    }
    bytes.extend(tokens.to_le_bytes());
    bytes.extend(MODEL);
    let mut payload = Vec::new();
    for _ in 0..2 {
        payload.extend((section.len() as u32).to_le_bytes());
    }
    for _ in 0..2 {
        payload.extend(section);
    }
    bytes.extend((payload.len() as u64).to_le_bytes());
    bytes.extend([0u8; 8]);
    bytes.extend(payload);
    refresh_checksum(bytes)
}

#[test]
fn a_symbol_offset_beyond_the_format_is_corrupt_not_a_wrapped_sum() {
    // 65,536 tokens of differences of -65,535 each: an i32 running sum overflows after 32,769
    // tokens (a panic with overflow checks, garbage without). The format bounds the offset.
    let tokens = 65_536;
    for (version, offset) in [(2, 65_535u16), (2, 4093), (1, 65_535)] {
        let section = one_symbol_section(version, FLAGS_DELTA, 1, offset);
        let chunk = handmade_chunk(version, 1, 1, tokens, &section);
        let err = codec::decode(&chunk, &MODEL).expect_err("an offset past the format's bound");
        assert!(
            matches!(&err, CodecError::Corrupt { .. }) && err.to_string().contains("offset"),
            "version {version}, offset {offset}: {err}"
        );
    }
    // At the bound, the sums are exact: -4,092 per token.
    let section = one_symbol_section(2, FLAGS_DELTA, 1, 4092);
    let decoded = codec::decode(&handmade_chunk(2, 1, 1, tokens, &section), &MODEL).unwrap();
    let keys = decoded.tensor_f32(0);
    assert_eq!(keys[0], -4092.0);
    assert_eq!(keys[tokens as usize - 1], -4092.0 * tokens as f32);
}

#[test]
fn a_version_1_per_head_running_sum_past_i32_is_exact() {
    // Version 1 sums a per-head group along tokens and channels: 16 channels x 65,536 tokens of
    // -4,092 (within the format's bound) reach -4.29e9, past i32.
    let (tokens, channels) = (65_536u32, 16u16);
    let section = one_symbol_section(1, FLAGS_PER_HEAD | FLAGS_DELTA, 1, 4092);
    let decoded = codec::decode(&handmade_chunk(1, 1, channels, tokens, &section), &MODEL).unwrap();
    let keys = decoded.tensor_f32(0);
    let n = keys.len();
    assert_eq!(n, tokens as usize * channels as usize);
    assert_eq!(keys[0], -4092.0);
    assert_eq!(keys[n - 1], -4092.0 * n as f32);
}

#[test]
fn a_version_1_per_token_chunk_at_the_end_of_a_buffer_decodes_its_first_tokens() {
    // Per-token groups past `take` start beyond the buffer when the chunk ends there (the tail of
    // a prompt that shares only part of a stored chunk); 0.x sliced at that start and panicked.
    let (heads, tokens, channels) = (2usize, 8usize, 2usize);
    let section = one_symbol_section(1, FLAGS_PER_TOKEN, heads * tokens, 0);
    let chunk = handmade_chunk(1, heads as u16, channels as u16, tokens as u32, &section);
    let parsed = codec::ParsedChunk::parse(&chunk, &MODEL).unwrap();
    for take in 0..=tokens {
        let mut buffer = vec![f32::NAN; heads * tokens * channels];
        parsed
            .decode_tensor_into(
                0,
                &mut codec::Dest {
                    data: &mut buffer,
                    tokens,
                    token_offset: tokens - take,
                    take,
                },
            )
            .unwrap_or_else(|e| panic!("take {take}: {e}"));
        for h in 0..heads {
            for t in 0..tokens {
                for c in 0..channels {
                    let got = buffer[(h * tokens + t) * channels + c];
                    if t >= tokens - take {
                        // Group (h, coded token t - offset): its centre, the group's number.
                        let group = h * tokens + t - (tokens - take);
                        assert_eq!(got, group as f32, "take {take} h {h} t {t} c {c}");
                    } else {
                        assert!(got.is_nan(), "take {take}: wrote outside its span");
                    }
                }
            }
        }
    }
}
