//! Test a plugin's items without the host: a small in-memory model, and typed calls through the plugin boundary.
//!
//! [`TestModel`] implements [`ModelSource`] the way the host does. [`TestModel::llama`] makes a small llama-style
//! model with deterministic random weights under the real tensor names (`model.layers.{i}.self_attn.q_proj.weight`,
//! …) and runs an honest forward pass over a few random windows, so `hidden` and `attention` are what that model
//! computes. [`TestModel::from_hidden`] and [`TestModel::from_attention`] take activations from the test instead,
//! and [`TestModel::with_attention`] sets one layer to a known matrix (a rank-1 head, a sink).
//!
//! [`run_analyzer`] and [`run_strategy`] call an item by its type the way the host calls it: the config is
//! serialised to JSON, checked against the item's schema (an unknown key is refused), and the call crosses the
//! same boundary as in the host, so an error or a panic comes back as an error. The report is checked as the host
//! checks it (one finite value per layer), and the plan is validated against the model.
//!
//! ```ignore
//! use scalpel_sdk::testing::{run_analyzer, TestModel};
//!
//! #[test]
//! fn every_layer_has_a_norm() {
//!     let report = run_analyzer::<WeightNorms>(&TestModel::tiny(), WeightNormsConfig::default()).unwrap();
//!     assert_eq!(report.get("weight_norm").unwrap().per_layer.len(), 4);
//! }
//! ```

use crate::abi::{call_item, local_plugin};
use crate::registry::{self, ItemKind};
use crate::{Analyzer, Calibration, ModelInfo, ModelSource, Plan, Report, Reports, Result, Strategy};
use serde::Serialize;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The sizes of a [`TestModel::llama`] model and of its calibration windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub layers: usize,
    pub heads: usize,
    /// Key/value heads: fewer than `heads` gives grouped-query attention.
    pub kv_heads: usize,
    pub d_model: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate: usize,
    pub vocab: usize,
    /// Calibration windows.
    pub sequences: usize,
    /// Tokens per calibration window.
    pub tokens: usize,
    /// Seed of the weights and the token ids: the same seed gives the same model on every machine.
    pub seed: u64,
}

impl Default for Dims {
    fn default() -> Self {
        Dims { layers: 4, heads: 4, kv_heads: 2, d_model: 32, intermediate: 64, vocab: 64, sequences: 3, tokens: 16, seed: 0 }
    }
}

/// The llama family's name of block `{i}`'s tensors.
const LLAMA_BLOCK: &str = "model.layers.{i}.";
const RMS_EPS: f64 = 1e-5;
const ROPE_THETA: f64 = 10000.0;

/// A small in-memory model for plugin tests: weights, hidden states and attention, each given or computed.
pub struct TestModel {
    info: ModelInfo,
    weights: BTreeMap<String, Tensor>,
    /// `layers + 1` of `[sequences, T, d_model]`, or none.
    hidden: Vec<Tensor>,
    /// `layers` of `[sequences, heads, T, T]`, each given or not.
    attention: Vec<Option<Tensor>>,
    tokens: Option<Tensor>,
}

impl TestModel {
    /// A llama-style model of [`Dims::default`]: 4 blocks, 4 heads over 2 key/value heads, width 32, 3 windows of 16 tokens.
    pub fn tiny() -> Self {
        Self::llama(Dims::default())
    }

