//! Applying a plan: the resulting config and the resulting tensors, written once.
//!
//! Output block `j` takes every tensor of input block `plan.layers[j].from`, renamed. Tensors that
//! do not change are copied straight from the input's memory map. Index-dependent config fields
//! are carried as the architecture's data file says, or the plan is refused with the reason.

use crate::model::arch::Carry;
use crate::model::checkpoint::{kind_of, torch_dtype_name, Checkpoint};
use crate::model::write::OutTensor;
use anyhow::{bail, ensure, Context, Result};
use safetensors::Dtype;
use scalpel_sdk::{Edit, Plan};
use serde_json::Value;
use std::borrow::Cow;
use tch::{Kind, Tensor};

/// The config.json of the result, and warnings for the user.
pub fn resulting_config(ckpt: &Checkpoint, plan: &Plan, dtype: Option<Dtype>) -> Result<(Value, Vec<String>)> {
    plan.validate(ckpt.dims.layers)?;
    let mut config = ckpt.config.clone();
    let mut warnings = Vec::new();
    let sources = plan.sources();
    let moved = sources.iter().enumerate().any(|(j, &i)| i != j);
    config[&ckpt.arch.config.layers] = Value::from(sources.len());
    for dep in &ckpt.arch.index_dependent {
        let value = &ckpt.config[&dep.key];
        let active = dep.only_if.as_ref().is_none_or(|k| ckpt.config[k].as_bool() == Some(true)) && dep.unless.as_ref().is_none_or(|k| ckpt.config[k].is_null());
        if value.is_null() || !active {
            continue;
        }
        match dep.carry {
            Carry::RemapList => {
                let list = value.as_array().with_context(|| format!("config.json `{}` should be a list", dep.key))?;
                if list.len() != ckpt.dims.layers {
                    bail!("config.json `{}` has {} entries for {} layers", dep.key, list.len(), ckpt.dims.layers);
                }
                config[&dep.key] = Value::Array(sources.iter().map(|&i| list[i].clone()).collect());
            }
            Carry::FoldIntoQuery if value.as_bool() == Some(true) && moved => warnings.push(format!(
                "`{}` is on: every moved block's query projection is rescaled by (new index + 1) / (old index + 1), \
                 so each block keeps the attention scale it was trained with",
                dep.key
            )),
            Carry::FoldIntoQuery => {}
            Carry::Refuse if moved => bail!(
                "config.json `{}` = {value} makes blocks behave by their index, and scalpel cannot carry it \
                 through a plan that moves blocks; turn it off or keep blocks in place",
                dep.key
            ),
            Carry::Refuse => {}
        }
    }
    if let Some(d) = dtype {
        for key in ["torch_dtype", "dtype"] {
            if config.get(key).is_some() || key == "torch_dtype" {
                config[key] = Value::from(torch_dtype_name(d));
            }
        }
    }
    let (fresh, absent): (Vec<&String>, Vec<&String>) =
        plan.reinit.iter().partition(|r| r.as_str() != "position_embedding" || ckpt.arch.tensors.position_embedding.is_some());
    if !fresh.is_empty() {
        let fresh: Vec<&str> = fresh.iter().map(|r| r.as_str()).collect();
        warnings.push(format!("initialised afresh instead of inherited: {}", fresh.join(", ")));
    }
    if !absent.is_empty() {
        warnings.push(format!("`{}` models have no position embedding (rotary positions): nothing to re-initialise there", ckpt.arch.family));
    }
    Ok((config, warnings))
}

/// The tensors of the result, one at a time, in checkpoint order: globals, then blocks.
pub fn resulting_tensors<'c>(ckpt: &'c Checkpoint, plan: &'c Plan, dtype: Option<Dtype>, seed: u64) -> impl Iterator<Item = Result<OutTensor<'c>>> + 'c {
    let arch = ckpt.arch;
    let t = &arch.tensors;
    let reinit = |role: &str| plan.reinit.iter().any(|r| r == role);
    let all = reinit("all");
    let seed = if all { plan.seed } else { seed };
    let globals: Vec<(String, Fresh)> = ckpt
        .names()
        .filter(|n| arch.split_block_name(n).is_none())
        .map(|n| {
            let fresh = if all {
                Fresh::Family
            } else if reinit("final_norm") && t.final_norm.iter().any(|f| f == n) {
                if n.ends_with(".bias") { Fresh::Zeros } else { Fresh::Ones }
            } else if reinit("position_embedding") && t.position_embedding.as_deref() == Some(n) {
                Fresh::Normal(ckpt.config["initializer_range"].as_f64().unwrap_or(0.02))
            } else {
                Fresh::No
            };
            (n.to_string(), fresh)
        })
        .collect();
    let fold = arch.index_dependent.iter().any(|d| d.carry == Carry::FoldIntoQuery && ckpt.config[&d.key].as_bool() == Some(true));
    let d_model = ckpt.dims.d_model as i64;
    let blocks = plan.layers.iter().enumerate().flat_map(move |(j, src)| {
        let prefix = arch.block_prefix(src.from);
        ckpt.names().filter_map(move |n| Some((n, n.strip_prefix(prefix.as_str())?))).map(move |(n, inner)| {
            let zero = src.edits.contains(&Edit::ZeroOutput) && arch.tensors.output_projections.iter().any(|p| p == inner);
            let change = if all {
                Change::Fresh(seed)
            } else if zero {
                Change::Zero
            } else if fold && src.from != j && inner.starts_with("attn.c_attn.") {
                Change::ScaleQuery((j + 1) as f64 / (src.from + 1) as f64)
            } else {
                Change::None
            };
            (format!("{}{inner}", arch.block_prefix(j)), n.to_string(), change)
        })
    });
    let globals = globals.into_iter().map(move |(name, fresh)| emit_global(ckpt, name, fresh, dtype, seed));
    globals.chain(blocks.map(move |(out, src, change)| emit(ckpt, out, &src, change, dtype, d_model)))
}

