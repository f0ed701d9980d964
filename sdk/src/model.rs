//! The read-only model view plugins see, and the trait the host implements to provide it.

use crate::abi::{self, FfiModel};
use crate::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// The shape of a model, and of the calibration data the host ran through it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Architecture family: `gpt2`, `llama`, …
    pub family: String,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer (fewer than `heads` under grouped-query attention).
    pub kv_heads: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    pub vocab: usize,
    /// Storage dtype of the weights: `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// Where tensors handed to plugins live: `cpu` or `cuda:0`.
    pub device: String,
    /// Names of all weight tensors, in checkpoint naming.
    pub tensors: Vec<String>,
    /// The calibration windows behind `attention` and `hidden`, when the host has any.
    pub calibration: Option<Calibration>,
}

/// Calibration windows: `sequences` windows of `tokens` tokens each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub sequences: usize,
    pub tokens: usize,
    /// Where they came from (a file and seed, or an explicit token tensor).
    pub source: String,
}

/// What the host implements to show a model to plugins. Plugin authors use [`Model`] instead.
pub trait ModelSource {
    fn info(&self) -> &ModelInfo;
    /// A weight by checkpoint name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Post-softmax causal attention of block `layer` over the calibration windows,
    /// `[sequences, heads, T, T]`, float32 or wider, on the model's device.
    fn attention(&self, layer: usize) -> Result<Tensor>;
    /// Hidden states entering block `layer`, `[sequences, T, d_model]`; `layer == layers` gives the
    /// output of the last block.
    fn hidden(&self, layer: usize) -> Result<Tensor>;
    /// Mean next-token loss (nats per predicted token) over the calibration windows, with the blocks
    /// in `skip` left out of the forward pass (the residual stream passes them unchanged).
    fn loss(&self, skip: &[usize]) -> Result<f64> {
        let _ = skip;
        crate::bail!("this model view cannot run the model")
    }
}

/// The model as a plugin sees it: read-only, lent by the host for one call.
pub struct Model<'a> {
    view: FfiModel<'a>,
    info: ModelInfo,
}

impl<'a> Model<'a> {
    pub(crate) fn from_ffi(view: FfiModel<'a>) -> Result<Self> {
        let info = abi::view_info(&view)?;
        Ok(Model { view, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A weight by checkpoint name.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        abi::view_tensor(self.view.tensor(name.into()))
    }

    /// Post-softmax attention of block `layer`: `[sequences, heads, T, T]`, computed from QKᵀ.
    pub fn attention(&self, layer: usize) -> Result<Tensor> {
        self.check_layer(layer, self.info.layers)?;
        abi::view_tensor(self.view.attention(layer))
    }

    /// Hidden states entering block `layer` (`layer == layers`: after the last block).
    pub fn hidden(&self, layer: usize) -> Result<Tensor> {
        self.check_layer(layer, self.info.layers + 1)?;
        abi::view_tensor(self.view.hidden(layer))
    }

    /// Mean next-token loss over the calibration windows (nats per predicted token) with the blocks in
    /// `skip` left out: the host runs the model, so no plugin re-implements the forward pass.
    /// `loss(&[])` is the whole model's.
    pub fn loss(&self, skip: &[usize]) -> Result<f64> {
        for &l in skip {
            self.check_layer(l, self.info.layers)?;
        }
        self.view.loss(skip.into()).into_result().map_err(|e| crate::anyhow!("{e}"))
    }

    fn check_layer(&self, layer: usize, end: usize) -> Result<()> {
        crate::ensure!(layer < end, "layer {layer} is out of range: the model has {} layers", self.info.layers);
        Ok(())
    }
}
