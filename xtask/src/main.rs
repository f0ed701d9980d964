//! `cargo xtask <command>`: everything a fresh machine needs, in one place.
//!
//! - `setup`  fetch libtorch 2.11.0 (slim: headers + the libraries a tch program needs) into the
//!            per-user cache and link it at `<repo>/.libtorch`, where `.cargo/config.toml` looks.
//! - `build`  setup, then a release build of the whole workspace (host, plugins, fixtures).
//! - `test`   build, then every test.
//! - `demo`   build, fetch a real model and text, and run scalpel's main job on them.
//! - `dist`   build, then pack the host and plugins (never libtorch) into `dist/` for a GPU machine.
//!
//! Downloads go through pip and npm, the registries this project may reach; every file is
//! checked against a pinned sha256 before use.

use xtask::fetch;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args.split_first().map(|(c, r)| (c.as_str(), r)).unwrap_or(("help", &[]));
    let repo = repo_root();
    match cmd {
        "setup" => setup(&repo).map(|_| ()),
        "build" => build(&repo),
        "test" => {
            build(&repo)?;
            test(&repo, rest)
        }
        "demo" => {
            build(&repo)?;
            demo(&repo, rest)
        }
        "dist" => {
            build(&repo)?;
            dist(&repo)
        }
        _ => {
            println!("usage: cargo xtask <setup|build|test|demo|dist> [args]\n");
            println!("{}", include_str!("main.rs").lines().take(9).skip(2).map(|l| l.trim_start_matches("//! ")).collect::<Vec<_>>().join("\n"));
            Ok(())
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repo").to_path_buf()
}

/// Makes `<repo>/.libtorch` point at a libtorch 2.11.0 and returns its path.
fn setup(repo: &Path) -> Result<PathBuf> {
    let libtorch = match std::env::var_os("LIBTORCH").map(PathBuf::from) {
        // An explicit LIBTORCH that is not our own link: use it as is, after a version check.
        Some(dir) if dir.canonicalize().ok() != repo.join(".libtorch").canonicalize().ok() && dir.is_absolute() => {
            fetch::check_libtorch(&dir).with_context(|| format!("LIBTORCH={} is not usable", dir.display()))?;
            dir
        }
        _ => fetch::libtorch(&fetch::cache_dir()?)?,
    };
    let link = repo.join(".libtorch");
    if std::fs::read_link(&link).ok().as_deref() != Some(libtorch.as_path()) {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link).with_context(|| format!("replacing {}", link.display()))?;
        }
        std::os::unix::fs::symlink(&libtorch, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libtorch.display()))?;
    }
    Ok(libtorch)
}

fn build(repo: &Path) -> Result<()> {
    setup(repo)?;
    cargo(repo, &["build", "--release", "--workspace", "--exclude", "xtask"])
}

fn test(repo: &Path, extra: &[String]) -> Result<()> {
    let mut args = vec!["test", "--release", "--workspace", "--exclude", "xtask"];
    args.extend(extra.iter().map(String::as_str));
    cargo(repo, &args)
}

/// The main job on a real model: SmolLM2-135M imported from GGUF, analyzed on Brown-corpus windows,
/// profiled, plotted and cut. Extra arguments go to `scalpel run` (e.g. `--device cuda`).
fn demo(repo: &Path, extra: &[String]) -> Result<()> {
    let cache = fetch::cache_dir()?;
    let gguf = fetch::smollm2(&cache)?;
    let text = fetch::brown_corpus(&cache)?;
    let scalpel = repo.join("target/release/scalpel");
    let runs = repo.join("runs");
    let model = runs.join("smollm2-135m");
    if !model.exists() {
        let mut import = Command::new(&scalpel);
        import.arg("import").arg(&gguf).arg(&model);
        status(import)?;
    }
    let mut run = Command::new(&scalpel);
    run.arg("run").arg(repo.join("examples/recipes/inheritune.toml"));
    run.arg("--model").arg(&model).arg("--calib").arg(&text);
    run.arg("-o").arg(runs.join("inheritune-smollm2")).arg("--force").args(extra);
    status(run)
}

fn dist(repo: &Path) -> Result<()> {
    let out = repo.join("dist");
    let tmp = repo.join("dist.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("plugins"))?;
    let release = repo.join("target/release");
    std::fs::copy(release.join("scalpel"), tmp.join("scalpel"))?;
    for entry in std::fs::read_dir(&release)? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("libscalpel_plugin_") && name.ends_with(".so") && !name.contains("broken") {
            std::fs::copy(&path, tmp.join("plugins").join(&name))?;
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&tmp, &out)?;
    println!("packed {} (point LD_LIBRARY_PATH at a PyTorch 2.11 install's torch/lib to run it)", out.display());
    Ok(())
}

fn cargo(repo: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(repo).args(args);
    // Doctests run from a temporary folder, out of reach of the $ORIGIN rpath.
    cmd.env("LD_LIBRARY_PATH", prepend_path(&repo.join(".libtorch/lib"), "LD_LIBRARY_PATH"));
    status(cmd)
}

fn prepend_path(dir: &Path, var: &str) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os(var) {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).expect("paths without ':'")
}

fn status(mut cmd: Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !st.success() {
        bail!("{:?} failed ({st})", cmd.get_program());
    }
    Ok(())
}
