//! Recipes: a model, calibration data and a list of steps, each naming a plugin item and its config.
//! `scalpel run` executes one; `analyze` and `apply` build one from their flags and run it the same
//! way, so every ad-hoc command has an equivalent recipe (`--print-recipe`).

use crate::calib::{Sampling, Windows};
use crate::model::checkpoint::{parse_dtype, Checkpoint};
use crate::model::tokenizer::Tokenizer;
use crate::model::write::{stage, write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::plugins::Registry;
use crate::session::Session;
use crate::{cuda, plots, surgery};
use anyhow::{anyhow, bail, Context, Result};
use scalpel_sdk::{ItemKind, ModelInfo, ModelSource, Plan, Report, Reports};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// HF model folder to start from.
    pub model: Option<PathBuf>,
    /// Folder for reports, plots and the new model (created; never overwritten without --force).
    pub output: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    pub device: Option<String>,
    /// Store the new model as f32, f16 or bf16 (default: as the input).
    pub dtype: Option<String>,
    pub calibration: Option<Calibration>,
    /// Reports of an earlier run (its reports.json), for strategies that choose from evidence.
    pub reports: Option<PathBuf>,
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// A text file (windows are sampled from it), or `[N, T]` token ids as .safetensors / .npy.
    pub file: PathBuf,
    #[serde(default = "hundred")]
    pub sequences: usize,
    #[serde(default = "hundred")]
    pub tokens: usize,
    #[serde(default)]
    pub seed: u64,
    /// Prepend BOS to each window (the paper does not).
    #[serde(default)]
    pub bos: bool,
}

fn hundred() -> usize {
    100
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub analyzer: Option<String>,
    pub strategy: Option<String>,
    #[serde(default = "empty_table", skip_serializing_if = "is_empty_table")]
    pub config: Value,
}

fn empty_table() -> Value {
    json!({})
}

fn is_empty_table(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.is_empty())
}

impl Step {
    pub fn item(&self) -> Result<(&str, ItemKind)> {
        match (&self.analyzer, &self.strategy) {
            (Some(a), None) => Ok((a, ItemKind::Analyzer)),
            (None, Some(s)) => Ok((s, ItemKind::Strategy)),
            _ => bail!("each step names exactly one `analyzer = \"…\"` or `strategy = \"…\"`"),
        }
    }
}

/// How to run, beyond the recipe itself.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
    pub json: bool,
    /// Attention maps to draw, as (layer, head); empty: a default spread of layers.
    pub maps: Vec<(usize, usize)>,
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
        let recipe: Recipe = toml::from_str(&text).with_context(|| format!("{} is not a valid recipe", path.display()))?;
        if let Some(key) = toml::from_str(&text).ok().and_then(|t| non_finite(&toml::Value::Table(t), "")) {
            bail!("{}: `{key}` is not a finite number (nan and inf are not settings)", path.display());
        }
        // Relative paths in a recipe are relative to the recipe's folder.
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let mut recipe = recipe;
        recipe.model.as_mut().map(rebase);
        recipe.output.as_mut().map(rebase);
        recipe.reports.as_mut().map(rebase);
        if let Some(c) = recipe.calibration.as_mut() {
            rebase(&mut c.file);
        }
        Ok(recipe)
    }

    /// The recipe as TOML, with absolute paths so that it runs the same from any folder.
    pub fn to_toml(&self) -> Result<String> {
        let mut r = self.clone();
        let abs = |p: &mut PathBuf| -> Result<()> {
            *p = std::path::absolute(&*p)?;
            Ok(())
        };
        for p in [&mut r.model, &mut r.output, &mut r.reports].into_iter().flatten() {
            abs(p)?;
        }
        if let Some(c) = r.calibration.as_mut() {
            abs(&mut c.file)?;
        }
        Ok(toml::to_string_pretty(&r)?)
    }
}

/// The key path of the first nan or inf in a TOML value: JSON, which settings travel as, has no such numbers.
pub fn non_finite(v: &toml::Value, path: &str) -> Option<String> {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some(if path.is_empty() { f.to_string() } else { path.to_string() }),
        toml::Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| non_finite(x, &format!("{path}[{i}]"))),
        toml::Value::Table(t) => t.iter().find_map(|(k, x)| non_finite(x, &join(k))),
        _ => None,
    }
}

/// What a run folder holds to say scalpel wrote it: `--force` replaces only folders with this file.
const RUN_RECORD: &str = "record.json";

