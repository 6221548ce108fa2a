//! `kvplugin bench codec --transform-gain`: how many bits per value a per-model decorrelating
//! transform (KVTC-style PCA with a calibrated basis) could save over the codec's per-channel
//! scalar quantisation, measured on real KV before anyone builds it.
//!
//! For each layer and for K and V, the cache's tokens (the exact sink token left out) are split
//! in halves: the first calibrates, the second tests, so the estimate is out of sample, as a basis
//! shipped per model would be. Each half is normalised as the codec normalises a chunk (per
//! (head, channel): centre and RMS over the half's tokens, where the codec uses a chunk's), so
//! every channel has variance 1. Two bases
//! are fitted on the calibration half: one per head (64 channels) and one over all heads of the
//! layer (heads x 64). The test half's variances along each basis vector (the diagonal after the
//! rotation; leftover correlations are not credited) then get the rate a Gaussian source needs
//! at the codec's distortion (reverse water-filling at `step^2 / 12` per value, the default
//! level's steps), and that rate is compared with the same source coded channel by channel
//! (variances 1). The same comparison for a one-tap prediction of each channel from the token
//! before (fitted coefficient) bounds what token locality could add. Last, the same three
//! options on the codec's own terms: the integers the default level's steps give (chunks of 256
//! tokens, one table per tensor), their empirical entropy plain, as coefficient-1 differences,
//! and with a per-channel coefficient `k / 16` in a closed loop on the integers (what a format
//! version could store exactly; the fit is in-sample and its coefficients, about 0.02 bit per
//! value, are not charged), against the codec's per-tensor choice, averaged over chunks. High-rate
//! Gaussian theory: it ranks ideas and sizes the gap; the codec's
//! entropy coder and the real, non-Gaussian distributions decide the final figure.

use nalgebra::{DMatrix, SymmetricEigen};

use crate::{codec::Level, eval::PastKv};

/// Rate in bits per component of independent Gaussian components with variances `variances`
/// at mean distortion `distortion` per component (reverse water-filling).
fn water_filling_rate(variances: &[f64], distortion: f64) -> f64 {
    let n = variances.len() as f64;
    let total = distortion * n;
    if variances.iter().sum::<f64>() <= total {
        return 0.0;
    }
    // Water level theta: sum of min(theta, variance) equals the total distortion.
    let (mut lo, mut hi) = (0.0f64, variances.iter().cloned().fold(0.0, f64::max));
    for _ in 0..100 {
        let theta = 0.5 * (lo + hi);
        let d: f64 = variances.iter().map(|&v| v.min(theta)).sum();
        if d < total {
            lo = theta;
        } else {
            hi = theta;
        }
    }
    let theta = 0.5 * (lo + hi);
    variances
        .iter()
        .filter(|&&v| v > theta)
        .map(|&v| 0.5 * (v / theta).log2())
        .sum::<f64>()
        / n
}

/// `rows` (tokens x columns), each column centred and scaled to RMS 1 over the rows.
fn normalised(rows: &[Vec<f32>]) -> DMatrix<f64> {
    let (n, c) = (rows.len(), rows[0].len());
    let mut m = DMatrix::from_fn(n, c, |i, j| rows[i][j] as f64);
    for mut col in m.column_iter_mut() {
        let mean = col.mean();
        col.add_scalar_mut(-mean);
        let rms = (col.norm_squared() / n as f64).sqrt();
        if rms > 0.0 {
            col /= rms;
        }
    }
    m
}

/// Bits per value saved by a basis fitted on `calibration` when coding `test` (both tokens x
/// channels), at distortion `distortion` per value.
fn gain(calibration: &[Vec<f32>], test: &[Vec<f32>], distortion: f64) -> f64 {
    let (cal, test) = (normalised(calibration), normalised(test));
    let cov = |m: &DMatrix<f64>| m.transpose() * m / m.nrows() as f64;
    let basis = SymmetricEigen::new(cov(&cal)).eigenvectors;
    let test_cov = cov(&test);
    let variances: Vec<f64> = basis
        .column_iter()
        .map(|b| (b.transpose() * &test_cov * b)[(0, 0)])
        .collect();
    let channel_variances: Vec<f64> = test_cov.diagonal().iter().copied().collect();
    water_filling_rate(&channel_variances, distortion) - water_filling_rate(&variances, distortion)
}

/// Bits per value saved by predicting each channel of `test` from the same channel one token
/// earlier (one coefficient per channel, fitted on `calibration`), at distortion `distortion`
/// per value: the most a token-locality transform with one tap could give (the codec's
/// differences are the coefficient-1 case).
fn prediction_gain(calibration: &[Vec<f32>], test: &[Vec<f32>], distortion: f64) -> f64 {
    let (cal, test) = (normalised(calibration), normalised(test));
    let lag1 = |m: &DMatrix<f64>, j: usize| {
        let c = m.column(j);
        let n = c.len();
        c.rows(1, n - 1).dot(&c.rows(0, n - 1)) / (n - 1) as f64
    };
    let residual: Vec<f64> = (0..test.ncols())
        .map(|j| {
            let rho = lag1(&cal, j);
            let c = test.column(j);
            let n = c.len();
            (c.rows(1, n - 1) - c.rows(0, n - 1) * rho).norm_squared() / (n - 1) as f64
        })
        .collect();
    let channels = vec![1.0; test.ncols()];
    water_filling_rate(&channels, distortion) - water_filling_rate(&residual, distortion)
}

