//! `kvplugin serve`: mistral.rs's OpenAI-compatible server (the routes of
//! `mistralrs-server-core` 0.8.1) on an engine that carries the plugin's hook, plus the plugin's
//! own routes.
//!
//! Composition: our router answers `/metrics`, `/v1/kvcache/stats`, wraps `POST
//! /v1/chat/completions` and `POST /v1/completions`, and guards the stock operator routes; every
//! other request falls through to the stock router, whose CORS and body-limit layers stay as they
//! are.
//!
//! Invariants:
//! - A wrapped route answers exactly what the stock handler answered, plus
//!   `usage.prompt_tokens_details.cached_tokens` on a JSON body or SSE event that carries `usage`
//!   (prompt tokens the engine took from its own cache or the store, by the response's `id`, which
//!   is the engine's sequence id). A body that does not parse is passed on untouched.
//! - `--no-plugin` is the same server and engine without the hook: stock answers, no
//!   `cached_tokens` (stock mistral.rs does not report it), `/metrics` says `plugin_enabled 0`.
//! - The stock operator routes that change the engine (`/re_isq`, `/v1/models/unload`,
//!   `/v1/models/reload`, `/v1/models/tune`, `/v1/system/doctor`) need the admin bearer token; no
//!   token configured = refused. Stock mistral.rs leaves them open to anyone who can connect.
//! - Store operations (`/v1/kvcache/store...`: usage, removal by model, GC) need the same token.
//!   They and the sweeper (a GC every `[store] sweep_interval` when `max_bytes` or `ttl` bounds
//!   the store) use a backend of their own, on the server's runtime, never the engine's.
//! - Stop (Ctrl-C, SIGTERM): no new connections, in-flight requests finish, then the hook's
//!   saves in flight are waited for ([`KvPluginHook::drain`], bounded): a stopped server has
//!   written everything it will write.

pub mod prometheus;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use futures::StreamExt;
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use serde_json::Value;
use tower::ServiceExt;

use object_store::ObjectStore;

use crate::{
    config::PluginConfig,
    engine::{build_runner, EngineOptions, ModelSource, PagedOptions},
    hook::KvPluginHook,
    store::{
        admin::{self, GcPolicy},
        ObjectPrefixStore,
    },
};

/// How `kvplugin serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model.
    pub model: ModelSource,
    /// The name clients use in `model` (also `"default"`).
    pub served_model_name: String,
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    pub listen: SocketAddr,
    /// The plugin's configuration (`None`: run stock, without the plugin).
    pub plugin: Option<PluginConfig>,
    /// Sequences the engine runs at once.
    pub max_seqs: usize,
    /// Prefixes the engine's own prefix cache keeps.
    pub prefix_cache_n: usize,
    /// Turn the engine's own prefix cache off.
    pub no_prefix_cache: bool,
    /// Bearer token of the admin routes (`None`: admin routes refused).
    pub admin_token: Option<String>,
    /// How long a stop waits for saves in flight.
    pub drain_timeout: Duration,
    /// PagedAttention (the engine's block manager) with this pool; `None`: the non-paged path.
    pub paged: Option<PagedOptions>,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    stock: Router,
    hook: Option<Arc<KvPluginHook>>,
    store: Option<Arc<ObjectPrefixStore>>,
    store_kind: &'static str,
    model: String,
    admin_token: Option<Arc<str>>,
    started: Instant,
    store_admin: Option<Arc<StoreAdmin>>,
}

/// What the store operations and the sweeper work on.
struct StoreAdmin {
    backend: Arc<dyn ObjectStore>,
    namespace: String,
    policy: GcPolicy,
    deleted_objects: AtomicU64,
    deleted_bytes: AtomicU64,
}

impl StoreAdmin {
    async fn gc(&self, policy: &GcPolicy, dry_run: bool) -> crate::Result<(admin::GcPlan, usize)> {
        let (plan, deleted) =
            admin::gc(self.backend.as_ref(), &self.namespace, policy, dry_run).await?;
        self.count(&plan, deleted);
        Ok((plan, deleted))
    }

    async fn remove(&self, model: &str, dry_run: bool) -> crate::Result<(admin::GcPlan, usize)> {
        let (plan, deleted) =
            admin::remove(self.backend.as_ref(), &self.namespace, Some(model), dry_run).await?;
        self.count(&plan, deleted);
        Ok((plan, deleted))
    }

