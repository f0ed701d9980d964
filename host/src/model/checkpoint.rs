//! Reading HF model folders: config.json plus one or many memory-mapped safetensors shards.
//! Nothing is read until asked for: inspecting or cutting a 7B checkpoint touches only what it needs.

use super::arch::{self, Arch};
use anyhow::{anyhow, bail, Context, Result};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const CONFIG: &str = "config.json";
pub const SINGLE: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
/// Stored bytes converted at once by `Checkpoint::tensor_in`.
const CONVERT_CHUNK_BYTES: usize = 64 << 20;

/// Sizes read off config.json through the architecture's key names.
#[derive(Debug, Clone, PartialEq)]
pub struct Dims {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d_model: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    /// The feed-forward width.
    pub intermediate: usize,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Value,
    pub arch: &'static Arch,
    pub dims: Dims,
    shards: Vec<(PathBuf, Mmap)>,
    /// Canonical tensor name -> where its bytes are.
    tensors: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.extension().is_some_and(|e| e == "gguf") {
            bail!("{} is a GGUF file: convert it first with `scalpel import {} OUT_DIR`", dir.display(), dir.display());
        }
        if !dir.is_dir() {
            bail!("{} is not a folder: a model is an HF model folder (config.json + *.safetensors)", dir.display());
        }
        let config_path = dir.join(CONFIG);
        if !config_path.exists() {
            bail!("{} is not an HF model folder: it has no readable {CONFIG}", dir.display());
        }
        let text = scalpel_files::read_regular_string(&config_path)?;
        let config: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let model_type = config["model_type"]
            .as_str()
            .ok_or_else(|| anyhow!("{} has no `model_type`, so its architecture is unknown", config_path.display()))?;
        let arch = arch::for_model_type(model_type).with_context(|| config_path.display().to_string())?;
        if let Some(classes) = config["architectures"].as_array() {
            if let Some(other) = classes.iter().filter_map(Value::as_str).find(|c| !arch.architectures.iter().any(|a| a == c)) {
                bail!(
                    "{}: `{other}` is not a causal language model scalpel knows (for `{model_type}`: {})",
                    config_path.display(),
                    arch.architectures.join(", ")
                );
            }
        }
        let dims = dims(arch, &config).with_context(|| format!("reading {}", config_path.display()))?;
        check_dtype_setting(&config).with_context(|| config_path.display().to_string())?;

