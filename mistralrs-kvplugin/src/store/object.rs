//! Prefix caches in any [`object_store`] backend (memory, local disk, S3-compatible), cut into
//! chunks of a fixed number of tokens and compressed with the [`crate::codec`].
//!
//! Layout under `{namespace}/v3/{model fingerprint}/` (names carry the first 128 bits of each
//! 256-bit hash: short enough for every backend's file-name limits, e.g. s3s-fs keeps one metadata
//! file per object named after the whole key; the full fingerprint is checked inside each chunk;
//! [`ObjectName`] writes and parses them):
//! - `c-{index}-{parent hash}-{hash}.{level}`: full chunk `index` (0 = the first) of a prefix.
//!   `hash` chains BLAKE3 over the chunk size, the parent's hash (the prefix before the chunk)
//!   and this chunk's token ids, so a key names a whole prefix, is stable across processes and
//!   machines, and never depends on Rust's `DefaultHasher`. The parent's hash and the index in
//!   the name let a listing alone rebuild the chains (what [`super::admin`]'s GC needs to never
//!   leave a chunk its lookups cannot reach); the loader computes every hash of a prompt's chain,
//!   so it knows both. With a [`StoreKey`] the chain starts from a keyed root: names are then
//!   secret, per key.
//! - `t-{index}-{parent hash}.{level}`: the tokens after the last full chunk of the longest prefix saved
//!   after that parent (the last writer wins). A later prompt that shares only part of the tail
//!   still uses that part, so a hit covers the prompt up to where it diverges, not only whole chunks.
//!   Tails are always coded lossless, whatever the level: they are the most recent tokens, which
//!   the next tokens attend to most (measured with `kvplugin demo`: with `high` chunks, a lossy
//!   tail changed the answer from its first token, an exact one kept its first 11 tokens), and
//!   there is at most one per prefix.
//!
//! Every object is a sealed envelope ([`super::seal`]: magic, version, the chain hash it is bound
//! to, a MAC or checksum, the token ids it covers) around one codec chunk. The loader checks the
//! token ids against the prompt, then the seal and binding, before it reads any value.
//!
//! Invariants: chunk writes are idempotent (`PutMode::Create`; an existing chunk is left alone,
//! unless a load found it bad: see self-repair below) and atomic (the backends write whole
//! objects: a temporary file renamed into place on disk, a single PUT on S3). A missing object is
//! a miss; any other failure is an error, which the hook turns into a recompute. A bad object
//! ends a hit where it starts: the good chunks before it are used.
//!
//! Self-repair: a load that finds an object corrupt or refused (its seal does not hold)
//! remembers its name (at most [`MAX_REPAIRS`] names, in this process); the next save of the
//! same chain overwrites it instead of leaving it alone. Another process repairs it when its own
//! loads find it. The GC (`kvplugin store gc`) removes what nobody repairs.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use futures::{stream, StreamExt};
use mistralrs_core::{KvPrefix, LayerKv};
use object_store::{
    path::Path, GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload,
};

use super::layout::{short_hash, ObjectName, LAYOUT_VERSION};

use super::{
    common_prefix_len,
    seal::{self, Binding, ObjectKind, StoreKey},
    streaming::{
        decode_parts_into, into_prefix, join_decode, Cancel, DecodeBuffers, DecodeContext,
        DecodePart,
    },
    validate_prefix, PrefixStore, RowCapacity, SaveOutcome, StoreError, StreamedLoad,
};
use crate::{
    codec::{self, ChunkShape, EncodeOptions, KvChunk, KvDType, Level, ParsedChunk},
    fingerprint::ModelFingerprint,
    stream::StreamPolicy,
};

/// Names of bad objects a store remembers for repair; beyond it, new ones are not remembered
/// (a bucket that bad needs the GC, not repair).
pub const MAX_REPAIRS: usize = 4096;

