//! Separate engine processes (`kvplugin ask`, each one engine from start to exit) share caches
//! through a store: a restarted process finds on local disk everything it stored before, and a
//! second process hits, through one bucket of a real Garage server, what the first one stored.
//! The level is lossless, so every answer must equal a stock process's token for token.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{hf_dir, kvplugin_bin as kvplugin, s3::S3Server};
use serde_json::Value;

const DOC_TOKENS: &str = "400";
const QUESTION_1: &str = "Who may copy this license?";
const QUESTION_2: &str = "What does the license say about patents?";

/// Runs one `kvplugin ask` process and returns its JSON report.
fn ask(config: Option<&Path>, question: &str) -> Value {
    hf_dir();
    let mut cmd = Command::new(kvplugin());
    cmd.args([
        "ask",
        "--question",
        question,
        "--tokens",
        DOC_TOKENS,
        "--max-new-tokens",
        "16",
    ]);
    match config {
        Some(path) => cmd.arg("--config").arg(path),
        None => cmd.arg("--no-plugin"),
    };
    let models = integration_tests::models_dir();
    let out = cmd
        .env("KVPLUGIN_MODELS", &models)
        .env_remove("KVPLUGIN_STORE_URL")
        .env_remove("KVPLUGIN_LEVEL")
        .output()
        .expect("run kvplugin ask");
    assert!(
        out.status.success(),
        "kvplugin ask failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kvplugin ask printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn metric(report: &Value, name: &str) -> u64 {
    report["metrics"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no metric {name} in {report}"))
}

/// Process 1 answers question 1 from cold and stores its cache; process 2 answers question 2
/// from the cache. Returns process 2's report after checking both.
fn store_then_hit(config: &Path) -> Value {
    let stock = ask(None, QUESTION_2);
    let first = ask(Some(config), QUESTION_1);
    assert_eq!(metric(&first, "hits"), 0, "{first}");
    assert_eq!(metric(&first, "saves"), 1, "{first}");
    assert_eq!(metric(&first, "save_failures"), 0, "{first}");

    let second = ask(Some(config), QUESTION_2);
    assert_eq!(metric(&second, "hits"), 1, "{second}");
    let reused = second["reused_tokens"].as_u64().expect("reused tokens");
    let prompt = second["prompt_tokens"].as_u64().expect("prompt tokens");
    // The document (400 tokens after the chat header) is shared; the question is not.
    assert!(
        reused >= 400 && reused < prompt,
        "reused {reused} of {prompt}: {second}"
    );
    assert_eq!(
        second["answer_tokens"], stock["answer_tokens"],
        "a lossless hit answers like stock"
    );
    second
}

fn write_config(dir: &Path, store_section: &str) -> PathBuf {
    let path = dir.join("kvplugin.toml");
    std::fs::write(
        &path,
        format!("level = \"lossless\"\nchunk_tokens = 128\n\n[store]\n{store_section}"),
    )
    .unwrap();
    path
}

#[test]
fn a_restarted_process_finds_what_it_stored_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let config = write_config(dir.path(), &format!("url = \"{}\"\n", store.display()));
    store_then_hit(&config);
    assert!(
        std::fs::read_dir(&store).unwrap().next().is_some(),
        "the store folder holds the objects"
    );
}

#[test]
fn two_processes_share_a_garage_bucket() {
    let server = S3Server::start_garage();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "url = \"s3://{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nallow_http = true\n",
            server.bucket, server.endpoint, server.region, server.access_key, server.secret_key
        ),
    );
    store_then_hit(&config);
}

/// `kvplugin eval blend-qa` on a data set file of the documented format: every mode the command
/// was asked for is reported with the documented keys, and `full` agrees with itself.
#[test]
fn eval_blend_qa_reports_each_mode_in_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("qa.jsonl");
    let item = serde_json::json!({
        "id": "gpl-1",
        "chunks": [
            "The GNU General Public License is a free, copyleft license for software and other kinds of works.",
            "The licenses for most software and other practical works are designed to take away your freedom to share and change the works.",
            "Developers that use the GNU GPL protect your rights with two steps: assert copyright on the software, and offer you this License."
        ],
        "question": "What kind of license is the GNU General Public License?",
        "answers": ["a free, copyleft license"]
    });
    std::fs::write(&dataset, format!("{item}\n\n{item}\n")).unwrap();
    let json = dir.path().join("eval.json");
    let out = Command::new(kvplugin())
        .args(["eval", "blend-qa", "--dataset"])
        .arg(&dataset)
        .args([
            "--modes",
            "full,reuse,blend-0.15,blend-0.25-k-gradual",
            "--max-new-tokens",
            "8",
            "--json",
        ])
        .arg(&json)
        .env("KVPLUGIN_MODELS", integration_tests::models_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["n_items"], 2);
    let modes = report["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["full", "reuse", "blend-0.15", "blend-0.25-k-gradual"]
    );
    for m in modes {
        for key in [
            "ttft_mean_s",
            "ttft_p50_s",
            "ttft_p90_s",
            "f1",
            "em",
            "agreement_with_full",
        ] {
            let x = m[key].as_f64().unwrap_or_else(|| panic!("{key} in {m}"));
            assert!(
                x >= 0.0 && (key.starts_with("ttft") || x <= 1.0),
                "{key} = {x}"
            );
        }
    }
    assert_eq!(modes[0]["agreement_with_full"], 1.0);

    // A malformed line is named, and nothing runs.
    std::fs::write(&dataset, format!("{item}\n{{\"id\": 3}}\n")).unwrap();
    let out = Command::new(kvplugin())
        .args(["eval", "blend-qa", "--dataset"])
        .arg(&dataset)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
}
