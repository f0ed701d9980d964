//! One forward pass for every family, used by analysis, eval, generate and training alike.
//!
//! A family (`gpt2.rs`, `llama.rs`, `qwen3.rs`, `gemma3.rs`) supplies what differs: embeddings, the q/k/v projections with
//! their positions, the attention scale, the rest of the block, the head and its initialisation.
//! This file holds what is shared: the block loop, attention (explicit softmax when someone asks for
//! the probabilities, libtorch's fused `scaled_dot_product_attention` otherwise), the key/value cache
//! and the loss.

use super::checkpoint::{Checkpoint, Dims};
use super::gemma3::Gemma3;
use super::gpt2::Gpt2;
use super::llama::Llama;
use super::params::Params;
use super::qwen3::Qwen3;
use anyhow::{bail, Result};
use tch::{Device, Kind, Reduction, Tensor};

/// How a fresh (`--init random`) tensor is filled.
pub enum Init {
    Ones,
    Zeros,
    Normal(f64),
}

impl Init {
    /// A tensor shaped like `t`, filled this way (from libtorch's global generator, seeded by the caller).
    pub fn fill(&self, t: &Tensor) -> Tensor {
        match *self {
            Init::Ones => t.ones_like(),
            Init::Zeros => t.zeros_like(),
            Init::Normal(std) => t.randn_like() * std,
        }
    }
}

/// How transformers initialises the tensor `name` in a fresh model of the checkpoint's family.
pub fn fresh_init(ckpt: &Checkpoint, name: &str) -> Result<Init> {
    Ok(family(ckpt, Device::Cpu)?.init(name))
}

/// What a model family computes differently. `prefix` is the block's tensor-name prefix.
pub trait Family {
    /// Hidden states entering block 0 for tokens at positions `start..`: `[b, t, d_model]`.
    fn embed(&self, p: &Params, ids: &Tensor, start: i64) -> Result<Tensor>;
    /// q `[b, heads, t, hd]`, k and v `[b, kv_heads, t, hd]` of block `layer`, positions applied.
    fn qkv(&self, p: &Params, layer: usize, prefix: &str, h: &Tensor, start: i64) -> Result<(Tensor, Tensor, Tensor)>;
    /// The factor applied to attention logits in block `layer`.
    fn scale(&self, layer: usize) -> f64;
    /// Keys this many positions back or further are not attended to in block `layer`.
    fn window(&self, layer: usize) -> Option<i64>;
    /// The rest of the block, from the attention-mixed values `[b, t, heads * hd]`.
    fn finish(&self, p: &Params, prefix: &str, h: &Tensor, mixed: &Tensor) -> Result<Tensor>;
    /// Final norm and output head: logits.
    fn head(&self, p: &Params, h: &Tensor) -> Result<Tensor>;
    /// How transformers initialises the tensor `name` in a fresh model.
    fn init(&self, name: &str) -> Init;
}

/// What a streaming forward pass needs resident for its next step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Part {
    /// Token (and position) embeddings, to start the pass.
    Embedding,
    /// The weights of block `i`.
    Block(usize),
    /// The final norm and the output head (the embedding, when tied): to end the pass in logits.
    Head,
}

/// Keys and values of the positions seen so far, per block: `generate` feeds one token at a time.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.len
    }
}

pub struct Transformer {
    pub dims: Dims,
    pub device: Device,
    /// Master dtype of weights and of everything but matrix products (float32, or float64).
    pub kind: Kind,
    pub params: Params,
    family: Box<dyn Family>,
    prefixes: Vec<String>,
}

impl Transformer {
    /// The checkpoint's weights on `device`, floating point in `kind`.
    pub fn load(ckpt: &Checkpoint, device: Device, kind: Kind) -> Result<Self> {
        let family = family(ckpt, device)?;
        Ok(Self::assemble(ckpt, device, kind, Params::load(ckpt, device, kind)?, family))
    }

    /// The forward pass with no weights yet: `hold` brings in the part a step needs, so analysis streams a
    /// checkpoint bigger than memory through the same code, one block in float32 at a time.
    pub fn streaming(ckpt: &Checkpoint, device: Device, kind: Kind) -> Result<Self> {
        let family = family(ckpt, device)?;
        Ok(Self::assemble(ckpt, device, kind, Params::empty(), family))
    }

