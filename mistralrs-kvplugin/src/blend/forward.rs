//! The selective forward pass (CacheBlend) over the engine's layers.
//!
//! The prompt's rows are split into segments: an optional leading `Exact` segment (a cache equal
//! to what a full prefill computes: nothing precedes it), `Reused` segments (each a document's
//! cache computed after a short lead, or alone, and moved to its place), and `Fresh` segments
//! (no cache: the question). Layer by layer, the active rows are computed from their hidden
//! states with the model's own projections and MLP ([`KvLayerModel`]); RoPE and attention run
//! here, attending over the whole blended cache with a causal mask by position.
//!
//! Invariants:
//! - Fresh rows are active in every layer; exact rows are never computed (they are keys only).
//! - At each selection step `(layer, keep)` every reused row still active has fresh K/V at that
//!   layer; the `keep` share (of all reused rows) with the largest deviation from their reused
//!   K/V stays active, the rest keep their reused K/V in all later layers.
//! - With `keep = 1` at every step, every row is computed in every layer: the result is a full
//!   prefill of the rows (up to float rounding), which the tests check against the engine.
//! - Reused K/V for a layer are taken (and keys moved) only when that layer first needs them, so
//!   loads can finish while the first layers run.

use std::{sync::Arc, time::Instant};

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::{kv_blend::KvLayerModel, LayerKv};

use super::rope::{row_distance, Rope};

/// Where a segment's K/V come from.
pub enum SegmentKv {
    /// Exact K/V for positions `0..len` (the leading segment only).
    Exact(KvSupply),
    /// K/V of the same tokens computed after `lead` (alone when it is empty), moved to the
    /// segment's place. The cache holds `lead.len() + len` rows at positions `0..`; the lead's
    /// rows are dropped.
    Reused {
        /// The cache.
        supply: KvSupply,
        /// Tokens the document was computed after (an attention sink, see
        /// [`crate::blend::BlendConfig::document_sink`]).
        lead: Vec<u32>,
    },
    /// No cache: computed in every layer.
    Fresh,
}

/// A segment's cache, ready or still loading. A load that ends with `None` (a miss or a failure)
/// is computed here instead, on its own at positions `0..len`, and handed back for caching.
pub enum KvSupply {
    /// In hand.
    Ready(Arc<Vec<LayerKv>>),
    /// Still loading: the forward waits for it when it first needs it.
    Pending(std::sync::mpsc::Receiver<Option<Arc<Vec<LayerKv>>>>),
}

/// A run of rows of the prompt.
pub struct Segment {
    /// Rows (tokens) of the segment.
    pub len: usize,
    /// Where its K/V come from.
    pub kv: SegmentKv,
}

/// Which deviation picks the rows to recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deviation {
    /// Distance between fresh and reused keys (the released CacheBlend code).
    Key,
    /// Distance between fresh and reused values (the CacheBlend paper).
    Value,
}

/// How to select: after layer `layer` has been computed for the active rows, keep `keep` (a share
/// of all reused rows) active. Steps are in increasing layer order.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelectStep {
    /// The layer after which rows are selected.
    pub layer: usize,
    /// The share of all reused rows kept active.
    pub keep: f32,
}

/// What a blend did.
#[derive(Debug, Clone, Default)]
pub struct ForwardReport {
    /// Rows computed in each layer.
    pub active_per_layer: Vec<usize>,
    /// Reused rows in the prompt.
    pub reused_rows: usize,
    /// Seconds spent waiting for loads (the forward had nothing else to do).
    pub load_wait_s: f64,
    /// Seconds of compute.
    pub compute_s: f64,
    /// Per selection layer, the deviation of every reused row still active (diagnostics).
    pub deviations: Vec<(usize, Vec<(usize, f32)>)>,
    /// Attention output of the last row in the last layer (`[heads * head_dim]`), for diagnostics.
    pub last_attention: Vec<f32>,
    /// Segments computed here because their load gave nothing: index and cache.
    pub computed: Vec<(usize, Arc<Vec<LayerKv>>)>,
}

/// The blended cache of `tokens` and what it took.
pub struct Blended {
    /// K/V per layer for every row (`[1, kv_heads, rows, head_dim]`).
    pub layers: Vec<LayerKv>,
    /// What it took.
    pub report: ForwardReport,
}

/// Computes the blended cache of `tokens` (covered, in order, by `segments`).
pub fn blend(
    model: &dyn KvLayerModel,
    rope: &Rope,
    tokens: &[u32],
    segments: Vec<Segment>,
    steps: &[SelectStep],
    deviation: Deviation,
) -> Result<Blended> {
    Forward::new(model, rope, tokens, segments)?.run(steps, deviation)
}

