//! What the fuzz targets share: a scratch folder in memory, fixture paths, and the check that a
//! model scalpel accepted also runs.

use scalpel::model::{Checkpoint, Transformer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// One scratch folder per fuzzing process, in /dev/shm where there is one (targets write files
/// every run), removed when the process exits.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        scalpel_files::process_dir(&base.join("scalpel-fuzz")).expect("creating the fuzz scratch folder")
    })
}

/// A fresh empty folder `name` inside the scratch folder.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch folder");
    dir
}

/// A file of the repository (`host/fuzz/...` or `tests/data/...`), by its path from the repo root.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

/// A model `Checkpoint::open` accepted loads and runs a forward pass: anything else means the
/// checks at the door missed a disagreement that libtorch then trips over.
pub fn must_run(ckpt: &Checkpoint, what: &str) {
    let model = Transformer::load(ckpt, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{what}: opened, but does not load: {e:#}"));
    forward(&model, ckpt, what);
}

/// The forward pass over two tokens (fewer if the context is shorter), and block 0's explicit
/// attention (the analyzers' path), must succeed once a model loaded.
pub fn forward(model: &Transformer, ckpt: &Checkpoint, what: &str) {
    let _guard = tch::no_grad_guard();
    let t = ckpt.dims.context.min(2);
    let ids = Tensor::from_slice(&(0..t).map(|i| (i % ckpt.dims.vocab) as i64).collect::<Vec<_>>()).view([1, t as i64]);
    let logits = model.forward(&ids).unwrap_or_else(|e| panic!("{what}: loaded, but the forward pass fails: {e:#}"));
    assert_eq!(logits.size(), [1, t as i64, ckpt.dims.vocab as i64], "{what}: logits of the wrong shape");
    let h = model.embed(&ids).unwrap_or_else(|e| panic!("{what}: loaded, but the embedding fails: {e:#}"));
    let _ = model.attention(0, &h).unwrap_or_else(|e| panic!("{what}: loaded, but block 0's attention fails: {e:#}"));
    let _ = model.block(0, &h).unwrap_or_else(|e| panic!("{what}: loaded, but block 0 (explicit attention) fails: {e:#}"));
}
