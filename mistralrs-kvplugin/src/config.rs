//! The plugin's configuration: one `serde` struct, read from a TOML file, with environment
//! overrides, validated with errors that name the offending field.
//!
//! ```toml
//! namespace = "kvplugin"
//! chunk_tokens = 256
//! level = "lossless"           # lossless (exact) | high | fine | default | coarse (lossy: approximate)
//! extra_levels = []            # e.g. ["default", "coarse"]: chunks also written at these
//! fetch_concurrency = 8
//! max_pending_saves = 4
//! load_timeout_ms = 10000          # a store lookup
//! blend_timeout_ms = 120000        # a blended lookup (it may compute its documents)
//! min_prefix_tokens = 16
//! read_only = false            # true: look up only, never save
//! lookup_memory_mb = 4096      # decode buffers of all lookups in flight; one that does not fit
//!                              # is not made (a recompute)
//! max_fetches_in_flight = 32   # GETs and HEADs in flight across all lookups
//!
//! [store]
//! url = "file:///var/cache/kvplugin"   # or a plain path, "memory://", "s3://bucket"
//! endpoint = "http://127.0.0.1:9000"   # S3-compatible servers (MinIO, Garage, ...)
//! region = "garage"
//! access_key_id = "..."                # or AWS_ACCESS_KEY_ID
//! secret_access_key = "..."            # or AWS_SECRET_ACCESS_KEY
//! allow_http = true
//! request_timeout_ms = 5000
//! breaker_failures = 5                # failed requests in a row that skip the store for
//! breaker_cool_down_ms = 10000         #   a cool-down (then one probe); 0: never skipped
//! key_file = "/etc/kvplugin/key"      # the deployment's secret: objects encrypted and sealed,
//!                                      # names keyed (a shared bucket needs one; `kvplugin store
//!                                      # keygen`)
//! encrypt = true                       # with a key (the default); false: MAC-sealed in the clear
//! max_bytes = "20G"                    # optional bound: the GC deletes the oldest chains beyond it
//! ttl = "7d"                           # optional: chains not extended for this long are deleted
//! gc_grace = "10m"                     # never delete what is younger (saves in progress)
//! sweep_interval = "10m"               # `kvplugin serve` runs the GC this often when bounded
//!
//! [stream]                             # optional: adaptive chunk-by-chunk lookups
//! budget_ms = 1500                     # time-to-first-token budget
//! prefill_secs_per_token = 2.0e-3      # the engine's prefill time, T(n) = a n + b n^2,
//! prefill_secs_per_token_sq = 4.0e-6   #   as `kvplugin bench stream` measures and prints it
//! engine_overhead_ms = 50             # what a hit costs the engine besides the load
//! decode_mb_s = 300                    # codec decode speed to assume at first
//! prior_mbit_s = 1000                  # bandwidth to assume before the first transfer
//!
//! [blend]                              # CacheBlend lookups (see `crate::blend`)
//! steps = [{ layer = 1, keep = 0.15 }] # after layer 1 keep the 15% most deviating document rows
//! deviation = "value"                  # or "key"
//! memory_bytes = 2147483648            # in-memory document caches (LRU)
//! separator = "[[KVBLEND]]"            # between prefix, documents and question in marked text
//! from_text = true                     # blend chat/completion text that holds the separator
//! adaptive_ratio = true                # raise the ratio while loads are slower than recompute
//! document_sink = true                 # compute documents after the prompt's first token
//! ```
//!
//! Without `[stream]`, a lookup loads the whole prefix at `level`. With it, each chunk is
//! fetched at the best of `level` and `extra_levels` that fits the budget, or recomputed.
//!
//! Environment overrides (applied by [`PluginConfig::apply_env`]): `KVPLUGIN_STORE_URL`,
//! `KVPLUGIN_S3_ENDPOINT`, `KVPLUGIN_S3_ALLOW_HTTP`, `KVPLUGIN_S3_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `KVPLUGIN_LEVEL`, `KVPLUGIN_CHUNK_TOKENS`, `KVPLUGIN_NAMESPACE`, `KVPLUGIN_STORE_KEY_FILE`, and
//! `KVPLUGIN_STORE_KEY` (the secret itself, for containers that pass secrets as variables; it
//! wins over a key file).

