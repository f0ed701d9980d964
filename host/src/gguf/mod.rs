//! GGUF importer: reads a llama.cpp GGUF file (v2 or v3) and turns it into what a Hugging Face
//! checkpoint holds: HF-named, HF-layout f32 tensors, a `config.json`, a `tokenizer.json` and a
//! `tokenizer_config.json`.
//!
//! Format: llama.cpp's `docs/gguf.md`. A file is a header (magic `GGUF`, version, tensor and
//! metadata counts), the metadata key/values, one info record per tensor (name, dims
//! innermost-first, ggml type, offset), padding to `general.alignment` (default 32), and then the
//! tensor data, each tensor at its offset from the start of that data section. Block layouts of
//! the quantised types follow gguf-py's `gguf/quants.py`; the tests check the dequantiser
//! bit-for-bit against values that gguf-py produced (tests/golden/make_gguf_fixtures.py).
//!
//! The file is memory-mapped and never read into RAM whole; only one dequantised tensor at a
//! time is materialised.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use serde_json::{json, Map, Value};

mod grids;
mod quants;

use quants::{lookup_type, supported_type_names, tensor_size, GGML_TYPES};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; this bounds the recursion a hostile file could ask for.
const MAX_ARRAY_NESTING: usize = 8;

/// One metadata value, as typed in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is an integer of any width that is >= 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer of any width that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as an f64, for floats and integers. An f32 converts through its shortest
    /// decimal form, so the 1e-5 that a file stores as f32 0.0000099999997 comes back as 1e-5.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => v.to_string().parse().ok(),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "uint8",
            MetaValue::I8(_) => "int8",
            MetaValue::U16(_) => "uint16",
            MetaValue::I16(_) => "int16",
            MetaValue::U32(_) => "uint32",
            MetaValue::I32(_) => "int32",
            MetaValue::U64(_) => "uint64",
            MetaValue::I64(_) => "int64",
            MetaValue::F32(_) => "float32",
            MetaValue::F64(_) => "float64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }
}

/// One tensor's record from the file's tensor-info section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`), not the HF one.
    pub name: String,
    /// HF order: outermost dimension first, the reverse of GGUF's `ne` (innermost first).
    pub shape: Vec<usize>,
    /// ggml type id (0 = F32, 1 = F16, 8 = Q8_0, ...).
    pub ggml_type: u32,
    /// Absolute byte offset of the tensor's data in the file: the start of the data section plus
    /// the offset the file records (which is relative to that section).
    pub offset: u64,
}

