//! The parameter store: every weight of a model as a libtorch tensor on one device, by its canonical
//! HF name. Analysis, eval, generate and training all read weights from here; training marks them
//! `requires_grad` and writes them back as an HF folder.

use super::checkpoint::{kind_of, Checkpoint};
use super::write::OutTensor;
use crate::surgery::to_out;
use anyhow::{anyhow, Context, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

pub struct Params {
    tensors: BTreeMap<String, Tensor>,
    /// Mixed precision: matrix products run in this kind (bf16) while weights, norms, softmax and
    /// the loss stay in the master kind, as `torch.autocast` does.
    amp: Option<Kind>,
}

impl Params {
    /// Every tensor of the checkpoint on `device`, floating-point ones converted to `kind`.
    pub fn load(ckpt: &Checkpoint, device: Device, kind: Kind) -> Result<Self> {
        let mut params = Params::empty();
        params.hold(ckpt, device, kind, |_| true)?;
        Ok(params)
    }

    /// No tensors yet (see `hold`).
    pub fn empty() -> Self {
        Params { tensors: BTreeMap::new(), amp: None }
    }

    /// Exactly the checkpoint's tensors that `keep` selects: the others are dropped first, then the
    /// missing ones are read. Streaming analysis holds one block at a time this way.
    pub fn hold(&mut self, ckpt: &Checkpoint, device: Device, kind: Kind, keep: impl Fn(&str) -> bool) -> Result<()> {
        self.tensors.retain(|name, _| keep(name));
        for name in ckpt.names().filter(|n| keep(n)) {
            if !self.tensors.contains_key(name) {
                let t = ckpt.tensor_in(name, kind)?.f_to_device(device)?;
                self.tensors.insert(name.to_string(), t);
            }
        }
        Ok(())
    }

    /// Fresh tensors of the given names and shapes, filled by `init` (a seeded generator is the caller's).
    pub fn fresh(shapes: &[(String, Vec<i64>)], device: Device, kind: Kind, init: impl Fn(&str, &Tensor) -> Tensor) -> Self {
        let _guard = tch::no_grad_guard();
        let tensors = shapes
            .iter()
            .map(|(name, shape)| {
                let empty = Tensor::zeros(shape.as_slice(), (kind, Device::Cpu));
                (name.clone(), init(name, &empty).to_kind(kind).to_device(device))
            })
            .collect();
        Params { tensors, amp: None }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| anyhow!("the model has no tensor `{name}`"))
    }

    pub fn opt(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Run matrix products in `kind` (bf16 mixed precision), or in the master kind (`None`).
    pub fn set_amp(&mut self, kind: Option<Kind>) {
        self.amp = kind;
    }

    /// Every floating-point tensor becomes a leaf that collects gradients.
    pub fn train(&mut self) {
        for t in self.tensors.values_mut() {
            if t.is_floating_point() {
                *t = t.detach().set_requires_grad(true);
            }
        }
    }

    /// `x` in the kind matrix products run in.
    pub fn mm_input(&self, x: &Tensor) -> Tensor {
        match self.amp {
            Some(k) if x.kind() != k => x.to_kind(k),
            _ => x.shallow_clone(),
        }
    }

    /// `x Wᵀ + b` (torch's `Linear`), with the bias only where the checkpoint has one.
    pub fn linear(&self, x: &Tensor, weight: &str, bias: &str) -> Result<Tensor> {
        let w = self.mm_input(self.get(weight)?);
        let b = self.opt(bias).map(|b| self.mm_input(b));
        Ok(self.mm_input(x).f_linear(&w, b.as_ref())?)
    }

    /// `x W + b` with W stored `[in, out]` (GPT-2's `Conv1D`).
    pub fn conv1d(&self, x: &Tensor, weight: &str, bias: &str) -> Result<Tensor> {
        let y = self.mm_input(x).f_matmul(&self.mm_input(self.get(weight)?))?;
        Ok(y + self.mm_input(self.get(bias)?))
    }

    /// The tensors as they would be written into a checkpoint, in `dtype` (floating point only).
    pub fn out_tensors(&self, dtype: Dtype) -> impl Iterator<Item = Result<OutTensor<'static>>> + '_ {
        self.tensors.iter().map(move |(name, t)| {
            let t = t.detach().to_device(Device::Cpu);
            let stored = if t.is_floating_point() { dtype } else { dtype_of(t.kind())? };
            to_out(name.clone(), &t, stored).with_context(|| format!("writing `{name}`"))
        })
    }
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    for d in [Dtype::I64, Dtype::I32, Dtype::U8, Dtype::BOOL] {
        if kind_of(d)? == kind {
            return Ok(d);
        }
    }
    Err(anyhow!("cannot store a {kind:?} tensor"))
}
