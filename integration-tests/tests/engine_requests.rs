//! The engine patch's request handling on the real engine and model (SmolLM2-135M-Instruct, CPU):
//!
//! - No request is ever lost: a request parked while its KV lookup runs is answered (with an
//!   error response) when the engine stops under it, a dead engine's reboot keeps the hook, and
//!   many slow lookups at once are all answered with stock's output.
//! - The 0.8.1 bug fixes (`patches/mistralrs-core/0001`-`0003`, `0007`), each with a test that
//!   fails on the stock engine: the prefix cache keys a finished sequence on the tokens its cache
//!   holds rows for, a sequence that finishes on its first sampled token is finished once, the CPU
//!   decode attention gives each sequence of a batch its own output, and a stopping engine answers
//!   the sequences and queued requests it holds. (`0006`, the scheduler, is `engine_scheduler.rs`.)
//! - The `mistralrs` crate's `TextModelBuilder::with_kv_hook` (`patches/mistralrs`) gives a
//!   program using the high-level API a store hit.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use integration_tests::{document, gguf_path, hf_dir, question_prompt, wait_for};
use mistralrs_core::{FinishedPrefix, KvHook, KvModelInfo, KvPrefix, Request};
use mistralrs_kvplugin::{
    engine::{EngineOptions, LocalEngine, ModelSource},
    HookConfig, KvPluginHook, MemoryPrefixStore, PrefixStore,
};
use tokio::sync::Notify;

fn gguf_options() -> EngineOptions {
    EngineOptions::new(ModelSource::Gguf(gguf_path()))
}

/// A hook that records what the engine offers and asks, and whose lookups wait `delay` (then find
/// nothing).
struct RecordingHook {
    delay: Duration,
    /// Lookups that wait `delay`; later ones find nothing at once.
    slow_lookups: usize,
    lookups_started: AtomicUsize,
    lookup_entered: Notify,
    /// Finished test sequences (the engine's one-token warm-up excluded): tokens and reused count.
    finished: Mutex<Vec<(Vec<u32>, usize)>>,
}

impl RecordingHook {
    fn new(delay: Duration) -> Arc<Self> {
        Self::slow_first(usize::MAX, delay)
    }