    /// A llama-style model with deterministic random weights, and its forward pass over random windows.
    ///
    /// The weights carry the llama checkpoint names; `hidden(l)` and `attention(l)` are computed in float32 by
    /// a plain forward pass (RMSNorm, RoPE, causal grouped-query attention, SwiGLU), as the host computes them.
    /// Panics when the sizes do not make a model (heads not dividing `d_model`, an odd head width, …).
    pub fn llama(dims: Dims) -> Self {
        let Dims { layers, heads, kv_heads, d_model, intermediate, vocab, sequences, tokens, seed } = dims;
        assert!(layers > 0 && sequences > 0 && tokens > 0 && vocab > 0 && intermediate > 0, "every size of {dims:?} must be positive");
        assert!(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, "kv_heads must divide heads: {dims:?}");
        assert!(d_model % heads == 0 && (d_model / heads) % 2 == 0, "d_model must be heads × an even head width: {dims:?}");
        let head_dim = d_model / heads;
        let mut rng = Rng(seed);
        let mut weights = BTreeMap::new();
        let mut names = Vec::new();
        let mut add = |name: String, t: Tensor| {
            names.push(name.clone());
            weights.insert(name, t);
        };
        add("model.embed_tokens.weight".into(), rng.normal(&[vocab, d_model], 1.0));
        for l in 0..layers {
            let p = LLAMA_BLOCK.replace("{i}", &l.to_string());
            let linear = |rng: &mut Rng, out: usize, inp: usize| rng.normal(&[out, inp], 1.0 / (inp as f64).sqrt());
            add(format!("{p}input_layernorm.weight"), rng.normal(&[d_model], 0.1) + 1.0);
            add(format!("{p}self_attn.q_proj.weight"), linear(&mut rng, heads * head_dim, d_model));
            add(format!("{p}self_attn.k_proj.weight"), linear(&mut rng, kv_heads * head_dim, d_model));
            add(format!("{p}self_attn.v_proj.weight"), linear(&mut rng, kv_heads * head_dim, d_model));
            add(format!("{p}self_attn.o_proj.weight"), linear(&mut rng, d_model, heads * head_dim));
            add(format!("{p}post_attention_layernorm.weight"), rng.normal(&[d_model], 0.1) + 1.0);
            add(format!("{p}mlp.gate_proj.weight"), linear(&mut rng, intermediate, d_model));
            add(format!("{p}mlp.up_proj.weight"), linear(&mut rng, intermediate, d_model));
            add(format!("{p}mlp.down_proj.weight"), linear(&mut rng, d_model, intermediate));
        }
        add("model.norm.weight".into(), rng.normal(&[d_model], 0.1) + 1.0);
        add("lm_head.weight".into(), rng.normal(&[vocab, d_model], 1.0 / (d_model as f64).sqrt()));
        let ids: Vec<i64> = (0..sequences * tokens).map(|_| (rng.next() % vocab as u64) as i64).collect();
        let ids = Tensor::from_slice(&ids).view([sequences as i64, tokens as i64]);
        let info = ModelInfo {
            family: "llama".into(),
            layers,
            heads,
            kv_heads,
            d_model,
            vocab,
            dtype: "f32".into(),
            device: "cpu".into(),
            tensors: names,
            block_prefix: LLAMA_BLOCK.into(),
            calibration: Some(Calibration { sequences, tokens, source: format!("random token ids, seed {seed}") }),
        };
        let mut model = TestModel { info, weights, hidden: vec![], attention: vec![], tokens: None };
        let (hidden, attention) = tch::no_grad(|| model.forward(&ids));
        (model.hidden, model.attention, model.tokens) = (hidden, attention.into_iter().map(Some).collect(), Some(ids));
        model
    }

    /// A model made of given hidden states: `states[l]`, `[sequences, T, d_model]`, enters block `l`, and the
    /// last one leaves the last block. It has no weights and no attention unless [`TestModel::with_attention`] adds it.
    pub fn from_hidden(states: Vec<Tensor>) -> Self {
        assert!(states.len() >= 2, "give the states entering every block and the last block's output: at least 2, got {}", states.len());
        let size = states[0].size();
        assert!(size.len() == 3, "hidden states are [sequences, tokens, d_model], got {size:?}");
        assert!(states.iter().all(|s| s.size() == size), "every hidden state must have the shape {size:?} of the first");
        let mut model = Self::shape(states.len() - 1);
        model.info.d_model = size[2] as usize;
        model.info.calibration = Some(calibration(size[0], size[1]));
        model.hidden = states;
        model
    }