enum Fresh {
    No,
    Ones,
    Zeros,
    Normal(f64),
    /// As transformers initialises the tensor in a new model of the family.
    Family,
}

enum Change {
    None,
    Zero,
    /// A fresh tensor of the family's initialisation (the plan's `reinit = ["all"]`), seeded by this.
    Fresh(u64),
    /// GPT-2: multiply the query third of c_attn (columns `..d_model` of the weight, and of the bias).
    ScaleQuery(f64),
}

fn emit_global(ckpt: &Checkpoint, name: String, fresh: Fresh, dtype: Option<Dtype>, seed: u64) -> Result<OutTensor<'_>> {
    let fill = |t: Tensor| -> Result<Tensor> {
        Ok(match fresh {
            Fresh::No => unreachable!(),
            Fresh::Ones => t.ones_like(),
            Fresh::Zeros => t.zeros_like(),
            Fresh::Normal(std) => {
                tch::manual_seed(seed as i64);
                t.to_kind(Kind::Float).randn_like() * std
            }
            Fresh::Family => fresh_tensor(ckpt, &name, &t, seed)?,
        })
    };
    match fresh {
        Fresh::No => emit(ckpt, name.clone(), &name, Change::None, dtype, 0),
        _ => {
            let t = fill(ckpt.tensor(&name)?)?;
            to_out(name.clone(), &t, converted(ckpt.entry(&name)?.dtype, dtype))
        }
    }
}

fn emit<'c>(ckpt: &'c Checkpoint, out: String, src: &str, change: Change, dtype: Option<Dtype>, d_model: i64) -> Result<OutTensor<'c>> {
    let stored = ckpt.entry(src)?;
    let target = converted(stored.dtype, dtype);
    if matches!(change, Change::None) && target == stored.dtype {
        return Ok(OutTensor { name: out, dtype: stored.dtype, shape: stored.shape.clone(), data: Cow::Borrowed(ckpt.bytes(src)?) });
    }
    let t = ckpt.tensor(src)?;
    let t = match change {
        Change::None => t,
        Change::Zero => t.zeros_like(),
        Change::Fresh(seed) => fresh_tensor(ckpt, &out, &t, seed)?,
        Change::ScaleQuery(s) => {
            let t = t.to_kind(Kind::Float);
            let q = t.narrow(-1, 0, d_model) * s;
            Tensor::cat(&[q, t.narrow(-1, d_model, t.size().last().unwrap() - d_model)], -1)
        }
    };
    to_out(out, &t, target)
}

/// A fresh tensor shaped like `like`, for the output tensor `name`: the family's initialisation, drawn from a
/// generator seeded by the seed and the name, so that every tensor is the same whatever the writing order.
fn fresh_tensor(ckpt: &Checkpoint, name: &str, like: &Tensor, seed: u64) -> Result<Tensor> {
    ensure!(like.is_floating_point(), "`{name}` is not a floating-point tensor: cannot initialise it afresh");
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    tch::manual_seed((seed ^ name_hash) as i64);
    Ok(crate::model::transformer::fresh_init(ckpt, name)?.fill(&like.to_kind(Kind::Float)))
}

/// `--dtype` changes floating-point weights only: integer and bool tensors (ids, masks) keep their type.
fn converted(stored: Dtype, asked: Option<Dtype>) -> Dtype {
    match asked {
        Some(d) if matches!(stored, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) => d,
        _ => stored,
    }
}

