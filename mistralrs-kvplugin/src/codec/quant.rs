//! Lossy coding of one tensor (`[heads, tokens, channels]` f32): normalise, quantise with a
//! uniform step, entropy-code the integers. This is format version 2's tensor section; version
//! 1's reader is [`super::v1`].
//!
//! This is entropy-coded scalar quantisation (ECSQ), which is within about 0.25 bit of the
//! rate-distortion bound at a given mean squared error, instead of CacheGen's fixed bin counts:
//! the step sets the error, and the entropy coder spends exactly the bits the data needs.
//!
//! - Normalisation groups: per channel over the chunk's tokens (`(head, channel)`, KIVI's choice
//!   for keys, whose outlier channels would otherwise dominate) or per token over the channels of
//!   a head. Each group stores its centre `mu` and scale `s` as f16; `mu` is the f16 of the mean
//!   and `s` the RMS of `x - mu`, rounded up to an f16, so the decoder sees exactly the encoder's
//!   values.
//! - Quantisation: `q = round((x - mu) / (s * step))`, dequantised as `mu + s * step * q`. The
//!   error is at most `s * step / 2` per value; since `|x - mu| <= sqrt(n) * s` for a group of `n`
//!   values, `|q| <= sqrt(n) / step + 1`, which [`max_group_len`] keeps inside the coder's
//!   alphabet, so no value is ever clamped.
//! - Order: the integers are coded in the tensor's own order (`[head, token, channel]`), so both
//!   directions walk memory front to back and every inner loop runs over a token's channels
//!   (vectorised by the compiler).
//! - Token locality: optionally each integer is replaced by its difference from the same head
//!   and channel's integer one token earlier (a lossless transform; a head's first token stays as
//!   it is). It is chosen per tensor, only when it lowers the coded size, judged on a sample of
//!   every fourth token (the full count costs as much as the rest of the encoder's bookkeeping).
//! - Entropy coding: one frequency table per tensor, the four-lane coder of [`super::rans`]. The
//!   table is built from the same sample's histogram (of the integers or of their differences,
//!   whichever is coded), plus one for every integer that occurs anywhere in the tensor: every
//!   coded symbol has a non-zero frequency, and the sample costs under a thousandth of a bit per
//!   value on SmolLM2 (3.581 bits per value at `default` either way).

use half::f16;

use super::{
    rans::{self, FreqTable},
    reader::Reader,
    CodecError,
};

/// How values are grouped for normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One `(mu, s)` per (head, channel), over the tokens.
    PerChannel,
    /// One `(mu, s)` per (head, token), over the channels.
    PerToken,
    /// One `(mu, s)` per head, over tokens and channels: the same absolute step for every
    /// channel, which is what minimises the squared error for a given rate when all channels
    /// weigh the same.
    PerHead,
}

/// Largest `|q|` the alphabet allows (`2 * MAX_Q + 1` symbols; differences need twice that).
pub(super) const MAX_Q: i32 = (rans::MAX_SYMBOLS as i32 / 2 - 1) / 2;

/// Largest symbol offset the format allows (`FORMAT.md`). With at most 4,096 symbols, every coded
/// integer is within 4,095 of zero, so a version-2 running sum (at most 65,536 tokens) stays
/// below 2^28: the `i32` accumulators of [`decode`] cannot overflow. A larger offset (only a
/// hostile or foreign writer makes one) could carry them past `i32` after 32,769 tokens.
pub(super) const MAX_OFFSET: i32 = 4092;

/// Largest group size for which `step` can never produce `|q| > MAX_Q`.
pub fn max_group_len(step: f32) -> usize {
    let bound = (MAX_Q as f32 - 1.0) * step;
    (bound * bound).floor() as usize
}

pub(super) const FLAG_PER_TOKEN: u8 = 1;
pub(super) const FLAG_DELTA: u8 = 2;
pub(super) const FLAG_PER_HEAD: u8 = 4;

/// Tensor dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub tokens: usize,
    pub channels: usize,
}

impl Dims {
    pub(super) fn len(&self) -> usize {
        self.heads * self.tokens * self.channels
    }

