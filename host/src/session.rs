//! A model opened for plugins: the checkpoint, its forward pass on a device, and the calibration
//! windows run through it once. Every analyzer of a run reads the same hidden states; attention is
//! computed from them one layer at a time, and kept for the next analyzer only while the layers kept
//! fit a memory budget (`SCALPEL_ATTENTION_CACHE_MB`, default 2048): beyond it, layers are recomputed,
//! so no model needs every layer's `[N, H, T, T]` in memory at once. Weights stream the same way:
//! the forward pass holds one block's weights in float32 at a time, so a checkpoint bigger than
//! memory can be analysed.

use crate::calib::Windows;
use crate::model::transformer::Part;
use crate::model::{Checkpoint, Transformer};
use anyhow::{bail, Result};
use scalpel_sdk::{Calibration, ModelInfo, ModelSource};
use std::cell::{OnceCell, Ref, RefCell};
use tch::{Device, Kind, Tensor};

pub struct Session<'a> {
    pub ckpt: &'a Checkpoint,
    info: ModelInfo,
    device: Device,
    /// What the forward pass computes in: float32, or bfloat16 (`--precision bf16`).
    kind: Kind,
    /// The streaming forward pass, made on first use (strategies that only plan never pay for it).
    net: RefCell<Option<Transformer>>,
    windows: Option<Windows>,
    /// Hidden states entering each block, and the last block's output: `layers + 1` of `[N, T, D]`.
    hidden: OnceCell<Vec<Tensor>>,
    /// Attention of the layers that fit the budget, each with its version counter when kept, and the bytes of
    /// budget left.
    attention: RefCell<(Vec<Option<(Tensor, i64)>>, usize)>,
    /// The analyzer running now, and its progress over layers once it asks for attention.
    stage: RefCell<Option<(String, Option<indicatif::ProgressBar>)>>,
}

/// While this lives, attention requests advance a progress bar named after the analyzer (drawn only when
/// stderr is a terminal); dropping it clears the bar.
pub struct Stage<'s>(&'s RefCell<Option<(String, Option<indicatif::ProgressBar>)>>);

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        if let Some((_, Some(bar))) = self.0.borrow_mut().take() {
            bar.finish_and_clear();
        }
    }
}

impl<'a> Session<'a> {
    /// The forward pass runs in `kind` (Float or BFloat16); attention probabilities are float32 either way.
    pub fn new(ckpt: &'a Checkpoint, device: Device, kind: Kind, windows: Option<Windows>) -> Self {
        let budget_mb: usize = std::env::var("SCALPEL_ATTENTION_CACHE_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
        Self::with_attention_budget(ckpt, device, kind, windows, budget_mb << 20)
    }

    /// A session that keeps at most `budget` bytes of attention.
    pub fn with_attention_budget(ckpt: &'a Checkpoint, device: Device, kind: Kind, windows: Option<Windows>, budget: usize) -> Self {
        let d = &ckpt.dims;
        let info = ModelInfo {
            family: ckpt.arch.family.clone(),
            layers: d.layers,
            heads: d.heads,
            kv_heads: d.kv_heads,
            d_model: d.d_model,
            vocab: d.vocab,
            dtype: ckpt.dtype().into(),
            device: match device {
                Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".into(),
            },
            tensors: ckpt.names().map(String::from).collect(),
            block_prefix: ckpt.arch.tensors.block.clone(),
            calibration: windows.as_ref().map(|w| Calibration {
                sequences: w.ids.size()[0] as usize,
                tokens: w.ids.size()[1] as usize,
                source: if kind == Kind::Float { w.source.clone() } else { format!("{}, forward pass in {kind:?}", w.source) },
            }),
        };
        let attention = RefCell::new(((0..d.layers).map(|_| None).collect(), budget));
        Session { ckpt, info, device, kind, net: RefCell::new(None), windows, hidden: OnceCell::new(), attention, stage: RefCell::new(None) }
    }

    /// Shows the progress of `name` (an analyzer) over the layers it pulls attention for, until the guard goes.
    pub fn stage(&self, name: &str) -> Stage<'_> {
        *self.stage.borrow_mut() = Some((name.to_string(), None));
        Stage(&self.stage)
    }

