//! `scalpel inheritune`: rounds of cut-train-compare-grow on a tiny model, both growth readings, a
//! resume after `kill -9`, and the recipe form of the loop.

use crate::{repo, run, scalpel, tiny, token_file};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn batches() -> PathBuf {
    repo().join("tests/data/train/tiny-llama-batches.safetensors")
}

/// Inheritune from tiny-llama (4 layers) starting at 2, growing by 1, with an unreachable target so that
/// every round runs; `extra` flags last.
fn inheritune(out: &Path, steps: u64, extra: &[&str]) -> Command {
    let mut cmd = scalpel();
    cmd.env("OMP_NUM_THREADS", "1");
    cmd.arg("inheritune").arg("--reference").arg(tiny("tiny-llama")).arg("--data").arg(batches()).arg("--val").arg(batches());
    cmd.arg("-o").arg(out);
    for (flag, value) in [("--start", "2"), ("--grow", "1"), ("--max-rounds", "2"), ("--target", "0.01")] {
        if !extra.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(["--steps", &steps.to_string(), "--batch", "4", "--seq", "32", "--eval-windows", "8", "--lr", "3e-3", "--warmup", "0", "--shuffle", "false"]);
    cmd.args(extra);
    cmd
}

fn state(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("inheritune.json")).unwrap()).unwrap()
}

fn layers(model: &Path) -> u64 {
    let v: Value = serde_json::from_str(&run(scalpel().args(["inspect", "--json"]).arg(model)).success().stdout).unwrap();
    v["layers"].as_u64().unwrap()
}

fn eval(model: &Path) -> f64 {
    let out = run(scalpel().args(["eval", "--json", "--tokens", "32", "--windows", "8", "--data"]).arg(batches()).arg(model)).success();
    serde_json::from_str::<Value>(&out.stdout).unwrap()["mean_nll"].as_f64().unwrap()
}

fn log_losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("log.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
}

#[test]
fn restart_growth_trains_two_rounds_from_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let done = run(&mut inheritune(&out, 8, &[])).success();
    assert!(done.stdout.contains("| round |") && done.stdout.contains("Stopped:"), "{}", done.stdout);
    let s = state(&out);
    let rounds = s["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{s}");
    assert_eq!((rounds[0]["layers"].as_u64(), rounds[1]["layers"].as_u64()), (Some(2), Some(3)));
    assert!(s["reference_val_loss"].as_f64().unwrap().is_finite());
    assert!(s["stopped"].as_str().unwrap().contains("round limit"), "{s}");
    // restart: round 2 inherits the reference's first 3 blocks afresh, so it starts where a plain cut does.
    let cut = dir.path().join("cut");
    run(scalpel().arg("apply").arg(tiny("tiny-llama")).args(["-s", "cutoff", "--set", "keep=3", "-o"]).arg(&cut)).success();
    assert!((eval(&out.join("round-2/model")) - eval(&cut.join("model"))).abs() < 1e-6);
    for file in ["summary.md", "rounds.png", "rounds.svg", "rounds.csv", "round-1/train/loss.png", "round-2/train/model/config.json"] {
        assert!(out.join(file).exists(), "{file} is written");
    }
}

#[test]
fn warm_growth_with_zeroed_copies_continues_from_the_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&mut inheritune(&out, 8, &["--growth", "warm", "--grow-with", "duplicate", "--grow-set", "zero_copies=true"])).success();
    assert_eq!(layers(&out.join("round-2/model")), 3);
    // LLaMA Pro copies add nothing at insertion: the grown model computes what round 1 trained.
    let (trained, grown) = (eval(&out.join("round-1/train/model")), eval(&out.join("round-2/model")));
    assert!((trained - grown).abs() < 1e-5, "round 1 trained: {trained}, round 2 at insertion: {grown}");
}

