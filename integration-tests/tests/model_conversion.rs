//! The GGUF -> Hugging Face conversion (`kvplugin convert`, run by `make setup`): the converted
//! tokenizer encodes like the engine's GGUF tokenizer, and the converted model answers correctly
//! through the engine's safetensors loader.

use integration_tests::{gguf_path, hf_dir};
use mistralrs_kvplugin::engine::{chat_prompt, EngineOptions, LocalEngine, ModelSource};

const SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_model_answers_like_the_gguf() {
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
        "In 2024, 1,234 people paid $5.99 each -- isn't that odd?\n\tTabs and  spaces.".to_string(),
        std::fs::read_to_string("/usr/share/common-licenses/GPL-3")
            .unwrap_or_default()
            .chars()
            .take(4000)
            .collect(),
    ];
    for text in &texts {
        assert_eq!(
            hf.encode(text).unwrap(),
            gguf.encode(text).unwrap(),
            "tokenizers disagree on {:?}",
            &text[..text.len().min(60)]
        );
    }
    let gguf_answer = gguf.complete(&prompt, 12).await.unwrap();
    assert!(
        gguf_answer.text.starts_with("The capital of France is Paris."),
        "GGUF model answered {:?}",
        gguf_answer.text
    );
}
