//! The Gemma 3 family, text only (Gemma3ForCausalLM): embeddings scaled by √d_model, (1 + w)
//! RMSNorms, four of them per block (before and after attention, before and after the MLP), an
//! RMSNorm on every query and key head, sliding-window and global blocks with RoPE bases of their
//! own, attention scaled by `query_pre_attn_scalar`, a GELU (tanh) MLP and a tied head. Semantics
//! follow transformers' `modeling_gemma3.py`.

use super::llama::{positive_eps, project_qkv, rope, rope_inv_freq};
use super::params::Params;
use super::transformer::{Family, Init};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Tensor};

/// The config.json fields the forward pass reads. Fields scalpel does not implement are refused by `new`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma3Config {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "gelu_tanh")]
    pub hidden_activation: String,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default = "default_head_dim")]
    pub query_pre_attn_scalar: usize,
    pub sliding_window: Option<i64>,
    /// `sliding_attention` or `full_attention` per block; older configs give `sliding_window_pattern`.
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_pattern")]
    pub sliding_window_pattern: usize,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_head_dim() -> usize {
    256
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_eps() -> Option<f64> {
    Some(1e-6)
}
fn default_pattern() -> usize {
    6
}
fn default_init_range() -> f64 {
    0.02
}

const EMBED: &str = "model.embed_tokens.weight";
const SLIDING: &str = "sliding_attention";
const FULL: &str = "full_attention";

pub struct Gemma3 {
    cfg: Gemma3Config,
    eps: f64,
    /// `tanh` (gelu_pytorch_tanh) or `none` (exact GELU).
    gelu: &'static str,
    heads: i64,
    kv_heads: i64,
    /// Per block: does it slide? It then attends to the last `sliding_window` keys and uses the local RoPE base.
    sliding: Vec<bool>,
    /// RoPE inverse frequencies of global and of sliding blocks.
    inv_freq_full: Tensor,
    inv_freq_sliding: Tensor,
}

impl Gemma3 {
    pub fn new(config: &Value, device: Device) -> Result<Self> {
        let cfg: Gemma3Config = serde_json::from_value(config.clone()).context("config.json does not describe a Gemma 3 model")?;
        let gelu = match cfg.hidden_activation.as_str() {
            "gelu_pytorch_tanh" => "tanh",
            "gelu" => "none",
            other => bail!("config.json `hidden_activation` = \"{other}\" is not implemented for Gemma 3 (gelu_pytorch_tanh, gelu)"),
        };
        if cfg.attn_logit_softcapping.is_some() {
            bail!("config.json `attn_logit_softcapping` is set; attention softcapping (Gemma 2) is not implemented for Gemma 3 models");
        }
        if cfg.use_bidirectional_attention == Some(true) {
            bail!("config.json `use_bidirectional_attention` is true (an encoder); scalpel runs Gemma 3 as a causal language model only");
        }
        let eps = positive_eps(cfg.rms_norm_eps)?;
        let n = cfg.num_hidden_layers;
        let sliding: Vec<bool> = match &cfg.layer_types {
            Some(types) if types.len() != n => bail!("config.json `layer_types` has {} entries for {n} layers", types.len()),
            Some(types) => types
                .iter()
                .map(|t| match t.as_str() {
                    SLIDING => Ok(true),
                    FULL => Ok(false),
                    other => bail!("config.json `layer_types` entry \"{other}\" is not implemented ({SLIDING}, {FULL})"),
                })
                .collect::<Result<_>>()?,
            // transformers: every `sliding_window_pattern`-th block is global.
            None if cfg.sliding_window_pattern == 0 => bail!("config.json `sliding_window_pattern` must be at least 1"),
            None => (0..n).map(|i| (i + 1) % cfg.sliding_window_pattern != 0).collect(),
        };
        if sliding.iter().any(|&s| s) && !cfg.sliding_window.is_some_and(|w| w > 0) {
            bail!("config.json has sliding-window blocks but no positive `sliding_window`");
        }
        let inv_freq = |layer_type: &str| -> Result<Tensor> {
            let (theta, scaling) = rope_of(config, layer_type);
            Ok(rope_inv_freq(theta, &scaling, cfg.head_dim).with_context(|| format!("RoPE of the {layer_type} blocks"))?.to_device(device))
        };
        let heads = cfg.num_attention_heads;
        Ok(Gemma3 {
            eps,
            gelu,
            heads: heads as i64,
            kv_heads: cfg.num_key_value_heads.unwrap_or(heads) as i64,
            sliding,
            inv_freq_full: inv_freq(FULL)?,
            inv_freq_sliding: inv_freq(SLIDING)?,
            cfg,
        })
    }

    fn norm(&self, p: &Params, x: &Tensor, name: &str) -> Result<Tensor> {
        Ok(gemma_rms_norm(x, p.get(name)?, self.eps))
    }
}

/// The RoPE base and scaling of `full_attention` or `sliding_attention` blocks: transformers 5's
/// `rope_parameters` keyed by layer type, else the older `rope_theta` + `rope_scaling` (global) and
/// `rope_local_base_freq` (sliding, never scaled), with transformers' defaults.
fn rope_of(config: &Value, layer_type: &str) -> (f64, Value) {
    let params = &config["rope_parameters"][layer_type];
    if params.is_object() {
        let default = if layer_type == FULL { 1e6 } else { 1e4 };
        return (params["rope_theta"].as_f64().unwrap_or(default), params.clone());
    }
    if layer_type == FULL {
        (config["rope_theta"].as_f64().unwrap_or(1e6), config["rope_scaling"].clone())
    } else {
        (config["rope_local_base_freq"].as_f64().unwrap_or(1e4), Value::Null)
    }
}

/// transformers' Gemma3RMSNorm: normalised and scaled by (1 + w) in float32 (the weight's kind), then
/// back to the input's kind. Llama casts back before the weight; Gemma after.
fn gemma_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(w.kind());
    let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, xf.kind());
    (xf * (var + eps).rsqrt() * (w + 1.0)).to_kind(kind)
}

