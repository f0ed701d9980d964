//! `cargo xtask <command>`: everything a fresh machine needs, in one place.
//!
//! - `setup`  fetch libtorch 2.11.0 (slim: headers + the libraries a tch program needs) into the
//!            per-user cache and link it at `<repo>/.libtorch`, where `.cargo/config.toml` looks.
//! - `build`  setup, then a release build of the whole workspace (host, plugins, fixtures).
//! - `test`   build, then every test.
//! - `demo`   build, fetch a real model and text, and run scalpel's main job on them.
//! - `bench`  build, then time scalpel's analysis of SmolLM2 against two Python references (batched
//!            float32 SVD per layer; float64 SVD per matrix) in the same run; appends rows to BENCHMARKS.md.
//! - `bench-train` build, then time `scalpel train` (f32 and bf16) and `scalpel eval` against PyTorch eager
//!            on SmolLM2 in the same run; appends rows to BENCHMARKS.md.
//! - `fuzz [TARGET] [--seconds N]`  run the `cargo fuzz` targets of host/fuzz (all, or one) for N seconds
//!            each (default 600) under AddressSanitizer; prints a table row per target (needs nightly + cargo-fuzz).
//! - `dist`   build, then pack the host and the built-in plugin sets (never libtorch or examples) into `dist/`.
//!
//! Downloads go through pip and npm (the text through `scalpel data fetch`), the registries this project may reach; every file is
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
        "bench" => {
            build(&repo)?;
            bench(&repo)
        }
        "bench-train" => {
            build(&repo)?;
            bench_train(&repo)
        }
        "dist" => {
            build(&repo)?;
            dist(&repo)
        }
        "fuzz" => fuzz(&repo, rest),
        _ => {
            println!("usage: cargo xtask <setup|build|test|demo|bench|bench-train|fuzz|dist> [args]\n");
            println!("{}", include_str!("main.rs").lines().take(13).skip(2).map(|l| l.trim_start_matches("//! ")).collect::<Vec<_>>().join("\n"));
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
    cargo(repo, &["build", "--release", "--workspace", "--exclude", "xtask"])?;
    // A plugin library no built-in set makes any more (e.g. the example before it was renamed off the
    // plugin path) would still load beside the binary and clash: remove it.
    let builtin = builtin_plugins(repo)?;
    for entry in std::fs::read_dir(repo.join("target/release"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("libscalpel_plugin_") && name.ends_with(".so") && !builtin.contains(&name) {
            std::fs::remove_file(&path).with_context(|| format!("removing the stale plugin {}", path.display()))?;
            println!("removed {} (no built-in plugin set makes it now)", path.display());
        }
    }
    Ok(())
}

/// The file names of the built-in plugin sets, one per folder of `plugins/` (examples are not among them).
fn builtin_plugins(repo: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo.join("plugins"))? {
        let path = entry?.path();
        if path.join("Cargo.toml").exists() {
            let dir = path.file_name().unwrap_or_default().to_string_lossy().replace('-', "_");
            names.push(format!("libscalpel_plugin_{dir}.so"));
        }
    }
    names.sort();
    Ok(names)
}

fn test(repo: &Path, extra: &[String]) -> Result<()> {
    warn_if_temp_is_short();
    let mut args = vec!["test", "--release", "--workspace"];
    args.extend(extra.iter().map(String::as_str));
    cargo(repo, &args)
}

/// The end-to-end tests hold three imported models (1.8 GB) and each test's outputs in the temporary folder
/// at once. Short of that they fail one by one on "No space left on device": say so once, up front.
fn warn_if_temp_is_short() {
    const NEEDED: u64 = 4 << 30;
    let tmp = std::env::temp_dir();
    if let Ok(fs) = rustix::fs::statvfs(&tmp) {
        let free = fs.f_bavail * fs.f_frsize;
        if free < NEEDED {
            eprintln!(
                "xtask: warning: {} has {:.1} GB free; the end-to-end tests need about {} GB there: free some space or point TMPDIR elsewhere",
                tmp.display(),
                free as f64 / 1e9,
                NEEDED >> 30
            );
        }
    }
}

/// SmolLM2-135M as an HF folder under `runs/`, imported from its GGUF on first use.
fn smollm2_folder(repo: &Path) -> Result<PathBuf> {
    let model = repo.join("runs").join("smollm2-135m");
    if !model.exists() {
        let gguf = fetch::smollm2(&fetch::cache_dir()?)?;
        let mut import = Command::new(repo.join("target/release/scalpel"));
        import.arg("import").arg(&gguf).arg(&model);
        status(import)?;
    }
    Ok(model)
}

