//! Looking at a model: `inspect`, `generate` and `eval`.

use crate::model::tokenizer::Tokenizer;
use crate::model::{Checkpoint, Transformer};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub fn inspect(ckpt: &Checkpoint, json: bool) -> Result<()> {
    let d = &ckpt.dims;
    let tokenizer = Tokenizer::for_model(&ckpt.dir, &ckpt.arch.family).map(|t| t.name().to_string()).unwrap_or_else(|e| format!("none ({e})"));
    let facts = json!({
        "model": ckpt.dir,
        "family": ckpt.arch.family,
        "model_type": ckpt.config["model_type"],
        "layers": d.layers,
        "heads": d.heads,
        "kv_heads": d.kv_heads,
        "head_dim": d.head_dim,
        "d_model": d.d_model,
        "vocab": d.vocab,
        "context": d.context,
        "parameters": ckpt.parameters(),
        "dtype": ckpt.dtype(),
        "size_bytes": ckpt.size_bytes(),
        "tied_embeddings": ckpt.tied(),
        "shards": ckpt.shard_paths().count(),
        "tokenizer": tokenizer,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
        return Ok(());
    }
    for (k, v) in facts.as_object().unwrap() {
        let v = match (k.as_str(), v) {
            ("parameters", v) => format!("{} ({:.1} M)", v, v.as_f64().unwrap_or(0.0) / 1e6),
            ("size_bytes", v) => format!("{:.1} MB", v.as_f64().unwrap_or(0.0) / 1e6),
            (_, serde_json::Value::String(s)) => s.clone(),
            (_, v) => v.to_string(),
        };
        println!("{k:<16} {v}");
    }
    Ok(())
}

/// A GGUF file before import: version, architecture, tensor types, parameters and metadata keys,
/// and whether `scalpel import` would take it (if not, every reason why).
pub fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
    let file = crate::gguf::GgufFile::open(path)?;
    let mut types = std::collections::BTreeMap::new();
    for t in file.tensors() {
        *types.entry(t.type_name()).or_insert(0usize) += 1;
    }
    // Each count fits (the reader checks), their sum over an absurd file need not.
    let parameters = file.tensors().iter().fold(0usize, |n, t| n.saturating_add(t.shape.iter().product()));
    let problems = file.import_problems();
    let facts = json!({
        "file": path,
        "gguf_version": file.version(),
        "architecture": file.architecture().ok(),
        "name": file.metadata().get("general.name").and_then(|v| v.as_str()),
        "tensors": file.tensors().len(),
        "tensor_types": types,
        "parameters": parameters,
        "metadata_keys": file.metadata().len(),
        "importable": problems.is_empty(),
        "import_problems": problems,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
        return Ok(());
    }
    for (k, v) in facts.as_object().unwrap() {
        if !matches!(k.as_str(), "importable" | "import_problems") {
            println!("{k:<16} {}", v.as_str().map_or(v.to_string(), String::from));
        }
    }
    if problems.is_empty() {
        println!("\nconvert it with `scalpel import {} OUT_DIR`", path.display());
    } else {
        println!("\n`scalpel import` would refuse this file:");
        for p in &problems {
            println!("  - {p}");
        }
    }
    Ok(())
}

pub struct Sampling {
    pub top_p: Option<f64>,
    pub temperature: f64,
    pub seed: u64,
}

/// Continues `prompt` token by token through a key/value cache, until an end-of-sequence token,
/// `max_tokens`, or the model's context.
pub fn generate(ckpt: &Checkpoint, device: Device, prompt: &str, max_tokens: usize, s: &Sampling, json: bool) -> Result<()> {
    let tokenizer = Tokenizer::for_model(&ckpt.dir, &ckpt.arch.family)?;
    let net = Transformer::load(ckpt, device, Kind::Float)?;
    let eos = eos_ids(ckpt, &tokenizer);
    let prompt_ids = tokenizer.encode_prompt(prompt)?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty after tokenizing");
    }
    if prompt_ids.len() >= ckpt.dims.context {
        bail!("the prompt has {} tokens: no room left in the model's context of {}", prompt_ids.len(), ckpt.dims.context);
    }
    check_vocab(&prompt_ids, ckpt.dims.vocab, "the prompt")?;
    tch::manual_seed(s.seed as i64);
    let mut cache = net.cache();
    let mut logits = net.step(&Tensor::from_slice(&prompt_ids).unsqueeze(0), &mut cache)?;
    let mut new = Vec::new();
    let mut stop = "max_tokens";
    for _ in 0..max_tokens {
        let last = logits.get(0).get(-1).to_kind(Kind::Float).to_device(Device::Cpu);
        let next = match s.top_p {
            None => last.argmax(-1, false).int64_value(&[]),
            Some(p) => sample_top_p(&(last / s.temperature.max(1e-6)), p),
        };
        if eos.contains(&next) {
            stop = "eos";
            break;
        }
        new.push(next);
        if cache.len() as usize >= ckpt.dims.context {
            stop = "context";
            break;
        }
        logits = net.step(&Tensor::from_slice(&[next]).unsqueeze(0), &mut cache)?;
    }
    let completion = tokenizer.decode(&new)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "prompt": prompt, "completion": completion, "tokens": new.len(), "stopped_by": stop }))?);
    } else {
        println!("{prompt}{completion}");
    }
    Ok(())
}