/// A full forward of `tokens` at positions `0..len`: the cache a prefill of them alone computes
/// (a document's cache, with its lead first).
pub fn standalone(model: &dyn KvLayerModel, rope: &Rope, tokens: &[u32]) -> Result<Vec<LayerKv>> {
    let segments = vec![Segment {
        len: tokens.len(),
        kv: SegmentKv::Fresh,
    }];
    Ok(blend(model, rope, tokens, segments, &[], Deviation::Value)?.layers)
}

struct SegmentState {
    start: usize,
    len: usize,
    kind: Kind,
    supply: Option<KvSupply>,
    kv: Option<Arc<Vec<LayerKv>>>,
    /// Rows of the cache before the segment's own (see [`SegmentKv::Reused`]).
    lead: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    Reused,
    Fresh,
}

struct Forward<'a> {
    model: &'a dyn KvLayerModel,
    rope: &'a Rope,
    tokens: &'a [u32],
    segments: Vec<SegmentState>,
    /// Rows before this are exact and never computed.
    exact_len: usize,
    device: Device,
    report: ForwardReport,
}

impl<'a> Forward<'a> {
    fn new(
        model: &'a dyn KvLayerModel,
        rope: &'a Rope,
        tokens: &'a [u32],
        segments: Vec<Segment>,
    ) -> Result<Self> {
        let total: usize = segments.iter().map(|s| s.len).sum();
        if total != tokens.len() || tokens.is_empty() {
            candle_core::bail!(
                "segments cover {total} rows, the prompt has {}",
                tokens.len()
            );
        }
        if tokens.len() > rope.max_positions() {
            candle_core::bail!(
                "{} tokens exceed the model's {} positions",
                tokens.len(),
                rope.max_positions()
            );
        }
        let mut start = 0;
        let mut states = Vec::with_capacity(segments.len());
        for (i, segment) in segments.into_iter().enumerate() {
            let (kind, supply, lead) = match segment.kv {
                SegmentKv::Exact(s) if i == 0 => (Kind::Exact, Some(s), Vec::new()),
                SegmentKv::Exact(_) => candle_core::bail!("only the first segment can be exact"),
                SegmentKv::Reused { supply, lead } => (Kind::Reused, Some(supply), lead),
                SegmentKv::Fresh => (Kind::Fresh, None, Vec::new()),
            };
            if lead.len() > start {
                candle_core::bail!(
                    "a document at {start} cannot be moved back over its {}-token lead",
                    lead.len()
                );
            }
            states.push(SegmentState {
                start,
                len: segment.len,
                kind,
                supply,
                kv: None,
                lead,
            });
            start += segment.len;
        }
        let exact_len = match states.first() {
            Some(s) if s.kind == Kind::Exact => s.len,
            _ => 0,
        };
        if exact_len == tokens.len() {
            candle_core::bail!("nothing to compute: the whole prompt is exact");
        }
        let report = ForwardReport {
            reused_rows: states
                .iter()
                .filter(|s| s.kind == Kind::Reused)
                .map(|s| s.len)
                .sum(),
            ..ForwardReport::default()
        };
        Ok(Self {
            model,
            rope,
            tokens,
            segments: states,
            exact_len,
            device: Device::Cpu,
            report,
        })
    }

    /// Segment `i`'s cache, waiting for its load, or computing it alone if the load gave none.
    fn segment_kv(&mut self, i: usize) -> Result<Arc<Vec<LayerKv>>> {
        if let Some(kv) = &self.segments[i].kv {
            return Ok(kv.clone());
        }
        let supply = self.segments[i].supply.take();
        let waited = Instant::now();
        let loaded = match supply {
            Some(KvSupply::Ready(kv)) => Some(kv),
            Some(KvSupply::Pending(rx)) => rx.recv().ok().flatten(),
            None => candle_core::bail!("segment {i} has no cache"),
        };
        self.report.load_wait_s += waited.elapsed().as_secs_f64();
        let lead = self.segments[i].lead.clone();
        let kv = match loaded {
            Some(kv) => {
                let (start, len) = (self.segments[i].start, self.segments[i].len + lead.len());
                let layers = self.model.num_layers();
                let shape_ok = kv.len() == layers
                    && kv
                        .iter()
                        .all(|l| l.k.dim(2).ok() == Some(len) && l.v.dim(2).ok() == Some(len));
                if !shape_ok {
                    candle_core::bail!("segment at {start}: cached K/V do not cover its {len} tokens in {layers} layers");
                }
                kv
            }
            None => {
                let (start, len) = (self.segments[i].start, self.segments[i].len);
                let mut tokens = lead;
                tokens.extend_from_slice(&self.tokens[start..start + len]);
                let kv = Arc::new(standalone(self.model, self.rope, &tokens)?);
                self.report.computed.push((i, kv.clone()));
                kv
            }
        };
        self.segments[i].kv = Some(kv.clone());
        Ok(kv)
    }