/// The main job on a real model: SmolLM2-135M imported from GGUF, analyzed on Brown-corpus windows,
/// profiled, plotted and cut. Extra arguments go to `scalpel run` (e.g. `--device cuda`).
fn demo(repo: &Path, extra: &[String]) -> Result<()> {
    let model = smollm2_folder(repo)?;
    let text = fetch::brown_corpus(&repo.join("target/release/scalpel"), &fetch::cache_dir()?)?;
    let mut run = Command::new(repo.join("target/release/scalpel"));
    run.arg("run").arg(repo.join("examples/recipes/inheritune.toml"));
    run.arg("--model").arg(&model).arg("--calib").arg(&text);
    run.arg("-o").arg(repo.join("runs/inheritune-smollm2")).arg("--force").args(extra);
    status(run)
}

/// scalpel's analysis (attn-rank + attn-mass, N = T = 100) against `scripts/bench_reference.py` on the same windows,
/// same machine, same run: the strong reference (transformers eager attention + one batched float32 `svdvals` per
/// layer) and the paper-style loop (one float64 `svdvals` per matrix). Each side's forward pass and metric stage
/// are timed apart; both must give the same per-head k* and m*. Appends two rows to BENCHMARKS.md.
fn bench(repo: &Path) -> Result<()> {
    let model = smollm2_folder(repo)?;
    let text = fetch::brown_corpus(&repo.join("target/release/scalpel"), &fetch::cache_dir()?)?;
    let out = repo.join("runs/bench");
    // First from the text, as a user runs it (this samples the windows, and its time includes tokenizing the
    // whole corpus); then the timed run from those very token ids, which is what the reference is given.
    let analyze = |calib: &Path, dir: &str| -> Result<(String, String, f64)> {
        let started = std::time::Instant::now();
        let mut analyze = Command::new(repo.join("target/release/scalpel"));
        analyze.arg("analyze").arg(&model).args(["-a", "attn-rank", "-a", "attn-mass", "-n", "100", "-t", "100", "--json", "--calib"]);
        analyze.arg(calib).arg("-o").arg(out.join(dir)).arg("--force");
        let (reports, log) = output_and_log(analyze)?;
        Ok((reports, log, started.elapsed().as_secs_f64()))
    };
    let (_, _, from_text_s) = analyze(&text, "scalpel-text")?;
    let windows = out.join("scalpel-text/calibration.safetensors");
    let (scalpel_out, log, scalpel_s) = analyze(&windows, "scalpel")?;
    eprintln!("xtask: scalpel from the text (tokenizing it included): {from_text_s:.1} s; from the token ids: {scalpel_s:.1} s");
    // The host's own timings: the forward pass, and each analyzer including the forward pass it triggered.
    let seconds = |line: &str| line.rsplit(' ').nth(1).and_then(|s| s.parse::<f64>().ok());
    let forward_s = log.lines().find(|l| l.starts_with("forward pass over")).and_then(seconds).context("scalpel printed no forward-pass time")?;
    let analyzers_s: f64 = log.lines().filter(|l| l.starts_with("analyzer ") && l.contains(" done in ")).filter_map(seconds).sum();
    let metrics_s = analyzers_s - forward_s;

    eprintln!("xtask: preparing the Python reference (tests/golden/setup_env.sh: torch 2.11 + transformers)");
    let mut setup = Command::new("bash");
    setup.arg(repo.join("tests/golden/setup_env.sh"));
    status(setup)?;
    let reports = json_value(&scalpel_out)?;
    let ours = |analyzer: &str, metric: &str| -> Vec<f64> {
        let metric = reports[analyzer]["metrics"].as_array().into_iter().flatten().find(|m| m["name"] == metric);
        metric.and_then(|m| m["per_head"].as_array()).into_iter().flatten().flat_map(|l| l.as_array().into_iter().flatten()).filter_map(|v| v.as_f64()).collect()
    };
    let machine = machine();
    let mut rows = Vec::new();
    let mut disagree = Vec::new();
    for (name, flag) in [("strong: batched f32 svdvals per layer", None), ("paper: f64 svdvals per matrix", Some("--loop"))] {
        let started = std::time::Instant::now();
        let mut reference = Command::new(python_env());
        reference.arg(repo.join("scripts/bench_reference.py")).arg(&model).arg(&windows).args(flag);
        let r = json_line(&output(reference)?)?;
        let reference_s = started.elapsed().as_secs_f64();
        let theirs = |key: &str| -> Vec<f64> { r[key].as_array().into_iter().flatten().flat_map(|l| l.as_array().into_iter().flatten()).filter_map(|v| v.as_f64()).collect() };
        let same = |a: &[f64], b: &[f64]| !a.is_empty() && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
        let agree = same(&ours("attn-rank", "max_rank"), &theirs("rank_per_head")) && same(&ours("attn-mass", "avg_mass"), &theirs("mass_per_head"));
        if !agree {
            disagree.push(name);
        }
        let (their_forward, their_metrics) = (r["forward_s"].as_f64().unwrap_or(f64::NAN), r["metrics_s"].as_f64().unwrap_or(f64::NAN));
        rows.push(format!(
            "| {} | {machine} | {name} | {scalpel_s:.1} / {forward_s:.1} / {metrics_s:.2} | {reference_s:.1} / {their_forward:.1} / {their_metrics:.2} | **{:.2}x** | **{:.1}x** | {} |",
            today(),
            reference_s / scalpel_s,
            their_metrics / metrics_s,
            if agree { "yes" } else { "NO" },
        ));
    }
    add_rows(repo, "<!-- analysis rows -->", &rows)?;
    if !disagree.is_empty() {
        bail!("scalpel and the reference ({}) disagree on per-head k* or m*: see {}", disagree.join(", "), out.display());
    }
    Ok(())
}

