//! Lossy coding of one tensor (`[heads, tokens, channels]` f32): normalise, quantise with a
//! uniform step, entropy-code the integers.
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
//! - Token locality: optionally the integers are replaced by their differences along the group
//!   (a lossless transform). It is chosen per tensor, only when it lowers the coded size.
//! - Entropy coding: one frequency table per tensor, [`super::rans`].

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
const MAX_Q: i32 = (rans::MAX_SYMBOLS as i32 / 2 - 1) / 2;

/// Largest group size for which `step` can never produce `|q| > MAX_Q`.
pub fn max_group_len(step: f32) -> usize {
    let bound = (MAX_Q as f32 - 1.0) * step;
    (bound * bound).floor() as usize
}

const FLAG_PER_TOKEN: u8 = 1;
const FLAG_DELTA: u8 = 2;
const FLAG_PER_HEAD: u8 = 4;

/// Tensor dimensions.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub tokens: usize,
    pub channels: usize,
}

impl Dims {
    fn len(&self) -> usize {
        self.heads * self.tokens * self.channels
    }

    /// (number of groups, group length) for a grouping.
    fn groups(&self, g: Grouping) -> (usize, usize) {
        match g {
            Grouping::PerChannel => (self.heads * self.channels, self.tokens),
            Grouping::PerToken => (self.heads * self.tokens, self.channels),
            Grouping::PerHead => (self.heads, self.tokens * self.channels),
        }
    }

    /// Copies group `g` of `x` (`[heads, tokens, channels]`) into `out`.
    fn gather(&self, grouping: Grouping, g: usize, x: &[f32], out: &mut [f32]) {
        match grouping {
            Grouping::PerChannel => {
                let (h, c) = (g / self.channels, g % self.channels);
                let base = h * self.tokens * self.channels + c;
                for (t, o) in out.iter_mut().enumerate() {
                    *o = x[base + t * self.channels];
                }
            }
            Grouping::PerToken | Grouping::PerHead => {
                let len = out.len();
                out.copy_from_slice(&x[g * len..(g + 1) * len]);
            }
        }
    }
}

/// Encodes `x` (`[heads, tokens, channels]`) with `grouping` and `step`, appending to `out`.
pub fn encode(x: &[f32], dims: Dims, grouping: Grouping, step: f32, out: &mut Vec<u8>) {
    debug_assert_eq!(x.len(), dims.len());
    let (n_groups, group_len) = dims.groups(grouping);
    let mut mus = Vec::with_capacity(n_groups);
    let mut scales = Vec::with_capacity(n_groups);
    let mut q = vec![0i32; x.len()];
    let mut group = vec![0f32; group_len];
    for g in 0..n_groups {
        dims.gather(grouping, g, x, &mut group);
        let mean = group.iter().map(|&v| v as f64).sum::<f64>() / group_len as f64;
        let mu = f16::from_f64(mean);
        let mu32 = mu.to_f32();
        let ms = group
            .iter()
            .map(|&v| {
                let d = (v - mu32) as f64;
                d * d
            })
            .sum::<f64>()
            / group_len as f64;
        let s = round_up_f16(ms.sqrt() as f32);
        let inv = 1.0 / (s.to_f32() * step);
        for (q, &v) in q[g * group_len..(g + 1) * group_len].iter_mut().zip(&group) {
            *q = (((v - mu32) * inv).round() as i32).clamp(-MAX_Q, MAX_Q);
        }
        mus.push(mu);
        scales.push(s);
    }

    // Token locality: differences along each group, if they code smaller.
    let plain = histogram(&q);
    let mut delta = q.clone();
    for group in delta.chunks_exact_mut(group_len) {
        for i in (1..group.len()).rev() {
            group[i] -= group[i - 1];
        }
    }
    let diff = histogram(&delta);
    let (flags, symbols, Histogram { offset, counts }) = if diff.cost() < plain.cost() {
        (FLAG_DELTA, delta, diff)
    } else {
        (0, q, plain)
    };
    let flags = flags
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
    let symbols: Vec<u16> = symbols.iter().map(|&v| (v + offset) as u16).collect();
    rans::encode(&symbols, &table, out);
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
    fn at(&self, channels: usize, h: usize, t: usize) -> usize {
        (h * self.tokens + self.token_offset + t) * channels
    }
}

