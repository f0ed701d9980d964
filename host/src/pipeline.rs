//! The one pipeline behind `run`, `analyze`, `apply` and `train`: prepare → execute → write, each
//! stage returning data and printing nothing (`present.rs` shows the result; progress bars and
//! progress lines go to stderr through the caller's `progress`).
//!
//! - prepare: resolve every item, open the model, check the output, load calibration and reports;
//! - execute: analyzers report, strategies plan (each seeing the model the plan so far makes);
//! - write: reports, figures, calibration ids, provenance and the new model, into a staged folder
//!   renamed into place once;
//! - a `train` step then trains the written model (or the recipe's own) in its run folder.

use crate::calib::{Sampling, Windows};
use crate::model::checkpoint::{parse_dtype, Checkpoint};
use crate::model::tokenizer::Tokenizer;
use crate::model::write::{stage, write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::plugins::Registry;
use crate::recipe::{Options, Recipe, Step, StepKind, RUN_RECORD};
use crate::session::Session;
use crate::{plots, surgery, train};
use scalpel_sdk::cuda;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::Dtype;
use scalpel_files::StagedDir;
use scalpel_sdk::{ItemKind, ModelInfo, ModelSource, Plan, Report, Reports};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Tensor};

/// Everything checked and loaded before any work: a typo fails in a second, not after the analysis.
pub struct Prepared<'r> {
    pub recipe: &'r Recipe,
    pub ckpt: Checkpoint,
    pub device: Device,
    dtype: Option<Dtype>,
    windows: Option<Windows>,
    reports: Reports,
    staging: Option<StagedDir>,
}

/// What the steps found and decided.
pub struct Outcome {
    pub reports: Reports,
    pub plan: Option<Plan>,
    /// The new model's config.json, when a plan or a conversion writes one.
    pub config: Option<Value>,
    /// For the user: how the plan carries index-dependent settings, what is initialised afresh.
    pub warnings: Vec<String>,
    /// The input model's layers, and the config key that holds their count (for the plan's summary).
    pub input_layers: usize,
    pub layers_key: String,
}

/// What a recipe run produced.
pub struct Finished {
    pub outcome: Outcome,
    /// The output folder, once renamed into place (none on a dry run or without an output).
    pub written: Option<PathBuf>,
    pub trained: Option<train::Summary>,
}

/// Runs a whole recipe; `progress` receives one-line progress messages.
pub fn run(recipe: &Recipe, registry: &Registry, opts: &Options, progress: &dyn Fn(&str)) -> Result<Finished> {
    check_steps(recipe, registry)?;
    let training = recipe.steps.iter().find_map(|s| match s.kind() {
        Ok(StepKind::Train(c)) => Some(c.clone()),
        _ => None,
    });
    let items = recipe.steps.iter().filter(|s| s.train.is_none()).count();
    if let Some(config) = training.filter(|_| items == 0 && recipe.dtype.is_none()) {
        // A recipe that only trains is `scalpel train`: its output is the run folder.
        let run = train_run(recipe, recipe.model.clone(), recipe.output.clone(), config)?;
        if opts.dry_run {
            // `train::start` checks the same before it writes anything.
            train::check(&run)?;
            return Ok(Finished { outcome: Outcome::empty(), written: None, trained: None });
        }
        let summary = train::start(&run, cuda::device(recipe.device.as_deref().unwrap_or("cpu"))?, opts.force)?;
        return Ok(Finished { outcome: Outcome::empty(), written: Some(run.output.clone()), trained: Some(summary) });
    }
    let mut prepared = prepare(recipe, opts)?;
    let (windows, staging) = (prepared.windows.take(), prepared.staging.take());
    let precision = recipe.calibration.as_ref().map(|c| c.precision).unwrap_or_default();
    let session = Session::new(&prepared.ckpt, prepared.device, precision.kind(), windows);
    progress(&format!("{} ({} layers) on {}", prepared.ckpt.dir.display(), prepared.ckpt.dims.layers, session.info().device));
    let outcome = execute(recipe, std::mem::take(&mut prepared.reports), prepared.dtype, &session, registry, progress)?;
    let written = match staging {
        Some(staging) => Some(write(&prepared, staging, &session, &outcome, registry, opts)?),
        None => None,
    };
    drop(session);
    let trained = match (recipe.steps.iter().find_map(|s| s.train.clone()), &written) {
        (Some(config), Some(dest)) => {
            // Train what the steps before wrote, or the recipe's model when they wrote none.
            let model = if dest.join("model").is_dir() { Some(dest.join("model")) } else { recipe.model.clone() };
            let run = train_run(recipe, model, Some(dest.join("train")), config)?;
            Some(train::start(&run, prepared.device, false)?)
        }
        _ => None,
    };
    Ok(Finished { outcome, written, trained })
}

