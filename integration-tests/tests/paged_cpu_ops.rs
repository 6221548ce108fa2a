//! PagedAttention's cache operations on the CPU (`mistralrs_core::cpu_ops`, the engine patch's
//! `paged-attn-cpu` feature), against a reference written from the CUDA kernels' index formulas
//! (`reshape_and_cache_kernel.cu`): every block size the engine allows, F32/F16/BF16 (x = 4 or 8
//! elements packed per key group), grouped KV heads, padding slots, and bad indices.

use candle_core::{DType, Device, Tensor};
use mistralrs_core::cpu_ops::{gather_kv_cache, reshape_and_cache};

/// Deterministic pseudo-random values in [-1, 1) (no RNG crate needed for test data).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A paged cache layout and its reference index formulas.
#[derive(Clone, Copy)]
struct Layout {
    blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    x: usize,
}

impl Layout {
    fn new(
        blocks: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        dtype: DType,
    ) -> Self {
        Self {
            blocks,
            kv_heads,
            head_dim,
            block_size,
            x: 16 / dtype.size_in_bytes(),
        }
    }

    fn caches(&self, dtype: DType) -> (Tensor, Tensor) {
        let key = Tensor::zeros(
            (
                self.blocks,
                self.kv_heads,
                self.head_dim / self.x,
                self.block_size,
                self.x,
            ),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        let value = Tensor::zeros(
            (self.blocks, self.kv_heads, self.head_dim, self.block_size),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        (key, value)
    }

    /// `reshape_and_cache_kernel.cu`: key_cache[block][head][i / x][offset][i % x].
    fn key_index(&self, slot: usize, head: usize, i: usize) -> usize {
        let block = slot / self.block_size;
        let offset = slot % self.block_size;
        let dx = self.head_dim / self.x;
        block * self.kv_heads * dx * self.block_size * self.x
            + head * dx * self.block_size * self.x
            + (i / self.x) * self.block_size * self.x
            + offset * self.x
            + i % self.x
    }

    /// value_cache[block][head][i][offset].
    fn value_index(&self, slot: usize, head: usize, i: usize) -> usize {
        let block = slot / self.block_size;
        let offset = slot % self.block_size;
        block * self.kv_heads * self.head_dim * self.block_size
            + head * self.head_dim * self.block_size
            + i * self.block_size
            + offset
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Rows `[n, kv_heads, head_dim]` of `dtype`, and their values as F32 after the round trip
/// through `dtype` (what the cache must hold).
fn rows(n: usize, layout: &Layout, dtype: DType, seed: u64) -> (Tensor, Vec<f32>) {
    let data = values(n * layout.kv_heads * layout.head_dim, seed);
    let t = Tensor::from_vec(data, (n, layout.kv_heads, layout.head_dim), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let exact = flat(&t);
    (t, exact)
}

#[test]
fn scatter_writes_each_row_where_the_cuda_kernel_would_and_nothing_else() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for block_size in [8, 16, 32] {
            for (kv_heads, head_dim) in [(3, 64), (1, 128)] {
                let layout = Layout::new(5, kv_heads, head_dim, block_size, dtype);
                let (key_cache, value_cache) = layout.caches(dtype);
                // Scattered slots in every block, in no particular order, with padding between.
                let total = layout.blocks * block_size;
                let slots: Vec<i64> = (0..total as i64)
                    .map(|s| (s * 7 + 3) % total as i64)
                    .take(total / 2)
                    .flat_map(|s| [s, -1])
                    .collect();
                let (keys, key_values) = rows(slots.len(), &layout, dtype, 1);
                let (vals, value_values) = rows(slots.len(), &layout, dtype, 2);
                let slot_tensor = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
                reshape_and_cache(&keys, &vals, &key_cache, &value_cache, &slot_tensor).unwrap();

                let (kc, vc) = (flat(&key_cache), flat(&value_cache));
                let mut expected_k = vec![0f32; kc.len()];
                let mut expected_v = vec![0f32; vc.len()];
                let row = kv_heads * head_dim;
                for (t, &slot) in slots.iter().enumerate() {
                    if slot < 0 {
                        continue;
                    }
                    for h in 0..kv_heads {
                        for i in 0..head_dim {
                            let src = t * row + h * head_dim + i;
                            expected_k[layout.key_index(slot as usize, h, i)] = key_values[src];
                            expected_v[layout.value_index(slot as usize, h, i)] = value_values[src];
                        }
                    }
                }
                assert_eq!(
                    kc, expected_k,
                    "keys, {dtype:?} bs {block_size} {kv_heads}x{head_dim}"
                );
                assert_eq!(
                    vc, expected_v,
                    "values, {dtype:?} bs {block_size} {kv_heads}x{head_dim}"
                );
            }
        }
    }
}

#[test]
fn gather_reads_back_what_scatter_wrote_through_block_tables() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for block_size in [8, 16, 32] {
            let layout = Layout::new(7, 3, 64, block_size, dtype);
            let (key_cache, value_cache) = layout.caches(dtype);
            // Two sequences in non-contiguous blocks, the second ending inside a block.
            let tables: [Vec<u32>; 2] = [vec![5, 1, 3], vec![0, 6, 2]];
            let lens = [3 * block_size, 2 * block_size + 5];
            let mut slots = Vec::new();
            for (table, &len) in tables.iter().zip(&lens) {
                for t in 0..len {
                    slots.push(
                        (table[t / block_size] as usize * block_size + t % block_size) as i64,
                    );
                }
            }
            let n = slots.len();
            let (keys, key_values) = rows(n, &layout, dtype, 3);
            let (vals, value_values) = rows(n, &layout, dtype, 4);
            let slot_tensor = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
            reshape_and_cache(&keys, &vals, &key_cache, &value_cache, &slot_tensor).unwrap();

            let table_tensor = Tensor::from_vec(tables.concat(), (2, 3), &Device::Cpu).unwrap();
            let cu = Tensor::new(
                &[0u32, lens[0] as u32, (lens[0] + lens[1]) as u32],
                &Device::Cpu,
            )
            .unwrap();
            let (k, v) =
                gather_kv_cache(&key_cache, &value_cache, &table_tensor, &cu, dtype).unwrap();
            assert_eq!(k.dims(), &[n, 3, 64]);
            assert_eq!(k.dtype(), dtype);
            assert_eq!(flat(&k), key_values, "{dtype:?} bs {block_size}");
            assert_eq!(flat(&v), value_values, "{dtype:?} bs {block_size}");

            // In another dtype: the same values, converted.
            let (k32, _) =
                gather_kv_cache(&key_cache, &value_cache, &table_tensor, &cu, DType::F32).unwrap();
            assert_eq!(k32.dtype(), DType::F32);
            assert_eq!(flat(&k32), key_values);
        }
    }
}

#[test]
fn bad_slots_blocks_and_shapes_are_errors_not_writes_elsewhere() {
    let dtype = DType::F32;
    let layout = Layout::new(2, 1, 64, 8, dtype);
    let (key_cache, value_cache) = layout.caches(dtype);
    let (keys, _) = rows(1, &layout, dtype, 5);

    // A slot past the cache.
    let past = Tensor::new(&[16i64], &Device::Cpu).unwrap();
    let err = reshape_and_cache(&keys, &keys, &key_cache, &value_cache, &past).unwrap_err();
    assert!(err.to_string().contains("slot 16"), "{err}");
    assert!(
        flat(&key_cache).iter().all(|&v| v == 0.0),
        "nothing written"
    );

    // More rows than slots.
    let (two, _) = rows(2, &layout, dtype, 6);
    let one = Tensor::new(&[0i64], &Device::Cpu).unwrap();
    assert!(reshape_and_cache(&two, &two, &key_cache, &value_cache, &one).is_err());

    // Rows of another head size.
    let wrong = Tensor::zeros((1, 1, 32), dtype, &Device::Cpu).unwrap();
    assert!(reshape_and_cache(&wrong, &wrong, &key_cache, &value_cache, &one).is_err());

    // A block table naming a block the cache does not have, and one too short for its length.
    let table = Tensor::new(&[[2u32]], &Device::Cpu).unwrap();
    let cu = Tensor::new(&[0u32, 4], &Device::Cpu).unwrap();
    let err = gather_kv_cache(&key_cache, &value_cache, &table, &cu, dtype).unwrap_err();
    assert!(err.to_string().contains("block 2"), "{err}");
    let table = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
    let cu = Tensor::new(&[0u32, 9], &Device::Cpu).unwrap();
    assert!(gather_kv_cache(&key_cache, &value_cache, &table, &cu, dtype).is_err());

    // A value cache that does not match the key cache.
    let (_, other_values) = Layout::new(3, 1, 64, 8, dtype).caches(dtype);
    assert!(reshape_and_cache(&keys, &keys, &key_cache, &other_values, &one).is_err());
}
