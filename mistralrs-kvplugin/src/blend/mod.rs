//! CacheBlend: reuse each document's cache wherever the document lands in a prompt, and
//! recompute only the rows whose K/V deviate most.
//!
//! A RAG prompt is a prefix (system text), documents and a suffix (the question), given as a
//! [`BlendPrompt`] (or as text with a separator between the parts, [`BlendPrompt::from_marked`]).
//! Each part is tokenized on its own, so a document has the same tokens in every prompt, and its
//! cache is keyed by those tokens and the model alone ([`ChunkCache`] in memory; in the object
//! store as the prefix cache of the document's own tokens, which it is: computed at positions
//! `0..len` with nothing before it).
//!
//! The blend runs in the hook's lookup ([`crate::KvPluginHook`]): the prefix's cache is exact
//! and is used as is; documents' caches are moved to their positions and, from a check layer on,
//! only the selected rows and the question are recomputed ([`forward`]); the engine computes the
//! last prompt token itself. Loads run while the first layers compute.
//!
//! Invariants:
//! - A blended cache is marked approximate from the first document row on; the engine never
//!   puts it in its own prefix cache and the hook stores only its exact rows.
//! - Every failure (no layer access for this model, a forward error, a load that fails) costs a
//!   full prefill, never a wrong cache: a document whose load fails is computed.
//! - Plans are matched to lookups by the whole token sequence and used once.

pub mod forward;
pub mod rope;

use std::{
    collections::HashMap,
    ops::Range,
    sync::{Arc, Mutex},
};

use indexmap::IndexMap;
use mistralrs_core::LayerKv;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

pub use forward::{Deviation, SelectStep};

use crate::{
    error::{Error, Result},
    fingerprint::ModelFingerprint,
};

/// How blends select and how much memory their document caches may take.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlendConfig {
    /// Selection steps: after layer `layer`, keep the `keep` share of document rows with the
    /// largest deviation. The last step's `keep` is the recompute ratio (raised by the loading
    /// controller when loads are slow, see [`RatioController`]).
    pub steps: Vec<SelectStep>,
    /// Which deviation selects.
    pub deviation: Deviation,
    /// Bytes of document caches kept in memory (least recently used dropped first).
    pub memory_bytes: usize,
    /// The separator between prefix, documents and question in marked text.
    pub separator: String,
    /// Blend chat and completion requests whose prompt text holds the separator (the engine's
    /// `prepare_prompt` hook): how `kvplugin serve` blends requests from any OpenAI client.
    /// Off, such text reaches the model as written.
    pub from_text: bool,
    /// Raise the ratio to the one at which recomputing takes as long as loading.
    pub adaptive_ratio: bool,
    /// Compute each document's cache after the prompt's first token rather than alone. A
    /// document computed alone makes its own first token an attention sink (a huge key, a tiny
    /// value, in every deep layer); moved into a prompt, that row keeps drawing attention unless
    /// it is selected. After the prompt's first token (`<|im_start|>` in chat prompts) the sink
    /// is that token, as in the full prefill. The document's cache is then keyed by that token
    /// and its own tokens, still nothing else of what precedes it.
    pub document_sink: bool,
}

impl Default for BlendConfig {
    fn default() -> Self {
        Self {
            steps: vec![SelectStep {
                layer: 1,
                keep: 0.15,
            }],
            deviation: Deviation::Value,
            memory_bytes: 2 << 30,
            separator: DEFAULT_SEPARATOR.to_string(),
            from_text: true,
            adaptive_ratio: true,
            document_sink: true,
        }
    }
}

/// The separator [`BlendConfig`] uses unless told otherwise.
pub const DEFAULT_SEPARATOR: &str = "[[KVBLEND]]";

impl BlendConfig {
    /// One selection at layer 1 keeping `ratio` (CacheBlend's released code).
    pub fn with_ratio(ratio: f32) -> Self {
        Self {
            steps: vec![SelectStep {
                layer: 1,
                keep: ratio,
            }],
            ..Self::default()
        }
    }

    /// Reuse without recompute: only the question is computed.
    pub fn reuse_only() -> Self {
        Self {
            steps: vec![SelectStep {
                layer: 0,
                keep: 0.0,
            }],
            adaptive_ratio: false,
            ..Self::default()
        }
    }