fn train_run(recipe: &Recipe, model: Option<PathBuf>, output: Option<PathBuf>, config: train::TrainConfig) -> Result<train::Run> {
    let abs = |p: PathBuf| std::path::absolute(&p).with_context(|| format!("resolving {}", p.display()));
    Ok(train::Run {
        model: abs(model.ok_or_else(|| anyhow!("the recipe names no model to train (set `model = \"…\"` or pass one)"))?)?,
        data: abs(recipe.data.clone().ok_or_else(|| anyhow!("a train step needs training data: set `data = \"…\"` (or --data)"))?)?,
        val: recipe.val.clone().map(abs).transpose()?,
        output: abs(output.ok_or_else(|| anyhow!("training writes a run folder: give an output folder (-o DIR)"))?)?,
        config,
    })
}

impl Outcome {
    pub fn empty() -> Self {
        Outcome { reports: Reports::default(), plan: None, config: None, warnings: vec![], input_layers: 0, layers_key: String::new() }
    }
}

pub fn prepare<'r>(recipe: &'r Recipe, opts: &Options) -> Result<Prepared<'r>> {
    let model_dir = recipe.model.as_deref().ok_or_else(|| anyhow!("the recipe names no model (set `model = \"…\"` or pass one)"))?;
    let trains = recipe.steps.iter().filter(|s| s.train.is_some()).count();
    let writes_model = recipe.dtype.is_some() || recipe.steps.iter().any(|s| s.strategy.is_some());
    if recipe.output.is_none() && !opts.dry_run && (writes_model || trains > 0) {
        bail!("a strategy or a train step writes a new model: give an output folder (-o DIR), or --dry-run to see the plan");
    }
    let dtype = recipe.dtype.as_deref().map(parse_dtype).transpose()?;
    let device = cuda::device(recipe.device.as_deref().unwrap_or("cpu"))?;
    let ckpt = Checkpoint::open(model_dir)?;
    if let Some(config) = recipe.steps.iter().find_map(|s| s.train.clone()) {
        // Surgery keeps the vocabulary and the context, so the input tells whether training can run.
        train::check_against(&train_run(recipe, recipe.model.clone(), recipe.output.clone(), config)?, &ckpt, train::Spelling::Flags)?;
    }
    if let Some(out) = &recipe.output {
        check_output_outside(out, model_dir)?;
    }
    // Strategies may need analyzers run for them (their `needs`), so any item step may use the windows.
    let needs_calibration = recipe.steps.iter().any(|s| s.train.is_none());
    let windows = match (&recipe.calibration, needs_calibration) {
        (Some(c), true) => {
            let tokenizer = || Tokenizer::for_model(model_dir, &ckpt.arch.family);
            let sampling = Sampling { sequences: c.sequences, tokens: c.tokens, seed: c.seed, bos: c.bos };
            Some(Windows::load(&c.file, tokenizer, ckpt.dims.vocab, &sampling)?)
        }
        // Analyzers that read only weights need none; one that asks for activations gets a clear error.
        _ => None,
    };
    let reports = match &recipe.reports {
        Some(file) => {
            let text = scalpel_files::read_regular_string(file).with_context(|| format!("reading reports {}", file.display()))?;
            let reports: Reports = serde_json::from_str(&text).with_context(|| format!("{} is not a reports.json written by scalpel", file.display()))?;
            for r in reports.0.values() {
                r.check(ckpt.dims.layers).with_context(|| format!("{} does not describe {}", file.display(), model_dir.display()))?;
            }
            reports
        }
        None => Reports::default(),
    };
    // Last, so that nothing is created when a check above fails.
    let staging = match (&recipe.output, opts.dry_run) {
        (Some(out), false) => Some(stage(out, opts.force, RUN_RECORD)?),
        _ => None,
    };
    Ok(Prepared { recipe, ckpt, device, dtype, windows, reports, staging })
}

