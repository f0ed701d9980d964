//! The GPT-2 family (GPT2LMHeadModel): learned positions, LayerNorm, fused `c_attn`, Conv1D weights
//! stored `[in, out]`, GELU (tanh). Semantics follow transformers' `modeling_gpt2.py`, including
//! `scale_attn_by_inverse_layer_idx` (block i divides its attention logits by i + 1).

use super::params::Params;
use super::transformer::{Family, Init};
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::Tensor;

/// The config.json fields the forward pass reads. Fields scalpel does not implement are refused by `new`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub n_embd: usize,
    pub n_head: usize,
    pub n_layer: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: Option<f64>,
    #[serde(default = "gelu_new")]
    pub activation_function: String,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_eps() -> Option<f64> {
    Some(1e-5)
}
fn gelu_new() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}
fn default_init_range() -> f64 {
    0.02
}

pub struct Gpt2 {
    cfg: Gpt2Config,
    eps: f64,
    /// `tanh` (GPT-2's gelu_new) or `none` (exact GELU).
    gelu: &'static str,
    head_dim: i64,
}

impl Gpt2 {
    pub fn new(config: &Value) -> Result<Self> {
        let cfg: Gpt2Config = serde_json::from_value(config.clone()).context("config.json does not describe a GPT-2 model")?;
        let gelu = match cfg.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => "tanh",
            "gelu" => "none",
            other => bail!("config.json `activation_function` = \"{other}\" is not implemented for GPT-2 (gelu_new, gelu_pytorch_tanh, gelu)"),
        };
        let eps = match cfg.layer_norm_epsilon {
            Some(e) if e.is_finite() && e > 0.0 => e,
            other => bail!("config.json `layer_norm_epsilon` must be a positive number, found {other:?}"),
        };
        let head_dim = (cfg.n_embd / cfg.n_head.max(1)) as i64;
        Ok(Gpt2 { eps, gelu, head_dim, cfg })
    }

    fn layer_norm(&self, p: &Params, h: &Tensor, name: &str) -> Result<Tensor> {
        let (w, b) = (p.get(&format!("{name}.weight"))?, p.get(&format!("{name}.bias"))?);
        Ok(h.to_kind(w.kind()).f_layer_norm([self.cfg.n_embd as i64], Some(w), Some(b), self.eps, false)?)
    }
}

impl Family for Gpt2 {
    fn embed(&self, p: &Params, ids: &Tensor, start: i64) -> Result<Tensor> {
        let t = ids.size()[1];
        let h = Tensor::f_embedding(p.get("transformer.wte.weight")?, ids, -1, false, false)?;
        Ok(h + p.get("transformer.wpe.weight")?.narrow(0, start, t).unsqueeze(0))
    }

    fn qkv(&self, p: &Params, _layer: usize, prefix: &str, h: &Tensor, _start: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (h.size()[0], h.size()[1]);
        let x = self.layer_norm(p, h, &format!("{prefix}ln_1"))?;
        let qkv = p.conv1d(&x, &format!("{prefix}attn.c_attn.weight"), &format!("{prefix}attn.c_attn.bias"))?;
        let parts = qkv.split(self.cfg.n_embd as i64, -1);
        let [q, k, v] = <[Tensor; 3]>::try_from(parts).map_err(|_| anyhow!("{prefix}attn.c_attn does not split in three"))?;
        let heads = |x: Tensor| x.reshape([b, t, self.cfg.n_head as i64, self.head_dim]).transpose(1, 2);
        Ok((heads(q), heads(k), heads(v)))
    }

    fn scale(&self, layer: usize) -> f64 {
        let mut scale = if self.cfg.scale_attn_weights { 1.0 / (self.head_dim as f64).sqrt() } else { 1.0 };
        if self.cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        scale
    }

    fn window(&self, _layer: usize) -> Option<i64> {
        None
    }

    fn finish(&self, p: &Params, prefix: &str, h: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        let w = |name: &str| format!("{prefix}{name}");
        let h = h + p.conv1d(mixed, &w("attn.c_proj.weight"), &w("attn.c_proj.bias"))?;
        let x = self.layer_norm(p, &h, &w("ln_2"))?;
        let up = p.conv1d(&x, &w("mlp.c_fc.weight"), &w("mlp.c_fc.bias"))?.gelu(self.gelu);
        Ok(&h + p.conv1d(&up, &w("mlp.c_proj.weight"), &w("mlp.c_proj.bias"))?)
    }

    fn head(&self, p: &Params, h: &Tensor) -> Result<Tensor> {
        let x = self.layer_norm(p, h, "transformer.ln_f")?;
        let head = if p.opt("lm_head.weight").is_some() { "lm_head.weight" } else { "transformer.wte.weight" };
        p.linear(&x, head, "lm_head.bias")
    }

    fn init(&self, name: &str) -> Init {
        // transformers' GPT-2 `_init_weights`: LayerNorms ones/zeros, biases zeros, matrices and
        // embeddings normal(0, initializer_range), residual projections scaled by 1/√(2·n_layer).
        let std = self.cfg.initializer_range;
        if name.ends_with(".bias") {
            Init::Zeros
        } else if name.contains(".ln_") {
            Init::Ones
        } else if name.ends_with("c_proj.weight") {
            Init::Normal(std / (2.0 * self.cfg.n_layer as f64).sqrt())
        } else {
            Init::Normal(std)
        }
    }
}