        let files = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (index, file) in files.iter().enumerate() {
            let f = scalpel_files::open_regular(file)?;
            // SAFETY: the file is opened read-only; scalpel never writes into a folder it reads.
            let map = unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", file.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                anyhow!("{} is not a valid safetensors file (truncated or corrupt?): {e}", file.display())
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                if let Some((_, inner)) = arch.split_block_name(&arch.canonical_name(&name)) {
                    if arch.tensors.ignore.iter().any(|i| i == inner) {
                        continue;
                    }
                }
                let (s, e) = info.data_offsets;
                let entry = Entry { dtype: info.dtype, shape: info.shape.clone(), shard: index, start: data_start + s, end: data_start + e };
                tensors.insert(arch.canonical_name(&name), entry);
            }
            shards.push((file.clone(), map));
        }
        let ckpt = Checkpoint { dir: dir.to_path_buf(), config, arch, dims, shards, tensors };
        ckpt.check_complete()?;
        ckpt.check_shapes()?;
        Ok(ckpt)
    }

    /// Every block and the global tensors are there: a missing shard or a wrong layer count shows here.
    fn check_complete(&self) -> Result<()> {
        let t = &self.arch.tensors;
        for name in std::iter::once(&t.embedding).chain(&t.final_norm).chain(&t.position_embedding) {
            if !self.tensors.contains_key(name) {
                bail!("{}: the checkpoint has no tensor `{name}`", self.dir.display());
            }
        }
        for i in 0..self.dims.layers {
            let prefix = self.arch.block_prefix(i);
            if !self.tensors.keys().any(|n| n.starts_with(&prefix)) {
                bail!(
                    "{}: config.json says {} layers, but the checkpoint has no tensors for layer {i} (`{prefix}*`)",
                    self.dir.display(),
                    self.dims.layers
                );
            }
        }
        if let Some((i, _)) = self.tensors.keys().filter_map(|n| self.arch.split_block_name(n)).find(|(i, _)| *i >= self.dims.layers) {
            bail!("{}: the checkpoint has tensors for layer {i}, but config.json says {} layers", self.dir.display(), self.dims.layers);
        }
        Ok(())
    }

    /// Every tensor the family needs, with the shape config.json implies and a float dtype; an untied
    /// config has its LM head. Caught here, a disagreement is an error naming the tensor instead of
    /// a libtorch failure deep inside a forward pass.
    fn check_shapes(&self) -> Result<()> {
        let d = &self.dims;
        let size = |s: &str| -> Option<usize> {
            Some(match s {
                "d_model" => d.d_model,
                "heads" => d.heads,
                "kv_heads" => d.kv_heads,
                "head_dim" => d.head_dim,
                "intermediate" => d.intermediate,
                "vocab" => d.vocab,
                "context" => d.context,
                _ => return None,
            })
        };
        let lm_head = &self.arch.tensors.lm_head;
        if self.config["tie_word_embeddings"] == Value::Bool(false) && !self.tensors.contains_key(lm_head) {
            bail!(
                "{}: config.json says `tie_word_embeddings: false`, but the checkpoint has no `{lm_head}`: \
                 the output head is missing (set `tie_word_embeddings` to true if the embedding doubles as the head)",
                self.dir.display()
            );
        }
        let check = |name: &str, dims: &[String], required: bool| -> Result<()> {
            let Some(e) = self.tensors.get(name) else {
                if required {
                    bail!("{}: the checkpoint has no tensor `{name}`", self.dir.display());
                }
                return Ok(());
            };
            if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                bail!("{}: tensor `{name}` is {:?}; weights must be floating point (f32, f16, bf16 or f64)", self.dir.display(), e.dtype);
            }
            let want = dims.iter().map(|x| arch::eval_size(x, size)).collect::<Result<Vec<usize>>>()?;
            if e.shape != want {
                let sizes: Vec<String> = arch::SIZE_NAMES
                    .iter()
                    .filter(|s| dims.iter().any(|x| x.split('*').any(|f| f.trim() == **s)))
                    .map(|s| format!("{s} = {}", size(s).unwrap()))
                    .collect();
                bail!(
                    "{}: tensor `{name}` has shape {:?}, but config.json implies {want:?} ([{}] with {}): the weights and config.json disagree",
                    self.dir.display(),
                    e.shape,
                    dims.join(", "),
                    sizes.join(", ")
                );
            }
            Ok(())
        };
        let shapes = &self.arch.shapes;
        for (name, dims) in &shapes.global {
            check(name, dims, name != lm_head)?;
        }
        for i in 0..d.layers {
            let prefix = self.arch.block_prefix(i);
            for (name, dims) in &shapes.block {
                check(&format!("{prefix}{name}"), dims, true)?;
            }
            for (name, dims) in &shapes.block_optional {
                check(&format!("{prefix}{name}"), dims, false)?;
            }
        }
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| anyhow!("{}: no tensor `{name}` in the checkpoint", self.dir.display()))
    }

    /// The stored bytes of a tensor (little-endian, row-major), straight from the memory map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.shards[e.shard].1[e.start..e.end])
    }

    /// A tensor on the CPU, in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let kind = kind_of(e.dtype).with_context(|| format!("tensor `{name}`"))?;
        let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        Tensor::f_from_data_size(self.bytes(name)?, &shape, kind).with_context(|| format!("reading tensor `{name}`"))
    }

    /// A tensor on the CPU with floating point converted to `kind`, a slice of rows at a time: the stored
    /// copy of a whole large tensor (a 7B model's 1 GB embedding) and its float32 copy never coexist.
    /// The pages read from the map are then handed back, so streaming a checkpoint through analysis
    /// does not pile it up in the process's memory.
    pub fn tensor_in(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let e = self.entry(name)?;
        let stored = kind_of(e.dtype).with_context(|| format!("tensor `{name}`"))?;
        let bytes = self.bytes(name)?;
        let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        let t = if stored == kind || !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) || shape.is_empty() || bytes.is_empty() {
            let t = self.tensor(name)?;
            if t.is_floating_point() { t.f_to_kind(kind)? } else { t }
        } else {
            let out = Tensor::f_empty(&shape, (kind, Device::Cpu))?;
            let row_bytes = bytes.len() / e.shape[0];
            let rows_per_chunk = (CONVERT_CHUNK_BYTES / row_bytes.max(1)).max(1);
            for first in (0..e.shape[0]).step_by(rows_per_chunk) {
                let rows = rows_per_chunk.min(e.shape[0] - first);
                let mut part_shape = shape.clone();
                part_shape[0] = rows as i64;
                let part = Tensor::f_from_data_size(&bytes[first * row_bytes..(first + rows) * row_bytes], &part_shape, stored)
                    .with_context(|| format!("reading tensor `{name}`"))?;
                out.narrow(0, first as i64, rows as i64).f_copy_(&part)?;
                self.release(e.shard, e.start + first * row_bytes, rows * row_bytes);
            }
            out
        };
        self.release(e.shard, e.start, e.end - e.start);
        Ok(t)
    }

    /// Hands the pages of a range of a shard's map back to the kernel.
    fn release(&self, shard: usize, start: usize, len: usize) {
        // SAFETY: the map is read-only and file-backed, so dropped pages are read again from the file on
        // the next access (surgery may still borrow these bytes): only residency changes, never content.
        let _ = unsafe { self.shards[shard].1.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) };
    }

    /// The weights' dtype (the most common one among the tensors).
    pub fn dtype(&self) -> &'static str {
        let mut counts = BTreeMap::new();
        for e in self.tensors.values() {
            *counts.entry(dtype_name(e.dtype)).or_insert(0usize) += e.shape.iter().product::<usize>();
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map_or("f32", |(d, _)| d)
    }

    pub fn parameters(&self) -> usize {
        self.tensors.values().map(|e| e.shape.iter().product::<usize>()).sum()
    }

    pub fn size_bytes(&self) -> usize {
        self.tensors.values().map(|e| e.end - e.start).sum()
    }

    /// The embedding doubles as the output head.
    pub fn tied(&self) -> bool {
        !self.tensors.contains_key(&self.arch.tensors.lm_head)
    }

    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|(p, _)| p.as_path())
    }
}

