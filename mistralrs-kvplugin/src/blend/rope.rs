//! Rotary position embedding at arbitrary positions, and moving cached keys to new positions.
//!
//! The tables are the engine's own ([`mistralrs_core::KvRope`], taken from the model), so every
//! rope variant the engine builds tables for (plain, linear or Llama-3 scaling) rotates here as it
//! does there. Both pair layouts are handled: GPT-NeoX (`(i, i + d/2)`, the safetensors Llama
//! path) and interleaved (`(2i, 2i + 1)`, the GGUF path).
//!
//! Invariants:
//! - All rotation runs in F32, whatever the cache dtype; results are converted back.
//! - RoPE is a rotation by `p * theta_i` per pair, so a key rotated for position `p` and then by
//!   `delta` equals the key rotated for `p + delta`: [`Rope::shift`] relies on this, and the
//!   tests check it against a direct rotation and against the engine.

use candle_core::{DType, Result, Tensor, D};
use mistralrs_core::kv_blend::KvRope;

/// A model's rotary tables in F32.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    neox: bool,
}

impl Rope {
    /// The engine's tables; an error for partial rotary embeddings (`rot_dim < head_dim`), which
    /// the blend does not support.
    pub fn from_model(rope: &KvRope, head_dim: usize) -> Result<Self> {
        let (_, half) = rope.cos.dims2()?;
        if half * 2 != head_dim {
            candle_core::bail!(
                "partial rotary embedding ({} of {head_dim} dims) is not supported",
                half * 2
            );
        }
        Ok(Self {
            cos: rope.cos.to_dtype(DType::F32)?,
            sin: rope.sin.to_dtype(DType::F32)?,
            neox: rope.neox,
        })
    }

    /// Whether pairs are `(i, i + d/2)` (GPT-NeoX) rather than interleaved.
    pub fn is_neox(&self) -> bool {
        self.neox
    }

    /// The largest position the tables cover, plus one.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// `x` (`[1, heads, t, head_dim]`, not yet rotated) rotated for `positions` (one per row).
    pub fn at_positions(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        self.apply(x, &cos, &sin)
    }

    /// Keys rotated for positions `p` (`[1, heads, t, head_dim]`) moved to `p + delta`.
    pub fn shift(&self, k: &Tensor, delta: usize) -> Result<Tensor> {
        if delta == 0 {
            return Ok(k.clone());
        }
        let t = k.dim(2)?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.narrow(0, delta, 1)?.broadcast_as((t, half))?;
        let sin = self.sin.narrow(0, delta, 1)?.broadcast_as((t, half))?;
        self.apply(k, &cos.contiguous()?, &sin.contiguous()?)
    }

    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let rotated = if self.neox {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        };
        rotated.to_dtype(dtype)
    }
}

/// The rotation written out pair by pair, for tests: what [`Rope`] must equal.
#[doc(hidden)]
pub fn reference_rotate(x: &[f32], angles: &[f32], neox: bool) -> Vec<f32> {
    let d = x.len();
    let half = d / 2;
    let mut out = x.to_vec();
    for (i, &a) in angles.iter().enumerate().take(half) {
        let (j0, j1) = if neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (c, s) = (a.cos(), a.sin());
        out[j0] = x[j0] * c - x[j1] * s;
        out[j1] = x[j0] * s + x[j1] * c;
    }
    out
}

/// Per-row squared L2 distance of two `[1, heads, t, dim]` tensors: `[t]`.
pub(crate) fn row_distance(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    diff.sqr()?
        .sum(D::Minus1)?
        .sum(1)?
        .squeeze(0)?
        .to_vec1::<f32>()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tables(max_pos: usize, half: usize) -> KvRope {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..max_pos {
            for i in 0..half {
                let theta = (p as f32) / 10_000f32.powf(2.0 * i as f32 / (2 * half) as f32);
                cos.push(theta.cos());
                sin.push(theta.sin());
            }
        }
        let dev = Device::Cpu;
        KvRope {
            cos: Tensor::from_vec(cos, (max_pos, half), &dev).unwrap(),
            sin: Tensor::from_vec(sin, (max_pos, half), &dev).unwrap(),
            neox: false,
        }
    }

    fn angles(p: usize, half: usize) -> Vec<f32> {
        (0..half)
            .map(|i| (p as f32) / 10_000f32.powf(2.0 * i as f32 / (2 * half) as f32))
            .collect()
    }

    #[test]
    fn rotation_matches_the_pairwise_reference_and_shifts_compose() {
        let (heads, t, d) = (2, 5, 8);
        let x: Vec<f32> = (0..heads * t * d)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (1, heads, t, d), &Device::Cpu).unwrap();
        for neox in [false, true] {
            let rope = Rope::from_model(
                &KvRope {
                    neox,
                    ..tables(64, d / 2)
                },
                d,
            )
            .unwrap();
            let positions = [3u32, 9, 10, 20, 40];
            let pos = Tensor::new(&positions[..], &Device::Cpu).unwrap();
            let got = rope.at_positions(&xt, &pos).unwrap();
            let got_rows = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for h in 0..heads {
                for (r, &p) in positions.iter().enumerate() {
                    let at = (h * t + r) * d;
                    let want = reference_rotate(&x[at..at + d], &angles(p as usize, d / 2), neox);
                    for (g, w) in got_rows[at..at + d].iter().zip(&want) {
                        assert!((g - w).abs() < 1e-5, "neox={neox}: {g} vs {w}");
                    }
                }
            }
            // Moving rotated keys by 17 equals rotating them for the later positions.
            let shifted = rope.shift(&got, 17).unwrap();
            let later: Vec<u32> = positions.iter().map(|p| p + 17).collect();
            let direct = rope
                .at_positions(&xt, &Tensor::new(&later[..], &Device::Cpu).unwrap())
                .unwrap();
            let err = row_distance(&shifted, &direct).unwrap();
            assert!(err.iter().all(|e| *e < 1e-8), "neox={neox}: {err:?}");
        }
    }

    #[test]
    fn partial_rotary_is_refused() {
        let err = Rope::from_model(&tables(8, 2), 8).unwrap_err();
        assert!(err.to_string().contains("partial rotary"), "{err}");
    }
}