/// Refuses an output folder that holds the input model (replacing it would destroy the input), through symlinks too.
pub fn check_output_outside(out: &Path, model_dir: &Path) -> Result<()> {
    let Ok(input) = model_dir.canonicalize() else { return Ok(()) };
    let out = std::path::absolute(out)?;
    if input.starts_with(&out) || out.canonicalize().is_ok_and(|o| input.starts_with(o)) {
        bail!("the output {} holds the input model {}: choose an output outside it", out.display(), input.display());
    }
    Ok(())
}

/// Every item exists, at most one train step comes last: checked before any work.
fn check_steps(recipe: &Recipe, registry: &Registry) -> Result<()> {
    if recipe.steps.is_empty() && recipe.dtype.is_none() {
        bail!("the recipe has no steps: add [[step]] tables naming an analyzer, a strategy or `train` (or set `dtype` to convert)");
    }
    let mut trains = 0;
    for (i, step) in recipe.steps.iter().enumerate() {
        match step.kind()? {
            StepKind::Item(name, kind) => {
                registry.get(name, Some(kind))?;
                if trains > 0 {
                    bail!("step {} (`{name}`) comes after the train step: training must be the last step", i + 1);
                }
            }
            StepKind::Train(_) => trains += 1,
        }
    }
    let first_strategy = recipe.steps.iter().position(|s| s.strategy.is_some());
    if let Some((i, name)) = recipe.steps.iter().enumerate().skip(first_strategy.unwrap_or(usize::MAX)).find_map(|(i, s)| Some((i, s.analyzer.as_ref()?))) {
        bail!(
            "step {} (`{name}`) analyzes after a strategy: it would see a planned model that is not written yet. \
             Analyze first, or split the recipe: apply it with -o DIR, then analyze DIR/model",
            i + 1
        );
    }
    if trains > 1 {
        bail!("the recipe has {trains} train steps: one run trains once (use `scalpel inheritune` for rounds)");
    }
    Ok(())
}

/// Analyzers report and strategies plan, in recipe order.
/// `reports`: those given with the recipe (or computed once for several recipes, as `compare` does).
pub fn execute(recipe: &Recipe, mut reports: Reports, dtype: Option<Dtype>, session: &Session, registry: &Registry, progress: &dyn Fn(&str)) -> Result<Outcome> {
    let ckpt = session.ckpt;
    let mut plan: Option<Plan> = None;
    for step in &recipe.steps {
        let Some((name, kind)) = step.item() else { continue };
        let item = registry.get(name, Some(kind))?;
        let started = Instant::now();
        progress(&format!("{kind} {name} …"));
        match kind {
            ItemKind::Analyzer => reports.insert(analyze(&item, session, &step.config)?),
            ItemKind::Strategy => {
                let missing: Vec<String> = item.needs(&step.config)?.into_iter().filter(|n| reports.get(n).is_err()).collect();
                for need in &missing {
                    // On the input model; a later strategy reads it through the plan so far, like every report.
                    progress(&format!("analyzer {need} (needed by {name}) …"));
                    reports.insert(analyze(&registry.get(need, Some(ItemKind::Analyzer))?, session, &json!({}))?);
                }
                // A later strategy sees the planned model, and the reports as they read for it.
                let next: Plan = match &plan {
                    None => call_strategy(&item, session, step, &reports)?,
                    Some(p) => call_strategy(&item, &Planned::new(session, p), step, &reports.through(p))?,
                };
                let current = plan.as_ref().map_or(ckpt.dims.layers, |p| p.layers.len());
                next.validate(current).with_context(|| format!("strategy `{name}` made an invalid plan"))?;
                plan = Some(match plan {
                    None => next,
                    Some(p) => p.then(&next)?,
                });
            }
        }
        progress(&format!("{kind} {name} done in {:.1} s", started.elapsed().as_secs_f64()));
    }
    if plan.is_none() && dtype.is_some() {
        // A conversion: every block kept as it is.
        plan = Some(Plan::identity(ckpt.dims.layers).note(format!("stored as {}", recipe.dtype.as_deref().unwrap_or_default())));
    }
    let (config, warnings) = match &plan {
        Some(plan) => {
            let (config, warnings) = surgery::resulting_config(ckpt, plan, dtype)?;
            (Some(config), warnings)
        }
        None => (None, vec![]),
    };
    Ok(Outcome { reports, plan, config, warnings, input_layers: ckpt.dims.layers, layers_key: ckpt.arch.config.layers.clone() })
}

