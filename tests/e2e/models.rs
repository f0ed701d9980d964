//! Looking at models, analyzing them, and what bad input gets.

use crate::{example_plugin, run, scalpel, tiny, token_ids_npy};
use std::path::{Path, PathBuf};

/// `scalpel analyze -a attn-rank` of a tiny model over a few windows, written to `dir/analysis`.
fn rank_analysis(dir: &Path, model: &str, vocab: usize) -> PathBuf {
    let ids = token_ids_npy(dir, 4, 10, vocab);
    let analysis = dir.join("analysis");
    run(scalpel().args(["analyze", "-a", "attn-rank"]).arg(tiny(model)).arg("--calib").arg(&ids).arg("-o").arg(&analysis)).success();
    analysis
}

#[test]
fn inspect_reads_the_shape_off_config_and_weights() {
    let out = run(scalpel().args(["inspect", "--json"]).arg(tiny("tiny-llama"))).success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((v["family"].as_str(), v["layers"].as_u64(), v["heads"].as_u64(), v["kv_heads"].as_u64()), (Some("llama"), Some(4), Some(6), Some(2)));
    assert_eq!(v["tied_embeddings"], false);
    let out = run(scalpel().args(["inspect", "--json"]).arg(tiny("tiny-gpt2"))).success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((v["family"].as_str(), v["tied_embeddings"].as_bool()), (Some("gpt2"), Some(true)));
}

#[test]
fn analyze_reports_every_layer_and_writes_reports_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 6, 12, 103);
    let out_dir = dir.path().join("analysis");
    let out = run(scalpel().arg("analyze").arg(tiny("tiny-llama")).arg("--calib").arg(&ids).arg("-o").arg(&out_dir)).success();
    // The per-layer table has a row per layer.
    for l in 0..4 {
        assert!(out.stdout.lines().any(|line| line.trim_start().starts_with(&format!("{l} "))), "no row for layer {l}:\n{}", out.stdout);
    }
    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("reports.json")).unwrap()).unwrap();
    for analyzer in ["attn-rank", "attn-mass", "attn-entropy"] {
        assert_eq!(reports[analyzer]["analyzer"], analyzer);
    }
    let ranks = reports["attn-rank"]["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "max_rank").unwrap();
    let ranks: Vec<f64> = ranks["per_layer"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(ranks.len(), 4);
    assert!(ranks.iter().all(|&r| (1.0..=12.0).contains(&r)), "k* lies in 1..=T: {ranks:?}");
    for f in ["profile.svg", "profile.png", "profile.csv", "attention.png", "recipe.toml", "record.json"] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
}

#[test]
fn a_bf16_analysis_says_so_and_its_recipe_runs_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 4, 10, 103);
    let first = dir.path().join("bf16");
    let out = run(scalpel().args(["analyze", "-a", "attn-rank", "--precision", "bf16"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids).arg("-o").arg(&first)).success();
    assert!(out.stdout.contains("forward pass in BFloat16"), "{}", out.stdout);
    let recipe = std::fs::read_to_string(first.join("recipe.toml")).unwrap();
    assert!(recipe.contains("precision = \"bf16\""), "{recipe}");
    let again = dir.path().join("again");
    run(scalpel().arg("run").arg(first.join("recipe.toml")).arg("-o").arg(&again)).success();
    let ranks = |d: &std::path::Path| std::fs::read_to_string(d.join("heads-max-rank.csv")).unwrap();
    assert_eq!(ranks(&first), ranks(&again));
    let out = run(scalpel().args(["analyze", "-a", "attn-rank", "--precision", "f16"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids)).failure();
    assert!(out.stderr.contains("f32") && out.stderr.contains("bf16"), "{}", out.stderr);
}

#[test]
fn a_recipe_runs_analyzers_and_strategies_into_one_output() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 4, 10, 103);
    let recipe = dir.path().join("r.toml");
    let text = format!(
        "model = {:?}\noutput = \"out\"\n[calibration]\nfile = {:?}\n\n[[step]]\nanalyzer = \"attn-rank\"\n\n[[step]]\nstrategy = \"stack\"\nconfig = {{ start = 2, times = 2 }}\n",
        tiny("tiny-llama"),
        ids
    );
    std::fs::write(&recipe, text).unwrap();
    let out = run(scalpel().arg("run").arg(&recipe)).success();
    assert!(out.stdout.contains("plan: 4 layers -> 6 layers"), "{}", out.stdout);
    let out_dir = dir.path().join("out"); // relative to the recipe's folder
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 6);
    assert!(out_dir.join("reports.json").exists() && out_dir.join("model/scalpel.json").exists());
}

