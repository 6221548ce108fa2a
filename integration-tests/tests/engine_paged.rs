//! PagedAttention on the CPU (the engine patch's `paged-attn-cpu`) against the non-paged path, on
//! the real engine and model (SmolLM2-135M-Instruct, F32, safetensors and GGUF).
//!
//! The reference is a non-paged engine with no prefix cache: every answer computed from scratch.
//! The paged engine runs its block manager and its block prefix cache, and must give the same
//! greedy tokens from the same logits: bit for bit where both compute the same shapes (a cold
//! prompt), within `logit_tolerance` where a prefix hit or a batch splits the computation
//! differently (matrix products of other shapes round differently). There, and only at a
//! near-tie of the reference's two best logits (within the tolerance), the paged engine may take
//! the other token; the comparison ends at that token (`assert_same`). The logits are recorded by
//! a logits processor on each request.
//!
//! Each case here also confirms one of 0.8.1's paged-path defects (`patches/mistralrs-core/0009`):
//! - D1: a prompt preempted by length bucketing right after admission had its never-computed
//!   blocks registered as cached, and hit them when it was scheduled again
//!   (`concurrent_prompts_of_different_lengths_...`).
//! - D2: a finished sequence's blocks were registered up to its last sampled token, which has no
//!   K/V row; a follow-up extending a sequence whose length is a multiple of the block size read
//!   that row (`a_follow_up_extending_a_block_aligned_answer_...`).
//! - D3: a prompt with exactly one token past its block hit took the decode kernel with
//!   positions for lengths, leaving the token out of its own attention
//!   (`a_resent_prompt_one_token_past_a_block_boundary_...`).
//! - D4: a sequence whose step failed (`Error`) kept its blocks for good
//!   (`sequences_whose_step_failed_give_their_blocks_back`).
//! - 0.8.1 ended a prompt the pool can never hold without any response
//!   (`a_prompt_longer_than_the_pool_is_answered_with_an_error_...`).
//! - Decode-time preemption in a pool too small for every sequence at once recomputes the
//!   preempted sequences from their own cached blocks (`preemption_in_a_small_pool_...`).
//!
//! The KV hook on the block path (`patches/mistralrs-core/0011`):
//! - A finished sequence's rows, gathered from its blocks before they are freed, are the
//!   non-paged cache's rows bit for bit.
//! - A store hit is installed in whole blocks after the engine's own block hit, and the answer is
//!   the non-paged one.
//! - Approximate rows (a blended cache) are installed but never registered in the block pool,
//!   nor is any block computed after them.
//! - A store whose chunks end inside blocks is declined at registration.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use candle_core::Tensor;
use integration_tests::{
    document, gguf_path, hf_dir, question_prompt, store_suite::max_abs, wait_for,
};
use mistralrs_core::{CustomLogitsProcessor, FinishedPrefix, KvHook, KvPrefix, LayerKv, Request};
use mistralrs_kvplugin::{
    codec::Level,
    engine::{
        EngineOptions, Generation, LocalEngine, ModelSource, PagedOptions, PendingCompletion,
    },
    store::{common_prefix_len, ObjectPrefixStore, ObjectStoreConfig, PrefixStore},
    HookConfig, KvPluginHook,
};
use object_store::memory::InMemory;

/// The largest difference of a chosen token's logit accepted where the paged and non-paged
/// engines split a computation differently (prefix hits, batches): matrix products of other
/// shapes round differently, by about 1e-6 relative in F32 (measured here: at most 3.5e-5 on
/// logits near 20). The GGUF model (Q4_1) quantizes activations to 8 bits per block before each
/// product, which turns such a difference into a whole quantization step now and then, and those
/// add up over 30 layers (measured: up to 0.47). The non-paged engine under the same concurrent
/// load stays bit-identical to itself (the control in `concurrent_prompts_...`).
fn logit_tolerance(model: &ModelSource) -> f32 {
    match model {
        ModelSource::HfDir(_) => 1e-3,
        ModelSource::Gguf(_) => 1.0,
    }
}
const BLOCK: usize = 32;

fn sources() -> [ModelSource; 2] {
    [ModelSource::HfDir(hf_dir()), ModelSource::Gguf(gguf_path())]
}