/// Settings of an [`ObjectPrefixStore`].
#[derive(Debug, Clone)]
pub struct ObjectStoreConfig {
    /// Path prefix of every object (lets several deployments share a bucket).
    pub namespace: String,
    /// Tokens per chunk.
    pub chunk_tokens: usize,
    /// Codec level written, and read by [`PrefixStore::load`].
    pub level: Level,
    /// Further levels every full chunk is also written at, for loaders that choose a level per
    /// chunk ([`ObjectPrefixStore::load_at`]); tails are written once, lossless.
    pub extra_levels: Vec<Level>,
    /// Chunks fetched at once by one load.
    pub fetch_concurrency: usize,
    /// Reads (GET, HEAD) in flight at once across every load of this store: the bound on its
    /// connections and blocking threads whatever the number of lookups.
    pub max_fetches_in_flight: usize,
    /// The deployment's secret: objects are sealed with a MAC under it and their names are
    /// keyed by it; objects without its MAC are refused. `None`: checksums only, which stop
    /// accidents, not writers (a shared bucket needs a key).
    pub key: Option<Arc<StoreKey>>,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        Self {
            namespace: "kvplugin".into(),
            chunk_tokens: 256,
            // Exact by default: a hit answers as a miss does. The lossy levels are for slow
            // links, where bytes cost more than the quality they buy; their loads are marked
            // approximate (see `KvPrefix::approximate_from`), never served as exact.
            level: Level::Lossless,
            extra_levels: Vec::new(),
            fetch_concurrency: 8,
            max_fetches_in_flight: 32,
            key: None,
        }
    }
}

/// Bytes moved by an [`ObjectPrefixStore`].
#[derive(Debug, Default)]
pub struct ObjectStoreCounters {
    /// Object bytes written.
    pub bytes_written: AtomicU64,
    /// Object bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes the written chunks would take as 16-bit KV.
    pub raw_16bit_bytes_written: AtomicU64,
    /// Objects loads refused because their seal did not hold (no MAC, another key, moved).
    pub objects_refused: AtomicU64,
    /// Objects loads found corrupt (checksum, format, tokens that differ from the name's).
    pub objects_corrupt: AtomicU64,
    /// Bad objects a save has overwritten.
    pub objects_repaired: AtomicU64,
}

impl ObjectStoreCounters {
    /// Compression ratio of what was written, against 16-bit KV (above 1: smaller than 16-bit);
    /// `None` before anything was written.
    pub fn compression_ratio(&self) -> Option<f64> {
        let written = self.bytes_written.load(Ordering::Relaxed);
        let raw = self.raw_16bit_bytes_written.load(Ordering::Relaxed);
        (written > 0).then(|| raw as f64 / written as f64)
    }
}

/// A [`PrefixStore`] over an [`ObjectStore`].
pub struct ObjectPrefixStore {
    pub(super) store: Arc<dyn ObjectStore>,
    pub(super) config: ObjectStoreConfig,
    counters: ObjectStoreCounters,
    /// Objects a load found bad, for the next save to overwrite.
    needs_repair: Mutex<HashSet<Path>>,
    /// Permits for reads in flight ([`ObjectStoreConfig::max_fetches_in_flight`]).
    reads: tokio::sync::Semaphore,
    /// The circuit breaker the backend sits behind, if any (for its counters).
    breaker: Option<Arc<super::breaker::CircuitBreaker>>,
}

