//! End-to-end tests: the real `scalpel` binary, the real plugin libraries, real files.
//! Run `cargo xtask test` (it builds the binary and every plugin before the tests).

mod compare;
mod data;
mod depth_pruning;
mod gemma3;
mod hardening;
mod inheritune;
mod models;
mod kit;
mod plugins;
mod qwen25;
mod smollm2;
mod surgery;
mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/release`, where the binary, the plugins and the fixtures are built.
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // .../target/release/deps/e2e-x
    assert!(
        dir.join("scalpel").exists(),
        "{} has no scalpel binary: build the workspace first (`cargo xtask test` does)",
        dir.display()
    );
    dir
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A folder for what the tests of this run share (an imported model, say), named `name` inside it.
/// It is removed when the run exits, and, after a killed run, by the next one.
pub fn shared(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| scalpel_files::process_dir(&std::env::temp_dir().join("scalpel-e2e")).expect("making the shared test folder")).join(name)
}

pub fn scalpel() -> Command {
    let mut cmd = Command::new(build_dir().join("scalpel"));
    cmd.env_remove("SCALPEL_PLUGIN_PATH");
    cmd
}

/// The result of a command: its exit, stdout and stderr, for assertions with context.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output { status, stdout, stderr } = cmd.output().expect("scalpel runs");
    Run { ok: status.success(), stdout: String::from_utf8_lossy(&stdout).into(), stderr: String::from_utf8_lossy(&stderr).into() }
}

impl Run {
    pub fn success(self) -> Self {
        assert!(self.ok, "command failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
    pub fn failure(self) -> Self {
        assert!(!self.ok, "command succeeded but should not have\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

/// A fresh folder holding copies of built fixture libraries under plugin file names.
pub fn plugin_dir(fixtures: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (fixture, as_name) in fixtures {
        let from = build_dir().join(format!("libscalpel_fixture_{}.so", fixture.replace('-', "_")));
        assert!(from.exists(), "fixture {} is not built", from.display());
        std::fs::copy(&from, dir.path().join(format!("libscalpel_plugin_{as_name}.so"))).unwrap();
    }
    dir
}

/// The example plugin (examples/hello-plugin), which loads only when named: `--plugins FILE`.
pub fn example_plugin() -> PathBuf {
    let path = build_dir().join("libscalpel_example_hello.so");
    assert!(path.exists(), "the example plugin {} is not built", path.display());
    path
}

/// A tiny checkpoint made by transformers (tests/golden/make_golden.py).
pub fn tiny(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

/// Writes `ids` as an llm.c uint16 token file (a 256-int32 header: magic, version, count) at `path`.
pub fn token_file(path: &Path, ids: &[u16]) -> PathBuf {
    let mut bytes: Vec<u8> = [20240520i32, 1, ids.len() as i32].into_iter().chain([0; 253]).flat_map(i32::to_le_bytes).collect();
    bytes.extend(ids.iter().flat_map(|i| i.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// `[rows, cols]` int64 token ids as a `.npy` file, values cycling below `vocab`.
pub fn token_ids_npy(dir: &Path, rows: usize, cols: usize, vocab: usize) -> PathBuf {
    let header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let pad = 64 - (10 + header.len() + 1) % 64;
    let header = format!("{header}{}\n", " ".repeat(pad));
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for i in 0..rows * cols {
        bytes.extend((((i * 7 + i / cols * 3) % vocab) as i64).to_le_bytes());
    }
    let path = dir.join("ids.npy");
    std::fs::write(&path, bytes).unwrap();
    path
}