/// Writes everything into the staged output and renames it into place.
pub fn write(p: &Prepared, staging: StagedDir, session: &Session, outcome: &Outcome, registry: &Registry, opts: &Options) -> Result<PathBuf> {
    let (ckpt, recipe) = (&p.ckpt, p.recipe);
    let model_dir = &ckpt.dir;
    let out = staging.path();
    let reports = &outcome.reports;
    if !reports.0.is_empty() {
        std::fs::write(out.join("reports.json"), serde_json::to_string_pretty(reports)? + "\n")?;
        write_figures(reports, session, outcome.plan.as_ref(), &model_name(model_dir), out, &opts.maps)?;
    }
    if let Some(ids) = session.calibration_ids() {
        // The exact windows, so that anyone can rerun this analysis with `--calib calibration.safetensors`.
        Tensor::write_safetensors(&[("input_ids", ids)], out.join("calibration.safetensors"))?;
    }
    let record = record(recipe, registry, ckpt, session.info(), outcome.plan.as_ref(), &outcome.reports)?;
    std::fs::write(out.join("recipe.toml"), recipe.to_toml()?)?;
    std::fs::write(out.join(RUN_RECORD), serde_json::to_string_pretty(&record)? + "\n")?;
    if let (Some(plan), Some(config)) = (&outcome.plan, &outcome.config) {
        let folder = Folder { config, companions_from: Some(model_dir), extra_files: vec![], record: &record };
        let tensors = surgery::resulting_tensors(ckpt, plan, p.dtype, 0);
        write_model(&out.join("model"), false, folder, tensors, DEFAULT_SHARD_BYTES)?;
    }
    staging.commit()
}

/// Runs an analyzer on the session's model and checks its report.
pub fn analyze(item: &crate::plugins::ItemRef, session: &Session, config: &Value) -> Result<Report> {
    let name = &item.item.name;
    let progress = session.stage(name);
    let out = item.call(session, config, &json!({}))?;
    drop(progress);
    let mut report: Report = serde_json::from_value(out).with_context(|| format!("`{name}` returned a malformed report"))?;
    report.analyzer = name.to_string();
    report.check(session.info().layers)?;
    Ok(report)
}

fn call_strategy(item: &crate::plugins::ItemRef, model: &dyn ModelSource, step: &Step, reports: &Reports) -> Result<Plan> {
    let out = item.call(model, &step.config, &serde_json::to_value(reports)?)?;
    serde_json::from_value(out).with_context(|| format!("`{}` returned a malformed plan", item.item.name))
}


/// A model folder's name, for figure titles and labels.
pub fn model_name(dir: &Path) -> String {
    dir.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
}