    /// Reused K/V of layer `layer` for all computed rows (keys moved to their positions; zeros
    /// for fresh rows, which are always active and never read from here).
    fn reused_layer(&mut self, layer: usize) -> Result<(Tensor, Tensor)> {
        let (kv_heads, head_dim) = (self.model.num_kv_heads(), self.model.head_dim());
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for i in 0..self.segments.len() {
            let (start, len, kind) = (
                self.segments[i].start,
                self.segments[i].len,
                self.segments[i].kind,
            );
            match kind {
                Kind::Exact => {}
                Kind::Reused => {
                    let kv = self.segment_kv(i)?;
                    let lead = self.segments[i].lead.len();
                    let rows =
                        |t: &Tensor| t.narrow(2, lead, len)?.to_dtype(DType::F32)?.contiguous();
                    ks.push(self.rope.shift(&rows(&kv[layer].k)?, start - lead)?);
                    vs.push(rows(&kv[layer].v)?);
                }
                Kind::Fresh => {
                    let zeros =
                        Tensor::zeros((1, kv_heads, len, head_dim), DType::F32, &self.device)?;
                    ks.push(zeros.clone());
                    vs.push(zeros);
                }
            }
        }
        Ok((
            Tensor::cat(&ks, 2)?.contiguous()?,
            Tensor::cat(&vs, 2)?.contiguous()?,
        ))
    }

    fn exact_layer(&mut self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        if self.exact_len == 0 {
            return Ok(None);
        }
        let kv = self.segment_kv(0)?;
        Ok(Some((
            kv[layer].k.to_dtype(DType::F32)?,
            kv[layer].v.to_dtype(DType::F32)?,
        )))
    }

    fn row_kind(&self, row: usize) -> Kind {
        let position = row + self.exact_len;
        self.segments
            .iter()
            .find(|s| position >= s.start && position < s.start + s.len)
            .map_or(Kind::Fresh, |s| s.kind)
    }

    fn run(mut self, steps: &[SelectStep], deviation: Deviation) -> Result<Blended> {
        let started = Instant::now();
        let model = self.model;
        let n_layers = model.num_layers();
        if steps.windows(2).any(|w| w[0].layer >= w[1].layer)
            || steps
                .iter()
                .any(|s| s.layer >= n_layers || !(0.0..=1.0).contains(&s.keep))
        {
            candle_core::bail!("selection steps must be in increasing layer order, below {n_layers}, keeping 0..=1");
        }
        let rows = self.tokens.len() - self.exact_len;
        let kinds: Vec<Kind> = (0..rows).map(|r| self.row_kind(r)).collect();
        // Reuse without any recompute (`keep = 0` at layer 0): only fresh rows are ever computed.
        let mut active: Vec<u32> = match steps.first() {
            Some(s) if s.layer == 0 && s.keep == 0.0 => (0..rows as u32)
                .filter(|&r| kinds[r as usize] == Kind::Fresh)
                .collect(),
            _ => (0..rows as u32).collect(),
        };
        if active.is_empty() {
            candle_core::bail!("no row to compute: the prompt needs at least one uncached token");
        }
        let ids = Tensor::new(&self.tokens[self.exact_len..], &self.device)?.unsqueeze(0)?;
        let mut h =
            model.embed(&ids.index_select(&Tensor::new(active.as_slice(), &self.device)?, 1)?)?;
        let mut out = Vec::with_capacity(n_layers);
        let scale = model.attention_scale();
        for layer in 0..n_layers {
            self.report.active_per_layer.push(active.len());
            let active_t = Tensor::new(active.as_slice(), &self.device)?;
            let positions: Vec<u32> = active.iter().map(|r| r + self.exact_len as u32).collect();
            let positions_t = Tensor::new(positions.as_slice(), &self.device)?;
            let (q, k, v) = model.qkv(layer, &h)?;
            // The cache keeps the model's activation dtype; the blend computes in F32.
            let cache_dtype = k.dtype();
            let q = self
                .rope
                .at_positions(&q.to_dtype(DType::F32)?, &positions_t)?;
            let k = self
                .rope
                .at_positions(&k.to_dtype(DType::F32)?, &positions_t)?;
            let v = v.to_dtype(DType::F32)?;
            let step = steps
                .iter()
                .find(|s| s.layer == layer && !(s.layer == 0 && s.keep == 0.0));
            let needs_reused =
                active.len() < rows || (step.is_some() && self.report.reused_rows > 0);
            let reused = if needs_reused {
                Some(self.reused_layer(layer)?)
            } else {
                None
            };
            let (k_rows, v_rows) = match &reused {
                Some((rk, rv)) if active.len() < rows => {
                    // Row r takes the fresh row if active, the reused row otherwise.
                    let mut gather: Vec<u32> = (0..rows as u32).collect();
                    for (i, &r) in active.iter().enumerate() {
                        gather[r as usize] = (rows + i) as u32;
                    }
                    let gather = Tensor::new(gather.as_slice(), &self.device)?;
                    (
                        Tensor::cat(&[rk, &k], 2)?.index_select(&gather, 2)?,
                        Tensor::cat(&[rv, &v], 2)?.index_select(&gather, 2)?,
                    )
                }
                _ => (k.clone(), v.clone()),
            };
            let (k_all, v_all) = match self.exact_layer(layer)? {
                Some((ek, ev)) => (
                    Tensor::cat(&[&ek, &k_rows], 2)?,
                    Tensor::cat(&[&ev, &v_rows], 2)?,
                ),
                None => (k_rows, v_rows),
            };
            let attn = attention(&q, &k_all, &v_all, &positions, scale)?;
            if layer + 1 == n_layers {
                let last = attn.dim(2)? - 1;
                self.report.last_attention =
                    attn.narrow(2, last, 1)?.flatten_all()?.to_vec1::<f32>()?;
            }
            h = model.finish(layer, &h, &attn.to_dtype(h.dtype())?)?;
            out.push(LayerKv {
                k: k_all.to_dtype(cache_dtype)?,
                v: v_all.to_dtype(cache_dtype)?,
            });
            if let (Some(step), Some((rk, rv))) = (step, &reused) {
                // Deviation of every active reused row at this layer.
                let (fresh, old) = match deviation {
                    Deviation::Key => (&k, rk),
                    Deviation::Value => (&v, rv),
                };
                let old = old.index_select(&active_t, 2)?;
                let dist = row_distance(fresh, &old)?;
                let mut candidates: Vec<(usize, f32)> = active
                    .iter()
                    .zip(&dist)
                    .filter(|(r, _)| kinds[**r as usize] == Kind::Reused)
                    .map(|(&r, &d)| (r as usize, d))
                    .collect();
                self.report.deviations.push((layer, candidates.clone()));
                let keep = ((step.keep as f64) * self.report.reused_rows as f64).ceil() as usize;
                candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
                candidates.truncate(keep);
                let mut kept: Vec<u32> = candidates.iter().map(|(r, _)| *r as u32).collect();
                kept.extend(active.iter().filter(|r| kinds[**r as usize] == Kind::Fresh));
                kept.sort_unstable();
                // Positions of the kept rows within the current active list.
                let within: Vec<u32> = kept
                    .iter()
                    .map(|r| active.binary_search(r).expect("kept rows are active") as u32)
                    .collect();
                h = h.index_select(&Tensor::new(within.as_slice(), &self.device)?, 1)?;
                active = kept;
            }
        }
        self.report.compute_s = started.elapsed().as_secs_f64() - self.report.load_wait_s;
        Ok(Blended {
            layers: out,
            report: self.report,
        })
    }
}

