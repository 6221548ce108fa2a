//! The GGUF -> Hugging Face conversion (`kvplugin convert`, run by `make setup`): the converted
//! tokenizer encodes like the engine's GGUF tokenizer, and the converted model answers correctly
//! through the engine's safetensors loader.

use integration_tests::{gguf_path, hf_dir};
use mistralrs_kvplugin::engine::{chat_prompt, EngineOptions, LocalEngine, ModelSource};

const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_model_answers_correctly_and_tokenizes_like_the_gguf() {
    let hf = LocalEngine::start(EngineOptions::new(ModelSource::HfDir(hf_dir())))
        .await
        .unwrap();
    let prompt = hf
        .encode(&chat_prompt(SYSTEM, "What is the capital of France?"))
        .unwrap();
    let answer = hf.complete(&prompt, 12).await.unwrap();
    assert!(
        answer.text.starts_with("The capital of France is Paris."),
        "converted model answered {:?}",
        answer.text
    );

    let gguf = LocalEngine::start(EngineOptions::new(ModelSource::Gguf(gguf_path())))
        .await
        .unwrap();
    let texts = [
        chat_prompt(SYSTEM, "What is the capital of France?"),
        "In 2024, 1,234 people paid $5.99 each -- isn't that odd? Yes.\nNew line.".to_string(),
        // Whitespace runs collapsed: on runs of spaces before a newline the two tokenizers split
        // differently by design. The converted one follows SmolLM2's own tokenizer.json (digits,
        // then the GPT-2 byte-level regex, as llama.cpp's `smollm` pre-tokenizer); mistral.rs
        // builds every gpt2-type GGUF tokenizer with a Llama-3-style split regex.
        std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
            .expect("GPL-3 text")
            .split_whitespace()
            .take(600)
            .collect::<Vec<_>>()
            .join(" "),
    ];
    for text in &texts {
        assert_eq!(
            hf.encode(text).unwrap(),
            gguf.encode(text).unwrap(),
            "tokenizers disagree on {:?}",
            &text[..text.len().min(60)]
        );
    }
    // No answer check on the GGUF itself: the engine runs it with Q4_1 weights and Q8 activations
    // in its matmuls, and at 135M parameters that changes this answer (it names Paris districts).
}