use std::{path::Path, sync::Arc, time::Duration};

use object_store::{
    aws::AmazonS3Builder, local::LocalFileSystem, memory::InMemory, ClientOptions, ObjectStore,
    RetryConfig,
};
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::{
    codec::Level,
    hook::HookConfig,
    store::{
        breaker::{BreakerSettings, CircuitBreaker},
        durable::SyncedLocal,
        ObjectPrefixStore, ObjectStoreConfig, StoreKey,
    },
    stream::{PlannerInputs, PrefillModel, StreamPolicy},
};

/// A backend, and the circuit breaker it sits behind (the same object) if any.
type BackendWithBreaker = (Arc<dyn ObjectStore>, Option<Arc<CircuitBreaker>>);

/// The `[stream]` section: adaptive streaming of lookups (see [`crate::stream`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Time-to-first-token budget, milliseconds.
    pub budget_ms: u64,
    /// Prefill seconds per token (the linear part of the engine's prefill time).
    pub prefill_secs_per_token: f64,
    /// Prefill seconds per token pair (the quadratic part).
    #[serde(default)]
    pub prefill_secs_per_token_sq: f64,
    /// What a hit costs the engine besides the load (installing it, the first step),
    /// milliseconds; reserved out of the budget.
    #[serde(default)]
    pub engine_overhead_ms: u64,
    /// Codec decode speed assumed before the first chunk, MB of object per second.
    #[serde(default = "default_decode_mb_s")]
    pub decode_mb_s: f64,
    /// Bandwidth assumed before the first transfer, Mbit/s.
    #[serde(default = "default_prior_mbit_s")]
    pub prior_mbit_s: f64,
}

fn default_decode_mb_s() -> f64 {
    300.0
}

fn default_prior_mbit_s() -> f64 {
    1000.0
}

