//! The schemes the codec is measured against (benchmark only; not part of the chunk format):
//! - `zstd-raw`: the engine's bytes as they are (here F32), compressed with zstd level 3: the
//!   lossless baseline;
//! - `zstd-16bit`: the KV cast to f16 and compressed with zstd (what "just compress it" gives);
//! - `uniform-8bit`: asymmetric 8-bit quantisation per (head, token), f16 min and scale;
//! - `kivi-2bit`: KIVI's asymmetric 2-bit quantisation, keys per channel over the chunk's tokens,
//!   values per (head, token), f16 min and scale, no entropy coding;
//! - `lmcache-cachegen`: LMCache's published CacheGen codec: per-token max-abs scaling (one scale
//!   per layer and token), symmetric bins (keys 32 bins in layers < 10 then 16; values 32 in
//!   layers < 2 then 16), and arithmetic coding with one distribution per (layer, channel) shipped
//!   with the chunk (here coded with the crate's rANS coder, 12-bit frequencies).
//!
//! Each scheme turns a [`KvChunk`] into bytes and back; sizes include all side information.

use half::f16;

use crate::codec::{
    rans::{self, FreqTable},
    reader::Reader,
    ChunkShape, KvChunk, KvDType,
};

/// A compression scheme under test.
pub trait Scheme: Sync {
    /// Name in the report.
    fn name(&self) -> String;
    /// Compresses a chunk that starts at token `start` of its sequence.
    fn encode(&self, chunk: &KvChunk, start: usize) -> Vec<u8>;
    /// Decompresses (the shape is known to the caller, as it would be from a store's metadata).
    fn decode(&self, bytes: &[u8], shape: ChunkShape) -> KvChunk;
    /// Decompresses a whole prefix the way a store load would: what the decode throughput
    /// measures. `buffers` may be kept between calls (ours decode into them; the untimed first
    /// call allocates them). By default every chunk through [`Scheme::decode`].
    fn decode_prefix(
        &self,
        encoded: &[Vec<u8>],
        shapes: &[ChunkShape],
        buffers: &mut Vec<Vec<f32>>,
    ) {
        let _ = buffers;
        for (bytes, &shape) in encoded.iter().zip(shapes) {
            drop(self.decode(bytes, shape));
        }
    }
}

/// `zstd-raw`.
pub struct ZstdRaw;

impl Scheme for ZstdRaw {
    fn name(&self) -> String {
        "zstd-raw".into()
    }
    fn encode(&self, chunk: &KvChunk, _start: usize) -> Vec<u8> {
        zstd::bulk::compress(chunk.as_bytes(), 3).expect("in-memory zstd")
    }
    fn decode(&self, bytes: &[u8], shape: ChunkShape) -> KvChunk {
        let raw = zstd::bulk::decompress(bytes, shape.n_values() * 4).expect("own output");
        KvChunk::from_bytes(shape, KvDType::F32, raw).expect("shape")
    }
}

/// `zstd-16bit`.
pub struct Zstd16;

impl Scheme for Zstd16 {
    fn name(&self) -> String {
        "zstd-16bit".into()
    }
    fn encode(&self, chunk: &KvChunk, _start: usize) -> Vec<u8> {
        let f16_bytes = to_dtype(chunk, KvDType::F16);
        zstd::bulk::compress(f16_bytes.as_bytes(), 3).expect("in-memory zstd")
    }
    fn decode(&self, bytes: &[u8], shape: ChunkShape) -> KvChunk {
        let raw = zstd::bulk::decompress(bytes, shape.n_values() * 2).expect("own output");
        let f16_chunk = KvChunk::from_bytes(shape, KvDType::F16, raw).expect("shape");
        to_dtype(&f16_chunk, KvDType::F32)
    }
}

fn to_dtype(chunk: &KvChunk, dtype: KvDType) -> KvChunk {
    let s = chunk.shape();
    let tensors: Vec<Vec<f32>> = (0..s.n_tensors()).map(|t| chunk.tensor_f32(t)).collect();
    KvChunk::from_f32_tensors(s, dtype, &tensors).expect("shape")
}

/// Grouping of min/max quantisers.
#[derive(Clone, Copy)]
enum Group {
    PerToken,
    PerChannel,
}