/// The model files the hook tests run on. The block path's gather and scatter copy rows
/// whatever computed them, so one model file shows them (the exactness tests above run both:
/// there the model's own attention code differs); HF F32, where equal means bit-identical.
/// (It also keeps this file under ten minutes of a two-core CI run.)
fn hook_sources() -> [ModelSource; 1] {
    [ModelSource::HfDir(hf_dir())]
}

/// Non-paged, no prefix cache: the answer computed from scratch.
async fn reference_engine(model: ModelSource) -> LocalEngine {
    LocalEngine::start(EngineOptions {
        prefix_cache: false,
        ..EngineOptions::new(model.clone())
    })
    .await
    .expect("reference engine")
}

async fn paged_engine(model: ModelSource, cache_tokens: usize, max_running: usize) -> LocalEngine {
    LocalEngine::start(EngineOptions {
        max_running,
        paged: Some(PagedOptions {
            block_size: BLOCK,
            cache_tokens,
        }),
        ..EngineOptions::new(model.clone())
    })
    .await
    .expect("paged engine")
}

fn ids(generation: &Generation) -> Vec<u32> {
    generation
        .token_ids
        .iter()
        .map(|id| id.expect("the engine reports each token's id"))
        .collect()
}

/// A greedy answer and, for each generated token, the two largest logits the sampler saw. They
/// are recorded by a logits processor: for greedy sampling mistral.rs 0.8.1 reports log10 of the
/// raw logit as the "logprob" (NaN for a negative one), which cannot measure how close a choice
/// was.
struct Answer {
    generation: Generation,
    top_two: Vec<(f32, f32)>,
}

impl Answer {
    fn ids(&self) -> Vec<u32> {
        ids(&self.generation)
    }
}

/// A request on its way, with the logits its steps saw.
struct Pending {
    pending: PendingCompletion,
    top_two: Arc<Mutex<Vec<(f32, f32)>>>,
}

impl Pending {
    async fn finish(self) -> Answer {
        let generation = self
            .pending
            .finish()
            .await
            .expect("every request is answered");
        let top_two = std::mem::take(&mut *self.top_two.lock().unwrap());
        assert_eq!(
            top_two.len(),
            generation.token_ids.len(),
            "one sampling step per token"
        );
        Answer {
            generation,
            top_two,
        }
    }
}

/// Sends a greedy request whose sampling steps record their two largest logits.
async fn submit(engine: &LocalEngine, prompt: &[u32], max_new: usize) -> Pending {
    let (request, pending) = engine.request(prompt, max_new);
    let Request::Normal(mut normal) = request else {
        unreachable!("LocalEngine sends normal requests")
    };
    let top_two = Arc::new(Mutex::new(Vec::new()));
    let record = top_two.clone();
    let recorder = move |logits: &Tensor, _: &[u32]| -> candle_core::Result<Tensor> {
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for v in values {
            if v > first {
                (first, second) = (v, first);
            } else if v > second {
                second = v;
            }
        }
        record.lock().unwrap().push((first, second));
        Ok(logits.clone())
    };
    normal.logits_processors = Some(vec![Arc::new(recorder) as Arc<dyn CustomLogitsProcessor>]);
    engine
        .runner()
        .get_sender(None)
        .expect("sender")
        .send(Request::Normal(normal))
        .await
        .expect("engine running");
    Pending { pending, top_two }
}

async fn complete(engine: &LocalEngine, prompt: &[u32], max_new: usize) -> Answer {
    submit(engine, prompt, max_new).await.finish().await
}

