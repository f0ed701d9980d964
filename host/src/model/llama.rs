//! The Llama family (LlamaForCausalLM, and Mistral, Qwen2 and SmolLM2, which differ from it only in
//! config values): RMSNorm, rotary positions, grouped-query attention, SwiGLU. Semantics follow
//! transformers' `modeling_llama.py`.

use super::params::Params;
use super::transformer::{Family, Init};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The config.json fields the forward pass reads. Fields scalpel does not implement are refused by `check`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: Option<f64>,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    pub sliding_window: Option<i64>,
    pub use_sliding_window: Option<bool>,
    pub max_window_layers: Option<usize>,
    /// transformers 5: `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    pub num_hidden_layers: usize,
}

fn silu() -> String {
    "silu".into()
}
fn default_eps() -> Option<f64> {
    Some(1e-6)
}
fn default_init_range() -> f64 {
    0.02
}

pub struct Llama {
    cfg: LlamaConfig,
    eps: f64,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    /// The sliding window of each layer, where it has one.
    windows: Vec<Option<i64>>,
    /// RoPE inverse frequencies, `[head_dim / 2]`, float32 as transformers computes them.
    inv_freq: Tensor,
}

impl Llama {
    pub fn new(config: &Value, device: Device) -> Result<Self> {
        let cfg: LlamaConfig = serde_json::from_value(config.clone()).context("config.json does not describe a Llama-family model")?;
        if cfg.hidden_act != "silu" {
            bail!("config.json `hidden_act` = \"{}\" is not implemented for Llama-family models (only \"silu\")", cfg.hidden_act);
        }
        let eps = positive_eps(cfg.rms_norm_eps)?;
        let heads = cfg.num_attention_heads;
        let head_dim = cfg.head_dim.unwrap_or(cfg.hidden_size / heads.max(1));
        let windows = sliding_windows(&cfg)?;
        let scaling = if config["rope_scaling"].is_object() { &config["rope_scaling"] } else { &config["rope_parameters"] };
        let theta = config["rope_theta"].as_f64().or(config["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10000.0);
        let inv_freq = rope_inv_freq(theta, scaling, head_dim)?.to_device(device);
        Ok(Llama {
            eps,
            heads: heads as i64,
            kv_heads: cfg.num_key_value_heads.unwrap_or(heads) as i64,
            head_dim: head_dim as i64,
            windows,
            inv_freq,
            cfg,
        })
    }

    /// The input norm and the q/k/v projections of a block, before positions: q `[b, heads, t, hd]`,
    /// k and v `[b, kv_heads, t, hd]`. Families built on Llama's attention (Qwen3) add to this.
    pub fn project(&self, p: &Params, prefix: &str, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let x = rms_norm(h, p.get(&format!("{prefix}input_layernorm.weight"))?, self.eps);
        project_qkv(p, prefix, &x, [self.heads, self.kv_heads, self.head_dim])
    }

    /// q and k rotated to positions `start..`.
    pub fn rotate(&self, q: &Tensor, k: &Tensor, start: i64) -> (Tensor, Tensor) {
        rope(&self.inv_freq, q, k, start)
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

/// A config's norm epsilon, refused unless positive.
pub fn positive_eps(eps: Option<f64>) -> Result<f64> {
    match eps {
        Some(e) if e.is_finite() && e > 0.0 => Ok(e),
        other => bail!("config.json `rms_norm_eps` must be a positive number, found {other:?}"),
    }
}

/// The q/k/v projections (`self_attn.{q,k,v}_proj`, biases where present) of the normed input `x`,
/// split into heads: `[heads, kv_heads, head_dim]` give q `[b, heads, t, hd]`, k and v `[b, kv_heads, t, hd]`.
pub fn project_qkv(p: &Params, prefix: &str, x: &Tensor, [heads, kv_heads, head_dim]: [i64; 3]) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t) = (x.size()[0], x.size()[1]);
    let proj = |name: &str, n: i64| -> Result<Tensor> {
        let y = p.linear(x, &format!("{prefix}self_attn.{name}.weight"), &format!("{prefix}self_attn.{name}.bias"))?;
        Ok(y.reshape([b, t, n, head_dim]).transpose(1, 2))
    };
    Ok((proj("q_proj", heads)?, proj("k_proj", kv_heads)?, proj("v_proj", kv_heads)?))
}

/// q and k `[b, n, t, hd]` rotated to positions `start..` with the inverse frequencies `inv_freq`, in
/// HF's rotate-half layout. As transformers under autocast: positions rotate in float32 even when the
/// projections ran in bf16.
pub fn rope(inv_freq: &Tensor, q: &Tensor, k: &Tensor, start: i64) -> (Tensor, Tensor) {
    let t = q.size()[2];
    let kind = if matches!(q.kind(), Kind::BFloat16 | Kind::Half) { Kind::Float } else { q.kind() };
    let pos = Tensor::arange_start(start, start + t, (Kind::Float, inv_freq.device()));
    let freqs = pos.outer(inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
    (rotate(q, &cos, &sin), rotate(k, &cos, &sin))
}

const EMBED: &str = "model.embed_tokens.weight";

/// Which layers attend through a sliding window, as transformers decides it: `layer_types` when the config
/// lists them (transformers 5); Qwen2's `use_sliding_window` with layers from `max_window_layers` on; else
/// (Mistral) every layer when `sliding_window` is set.
fn sliding_windows(cfg: &LlamaConfig) -> Result<Vec<Option<i64>>> {
    let n = cfg.num_hidden_layers;
    let Some(w) = cfg.sliding_window.filter(|&w| w > 0) else { return Ok(vec![None; n]) };
    if let Some(types) = &cfg.layer_types {
        if types.len() != n {
            bail!("config.json `layer_types` has {} entries for {n} layers", types.len());
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(Some(w)),
                "full_attention" => Ok(None),
                other => bail!("config.json `layer_types` entry \"{other}\" is not implemented (sliding_attention, full_attention)"),
            })
            .collect();
    }
    Ok(match cfg.use_sliding_window {
        Some(false) => vec![None; n],
        Some(true) => {
            let from = cfg.max_window_layers.unwrap_or(0);
            (0..n).map(|i| (i >= from).then_some(w)).collect()
        }
        None => vec![Some(w); n],
    })
}

impl Family for Llama {
    fn embed(&self, p: &Params, ids: &Tensor, _start: i64) -> Result<Tensor> {
        Ok(Tensor::f_embedding(p.get(EMBED)?, ids, -1, false, false)?)
    }

    fn qkv(&self, p: &Params, _layer: usize, prefix: &str, h: &Tensor, start: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.project(p, prefix, h)?;
        let (q, k) = self.rotate(&q, &k, start);
        Ok((q, k, v))
    }

    fn scale(&self, _layer: usize) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    fn window(&self, layer: usize) -> Option<i64> {
        self.windows.get(layer).copied().flatten()
    }

    fn finish(&self, p: &Params, prefix: &str, h: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        let w = |name: &str| format!("{prefix}{name}");
        let h = h + p.linear(mixed, &w("self_attn.o_proj.weight"), &w("self_attn.o_proj.bias"))?;
        let x = rms_norm(&h, p.get(&w("post_attention_layernorm.weight"))?, self.eps);
        // Biases exist where config.json says `mlp_bias`.
        let gate = p.linear(&x, &w("mlp.gate_proj.weight"), &w("mlp.gate_proj.bias"))?.silu();
        let up = p.linear(&x, &w("mlp.up_proj.weight"), &w("mlp.up_proj.bias"))?;
        Ok(&h + p.linear(&(gate * up), &w("mlp.down_proj.weight"), &w("mlp.down_proj.bias"))?)
    }

    fn head(&self, p: &Params, h: &Tensor) -> Result<Tensor> {
        let x = rms_norm(h, p.get("model.norm.weight")?, self.eps);
        let head = if p.opt("lm_head.weight").is_some() { "lm_head.weight" } else { EMBED };
        p.linear(&x, head, "lm_head.bias")
    }

    fn init(&self, name: &str) -> Init {
        // transformers' `_init_weights`: normal(0, initializer_range) matrices, ones for norms, zeros for biases.
        if name.ends_with("norm.weight") {
            Init::Ones
        } else if name.ends_with(".bias") {
            Init::Zeros
        } else {
            Init::Normal(self.cfg.initializer_range)
        }
    }
}

/// transformers' LlamaRMSNorm: in float32, then back to the input's kind, times the weight.
pub fn rms_norm(h: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = h.kind();
    let x = h.to_kind(w.kind());
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, x.kind());
    (x * (var + eps).rsqrt()).to_kind(kind) * w
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(-1, 0, half), x.narrow(-1, half, half));
    let rotated = Tensor::cat(&[&(-x2), &x1], -1);
    x * cos + rotated * sin
}