impl StreamSettings {
    /// The adaptive policy these settings describe.
    pub fn policy(&self) -> StreamPolicy {
        StreamPolicy::Adaptive(PlannerInputs {
            budget: Duration::from_millis(self.budget_ms),
            prefill: PrefillModel {
                secs_per_token: self.prefill_secs_per_token,
                secs_per_token_sq: self.prefill_secs_per_token_sq,
            },
            engine_overhead: Duration::from_millis(self.engine_overhead_ms),
            decode_bytes_per_s: self.decode_mb_s * 1e6,
            prior_bytes_per_s: self.prior_mbit_s * 1e6 / 8.0,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(field, format!("must be a positive number, not {v}")))
            }
        };
        if self.budget_ms == 0 {
            return Err(bad("stream.budget_ms", "must be at least 1"));
        }
        positive("stream.decode_mb_s", self.decode_mb_s)?;
        positive("stream.prior_mbit_s", self.prior_mbit_s)?;
        if !(self.prefill_secs_per_token.is_finite()
            && self.prefill_secs_per_token_sq.is_finite()
            && self.prefill_secs_per_token >= 0.0
            && self.prefill_secs_per_token_sq >= 0.0
            && self.prefill_secs_per_token + self.prefill_secs_per_token_sq > 0.0)
        {
            return Err(bad(
                "stream.prefill_secs_per_token",
                "the prefill coefficients must be non-negative and not both 0",
            ));
        }
        Ok(())
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config field `{field}`: {reason}")]
pub struct ConfigError {
    /// The field (dotted path for nested ones).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Where the store is. Its `Debug` output never shows the S3 secret.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreSettings {
    /// `file:///path`, a plain path, `memory://`, or `s3://bucket`.
    pub url: String,
    /// S3 endpoint (for S3-compatible servers); AWS when absent.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
    /// Timeout of one request.
    pub request_timeout_ms: u64,
    /// Bound on the store's size (`"10G"`, `"500M"`, bytes): `kvplugin store gc` and the sweeper
    /// of `kvplugin serve` delete the oldest chains beyond it. Unset: unbounded.
    pub max_bytes: Option<String>,
    /// Chains not extended for this long (`"7d"`, `"12h"`) are deleted by the GC. Unset: kept.
    pub ttl: Option<String>,
    /// The GC never deletes what was written more recently than this (saves in progress).
    pub gc_grace: String,
    /// How often `kvplugin serve` runs the GC when `max_bytes` or `ttl` is set.
    pub sweep_interval: String,
    /// Failed requests in a row after which the store is skipped for a cool-down (lookups
    /// recompute at once instead of waiting for timeouts); 0 turns the breaker off.
    pub breaker_failures: u32,
    /// How long the store is skipped before one request probes it again.
    pub breaker_cool_down_ms: u64,
    /// A file holding the deployment's secret (see [`crate::store::seal`]). Unset: objects
    /// carry checksums only, which stop accidents, not writers.
    pub key_file: Option<String>,
    /// With a key: whether objects are encrypted (XChaCha20-Poly1305) or only MAC-sealed in
    /// the clear (`false`). Unset: encrypted. Either way the store reads both kinds under its
    /// key; `true` without a key is an error.
    pub encrypt: Option<bool>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            url,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            allow_http,
            request_timeout_ms,
            max_bytes,
            ttl,
            gc_grace,
            sweep_interval,
            breaker_failures,
            breaker_cool_down_ms,
            key_file,
            encrypt,
        } = self;
        f.debug_struct("StoreSettings")
            .field("url", url)
            .field("endpoint", endpoint)
            .field("region", region)
            .field("access_key_id", access_key_id)
            .field(
                "secret_access_key",
                &secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", allow_http)
            .field("request_timeout_ms", request_timeout_ms)
            .field("max_bytes", max_bytes)
            .field("ttl", ttl)
            .field("gc_grace", gc_grace)
            .field("sweep_interval", sweep_interval)
            .field("breaker_failures", breaker_failures)
            .field("breaker_cool_down_ms", breaker_cool_down_ms)
            .field("key_file", key_file)
            .field("encrypt", encrypt)
            .finish()
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: ".kvplugin/store".into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: false,
            request_timeout_ms: 5000,
            max_bytes: None,
            ttl: None,
            gc_grace: "10m".into(),
            sweep_interval: "10m".into(),
            key_file: None,
            encrypt: None,
            breaker_failures: BreakerSettings::default().failures,
            breaker_cool_down_ms: BreakerSettings::default().cool_down.as_millis() as u64,
        }
    }
}

/// Everything the plugin can be told.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// The store.
    pub store: StoreSettings,
    /// Path prefix of every object.
    pub namespace: String,
    /// Tokens per stored chunk.
    pub chunk_tokens: usize,
    /// Codec level written, and read by plain lookups.
    pub level: String,
    /// Further levels every full chunk is also written at (for loaders that choose per chunk).
    pub extra_levels: Vec<String>,
    /// Chunks fetched at once.
    pub fetch_concurrency: usize,
    /// Saves in flight at once; further ones are dropped and counted.
    pub max_pending_saves: usize,
    /// How long the engine waits for a lookup.
    pub load_timeout_ms: u64,
    /// How long a blended lookup may take (computing missing documents included).
    pub blend_timeout_ms: u64,
    /// Shorter prefixes are neither saved nor looked up.
    pub min_prefix_tokens: usize,
    /// Only look up, never save.
    pub read_only: bool,
    /// MiB of decode buffers all lookups in flight may hold together.
    pub lookup_memory_mb: u64,
    /// Store reads (GET, HEAD) in flight at once across all lookups.
    pub max_fetches_in_flight: usize,
    /// Adaptive streaming of lookups; absent: whole loads at `level`.
    pub stream: Option<StreamSettings>,
    /// Blended lookups (CacheBlend): selection steps, deviation, document-cache memory,
    /// separator (see [`crate::blend::BlendConfig`]).
    pub blend: crate::blend::BlendConfig,
    /// The secret from `KVPLUGIN_STORE_KEY` (never from the file: secrets do not belong in a
    /// config file; `store.key_file` points at one).
    #[serde(skip)]
    pub store_key: Option<Arc<StoreKey>>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        let store = ObjectStoreConfig::default();
        let hook = HookConfig::default();
        Self {
            store: StoreSettings::default(),
            namespace: store.namespace,
            chunk_tokens: store.chunk_tokens,
            level: store.level.name().into(),
            extra_levels: Vec::new(),
            fetch_concurrency: store.fetch_concurrency,
            max_pending_saves: hook.max_pending_saves,
            load_timeout_ms: hook.load_timeout.as_millis() as u64,
            blend_timeout_ms: hook.blend_timeout.as_millis() as u64,
            min_prefix_tokens: hook.min_prefix_tokens,
            read_only: hook.read_only,
            lookup_memory_mb: hook.lookup_memory_bytes >> 20,
            max_fetches_in_flight: store.max_fetches_in_flight,
            stream: None,
            blend: hook.blend,
            store_key: None,
        }
    }
}

