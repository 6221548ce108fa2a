//! Streamed loads from an [`ObjectPrefixStore`]: the prompt's run of stored chunks is fetched one
//! chunk at a time, in order, each at the level a [`StreamPolicy`] chooses (or not at all: the
//! engine recomputes it from text), and each chunk decodes on the blocking pool while the next one
//! is fetched.
//!
//! A load has two steps:
//! 1. Discovery: one HEAD per chunk and level on offer (concurrently, `fetch_concurrency` chunks
//!    at a time), up to the first chunk stored at no level, and one for the tail. This gives the
//!    planner exact object sizes and costs only latency, no bandwidth.
//! 2. Streaming: per chunk, a choice; a fetch; the previous chunk's decode joined (it ran while
//!    this fetch was in flight); this chunk's decode started.
//!
//! Invariants:
//! - What is installed is a prefix of the prompt, chunk by chunk, each chunk's token ids checked
//!   against the prompt's before its values are used.
//! - A chunk that fails (fetch error, adaptive fetch timeout, vanished object, corrupt object)
//!   ends the load there: the chunks before it are still used, it and every later chunk are
//!   recomputed. Only a failure before any chunk is chosen (discovery) is an error.
//! - Every value is written once: each tensor is allocated once for everything discovered and
//!   chunks decode straight into it; a load that ends early copies the covered part out once.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use candle_core::{Device, Tensor};
use futures::{future, stream, StreamExt, TryStreamExt};
use mistralrs_core::KvPrefix;
use object_store::path::Path;
use rayon::prelude::*;

use super::{
    common_prefix_len,
    object::{candle_dtype, parse_chunk, prefix_of},
    seal::{self, Binding, ObjectKind, StoreKey},
    ObjectPrefixStore, RowCapacity, StoreError,
};
use crate::{
    codec::{Dest, KvDType, Level},
    fingerprint::ModelFingerprint,
    stream::{
        Choice, ChunkDecision, ChunkOffer, ChunkOutcome, StreamPlanner, StreamPolicy, StreamReport,
        MIN_FETCH_TIMEOUT,
    },
};

/// What a streamed load installs, and what it did.
#[derive(Debug)]
pub struct StreamedLoad {
    /// The prefix to install (`None`: a miss, nothing usable arrived).
    pub prefix: Option<KvPrefix>,
    /// Every chunk's decision and outcome.
    pub report: StreamReport,
}

/// A stored chunk (or the tail) found by discovery.
struct Found {
    offer: ChunkOffer,
    /// Its position in the chain: full chunks before it.
    index: usize,
    /// The chain hash of the prefix before it.
    parent: blake3::Hash,
    /// Its own chain hash (the parent's, for the tail).
    hash: blake3::Hash,
    is_tail: bool,
}

/// Every tensor of the prefix being loaded, allocated for `n_alloc` tokens.
pub(super) struct DecodeBuffers {
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: KvDType,
    n_alloc: usize,
    data: Vec<Vec<f32>>,
    /// The first row decoded from a lossy chunk (past its exactly stored leading tokens), if
    /// any: the loaded prefix is approximate from there on (the engine keeps such a cache out
    /// of its own prefix cache, and the hook never saves those rows again).
    lossy_from: Option<usize>,
}

/// Chunks being decoded on the blocking pool: the buffers come back whatever happens, so that
/// the chunks decoded before a bad one can still be used.
pub(super) type DecodeTask = tokio::task::JoinHandle<BatchDecoded>;

/// What decoding a batch of parts did.
pub(super) struct BatchDecoded {
    /// The buffers (`None` only when nothing was ever allocated).
    pub(super) buffers: Option<DecodeBuffers>,
    /// The decode time, or the failure and the index of the part it came from (when the
    /// failure is the part's own: its seal, format or values; `None` for a failed task).
    pub(super) result: Result<Duration, (Option<usize>, StoreError)>,
    /// Parts, from the first, whose rows are all in the buffers (all of them on success; on a
    /// failure while opening part `k`, the `k` before it, which were decoded).
    pub(super) good_parts: usize,
}

