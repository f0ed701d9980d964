//! The plugin author kit: `scalpel new-plugin` writes a crate that builds, passes its tests and loads outside the
//! workspace, and `scalpel_sdk::testing`'s model computes what the host computes.

use crate::{build_dir, repo, run, scalpel, tiny, token_ids_npy};
use std::path::Path;
use std::process::Command;

/// Runs cargo in `dir` on the generated crate, failing with its output.
///
/// The crate builds on its own (its `.cargo/config.toml` names libtorch, its `build.rs` adds the rpath). Only to
/// reuse what the workspace compiled does this pass the workspace's target folder, LIBTORCH and rustflags:
/// rustflags and LIBTORCH are part of each artifact's hash, so with the crate's own, every dependency
/// (torch-sys's C++ included) would be compiled again, minutes on two cores.
fn cargo(dir: &Path, args: &[&str]) {
    let config = std::fs::read_to_string(repo().join(".cargo/config.toml")).unwrap();
    let flags = config.lines().find_map(|l| l.strip_prefix("rustflags = ")).expect("the workspace's rustflags line");
    let flags: Vec<String> = serde_json::from_str(flags).expect("rustflags as a list of plain strings");
    let libtorch = std::env::var_os("LIBTORCH").unwrap_or_else(|| repo().join(".libtorch").into_os_string());
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(dir).args(args).arg("--offline");
    cmd.env("CARGO_TARGET_DIR", build_dir().parent().unwrap()).env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f")).env("LIBTORCH", libtorch);
    for var in ["RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "LD_LIBRARY_PATH", "CARGO_MANIFEST_DIR"] {
        cmd.env_remove(var);
    }
    let out = run(&mut cmd);
    assert!(out.ok, "cargo {args:?} in {} failed:\n{}\n{}", dir.display(), out.stdout, out.stderr);
    assert!(!out.stderr.contains("Compiling torch-sys"), "torch-sys was compiled again:\n{}", out.stderr);
}

#[test]
fn new_plugin_builds_tests_and_loads_outside_the_workspace() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!tmp.path().starts_with(repo()), "the temporary folder must be outside the workspace");
    let dir = tmp.path().join("my-plugin");
    let out = run(scalpel().args(["new-plugin", "e2e-demo"]).arg(&dir)).success();
    assert!(out.stdout.contains("wrote the plugin crate"), "{}", out.stdout);
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(!manifest.contains("workspace"), "a standalone crate inherits nothing: {manifest}");
    let again = run(scalpel().args(["new-plugin", "e2e-demo"]).arg(&dir)).failure();
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);

    cargo(&dir, &["test", "--release"]);
    cargo(&dir, &["build", "--release"]);
    // Out of the workspace's target/release at once: that folder is on the default plugin path.
    let built = build_dir().join("libscalpel_plugin_e2e_demo.so");
    let lib = tmp.path().join("libscalpel_plugin_e2e_demo.so");
    std::fs::rename(&built, &lib).unwrap_or_else(|e| panic!("{} was not built: {e}", built.display()));

    let out = run(scalpel().arg("--plugins").arg(&lib).args(["describe", "e2e-demo-update"])).success();
    assert!(out.stdout.contains("Relative update") && out.stdout.contains("last_token"), "{}", out.stdout);
    let ids = token_ids_npy(tmp.path(), 2, 16, 103);
    let analyzed = tmp.path().join("analyzed");
    run(scalpel().arg("--plugins").arg(&lib).args(["analyze", "-a", "e2e-demo-update"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids).arg("-o").arg(&analyzed))
        .success();
    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(analyzed.join("reports.json")).unwrap()).unwrap();
    let update = reports["e2e-demo-update"]["metrics"][0]["per_layer"].as_array().unwrap();
    assert!(update.len() == 4 && update.iter().all(|u| u.as_f64().unwrap() > 0.0), "one positive update per block of tiny-llama: {update:?}");
}

/// `TestModel::llama` written as a checkpoint and analyzed by the host gives the hidden states the test model
/// holds: its forward pass is the host's, so a plugin tested on it sees what it will see in scalpel.
#[test]
fn the_test_model_computes_what_the_host_computes() {
    use scalpel_sdk::testing::{Dims, TestModel};
    use scalpel_sdk::ModelSource;
    use tch::{Kind, Tensor};

    let dims = Dims::default();
    let model = TestModel::llama(dims);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let info = model.info();
    let weights: Vec<(String, Tensor)> = info.tensors.iter().map(|n| (n.clone(), model.tensor(n).unwrap())).collect();
    Tensor::write_safetensors(&weights, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
        "hidden_size": dims.d_model, "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.kv_heads, "intermediate_size": dims.intermediate, "vocab_size": dims.vocab,
        "max_position_embeddings": dims.tokens, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let ids = tmp.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", model.tokens().unwrap())], &ids).unwrap();
    let out = tmp.path().join("analyzed");
    run(scalpel().args(["analyze", "-a", "block-influence"]).arg(&dir).arg("--calib").arg(&ids).arg("-o").arg(&out)).success();
    let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("reports.json")).unwrap()).unwrap();
    let host: Vec<f64> = reports["block-influence"]["metrics"][0]["per_layer"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    // BI_l = 1 − mean cos(x_l, x_l+1) from the test model's own hidden states.
    let ours: Vec<f64> = (0..dims.layers)
        .map(|l| {
            let (x, y) = (model.hidden(l).unwrap().to_kind(Kind::Double), model.hidden(l + 1).unwrap().to_kind(Kind::Double));
            1.0 - Tensor::cosine_similarity(&x, &y, -1, 1e-12).mean(Kind::Double).double_value(&[])
        })
        .collect();
    assert!(host.iter().zip(&ours).all(|(h, o)| (h - o).abs() < 1e-5), "host {host:?} vs test model {ours:?}");
    assert!(ours.iter().all(|&b| b > 1e-3), "every block turns the stream: {ours:?}");
}
