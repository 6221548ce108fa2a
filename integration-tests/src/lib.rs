//! Shared helpers for the end-to-end tests in `tests/`: where the model is, the prompts, and
//! polling the plugin's counters.
//!
//! The tests need the real model; `make setup` (scripts/setup.sh) fetches and converts it. A
//! missing model is a test failure with a message saying so, never a skipped test.

pub mod s3;
pub mod store_suite;

use std::{path::PathBuf, time::Duration};

use mistralrs_kvplugin::{
    corpus,
    engine::{document_prompt, LocalEngine},
    model, KvPluginHook, MetricsSnapshot,
};

/// The `kvplugin` binary of the same build as the running test (`target/<profile>/kvplugin`).
pub fn kvplugin_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps")
        .join("kvplugin");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace first (`make setup`)",
        bin.display()
    );
    bin
}

/// The repository's `models/` folder (or `$KVPLUGIN_MODELS`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("KVPLUGIN_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// The shipped GGUF; panics with a hint when setup has not run.
pub fn gguf_path() -> PathBuf {
    let path = model::smollm2_gguf(&models_dir());
    assert!(
        path.is_file(),
        "{} is missing: run `make setup`",
        path.display()
    );
    path
}

/// The converted Hugging Face folder; panics with a hint when setup has not run.
pub fn hf_dir() -> PathBuf {
    let path = model::smollm2_hf(&models_dir());
    assert!(
        path.join("model.safetensors").is_file(),
        "{} is missing: run `make setup`",
        path.display()
    );
    path
}

/// The first `n_tokens` tokens of the default document, as text.
pub fn document(engine: &LocalEngine, n_tokens: usize) -> String {
    let text = corpus::text_or_default(None).expect("a readable default document");
    engine
        .truncate_to_tokens(&text, n_tokens)
        .expect("document long enough")
}

/// A chat prompt asking `question` about `document`, as token ids.
pub fn question_prompt(engine: &LocalEngine, document: &str, question: &str) -> Vec<u32> {
    engine
        .encode(&document_prompt(document, question))
        .expect("encode")
}

/// Waits until `hook` has seen `finished` finished sequences and settled `saves` saves (written,
/// failed or dropped), and returns its counters. Panics after 60 s.
pub async fn wait_for(hook: &KvPluginHook, finished: u64, saves: u64) -> MetricsSnapshot {
    for _ in 0..1200 {
        let m = hook.metrics().snapshot();
        if m.finished_sequences >= finished && m.saves + m.save_failures + m.dropped_saves >= saves
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("hook did not settle: {:?}", hook.metrics().snapshot());
}