/// The one profile figure of a set of reports, `profile.{svg,png,csv}` in `out`: each report's presentation
/// names its profile metrics, its title and the layers it flags; a report without one contributes its first
/// metric. The title is `{label}: {the reports' titles}{suffix}`. False when no report has a metric to draw.
pub fn write_profile(reports: &Reports, label: &str, removals: &[plots::Removal], suffix: &str, out: &Path) -> Result<bool> {
    let mut metrics = Vec::new();
    let mut titles: Vec<&str> = Vec::new();
    let mut mark = None;
    for r in reports.0.values() {
        match &r.present {
            Some(p) => {
                metrics.extend(p.profile.iter().filter(|m| r.get(m).is_ok()).map(String::as_str));
                if !titles.contains(&p.title.as_str()) {
                    titles.push(&p.title);
                }
                mark = mark.or_else(|| p.mark.clone());
            }
            None => metrics.extend(r.metrics.first().map(|m| m.name.as_str())),
        }
    }
    if metrics.is_empty() {
        return Ok(false);
    }
    let title = if titles.is_empty() { "layer profile".to_string() } else { titles.join(", ") };
    // One model: every analyzer's metrics on the same axes, labelled with the model's name.
    let present = scalpel_sdk::Presentation { title: title.clone(), profile: vec![], mark, attention_maps_by: None };
    let merged = Report {
        analyzer: label.to_string(),
        metrics: reports.0.values().flat_map(|r| r.metrics.clone()).collect(),
        notes: vec![],
        extra: json!({ "label": label }),
        present: Some(present),
    };
    plots::layer_profile(&[merged], &metrics, removals, &format!("{label}: {title}{suffix}"), out, "profile")?;
    Ok(true)
}

/// The input layers a plan leaves out, as a figure marks them.
pub fn removal(label: &str, plan: &Plan, layers: usize) -> plots::Removal {
    let kept = plan.sources();
    plots::Removal { label: label.to_string(), layers: (0..layers).filter(|l| !kept.contains(l)).collect() }
}

/// Figures of what the analyzers found, with the CSV behind each.
fn write_figures(reports: &Reports, session: &Session, plan: Option<&Plan>, model: &str, out: &Path, maps: &[(usize, usize)]) -> Result<()> {
    let info = session.info();
    let removals: Vec<plots::Removal> = plan.map(|p| removal("the plan", p, info.layers)).into_iter().collect();
    write_profile(reports, model, &removals, "", out)?;
    let all: Vec<&Report> = reports.0.values().collect();
    for r in &all {
        for m in r.metrics.iter().filter(|m| m.per_head.is_some()) {
            let stem = format!("heads-{}", m.name.replace('_', "-"));
            let title = format!("{model}: {} (per head, mean over sequences)", m.name);
            plots::head_heatmap(r, &m.name, &title, out, &stem)?;
        }
    }
    // Attention maps when a report about attention asks for them (or the user names heads), and activations exist.
    let by = all.iter().find_map(|r| {
        let metric = r.present.as_ref()?.attention_maps_by.as_ref()?;
        r.get(metric).ok()?.per_head.clone()
    });
    if session.calibration_ids().is_none() || (by.is_none() && maps.is_empty()) {
        return Ok(());
    }
    let maps = if maps.is_empty() { default_maps(by.as_deref(), info.layers) } else { maps.to_vec() };
    let mut panels = Vec::new();
    for &(layer, head) in &maps {
        if layer >= info.layers || head >= info.heads {
            bail!("--maps {layer}:{head} is outside the model ({} layers, {} heads)", info.layers, info.heads);
        }
        let a = session.attention(layer)?.get(0).get(head as i64).to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
        let t = a.size()[0] as usize;
        let data = Vec::<f32>::try_from(a.flatten(0, 1))?;
        panels.push((format!("layer {layer} head {head}"), t, data));
    }
    plots::attention_maps(&panels, &format!("{model}: attention of the first calibration window"), out, "attention")?;
    Ok(())
}

/// The first and last layers' head 0, and the heads of lowest and highest value of the per-head metric.
fn default_maps(per_head: Option<&[Vec<f64>]>, layers: usize) -> Vec<(usize, usize)> {
    let mut maps = vec![(0, 0)];
    if let Some(per_head) = per_head {
        let cells = per_head.iter().enumerate().flat_map(|(l, hs)| hs.iter().enumerate().map(move |(h, &v)| (v, l, h)));
        let by_value = |a: &(f64, usize, usize), b: &(f64, usize, usize)| a.0.total_cmp(&b.0);
        maps.extend(cells.clone().min_by(by_value).map(|(_, l, h)| (l, h)));
        maps.extend(cells.max_by(by_value).map(|(_, l, h)| (l, h)));
    } else {
        maps.push((layers / 2, 0));
    }
    maps.push((layers - 1, 0));
    maps.dedup();
    maps
}