    /// Streaming: only the weights `part` needs stay on the device (read from `ckpt` if not held yet).
    pub fn hold(&mut self, ckpt: &Checkpoint, part: Part) -> Result<()> {
        let (t, prefixes) = (&ckpt.arch.tensors, &self.prefixes);
        let keep = |name: &str| match part {
            Part::Embedding => name == t.embedding || t.position_embedding.as_deref() == Some(name),
            Part::Block(i) => name.starts_with(&prefixes[i]),
            Part::Head => t.final_norm.iter().any(|f| f == name) || name == t.lm_head || (ckpt.tied() && name == t.embedding),
        };
        self.params.hold(ckpt, self.device, self.kind, keep)
    }

    /// The same architecture freshly initialised as transformers would (seeded): the "from scratch" model.
    pub fn random(ckpt: &Checkpoint, device: Device, kind: Kind, seed: u64) -> Result<Self> {
        let family = family(ckpt, device)?;
        let mut shapes = Vec::new();
        for name in ckpt.names() {
            let e = ckpt.entry(name)?;
            if !matches!(e.dtype, safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 | safetensors::Dtype::F64) {
                bail!("`{name}` is not a floating-point tensor: cannot initialise it");
            }
            shapes.push((name.to_string(), e.shape.iter().map(|&d| d as i64).collect::<Vec<i64>>()));
        }
        tch::manual_seed(seed as i64);
        let params = Params::fresh(&shapes, device, kind, |name, t| family.init(name).fill(t));
        Ok(Self::assemble(ckpt, device, kind, params, family))
    }

    fn assemble(ckpt: &Checkpoint, device: Device, kind: Kind, params: Params, family: Box<dyn Family>) -> Self {
        let prefixes = (0..ckpt.dims.layers).map(|i| ckpt.arch.block_prefix(i)).collect();
        Transformer { dims: ckpt.dims.clone(), device, kind, params, family, prefixes }
    }

