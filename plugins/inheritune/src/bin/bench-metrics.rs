//! Times k* and m* over a batch of attention-like matrices, against the strong baseline (one batched float32
//! `svdvals` and the column energies of the whole batch), on one device.
//!
//!   bench-metrics [--device cpu|cuda] [--matrices 72000] [--tokens 100] [--attention FILE.safetensors]
//!
//! The matrices mix sink-heavy and diffuse causal rows (seeded), as real attention does; `--attention`
//! times real attention instead (the first tensor of the file, `[..., T, T]`). Prints one JSON line.

use scalpel_plugin_inheritune::metrics::{energy_rank, mass, rank_and_mass};
use scalpel_sdk::prelude::*;
use std::time::Instant;

/// Causal softmax of random logits, with a per-matrix sink strength on key 0.
fn synthetic(n: i64, t: i64, device: Device) -> Tensor {
    tch::manual_seed(0);
    let causal = Tensor::ones([t, t], (Kind::Bool, device)).triu(1);
    let raw = Tensor::randn([n, t, t], (Kind::Float, device)) * 2.0;
    let first = raw.narrow(2, 0, 1) + Tensor::rand([n, 1, 1], (Kind::Float, device)) * 8.0;
    raw.narrow(2, 0, 1).copy_(&first);
    raw.masked_fill(&causal, f64::NEG_INFINITY).softmax(-1, Kind::Float)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
    };
    // As the host does: brings up libtorch's CUDA backend, or says why there is none.
    let device = scalpel_sdk::cuda::device(&arg("--device", "cpu"))?;
    let (n, t): (i64, i64) = (arg("--matrices", "72000").parse()?, arg("--tokens", "100").parse()?);
    let attn = match args.iter().position(|a| a == "--attention") {
        Some(i) => {
            let file = args.get(i + 1).context("--attention takes a safetensors file")?;
            let (_, tensor) = Tensor::read_safetensors(file)?.into_iter().next().context("the attention file holds no tensor")?;
            let t = *tensor.size().last().context("attention must be [..., T, T]")?;
            tensor.reshape([-1, t, t]).to_kind(Kind::Float).to_device(device)
        }
        None => synthetic(n, t, device),
    };
    let n = attn.size()[0];
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // Warm-up on a slice, then the timed run.
    let _ = rank_and_mass(&attn.narrow(0, 0, n.min(256)), 0.9, 0.9)?;
    sync();
    let start = Instant::now();
    let k = energy_rank(&attn, 0.9, Kind::Double)?;
    sync();
    let rank_s = start.elapsed().as_secs_f64();
    let m = mass(&attn, 0.9)?;
    sync();
    let fast = start.elapsed().as_secs_f64();
    // The strong baseline on a sample, scaled: float32 singular values of the batch, and its column energies.
    let sample = n.min(2000);
    let start = Instant::now();
    let a = attn.narrow(0, 0, sample);
    // svd without vectors is what svdvals calls (tch's linalg_svdvals insists on a driver, which the CPU refuses).
    let (_, s, _) = a.svd(true, false);
    let _ = (&a * &a).sum_dim_intlist(&[1][..], false, None).sort(-1, true);
    sync();
    let svd = start.elapsed().as_secs_f64() * n as f64 / sample as f64;
    let rank1 = k.eq(1).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    println!(
        "{}",
        serde_json::json!({
            "device": format!("{device:?}"), "matrices": n, "tokens": t,
            "rank_and_mass_s": fast, "rank_s": rank_s, "mass_s": fast - rank_s, "batched_svd_s_estimated": svd, "ratio": svd / fast,
            "fraction_rank1": rank1, "mean_k": k.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]),
            "mean_m": m.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]),
            "svd_sample": s.size()[0],
        })
    );
    Ok(())
}
