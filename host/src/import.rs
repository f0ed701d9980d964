//! `scalpel import`: a GGUF file (llama.cpp) becomes an HF model folder.

use crate::gguf::GgufFile;
use crate::model::checkpoint::torch_dtype_name;
use crate::model::write::{write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::surgery::to_out;
use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;
use tch::Tensor;

pub fn import(path: &Path, out: &Path, dtype: Dtype, force: bool) -> Result<()> {
    let file = GgufFile::open(path)?;
    if file.tensors().is_empty() {
        bail!("{}: the file holds no tensors, so there is no model to import", path.display());
    }
    // Every reason to refuse, in one message, before anything is converted or written.
    file.check_importable()?;
    let mut config = file.hf_config()?;
    check_gguf(&file, &config).with_context(|| format!("{}: not a usable model", path.display()))?;
    // Both spellings, as hf_config writes them, so they cannot disagree.
    config["torch_dtype"] = json!(torch_dtype_name(dtype));
    config["dtype"] = json!(torch_dtype_name(dtype));
    let (tokenizer, tokenizer_config, warnings) = file.hf_tokenizer()?;
    // What is written must load: a merge naming a token outside the vocabulary is refused here (found by fuzzing).
    let tokenizer = serde_json::to_vec_pretty(&tokenizer)?;
    tokenizers::Tokenizer::from_bytes(&tokenizer).map_err(|e| anyhow::anyhow!("{}: its tokenizer cannot be converted: {e}", path.display()))?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let record = json!({
        "produced_by": format!("scalpel {} import", env!("CARGO_PKG_VERSION")),
        "source": path,
        "gguf_version": file.version(),
        "dtype": torch_dtype_name(dtype),
        "note": "dequantised from GGUF; quantisation noise is part of the weights",
    });
    let folder = Folder {
        config: &config,
        companions_from: None,
        extra_files: vec![
            ("tokenizer.json".into(), tokenizer),
            ("tokenizer_config.json".into(), serde_json::to_vec_pretty(&tokenizer_config)?),
        ],
        record: &record,
    };
    let tensors = file.hf_tensors().map(|r| {
        let (name, shape, data) = r?;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        to_out(name, &Tensor::from_slice(&data).reshape(&dims), dtype)
    });
    let dest = write_model(out, force, folder, tensors, DEFAULT_SHARD_BYTES)?;
    println!("imported {} -> {}", path.display(), dest.display());
    Ok(())
}

/// What a GGUF must hold before anything is dequantised: counts and sizes a model can have, and
/// tensors only for layers that exist. The written folder is checked again as the loader checks it.
fn check_gguf(file: &GgufFile, config: &Value) -> Result<()> {
    // config.json key, and the GGUF metadata it comes from (after the architecture prefix).
    let sizes = [
        ("num_hidden_layers", "block_count"),
        ("hidden_size", "embedding_length"),
        ("intermediate_size", "feed_forward_length"),
        ("max_position_embeddings", "context_length"),
        ("vocab_size", "vocab_size (or the rows of token_embd.weight)"),
    ];
    for (key, gguf) in sizes {
        if config[key].as_u64().is_none_or(|v| v == 0) {
            bail!("its {gguf} is {}: every count and size of a model must be positive", config[key]);
        }
    }
    // serde_json stores NaN and infinities as null.
    if !config["rms_norm_eps"].as_f64().is_some_and(|e| e.is_finite() && e > 0.0) {
        bail!("its RMSNorm epsilon (`*.attention.layer_norm_rms_epsilon`) is not a finite positive number");
    }
    let layers = config["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    for t in file.tensors() {
        if t.shape.contains(&0) {
            bail!("tensor `{}` has shape {:?}: a weight cannot have a zero dimension", t.name, t.shape);
        }
        let layer = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok());
        if let Some(i) = layer.filter(|&i| i >= layers) {
            bail!("tensor `{}` belongs to layer {i}, but block_count says {layers} layers", t.name);
        }
    }
    Ok(())
}