/// Runs a recipe: analyzers report, strategies plan (each seeing the model the plan so far makes),
/// then the reports, plots and the new model are written once into the output folder.
pub fn run(recipe: &Recipe, registry: &Registry, opts: &Options) -> Result<()> {
    let model_dir = recipe.model.as_deref().ok_or_else(|| anyhow!("the recipe names no model (set `model = \"…\"` or pass one)"))?;
    if recipe.steps.is_empty() && recipe.dtype.is_none() {
        bail!("the recipe has no steps: add [[step]] tables naming an analyzer or a strategy (or set `dtype` to convert)");
    }
    // Resolve every item before any work, so a typo fails in a second, not after the analysis.
    for step in &recipe.steps {
        let (name, kind) = step.item()?;
        registry.get(name, Some(kind))?;
    }
    let writes_model = recipe.dtype.is_some() || recipe.steps.iter().any(|s| s.strategy.is_some());
    if recipe.output.is_none() && !opts.dry_run && writes_model {
        bail!("a strategy writes a new model: give an output folder (-o DIR), or --dry-run to see the plan");
    }
    let dtype = recipe.dtype.as_deref().map(parse_dtype).transpose()?;
    let device = cuda::device(recipe.device.as_deref().unwrap_or("cpu"))?;
    let ckpt = Checkpoint::open(model_dir)?;
    if let (Some(out), Ok(input)) = (&recipe.output, model_dir.canonicalize()) {
        let out = std::path::absolute(out)?;
        if input.starts_with(&out) || out.canonicalize().is_ok_and(|o| input.starts_with(o)) {
            bail!("the output {} holds the input model {}: choose an output outside it", out.display(), input.display());
        }
    }
    let staging = match (&recipe.output, opts.dry_run) {
        (Some(out), false) => Some(stage(out, opts.force, RUN_RECORD)?),
        _ => None,
    };

    let needs_calibration = recipe.steps.iter().any(|s| s.analyzer.is_some());
    let windows = match (&recipe.calibration, needs_calibration) {
        (Some(c), true) => {
            let tokenizer = || Tokenizer::for_model(model_dir, &ckpt.arch.family);
            let sampling = Sampling { sequences: c.sequences, tokens: c.tokens, seed: c.seed, bos: c.bos };
            Some(Windows::load(&c.file, tokenizer, ckpt.dims.vocab, &sampling)?)
        }
        // Analyzers that read only weights need none; one that asks for activations gets a clear error.
        _ => None,
    };
    let session = Session::new(&ckpt, device, windows);
    eprintln!("{} ({} layers) on {}", model_dir.display(), ckpt.dims.layers, session.info().device);

    let mut reports = match &recipe.reports {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading reports {}", file.display()))?;
            let reports: Reports = serde_json::from_str(&text).with_context(|| format!("{} is not a reports.json written by scalpel", file.display()))?;
            for r in reports.0.values() {
                check_report(r, ckpt.dims.layers).with_context(|| format!("{} does not describe {}", file.display(), model_dir.display()))?;
            }
            reports
        }
        None => Reports::default(),
    };
    let mut plan: Option<Plan> = None;
    for step in &recipe.steps {
        let (name, kind) = step.item()?;
        let item = registry.get(name, Some(kind))?;
        let started = Instant::now();
        eprintln!("{kind} {name} …");
        match kind {
            ItemKind::Analyzer => {
                let out = item.call(&session, &step.config, &json!({}))?;
                let mut report: Report = serde_json::from_value(out).with_context(|| format!("`{name}` returned a malformed report"))?;
                report.analyzer = name.to_string();
                check_report(&report, ckpt.dims.layers)?;
                reports.insert(report);
            }
            ItemKind::Strategy => {
                let next: Plan = match &plan {
                    None => call_strategy(&item, &session, step, &reports)?,
                    Some(p) => call_strategy(&item, &Planned::new(&session, p), step, &reports)?,
                };
                let current = plan.as_ref().map_or(ckpt.dims.layers, |p| p.layers.len());
                next.validate(current).with_context(|| format!("strategy `{name}` made an invalid plan"))?;
                plan = Some(match plan {
                    None => next,
                    Some(p) => p.then(&next)?,
                });
            }
        }
        eprintln!("{kind} {name} done in {:.1} s", started.elapsed().as_secs_f64());
    }

    if plan.is_none() && dtype.is_some() {
        // A conversion: every block kept as it is.
        plan = Some(Plan::identity(ckpt.dims.layers).note(format!("stored as {}", recipe.dtype.as_deref().unwrap_or_default())));
    }
    let cut = plan.as_ref().and_then(|p| first_removed(p, ckpt.dims.layers));
    if !reports.0.is_empty() {
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            print_profile(&reports, plan.as_ref(), ckpt.dims.layers);
            for r in reports.0.values() {
                for n in &r.notes {
                    println!("{}: {n}", r.analyzer);
                }
            }
        }
    }
    let resulting = match &plan {
        Some(p) => {
            let (config, warnings) = surgery::resulting_config(&ckpt, p, dtype)?;
            print_plan(p, &config, &ckpt, &warnings, opts.json)?;
            Some(config)
        }
        None => None,
    };
    let Some(staging) = staging else {
        if opts.dry_run {
            println!("dry run: nothing written");
        }
        return Ok(());
    };

    let out = staging.path();
    if !reports.0.is_empty() {
        std::fs::write(out.join("reports.json"), serde_json::to_string_pretty(&reports)? + "\n")?;
        write_figures(&reports, &session, cut, &model_name(model_dir), out, &opts.maps)?;
    }
    if let Some(ids) = session.calibration_ids() {
        // The exact windows, so that anyone can rerun this analysis with `--calib calibration.safetensors`.
        Tensor::write_safetensors(&[("input_ids", ids)], out.join("calibration.safetensors"))?;
    }
    let record = record(recipe, registry, &ckpt, session.info(), plan.as_ref())?;
    std::fs::write(out.join("recipe.toml"), recipe.to_toml()?)?;
    std::fs::write(out.join(RUN_RECORD), serde_json::to_string_pretty(&record)? + "\n")?;
    if let (Some(p), Some(config)) = (&plan, &resulting) {
        let folder = Folder { config, companions_from: Some(model_dir), extra_files: vec![], record: &record };
        let tensors = surgery::resulting_tensors(&ckpt, p, dtype, 0);
        write_model(&out.join("model"), false, folder, tensors, DEFAULT_SHARD_BYTES)?;
    }
    let dest = staging.commit()?;
    println!("\nwritten to {}:", dest.display());
    // One line per stem: profile.{csv,png,svg}.
    let mut stems: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for entry in std::fs::read_dir(&dest)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (stem, ext) = name.rsplit_once('.').map_or((name.clone(), String::new()), |(s, e)| (s.to_string(), e.to_string()));
        stems.entry(stem).or_default().push(ext);
    }
    for (stem, mut exts) in stems {
        exts.sort();
        let shown = match exts.as_slice() {
            _ if dest.join(&stem).is_dir() => format!("{stem}/  (the new model: an HF folder)"),
            [e] => format!("{stem}.{e}"),
            _ => format!("{stem}.{{{}}}", exts.join(",")),
        };
        println!("  {shown}");
    }
    Ok(())
}