/// Empirical entropy, in bits per value, of integers counted in `counts`.
fn entropy(counts: &std::collections::HashMap<i32, u32>) -> f64 {
    let total: f64 = counts.values().map(|&c| c as f64).sum();
    counts
        .values()
        .map(|&c| -(c as f64) * (c as f64 / total).log2())
        .sum::<f64>()
        / total
}

/// Coded size (empirical entropy, one table per tensor as the codec keeps) of one tensor chunk
/// (`[heads][tokens][channels]`) quantised the codec's way (per (head, channel) centre and RMS,
/// step `step`): the integers as they are, their coefficient-1 token differences, and each
/// channel predicted from its previous token as `(k * q + 8) >> 4` with `k` in 0..=16 fitted per
/// channel (least squares on the chunk; a closed loop on the integers, so exactly invertible).
fn quantised_sizes(heads: &[&[Vec<f32>]], step: f32) -> [f64; 3] {
    use std::collections::HashMap;
    let mut counts: [HashMap<i32, u32>; 3] = Default::default();
    for head in heads {
        let channels = head[0].len();
        for c in 0..channels {
            let xs: Vec<f32> = head.iter().map(|row| row[c]).collect();
            let mean = xs.iter().sum::<f32>() / xs.len() as f32;
            let rms = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32)
                .sqrt()
                .max(f32::MIN_POSITIVE);
            let q: Vec<i32> = xs
                .iter()
                .map(|x| ((x - mean) / (rms * step)).round() as i32)
                .collect();
            let (num, den) = q.windows(2).fold((0i64, 0i64), |(n, d), w| {
                (n + (w[0] * w[1]) as i64, d + (w[0] * w[0]) as i64)
            });
            let k = if den == 0 {
                0
            } else {
                ((16 * num) as f64 / den as f64).round().clamp(0.0, 16.0) as i32
            };
            for (t, &v) in q.iter().enumerate() {
                let prev = if t == 0 { 0 } else { q[t - 1] };
                *counts[0].entry(v).or_default() += 1;
                *counts[1].entry(v - prev).or_default() += 1;
                *counts[2].entry(v - ((k * prev + 8) >> 4)).or_default() += 1;
            }
        }
    }
    counts.each_ref().map(entropy)
}