/// `scalpel train` against a PyTorch eager loop (SDPA, fused AdamW) on SmolLM2 cut to 15 layers, batch 8 × 100
/// tokens, the same windows in the same order, f32 and bf16 autocast; and `scalpel eval` against transformers
/// on 8 windows of 512 tokens of the full model. Same machine, same run, same threads; ratios go to BENCHMARKS.md.
fn bench_train(repo: &Path) -> Result<()> {
    const STEPS: usize = 12;
    let model = smollm2_folder(repo)?;
    let out = repo.join("runs/bench-train");
    let scalpel = |args: &[&str]| -> Result<String> {
        let mut cmd = Command::new(repo.join("target/release/scalpel"));
        cmd.args(args);
        output(cmd)
    };
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let cut = out.join("smollm2-cut15/model");
    if !cut.exists() {
        scalpel(&["apply", &path(&model), "-s", "cutoff", "--set", "keep=15", "-o", &path(&out.join("smollm2-cut15")), "--force"])?;
    }
    let data = out.join("brown");
    if !data.exists() {
        scalpel(&["data", "fetch", "brown"])?;
        scalpel(&["data", "tokenize", "brown", "--tokenizer", &path(&model), "-o", &path(&data)])?;
    }
    let mut setup = Command::new("bash");
    setup.arg(repo.join("tests/golden/setup_env.sh"));
    status(setup)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
    let python = |args: &[&str]| -> Result<serde_json::Value> {
        let mut cmd = Command::new(python_env());
        cmd.arg(repo.join("scripts/bench_train.py")).args(args).args(["--threads", &threads]);
        json_line(&output(cmd)?)
    };
    let machine = machine();
    let mut rows = Vec::new();
    // bf16 matrix products are fast only where the CPU has bf16 instructions; elsewhere both sides fall back to a
    // scalar kernel (about 8x slower than f32 here), and the row would time that fallback, not the trainers.
    let bf16_hardware = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("avx512_bf16") || c.contains("amx_bf16"));
    let precisions: &[&str] = if bf16_hardware { &["f32", "bf16"] } else { &["f32"] };
    if !bf16_hardware {
        eprintln!("xtask: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16): the bf16 row is skipped");
    }
    for &precision in precisions {
        let run = out.join(format!("train-{precision}"));
        let steps = STEPS.to_string();
        scalpel(&[
            "train", &path(&cut), "--data", &path(&data), "-o", &path(&run), "--force", "--shuffle", "false", "--steps", &steps,
            "--batch", "8", "--seq", "100", "--schedule", "constant", "--warmup", "0", "--dtype", precision,
        ])?;
        let log: Vec<serde_json::Value> =
            std::fs::read_to_string(run.join("log.jsonl"))?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        // The same steps as the peer times: all but the first two.
        let at = |i: usize, key: &str| log[i][key].as_f64().unwrap_or(0.0);
        let ours = (at(STEPS - 1, "tokens") - at(1, "tokens")) / (at(STEPS - 1, "elapsed_s") - at(1, "elapsed_s"));
        let (cut_s, bin_s) = (path(&cut), path(&data.join("train.bin")));
        let mut args = vec!["train", cut_s.as_str(), bin_s.as_str(), "--batch", "8", "--seq", "100", "--steps", steps.as_str()];
        if precision == "bf16" {
            args.push("--bf16");
        }
        let peer = python(&args)?;
        let theirs = peer["tokens_per_s"].as_f64().unwrap_or(0.0);
        let worst = peer["loss"].as_array().into_iter().flatten().zip(&log).map(|(p, s)| (p.as_f64().unwrap_or(0.0) - s["loss"].as_f64().unwrap_or(0.0)).abs()).fold(0.0, f64::max);
        rows.push(format!(
            "| {} | {machine} | train, SmolLM2 cut to 15 layers, 8 × 100 tokens, {precision} | {ours:.0} tok/s | {theirs:.0} tok/s | **{:.2}x** | {worst:.1e} |",
            today(),
            ours / theirs
        ));
    }
    let started = std::time::Instant::now();
    let nll = json_value(&scalpel(&["eval", "--json", "--tokens", "512", "--windows", "8", "--data", &path(&data), &path(&model)])?)?;
    let ours = started.elapsed().as_secs_f64();
    let peer = python(&["eval", &path(&model), &path(&data.join("val.bin")), "--seq", "512", "--windows", "8"])?;
    let theirs = peer["wall_s"].as_f64().unwrap_or(0.0);
    let diff = (nll["mean_nll"].as_f64().unwrap_or(0.0) - peer["mean_nll"].as_f64().unwrap_or(0.0)).abs();
    rows.push(format!("| {} | {machine} | eval, SmolLM2, 8 × 512 tokens, f32 (wall, with load) | {ours:.1} s | {theirs:.1} s | **{:.2}x** | {diff:.1e} |", today(), theirs / ours));
    add_rows(repo, "<!-- train rows -->", &rows)
}

