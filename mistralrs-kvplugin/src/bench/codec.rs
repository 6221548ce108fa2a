//! `kvplugin bench codec`: the codec's levels and the baselines side by side, on real KV from the
//! real model over real text.
//!
//! 1. The engine (SmolLM2-135M, safetensors folder, F32) prefills the first `--tokens` tokens of
//!    the text; a capturing hook receives the cache it finished with. That cache is cut into
//!    chunks of `--chunk-tokens` tokens, as the store does.
//! 2. Every scheme encodes and decodes every chunk: bits per value, ratio against 16-bit KV, and
//!    throughput in MB/s of 16-bit KV (2 bytes a value) on one thread and on all threads. Our
//!    levels decode the way the store loads a prefix (straight into the prefix's f32 tensors);
//!    the baselines through their own decoder, chunk by chunk.
//! 3. Quality, with the decoded cache in place of the exact one, on the [`LlamaEval`] reference
//!    forward (checked against the engine's K/V, and the difference printed): perplexity of the
//!    next `--eval-tokens` tokens of the text, top-1 agreement of the next-token predictions with
//!    the exact cache's over those tokens, and greedy agreement: the fraction of 64 greedily
//!    generated tokens equal, position by position, to those the exact cache gives. Where a
//!    continuation departs from the exact one, the table gives the first differing token and the
//!    exact cache's margin there (its top logit minus the runner-up's), and the exact
//!    continuation's nearest tie is printed: a small margin means any perturbation may flip it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use candle_core::{Device, Tensor};
use clap::Args;
use mistralrs_core::{FinishedPrefix, KvHook, KvPrefix};
use serde::Serialize;

use super::{
    baselines::{self, Scheme},
    median_time, Say,
};
use crate::{
    codec::{self, ChunkShape, EncodeOptions, Grouping, KvChunk, Level, LossySpec, QuantSpec},
    corpus,
    engine::{EngineOptions, LocalEngine, ModelSource},
    eval::{argmax_rows, nll, LlamaEval, PastKv},
    model, store,
};