    /// Layer `layer` requested: the layers before it are done.
    fn advance(&self, layer: usize) {
        if let Some((name, bar)) = self.stage.borrow_mut().as_mut() {
            let bar = bar.get_or_insert_with(|| {
                let style = indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} layers, {eta} left").expect("a valid template");
                indicatif::ProgressBar::new(self.info.layers as u64).with_style(style).with_message(name.clone())
            });
            bar.set_position(layer as u64);
        }
    }

    /// The calibration windows' token ids, `[N, T]`.
    pub fn calibration_ids(&self) -> Option<&Tensor> {
        self.windows.as_ref().map(|w| &w.ids)
    }

    /// The forward pass holding the weights of `part` (and no others).
    fn net(&self, part: Part) -> Result<Ref<'_, Transformer>> {
        {
            let mut net = self.net.borrow_mut();
            if net.is_none() {
                *net = Some(Transformer::streaming(self.ckpt, self.device, self.kind)?);
            }
            net.as_mut().expect("made above").hold(self.ckpt, part)?;
        }
        Ok(Ref::map(self.net.borrow(), |n| n.as_ref().expect("made above")))
    }

    /// One forward pass over the calibration windows, in batches, keeping every block's input.
    fn hidden_states(&self) -> Result<&[Tensor]> {
        if let Some(h) = self.hidden.get() {
            return Ok(h);
        }
        let Some(windows) = &self.windows else {
            bail!("this needs calibration data: pass --calib FILE (a text file, or [N, T] token ids as .safetensors / .npy)");
        };
        let _guard = tch::no_grad_guard();
        let started = std::time::Instant::now();
        // Block by block over all batches: each block's weights are read once. Batches bound the
        // activations the forward pass materialises at once.
        let layers = self.ckpt.dims.layers;
        let embedded: Result<Vec<Tensor>> = windows.ids.split(16, 0).iter().map(|ids| self.net(Part::Embedding)?.embed(ids)).collect();
        let mut hidden = vec![Tensor::cat(&embedded?, 0)];
        check_finite(&hidden[0], 0)?;
        let bar = indicatif::ProgressBar::new(layers as u64)
            .with_style(indicatif::ProgressStyle::with_template("forward pass {bar:30} {pos}/{len} blocks, {eta} left").expect("a valid template"));
        // The pass computes every block's attention anyway: kept while it fits the budget, so that
        // attention analyzers do not read the weights a second time.
        let (n, t) = (windows.ids.size()[0] as usize, windows.ids.size()[1] as usize);
        let attention_bytes = n * self.ckpt.dims.heads * t * t * Kind::Float.elt_size_in_bytes();
        for i in bar.wrap_iter(0..layers) {
            let net = self.net(Part::Block(i))?;
            let keep = attention_bytes <= self.attention.borrow().1;
            let (mut outs, mut probs) = (Vec::new(), Vec::new());
            for h in hidden[i].split(16, 0) {
                let (out, p) = net.block_attention(i, &h)?;
                outs.push(out);
                if keep {
                    probs.push(p);
                }
            }
            if keep {
                let mut cache = self.attention.borrow_mut();
                cache.1 -= attention_bytes;
                let probs = Tensor::cat(&probs, 0);
                let version = probs.internal_version();
                cache.0[i] = Some((probs, version));
            }
            let h = Tensor::cat(&outs, 0);
            check_finite(&h, i + 1)?;
            hidden.push(h);
        }
        bar.finish_and_clear();
        eprintln!("forward pass over {} calibration windows: {:.1} s", windows.ids.size()[0], started.elapsed().as_secs_f64());
        Ok(self.hidden.get_or_init(|| hidden))
    }
}

fn check_finite(h: &Tensor, layer: usize) -> Result<()> {
    if h.isfinite().all().int64_value(&[]) == 0 {
        bail!("the hidden states entering layer {layer} contain NaN or infinity: the checkpoint's weights are broken or overflow in this dtype");
    }
    Ok(())
}