/// Decodes a tensor written by [`encode`] (dimensions `dims`) into `dest`, which the caller has
/// checked with [`Dest::check`] against `dims` widened by any exact leading tokens.
pub fn decode(r: &mut Reader<'_>, dims: Dims, dest: &mut Dest<'_>) -> Result<(), CodecError> {
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
    let (n_groups, group_len) = dims.groups(grouping);
    let read_f16s = |r: &mut Reader<'_>| -> Result<Vec<f32>, CodecError> {
        let b = r.bytes(n_groups * 2)?;
        Ok(b.chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect())
    };
    let mus = read_f16s(r)?;
    let scales = read_f16s(r)?;
    let offset = r.u16()? as i32;
    let table = FreqTable::read(r)?;
    let mut symbols = vec![0u16; dims.len()];
    rans::decode(r, &table, &mut symbols)?;
    let delta = flags & FLAG_DELTA != 0;
    let channels = dims.channels;
    for (g, group) in symbols
        .chunks_exact(group_len.max(1))
        .enumerate()
        .take(n_groups)
    {
        let scale = scales[g] * step;
        let mu = mus[g];
        match grouping {
            Grouping::PerChannel => {
                let (h, c) = (g / channels, g % channels);
                let base = dest.at(channels, h, 0) + c;
                let kept = dest.take.min(group.len());
                let data = &mut *dest.data;
                if delta {
                    let mut acc = 0i32;
                    for (t, &s) in group[..kept].iter().enumerate() {
                        acc += s as i32 - offset;
                        data[base + t * channels] = mu + scale * acc as f32;
                    }
                } else {
                    for (t, &s) in group[..kept].iter().enumerate() {
                        data[base + t * channels] = mu + scale * (s as i32 - offset) as f32;
                    }
                }
            }
            Grouping::PerToken | Grouping::PerHead => {
                // Groups are runs of whole token rows: `[token, channel]` within a head.
                let (h, first_token) = match grouping {
                    Grouping::PerToken => (g / dims.tokens, g % dims.tokens),
                    _ => (g, 0),
                };
                let kept_tokens = dest
                    .take
                    .saturating_sub(first_token)
                    .min(group_len / channels);
                let kept = kept_tokens * channels;
                let base = dest.at(channels, h, first_token);
                let out = &mut dest.data[base..base + kept];
                // A value depends only on the symbols before it, so decoding stops at `kept`.
                let mut acc = 0i32;
                for (o, &s) in out.iter_mut().zip(&group[..kept]) {
                    let q = s as i32 - offset;
                    acc = if delta { acc + q } else { q };
                    *o = mu + scale * acc as f32;
                }
            }
        }
    }
    Ok(())
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

/// Counts of integer symbols, as (offset, counts) with `counts[v + offset]`.
struct Histogram {
    offset: i32,
    counts: Vec<u32>,
}

impl Histogram {
    /// Ideal coded size in bits (empirical entropy).
    fn cost(&self) -> f64 {
        let total: f64 = self.counts.iter().map(|&c| c as f64).sum();
        self.counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| -(c as f64) * (c as f64 / total).log2())
            .sum()
    }
}

fn histogram(values: &[i32]) -> Histogram {
    let max_abs = values.iter().map(|v| v.abs()).max().unwrap_or(0);
    let offset = max_abs;
    let mut counts = vec![0u32; (2 * max_abs + 1) as usize];
    for &v in values {
        counts[(v + offset) as usize] += 1;
    }
    Histogram { offset, counts }
}