impl ObjectPrefixStore {
    /// A store writing under `config.namespace` in `store`.
    pub fn new(store: Arc<dyn ObjectStore>, config: ObjectStoreConfig) -> Result<Self, StoreError> {
        for level in std::iter::once(config.level).chain(config.extra_levels.iter().copied()) {
            let max_tokens = level.max_chunk_tokens();
            if config.chunk_tokens == 0 || config.chunk_tokens > max_tokens {
                return Err(StoreError::Config {
                    field: "chunk_tokens",
                    reason: format!("must be 1..={max_tokens} at level {}", level.name()),
                });
            }
        }
        for (field, value) in [
            ("fetch_concurrency", config.fetch_concurrency),
            ("max_fetches_in_flight", config.max_fetches_in_flight),
        ] {
            if value == 0 {
                return Err(StoreError::Config {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(Self {
            store,
            counters: ObjectStoreCounters::default(),
            needs_repair: Mutex::new(HashSet::new()),
            reads: tokio::sync::Semaphore::new(config.max_fetches_in_flight),
            breaker: None,
            config,
        })
    }

    /// Names the circuit breaker `store` (the backend given to [`ObjectPrefixStore::new`]) sits
    /// behind, so that its counters can be reported.
    pub fn with_breaker(mut self, breaker: Arc<super::breaker::CircuitBreaker>) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// The circuit breaker in front of the backend, if the store was built with one.
    pub fn breaker(&self) -> Option<&super::breaker::CircuitBreaker> {
        self.breaker.as_deref()
    }

    /// The token ids of a tail object: fewer than a chunk's (a tail claiming more is corrupt,
    /// and its chunk header must agree with its ids, so decoding it stays within a chunk).
    pub(super) fn tail_tokens(&self, object: &[u8]) -> Result<Vec<u32>, StoreError> {
        let tokens = seal::peek_tokens(object, self.key())?;
        if tokens.len() >= self.config.chunk_tokens {
            return Err(StoreError::Corrupt {
                reason: format!(
                    "a tail of {} tokens; tails hold fewer than a chunk's {}",
                    tokens.len(),
                    self.config.chunk_tokens
                ),
            });
        }
        Ok(tokens)
    }

    /// The key objects are sealed with, if any.
    pub(super) fn key(&self) -> Option<&StoreKey> {
        self.config.key.as_deref()
    }

    /// Counts a bad object found by a load and remembers it for repair.
    pub(super) fn found_bad(&self, path: &Path, error: &StoreError) {
        let counter = match error {
            StoreError::Unauthenticated { .. } => &self.counters.objects_refused,
            StoreError::Corrupt { .. } | StoreError::Codec(_) => &self.counters.objects_corrupt,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%path, %error, "kvplugin: bad object; the next save of its chain replaces it");
        let mut repairs = self.needs_repair.lock().unwrap_or_else(|e| e.into_inner());
        if repairs.len() < MAX_REPAIRS {
            repairs.insert(path.clone());
        }
    }

    /// Whether a load found the object at `path` bad (taking it off the list: the caller is
    /// about to overwrite it).
    fn take_repair(&self, path: &Path) -> bool {
        self.needs_repair
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path)
    }

    /// Bytes moved so far.
    pub fn counters(&self) -> &ObjectStoreCounters {
        &self.counters
    }

    fn root(&self, model: &ModelFingerprint) -> String {
        format!(
            "{}/{LAYOUT_VERSION}/{}",
            self.config.namespace,
            &model.to_hex()[..32]
        )
    }

    /// Every level full chunks are written at: the main level first, no level twice.
    pub(super) fn levels_written(&self) -> Vec<Level> {
        let mut levels = vec![self.config.level];
        for &level in &self.config.extra_levels {
            if !levels.contains(&level) {
                levels.push(level);
            }
        }
        levels
    }

    /// Full chunk `index` of a chain (0: the first), whose parent (the prefix before it) hashes
    /// to `parent` and which hashes to `hash`.
    pub(super) fn chunk_path(
        &self,
        model: &ModelFingerprint,
        index: usize,
        parent: &blake3::Hash,
        hash: &blake3::Hash,
        level: Level,
    ) -> Path {
        Path::from(format!(
            "{}/{}",
            self.root(model),
            ObjectName::Chunk {
                index,
                parent: short_hash(parent),
                hash: short_hash(hash),
                level,
            }
        ))
    }

    /// The tail after `index` full chunks whose prefix hashes to `parent`.
    pub(super) fn tail_path(
        &self,
        model: &ModelFingerprint,
        index: usize,
        parent: &blake3::Hash,
    ) -> Path {
        Path::from(format!(
            "{}/{}",
            self.root(model),
            ObjectName::Tail {
                index,
                parent: short_hash(parent),
                // Tails are always coded lossless: a store reading at another level finds the
                // tail another level's writer left.
                level: Level::Lossless,
            }
        ))
    }

    /// Hash of the empty prefix, then of each full chunk of `tokens`.
    pub(super) fn chain(
        &self,
        model: &ModelFingerprint,
        tokens: &[u32],
        n_chunks: usize,
    ) -> Vec<blake3::Hash> {
        // Keyed: names are secret, per key (no membership test without the key).
        let hasher = || match self.key() {
            Some(key) => key.names_hasher(),
            None => blake3::Hasher::new(),
        };
        let mut h = hasher();
        h.update(b"mistralrs-kvplugin/chunk-chain/v1");
        h.update(model.as_bytes());
        h.update(&(self.config.chunk_tokens as u64).to_le_bytes());
        let mut hashes = vec![h.finalize()];
        for chunk in tokens.chunks_exact(self.config.chunk_tokens).take(n_chunks) {
            let mut h = hasher();
            h.update(hashes.last().expect("root").as_bytes());
            for t in chunk {
                h.update(&t.to_le_bytes());
            }
            hashes.push(h.finalize());
        }
        hashes
    }

    /// One whole object of `model`'s, refused unread when it is larger than any object of the
    /// model can be ([`ObjectPrefixStore::object_cap`]).
    pub(super) async fn get(
        &self,
        path: &Path,
        model: &ModelFingerprint,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        self.get_with(path, GetOptions::default(), self.object_cap(model))
            .await
    }

    /// The most bytes an object of `model` can take (its chunk of `chunk_tokens` tokens coded
    /// lossless, with room for the codec's framing, and its envelope); `None` when the model's
    /// layout is unknown.
    pub(super) fn object_cap(&self, model: &ModelFingerprint) -> Option<u64> {
        let layout = model.layout()?;
        let c = self.config.chunk_tokens as u64;
        let raw = c * layout.values_per_token() as u64 * layout.dtype.size() as u64;
        Some((seal::HEADER_BYTES + seal::AEAD_OVERHEAD) as u64 + 4 * c + raw + raw / 4 + (64 << 10))
    }

    /// One GET (whole or ranged, the whole at most `cap` bytes), counted; a missing object is
    /// `None`.
    async fn get_with(
        &self,
        path: &Path,
        opts: GetOptions,
        cap: Option<u64>,
    ) -> Result<Option<bytes::Bytes>, StoreError> {
        let _read = self.read_permit().await?;
        match self.store.get_opts(path, opts).await {
            Ok(result) => {
                if let Some(cap) = cap.filter(|&cap| result.meta.size > cap) {
                    return Err(StoreError::Corrupt {
                        reason: format!(
                            "object is {} bytes, more than the {cap} any of this model's can take",
                            result.meta.size
                        ),
                    });
                }
                let bytes = result
                    .bytes()
                    .await
                    .map_err(StoreError::from_object_store)?;
                self.counters
                    .bytes_read
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(Some(bytes))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::from_object_store(e)),
        }
    }

    /// The token ids in the envelope of the object at `path`, read with one ranged request (the
    /// envelope's header and at most a chunk's worth of ids with their tag; a shorter object
    /// comes back whole).
    async fn envelope_tokens(&self, path: &Path) -> Result<Option<Vec<u32>>, StoreError> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(
                0..(seal::HEADER_BYTES + 4 * self.config.chunk_tokens + seal::AEAD_OVERHEAD) as u64,
            )),
            ..Default::default()
        };
        self.get_with(path, opts, None)
            .await?
            .map(|bytes| seal::peek_tokens(&bytes, self.key()))
            .transpose()
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>, create: bool) -> Result<bool, StoreError> {
        let len = bytes.len() as u64;
        let opts = PutOptions {
            mode: if create {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {
                self.counters
                    .bytes_written
                    .fetch_add(len, Ordering::Relaxed);
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(StoreError::from_object_store(e)),
        }
    }

    /// A permit for one read (see [`ObjectStoreConfig::max_fetches_in_flight`]).
    pub(super) async fn read_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        self.reads
            .acquire()
            .await
            .map_err(|_| StoreError::backend("the store is closed"))
    }

    async fn exists(&self, path: &Path) -> Result<bool, StoreError> {
        let _read = self.read_permit().await?;
        match self.store.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::from_object_store(e)),
        }
    }

    /// Encodes tokens `start..start + len` of `prefix` into an object bound to `binding` (on
    /// the blocking pool).
    async fn encode_object(
        &self,
        prefix: Arc<KvPrefix>,
        model: ModelFingerprint,
        (start, len): (usize, usize),
        level: Level,
        binding: Binding,
    ) -> Result<Vec<u8>, StoreError> {
        let key = self.config.key.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<u8>, StoreError> {
            let chunk = chunk_of(&prefix, start, len)?;
            let encoded = codec::encode_with(
                &chunk,
                &EncodeOptions::for_chunk(level, start),
                model.as_bytes(),
            )?;
            seal::seal(
                binding,
                &prefix.tokens[start..start + len],
                &encoded,
                key.as_deref(),
            )
        })
        .await
        .map_err(|e| StoreError::backend(format!("encode task: {e}")))?
    }
}