impl TensorInfo {
    /// The ggml type's name (`Q4_1`), or `type N` for an id ggml does not define.
    pub fn type_name(&self) -> String {
        GGML_TYPES.iter().find(|t| t.id == self.ggml_type).map_or(format!("type {}", self.ggml_type), |t| t.name.to_string())
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Maps `path` and parses its header, metadata and tensor infos. Checks that every tensor of a
    /// known type lies inside the file, so a truncated file fails here rather than mid-import.
    pub fn open(path: &Path) -> Result<Self> {
        let file = scalpel_files::open_regular(path).with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        let len = file.metadata().with_context(|| format!("cannot stat {}", path.display()))?.len();
        ensure!(len > 0, "{}: empty file, not a GGUF file", path.display());
        // SAFETY: the map is read-only. Like every mmap-based model loader, this assumes nobody
        // truncates or rewrites the file while it is open.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::from_map(path, mmap)
    }

    /// The same from bytes in memory (the fuzz targets' entry); `path` names them in messages.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        ensure!(!bytes.is_empty(), "{}: empty file, not a GGUF file", path.display());
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).context("cannot allocate memory for the GGUF bytes")?;
        map.copy_from_slice(bytes);
        Self::from_map(path, map.make_read_only()?)
    }

    fn from_map(path: &Path, mmap: Mmap) -> Result<Self> {
        let (version, metadata, tensors) = parse(&mmap).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture")
    }

    /// Raw dequantised values of one tensor, GGUF name, in HF order (no renaming, no unpermuting).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let ty = lookup_type(info.ggml_type).ok_or_else(|| {
            anyhow!(
                "{}: tensor '{}' has unknown ggml type {}",
                self.path.display(),
                info.name,
                info.ggml_type
            )
        })?;
        let Some(kernel) = ty.kernel else {
            bail!(
                "{}: tensor '{}' has quantisation type {} (type {}), which is not supported \
                 (supported: {})",
                self.path.display(),
                info.name,
                ty.name,
                ty.id,
                supported_type_names()
            );
        };
        let (numel, nbytes) = tensor_size(ty, &info.shape)
            .map_err(|e| anyhow!("{}: tensor '{}': {e:#}", self.path.display(), info.name))?;
        let data = usize::try_from(info.offset)
            .ok()
            .and_then(|start| self.mmap.get(start..start.checked_add(nbytes)?))
            .ok_or_else(|| {
                anyhow!(
                    "{}: truncated file: tensor '{}' needs bytes {}..{} but the file has {}",
                    self.path.display(),
                    info.name,
                    info.offset,
                    info.offset + nbytes as u64,
                    self.mmap.len()
                )
            })?;
        let mut out = vec![0f32; numel];
        kernel(data, &mut out);
        Ok(out)
    }

    /// An HF `config.json` built from the metadata.
    pub fn hf_config(&self) -> Result<Value> {
        let arch_name = self.architecture()?;
        let arch = self.arch()?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden = self.req_usize(&key("embedding_length"))?;
        let n_head = self.req_usize(&key("attention.head_count"))?;
        let n_kv = self.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(n_head);
        ensure!(
            n_head > 0 && n_kv > 0 && n_head % n_kv == 0,
            "{}: head counts {n_head} (query) and {n_kv} (key/value) are inconsistent",
            self.path.display()
        );
        let head_dim = match self.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => {
                ensure!(
                    hidden % n_head == 0,
                    "{}: embedding_length {hidden} is not a multiple of head_count {n_head}",
                    self.path.display()
                );
                hidden / n_head
            }
        };
        let vocab_size = match self.tensor("token_embd.weight") {
            Some(t) => *t.shape.first().ok_or_else(|| anyhow!("{}: token_embd.weight has no dimensions", self.path.display()))?,
            None => self.opt_usize(&key("vocab_size"))?.ok_or_else(|| {
                anyhow!("{}: no token_embd.weight and no {}", self.path.display(), key("vocab_size"))
            })?,
        };
        let rope_theta = self.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);

        let mut cfg = Map::new();
        cfg.insert("architectures".into(), json!([arch.hf_class]));
        cfg.insert("model_type".into(), json!(arch.model_type));
        cfg.insert("hidden_size".into(), json!(hidden));
        cfg.insert("intermediate_size".into(), json!(self.req_usize(&key("feed_forward_length"))?));
        cfg.insert("num_hidden_layers".into(), json!(self.req_usize(&key("block_count"))?));
        cfg.insert("num_attention_heads".into(), json!(n_head));
        cfg.insert("num_key_value_heads".into(), json!(n_kv));
        cfg.insert("head_dim".into(), json!(head_dim));
        cfg.insert("hidden_act".into(), json!("silu"));
        cfg.insert("max_position_embeddings".into(), json!(self.req_usize(&key("context_length"))?));
        cfg.insert("rms_norm_eps".into(), json!(self.req_f64(&key("attention.layer_norm_rms_epsilon"))?));
        cfg.insert("vocab_size".into(), json!(vocab_size));
        cfg.insert("tie_word_embeddings".into(), json!(self.tensor("output.weight").is_none()));
        if arch.model_type == "llama" {
            cfg.insert("attention_bias".into(), json!(self.tensor("blk.0.attn_q.bias").is_some()));
            cfg.insert("mlp_bias".into(), json!(self.tensor("blk.0.ffn_gate.bias").is_some()));
        }
        for (hf, gguf) in [("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")] {
            if let Some(id) = self.opt_usize(&format!("tokenizer.ggml.{gguf}_token_id"))? {
                cfg.insert(hf.into(), json!(id));
            }
        }
        // hf_tensors() yields f32, so that is what a checkpoint written from it holds.
        // Both spellings: transformers < 5 reads torch_dtype/rope_theta/rope_scaling,
        // transformers >= 5 writes dtype/rope_parameters (and still reads the old keys).
        cfg.insert("torch_dtype".into(), json!("float32"));
        cfg.insert("dtype".into(), json!("float32"));
        cfg.insert("rope_theta".into(), json!(rope_theta));
        let scaling = self.rope_scaling(arch_name)?;
        let mut rope_parameters = scaling.clone().unwrap_or_else(|| json!({"rope_type": "default"}));
        rope_parameters["rope_theta"] = json!(rope_theta);
        cfg.insert("rope_parameters".into(), rope_parameters);
        if let Some(scaling) = scaling {
            cfg.insert("rope_scaling".into(), scaling);
        }
        if arch.gguf == "gemma3" {
            self.gemma3_config(&mut cfg, head_dim)?;
        }
        Ok(Value::Object(cfg))
    }

    /// What Gemma 3 adds to the shared config, as llama.cpp runs the file: every 6th block global
    /// (llama.cpp's fixed pattern, unless the file states one), the sliding blocks on RoPE base 10000
    /// and never scaled, the attention scaled by 1/√head_dim (llama.cpp uses 1/√(d_model/heads) for the
    /// 62-block 27B model only), GELU (tanh), no softcapping.
    fn gemma3_config(&self, cfg: &mut Map<String, Value>, head_dim: usize) -> Result<()> {
        let layers = self.req_usize("gemma3.block_count")?;
        let pattern = self.opt_usize("gemma3.attention.sliding_window_pattern")?.unwrap_or(6);
        ensure!(pattern > 0, "{}: gemma3.attention.sliding_window_pattern is 0", self.path.display());
        let types: Vec<&str> = (0..layers).map(|i| if (i + 1) % pattern == 0 { "full_attention" } else { "sliding_attention" }).collect();
        let scalar = if layers == 62 { self.req_usize("gemma3.embedding_length")? / self.req_usize("gemma3.attention.head_count")? } else { head_dim };
        let local_base = 10000.0;
        cfg.remove("hidden_act");
        let full = cfg.remove("rope_parameters").unwrap_or_else(|| json!({"rope_type": "default"}));
        for (k, v) in [
            ("hidden_activation", json!("gelu_pytorch_tanh")),
            ("query_pre_attn_scalar", json!(scalar)),
            ("sliding_window", json!(self.req_usize("gemma3.attention.sliding_window")?)),
            ("layer_types", json!(types)),
            ("rope_local_base_freq", json!(local_base)),
            ("rope_parameters", json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local_base}})),
            ("final_logit_softcapping", Value::Null),
            ("attn_logit_softcapping", Value::Null),
            ("attention_bias", json!(self.tensor("blk.0.attn_q.bias").is_some())),
            ("use_bidirectional_attention", json!(false)),
        ] {
            cfg.insert(k.into(), v);
        }
        Ok(())
    }

    /// HF `tokenizer.json` and `tokenizer_config.json` for a byte-level BPE (`tokenizer.ggml.model
    /// = gpt2`) vocabulary, or Gemma's SentencePiece one (`llama` in a `gemma3` file), plus warnings
    /// about anything that could not be reproduced exactly.
    pub fn hf_tokenizer(&self) -> Result<(Value, Value, Vec<String>)> {
        let model = self.req_str("tokenizer.ggml.model")?;
        let gemma = model == "llama" && self.architecture().is_ok_and(|a| a == "gemma3");
        ensure!(
            model == "gpt2" || gemma,
            "{}: tokenizer.ggml.model is '{model}'; only 'gpt2' (byte-level BPE), and Gemma 3's 'llama' \
             (SentencePiece), can be converted",
            self.path.display()
        );
        let tokens = self.req_str_array("tokenizer.ggml.tokens")?;
        let types = match self.metadata.get("tokenizer.ggml.token_type") {
            None => vec![TOKEN_NORMAL; tokens.len()],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(MetaValue::as_i64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    anyhow!("{}: tokenizer.ggml.token_type is not an integer array", self.path.display())
                })?,
        };
        ensure!(
            types.len() == tokens.len(),
            "{}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
            self.path.display(),
            types.len(),
            tokens.len()
        );

        if gemma {
            return self.gemma_tokenizer(&tokens, &types);
        }
        let merges = self.req_str_array("tokenizer.ggml.merges")?;
        let mut warnings = Vec::new();
        let pre = self.opt_str("tokenizer.ggml.pre")?;
        let pre_tokenizer = PreTokenizer::for_pre(pre);
        match (pre, &pre_tokenizer) {
            (None, _) => warnings.push(
                "no tokenizer.ggml.pre in the file; using GPT-2's byte-level pre-tokenizer".to_string(),
            ),
            (Some(p), PreTokenizer::Unknown) => warnings.push(format!(
                "unknown tokenizer.ggml.pre '{p}'; using GPT-2's byte-level pre-tokenizer, \
                 so text may split differently than in llama.cpp"
            )),
            _ => {}
        }

        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, (token, &ty)) in tokens.iter().zip(&types).enumerate() {
            if vocab.contains_key(*token) {
                warnings.push(format!(
                    "token {id} ({token:?}) duplicates an earlier token; the earlier id is kept"
                ));
            } else {
                vocab.insert(token.to_string(), json!(id));
            }
            added.extend(added_token(id, token, ty));
        }
        let specials = self.specials(&tokens, false)?;
        let (bos_added, eos_added) = specials.added(&self.path)?;

        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer.to_json(),
            "post_processor": post_processor(Some(byte_level_post()), bos_added, eos_added),
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": pre_tokenizer.ignores_merges(),
                "vocab": vocab,
                // GGUF keeps HF's legacy "left right" merge strings; byte-level tokens never hold
                // a literal space (it is Ġ), so they carry over as they are.
                "merges": merges,
            },
        });

        Ok((tokenizer, self.tokenizer_config("PreTrainedTokenizerFast", &specials)?, warnings))
    }

    /// The special tokens the file names, each `(text, id)`, and whether BOS/EOS are added.
    fn specials<'t>(&self, tokens: &[&'t str], add_bos_default: bool) -> Result<Specials<'t>> {
        let special = |key: &str| -> Result<Option<(&'t str, usize)>> {
            let Some(id) = self.opt_usize(key)? else { return Ok(None) };
            let token = tokens.get(id).ok_or_else(|| {
                anyhow!("{}: {key} = {id} is outside the vocabulary of {}", self.path.display(), tokens.len())
            })?;
            Ok(Some((*token, id)))
        };
        Ok(Specials {
            bos: special("tokenizer.ggml.bos_token_id")?,
            eos: special("tokenizer.ggml.eos_token_id")?,
            unk: special("tokenizer.ggml.unknown_token_id")?,
            pad: special("tokenizer.ggml.padding_token_id")?,
            add_bos: self.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default),
            add_eos: self.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        })
    }

    /// HF `tokenizer_config.json` for a tokenizer of `class`.
    fn tokenizer_config(&self, class: &str, s: &Specials) -> Result<Value> {
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!(class));
        config.insert("add_bos_token".into(), json!(s.add_bos));
        config.insert("add_eos_token".into(), json!(s.add_eos));
        // Both vocabularies decode text exactly; HF's clean-up pass would then delete the spaces
        // in front of punctuation.
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        for (k, v) in [("bos_token", s.bos), ("eos_token", s.eos), ("unk_token", s.unk), ("pad_token", s.pad)] {
            if let Some((token, _)) = v {
                config.insert(k.into(), json!(token));
            }
        }
        if let Ok(arch) = self.architecture() {
            if let Some(n) = self.opt_usize(&format!("{arch}.context_length"))? {
                config.insert("model_max_length".into(), json!(n));
            }
        }
        if let Some(t) = self.opt_str("tokenizer.chat_template")? {
            config.insert("chat_template".into(), json!(t));
        }
        Ok(Value::Object(config))
    }

    /// Gemma 3's tokenizer as transformers rebuilds it from a GGUF (its GemmaTokenizer): a BPE over
    /// the file's vocabulary with merges derived from it, byte fallback, spaces written `▁`, control
    /// tokens special and user-defined ones added whole, BOS added as the file says.
    fn gemma_tokenizer(&self, tokens: &[&str], types: &[i64]) -> Result<(Value, Value, Vec<String>)> {
        // A token of spaces only is stored with real spaces, but looked up (after the normaliser) as `▁`s.
        let spelled: Vec<String> = tokens
            .iter()
            .map(|t| if t.contains(' ') && t.trim().is_empty() { "\u{2581}".repeat(t.chars().count()) } else { t.to_string() })
            .collect();
        // A repeated token keeps its last id, as a Python dict built in file order does.
        let mut index = HashMap::new();
        for (id, t) in spelled.iter().enumerate() {
            index.insert(t.as_str(), id);
        }
        let mut warnings = Vec::new();
        if index.len() != spelled.len() {
            warnings.push(format!("{} tokens repeat an earlier one; the later id is kept", spelled.len() - index.len()));
        }
        let merges = merges_from_vocab(&index);
        let vocab: Map<String, Value> = index.iter().map(|(t, &id)| (t.to_string(), json!(id))).collect();
        let added: Vec<Value> = tokens.iter().zip(types).enumerate().filter_map(|(id, (token, &ty))| added_token(id, token, ty)).collect();
        // llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
        let specials = self.specials(tokens, true)?;
        let (bos_added, eos_added) = specials.added(&self.path)?;
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
            "post_processor": post_processor(None, bos_added, eos_added),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ]},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": specials.unk.map(|(t, _)| t),
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        });
        Ok((tokenizer, self.tokenizer_config("GemmaTokenizer", &specials)?, warnings))
    }

    /// HF-named, HF-layout (unpermuted) tensors, one at a time so a big file never sits in RAM twice.
    pub fn hf_tensors(&self) -> impl Iterator<Item = Result<(String, Vec<usize>, Vec<f32>)>> + '_ {
        let (plan, failed) = match self.tensor_plan() {
            Ok(plan) => (Some(plan), None),
            Err(e) => (None, Some(Err(e))),
        };
        failed.into_iter().chain(
            plan.into_iter()
                .flat_map(move |plan| self.tensors.iter().map(move |info| self.hf_tensor(&plan, info))),
        )
    }

    fn hf_tensor(&self, plan: &TensorPlan, info: &TensorInfo) -> Result<(String, Vec<usize>, Vec<f32>)> {
        let hf_name = hf_tensor_name(plan.arch, &info.name).ok_or_else(|| {
            anyhow!(
                "{}: tensor '{}' has no Hugging Face equivalent for architecture {}",
                self.path.display(),
                info.name,
                plan.arch.gguf
            )
        })?;
        let mut data = self.dequantize(info)?;
        if plan.arch.norms_plus_one && hf_name.ends_with("norm.weight") {
            // f32 subtraction, as transformers' GGUF loader does it.
            data.iter_mut().for_each(|w| *w -= 1.0);
        }
        if plan.permute_qk {
            let heads = if info.name.ends_with(".attn_q.weight") || info.name.ends_with(".attn_q.bias") {
                Some(plan.n_head)
            } else if info.name.ends_with(".attn_k.weight") || info.name.ends_with(".attn_k.bias") {
                Some(plan.n_head_kv)
            } else {
                None
            };
            if let Some(heads) = heads {
                unpermute_rows(&mut data, &info.shape, heads)
                    .map_err(|e| anyhow!("{}: tensor '{}': {e:#}", self.path.display(), info.name))?;
            }
        }
        Ok((hf_name, info.shape.clone(), data))
    }

    /// Everything that would make `import` refuse this file, all at once and without
    /// dequantising anything: an architecture it cannot map, tensor types it cannot dequantise
    /// (each with its count), tensors with no Hugging Face name. Empty when the file imports.
    pub fn import_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let arch_ok = match self.metadata.get("general.architecture").map(MetaValue::as_str) {
            None => {
                problems.push("no general.architecture key".to_string());
                false
            }
            Some(None) => {
                problems.push("general.architecture is not a string".to_string());
                false
            }
            Some(Some(name)) if !ARCHS.iter().any(|a| a.gguf == name) => {
                let known: Vec<_> = ARCHS.iter().map(|a| a.gguf).collect();
                problems.push(format!("unsupported architecture '{name}' (supported: {})", known.join(", ")));
                false
            }
            Some(Some(_)) => true,
        };
        let mut unsupported = BTreeMap::<String, usize>::new();
        for t in &self.tensors {
            if lookup_type(t.ggml_type).and_then(|ty| ty.kernel).is_none() {
                *unsupported.entry(t.type_name()).or_default() += 1;
            }
        }
        if !unsupported.is_empty() {
            let counts: Vec<_> = unsupported
                .iter()
                .map(|(ty, n)| format!("{ty} ({n} tensor{})", if *n == 1 { "" } else { "s" }))
                .collect();
            problems.push(format!(
                "tensor types that cannot be dequantised: {} (supported: {}; llama.cpp's \
                 `llama-quantize --allow-requantize` can turn the file into one of those)",
                counts.join(", "),
                supported_type_names()
            ));
        }
        if let (true, Ok(arch)) = (arch_ok, self.arch()) {
            let unmapped: Vec<_> =
                self.tensors.iter().filter(|t| hf_tensor_name(arch, &t.name).is_none()).map(|t| t.name.as_str()).collect();
            if !unmapped.is_empty() {
                let more = if unmapped.len() > 5 { format!(" and {} more", unmapped.len() - 5) } else { String::new() };
                problems.push(format!(
                    "{} tensor{} with no Hugging Face equivalent: {}{more}",
                    unmapped.len(),
                    if unmapped.len() == 1 { "" } else { "s" },
                    unmapped[..unmapped.len().min(5)].join(", ")
                ));
            }
        }
        problems
    }

    /// Fails with every reason `import_problems` finds, in one message.
    pub fn check_importable(&self) -> Result<()> {
        let problems = self.import_problems();
        ensure!(problems.is_empty(), "{}: cannot import: {}", self.path.display(), problems.join("; "));
        Ok(())
    }

    fn tensor_plan(&self) -> Result<TensorPlan> {
        self.check_importable()?;
        let arch_name = self.architecture()?;
        let arch = self.arch()?;
        let n_head = self.req_usize(&format!("{arch_name}.attention.head_count"))?;
        let n_head_kv = self.opt_usize(&format!("{arch_name}.attention.head_count_kv"))?.unwrap_or(n_head);
        Ok(TensorPlan { arch, permute_qk: arch.permute_qk, n_head, n_head_kv })
    }

    fn arch(&self) -> Result<&'static Arch> {
        let name = self.architecture()?;
        ARCHS.iter().find(|a| a.gguf == name).ok_or_else(|| {
            let known: Vec<_> = ARCHS.iter().map(|a| a.gguf).collect();
            anyhow!(
                "{}: unsupported architecture '{name}' (supported: {})",
                self.path.display(),
                known.join(", ")
            )
        })
    }

    /// HF `rope_scaling` from `{arch}.rope.scaling.*` (or the older `{arch}.rope.scale_linear`).
    fn rope_scaling(&self, arch: &str) -> Result<Option<Value>> {
        let key = |k: &str| format!("{arch}.rope.{k}");
        let (kind, factor) = match self.opt_str(&key("scaling.type"))? {
            Some("none") => return Ok(None),
            Some(kind) => (kind.to_string(), self.req_f64(&key("scaling.factor"))?),
            None => match self.opt_f64(&key("scale_linear"))? {
                Some(factor) => ("linear".to_string(), factor),
                None => return Ok(None),
            },
        };
        let mut scaling = json!({"rope_type": kind, "factor": factor});
        if let Some(n) = self.opt_usize(&key("scaling.original_context_length"))? {
            scaling["original_max_position_embeddings"] = json!(n);
        }
        for (hf, gguf) in [("beta_fast", "scaling.yarn_beta_fast"), ("beta_slow", "scaling.yarn_beta_slow")] {
            if let Some(v) = self.opt_f64(&key(gguf))? {
                scaling[hf] = json!(v);
            }
        }
        Ok(Some(scaling))
    }

    fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn req(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| anyhow!("{}: missing required metadata key '{key}'", self.path.display()))
    }

    fn wrong_type(&self, key: &str, want: &str, got: &MetaValue) -> anyhow::Error {
        anyhow!("{}: metadata key '{key}' should be {want}, found {}", self.path.display(), got.type_name())
    }

    fn req_str(&self, key: &str) -> Result<&str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| anyhow!("{}: missing required metadata key '{key}'", self.path.display()))
    }

    fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| anyhow!("{}: missing required metadata key '{key}'", self.path.display()))
    }

    fn req_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.req(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(MetaValue::as_str).collect())
            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.metadata
            .get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.metadata
            .get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, "a number", v)))
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.metadata
            .get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v)))
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.metadata
            .get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, "a string", v)))
            .transpose()
    }
}