struct Pending {
    task: DecodeTask,
    /// Index of its decision in the report.
    decision: usize,
    end: usize,
    bytes: u64,
    path: Path,
}

impl Found {
    /// What its object must be bound to.
    fn binding(&self) -> Binding {
        Binding {
            kind: if self.is_tail {
                ObjectKind::Tail
            } else {
                ObjectKind::Chunk
            },
            hash: *self.hash.as_bytes(),
        }
    }
}

impl ObjectPrefixStore {
    /// Loads the longest stored prefix of `prompt` (longer than `min_tokens`, shorter than the
    /// prompt) chunk by chunk as `policy` chooses; see the module docs.
    pub async fn load_streamed(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        policy: &StreamPolicy,
    ) -> Result<StreamedLoad, StoreError> {
        self.load_streamed_rows(model, prompt, min_tokens, policy, &|n| n)
            .await
    }

    /// [`ObjectPrefixStore::load_streamed`] into buffers of `capacity(n)` rows for the `n` tokens
    /// planned: when every planned chunk arrives they are the engine's cache as they are.
    pub(super) async fn load_streamed_rows(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        policy: &StreamPolicy,
        capacity: &RowCapacity,
    ) -> Result<StreamedLoad, StoreError> {
        let started = Instant::now();
        let cancel = Cancel::default();
        let _abandon = cancel.on_drop();
        let mut planner = match policy {
            StreamPolicy::Adaptive(inputs) => Some(StreamPlanner::new(*inputs)),
            _ => None,
        };
        let mut report = StreamReport {
            budget_s: match policy {
                StreamPolicy::Adaptive(inputs) => inputs.budget.as_secs_f64(),
                _ => 0.0,
            },
            prompt_tokens: prompt.len(),
            ..StreamReport::default()
        };
        let levels = offered_levels(policy, self);
        let discovery = self.discover(model, prompt, &levels);
        let found = match policy {
            // Discovery costs round trips only; on a dead link it must not eat the budget.
            StreamPolicy::Adaptive(inputs) => {
                tokio::time::timeout(inputs.budget.max(MIN_FETCH_TIMEOUT), discovery)
                    .await
                    .map_err(|_| StoreError::Timeout {
                        reason: "finding the stored chunks took longer than the budget".into(),
                    })??
            }
            _ => discovery.await?,
        };
        let offers: Vec<ChunkOffer> = found.iter().map(|f| f.offer.clone()).collect();
        let n_planned = offers.last().map_or(0, |o| o.start + o.tokens);
        let n_alloc = capacity(n_planned).max(n_planned);

        let mut buffers: Option<DecodeBuffers> = None;
        let mut pending: Option<Pending> = None;
        let mut covered = 0;
        for (i, chunk) in found.iter().enumerate() {
            let offer = &chunk.offer;
            let at = started.elapsed();
            let choice = match policy {
                StreamPolicy::Adaptive(_) => planner.as_ref().expect("adaptive").choose(
                    at,
                    offer,
                    &offers[i + 1..],
                    prompt.len(),
                ),
                StreamPolicy::Fixed(level) => Choice::Fetch(*level),
                StreamPolicy::Planned(choices) => choices.get(i).copied().unwrap_or(Choice::Text),
            };
            let estimate_mbit_s = planner.as_ref().map_or(0.0, |p| p.bandwidth() * 8e-6);
            let mut decision = ChunkDecision {
                start: offer.start,
                tokens: offer.tokens,
                choice,
                outcome: ChunkOutcome::Text,
                bytes: 0,
                fetch_s: 0.0,
                estimate_mbit_s,
                at_s: at.as_secs_f64(),
            };
            tracing::debug!(
                start = offer.start,
                tokens = offer.tokens,
                ?choice,
                estimate_mbit_s,
                elapsed_ms = at.as_secs_f64() * 1e3,
                budget_ms = report.budget_s * 1e3,
                "kvplugin: stream decision"
            );
            let Choice::Fetch(level) = choice else {
                report.chunks.push(decision);
                break;
            };
            // A tail is stored once, lossless, whatever the level asked for.
            let level = if chunk.is_tail {
                Level::Lossless
            } else {
                level
            };
            decision.choice = Choice::Fetch(level);
            let Some(&(_, expected)) = offer.levels.iter().find(|(l, _)| *l == level) else {
                decision.outcome =
                    failed("missing", format!("not stored at level {}", level.name()));
                report.chunks.push(decision);
                break;
            };
            let path = if chunk.is_tail {
                self.tail_path(model, chunk.index, &chunk.parent)
            } else {
                self.chunk_path(model, chunk.index, &chunk.parent, &chunk.hash, level)
            };
            let fetch_started = Instant::now();
            let fetched = match planner.as_mut() {
                Some(p) => {
                    let limit =
                        p.fetch_timeout(at, offer, &offers[i + 1..], prompt.len(), expected);
                    match tokio::time::timeout(limit, self.get(&path, model)).await {
                        Ok(fetched) => fetched,
                        Err(_) => {
                            p.observe_timeout(expected, fetch_started.elapsed());
                            Err(StoreError::Timeout {
                                reason: format!("fetch of {expected} bytes exceeded {limit:?}"),
                            })
                        }
                    }
                }
                None => self.get(&path, model).await,
            };
            let took = fetch_started.elapsed();
            // The previous chunk decoded while this one was in flight.
            if let Some(done) = pending.take() {
                let decoded = join_decode(done.task).await;
                buffers = decoded.buffers;
                match decoded.result {
                    Ok(decode_took) => {
                        covered = done.end;
                        if let Some(p) = planner.as_mut() {
                            p.observe_decode(done.bytes, decode_took);
                        }
                    }
                    Err((bad, e)) => {
                        if bad.is_some() {
                            self.found_bad(&done.path, &e);
                        }
                        report.chunks[done.decision].outcome = failure_outcome(&e);
                        break;
                    }
                }
            }
            decision.fetch_s = took.as_secs_f64();
            let bytes = match fetched {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    decision.outcome =
                        failed("missing", "the object vanished since discovery".into());
                    report.chunks.push(decision);
                    break;
                }
                Err(e) => {
                    self.found_bad(&path, &e);
                    decision.outcome = failure_outcome(&e);
                    report.chunks.push(decision);
                    break;
                }
            };
            decision.bytes = bytes.len() as u64;
            if let Some(p) = planner.as_mut() {
                p.observe(bytes.len() as u64, took);
            }
            let take = match self.tokens_to_use(&bytes, prompt, offer, chunk.is_tail) {
                Ok(take) => take,
                Err(e) => {
                    self.found_bad(&path, &e);
                    decision.outcome = failure_outcome(&e);
                    report.chunks.push(decision);
                    break;
                }
            };
            if take == 0 {
                // A tail left by another prompt: nothing of it is ours.
                decision.choice = Choice::Text;
                report.chunks.push(decision);
                break;
            }
            decision.tokens = take;
            decision.outcome = ChunkOutcome::Loaded;
            report.chunks.push(decision);
            let model = *model;
            let (offset, held, n_bytes) = (offer.start, buffers.take(), bytes.len() as u64);
            let part = DecodePart {
                bytes,
                offset,
                take,
                binding: chunk.binding(),
            };
            let ctx = DecodeContext {
                model,
                key: self.config.key.clone(),
                n_alloc,
                cancel: cancel.clone(),
            };
            pending = Some(Pending {
                task: tokio::task::spawn_blocking(move || decode_parts_into(held, &[part], &ctx)),
                decision: report.chunks.len() - 1,
                end: offset + take,
                bytes: n_bytes,
                path,
            });
        }
        if let Some(done) = pending.take() {
            let decoded = join_decode(done.task).await;
            buffers = decoded.buffers;
            match decoded.result {
                Ok(_) => covered = done.end,
                Err((bad, e)) => {
                    if bad.is_some() {
                        self.found_bad(&done.path, &e);
                    }
                    report.chunks[done.decision].outcome = failure_outcome(&e);
                }
            }
        }
        report.covered_tokens = covered;
        report.bandwidth_bytes_s = planner.as_ref().map_or(0.0, StreamPlanner::bandwidth);
        let prefix = match buffers {
            Some(buffers) if covered > min_tokens => {
                let tokens = prompt[..covered].to_vec();
                // Rows the engine wants for what arrived: the buffers as they are when it is
                // what they were allocated for, else a copy of their first `rows` rows.
                let rows = capacity(covered).max(covered);
                Some(
                    tokio::task::spawn_blocking(move || into_prefix(buffers, tokens, rows))
                        .await
                        .map_err(|e| StoreError::backend(format!("install task: {e}")))??,
                )
            }
            _ => None,
        };
        if prefix.is_none() {
            report.covered_tokens = 0;
        }
        report.elapsed_s = started.elapsed().as_secs_f64();
        Ok(StreamedLoad { prefix, report })
    }

    /// Discovery (see the module docs): the run of chunks stored at one of `levels` at least,
    /// then the tail.
    async fn discover(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        levels: &[Level],
    ) -> Result<Vec<Found>, StoreError> {
        let c = self.config.chunk_tokens;
        let usable = prompt.len().saturating_sub(1);
        let max_full = usable / c;
        let hashes = self.chain(model, prompt, max_full);
        let hashes = &hashes;
        let sizes: Vec<Vec<(Level, u64)>> = stream::iter(0..max_full)
            .map(|i| async move {
                let heads = levels.iter().map(|&level| async move {
                    let path = self.chunk_path(model, i, &hashes[i], &hashes[i + 1], level);
                    Ok::<_, StoreError>(self.size_of(&path).await?.map(|size| (level, size)))
                });
                let found = future::try_join_all(heads).await?;
                Ok::<_, StoreError>(found.into_iter().flatten().collect::<Vec<_>>())
            })
            .buffered(self.config.fetch_concurrency)
            .take_while(|r| future::ready(!matches!(r, Ok(v) if v.is_empty())))
            .try_collect()
            .await?;
        let mut found: Vec<Found> = sizes
            .into_iter()
            .enumerate()
            .map(|(i, levels)| Found {
                offer: ChunkOffer {
                    start: i * c,
                    tokens: c,
                    levels,
                },
                index: i,
                parent: hashes[i],
                hash: hashes[i + 1],
                is_tail: false,
            })
            .collect();
        let covered = found.len() * c;
        if covered < usable {
            let index = found.len();
            let parent = hashes[index];
            if let Some(size) = self.size_of(&self.tail_path(model, index, &parent)).await? {
                found.push(Found {
                    index,
                    parent,
                    offer: ChunkOffer {
                        start: covered,
                        // At most this many; the envelope says how many are shared.
                        tokens: usable - covered,
                        levels: vec![(Level::Lossless, size)],
                    },
                    hash: parent,
                    is_tail: true,
                });
            }
        }
        Ok(found)
    }

    /// The size of the object at `path`; `None` when there is none.
    async fn size_of(&self, path: &Path) -> Result<Option<u64>, StoreError> {
        let _read = self.read_permit().await?;
        match self.store.head(path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::from_object_store(e)),
        }
    }
}