/// Arguments of `kvplugin bench codec`.
#[derive(Debug, Args)]
pub struct CodecBenchArgs {
    /// The Hugging Face model folder [default: models/SmolLM2-135M-Instruct-f32].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text [default: the GNU GPL v3 shipped with the OS].
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of cached prefix.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
    /// Tokens after the prefix on which perplexity and top-1 agreement are measured.
    #[arg(long, default_value_t = 1024)]
    eval_tokens: usize,
    /// Timing repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the perplexity change against bits per value (our levels, the baselines) as SVG
    /// into this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Evaluate only this quantisation, e.g. `k=0.5,0.5,0.5;v=0.3,0.3,0.3` (steps for each third of
    /// the layers, per-channel groups; `vt=` instead of `v=` for per-token value groups).
    #[arg(long)]
    spec: Option<String>,
    /// Instead of the comparison, print where the default level's perplexity loss comes from
    /// (keys or values, each third of the layers, the first tokens).
    #[arg(long)]
    sensitivity: bool,
    /// Instead of the comparison, estimate per layer how many bits per value a calibrated PCA
    /// basis (per head, or over all heads) or a one-tap token predictor would save at the default
    /// level's distortion, and the sizes of the quantised integers with each token transform.
    #[arg(long)]
    transform_gain: bool,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct SchemeResult {
    name: String,
    bits_per_value: f64,
    ratio_vs_16bit: f64,
    encode_mb_s: f64,
    decode_mb_s: f64,
    encode_mb_s_all_threads: f64,
    decode_mb_s_all_threads: f64,
    ppl: f64,
    ppl_delta_pct: f64,
    top1_agreement: f64,
    greedy_agreement: f64,
    /// First greedy token that differs from the exact cache's (none if all 64 agree).
    greedy_first_divergence: Option<usize>,
    /// The exact cache's top-1 minus top-2 logit at that token.
    greedy_divergence_margin: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    tokens: usize,
    chunk_tokens: usize,
    eval_tokens: usize,
    threads: usize,
    ppl_exact: f64,
    engine_vs_reference_max_abs_diff: f64,
    levels: Vec<SchemeResult>,
    baselines: Vec<SchemeResult>,
}

/// Runs the benchmark.
pub fn run(args: CodecBenchArgs) -> anyhow::Result<()> {
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(|| model::smollm2_hf(&model::models_dir()));
    let text = corpus::text_or_default(args.text.as_deref())?;

    let runtime = tokio::runtime::Runtime::new()?;
    let (tokens, engine_kv) = runtime.block_on(capture_engine_kv(&model_dir, &text, &args))?;
    let prefix = &tokens[..args.tokens];
    let eval_ids = &tokens[args.tokens..];

    let reference = LlamaEval::load(&model_dir)?;
    let (_, reference_kv) = reference.forward(prefix, None)?;
    let max_diff = max_abs_diff(&engine_kv, &reference_kv)?;
    println!(
        "engine K/V vs reference forward: max |diff| = {max_diff:.2e} over {} tokens",
        prefix.len()
    );

    if args.transform_gain {
        return super::transform::report(&engine_kv, codec::SINK_TOKENS);
    }
    let chunks = to_chunks(&engine_kv, args.chunk_tokens)?;
    let n_values: usize = chunks.iter().map(|c| c.shape().n_values()).sum();
    let exact = Quality::measure(&reference, &engine_kv, prefix, eval_ids, None)?;
    println!(
        "exact cache: perplexity {:.4} over {} tokens",
        exact.ppl,
        eval_ids.len()
    );
    let (tie_at, tie) = exact
        .greedy_margins
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .expect("greedy tokens");
    println!(
        "exact greedy continuation: nearest tie at token {tie_at} (top-2 logit margin {tie:.3})"
    );

    if args.sensitivity {
        return sensitivity(&reference, &engine_kv, &chunks, prefix, eval_ids, &exact);
    }

    let threads = rayon::current_num_threads();
    let mut report = Report {
        model: model_dir.display().to_string(),
        tokens: args.tokens,
        chunk_tokens: args.chunk_tokens,
        eval_tokens: args.eval_tokens,
        threads,
        ppl_exact: exact.ppl,
        engine_vs_reference_max_abs_diff: max_diff,
        levels: Vec::new(),
        baselines: Vec::new(),
    };
    if let Some(spec) = &args.spec {
        let scheme = CodecLevel {
            level: Level::Default,
            spec: Some(parse_spec(spec)?),
            name: format!("custom {spec}"),
        };
        let row = evaluate(
            &scheme, &chunks, n_values, &args, &reference, &engine_kv, prefix, eval_ids, &exact,
        )?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let schemes: Vec<Box<dyn Scheme>> = vec![
        Box::new(baselines::ZstdRaw),
        Box::new(baselines::Zstd16),
        Box::new(baselines::uniform_8bit()),
        Box::new(baselines::kivi_2bit()),
        Box::new(baselines::LmCacheCacheGen),
    ];
    let bar = super::progress_bar_of(
        (Level::ALL.len() + schemes.len()) as u64,
        "bench codec",
        "schemes",
    );
    for level in Level::ALL {
        let scheme = CodecLevel::new(level);
        let row = evaluate(
            &scheme, &chunks, n_values, &args, &reference, &engine_kv, prefix, eval_ids, &exact,
        )?;
        bar.note(progress_line(&row));
        bar.inc(1);
        report.levels.push(row);
    }
    for scheme in &schemes {
        let row = evaluate(
            scheme.as_ref(),
            &chunks,
            n_values,
            &args,
            &reference,
            &engine_kv,
            prefix,
            eval_ids,
            &exact,
        )?;
        bar.note(progress_line(&row));
        bar.inc(1);
        report.baselines.push(row);
    }
    bar.finish_and_clear();

    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &args.plot {
        rate_quality_plot(&report).write(path)?;
    }
    Ok(())
}

/// Perplexity change against bits per value: our levels as one line, each baseline a point.
fn rate_quality_plot(report: &Report) -> super::plot::LinePlot {
    use super::plot::{LinePlot, Scale, Series};
    let point = |r: &SchemeResult| (r.bits_per_value, r.ppl_delta_pct.abs().max(1e-4));
    let mut ours: Vec<(f64, f64)> = report.levels.iter().map(point).collect();
    ours.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut series = vec![Series {
        name: "kvplugin levels".into(),
        points: ours,
    }];
    series.extend(report.baselines.iter().map(|r| Series {
        name: r.name.clone(),
        points: vec![point(r)],
    }));
    LinePlot {
        title: format!(
            "KV codecs: quality against size ({} tokens, {} eval tokens)",
            report.tokens, report.eval_tokens
        ),
        x_label: "bits per value".into(),
        y_label: "|perplexity change|, % (log)".into(),
        x_scale: Scale::Linear,
        y_scale: Scale::Log,
        series,
    }
}

/// The codec at one level, as a [`Scheme`].
struct CodecLevel {
    level: Level,
    spec: Option<LossySpec>,
    name: String,
}

impl CodecLevel {
    fn new(level: Level) -> Self {
        Self {
            level,
            spec: None,
            name: level.name().into(),
        }
    }
}

const BENCH_MODEL: [u8; 32] = [0; 32];

impl Scheme for CodecLevel {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn encode(&self, chunk: &KvChunk, start: usize) -> Vec<u8> {
        let options = EncodeOptions {
            spec: self.spec,
            ..EncodeOptions::for_chunk(self.level, start)
        };
        codec::encode_with(chunk, &options, &BENCH_MODEL).expect("valid chunk")
    }
    fn decode(&self, bytes: &[u8], _shape: ChunkShape) -> KvChunk {
        codec::decode(bytes, &BENCH_MODEL).expect("own output")
    }
    /// The object store's load path: every chunk decoded straight into its slice of the prefix's
    /// full-length f32 tensors (`ParsedChunk::decode_tensor_into`), tensors in parallel. The
    /// tensors are allocated by the first (untimed) call and reused, so that the figure is the
    /// codec's, not the first touch of fresh pages (which the store pays once per load).
    fn decode_prefix(
        &self,
        encoded: &[Vec<u8>],
        shapes: &[ChunkShape],
        buffers: &mut Vec<Vec<f32>>,
    ) {
        use rayon::prelude::*;
        let parsed: Vec<codec::ParsedChunk<'_>> = encoded
            .iter()
            .map(|b| codec::ParsedChunk::parse(b, &BENCH_MODEL).expect("own output"))
            .collect();
        let tokens: usize = shapes.iter().map(|s| s.n_tokens).sum();
        let first = shapes[0];
        let len = first.n_kv_heads * tokens * first.head_dim;
        if buffers.len() != first.n_tensors() || buffers.iter().any(|b| b.len() != len) {
            *buffers = vec![vec![0f32; len]; first.n_tensors()];
        }
        buffers.par_iter_mut().enumerate().for_each(|(t, data)| {
            let mut token_offset = 0;
            for (chunk, shape) in parsed.iter().zip(shapes) {
                let mut dest = codec::Dest {
                    data,
                    tokens,
                    token_offset,
                    take: shape.n_tokens,
                };
                chunk.decode_tensor_into(t, &mut dest).expect("own output");
                token_offset += shape.n_tokens;
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    scheme: &dyn Scheme,
    chunks: &[KvChunk],
    n_values: usize,
    args: &CodecBenchArgs,
    reference: &LlamaEval,
    exact_kv: &PastKv,
    prefix: &[u32],
    eval_ids: &[u32],
    exact: &Quality,
) -> anyhow::Result<SchemeResult> {
    let starts: Vec<usize> = chunks
        .iter()
        .scan(0, |acc, c| {
            let start = *acc;
            *acc += c.shape().n_tokens;
            Some(start)
        })
        .collect();
    let encode_all = || -> Vec<Vec<u8>> {
        chunks
            .iter()
            .zip(&starts)
            .map(|(c, &s)| scheme.encode(c, s))
            .collect()
    };
    let encoded = encode_all();
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    let mb = n_values as f64 * 2.0 / 1e6;
    let mb_s = |d: Duration| mb / d.as_secs_f64();
    let single = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let decode_all = || -> Vec<KvChunk> {
        encoded
            .iter()
            .zip(chunks)
            .map(|(b, c)| scheme.decode(b, c.shape()))
            .collect()
    };
    let shapes: Vec<ChunkShape> = chunks.iter().map(KvChunk::shape).collect();
    let mut buffers = Vec::new();
    let mut decode_prefix = || scheme.decode_prefix(&encoded, &shapes, &mut buffers);
    let enc1 = single.install(|| median_time(args.reps, || drop(encode_all())));
    let dec1 = single.install(|| median_time(args.reps, &mut decode_prefix));
    let enc_all = median_time(args.reps, || drop(encode_all()));
    let dec_all = median_time(args.reps, &mut decode_prefix);

    let kv = from_chunks(&decode_all(), exact_kv.k.len())?;
    let q = Quality::measure(reference, &kv, prefix, eval_ids, Some(exact))?;
    let bits = bytes as f64 * 8.0 / n_values as f64;
    let row = SchemeResult {
        name: scheme.name(),
        bits_per_value: bits,
        ratio_vs_16bit: 16.0 / bits,
        encode_mb_s: mb_s(enc1),
        decode_mb_s: mb_s(dec1),
        encode_mb_s_all_threads: mb_s(enc_all),
        decode_mb_s_all_threads: mb_s(dec_all),
        ppl: q.ppl,
        ppl_delta_pct: (q.ppl / exact.ppl - 1.0) * 100.0,
        top1_agreement: q.top1_agreement,
        greedy_agreement: q.greedy_agreement,
        greedy_first_divergence: q.greedy_divergence.map(|(at, _)| at),
        greedy_divergence_margin: q.greedy_divergence.map(|(_, m)| m as f64),
    };
    Ok(row)
}

/// One line per evaluated scheme while the benchmark runs.
fn progress_line(row: &SchemeResult) -> String {
    format!(
        "  {:<18} {:>6.3} bits/value  ppl {:+.3}%",
        row.name, row.bits_per_value, row.ppl_delta_pct
    )
}

const GREEDY_TOKENS: usize = 64;

/// Quality of a cache: perplexity of the text that follows it, top-1 predictions and a greedy
/// continuation, with their agreement against the exact cache's.
pub(crate) struct Quality {
    pub(crate) ppl: f64,
    predictions: Vec<u32>,
    greedy: Vec<u32>,
    /// Top logit minus the runner-up's at each greedy step.
    greedy_margins: Vec<f32>,
    pub(crate) top1_agreement: f64,
    pub(crate) greedy_agreement: f64,
    /// The first greedy step that differs from the exact cache's, and the exact cache's margin
    /// there: how near a tie the continuation was when it flipped.
    pub(crate) greedy_divergence: Option<(usize, f32)>,
}

impl Quality {
    /// Quality of `kv` (the cache of `prefix`), compared with `exact` when given.
    pub(crate) fn measure(
        model: &LlamaEval,
        kv: &PastKv,
        prefix: &[u32],
        eval_ids: &[u32],
        exact: Option<&Quality>,
    ) -> anyhow::Result<Self> {
        // logits[i] predicts eval_ids[i + 1]; the prediction of eval_ids[0] comes from the last
        // prefix position, which the cache does not cover, so it is left out.
        let (logits, _) = model.forward(eval_ids, Some(kv))?;
        let n = eval_ids.len() - 1;
        let logits = logits.narrow(0, 0, n)?;
        let losses = nll(&logits, &eval_ids[1..])?;
        let ppl = (losses.iter().sum::<f64>() / n as f64).exp();
        let predictions = argmax_rows(&logits)?;
        // Greedy: the cache without its last token, which is fed as the first input.
        let last = *prefix.last().expect("non-empty prefix");
        let trimmed = PastKv {
            k: kv
                .k
                .iter()
                .map(|t| t.narrow(2, 0, prefix.len() - 1))
                .collect::<candle_core::Result<_>>()?,
            v: kv
                .v
                .iter()
                .map(|t| t.narrow(2, 0, prefix.len() - 1))
                .collect::<candle_core::Result<_>>()?,
        };
        let (greedy, greedy_margins) = model.greedy(&trimmed, last, GREEDY_TOKENS)?;
        let agree = |a: &[u32], b: &[u32]| {
            a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len().max(1) as f64
        };
        let (top1_agreement, greedy_agreement) = match exact {
            Some(e) => (
                agree(&predictions, &e.predictions),
                agree(&greedy, &e.greedy),
            ),
            None => (1.0, 1.0),
        };
        let greedy_divergence = exact.and_then(|e| {
            let at = greedy.iter().zip(&e.greedy).position(|(a, b)| a != b)?;
            Some((at, e.greedy_margins[at]))
        });
        Ok(Self {
            ppl,
            predictions,
            greedy,
            greedy_margins,
            top1_agreement,
            greedy_agreement,
            greedy_divergence,
        })
    }
}

/// A hook that keeps the cache of the first real (non warm-up) sequence the engine finishes.
#[derive(Default)]
struct CaptureHook {
    captured: Mutex<Option<KvPrefix>>,
}

#[async_trait]
impl KvHook for CaptureHook {
    async fn save_prefix(&self, finished: FinishedPrefix) {
        if finished.prompt_tokens > 1 {
            self.captured
                .lock()
                .expect("lock")
                .get_or_insert(finished.prefix);
        }
    }
}

/// Tokenises the text, has the engine prefill `--tokens` of it and returns the tokens (prefix and
/// evaluation span) and the engine's cache of the prefix.
async fn capture_engine_kv(
    model_dir: &std::path::Path,
    text: &str,
    args: &CodecBenchArgs,
) -> anyhow::Result<(Vec<u32>, PastKv)> {
    let hook = Arc::new(CaptureHook::default());
    let engine = LocalEngine::start(
        EngineOptions::new(ModelSource::HfDir(model_dir.to_path_buf())).with_kv_hook(hook.clone()),
    )
    .await?;
    let ids = engine.encode(text)?;
    let needed = args.tokens + args.eval_tokens;
    if ids.len() < needed {
        anyhow::bail!(
            "the text has {} tokens; --tokens + --eval-tokens need {needed}",
            ids.len()
        );
    }
    let tokens = ids[..needed].to_vec();
    engine.complete(&tokens[..args.tokens], 1).await?;
    let prefix = loop {
        if let Some(p) = hook.captured.lock().expect("lock").take() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    anyhow::ensure!(
        prefix.tokens[..] == tokens[..args.tokens],
        "captured another prefix"
    );
    let to_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.force_contiguous();
    Ok((
        tokens,
        PastKv {
            k: prefix
                .layers
                .iter()
                .map(|l| to_cpu(&l.k))
                .collect::<candle_core::Result<_>>()?,
            v: prefix
                .layers
                .iter()
                .map(|l| to_cpu(&l.v))
                .collect::<candle_core::Result<_>>()?,
        },
    ))
}

fn max_abs_diff(a: &PastKv, b: &PastKv) -> anyhow::Result<f64> {
    let mut max = 0f64;
    for (x, y) in a.k.iter().chain(&a.v).zip(b.k.iter().chain(&b.v)) {
        let d = (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        max = max.max(d as f64);
    }
    Ok(max)
}

/// Cuts a cache into chunks of `chunk_tokens` tokens (the last may be shorter), as the store does.
fn to_chunks(kv: &PastKv, chunk_tokens: usize) -> anyhow::Result<Vec<KvChunk>> {
    let prefix = KvPrefix {
        tokens: vec![0; kv.len()],
        approximate_from: None,
        layers: kv
            .k
            .iter()
            .zip(&kv.v)
            .map(|(k, v)| mistralrs_core::LayerKv {
                k: k.clone(),
                v: v.clone(),
            })
            .collect(),
    };
    (0..kv.len())
        .step_by(chunk_tokens)
        .map(|start| {
            Ok(store::chunk_of(
                &prefix,
                start,
                chunk_tokens.min(kv.len() - start),
            )?)
        })
        .collect()
}

/// Reassembles chunks into a cache.
fn from_chunks(chunks: &[KvChunk], n_layers: usize) -> anyhow::Result<PastKv> {
    let mut parts = vec![(Vec::new(), Vec::new()); n_layers];
    for chunk in chunks {
        for ((ks, vs), (k, v)) in parts
            .iter_mut()
            .zip(store::tensors_of(chunk, chunk.shape().n_tokens)?)
        {
            ks.push(k);
            vs.push(v);
        }
    }
    let mut past = PastKv {
        k: Vec::with_capacity(n_layers),
        v: Vec::with_capacity(n_layers),
    };
    for (ks, vs) in parts {
        past.k.push(Tensor::cat(&ks, 2)?);
        past.v.push(Tensor::cat(&vs, 2)?);
    }
    Ok(past)
}

fn print_table(report: &Report) {
    println!(
        "\nSmolLM2-135M F32, {} cached tokens in chunks of {}, {} threads; exact perplexity {:.4}",
        report.tokens, report.chunk_tokens, report.threads, report.ppl_exact
    );
    println!(
        "{:<18} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}  diverges at (exact margin)",
        "scheme",
        "bits/val",
        "ratio",
        "enc MB/s",
        "dec MB/s",
        "enc all",
        "dec all",
        "ppl +%",
        "top-1",
        "greedy"
    );
    for r in report.levels.iter().chain(&report.baselines) {
        println!(
            "{:<18} {:>9.3} {:>7.2} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.3} {:>7.3} {:>7.3}  {}",
            r.name,
            r.bits_per_value,
            r.ratio_vs_16bit,
            r.encode_mb_s,
            r.decode_mb_s,
            r.encode_mb_s_all_threads,
            r.decode_mb_s_all_threads,
            r.ppl_delta_pct,
            r.top1_agreement,
            r.greedy_agreement,
            match (r.greedy_first_divergence, r.greedy_divergence_margin) {
                (Some(at), Some(margin)) => format!("{at} ({margin:.3})"),
                _ => "-".into(),
            }
        );
    }
}

/// Perplexity change when only part of the cache goes through the default level.
fn sensitivity(
    reference: &LlamaEval,
    exact_kv: &PastKv,
    chunks: &[KvChunk],
    prefix: &[u32],
    eval_ids: &[u32],
    exact: &Quality,
) -> anyhow::Result<()> {
    let decoded: Vec<KvChunk> = chunks
        .iter()
        .map(|c| {
            codec::decode(
                &codec::encode(c, Level::Default, &BENCH_MODEL)?,
                &BENCH_MODEL,
            )
        })
        .collect::<Result<_, _>>()?;
    let lossy = from_chunks(&decoded, exact_kv.k.len())?;
    let n_layers = exact_kv.k.len();
    let mix =
        |use_lossy: &dyn Fn(usize, bool) -> bool, exact_tokens: usize| -> anyhow::Result<PastKv> {
            let pick = |l: usize, is_v: bool| -> anyhow::Result<Tensor> {
                let (e, q) = if is_v {
                    (&exact_kv.v[l], &lossy.v[l])
                } else {
                    (&exact_kv.k[l], &lossy.k[l])
                };
                if !use_lossy(l, is_v) {
                    return Ok(e.clone());
                }
                if exact_tokens == 0 {
                    return Ok(q.clone());
                }
                let n = e.dims()[2];
                Ok(Tensor::cat(
                    &[
                        e.narrow(2, 0, exact_tokens)?,
                        q.narrow(2, exact_tokens, n - exact_tokens)?,
                    ],
                    2,
                )?)
            };
            Ok(PastKv {
                k: (0..n_layers)
                    .map(|l| pick(l, false))
                    .collect::<anyhow::Result<_>>()?,
                v: (0..n_layers)
                    .map(|l| pick(l, true))
                    .collect::<anyhow::Result<_>>()?,
            })
        };
    let third = move |l: usize| (l * 3 / n_layers).min(2);
    /// (name, whether layer `l`'s K (false) or V (true) goes through the codec, exact tokens)
    type Case<'a> = (String, Box<dyn Fn(usize, bool) -> bool + 'a>, usize);
    let cases: Vec<Case> = vec![
        ("all".into(), Box::new(|_, _| true), 0),
        ("keys only".into(), Box::new(|_, v| !v), 0),
        ("values only".into(), Box::new(|_, v| v), 0),
        ("first third".into(), Box::new(move |l, _| third(l) == 0), 0),
        (
            "middle third".into(),
            Box::new(move |l, _| third(l) == 1),
            0,
        ),
        ("last third".into(), Box::new(move |l, _| third(l) == 2), 0),
        ("layer 0 only".into(), Box::new(|l, _| l == 0), 0),
        ("all but token 0".into(), Box::new(|_, _| true), 1),
        ("all but tokens 0-3".into(), Box::new(|_, _| true), 4),
    ];
    for (name, f, exact_tokens) in cases {
        let kv = mix(f.as_ref(), exact_tokens)?;
        let q = Quality::measure(reference, &kv, prefix, eval_ids, Some(exact))?;
        println!(
            "{name:<20} ppl {:+7.3}%  top-1 {:.3}  greedy {:.3}{}",
            (q.ppl / exact.ppl - 1.0) * 100.0,
            q.top1_agreement,
            q.greedy_agreement,
            match q.greedy_divergence {
                Some((at, margin)) => format!("  diverges at {at} (exact margin {margin:.3})"),
                None => String::new(),
            }
        );
    }
    Ok(())
}

/// Parses `k=a,b,c;v=d,e,f` (or `vt=` / `kt=` for per-token groups).
fn parse_spec(text: &str) -> anyhow::Result<LossySpec> {
    let mut keys = None;
    let mut values = None;
    for part in text.split(';') {
        let (name, steps) = part
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--spec part `{part}` has no `=`"))?;
        let steps: Vec<f32> = steps
            .split(',')
            .map(|s| s.trim().parse::<f32>())
            .collect::<Result<_, _>>()?;
        let steps: [f32; 3] = steps
            .try_into()
            .map_err(|_| anyhow::anyhow!("--spec `{part}` needs three steps"))?;
        let grouping = if name.ends_with('t') {
            Grouping::PerToken
        } else if name.ends_with('h') {
            Grouping::PerHead
        } else {
            Grouping::PerChannel
        };
        let q = Some(QuantSpec { steps, grouping });
        match name.trim() {
            "k" | "kt" | "kh" => keys = q,
            "v" | "vt" | "vh" => values = q,
            other => anyhow::bail!("--spec names `{other}`; use k, kt, kh, v, vt or vh"),
        }
    }
    Ok(LossySpec {
        keys: keys.ok_or_else(|| anyhow::anyhow!("--spec has no keys"))?,
        values: values.ok_or_else(|| anyhow::anyhow!("--spec has no values"))?,
    })
}
