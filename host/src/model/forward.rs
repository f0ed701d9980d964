//! The forward pass in libtorch, block by block, with the attention probabilities exposed.
//!
//! Attention is computed explicitly from QKᵀ (fused kernels do not return the probabilities), so
//! `attention(i, h)` gives exactly what block `i` mixes values with. Semantics follow HF
//! transformers' eager implementations of GPT2LMHeadModel and LlamaForCausalLM (also Mistral, Qwen2).

use super::checkpoint::{Checkpoint, Dims};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

pub struct Transformer {
    pub family: Family,
    pub dims: Dims,
    pub device: Device,
    /// Compute dtype: float32 or float64, whatever the checkpoint stores.
    pub kind: Kind,
    weights: HashMap<String, Tensor>,
    block_prefixes: Vec<String>,
    embedding: String,
    position_embedding: Option<String>,
    final_norm: Vec<String>,
    lm_head: String,
    norm_eps: f64,
    /// GPT-2: divide block i's attention logits by i+1.
    inverse_layer_scale: bool,
    /// Llama: RoPE inverse frequencies, `[head_dim / 2]`.
    inv_freq: Option<Tensor>,
    sliding_window: Option<i64>,
}

impl Transformer {
    /// Loads every weight onto `device` in `kind`.
    pub fn load(ckpt: &Checkpoint, device: Device, kind: Kind) -> Result<Self> {
        let family = match ckpt.arch.family.as_str() {
            "gpt2" => Family::Gpt2,
            "llama" => Family::Llama,
            other => bail!("no forward pass for the `{other}` family"),
        };
        let mut weights = HashMap::new();
        for name in ckpt.names() {
            let t = ckpt.tensor(name)?.f_to_device(device)?.f_to_kind(kind)?;
            weights.insert(name.to_string(), t);
        }
        let c = &ckpt.config;
        let t = &ckpt.arch.tensors;
        let lm_head = if ckpt.tied() { t.embedding.clone() } else { t.lm_head.clone() };
        let (norm_eps, inv_freq, sliding_window) = match family {
            Family::Gpt2 => (c["layer_norm_epsilon"].as_f64().unwrap_or(1e-5), None, None),
            Family::Llama => {
                let eps = c["rms_norm_eps"].as_f64().unwrap_or(1e-6);
                let inv = rope_inv_freq(c, ckpt.dims.head_dim)?.to_device(device);
                let window = match (c["sliding_window"].as_i64(), c["use_sliding_window"].as_bool()) {
                    (Some(w), None | Some(true)) => Some(w),
                    _ => None,
                };
                if c["use_sliding_window"].as_bool() == Some(true) && c["max_window_layers"].as_u64().is_some_and(|m| (m as usize) < ckpt.dims.layers) {
                    bail!("sliding-window attention on only some layers (Qwen2 `max_window_layers`) is not supported");
                }
                (eps, Some(inv), window)
            }
        };
        Ok(Transformer {
            family,
            dims: ckpt.dims.clone(),
            device,
            kind,
            weights,
            block_prefixes: (0..ckpt.dims.layers).map(|i| ckpt.arch.block_prefix(i)).collect(),
            embedding: t.embedding.clone(),
            position_embedding: t.position_embedding.clone(),
            final_norm: t.final_norm.clone(),
            lm_head,
            norm_eps,
            inverse_layer_scale: c["scale_attn_by_inverse_layer_idx"].as_bool().unwrap_or(false),
            inv_freq,
            sliding_window,
        })
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        self.weights.get(name).ok_or_else(|| anyhow!("the checkpoint has no tensor `{name}`"))
    }

    fn bw(&self, i: usize, name: &str) -> Result<&Tensor> {
        self.w(&format!("{}{name}", self.block_prefixes[i]))
    }

    /// An optional per-block tensor (biases exist in some members of a family only).
    fn bw_opt(&self, i: usize, name: &str) -> Option<&Tensor> {
        self.weights.get(&format!("{}{name}", self.block_prefixes[i]))
    }

