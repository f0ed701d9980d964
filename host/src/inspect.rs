//! Looking at a model: `inspect`, `generate` and `eval`.

use crate::model::tokenizer::Tokenizer;
use crate::model::{Checkpoint, Transformer};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::path::Path;
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

/// A GGUF file before import: version, architecture, tensor types, parameters and metadata keys.
pub fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
    let file = crate::gguf::GgufFile::open(path)?;
    let mut types = std::collections::BTreeMap::new();
    for t in file.tensors() {
        *types.entry(t.type_name()).or_insert(0usize) += 1;
    }
    let parameters: usize = file.tensors().iter().map(|t| t.shape.iter().product::<usize>()).sum();
    let facts = json!({
        "file": path,
        "gguf_version": file.version(),
        "architecture": file.architecture()?,
        "name": file.metadata().get("general.name").and_then(|v| v.as_str()),
        "tensors": file.tensors().len(),
        "tensor_types": types,
        "parameters": parameters,
        "metadata_keys": file.metadata().len(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&facts)?);
    } else {
        for (k, v) in facts.as_object().unwrap() {
            println!("{k:<16} {}", v.as_str().map_or(v.to_string(), String::from));
        }
        println!("
convert it with `scalpel import {} OUT_DIR`", path.display());
    }
    Ok(())
}

pub struct Sampling {
    pub top_p: Option<f64>,
    pub temperature: f64,
    pub seed: u64,
}

pub fn generate(ckpt: &Checkpoint, device: Device, prompt: &str, max_tokens: usize, s: &Sampling) -> Result<()> {
    let tokenizer = Tokenizer::for_model(&ckpt.dir, &ckpt.arch.family)?;
    let net = Transformer::load(ckpt, device, Kind::Float)?;
    let mut ids = tokenizer.encode(prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenizing");
    }
    tch::manual_seed(s.seed as i64);
    let prompt_len = ids.len();
    let _guard = tch::no_grad_guard();
    for _ in 0..max_tokens {
        // No key/value cache: a full pass per token is plenty for eyeballing small models.
        let start = ids.len().saturating_sub(ckpt.dims.context);
        let input = Tensor::from_slice(&ids[start..]).unsqueeze(0);
        let logits = net.logits(&input)?.get(0).get(-1).to_kind(Kind::Float);
        let next = match s.top_p {
            None => logits.argmax(-1, false).int64_value(&[]),
            Some(p) => sample_top_p(&(logits / s.temperature.max(1e-6)), p),
        };
        ids.push(next);
    }
    println!("{}{}", prompt, tokenizer.decode(&ids[prompt_len..])?);
    Ok(())
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

pub fn eval(ckpt: &Checkpoint, device: Device, text: &Path, tokens: usize, max_windows: usize, bos: bool, json: bool) -> Result<()> {
    if tokens < 2 {
        bail!("--tokens {tokens}: a window needs at least 2 tokens (one to read, one to predict)");
    }
    let tokenizer = Tokenizer::for_model(&ckpt.dir, &ckpt.arch.family)?;
    let net = Transformer::load(ckpt, device, Kind::Float)?;
    let content = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let ids = tokenizer.encode(&content)?;
    check_vocab(&ids, ckpt.dims.vocab, text)?;
    let body = tokens - usize::from(bos);
    if ids.len() < body {
        bail!("{} has {} tokens: not enough for one window of {tokens}", text.display(), ids.len());
    }
    let mut windows = ids.len() / body;
    if max_windows > 0 {
        windows = windows.min(max_windows);
    }
    let bos_id = if bos { Some(tokenizer.bos().context("--bos: the tokenizer has no BOS token")?) } else { None };
    check_vocab(bos_id.as_slice(), ckpt.dims.vocab, Path::new("the BOS token"))?;
    let bar = ProgressBar::new(windows as u64).with_style(ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} windows, {eta} left").unwrap());
    bar.set_message("eval");
    let _guard = tch::no_grad_guard();
    let (mut nll, mut count) = (0.0f64, 0usize);
    for w in 0..windows {
        let mut window: Vec<i64> = bos_id.into_iter().collect();
        window.extend_from_slice(&ids[w * body..(w + 1) * body]);
        let input = Tensor::from_slice(&window).unsqueeze(0);
        let logits = net.logits(&input)?.get(0).to_kind(Kind::Double);
        // Position t predicts token t+1; a BOS is context only, never a target.
        let first = usize::from(bos);
        let targets = Tensor::from_slice(&window[first + 1..]).to_device(device);
        let logp = logits.narrow(0, first as i64, (window.len() - first - 1) as i64).log_softmax(-1, Kind::Double);
        let picked = logp.gather(1, &targets.unsqueeze(1), false);
        nll -= picked.sum(Kind::Double).double_value(&[]);
        count += window.len() - first - 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = nll / count as f64;
    if !mean.is_finite() {
        bail!("the mean NLL is not finite: the model produces NaN or infinite logits");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "windows": windows, "tokens": count, "mean_nll": mean, "perplexity": mean.exp() }))?);
    } else {
        println!("{windows} windows, {count} predicted tokens: mean NLL {mean:.4} nats/token, perplexity {:.2}", mean.exp());
    }
    Ok(())
}

/// Token ids must index the model's embedding: a tokenizer from another model is caught here, by name.
fn check_vocab(ids: &[i64], vocab: usize, source: &Path) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        bail!(
            "{}: the tokenizer gives token id {bad}, but the model's vocabulary is 0..{vocab}: tokenizer and model do not belong together",
            source.display()
        );
    }
    Ok(())
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