    /// A model made of given attention: `maps[l]`, `[sequences, heads, T, T]`, is block `l`'s. No weights, no hidden states.
    pub fn from_attention(maps: Vec<Tensor>) -> Self {
        assert!(!maps.is_empty(), "give the attention of at least one block");
        let size = maps[0].size();
        assert!(size.len() == 4 && size[2] == size[3], "attention is [sequences, heads, T, T], got {size:?}");
        let mut model = Self::shape(maps.len());
        (model.info.heads, model.info.kv_heads) = (size[1] as usize, size[1] as usize);
        model.info.calibration = Some(calibration(size[0], size[2]));
        for (l, map) in maps.into_iter().enumerate() {
            model = model.with_attention(l, map);
        }
        model
    }

    /// A model of `layers` blocks with nothing but its shape: enough for strategies that read only the depth.
    pub fn shape(layers: usize) -> Self {
        let info = ModelInfo {
            family: "test".into(),
            layers,
            dtype: "f32".into(),
            device: "cpu".into(),
            block_prefix: LLAMA_BLOCK.into(),
            ..ModelInfo::default()
        };
        TestModel { info, weights: BTreeMap::new(), hidden: vec![], attention: (0..layers).map(|_| None).collect(), tokens: None }
    }

    /// Sets block `layer`'s attention to a known `[sequences, heads, T, T]` map, e.g. a rank-1 head.
    ///
    /// The weights and hidden states stay as they were: they no longer produce this attention.
    pub fn with_attention(mut self, layer: usize, map: Tensor) -> Self {
        assert!(layer < self.info.layers, "layer {layer} is out of range: the model has {} layers", self.info.layers);
        let size = map.size();
        let want = self.info.calibration.as_ref().map(|c| [c.sequences as i64, self.info.heads as i64, c.tokens as i64, c.tokens as i64]);
        if let Some(want) = want.filter(|_| self.info.heads > 0) {
            assert!(size == want, "block {layer}'s attention must be [sequences, heads, T, T] = {want:?}, got {size:?}");
        }
        self.attention[layer] = Some(map.to_kind(Kind::Float));
        self
    }

    /// The calibration windows' token ids, `[sequences, T]`, when the model ran them ([`TestModel::llama`]).
    pub fn tokens(&self) -> Option<&Tensor> {
        self.tokens.as_ref()
    }

    /// RMSNorm, RoPE, causal grouped-query attention and SwiGLU over `ids`: the hidden states and attention maps.
    fn forward(&self, ids: &Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
        let i = &self.info;
        let (s, t, heads, kv) = (ids.size()[0], ids.size()[1], i.heads as i64, i.kv_heads as i64);
        let hd = i.d_model as i64 / heads;
        let w = |name: &str| &self.weights[name];
        // θ^(-2j/hd) = exp(-(2j/hd)·ln θ), for 2j = 0, 2, …, hd − 2.
        let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, Device::Cpu)) * (-(ROPE_THETA.ln()) / hd as f64)).exp();
        let angles = Tensor::arange(t, (Kind::Float, Device::Cpu)).unsqueeze(1) * inv_freq.unsqueeze(0);
        let (cos, sin) = (Tensor::cat(&[angles.cos(), angles.cos()], -1), Tensor::cat(&[angles.sin(), angles.sin()], -1));
        let rope = |x: &Tensor| {
            let halves = x.chunk(2, -1);
            x * &cos + Tensor::cat(&[-&halves[1], halves[0].shallow_clone()], -1) * &sin
        };
        let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let mut h = w("model.embed_tokens.weight").index_select(0, &ids.flatten(0, -1)).view([s, t, -1]);
        let (mut hidden, mut attention) = (vec![h.copy()], vec![]);
        for l in 0..i.layers {
            let p = |name: &str| format!("{}{name}", LLAMA_BLOCK.replace("{i}", &l.to_string()));
            let x = rms_norm(&h, w(&p("input_layernorm.weight")));
            let project = |name: &str, n: i64| x.matmul(&w(&p(name)).tr()).view([s, t, n, hd]).transpose(1, 2);
            let q = rope(&project("self_attn.q_proj.weight", heads));
            let k = rope(&project("self_attn.k_proj.weight", kv)).repeat_interleave_self_int(heads / kv, 1, None);
            let v = project("self_attn.v_proj.weight", kv).repeat_interleave_self_int(heads / kv, 1, None);
            let scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
            let a = scores.masked_fill(&mask, f64::NEG_INFINITY).softmax(-1, Kind::Float);
            let o = a.matmul(&v).transpose(1, 2).reshape([s, t, heads * hd]);
            h = h + o.matmul(&w(&p("self_attn.o_proj.weight")).tr());
            let x = rms_norm(&h, w(&p("post_attention_layernorm.weight")));
            let gate = x.matmul(&w(&p("mlp.gate_proj.weight")).tr()).silu();
            h = h + (gate * x.matmul(&w(&p("mlp.up_proj.weight")).tr())).matmul(&w(&p("mlp.down_proj.weight")).tr());
            hidden.push(h.copy());
            attention.push(a);
        }
        (hidden, attention)
    }
}