    /// (number of groups, group length) for a grouping.
    pub(super) fn groups(&self, g: Grouping) -> (usize, usize) {
        match g {
            Grouping::PerChannel => (self.heads * self.channels, self.tokens),
            Grouping::PerToken => (self.heads * self.tokens, self.channels),
            Grouping::PerHead => (self.heads, self.tokens * self.channels),
        }
    }
}

/// Encodes a tensor given as one slice per head (each `[tokens, channels]`, `dims` the tensor's
/// dimensions) with `grouping` and `step`, appending to `out`.
pub fn encode(heads: &[&[f32]], dims: Dims, grouping: Grouping, step: f32, out: &mut Vec<u8>) {
    assert!(
        heads.len() == dims.heads && heads.iter().all(|h| h.len() == dims.tokens * dims.channels),
        "one slice of tokens x channels values per head"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only requirement of `encode_avx2`.
        #[allow(unsafe_code)]
        return unsafe { encode_avx2(heads, dims, grouping, step, out) };
    }
    encode_impl(heads, dims, grouping, step, out)
}

/// [`encode`] compiled for AVX2: the normalisation, quantisation and difference loops run eight
/// values at a time instead of the baseline target's four (same results: no fused operations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn encode_avx2(heads: &[&[f32]], dims: Dims, grouping: Grouping, step: f32, out: &mut Vec<u8>) {
    encode_impl(heads, dims, grouping, step, out)
}

#[inline(always)]
fn encode_impl(heads: &[&[f32]], dims: Dims, grouping: Grouping, step: f32, out: &mut Vec<u8>) {
    let (mus, scales) = group_stats(heads, dims, grouping);
    let mu32: Vec<f32> = mus.iter().map(|m| m.to_f32()).collect();
    let inv: Vec<f32> = scales.iter().map(|s| 1.0 / (s.to_f32() * step)).collect();
    let mut q = vec![0i16; dims.len()];
    let (tokens, channels) = (dims.tokens, dims.channels);
    let quantise = |xs: &[f32], qs: &mut [i16], mu: &[f32], inv: &[f32]| {
        for ((q, &v), (&m, &i)) in qs.iter_mut().zip(xs).zip(mu.iter().zip(inv)) {
            *q = round_to_i16((v - m) * i);
        }
    };
    // Per-token and per-head groups: the row's group's centre and inverse step, repeated.
    let (mut mu_row, mut inv_row) = (vec![0f32; channels], vec![0f32; channels]);
    for (h, (head, head_q)) in heads
        .iter()
        .zip(q.chunks_exact_mut(tokens * channels))
        .enumerate()
    {
        for (t, (xs, qs)) in head
            .chunks_exact(channels)
            .zip(head_q.chunks_exact_mut(channels))
            .enumerate()
        {
            let g = match grouping {
                Grouping::PerChannel => {
                    let g = h * channels;
                    quantise(xs, qs, &mu32[g..g + channels], &inv[g..g + channels]);
                    continue;
                }
                Grouping::PerToken => h * tokens + t,
                Grouping::PerHead => h,
            };
            mu_row.fill(mu32[g]);
            inv_row.fill(inv[g]);
            quantise(xs, qs, &mu_row, &inv_row);
        }
    }

    // Token locality: differences along the tokens of each (head, channel), if they code smaller.
    let (plain, diff) = sampled_histograms(&q, dims);
    let delta = entropy_bits(&diff[..]) < entropy_bits(&plain[..]);
    if delta {
        for head in q.chunks_exact_mut(tokens * channels) {
            for t in (1..tokens).rev() {
                let (before, this) = head.split_at_mut(t * channels);
                let prev = &before[(t - 1) * channels..];
                for (v, &p) in this[..channels].iter_mut().zip(prev) {
                    *v -= p;
                }
            }
        }
    }
    let sample = if delta { &diff } else { &plain };
    // A short tensor's sample is a token or two per head: count every integer instead.
    let full;
    let sample = if sample.iter().sum::<u32>() < MIN_SAMPLE {
        full = full_histogram(&q);
        &full
    } else {
        sample
    };
    let (lo, counts) = coding_counts(&q, sample);
    let offset = -lo;
    let flags = if delta { FLAG_DELTA } else { 0 }
        | match grouping {
            Grouping::PerChannel => 0,
            Grouping::PerToken => FLAG_PER_TOKEN,
            Grouping::PerHead => FLAG_PER_HEAD,
        };

    out.push(flags);
    out.extend_from_slice(&step.to_le_bytes());
    for m in &mus {
        out.extend_from_slice(&m.to_le_bytes());
    }
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(&(offset as u16).to_le_bytes());
    let table = FreqTable::from_counts(&counts).expect("a non-empty tensor has symbols");
    table.write(out);
    let symbols: Vec<u16> = q.into_iter().map(|v| (v as i32 + offset) as u16).collect();
    rans::encode_lanes(&symbols, &table, out);
}