/// Puts `rows` into BENCHMARKS.md above the `marker` line that ends their table, and prints them.
fn add_rows(repo: &Path, marker: &str, rows: &[String]) -> Result<()> {
    let file = repo.join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&file).context("BENCHMARKS.md is missing")?;
    if !text.contains(marker) {
        bail!("BENCHMARKS.md has no `{marker}` line under the table its rows go to");
    }
    scalpel_files::write_file(&file, text.replace(marker, &format!("{}\n{marker}", rows.join("\n"))).as_bytes())?;
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn python_env() -> PathBuf {
    let venv = std::env::var_os("SCALPEL_PYENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/scalpel/pyenv")
    });
    venv.join("bin/python")
}

fn output(mut cmd: Command) -> Result<String> {
    cmd.stderr(std::process::Stdio::inherit());
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{:?} failed ({})", cmd.get_program(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program's standard output, and its standard error (passed on once it ends).
fn output_and_log(mut cmd: Command) -> Result<(String, String)> {
    let out = cmd.output().with_context(|| format!("could not start {cmd:?}"))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    eprint!("{log}");
    if !out.status.success() {
        bail!("{:?} failed ({})", cmd.get_program(), out.status);
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), log))
}

/// The last line of a program's output that parses as JSON.
fn json_line(text: &str) -> Result<serde_json::Value> {
    text.lines().rev().find_map(|l| serde_json::from_str(l).ok()).context("no JSON line in the output")
}

/// The first JSON document in a program's output (a pretty-printed one spans lines).
fn json_value(text: &str) -> Result<serde_json::Value> {
    let start = text.find('{').context("no JSON in the output")?;
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
    Ok(stream.next().context("no JSON in the output")??)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{cpu}, {cores} cores")
}

fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output().ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn dist(repo: &Path) -> Result<()> {
    let out = repo.join("dist");
    // dist/ is the xtask's own build product: replacing whatever is there is right.
    let staged = scalpel_files::StagedDir::new(&out, scalpel_files::Replace::Always)?;
    let tmp = staged.path();
    std::fs::create_dir_all(tmp.join("plugins"))?;
    let release = repo.join("target/release");
    for bin in ["scalpel", "bench-metrics"] {
        std::fs::copy(release.join(bin), tmp.join(bin))?;
    }
    // The built-in sets only: examples load when asked for and never ship.
    for name in builtin_plugins(repo)? {
        std::fs::copy(release.join(&name), tmp.join("plugins").join(&name)).with_context(|| format!("packing {name}"))?;
    }
    staged.commit()?;
    println!("packed {} (point LD_LIBRARY_PATH at a PyTorch 2.11 install's torch/lib to run it)", out.display());
    Ok(())
}

