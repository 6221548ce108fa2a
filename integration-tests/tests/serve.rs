//! `kvplugin serve` as users run it: real server processes on 127.0.0.1, the official `openai`
//! Python client (pinned, installed by `scripts/setup.sh --tests`), a real Garage bucket.
//!
//! Answers are greedy and the level lossless, so the plugin's answers must equal the stock
//! server's (`--no-plugin`) token for token; assertions are on answers and counters, never on
//! timings.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use integration_tests::{hf_dir, kvplugin_bin, s3::S3Server};
use mistralrs_kvplugin::{corpus, server::prometheus::sample};
use serde_json::{json, Value};

const QUESTION_1: &str = "Who may copy this license?";
const QUESTION_2: &str = "What does the license say about patents?";
const SEPARATOR: &str = "[[KVBLEND]]";

/// The Python of the virtual environment setup made, and the driver script.
fn python() -> (PathBuf, PathBuf) {
    let venv_python = integration_tests::s3::tools_bin()
        .parent()
        .expect("tools folder")
        .join("venv/bin/python");
    assert!(
        venv_python.is_file(),
        "{} is missing: run `make setup-tests` (it installs the openai client)",
        venv_python.display()
    );
    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/openai_driver.py");
    (venv_python, driver)
}

/// A `kvplugin serve` process; killed when dropped, [`Server::stop`] stops it as Ctrl-C does.
struct Server {
    child: Option<Child>,
    url: String,
    log: PathBuf,
}

impl Server {
    /// Starts a server (`config: None` = `--no-plugin`) and waits until it listens.
    fn start(dir: &Path, name: &str, config: Option<&Path>, admin_token: Option<&str>) -> Self {
        hf_dir();
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(kvplugin_bin());
        cmd.args(["serve", "--model"])
            .arg(hf_dir())
            .args(["--port", "0", "--max-seqs", "4"]);
        match config {
            Some(path) => cmd.arg("--config").arg(path),
            None => cmd.arg("--no-plugin"),
        };
        if let Some(token) = admin_token {
            cmd.args(["--admin-token", token]);
        }
        let mut child = cmd
            .env_remove("KVPLUGIN_ADMIN_TOKEN")
            .env_remove("KVPLUGIN_STORE_URL")
            .env_remove("KVPLUGIN_LEVEL")
            .env("RUST_LOG", "warn,mistralrs_kvplugin=info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start kvplugin serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("kvplugin: listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let mut server = Self {
            child: Some(child),
            url: String::new(),
            log,
        };
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(url) => server.url = url,
            Err(_) => panic!("`kvplugin serve` did not start: {}", server.log_text()),
        }
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGTERM (as Ctrl-C) and checks that it exited cleanly; returns its log.
    fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let status = child.wait().expect("wait");
        let log = self.log_text();
        assert!(status.success(), "serve exited with {status}: {log}");
        log
    }

