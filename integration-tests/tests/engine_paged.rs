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

use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use integration_tests::{document, gguf_path, hf_dir, question_prompt};
use mistralrs_core::{CustomLogitsProcessor, Request};
use mistralrs_kvplugin::{
    engine::{
        EngineOptions, Generation, LocalEngine, ModelSource, PagedOptions, PendingCompletion,
    },
    HookConfig, KvPluginHook, MemoryPrefixStore,
};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_engine_refuses_the_hook_and_answers_as_stock() {
    // The block path has no hook yet: the connector refuses it at start (counted), and the engine
    // runs as the stock paged engine, never with a half-working install.
    let model = ModelSource::HfDir(hf_dir());
    let hook = Arc::new(KvPluginHook::new(
        Arc::new(MemoryPrefixStore::new(1 << 30)),
        HookConfig::default(),
    ));
    let reference = reference_engine(model.clone()).await;
    let paged = LocalEngine::start(
        EngineOptions {
            paged: Some(PagedOptions::default()),
            ..EngineOptions::new(model.clone())
        }
        .with_kv_hook(hook.clone()),
    )
    .await
    .expect("paged engine with a hook");
    let prompt = question_prompt(&reference, &document(&reference, 200), "Why?");
    let expected = complete(&reference, &prompt, 8).await;
    let answer = complete(&paged, &prompt, 8).await;
    assert_same(
        "paged engine with a refused hook",
        &model,
        &expected,
        &answer,
        true,
    );
    // The engine registered (and refused) the hook before its loop answered anything.
    assert_eq!(hook.metrics().snapshot().refused_engines, 1);
}