// ------------------------------------------------------------------------------------------------
// Parsing

/// A cursor over the mapped bytes whose reads fail, naming the offset, instead of running off
/// the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            anyhow!(
                "truncated file: needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.buf.len()
            )
        })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count read from the file, checked against what is left so that a corrupt count fails
    /// cleanly instead of asking for an absurd allocation.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.u64()?;
        usize::try_from(n).ok().filter(|&n| n.saturating_mul(min_item_bytes) <= self.remaining()).ok_or_else(
            || anyhow!("truncated or corrupt file: {what} count {n} at offset {at} exceeds the file size"),
        )
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let at = self.pos;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("string at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("invalid bool byte {b} at offset {}", self.pos - 1),
            },
            8 => MetaValue::Str(self.string()?),
            9 => {
                ensure!(depth < MAX_ARRAY_NESTING, "arrays nested deeper than {MAX_ARRAY_NESTING} levels");
                let item_ty = self.u32()?;
                let n = self.count(value_min_size(item_ty)?, "array length")?;
                let items = (0..n).map(|_| self.value(item_ty, depth + 1)).collect::<Result<_>>()?;
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            _ => bail!("unknown metadata value type {ty} at offset {}", self.pos - 4),
        })
    }
}

/// Smallest encoding of a value of GGUF type `ty`: fixed sizes, and the length prefix of strings
/// and arrays (an array also has its item type).
fn value_min_size(ty: u32) -> Result<usize> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        _ => bail!("unknown metadata value type {ty}"),
    })
}