/// The fuzz targets, as `host/fuzz/Cargo.toml` names them.
const FUZZ_TARGETS: &[&str] = &["safetensors", "shard_index", "config", "gguf", "npy", "recipe"];

/// Runs each fuzz target for `--seconds` (default 600), the way the recorded runs were made: the
/// committed seeds and past crash inputs as read-only corpora, new inputs in `host/fuzz/work/TARGET`
/// (not committed), 2 GB RSS and 10 s per input at most. A crash stops with libFuzzer's report and
/// the input under `host/fuzz/artifacts/TARGET/`.
fn fuzz(repo: &Path, args: &[String]) -> Result<()> {
    let mut seconds = 600u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => seconds = it.next().and_then(|n| n.parse().ok()).context("--seconds takes a whole number")?,
            t if FUZZ_TARGETS.contains(&t) => targets.push(t),
            other => bail!("unknown fuzz target or option `{other}` (targets: {}; option: --seconds N)", FUZZ_TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    let found = Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args(["+nightly", "fuzz", "--version"]).output();
    if !found.is_ok_and(|o| o.status.success()) {
        bail!("`cargo +nightly fuzz` is not available: `rustup toolchain install nightly` and `cargo install cargo-fuzz`");
    }
    // The build must see the same LIBTORCH string as before, or torch-sys rebuilds: an exported one wins.
    let libtorch = std::env::var_os("LIBTORCH").map(PathBuf::from).unwrap_or_else(|| repo.join(".libtorch"));
    if !libtorch.join("lib").is_dir() {
        bail!("no libtorch at {}: run `cargo xtask setup` or export LIBTORCH", libtorch.display());
    }
    let dir = repo.join("host/fuzz");
    let mut rows = Vec::new();
    for target in targets {
        let work = dir.join("work").join(target);
        std::fs::create_dir_all(&work)?;
        let log = dir.join("work").join(format!("{target}.log"));
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir).args(["+nightly", "fuzz", "run", target]).arg(&work).arg(dir.join("corpus").join(target));
        if dir.join("regressions").join(target).is_dir() {
            cmd.arg(dir.join("regressions").join(target));
        }
        cmd.arg("--").arg(format!("-max_total_time={seconds}")).args(["-rss_limit_mb=2048", "-timeout=10", "-close_fd_mask=1", "-print_final_stats=1"]);
        // `cargo xtask` runs under the stable toolchain's environment; the nightly one must win.
        cmd.env_remove("RUSTUP_TOOLCHAIN");
        // cargo fuzz's RUSTFLAGS replace the rpath of .cargo/config.toml: libtorch is found through the environment.
        cmd.env("LIBTORCH", &libtorch).env("LD_LIBRARY_PATH", prepend_path(&libtorch.join("lib"), "LD_LIBRARY_PATH"));
        let file = std::fs::File::create(&log)?;
        cmd.stdout(file.try_clone()?).stderr(file);
        println!("fuzzing {target} for {seconds} s (log: {})", log.display());
        let st = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let stat = |key: &str| text.lines().find_map(|l| l.strip_prefix(&format!("stat::{key}:"))).map_or("?".into(), |v| v.trim().to_string());
        let corpus = std::fs::read_dir(&work)?.count();
        let result = if st.success() {
            "no crash, hang, OOM or ASan report".to_string()
        } else {
            let artifact = text.lines().find(|l| l.contains("Test unit written to")).unwrap_or("no artifact line").trim().to_string();
            format!("FAILED ({st}): {artifact}")
        };
        rows.push(format!("| {} | {} | {target} | {seconds} s | {} | {corpus} new inputs | {result} |", today(), machine(), stat("number_of_executed_units")));
    }
    println!("\n| date | machine | target | duration | executions | corpus | result |\n|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    if rows.iter().any(|r| r.contains("FAILED")) {
        bail!("a fuzz target failed: see its log and artifact above");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dist_packs_the_builtin_sets_and_never_an_example() {
        let names = builtin_plugins(&repo_root()).unwrap();
        for set in ["libscalpel_plugin_depth_pruning.so", "libscalpel_plugin_inheritune.so"] {
            assert!(names.iter().any(|n| n == set), "{set} missing from {names:?}");
        }
        assert!(names.iter().all(|n| !n.contains("example") && !n.contains("hello")), "{names:?}");
        // The example's library name keeps it off the plugin path, and so out of `dist/plugins`.
        let example = std::fs::read_to_string(repo_root().join("examples/hello-plugin/Cargo.toml")).unwrap();
        assert!(example.contains("name = \"scalpel_example_hello\""), "{example}");
    }
}