impl Family for Gemma3 {
    fn embed(&self, p: &Params, ids: &Tensor, _start: i64) -> Result<Tensor> {
        let w = p.get(EMBED)?;
        // transformers keeps √d_model as a float32 buffer and casts it to the embedding's dtype.
        let scale = Tensor::from((self.cfg.hidden_size as f64).sqrt() as f32).to_kind(w.kind()).to_device(w.device());
        Ok(Tensor::f_embedding(w, ids, -1, false, false)? * scale)
    }

    fn qkv(&self, p: &Params, layer: usize, prefix: &str, h: &Tensor, start: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let x = self.norm(p, h, &format!("{prefix}input_layernorm.weight"))?;
        let (q, k, v) = project_qkv(p, prefix, &x, [self.heads, self.kv_heads, self.cfg.head_dim as i64])?;
        let q = self.norm(p, &q, &format!("{prefix}self_attn.q_norm.weight"))?;
        let k = self.norm(p, &k, &format!("{prefix}self_attn.k_norm.weight"))?;
        let inv_freq = if self.sliding[layer] { &self.inv_freq_sliding } else { &self.inv_freq_full };
        let (q, k) = rope(inv_freq, &q, &k, start);
        Ok((q, k, v))
    }

    fn scale(&self, _layer: usize) -> f64 {
        1.0 / (self.cfg.query_pre_attn_scalar as f64).sqrt()
    }

    fn window(&self, layer: usize) -> Option<i64> {
        self.sliding.get(layer).copied().unwrap_or(false).then_some(self.cfg.sliding_window).flatten()
    }

    fn finish(&self, p: &Params, prefix: &str, h: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        let w = |name: &str| format!("{prefix}{name}");
        let attn = p.linear(mixed, &w("self_attn.o_proj.weight"), &w("self_attn.o_proj.bias"))?;
        let h = h + self.norm(p, &attn, &w("post_attention_layernorm.weight"))?;
        let x = self.norm(p, &h, &w("pre_feedforward_layernorm.weight"))?;
        let gate = p.linear(&x, &w("mlp.gate_proj.weight"), &w("mlp.gate_proj.bias"))?.gelu(self.gelu);
        let up = p.linear(&x, &w("mlp.up_proj.weight"), &w("mlp.up_proj.bias"))?;
        let down = p.linear(&(gate * up), &w("mlp.down_proj.weight"), &w("mlp.down_proj.bias"))?;
        Ok(&h + self.norm(p, &down, &w("post_feedforward_layernorm.weight"))?)
    }

    fn head(&self, p: &Params, h: &Tensor) -> Result<Tensor> {
        let x = self.norm(p, h, "model.norm.weight")?;
        let head = if p.opt("lm_head.weight").is_some() { "lm_head.weight" } else { EMBED };
        let logits = p.linear(&x, head, "lm_head.bias")?;
        Ok(match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }

    fn init(&self, name: &str) -> Init {
        // transformers' Gemma 3 `_init_weights`: norms zero (they scale by 1 + w), biases zero, the rest normal.
        if name.ends_with("norm.weight") || name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal(self.cfg.initializer_range)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sliding(extra: Value) -> Vec<bool> {
        let mut config = serde_json::json!({ "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 7, "head_dim": 4, "sliding_window": 16 });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        Gemma3::new(&config, Device::Cpu).unwrap().sliding
    }

    /// transformers: `layer_types` when given, else every `sliding_window_pattern`-th block (default 6) is global.
    #[test]
    fn global_blocks_follow_the_pattern_or_the_list() {
        assert_eq!(sliding(serde_json::json!({})), vec![true, true, true, true, true, false, true]);
        assert_eq!(sliding(serde_json::json!({ "sliding_window_pattern": 2 })), vec![true, false, true, false, true, false, true]);
        let types: Vec<&str> = (0..7).map(|i| if i == 3 { FULL } else { SLIDING }).collect();
        assert_eq!(sliding(serde_json::json!({ "layer_types": types, "sliding_window_pattern": 2 })), vec![true, true, true, false, true, true, true]);
    }

    /// Old configs name the bases apart; transformers 5 keys `rope_parameters` by layer type.
    #[test]
    fn each_layer_type_has_its_own_rope_base() {
        let old = serde_json::json!({ "rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": { "rope_type": "linear", "factor": 8.0 } });
        assert_eq!(rope_of(&old, FULL), (1e6, serde_json::json!({ "rope_type": "linear", "factor": 8.0 })));
        assert_eq!(rope_of(&old, SLIDING), (1e4, Value::Null));
        let new = serde_json::json!({ "rope_parameters": { FULL: { "rope_type": "default", "rope_theta": 2e6 }, SLIDING: { "rope_type": "default", "rope_theta": 5e3 } } });
        assert_eq!(rope_of(&new, FULL).0, 2e6);
        assert_eq!(rope_of(&new, SLIDING).0, 5e3);
    }

    #[test]
    fn attention_softcapping_is_refused_by_name() {
        let config = serde_json::json!({ "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 2, "head_dim": 4, "sliding_window": 4, "attn_logit_softcapping": 50.0 });
        let e = Gemma3::new(&config, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("attn_logit_softcapping"), "{e}");
    }
}