fn parse(buf: &[u8]) -> Result<(u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>)> {
    let mut r = Reader { buf, pos: 0 };
    let magic = r.take(4).context("reading the magic number")?;
    ensure!(magic == MAGIC, "not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\"");
    let version = r.u32()?;
    // A big-endian file's version reads byte-swapped here: 3 becomes 0x03000000.
    ensure!(version == 0 || version & 0xffff != 0, "big-endian GGUF files are not supported");
    ensure!(version == 2 || version == 3, "unsupported GGUF version {version} (supported: 2, 3)");
    // Each tensor info takes at least 24 bytes (empty name, no dims, type, offset); each
    // key/value at least 13 (empty key, type, a one-byte value).
    let n_tensors = r.count(24, "tensor")?;
    let n_kv = r.count(13, "metadata")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string().with_context(|| format!("reading the key of metadata entry {i}"))?;
        let value =
            r.u32().and_then(|ty| r.value(ty, 0)).with_context(|| format!("reading metadata key '{key}'"))?;
        ensure!(metadata.insert(key.clone(), value).is_none(), "duplicate metadata key '{key}'");
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| anyhow!("general.alignment must be a power-of-two integer, found {v:?}"))?,
    };

    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = r.string().with_context(|| format!("reading the name of tensor {i}"))?;
        let (ne, ggml_type, offset) = (|| -> Result<_> {
            let n_dims = r.u32()? as usize;
            ensure!(n_dims <= MAX_DIMS, "{n_dims} dimensions (ggml allows at most {MAX_DIMS})");
            let ne = (0..n_dims)
                .map(|_| r.u64().and_then(|d| usize::try_from(d).context("dimension does not fit in memory")))
                .collect::<Result<Vec<_>>>()?;
            // Checked here for every type, known or not, so no count of elements downstream overflows.
            ensure!(ne.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_some(), "dimensions {ne:?} have more elements than memory can hold");
            Ok((ne, r.u32()?, r.u64()?))
        })()
        .with_context(|| format!("reading tensor info of '{name}'"))?;
        ensure!(names.insert(name.clone()), "duplicate tensor name '{name}'");
        raw.push((name, ne, ggml_type, offset));
    }

    let data_start = (r.pos as u64).next_multiple_of(alignment);
    let tensors = raw
        .into_iter()
        .map(|(name, ne, ggml_type, offset)| {
            ensure!(
                offset % alignment == 0,
                "tensor '{name}': data offset {offset} is not a multiple of the alignment {alignment}"
            );
            let shape: Vec<usize> = ne.into_iter().rev().collect();
            let offset = data_start
                .checked_add(offset)
                .ok_or_else(|| anyhow!("tensor '{name}': data offset {offset} overflows"))?;
            // Tensors of types this build does not know still load; dequantize() reports them.
            if let Some(ty) = lookup_type(ggml_type) {
                let (_, nbytes) = tensor_size(ty, &shape).with_context(|| format!("tensor '{name}'"))?;
                let end = offset.saturating_add(nbytes as u64);
                ensure!(
                    end <= buf.len() as u64,
                    "truncated file: tensor '{name}' needs bytes {offset}..{end} but the file has {}",
                    buf.len()
                );
            }
            Ok(TensorInfo { name, shape, ggml_type, offset })
        })
        .collect::<Result<_>>()?;
    Ok((version, metadata, tensors))
}

// ------------------------------------------------------------------------------------------------
// Architectures, tensor names and llama.cpp's q/k permutation

struct Arch {
    gguf: &'static str,
    model_type: &'static str,
    hf_class: &'static str,
    /// convert_hf_to_gguf.py reorders q/k rows for llama (to Meta's interleaved-pair RoPE
    /// layout); Qwen2 and Gemma 3 tensors are written as HF has them.
    permute_qk: bool,
    /// Block tensors (GGUF module, HF module) beyond the ones every family shares.
    modules: &'static [(&'static str, &'static str)],
    /// convert_hf_to_gguf.py stores Gemma's (1 + w) norm weights with the 1 added: import subtracts it.
    norms_plus_one: bool,
}

/// Llama and Qwen2: one norm before attention, one (`ffn_norm`) before the MLP.
const LLAMA_MODULES: &[(&str, &str)] = &[("ffn_norm", "post_attention_layernorm")];
/// Gemma 3: norms before and after attention and the MLP, and norms on each query and key head.
const GEMMA3_MODULES: &[(&str, &str)] = &[
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
];

/// Mistral-family GGUFs converted from HF use `general.architecture = llama`; there is no
/// separate "mistral" architecture to accept.
static ARCHS: &[Arch] = &[
    Arch { gguf: "llama", model_type: "llama", hf_class: "LlamaForCausalLM", permute_qk: true, modules: LLAMA_MODULES, norms_plus_one: false },
    Arch { gguf: "qwen2", model_type: "qwen2", hf_class: "Qwen2ForCausalLM", permute_qk: false, modules: LLAMA_MODULES, norms_plus_one: false },
    Arch { gguf: "gemma3", model_type: "gemma3_text", hf_class: "Gemma3ForCausalLM", permute_qk: false, modules: GEMMA3_MODULES, norms_plus_one: true },
];

struct TensorPlan {
    arch: &'static Arch,
    permute_qk: bool,
    n_head: usize,
    n_head_kv: usize,
}