/// The levels a policy may fetch full chunks at, best first.
fn offered_levels(policy: &StreamPolicy, store: &ObjectPrefixStore) -> Vec<Level> {
    let mut levels = match policy {
        StreamPolicy::Adaptive(_) => store.levels_written(),
        StreamPolicy::Fixed(level) => vec![*level],
        StreamPolicy::Planned(choices) => choices
            .iter()
            .filter_map(|c| match c {
                Choice::Fetch(level) => Some(*level),
                Choice::Text => None,
            })
            .collect(),
    };
    levels.sort();
    levels.dedup();
    levels
}

fn failed(kind: &'static str, reason: String) -> ChunkOutcome {
    ChunkOutcome::Failed { kind, reason }
}

fn failure_outcome(e: &StoreError) -> ChunkOutcome {
    failed(e.kind(), e.to_string())
}

pub(super) async fn join_decode(task: DecodeTask) -> BatchDecoded {
    match task.await {
        Ok(done) => done,
        Err(e) => BatchDecoded {
            buffers: None,
            result: Err((None, StoreError::backend(format!("decode task: {e}")))),
            good_parts: 0,
        },
    }
}

/// How many of the object's tokens to use: all of a full chunk's (which must be the prompt's),
/// the part of a tail the prompt shares.
impl ObjectPrefixStore {
    fn tokens_to_use(
        &self,
        bytes: &[u8],
        prompt: &[u32],
        offer: &ChunkOffer,
        is_tail: bool,
    ) -> Result<usize, StoreError> {
        let want = &prompt[offer.start..offer.start + offer.tokens];
        if is_tail {
            return Ok(common_prefix_len(&self.tail_tokens(bytes)?, want));
        }
        if seal::peek_tokens(bytes, self.key())? != want {
            return Err(StoreError::Corrupt {
                reason: "object's tokens differ from the prompt's".into(),
            });
        }
        Ok(offer.tokens)
    }
}

