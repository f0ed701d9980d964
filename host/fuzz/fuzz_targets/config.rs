//! `config.json`: `Checkpoint::open`'s dims and dtype checks, then the family's typed config
//! (`Transformer::load`). The weights are a fixed tiny model of the family the config names
//! (tests/data), so most configs disagree with them and must be refused by name; a config that
//! opens and loads must run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalpel::model::{Checkpoint, Transformer};
use scalpel_fuzz::{forward, fresh_dir, repo_file};

fuzz_target!(|data: &[u8]| {
    let config: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
    let model = match (config["model_type"].as_str(), config["tie_word_embeddings"].as_bool()) {
        (Some("gpt2"), _) => "tiny-gpt2",
        (Some("qwen2"), _) => "tiny-qwen2",
        (_, Some(true)) => "tiny-llama-tied",
        _ => "tiny-llama",
    };
    let dir = fresh_dir("config");
    std::fs::write(dir.join("config.json"), data).unwrap();
    std::os::unix::fs::symlink(repo_file(&format!("tests/data/{model}/model.safetensors")), dir.join("model.safetensors")).unwrap();
    let Ok(ckpt) = Checkpoint::open(&dir) else { return };
    // The family may still refuse a value it does not implement, by name; it must not panic.
    if let Ok(loaded) = Transformer::load(&ckpt, tch::Device::Cpu, tch::Kind::Float) {
        forward(&loaded, &ckpt, "config.json");
    }
});