/// Same tokens; the chosen tokens' logits equal (`exact`: bit for bit) or within the tolerance.
/// Returns the largest difference.
///
/// Where `exact` is off, the two may part at a near-tie and only there: the reference's two best
/// logits within the tolerance of each other. Rounding decides such a choice, and the comparison
/// ends at that token, since what follows continues different text. Parting where the
/// reference's choice was clear fails.
fn assert_same(
    what: &str,
    model: &ModelSource,
    reference: &Answer,
    paged: &Answer,
    exact: bool,
) -> f32 {
    let (want, got) = (reference.ids(), paged.ids());
    let common = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
    let chosen =
        |answer: &Answer| -> Vec<f32> { answer.top_two[..common].iter().map(|t| t.0).collect() };
    let max_diff = chosen(reference)
        .iter()
        .zip(&chosen(paged))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let tolerance = logit_tolerance(model);
    let texts = format!(
        "paged {:?} vs non-paged {:?}",
        paged.generation.text, reference.generation.text
    );
    if exact {
        assert_eq!(got, want, "{what}: {texts}");
        assert_eq!(
            paged.top_two, reference.top_two,
            "{what}: logits not bit-identical"
        );
    } else {
        assert!(
            max_diff <= tolerance,
            "{what}: chosen logits differ by {max_diff}; {texts}"
        );
    }
    if common < want.len().min(got.len()) {
        let (first, second) = reference.top_two[common];
        let margin = first - second;
        assert!(
            margin <= tolerance,
            "{what}: parted at token {common} where the non-paged choice was clear (margin \
             {margin}, logits differing by up to {max_diff} before it); {texts}"
        );
        eprintln!(
            "{what}: {common} tokens equal, then a near-tie (margin {margin:e}) taken the other \
             way; largest logit difference before it {max_diff:e}"
        );
    } else {
        assert_eq!(got, want, "{what}: {texts}");
        eprintln!(
            "{what}: {} tokens equal, largest logit difference {max_diff:e}",
            got.len()
        );
    }
    max_diff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_prompt_and_its_block_hit_answer_as_the_non_paged_path_does() {
    for model in sources() {
        let reference = reference_engine(model.clone()).await;
        let paged = paged_engine(model.clone(), 4096, 4).await;
        let doc = document(&reference, 300);
        let prompt = question_prompt(&reference, &doc, "What is this document about?");
        assert!(prompt.len() > 3 * BLOCK);

        let expected = complete(&reference, &prompt, 24).await;
        let cold = complete(&paged, &prompt, 24).await;
        assert_same(&format!("{model:?} cold"), &model, &expected, &cold, true);
        // The same prompt again: the engine's own block cache serves every full block but the
        // one holding the last token.
        let hit = complete(&paged, &prompt, 24).await;
        assert_same(
            &format!("{model:?} block hit"),
            &model,
            &expected,
            &hit,
            false,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_prompt_one_token_past_a_block_boundary_answers_as_the_non_paged_path_does() {
    // D3: 8 full blocks and one token. The second time, the block hit leaves that one token.
    let model = ModelSource::HfDir(hf_dir());
    let reference = reference_engine(model.clone()).await;
    let paged = paged_engine(model.clone(), 4096, 4).await;
    let doc = document(&reference, 400);
    let mut prompt = question_prompt(&reference, &doc, "Summarise it.");
    prompt.truncate(8 * BLOCK + 1);

    let expected = complete(&reference, &prompt, 16).await;
    let first = complete(&paged, &prompt, 16).await;
    assert_same("32k+1 cold", &model, &expected, &first, true);
    let resent = complete(&paged, &prompt, 16).await;
    assert_same("32k+1 with 32k cached", &model, &expected, &resent, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_extending_a_block_aligned_answer_answers_as_the_non_paged_path_does() {
    // D2: the first answer ends exactly on a block boundary (prompt + answer = 11 blocks), so its
    // last block holds the last sampled token, which was never fed to the model.
    let model = ModelSource::HfDir(hf_dir());
    let reference = reference_engine(model.clone()).await;
    let paged = paged_engine(model.clone(), 4096, 4).await;
    let doc = document(&reference, 300);
    let prompt = question_prompt(&reference, &doc, "List three facts from it.");
    let target = prompt.len().div_ceil(BLOCK) * BLOCK + BLOCK;
    let answer_len = target - prompt.len();

    let first = complete(&paged, &prompt, answer_len).await;
    assert_eq!(
        first.top_two.len(),
        answer_len,
        "the answer must run to its limit for the case to be exercised: {:?}",
        first.generation.text
    );
    let mut follow_up = prompt.clone();
    follow_up.extend(first.ids());
    assert_eq!(follow_up.len() % BLOCK, 0);
    follow_up.extend(reference.encode("\nAnd which one matters most?").unwrap());

    let expected = complete(&reference, &follow_up, 16).await;
    let extended = complete(&paged, &follow_up, 16).await;
    assert_same(
        "follow-up after a block-aligned answer",
        &model,
        &expected,
        &extended,
        false,
    );
}

/// Sends every prompt at once and waits for all answers.
async fn all_at_once(engine: &LocalEngine, prompts: &[Vec<u32>], max_new: usize) -> Vec<Answer> {
    let mut pending = Vec::new();
    for prompt in prompts {
        pending.push(submit(engine, prompt, max_new).await);
    }
    let mut answers = Vec::new();
    for p in pending {
        answers.push(p.finish().await);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prompts_of_different_lengths_answer_as_the_non_paged_path_does() {
    // D1: admitted together, bucketed apart: the longer prompts are preempted before they run.
    for model in sources() {
        let reference = reference_engine(model.clone()).await;
        let paged = paged_engine(model.clone(), 4096, 4).await;
        let prompts: Vec<Vec<u32>> = [(140, "Who wrote it?"), (230, "When?"), (320, "Why?")]
            .into_iter()
            .map(|(n, q)| question_prompt(&reference, &document(&reference, n), q))
            .collect();
        let mut expected = Vec::new();
        for prompt in &prompts {
            expected.push(complete(&reference, prompt, 16).await);
        }
        // The control: the non-paged engine under the same load rounds differently too (its
        // decode steps batch the three sequences), by as much as the tolerance allows.
        let batched_reference = all_at_once(&reference, &prompts, 16).await;
        for (i, (want, got)) in expected.iter().zip(&batched_reference).enumerate() {
            assert_same(
                &format!("{model:?} non-paged concurrent prompt {i}"),
                &model,
                want,
                got,
                false,
            );
        }
        for round in ["first", "resent"] {
            let answers = all_at_once(&paged, &prompts, 16).await;
            for (i, (want, got)) in expected.iter().zip(&answers).enumerate() {
                assert_same(
                    &format!("{model:?} {round} prompt {i}"),
                    &model,
                    want,
                    got,
                    false,
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_prompts_with_block_hits_of_different_lengths_answer_as_the_non_paged_path_does() {
    // Two prompts with the same number of uncached tokens (8) after hits of 6 and 8 blocks share
    // one prompt step: the CPU runs them one sequence at a time (D5: its attention kernel ignores
    // the batch's per-sequence offsets, and the model builds one mask for no common past).
    for model in sources() {
        let reference = reference_engine(model.clone()).await;
        let paged = paged_engine(model.clone(), 4096, 4).await;
        let doc = document(&reference, 400);
        let prompts: Vec<Vec<u32>> = [(6 * BLOCK + 8, "Who?"), (8 * BLOCK + 8, "What?")]
            .into_iter()
            .map(|(n, q)| {
                let mut p = question_prompt(&reference, &doc, q);
                p.truncate(n);
                p
            })
            .collect();
        let mut expected = Vec::new();
        for prompt in &prompts {
            expected.push(complete(&reference, prompt, 12).await);
            complete(&paged, prompt, 12).await; // fills the block cache
        }
        let answers = all_at_once(&paged, &prompts, 12).await;
        for (i, (want, got)) in expected.iter().zip(&answers).enumerate() {
            assert_same(
                &format!("{model:?} batched hit {i}"),
                &model,
                want,
                got,
                false,
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_in_a_small_pool_answers_as_the_non_paged_path_does() {
    // Three sequences of 8 blocks each (prompt and answer) in a pool of 20: decode steps run out
    // of blocks and preempt, and the preempted sequences resume from their cached blocks.
    let model = ModelSource::HfDir(hf_dir());
    let reference = reference_engine(model.clone()).await;
    let paged = paged_engine(model.clone(), 20 * BLOCK, 4).await;
    let prompts: Vec<Vec<u32>> = ["Who?", "What?", "Where?"]
        .into_iter()
        .map(|q| {
            let mut p = question_prompt(&reference, &document(&reference, 180), q);
            p.truncate(200);
            p
        })
        .collect();
    let mut expected = Vec::new();
    for prompt in &prompts {
        expected.push(complete(&reference, prompt, 48).await);
    }
    let answers = all_at_once(&paged, &prompts, 48).await;
    for (i, (want, got)) in expected.iter().zip(&answers).enumerate() {
        assert_same(&format!("small pool prompt {i}"), &model, want, got, false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_pool_is_answered_with_an_error_and_the_engine_goes_on() {
    // 0.8.1 ended such a sequence (`FinishedIgnored`) without a response: a lost request.
    let model = ModelSource::HfDir(hf_dir());
    let paged = paged_engine(model.clone(), 8 * BLOCK, 4).await;
    let doc = document(&paged, 400);
    let too_long = question_prompt(&paged, &doc, "Why?");
    assert!(too_long.len() > 8 * BLOCK);
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        paged.complete(&too_long, 8),
    )
    .await
    .expect("the request was answered (0.8.1 never answered it)");
    let err = answer
        .expect_err("a prompt the pool cannot hold is an error")
        .to_string();
    assert!(
        err.contains("more than the PagedAttention cache can hold"),
        "{err}"
    );

    let short = question_prompt(&paged, &document(&paged, 100), "Why?");
    let after = paged
        .complete(&short, 8)
        .await
        .expect("the engine still answers");
    assert!(!after.token_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_whose_step_failed_give_their_blocks_back() {
    // D4: a sequence set to `Error` by a failed step was neither finished nor freed in 0.8.1, so
    // its blocks stayed taken. A pool of 16 blocks; four requests of 10 blocks whose sampling
    // fails (a logits processor that errors), then an ordinary one.
    let model = ModelSource::HfDir(hf_dir());
    let paged = paged_engine(model.clone(), 16 * BLOCK, 4).await;
    let sender = paged.runner().get_sender(None).expect("sender");
    let doc = document(&paged, 400);
    let wait = std::time::Duration::from_secs(120);
    for i in 0..4 {
        let mut prompt = question_prompt(&paged, &doc, &format!("Question {i}?"));
        prompt.truncate(300);
        let (request, pending) = paged.request(&prompt, 8);
        let Request::Normal(mut normal) = request else {
            unreachable!("LocalEngine sends normal requests")
        };
        let failing = |_: &Tensor, _: &[u32]| -> candle_core::Result<Tensor> {
            candle_core::bail!("a logits processor that always fails")
        };
        normal.logits_processors = Some(vec![Arc::new(failing) as Arc<dyn CustomLogitsProcessor>]);
        sender
            .send(Request::Normal(normal))
            .await
            .expect("engine running");
        let answer = tokio::time::timeout(wait, pending.finish())
            .await
            .expect("the failing request was answered");
        assert!(answer.is_err(), "request {i} should fail: {answer:?}");
    }
    let prompt = question_prompt(&paged, &document(&paged, 250), "And now?");
    let answer = tokio::time::timeout(wait, paged.complete(&prompt, 8))
        .await
        .expect("the ordinary request was answered");
    assert!(!answer.expect("an answer").token_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_engine_refuses_a_block_size_the_kernels_do_not_have() {
    let model = ModelSource::HfDir(hf_dir());
    let err = match LocalEngine::start(EngineOptions {
        paged: Some(PagedOptions {
            block_size: 24,
            cache_tokens: 1024,
        }),
        ..EngineOptions::new(model.clone())
    })
    .await
    {
        Ok(_) => panic!("a block size of 24 was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("Block size"), "{err}");
}

/// A hook that hands out one prepared prefix and records what the engine reports and offers.
#[derive(Default)]
struct Recorder {
    offer: Mutex<Option<KvPrefix>>,
    scheduled: Mutex<Vec<(Vec<u32>, usize)>>,
    saved: Mutex<Vec<FinishedPrefix>>,
}

#[async_trait]
impl KvHook for Recorder {
    /// The prepared prefix, once, to the first prompt it is a prefix of (not the engine's
    /// warm-up request).
    async fn load_prefix(&self, prompt: &[u32], _cached: usize) -> Option<KvPrefix> {
        let mut offer = self.offer.lock().unwrap();
        let fits = offer.as_ref()?.tokens.len() < prompt.len()
            && prompt.starts_with(&offer.as_ref()?.tokens);
        fits.then(|| offer.take()).flatten()
    }

    fn on_scheduled(&self, _seq_id: usize, prompt: &[u32], reused_tokens: usize) {
        self.scheduled
            .lock()
            .unwrap()
            .push((prompt.to_vec(), reused_tokens));
    }

    async fn save_prefix(&self, finished: FinishedPrefix) {
        self.saved.lock().unwrap().push(finished);
    }
}

impl Recorder {
    /// The reuse the engine last reported for `prompt`.
    fn reused(&self, prompt: &[u32]) -> usize {
        let scheduled = self.scheduled.lock().unwrap();
        let found = scheduled.iter().rev().find(|(p, _)| p == prompt);
        found.expect("the prompt was scheduled").1
    }

    /// The cache offered for the sequence answering `prompt` (waits up to 60 s for its task).
    async fn saved(&self, prompt: &[u32]) -> FinishedPrefix {
        for _ in 0..600 {
            let found = self
                .saved
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|f| f.prefix.tokens.starts_with(prompt))
                .cloned();
            if let Some(found) = found {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("no cache offered for the prompt");
    }
}

fn largest_difference(a: &KvPrefix, b: &KvPrefix) -> f32 {
    assert_eq!(a.layers.len(), b.layers.len());
    a.layers
        .iter()
        .zip(&b.layers)
        .flat_map(|(x, y)| [(&x.k, &y.k), (&x.v, &y.v)])
        .map(|(x, y)| {
            assert_eq!(x.dims(), y.dims());
            max_abs(&(x - y).unwrap())
        })
        .fold(0f32, f32::max)
}

/// `prefix`'s first `n` rows, marked approximate from `approximate_from`.
fn first_rows(prefix: &KvPrefix, n: usize, approximate_from: Option<usize>) -> KvPrefix {
    let rows = |t: &Tensor| t.narrow(2, 0, n).unwrap().contiguous().unwrap();
    KvPrefix {
        tokens: prefix.tokens[..n].to_vec(),
        layers: prefix
            .layers
            .iter()
            .map(|l| LayerKv {
                k: rows(&l.k),
                v: rows(&l.v),
            })
            .collect(),
        approximate_from,
    }
}

fn with_hook(options: EngineOptions, hook: Arc<dyn KvHook>) -> EngineOptions {
    options.with_kv_hook(hook)
}

/// A non-paged engine with no prefix cache that offers its caches to `hook`.
async fn non_paged_engine_with(model: &ModelSource, hook: Arc<dyn KvHook>) -> LocalEngine {
    let options = EngineOptions {
        prefix_cache: false,
        ..EngineOptions::new(model.clone())
    };
    LocalEngine::start(with_hook(options, hook)).await.unwrap()
}

fn paged_options(model: &ModelSource) -> EngineOptions {
    EngineOptions {
        paged: Some(PagedOptions {
            block_size: BLOCK,
            cache_tokens: 4096,
        }),
        ..EngineOptions::new(model.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_paged_sequence_offers_the_rows_a_non_paged_one_offers() {
    // The rows gathered from the blocks before they are freed are the non-paged cache's rows,
    // bit for bit (a cold prompt computes the same products on both paths), for the tokens
    // that have rows: the prompt and every answer token but the last.
    for model in hook_sources() {
        let flat_hook = Arc::new(Recorder::default());
        let paged_hook = Arc::new(Recorder::default());
        let flat = non_paged_engine_with(&model, flat_hook.clone()).await;
        let paged = LocalEngine::start(with_hook(paged_options(&model), paged_hook.clone()))
            .await
            .unwrap();
        let prompt = question_prompt(&flat, &document(&flat, 300), "Who may copy it?");
        let expected = complete(&flat, &prompt, 10).await;
        let answer = complete(&paged, &prompt, 10).await;
        assert_same("cold prompt", &model, &expected, &answer, true);
        let (want, got) = (
            flat_hook.saved(&prompt).await,
            paged_hook.saved(&prompt).await,
        );
        assert_eq!(
            got.prefix.tokens.len(),
            prompt.len() + answer.ids().len() - 1
        );
        assert_eq!(got.prefix.tokens, want.prefix.tokens);
        assert_eq!(
            (
                got.prompt_tokens,
                got.reused_tokens,
                got.prefix.approximate_from
            ),
            (prompt.len(), 0, None)
        );
        assert_eq!(
            largest_difference(&got.prefix, &want.prefix),
            0.0,
            "{model:?}: gathered rows differ from the non-paged cache"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_hit_fills_whole_blocks_and_answers_as_the_non_paged_path_does() {
    // Engine A (paged) saves a document's cache through the plugin; a fresh paged engine B loads
    // it for another question on the document: the rows up to the last block boundary come
    // from the store, the rest is prefilled, and the answer is the non-paged one.
    for model in hook_sources() {
        let store: Arc<dyn PrefixStore> = Arc::new(
            ObjectPrefixStore::new(
                Arc::new(InMemory::new()),
                ObjectStoreConfig {
                    level: Level::Lossless,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let hook = || Arc::new(KvPluginHook::new(store.clone(), HookConfig::default()));
        let reference = reference_engine(model.clone()).await;
        let doc = document(&reference, 700);
        let prompt_a = question_prompt(&reference, &doc, "Who may copy this license?");
        let prompt_b = question_prompt(&reference, &doc, "What does it say about patents?");
        let expected = complete(&reference, &prompt_b, 12).await;
        drop(reference);

        let hook_a = hook();
        let engine_a = LocalEngine::start(with_hook(paged_options(&model), hook_a.clone()))
            .await
            .unwrap();
        complete(&engine_a, &prompt_a, 12).await;
        let a = wait_for(&hook_a, 1, 1).await;
        assert_eq!((a.saves, a.hits), (1, 0), "{a:?}");
        drop(engine_a);

        let hook_b = hook();
        let engine_b = LocalEngine::start(with_hook(paged_options(&model), hook_b.clone()))
            .await
            .unwrap();
        let answer = complete(&engine_b, &prompt_b, 12).await;
        let b = wait_for(&hook_b, 1, 1).await;
        let shared = common_prefix_len(&prompt_a, &prompt_b);
        assert!(shared > 600, "the prompts share the document ({shared})");
        assert_eq!((b.hits, b.hit_tokens), (1, shared as u64), "{b:?}");
        assert_eq!(
            b.last_reused_tokens,
            (shared / BLOCK * BLOCK) as u64,
            "engine B took the whole blocks of the hit: {b:?}"
        );
        assert_same("store hit", &model, &expected, &answer, false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approximate_rows_never_enter_the_block_pool() {
    // A prefix marked approximate from row 100 is installed whole (rows up to the block
    // boundary), but only the blocks before row 100 are registered: the same prompt sent again
    // finds 96 tokens in the block pool, not the prompt step's or the decode steps' blocks, and
    // the finished sequence is offered marked approximate.
    let model = ModelSource::HfDir(hf_dir());
    let source_hook = Arc::new(Recorder::default());
    let flat = non_paged_engine_with(&model, source_hook.clone()).await;
    let doc = document(&flat, 400);
    let prompt_a = question_prompt(&flat, &doc, "Who may copy this license?");
    let prompt_b = question_prompt(&flat, &doc, "What does it say about patents?");
    complete(&flat, &prompt_a, 4).await;
    let expected = complete(&flat, &prompt_b, 12).await;
    let shared = common_prefix_len(&prompt_a, &prompt_b);
    let rows = source_hook.saved(&prompt_a).await.prefix;

    let hook = Arc::new(Recorder::default());
    *hook.offer.lock().unwrap() = Some(first_rows(&rows, shared, Some(100)));
    let paged = LocalEngine::start(with_hook(paged_options(&model), hook.clone()))
        .await
        .unwrap();
    let answer = complete(&paged, &prompt_b, 12).await;
    assert_eq!(hook.reused(&prompt_b), shared / BLOCK * BLOCK);
    // The rows were in fact exact: the answer is the non-paged one.
    assert_same("approximate install", &model, &expected, &answer, false);
    let saved = hook.saved(&prompt_b).await;
    assert_eq!(saved.prefix.approximate_from, Some(100));

    complete(&paged, &prompt_b, 4).await;
    assert_eq!(
        hook.reused(&prompt_b),
        96,
        "only the blocks before the first approximate row are in the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_whose_chunks_split_blocks_is_declined_and_the_engine_answers_as_stock() {
    // 48-token chunks end inside 32-token blocks: the plugin declines to register, so the
    // engine runs as the stock paged engine (no lookups, no saves).
    let model = ModelSource::HfDir(hf_dir());
    let store = ObjectPrefixStore::new(
        Arc::new(InMemory::new()),
        ObjectStoreConfig {
            chunk_tokens: 48,
            ..Default::default()
        },
    )
    .unwrap();
    let hook = Arc::new(KvPluginHook::new(Arc::new(store), HookConfig::default()));
    let reference = reference_engine(model.clone()).await;
    let paged = LocalEngine::start(with_hook(paged_options(&model), hook.clone()))
        .await
        .unwrap();
    let prompt = question_prompt(&reference, &document(&reference, 200), "Why?");
    let expected = complete(&reference, &prompt, 8).await;
    let answer = complete(&paged, &prompt, 8).await;
    assert_same("declined hook", &model, &expected, &answer, true);
    let m = hook.metrics().snapshot();
    assert_eq!(
        (m.lookups, m.finished_sequences, m.scheduled_sequences),
        (0, 0, 0),
        "{m:?}"
    );
}