fn call_strategy(item: &crate::plugins::ItemRef, model: &dyn ModelSource, step: &Step, reports: &Reports) -> Result<Plan> {
    let out = item.call(model, &step.config, &serde_json::to_value(reports)?)?;
    serde_json::from_value(out).with_context(|| format!("`{}` returned a malformed plan", item.item.name))
}

/// A report must describe this model's layers, with finite numbers.
fn check_report(r: &Report, layers: usize) -> Result<()> {
    for m in &r.metrics {
        if m.per_layer.len() != layers {
            bail!("analyzer `{}` reported {} values of `{}` for a model of {layers} layers", r.analyzer, m.per_layer.len(), m.name);
        }
        if let Some(l) = m.per_layer.iter().position(|v| !v.is_finite()) {
            bail!("analyzer `{}` reported a non-finite `{}` for layer {l}", r.analyzer, m.name);
        }
    }
    Ok(())
}

/// The first input layer a plan leaves out, when it keeps a prefix and drops the rest.
fn first_removed(plan: &Plan, layers: usize) -> Option<usize> {
    let kept = plan.sources();
    (0..layers).find(|l| !kept.contains(l)).filter(|&c| kept.iter().all(|&k| k < c))
}

fn model_name(dir: &Path) -> String {
    dir.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
}