#[test]
fn a_killed_loop_resumes_at_its_round_and_step() {
    const STEPS: u64 = 120;
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    run(&mut inheritune(&whole, STEPS, &["--save-every", "10"])).success();

    let cut = dir.path().join("cut");
    let mut child = inheritune(&cut, STEPS, &["--save-every", "10"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Killed while the second round trains.
    let log = cut.join("round-2/train/log.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline && std::fs::read_to_string(&log).map_or(0, |l| l.lines().count()) < 30 && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(state(&cut)["stopped"].is_null(), "killed before the loop finished");
    run(scalpel().env("OMP_NUM_THREADS", "1").arg("inheritune").arg("--resume").arg(&cut)).success();
    let (resumed, uninterrupted) = (state(&cut), state(&whole));
    for (a, b) in resumed["rounds"].as_array().unwrap().iter().zip(uninterrupted["rounds"].as_array().unwrap()) {
        for key in ["round", "layers", "steps", "tokens"] {
            assert_eq!(a[key], b[key], "{key}");
        }
        assert!((a["val_loss"].as_f64().unwrap() - b["val_loss"].as_f64().unwrap()).abs() < 1e-6);
    }
    for round in ["round-1", "round-2"] {
        let (a, b) = (log_losses(&cut.join(round).join("train")), log_losses(&whole.join(round).join("train")));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6), "{round}: resumed curve differs");
    }
}

#[test]
fn the_loop_is_a_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let printed = run(&mut inheritune(&out, 4, &["--print-recipe"])).success().stdout;
    assert!(printed.contains("[inheritune]"), "{printed}");
    let recipe = dir.path().join("loop.toml");
    std::fs::write(&recipe, printed).unwrap();
    run(scalpel().env("OMP_NUM_THREADS", "1").arg("run").arg(&recipe)).success();
    assert_eq!(state(&out)["rounds"].as_array().unwrap().len(), 2);
    // The example recipe parses and names the loop.
    let example = run(scalpel().arg("run").arg(repo().join("examples/recipes/inheritune-loop.toml")).arg("--model").arg(tiny("tiny-llama"))).failure();
    assert!(example.stderr.contains("data"), "without data the loop says what it needs: {}", example.stderr);
}

#[test]
fn warm_growth_stops_at_the_references_depth_and_a_moved_run_resumes_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // From 3 layers, growing by 2 would pass the reference's 4: the round grows by 1.
    run(&mut inheritune(&out, 4, &["--start", "3", "--grow", "2", "--growth", "warm"])).success();
    let s = state(&out);
    let layers: Vec<u64> = s["rounds"].as_array().unwrap().iter().map(|r| r["layers"].as_u64().unwrap()).collect();
    assert_eq!(layers, vec![3, 4], "{s}");
    // A finished run moved elsewhere resumes (and stays) there.
    let moved = dir.path().join("moved");
    std::fs::rename(&out, &moved).unwrap();
    run(scalpel().env("OMP_NUM_THREADS", "1").arg("inheritune").arg("--resume").arg(&moved)).success();
    assert!(!out.exists(), "resuming a moved run does not recreate the old folder");
}

#[test]
fn data_the_reference_cannot_train_on_is_refused_before_the_run_folder_exists() {
    // Once found only in round 1, inside a run folder the next run then refused without --force.
    let dir = tempfile::tempdir().unwrap();
    let foreign = token_file(&dir.path().join("foreign.bin"), &[60000; 64]);
    let short = token_file(&dir.path().join("short.bin"), &[1, 2, 3]);
    let out = dir.path().join("run");
    for (data, says) in [(&foreign, "token id 60000"), (&short, "fewer than one window of 32")] {
        let r = run(scalpel()
            .env("OMP_NUM_THREADS", "1")
            .arg("inheritune")
            .arg("--reference")
            .arg(tiny("tiny-llama"))
            .arg("--data")
            .arg(data)
            .arg("--val")
            .arg(batches())
            .arg("-o")
            .arg(&out)
            .args(["--start", "2", "--steps", "1", "--batch", "2", "--seq", "32"]))
        .failure();
        assert!(r.stderr.contains(says), "{}", r.stderr);
        assert!(!out.exists(), "nothing written");
    }
}

#[test]
fn what_the_loop_would_not_read_is_refused() {
    // --calib without --start auto, a recipe's calibration sampling and its dtype were all dropped without a word.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let calib = batches().display().to_string();
    let r = run(&mut inheritune(&out, 2, &["--calib", &calib])).failure();
    assert!(r.stderr.contains("--start auto") && r.stderr.contains("remove it"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
    let printed = run(&mut inheritune(&out, 2, &["--start", "auto", "--calib", &calib, "--print-recipe"])).success().stdout;
    assert!(printed.contains("[calibration]"), "{printed}");
    for (from, edit, says) in [("[calibration]", "[calibration]\nsequences = 8", "`sequences`"), ("bos = false", "bos = true", "`bos`"), ("bos = false", "bos = false\nprecision = \"bf16\"", "`precision`")] {
        assert!(printed.contains(from), "{printed}");
        let recipe = dir.path().join("loop.toml");
        std::fs::write(&recipe, printed.replacen(from, edit, 1)).unwrap();
        let r = run(scalpel().arg("run").arg(&recipe)).failure();
        assert!(r.stderr.contains(says) && r.stderr.contains("reads only the calibration's `file`"), "{edit}: {}", r.stderr);
    }
    let recipe = dir.path().join("loop.toml");
    std::fs::write(&recipe, format!("dtype = \"bf16\"\n{printed}")).unwrap();
    let r = run(scalpel().arg("run").arg(&recipe)).failure();
    assert!(r.stderr.contains("`dtype`") && r.stderr.contains("remove it"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
}