    /// Hidden states entering block 0: `[batch, T, d_model]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.size()[1];
        if t as usize > self.dims.context {
            bail!("windows of {t} tokens exceed the model's context of {}", self.dims.context);
        }
        let ids = ids.to_device(self.device);
        let mut h = Tensor::f_embedding(self.w(&self.embedding)?, &ids, -1, false, false)?;
        if let Some(pos) = &self.position_embedding {
            h = h + self.w(pos)?.narrow(0, 0, t).unsqueeze(0);
        }
        Ok(h)
    }

    /// Post-softmax attention of block `i` for the hidden states `h` entering it: `[batch, heads, T, T]`.
    pub fn attention(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let (q, k, _) = self.qkv(i, h)?;
        self.probs(i, &q, &k)
    }

    /// Block `i` applied to the hidden states `h` entering it.
    pub fn block(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let (b, t) = (h.size()[0], h.size()[1]);
        let (q, k, v) = self.qkv(i, h)?;
        let mixed = self.probs(i, &q, &k)?.matmul(&v).transpose(1, 2).reshape([b, t, -1]);
        match self.family {
            Family::Gpt2 => {
                let h = h + linear_conv1d(&mixed, self.bw(i, "attn.c_proj.weight")?, self.bw(i, "attn.c_proj.bias")?);
                let x = self.layer_norm(&h, &self.block_prefixes[i], "ln_2")?;
                let up = linear_conv1d(&x, self.bw(i, "mlp.c_fc.weight")?, self.bw(i, "mlp.c_fc.bias")?).gelu("tanh");
                Ok(&h + linear_conv1d(&up, self.bw(i, "mlp.c_proj.weight")?, self.bw(i, "mlp.c_proj.bias")?))
            }
            Family::Llama => {
                let o = mixed.linear(self.bw(i, "self_attn.o_proj.weight")?, self.bw_opt(i, "self_attn.o_proj.bias"));
                let h = h + o;
                let x = rms_norm(&h, self.bw(i, "post_attention_layernorm.weight")?, self.norm_eps);
                // Biases exist where config.json says `mlp_bias`.
                let gate = x.linear(self.bw(i, "mlp.gate_proj.weight")?, self.bw_opt(i, "mlp.gate_proj.bias")).silu();
                let up = x.linear(self.bw(i, "mlp.up_proj.weight")?, self.bw_opt(i, "mlp.up_proj.bias"));
                Ok(&h + (gate * up).linear(self.bw(i, "mlp.down_proj.weight")?, self.bw_opt(i, "mlp.down_proj.bias")))
            }
        }
    }

    /// Logits from the output of the last block: final norm, then the output head.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let x = match self.family {
            Family::Gpt2 => {
                let (w, b) = (self.w(&self.final_norm[0])?, self.w(&self.final_norm[1])?);
                h.layer_norm([self.dims.d_model as i64], Some(w), Some(b), self.norm_eps, false)
            }
            Family::Llama => rms_norm(h, self.w(&self.final_norm[0])?, self.norm_eps),
        };
        Ok(x.linear::<&Tensor>(self.w(&self.lm_head)?, None))
    }

    /// Logits for a batch of token windows `[batch, T]`.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let mut h = self.embed(ids)?;
        for i in 0..self.dims.layers {
            h = self.block(i, &h)?;
        }
        self.head(&h)
    }

    /// q `[b, heads, T, hd]`, and k, v already repeated to `heads` (grouped-query attention).
    fn qkv(&self, i: usize, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (h.size()[0], h.size()[1]);
        let (nh, nkv, hd) = (self.dims.heads as i64, self.dims.kv_heads as i64, self.dims.head_dim as i64);
        let split = |x: Tensor, n: i64| x.reshape([b, t, n, hd]).transpose(1, 2);
        match self.family {
            Family::Gpt2 => {
                let x = self.layer_norm(h, &self.block_prefixes[i], "ln_1")?;
                let qkv = linear_conv1d(&x, self.bw(i, "attn.c_attn.weight")?, self.bw(i, "attn.c_attn.bias")?);
                let parts = qkv.split(self.dims.d_model as i64, -1);
                let [q, k, v] = <[Tensor; 3]>::try_from(parts).map_err(|_| anyhow!("c_attn of block {i} does not split in three"))?;
                Ok((split(q, nh), split(k, nh), split(v, nh)))
            }
            Family::Llama => {
                let x = rms_norm(h, self.bw(i, "input_layernorm.weight")?, self.norm_eps);
                let proj = |name: &str| -> Result<Tensor> {
                    Ok(x.linear(self.bw(i, &format!("self_attn.{name}.weight"))?, self.bw_opt(i, &format!("self_attn.{name}.bias"))))
                };
                let (q, k, v) = (split(proj("q_proj")?, nh), split(proj("k_proj")?, nkv), split(proj("v_proj")?, nkv));
                let (cos, sin) = self.rope_tables(t);
                let (q, k) = (rotate(&q, &cos, &sin), rotate(&k, &cos, &sin));
                let rep = nh / nkv;
                Ok((q, k.repeat_interleave_self_int(rep, 1, None), v.repeat_interleave_self_int(rep, 1, None)))
            }
        }
    }

    fn probs(&self, i: usize, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let t = q.size()[2];
        let mut scale = (self.dims.head_dim as f64).sqrt();
        if self.inverse_layer_scale {
            scale *= (i + 1) as f64;
        }
        let scores = q.matmul(&k.transpose(-2, -1)) / scale;
        let row = Tensor::arange(t, (Kind::Int64, self.device)).unsqueeze(1);
        let col = Tensor::arange(t, (Kind::Int64, self.device)).unsqueeze(0);
        let mut hidden = col.gt_tensor(&row);
        if let Some(w) = self.sliding_window {
            hidden = hidden.logical_or(&col.le_tensor(&(&row - w)));
        }
        Ok(scores.masked_fill(&hidden, f64::NEG_INFINITY).softmax(-1, self.kind))
    }

    fn layer_norm(&self, h: &Tensor, prefix: &str, name: &str) -> Result<Tensor> {
        let w = self.w(&format!("{prefix}{name}.weight"))?;
        let b = self.w(&format!("{prefix}{name}.bias"))?;
        Ok(h.layer_norm([self.dims.d_model as i64], Some(w), Some(b), self.norm_eps, false))
    }

    /// cos and sin, `[T, head_dim]`, in HF's rotate-half layout.
    fn rope_tables(&self, t: i64) -> (Tensor, Tensor) {
        let inv = self.inv_freq.as_ref().expect("llama has RoPE");
        let pos = Tensor::arange(t, (Kind::Float, self.device));
        let freqs = pos.outer(inv);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(self.kind), emb.sin().to_kind(self.kind))
    }
}

