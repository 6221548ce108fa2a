//! `kvplugin bench faults`: the real engine and model through a fault matrix, per store.
//!
//! The question each row answers: with this failure in the store (or in the request), does every
//! request still get stock mistral.rs's answer, in time? A miss is allowed; a wrong answer, a
//! lost request (no answer, or an error where stock answers) or a stuck engine never is.
//!
//! Method:
//! 1. A stock engine (no hook) answers `--requests` prompts (a `--context`-token document behind a
//!    line naming the prompt, and a question): the reference answers, and the full prefill's TTFT.
//!    It also answers the two bad prompts (empty, longer than the model's context): the reference
//!    outcome of those (stock refuses both).
//! 2. A capture engine (a hook over an in-memory capture) computes each prompt's cache once.
//! 3. Per store and fault: a fresh namespace; the captured caches saved into it (where the fault
//!    needs objects); the fault applied; a fresh reader engine (hook over the store, the engine's
//!    own prefix cache off, so every prompt asks the store) answers every prompt, each within a
//!    deadline (three full prefills, the load timeout and a minute): past it, the request counts
//!    as lost. Its namespace is deleted afterwards.
//!
//! Faults in the store's behaviour are made by a [`FaultyStore`] between the backend and the
//! plugin (the client's side of the wire), except where the real thing can be had: for an S3
//! store, "server down" is a closed port, "never answers" a listener that accepts and never
//! replies, "wrong credentials" a wrong secret, "missing bucket" a bucket that does not exist.
//! Faults in the objects are written into the real store. The report's `how` says which.
//!
//! Invariant: every row's `wrong_answers` and `lost_requests` are 0, or the plugin has a bug.

