//! The depth-pruning plugin set on real checkpoints: its analyzers against plain PyTorch on transformers'
//! forward pass (golden files from tests/golden/make_depth_pruning.py), and its strategies writing models
//! that open.

use crate::{repo, run, scalpel, tiny};
use std::path::{Path, PathBuf};

/// scalpel's forward pass is float32 like transformers'; the metrics are float64 from those states.
const TOLERANCE: f64 = 1e-5;

fn golden(model: &str) -> (serde_json::Value, PathBuf) {
    let dir = repo().join("tests/data/depth-pruning");
    let text = std::fs::read_to_string(dir.join(format!("{model}.json"))).expect("golden file (tests/golden/make_depth_pruning.py)");
    (serde_json::from_str(&text).unwrap(), dir.join(format!("{model}.ids.safetensors")))
}

/// `analyze` with both analyzers on the golden windows, written to `out`; its reports.json.
fn analyze(model: &str, out: &Path) -> serde_json::Value {
    let (_, ids) = golden(model);
    let r = run(scalpel()
        .args(["analyze", "-a", "block-influence", "-a", "angular-distance"])
        .arg(tiny(model))
        .arg("--calib")
        .arg(&ids)
        .arg("-o")
        .arg(out))
    .success();
    assert!(r.stdout.contains("bi") && r.stdout.contains("distance_n1"), "the profile shows both metrics: {}", r.stdout);
    serde_json::from_str(&std::fs::read_to_string(out.join("reports.json")).unwrap()).unwrap()
}

fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOLERANCE, "{what}[{i}]: scalpel {g}, PyTorch {w} (all: {got:?} vs {want:?})");
    }
}