    /// Checks the steps; errors name the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps.is_empty() {
            return Err("blend.steps: at least one step".into());
        }
        if self
            .steps
            .windows(2)
            .any(|w| w[0].layer >= w[1].layer || w[0].keep < w[1].keep)
        {
            return Err("blend.steps: layers must increase and keep must not".into());
        }
        if self.steps.iter().any(|s| !(0.0..=1.0).contains(&s.keep)) {
            return Err("blend.steps: keep must be within 0..=1".into());
        }
        if self.separator.is_empty() {
            return Err("blend.separator: must not be empty".into());
        }
        Ok(())
    }

    /// The recompute ratio (the last step's keep).
    pub fn ratio(&self) -> f32 {
        self.steps.last().map_or(0.0, |s| s.keep)
    }
}

/// A RAG prompt in parts. Rendered as `prefix + chunks... + suffix`; each part is tokenized on
/// its own (write the whitespace between parts into the parts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlendPrompt {
    /// System text before the documents (its cache is exact: nothing precedes it).
    pub prefix: String,
    /// The documents, in prompt order.
    pub chunks: Vec<String>,
    /// The question after the documents (always computed).
    pub suffix: String,
}

/// A tokenized [`BlendPrompt`]: the tokens and which of them belong to which part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlendPlan {
    /// The whole prompt.
    pub tokens: Vec<u32>,
    /// Tokens `0..prefix_len` are the prefix.
    pub prefix_len: usize,
    /// Token ranges of the documents, in order, back to back after the prefix.
    pub chunks: Vec<Range<usize>>,
}

/// One cached part of a blended prompt: the prefix (exact) or a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePart {
    /// The tokens its cache is computed on and keyed by: the lead, then the part's own tokens.
    pub cache_tokens: Vec<u32>,
    /// Leading tokens of `cache_tokens` that are not the part's (dropped when it is reused).
    pub lead: usize,
    /// Where the part's own tokens are in the prompt.
    pub range: Range<usize>,
    /// The prefix, whose cache is exact in place.
    pub exact: bool,
}

impl BlendPlan {
    /// Puts `lead` before the prompt (as part of its prefix) and `trail` after it (as part of its
    /// question): the special tokens a tokenizer adds around a text.
    pub fn wrap(&mut self, lead: &[u32], trail: &[u32]) {
        if !lead.is_empty() {
            let mut tokens = Vec::with_capacity(lead.len() + self.tokens.len() + trail.len());
            tokens.extend_from_slice(lead);
            tokens.extend_from_slice(&self.tokens);
            self.tokens = tokens;
            self.prefix_len += lead.len();
            for chunk in &mut self.chunks {
                *chunk = chunk.start + lead.len()..chunk.end + lead.len();
            }
        }
        self.tokens.extend_from_slice(trail);
    }

    /// The prefix (if any) and the documents, with the tokens each cache is computed on: a
    /// document not at the start of the prompt gets the prompt's first token as its lead when
    /// `document_sink` is on (see [`BlendConfig::document_sink`]).
    pub fn cache_parts(&self, document_sink: bool) -> Vec<CachePart> {
        let mut parts = Vec::with_capacity(self.chunks.len() + 1);
        if self.prefix_len > 0 {
            parts.push(CachePart {
                cache_tokens: self.tokens[..self.prefix_len].to_vec(),
                lead: 0,
                range: 0..self.prefix_len,
                exact: true,
            });
        }
        for range in &self.chunks {
            let mut cache_tokens = Vec::with_capacity(range.len() + 1);
            if document_sink && range.start > 0 {
                cache_tokens.push(self.tokens[0]);
            }
            let lead = cache_tokens.len();
            cache_tokens.extend_from_slice(&self.tokens[range.clone()]);
            parts.push(CachePart {
                cache_tokens,
                lead,
                range: range.clone(),
                exact: false,
            });
        }
        parts
    }
}