impl PluginConfig {
    /// Parses TOML and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let field = e
                .message()
                .split('`')
                .nth(1)
                .unwrap_or("(file)")
                .to_string();
            bad(&field, e.message().trim().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file, applies the environment, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("(file)", format!("{}: {e}", path.display())))?;
        let mut config = Self::from_toml_str(&text)?;
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Applies environment overrides (`env` looks a variable up), then validates.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("KVPLUGIN_STORE_URL") {
            self.store.url = v;
        }
        if let Some(v) = env("KVPLUGIN_STORE_KEY_FILE") {
            self.store.key_file = Some(v);
        }
        if let Some(v) = env("KVPLUGIN_STORE_KEY") {
            let secret = secrecy::SecretString::from(v);
            let key = StoreKey::from_secret(secret.expose_secret().as_bytes())
                .map_err(|e| bad("KVPLUGIN_STORE_KEY", e.to_string()))?;
            self.store_key = Some(Arc::new(key));
        }
        if let Some(v) = env("KVPLUGIN_S3_ENDPOINT") {
            self.store.endpoint = Some(v);
        }
        if let Some(v) = env("KVPLUGIN_S3_ALLOW_HTTP") {
            self.store.allow_http = match v.as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(bad(
                        "store.allow_http",
                        format!("KVPLUGIN_S3_ALLOW_HTTP=`{v}` is not true or false"),
                    ))
                }
            };
        }
        if let Some(v) = env("KVPLUGIN_S3_REGION") {
            self.store.region = Some(v);
        }
        if let Some(v) = env("AWS_ACCESS_KEY_ID") {
            self.store.access_key_id = Some(v);
        }
        if let Some(v) = env("AWS_SECRET_ACCESS_KEY") {
            self.store.secret_access_key = Some(v);
        }
        if let Some(v) = env("KVPLUGIN_LEVEL") {
            self.level = v;
        }
        if let Some(v) = env("KVPLUGIN_NAMESPACE") {
            self.namespace = v;
        }
        if let Some(v) = env("KVPLUGIN_CHUNK_TOKENS") {
            self.chunk_tokens = v.parse().map_err(|_| {
                bad(
                    "chunk_tokens",
                    format!("KVPLUGIN_CHUNK_TOKENS=`{v}` is not a number"),
                )
            })?;
        }
        self.validate()
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let level = self.level()?;
        for level in std::iter::once(level).chain(self.extra_levels()?) {
            if self.chunk_tokens == 0 || self.chunk_tokens > level.max_chunk_tokens() {
                return Err(bad(
                    "chunk_tokens",
                    format!(
                        "must be 1..={} at level {}",
                        level.max_chunk_tokens(),
                        level.name()
                    ),
                ));
            }
        }
        if self.fetch_concurrency == 0 {
            return Err(bad("fetch_concurrency", "must be at least 1"));
        }
        if self.max_fetches_in_flight == 0 {
            return Err(bad("max_fetches_in_flight", "must be at least 1"));
        }
        if self.lookup_memory_mb == 0 {
            return Err(bad(
                "lookup_memory_mb",
                "must be at least 1 (0 would refuse every lookup)",
            ));
        }
        if self.max_pending_saves == 0 {
            return Err(bad("max_pending_saves", "must be at least 1"));
        }
        if self.blend_timeout_ms == 0 {
            return Err(bad("blend_timeout_ms", "must be at least 1"));
        }
        if self.load_timeout_ms == 0 {
            return Err(bad("load_timeout_ms", "must be at least 1"));
        }
        if self.namespace.is_empty() || self.namespace.contains("..") {
            return Err(bad("namespace", "must be a non-empty relative path"));
        }
        if self.store.url.is_empty() {
            return Err(bad("store.url", "must not be empty"));
        }
        self.blend
            .validate()
            .map_err(|reason| bad("blend", reason))?;
        if let Some(stream) = &self.stream {
            stream.validate()?;
        }
        self.gc_policy()?;
        crate::store::admin::parse_duration(&self.store.sweep_interval)
            .map_err(|e| bad("store.sweep_interval", e.to_string()))?;
        if let Some(bucket) = self.store.url.strip_prefix("s3://") {
            if bucket.is_empty() || bucket.contains('/') {
                return Err(bad("store.url", "s3 urls are `s3://bucket`"));
            }
            if self.store.access_key_id.is_some() != self.store.secret_access_key.is_some() {
                return Err(bad(
                    "store.secret_access_key",
                    "give both access_key_id and secret_access_key, or neither",
                ));
            }
        }
        Ok(())
    }

    /// The codec level.
    pub fn level(&self) -> Result<Level, ConfigError> {
        Level::from_name(&self.level).ok_or_else(|| {
            bad(
                "level",
                format!(
                    "`{}` is not one of lossless, high, fine, default, coarse",
                    self.level
                ),
            )
        })
    }

    /// The extra levels.
    pub fn extra_levels(&self) -> Result<Vec<Level>, ConfigError> {
        self.extra_levels
            .iter()
            .map(|name| {
                Level::from_name(name)
                    .ok_or_else(|| bad("extra_levels", format!("unknown level `{name}`")))
            })
            .collect()
    }

    /// Opens the backend the store settings describe, behind a circuit breaker (see
    /// [`crate::store::breaker`]) unless `breaker_failures` is 0 or the store is in memory.
    pub fn open_backend(&self) -> Result<Arc<dyn ObjectStore>, ConfigError> {
        Ok(self.open_backend_with_breaker()?.0)
    }

    /// [`PluginConfig::open_backend`], and the breaker it sits behind, if any.
    fn open_backend_with_breaker(&self) -> Result<BackendWithBreaker, ConfigError> {
        self.open_backend_with_breaker_over(|backend| backend)
    }

    fn open_backend_with_breaker_over(
        &self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Result<BackendWithBreaker, ConfigError> {
        let backend = wrap(self.open_raw_backend()?);
        if self.store.breaker_failures == 0 || self.store.url == "memory://" {
            return Ok((backend, None));
        }
        let breaker = Arc::new(CircuitBreaker::new(
            backend,
            BreakerSettings {
                failures: self.store.breaker_failures,
                cool_down: Duration::from_millis(self.store.breaker_cool_down_ms),
            },
        ));
        Ok((breaker.clone(), Some(breaker)))
    }

    fn open_raw_backend(&self) -> Result<Arc<dyn ObjectStore>, ConfigError> {
        let s = &self.store;
        if s.url == "memory://" {
            return Ok(Arc::new(InMemory::new()));
        }
        if let Some(bucket) = s.url.strip_prefix("s3://") {
            let timeout = Duration::from_millis(s.request_timeout_ms);
            // The standard credential chain first (AWS_* variables with session tokens, web
            // identity, ECS/EKS container credentials, then instance metadata); settings in the
            // file override it.
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_allow_http(s.allow_http)
                .with_client_options(
                    ClientOptions::new()
                        .with_timeout(timeout)
                        .with_connect_timeout(timeout)
                        .with_allow_http(s.allow_http),
                )
                .with_retry(RetryConfig {
                    max_retries: 2,
                    retry_timeout: timeout,
                    ..Default::default()
                });
            if let Some(region) = &s.region {
                b = b.with_region(region);
            }
            if let Some(endpoint) = &s.endpoint {
                // S3-compatible servers on an address take path-style requests.
                b = b
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            return Ok(Arc::new(
                b.build().map_err(|e| bad("store", e.to_string()))?,
            ));
        }
        let path = s.url.strip_prefix("file://").unwrap_or(&s.url);
        std::fs::create_dir_all(path).map_err(|e| bad("store.url", format!("{path}: {e}")))?;
        Ok(Arc::new(SyncedLocal::new(
            LocalFileSystem::new_with_prefix(path).map_err(|e| bad("store.url", e.to_string()))?,
        )))
    }

    /// The chunked store over the configured backend.
    pub fn build_store(&self) -> Result<ObjectPrefixStore, ConfigError> {
        self.build_store_over(|backend| backend)
    }

    /// [`PluginConfig::build_store`] with `wrap` between the backend and the circuit breaker
    /// (a fault injector, a bandwidth shaper: what the breaker and the store see is `wrap`'s).
    pub fn build_store_over(
        &self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Result<ObjectPrefixStore, ConfigError> {
        let (backend, breaker) = self.open_backend_with_breaker_over(wrap)?;
        let store = ObjectPrefixStore::new(
            backend,
            ObjectStoreConfig {
                namespace: self.namespace.clone(),
                chunk_tokens: self.chunk_tokens,
                level: self.level()?,
                extra_levels: self.extra_levels()?,
                fetch_concurrency: self.fetch_concurrency,
                max_fetches_in_flight: self.max_fetches_in_flight,
                key: self.key()?,
            },
        )
        .map_err(|e| bad("store", e.to_string()))?;
        Ok(match breaker {
            Some(breaker) => store.with_breaker(breaker),
            None => store,
        })
    }

    /// The deployment's key: `KVPLUGIN_STORE_KEY`'s, else `store.key_file`'s, else none;
    /// encrypting unless `store.encrypt` is `false`.
    pub fn key(&self) -> Result<Option<Arc<StoreKey>>, ConfigError> {
        let key = match (&self.store_key, &self.store.key_file) {
            (Some(key), _) => Some(key.clone()),
            (None, Some(path)) => Some(
                StoreKey::from_file(Path::new(path))
                    .map(Arc::new)
                    .map_err(|e| bad("store.key_file", e.to_string()))?,
            ),
            (None, None) => None,
        };
        match (key, self.store.encrypt) {
            (None, Some(true)) => Err(bad(
                "store.encrypt",
                "encryption needs a key: set store.key_file, KVPLUGIN_STORE_KEY_FILE or \
                 KVPLUGIN_STORE_KEY (`kvplugin store keygen` writes one)",
            )),
            (Some(key), Some(false)) => Ok(Some(Arc::new(key.encrypting(false)))),
            (key, _) => Ok(key),
        }
    }

    /// The GC policy of `[store]` (`max_bytes`, `ttl`, `gc_grace`).
    pub fn gc_policy(&self) -> Result<crate::store::admin::GcPolicy, ConfigError> {
        use crate::store::admin::{parse_bytes, parse_duration};
        Ok(crate::store::admin::GcPolicy {
            older_than: self
                .store
                .ttl
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| bad("store.ttl", e.to_string()))?,
            max_bytes: self
                .store
                .max_bytes
                .as_deref()
                .map(parse_bytes)
                .transpose()
                .map_err(|e| bad("store.max_bytes", e.to_string()))?,
            grace: parse_duration(&self.store.gc_grace)
                .map_err(|e| bad("store.gc_grace", e.to_string()))?,
        })
    }

    /// How often `kvplugin serve` sweeps; `None` when nothing bounds the store.
    pub fn sweep_interval(&self) -> Option<Duration> {
        let policy = self.gc_policy().ok()?;
        if policy.older_than.is_none() && policy.max_bytes.is_none() {
            return None;
        }
        crate::store::admin::parse_duration(&self.store.sweep_interval).ok()
    }

    /// The hook settings.
    pub fn hook_config(&self) -> HookConfig {
        HookConfig {
            max_pending_saves: self.max_pending_saves,
            load_timeout: Duration::from_millis(self.load_timeout_ms),
            blend_timeout: Duration::from_millis(self.blend_timeout_ms),
            min_prefix_tokens: self.min_prefix_tokens,
            read_only: self.read_only,
            lookup_memory_bytes: self.lookup_memory_mb << 20,
            stream: self.stream.as_ref().map(StreamSettings::policy),
            blend: self.blend.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_files_override_them() {
        PluginConfig::default().validate().unwrap();
        let c = PluginConfig::from_toml_str(
            "chunk_tokens = 128\nlevel = \"fine\"\n[store]\nurl = \"s3://kv\"\nendpoint = \"http://127.0.0.1:9\"\nallow_http = true\n",
        )
        .unwrap();
        assert_eq!(c.chunk_tokens, 128);
        assert_eq!(c.level().unwrap(), Level::Fine);
        assert_eq!(c.store.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert_eq!(
            c.max_pending_saves,
            PluginConfig::default().max_pending_saves
        );
    }

    #[test]
    fn a_blend_section_sets_the_selection() {
        let c = PluginConfig::from_toml_str(
            "[blend]\nsteps = [{ layer = 1, keep = 0.3 }, { layer = 2, keep = 0.2 }]\ndeviation = \"key\"\n",
        )
        .unwrap();
        let blend = c.hook_config().blend;
        assert_eq!(blend.steps.len(), 2);
        assert_eq!(blend.deviation, crate::blend::Deviation::Key);
        assert!((blend.ratio() - 0.2).abs() < 1e-6);
        assert_eq!(blend.separator, crate::blend::DEFAULT_SEPARATOR);
        let err = PluginConfig::from_toml_str(
            "[blend]\nsteps = [{ layer = 2, keep = 0.1 }, { layer = 1, keep = 0.1 }]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("blend"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("level = \"best\"", "level"),
            ("chunk_tokens = 0", "chunk_tokens"),
            // `high`'s fine steps bound a chunk's length; `coarse` allows the same length.
            ("chunk_tokens = 4000\nlevel = \"high\"", "chunk_tokens"),
            ("read_only = \"yes\"", "(file)"),
            ("extra_levels = [\"tiny\"]", "extra_levels"),
            (
                "chunk_tokens = 4000\nlevel = \"coarse\"\nextra_levels = [\"high\"]",
                "chunk_tokens",
            ),
            ("fetch_concurrency = 0", "fetch_concurrency"),
            ("bogus = 1", "bogus"),
            ("[store]\nurl = \"s3://a/b\"", "store.url"),
            (
                "[store]\nurl = \"s3://a\"\naccess_key_id = \"x\"",
                "store.secret_access_key",
            ),
            ("chunk_tokens = \"many\"", "(file)"),
            (
                "[stream]\nbudget_ms = 0\nprefill_secs_per_token = 1e-3",
                "stream.budget_ms",
            ),
            (
                "[stream]\nbudget_ms = 9\nprefill_secs_per_token = 0",
                "stream.prefill_secs_per_token",
            ),
            (
                "[stream]\nbudget_ms = 9\nprefill_secs_per_token = 1e-3\nprior_mbit_s = -1",
                "stream.prior_mbit_s",
            ),
            ("[stream]\nbudget_ms = 9", "prefill_secs_per_token"),
        ];
        for (text, field) in cases {
            let err = PluginConfig::from_toml_str(text).unwrap_err();
            assert!(
                err.field == field || err.reason.contains(field),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn a_stream_section_turns_on_adaptive_lookups() {
        assert_eq!(PluginConfig::default().hook_config().stream, None);
        let c = PluginConfig::from_toml_str(
            "extra_levels = [\"coarse\"]\n[stream]\nbudget_ms = 1500\nprefill_secs_per_token = 2e-3\nprefill_secs_per_token_sq = 4e-6\nprior_mbit_s = 80",
        )
        .unwrap();
        let Some(StreamPolicy::Adaptive(inputs)) = c.hook_config().stream else {
            panic!("expected an adaptive policy");
        };
        assert_eq!(inputs.budget, Duration::from_millis(1500));
        assert_eq!(inputs.prefill.secs_per_token_sq, 4e-6);
        assert_eq!(inputs.prior_bytes_per_s, 10e6);
        assert_eq!(inputs.decode_bytes_per_s, 300e6);
    }

    #[test]
    fn long_chunks_are_fine_at_coarse_levels() {
        let c = PluginConfig::from_toml_str("chunk_tokens = 4000\nlevel = \"coarse\"").unwrap();
        assert_eq!(c.chunk_tokens, 4000);
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = PluginConfig::default();
        let env = |k: &str| match k {
            "KVPLUGIN_STORE_URL" => Some("s3://bucket".to_string()),
            "AWS_ACCESS_KEY_ID" => Some("id".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".to_string()),
            "KVPLUGIN_CHUNK_TOKENS" => Some("64".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.store.url, "s3://bucket");
        assert_eq!(c.chunk_tokens, 64);
        // Printing the config never shows the S3 secret.
        let printed = format!("{c:?}");
        assert!(
            printed.contains("<redacted>") && !printed.contains("\"secret\""),
            "{printed}"
        );
        let err = c
            .apply_env(|k| (k == "KVPLUGIN_CHUNK_TOKENS").then(|| "x".to_string()))
            .unwrap_err();
        assert_eq!(err.field, "chunk_tokens");
    }

    #[test]
    fn a_key_comes_from_the_environment_or_a_file_and_bad_ones_name_their_source() {
        let dir = std::env::temp_dir().join(format!("kvplugin-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "0123456789abcdef0123456789abcdef\n").unwrap();
        let mut c = PluginConfig::from_toml_str(&format!(
            "[store]\nurl = \"memory://\"\nkey_file = \"{}\"",
            file.display()
        ))
        .unwrap();
        let from_file = c.key().unwrap().expect("the file's key");
        assert!(c.build_store().is_ok());
        // The variable wins over the file; the same secret is the same key.
        c.apply_env(|k| {
            (k == "KVPLUGIN_STORE_KEY").then(|| "0123456789abcdef0123456789abcdef".into())
        })
        .unwrap();
        assert_eq!(*c.key().unwrap().unwrap(), *from_file);
        c.apply_env(|k| (k == "KVPLUGIN_STORE_KEY").then(|| "another secret, long enough".into()))
            .unwrap();
        assert_ne!(*c.key().unwrap().unwrap(), *from_file);
        // Printing the config never shows the secret.
        assert!(!format!("{c:?}").contains("another secret"));
        // Encrypting unless told not to; encryption without a key is an error, not a no-op.
        assert!(from_file.encrypts());
        c.store.encrypt = Some(false);
        assert!(!c.key().unwrap().unwrap().encrypts());
        let mut keyless = PluginConfig::default();
        keyless.store.encrypt = Some(true);
        assert_eq!(keyless.key().unwrap_err().field, "store.encrypt");

        let err = c
            .apply_env(|k| (k == "KVPLUGIN_STORE_KEY").then(|| "short".into()))
            .unwrap_err();
        assert_eq!(err.field, "KVPLUGIN_STORE_KEY");
        let mut missing = PluginConfig::default();
        missing.store.key_file = Some(dir.join("nope").display().to_string());
        assert_eq!(missing.key().unwrap_err().field, "store.key_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_store_from_the_config_skips_a_dead_server_after_its_failures() {
        use crate::{store::PrefixStore, ModelFingerprint};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port(); // free, and closed once the listener is dropped
        let c = PluginConfig::from_toml_str(&format!(
            "chunk_tokens = 16\n[store]\nurl = \"s3://kv\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
             allow_http = true\nrequest_timeout_ms = 500\nbreaker_failures = 2\n\
             breaker_cool_down_ms = 60000\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n"
        ))
        .unwrap();
        let store = c.build_store().unwrap();
        let breaker = store.breaker().expect("S3 stores sit behind a breaker");
        let (model, prompt) = (ModelFingerprint::from_bytes([1; 32]), vec![5u32; 40]);
        assert!(store.load(&model, &prompt, 0).await.is_err());
        assert!(breaker.is_open(), "a chunk and a tail request failed");
        assert!(store.load(&model, &prompt, 0).await.is_err());
        assert!(breaker.skipped() >= 1, "refused without a connection");
        // An in-memory store needs none.
        let mut memory = PluginConfig::default();
        memory.store.url = "memory://".into();
        assert!(memory.build_store().unwrap().breaker().is_none());
    }
}
