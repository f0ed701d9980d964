//! Applying strategies to real checkpoints: outputs compared tensor for tensor with mergekit's
//! passthrough merge (golden files from tests/golden/make_mergekit.py), and nothing half-written.

use crate::{repo, run, scalpel, tiny};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::Path;

/// name -> (dtype, shape, bytes) of every tensor in a model folder's single safetensors file.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (format!("{:?}", t.dtype()), t.shape().to_vec(), t.data().to_vec()))).collect()
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// scalpel's `slices` strategy on the case's model and ranges, written to a temp folder.
fn scalpel_slices(case: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let golden = repo().join("tests/data/mergekit").join(case);
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden.join("case.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(scalpel()
        .args(["apply", "-s", "slices", "--set"])
        .arg(format!("ranges={}", spec["ranges"]))
        .arg(tiny(spec["model"].as_str().unwrap()))
        .arg("-o")
        .arg(&out))
    .success();
    (dir, out.join("model"), golden)
}

/// Same tensors, byte for byte, and the same config but for what scalpel records about its output.
fn same_as_mergekit(case: &str) {
    let (_dir, ours, golden) = scalpel_slices(case);
    let (mine, theirs) = (tensors(&ours), tensors(&golden));
    assert_eq!(mine.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>(), "{case}: tensor names");
    for (name, t) in &theirs {
        assert!(mine[name] == *t, "{case}: tensor {name} differs from mergekit's");
    }
    assert_eq!(config(&ours), config(&golden), "{case}: config.json");
}

#[test]
fn llama_cut_matches_mergekit() {
    same_as_mergekit("llama-cut");
}

#[test]
fn llama_stack_matches_mergekit() {
    same_as_mergekit("llama-stack");
}

#[test]
fn llama_overlap_matches_mergekit() {
    same_as_mergekit("llama-overlap");
}

#[test]
fn gpt2_cut_matches_mergekit() {
    same_as_mergekit("gpt2-cut");
}

/// GPT-2 with `scale_attn_by_inverse_layer_idx`: mergekit copies moved blocks as they are, which
/// changes their attention scale; scalpel folds the scale into their query projection instead.
#[test]
fn gpt2_overlap_differs_from_mergekit_only_in_the_query_of_moved_blocks() {
    let (_dir, ours, golden) = scalpel_slices("gpt2-overlap");
    let (mine, theirs) = (tensors(&ours), tensors(&golden));
    assert_eq!(mine.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    // Output blocks 2 and 3 are input blocks 1 and 2: query scaled by (j+1)/(i+1) = 3/2 and 4/3.
    for (name, t) in &theirs {
        let moved = [("transformer.h.2.", 1.5f32), ("transformer.h.3.", 4.0 / 3.0)].into_iter().find(|(p, _)| name.starts_with(p));
        match moved {
            Some((_, scale)) if name.contains("attn.c_attn.") => {
                let f = |b: &[u8]| b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<f32>>();
                let (a, b) = (f(&mine[name].2), f(&t.2));
                let cols = *t.1.last().unwrap();
                for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                    let expect = if k % cols < cols / 3 { y * scale } else { *y };
                    assert!((x - expect).abs() <= 1e-6 * expect.abs().max(1.0), "{name}[{k}]: {x} vs {expect}");
                }
            }
            _ => assert!(mine[name] == *t, "{name} differs from mergekit's"),
        }
    }
}

#[test]
fn an_existing_output_is_not_replaced_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let r = run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2"]).arg(tiny("tiny-llama")).arg("-o").arg(&out)).failure();
    assert!(r.stderr.contains("already exists") && r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // Nothing else was left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // --force replaces an earlier output only, never a folder of someone's own files.
    let r = run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2", "--force"]).arg(tiny("tiny-llama")).arg("-o").arg(&out)).failure();
    assert!(r.stderr.contains("not an earlier output"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
}

#[test]
fn dry_run_prints_the_plan_and_config_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = run(scalpel().args(["apply", "-s", "duplicate", "--set", "overlap=1", "--dry-run"]).arg(tiny("tiny-llama")).arg("-o").arg(&out)).success();
    assert!(r.stdout.contains("plan: 4 layers -> 6 layers") && r.stdout.contains("0-2, 1-3") && r.stdout.contains("num_hidden_layers 4 -> 6"), "{}", r.stdout);
    assert!(!out.exists());
}

#[test]
fn print_recipe_gives_the_equivalent_recipe_which_runs_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let r = run(scalpel().args(["apply", "-s", "stack", "--set", "times=3", "--print-recipe"]).arg(tiny("tiny-llama"))).success();
    assert!(r.stdout.contains("strategy = \"stack\"") && r.stdout.contains("times = 3"), "{}", r.stdout);
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, &r.stdout).unwrap();
    let r = run(scalpel().arg("run").arg(&recipe).arg("--dry-run")).success();
    assert!(r.stdout.contains("plan: 4 layers -> 12 layers"), "{}", r.stdout);
}

#[test]
fn dtype_conversion_writes_bf16_and_says_so_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run(scalpel().args(["apply", "--dtype", "bf16"]).arg(tiny("tiny-llama")).arg("-o").arg(&out)).success();
    let t = tensors(&out.join("model"));
    assert!(t.values().all(|(d, _, _)| d == "BF16"));
    assert_eq!(config(&out.join("model"))["torch_dtype"], "bfloat16");
    // And it reads back.
    let r = run(scalpel().args(["inspect", "--json"]).arg(out.join("model"))).success();
    assert!(r.stdout.contains("\"dtype\": \"bf16\""), "{}", r.stdout);
}

#[test]
fn a_plan_that_keeps_no_layer_or_reaches_past_the_model_is_refused() {
    let r = run(scalpel().args(["apply", "-s", "slices", "--set", "ranges=[[2,9]]", "--dry-run"]).arg(tiny("tiny-llama"))).failure();
    assert!(r.stderr.contains("past the model's 4 layers"), "{}", r.stderr);
    let r = run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=0", "--dry-run"]).arg(tiny("tiny-llama"))).failure();
    assert!(r.stderr.contains("keep = 0 would leave no layer"), "{}", r.stderr);
}

#[test]
fn strategies_compose_each_seeing_the_model_the_previous_one_makes() {
    let r = run(scalpel()
        .args(["apply", "-s", "cutoff", "-s", "stack", "--set", "cutoff.keep=2", "--set", "stack.times=3", "--dry-run"])
        .arg(tiny("tiny-llama")))
    .success();
    // cutoff keeps 0-1 of 4; stack then repeats the 2 blocks it sees three times.
    assert!(r.stdout.contains("plan: 4 layers -> 6 layers") && r.stdout.contains("0-1, 0-1, 0-1"), "{}", r.stdout);
}
