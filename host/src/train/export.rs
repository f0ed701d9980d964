//! `scalpel train --export DIR`: the same training run as a self-contained job for PyTorch's `torchrun`
//! with FSDP2, for when one machine is not enough. scalpel does not run a cluster; it hands the job to
//! the engine that does, and reads its checkpoints (HF folders) back for the next round of surgery.
//!
//! The job folder holds the model (an HF folder), the token data with the exact batch order
//! (`data/order.npy`: for every step and micro-batch, the window starts or row ids `scalpel train`
//! would draw), `job.json` (the settings), `train.py`, `launch.sh` and a README.

use super::{check, dropout_note, initial_net, Run, TrainConfig};
use crate::model::write::{stage, write_model, Folder, DEFAULT_SHARD_BYTES};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::Device;

const TRAIN_PY: &str = include_str!("torchrun_train.py");

/// Writes the job for `run` into `dir` (atomically; `force` replaces an earlier export).
pub fn export(run: &Run, dir: &Path, force: bool) -> Result<PathBuf> {
    let c = &run.config;
    let (ckpt, data) = check(run)?;
    let mut skipped: Vec<&str> = Vec::new();
    if run.val.is_some() || c.eval_every > 0 {
        skipped.push("validation (--val, --eval-every)");
    }
    if c.save_every > 0 {
        skipped.push("intermediate checkpoints (--save-every)");
    }
    if !skipped.is_empty() {
        eprintln!("note: the exported job trains and saves the final model; it does not do {}", skipped.join(" or "));
    }
    if let Some(note) = dropout_note(&ckpt.config) {
        eprintln!("note: {note}; the exported job switches dropout off too");
    }
    let staging = stage(dir, force, "job.json")?;
    let out = staging.path();

    // The model as the run would start it: its weights, or the seeded fresh initialisation.
    let net = initial_net(run, &ckpt, Device::Cpu)?;
    let record = json!({ "produced_by": format!("scalpel {} train --export", env!("CARGO_PKG_VERSION")), "exported_from": run.model, "init": c.init });
    let mut config = ckpt.config.clone();
    config["torch_dtype"] = json!("float32");
    let folder = Folder { config: &config, companions_from: Some(&run.model), extra_files: vec![], record: &record };
    write_model(&out.join("model"), false, folder, net.params.out_tensors(safetensors::Dtype::F32), DEFAULT_SHARD_BYTES)?;
    drop(net);

    std::fs::create_dir(out.join("data"))?;
    let (kind, file) = if data.train.is_stream() {
        // A token file: copied as is (llm.c layout), indexed by window starts.
        let src = data.files.iter().find(|f| f.extension().is_some_and(|e| e == "bin")).context("the token data names no .bin file")?;
        std::fs::copy(src, out.join("data/train.bin")).with_context(|| format!("copying {}", src.display()))?;
        ("stream", "train.bin")
    } else {
        write_npy_i64(&out.join("data/rows.npy"), &data.train.rows()?)?;
        ("rows", "rows.npy")
    };
    let micro = c.grad_accum as u64;
    let mut order = Vec::with_capacity(c.steps as usize * c.grad_accum * c.batch);
    for step in 0..c.steps {
        for m in 0..micro {
            order.extend(data.train.order(step * micro + m, c.batch, c.seq, c.seed, c.shuffle)?.into_iter().map(|v| v as i64));
        }
    }
    write_npy(&out.join("data/order.npy"), &order, &[c.steps as usize, c.grad_accum, c.batch])?;

    let job = json!({ "config": config_json(c), "data": { "kind": kind, "file": file }, "model": "model", "source": { "model": run.model, "data": data.source } });
    std::fs::write(out.join("job.json"), serde_json::to_string_pretty(&job)? + "\n")?;
    std::fs::write(out.join("train.py"), TRAIN_PY)?;
    std::fs::write(out.join("launch.sh"), LAUNCH)?;
    std::fs::set_permissions(out.join("launch.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::write(out.join("README.md"), README)?;
    staging.commit()
}

fn config_json(c: &TrainConfig) -> serde_json::Value {
    serde_json::to_value(c).expect("a config serialises")
}

/// `[N, T]` int64 rows as a `.npy` file.
fn write_npy_i64(path: &Path, rows: &tch::Tensor) -> Result<()> {
    let shape: Vec<usize> = rows.size().iter().map(|&d| d as usize).collect();
    let values = Vec::<i64>::try_from(rows.flatten(0, -1))?;
    write_npy(path, &values, &shape)
}

/// Little-endian int64 values as a NumPy `.npy` file (format 1.0) of the given shape.
fn write_npy(path: &Path, values: &[i64], shape: &[usize]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + newline is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

const LAUNCH: &str = r#"#!/usr/bin/env bash
# Launch the exported scalpel training job with torchrun (FSDP2). Needs PyTorch >= 2.6 and transformers.
#   one node:       ./launch.sh                      (all GPUs of this machine; NPROC=2 ./launch.sh for two)
#   several nodes:  NNODES=4 NODE_RANK=0 MASTER=host0:29500 ./launch.sh   (run on every node with its NODE_RANK)
#   CPU (gloo):     SCALPEL_DEVICE=cpu NPROC=2 ./launch.sh
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
if [ -n "${NNODES:-}" ]; then
  exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER:?set MASTER=host:port}" train.py
fi
exec torchrun --standalone --nproc-per-node "$NPROC" train.py
"#;

const README: &str = r#"# An exported scalpel training run

`scalpel train … --export DIR` wrote this folder: the same run as `scalpel train` would make, for PyTorch's
`torchrun` with FSDP2 (parameters sharded over all ranks, one unit per decoder block).

- `model/`: the starting model (an HF folder, float32).
- `data/`: the training tokens (`train.bin`, llm.c layout, or `rows.npy`) and `order.npy`, the window starts (or
  row ids) of every step and micro-batch, exactly as `scalpel train` draws them. Each rank takes an equal share of
  every batch, so the loss and the gradients are those of the whole batch.
- `job.json`: the settings (steps, batch, sequence length, AdamW, schedule, clipping, precision).
- `train.py`, `launch.sh`: the job and its launcher.

Run `./launch.sh` (see its header for several nodes, or CPU with gloo). The log (`out/log.jsonl`, the same keys
as `scalpel train`'s) and the trained model (`out/model`, an HF folder) are written under `out/` (or
`$SCALPEL_OUT`). Bring the model back for the next round of surgery: `scalpel analyze out/model …`,
`scalpel apply out/model …`.

When to use which engine: `scalpel train` for one machine (CPU or one GPU), with checkpoints that resume after
a kill; this export when a model or a budget needs several GPUs or nodes.
"#;
