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