fn rms_norm(h: &Tensor, weight: &Tensor) -> Tensor {
    h * (h.square().mean_dim(-1, true, Kind::Float) + RMS_EPS).rsqrt() * weight
}

fn calibration(sequences: i64, tokens: i64) -> Calibration {
    Calibration { sequences: sequences as usize, tokens: tokens as usize, source: "given by the test".into() }
}

/// splitmix64: the same numbers on every machine and thread, unlike libtorch's global generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A float32 tensor of normal samples with standard deviation `std` (Box–Muller).
    fn normal(&mut self, shape: &[usize], std: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos() * std) as f32)
            .collect();
        Tensor::from_slice(&v).view(shape.iter().map(|&d| d as i64).collect::<Vec<_>>().as_slice())
    }
}

impl ModelSource for TestModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        // A copy, as from the host: a plugin may write into what it gets.
        self.weights.get(name).map(Tensor::copy).ok_or_else(|| {
            if self.weights.is_empty() {
                crate::anyhow!("no weight `{name}`: this test model has no weights (TestModel::llama has)")
            } else {
                crate::anyhow!("no weight `{name}` in this model (ModelInfo::tensors lists them)")
            }
        })
    }

    fn attention(&self, layer: usize) -> Result<Tensor> {
        match self.attention.get(layer) {
            Some(Some(a)) => Ok(a.copy()),
            Some(None) => crate::bail!("no attention for layer {layer} in this test model: build it with TestModel::llama or give it (with_attention)"),
            None => crate::bail!("layer {layer} is out of range: the model has {} layers", self.info.layers),
        }
    }

    fn hidden(&self, layer: usize) -> Result<Tensor> {
        if self.hidden.is_empty() {
            crate::bail!("no hidden states entering layer {layer} in this test model: build it with TestModel::llama or TestModel::from_hidden");
        }
        self.hidden.get(layer).map(Tensor::copy).ok_or_else(|| crate::anyhow!("layer {layer} is out of range: the model has {} layers", self.info.layers))
    }
}

/// Runs analyzer `A` on `model` with `config`, as the host does, and returns its checked report.
///
/// `config` is anything that serialises to the item's config: the config struct itself, or
/// `serde_json::json!({"key": value})` to test how a bad setting is refused. The report's `analyzer` is the
/// name `A` is registered under, so it can go straight into [`Reports`] for a strategy.
pub fn run_analyzer<A: Analyzer>(model: &dyn ModelSource, config: impl Serialize) -> Result<Report> {
    let name = registered::<A>(ItemKind::Analyzer)?;
    let out = call(name, model, config, &Reports::default())?;
    let mut report: Report = serde_json::from_str(&out).map_err(|e| crate::anyhow!("`{name}` returned a malformed report: {e}"))?;
    report.analyzer = name.into();
    report.check(model.info().layers)?;
    Ok(report)
}