/// The tokens that end a generation: generation_config.json's `eos_token_id`, else config.json's,
/// else the tokenizer's end-of-sequence token.
fn eos_ids(ckpt: &Checkpoint, tokenizer: &Tokenizer) -> Vec<i64> {
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        match v {
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_i64()).collect(),
            v => v.as_i64().into_iter().collect(),
        }
    };
    let generation = scalpel_files::read_regular_string(&ckpt.dir.join("generation_config.json")).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    if let Some(found) = generation.map(|g| ids(&g["eos_token_id"])).filter(|v| !v.is_empty()) {
        return found;
    }
    let found = ids(&ckpt.config["eos_token_id"]);
    if !found.is_empty() {
        return found;
    }
    tokenizer.eos(&ckpt.dir).into_iter().collect()
}

/// Samples from the smallest set of most likely tokens whose probabilities add up to `p`.
fn sample_top_p(logits: &Tensor, p: f64) -> i64 {
    let probs = logits.softmax(-1, Kind::Float);
    let (sorted, order) = probs.sort(-1, true);
    let cum = sorted.cumsum(-1, Kind::Float);
    // Keep a token while the mass before it is below p (so the first token is always kept).
    let keep = (&cum - &sorted).lt(p);
    let kept = sorted * keep.to_kind(Kind::Float);
    let choice = kept.multinomial(1, false).int64_value(&[0]);
    order.int64_value(&[choice])
}

/// Token ids must index the model's embedding.
pub fn check_vocab(ids: &[i64], vocab: usize, what: &str) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        bail!("{what} has token id {bad}, but the model's vocabulary is 0..{vocab}: tokenizer and model do not belong together");
    }
    Ok(())
}

/// Windows evaluated at once: enough to keep the cores busy, few enough to bound the logits' memory.
const EVAL_BATCH: usize = 8;

/// What `eval` reads: windows of a text file, or windows of tokenized data.
#[derive(Debug, Clone)]
pub enum EvalData {
    /// Consecutive windows of `tokens` tokens (BOS first when `bos`).
    Text { path: PathBuf, bos: bool },
    /// A tokenized dataset's validation split (else its training data), or `[N, T]` token ids.
    Tokens(PathBuf),
}

impl EvalData {
    /// Text unless the path is tokenized data: a folder, an llm.c `.bin`, or `.safetensors` / `.npy` ids.
    pub fn from_path(path: PathBuf, bos: bool) -> Self {
        let tokens = path.is_dir() || path.extension().is_some_and(|e| e == "bin" || e == "safetensors" || e == "npy");
        if tokens {
            EvalData::Tokens(path)
        } else {
            EvalData::Text { path, bos }
        }
    }
}

pub fn eval(ckpt: &Checkpoint, device: Device, data: &EvalData, tokens: usize, max_windows: usize, json: bool) -> Result<()> {
    let (windows, first) = eval_windows(ckpt, data, tokens, max_windows, "--tokens")?;
    let net = Transformer::load(ckpt, device, Kind::Float)?;
    let (mean, count) = mean_nll(&net, &windows, first)?;
    let n = windows.size()[0];
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "windows": n, "tokens": count, "mean_nll": mean, "perplexity": mean.exp() }))?);
    } else {
        println!("{n} windows, {count} predicted tokens: mean NLL {mean:.4} nats/token, perplexity {:.2}", mean.exp());
    }
    Ok(())
}

/// The evaluation windows `[n, tokens]` of `data` for this model, and the first position that is predicted
/// from (1 when a BOS leads every window: it is context only, never a target). `option` names how the user
/// sets `tokens` (`eval --tokens`, `compare --eval-tokens`), for the messages.
pub fn eval_windows(ckpt: &Checkpoint, data: &EvalData, tokens: usize, max_windows: usize, option: &str) -> Result<(Tensor, i64)> {
    if tokens < 2 {
        bail!("{option} {tokens}: a window needs at least 2 tokens (one to predict from, one to predict)");
    }
    if tokens > ckpt.dims.context {
        bail!("{option} {tokens} exceeds the model's context of {} tokens", ckpt.dims.context);
    }
    let max_windows = if max_windows == 0 { usize::MAX } else { max_windows };
    // Position t predicts token t+1; a BOS is context only, never a target.
    let (windows, first) = match data {
        EvalData::Text { bos: true, .. } if tokens < 3 => bail!("{option} {tokens} with --bos: a window needs the BOS token and at least 2 more"),
        EvalData::Text { path, bos } => (text_windows(ckpt, path, tokens, max_windows, *bos)?, i64::from(*bos)),
        EvalData::Tokens(path) => {
            let data = crate::data::Dataset::open(path)?;
            data.check_tokenizer(path, &ckpt.dir, &ckpt.arch.family)?;
            let split = data.val.as_ref().unwrap_or(&data.train);
            split.fits(tokens, option)?;
            (split.windows(tokens, max_windows)?, 0)
        }
    };
    let ids: Vec<i64> = Vec::try_from(windows.flatten(0, 1))?;
    check_vocab(&ids, ckpt.dims.vocab, "the evaluation data")?;
    Ok((windows, first))
}