    /// Hidden states entering block 0: `[batch, T, d_model]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_at(ids, 0)
    }

    fn embed_at(&self, ids: &Tensor, start: i64) -> Result<Tensor> {
        let end = start + ids.size()[1];
        if end as usize > self.dims.context {
            bail!("{end} positions exceed the model's context of {} tokens", self.dims.context);
        }
        self.family.embed(&self.params, &ids.to_device(self.device), start)
    }

    /// Post-softmax attention of block `i` for the hidden states `h` entering it: `[batch, heads, T, T]`.
    pub fn attention(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        let (q, k, _) = self.qkv(i, h, 0)?;
        self.probs(i, &q, &self.repeat_kv(&k))
    }

    /// Block `i` with explicit attention probabilities (transformers' eager path): what analyzers see.
    pub fn block(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        Ok(self.block_attention(i, h)?.0)
    }

    /// `block`, and the attention it computed on the way (`attention`'s result, without a second pass).
    pub fn block_attention(&self, i: usize, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let (q, k, v) = self.qkv(i, h, 0)?;
        let v = self.repeat_kv(&v);
        let probs = self.probs(i, &q, &self.repeat_kv(&k))?;
        let mixed = probs.to_kind(v.kind()).matmul(&v);
        Ok((self.finish(i, h, &mixed)?, probs))
    }

    /// Block `i` with libtorch's fused attention, continuing `cache` when one is given.
    pub fn block_fused(&self, i: usize, h: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let start = cache.as_ref().map_or(0, |c| c.len);
        let (q, mut k, mut v) = self.qkv(i, h, start)?;
        if let Some(c) = cache {
            // Cached as the model makes them, kv_heads wide; repeated for the query heads only below.
            if let Some((k0, v0)) = &c.layers[i] {
                k = Tensor::cat(&[k0, &k], 2);
                v = Tensor::cat(&[v0, &v], 2);
            }
            c.layers[i] = Some((k.shallow_clone(), v.shallow_clone()));
        }
        // Under mixed precision the fused kernel runs in bf16, as torch.autocast runs it.
        let p = &self.params;
        let (q, k, v) = (p.mm_input(&q), p.mm_input(&self.repeat_kv(&k)), p.mm_input(&self.repeat_kv(&v)));
        let (tq, tk) = (q.size()[2], k.size()[2]);
        let mask = self.mask(i, tq, tk);
        // Without a mask the query block is the whole sequence: plain causal attention.
        let causal = mask.is_none() && tq > 1;
        let mixed = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, self.family.scale(i), false)?;
        self.finish(i, h, &mixed)
    }

    /// Logits from the output of the last block: final norm, then the output head.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.family.head(&self.params, h)
    }

    /// Logits `[batch, T, vocab]` of token windows `[batch, T]` (fused attention; gradients if enabled).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut h = self.embed(ids)?;
        for i in 0..self.dims.layers {
            h = self.block_fused(i, &h, None)?;
        }
        self.head(&h)
    }

    /// Logits without gradients.
    #[cfg(test)]
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.forward(ids)
    }

    /// Mean cross-entropy of predicting token t+1 from tokens ≤ t over windows `[batch, T]`: what
    /// transformers returns with `labels = input_ids`. A scalar (float32), differentiable.
    pub fn loss(&self, ids: &Tensor) -> Result<Tensor> {
        self.next_token_loss(ids, 0, Reduction::Mean)
    }

    /// Cross-entropy (float32) of every token after position `first`, predicted from the tokens before it:
    /// per token (`Reduction::None`) or their mean. `first` = 1 leaves a leading BOS as context only.
    pub fn next_token_loss(&self, ids: &Tensor, first: i64, reduction: Reduction) -> Result<Tensor> {
        let ids = ids.to_device(self.device);
        let t = ids.size()[1];
        if t < first + 2 {
            bail!("a window needs at least {} tokens to predict one", first + 2);
        }
        self.loss_of_logits(&self.forward(&ids)?, &ids, first, reduction)
    }

    /// Next-token cross-entropy of `logits` `[batch, T, vocab]` computed for the windows `ids` (see
    /// [`Self::next_token_loss`]): for a forward pass run some other way, e.g. with blocks skipped.
    pub fn loss_of_logits(&self, logits: &Tensor, ids: &Tensor, first: i64, reduction: Reduction) -> Result<Tensor> {
        let ids = ids.to_device(self.device);
        let t = ids.size()[1];
        let logits = logits.narrow(1, first, t - 1 - first).to_kind(Kind::Float);
        let targets = ids.narrow(1, first + 1, t - 1 - first).reshape([-1]);
        Ok(logits.reshape([-1, self.dims.vocab as i64]).f_cross_entropy_loss::<Tensor>(&targets, None, reduction, -100, 0.0)?)
    }

    /// A cache for `generate`.
    pub fn cache(&self) -> KvCache {
        KvCache { layers: (0..self.dims.layers).map(|_| None).collect(), len: 0 }
    }

    /// Logits of `ids` `[batch, t]` following the positions already in `cache`, which grows by t.
    pub fn step(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let mut h = self.embed_at(ids, cache.len)?;
        for i in 0..self.dims.layers {
            h = self.block_fused(i, &h, Some(cache))?;
        }
        cache.len += ids.size()[1];
        self.head(&h)
    }

    /// q `[b, heads, t, hd]`, k and v `[b, kv_heads, t, hd]`.
    fn qkv(&self, i: usize, h: &Tensor, start: i64) -> Result<(Tensor, Tensor, Tensor)> {
        self.family.qkv(&self.params, i, &self.prefixes[i], h, start)
    }

    /// Grouped-query attention: each key/value head serves heads / kv_heads query heads.
    fn repeat_kv(&self, x: &Tensor) -> Tensor {
        repeat_kv(x, (self.dims.heads / self.dims.kv_heads) as i64)
    }

    fn finish(&self, i: usize, h: &Tensor, mixed: &Tensor) -> Result<Tensor> {
        let (b, t) = (h.size()[0], h.size()[1]);
        let mixed = mixed.transpose(1, 2).reshape([b, t, -1]);
        self.family.finish(&self.params, &self.prefixes[i], h, &mixed)
    }

    fn probs(&self, i: usize, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let t = q.size()[2];
        let scores = q.matmul(&k.transpose(-2, -1)) * self.family.scale(i);
        let allowed = self.mask(i, t, t).unwrap_or_else(|| causal(t, t, None, self.device));
        // Softmaxed in float32 whatever the pass's kind, as transformers' eager attention does: analyzers
        // read these probabilities, and bf16's 8-bit mantissa would round most of them.
        Ok(scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY).softmax(-1, Kind::Float))
    }

    /// Which keys each query may see, `[tq, tk]` (true: attend), when plain causal attention over the
    /// whole sequence does not say it: the last `tq` of `tk` positions, or a sliding window that bites.
    fn mask(&self, layer: usize, tq: i64, tk: i64) -> Option<Tensor> {
        let window = self.family.window(layer).filter(|&w| w < tk);
        match (window, tq) {
            (None, 1) => None, // one new token sees everything before it
            (None, _) if tq == tk => None,
            _ => Some(causal(tq, tk, window, self.device)),
        }
    }
}