use std::{
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use mistralrs_core::KvPrefix;
use object_store::{path::Path, ObjectStore};
use serde::Serialize;

use super::{percentile, Say};
use crate::{
    cli::QUESTION_1,
    codec::{self, Level},
    config::PluginConfig,
    corpus,
    engine::{chat_prompt, EngineOptions, LocalEngine, ModelSource},
    fingerprint::ModelFingerprint,
    hook::{HookConfig, KvPluginHook},
    model,
    store::{
        faulty::{Fault, FaultSwitch, FaultyStore},
        seal, ObjectPrefixStore, PrefixStore, SaveOutcome, StoreError, StoreKey,
    },
};

/// Arguments of `kvplugin bench faults`.
#[derive(Debug, Args)]
pub struct FaultsBenchArgs {
    /// A store: a folder, `file:///path`, `s3://bucket` (endpoint and credentials from the
    /// environment, as `kvplugin serve` reads them) or a kvplugin config file (`.toml`, its
    /// `[store]`). Repeat to run the matrix on several stores.
    #[arg(long, default_value = ".kvplugin/bench-faults")]
    pub store: Vec<String>,
    /// Document tokens per prompt.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Prompts (distinct documents) per fault.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    /// Tokens generated per answer (compared with stock's).
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// The hook's load timeout, in milliseconds (the TTFT a failing store may add at most).
    #[arg(long, default_value_t = 2000)]
    pub load_timeout_ms: u64,
    /// Only these faults (comma-separated names; default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A store of the matrix: its name in the report and its configuration.
#[derive(Debug, Clone)]
pub struct StoreUnderTest {
    /// The name in the report (`local`, `s3s-fs`, `garage`, or the URL given).
    pub name: String,
    /// Its configuration (`[store]`, chunk size, key).
    pub config: PluginConfig,
}

/// Every fault of the matrix, in the report's order.
pub const FAULTS: [&str; 18] = [
    "server_down",
    "never_answers",
    "slow",
    "load_timeout",
    "corrupt_object",
    "truncated_object",
    "hostile_header",
    "deleted_after_lookup",
    "wrong_fingerprint",
    "unknown_format_version",
    "two_writers",
    "writer_killed",
    "disk_full",
    "wrong_credentials",
    "missing_bucket",
    "planted_without_key",
    "empty_prompt",
    "prompt_longer_than_context",
];

/// The matrix's results.
#[derive(Debug, Serialize)]
pub struct FaultReport {
    /// The model the engines ran.
    pub model: String,
    /// Document tokens per prompt.
    pub context_tokens: usize,
    /// One row per store and fault.
    pub faults: Vec<FaultRow>,
}

/// One fault on one store.
#[derive(Debug, Serialize)]
pub struct FaultRow {
    /// The fault.
    pub name: String,
    /// The store.
    pub store: String,
    /// How the fault was made: `real` (the failure itself), `injected` (a [`FaultyStore`]),
    /// `objects` (bytes written into the real store) or `request` (the prompt itself).
    pub how: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered (a completion, or the same refusal stock gives).
    pub answered: usize,
    /// Answers that differ from stock's.
    pub wrong_answers: usize,
    /// Requests with no answer by the deadline, or an error where stock answered.
    pub lost_requests: usize,
    /// Store hits among the requests (a fault may leave some).
    pub store_hits: u64,
    /// 99th percentile TTFT of the answered requests (nearest rank), seconds.
    pub ttft_p99_s: f64,
    /// Stock's full prefill TTFT (median), seconds.
    pub full_prefill_s: f64,
}

/// What a request got: tokens, or an error response (stock refuses an empty prompt and one
/// longer than the model's context with a validation error).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    Answer(Vec<Option<u32>>),
    Refused(String),
}

/// Keeps every cache the capture engine's hook offers.
#[derive(Default)]
struct Capture(Mutex<Vec<(ModelFingerprint, KvPrefix)>>);

#[async_trait]
impl PrefixStore for Capture {
    fn chunk_tokens(&self) -> Option<usize> {
        None
    }

    async fn save(
        &self,
        model: &ModelFingerprint,
        prefix: KvPrefix,
    ) -> Result<SaveOutcome, StoreError> {
        self.0.lock().expect("capture").push((*model, prefix));
        Ok(SaveOutcome::Written { bytes: 0 })
    }

    async fn load(
        &self,
        _model: &ModelFingerprint,
        _prompt: &[u32],
        _min_tokens: usize,
    ) -> Result<Option<KvPrefix>, StoreError> {
        Ok(None)
    }
}

/// Runs `kvplugin bench faults`.
pub fn run(args: FaultsBenchArgs) -> anyhow::Result<()> {
    let stores = args
        .store
        .iter()
        .map(|spec| store_from_spec(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = tokio::runtime::Runtime::new()?.block_on(run_matrix(&args, stores))?;
    report.print_and_check(args.json.as_deref())
}

impl FaultReport {
    /// Prints the table, writes the JSON to `json`, and fails if any row has a wrong answer or
    /// a lost request.
    pub fn print_and_check(&self, json: Option<&std::path::Path>) -> anyhow::Result<()> {
        print_table(self);
        if let Some(path) = json {
            std::fs::write(path, serde_json::to_vec_pretty(self)?)?;
        }
        let bad: usize = self
            .faults
            .iter()
            .map(|r| r.wrong_answers + r.lost_requests)
            .sum();
        if bad > 0 {
            anyhow::bail!("{bad} wrong answers or lost requests in the fault matrix");
        }
        Ok(())
    }
}

/// A store from `--store`: a config file, or a URL with the environment's settings.
pub(crate) fn store_from_spec(spec: &str) -> anyhow::Result<StoreUnderTest> {
    let config = if spec.ends_with(".toml") {
        PluginConfig::load(std::path::Path::new(spec))?
    } else {
        let mut config = PluginConfig::default();
        config.store.url = spec.to_string();
        config.apply_env(|k| std::env::var(k).ok())?;
        config
    };
    Ok(StoreUnderTest {
        name: spec.to_string(),
        config,
    })
}

/// Runs the matrix on `stores` (the caller prints or checks the report).
pub async fn run_matrix(
    args: &FaultsBenchArgs,
    stores: Vec<StoreUnderTest>,
) -> anyhow::Result<FaultReport> {
    if args.requests == 0 || stores.is_empty() {
        anyhow::bail!("--requests and --store must not be empty");
    }
    let faults: Vec<&str> = if args.only.is_empty() {
        FAULTS.to_vec()
    } else {
        for name in &args.only {
            if !FAULTS.contains(&name.as_str()) {
                anyhow::bail!("unknown fault `{name}`; the faults: {}", FAULTS.join(", "));
            }
        }
        FAULTS
            .into_iter()
            .filter(|f| args.only.iter().any(|o| o.as_str() == *f))
            .collect()
    };
    let source = ModelSource::HfDir(model::smollm2_hf(&model::models_dir()));
    let options = || EngineOptions {
        prefix_cache: false,
        ..EngineOptions::new(source.clone())
    };
    let text = corpus::text_or_default(args.text.as_deref())?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let bar = super::progress_bar(
        (2 + stores.len() * faults.len()) as u64,
        "bench faults (rows)",
    );

    bar.say("== stock engine: reference answers and full prefill");
    let stock = LocalEngine::start(options()).await?;
    let document = stock.truncate_to_tokens(&text, args.context)?;
    let mut prompts = Vec::new();
    for i in 0..args.requests {
        let system = format!(
            "Fault matrix run {stamp}, document {i}. Answer questions about this document.\n\n{document}"
        );
        prompts.push(stock.encode(&chat_prompt(&system, QUESTION_1))?);
    }
    let deadline_for = |full: Duration| {
        3 * full + Duration::from_millis(args.load_timeout_ms) + Duration::from_secs(60)
    };
    let mut references = Vec::new();
    let mut full_prefill = Vec::new();
    for prompt in &prompts {
        let answer = stock.complete(prompt, args.max_new_tokens).await?;
        full_prefill.push(answer.ttft.as_secs_f64());
        references.push(Outcome::Answer(answer.token_ids));
    }
    let full_prefill_s = super::median(&full_prefill);
    let deadline = deadline_for(Duration::from_secs_f64(full_prefill_s));
    // The bad prompts: empty, and longer than the model's context (its tokens repeated).
    let too_long: Vec<u32> = prompts[0]
        .iter()
        .copied()
        .cycle()
        .take(context_tokens(&model::smollm2_hf(&model::models_dir()))? + 64)
        .collect();
    let bad_prompts = [Vec::new(), too_long];
    let mut bad_references = Vec::new();
    for prompt in &bad_prompts {
        bad_references.push(
            outcome_within(&stock, prompt, args.max_new_tokens, deadline)
                .await
                .map(|(outcome, _)| outcome)
                .map_err(|lost| anyhow::anyhow!("stock lost a bad prompt: {lost}"))?,
        );
        if let Some(Outcome::Answer(_)) = bad_references.last() {
            // Stock answered it: it is then a request like any other, still compared.
            bar.note(format!("stock answered a {}-token prompt", prompt.len()));
        }
    }
    drop(stock);
    bar.inc(1);

    bar.say("== capture engine: each prompt's cache, computed once");
    let capture = Arc::new(Capture::default());
    let hook = Arc::new(KvPluginHook::new(capture.clone(), HookConfig::default()));
    let engine = LocalEngine::start(options().with_kv_hook(hook.clone())).await?;
    for (i, prompt) in prompts.iter().enumerate() {
        engine.complete(prompt, args.max_new_tokens).await?;
        hook.wait_for_saves(i as u64 + 1, Duration::from_secs(300))
            .await?;
    }
    drop(engine);
    let caches = std::mem::take(&mut *capture.0.lock().expect("capture"));
    let model = caches
        .first()
        .map(|(m, _)| *m)
        .ok_or_else(|| anyhow::anyhow!("the capture engine saved no cache"))?;
    let caches: Vec<KvPrefix> = caches.into_iter().map(|(_, p)| p).collect();
    bar.inc(1);

    let mut rows = Vec::new();
    for store in &stores {
        for (f, &fault) in faults.iter().enumerate() {
            bar.say(format!("== {} on {}", fault, store.name));
            let case = Case {
                args,
                store,
                // Short: s3s-fs makes temporary file names from whole keys, and object names
                // are 80 bytes already.
                namespace: format!("kvf{}-{f}", stamp % 1_000_000_000),
                model,
                caches: &caches,
            };
            let (how, reader) = case.prepare(fault).await?;
            let (requests, references): (Vec<&[u32]>, Vec<&Outcome>) = match fault {
                "empty_prompt" => (vec![&bad_prompts[0][..]], vec![&bad_references[0]]),
                "prompt_longer_than_context" => {
                    (vec![&bad_prompts[1][..]], vec![&bad_references[1]])
                }
                _ => (
                    prompts.iter().map(|p| &p[..]).collect(),
                    references.iter().collect(),
                ),
            };
            let row = case
                .read(fault, how, reader, &requests, &references, deadline)
                .await?;
            bar.say(format!(
                "   {}/{} answered, {} wrong, {} lost, {} store hits, TTFT p99 {:.2} s (full prefill {:.2} s)",
                row.answered,
                row.requests,
                row.wrong_answers,
                row.lost_requests,
                row.store_hits,
                row.ttft_p99_s,
                full_prefill_s
            ));
            rows.push(FaultRow {
                full_prefill_s,
                ..row
            });
            case.clean_up().await;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(FaultReport {
        model: "SmolLM2-135M-Instruct (F32, CPU)".into(),
        context_tokens: prompts[0].len(),
        faults: rows,
    })
}

/// A request's outcome and TTFT (an error response's: the time it took), or, past `deadline`,
/// why it was lost.
pub(crate) async fn outcome_within(
    engine: &LocalEngine,
    prompt: &[u32],
    max_new_tokens: usize,
    deadline: Duration,
) -> Result<(Outcome, Duration), String> {
    let started = Instant::now();
    match tokio::time::timeout(deadline, engine.complete(prompt, max_new_tokens)).await {
        Err(_) => Err(format!("no answer in {deadline:?}")),
        Ok(Ok(answer)) => Ok((Outcome::Answer(answer.token_ids), answer.ttft)),
        Ok(Err(e)) => Ok((Outcome::Refused(e.to_string()), started.elapsed())),
    }
}

/// The engine's context length (`max_position_embeddings` of the model's config).
fn context_tokens(model_dir: &std::path::Path) -> anyhow::Result<usize> {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("config.json"))?)?;
    config["max_position_embeddings"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| anyhow::anyhow!("the model's config.json has no max_position_embeddings"))
}

/// A store that answers nothing on 127.0.0.1: connections are accepted and held, never read.
fn silent_listener() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    Ok(endpoint)
}

/// A port nothing listens on.
fn closed_port() -> anyhow::Result<String> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(format!("http://127.0.0.1:{port}"))
}

/// One fault on one store.
struct Case<'a> {
    args: &'a FaultsBenchArgs,
    store: &'a StoreUnderTest,
    namespace: String,
    model: ModelFingerprint,
    caches: &'a [KvPrefix],
}

