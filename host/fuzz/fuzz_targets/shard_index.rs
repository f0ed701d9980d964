//! `model.safetensors.index.json` of a sharded model folder (a two-layer Llama in four fixed shards):
//! names that climb out of the folder, name folders or FIFOs, or miss a shard must be refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalpel::model::Checkpoint;
use scalpel_fuzz::{fresh_dir, must_run, repo_file};

fuzz_target!(|data: &[u8]| {
    let dir = fresh_dir("shard_index");
    for entry in std::fs::read_dir(repo_file("host/fuzz/fixtures/tiny-llama-sharded")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    if let Ok(ckpt) = Checkpoint::open(&dir) {
        assert!(ckpt.shard_paths().all(|p| p.starts_with(&dir)), "a shard outside the model folder was read");
        must_run(&ckpt, "sharded model");
    }
});
