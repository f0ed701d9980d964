//! `scalpel import`: a GGUF file (llama.cpp) becomes an HF model folder.

use crate::gguf::GgufFile;
use crate::model::checkpoint::torch_dtype_name;
use crate::model::write::{write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::surgery::to_out;
use anyhow::Result;
use safetensors::Dtype;
use serde_json::json;
use std::path::Path;
use tch::Tensor;

pub fn import(path: &Path, out: &Path, dtype: Dtype, force: bool) -> Result<()> {
    let file = GgufFile::open(path)?;
    // Every reason to refuse, in one message, before anything is converted or written.
    file.check_importable()?;
    let mut config = file.hf_config()?;
    config["torch_dtype"] = json!(torch_dtype_name(dtype));
    let (tokenizer, tokenizer_config, warnings) = file.hf_tokenizer()?;
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
            ("tokenizer.json".into(), serde_json::to_vec_pretty(&tokenizer)?),
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