/// RoPE inverse frequencies for base `theta`, scaled as `scaling` says (transformers 4's `rope_scaling`,
/// or transformers 5's `rope_parameters`; `rope_type` absent or `default`: unscaled). Computed in
/// float32, as transformers does.
pub fn rope_inv_freq(theta: f64, scaling: &Value, head_dim: usize) -> Result<Tensor> {
    if !(theta.is_finite() && theta > 0.0) {
        bail!("config.json `rope_theta` must be a positive number, found {theta}");
    }
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

    fn windows(extra: serde_json::Value) -> Vec<Option<i64>> {
        let mut config = serde_json::json!({ "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 4, "sliding_window": 16 });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        sliding_windows(&serde_json::from_value(config).unwrap()).unwrap()
    }

    /// transformers: Qwen2 slides from `max_window_layers` on; Mistral slides everywhere; `layer_types` says per layer.
    #[test]
    fn sliding_windows_follow_transformers() {
        assert_eq!(windows(serde_json::json!({})), vec![Some(16); 4]);
        assert_eq!(windows(serde_json::json!({ "use_sliding_window": false })), vec![None; 4]);
        assert_eq!(windows(serde_json::json!({ "use_sliding_window": true, "max_window_layers": 28 })), vec![None; 4]);
        assert_eq!(windows(serde_json::json!({ "use_sliding_window": true, "max_window_layers": 2 })), vec![None, None, Some(16), Some(16)]);
        let types = serde_json::json!({ "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"] });
        assert_eq!(windows(types), vec![None, Some(16), None, Some(16)]);
    }
}