/// GPT-2's Conv1D: weights stored `[in, out]`.
fn linear_conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    x.matmul(w) + b
}

fn rms_norm(h: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = h.pow_tensor_scalar(2).mean_dim(-1, true, h.kind());
    h * (var + eps).rsqrt() * w
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    x * cos + rotated * sin
}

/// RoPE inverse frequencies from config.json, in either transformers 4 (`rope_theta`, `rope_scaling`)
/// or transformers 5 (`rope_parameters`) form. Computed in float32, as transformers does.
fn rope_inv_freq(config: &Value, head_dim: usize) -> Result<Tensor> {
    let params = &config["rope_parameters"];
    let theta = config["rope_theta"].as_f64().or(params["rope_theta"].as_f64()).unwrap_or(10000.0);
    let scaling = if config["rope_scaling"].is_object() { &config["rope_scaling"] } else { params };
    let rope_type = scaling["rope_type"].as_str().or(scaling["type"].as_str()).unwrap_or("default");
    let exps = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Float, Device::Cpu)) / head_dim as f64;
    let inv = Tensor::from(theta as f32).pow(&exps).reciprocal();
    let factor = || scaling["factor"].as_f64().context("rope scaling has no `factor`");
    Ok(match rope_type {
        "default" => inv,
        "linear" => inv / factor()?,
        "llama3" => {
            let factor = factor()?;
            let low = scaling["low_freq_factor"].as_f64().context("llama3 rope scaling needs low_freq_factor")?;
            let high = scaling["high_freq_factor"].as_f64().context("llama3 rope scaling needs high_freq_factor")?;
            let old = scaling["original_max_position_embeddings"].as_f64().context("llama3 rope scaling needs original_max_position_embeddings")?;
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / factor));
            let smooth = (old / &wavelen - low) / (high - low);
            let smoothed: Tensor = (1.0 - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
        other => bail!("RoPE scaling `{other}` is not supported (supported: default, linear, llama3)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    pub fn data(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    /// Every intermediate the golden file holds, against transformers' eager forward pass.
    fn matches_transformers(name: &str) {
        let ckpt = Checkpoint::open(&data(name)).unwrap();
        let golden = Tensor::read_safetensors(data(name).join("golden.safetensors")).unwrap();
        let golden: HashMap<String, Tensor> = golden.into_iter().collect();
        let net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
        let _guard = tch::no_grad_guard();
        let mut h = net.embed(&golden["input_ids"]).unwrap();
        assert!(max_diff(&h, &golden["hidden.0"]) < 1e-6, "{name}: embeddings");
        for i in 0..ckpt.dims.layers {
            let attn = net.attention(i, &h).unwrap();
            let d = max_diff(&attn, &golden[&format!("attn.{i}")]);
            assert!(d < 1e-5, "{name}: attention of block {i} differs by {d}");
            h = net.block(i, &h).unwrap();
            let d = max_diff(&h, &golden[&format!("hidden.{}", i + 1)]);
            assert!(d < 1e-4, "{name}: output of block {i} differs by {d}");
        }
        let d = max_diff(&net.logits(&golden["input_ids"]).unwrap(), &golden["logits"]);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }

    #[test]
    fn gpt2_with_inverse_layer_scaling_matches_transformers() {
        matches_transformers("tiny-gpt2");
    }

    #[test]
    fn llama_with_grouped_query_attention_matches_transformers() {
        matches_transformers("tiny-llama");
    }

    #[test]
    fn llama_with_llama3_rope_scaling_biases_and_tied_head_matches_transformers() {
        matches_transformers("tiny-llama-tied");
    }

    #[test]
    fn qwen2_matches_transformers() {
        matches_transformers("tiny-qwen2");
    }
}