/// One object to decode: its first `take` tokens go to rows `offset..offset + take`.
pub(super) struct DecodePart {
    pub(super) bytes: Bytes,
    pub(super) offset: usize,
    pub(super) take: usize,
    /// What the object must be bound to (its name's chain hash).
    pub(super) binding: Binding,
}

/// What a decode on the blocking pool needs besides its parts.
#[derive(Clone)]
pub(super) struct DecodeContext {
    pub(super) model: ModelFingerprint,
    pub(super) key: Option<Arc<StoreKey>>,
    /// Rows of the buffers, allocated on the first part.
    pub(super) n_alloc: usize,
    pub(super) cancel: Cancel,
}

/// Set once the load that started a decode is gone (timed out, or its future dropped): the
/// decode then stops at its next tensor instead of running to the end for nobody.
#[derive(Clone, Default)]
pub(super) struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A guard that sets the flag when it is dropped (hold it in the load's future).
    pub(super) fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// See [`Cancel::on_drop`].
pub(super) struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0 .0.store(true, Ordering::Relaxed);
    }
}

fn abandoned() -> StoreError {
    StoreError::Timeout {
        reason: "the lookup was abandoned; decoding stopped".into(),
    }
}

/// Opens `parts` (seal, binding, format, model and shape: in parallel, before any value is
/// read), then decodes the good ones before the first bad one into `buffers` (allocating them,
/// for `n_alloc` tokens, on the first part), every tensor in parallel and each tensor's parts in
/// order: one pass over the buffers however many parts, so a batch costs one fork-join, not one
/// per part. A failure while decoding values leaves no part counted good: the caller uses none
/// of the batch.
pub(super) fn decode_parts_into(
    buffers: Option<DecodeBuffers>,
    parts: &[DecodePart],
    ctx: &DecodeContext,
) -> BatchDecoded {
    let started = Instant::now();
    let (model, key, n_alloc) = (&ctx.model, ctx.key.as_deref(), ctx.n_alloc);
    if ctx.cancel.is_set() {
        return BatchDecoded {
            buffers,
            result: Err((None, abandoned())),
            good_parts: 0,
        };
    }
    // Seals first (an encrypted object is decrypted here), then the codec chunks inside them;
    // the parts before the first bad one are used.
    let mut failure = None;
    let mut bodies = Vec::with_capacity(parts.len());
    let sealed: Vec<_> = parts
        .par_iter()
        .map(|p| seal::open(&p.bytes, p.binding, key))
        .collect();
    for (i, opened) in sealed.into_iter().enumerate() {
        match opened {
            Ok((tokens, body)) => bodies.push((tokens.len(), body)),
            Err(e) => {
                failure = Some((Some(i), e));
                break;
            }
        }
    }
    let parsed: Vec<_> = bodies
        .par_iter()
        .map(|(n_tokens, body)| parse_chunk(body, *n_tokens, model))
        .collect();
    let mut chunks = Vec::with_capacity(parsed.len());
    for (i, chunk) in parsed.into_iter().enumerate() {
        match chunk {
            Ok(chunk) => chunks.push(chunk),
            Err(e) => {
                // Earlier than any failure to open.
                failure = Some((Some(i), e));
                break;
            }
        }
    }
    let done = |buffers, result, good_parts| BatchDecoded {
        buffers,
        result,
        good_parts,
    };
    let Some(first) = chunks.first() else {
        return match failure {
            Some(failure) => done(buffers, Err(failure), 0),
            None => done(buffers, Ok(started.elapsed()), 0),
        };
    };
    let (shape, dtype) = (first.header().shape, first.header().dtype);
    let mut buffers = buffers.unwrap_or_else(|| DecodeBuffers {
        n_layers: shape.n_layers,
        n_kv_heads: shape.n_kv_heads,
        head_dim: shape.head_dim,
        dtype,
        n_alloc,
        data: (0..shape.n_tensors())
            .map(|_| zeroed_buffer(shape.n_kv_heads * n_alloc * shape.head_dim))
            .collect(),
        lossy_from: None,
    });
    let disagrees = chunks.iter().position(|c| {
        let s = c.header().shape;
        (s.n_layers, s.n_kv_heads, s.head_dim, c.header().dtype)
            != (
                buffers.n_layers,
                buffers.n_kv_heads,
                buffers.head_dim,
                buffers.dtype,
            )
    });
    if let Some(i) = disagrees {
        let e = StoreError::Corrupt {
            reason: "objects disagree on the model's shape or dtype".into(),
        };
        return done(Some(buffers), Err((Some(i), e)), 0);
    }
    let n = buffers.n_alloc;
    let decoded = buffers
        .data
        .par_iter_mut()
        .enumerate()
        .try_for_each(|(t, data)| {
            if ctx.cancel.is_set() {
                return Err((None, abandoned()));
            }
            chunks
                .iter()
                .zip(parts)
                .enumerate()
                .try_for_each(|(i, (chunk, part))| {
                    chunk
                        .decode_tensor_into(
                            t,
                            &mut Dest {
                                data,
                                tokens: n,
                                token_offset: part.offset,
                                take: part.take,
                            },
                        )
                        .map_err(|e| (Some(i), StoreError::from(e)))
                })
        });
    if decoded.is_ok() {
        for (chunk, part) in chunks.iter().zip(parts) {
            let header = chunk.header();
            if header.level != Level::Lossless && header.exact_tokens < part.take {
                let first = part.offset + header.exact_tokens;
                buffers.lossy_from = Some(buffers.lossy_from.map_or(first, |r| r.min(first)));
            }
        }
    }
    match (decoded, failure) {
        (Err(e), _) => done(Some(buffers), Err(e), 0),
        (Ok(()), Some(failure)) => done(Some(buffers), Err(failure), chunks.len()),
        (Ok(()), None) => done(Some(buffers), Ok(started.elapsed()), chunks.len()),
    }
}

