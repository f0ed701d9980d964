//! GGUF: header, metadata, tensor table (`GgufFile::from_bytes`, what `open` runs on the map), the
//! dequantisation of every tensor, `scalpel inspect`, and for an importable file the whole
//! `scalpel import`: what it writes must open, load and run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalpel::gguf::GgufFile;
use scalpel::model::tokenizer::Tokenizer;
use scalpel::model::Checkpoint;
use scalpel_fuzz::{fresh_dir, must_run};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data) else { return };
    for t in file.tensors() {
        let _ = t.type_name();
        if let Ok(values) = file.dequantize(t) {
            assert_eq!(values.len(), t.shape.iter().product::<usize>(), "tensor `{}`: wrong number of values", t.name);
        }
    }
    let _ = file.architecture();
    let dir = fresh_dir("gguf");
    let (gguf, out) = (dir.join("in.gguf"), dir.join("out"));
    std::fs::write(&gguf, data).unwrap();
    // `scalpel inspect FILE.gguf --json` (its output goes to the closed stdout).
    scalpel::inspect::inspect_gguf(&gguf, true).expect("a file that parses can be inspected");
    if !file.import_problems().is_empty() {
        return;
    }
    if scalpel::import::import(&gguf, &out, scalpel::model::checkpoint::parse_dtype("f32").unwrap(), false).is_ok() {
        let ckpt = Checkpoint::open(&out).unwrap_or_else(|e| panic!("import wrote a model scalpel refuses: {e:#}"));
        must_run(&ckpt, "imported model");
        let tokenizer = Tokenizer::for_model(&out, &ckpt.arch.family).unwrap_or_else(|e| panic!("import wrote a tokenizer scalpel refuses: {e:#}"));
        let _ = tokenizer.encode("Hello world");
    }
});