/// What produced an output: the recipe (its paths absolute), the plugins that ran, and the checksum of every
/// input the result depends on (weights, config, calibration data, reports given to it).
pub fn record(recipe: &Recipe, registry: &Registry, ckpt: &Checkpoint, info: &ModelInfo, plan: Option<&Plan>, reports: &Reports) -> Result<Value> {
    let mut plugins = serde_json::Map::new();
    let ran = recipe.steps.iter().filter_map(Step::item).map(|(n, _)| n).chain(reports.0.keys().map(String::as_str));
    for name in ran {
        // Reports read from a file may come from plugins that are not loaded now.
        if let Ok(it) = registry.get(name, None) {
            plugins.insert(name.into(), json!({ "plugin": it.plugin.manifest.plugin, "version": it.plugin.manifest.version, "library": it.plugin.path }));
        }
    }
    let mut inputs = serde_json::Map::new();
    let files = ckpt.shard_paths().map(Path::to_path_buf).chain([ckpt.dir.join("config.json")]);
    for path in files.chain(recipe.calibration.as_ref().map(|c| c.file.clone())).chain(recipe.reports.clone()) {
        let path = std::path::absolute(&path)?;
        inputs.insert(path.display().to_string(), Value::from(crate::model::checkpoint::input_sha256(&path)?));
    }
    Ok(json!({
        "produced_by": format!("scalpel {}", env!("CARGO_PKG_VERSION")),
        "libtorch": scalpel_sdk::LIBTORCH_VERSION,
        "command": std::env::args().collect::<Vec<_>>(),
        "recipe": recipe.with_absolute_paths()?,
        "plugins": plugins,
        "inputs_sha256": inputs,
        "calibration": info.calibration,
        "plan": plan,
    }))
}


/// The model a plan makes, before it is written: what a strategy after another strategy sees.
/// Weights are read through the layer map; activations of an unwritten model are not available.
struct Planned<'a> {
    base: &'a Session<'a>,
    plan: &'a Plan,
    info: ModelInfo,
}

impl<'a> Planned<'a> {
    fn new(base: &'a Session<'a>, plan: &'a Plan) -> Self {
        let arch = base.ckpt.arch;
        let mut info = base.info().clone();
        info.layers = plan.layers.len();
        info.calibration = None;
        info.tensors = base
            .ckpt
            .names()
            .filter(|n| arch.split_block_name(n).is_none())
            .map(String::from)
            .chain((0..plan.layers.len()).flat_map(|j| {
                let from = arch.block_prefix(plan.layers[j].from);
                let to = arch.block_prefix(j);
                base.ckpt.names().filter_map(|n| n.strip_prefix(from.as_str()).map(|inner| format!("{to}{inner}"))).collect::<Vec<_>>()
            }))
            .collect();
        Planned { base, plan, info }
    }
}

impl ModelSource for Planned<'_> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let arch = self.base.ckpt.arch;
        match arch.split_block_name(name) {
            Some((j, inner)) if j < self.plan.layers.len() => self.base.tensor(&format!("{}{inner}", arch.block_prefix(self.plan.layers[j].from))),
            Some((j, _)) => bail!("layer {j} does not exist in the planned model of {} layers", self.plan.layers.len()),
            None => self.base.tensor(name),
        }
    }
    fn attention(&self, _: usize) -> Result<Tensor> {
        bail!("attention of a planned, unwritten model is not available: write it (-o DIR) and analyze the result")
    }
    fn hidden(&self, _: usize) -> Result<Tensor> {
        bail!("hidden states of a planned, unwritten model are not available: write it (-o DIR) and analyze the result")
    }
    fn loss(&self, _: &[usize]) -> Result<f64> {
        bail!("the loss of a planned, unwritten model is not available: write it (-o DIR) and analyze the result")
    }
}
