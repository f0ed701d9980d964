//! The safetensors header and data as `Checkpoint::open` reads a model folder's `model.safetensors`
//! (beside a fixed one-layer Llama config.json), and as calibration token ids (`read_token_ids`).
//! Whatever opens must load and run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalpel::model::Checkpoint;
use scalpel_fuzz::{fresh_dir, must_run, repo_file};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let dir = fresh_dir("safetensors");
    std::fs::copy(repo_file("host/fuzz/fixtures/tiny-llama/config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("model.safetensors"), data).unwrap();
    if let Ok(ckpt) = Checkpoint::open(&dir) {
        for name in ckpt.names().map(String::from).collect::<Vec<_>>() {
            let _ = ckpt.tensor(&name).unwrap_or_else(|e| panic!("tensor `{name}` is listed but unreadable: {e:#}"));
        }
        must_run(&ckpt, "model.safetensors");
    }
    if let Ok(ids) = scalpel::calib::token_ids_from_bytes(data, Path::new("ids.safetensors")) {
        assert_eq!(ids.dim(), 2);
        let _ = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
    }
});