/// Queries this long are scored at once (bounds the score matrix).
const QUERY_BLOCK: usize = 512;

/// softmax(q k^T * scale + causal mask) v, for queries at `positions` over keys at `0..n`:
/// q `[1, heads, a, d]`, k and v `[1, kv_heads, n, d]`; heads share kv heads in consecutive groups.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &[u32],
    scale: f32,
) -> Result<Tensor> {
    let (_, heads, a, d) = q.dims4()?;
    let (_, kv_heads, n, _) = k.dims4()?;
    let groups = heads / kv_heads;
    let q = q.reshape((kv_heads, groups, a, d))?;
    let k = k.squeeze(0)?;
    let v = v.squeeze(0)?;
    let mut outs = Vec::new();
    for start in (0..a).step_by(QUERY_BLOCK) {
        let len = QUERY_BLOCK.min(a - start);
        let block = &positions[start..start + len];
        // Keys past the last query's position are masked for every query: leave them out.
        let n_keys = (*block.iter().max().expect("non-empty block") as usize + 1).min(n);
        let kt = k.narrow(1, 0, n_keys)?.t()?.contiguous()?;
        let vb = v.narrow(1, 0, n_keys)?.contiguous()?;
        let qb = q
            .narrow(2, start, len)?
            .contiguous()?
            .reshape((kv_heads, groups * len, d))?;
        let scores = (qb.matmul(&kt)? * scale as f64)?.reshape((kv_heads, groups, len, n_keys))?;
        let mut mask = vec![0f32; len * n_keys];
        for (i, &p) in block.iter().enumerate() {
            for m in &mut mask[i * n_keys + p as usize + 1..(i + 1) * n_keys] {
                *m = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (len, n_keys), q.device())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        let o = probs
            .reshape((kv_heads, groups * len, n_keys))?
            .matmul(&vb)?
            .reshape((kv_heads, groups, len, d))?;
        outs.push(o);
    }
    Tensor::cat(&outs, 2)?.reshape((1, heads, a, d))
}