/// Prints, per layer, the estimated saving of a per-head and of an all-heads basis and of one-tap
/// token prediction for K and V, the means over layers, then the quantised-integer sizes.
pub fn report(kv: &PastKv, exact_tokens: usize) -> anyhow::Result<()> {
    let tokens =
        kv.k.first()
            .map_or(0, |k| k.dims().get(2).copied().unwrap_or(0));
    anyhow::ensure!(
        tokens >= exact_tokens + 16,
        "--transform-gain needs at least {} cached tokens (has {tokens})",
        exact_tokens + 16
    );
    let spec = Level::Default
        .lossy_spec()
        .expect("the default level is lossy");
    println!(
        "estimated bits per value saved by a calibrated PCA basis and by one-tap token prediction (out of sample), at the default level's steps"
    );
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "layer", "K per-head", "K all", "V per-head", "V all", "K token", "V token"
    );
    let n_layers = kv.k.len();
    let mut sums = [0.0f64; 6];
    for layer in 0..n_layers {
        let mut row = [0.0f64; 6];
        for (is_value, tensor) in [(false, &kv.k[layer]), (true, &kv.v[layer])] {
            let q = if is_value { spec.values } else { spec.keys };
            let step = q.steps[(layer * 3 / n_layers).min(2)] as f64;
            let distortion = step * step / 12.0;
            // [heads][tokens][channels], the sink left out.
            let heads: Vec<Vec<Vec<f32>>> = tensor.squeeze(0)?.to_vec3()?;
            let heads: Vec<&[Vec<f32>]> = heads.iter().map(|h| &h[exact_tokens..]).collect();
            let half = heads[0].len() / 2;
            let per_head: f64 = heads
                .iter()
                .map(|h| gain(&h[..half], &h[half..], distortion))
                .sum::<f64>()
                / heads.len() as f64;
            let joined: Vec<Vec<f32>> = (0..heads[0].len())
                .map(|t| heads.iter().flat_map(|h| h[t].iter().copied()).collect())
                .collect();
            let all = gain(&joined[..half], &joined[half..], distortion);
            let at = if is_value { 2 } else { 0 };
            row[at] = per_head;
            row[at + 1] = all;
            row[4 + usize::from(is_value)] =
                prediction_gain(&joined[..half], &joined[half..], distortion);
        }
        println!(
            "{layer:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            row[0], row[1], row[2], row[3], row[4], row[5]
        );
        for (s, r) in sums.iter_mut().zip(row) {
            *s += r;
        }
    }
    let mean = sums.map(|s| s / n_layers as f64);
    // The same question on the codec's own terms: quantised integers, chunks of 256 tokens.
    let mut sizes = [[0.0f64; 4]; 2];
    let mut tensors = [0usize; 2];
    for layer in 0..n_layers {
        for (is_value, tensor) in [(false, &kv.k[layer]), (true, &kv.v[layer])] {
            let q = if is_value { spec.values } else { spec.keys };
            let step = q.steps[(layer * 3 / n_layers).min(2)];
            let heads: Vec<Vec<Vec<f32>>> = tensor.squeeze(0)?.to_vec3()?;
            let n_tokens = heads[0].len();
            for start in (exact_tokens..n_tokens).step_by(256) {
                let end = (start + 256).min(n_tokens);
                let chunk: Vec<&[Vec<f32>]> = heads.iter().map(|h| &h[start..end]).collect();
                let [plain, diff, fitted] = quantised_sizes(&chunk, step);
                let s = [plain, diff, fitted, plain.min(diff)];
                for (acc, v) in sizes[usize::from(is_value)].iter_mut().zip(s) {
                    *acc += v;
                }
                tensors[usize::from(is_value)] += 1;
            }
        }
    }
    println!(
        "{:>5} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
        "mean", mean[0], mean[1], mean[2], mean[3], mean[4], mean[5]
    );
    println!(
        "mean over K and V: per-head basis {:.3} bits per value, all-heads basis {:.3}, one-tap token prediction {:.3}",
        (mean[0] + mean[2]) / 2.0,
        (mean[1] + mean[3]) / 2.0,
        (mean[4] + mean[5]) / 2.0
    );
    println!(
        "quantised at the default level's steps, chunks of 256 (bits per value: plain, differences, fitted per-channel prediction, the codec's choice of the first two):"
    );
    for (name, (s, n)) in ["K", "V"].iter().zip(sizes.iter().zip(tensors)) {
        let [plain, diff, fitted, chosen] = s.map(|v| v / n as f64);
        println!("  {name}: {plain:.3} {diff:.3} {fitted:.3} {chosen:.3}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_filling_matches_the_closed_forms() {
        // Unit variances above the distortion: 0.5 log2(1 / D) each.
        let r = water_filling_rate(&[1.0; 8], 0.25);
        assert!((r - 1.0).abs() < 1e-9, "{r}");
        // A component below the water level costs nothing; the others share the distortion.
        let r = water_filling_rate(&[4.0, 0.01], 0.5);
        // theta = 0.99: 0.5 log2(4 / 0.99) over two components.
        assert!((r - 0.25 * (4.0f64 / 0.99).log2()).abs() < 1e-6, "{r}");
        assert_eq!(water_filling_rate(&[0.1, 0.1], 0.5), 0.0);
    }

    #[test]
    fn fitted_prediction_codes_a_smooth_channel_smaller_and_noise_no_smaller() {
        // One head, 256 tokens, two channels: a slow sine (neighbours alike) and hash noise.
        let smooth: Vec<Vec<f32>> = (0..256).map(|t| vec![(t as f32 * 0.05).sin()]).collect();
        let hash = |t: u32| {
            let mut x = t.wrapping_mul(0x9E37_79B9);
            x ^= x >> 15;
            x = x.wrapping_mul(0x85EB_CA6B);
            x ^ (x >> 13)
        };
        let noise: Vec<Vec<f32>> = (0..256u32)
            .map(|t| vec![(hash(t) >> 16) as f32 / 65_536.0])
            .collect();
        let [plain, diff, fitted] = quantised_sizes(&[&smooth], 0.3);
        assert!(
            fitted < plain - 1.0 && diff < plain - 1.0,
            "{plain} {diff} {fitted}"
        );
        let [plain, diff, fitted] = quantised_sizes(&[&noise], 0.3);
        assert!(
            fitted > plain - 0.1 && diff > plain,
            "{plain} {diff} {fitted}"
        );
    }

    #[test]
    fn correlated_channels_gain_and_independent_ones_do_not() {
        // Two channels that are the same signal (plus a little noise) versus two unrelated ones.
        let noise = |i: usize| ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.02;
        let signal = |i: usize| ((i as f32) * 0.37).sin();
        let other = |i: usize| ((i as f32) * 1.91 + 0.5).cos();
        let twin: Vec<Vec<f32>> = (0..400)
            .map(|i| vec![signal(i), signal(i) + noise(i)])
            .collect();
        let apart: Vec<Vec<f32>> = (0..400).map(|i| vec![signal(i), other(i)]).collect();
        let d = 0.01;
        assert!(gain(&twin[..200], &twin[200..], d) > 1.0);
        assert!(gain(&apart[..200], &apart[200..], d).abs() < 0.1);
    }
}