    /// Only the first `slow_lookups` lookups wait `delay`.
    fn slow_first(slow_lookups: usize, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            slow_lookups,
            lookups_started: AtomicUsize::new(0),
            lookup_entered: Notify::new(),
            finished: Mutex::new(Vec::new()),
        })
    }

    /// The first `n` finished test sequences, once the engine has offered them.
    async fn finished(&self, n: usize) -> Vec<(Vec<u32>, usize)> {
        for _ in 0..1200 {
            let finished = self.finished.lock().unwrap().clone();
            if finished.len() >= n {
                return finished;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the engine offered fewer than {n} finished sequences");
    }
}

#[async_trait]
impl KvHook for RecordingHook {
    async fn save_prefix(&self, finished: FinishedPrefix) {
        if finished.prompt_tokens > 1 {
            self.finished
                .lock()
                .unwrap()
                .push((finished.prefix.tokens, finished.reused_tokens));
        }
    }

    /// Not the engine's one-token start-up request: it would hold `MistralRs::new` for `delay`.
    fn should_lookup(&self, prompt: &[u32], _cached: usize) -> bool {
        prompt.len() > 1
    }

    async fn load_prefix(&self, _prompt: &[u32], _cached: usize) -> Option<KvPrefix> {
        let nth = self.lookups_started.fetch_add(1, Ordering::SeqCst);
        self.lookup_entered.notify_one();
        if nth < self.slow_lookups {
            tokio::time::sleep(self.delay).await;
        }
        None
    }

    fn load_timeout(&self) -> Duration {
        self.delay + Duration::from_secs(600)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_parked_in_a_lookup_is_answered_when_the_engine_stops() {
    // The lookup never ends on its own: only the engine's shutdown can answer the request.
    let hook = RecordingHook::new(Duration::from_secs(3600));
    let engine = LocalEngine::start(gguf_options().with_kv_hook(hook.clone()))
        .await
        .unwrap();
    let doc = document(&engine, 100);
    let prompt = question_prompt(&engine, &doc, "Who may copy this license?");
    let entered = hook.lookup_entered.notified();
    let pending = engine.submit(&prompt, 8).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), entered)
        .await
        .expect("the lookup started");

    // Dropping the last handle terminates the engine, which then drops its state.
    drop(engine);
    let answer = tokio::time::timeout(Duration::from_secs(60), pending.finish())
        .await
        .expect("an answer, not silence");
    let error = answer.expect_err("the request cannot complete after the engine stopped");
    assert!(
        error.to_string().contains("engine stopped"),
        "the engine answered with an error response, not a dropped channel: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_engine_answers_the_requests_it_holds_and_queued_ones() {
    // Stock 0.8.1 dropped every sequence in its scheduler and every request still queued in its
    // channel when its loop ended (`Request::Terminate`, or a panic unwinding the engine thread
    // before a reboot): their clients saw the channel close without an answer (a lost request).
    // `patches/mistralrs-core/0007` answers each with an error.
    let engine = LocalEngine::start(gguf_options()).await.unwrap();
    let doc = document(&engine, 60);
    let prompt = question_prompt(&engine, &doc, "Who may copy this license?");
    let sender = engine.runner().get_sender(None).unwrap();
    // In the scheduler when the engine stops: far from its 200 tokens.
    let (running, running_answer) = engine.request(&prompt, 200);
    sender.send(running).await.unwrap();
    sender.send(Request::Terminate).await.unwrap();
    // Queued behind the terminate request on the same channel, never read by the loop (or, if
    // the engine has already closed its channel, refused at once: nothing then to answer).
    let mut answers = vec![running_answer];
    for _ in 0..3 {
        let (queued, answer) = engine.request(&prompt, 4);
        if sender.send(queued).await.is_err() {
            break;
        }
        answers.push(answer);
    }
    for (i, answer) in answers.into_iter().enumerate() {
        let error = tokio::time::timeout(Duration::from_secs(60), answer.finish())
            .await
            .unwrap_or_else(|_| panic!("request {i}: an answer, not silence"))
            .expect_err("nothing can complete on a stopped engine");
        assert!(
            error.to_string().contains("engine stopped"),
            "request {i} got an error response, not a closed channel: {error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_when_the_engine_dies_and_the_rebooted_engine_keeps_the_hook() {
    // The engine thread ends under a request parked in its lookup, here by `Request::Terminate`
    // (a panic unwinds through the same drop of the engine's state). Stock 0.8.1 then drops
    // whatever it holds: parked lookups, requests still queued in its channel, sequences in its
    // scheduler; their clients wait for nothing. mistral.rs reboots a dead engine on the next
    // request, from its reboot state, which carries the hook.
    let hook = RecordingHook::slow_first(1, Duration::from_secs(3600));
    let engine = LocalEngine::start(gguf_options().with_kv_hook(hook.clone()))
        .await
        .unwrap();
    let doc = document(&engine, 100);
    let parked_prompt = question_prompt(&engine, &doc, "Who may copy this license?");
    let later_prompt = question_prompt(&engine, &doc, "Can I sell copies?");

    let entered = hook.lookup_entered.notified();
    let parked = engine.submit(&parked_prompt, 8).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), entered)
        .await
        .expect("the lookup started");
    let sender = engine.runner().get_sender(None).unwrap();
    sender.send(Request::Terminate).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), parked.finish())
        .await
        .expect("an answer, not silence");
    let error = answer.expect_err("the request cannot complete after the engine stopped");
    assert!(
        error.to_string().contains("engine stopped"),
        "the parked request got an error response: {error}"
    );

    // Until the dead engine's thread has ended, a request reaches its closed channel and is
    // refused at once; then the next one reboots it. None may be lost on the way.
    let mut rebooted = None;
    for _ in 0..600 {
        match engine.complete(&later_prompt, 6).await {
            Ok(answer) => {
                rebooted = Some(answer);
                break;
            }
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains("engine stopped") && !e.contains("lost request"),
                    "a request to a stopping engine is refused, never lost: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let rebooted = rebooted.expect("the engine rebooted and answered");
    assert_eq!(
        hook.lookups_started.load(Ordering::SeqCst),
        2,
        "the rebooted engine consulted the hook"
    );
    drop(engine);
    let stock = LocalEngine::start(gguf_options()).await.unwrap();
    assert_eq!(
        rebooted.tokens,
        stock.complete(&later_prompt, 6).await.unwrap().tokens,
        "the rebooted engine answers as stock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_slow_lookups_at_once_are_all_answered_as_stock() {
    // No prefix cache, and prompts of distinct lengths, in both engines: the scheduler then runs
    // them one at a time (it batches equal lengths only), so each answer is one full prefill of
    // its prompt whatever order they run in (a batched prefill may round differently).
    let options = || EngineOptions {
        prefix_cache: false,
        ..gguf_options()
    };
    let stock = LocalEngine::start(options()).await.unwrap();
    let doc = document(&stock, 60);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let question = format!("Who may copy this license?{}", " Please answer.".repeat(i));
            question_prompt(&stock, &doc, &question)
        })
        .collect();
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lengths.dedup();
    assert_eq!(lengths.len(), prompts.len(), "distinct prompt lengths");
    let mut stock_pending = Vec::new();
    for p in &prompts {
        stock_pending.push(stock.submit(p, 6).await.unwrap());
    }
    let mut expected = Vec::new();
    for request in stock_pending {
        expected.push(request.finish().await.unwrap().tokens);
    }
    drop(stock);

    let hook = RecordingHook::new(Duration::from_millis(400));
    let engine = LocalEngine::start(options().with_kv_hook(hook.clone()))
        .await
        .unwrap();
    let mut pending = Vec::new();
    for p in &prompts {
        pending.push(engine.submit(p, 6).await.unwrap());
    }
    for (i, request) in pending.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(300), request.finish())
            .await
            .unwrap_or_else(|_| panic!("request {i} not answered"))
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(got.tokens, expected[i], "request {i}");
    }
    assert_eq!(hook.lookups_started.load(Ordering::SeqCst), prompts.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_extending_a_finished_sequence_recomputes_its_last_token() {
    // The finished sequence's token list ends with its last sampled token, which has no K/V row.
    // Stock 0.8.1 keyed its prefix cache on all of them, so a prompt extending the sequence reused
    // one row too many (a row of zeros) and never computed that token.
    let hook = RecordingHook::new(Duration::ZERO);
    let engine = LocalEngine::start(gguf_options().with_kv_hook(hook.clone()))
        .await
        .unwrap();
    let doc = document(&engine, 80);
    let prompt = question_prompt(&engine, &doc, "Who may copy this license?");
    let first = engine.complete(&prompt, 6).await.unwrap();
    let (cached, _) = hook.finished(1).await.remove(0);
    assert_eq!(&cached[..prompt.len()], &prompt[..]);
    // The offered tokens are the prompt and all generated tokens but the last; the text gives the
    // last one (checked: it re-encodes to the tokens the engine reported).
    let generated = engine.encode(&first.text).unwrap();
    assert_eq!(
        &generated[..generated.len() - 1],
        &cached[prompt.len()..],
        "the generated text re-encodes to the generated tokens"
    );
    let mut extended = prompt.clone();
    extended.extend_from_slice(&generated);
    extended.extend(engine.encode(" Please answer briefly.").unwrap());

    let got = engine.complete(&extended, 6).await.unwrap();
    let (_, reused) = hook.finished(2).await.remove(1);
    assert_eq!(
        reused,
        cached.len(),
        "the prefix cache served exactly the rows it holds (stock 0.8.1: one more)"
    );
    let fresh = LocalEngine::start(EngineOptions {
        prefix_cache: false,
        ..gguf_options()
    })
    .await
    .unwrap();
    let expected = fresh.complete(&extended, 6).await.unwrap();
    assert_eq!(
        got.tokens, expected.tokens,
        "output equals a full prefill's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_decoded_in_one_batch_each_get_their_own_answer() {
    // The scheduler batches prompts of equal length. Stock 0.8.1's CPU decode attention kept one
    // scratch slot per (tile, head) for the whole batch, so every sequence decoded with the last
    // sequence's attention output: first tokens right, then another request's text.
    let engine = LocalEngine::start(EngineOptions {
        prefix_cache: false,
        ..gguf_options()
    })
    .await
    .unwrap();
    let doc = document(&engine, 60);
    let prompts: Vec<Vec<u32>> = ["copy", "sell", "change"]
        .iter()
        .map(|verb| question_prompt(&engine, &doc, &format!("Who may {verb} this license?")))
        .collect();
    assert!(
        prompts.iter().all(|p| p.len() == prompts[0].len()),
        "equal prompt lengths, so that the scheduler batches them"
    );
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(engine.complete(p, 8).await.unwrap().tokens);
    }
    assert!(
        alone.windows(2).any(|w| w[0] != w[1]),
        "the prompts have different answers: {alone:?}"
    );
    let mut pending = Vec::new();
    for p in &prompts {
        pending.push(engine.submit(p, 8).await.unwrap());
    }
    for (i, request) in pending.into_iter().enumerate() {
        let together = request.finish().await.unwrap().tokens;
        assert_eq!(together, alone[i], "request {i} decoded in a batch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_finishing_on_its_first_token_is_finished_once() {
    // Stock 0.8.1 set every prompt-step sequence running again after sampling, even one that had
    // just finished (here: a one-token limit), so it ran one more step, answered twice and was
    // offered to the hook (and its prefix cache) twice.
    let hook = RecordingHook::new(Duration::ZERO);
    let engine = LocalEngine::start(gguf_options().with_kv_hook(hook.clone()))
        .await
        .unwrap();
    let doc = document(&engine, 60);
    let first = question_prompt(&engine, &doc, "Who may copy this license?");
    let second = question_prompt(&engine, &doc, "Can I sell copies?");
    assert_eq!(engine.complete(&first, 1).await.unwrap().tokens.len(), 1);
    // By the time a later request is answered, a second run of the first would have happened.
    engine.complete(&second, 4).await.unwrap();
    let offered = hook.finished(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let offered_now = hook.finished.lock().unwrap().clone();
    assert_eq!(
        offered_now.len(),
        2,
        "each request is finished (and offered) once: {:?}",
        offered_now
            .iter()
            .map(|(t, r)| (t.len(), *r))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        offered[0].0.len(),
        first.len(),
        "the one-token sequence's rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mistralrs_text_model_builder_takes_a_hook_and_hits_the_store() {
    use mistralrs::{ModelDType, RequestBuilder, TextMessageRole, TextMessages, TextModelBuilder};
    let store = Arc::new(MemoryPrefixStore::new(1 << 30));
    let doc = {
        let engine = LocalEngine::start(EngineOptions::new(ModelSource::HfDir(hf_dir())))
            .await
            .unwrap();
        document(&engine, 300)
    };
    let ask = |question: &str| {
        RequestBuilder::from(
            TextMessages::new()
                .add_message(
                    TextMessageRole::System,
                    format!("Answer questions about this document.\n\n{doc}"),
                )
                .add_message(TextMessageRole::User, question),
        )
        .set_deterministic_sampler()
        .set_sampler_max_len(8)
    };
    let build = |hook: Arc<KvPluginHook>| {
        TextModelBuilder::new(hf_dir().display().to_string())
            .with_dtype(ModelDType::F32)
            .with_force_cpu()
            .with_kv_hook(hook)
            .build()
    };

    let hook_a = Arc::new(KvPluginHook::new(
        store.clone() as Arc<dyn PrefixStore>,
        HookConfig::default(),
    ));
    let model_a = build(hook_a.clone()).await.expect("model A builds");
    model_a
        .send_chat_request(ask("Who may copy this license?"))
        .await
        .expect("model A answers");
    assert_eq!(wait_for(&hook_a, 1, 1).await.saves, 1, "model A saved");
    drop(model_a);

    let hook_b = Arc::new(KvPluginHook::new(
        store.clone() as Arc<dyn PrefixStore>,
        HookConfig {
            // The other tests of this file run engines beside this one on the same cores: the
            // hit must not depend on the default 10 s lookup timeout holding under that load.
            load_timeout: Duration::from_secs(300),
            ..HookConfig::default()
        },
    ));
    let model_b = build(hook_b.clone()).await.expect("model B builds");
    let answer = model_b
        .send_chat_request(ask("What does the license say about patents?"))
        .await
        .expect("model B answers");
    assert!(!answer.choices.is_empty());
    let b = wait_for(&hook_b, 1, 0).await;
    assert_eq!(b.hits, 1, "model B hit the store: {b:?}");
    // Summed over the sequences model B scheduled, not the last one's: `mistralrs`'s builder
    // may schedule a one-token sequence of its own after the request (seen in CI as
    // `last_prompt_tokens: 1` beside a 314-token hit).
    assert!(
        b.scheduled_reused_tokens > 300,
        "model B reused the document's cache: {b:?}"
    );
}

/// A hook the engine must refuse: registration never happens for a model it cannot serve
/// exactly, and the refusal is reported.
struct RefusalProbe {
    refusals: Mutex<Vec<String>>,
    registered: AtomicUsize,
}

#[async_trait]
impl KvHook for RefusalProbe {
    fn register(&self, _model: &KvModelInfo) -> anyhow::Result<()> {
        self.registered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn on_refused(&self, _model_id: &str, reason: &str) {
        self.refusals.lock().unwrap().push(reason.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_without_a_kv_cache_refuses_the_hook_with_a_reason() {
    let probe = Arc::new(RefusalProbe {
        refusals: Mutex::new(Vec::new()),
        registered: AtomicUsize::new(0),
    });
    let engine = LocalEngine::start(EngineOptions {
        no_kv_cache: true,
        ..gguf_options().with_kv_hook(probe.clone())
    })
    .await
    .unwrap();
    let doc = document(&engine, 40);
    let prompt = question_prompt(&engine, &doc, "Who may copy this license?");
    engine
        .complete(&prompt, 2)
        .await
        .expect("answers without the hook");
    assert_eq!(probe.registered.load(Ordering::SeqCst), 0);
    assert_eq!(
        probe.refusals.lock().unwrap().clone(),
        vec!["the KV cache is off".to_string()]
    );
}