/// The sha256 of an input file, for the records of runs. Hashing a checkpoint takes longer than
/// cutting it, so the digest is kept in the cache under the file's identity: device, inode, size,
/// and modification and change times (the change time moves on every write, and no program can set
/// it back). An unchanged input is hashed once; the cache is a convenience, never an error.
pub fn input_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::os::unix::fs::MetadataExt;
    let identity = |m: &std::fs::Metadata| format!("{:x}-{:x}-{}-{}.{}-{}.{}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec());
    let before = identity(&std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?);
    let cached = crate::data::sources::cache_dir().ok().map(|d| d.join("sha256").join(&before));
    if let Some(digest) = cached.as_ref().and_then(|c| std::fs::read_to_string(c).ok()) {
        if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(digest);
        }
    }
    let mut file = std::io::BufReader::with_capacity(1 << 20, scalpel_files::open_regular(path)?);
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    let digest = crate::data::sources::hex(&hasher.finalize());
    // Only a file that did not change while it was read is remembered.
    if let (Some(c), Ok(m)) = (&cached, std::fs::metadata(path)) {
        if identity(&m) == before && c.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) {
            let _ = scalpel_files::write_file(c, digest.as_bytes());
        }
    }
    Ok(digest)
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX);
    if index.exists() {
        let text = scalpel_files::read_regular_string(&index)?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v["weight_map"].as_object().ok_or_else(|| anyhow!("{} has no `weight_map`", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        files.sort();
        files.dedup();
        // Shards live inside the model folder: a name that climbs out of it or is absolute is refused.
        if let Some(bad) = files.iter().find(|f| !scalpel_files::names_a_file_inside(f)) {
            bail!("{} names the shard `{bad}`, which is not a file inside the model folder", index.display());
        }
        let files: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            bail!("{} names the shard {}, which is missing", index.display(), missing.display());
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE);
    if single.exists() {
        return Ok(vec![single]);
    }
    if std::fs::read_dir(dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "bin")) {
        bail!("{} holds PyTorch .bin weights; scalpel reads safetensors only (convert with transformers' save_pretrained)", dir.display());
    }
    bail!("{} has neither {SINGLE} nor {INDEX}", dir.display())
}