/// Rounds `v` to the nearest integer in `-MAX_Q..=MAX_Q` (ties to even; NaN to `-MAX_Q`) with
/// the float-adder trick, integer operations only: the baseline x86-64 target has no vector
/// rounding instruction (`f32::round` became a libm call per value), and Rust's saturating
/// float-to-integer cast does not vectorise.
#[inline(always)]
fn round_to_i16(v: f32) -> i16 {
    const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: the sum's low mantissa bits are the integer.
    let limit = MAX_Q as f32;
    let clamped = v.max(-limit).min(limit);
    ((clamped + SHIFTER).to_bits() as i32 - SHIFTER.to_bits() as i32) as i16
}

/// Each group's centre `mu` (f16 of the mean) and scale `s` (RMS of `x - mu`, rounded up to an
/// f16), in group order.
#[inline(always)]
fn group_stats(heads: &[&[f32]], dims: Dims, grouping: Grouping) -> (Vec<f16>, Vec<f16>) {
    let finish = |sum: f64, squares: f64, n: usize| {
        let mean = sum / n as f64;
        let mu = f16::from_f64(mean);
        let m = mu.to_f32() as f64;
        // Mean of (x - mu)^2 = E[x^2] - 2 mu E[x] + mu^2 (f64 sums of f32 values: exact enough
        // for a scale, whose only job is to bound |q|, with a margin, see `max_group_len`).
        let ms = (squares / n as f64 - 2.0 * m * mean + m * m).max(0.0);
        (mu, round_up_f16(ms.sqrt() as f32))
    };
    let (n_groups, group_len) = dims.groups(grouping);
    let mut mus = Vec::with_capacity(n_groups);
    let mut scales = Vec::with_capacity(n_groups);
    match grouping {
        Grouping::PerChannel => {
            let c = dims.channels;
            let mut sums = vec![0f64; c];
            let mut squares = vec![0f64; c];
            for head in heads {
                sums.fill(0.0);
                squares.fill(0.0);
                for row in head.chunks_exact(c) {
                    for ((s, q), &v) in sums.iter_mut().zip(&mut squares).zip(row) {
                        *s += v as f64;
                        *q += v as f64 * v as f64;
                    }
                }
                for (&s, &q) in sums.iter().zip(&squares) {
                    let (mu, scale) = finish(s, q, dims.tokens);
                    mus.push(mu);
                    scales.push(scale);
                }
            }
        }
        Grouping::PerToken | Grouping::PerHead => {
            for group in heads.iter().flat_map(|h| h.chunks_exact(group_len)) {
                let (s, q) = group.iter().fold((0f64, 0f64), |(s, q), &v| {
                    (s + v as f64, q + v as f64 * v as f64)
                });
                let (mu, scale) = finish(s, q, group_len);
                mus.push(mu);
                scales.push(scale);
            }
        }
    }
    (mus, scales)
}

/// Bins of a histogram of integers in `-2 * MAX_Q..=2 * MAX_Q` (integer `v` in bin `v + SPAN`),
/// rounded up to a power of two so that an index is masked into range instead of checked.
const BINS: usize = (4 * MAX_Q as usize + 1).next_power_of_two();
const SPAN: i32 = 2 * MAX_Q;

#[inline(always)]
fn bin(v: i32) -> usize {
    (v + SPAN) as usize & (BINS - 1)
}

