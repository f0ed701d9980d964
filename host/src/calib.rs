//! Calibration windows: N random windows of T tokens from a text file (seeded), or an explicit
//! `[N, T]` tensor of token ids (safetensors or `.npy`) so that anyone can reproduce a run exactly.

use crate::model::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Windows {
    /// `[N, T]` int64 token ids, on the CPU.
    pub ids: Tensor,
    /// Where they came from, for the record.
    pub source: String,
}

pub struct Sampling {
    pub sequences: usize,
    pub tokens: usize,
    pub seed: u64,
    /// Prepend the tokenizer's BOS token to every window (the paper does not).
    pub bos: bool,
}

impl Windows {
    /// Token files are used as they are; text is tokenized with the model's tokenizer (made only then).
    pub fn load(path: &Path, tokenizer: impl FnOnce() -> Result<Tokenizer>, vocab: usize, s: &Sampling) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let w = match ext {
            "safetensors" | "npy" => Self::from_tensor_file(path)?,
            _ => Self::from_text(path, &tokenizer()?, s)?,
        };
        let max = w.ids.max().int64_value(&[]);
        if w.ids.min().int64_value(&[]) < 0 || max as usize >= vocab {
            bail!("{}: token ids must lie in 0..{vocab} (the model's vocabulary), found up to {max}", path.display());
        }
        Ok(w)
    }

    fn from_text(path: &Path, tokenizer: &Tokenizer, s: &Sampling) -> Result<Self> {
        if s.sequences == 0 || s.tokens < 2 {
            bail!("calibration needs at least one window of at least 2 tokens (got N={}, T={})", s.sequences, s.tokens);
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading calibration text {}", path.display()))?;
        let ids = tokenizer.encode(&text)?;
        let body = s.tokens - usize::from(s.bos);
        if ids.len() < body + 1 {
            bail!("{} has {} tokens: too short for windows of {} tokens", path.display(), ids.len(), s.tokens);
        }
        let all = Tensor::from_slice(&ids);
        tch::manual_seed(s.seed as i64);
        let starts = Tensor::randint((ids.len() - body + 1) as i64, [s.sequences as i64], (Kind::Int64, tch::Device::Cpu));
        let offsets = Tensor::arange(body as i64, (Kind::Int64, tch::Device::Cpu));
        let mut windows = all.index_select(0, &(starts.unsqueeze(1) + offsets.unsqueeze(0)).flatten(0, 1)).reshape([s.sequences as i64, body as i64]);
        if s.bos {
            let bos = tokenizer.bos().context("--bos was asked for, but the tokenizer has no BOS token")?;
            windows = Tensor::cat(&[Tensor::full([s.sequences as i64, 1], bos, (Kind::Int64, tch::Device::Cpu)), windows], 1);
        }
        let source = format!("{} windows of {} tokens from {} (seed {}{})", s.sequences, s.tokens, path.display(), s.seed, if s.bos { ", BOS" } else { "" });
        Ok(Windows { ids: windows, source })
    }

    fn from_tensor_file(path: &Path) -> Result<Self> {
        let ids = read_token_ids(path)?;
        let source = format!("token ids {:?} from {}", ids.size(), path.display());
        Ok(Windows { ids, source })
    }
}

/// `[N, T]` token ids from a `.safetensors` (its only tensor, or `input_ids`) or `.npy` file, as int64.
pub fn read_token_ids(path: &Path) -> Result<Tensor> {
    let ids = if path.extension().is_some_and(|e| e == "npy") {
        Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?
    } else {
        let tensors = Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
        match tensors.as_slice() {
            [(_, t)] => t.shallow_clone(),
            many => many
                .iter()
                .find(|(n, _)| n == "input_ids")
                .map(|(_, t)| t.shallow_clone())
                .with_context(|| format!("{} holds several tensors and none is called `input_ids`", path.display()))?,
        }
    };
    if ids.dim() != 2 || !matches!(ids.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Uint8) {
        bail!("{} must hold an integer tensor of shape [N, T]; it holds {:?} {:?}", path.display(), ids.kind(), ids.size());
    }
    if ids.size().iter().any(|&d| d == 0) {
        bail!("{} holds an empty tensor {:?}: calibration needs at least one window of at least one token", path.display(), ids.size());
    }
    Ok(ids.to_kind(Kind::Int64))
}