/// Per-layer table of every per-layer metric, with the plan's verdict for each layer.
fn print_profile(reports: &Reports, plan: Option<&Plan>, layers: usize) {
    let metrics: Vec<&scalpel_sdk::Metric> = reports.0.values().flat_map(|r| &r.metrics).collect();
    let mut header = vec!["layer".to_string()];
    header.extend(metrics.iter().map(|m| m.name.clone()));
    if plan.is_some() {
        header.push("plan".into());
    }
    let sources = plan.map(|p| p.sources()).unwrap_or_default();
    let rows: Vec<Vec<String>> = (0..layers)
        .map(|l| {
            let mut row = vec![l.to_string()];
            row.extend(metrics.iter().map(|m| format_value(m.per_layer[l])));
            if plan.is_some() {
                let copies = sources.iter().filter(|&&s| s == l).count();
                row.push(match copies {
                    0 => "cut".into(),
                    1 => "keep".into(),
                    n => format!("x{n}"),
                });
            }
            row
        })
        .collect();
    println!();
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    crate::cli::print_table(&header, &rows, crate::cli::Align::Right);
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn print_plan(plan: &Plan, config: &Value, ckpt: &Checkpoint, warnings: &[String], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "plan": plan, "config": config }))?);
        return Ok(());
    }
    println!("\nplan: {} layers -> {} layers", ckpt.dims.layers, plan.layers.len());
    println!("  output layer <- input layer: {}", describe_sources(plan));
    for (j, l) in plan.layers.iter().enumerate().filter(|(_, l)| !l.edits.is_empty()) {
        println!("  output layer {j}: {:?}", l.edits);
    }
    for n in &plan.notes {
        println!("  why: {n}");
    }
    for w in warnings {
        println!("  note: {w}");
    }
    let key = &ckpt.arch.config.layers;
    println!("  config.json: {key} {} -> {}", ckpt.config[key], config[key]);
    Ok(())
}

/// `0-11, 6-11` style run-length description of a plan's sources.
pub fn describe_sources(plan: &Plan) -> String {
    let s = plan.sources();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &i in &s {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    runs.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect::<Vec<_>>().join(", ")
}

/// Figures of what the analyzers found, with the CSV behind each.
fn write_figures(reports: &Reports, session: &Session, cut: Option<usize>, model: &str, out: &Path, maps: &[(usize, usize)]) -> Result<()> {
    let all: Vec<Report> = reports.0.values().cloned().collect();
    // One model: every analyzer's metrics on the same axes, labelled with the model's name.
    let merged = Report { analyzer: model.to_string(), metrics: all.iter().flat_map(|r| r.metrics.clone()).collect(), notes: vec![], extra: json!({ "label": model }) };
    let preferred: Vec<&str> = ["max_rank", "avg_mass"].into_iter().filter(|m| merged.get(m).is_ok()).collect();
    let chosen: Vec<&str> = if preferred.is_empty() { merged.metrics.iter().map(|m| m.name.as_str()).take(2).collect() } else { preferred };
    if !chosen.is_empty() {
        plots::layer_profile(std::slice::from_ref(&merged), &chosen, cut, &format!("{model}: attention profile"), out, "profile")?;
    }
    for r in &all {
        for m in r.metrics.iter().filter(|m| m.per_head.is_some()) {
            let stem = format!("heads-{}", m.name.replace('_', "-"));
            let title = format!("{model}: {} (per head, mean over sequences)", m.name);
            plots::head_heatmap(r, &m.name, &title, out, &stem)?;
        }
    }
    let info = session.info();
    if session.calibration_ids().is_none() {
        return Ok(()); // attention maps need activations: weight-only analyses and saved reports have none
    }
    let maps = if maps.is_empty() { default_maps(reports, info.layers) } else { maps.to_vec() };
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

/// The first and last layers' head 0, and the heads of lowest and highest rank, when a rank report exists.
fn default_maps(reports: &Reports, layers: usize) -> Vec<(usize, usize)> {
    let mut maps = vec![(0, 0)];
    if let Some(per_head) = reports.get("attn-rank").ok().and_then(|r| r.get("max_rank").ok()).and_then(|m| m.per_head.as_ref()) {
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

/// What produced an output: the recipe, the plugins that ran, checksums of the inputs.
fn record(recipe: &Recipe, registry: &Registry, ckpt: &Checkpoint, info: &ModelInfo, plan: Option<&Plan>) -> Result<Value> {
    let mut plugins = serde_json::Map::new();
    for step in &recipe.steps {
        let (name, kind) = step.item()?;
        let it = registry.get(name, Some(kind))?;
        plugins.insert(name.into(), json!({ "plugin": it.plugin.manifest.plugin, "version": it.plugin.manifest.version, "library": it.plugin.path }));
    }
    let mut inputs = serde_json::Map::new();
    for path in ckpt.shard_paths().map(Path::to_path_buf).chain([ckpt.dir.join("config.json")]).chain(recipe.calibration.as_ref().map(|c| c.file.clone())) {
        inputs.insert(path.display().to_string(), Value::from(sha256(&path)?));
    }
    Ok(json!({
        "produced_by": format!("scalpel {}", env!("CARGO_PKG_VERSION")),
        "libtorch": scalpel_sdk::LIBTORCH_VERSION,
        "command": std::env::args().collect::<Vec<_>>(),
        "recipe": recipe,
        "plugins": plugins,
        "inputs_sha256": inputs,
        "calibration": info.calibration,
        "plan": plan,
    }))
}

fn sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
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
}