impl BlendPrompt {
    /// Splits `text` at `separator`: the first part is the prefix, the last the suffix, those
    /// between are the documents. The separators are removed.
    pub fn from_marked(text: &str, separator: &str) -> Result<Self> {
        if separator.is_empty() {
            return Err(Error::InvalidInput("the blend separator is empty".into()));
        }
        let mut parts: Vec<&str> = text.split(separator).collect();
        if parts.len() < 3 {
            return Err(Error::InvalidInput(format!(
                "a blended prompt needs a prefix, at least one document and a question separated by `{separator}`; found {} separator(s)",
                parts.len() - 1
            )));
        }
        let suffix = parts.pop().expect("three parts").to_string();
        let prefix = parts.remove(0).to_string();
        Ok(Self {
            prefix,
            chunks: parts.into_iter().map(str::to_string).collect(),
            suffix,
        })
    }

    /// The prompt as the model reads it (separators removed).
    pub fn text(&self) -> String {
        let mut text = self.prefix.clone();
        for chunk in &self.chunks {
            text.push_str(chunk);
        }
        text.push_str(&self.suffix);
        text
    }

    /// Tokenizes each part on its own (special tokens written in the text included).
    pub fn tokenize(&self, tokenizer: &Tokenizer) -> Result<BlendPlan> {
        let encode = |text: &str| -> Result<Vec<u32>> {
            if text.is_empty() {
                return Ok(Vec::new());
            }
            Ok(tokenizer
                .encode(text, false)
                .map_err(|e| Error::InvalidInput(format!("tokenizer: {e}")))?
                .get_ids()
                .to_vec())
        };
        let mut tokens = encode(&self.prefix)?;
        let prefix_len = tokens.len();
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (i, chunk) in self.chunks.iter().enumerate() {
            let ids = encode(chunk)?;
            if ids.is_empty() {
                return Err(Error::InvalidInput(format!("document {i} is empty")));
            }
            chunks.push(tokens.len()..tokens.len() + ids.len());
            tokens.extend(ids);
        }
        let suffix = encode(&self.suffix)?;
        if suffix.is_empty() {
            return Err(Error::InvalidInput(
                "a blended prompt needs a non-empty suffix (the question)".into(),
            ));
        }
        tokens.extend(suffix);
        Ok(BlendPlan {
            tokens,
            prefix_len,
            chunks,
        })
    }
}

/// Document caches in memory, keyed by model and tokens, least recently used dropped first.
pub struct ChunkCache {
    inner: Mutex<ChunkCacheInner>,
    capacity_bytes: usize,
}

struct ChunkCacheInner {
    entries: IndexMap<[u8; 32], Arc<Vec<LayerKv>>>,
    bytes: usize,
}

/// A document cache's key: the model and the document's tokens, nothing of what precedes it.
pub fn chunk_key(model: &ModelFingerprint, tokens: &[u32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"kvplugin-chunk-v1");
    hasher.update(model.as_bytes());
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    *hasher.finalize().as_bytes()
}

fn kv_bytes(kv: &[LayerKv]) -> usize {
    kv.iter()
        .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
        .sum()
}

impl ChunkCache {
    /// An empty cache holding at most `capacity_bytes` of K/V.
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(ChunkCacheInner {
                entries: IndexMap::new(),
                bytes: 0,
            }),
            capacity_bytes,
        }
    }

    /// The cache under `key`, now the most recently used.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Vec<LayerKv>>> {
        let mut inner = lock(&self.inner);
        let index = inner.entries.get_index_of(key)?;
        let last = inner.entries.len() - 1;
        inner.entries.move_index(index, last);
        inner.entries.get(key).cloned()
    }

    /// Keeps `kv` under `key`, dropping the least recently used entries to make room (an entry
    /// larger than the whole capacity is not kept).
    pub fn insert(&self, key: [u8; 32], kv: Arc<Vec<LayerKv>>) {
        let size = kv_bytes(&kv);
        if size > self.capacity_bytes {
            return;
        }
        let mut inner = lock(&self.inner);
        if let Some(old) = inner.entries.shift_remove(&key) {
            inner.bytes -= kv_bytes(&old);
        }
        while inner.bytes + size > self.capacity_bytes {
            let Some((_, old)) = inner.entries.shift_remove_index(0) else {
                break;
            };
            inner.bytes -= kv_bytes(&old);
        }
        inner.bytes += size;
        inner.entries.insert(key, kv);
    }

    /// Drops every entry (benchmarks use it to measure loads from the store).
    pub fn clear(&self) {
        let mut inner = lock(&self.inner);
        inner.entries.clear();
        inner.bytes = 0;
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.entries.len(), inner.bytes)
    }
}