#[async_trait]
impl PrefixStore for ObjectPrefixStore {
    fn chunk_tokens(&self) -> Option<usize> {
        Some(self.config.chunk_tokens)
    }

    async fn save(
        &self,
        model: &ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<SaveOutcome, StoreError> {
        validate_prefix(&prefix)?;
        let c = self.config.chunk_tokens;
        let n = prefix.tokens.len();
        let n_full = n / c;
        let hashes = self.chain(model, &prefix.tokens, n_full);
        let prefix = Arc::new(prefix);
        let values_per_token =
            2 * prefix.layers.len() * prefix.layers[0].k.dims()[1] * prefix.layers[0].k.dims()[3];
        let mut written = 0u64;
        for i in 0..n_full {
            for level in self.levels_written() {
                let path = self.chunk_path(model, i, &hashes[i], &hashes[i + 1], level);
                let repair = self.take_repair(&path);
                if !repair && self.exists(&path).await? {
                    continue;
                }
                let binding = Binding {
                    kind: ObjectKind::Chunk,
                    hash: *hashes[i + 1].as_bytes(),
                };
                let object = self
                    .encode_object(prefix.clone(), *model, (i * c, c), level, binding)
                    .await?;
                let len = object.len() as u64;
                if self.put(&path, object, !repair).await? {
                    if repair {
                        self.counters
                            .objects_repaired
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    written += len;
                    self.counters
                        .raw_16bit_bytes_written
                        .fetch_add((c * values_per_token * 2) as u64, Ordering::Relaxed);
                }
            }
        }
        let tail = n - n_full * c;
        if tail > 0 {
            let path = self.tail_path(model, n_full, &hashes[n_full]);
            // Keep the longer tail: a shorter prefix must not replace a longer one's. Only the
            // envelope's token ids are read, not the whole object (a bad one a load found is
            // replaced).
            let repair = self.take_repair(&path);
            let keep_existing = !repair
                && match self.envelope_tokens(&path).await {
                    Ok(Some(tokens)) => {
                        tokens.len() >= tail && tokens[..tail] == prefix.tokens[n_full * c..]
                    }
                    _ => false,
                };
            if !keep_existing {
                let binding = Binding {
                    kind: ObjectKind::Tail,
                    hash: *hashes[n_full].as_bytes(),
                };
                let object = self
                    .encode_object(
                        prefix.clone(),
                        *model,
                        (n_full * c, tail),
                        Level::Lossless,
                        binding,
                    )
                    .await?;
                let len = object.len() as u64;
                self.put(&path, object, false).await?;
                if repair {
                    self.counters
                        .objects_repaired
                        .fetch_add(1, Ordering::Relaxed);
                }
                written += len;
                self.counters
                    .raw_16bit_bytes_written
                    .fetch_add((tail * values_per_token * 2) as u64, Ordering::Relaxed);
            }
        }
        Ok(if written > 0 {
            SaveOutcome::Written { bytes: written }
        } else {
            SaveOutcome::AlreadyPresent
        })
    }

    async fn load(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
    ) -> Result<Option<KvPrefix>, StoreError> {
        self.load_at(model, prompt, min_tokens, self.config.level)
            .await
    }

    async fn load_with_capacity(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        capacity: &RowCapacity,
    ) -> Result<Option<KvPrefix>, StoreError> {
        self.load_rows(model, prompt, min_tokens, self.config.level, capacity)
            .await
    }

    async fn load_streamed_with_capacity(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        policy: &StreamPolicy,
        capacity: &RowCapacity,
    ) -> Result<StreamedLoad, StoreError> {
        self.load_streamed_rows(model, prompt, min_tokens, policy, capacity)
            .await
    }

    async fn load_streamed(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        policy: &StreamPolicy,
    ) -> Result<StreamedLoad, StoreError> {
        // The inherent method (store/streaming.rs).
        ObjectPrefixStore::load_streamed(self, model, prompt, min_tokens, policy).await
    }
}

impl ObjectPrefixStore {
    /// [`PrefixStore::load`] reading full chunks at `level` (the main level or one of the extra
    /// levels they were also written at; chunks missing at that level end the hit there).
    pub async fn load_at(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        level: Level,
    ) -> Result<Option<KvPrefix>, StoreError> {
        self.load_rows(model, prompt, min_tokens, level, &|n| n)
            .await
    }

    /// [`ObjectPrefixStore::load_at`] into tensors of `capacity(n)` rows.
    ///
    /// The run of full chunks is fetched in order, `fetch_concurrency` at a time, and each chunk
    /// decodes on the blocking pool as soon as it and the chunks before it have arrived, while
    /// later ones are still in flight; the tail of a full run is fetched alongside the chunks.
    /// Every tensor is allocated once, for the engine's capacity at the longest hit the prompt
    /// allows, and each value is written once; a hit that ends early copies its rows out once.
    async fn load_rows(
        &self,
        model: &ModelFingerprint,
        prompt: &[u32],
        min_tokens: usize,
        level: Level,
        capacity: &RowCapacity,
    ) -> Result<Option<KvPrefix>, StoreError> {
        let c = self.config.chunk_tokens;
        let usable = prompt.len().saturating_sub(1);
        if usable <= min_tokens {
            return Ok(None);
        }
        let max_full = usable / c;
        let hashes = self.chain(model, prompt, max_full);
        let n_alloc = capacity(usable).max(usable);
        let model = *model;
        // Decodes on the blocking pool stop once this load is dropped (a timed-out lookup).
        let cancel = Cancel::default();
        let _abandon = cancel.on_drop();
        let ctx = DecodeContext {
            model,
            key: self.config.key.clone(),
            n_alloc,
            cancel,
        };

        // The tail after the longest possible run: a full hit needs it, so it is fetched
        // alongside the chunks instead of after them (one round trip less); a run that ends
        // earlier fetches its own tail afterwards and ignores this one.
        let full_run_tail = async {
            if max_full * c < usable {
                self.get(&self.tail_path(&model, max_full, &hashes[max_full]), &model)
                    .await
            } else {
                Ok(None)
            }
        };
        // Fetched chunks, in order, up to the first missing one. The channel's bound keeps at
        // most `fetch_concurrency` fetched objects waiting for the decoder.
        let concurrency = self.config.fetch_concurrency.max(1);
        let (fetched_tx, mut fetched_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(concurrency);
        let chain = &hashes;
        let chunk_path = |i: usize| self.chunk_path(&model, i, &chain[i], &chain[i + 1], level);
        // Moves the sender in, so that the decoder's channel closes when the run ends.
        let fetch_run = async move {
            let mut chunks = stream::iter(0..max_full)
                .map(|i| {
                    let path = self.chunk_path(&model, i, &chain[i], &chain[i + 1], level);
                    async move {
                        let fetched = self.get(&path, &model).await;
                        // An oversized object is bad data, not a failing backend: remember it
                        // for repair (`found_bad` ignores backend errors).
                        if let Err(e) = &fetched {
                            self.found_bad(&path, e);
                        }
                        fetched
                    }
                })
                .buffered(concurrency);
            while let Some(fetched) = chunks.next().await {
                match fetched? {
                    // A failed send: the decoder stopped (a corrupt chunk) and dropped its
                    // receiver; nothing more is wanted.
                    Some(bytes) => {
                        if fetched_tx.send(bytes).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            Ok::<(), StoreError>(())
        };
        // Decodes what has arrived, in batches: everything waiting when the previous batch is
        // done (on a local disk the whole run after the first chunk; on a slow link one or two
        // chunks at a time), so decoding overlaps the fetches without a fork-join per chunk.
        // Chunks stay undecoded while the run is not longer than `min_tokens` (what the caller
        // already has costs fetches only). It owns the receiver: when it stops early (a corrupt
        // chunk) the channel closes, the fetcher's next send fails and it stops too.
        //
        // A bad chunk (tokens, seal, format) ends the run where it starts: the chunks before it
        // are kept, the first error is returned alongside them.
        let run_ctx = &ctx;
        let decode_run = async move {
            let mut buffers: Option<DecodeBuffers> = None;
            let mut decoded = 0;
            let mut waiting: Vec<DecodePart> = Vec::new();
            let mut bad: Option<StoreError> = None;
            'run: while let Some(first) = fetched_rx.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = fetched_rx.try_recv() {
                    batch.push(next);
                }
                for bytes in batch {
                    let offset = decoded + waiting.len() * c;
                    let index = offset / c;
                    let ours = seal::peek_tokens(&bytes, self.key()).and_then(|tokens| {
                        if tokens[..] == prompt[offset..offset + c] {
                            Ok(())
                        } else {
                            Err(StoreError::Corrupt {
                                reason: "object's tokens differ from the prompt's".into(),
                            })
                        }
                    });
                    if let Err(e) = ours {
                        // The chunks waiting before it are still good: decoded below.
                        self.found_bad(&chunk_path(index), &e);
                        bad = Some(e);
                        break;
                    }
                    waiting.push(DecodePart {
                        bytes,
                        offset,
                        take: c,
                        binding: Binding {
                            kind: ObjectKind::Chunk,
                            hash: *chain[index + 1].as_bytes(),
                        },
                    });
                }
                if decoded + waiting.len() * c > min_tokens {
                    let batch = std::mem::take(&mut waiting);
                    let first_index = decoded / c;
                    let (good, failure) = self.decode_batch(&mut buffers, batch, run_ctx).await;
                    decoded += good * c;
                    if let Some((part, e)) = failure {
                        if let Some(part) = part {
                            self.found_bad(&chunk_path(first_index + part), &e);
                        }
                        // Earlier in the prompt than a bad chunk found by its tokens.
                        bad = Some(e);
                        break 'run;
                    }
                }
                if bad.is_some() {
                    break 'run;
                }
            }
            // Chunks fetched but never opened (the run was too short to be worth it, with or
            // without a bad chunk after them): the former go with the tail, the latter are
            // dropped (the hit is too short to use).
            if bad.is_some() {
                waiting.clear();
            }
            (buffers, decoded, waiting, bad)
        };
        let (fetched, decoded, full_run_tail) =
            futures::join!(fetch_run, decode_run, full_run_tail);
        let (mut buffers, decoded, mut waiting, bad) = decoded;
        // A backend failure ends the run like a bad chunk: what was decoded before it is used.
        let bad = bad.or(fetched.err());
        if let Some(e) = bad {
            if decoded <= min_tokens {
                return Err(e);
            }
            // The good chunks make the hit; the tail after them is not looked for (it would
            // be the tail of a shorter prompt), and the failure is counted by `found_bad`.
            tracing::debug!(error = %e, "kvplugin: a bad chunk ended the hit");
            return self.finish_load(buffers, prompt, decoded, capacity).await;
        }

        let mut covered = decoded + waiting.len() * c;
        let n_full = covered / c;
        let tail_path = self.tail_path(&model, n_full, &hashes[n_full]);
        let tail = if n_full == max_full {
            full_run_tail
        } else {
            self.get(&tail_path, &model).await
        };
        // A tail that cannot be had (bad, oversized, or the backend failed) leaves the chunks'
        // hit as it is; with no chunks to keep, its failure is the lookup's.
        let tail = match tail {
            Ok(tail) => tail,
            Err(e) => {
                self.found_bad(&tail_path, &e);
                if covered <= min_tokens {
                    return Err(e);
                }
                tracing::debug!(error = %e, "kvplugin: no tail for this hit");
                None
            }
        };
        if let Some(bytes) = tail {
            match self.tail_tokens(&bytes) {
                Ok(tokens) => {
                    let take = common_prefix_len(&tokens, &prompt[covered..usable]);
                    if take > 0 {
                        waiting.push(DecodePart {
                            bytes,
                            offset: covered,
                            take,
                            binding: Binding {
                                kind: ObjectKind::Tail,
                                hash: *hashes[n_full].as_bytes(),
                            },
                        });
                        covered += take;
                    }
                }
                Err(e) => self.found_bad(&tail_path, &e),
            }
        }
        if covered <= min_tokens {
            return Ok(None);
        }
        if !waiting.is_empty() {
            let first_index = decoded / c;
            let n_parts = waiting.len();
            let (good, failure) = self.decode_batch(&mut buffers, waiting, &ctx).await;
            if let Some((part, e)) = failure {
                // The last part may be the tail.
                let path = match part {
                    Some(p) if p + 1 == n_parts && !covered.is_multiple_of(c) => Some(tail_path),
                    Some(p) => Some(self.chunk_path(
                        &model,
                        first_index + p,
                        &hashes[first_index + p],
                        &hashes[first_index + p + 1],
                        level,
                    )),
                    None => None,
                };
                if let Some(path) = path {
                    self.found_bad(&path, &e);
                }
                let kept = decoded + good * c;
                if kept <= min_tokens {
                    return Err(e);
                }
                return self.finish_load(buffers, prompt, kept, capacity).await;
            }
        }
        self.finish_load(buffers, prompt, covered, capacity).await
    }

    /// The prefix of the first `covered` prompt tokens from decoded buffers, in `capacity(n)`
    /// rows.
    async fn finish_load(
        &self,
        buffers: Option<DecodeBuffers>,
        prompt: &[u32],
        covered: usize,
        capacity: &RowCapacity,
    ) -> Result<Option<KvPrefix>, StoreError> {
        let Some(buffers) = buffers else {
            return Ok(None);
        };
        let tokens = prompt[..covered].to_vec();
        let rows = capacity(covered).max(covered);
        tokio::task::spawn_blocking(move || into_prefix(buffers, tokens, rows))
            .await
            .map_err(|e| StoreError::backend(format!("install task: {e}")))?
            .map(Some)
    }
}

impl ObjectPrefixStore {
    /// Decodes `parts` into `buffers` (allocated on the first batch) on the blocking pool.
    /// Returns how many parts, from the first, were decoded, and the failure that stopped the
    /// rest (with the index of the part it came from, when it is the part's own).
    async fn decode_batch(
        &self,
        buffers: &mut Option<DecodeBuffers>,
        parts: Vec<DecodePart>,
        ctx: &DecodeContext,
    ) -> (usize, Option<(Option<usize>, StoreError)>) {
        let held = buffers.take();
        let ctx = ctx.clone();
        let decoded = join_decode(tokio::task::spawn_blocking(move || {
            decode_parts_into(held, &parts, &ctx)
        }))
        .await;
        *buffers = decoded.buffers;
        (decoded.good_parts, decoded.result.err())
    }
}

/// The prefix whose tensors are, in order, layer 0's K and V, layer 1's K and V, ...
pub(super) fn prefix_of(tokens: Vec<u32>, tensors: Vec<Tensor>) -> KvPrefix {
    let mut tensors = tensors.into_iter();
    let mut layers = Vec::new();
    while let (Some(k), Some(v)) = (tensors.next(), tensors.next()) {
        layers.push(LayerKv { k, v });
    }
    KvPrefix {
        tokens,
        layers,
        approximate_from: None,
    }
}

/// The checked codec chunk of an opened object ([`seal::open`] first: nothing is read before
/// the seal and binding hold): the chunk's magic, version, checksum, model, a shape that is the
/// model's, and a token count that agrees with the envelope's `n_tokens`.
pub(super) fn parse_chunk<'a>(
    encoded: &'a [u8],
    n_tokens: usize,
    model: &ModelFingerprint,
) -> Result<ParsedChunk<'a>, StoreError> {
    let chunk = ParsedChunk::parse(encoded, model.as_bytes())?;
    if let Some(layout) = model.layout() {
        let (s, dtype) = (chunk.header().shape, chunk.header().dtype);
        if (s.n_layers, s.n_kv_heads, s.head_dim, dtype)
            != (
                layout.n_layers,
                layout.n_kv_heads,
                layout.head_dim,
                layout.dtype,
            )
        {
            return Err(StoreError::Corrupt {
                reason: format!(
                    "object's chunk has {} layers x {} heads x {} ({dtype:?}); the model's cache \
                     has {} x {} x {} ({:?})",
                    s.n_layers,
                    s.n_kv_heads,
                    s.head_dim,
                    layout.n_layers,
                    layout.n_kv_heads,
                    layout.head_dim,
                    layout.dtype
                ),
            });
        }
    }
    if chunk.header().shape.n_tokens != n_tokens {
        return Err(StoreError::Corrupt {
            reason: "object's token count differs from its chunk's".into(),
        });
    }
    Ok(chunk)
}

pub(super) fn candle_dtype(dtype: KvDType) -> DType {
    match dtype {
        KvDType::F32 => DType::F32,
        KvDType::F16 => DType::F16,
        KvDType::BF16 => DType::BF16,
    }
}

fn kv_dtype(dtype: DType) -> Result<KvDType, StoreError> {
    match dtype {
        DType::F32 => Ok(KvDType::F32),
        DType::F16 => Ok(KvDType::F16),
        DType::BF16 => Ok(KvDType::BF16),
        other => Err(StoreError::InvalidPrefix {
            reason: format!("KV dtype {other:?} is not stored"),
        }),
    }
}

/// Tokens `start..start + len` of `prefix` as a codec chunk.
pub(crate) fn chunk_of(prefix: &KvPrefix, start: usize, len: usize) -> Result<KvChunk, StoreError> {
    let first = &prefix.layers[0].k;
    let (_, heads, _, head_dim) = first.dims4()?;
    let dtype = kv_dtype(first.dtype())?;
    let shape = ChunkShape {
        n_layers: prefix.layers.len(),
        n_kv_heads: heads,
        head_dim,
        n_tokens: len,
    };
    let mut tensors = Vec::with_capacity(2 * prefix.layers.len());
    for layer in &prefix.layers {
        for t in [&layer.k, &layer.v] {
            tensors.push(
                t.narrow(2, start, len)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
    }
    Ok(KvChunk::from_f32_tensors(shape, dtype, &tensors)?)
}

/// The first `take` tokens of every layer of `chunk`, as host tensors in the chunk's dtype.
pub(crate) fn tensors_of(
    chunk: &KvChunk,
    take: usize,
) -> Result<Vec<(Tensor, Tensor)>, StoreError> {
    let s = chunk.shape();
    let dtype = candle_dtype(chunk.dtype());
    let tensor = |idx: usize| -> Result<Tensor, candle_core::Error> {
        Tensor::from_vec(
            chunk.tensor_f32(idx),
            (1, s.n_kv_heads, s.n_tokens, s.head_dim),
            &Device::Cpu,
        )?
        .narrow(2, 0, take)?
        .to_dtype(dtype)
    };
    (0..s.n_layers)
        .map(|l| Ok((tensor(2 * l)?, tensor(2 * l + 1)?)))
        .collect()
}