#[test]
fn cutoff_reads_the_reports_of_an_earlier_analysis() {
    let dir = tempfile::tempdir().unwrap();
    let analysis = rank_analysis(dir.path(), "tiny-llama", 103);
    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(analysis.join("reports.json")).unwrap()).unwrap();
    let max_rank: Vec<f64> = reports["attn-rank"]["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "max_rank").unwrap()["per_layer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // With the last layer's value as the threshold, the trailing run is every final layer at or below it.
    let threshold = max_rank[3];
    let expected_keep = 4 - max_rank.iter().rev().take_while(|&&v| v <= threshold).count();
    let out = run(scalpel().args(["apply", "-s", "cutoff", "--dry-run", "--set"]).arg(format!("threshold={threshold}")).arg("--reports").arg(analysis.join("reports.json")).arg(tiny("tiny-llama")));
    if expected_keep == 0 {
        let out = out.failure();
        assert!(out.stderr.contains("fewer than min_keep"), "{}", out.stderr);
    } else {
        let out = out.success();
        assert!(out.stdout.contains(&format!("plan: 4 layers -> {expected_keep} layers")), "{}", out.stdout);
        assert!(out.stdout.contains("attn-rank.max_rank"), "the evidence is printed: {}", out.stdout);
    }
}

#[test]
fn attention_analyzers_need_calibration_data_weight_analyzers_do_not() {
    let out = run(scalpel().args(["analyze", "-a", "attn-rank"]).arg(tiny("tiny-llama"))).failure();
    assert!(out.stderr.contains("--calib"), "{}", out.stderr);
    let out = run(scalpel().arg("--plugins").arg(example_plugin()).args(["analyze", "-a", "weight-norms"]).arg(tiny("tiny-llama"))).success();
    assert!(out.stdout.contains("weight_norm"), "{}", out.stdout);
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 2, 8, 5000);
    let out = run(scalpel().arg("analyze").arg(tiny("tiny-llama")).arg("--calib").arg(&ids)).failure();
    assert!(out.stderr.contains("0..103"), "{}", out.stderr);
}

#[test]
fn a_missing_folder_a_missing_config_and_a_truncated_shard() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(scalpel().arg("inspect").arg(dir.path().join("nope"))).failure();
    assert!(out.stderr.contains("is not a folder"), "{}", out.stderr);
    let out = run(scalpel().arg("inspect").arg(dir.path())).failure();
    assert!(out.stderr.contains("no readable config.json"), "{}", out.stderr);
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::copy(tiny("tiny-llama").join("config.json"), broken.join("config.json")).unwrap();
    let weights = std::fs::read(tiny("tiny-llama").join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &weights[..weights.len() / 2]).unwrap();
    let out = run(scalpel().arg("inspect").arg(&broken)).failure();
    assert!(out.stderr.contains("model.safetensors") && out.stderr.contains("truncated or corrupt"), "{}", out.stderr);
}

#[test]
fn a_config_whose_layer_count_disagrees_with_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny("tiny-llama").join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 6.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(tiny("tiny-llama").join("model.safetensors"), model.join("model.safetensors")).unwrap();
    let out = run(scalpel().arg("inspect").arg(&model)).failure();
    assert!(out.stderr.contains("says 6 layers") && out.stderr.contains("layer 4"), "{}", out.stderr);
}

#[test]
fn a_panicking_analyzer_is_an_error_naming_plugin_and_item() {
    let dir = crate::plugin_dir(&[("panics", "panics")]);
    let calib = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(calib.path(), 2, 8, 103);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["analyze", "-a", "fixture-panic"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids)).failure();
    assert!(
        out.stderr.contains("analyzer `fixture-panic` (plugin scalpel-fixture-panics) failed") && out.stderr.contains("deliberate panic"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_libtorch_error_inside_a_strategy_is_an_error_naming_plugin_and_item() {
    let dir = crate::plugin_dir(&[("panics", "panics")]);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["apply", "-s", "fixture-torch-error", "--dry-run"]).arg(tiny("tiny-llama"))).failure();
    assert!(out.stderr.contains("strategy `fixture-torch-error` (plugin scalpel-fixture-panics) failed") && out.stderr.contains("mat"), "{}", out.stderr);
}

