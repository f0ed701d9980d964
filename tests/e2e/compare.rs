//! `scalpel compare` on a tiny model: every method of both plugin sets, analyzed once, evaluated on the same
//! windows, healed with the same budget, and a report that holds every number.

use crate::{repo, run, scalpel, tiny};
use serde_json::Value;
use std::path::Path;

fn recipe(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn compare_runs_every_method_on_the_same_windows_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipes = [
        recipe(d, "inheritune", "regime = \"retrain\"\n[[step]]\nstrategy = \"cutoff\"\nconfig = { keep = 2 }\n"),
        recipe(d, "shortgpt", "[[step]]\nstrategy = \"drop-layers\"\nconfig = { count = 2 }\n"),
        recipe(d, "ppl", "[[step]]\nstrategy = \"drop-layers\"\nconfig = { count = 2, metric = \"ppl-importance.ppl_importance\" }\n"),
        recipe(d, "prune-block", "[[step]]\nstrategy = \"prune-block\"\nconfig = { n = 2 }\n"),
        recipe(d, "scratch", "[[step]]\nstrategy = \"random-init\"\nconfig = { layers = 2 }\n"),
    ];
    let ids = repo().join("tests/data/depth-pruning/tiny-llama.ids.safetensors");
    let batches = repo().join("tests/data/train/tiny-llama-batches.safetensors");
    let out = d.join("cmp");
    let r = run(scalpel()
        .env("OMP_NUM_THREADS", "1")
        .arg("compare")
        .arg(tiny("tiny-llama"))
        .arg("--recipes")
        .args(&recipes)
        .args(["-a", "attn-rank", "-a", "angular-distance", "--eval-tokens", "32", "--eval-windows", "16", "--heal-steps", "3"])
        .args(["--heal-set", "batch=4", "--heal-set", "seq=32", "--heal-set", "warmup=0"])
        .arg("--eval")
        .arg(&batches)
        .arg("--calib")
        .arg(&ids)
        .arg("--data")
        .arg(&batches)
        .arg("-o")
        .arg(&out))
    .success();
    // Analyzed once: each analyzer, asked for or needed, runs one time.
    for analyzer in ["attn-rank", "angular-distance", "block-influence", "ppl-importance"] {
        assert_eq!(r.stderr.matches(&format!("analyzer {analyzer} done")).count(), 1, "{analyzer}: {}", r.stderr);
    }
    let c: Value = serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let methods = c["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 5);
    let by = |label: &str| methods.iter().find(|m| m["label"] == label).unwrap();
    assert_eq!(by("inheritune")["removed"], serde_json::json!([2, 3]));
    assert_eq!(by("inheritune")["regime"], "retrain");
    assert_eq!(by("shortgpt")["removed"], serde_json::json!([0, 1]), "the golden file's two lowest BI");
    assert_eq!(by("scratch")["regime"], "retrain", "a fresh model is judged after training");
    assert_eq!(by("prune-block")["regime"], "zero-shot");
    let reference = &c["reference"];
    assert_eq!(reference["layers"], 4);
    for m in methods {
        assert_eq!(m["layers"], 2, "{m}");
        assert!(m["params"].as_u64() < reference["params"].as_u64(), "{m}");
        assert!(m["flops_per_token"].as_f64() < reference["flops_per_token"].as_f64(), "{m}");
        let zero = m["zero_shot"]["loss"].as_f64().unwrap();
        let healed = &m["healed"];
        assert_eq!(healed["steps"], 3, "the same budget for every method: {m}");
        assert_eq!(healed["curve"].as_array().unwrap().len(), 3);
        assert!(zero.is_finite() && healed["eval"]["loss"].as_f64().unwrap().is_finite(), "{m}");
        // Every model it reports is written and opens.
        let model = out.join(m["model_dir"].as_str().unwrap());
        let info = run(scalpel().args(["inspect", "--json"]).arg(&model)).success();
        assert_eq!(serde_json::from_str::<Value>(&info.stdout).unwrap()["layers"], 2);
    }
    // The zero-shot loss of a kept prefix equals `eval` of the written model on the same windows.
    let eval = run(scalpel().env("OMP_NUM_THREADS", "1").args(["eval", "--json", "--tokens", "32", "--windows", "16", "--data"]).arg(&batches).arg(out.join("methods/inheritune/model"))).success();
    let eval: Value = serde_json::from_str(&eval.stdout).unwrap();
    let (a, b) = (eval["mean_nll"].as_f64().unwrap(), by("inheritune")["zero_shot"]["loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-6, "eval {a} vs compare {b}");
    // The report: a table, a page with the figures inline, and the figures.
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    for label in ["reference (input)", "inheritune", "shortgpt", "ppl", "prune-block", "scratch", "healed loss"] {
        assert!(md.contains(label), "{label} in compare.md:\n{md}");
    }
    let html = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("removed by shortgpt") && html.contains("<table>"), "self-contained HTML");
    for f in ["profile.svg", "profile.png", "healing.svg", "reports.json", "record.json", "methods/scratch/recipe.toml"] {
        assert!(out.join(f).exists(), "{f}");
    }
    assert!(r.stdout.contains("| shortgpt |"), "the table is printed: {}", r.stdout);
}

#[test]
fn compare_refuses_what_it_cannot_compare_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids = repo().join("tests/data/depth-pruning/tiny-llama.ids.safetensors");
    let out = d.join("cmp");
    let attempt = |recipes: &[std::path::PathBuf]| {
        run(scalpel().arg("compare").arg(tiny("tiny-llama")).arg("--recipes").args(recipes).arg("--eval").arg(&ids).arg("-o").arg(&out)).failure()
    };
    let analysis_only = recipe(d, "look", "[[step]]\nanalyzer = \"attn-rank\"\n");
    assert!(attempt(&[analysis_only]).stderr.contains("no strategy"));
    let a = recipe(d, "a", "[[step]]\nanalyzer = \"attn-rank\"\nconfig = { tau = 0.8 }\n[[step]]\nstrategy = \"cutoff\"\n");
    let b = recipe(d, "b", "[[step]]\nanalyzer = \"attn-rank\"\n[[step]]\nstrategy = \"cutoff\"\n");
    let e = attempt(&[a, b]).stderr;
    assert!(e.contains("different settings") && e.contains("attn-rank"), "{e}");
    let trains = recipe(d, "t", "[[step]]\nstrategy = \"cutoff\"\n[[step]]\ntrain = { steps = 1 }\n");
    assert!(attempt(&[trains]).stderr.contains("--heal-steps"));
    assert!(!out.exists(), "nothing written");
}

/// The golden training batches of tiny-llama: rows of 32 tokens.
fn batches() -> std::path::PathBuf {
    repo().join("tests/data/train/tiny-llama-batches.safetensors")
}

/// `scalpel compare` of tiny-llama cut to 2 layers (a recipe written into `dir`), evaluated on `batches()`, with
/// `args`, into `dir/cmp`.
fn compare_cut(dir: &Path, args: &[&str]) -> std::process::Command {
    let cutoff = recipe(dir, "cut", "[[step]]\nstrategy = \"cutoff\"\nconfig = { keep = 2 }\n");
    let mut cmd = scalpel();
    cmd.arg("compare").arg(tiny("tiny-llama")).arg("--recipes").arg(&cutoff).arg("--eval").arg(batches()).args(args).arg("-o").arg(dir.join("cmp"));
    cmd
}

#[test]
fn compare_names_its_own_options_for_windows_the_data_cannot_give() {
    // Too long for the data, compare's windows were refused naming train's --seq and eval's --tokens, flags
    // compare does not have: it takes them as --heal-set seq=N and --eval-tokens N.
    let dir = tempfile::tempdir().unwrap();
    let data = batches().display().to_string();
    let attempt = |args: &[&str]| run(&mut compare_cut(dir.path(), &[&["--data", &data][..], args].concat())).failure().stderr;
    // The rows are 32 tokens long; the model's context is 128.
    let e = attempt(&["--eval-tokens", "32", "--heal-steps", "1", "--heal-set", "seq=64"]);
    assert!(e.contains("shorter than windows of 64") && e.contains("set --heal-set seq to 32 or less") && !e.contains("--seq"), "{e}");
    let e = attempt(&["--eval-tokens", "32", "--heal-steps", "1", "--heal-set", "seq=200"]);
    assert!(e.contains("--heal-set seq=200 exceeds the model's context") && !e.contains("--seq"), "{e}");
    let e = attempt(&["--eval-tokens", "64", "--heal-steps", "1", "--heal-set", "seq=32"]);
    assert!(e.contains("set --eval-tokens to 32 or less") && !e.contains("--tokens,") && !e.contains("(train"), "{e}");
    assert!(!dir.path().join("cmp").exists(), "nothing written");
}

#[test]
fn healing_options_without_a_healing_budget_are_refused() {
    // --data and --heal-set without --heal-steps once ran a zero-shot comparison and dropped them without a word;
    // --heal-set steps=N was replaced by --heal-steps.
    let dir = tempfile::tempdir().unwrap();
    let data = batches().display().to_string();
    let attempt = |args: &[&str]| run(&mut compare_cut(dir.path(), &[&["--eval-tokens", "32"][..], args].concat())).failure().stderr;
    for args in [&["--data", &data][..], &["--heal-set", "lr=1e-4"]] {
        let e = attempt(args);
        assert!(e.contains("--heal-steps N") && e.contains(args[0]), "{args:?}: {e}");
    }
    let e = attempt(&["--data", &data, "--heal-steps", "2", "--heal-set", "steps=5"]);
    assert!(e.contains("--heal-set steps=N") && e.contains("--heal-steps N"), "{e}");
    assert!(!dir.path().join("cmp").exists(), "nothing written");
    // An explicit --heal-steps 0 is a zero-shot comparison with the healing set-up unused, as examples/compare/run.sh runs it.
    run(&mut compare_cut(dir.path(), &["--eval-tokens", "32", "--heal-steps", "0", "--data", &data, "--heal-set", "lr=1e-4"])).success();
}