impl Case<'_> {
    fn config(&self) -> PluginConfig {
        let mut config = self.store.config.clone();
        config.namespace = self.namespace.clone();
        config
    }

    fn is_s3(&self) -> bool {
        self.store.config.store.url.starts_with("s3://")
    }

    /// The fault's store, with a switch in front of its backend.
    fn store_with_switch(
        &self,
        config: &PluginConfig,
    ) -> anyhow::Result<(ObjectPrefixStore, FaultSwitch)> {
        let switch = FaultSwitch::default();
        let inner = switch.clone();
        let store = config.build_store_over(move |backend| {
            Arc::new(FaultyStore::new(backend, inner)) as Arc<dyn ObjectStore>
        })?;
        Ok((store, switch))
    }

    /// Saves every captured cache into `store`.
    async fn populate(&self, store: &ObjectPrefixStore) -> anyhow::Result<()> {
        for cache in self.caches {
            store.save(&self.model, cache.clone()).await?;
        }
        Ok(())
    }

    /// Makes the fault; returns how, and the store the reader engine's hook uses.
    async fn prepare(&self, fault: &str) -> anyhow::Result<(&'static str, ObjectPrefixStore)> {
        let config = self.config();
        let (store, switch) = self.store_with_switch(&config)?;
        let timeout = Duration::from_millis(self.args.load_timeout_ms);
        // The faults a `FaultyStore` makes once the store holds the caches (on S3, the first
        // four are made for real below instead).
        let injected = match fault {
            "server_down" => Some(Fault::Down),
            "never_answers" => Some(Fault::Hang),
            "wrong_credentials" => Some(Fault::Denied),
            "slow" => Some(Fault::SlowReads(timeout / 10)),
            "load_timeout" => Some(Fault::SlowReads(timeout + Duration::from_secs(1))),
            "deleted_after_lookup" => Some(Fault::Vanished),
            _ => None,
        };
        Ok(match fault {
            "server_down" | "never_answers" | "wrong_credentials" | "missing_bucket"
                if self.is_s3() =>
            {
                self.populate(&store).await?;
                let mut broken = config.clone();
                match fault {
                    "server_down" => broken.store.endpoint = Some(closed_port()?),
                    "never_answers" => broken.store.endpoint = Some(silent_listener()?),
                    "wrong_credentials" => {
                        broken.store.secret_access_key = Some("not-the-secret-key".into())
                    }
                    _ => {
                        broken.store.url =
                            format!("s3://kvplugin-no-such-bucket-{}", std::process::id())
                    }
                }
                ("real", broken.build_store()?)
            }
            _ if injected.is_some() => {
                self.populate(&store).await?;
                switch.set(injected.expect("matched"));
                ("injected", store)
            }
            "missing_bucket" => {
                // A local store's folder removed after the lookups began: reads find nothing.
                self.populate(&store).await?;
                self.delete_namespace().await;
                ("real", store)
            }
            "disk_full" => {
                // Nothing stored: the reader's own saves hit the full disk.
                switch.set(Fault::Full);
                ("injected", store)
            }
            "corrupt_object"
            | "truncated_object"
            | "hostile_header"
            | "wrong_fingerprint"
            | "unknown_format_version" => {
                self.populate(&store).await?;
                let key = config.key()?;
                let model = self.model;
                self.rewrite_second_chunks(|object| hostile(fault, object, key.as_deref(), &model))
                    .await?;
                ("objects", store)
            }
            "planted_without_key" => {
                // The deployment has a key; a writer without it plants objects at its names.
                let mut keyed = config.clone();
                if keyed.key()?.is_none() {
                    keyed.store_key = Some(Arc::new(StoreKey::from_secret(
                        b"kvplugin bench faults: the deployment's secret",
                    )?));
                }
                let store = keyed.build_store()?;
                self.populate(&store).await?;
                self.rewrite_second_chunks(plant_without_key).await?;
                ("objects", store)
            }
            "two_writers" => {
                // Two processes save the same prompts at once. A writer may lose the race with
                // an error (s3s-fs resets one of two conditional PUTs of a key): a failed save,
                // which the hook counts; what the reader then finds is the question.
                let (a, b) = (config.build_store()?, config.build_store()?);
                let (ra, rb) = futures::join!(self.populate(&a), self.populate(&b));
                for e in [ra.err(), rb.err()].into_iter().flatten() {
                    tracing::info!(error = %e, "kvplugin: one of two writers failed to save");
                }
                ("real", store)
            }
            "writer_killed" => {
                // A writer process dies mid-save: its task is dropped part-way through.
                for cache in self.caches {
                    let save = store.save(&self.model, cache.clone());
                    let _ = tokio::time::timeout(Duration::from_millis(30), save).await;
                }
                ("real", store)
            }
            "empty_prompt" | "prompt_longer_than_context" => {
                self.populate(&store).await?;
                ("request", store)
            }
            other => anyhow::bail!("no such fault `{other}`"),
        })
    }

    /// A reader engine over `store` answers each request; the row of the report.
    async fn read(
        &self,
        fault: &str,
        how: &str,
        store: ObjectPrefixStore,
        requests: &[&[u32]],
        references: &[&Outcome],
        deadline: Duration,
    ) -> anyhow::Result<FaultRow> {
        let hook = Arc::new(KvPluginHook::new(
            Arc::new(store),
            HookConfig {
                load_timeout: Duration::from_millis(self.args.load_timeout_ms),
                ..self.config().hook_config()
            },
        ));
        let source = ModelSource::HfDir(model::smollm2_hf(&model::models_dir()));
        let engine = LocalEngine::start(EngineOptions {
            prefix_cache: false,
            ..EngineOptions::new(source).with_kv_hook(hook.clone())
        })
        .await?;
        let (mut answered, mut wrong, mut lost, mut ttfts) = (0, 0, 0, Vec::new());
        for (prompt, reference) in requests.iter().zip(references) {
            let outcome = outcome_within(&engine, prompt, self.args.max_new_tokens, deadline).await;
            match (outcome, reference) {
                // An error where stock answers is a lost request.
                (Ok((Outcome::Refused(why), _)), Outcome::Answer(_)) | (Err(why), _) => {
                    tracing::warn!(fault, store = %self.store.name, %why, "kvplugin: a lost request");
                    lost += 1;
                }
                (Ok((outcome, ttft)), reference) => {
                    answered += 1;
                    ttfts.push(ttft.as_secs_f64());
                    // Stock's refusal is matched by any refusal (the wording may differ).
                    let same = match (&outcome, reference) {
                        (Outcome::Refused(_), Outcome::Refused(_)) => true,
                        (a, b) => a == *b,
                    };
                    if !same {
                        wrong += 1;
                    }
                }
            }
        }
        let hits = hook.metrics().snapshot().hits;
        drop(engine);
        Ok(FaultRow {
            name: fault.into(),
            store: self.store.name.clone(),
            how: how.into(),
            requests: requests.len(),
            answered,
            wrong_answers: wrong,
            lost_requests: lost,
            store_hits: hits,
            ttft_p99_s: if ttfts.is_empty() {
                f64::NAN
            } else {
                percentile(&ttfts, 0.99)
            },
            full_prefill_s: 0.0,
        })
    }

    /// Replaces every chain's second chunk object (`c-1-...`) with `rewrite`'s bytes, written
    /// into the real store: the first chunk of each prompt stays good, so a hit that stops at
    /// the bad one keeps it.
    async fn rewrite_second_chunks(
        &self,
        rewrite: impl Fn(&[u8]) -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<()> {
        let backend = self.config().open_backend()?;
        let mut done = 0;
        for path in list(&*backend, &self.namespace).await? {
            if !path.filename().is_some_and(|f| f.starts_with("c-1-")) {
                continue;
            }
            let object = backend.get(&path).await?.bytes().await?;
            backend
                .put(&path, Bytes::from(rewrite(&object)?).into())
                .await?;
            done += 1;
        }
        if done == 0 {
            anyhow::bail!("no second chunk to damage: make --context longer than two chunks");
        }
        Ok(())
    }

    async fn delete_namespace(&self) {
        if let Ok(backend) = self.store.config.open_backend() {
            delete_under(&*backend, &self.namespace).await;
        }
    }

    async fn clean_up(&self) {
        self.delete_namespace().await;
    }
}