#[test]
fn an_unknown_setting_is_refused_before_any_work() {
    let out = run(scalpel().args(["apply", "-s", "stack", "--set", "tims=3", "--dry-run"]).arg(tiny("tiny-llama"))).failure();
    assert!(out.stderr.contains("unknown config key `tims`"), "{}", out.stderr);
}

#[test]
fn saved_reports_feed_a_strategy_that_writes_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let analysis = rank_analysis(dir.path(), "tiny-llama", 103);
    let out = dir.path().join("cut");
    let r = run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2", "--reports"]).arg(analysis.join("reports.json")).arg(tiny("tiny-llama")).arg("-o").arg(&out)).success();
    assert!(r.stdout.contains("plan: 4 layers -> 2 layers"), "{}", r.stdout);
    assert!(out.join("model/config.json").exists() && out.join("reports.json").exists() && out.join("profile.png").exists());
}

#[test]
fn reports_of_another_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let analysis = rank_analysis(dir.path(), "tiny-gpt2", 101);
    let r = run(scalpel().args(["apply", "-s", "cutoff", "--dry-run", "--reports"]).arg(analysis.join("reports.json")).arg(tiny("tiny-llama"))).failure();
    assert!(r.stderr.contains("does not describe") && r.stderr.contains("3 values"), "{}", r.stderr);
}

#[test]
fn an_output_that_holds_the_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny("tiny-llama").join(f), model.join(f)).unwrap();
    }
    for out in [model.clone(), dir.path().to_path_buf()] {
        let r = run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2", "--force"]).arg(&model).arg("-o").arg(&out)).failure();
        assert!(r.stderr.contains("holds the input model"), "{}", r.stderr);
        assert!(model.join("model.safetensors").exists(), "the input survives");
    }
}

#[test]
fn an_empty_calibration_tensor_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 0, 8, 103);
    let r = run(scalpel().arg("analyze").arg(tiny("tiny-llama")).arg("--calib").arg(&ids)).failure();
    assert!(r.stderr.contains("empty tensor"), "{}", r.stderr);
}

#[test]
fn the_new_families_go_through_analysis_and_surgery_unchanged() {
    for (model, vocab, layers) in [("tiny-qwen3", 109, 3), ("tiny-gemma3", 113, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let analysis = rank_analysis(dir.path(), model, vocab);
        let out = dir.path().join("stacked");
        let r = run(scalpel().args(["apply", "-s", "stack", "--set", "times=2", "--reports"]).arg(analysis.join("reports.json")).arg(tiny(model)).arg("-o").arg(&out)).success();
        assert!(r.stdout.contains(&format!("plan: {layers} layers -> ")), "{}", r.stdout);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap()).unwrap();
        let n = config["num_hidden_layers"].as_u64().unwrap() as usize;
        assert_eq!(config["layer_types"].as_array().map(Vec::len), Some(n), "{model}: one layer type per block");
        // The stacked model runs: its attention analysed over the same windows.
        run(scalpel().args(["analyze", "-a", "attn-rank"]).arg(out.join("model")).arg("--calib").arg(token_ids_npy(dir.path(), 4, 10, vocab)).arg("-o").arg(dir.path().join("again"))).success();
    }
}

/// Gemma 3's older configs give the layer pattern as a number: blocks may be cut, not moved.
#[test]
fn a_gemma3_layer_pattern_without_layer_types_refuses_moving_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny("tiny-gemma3").join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("layer_types");
    config["sliding_window_pattern"] = 2.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(tiny("tiny-gemma3").join("model.safetensors"), model.join("model.safetensors")).unwrap();
    let r = run(scalpel().args(["apply", "-s", "slices", "--set", "ranges=[[1,3],[0,1]]"]).arg(&model).arg("-o").arg(dir.path().join("moved"))).failure();
    assert!(r.stderr.contains("sliding_window_pattern"), "{}", r.stderr);
    run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=3"]).arg(&model).arg("-o").arg(dir.path().join("cut"))).success();
}
