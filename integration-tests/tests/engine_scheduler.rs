//! The engine's scheduler with concurrent requests of different lengths, on the real engine and
//! model (SmolLM2-135M-Instruct, CPU): the bug fix `patches/mistralrs-core/0006`.
//!
//! The non-paged scheduler runs one length bucket per step and parks the others in its waiting
//! list, decoding ones included. Stock 0.8.1 scheduled *every* waiting sequence as a prompt
//! whenever the running bucket had finished, so each parked sequence was prefilled again from
//! scratch (its prompt and the tokens it had generated): right answers, but every finished request
//! made all others in flight recompute their whole context, and throughput collapsed with
//! concurrency.
//!
//! What the engine computed is read from its own step log (`MISTRALRS_DEBUG=1`: one line per step,
//! `Prompt[lengths] Completion[lengths]`), captured by a subscriber this test installs; this file is
//! its own test binary, so the global subscriber and the debug flag touch nothing else.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use integration_tests::{document, gguf_path, question_prompt};
use mistralrs_kvplugin::engine::{EngineOptions, LocalEngine, ModelSource};

/// Everything the engine logs, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn take(&self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut *self.0.lock().unwrap())).into_owned()
    }
}

/// Installs the capturing subscriber once, then turns on the engine's step log (its own
/// `initialize_logging` reads `MISTRALRS_DEBUG` and finds a subscriber already in place).
fn capture_engine_log() -> Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .init();
            // Set before the engine starts, and only in this test binary.
            std::env::set_var("MISTRALRS_DEBUG", "1");
            mistralrs_core::initialize_logging();
            captured
        })
        .clone()
}

/// The lengths the step log gives for the sequences of every prompt step in `log`, in order.
fn prompt_steps(log: &str) -> Vec<usize> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("Prompt[")? + "Prompt[".len();
            let end = start + line[start..].find(']')?;
            Some(line[start..end].to_string())
        })
        .flat_map(|lengths| {
            lengths
                .split(", ")
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<usize>().expect("a length"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_different_lengths_are_each_prefilled_once() {
    let log = capture_engine_log();
    let engine = LocalEngine::start(EngineOptions {
        // No engine prefix hits between the requests: each prompt is prefilled from token 0.
        prefix_cache: false,
        ..EngineOptions::new(ModelSource::Gguf(gguf_path()))
    })
    .await
    .unwrap();
    // Not the engine's start-up request.
    log.take();
    // Documents of different lengths, so that the prompts fall in different length buckets.
    let prompts: Vec<Vec<u32>> = [50, 65, 80, 95]
        .iter()
        .map(|&n| question_prompt(&engine, &document(&engine, n), "Who may copy it?"))
        .collect();
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    assert!(
        lengths.windows(2).all(|w| w[0] < w[1]),
        "four different prompt lengths, so that the scheduler buckets them apart: {lengths:?}"
    );
    // The step log prints a sequence's length after the step: its prompt and the token sampled.
    let logged: Vec<usize> = lengths.iter().map(|n| n + 1).collect();
    // Staggered limits: requests finish at different steps while others are parked mid-decode.
    let limits = [6, 10, 14, 18];

    let mut alone = Vec::new();
    for (p, n) in prompts.iter().zip(limits) {
        alone.push(engine.complete(p, n).await.unwrap().tokens);
    }
    let sequential_steps = prompt_steps(&log.take());

    let mut pending = Vec::new();
    for (p, n) in prompts.iter().zip(limits) {
        pending.push(engine.submit(p, n).await.unwrap());
    }
    for (i, request) in pending.into_iter().enumerate() {
        let together = request.finish().await.unwrap().tokens;
        assert_eq!(
            together, alone[i],
            "request {i}, run concurrently, answers as alone"
        );
    }
    let mut concurrent_steps = prompt_steps(&log.take());

    let mut sequential_sorted = sequential_steps.clone();
    sequential_sorted.sort_unstable();
    assert_eq!(
        sequential_sorted, logged,
        "the step log shows each prompt of the sequential run once: {sequential_steps:?}"
    );
    concurrent_steps.sort_unstable();
    assert_eq!(
        concurrent_steps, logged,
        "run concurrently, each request is prefilled once, at its prompt length (a longer \
         prefill is a parked decoding sequence computed again from scratch)"
    );
}
