//! The Qwen3 family (Qwen3ForCausalLM): Llama's block with an RMSNorm on every query and key head
//! (`self_attn.q_norm`, `self_attn.k_norm`, over head_dim, before the rotary positions) and a
//! `head_dim` of its own, not d_model / heads. Semantics follow transformers' `modeling_qwen3.py`.

use super::llama::{rms_norm, Llama};
use super::params::Params;
use super::transformer::{Family, Init};
use anyhow::Result;
use serde_json::Value;
use tch::{Device, Tensor};

pub struct Qwen3 {
    /// Everything but the q/k norms is Llama's: config checks, sliding windows, RoPE, the MLP, the head.
    llama: Llama,
}

impl Qwen3 {
    pub fn new(config: &Value, device: Device) -> Result<Self> {
        Ok(Qwen3 { llama: Llama::new(config, device)? })
    }
}

impl Family for Qwen3 {
    fn embed(&self, p: &Params, ids: &Tensor, start: i64) -> Result<Tensor> {
        self.llama.embed(p, ids, start)
    }

    fn qkv(&self, p: &Params, _layer: usize, prefix: &str, h: &Tensor, start: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.llama.project(p, prefix, h)?;
        let eps = self.llama.eps();
        let q = rms_norm(&q, p.get(&format!("{prefix}self_attn.q_norm.weight"))?, eps);
        let k = rms_norm(&k, p.get(&format!("{prefix}self_attn.k_norm.weight"))?, eps);
        let (q, k) = self.llama.rotate(&q, &k, start);
        Ok((q, k, v))
    }

    fn scale(&self, layer: usize) -> f64 {
        self.llama.scale(layer)
    }

    fn window(&self, layer: usize) -> Option<i64> {
        self.llama.window(layer)
    }

    fn finish(&self, p: &Params, prefix: &str, h: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        self.llama.finish(p, prefix, h, mixed)
    }

    fn head(&self, p: &Params, h: &Tensor) -> Result<Tensor> {
        self.llama.head(p, h)
    }

    fn init(&self, name: &str) -> Init {
        // q_norm and k_norm end in `norm.weight`: ones, as transformers initialises them.
        self.llama.init(name)
    }
}