fn same_as_pytorch(model: &str) {
    let dir = tempfile::tempdir().unwrap();
    let reports = analyze(model, &dir.path().join("out"));
    let (want, _) = golden(model);
    let bi = &reports["block-influence"]["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "bi").unwrap()["per_layer"];
    assert_close(&format!("{model} BI"), &numbers(bi), &numbers(&want["bi"]));
    let table = &reports["angular-distance"]["extra"];
    let rows = want["distance"].as_array().unwrap();
    assert_eq!(table["distance"].as_array().unwrap().len(), rows.len(), "{model}: one row per start layer");
    for (l, row) in rows.iter().enumerate() {
        assert_close(&format!("{model} d({l}, n)"), &numbers(&table["distance"][l]), &numbers(row));
    }
    for (got, want) in table["best"].as_array().unwrap().iter().zip(want["best"].as_array().unwrap()) {
        assert_eq!((&got["n"], &got["start"]), (&want["n"], &want["start"]), "{model}: best start");
    }
}

#[test]
fn block_influence_and_angular_distance_match_pytorch_on_llama() {
    same_as_pytorch("tiny-llama");
}

#[test]
fn block_influence_and_angular_distance_match_pytorch_on_gpt2() {
    same_as_pytorch("tiny-gpt2");
}

/// Applies a strategy with the analysis's reports, then checks the written model opens with the expected depth.
fn apply_opens(model: &str, strategy: &str, set: &str, layers: usize, evidence: &str) {
    let dir = tempfile::tempdir().unwrap();
    analyze(model, &dir.path().join("analysis"));
    let out = dir.path().join("cut");
    let r = run(scalpel()
        .args(["apply", "-s", strategy, "--set", set, "--reports"])
        .arg(dir.path().join("analysis/reports.json"))
        .arg(tiny(model))
        .arg("-o")
        .arg(&out))
    .success();
    assert!(r.stdout.contains(evidence), "the plan's evidence is printed: {}", r.stdout);
    let info = run(scalpel().args(["inspect", "--json"]).arg(out.join("model"))).success();
    let info: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(info["layers"], layers, "{}", info);
    // And it runs: the pruned model's own block influence, one value per remaining block.
    let (_, ids) = golden(model);
    let r = run(scalpel().args(["analyze", "-a", "block-influence", "--json"]).arg(out.join("model")).arg("--calib").arg(&ids)).success();
    let reports: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(numbers(&reports["block-influence"]["metrics"][0]["per_layer"]).len(), layers, "{}", r.stdout);
}

#[test]
fn drop_layers_by_block_influence_writes_a_model_that_opens() {
    // The golden file's two lowest BI on tiny-llama are blocks 0 and 1.
    apply_opens("tiny-llama", "drop-layers", "count=2", 2, "removed blocks [0, 1]");
}

#[test]
fn prune_block_by_angular_distance_writes_a_model_that_opens() {
    // The golden file's closest run of two blocks on tiny-gpt2 starts at block 1.
    apply_opens("tiny-gpt2", "prune-block", "n=2", 1, "removed blocks 1..3");
}

/// `ppl-importance` asks the host to run the model with one block skipped: the same losses as transformers
/// with that block taken out of the model.
fn ppl_importance_same_as_pytorch(model: &str) {
    let (want, ids) = golden(model);
    let r = run(scalpel().args(["analyze", "-a", "ppl-importance", "--json"]).arg(tiny(model)).arg("--calib").arg(&ids)).success();
    let reports: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let metrics = reports["ppl-importance"]["metrics"].as_array().unwrap();
    let get = |name: &str| numbers(&metrics.iter().find(|m| m["name"] == name).unwrap()["per_layer"]);
    let full = want["loss"].as_f64().unwrap();
    let importance = numbers(&want["ppl_importance"]);
    assert_close(&format!("{model} PPL importance"), &get("ppl_importance"), &importance);
    let without: Vec<f64> = importance.iter().map(|d| d + full).collect();
    assert_close(&format!("{model} loss without each block"), &get("loss_without"), &without);
}

#[test]
fn ppl_importance_matches_pytorch_on_llama() {
    ppl_importance_same_as_pytorch("tiny-llama");
}

#[test]
fn ppl_importance_matches_pytorch_on_gpt2() {
    ppl_importance_same_as_pytorch("tiny-gpt2");
}

#[test]
fn a_strategy_runs_the_analyzers_it_needs() {
    // drop-layers by BI with no report given: the host runs block-influence first, on the calibration windows.
    let dir = tempfile::tempdir().unwrap();
    let (_, ids) = golden("tiny-llama");
    let out = dir.path().join("cut");
    let r = run(scalpel().args(["apply", "-s", "drop-layers", "--set", "count=2"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids).arg("-o").arg(&out)).success();
    assert!(r.stderr.contains("block-influence (needed by drop-layers)"), "{}", r.stderr);
    assert!(r.stdout.contains("removed blocks [0, 1]"), "the same choice as from a saved report: {}", r.stdout);
    // Without calibration data the analyzer it needs cannot run, and the error says what to pass.
    let r = run(scalpel().args(["apply", "-s", "drop-layers", "--set", "count=2", "--dry-run"]).arg(tiny("tiny-llama"))).failure();
    assert!(r.stderr.contains("--calib"), "{}", r.stderr);
}

#[test]
fn random_init_writes_the_same_architecture_freshly_initialised() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, seed: u64| {
        let out = dir.path().join(name);
        run(scalpel().args(["apply", "-s", "random-init", "--set", "layers=3", "--set"]).arg(format!("seed={seed}")).arg(tiny("tiny-llama")).arg("-o").arg(&out)).success();
        std::fs::read(out.join("model/model.safetensors")).unwrap()
    };
    let (a, again, other) = (write("a", 1), write("again", 1), write("other", 2));
    assert_eq!(a, again, "the same seed writes the same weights");
    assert_ne!(a, other, "another seed writes other weights");
    let tensors = safetensors::SafeTensors::deserialize(&a).unwrap();
    let norm = tensors.tensor("model.layers.2.input_layernorm.weight").unwrap();
    assert!(norm.data().chunks(4).all(|b| f32::from_le_bytes(b.try_into().unwrap()) == 1.0), "norms start at one");
    let input_bytes = std::fs::read(tiny("tiny-llama").join("model.safetensors")).unwrap();
    let input = safetensors::SafeTensors::deserialize(&input_bytes).unwrap();
    let q = |t: &safetensors::SafeTensors, n: &str| t.tensor(n).unwrap().data().to_vec();
    assert_ne!(q(&tensors, "model.layers.0.self_attn.q_proj.weight"), q(&input, "model.layers.0.self_attn.q_proj.weight"), "nothing is inherited");
    // As transformers initialises: normal(0, initializer_range).
    let w: Vec<f32> = q(&tensors, "model.embed_tokens.weight").chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny("tiny-llama").join("config.json")).unwrap()).unwrap();
    let range = config["initializer_range"].as_f64().unwrap_or(0.02) as f32;
    assert!((std - range).abs() < 0.1 * range, "embedding std {std}, initializer_range {range}");
    let info = run(scalpel().args(["inspect", "--json"]).arg(dir.path().join("a/model"))).success();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&info.stdout).unwrap()["layers"], 3);
}

#[test]
fn a_later_strategy_reads_the_reports_through_the_layer_map() {
    // cutoff keeps blocks 0..3; drop-layers then sees BI of those three (0.092, 0.122, 0.200) and drops block 0.
    let dir = tempfile::tempdir().unwrap();
    let (_, ids) = golden("tiny-llama");
    let r = run(scalpel()
        .args(["apply", "-s", "cutoff", "-s", "drop-layers", "--set", "cutoff.keep=3", "--set", "drop-layers.count=1", "--dry-run"])
        .arg(tiny("tiny-llama"))
        .arg("--calib")
        .arg(&ids))
    .success();
    assert!(r.stdout.contains("removed blocks [0] (3 -> 2 layers)"), "{}", r.stdout);
    // Analyzers after a strategy would analyze a model that is not written: refused with the way out.
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[[step]]\nstrategy = \"cutoff\"\nconfig = { keep = 3 }\n[[step]]\nanalyzer = \"block-influence\"\n").unwrap();
    let r = run(scalpel().arg("run").arg(&recipe).arg("--model").arg(tiny("tiny-llama")).arg("--calib").arg(&ids).arg("--dry-run")).failure();
    assert!(r.stderr.contains("analyzes after a strategy") && r.stderr.contains("analyze DIR/model"), "{}", r.stderr);
}