/// The loading controller: picks the recompute ratio as max(configured ratio, the ratio at
/// which recomputing takes as long as loading), from speeds measured on earlier blends.
///
/// Recomputing the share `r` of `rows` document rows in the layers after selection costs about
/// `r * rows * layers_after * secs_per_row_layer`; loading what is not in memory costs
/// `bytes / bytes_per_s`. While loads are slower than that, recomputing more rows is free (it
/// hides under the load) and improves quality.
#[derive(Debug, Clone, Default)]
pub struct RatioController {
    /// Seconds per row per layer of recompute (EWMA over blends).
    pub secs_per_row_layer: Option<f64>,
    /// Store bytes per second of document loads (EWMA over loads).
    pub load_bytes_per_s: Option<f64>,
}

const EWMA: f64 = 0.5;

impl RatioController {
    /// A blend computed `row_layers` rows x layers in `secs`.
    pub fn record_compute(&mut self, secs: f64, row_layers: usize) {
        if row_layers == 0 || secs <= 0.0 {
            return;
        }
        let x = secs / row_layers as f64;
        self.secs_per_row_layer = Some(match self.secs_per_row_layer {
            Some(old) => EWMA * x + (1.0 - EWMA) * old,
            None => x,
        });
    }

    /// A document load brought `bytes` (of K/V in memory) in `secs`.
    pub fn record_load(&mut self, bytes: u64, secs: f64) {
        if bytes == 0 || secs <= 0.0 {
            return;
        }
        let x = bytes as f64 / secs;
        self.load_bytes_per_s = Some(match self.load_bytes_per_s {
            Some(old) => EWMA * x + (1.0 - EWMA) * old,
            None => x,
        });
    }

    /// The ratio for a blend that must load `bytes` and has `rows` document rows whose
    /// recompute spans `layers_after` layers.
    pub fn ratio(&self, min_ratio: f32, bytes: u64, rows: usize, layers_after: usize) -> f32 {
        let (Some(per_row), Some(bw)) = (self.secs_per_row_layer, self.load_bytes_per_s) else {
            return min_ratio;
        };
        if rows == 0 || layers_after == 0 || bytes == 0 {
            return min_ratio;
        }
        let load_s = bytes as f64 / bw;
        let full_recompute_s = per_row * rows as f64 * layers_after as f64;
        min_ratio.max((load_s / full_recompute_s).min(1.0) as f32)
    }
}

/// Blend plans waiting for their lookup, keyed by the prompt's tokens.
#[derive(Default)]
pub(crate) struct PlanBook {
    plans: Mutex<HashMap<Vec<u32>, BlendPlan>>,
}

/// Plans kept at most: a plan whose request never came must not stay forever.
const MAX_PLANS: usize = 256;

impl PlanBook {
    pub(crate) fn insert(&self, plan: BlendPlan) {
        let mut plans = lock(&self.plans);
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(plan.tokens.clone(), plan);
    }

    pub(crate) fn take(&self, prompt: &[u32]) -> Option<BlendPlan> {
        lock(&self.plans).remove(prompt)
    }

    pub(crate) fn contains(&self, prompt: &[u32]) -> bool {
        lock(&self.plans).contains_key(prompt)
    }
}

/// Where a blend's document cache came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkSource {
    /// The in-memory document cache.
    Memory,
    /// The object store.
    Store,
    /// Neither: computed (and stored for next time).
    Computed,
}

