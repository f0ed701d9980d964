//! Architecture knowledge, read from the data files in `host/arch/`: which tensors make block `i`,
//! which config keys hold the counts, which config fields depend on a block's index.

use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::OnceLock;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arch {
    pub family: String,
    /// `model_type` values in config.json that this file describes.
    pub model_types: Vec<String>,
    pub architectures: Vec<String>,
    pub config: ConfigKeys,
    pub tensors: TensorNames,
    pub shapes: Shapes,
    #[serde(default)]
    pub index_dependent: Vec<IndexDependent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKeys {
    pub layers: String,
    pub heads: String,
    /// Absent: as many key/value heads as query heads.
    pub kv_heads: Option<String>,
    pub d_model: String,
    pub vocab: String,
    pub context: String,
    /// The feed-forward width.
    pub intermediate: String,
    /// A size expression for `intermediate` when config.json leaves it null or out (GPT-2's `n_inner`).
    pub intermediate_default: Option<String>,
}

/// The sizes a shape expression may name, all read off config.json (see `checkpoint::Dims`).
pub const SIZE_NAMES: [&str; 7] = ["d_model", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "context"];

/// Expected tensor shapes, each dimension a product of config sizes and numbers (`"kv_heads*head_dim"`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shapes {
    /// Tensors outside blocks; all required except the LM head, which a tied model lacks.
    pub global: BTreeMap<String, Vec<String>>,
    /// Names relative to a block; every block needs all of them.
    pub block: BTreeMap<String, Vec<String>>,
    /// Names relative to a block, checked when present (biases some members of a family have).
    #[serde(default)]
    pub block_optional: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorNames {
    /// A prefix some checkpoints of the family omit.
    pub optional_prefix: Option<String>,
    /// Prefix of every tensor of block `{i}`.
    pub block: String,
    pub embedding: String,
    pub position_embedding: Option<String>,
    pub final_norm: Vec<String>,
    /// Absent from a checkpoint: tied to the embedding.
    pub lm_head: String,
    /// Names (relative to a block) of buffers to drop on read.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Names (relative to a block) zeroed by the `zero-output` edit.
    pub output_projections: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexDependent {
    pub key: String,
    pub carry: Carry,
    /// Only matters when this boolean config key is true.
    pub only_if: Option<String>,
    /// Does not matter when this config key is set (a per-layer list that says it for each block).
    pub unless: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Carry {
    /// A list with one entry per block: reordered with the blocks.
    RemapList,
    /// GPT-2's inverse-layer-index attention scale: folded into each moved block's query projection.
    FoldIntoQuery,
    /// Cannot be carried: a layer map that moves blocks is refused while it is in effect.
    Refuse,
}

const FILES: &[(&str, &str)] = &[
    ("gemma3.toml", include_str!("../../arch/gemma3.toml")),
    ("gpt2.toml", include_str!("../../arch/gpt2.toml")),
    ("llama.toml", include_str!("../../arch/llama.toml")),
    ("qwen3.toml", include_str!("../../arch/qwen3.toml")),
];

pub fn all() -> &'static [Arch] {
    static ALL: OnceLock<Vec<Arch>> = OnceLock::new();
    ALL.get_or_init(|| {
        FILES
            .iter()
            .map(|(name, text)| toml::from_str(text).unwrap_or_else(|e| panic!("host/arch/{name} is malformed: {e}")))
            .collect()
    })
}

/// The architecture of a config.json's `model_type`.
pub fn for_model_type(model_type: &str) -> Result<&'static Arch> {
    if let Some(a) = all().iter().find(|a| a.model_types.iter().any(|m| m == model_type)) {
        return Ok(a);
    }
    let known: Vec<&str> = all().iter().flat_map(|a| a.model_types.iter().map(String::as_str)).collect();
    bail!("model_type `{model_type}` is not supported (supported: {}); an architecture is one data file in host/arch/", known.join(", "))
}

impl Arch {
    pub fn block_prefix(&self, i: usize) -> String {
        self.tensors.block.replace("{i}", &i.to_string())
    }

    /// Splits a tensor name into (block index, name inside the block), if it belongs to a block.
    pub fn split_block_name<'n>(&self, name: &'n str) -> Option<(usize, &'n str)> {
        let (head, tail) = self.tensors.block.split_once("{i}")?;
        let rest = name.strip_prefix(head)?;
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let index = rest[..digits].parse().ok()?;
        Some((index, rest[digits..].strip_prefix(tail)?))
    }

    /// The canonical name of a checkpoint tensor (adds the optional prefix where a checkpoint omits it).
    pub fn canonical_name(&self, name: &str) -> String {
        match &self.tensors.optional_prefix {
            Some(p) if !name.starts_with(p.as_str()) && name != self.tensors.lm_head => format!("{p}{name}"),
            _ => name.to_string(),
        }
    }
}

/// The value of a size expression such as `3*heads*head_dim`, given the named sizes.
pub fn eval_size(expr: &str, size: impl Fn(&str) -> Option<usize>) -> Result<usize> {
    expr.split('*').map(str::trim).try_fold(1usize, |acc, factor| {
        let v = match factor.parse::<usize>() {
            Ok(n) => n,
            Err(_) => match size(factor) {
                Some(v) => v,
                None => bail!("unknown size `{factor}` in `{expr}`"),
            },
        };
        acc.checked_mul(v).ok_or_else(|| anyhow::anyhow!("`{expr}` overflows"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_file_parses() {
        assert_eq!(all().len(), FILES.len());
    }

    #[test]
    fn block_names_split_into_index_and_rest() {
        let llama = for_model_type("llama").unwrap();
        assert_eq!(llama.split_block_name("model.layers.12.mlp.up_proj.weight"), Some((12, "mlp.up_proj.weight")));
        assert_eq!(llama.split_block_name("model.norm.weight"), None);
        assert_eq!(llama.block_prefix(3), "model.layers.3.");
        let gpt2 = for_model_type("gpt2").unwrap();
        assert_eq!(gpt2.canonical_name("h.0.ln_1.weight"), "transformer.h.0.ln_1.weight");
        assert_eq!(gpt2.canonical_name("lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn every_shape_uses_known_sizes() {
        let sizes = |name: &str| Some(name.len());
        for a in all() {
            for dims in a.shapes.global.values().chain(a.shapes.block.values()).chain(a.shapes.block_optional.values()) {
                for d in dims {
                    eval_size(d, |s| SIZE_NAMES.contains(&s).then(|| sizes(s)).flatten())
                        .unwrap_or_else(|e| panic!("{}: {e}", a.family));
                }
            }
            assert!(a.shapes.global.contains_key(&a.tensors.embedding) && a.shapes.global.contains_key(&a.tensors.lm_head), "{}", a.family);
        }
        assert_eq!(eval_size("3*heads*head_dim", |s| Some(if s == "heads" { 4 } else { 8 })).unwrap(), 96);
        assert!(eval_size("3*depth", |_| None).unwrap_err().to_string().contains("depth"));
    }

    #[test]
    fn an_unknown_model_type_names_the_known_ones() {
        let e = for_model_type("mamba").unwrap_err().to_string();
        assert!(e.contains("mamba") && e.contains("gpt2") && e.contains("qwen2"), "{e}");
    }
}