    fn count(&self, plan: &admin::GcPlan, deleted: usize) {
        if deleted > 0 {
            self.deleted_objects
                .fetch_add(deleted as u64, Ordering::Relaxed);
            self.deleted_bytes
                .fetch_add(plan.deleted_bytes, Ordering::Relaxed);
        }
    }
}

/// The store's kind, for labels: `s3`, `memory` or `local`.
pub fn store_kind(config: &PluginConfig) -> &'static str {
    let url = config.store.url.as_str();
    if url.starts_with("s3://") {
        "s3"
    } else if url == "memory://" {
        "memory"
    } else {
        "local"
    }
}

/// A model's default served name: its file stem or folder name.
pub fn default_model_name(model: &ModelSource) -> String {
    let name = match model {
        ModelSource::Gguf(path) => path.file_stem(),
        ModelSource::HfDir(path) => path.file_name(),
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string())
}

/// Loads the model, starts the engine and serves until Ctrl-C or SIGTERM. Prints
/// `kvplugin: listening on http://ADDR` on stdout once it accepts connections.
pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let plugin = match &options.plugin {
        Some(config) => {
            let store = Arc::new(config.build_store()?);
            let hook = Arc::new(KvPluginHook::new(store.clone(), config.hook_config()));
            Some((hook, store, store_kind(config)))
        }
        None => None,
    };
    let mut engine = EngineOptions::new(options.model.clone());
    engine.max_running = options.max_seqs;
    engine.prefix_cache = !options.no_prefix_cache;
    engine.prefix_cache_n = Some(options.prefix_cache_n);
    engine.model_id = Some(options.served_model_name.clone());
    engine.paged = options.paged;
    if let Some((hook, _, _)) = &plugin {
        engine = engine.with_kv_hook(hook.clone());
    }
    tracing::info!(model = %options.served_model_name, plugin = plugin.is_some(), "kvplugin: loading the model");
    let store_admin = match &options.plugin {
        Some(config) => Some(Arc::new(StoreAdmin {
            backend: config.open_backend()?,
            namespace: config.namespace.clone(),
            policy: config.gc_policy()?,
            deleted_objects: AtomicU64::new(0),
            deleted_bytes: AtomicU64::new(0),
        })),
        None => None,
    };
    let (runner, _tokenizer) = build_runner(engine).await?;
    let stock = MistralRsServerRouterBuilder::new()
        .with_mistralrs(runner.clone())
        .build()
        .await?;
    let state = AppState {
        stock,
        hook: plugin.as_ref().map(|(h, _, _)| h.clone()),
        store: plugin.as_ref().map(|(_, s, _)| s.clone()),
        store_kind: plugin.as_ref().map_or("none", |(_, _, k)| k),
        model: options.served_model_name.clone(),
        admin_token: options.admin_token.as_deref().map(Arc::from),
        started: Instant::now(),
        store_admin: store_admin.clone(),
    };
    let sweeper = match (
        &store_admin,
        options
            .plugin
            .as_ref()
            .and_then(PluginConfig::sweep_interval),
    ) {
        (Some(store_admin), Some(every)) => Some(tokio::spawn(sweep(store_admin.clone(), every))),
        _ => None,
    };
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let addr = listener.local_addr()?;
    println!("kvplugin: listening on http://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await?;
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    if let Some((hook, _, _)) = &plugin {
        eprintln!("kvplugin: stopping; waiting for saves in flight");
        if !hook.drain(options.drain_timeout).await {
            eprintln!(
                "kvplugin: saves still running after {:?}; stopping anyway",
                options.drain_timeout
            );
        }
        eprintln!(
            "kvplugin: {}",
            prometheus::summary(&hook.metrics().snapshot())
        );
    }
    drop(runner);
    Ok(())
}

/// The whole application: our routes, the stock ones behind them.
fn router(state: AppState) -> Router {
    let stock = state.stock.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/kvcache/stats", get(stats))
        .route("/v1/kvcache/store", get(store_usage))
        .route("/v1/kvcache/store/models/{model}", delete(store_remove))
        .route("/v1/kvcache/store/gc", post(store_gc))
        .route("/v1/chat/completions", post(with_cached_tokens))
        .route("/v1/completions", post(with_cached_tokens))
        .route("/re_isq", post(admin_passthrough))
        .route("/v1/models/unload", post(admin_passthrough))
        .route("/v1/models/reload", post(admin_passthrough))
        .route("/v1/models/tune", post(admin_passthrough))
        .route("/v1/system/doctor", post(admin_passthrough))
        .with_state(state)
        .fallback_service(stock)
}