/// Asymmetric min/max quantisation of every group to `bits`, f16 (min, scale) per group.
fn minmax_encode(x: &[f32], s: ChunkShape, group: Group, bits: u32, out: &mut Vec<u8>) {
    let levels = ((1u32 << bits) - 1) as f32;
    let groups = group_indices(s, group);
    let mut codes = Vec::with_capacity(x.len());
    for idx in &groups {
        let lo = idx.iter().map(|&i| x[i]).fold(f32::INFINITY, f32::min);
        let hi = idx.iter().map(|&i| x[i]).fold(f32::NEG_INFINITY, f32::max);
        let lo16 = f16::from_f32(lo);
        let scale16 = f16::from_f32(((hi - lo16.to_f32()) / levels).max(1e-8));
        out.extend_from_slice(&lo16.to_le_bytes());
        out.extend_from_slice(&scale16.to_le_bytes());
        for &i in idx {
            let q = ((x[i] - lo16.to_f32()) / scale16.to_f32())
                .round()
                .clamp(0.0, levels);
            codes.push(q as u8);
        }
    }
    pack_bits(&codes, bits, out);
}

fn minmax_decode(r: &mut Reader<'_>, s: ChunkShape, group: Group, bits: u32) -> Vec<f32> {
    let groups = group_indices(s, group);
    let mut params = Vec::with_capacity(groups.len());
    for _ in &groups {
        let lo = f16::from_bits(r.u16().expect("own output")).to_f32();
        let scale = f16::from_bits(r.u16().expect("own output")).to_f32();
        params.push((lo, scale));
    }
    let codes = unpack_bits(r, s.tensor_len(), bits);
    let mut x = vec![0f32; s.tensor_len()];
    let mut k = 0;
    for (idx, (lo, scale)) in groups.iter().zip(params) {
        for &i in idx {
            x[i] = lo + scale * codes[k] as f32;
            k += 1;
        }
    }
    x
}

fn group_indices(s: ChunkShape, group: Group) -> Vec<Vec<usize>> {
    match group {
        Group::PerToken => (0..s.n_kv_heads * s.n_tokens)
            .map(|g| (g * s.head_dim..(g + 1) * s.head_dim).collect())
            .collect(),
        Group::PerChannel => (0..s.n_kv_heads * s.head_dim)
            .map(|g| {
                let (h, c) = (g / s.head_dim, g % s.head_dim);
                (0..s.n_tokens)
                    .map(|t| (h * s.n_tokens + t) * s.head_dim + c)
                    .collect()
            })
            .collect(),
    }
}

