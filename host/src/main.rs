//! `scalpel`: the host program. It loads analyzers and strategies as plugins and applies them to
//! models, and trains what surgery makes. `cli` turns arguments into a `Job`; `run` below is the one
//! place that dispatches it. The modules live in the library (`lib.rs`), so fuzz targets reach the parsers.

use anyhow::Result;
use scalpel::cli::{self, Job, Task};
use scalpel_sdk::cuda;
use scalpel::model::{self, Checkpoint};
use scalpel::{compare, data, import, inheritune, inspect, newplugin, pipeline, plugins, present, recipe, train};

fn main() {
    // Before anything touches libtorch's dispatcher, so that `--device cuda` can work.
    cuda::init();
    let job = match cli::parse() {
        Ok(job) => job,
        Err(e) => fail(&e, false),
    };
    let json = job.json;
    if let Err(e) = run(job) {
        fail(&e, json);
    }
    exit(0);
}

/// Ends the process without running libtorch's static destructors, which take about 0.1 s and do
/// nothing a finished command needs: by now every output is written, synced and renamed into place,
/// and every file is closed. Only what Rust still buffers is flushed first.
fn exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` ends the process at once; no other thread's work is waited for, and none is pending.
    unsafe { libc::_exit(code) }
}

/// The error and its causes on stderr; with `--json`, also as `{"error": …}` on stdout for scripts.
fn fail(e: &anyhow::Error, json: bool) -> ! {
    eprintln!("error: {e:#}");
    if json {
        println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
    }
    exit(1);
}

fn run(job: Job) -> Result<()> {
    let device = || cuda::device(job.device.as_deref().unwrap_or("cpu"));
    let registry = || {
        let registry = plugins::Registry::load(&plugins::search_path(&job.plugin_dirs));
        for w in registry.warnings() {
            eprintln!("warning: {w}");
        }
        registry
    };
    match job.task {
        Task::Plugins => present::list_plugins(&registry(), job.json),
        Task::Describe(name) => present::describe(&registry(), &name, job.json),
        Task::NewPlugin { name, dir } => {
            let dir = newplugin::create(&name, dir.as_deref())?;
            println!("wrote the plugin crate {}: `cargo test --release` there, then see its README.md to load it", dir.display());
            Ok(())
        }
        Task::Inspect(path) if path.extension().is_some_and(|e| e == "gguf") => inspect::inspect_gguf(&path, job.json),
        Task::Inspect(model) => inspect::inspect(&Checkpoint::open(&model)?, job.json),
        Task::Import { gguf, out, dtype, force } => import::import(&gguf, &out, dtype, force),
        Task::Generate { model, prompt, max_tokens, sampling } => inspect::generate(&Checkpoint::open(&model)?, device()?, &prompt, max_tokens, &sampling, job.json),
        Task::Tokenize { model, text } => {
            let ckpt = Checkpoint::open(&model)?;
            let ids = model::tokenizer::Tokenizer::for_model(&model, &ckpt.arch.family)?.encode(&text)?;
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Task::Eval { model, data, tokens, windows } => inspect::eval(&Checkpoint::open(&model)?, device()?, &data, tokens, windows, job.json),
        Task::DeviceCheck { model, windows, tokens } => inspect::device_check(&Checkpoint::open(&model)?, device()?, windows, tokens, job.json),
        Task::PrintRecipe { mut recipe, opts } => {
            if opts.default_analyzers {
                recipe::add_default_analyzers(&mut recipe, &registry())?;
            }
            print!("{}", recipe.to_toml()?);
            Ok(())
        }
        Task::Recipe { recipe, opts } if recipe.inheritune.is_some() => {
            let settings = inheritune::Settings::from_recipe(&recipe)?;
            let state = inheritune::run(settings, &registry(), opts.force, &|line| eprintln!("{line}"))?;
            present::inheritune(&state, job.json)
        }
        Task::Recipe { mut recipe, opts } => {
            let registry = registry();
            if opts.default_analyzers {
                recipe::add_default_analyzers(&mut recipe, &registry)?;
            }
            let finished = pipeline::run(&recipe, &registry, &opts, &|line| eprintln!("{line}"))?;
            present::finished(&finished, job.json, opts.dry_run)
        }
        Task::Compare(c) => {
            let comparison = compare::run(&c, &registry(), &|line| eprintln!("{line}"))?;
            present::comparison(&comparison, &c.output, job.json)
        }
        Task::InherituneResume(run) => {
            let state = inheritune::resume(&run, job.device.clone(), &registry(), &|line| eprintln!("{line}"))?;
            present::inheritune(&state, job.json)
        }
        Task::Data(request) => data::run(request, job.json),
        Task::Export { run, dir, force } => {
            let dest = train::export(&run, &dir, force)?;
            println!("wrote the torchrun job to {}: run {}/launch.sh (its README says how)", dest.display(), dest.display());
            Ok(())
        }
        Task::Resume(run) => {
            let summary = train::resume(&run, device()?)?;
            let finished = pipeline::Finished { outcome: pipeline::Outcome::empty(), written: Some(run), trained: Some(summary) };
            present::finished(&finished, job.json, false)
        }
    }
}
