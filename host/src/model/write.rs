//! Writing HF model folders. Everything goes to a temporary folder beside the destination, is
//! checked as the loader would check it, and is renamed into place at the end: an interrupted run
//! leaves no half-written model behind, scalpel never writes a model it would refuse, and `force`
//! replaces only an earlier output.

use anyhow::{bail, Context, Result};
use scalpel_files::{Replace, StagedDir};
use safetensors::{Dtype, View};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::checkpoint::{Checkpoint, CONFIG, INDEX, SINGLE};

/// transformers' own default `max_shard_size`.
pub const DEFAULT_SHARD_BYTES: usize = 5_000_000_000;
/// What produced a folder: the command, plugin versions, input checksums.
pub const RECORD: &str = "scalpel.json";

/// One tensor to write: borrowed straight from an input's memory map, or computed.
pub struct OutTensor<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The parts of a model folder besides its weights.
pub struct Folder<'a> {
    pub config: &'a Value,
    /// Copy tokenizer and generation files from here (everything but weights and config).
    pub companions_from: Option<&'a Path>,
    /// Extra files to write, e.g. a tokenizer.json made from GGUF metadata.
    pub extra_files: Vec<(String, Vec<u8>)>,
    pub record: &'a Value,
}

/// A staged output folder for `dest`. An existing `dest` is replaced only with `force`, and only when
/// it is an earlier scalpel output (it holds `marker`): never an input model or a stray file.
pub fn stage(dest: &Path, force: bool, marker: &'static str) -> Result<StagedDir> {
    StagedDir::new(dest, if force { Replace::FolderWith(marker) } else { Replace::Never })
}

/// Files that describe how to use weights rather than being weights: tokenizer and generation settings.
/// Anything else (other frameworks' weights, their indexes) would not match the new model.
fn is_companion(name: &str) -> bool {
    name.starts_with("tokenizer")
        || name.starts_with("vocab.")
        || name.starts_with("chat_template")
        || name.ends_with(".model") // sentencepiece
        || ["merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json"].contains(&name)
}

fn write_shard(file: &Path, tensors: &[OutTensor], meta: std::collections::HashMap<String, String>) -> Result<()> {
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), Some(meta), file)
        .map_err(|e| match e {
            // Unwrapped: the crate's error both prints and chains the I/O error, so a full disk was said twice.
            safetensors::SafeTensorError::IoError(io) => anyhow::Error::from(io),
            other => anyhow::Error::from(other),
        })
        .with_context(|| format!("writing {}", file.display()))
}

/// Writes a complete model folder at `dest`: config, shards (with an index past `shard_bytes`),
/// companion files and the record. Tensors are consumed one at a time; at most one shard's worth
/// of computed tensors is held in memory.
pub fn write_model<'a>(
    dest: &Path,
    force: bool,
    folder: Folder<'_>,
    tensors: impl Iterator<Item = Result<OutTensor<'a>>>,
    shard_bytes: usize,
) -> Result<PathBuf> {
    let staging = stage(dest, force, RECORD)?;
    let dir = staging.path();
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut pending: Vec<OutTensor> = Vec::new();
    let mut pending_bytes = 0;
    let mut total = 0usize;
    let flush = |pending: &mut Vec<OutTensor>, shards: &mut Vec<Vec<String>>| -> Result<()> {
        let file = dir.join(format!("shard-{}.part", shards.len()));
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        write_shard(&file, pending, meta)?;
        // The safetensors crate creates files readable by their owner only; a model folder is for sharing.
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        shards.push(pending.drain(..).map(|t| t.name).collect());
        Ok(())
    };
    for t in tensors {
        let t = t?;
        let n = t.data.len();
        if n != t.shape.iter().product::<usize>() * t.dtype.bitsize() / 8 {
            bail!("internal error: tensor `{}` has {n} bytes for shape {:?} {:?}", t.name, t.shape, t.dtype);
        }
        if !pending.is_empty() && pending_bytes + n > shard_bytes {
            flush(&mut pending, &mut shards)?;
            pending_bytes = 0;
        }
        pending_bytes += n;
        total += n;
        pending.push(t);
    }
    if !pending.is_empty() || shards.is_empty() {
        flush(&mut pending, &mut shards)?;
    }
    // Name the shards now that their count is known.
    if shards.len() == 1 {
        std::fs::rename(dir.join("shard-0.part"), dir.join(SINGLE))?;
    } else {
        let mut weight_map = BTreeMap::new();
        for (i, names) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
            std::fs::rename(dir.join(format!("shard-{i}.part")), dir.join(&file))?;
            for n in names {
                weight_map.insert(n.clone(), file.clone());
            }
        }
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        std::fs::write(dir.join(INDEX), serde_json::to_string_pretty(&index)?)?;
    }
    std::fs::write(dir.join(CONFIG), serde_json::to_string_pretty(folder.config)? + "\n")?;
    if let Some(src) = folder.companions_from {
        for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_file() && is_companion(&name) {
                std::fs::copy(&path, dir.join(&name)).with_context(|| format!("copying {}", path.display()))?;
            }
        }
    }
    for (name, bytes) in &folder.extra_files {
        std::fs::write(dir.join(name), bytes)?;
    }
    std::fs::write(dir.join(RECORD), serde_json::to_string_pretty(folder.record)? + "\n")?;
    // The same checks as every reader: a model scalpel would refuse is never put in place.
    Checkpoint::open(dir).with_context(|| format!("the model made for {} would not pass scalpel's own checks, so nothing was written", dest.display()))?;
    staging.commit()
}