fn pack_bits(codes: &[u8], bits: u32, out: &mut Vec<u8>) {
    let mut acc = 0u32;
    let mut n = 0;
    for &c in codes {
        acc |= (c as u32) << n;
        n += bits;
        while n >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 {
        out.push(acc as u8);
    }
}

fn unpack_bits(r: &mut Reader<'_>, count: usize, bits: u32) -> Vec<u8> {
    let bytes = r
        .bytes((count * bits as usize).div_ceil(8))
        .expect("own output");
    let mut out = Vec::with_capacity(count);
    let (mut acc, mut n, mut pos) = (0u32, 0, 0);
    let mask = (1u32 << bits) - 1;
    while out.len() < count {
        while n < bits {
            acc |= (bytes[pos] as u32) << n;
            pos += 1;
            n += 8;
        }
        out.push((acc & mask) as u8);
        acc >>= bits;
        n -= bits;
    }
    out
}

/// A min/max quantiser with one grouping for keys and one for values.
pub struct MinMax {
    name: &'static str,
    bits: u32,
    keys: Group,
    values: Group,
}

/// `uniform-8bit`.
pub fn uniform_8bit() -> MinMax {
    MinMax {
        name: "uniform-8bit",
        bits: 8,
        keys: Group::PerToken,
        values: Group::PerToken,
    }
}

/// `kivi-2bit`.
pub fn kivi_2bit() -> MinMax {
    MinMax {
        name: "kivi-2bit",
        bits: 2,
        keys: Group::PerChannel,
        values: Group::PerToken,
    }
}

impl Scheme for MinMax {
    fn name(&self) -> String {
        self.name.into()
    }
    fn encode(&self, chunk: &KvChunk, _start: usize) -> Vec<u8> {
        let s = chunk.shape();
        let mut out = Vec::new();
        for t in 0..s.n_tensors() {
            let group = if t % 2 == 0 { self.keys } else { self.values };
            minmax_encode(&chunk.tensor_f32(t), s, group, self.bits, &mut out);
        }
        out
    }
    fn decode(&self, bytes: &[u8], s: ChunkShape) -> KvChunk {
        let mut r = Reader::new(bytes);
        let tensors: Vec<Vec<f32>> = (0..s.n_tensors())
            .map(|t| {
                let group = if t % 2 == 0 { self.keys } else { self.values };
                minmax_decode(&mut r, s, group, self.bits)
            })
            .collect();
        KvChunk::from_f32_tensors(s, KvDType::F32, &tensors).expect("shape")
    }
}

/// `lmcache-cachegen`.
pub struct LmCacheCacheGen;

impl LmCacheCacheGen {
    fn bins(layer: usize, is_value: bool) -> u32 {
        match (is_value, layer) {
            (false, l) if l < 10 => 32,
            (true, l) if l < 2 => 32,
            _ => 16,
        }
    }
}

impl Scheme for LmCacheCacheGen {
    fn name(&self) -> String {
        "lmcache-cachegen".into()
    }
    fn encode(&self, chunk: &KvChunk, _start: usize) -> Vec<u8> {
        let s = chunk.shape();
        let channels = s.n_kv_heads * s.head_dim;
        let mut out = Vec::new();
        for t in 0..s.n_tensors() {
            let bins = Self::bins(t / 2, t % 2 == 1);
            let half = (bins / 2) as f32;
            let x = chunk.tensor_f32(t);
            // One max-abs scale per token (over all heads and channels of this layer).
            let mut symbols = vec![vec![0u16; s.n_tokens]; channels];
            for tok in 0..s.n_tokens {
                let at = |h: usize, c: usize| x[(h * s.n_tokens + tok) * s.head_dim + c];
                let mut max_abs = 0f32;
                for h in 0..s.n_kv_heads {
                    for c in 0..s.head_dim {
                        max_abs = max_abs.max(at(h, c).abs());
                    }
                }
                let scale = f16::from_f32(max_abs.max(1e-8));
                out.extend_from_slice(&scale.to_le_bytes());
                for h in 0..s.n_kv_heads {
                    for c in 0..s.head_dim {
                        let q = (at(h, c) / scale.to_f32() * half)
                            .round()
                            .clamp(-half, half - 1.0);
                        symbols[h * s.head_dim + c][tok] = (q + half) as u16;
                    }
                }
            }
            // One distribution per channel, shipped with the chunk.
            for ch in &symbols {
                let mut counts = vec![0u32; bins as usize];
                ch.iter().for_each(|&q| counts[q as usize] += 1);
                let table = FreqTable::from_counts(&counts).expect("symbols");
                table.write(&mut out);
                rans::encode4(ch, &table, &mut out);
            }
        }
        out
    }
    fn decode(&self, bytes: &[u8], s: ChunkShape) -> KvChunk {
        let mut r = Reader::new(bytes);
        let channels = s.n_kv_heads * s.head_dim;
        let tensors: Vec<Vec<f32>> = (0..s.n_tensors())
            .map(|t| {
                let half = (Self::bins(t / 2, t % 2 == 1) / 2) as f32;
                let scales: Vec<f32> = (0..s.n_tokens)
                    .map(|_| f16::from_bits(r.u16().expect("own output")).to_f32())
                    .collect();
                let mut x = vec![0f32; s.tensor_len()];
                let mut q = vec![0u16; s.n_tokens];
                for ch in 0..channels {
                    let table = FreqTable::read(&mut r).expect("own output");
                    rans::decode4(&mut r, &table, &mut q).expect("own output");
                    let (h, c) = (ch / s.head_dim, ch % s.head_dim);
                    for (tok, &sym) in q.iter().enumerate() {
                        x[(h * s.n_tokens + tok) * s.head_dim + c] =
                            (sym as f32 - half) / half * scales[tok];
                    }
                }
                x
            })
            .collect();
        KvChunk::from_f32_tensors(s, KvDType::F32, &tensors).expect("shape")
    }
}