pub fn to_out(name: String, t: &Tensor, dtype: Dtype) -> Result<OutTensor<'static>> {
    let t = t.to_kind(kind_of(dtype)?).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.bitsize() / 8];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(OutTensor { name, dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data: Cow::Owned(bytes) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::write::{write_model, Folder};
    use crate::model::Transformer;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use tch::Device;

    fn data(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(name)
    }

    /// Applies `plan` to a tiny checkpoint, writes it, and opens the result.
    fn apply(name: &str, plan: &Plan, dir: &std::path::Path) -> Checkpoint {
        let ckpt = Checkpoint::open(&data(name)).unwrap();
        let (config, _) = resulting_config(&ckpt, plan, None).unwrap();
        let record = serde_json::json!({});
        let folder = Folder { config: &config, companions_from: Some(&ckpt.dir), extra_files: vec![], record: &record };
        let out = dir.join(name);
        write_model(&out, false, folder, resulting_tensors(&ckpt, plan, None, 0), usize::MAX).unwrap();
        Checkpoint::open(&out).unwrap()
    }

    fn golden_ids(name: &str) -> Tensor {
        let g: HashMap<String, Tensor> = Tensor::read_safetensors(data(name).join("golden.safetensors")).unwrap().into_iter().collect();
        g["input_ids"].shallow_clone()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn llama_pro_copies_with_zeroed_outputs_leave_the_function_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tiny-llama", "tiny-gpt2"] {
            let layers = Checkpoint::open(&data(name)).unwrap().dims.layers;
            let mut plan = Plan::ranges(&[0..2, 1..2, 2..layers]);
            plan.layers[2].edits.push(Edit::ZeroOutput);
            let grown = apply(name, &plan, dir.path());
            assert_eq!(grown.dims.layers, layers + 1);
            let ids = golden_ids(name);
            let before = Transformer::load(&Checkpoint::open(&data(name)).unwrap(), Device::Cpu, Kind::Float).unwrap().logits(&ids).unwrap();
            let after = Transformer::load(&grown, Device::Cpu, Kind::Float).unwrap().logits(&ids).unwrap();
            let d = max_diff(&before, &after);
            // GPT-2's inserted copy sits at index 2, not 1: folding keeps its scale, zeroing removes its output.
            assert!(d < 1e-5, "{name}: logits moved by {d}");
        }
    }

    #[test]
    fn a_moved_gpt2_block_keeps_its_attention_scale() {
        let dir = tempfile::tempdir().unwrap();
        // Input block 2 becomes output block 0: its logits were divided by 3, now by 1, so q is scaled by 1/3.
        let plan = Plan::ranges(&[2..3]);
        let moved = apply("tiny-gpt2", &plan, dir.path());
        let (a, b) = (
            Transformer::load(&Checkpoint::open(&data("tiny-gpt2")).unwrap(), Device::Cpu, Kind::Float).unwrap(),
            Transformer::load(&moved, Device::Cpu, Kind::Float).unwrap(),
        );
        let _guard = tch::no_grad_guard();
        let h = a.embed(&golden_ids("tiny-gpt2")).unwrap();
        let d = max_diff(&a.block(2, &h).unwrap(), &b.block(0, &h).unwrap());
        assert!(d < 1e-5, "the moved block computes something else: {d}");
        let d = max_diff(&a.attention(2, &h).unwrap(), &b.attention(0, &h).unwrap());
        assert!(d < 1e-6, "its attention changed by {d}");
    }

    #[test]
    fn sharded_output_reads_back_through_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(&data("tiny-llama")).unwrap();
        let plan = Plan::identity(ckpt.dims.layers);
        let (config, _) = resulting_config(&ckpt, &plan, None).unwrap();
        let record = serde_json::json!({});
        let folder = Folder { config: &config, companions_from: Some(&ckpt.dir), extra_files: vec![], record: &record };
        let out = dir.path().join("sharded");
        write_model(&out, false, folder, resulting_tensors(&ckpt, &plan, None, 0), 100_000).unwrap();
        assert!(out.join("model.safetensors.index.json").exists() && out.join("model-00001-of-00004.safetensors").exists());
        let back = Checkpoint::open(&out).unwrap();
        for name in ckpt.names() {
            assert_eq!(back.bytes(name).unwrap(), ckpt.bytes(name).unwrap(), "{name}");
        }
    }

    #[test]
    fn released_code_reinit_gives_fresh_final_norm_and_positions() {
        let dir = tempfile::tempdir().unwrap();
        let mut plan = Plan::ranges(&[0..2]);
        plan.reinit = vec!["final_norm".into(), "position_embedding".into()];
        let cut = apply("tiny-gpt2", &plan, dir.path());
        let w = cut.tensor("transformer.ln_f.weight").unwrap();
        assert_eq!(max_diff(&w, &w.ones_like()), 0.0);
        assert_eq!(cut.tensor("transformer.ln_f.bias").unwrap().abs().max().double_value(&[]), 0.0);
        let wpe = cut.tensor("transformer.wpe.weight").unwrap();
        let std = wpe.std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.003, "fresh positions ~ N(0, 0.02): std {std}");
        let old = Checkpoint::open(&data("tiny-gpt2")).unwrap().tensor("transformer.wpe.weight").unwrap();
        assert!(max_diff(&wpe, &old) > 0.01);
    }
}