impl ModelSource for Session<'_> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.ckpt.tensor(name)?.to_device(self.device))
    }

    fn attention(&self, layer: usize) -> Result<Tensor> {
        // The forward pass fills the cache of the layers within the budget.
        let hidden = self.hidden_states()?;
        self.advance(layer);
        // Analyzers share the kept tensor, without a copy (36 MB a layer of SmolLM2, half the attention analyzers'
        // time). A plugin that writes into it bumps its version counter (views share it); the layer is then
        // computed again, so the next analyzer still sees the model's own attention.
        {
            let mut cache = self.attention.borrow_mut();
            match &cache.0[layer] {
                Some((a, version)) if a.internal_version() == *version => return Ok(a.shallow_clone()),
                Some((a, _)) => {
                    let bytes = a.numel() * a.kind().elt_size_in_bytes();
                    cache.0[layer] = None;
                    cache.1 += bytes;
                }
                None => {}
            }
        }
        let _guard = tch::no_grad_guard();
        let net = self.net(Part::Block(layer))?;
        // Batches bound the [b, H, T, T] scores the forward pass materialises at once.
        let parts: Result<Vec<Tensor>> = hidden[layer].split(16, 0).iter().map(|h| net.attention(layer, h)).collect();
        let a = Tensor::cat(&parts?, 0);
        let bytes = a.numel() * a.kind().elt_size_in_bytes();
        let mut cache = self.attention.borrow_mut();
        if bytes <= cache.1 {
            cache.1 -= bytes;
            cache.0[layer] = Some((a.shallow_clone(), a.internal_version()));
        }
        Ok(a)
    }

    fn hidden(&self, layer: usize) -> Result<Tensor> {
        // A copy: the cache feeds `attention` and every later analyzer, and plugins may write into what they get.
        Ok(self.hidden_states()?[layer].copy())
    }

    fn loss(&self, skip: &[usize]) -> Result<f64> {
        let hidden = self.hidden_states()?;
        let ids = self.calibration_ids().expect("hidden states exist, so windows do");
        let _guard = tch::no_grad_guard();
        // Blocks before the first skipped one are unchanged: start from the hidden states entering it.
        // Block by block over all batches, as the forward pass streams the weights.
        let layers = self.ckpt.dims.layers;
        let start = skip.iter().copied().min().unwrap_or(layers);
        let mut h: Vec<Tensor> = hidden[start].split(16, 0);
        for i in (start..layers).filter(|i| !skip.contains(i)) {
            let net = self.net(Part::Block(i))?;
            h = h.iter().map(|x| net.block_fused(i, x, None)).collect::<Result<_>>()?;
        }
        let net = self.net(Part::Head)?;
        let (mut sum, mut count) = (0.0, 0usize);
        for (x, ids) in h.iter().zip(ids.split(16, 0)) {
            let per_token = net.loss_of_logits(&net.head(x)?, &ids, 0, tch::Reduction::None)?;
            sum += per_token.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
            count += per_token.numel();
        }
        let mean = sum / count as f64;
        if !mean.is_finite() {
            bail!("the calibration loss without blocks {skip:?} is not finite");
        }
        Ok(mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn attention_kept_from_the_forward_pass_equals_attention_recomputed() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-llama");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let windows = || Some(Windows { ids: Tensor::arange(2 * 24, (Kind::Int64, Device::Cpu)).remainder(50).reshape([2, 24]), source: "test".into() });
        let layers = ckpt.dims.layers;
        let layer_bytes = 2 * ckpt.dims.heads * 24 * 24 * 4;
        // All layers kept; one layer kept (the rest recomputed); none kept.
        let sessions = [layers, 1, 0].map(|kept| Session::with_attention_budget(&ckpt, Device::Cpu, Kind::Float, windows(), kept * layer_bytes));
        for layer in 0..layers {
            let a: Vec<Tensor> = sessions.iter().map(|s| s.attention(layer).unwrap()).collect();
            assert_eq!(a[0].size(), [2, ckpt.dims.heads as i64, 24, 24]);
            assert!(a[0].equal(&a[1]) && a[0].equal(&a[2]), "layer {layer}");
        }
        assert!(sessions[0].attention.borrow().0.iter().all(Option::is_some));
        assert_eq!(sessions[1].attention.borrow().0.iter().filter(|a| a.is_some()).count(), 1);
        assert!(sessions[2].attention.borrow().0.iter().all(Option::is_none));
        // What a plugin gets is shared, not copied; writing into it, or into a view of it, does not reach the
        // next caller: the layer is computed again.
        let recomputed = sessions[2].attention(0).unwrap();
        let _ = sessions[0].attention(0).unwrap().fill_(0.0);
        assert!(sessions[0].attention(0).unwrap().equal(&recomputed));
        let _ = sessions[0].attention(0).unwrap().narrow(3, 0, 1).fill_(7.0);
        assert!(sessions[0].attention(0).unwrap().equal(&recomputed));
        let kept = sessions[0].attention(1).unwrap();
        assert_eq!(kept.data_ptr(), sessions[0].attention(1).unwrap().data_ptr(), "kept attention is handed out without a copy");
        assert!(sessions[0].attention.borrow().0.iter().all(Option::is_some), "the recomputed layer is kept again");
    }

    #[test]
    fn a_bf16_pass_gives_float32_attention_within_bf16_error_of_the_float32_pass() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-llama");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let windows = || Some(Windows { ids: Tensor::arange(2 * 24, (Kind::Int64, Device::Cpu)).remainder(50).reshape([2, 24]), source: "test".into() });
        let [f32, bf16] = [Kind::Float, Kind::BFloat16].map(|kind| Session::new(&ckpt, Device::Cpu, kind, windows()));
        assert!(bf16.info().calibration.as_ref().unwrap().source.contains("BFloat16"), "the record says how the pass ran");
        let mut worst = 0.0f64;
        for layer in 0..ckpt.dims.layers {
            let (a, b) = (f32.attention(layer).unwrap(), bf16.attention(layer).unwrap());
            assert_eq!(b.kind(), Kind::Float, "analyzers get float32 probabilities");
            let rows = b.sum_dim_intlist(-1, false, Kind::Double);
            assert!(rows.allclose(&rows.ones_like(), 1e-5, 1e-5, false), "layer {layer}: rows sum to 1");
            worst = worst.max((&a - &b).abs().max().double_value(&[]));
        }
        // bf16 keeps 8 bits of mantissa: the probabilities move by a few 1e-3, never by 0 (it did run in bf16).
        assert!(worst > 0.0 && worst < 0.05, "largest difference {worst}");
    }
}
