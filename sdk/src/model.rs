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
    /// Vocabulary size: rows of the embedding.
    pub vocab: usize,
    /// Storage dtype of the weights: `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// Where tensors handed to plugins live: `cpu` or `cuda:0`.
    pub device: String,
    /// Names of all weight tensors, in checkpoint naming.
    pub tensors: Vec<String>,
    /// The family's prefix of every tensor of block `{i}`, e.g. `model.layers.{i}.`: what [`Model::block`]
    /// strips to name a block's tensors inside the block. Empty when the host does not say.
    #[serde(default)]
    pub block_prefix: String,
    /// The calibration windows behind `attention` and `hidden`, when the host has any.
    pub calibration: Option<Calibration>,
}

/// Calibration windows: `sequences` windows of `tokens` tokens each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Number of windows: the first dimension of `attention` and `hidden`.
    pub sequences: usize,
    /// Tokens per window (`T`).
    pub tokens: usize,
    /// Where they came from (a file and seed, or an explicit token tensor).
    pub source: String,
}

/// What the host implements to show a model to plugins. Plugin authors use [`Model`] instead.
pub trait ModelSource {
    /// The model's shape, tensor names and calibration windows.
    fn info(&self) -> &ModelInfo;
    /// A weight by checkpoint name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Post-softmax causal attention of block `layer` over the calibration windows.
    ///
    /// `[sequences, heads, T, T]`, float32 or wider, on the model's device.
    fn attention(&self, layer: usize) -> Result<Tensor>;
    /// The residual stream entering block `layer` over the calibration windows (see [`Model::hidden`]).
    ///
    /// `[sequences, T, d_model]`, float32, on the model's device; `layer == layers` gives the output of
    /// the last block, before the final norm.
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

    /// The model's shape, tensor names and calibration windows.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A weight by checkpoint name (`ModelInfo::tensors` lists them); [`Model::block`] names a block's by their name inside it.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        abi::view_tensor(self.view.tensor(name.into()))
    }

    /// Post-softmax causal attention of block `layer` over the calibration windows.
    ///
    /// `[sequences, heads, T, T]` (row `i` is query token `i`'s distribution over keys `0..=i`), float32 or
    /// wider, on the model's device, computed by the host from the same forward pass as [`Model::hidden`].
    pub fn attention(&self, layer: usize) -> Result<Tensor> {
        self.check_layer(layer, self.info.layers)?;
        abi::view_tensor(self.view.attention(layer))
    }

    /// The residual stream entering block `layer` over the calibration windows.
    ///
    /// `[sequences, T, d_model]` in float32 on the model's device (whatever the weights' dtype), one row per
    /// calibration window: `hidden(0)` is the token embedding (plus position embedding where the family
    /// has one), `hidden(l + 1)` is what block `l` writes back to the stream, and `hidden(layers)` is the
    /// output of the last block *before* the final norm. The tensor is the caller's own copy.
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

    /// Block `layer`, whose tensors are named inside the block (`self_attn.o_proj.weight`).
    ///
    /// The names come from [`ModelInfo::tensors`] and the family's [`ModelInfo::block_prefix`], so a plugin
    /// never matches `".{layer}."` in names itself.
    pub fn block(&self, layer: usize) -> Result<Block<'_, 'a>> {
        self.check_layer(layer, self.info.layers)?;
        crate::ensure!(
            self.info.block_prefix.contains("{i}"),
            "the host did not say how block tensors are named (ModelInfo::block_prefix is `{}`); it is older than this SDK",
            self.info.block_prefix
        );
        Ok(Block { model: self, layer, prefix: self.info.block_prefix.replace("{i}", &layer.to_string()) })
    }

    /// The weight `name` of block `layer`, named inside the block: `block_tensor(3, "mlp.up_proj.weight")`.
    pub fn block_tensor(&self, layer: usize, name: &str) -> Result<Tensor> {
        self.block(layer)?.tensor(name)
    }

    fn check_layer(&self, layer: usize, end: usize) -> Result<()> {
        crate::ensure!(layer < end, "layer {layer} is out of range: the model has {} layers", self.info.layers);
        Ok(())
    }
}

/// One block of a [`Model`]: its tensors by their name inside the block.
pub struct Block<'m, 'a> {
    model: &'m Model<'a>,
    layer: usize,
    prefix: String,
}

impl Block<'_, '_> {
    /// The block's index in the model.
    pub fn index(&self) -> usize {
        self.layer
    }

    /// The names of the block's tensors inside the block (`input_layernorm.weight`, `mlp.up_proj.weight`, …),
    /// in checkpoint order.
    pub fn names(&self) -> Vec<&str> {
        self.model.info.tensors.iter().filter_map(|n| n.strip_prefix(self.prefix.as_str())).collect()
    }

    /// The block's tensor called `name` inside the block, or an error listing the names it has.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let have = self.names();
        if !have.contains(&name) {
            crate::bail!("block {} has no tensor `{name}` (it has: {})", self.layer, have.join(", "));
        }
        self.model.tensor(&format!("{}{name}", self.prefix))
    }
}