/// `[tq, tk]` true where query `r` (at position tk - tq + r) may attend key `c`.
fn causal(tq: i64, tk: i64, window: Option<i64>, device: Device) -> Tensor {
    let row = Tensor::arange_start(tk - tq, tk, (Kind::Int64, device)).unsqueeze(1);
    let col = Tensor::arange(tk, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = col.le_tensor(&row);
    if let Some(w) = window {
        allowed = allowed.logical_and(&col.gt_tensor(&(&row - w)));
    }
    allowed
}

/// transformers' `repeat_kv`: `[b, kv, t, hd]` -> `[b, kv * rep, t, hd]`, each head repeated in place.
fn repeat_kv(x: &Tensor, rep: i64) -> Tensor {
    if rep == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2).expand([s[0], s[1], rep, s[2], s[3]], false).reshape([s[0], s[1] * rep, s[2], s[3]])
}

fn family(ckpt: &Checkpoint, device: Device) -> Result<Box<dyn Family>> {
    Ok(match ckpt.arch.family.as_str() {
        "gpt2" => Box::new(Gpt2::new(&ckpt.config)?),
        "llama" => Box::new(Llama::new(&ckpt.config, device)?),
        "qwen3" => Box::new(Qwen3::new(&ckpt.config, device)?),
        "gemma3" => Box::new(Gemma3::new(&ckpt.config, device)?),
        other => bail!("no forward pass for the `{other}` family"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    pub fn data(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
    }

    fn golden(name: &str) -> HashMap<String, Tensor> {
        Tensor::read_safetensors(data(name).join("golden.safetensors")).unwrap().into_iter().collect()
    }

    /// Every intermediate the golden file holds, against transformers' eager forward pass; the fused
    /// path (what eval, generate and training use) gives the same logits.
    fn matches_transformers(name: &str) {
        let ckpt = Checkpoint::open(&data(name)).unwrap();
        let golden = golden(name);
        let net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
        let _guard = tch::no_grad_guard();
        let mut h = net.embed(&golden["input_ids"]).unwrap();
        assert!(max_diff(&h, &golden["hidden.0"]) < 1e-6, "{name}: embeddings");
        for i in 0..ckpt.dims.layers {
            let attn = net.attention(i, &h).unwrap();
            let d = max_diff(&attn, &golden[&format!("attn.{i}")]);
            assert!(d < 1e-5, "{name}: attention of block {i} differs by {d}");
            let fused = net.block_fused(i, &h, None).unwrap();
            h = net.block(i, &h).unwrap();
            let d = max_diff(&h, &golden[&format!("hidden.{}", i + 1)]);
            assert!(d < 1e-4, "{name}: output of block {i} differs by {d}");
            let d = max_diff(&fused, &h);
            assert!(d < 1e-5, "{name}: fused and explicit attention differ by {d} in block {i}");
        }
        let d = max_diff(&net.head(&h).unwrap(), &golden["logits"]);
        assert!(d < 1e-4, "{name}: logits differ by {d}");
        let d = max_diff(&net.logits(&golden["input_ids"]).unwrap(), &golden["logits"]);
        assert!(d < 1e-4, "{name}: fused logits differ by {d}");
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

    #[test]
    fn qwen3_with_qk_norms_and_its_own_head_dim_matches_transformers() {
        matches_transformers("tiny-qwen3");
    }

    #[test]
    fn gemma3_with_sliding_and_global_blocks_matches_transformers() {
        matches_transformers("tiny-gemma3");
    }

    /// Token by token through the cache gives the logits of one full pass.
    #[test]
    fn the_key_value_cache_gives_the_full_pass_logits() {
        for name in ["tiny-llama", "tiny-gpt2", "tiny-qwen3", "tiny-gemma3"] {
            let ckpt = Checkpoint::open(&data(name)).unwrap();
            let net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
            let ids = golden(name)["input_ids"].narrow(0, 0, 1);
            let full = net.logits(&ids).unwrap();
            let t = ids.size()[1];
            let mut cache = net.cache();
            let mut parts = vec![net.step(&ids.narrow(1, 0, 3), &mut cache).unwrap()];
            for p in 3..t {
                parts.push(net.step(&ids.narrow(1, p, 1), &mut cache).unwrap());
            }
            let d = max_diff(&Tensor::cat(&parts, 1), &full);
            assert!(d < 1e-4, "{name}: cached logits differ by {d}");
        }
    }

    /// Streaming holds exactly one part's weights at a time and computes what the resident model does, bit for bit.
    #[test]
    fn a_streaming_pass_holding_one_block_at_a_time_equals_the_resident_one() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let ckpt = Checkpoint::open(&data(name)).unwrap();
            let net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
            let mut stream = Transformer::streaming(&ckpt, Device::Cpu, Kind::Float).unwrap();
            let ids = golden(name)["input_ids"].shallow_clone();
            let _guard = tch::no_grad_guard();
            stream.hold(&ckpt, Part::Embedding).unwrap();
            let (mut h, mut hs) = (net.embed(&ids).unwrap(), stream.embed(&ids).unwrap());
            for i in 0..ckpt.dims.layers {
                stream.hold(&ckpt, Part::Block(i)).unwrap();
                let prefix = ckpt.arch.block_prefix(i);
                assert!(stream.params.iter().all(|(n, _)| n.starts_with(&prefix)), "{name}: only block {i} is held");
                assert_eq!(stream.params.iter().count(), ckpt.names().filter(|n| n.starts_with(&prefix)).count());
                let (out, attention) = stream.block_attention(i, &hs).unwrap();
                assert_eq!(max_diff(&attention, &net.attention(i, &h).unwrap()), 0.0, "{name}: attention of block {i}");
                (h, hs) = (net.block(i, &h).unwrap(), out);
                assert_eq!(max_diff(&h, &hs), 0.0, "{name}: block {i}");
            }
        }
    }

    /// A sliding window that bites: the fused path with its mask equals the explicit one.
    #[test]
    fn a_sliding_window_masks_the_same_keys_in_both_attention_paths() {
        let ckpt = Checkpoint::open(&data("tiny-llama")).unwrap();
        let mut net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
        let ids = golden("tiny-llama")["input_ids"].shallow_clone();
        let wide = net.logits(&ids).unwrap();
        let mut config = ckpt.config.clone();
        config["sliding_window"] = 4.into();
        net.family = Box::new(Llama::new(&config, Device::Cpu).unwrap());
        let _guard = tch::no_grad_guard();
        let mut h = net.embed(&ids).unwrap();
        for i in 0..ckpt.dims.layers {
            let d = max_diff(&net.block_fused(i, &h, None).unwrap(), &net.block(i, &h).unwrap());
            assert!(d < 1e-5, "block {i}: {d}");
            h = net.block(i, &h).unwrap();
        }
        assert!(max_diff(&net.head(&h).unwrap(), &wide) > 1e-3, "a window of 4 should change the logits");
    }

    /// The loss is transformers' `labels = input_ids` loss: mean NLL of each next token.
    #[test]
    fn the_loss_is_the_mean_next_token_cross_entropy() {
        let ckpt = Checkpoint::open(&data("tiny-llama")).unwrap();
        let net = Transformer::load(&ckpt, Device::Cpu, Kind::Float).unwrap();
        let ids = golden("tiny-llama")["input_ids"].shallow_clone();
        let logits = net.logits(&ids).unwrap().to_kind(Kind::Double);
        let t = ids.size()[1];
        let logp = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Double);
        let picked = logp.gather(2, &ids.narrow(1, 1, t - 1).unsqueeze(2), false);
        let expected = -picked.mean(Kind::Double).double_value(&[]);
        let loss = tch::no_grad(|| net.loss(&ids).unwrap()).double_value(&[]);
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn unimplemented_config_values_are_refused_by_name() {
        let ckpt = Checkpoint::open(&data("tiny-llama")).unwrap();
        let mut config = ckpt.config.clone();
        config["hidden_act"] = "relu".into();
        let e = Llama::new(&config, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
        config["hidden_act"] = "silu".into();
        config["rms_norm_eps"] = serde_json::Value::Null;
        let e = Llama::new(&config, Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("rms_norm_eps"), "{e}");
        let gpt2 = Checkpoint::open(&data("tiny-gpt2")).unwrap();
        let mut config = gpt2.config.clone();
        config["activation_function"] = "swish".into();
        let e = Gpt2::new(&config).err().unwrap().to_string();
        assert!(e.contains("activation_function") && e.contains("swish"), "{e}");
    }

    /// A fresh model follows transformers' initialisation: norms at one, biases zero, matrices N(0, 0.02).
    #[test]
    fn random_init_follows_transformers() {
        let ckpt = Checkpoint::open(&data("tiny-gpt2")).unwrap();
        let a = Transformer::random(&ckpt, Device::Cpu, Kind::Float, 1).unwrap();
        let b = Transformer::random(&ckpt, Device::Cpu, Kind::Float, 1).unwrap();
        for (name, t) in a.params.iter() {
            assert_eq!(max_diff(t, b.params.get(name).unwrap()), 0.0, "{name}: seeded init is reproducible");
        }
        let ln = a.params.get("transformer.h.0.ln_1.weight").unwrap();
        assert_eq!(max_diff(ln, &ln.ones_like()), 0.0);
        assert_eq!(a.params.get("transformer.h.0.attn.c_attn.bias").unwrap().abs().max().double_value(&[]), 0.0);
        let std = a.params.get("transformer.wte.weight").unwrap().std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.002, "{std}");
    }
}
