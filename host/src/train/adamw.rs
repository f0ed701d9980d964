//! AdamW as PyTorch's `torch.optim.AdamW` computes it (its single-tensor path, operation for
//! operation), with its state in plain tensors so that a checkpoint can hold it and a resumed run
//! continues exactly. libtorch's C++ optimizer does not expose its state through tch.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken (PyTorch's per-parameter `step`; all parameters step together here).
    pub step: u64,
    /// First and second moments by parameter name.
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// β = (0.9, 0.95), ε = 1e-8: the paper's settings (and nanoGPT's).
    pub fn new(weight_decay: f64) -> Self {
        AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay, step: 0, moments: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient. Weight decay applies only to tensors of
    /// rank ≥ 2 (matrices and embeddings), not to norms and biases.
    pub fn update<'a>(&mut self, params: impl Iterator<Item = (&'a str, &'a Tensor)>, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let bias1 = 1.0 - self.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        for (name, p) in params {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            let (m, v) = self.moments.entry(name.to_string()).or_insert_with(|| (p.zeros_like(), p.zeros_like()));
            let mut p = p.shallow_clone();
            if p.dim() >= 2 && self.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
            }
            let _ = m.lerp_(&g, 1.0 - self.beta1);
            // exp_avg_sq.mul_(β2).addcmul_(g, g, value = 1 - β2), in PyTorch's order of operations.
            let _ = v.g_mul_scalar_(self.beta2).addcmul_(&(&g * (1.0 - self.beta2)), &g);
            let denom = (v.sqrt() / bias2_sqrt) + self.eps;
            let _ = p.addcdiv_(&(&*m * (-lr / bias1)), &denom);
        }
    }

    /// The state as named tensors: `m.NAME`, `v.NAME` and the step count.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = vec![("step".into(), Tensor::from(self.step as i64))];
        for (name, (m, v)) in &self.moments {
            named.push((format!("m.{name}"), m.to_device(tch::Device::Cpu)));
            named.push((format!("v.{name}"), v.to_device(tch::Device::Cpu)));
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Restores a state written by `save` for the same parameters on `device`.
    pub fn load(&mut self, path: &Path, params: &[(&str, &Tensor)]) -> Result<()> {
        let read = Tensor::read_safetensors(path).with_context(|| format!("reading optimizer state {}", path.display()))?;
        let mut found: BTreeMap<String, Tensor> = read.into_iter().collect();
        let step = found.remove("step").with_context(|| format!("{} has no step count", path.display()))?;
        self.step = step.int64_value(&[]) as u64;
        self.moments.clear();
        for (name, p) in params {
            match (found.remove(&format!("m.{name}")), found.remove(&format!("v.{name}"))) {
                (Some(m), Some(v)) if m.size() == p.size() && v.size() == p.size() => {
                    self.moments.insert(name.to_string(), (m.to_device(p.device()).to_kind(p.kind()), v.to_device(p.device()).to_kind(p.kind())));
                }
                (None, None) if self.step == 0 => {}
                _ => bail!("{}: no matching state for parameter `{name}`: the checkpoint belongs to another model", path.display()),
            }
        }
        if let Some(extra) = found.keys().next() {
            bail!("{}: state `{extra}` matches no parameter of the model", path.display());
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients, and the gradients scaled down to `max_norm` when above it
/// (PyTorch's `clip_grad_norm_`, with its 1e-6 in the denominator). `max_norm` ≤ 0: no clipping.
pub fn clip_grad_norm<'a>(params: impl Iterator<Item = &'a Tensor>, max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.filter_map(|p| Some(p.grad()).filter(Tensor::defined)).collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(Kind::Float)).collect();
    let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
    if max_norm > 0.0 {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 {
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(coef);
            }
        }
    }
    total
}