fn dims(arch: &Arch, config: &Value) -> Result<Dims> {
    let get = |key: &str| -> Result<usize> {
        config[key].as_u64().map(|v| v as usize).ok_or_else(|| anyhow!("config.json has no whole-number `{key}`"))
    };
    let k = &arch.config;
    let heads = get(&k.heads)?;
    let d_model = get(&k.d_model)?;
    let kv_heads = match &k.kv_heads {
        Some(key) if !config[key].is_null() => get(key)?,
        _ => heads,
    };
    let layers = get(&k.layers)?;
    if layers == 0 || heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        bail!("config.json has {layers} layers, {heads} heads and {kv_heads} key/value heads: not a usable transformer");
    }
    let head_dim = match &config["head_dim"] {
        Value::Null => {
            if d_model % heads != 0 {
                bail!("config.json has no `head_dim`, and `{}` = {d_model} is not a multiple of `{}` = {heads}", k.d_model, k.heads);
            }
            d_model / heads
        }
        _ => get("head_dim")?,
    };
    let (vocab, context) = (get(&k.vocab)?, get(&k.context)?);
    let intermediate = match (&config[&k.intermediate], &k.intermediate_default) {
        (Value::Null, Some(default)) => arch::eval_size(default, |s| (s == "d_model").then_some(d_model))?,
        _ => get(&k.intermediate)?,
    };
    for (key, v) in [(&k.d_model, d_model), (&"head_dim".to_string(), head_dim), (&k.vocab, vocab), (&k.context, context), (&k.intermediate, intermediate)] {
        if v == 0 {
            bail!("config.json `{key}` is 0: every size of a transformer must be positive");
        }
    }
    Ok(Dims { layers, heads, kv_heads, d_model, head_dim, vocab, context, intermediate })
}

/// The weights' declared dtype, if given, must be one scalpel knows: never silently ignored.
fn check_dtype_setting(config: &Value) -> Result<()> {
    for key in ["torch_dtype", "dtype"] {
        match &config[key] {
            Value::Null => {}
            Value::String(s) if ["float32", "float16", "bfloat16", "float64", "float", "half", "double"].contains(&s.as_str()) => {}
            other => bail!("config.json `{key}` is {other}, which scalpel does not know (known: float32, float16, bfloat16, float64)"),
        }
    }
    Ok(())
}

pub fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => bail!("dtype {other:?} is not supported"),
    })
}

pub fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::BF16 => "bf16",
        Dtype::F64 => "f64",
        _ => "other",
    }
}

/// `f32`, `f16` or `bf16`, as users write them.
pub fn parse_dtype(s: &str) -> Result<Dtype> {
    Ok(match s {
        "f32" | "float32" => Dtype::F32,
        "f16" | "float16" => Dtype::F16,
        "bf16" | "bfloat16" => Dtype::BF16,
        other => bail!("unknown dtype `{other}`: use f32, f16 or bf16"),
    })
}

/// The name transformers writes into config.json's `torch_dtype` / `dtype`.
pub fn torch_dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached digest is the file's sha256, and a rewritten file (same size, new content) is hashed again.
    #[test]
    fn input_checksums_are_cached_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("input");
        std::fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(input_sha256(&file).unwrap(), abc);
        assert_eq!(input_sha256(&file).unwrap(), abc, "from the cache");
        std::fs::write(&file, b"abd").unwrap();
        assert_eq!(input_sha256(&file).unwrap(), "a52d159f262b2c6ddb724a61840befc36eb30c88877a4030b65cbe86298449c9");
    }
}