/// Runs strategy `S` on `model` with `config` and the reports of earlier steps, as the host does, and
/// returns its plan, validated against the model.
pub fn run_strategy<S: Strategy>(model: &dyn ModelSource, config: impl Serialize, reports: &Reports) -> Result<Plan> {
    let name = registered::<S>(ItemKind::Strategy)?;
    let plan: Plan = serde_json::from_str(&call(name, model, config, reports)?).map_err(|e| crate::anyhow!("`{name}` returned a malformed plan: {e}"))?;
    plan.validate(model.info().layers)?;
    Ok(plan)
}

/// The name item type `T` is registered under in this crate.
fn registered<T: 'static>(kind: ItemKind) -> Result<&'static str> {
    let ty = std::any::type_name::<T>();
    let macro_name = match kind {
        ItemKind::Analyzer => "analyzer",
        ItemKind::Strategy => "strategy",
    };
    let Some(item) = registry::item_of_type::<T>() else {
        crate::bail!("`{ty}` is not registered in this crate: add `scalpel_sdk::{macro_name}! {{ \"its-name\" => …}}`");
    };
    crate::ensure!(item.kind == kind, "`{ty}` is registered as the {} `{}`, not as a {kind}", item.kind, item.name);
    Ok(item.name)
}

/// One call through the plugin boundary: config and reports as JSON, the model lent, panics caught.
fn call(name: &str, model: &dyn ModelSource, config: impl Serialize, reports: &Reports) -> Result<String> {
    call_item(local_plugin(), name, model, &serde_json::to_string(&config)?, &serde_json::to_string(reports)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// Settings of the test analyzer.
    #[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
    #[serde(default)]
    struct NormsConfig {
        /// Panic instead of reporting.
        panic: bool,
    }

    /// The norm of each block's `o_proj`, read through the block view.
    struct Norms;

    impl Analyzer for Norms {
        type Config = NormsConfig;
        fn analyze(&self, model: &Model, config: &NormsConfig) -> Result<Report> {
            assert!(!config.panic, "asked to panic");
            let norms = (0..model.info().layers)
                .map(|l| Ok(model.block_tensor(l, "self_attn.o_proj.weight")?.norm().double_value(&[])))
                .collect::<Result<Vec<f64>>>()?;
            Ok(Report::new().metric(Metric::per_layer("o_norm", norms)))
        }
    }

    /// Keeps the first `keep` blocks.
    struct Keep;

    impl Strategy for Keep {
        type Config = NormsConfig;
        fn plan(&self, model: &Model, _: &NormsConfig, reports: &Reports) -> Result<Plan> {
            let norms = &reports.get("o-norms")?.get("o_norm")?.per_layer;
            Ok(Plan::ranges(&[0..norms.len().min(model.info().layers + 1)]))
        }
    }

    /// Reports a value in the last layer (or every head), NaN or infinity where a metric went wrong.
    struct Constant;

    /// Settings of the test analyzer that reports a constant.
    #[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
    #[serde(default)]
    struct ConstantConfig {
        /// `nan`, `inf`, or anything else for 2 (as text: JSON has no NaN); `torch-error` and `torch-panic`
        /// multiply matrices that do not fit, with tch's `f_` form or the panicking one.
        value: String,
        /// Per head too, this many heads.
        heads: usize,
    }

    impl Analyzer for Constant {
        type Config = ConstantConfig;
        fn analyze(&self, model: &Model, c: &ConstantConfig) -> Result<Report> {
            let layers = model.info().layers;
            let (a, b) = (Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)));
            match c.value.as_str() {
                "torch-error" => drop(a.f_matmul(&b)?),
                "torch-panic" => drop(a.matmul(&b)),
                _ => {}
            }
            let value = c.value.parse::<f64>().unwrap_or(2.0);
            let mut metric = Metric::per_layer("c", vec![1.0; layers]);
            if c.heads > 0 {
                metric = metric.heads(vec![vec![value; c.heads]; layers], None);
            } else {
                metric.per_layer[layers - 1] = value;
            }
            Ok(Report::new().metric(metric))
        }
    }

    /// Registered nowhere.
    struct Stray;

    impl Analyzer for Stray {
        type Config = NormsConfig;
        fn analyze(&self, _: &Model, _: &NormsConfig) -> Result<Report> {
            Ok(Report::new())
        }
    }

    crate::analyzer! {
        /// Norms of the attention output projections.
        "o-norms" => Norms
    }
    crate::analyzer! {
        /// A constant.
        "constant" => Constant
    }
    crate::strategy! {
        /// Keeps a report's worth of blocks.
        "keep" => Keep
    }

    #[test]
    fn the_llama_model_is_deterministic_causal_and_float32() {
        let (a, b) = (TestModel::tiny(), TestModel::tiny());
        let info = a.info();
        assert_eq!((info.layers, info.tensors.len()), (4, 3 + 4 * 9));
        assert!(info.tensors.contains(&"model.layers.3.mlp.down_proj.weight".to_string()));
        for l in 0..=info.layers {
            let (h, g) = (a.hidden(l).unwrap(), b.hidden(l).unwrap());
            assert_eq!((h.size(), h.kind()), (vec![3, 16, 32], Kind::Float));
            assert!(h.equal(&g), "layer {l} differs between two builds of the same seed");
        }
        // Each block changes the stream.
        assert!(!a.hidden(1).unwrap().allclose(&a.hidden(0).unwrap(), 1e-3, 1e-3, false));
        let att = a.attention(2).unwrap();
        assert_eq!(att.size(), [3, 4, 16, 16]);
        assert!(att.sum_dim_intlist(-1, false, Kind::Float).allclose(&Tensor::ones([3, 4, 16], (Kind::Float, Device::Cpu)), 1e-5, 1e-5, false));
        assert_eq!(att.triu(1).abs().max().double_value(&[]), 0.0, "attention looks ahead");
        // Another seed, another model.
        let c = TestModel::llama(Dims { seed: 1, ..Dims::default() });
        assert!(!c.tensor("model.embed_tokens.weight").unwrap().equal(&a.tensor("model.embed_tokens.weight").unwrap()));
    }

    #[test]
    fn a_block_is_the_checkpoint_tensors_under_its_prefix() {
        let model = TestModel::tiny();
        let report = run_analyzer::<Norms>(&model, NormsConfig::default()).unwrap();
        assert_eq!(report.analyzer, "o-norms");
        let want: Vec<f64> = (0..4).map(|l| model.tensor(&format!("model.layers.{l}.self_attn.o_proj.weight")).unwrap().norm().double_value(&[])).collect();
        assert_eq!(report.get("o_norm").unwrap().per_layer, want);
    }

    #[test]
    fn calls_behave_as_in_the_host() {
        let model = TestModel::tiny();
        let e = run_analyzer::<Norms>(&model, serde_json::json!({"panik": true})).unwrap_err().to_string();
        assert!(e.contains("unknown config key `panik`") && e.contains("panic"), "{e}");
        let e = run_analyzer::<Norms>(&model, NormsConfig { panic: true }).unwrap_err().to_string();
        assert!(e.contains("panicked: asked to panic"), "{e}");
        let e = run_analyzer::<Norms>(&TestModel::shape(2), NormsConfig::default()).unwrap_err().to_string();
        assert!(e.contains("has no tensor `self_attn.o_proj.weight`"), "{e}");
        let e = run_analyzer::<Stray>(&model, NormsConfig::default()).unwrap_err().to_string();
        assert!(e.contains("Stray` is not registered") && e.contains("analyzer!"), "{e}");
    }

    #[test]
    fn a_panic_says_where_and_libtorch_errors_leave_out_the_cpp_frames() {
        let model = TestModel::tiny();
        let e = run_analyzer::<Norms>(&model, NormsConfig { panic: true }).unwrap_err().to_string();
        assert!(e.contains("panicked: asked to panic (at sdk/src/testing.rs:"), "{e}");
        for value in ["torch-error", "torch-panic"] {
            let e = run_analyzer::<Constant>(&model, ConstantConfig { value: value.into(), heads: 0 }).unwrap_err().to_string();
            // libtorch's message, without the dozens of C++ frames it appends to every error.
            assert!(e.contains("mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"), "{e}");
            assert!(!e.contains("Exception raised from") && !e.contains("frame #"), "{e}");
            assert!(e.lines().count() == 1, "{e}");
        }
        let e = run_analyzer::<Constant>(&model, ConstantConfig { value: "torch-panic".into(), heads: 0 }).unwrap_err().to_string();
        assert!(e.starts_with("panicked: called `Result::unwrap()`") && !e.contains(".cargo/registry"), "{e}");
    }

    #[test]
    fn a_non_finite_value_is_named_not_called_malformed() {
        // JSON has no NaN: serialised, it became `null`, and the host could only say "malformed report".
        let model = TestModel::tiny();
        for value in ["NaN", "inf"] {
            let e = run_analyzer::<Constant>(&model, ConstantConfig { value: value.into(), heads: 0 }).unwrap_err().to_string();
            assert!(e.contains("analyzer `constant` reported a non-finite `c` for layer 3"), "{e}");
            let e = run_analyzer::<Constant>(&model, ConstantConfig { value: value.into(), heads: 4 }).unwrap_err().to_string();
            assert!(e.contains("analyzer `constant` reported a non-finite `c` for layer 0 head 0"), "{e}");
        }
        assert!(run_analyzer::<Constant>(&model, ConstantConfig { value: "2".into(), heads: 4 }).is_ok());
    }

    #[test]
    fn a_report_feeds_a_strategy_and_plans_are_validated() {
        let model = TestModel::tiny();
        let mut reports = Reports::default();
        let e = run_strategy::<Keep>(&model, NormsConfig::default(), &reports).unwrap_err().to_string();
        assert!(e.contains("run the `o-norms` analyzer"), "{e}");
        reports.insert(run_analyzer::<Norms>(&model, NormsConfig::default()).unwrap());
        assert_eq!(run_strategy::<Keep>(&model, NormsConfig::default(), &reports).unwrap().sources(), [0, 1, 2, 3]);
        // A report of 4 layers against a model of 3: the plan reaches past the model.
        let e = run_strategy::<Keep>(&TestModel::shape(3), NormsConfig::default(), &reports).unwrap_err().to_string();
        assert!(e.contains("output layer 3 would come from layer 3"), "{e}");
    }

    #[test]
    fn given_activations_come_back_and_missing_ones_are_named() {
        let x = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let model = TestModel::from_hidden(vec![x.copy(), x.copy() * 2.0]);
        assert_eq!((model.info().layers, model.info().d_model), (1, 8));
        assert!(model.hidden(1).unwrap().equal(&(x * 2.0)));
        assert!(model.attention(0).unwrap_err().to_string().contains("with_attention"));
        // A rank-1 head: every query reads the first token.
        let sink = Tensor::zeros([5, 5], (Kind::Float, Device::Cpu));
        let _ = sink.narrow(1, 0, 1).fill_(1.0);
        let model = TestModel::from_attention(vec![sink.view([1, 1, 5, 5]).repeat([2, 3, 1, 1])]);
        assert_eq!(model.info().heads, 3);
        assert!(model.attention(0).unwrap().select(1, 2).select(0, 1).equal(&sink));
        assert!(model.hidden(0).unwrap_err().to_string().contains("no hidden states"));
        let r = std::panic::catch_unwind(|| TestModel::from_attention(vec![sink.view([1, 1, 5, 5])]).with_attention(0, sink.shallow_clone()));
        assert!(r.is_err(), "a map of the wrong shape is refused");
    }
}