/// Mean next-token NLL (nats per predicted token) of `net` over `windows`, and the number of predicted tokens.
pub fn mean_nll(net: &Transformer, windows: &Tensor, first: i64) -> Result<(f64, usize)> {
    let n = windows.size()[0] as usize;
    let bar = ProgressBar::new(n as u64).with_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} windows, {eta} left").unwrap());
    bar.set_message("eval");
    let _guard = tch::no_grad_guard();
    let (mut nll, mut count) = (0.0f64, 0usize);
    for batch in windows.split(EVAL_BATCH as i64, 0) {
        let per_token = net.next_token_loss(&batch, first, tch::Reduction::None)?;
        nll += per_token.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        count += per_token.numel();
        bar.inc(batch.size()[0] as u64);
    }
    bar.finish_and_clear();
    let mean = nll / count as f64;
    if !mean.is_finite() {
        bail!("the mean NLL is not finite: the model produces NaN or infinite logits");
    }
    Ok((mean, count))
}

/// Consecutive windows of a text file, `[n, tokens]`, each starting with BOS when asked.
fn text_windows(ckpt: &Checkpoint, path: &Path, tokens: usize, max_windows: usize, bos: bool) -> Result<Tensor> {
    let tokenizer = Tokenizer::for_model(&ckpt.dir, &ckpt.arch.family)?;
    let content = scalpel_files::read_regular_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ids = tokenizer.encode(&content)?;
    let body = tokens - usize::from(bos);
    if ids.len() < body {
        bail!("{} has {} tokens: not enough for one window of {tokens}", path.display(), ids.len());
    }
    let bos_id = if bos { Some(tokenizer.bos().context("--bos: the tokenizer has no BOS token")?) } else { None };
    let rows: Vec<Tensor> = (0..(ids.len() / body).min(max_windows))
        .map(|w| {
            let mut window: Vec<i64> = bos_id.into_iter().collect();
            window.extend_from_slice(&ids[w * body..(w + 1) * body]);
            Tensor::from_slice(&window)
        })
        .collect();
    Ok(Tensor::stack(&rows, 0))
}

/// Runs the same windows through the model on the CPU and on `device`, and reports the largest
/// differences of logits and of every layer's attention: is this GPU set-up computing the same model?
pub fn device_check(ckpt: &Checkpoint, device: Device, windows: usize, tokens: usize, json: bool) -> Result<()> {
    if device == Device::Cpu {
        bail!("device-check compares a GPU with the CPU: pass --device cuda");
    }
    let ids = Tensor::arange((windows * tokens) as i64, (Kind::Int64, Device::Cpu)).remainder(ckpt.dims.vocab as i64).reshape([windows as i64, tokens as i64]);
    let (cpu, gpu) = (Transformer::load(ckpt, Device::Cpu, Kind::Float)?, Transformer::load(ckpt, device, Kind::Float)?);
    let _guard = tch::no_grad_guard();
    let diff = |a: &Tensor, b: &Tensor| (a - b.to_device(Device::Cpu)).abs().max().double_value(&[]);
    let (mut h_cpu, mut h_gpu) = (cpu.embed(&ids)?, gpu.embed(&ids)?);
    let mut attention = Vec::new();
    for i in 0..ckpt.dims.layers {
        attention.push(diff(&cpu.attention(i, &h_cpu)?, &gpu.attention(i, &h_gpu)?));
        h_cpu = cpu.block(i, &h_cpu)?;
        h_gpu = gpu.block(i, &h_gpu)?;
    }
    let logits = diff(&cpu.head(&h_cpu)?, &gpu.head(&h_gpu)?);
    let worst = attention.iter().cloned().fold(0.0, f64::max);
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "device": format!("{device:?}"), "logits_max_abs_diff": logits, "attention_max_abs_diff": attention }))?);
    } else {
        println!("{:?} vs Cpu over {windows} windows of {tokens} tokens: logits max |diff| {logits:.3e}, attention max |diff| {worst:.3e} (worst layer {})",
            device, attention.iter().position(|&d| d == worst).unwrap_or(0));
    }
    Ok(())
}