/// Histograms of the integers (`plain`) and of their token differences (`diff`) over a sample:
/// every fourth token of every head, with the token before it. The smaller entropy decides
/// whether differences are coded, and the chosen histogram is the estimate the frequency table
/// is built from ([`coding_counts`]): counting every integer costs as much as the rest of the
/// quantiser, and a quarter of a tensor's integers estimates the distribution to within a few
/// thousandths of a bit per value in theory (on SmolLM2 the default level's size did not change
/// in its third decimal). Tensors whose sample is under [`MIN_SAMPLE`] integers count them all.
#[inline(always)]
fn sampled_histograms(q: &[i16], dims: Dims) -> (Box<[u32; BINS]>, Box<[u32; BINS]>) {
    let mut plain = Box::new([0u32; BINS]);
    let mut diff = Box::new([0u32; BINS]);
    let c = dims.channels;
    for head in q.chunks_exact(dims.tokens * c) {
        for t in (1..dims.tokens).step_by(4) {
            let (prev, row) = (&head[(t - 1) * c..t * c], &head[t * c..(t + 1) * c]);
            for (&v, &p) in row.iter().zip(prev) {
                let (v, p) = (v as i32, p as i32);
                plain[bin(v)] += 1;
                diff[bin(v - p)] += 1;
            }
        }
    }
    (plain, diff)
}

/// Fewest sampled integers the frequency table is estimated from; below, it counts them all.
const MIN_SAMPLE: u32 = 4096;

/// The histogram of every integer of `values`.
fn full_histogram(values: &[i16]) -> Box<[u32; BINS]> {
    let mut counts = Box::new([0u32; BINS]);
    for &v in values {
        counts[bin(v as i32)] += 1;
    }
    counts
}

/// Empirical entropy of `counts`, in bits (the ideal coded size).
fn entropy_bits(counts: &[u32]) -> f64 {
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64) * (c as f64 / total).log2())
        .sum()
}

/// The counts the frequency table is built from: `lo` and the counts of `lo..=hi`, where `lo` is
/// the smaller of 0 and the smallest of `values` (the format's symbol offset is `-lo`, unsigned)
/// and `hi` the largest. Each count is the `sample`'s count plus one for an integer that occurs in
/// `values` (so every coded symbol has a non-zero frequency), zero for one that does not. Marking
/// presence is a store of a constant per value, with no chain of increments through memory.
#[inline(always)]
fn coding_counts(values: &[i16], sample: &[u32; BINS]) -> (i32, Vec<u32>) {
    let mut seen = Box::new([false; BINS]);
    for &v in values {
        seen[bin(v as i32)] = true;
    }
    let zero = SPAN as usize;
    let lo = seen.iter().position(|&s| s).unwrap_or(zero).min(zero);
    let hi = seen.iter().rposition(|&s| s).unwrap_or(zero);
    let counts = (lo..=hi)
        .map(|i| if seen[i] { sample[i] + 1 } else { 0 })
        .collect();
    (lo as i32 - SPAN, counts)
}

/// Where a decoded tensor goes: an f32 buffer laid out `[heads, tokens, channels]` that may hold
/// more tokens than the coded tensor (a whole prefix), written at tokens
/// `token_offset..token_offset + take`. Coded tokens at or after `take` are decoded and dropped.
#[derive(Debug)]
pub struct Dest<'a> {
    /// The buffer.
    pub data: &'a mut [f32],
    /// Tokens per head in `data`.
    pub tokens: usize,
    /// Where the coded tensor's first token goes.
    pub token_offset: usize,
    /// How many of the coded tensor's tokens to keep.
    pub take: usize,
}

impl Dest<'_> {
    /// Checks that `dims` (the coded tensor) fits.
    pub(crate) fn check(&self, dims: Dims) -> Result<(), CodecError> {
        let fits = self.take <= dims.tokens
            && self.token_offset + self.take <= self.tokens
            && self.data.len() == dims.heads * self.tokens * dims.channels;
        if fits {
            Ok(())
        } else {
            Err(CodecError::ShapeMismatch {
                expected: dims.heads * self.tokens * dims.channels,
                actual: self.data.len(),
            })
        }
    }

    /// Index of (head, coded token, channel).
    #[inline]
    pub(super) fn at(&self, channels: usize, h: usize, t: usize) -> usize {
        (h * self.tokens + self.token_offset + t) * channels
    }
}