/// Runs the GC every `every` with the configured policy (the first run after one interval).
async fn sweep(store_admin: Arc<StoreAdmin>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match store_admin.gc(&store_admin.policy, false).await {
            Ok((plan, deleted)) => tracing::info!(
                deleted,
                deleted_bytes = plan.deleted_bytes,
                kept_bytes = plan.kept_bytes,
                "kvplugin: store sweep"
            ),
            Err(e) => tracing::warn!(error = %e, "kvplugin: store sweep failed"),
        }
    }
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// An OpenAI-style error body.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "error": { "message": message.into(), "type": kind, "code": status.as_u16() }
    });
    (status, Json(body)).into_response()
}

/// Checks the `Authorization: Bearer` header against the configured admin token (compared in
/// constant time).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = &state.admin_token else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin routes are off: start the server with --admin-token (or KVPLUGIN_ADMIN_TOKEN)",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs the admin bearer token",
        )))
    }
}

async fn admin_passthrough(State(state): State<AppState>, request: Request) -> Response {
    if let Err(refused) = authorize(&state, request.headers()) {
        return *refused;
    }
    forward(&state, request).await
}

fn query_flag(query: &HashMap<String, String>, key: &str) -> bool {
    query.get(key).is_some_and(|v| v == "true" || v == "1")
}

/// The store operations' shared checks: the token, and a store to operate on.
fn store_admin(state: &AppState, headers: &HeaderMap) -> Result<Arc<StoreAdmin>, Box<Response>> {
    authorize(state, headers)?;
    state.store_admin.clone().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "no_store",
            "this server runs without the plugin (--no-plugin): it has no store",
        ))
    })
}

fn operation_result(result: crate::Result<(admin::GcPlan, usize)>, dry_run: bool) -> Response {
    match result {
        Ok((plan, deleted)) => Json(serde_json::json!({
            "dry_run": dry_run,
            "deleted": deleted,
            "plan": plan,
        }))
        .into_response(),
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            "store_operation_failed",
            e.to_string(),
        ),
    }
}

/// `GET /v1/kvcache/store`: what the store holds per model.
async fn store_usage(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let store_admin = match store_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    match admin::list(store_admin.backend.as_ref(), &store_admin.namespace).await {
        Ok(objects) => Json(admin::usage(&objects, std::time::SystemTime::now())).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, "store_unavailable", e.to_string()),
    }
}

/// `DELETE /v1/kvcache/store/models/{model}[?dry_run=true]`.
async fn store_remove(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath(model): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let store_admin = match store_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let dry_run = query_flag(&query, "dry_run");
    operation_result(store_admin.remove(&model, dry_run).await, dry_run)
}

/// `POST /v1/kvcache/store/gc[?dry_run=true&older_than=7d&max_bytes=10G&grace=10m]`: the
/// configured policy, with the query's overrides.
async fn store_gc(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let store_admin = match store_admin(&state, &headers) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let mut policy = store_admin.policy.clone();
    let overrides = (|| -> crate::Result<()> {
        if let Some(d) = query.get("older_than") {
            policy.older_than = Some(admin::parse_duration(d)?);
        }
        if let Some(b) = query.get("max_bytes") {
            policy.max_bytes = Some(admin::parse_bytes(b)?);
        }
        if let Some(g) = query.get("grace") {
            policy.grace = admin::parse_duration(g)?;
        }
        Ok(())
    })();
    if let Err(e) = overrides {
        return error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    }
    let dry_run = query_flag(&query, "dry_run");
    operation_result(store_admin.gc(&policy, dry_run).await, dry_run)
}