/// Deletes every object under `namespace` (what a benchmark wrote), as far as it can.
pub(crate) async fn delete_under(backend: &dyn ObjectStore, namespace: &str) {
    if let Ok(paths) = list(backend, namespace).await {
        for path in paths {
            let _ = backend.delete(&path).await;
        }
    }
}

async fn list(backend: &dyn ObjectStore, namespace: &str) -> anyhow::Result<Vec<Path>> {
    Ok(backend
        .list(Some(&Path::from(namespace)))
        .map_ok(|m| m.location)
        .try_collect()
        .await?)
}

/// A damaged copy of `object` (a chunk of `model`'s, sealed with `key`), as the fault says. The
/// hostile ones are sealed as a writer holding the key would seal them: the plugin's defences
/// behind the seal are what they test.
fn hostile(
    fault: &str,
    object: &[u8],
    key: Option<&StoreKey>,
    model: &ModelFingerprint,
) -> anyhow::Result<Vec<u8>> {
    let mut bad = object.to_vec();
    let (binding, _) = seal::claimed_binding(object)?;
    // The clear token ids and chunk, for the faults that seal new contents.
    let opened = || seal::open(object, binding, key);
    match fault {
        "corrupt_object" => {
            let middle = bad.len() / 2;
            bad[middle] ^= 0x40;
        }
        "truncated_object" => bad.truncate(bad.len() / 2),
        "unknown_format_version" => {
            bad[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
        }
        "hostile_header" => {
            // The codec header claims a shape of 65535 layers x 65535 heads x 65535 channels,
            // its checksum fixed so that only the shape checks stand in the way.
            let (tokens, chunk) = opened()?;
            let mut chunk = chunk.into_owned();
            for field in [8, 10, 12] {
                chunk[field..field + 2].copy_from_slice(&u16::MAX.to_le_bytes());
            }
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&chunk[..60]);
            h.update(&chunk[68..]);
            chunk[60..68].copy_from_slice(&h.digest().to_le_bytes());
            bad = seal::seal(binding, &tokens, &chunk, key)?;
        }
        "wrong_fingerprint" => {
            // Another model's cache under this model's name.
            let (tokens, chunk) = opened()?;
            let decoded = codec::decode(&chunk, model.as_bytes())?;
            let other = codec::encode(&decoded, Level::Lossless, &[0xAB; 32])?;
            bad = seal::seal(binding, &tokens, &other, key)?;
        }
        other => anyhow::bail!("no object fault `{other}`"),
    }
    Ok(bad)
}

/// What a writer without the deployment's key can plant at a keyed object's name: the same
/// binding, made-up token ids and other values, a valid checksum seal.
fn plant_without_key(object: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (binding, n) = seal::claimed_binding(object)?;
    Ok(seal::seal(binding, &vec![0; n], b"planted", None)?)
}

fn print_table(report: &FaultReport) {
    println!(
        "\nFault matrix: SmolLM2-135M F32 on this machine, {}-token prompts",
        report.context_tokens
    );
    println!("| fault | store | how | requests | answered | wrong | lost | store hits | TTFT p99 s | full prefill s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &report.faults {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
            r.name,
            r.store,
            r.how,
            r.requests,
            r.answered,
            r.wrong_answers,
            r.lost_requests,
            r.store_hits,
            r.ttft_p99_s,
            r.full_prefill_s
        );
    }
}