/// HF name of a GGUF tensor of `arch`, `None` for a tensor with no HF counterpart (for example
/// `rope_freqs.weight`, which llama.cpp derives from Llama-3 rope scaling).
fn hf_tensor_name(arch: &Arch, gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => arch.modules.iter().find(|(g, _)| *g == other)?.1,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// Undoes convert_hf_to_gguf.py's `permute`, which views the rows of each of `heads` heads as
/// [2, head_dim/2] and transposes that to [head_dim/2, 2]: GGUF row h*hd + 2j + t holds HF row
/// h*hd + t*hd/2 + j. Works on weights (rows x cols) and biases (rows) alike.
fn unpermute_rows(data: &mut [f32], shape: &[usize], heads: usize) -> Result<()> {
    let rows = shape.first().copied().unwrap_or(0);
    ensure!(
        heads > 0 && rows > 0 && rows % (2 * heads) == 0,
        "{rows} rows cannot be split into {heads} heads of an even size"
    );
    let cols = shape[1..].iter().product::<usize>();
    ensure!(cols > 0, "shape {shape:?} has no values to reorder");
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut head = vec![0f32; head_dim * cols];
    for h in data.chunks_exact_mut(head_dim * cols) {
        head.copy_from_slice(h);
        for j in 0..half {
            for t in 0..2 {
                let (from, to) = (2 * j + t, t * half + j);
                h[to * cols..][..cols].copy_from_slice(&head[from * cols..][..cols]);
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Tokenizer

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-4-style splitting regexes of HF's Llama-3 and Qwen2 tokenizer.json files (the patterns
/// llama.cpp's llama-vocab.cpp quotes as the originals for `llama-bpe` and `qwen2`). They differ
/// only in how many digits a number piece may hold.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// HF pre-tokenizers equivalent to llama.cpp's `tokenizer.ggml.pre` variants.
enum PreTokenizer {
    /// GPT-2: ByteLevel with its built-in GPT-2 regex.
    Gpt2,
    /// llama.cpp's SMOLLM/STARCODER/REFACT/COMMAND_R/CODESHELL group: `\p{N}` pieces split off
    /// one digit at a time, then the GPT-2 regex. HF spells it Digits(individual) + ByteLevel.
    DigitsGpt2,
    /// A Split on `regex` (isolated), then ByteLevel without its own regex.
    Regex { regex: &'static str, ignore_merges: bool },
    /// A name not known here; falls back to GPT-2.
    Unknown,
}

impl PreTokenizer {
    fn for_pre(pre: Option<&str>) -> Self {
        match pre {
            Some("smollm" | "starcoder" | "refact" | "command-r" | "codeshell") => PreTokenizer::DigitsGpt2,
            Some("gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais") => PreTokenizer::Gpt2,
            // llama.cpp sets ignore_merges for Llama-3 as HF's tokenizer.json does: a piece that
            // is itself a vocabulary entry is taken whole.
            Some("llama-bpe" | "llama3" | "llama-v3") => {
                PreTokenizer::Regex { regex: LLAMA3_REGEX, ignore_merges: true }
            }
            Some("qwen2") => PreTokenizer::Regex { regex: QWEN2_REGEX, ignore_merges: false },
            _ => PreTokenizer::Unknown,
        }
    }

    fn ignores_merges(&self) -> bool {
        matches!(self, PreTokenizer::Regex { ignore_merges: true, .. })
    }

    fn to_json(&self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        match self {
            PreTokenizer::Gpt2 | PreTokenizer::Unknown => byte_level(true),
            PreTokenizer::DigitsGpt2 => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
            }),
            PreTokenizer::Regex { regex, .. } => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                    byte_level(false),
                ],
            }),
        }
    }
}

/// The special tokens of a GGUF vocabulary, each `(text, id)`, and whether BOS/EOS are added.
struct Specials<'t> {
    bos: Option<(&'t str, usize)>,
    eos: Option<(&'t str, usize)>,
    unk: Option<(&'t str, usize)>,
    pad: Option<(&'t str, usize)>,
    add_bos: bool,
    add_eos: bool,
}

impl<'t> Specials<'t> {
    /// The BOS and EOS tokens the tokenizer adds itself.
    #[allow(clippy::type_complexity)]
    fn added(&self, path: &Path) -> Result<(Option<(&'t str, usize)>, Option<(&'t str, usize)>)> {
        let missing = |what: &str| anyhow!("{}: add_{what}_token is set but there is no {what}_token_id", path.display());
        let bos = if self.add_bos { Some(self.bos.ok_or_else(|| missing("bos"))?) } else { None };
        let eos = if self.add_eos { Some(self.eos.ok_or_else(|| missing("eos"))?) } else { None };
        Ok((bos, eos))
    }
}

/// An HF added token for a control (special) or user-defined (whole, not special) vocabulary entry.
fn added_token(id: usize, token: &str, ty: i64) -> Option<Value> {
    (ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED).then(|| {
        json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": ty == TOKEN_CONTROL})
    })
}

fn byte_level_post() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
}

/// `base` post-processing (ByteLevel for byte-level BPE), plus a template that adds BOS/EOS when the
/// GGUF asks for them (HF fast tokenizers add special tokens only through the post-processor).
fn post_processor(base: Option<Value>, bos: Option<(&str, usize)>, eos: Option<(&str, usize)>) -> Value {
    if bos.is_none() && eos.is_none() {
        return base.unwrap_or(Value::Null);
    }
    let special = |tok: &str, type_id: u32| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
    let sequence = |seq: &str, type_id: u32| json!({"Sequence": {"id": seq, "type_id": type_id}});
    let template = |seq: &str, type_id: u32| {
        let mut t = Vec::new();
        t.extend(bos.map(|(tok, _)| special(tok, type_id)));
        t.push(sequence(seq, type_id));
        t.extend(eos.map(|(tok, _)| special(tok, type_id)));
        t
    };
    let single = template("A", 0);
    let mut pair = template("A", 0);
    pair.extend(template("B", 1));
    let mut special_tokens = Map::new();
    for (tok, id) in bos.into_iter().chain(eos) {
        special_tokens.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
    }
    let template = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens});
    match base {
        Some(base) => json!({"type": "Sequence", "processors": [base, template]}),
        None => template,
    }
}

/// The merges that rebuild a SentencePiece BPE vocabulary's tokens (a GGUF stores none), best
/// first, as transformers' `generate_merges` derives them for Gemma: every split of a token into
/// two tokens of the vocabulary, tokens taken in file order (for Gemma, unlike its scores, that is
/// the merge order), the splits of one token longest left part first.
fn merges_from_vocab(index: &HashMap<&str, usize>) -> Vec<[String; 2]> {
    let mut order: Vec<(usize, &str)> = index.iter().map(|(t, &i)| (i, *t)).collect();
    order.sort_unstable();
    let mut merges = Vec::new();
    for (_, token) in order {
        let cuts: Vec<usize> = token.char_indices().map(|(at, _)| at).skip(1).collect();
        for &at in cuts.iter().rev() {
            let (l, r) = token.split_at(at);
            if index.contains_key(l) && index.contains_key(r) {
                merges.push([l.to_string(), r.to_string()]);
            }
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/gguf").join(name)
    }

    /// Tensors of a safetensors file (f32 only): name -> (shape, values).
    fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        header
            .into_iter()
            .filter(|(k, _)| k != "__metadata__")
            .map(|(name, info)| {
                assert_eq!(info["dtype"], "F32", "{name}");
                let shape =
                    info["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
                let [a, b] = [0, 1].map(|i| info["data_offsets"][i].as_u64().unwrap() as usize);
                let values =
                    data[a..b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                (name, (shape, values))
            })
            .collect()
    }

    fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: got {g}, want {w}");
        }
    }

    /// A GGUF file built by hand, for the cases no fixture covers.
    struct Builder {
        version: u32,
        kv: Vec<(String, MetaValue)>,
        /// name, GGUF-order dims, ggml type, data bytes
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Builder {
        fn new(version: u32) -> Self {
            Builder { version, kv: Vec::new(), tensors: Vec::new() }
        }

        fn kv(mut self, key: &str, v: MetaValue) -> Self {
            self.kv.push((key.into(), v));
            self
        }

        fn tensor(mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), ne.to_vec(), ty, data));
            self
        }

        /// A model of one layer for `arch`: hidden 8, 2 query heads of dim 4, 1 key/value head,
        /// an untied head, every tensor F32 and filled with 0, 1, 2, ...
        fn model(arch: &str) -> Self {
            let f32s = |n: usize| (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect::<Vec<u8>>();
            let key = |k: &str| format!("{arch}.{k}");
            let mut b = Builder::new(3)
                .kv("general.architecture", MetaValue::Str(arch.into()))
                .kv(&key("embedding_length"), MetaValue::U32(8))
                .kv(&key("feed_forward_length"), MetaValue::U32(16))
                .kv(&key("block_count"), MetaValue::U32(1))
                .kv(&key("attention.head_count"), MetaValue::U32(2))
                .kv(&key("attention.head_count_kv"), MetaValue::U32(1))
                .kv(&key("context_length"), MetaValue::U32(16))
                .kv(&key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6));
            for (name, ne) in [
                ("token_embd.weight", [8u64, 5].as_slice()),
                ("blk.0.attn_q.weight", &[8, 8]),
                ("blk.0.attn_k.weight", &[8, 4]),
                ("output.weight", &[8, 5]),
            ] {
                b = b.tensor(name, ne, 0, f32s(ne.iter().product::<u64>() as usize));
            }
            b
        }

        fn bytes(&self) -> Vec<u8> {
            fn string(out: &mut Vec<u8>, s: &str) {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            fn value(out: &mut Vec<u8>, v: &MetaValue) {
                match v {
                    MetaValue::U32(x) => out.extend(x.to_le_bytes()),
                    MetaValue::I32(x) => out.extend(x.to_le_bytes()),
                    MetaValue::F32(x) => out.extend(x.to_le_bytes()),
                    MetaValue::Bool(x) => out.push(*x as u8),
                    MetaValue::Str(s) => string(out, s),
                    MetaValue::Array(items) => {
                        out.extend(type_id(&items[0]).to_le_bytes());
                        out.extend((items.len() as u64).to_le_bytes());
                        items.iter().for_each(|i| value(out, i));
                    }
                    other => unimplemented!("test builder: {other:?}"),
                }
            }
            fn type_id(v: &MetaValue) -> u32 {
                match v {
                    MetaValue::U32(_) => 4,
                    MetaValue::I32(_) => 5,
                    MetaValue::F32(_) => 6,
                    MetaValue::Bool(_) => 7,
                    MetaValue::Str(_) => 8,
                    MetaValue::Array(_) => 9,
                    other => unimplemented!("test builder: {other:?}"),
                }
            }
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend((self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                string(&mut out, k);
                out.extend(type_id(v).to_le_bytes());
                value(&mut out, v);
            }
            let mut offset = 0u64;
            for (name, ne, ty, data) in &self.tensors {
                string(&mut out, name);
                out.extend((ne.len() as u32).to_le_bytes());
                ne.iter().for_each(|d| out.extend(d.to_le_bytes()));
                out.extend(ty.to_le_bytes());
                out.extend(offset.to_le_bytes());
                offset += (data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
            }
            for (_, _, _, data) in &self.tensors {
                out.resize(out.len().next_multiple_of(DEFAULT_ALIGNMENT as usize), 0);
                out.extend(data);
            }
            out
        }
    }

    /// A file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(tag: &str, bytes: &[u8]) -> Self {
            let path = std::env::temp_dir().join(format!("scalpel-gguf-{}-{tag}.gguf", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }

        fn open(&self) -> Result<GgufFile> {
            GgufFile::open(&self.0)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Found while writing the fuzz targets: a tensor with no dimensions where the embedding or a
    /// permuted q/k matrix belongs, and a matrix with no columns, panicked on an index; now they are errors.
    #[test]
    fn tensors_without_dimensions_or_values_are_errors_not_panics() {
        let with = |name: &str, ne: &[u64], data: Vec<u8>| {
            let mut b = Builder::model("llama");
            let t = b.tensors.iter_mut().find(|t| t.0 == name).unwrap();
            (t.1, t.3) = (ne.to_vec(), data);
            GgufFile::from_bytes(Path::new("fuzz.gguf"), &b.bytes()).unwrap()
        };
        let e = with("token_embd.weight", &[], vec![0; 4]).hf_config().unwrap_err().to_string();
        assert!(e.contains("token_embd.weight has no dimensions"), "{e}");
        for (ne, data) in [(&[][..], vec![0; 4]), (&[0, 8][..], vec![])] {
            let file = with("blk.0.attn_q.weight", ne, data);
            let e = file.hf_tensors().find_map(Result::err).expect("an error").to_string();
            assert!(e.contains("attn_q.weight"), "{e}");
        }
        let e = GgufFile::from_bytes(Path::new("big.gguf"), &Builder::model("llama").tensor("huge", &[1 << 40, 1 << 40], 99, vec![]).bytes());
        assert!(e.err().expect("refused").to_string().contains("more elements than memory can hold"));
    }

    fn open_err(tag: &str, bytes: &[u8]) -> String {
        let file = TempFile::new(tag, bytes);
        let err = file.open().err().expect("open should fail");
        let msg = format!("{err}");
        assert!(msg.contains(&file.0.display().to_string()), "error should name the file: {msg}");
        msg
    }

    #[test]
    fn dequantisation_matches_gguf_py_bit_for_bit() {
        let f = GgufFile::open(&fixture("quants.gguf")).unwrap();
        let refs = read_safetensors(&fixture("quants.ref.safetensors"));
        assert_eq!(refs.len(), f.tensors().len());
        for t in f.tensors() {
            let (shape, want) = &refs[&t.name];
            assert_eq!(&t.shape, shape, "{}", t.name);
            // Named `TYPE` (random blocks) or `TYPE.quantized` (gguf-py's quantiser).
            assert_eq!(lookup_type(t.ggml_type).unwrap().name, t.name.trim_end_matches(".quantized"));
            assert_eq!(t.offset % 64, 0, "{}: alignment 64 applies", t.name);
            assert_bits_eq(&t.name, &f.dequantize(t).unwrap(), want);
        }
        // Every type with a kernel is covered, and so is every quantiser gguf-py has.
        let covered: HashSet<_> = f.tensors().iter().map(|t| t.ggml_type).collect();
        for ty in GGML_TYPES.iter().filter(|t| t.kernel.is_some()) {
            assert!(covered.contains(&ty.id), "no fixture for {}", ty.name);
        }
        let quantized: Vec<_> = f.tensors().iter().filter_map(|t| t.name.strip_suffix(".quantized")).collect();
        assert_eq!(quantized, ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"]);
    }

    #[test]
    fn metadata_of_every_value_type() {
        let f = GgufFile::open(&fixture("quants.gguf")).unwrap();
        assert_eq!(f.version(), 3);
        let m = f.metadata();
        assert_eq!(m["general.alignment"], MetaValue::U32(64));
        assert_eq!(m["test.u8"], MetaValue::U8(200));
        assert_eq!(m["test.i8"], MetaValue::I8(-100));
        assert_eq!(m["test.u16"], MetaValue::U16(60000));
        assert_eq!(m["test.i16"], MetaValue::I16(-30000));
        assert_eq!(m["test.u32"], MetaValue::U32(4_000_000_000));
        assert_eq!(m["test.i32"], MetaValue::I32(-2_000_000_000));
        assert_eq!(m["test.u64"], MetaValue::U64((1 << 63) + 5));
        assert_eq!(m["test.i64"], MetaValue::I64(-(1 << 62)));
        assert_eq!(m["test.f32"], MetaValue::F32(0.25));
        assert_eq!(m["test.f64"], MetaValue::F64(-1.0e300));
        assert_eq!(m["test.bool"], MetaValue::Bool(true));
        assert_eq!(m["test.str"], MetaValue::Str("héllo".into()));
        assert_eq!(
            m["test.arr_str"],
            MetaValue::Array(vec![MetaValue::Str("a".into()), MetaValue::Str("bc".into())])
        );
        assert_eq!(
            m["test.nested"],
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                MetaValue::Array(vec![MetaValue::I32(3)]),
            ])
        );
        assert_eq!(f.architecture().unwrap(), "scalpel-test");
        assert_eq!(MetaValue::F32(1e-5).as_f64(), Some(1e-5));
        assert_eq!(MetaValue::I8(-1).as_u64(), None);
    }

    #[test]
    fn tiny_llama_tensors_come_back_hf_named_and_unpermuted() {
        let f = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
        let want = read_safetensors(&fixture("tiny_llama.hf.safetensors"));
        let types: HashSet<_> = f.tensors().iter().map(|t| t.ggml_type).collect();
        assert_eq!(types, HashSet::from([0, 1, 8]), "fixture mixes F32, F16 and Q8_0");
        let mut seen = Vec::new();
        for item in f.hf_tensors() {
            let (name, shape, data) = item.unwrap();
            let (want_shape, want_data) =
                want.get(&name).unwrap_or_else(|| panic!("unexpected tensor {name}"));
            assert_eq!(&shape, want_shape, "{name}");
            assert_bits_eq(&name, &data, want_data);
            seen.push(name);
        }
        seen.sort();
        assert_eq!(seen, want.keys().cloned().collect::<Vec<_>>());
        // Without unpermuting, q would not match: the permutation is really exercised.
        let q = f.tensors().iter().find(|t| t.name == "blk.0.attn_q.weight").unwrap();
        assert_ne!(f.dequantize(q).unwrap(), want["model.layers.0.self_attn.q_proj.weight"].1);
    }

    #[test]
    fn tiny_llama_config() {
        let f = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
        let c = f.hf_config().unwrap();
        let expect = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "hidden_act": "silu",
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "vocab_size": 268,
            "tie_word_embeddings": true, "attention_bias": true, "mlp_bias": false,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "torch_dtype": "float32", "dtype": "float32", "rope_theta": 100000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        });
        assert_eq!(c, expect);
    }

    #[test]
    fn tiny_llama_tokenizer() {
        let f = GgufFile::open(&fixture("tiny_llama.gguf")).unwrap();
        let (tok, cfg, warnings) = f.hf_tokenizer().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            tok["pre_tokenizer"],
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]})
        );
        let model = &tok["model"];
        assert_eq!(model["type"], "BPE");
        assert_eq!(model["vocab"].as_object().unwrap().len(), 268);
        assert_eq!(model["vocab"]["Ġthe"], 261);
        assert_eq!(model["vocab"]["Ġ"], 3 + 32);
        assert_eq!(model["merges"][2], "Ġt he");
        assert_eq!(model["merges"].as_array().unwrap().len(), 8);
        let added = tok["added_tokens"].as_array().unwrap();
        let added: Vec<_> = added
            .iter()
            .map(|t| {
                (t["id"].as_u64().unwrap(), t["content"].as_str().unwrap(), t["special"].as_bool().unwrap())
            })
            .collect();
        assert_eq!(
            added,
            [
                (0, "<|endoftext|>", true),
                (1, "<|im_start|>", true),
                (2, "<|im_end|>", true),
                (267, "<tool>", false)
            ]
        );
        assert_eq!(tok["post_processor"]["type"], "ByteLevel", "no BOS added");
        assert_eq!(cfg["bos_token"], "<|im_start|>");
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        assert_eq!(cfg["pad_token"], "<|im_end|>");
        assert_eq!(cfg["add_bos_token"], false);
        assert_eq!(cfg["model_max_length"], 256);
        assert!(cfg["chat_template"].as_str().unwrap().starts_with("{% for m in messages %}"));
    }

    #[test]
    fn hand_built_v2_file_with_untied_head() {
        let file = TempFile::new("v2", &Builder { version: 2, ..Builder::model("llama") }.bytes());
        let f = file.open().unwrap();
        assert_eq!(f.version(), 2);
        assert_eq!(f.tensors()[0].shape, [5, 8], "HF order reverses GGUF's ne");
        let c = f.hf_config().unwrap();
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["rms_norm_eps"], 1e-6);
        // The file's f32 0.0000009999999974752427 is written as the decimal it was meant to be.
        assert_eq!(serde_json::to_string(&c["rms_norm_eps"]).unwrap(), "1e-6");
        assert_eq!(c["head_dim"], 4);
        assert_eq!(c["num_key_value_heads"], 1);
        let all: Vec<_> = f.hf_tensors().collect::<Result<_>>().unwrap();
        let names: Vec<_> = all.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight",
                "lm_head.weight"
            ]
        );
        // Heads of dim 4: HF row h*4 + 2t + j comes from stored row h*4 + 2j + t.
        assert_eq!(all[1].2, rows_of_8(&[0, 2, 1, 3, 4, 6, 5, 7]));
        assert_eq!(all[2].2, rows_of_8(&[0, 2, 1, 3]));
    }

    /// Rows `rows` of a tensor of 8 columns filled with 0, 1, 2, ...
    fn rows_of_8(rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|r| (r * 8..r * 8 + 8).map(|i| i as f32)).collect()
    }

    /// Gemma 3: its own block tensors, norms stored as 1 + w come back as w, the config llama.cpp assumes.
    #[test]
    fn gemma3_maps_its_norms_and_writes_its_layer_pattern() {
        let norm = |v: f32| (0..8).flat_map(|_| v.to_le_bytes()).collect::<Vec<u8>>();
        let mut b = Builder::model("gemma3");
        b.kv.retain(|(k, _)| k != "gemma3.block_count");
        let b = b
            .kv("gemma3.block_count", MetaValue::U32(7))
            .kv("gemma3.attention.key_length", MetaValue::U32(4))
            .kv("gemma3.attention.sliding_window", MetaValue::U32(512))
            .kv("gemma3.rope.freq_base", MetaValue::F32(1e6))
            .tensor("blk.0.ffn_norm.weight", &[8], 0, norm(1.25))
            .tensor("blk.0.post_ffw_norm.weight", &[8], 0, norm(0.5))
            .tensor("blk.0.attn_q.bias", &[8], 0, norm(1.25));
        let file = TempFile::new("gemma3", &b.bytes());
        let f = file.open().unwrap();
        let c = f.hf_config().unwrap();
        assert_eq!((c["model_type"].as_str(), c["architectures"][0].as_str()), (Some("gemma3_text"), Some("Gemma3ForCausalLM")));
        let global: Vec<bool> = c["layer_types"].as_array().unwrap().iter().map(|t| t == "full_attention").collect();
        assert_eq!(global, [false, false, false, false, false, true, false]);
        assert_eq!(c["rope_parameters"]["full_attention"]["rope_theta"], 1e6);
        assert_eq!(c["rope_parameters"]["sliding_attention"]["rope_theta"], 1e4);
        assert_eq!((c["query_pre_attn_scalar"].as_u64(), c["sliding_window"].as_u64()), (Some(4), Some(512)));
        assert_eq!((c["hidden_activation"].as_str(), c.get("hidden_act")), (Some("gelu_pytorch_tanh"), None));
        let all: BTreeMap<_, _> = f.hf_tensors().map(|t| t.map(|(n, _, d)| (n, d))).collect::<Result<_>>().unwrap();
        assert_eq!(all["model.layers.0.pre_feedforward_layernorm.weight"], vec![0.25; 8], "1 + w stored, w imported");
        assert_eq!(all["model.layers.0.post_feedforward_layernorm.weight"], vec![-0.5; 8]);
        assert_eq!(all["model.layers.0.self_attn.q_proj.bias"], vec![1.25; 8], "not a norm: unchanged");
        assert_eq!(all["model.layers.0.self_attn.q_proj.weight"], rows_of_8(&[0, 1, 2, 3, 4, 5, 6, 7]), "not permuted");
        // Gemma's names mean nothing in a Llama file.
        let llama = Builder::model("llama").tensor("blk.0.post_ffw_norm.weight", &[8], 0, norm(1.0));
        let file = TempFile::new("llama-post-ffw", &llama.bytes());
        assert!(file.open().unwrap().import_problems().iter().any(|p| p.contains("blk.0.post_ffw_norm.weight")));
    }

    /// transformers' `generate_merges` for Gemma: tokens in file order, each token's splits longest left part first.
    #[test]
    fn sentencepiece_merges_follow_the_file_order() {
        let tokens = ["a", "b", "c", "ab", "abc", "bc", "ca"];
        let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
        let merges = merges_from_vocab(&index);
        let pairs: Vec<String> = merges.iter().map(|[l, r]| format!("{l} {r}")).collect();
        assert_eq!(pairs, ["a b", "ab c", "a bc", "b c", "c a"]);
    }

    /// Gemma's vocabulary in a GGUF: spaces-only tokens respelled as ▁, BOS added by the template.
    #[test]
    fn a_gemma_vocabulary_becomes_a_byte_fallback_bpe_that_adds_bos() {
        let tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\u{2581}", "h", "i", "hi", "\u{2581}hi", "  ", "<0x41>"];
        let types = [3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 6];
        let b = Builder::model("gemma3")
            .kv("gemma3.attention.sliding_window", MetaValue::U32(4))
            .kv("tokenizer.ggml.model", MetaValue::Str("llama".into()))
            .kv("tokenizer.ggml.tokens", MetaValue::Array(tokens.iter().map(|t| MetaValue::Str(t.to_string())).collect()))
            .kv("tokenizer.ggml.token_type", MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t)).collect()))
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(3))
            .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
        let file = TempFile::new("gemma-vocab", &b.bytes());
        let (tok, cfg, warnings) = file.open().unwrap().hf_tokenizer().unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!((cfg["bos_token"].as_str(), cfg["add_bos_token"].as_bool()), (Some("<bos>"), Some(true)));
        assert_eq!(tok["model"]["vocab"]["\u{2581}\u{2581}"], 9, "a token of spaces is looked up as ▁▁");
        let t = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok).unwrap()).unwrap();
        assert_eq!(t.encode("hi hi", true).unwrap().get_ids(), [2, 7, 8]);
        assert_eq!(t.encode("A", false).unwrap().get_ids(), [10], "byte fallback");
        assert_eq!(t.decode(&[7, 8, 9], false).unwrap(), "hi hi  ");
    }

    #[test]
    fn qwen2_is_not_unpermuted() {
        let file = TempFile::new("qwen2", &Builder::model("qwen2").bytes());
        let f = file.open().unwrap();
        let c = f.hf_config().unwrap();
        assert_eq!(c["architectures"], json!(["Qwen2ForCausalLM"]));
        assert_eq!(c["model_type"], "qwen2");
        assert!(c.get("attention_bias").is_none());
        let all: Vec<_> = f.hf_tensors().collect::<Result<_>>().unwrap();
        assert_eq!(all[1].0, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(all[1].2, rows_of_8(&[0, 1, 2, 3, 4, 5, 6, 7]));
    }

    #[test]
    fn unpermute_inverts_convert_hf_to_gguf() {
        // One head of dim 6 over 1 column: HF rows [a0 a1 a2 b0 b1 b2] (first and second halves
        // of the rotary pairs) are stored by llama.cpp interleaved as [a0 b0 a1 b1 a2 b2].
        let mut stored = vec![10.0, 20.0, 11.0, 21.0, 12.0, 22.0];
        unpermute_rows(&mut stored, &[6, 1], 1).unwrap();
        assert_eq!(stored, [10.0, 11.0, 12.0, 20.0, 21.0, 22.0]);
        // Two heads of dim 4, two columns.
        let mut stored = vec![10., 1., 20., 2., 11., 3., 21., 4., 30., 5., 40., 6., 31., 7., 41., 8.];
        unpermute_rows(&mut stored, &[8, 2], 2).unwrap();
        assert_eq!(stored, [10., 1., 11., 3., 20., 2., 21., 4., 30., 5., 31., 7., 40., 6., 41., 8.]);
        assert!(unpermute_rows(&mut [0.0; 6], &[6], 2).is_err());
    }

    #[test]
    fn tokenizer_pre_variants() {
        let vocab = |pre: Option<&str>, add_bos: bool| {
            let mut b = Builder::new(3)
                .kv("general.architecture", MetaValue::Str("llama".into()))
                .kv("tokenizer.ggml.model", MetaValue::Str("gpt2".into()))
                .kv(
                    "tokenizer.ggml.tokens",
                    MetaValue::Array(["a", "b", "ab", "<s>"].map(|t| MetaValue::Str(t.into())).to_vec()),
                )
                .kv("tokenizer.ggml.token_type", MetaValue::Array([1, 1, 1, 3].map(MetaValue::I32).to_vec()))
                .kv("tokenizer.ggml.merges", MetaValue::Array(vec![MetaValue::Str("a b".into())]))
                .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(3))
                .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos));
            if let Some(pre) = pre {
                b = b.kv("tokenizer.ggml.pre", MetaValue::Str(pre.into()));
            }
            let file = TempFile::new(&format!("pre-{pre:?}-{add_bos}"), &b.bytes());
            file.open().unwrap().hf_tokenizer().unwrap()
        };
        let (tok, _, warnings) = vocab(Some("gpt-2"), false);
        assert!(warnings.is_empty());
        assert_eq!(tok["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(tok["pre_tokenizer"]["use_regex"], true);

        let (tok, _, warnings) = vocab(Some("no-such-pre"), false);
        assert_eq!(tok["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("no-such-pre"), "{warnings:?}");

        let (_, _, warnings) = vocab(None, false);
        assert!(warnings[0].contains("no tokenizer.ggml.pre"), "{warnings:?}");

        let (tok, cfg, _) = vocab(Some("llama-bpe"), true);
        assert_eq!(tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], LLAMA3_REGEX);
        assert_eq!(tok["model"]["ignore_merges"], true);
        assert_eq!(cfg["add_bos_token"], true);
        let template = &tok["post_processor"]["processors"][1];
        assert_eq!(template["single"][0], json!({"SpecialToken": {"id": "<s>", "type_id": 0}}));
        assert_eq!(template["special_tokens"]["<s>"]["ids"], json!([3]));
    }

    #[test]
    fn wrong_magic() {
        let mut bytes = Builder::model("llama").bytes();
        bytes[..4].copy_from_slice(b"GGML");
        let msg = open_err("magic", &bytes);
        assert!(msg.contains("not a GGUF file"), "{msg}");
    }

    #[test]
    fn unsupported_versions() {
        for version in [0, 1, 4] {
            let msg =
                open_err(&format!("v{version}"), &Builder { version, ..Builder::model("llama") }.bytes());
            assert!(msg.contains(&format!("unsupported GGUF version {version}")), "{msg}");
        }
        let mut bytes = Builder::model("llama").bytes();
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert!(open_err("big-endian", &bytes).contains("big-endian"));
    }

    #[test]
    fn truncated_files() {
        let bytes = std::fs::read(fixture("tiny_llama.gguf")).unwrap();
        // Half the file: the tensor infos are intact, the data of later tensors is missing.
        let msg = open_err("half", &bytes[..bytes.len() / 2]);
        assert!(msg.contains("truncated file: tensor '"), "{msg}");
        // Cut inside the metadata.
        let msg = open_err("header", &bytes[..200]);
        assert!(msg.contains("truncated"), "{msg}");
        assert!(open_err("empty", &[]).contains("empty file"));
    }

    #[test]
    fn unsupported_and_unknown_types() {
        let bytes = Builder::model("llama")
            .tensor("blk.0.attn_v.weight", &[1], 24, vec![0; 1])
            .tensor("x", &[1], 99, vec![0; 4])
            .bytes();
        let file = TempFile::new("types", &bytes);
        let f = file.open().unwrap();
        let i8 = f.tensors().iter().find(|t| t.name == "blk.0.attn_v.weight").unwrap();
        let msg = format!("{}", f.dequantize(i8).unwrap_err());
        assert!(msg.contains("'blk.0.attn_v.weight'") && msg.contains("I8 (type 24)"), "{msg}");
        assert!(msg.contains(&file.0.display().to_string()), "{msg}");
        let unknown = f.tensors().iter().find(|t| t.name == "x").unwrap();
        let msg = format!("{}", f.dequantize(unknown).unwrap_err());
        assert!(msg.contains("'x'") && msg.contains("unknown ggml type 99"), "{msg}");
        // hf_tensors refuses before converting anything, naming every offending type and count.
        let mut b = Builder::model("llama");
        for i in 0..3 {
            b = b.tensor(&format!("blk.{i}.attn_v.weight"), &[1], 24, vec![0; 1]);
        }
        let file = TempFile::new("types2", &b.tensor("x", &[1], 99, vec![0; 4]).tensor("y", &[1], 99, vec![0; 4]).bytes());
        let f = file.open().unwrap();
        let mut items = f.hf_tensors();
        let msg = format!("{}", items.next().unwrap().unwrap_err());
        assert!(items.next().is_none(), "nothing after the refusal");
        assert!(msg.contains("cannot import") && msg.contains(&file.0.display().to_string()), "{msg}");
        assert!(msg.contains("I8 (3 tensors), type 99 (2 tensors)"), "{msg}");
        assert!(msg.contains("2 tensors with no Hugging Face equivalent: x, y"), "{msg}");
        assert_eq!(f.import_problems().len(), 2);
        assert!(GgufFile::open(&fixture("tiny_llama.gguf")).unwrap().import_problems().is_empty());
    }

    #[test]
    fn unknown_architecture_and_missing_keys() {
        let mut b = Builder::model("llama");
        b.kv[0].1 = MetaValue::Str("mamba".into());
        let file = TempFile::new("arch", &b.bytes());
        let f = file.open().unwrap();
        let msg = format!("{}", f.hf_config().unwrap_err());
        assert!(msg.contains("unsupported architecture 'mamba'"), "{msg}");
        assert!(f.hf_tensors().next().unwrap().is_err());
        // Architecture and types are refused together.
        let mut b = Builder::model("llama").tensor("blk.0.x.weight", &[1], 99, vec![0; 4]);
        b.kv[0].1 = MetaValue::Str("mamba".into());
        let file = TempFile::new("arch-and-types", &b.bytes());
        let msg = format!("{}", file.open().unwrap().check_importable().unwrap_err());
        assert!(msg.contains("unsupported architecture 'mamba'") && msg.contains("type 99 (1 tensor)"), "{msg}");

        let mut b = Builder::model("llama");
        b.kv.retain(|(k, _)| k != "llama.context_length");
        let file = TempFile::new("missing", &b.bytes());
        let msg = format!("{}", file.open().unwrap().hf_config().unwrap_err());
        assert!(msg.contains("missing required metadata key 'llama.context_length'"), "{msg}");
        assert!(msg.contains(&file.0.display().to_string()), "{msg}");

        let msg = format!("{}", file.open().unwrap().hf_tokenizer().unwrap_err());
        assert!(msg.contains("'tokenizer.ggml.model'"), "{msg}");
    }
}