    /// Runs the driver against this server.
    fn drive(&self, args: &[&str]) -> Value {
        let (python, driver) = python();
        let out = Command::new(python)
            .arg(driver)
            .arg(&self.url)
            .args(args)
            .output()
            .expect("run the openai driver");
        assert!(
            out.status.success(),
            "openai driver {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        serde_json::from_slice(&out.stdout).expect("driver JSON")
    }

    fn chat(&self, messages: &Value, stream: bool) -> Value {
        let messages = messages.to_string();
        let mut args = vec!["chat", "--messages", &messages, "--max-tokens", "16"];
        if stream {
            args.push("--stream");
        }
        self.drive(&args)
    }

    fn http(&self, method: &str, path: &str, token: Option<&str>) -> Value {
        let mut args = vec!["http", method, path];
        if let Some(token) = token {
            args.extend(["--token", token]);
        }
        self.drive(&args)
    }

    fn metrics(&self) -> String {
        let r = self.http("GET", "/metrics", None);
        assert_eq!(r["status"], 200, "{r}");
        r["body"].as_str().expect("text").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn counter(metrics: &str, name: &str) -> f64 {
    sample(metrics, name).unwrap_or_else(|| panic!("no sample `{name}` in:\n{metrics}"))
}

/// About 400 tokens of the default document.
fn document() -> String {
    let text = corpus::text_or_default(None).expect("default document");
    text.chars().take(1800).collect()
}

fn ask(document: &str, question: &str) -> Value {
    json!([
        {"role": "system", "content": format!("Answer questions about this document.\n\n{document}")},
        {"role": "user", "content": question}
    ])
}

fn cached_tokens(answer: &Value) -> u64 {
    answer["usage"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens in {answer}"))
}

fn write_config(dir: &Path, store_section: &str) -> PathBuf {
    let path = dir.join("kvplugin.toml");
    std::fs::write(
        &path,
        format!("level = \"lossless\"\nchunk_tokens = 64\n\n[store]\n{store_section}"),
    )
    .unwrap();
    path
}

/// The stock server's answers to both questions, and the plugin server's: chat answers, stream
/// equal to non-stream, lossless answers equal to stock's, `cached_tokens` reported, admin routes
/// refused without the token, and a restarted server finds what it stored.
#[test]
fn serve_answers_openai_clients_like_stock_and_a_restart_finds_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("url = \"{}\"\n", dir.path().join("store").display()),
    );
    let doc = document();

    let stock = Server::start(dir.path(), "stock", None, None);
    let stock_1 = stock.chat(&ask(&doc, QUESTION_1), false);
    let stock_2 = stock.chat(&ask(&doc, QUESTION_2), false);
    assert!(
        !stock_1["text"].as_str().unwrap().is_empty(),
        "a chat answer: {stock_1}"
    );
    assert_eq!(
        stock_1["usage"]["cached_tokens"],
        Value::Null,
        "stock reports no cache"
    );
    let stock_metrics = stock.metrics();
    assert_eq!(counter(&stock_metrics, "kvplugin_plugin_enabled"), 0.0);
    // Stock mistral.rs leaves its engine-changing routes open; ours are closed without a token.
    let re_isq = stock.http("POST", "/re_isq", None);
    assert_eq!(re_isq["status"], 403, "{re_isq}");
    stock.stop();

    let token = "test-admin-token";
    let plugin = Server::start(dir.path(), "plugin-1", Some(&config), Some(token));
    let models = plugin.drive(&["models"]);
    assert!(
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "SmolLM2-135M-Instruct-f32"),
        "{models}"
    );
    let first = plugin.chat(&ask(&doc, QUESTION_1), false);
    assert_eq!(
        first["text"], stock_1["text"],
        "the plugin answers as stock"
    );
    assert_eq!(
        cached_tokens(&first),
        0,
        "nothing cached yet (the warm-up prompt shares nothing): {first}"
    );
    let streamed = plugin.chat(&ask(&doc, QUESTION_1), true);
    assert_eq!(
        streamed["text"], first["text"],
        "streaming equals non-streaming"
    );
    assert!(streamed["chunks"].as_u64().unwrap() > 1, "{streamed}");
    let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let again = cached_tokens(&streamed);
    assert!(
        again > prompt_tokens / 2 && again < prompt_tokens,
        "the same prompt again comes from the engine's own prefix cache: {again} of {prompt_tokens}"
    );
    let refused = plugin.http("POST", "/re_isq", Some("wrong-token"));
    assert_eq!(refused["status"], 401, "{refused}");
    let stats = plugin.http("GET", "/v1/kvcache/stats", None);
    let stats: Value = serde_json::from_str(stats["body"].as_str().unwrap()).unwrap();
    assert_eq!(stats["plugin"], true);
    assert_eq!(stats["store"]["kind"], "local");
    let log = plugin.stop();
    assert!(
        log.contains("saves"),
        "the stop reports its counters: {log}"
    );

    // A fresh process on the same store: question 2 shares the document with question 1.
    let restarted = Server::start(dir.path(), "plugin-2", Some(&config), None);
    let second = restarted.chat(&ask(&doc, QUESTION_2), false);
    assert_eq!(
        second["text"], stock_2["text"],
        "a lossless hit answers as stock"
    );
    let cached = cached_tokens(&second);
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= 384 && cached < prompt,
        "the document's chunks come from the store: {cached} of {prompt}"
    );
    let metrics = restarted.metrics();
    assert_eq!(
        counter(&metrics, "kvplugin_lookup_hits_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "kvplugin_lookup_hit_tokens_total"),
        cached as f64
    );
    assert!(counter(&metrics, "kvplugin_store_read_bytes_total{store=\"local\"}") > 0.0);
    restarted.stop();

    // Store operations: a dry run lists and keeps, a GC deletes, the next lookup misses cleanly.
    let objects = |config: &Path| -> u64 {
        let usage = store_cli(config, &["ls"]);
        usage["objects"].as_u64().expect("objects")
    };
    let stored = objects(&config);
    assert!(stored > 0, "the store holds the chunks");
    let dry = store_cli(
        &config,
        &["gc", "--older-than", "0s", "--grace", "0s", "--dry-run"],
    );
    assert_eq!(
        dry["plan"]["delete"].as_array().unwrap().len() as u64,
        stored,
        "{dry}"
    );
    assert_eq!(dry["deleted"], 0);
    assert_eq!(objects(&config), stored, "a dry run deletes nothing");
    let gc = store_cli(&config, &["gc", "--older-than", "0s", "--grace", "0s"]);
    assert_eq!(gc["deleted"].as_u64().unwrap(), stored, "{gc}");
    assert_eq!(objects(&config), 0);

    let after_gc = Server::start(dir.path(), "plugin-3", Some(&config), Some(token));
    let third = after_gc.chat(&ask(&doc, QUESTION_2), false);
    assert_eq!(third["text"], stock_2["text"]);
    assert_eq!(cached_tokens(&third), 0, "nothing left to reuse: {third}");
    let metrics = after_gc.metrics();
    assert_eq!(
        counter(&metrics, "kvplugin_lookups_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "kvplugin_lookup_hits_total"), 0.0);
    for reason in ["backend", "denied", "corrupt", "timeout"] {
        let name = format!("kvplugin_lookup_failures_total{{reason=\"{reason}\"}}");
        assert_eq!(counter(&metrics, &name), 0.0, "a miss is not a failure");
    }
    // The same operations over HTTP need the admin token.
    let refused = after_gc.http("POST", "/v1/kvcache/store/gc?dry_run=true", None);
    assert_eq!(refused["status"], 401, "{refused}");
    let listed = after_gc.http("GET", "/v1/kvcache/store", Some(token));
    assert_eq!(listed["status"], 200, "{listed}");
    let dry = after_gc.http(
        "POST",
        "/v1/kvcache/store/gc?dry_run=true&older_than=0s&grace=0s",
        Some(token),
    );
    assert_eq!(dry["status"], 200, "{dry}");
    let dry: Value = serde_json::from_str(dry["body"].as_str().unwrap()).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["deleted"], 0);
    after_gc.stop();
}

/// Runs `kvplugin store ... --json` on `config`.
fn store_cli(config: &Path, args: &[&str]) -> Value {
    let out = Command::new(kvplugin_bin())
        .arg("store")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--json")
        .env_remove("KVPLUGIN_STORE_URL")
        .output()
        .expect("run kvplugin store");
    assert!(
        out.status.success(),
        "kvplugin store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("store JSON")
}

/// Two servers on one Garage bucket: the second's first request on a document the first stored
/// is a store hit; then the S3 server dies and every request is still answered (recomputed).
#[test]
fn two_servers_share_a_garage_bucket_and_survive_its_death() {
    let mut s3 = S3Server::start_garage();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "url = \"s3://{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nallow_http = true\nrequest_timeout_ms = 2000\n",
            s3.bucket, s3.endpoint, s3.region, s3.access_key, s3.secret_key
        ),
    );
    let doc = document();
    let first = Server::start(dir.path(), "first", Some(&config), None);
    let a = first.chat(&ask(&doc, QUESTION_1), false);
    // Stopping drains the save: the bucket then holds the document.
    first.stop();

    let second = Server::start(dir.path(), "second", Some(&config), None);
    let b = second.chat(&ask(&doc, QUESTION_1), false);
    assert_eq!(b["text"], a["text"]);
    assert!(cached_tokens(&b) >= 384, "{b}");
    let metrics = second.metrics();
    assert_eq!(counter(&metrics, "kvplugin_lookup_hits_total"), 1.0);
    assert!(counter(&metrics, "kvplugin_store_read_bytes_total{store=\"s3\"}") > 0.0);

    s3.kill();
    let other_doc: String = corpus::text_or_default(None)
        .unwrap()
        .chars()
        .skip(4000)
        .take(1800)
        .collect();
    let c = second.chat(&ask(&other_doc, QUESTION_2), false);
    assert!(!c["text"].as_str().unwrap().is_empty(), "answered: {c}");
    // Only the chat header both documents share comes from the engine's own cache: nothing
    // from the store (its chunks are 64 tokens).
    assert!(cached_tokens(&c) < 64, "recomputed: {c}");
    let metrics = second.metrics();
    assert!(
        counter(
            &metrics,
            "kvplugin_lookup_failures_total{reason=\"backend\"}"
        ) + counter(
            &metrics,
            "kvplugin_lookup_failures_total{reason=\"timeout\"}"
        ) >= 1.0,
        "the dead store is counted: {metrics}"
    );
    second.stop();
}

/// A chat request whose system message separates documents with the blend separator is blended
/// and counted; with malformed markup (one separator) the separator is removed and the answer is
/// stock's for the text without it: the model never sees a separator.
#[test]
fn separators_in_message_text_blend_and_never_reach_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("url = \"{}\"\n", dir.path().join("store").display()),
    );
    let text = corpus::text_or_default(None).unwrap();
    let docs: Vec<String> = (0..3)
        .map(|i| text.chars().skip(i * 900).take(700).collect())
        .collect();
    let marked = format!(
        "Answer from these documents.{SEPARATOR}{}{SEPARATOR}{}{SEPARATOR}{}{SEPARATOR}",
        docs[0], docs[1], docs[2]
    );
    let blended = json!([
        {"role": "system", "content": marked},
        {"role": "user", "content": QUESTION_1}
    ]);
    let malformed = |content: String| {
        json!([
            {"role": "system", "content": content},
            {"role": "user", "content": QUESTION_2}
        ])
    };
    let one_separator = format!("Answer from this document.{SEPARATOR}{}", docs[0]);
    let stripped = one_separator.replace(SEPARATOR, "");

    let stock = Server::start(dir.path(), "stock", None, None);
    let stock_answer = stock.chat(&malformed(stripped), false);
    stock.stop();

    let server = Server::start(dir.path(), "plugin", Some(&config), None);
    let answer = server.chat(&blended, false);
    assert!(!answer["text"].as_str().unwrap().is_empty(), "{answer}");
    let metrics = server.metrics();
    assert_eq!(
        counter(&metrics, "kvplugin_text_blends_total"),
        1.0,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "kvplugin_blends_total"), 1.0, "{metrics}");
    // Nothing was cached: the prefix and the three documents were computed (and stored).
    assert_eq!(
        counter(
            &metrics,
            "kvplugin_blend_documents_total{source=\"computed\"}"
        ),
        4.0
    );

    let unblended = server.chat(&malformed(one_separator), false);
    assert_eq!(
        unblended["text"], stock_answer["text"],
        "separator removed, answer as stock's without it"
    );
    assert_eq!(
        unblended["usage"]["prompt_tokens"],
        stock_answer["usage"]["prompt_tokens"]
    );
    let metrics = server.metrics();
    assert_eq!(counter(&metrics, "kvplugin_text_blends_skipped_total"), 1.0);
    server.stop();
}