async fn forward(state: &AppState, request: Request) -> Response {
    match state.stock.clone().oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let snapshot = state.hook.as_ref().map(|h| h.metrics().snapshot());
    let text = prometheus::encode(&prometheus::Scrape {
        metrics: snapshot.as_ref(),
        store: state
            .store
            .as_ref()
            .map(|s| (state.store_kind, store_traffic(s))),
        uptime_s: state.started.elapsed().as_secs_f64(),
        gc_deleted: state.store_admin.as_ref().map(|a| {
            (
                a.deleted_objects.load(Ordering::Relaxed),
                a.deleted_bytes.load(Ordering::Relaxed),
            )
        }),
    });
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(prometheus::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

fn store_traffic(store: &ObjectPrefixStore) -> prometheus::StoreTraffic {
    let c = store.counters();
    prometheus::StoreTraffic {
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        bytes_written: c.bytes_written.load(Ordering::Relaxed),
        objects_refused: c.objects_refused.load(Ordering::Relaxed),
        objects_corrupt: c.objects_corrupt.load(Ordering::Relaxed),
        objects_repaired: c.objects_repaired.load(Ordering::Relaxed),
        breaker: store
            .breaker()
            .map(|b| (b.skipped(), b.opened(), b.is_open())),
    }
}

async fn stats(State(state): State<AppState>) -> Response {
    let metrics = state.hook.as_ref().map(|h| h.metrics().snapshot());
    let store = state.store.as_ref().map(|s| {
        let traffic = store_traffic(s);
        serde_json::json!({
            "kind": state.store_kind,
            "bytes_read": traffic.bytes_read,
            "bytes_written": traffic.bytes_written,
            "objects_refused": traffic.objects_refused,
            "objects_corrupt": traffic.objects_corrupt,
            "objects_repaired": traffic.objects_repaired,
            "compression_ratio": s.counters().compression_ratio(),
        })
    });
    Json(serde_json::json!({
        "model": state.model,
        "plugin": state.hook.is_some(),
        "model_fingerprint": state.hook.as_ref().and_then(|h| h.model_fingerprint()).map(|f| f.to_string()),
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "metrics": metrics,
        "store": store,
    }))
    .into_response()
}

/// Stock chat and completion handling, plus `usage.prompt_tokens_details.cached_tokens`.
async fn with_cached_tokens(State(state): State<AppState>, request: Request) -> Response {
    let response = forward(&state, request).await;
    let Some(hook) = state.hook.clone() else {
        return response;
    };
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (mut parts, body) = response.into_parts();
    if content_type.starts_with("text/event-stream") {
        let events = SseEvents::new(body, move |event| add_cached_tokens(&hook, event));
        return Response::from_parts(parts, Body::from_stream(events.into_stream()));
    }
    if !content_type.starts_with("application/json") {
        return Response::from_parts(parts, body);
    }
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                format!("reading the engine's answer: {e}"),
            )
        }
    };
    let bytes = match serde_json::from_slice::<Value>(&bytes) {
        Ok(mut value) => {
            if add_cached_tokens(&hook, &mut value) {
                Bytes::from(serde_json::to_vec(&value).expect("a parsed value serializes"))
            } else {
                bytes
            }
        }
        Err(_) => bytes,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

/// Adds `usage.prompt_tokens_details.cached_tokens` to a response object with `usage` and an
/// `id` the hook has a record for; `true` if it changed `value`.
fn add_cached_tokens(hook: &KvPluginHook, value: &mut Value) -> bool {
    let Some(seq_id) = value
        .get("id")
        .and_then(Value::as_str)
        .and_then(|id| id.parse::<usize>().ok())
    else {
        return false;
    };
    let Some(usage) = value.get_mut("usage").and_then(Value::as_object_mut) else {
        return false;
    };
    let Some(cached) = hook.take_reused_tokens(seq_id) else {
        return false;
    };
    usage.insert(
        "prompt_tokens_details".into(),
        serde_json::json!({ "cached_tokens": cached }),
    );
    true
}

/// Rewrites the JSON `data:` events of a server-sent-event body one whole event at a time
/// (events end with a blank line; a chunk of the body may hold part of one, or several).
struct SseEvents<F> {
    body: axum::body::BodyDataStream,
    buffer: Vec<u8>,
    rewrite: F,
    ended: bool,
}

impl<F: FnMut(&mut Value) -> bool + Send + 'static> SseEvents<F> {
    fn new(body: Body, rewrite: F) -> Self {
        Self {
            body: body.into_data_stream(),
            buffer: Vec::new(),
            rewrite,
            ended: false,
        }
    }

    /// Complete events in the buffer, rewritten; what follows the last one stays buffered.
    fn take_events(&mut self) -> Vec<u8> {
        let Some(end) = self.buffer.windows(2).rposition(|w| w == b"\n\n") else {
            return Vec::new();
        };
        let rest = self.buffer.split_off(end + 2);
        let complete = std::mem::replace(&mut self.buffer, rest);
        let mut out = Vec::with_capacity(complete.len() + 64);
        for event in complete.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(&self.rewrite_line(event));
        }
        out
    }

    fn rewrite_line(&mut self, line: &[u8]) -> Vec<u8> {
        let Some(data) = line.strip_prefix(b"data: ") else {
            return line.to_vec();
        };
        let json = data.strip_suffix(b"\n").unwrap_or(data);
        let Ok(mut value) = serde_json::from_slice::<Value>(json) else {
            return line.to_vec();
        };
        if !(self.rewrite)(&mut value) {
            return line.to_vec();
        }
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&serde_json::to_vec(&value).expect("serializes"));
        out.push(b'\n');
        out
    }

    fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, axum::Error>> + Send {
        futures::stream::unfold(self, |mut this| async move {
            loop {
                if this.ended {
                    return None;
                }
                match this.body.next().await {
                    Some(Ok(bytes)) => {
                        this.buffer.extend_from_slice(&bytes);
                        let out = this.take_events();
                        if !out.is_empty() {
                            return Some((Ok(Bytes::from(out)), this));
                        }
                    }
                    Some(Err(e)) => {
                        this.ended = true;
                        return Some((Err(e), this));
                    }
                    None => {
                        this.ended = true;
                        let rest = std::mem::take(&mut this.buffer);
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((Ok(Bytes::from(rest)), this));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(parts: &[&str]) -> String {
        let chunks: Vec<Result<Bytes, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::from(p.to_string())))
            .collect();
        let body = Body::from_stream(futures::stream::iter(chunks));
        let events = SseEvents::new(body, |v: &mut Value| {
            if v.get("usage").is_some() {
                v["usage"]["seen"] = Value::from(true);
                true
            } else {
                false
            }
        });
        let out: Vec<Bytes> = futures::executor::block_on(
            events.into_stream().map(|r| r.unwrap()).collect::<Vec<_>>(),
        );
        String::from_utf8(out.concat()).unwrap()
    }

    #[test]
    fn sse_rewrites_whole_events_however_the_body_is_split() {
        let whole = "data: {\"id\":\"1\"}\n\n: keep-alive\n\ndata: {\"id\":\"1\",\"usage\":{\"prompt_tokens\":3}}\n\ndata: [DONE]\n\n";
        let expected = "data: {\"id\":\"1\"}\n\n: keep-alive\n\ndata: {\"id\":\"1\",\"usage\":{\"prompt_tokens\":3,\"seen\":true}}\n\ndata: [DONE]\n\n";
        assert_eq!(rewrite(&[whole]), expected);
        // Split at every byte: the same events come out.
        let bytes: Vec<String> = whole.chars().map(|c| c.to_string()).collect();
        let parts: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(rewrite(&parts), expected);
        // A body that ends without the blank line is passed on as it is.
        assert_eq!(rewrite(&["data: {\"usage\":{}}"]), "data: {\"usage\":{}}");
    }

    #[tokio::test]
    async fn the_sweeper_enforces_the_store_bound_every_interval_and_counts_it() {
        use crate::{codec::Level, store::layout::ObjectName};
        use object_store::{memory::InMemory, path::Path};

        let backend: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let model = format!("{:032x}", 7);
        let hash = |n: u32| format!("{n:032x}");
        let chain = [
            ObjectName::Chunk {
                index: 0,
                parent: hash(0),
                hash: hash(1),
                level: Level::High,
            },
            ObjectName::Tail {
                index: 1,
                parent: hash(1),
                level: Level::Lossless,
            },
        ];
        for name in &chain {
            backend
                .put(
                    &Path::from(format!(
                        "kv/{}/{model}/{name}",
                        crate::store::layout::LAYOUT_VERSION
                    )),
                    vec![0u8; 100].into(),
                )
                .await
                .unwrap();
        }
        let store_admin = Arc::new(StoreAdmin {
            backend: backend.clone(),
            namespace: "kv".into(),
            // A bound the store is over: everything goes once the sweeper runs.
            policy: GcPolicy {
                older_than: None,
                max_bytes: Some(0),
                grace: Duration::ZERO,
            },
            deleted_objects: AtomicU64::new(0),
            deleted_bytes: AtomicU64::new(0),
        });
        let sweeper = tokio::spawn(sweep(store_admin.clone(), Duration::from_millis(50)));
        let mut left = usize::MAX;
        for _ in 0..200 {
            left = admin::list(backend.as_ref(), "kv").await.unwrap().len();
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sweeper.abort();
        assert_eq!(left, 0, "the sweeper deleted the chain");
        assert_eq!(store_admin.deleted_objects.load(Ordering::Relaxed), 2);
        assert_eq!(store_admin.deleted_bytes.load(Ordering::Relaxed), 200);
    }

    #[test]
    fn default_model_names_come_from_the_path() {
        assert_eq!(
            default_model_name(&ModelSource::Gguf("/m/SmolLM2.Q4_1.gguf".into())),
            "SmolLM2.Q4_1"
        );
        assert_eq!(
            default_model_name(&ModelSource::HfDir("/m/SmolLM2-f32/".into())),
            "SmolLM2-f32"
        );
    }
}
