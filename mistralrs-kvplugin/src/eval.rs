//! A reference forward pass of the Llama architecture in plain candle, used to measure what a
//! lossy cache does to the model: logits at every position given a past KV cache (the engine only
//! exposes the last position's), and greedy continuations from a given cache.
//!
//! It loads the Hugging Face folder that `kvplugin convert` writes (neox RoPE, F32) and computes
//! the same K/V as the engine's safetensors Llama path; the codec benchmark checks that against
//! the K/V the engine itself hands to the hook, and prints the largest difference.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Linear, RmsNorm, VarBuilder};

use crate::error::{Error, Result};

/// Per-layer K and V, `[1, kv_heads, n_tokens, head_dim]`, post-RoPE.
#[derive(Debug, Clone)]
pub struct PastKv {
    /// Keys per layer.
    pub k: Vec<Tensor>,
    /// Values per layer.
    pub v: Vec<Tensor>,
}

impl PastKv {
    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.dims()[2])
    }

    /// Whether no token is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(serde::Deserialize)]
struct Config {
    hidden_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    num_hidden_layers: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// The model, F32 on the CPU.
pub struct LlamaEval {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rope_theta: f64,
}

impl LlamaEval {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let bad = |reason: String| Error::ModelFile {
            path: dir.to_path_buf(),
            reason,
        };
        let cfg: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .map_err(|e| bad(format!("config.json: {e}")))?;
        let weights = dir.join("model.safetensors");
        let vb = VarBuilder::from_tensors(
            candle_core::safetensors::load(&weights, &Device::Cpu)?,
            DType::F32,
            &Device::Cpu,
        );
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        let linear = |name: &str| -> Result<Linear> {
            Ok(Linear::new(
                vb.get_unchecked_dtype(&format!("{name}.weight"), DType::F32)?,
                None,
            ))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(
                vb.get_unchecked_dtype(&format!("{name}.weight"), DType::F32)?,
                cfg.rms_norm_eps,
            ))
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                Ok(Layer {
                    q: linear(&format!("{p}.self_attn.q_proj"))?,
                    k: linear(&format!("{p}.self_attn.k_proj"))?,
                    v: linear(&format!("{p}.self_attn.v_proj"))?,
                    o: linear(&format!("{p}.self_attn.o_proj"))?,
                    gate: linear(&format!("{p}.mlp.gate_proj"))?,
                    up: linear(&format!("{p}.mlp.up_proj"))?,
                    down: linear(&format!("{p}.mlp.down_proj"))?,
                    input_norm: norm(&format!("{p}.input_layernorm"))?,
                    post_norm: norm(&format!("{p}.post_attention_layernorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = vb.get_unchecked_dtype("model.embed_tokens.weight", DType::F32)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.clone(), None)
        } else {
            linear("lm_head")?
        };
        Ok(Self {
            embed,
            layers,
            norm: norm("model.norm")?,
            lm_head,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim,
            rope_theta: cfg.rope_theta,
        })
    }

    /// Logits `[n, vocab]` for every position of `tokens`, which follow the `past` cache, and the
    /// cache extended by `tokens`.
    pub fn forward(&self, tokens: &[u32], past: Option<&PastKv>) -> Result<(Tensor, PastKv)> {
        let n = tokens.len();
        let offset = past.map_or(0, PastKv::len);
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let (cos, sin) = self.rope_tables(offset, n)?;
        let total = offset + n;
        // Causal mask over the whole (past + new) sequence: row i sees columns <= offset + i.
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, total), &Device::Cpu)?;
        let mut new_k = Vec::with_capacity(self.layers.len());
        let mut new_v = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let q = self.heads(&layer.q.forward(&h)?, self.n_heads, n)?;
            let k = self.heads(&layer.k.forward(&h)?, self.n_kv_heads, n)?;
            let v = self.heads(&layer.v.forward(&h)?, self.n_kv_heads, n)?;
            let q = candle_nn::rotary_emb::rope(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&k.contiguous()?, &cos, &sin)?;
            let (k, v) = match past {
                Some(p) => (
                    Tensor::cat(&[&p.k[l], &k], 2)?,
                    Tensor::cat(&[&p.v[l], &v], 2)?,
                ),
                None => (k, v),
            };
            let groups = self.n_heads / self.n_kv_heads;
            let kr = repeat_kv(&k, groups)?;
            let vr = repeat_kv(&v, groups)?;
            let scores =
                (q.matmul(&kr.t()?)? / (self.head_dim as f64).sqrt())?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let attn = probs.matmul(&vr)?.transpose(1, 2)?.reshape((
                1,
                n,
                self.n_heads * self.head_dim,
            ))?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.post_norm.forward(&x)?;
            let mlp = layer.down.forward(
                &(candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?,
            )?;
            x = (x + mlp)?;
            new_k.push(k);
            new_v.push(v);
        }
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?.i(0)?;
        Ok((logits, PastKv { k: new_k, v: new_v }))
    }

    /// Greedy continuation of `n_new` tokens after `last` (the last prompt token, not in `past`),
    /// with each step's margin: its top logit minus the runner-up's (how far the choice is from
    /// a tie). Ties go to the lower token id.
    pub fn greedy(&self, past: &PastKv, last: u32, n_new: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let mut past = past.clone();
        let mut token = last;
        let mut tokens = Vec::with_capacity(n_new);
        let mut margins = Vec::with_capacity(n_new);
        for _ in 0..n_new {
            let (logits, next_past) = self.forward(&[token], Some(&past))?;
            let row: Vec<f32> = logits.i(0)?.to_vec1()?;
            let (mut best, mut top, mut second) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
            for (i, &l) in row.iter().enumerate() {
                if l > top {
                    (best, top, second) = (i, l, top);
                } else if l > second {
                    second = l;
                }
            }
            token = best as u32;
            tokens.push(token);
            margins.push(top - second);
            past = next_past;
        }
        Ok((tokens, margins))
    }

    fn heads(&self, x: &Tensor, n_heads: usize, n: usize) -> Result<Tensor> {
        Ok(x.reshape((1, n, n_heads, self.head_dim))?.transpose(1, 2)?)
    }

    fn rope_tables(&self, offset: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let half = self.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64) as f32)
            .collect();
        let angles: Vec<f32> = (offset..offset + n)
            .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (n, half), &Device::Cpu)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, h, n, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, h, groups, n, d))?
        .reshape((b, h * groups, n, d))?)
}

/// Natural-log negative log-likelihood of `targets[i]` under `logits[i]`, for every row.
pub fn nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let rows: Vec<Vec<f32>> = log_probs.to_vec2()?;
    Ok(rows
        .iter()
        .zip(targets)
        .map(|(row, &t)| -(row[t as usize] as f64))
        .collect())
}

/// Argmax of every row of `logits`.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