/// Decodes a tensor written by [`encode`] (dimensions `dims`) into `dest`, which the caller has
/// checked with [`Dest::check`] against `dims` widened by any exact leading tokens.
pub fn decode(r: &mut Reader<'_>, dims: Dims, dest: &mut Dest<'_>) -> Result<(), CodecError> {
    let TensorHead {
        grouping,
        delta,
        mus,
        scales,
        offset,
        table,
    } = TensorHead::read(r, dims)?;
    let mut symbols = vec![0u16; dims.len()];
    rans::decode_lanes(r, &table, &mut symbols)?;

    let (tokens, channels) = (dims.tokens, dims.channels);
    let kept = dest.take.min(tokens);
    let mut acc = vec![0i32; channels];
    for h in 0..dims.heads {
        acc.fill(0);
        for t in 0..kept {
            let row = &symbols[(h * tokens + t) * channels..][..channels];
            let at = dest.at(channels, h, t);
            let out = &mut dest.data[at..at + channels];
            if delta {
                for (a, &s) in acc.iter_mut().zip(row) {
                    *a += s as i32 - offset;
                }
            } else {
                for (a, &s) in acc.iter_mut().zip(row) {
                    *a = s as i32 - offset;
                }
            }
            match grouping {
                Grouping::PerChannel => {
                    let g = h * channels;
                    let (mu, sc) = (&mus[g..g + channels], &scales[g..g + channels]);
                    for (((o, &a), &m), &s) in out.iter_mut().zip(&acc).zip(mu).zip(sc) {
                        *o = m + s * a as f32;
                    }
                }
                Grouping::PerToken | Grouping::PerHead => {
                    let g = if grouping == Grouping::PerToken {
                        h * tokens + t
                    } else {
                        h
                    };
                    let (m, s) = (mus[g], scales[g]);
                    for (o, &a) in out.iter_mut().zip(&acc) {
                        *o = m + s * a as f32;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The fields of a lossy tensor section before its rANS stream (the same in both format
/// versions).
pub(super) struct TensorHead {
    pub grouping: Grouping,
    /// Token-locality differences.
    pub delta: bool,
    /// Group centres.
    pub mus: Vec<f32>,
    /// Group scales times the step.
    pub scales: Vec<f32>,
    /// Symbol offset `o`: symbol `k` is the integer `k - o`.
    pub offset: i32,
    pub table: FreqTable,
}

impl TensorHead {
    pub(super) fn read(r: &mut Reader<'_>, dims: Dims) -> Result<Self, CodecError> {
        let flags = r.u8()?;
        let grouping = match flags & !FLAG_DELTA {
            0 => Grouping::PerChannel,
            FLAG_PER_TOKEN => Grouping::PerToken,
            FLAG_PER_HEAD => Grouping::PerHead,
            _ => {
                return Err(CodecError::corrupt(format!(
                    "unknown tensor flags {flags:#x}"
                )))
            }
        };
        let step = r.f32()?;
        if !(step.is_finite() && step > 0.0) {
            return Err(CodecError::corrupt(format!("quantisation step {step}")));
        }
        let (n_groups, _) = dims.groups(grouping);
        let mut read_f16s = || -> Result<Vec<f32>, CodecError> {
            let b = r.bytes(n_groups * 2)?;
            Ok(b.chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect())
        };
        let mus = read_f16s()?;
        let scales = read_f16s()?.into_iter().map(|s| s * step).collect();
        let offset = r.u16()? as i32;
        if offset > MAX_OFFSET {
            return Err(CodecError::corrupt(format!(
                "symbol offset {offset} (at most {MAX_OFFSET})"
            )));
        }
        let table = FreqTable::read(r)?;
        Ok(Self {
            grouping,
            delta: flags & FLAG_DELTA != 0,
            mus,
            scales,
            offset,
            table,
        })
    }
}

fn round_up_f16(v: f32) -> f16 {
    // Zero, negative and NaN scales (a constant group) become 1.
    if v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return f16::ONE;
    }
    let h = f16::from_f32(v);
    if h.to_f32() >= v {
        h
    } else {
        f16::from_bits(h.to_bits() + 1)
    }
}