/// A zeroed buffer of `len` values for a loaded cache, backed by transparent huge pages where
/// the kernel offers them on request (Linux's `madvise` mode): a 6,000-token SmolLM2 cache is
/// 280 MB, which 4 KiB pages fault in 68,000 times (measured: a fifth of a disk load's time,
/// `benches/store.rs` under perf). Where the allocator hands out fresh mapped memory (large
/// zeroed allocations usually are), the decode's first writes fault in huge pages; memory it
/// reuses from its heap is already backed and stays as it is. Speed only, never contents.
fn zeroed_buffer(len: usize) -> Vec<f32> {
    let buffer = vec![0f32; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let start = buffer.as_ptr() as usize;
        let end = start + len * std::mem::size_of::<f32>();
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if last > first {
            // SAFETY: the range lies inside the buffer's allocation, which stays mapped for the
            // buffer's life; MADV_HUGEPAGE changes only how its pages are backed, never their
            // contents. A failure (no THP support) leaves ordinary pages, so it is ignored.
            #[allow(unsafe_code)]
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    buffer
}

/// The first `tokens.len()` tokens of the buffers as a prefix of `rows` rows (the engine's
/// capacity for them, or exactly their count) in the chunks' dtype: the whole buffers when they
/// have `rows` rows, else their first `rows` rows (one copy; the rows past the tokens are the
/// buffers' zeros).
pub(super) fn into_prefix(
    buffers: DecodeBuffers,
    tokens: Vec<u32>,
    rows: usize,
) -> Result<KvPrefix, StoreError> {
    let (heads, n_alloc, dim) = (buffers.n_kv_heads, buffers.n_alloc, buffers.head_dim);
    let approximate_from = buffers.lossy_from.filter(|&row| row < tokens.len());
    if rows < tokens.len() || rows > n_alloc {
        return Err(StoreError::InvalidPrefix {
            reason: format!(
                "{rows} rows asked for {} tokens in buffers of {n_alloc}",
                tokens.len()
            ),
        });
    }
    let n = rows;
    let dtype = candle_dtype(buffers.dtype);
    let tensors = buffers
        .data
        .into_par_iter()
        .map(|data| -> Result<Tensor, StoreError> {
            let t = Tensor::from_vec(data, (1, heads, n_alloc, dim), &Device::Cpu)?;
            let t = if n < n_alloc {
                t.narrow(2, 0, n)?.contiguous()?
            } else {
                t
            };
            Ok(t.to_dtype(dtype)?)
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(KvPrefix {
        approximate_from,
        ..prefix_of(tokens, tensors)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, ChunkShape, KvChunk};

    fn part() -> DecodePart {
        let shape = ChunkShape {
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            n_tokens: 8,
        };
        let chunk = KvChunk::from_f32_tensors(
            shape,
            KvDType::F32,
            &vec![vec![0.25; shape.tensor_len()]; shape.n_tensors()],
        )
        .unwrap();
        let encoded = codec::encode(&chunk, Level::Lossless, &[3; 32]).unwrap();
        let binding = Binding {
            kind: ObjectKind::Chunk,
            hash: [1; 32],
        };
        DecodePart {
            bytes: seal::seal(binding, &[0; 8], &encoded, None).unwrap().into(),
            offset: 0,
            take: 8,
            binding,
        }
    }

    #[test]
    fn an_abandoned_load_stops_decoding_and_allocates_nothing() {
        let ctx = DecodeContext {
            model: ModelFingerprint::from_bytes([3; 32]),
            key: None,
            n_alloc: 8,
            cancel: Cancel::default(),
        };
        let done = decode_parts_into(None, &[part()], &ctx);
        assert!(done.result.is_ok());
        assert_eq!(done.good_parts, 1);
        assert_eq!(done.buffers.unwrap().data[0][..4], [0.25; 4]);

        // The load's future is dropped: its guard sets the flag.
        drop(ctx.cancel.on_drop());
        let done = decode_parts_into(None, &[part()], &ctx);
        assert!(matches!(
            done.result,
            Err((None, StoreError::Timeout { .. }))
        ));
        assert_eq!(done.good_parts, 0);
        assert!(done.buffers.is_none(), "nothing was allocated");
    }
}