/// What one blended lookup did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BlendReport {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Rows of the prefix (exact).
    pub exact_tokens: usize,
    /// Rows of documents.
    pub reused_tokens: usize,
    /// The recompute ratio used.
    pub ratio: f32,
    /// Rows computed per layer.
    pub active_per_layer: Vec<usize>,
    /// Source of the prefix (if any) and each document, in order.
    pub sources: Vec<ChunkSource>,
    /// Seconds the forward waited for loads.
    pub load_wait_s: f64,
    /// Seconds of forward compute.
    pub compute_s: f64,
    /// Seconds of the whole lookup.
    pub total_s: f64,
    /// Attention output of the last computed row in the last layer (diagnostics).
    #[serde(skip)]
    pub last_attention: Vec<f32>,
    /// Deviation of each active document row at each selection layer (diagnostics).
    #[serde(skip)]
    pub deviations: Vec<(usize, Vec<(usize, f32)>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_text_splits_into_prefix_documents_and_question() {
        let p = BlendPrompt::from_marked("sys |A|B| q?", "|").unwrap();
        assert_eq!(p.prefix, "sys ");
        assert_eq!(p.chunks, vec!["A".to_string(), "B".to_string()]);
        assert_eq!(p.suffix, " q?");
        assert_eq!(p.text(), "sys AB q?");
        let err = BlendPrompt::from_marked("no marks here", "|").unwrap_err();
        assert!(err.to_string().contains("found 0 separator"), "{err}");
        assert!(BlendPrompt::from_marked("a|b", "|").is_err());
    }

    #[test]
    fn wrapping_a_plan_moves_its_documents_and_keeps_the_added_tokens_in_place() {
        let mut plan = BlendPlan {
            tokens: vec![10, 11, 20, 21, 22, 30, 40],
            prefix_len: 2,
            chunks: vec![2..5, 5..6],
        };
        plan.wrap(&[1], &[2, 3]);
        assert_eq!(plan.tokens, vec![1, 10, 11, 20, 21, 22, 30, 40, 2, 3]);
        assert_eq!(plan.prefix_len, 3);
        assert_eq!(plan.chunks, vec![3..6, 6..7]);
        assert_eq!(&plan.tokens[plan.chunks[0].clone()], &[20, 21, 22]);
        plan.wrap(&[], &[]);
        assert_eq!(plan.tokens.len(), 10);
    }

    #[test]
    fn controller_raises_the_ratio_only_when_loads_are_slower_than_recompute() {
        let mut c = RatioController::default();
        assert_eq!(
            c.ratio(0.15, 1 << 20, 1000, 28),
            0.15,
            "no measurements yet"
        );
        c.record_compute(1.0, 1000 * 28); // 1 s to recompute every row in every layer
        c.record_load(1_000_000, 1.0); // 1 MB/s
        assert_eq!(
            c.ratio(0.15, 100_000, 1000, 28),
            0.15,
            "0.1 s load hides under 15%"
        );
        let r = c.ratio(0.15, 500_000, 1000, 28);
        assert!((r - 0.5).abs() < 1e-6, "{r}");
        assert_eq!(c.ratio(0.15, 5_000_000, 1000, 28), 1.0);
    }

    #[test]
    fn config_checks_its_steps() {
        assert!(BlendConfig::default().validate().is_ok());
        assert!(BlendConfig::reuse_only().validate().is_ok());
        let mut bad = BlendConfig::default();
        bad.steps.push(SelectStep {
            layer: 0,
            keep: 0.1,
        });
        assert!(bad.validate().unwrap_err().contains("blend.steps"));
        bad.steps = vec![SelectStep {
            layer: 1,
            keep: 1.5,
        }];
        assert!(bad.validate().is_err());
    }

    #[test]
    fn chunk_cache_drops_the_least_recently_used() {
        use candle_core::{Device, Tensor};
        let kv = |x: f32| {
            let t = Tensor::full(x, (1, 1, 4, 4), &Device::Cpu).unwrap();
            Arc::new(vec![LayerKv { k: t.clone(), v: t }])
        };
        let cache = ChunkCache::new(3 * 128);
        let model = ModelFingerprint::from_bytes([7; 32]);
        let keys: Vec<_> = (0..4u32).map(|i| chunk_key(&model, &[i])).collect();
        for (i, k) in keys.iter().take(3).enumerate() {
            cache.insert(*k, kv(i as f32));
        }
        assert!(cache.get(&keys[0]).is_some()); // 0 is now the most recent
        cache.insert(keys[3], kv(3.0));
        assert!(cache.get(&keys[1]).is_none(), "1 was least recently used");
        assert!(cache.get(&keys[0]).is_some() && cache.get(&keys[3]).is_some());
        assert_eq!(cache.usage(), (3, 3 * 128));
        assert_ne!(
            chunk_key(&model, &[1, 2]),
            chunk_key(&ModelFingerprint::from_bytes([8; 32]), &[1, 2])
        );
    }
}
