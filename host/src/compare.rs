//! `scalpel compare`: several recipes applied to one model, side by side on the same evidence and budget.
//!
//! One process opens the model once, runs every analyzer the recipes need (plus `-a` ones for the figure)
//! once on one set of calibration windows, and then, per recipe: plans, writes the model, evaluates it on
//! one set of evaluation windows, and (with `--heal-steps`) trains it for the same number of steps on the
//! same batches and evaluates it again. The output folder holds `compare.{md,html,json}`, the figures, the
//! reports, and per method `methods/LABEL/{model,train,recipe.toml}`; it is written to a temporary folder
//! and renamed into place once.

use crate::calib::{Sampling, Windows};
use crate::inspect::{eval_windows, mean_nll, EvalData};
use crate::model::tokenizer::Tokenizer;
use crate::model::write::{stage, write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::model::{Checkpoint, Transformer};
use crate::pipeline;
use crate::plugins::Registry;
use crate::recipe::{Calibration, Recipe, Regime, Step, StepKind, RUN_RECORD};
use crate::session::Session;
use crate::train::{self, TrainConfig};
use crate::{plots, surgery};
use scalpel_sdk::cuda;
use anyhow::{bail, Context, Result};
use scalpel_sdk::{ItemKind, ModelSource, Reports};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What `scalpel compare` was asked to do.
pub struct Compare {
    pub model: PathBuf,
    pub recipes: Vec<PathBuf>,
    /// Analyzers run for the profile figure beyond those the recipes run or need.
    pub analyzers: Vec<String>,
    /// Calibration windows for the analyzers; none: the first evaluation windows (`sequences` of them,
    /// cut to `tokens`), so that a comparison needs one data file.
    pub calibration: Option<Calibration>,
    /// With no calibration file: how many evaluation windows calibrate, and how many of their tokens.
    pub sampling: Sampling,
    /// The analysis forward pass (`--precision`).
    pub precision: crate::train::Precision,
    pub eval: EvalData,
    pub eval_tokens: usize,
    pub eval_windows: usize,
    /// Train every method this way (`steps` > 0) on `data`.
    pub heal: Option<(TrainConfig, PathBuf)>,
    pub output: PathBuf,
    pub force: bool,
    pub device: Option<String>,
}

/// Everything a comparison found: the numbers behind compare.md and the figures.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub model: PathBuf,
    pub eval: Value,
    pub calibration: Value,
    pub reference: Row,
    pub methods: Vec<Row>,
    /// What the figures and `flops_per_token` mean.
    pub definitions: BTreeMap<&'static str, &'static str>,
}

/// One model of the comparison: the input (reference) or what a recipe made of it.
#[derive(Debug, Serialize)]
pub struct Row {
    pub label: String,
    /// The recipe file (absolute), none for the reference.
    pub recipe: Option<PathBuf>,
    pub regime: Regime,
    pub layers: usize,
    /// Input layers the method does not keep.
    pub removed: Vec<usize>,
    pub params: usize,
    pub flops_per_token: f64,
    pub zero_shot: Loss,
    pub healed: Option<Healed>,
    pub wall_s: BTreeMap<&'static str, f64>,
    /// The plan's notes: the rule applied and its evidence.
    pub notes: Vec<String>,
    /// Relative to the output folder.
    pub model_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Loss {
    /// Mean next-token NLL over the evaluation windows, nats per token.
    pub loss: f64,
    pub perplexity: f64,
}

#[derive(Debug, Serialize)]
pub struct Healed {
    pub steps: u64,
    pub tokens: u64,
    pub eval: Loss,
    pub final_train_loss: f64,
    /// `(step, training loss)` of every step.
    pub curve: Vec<(u64, f64)>,
}

impl Loss {
    fn new(loss: f64) -> Self {
        Loss { loss, perplexity: loss.exp() }
    }
}

/// A recipe of the comparison, checked.
struct Method {
    label: String,
    path: PathBuf,
    recipe: Recipe,
}

pub fn run(c: &Compare, registry: &Registry, progress: &dyn Fn(&str)) -> Result<Comparison> {
    let methods = load_methods(c, registry)?;
    let analyzers = analyzers_to_run(c, &methods, registry)?;
    let device = cuda::device(c.device.as_deref().unwrap_or("cpu"))?;
    let ckpt = Checkpoint::open(&c.model)?;
    if let Some((config, data)) = &c.heal {
        let run = heal_run(&c.model, data, &c.output, config)?;
        train::check_against(&run, &ckpt, train::Spelling::HealSet)?;
    }
    let (eval_ids, first) = eval_windows(&ckpt, &c.eval, c.eval_tokens, c.eval_windows, "--eval-tokens")?;
    let windows = match &c.calibration {
        Some(cal) => Windows::load(&cal.file, || Tokenizer::for_model(&c.model, &ckpt.arch.family), ckpt.dims.vocab, &c.sampling)?,
        None => {
            let (n, t) = c.sampling.windows_and_tokens();
            let (n, t) = (n.min(eval_ids.size()[0] as usize), t.min(c.eval_tokens));
            let ids = eval_ids.narrow(0, 0, n as i64).narrow(1, 0, t as i64).contiguous();
            Windows { ids, source: format!("the first {n} evaluation windows, their first {t} tokens") }
        }
    };
    pipeline::check_output_outside(&c.output, &c.model)?;
    let input = std::path::absolute(&c.model)?;
    // Last, so that nothing is created when a check above fails.
    let staging = stage(&c.output, c.force, RUN_RECORD)?;
    let dir = staging.path().to_path_buf();
    let session = Session::new(&ckpt, device, c.precision.kind(), Some(windows));

    // The evidence, once for every method.
    let mut reports = Reports::default();
    for (name, config) in &analyzers {
        let started = Instant::now();
        progress(&format!("analyzer {name} …"));
        reports.insert(pipeline::analyze(&registry.get(name, Some(ItemKind::Analyzer))?, &session, config)?);
        progress(&format!("analyzer {name} done in {:.1} s", started.elapsed().as_secs_f64()));
    }

    let started = Instant::now();
    progress("reference: evaluating the input model …");
    let reference_loss = evaluate(&ckpt, device, &eval_ids, first)?;
    let mut reference = row("reference (input)", None, Regime::ZeroShot, &ckpt, vec![], c.eval_tokens, reference_loss);
    reference.wall_s.insert("eval", started.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    for m in &methods {
        rows.push(run_method(c, m, &session, &reports, registry, &dir, device, &eval_ids, first, progress)?);
    }

    let comparison = Comparison {
        model: input,
        eval: json!({ "source": eval_source(&c.eval), "windows": eval_ids.size()[0], "tokens": c.eval_tokens, "first_predicted": first }),
        calibration: serde_json::to_value(&session.info().calibration)?,
        reference,
        methods: rows,
        definitions: definitions(),
    };
    write_report(&comparison, &reports, &ckpt, &dir)?;
    std::fs::write(dir.join("reports.json"), serde_json::to_string_pretty(&reports)? + "\n")?;
    if let Some(ids) = session.calibration_ids() {
        Tensor::write_safetensors(&[("input_ids", ids)], dir.join("calibration.safetensors"))?;
    }
    let all_steps = Recipe { model: Some(c.model.clone()), calibration: c.calibration.clone(), ..Recipe::default() };
    let record = pipeline::record(&all_steps, registry, &ckpt, session.info(), None, &reports)?;
    std::fs::write(dir.join(RUN_RECORD), serde_json::to_string_pretty(&record)? + "\n")?;
    drop(session);
    staging.commit()?;
    Ok(comparison)
}

/// Reads every recipe; each makes a model from strategies (and may analyze first), nothing else.
fn load_methods(c: &Compare, registry: &Registry) -> Result<Vec<Method>> {
    if c.recipes.is_empty() {
        bail!("give the recipes to compare: --recipes A.toml B.toml …");
    }
    let mut methods: Vec<Method> = Vec::new();
    for path in &c.recipes {
        let recipe = Recipe::load(path)?;
        let label = path.file_stem().map_or("recipe".into(), |s| s.to_string_lossy().into_owned());
        if methods.iter().any(|m| m.label == label) {
            bail!("two recipes are called `{label}`: compare labels methods by file name, so rename one");
        }
        let what = |why: &str| format!("{}: {why}", path.display());
        if recipe.inheritune.is_some() {
            bail!(what("an `[inheritune]` loop cannot be compared here; compare its first round's recipe (a cutoff) with --heal-steps"));
        }
        if recipe.steps.iter().any(|s| s.train.is_some()) {
            bail!(what("it has a train step; compare trains every method alike: drop the step and use --heal-steps"));
        }
        if !recipe.steps.iter().any(|s| s.strategy.is_some()) {
            bail!(what("it has no strategy step, so it makes no model to compare"));
        }
        for step in &recipe.steps {
            if let StepKind::Item(name, kind) = step.kind().with_context(|| what("a bad step"))? {
                registry.get(name, Some(kind)).with_context(|| what("an unknown item"))?;
            }
        }
        methods.push(Method { label, path: std::path::absolute(path)?, recipe });
    }
    Ok(methods)
}

/// Every analyzer any recipe runs or needs, and those asked for with -a, each with the one config it runs with.
fn analyzers_to_run(c: &Compare, methods: &[Method], registry: &Registry) -> Result<Vec<(String, Value)>> {
    // (analyzer, its config, where it was first asked for)
    let mut chosen: Vec<(String, Value, String)> = Vec::new();
    fn add(chosen: &mut Vec<(String, Value, String)>, name: &str, config: &Value, by: &str) -> Result<()> {
        match chosen.iter().find(|(n, _, _)| n == name) {
            Some((_, other, first)) if other != config => {
                bail!("`{name}` runs with different settings in {first} and {by}; compare analyzes once, so give it the same settings")
            }
            Some(_) => Ok(()),
            None => {
                chosen.push((name.to_string(), config.clone(), by.to_string()));
                Ok(())
            }
        }
    }
    for name in &c.analyzers {
        registry.get(name, Some(ItemKind::Analyzer))?;
        add(&mut chosen, name, &json!({}), "-a")?;
    }
    for m in methods {
        for step in &m.recipe.steps {
            match (&step.analyzer, &step.strategy) {
                (Some(a), _) => add(&mut chosen, a, &step.config, &m.label)?,
                (_, Some(s)) => {
                    for need in registry.get(s, Some(ItemKind::Strategy))?.needs(&step.config)? {
                        // A need is met by the analyzer with whatever settings it already runs with.
                        if !chosen.iter().any(|(n, _, _)| *n == need) {
                            add(&mut chosen, &need, &json!({}), &m.label)?;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(chosen.into_iter().map(|(n, c, _)| (n, c)).collect())
}

#[allow(clippy::too_many_arguments)]
fn run_method(
    c: &Compare,
    m: &Method,
    session: &Session,
    reports: &Reports,
    registry: &Registry,
    dir: &Path,
    device: Device,
    eval_ids: &Tensor,
    first: i64,
    progress: &dyn Fn(&str),
) -> Result<Row> {
    let ckpt = session.ckpt;
    let mut wall = BTreeMap::new();
    let started = Instant::now();
    progress(&format!("{}: planning …", m.label));
    // The analyses are shared: the recipe's own analyzer steps ran above, with the same settings.
    let strategies = Recipe { steps: m.recipe.steps.iter().filter(|s| s.strategy.is_some()).cloned().collect::<Vec<Step>>(), ..m.recipe.clone() };
    let dtype = m.recipe.dtype.as_deref().map(crate::model::checkpoint::parse_dtype).transpose()?;
    let outcome = pipeline::execute(&strategies, reports.clone(), dtype, session, registry, &|line| progress(&format!("{}: {line}", m.label)))
        .with_context(|| format!("recipe {}", m.path.display()))?;
    let (Some(plan), Some(config)) = (&outcome.plan, &outcome.config) else { bail!("recipe {} made no plan", m.path.display()) };
    wall.insert("plan", started.elapsed().as_secs_f64());

    let started = Instant::now();
    let method_dir = dir.join("methods").join(&m.label);
    std::fs::create_dir_all(&method_dir)?;
    std::fs::write(method_dir.join("recipe.toml"), m.recipe.to_toml()?)?;
    let record = pipeline::record(&m.recipe, registry, ckpt, session.info(), Some(plan), reports)?;
    let folder = Folder { config, companions_from: Some(&ckpt.dir), extra_files: vec![], record: &record };
    let model_dir = method_dir.join("model");
    write_model(&model_dir, false, folder, surgery::resulting_tensors(ckpt, plan, dtype, 0), DEFAULT_SHARD_BYTES)?;
    wall.insert("write", started.elapsed().as_secs_f64());

    let started = Instant::now();
    progress(&format!("{}: evaluating ({} layers) …", m.label, plan.layers.len()));
    let made = Checkpoint::open(&model_dir)?;
    let zero_shot = evaluate(&made, device, eval_ids, first)?;
    wall.insert("eval", started.elapsed().as_secs_f64());

    let regime = m.recipe.regime.unwrap_or(if plan.reinit.iter().any(|r| r == "all") { Regime::Retrain } else { Regime::ZeroShot });
    let removed = pipeline::removal(&m.label, plan, ckpt.dims.layers).layers;
    let mut row = row(&m.label, Some(m.path.clone()), regime, &made, removed, c.eval_tokens, zero_shot);
    row.notes = plan.notes.clone();
    row.model_dir = Some(PathBuf::from("methods").join(&m.label).join("model"));

    if let Some((config, data)) = &c.heal {
        let started = Instant::now();
        progress(&format!("{}: healing for {} steps …", m.label, config.steps));
        let run = heal_run(&model_dir, data, &method_dir.join("train"), config)?;
        let summary = train::start(&run, device, false)?;
        let healed_ckpt = Checkpoint::open(&summary.model)?;
        let eval = evaluate(&healed_ckpt, device, eval_ids, first)?;
        let curve = train::read_log(&run.output)?.into_iter().map(|(s, l, _)| (s, l)).collect();
        row.healed = Some(Healed { steps: summary.steps, tokens: summary.tokens, eval: Loss::new(eval), final_train_loss: summary.final_loss, curve });
        wall.insert("heal", started.elapsed().as_secs_f64());
    }
    row.wall_s.extend(wall);
    Ok(row)
}

/// The training run that heals `model`: the comparison's settings, no validation of its own (the comparison
/// evaluates every model on its own windows).
fn heal_run(model: &Path, data: &Path, output: &Path, config: &TrainConfig) -> Result<train::Run> {
    let abs = |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
    Ok(train::Run { model: abs(model)?, data: abs(data)?, val: None, output: abs(output)?, config: config.clone() })
}

fn evaluate(ckpt: &Checkpoint, device: Device, ids: &Tensor, first: i64) -> Result<f64> {
    let net = Transformer::load(ckpt, device, Kind::Float)?;
    Ok(mean_nll(&net, ids, first)?.0)
}

fn row(label: &str, recipe: Option<PathBuf>, regime: Regime, ckpt: &Checkpoint, removed: Vec<usize>, context: usize, loss: f64) -> Row {
    let d = &ckpt.dims;
    let t = &ckpt.arch.tensors;
    let embeddings: usize = ckpt
        .names()
        .filter(|n| *n == t.embedding || Some(*n) == t.position_embedding.as_deref())
        .filter_map(|n| ckpt.entry(n).ok().map(|e| e.shape.iter().product::<usize>()))
        .sum();
    // Kaplan et al. (2020): 2N + 2·L·T·d_attn, N the parameters outside the embeddings (the head counts).
    let head = if ckpt.tied() { d.vocab * d.d_model } else { 0 };
    let n = ckpt.parameters() - embeddings + head;
    let flops = 2.0 * n as f64 + 2.0 * (d.layers * context * d.heads * d.head_dim) as f64;
    Row {
        label: label.to_string(),
        recipe,
        regime,
        layers: d.layers,
        removed,
        params: ckpt.parameters(),
        flops_per_token: flops,
        zero_shot: Loss::new(loss),
        healed: None,
        wall_s: BTreeMap::new(),
        notes: vec![],
        model_dir: None,
    }
}

fn eval_source(data: &EvalData) -> String {
    match data {
        EvalData::Text { path, bos } => format!("{} (text{})", path.display(), if *bos { ", BOS first" } else { "" }),
        EvalData::Tokens(path) => format!("{} (tokens)", path.display()),
    }
}

fn definitions() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("loss", "mean next-token NLL over the evaluation windows, nats per predicted token; perplexity = exp(loss)"),
        ("flops_per_token", "forward FLOPs per token, 2N + 2·L·T·d_attn (Kaplan et al. 2020): N the parameters outside the embeddings (a tied head counts), T the evaluation context"),
        ("zero-shot", "the method's model as written, before any training: pruning methods are meant to be used like this"),
        ("retrain", "an initialisation for training (Inheritune, a fresh model): judge it after healing, not zero-shot"),
        ("healed", "after --heal-steps of training, the same steps, batches and settings for every method"),
    ])
}

/// compare.md, compare.html (figures inline), compare.json and the figures.
fn write_report(c: &Comparison, reports: &Reports, ckpt: &Checkpoint, dir: &Path) -> Result<()> {
    let name = pipeline::model_name(&ckpt.dir);
    let mut figures = Vec::new();
    let removals: Vec<plots::Removal> = c.methods.iter().map(|m| plots::Removal { label: m.label.clone(), layers: m.removed.clone() }).collect();
    if pipeline::write_profile(reports, &name, &removals, ", and the layers each method removes", dir)? {
        figures.push(("profile", "Layer profiles of every analyzer on the input model; the markers under the curves show the layers each method removes."));
    }
    let curves: Vec<plots::Curve> = c
        .methods
        .iter()
        .filter_map(|m| Some(plots::Curve { label: m.label.clone(), points: m.healed.as_ref()?.curve.iter().map(|&(s, l)| (s as f64, l)).collect() }))
        .collect();
    if !curves.is_empty() {
        let reference = [("reference, zero-shot eval".to_string(), c.reference.zero_shot.loss)];
        plots::loss_curves(&curves, &reference, &format!("{name}: healing, training loss per step"), dir, "healing")?;
        figures.push(("healing", "Training loss while healing, the same steps and batches for every method."));
    }
    let table = markdown_table(c);
    let mut md = format!("# Comparison on {}\n\n{table}\n", c.model.display());
    let _ = writeln!(md, "Evaluation: {} windows of {} tokens from {}.", c.eval["windows"], c.eval["tokens"], c.eval["source"].as_str().unwrap_or(""));
    for (k, v) in &c.definitions {
        let _ = writeln!(md, "- **{k}**: {v}");
    }
    md.push('\n');
    for m in &c.methods {
        let _ = writeln!(md, "## {}\n", m.label);
        for n in &m.notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    for (stem, caption) in &figures {
        let _ = writeln!(md, "![{caption}]({stem}.svg)\n\n{caption}\n");
    }
    scalpel_files::write_file(&dir.join("compare.md"), md.as_bytes())?;
    scalpel_files::write_file(&dir.join("compare.json"), (serde_json::to_string_pretty(c)? + "\n").as_bytes())?;
    scalpel_files::write_file(&dir.join("compare.html"), html(c, &table, &figures, dir)?.as_bytes())?;
    Ok(())
}

pub fn markdown_table(c: &Comparison) -> String {
    let healed = c.methods.iter().any(|m| m.healed.is_some());
    let mut t = String::from("| method | regime | layers | parameters | GFLOPs/token | zero-shot loss | zero-shot ppl |");
    if healed {
        t.push_str(" healed loss | healed ppl |");
    }
    t.push_str(" wall s |\n|---|---|---|---|---|---|---|");
    if healed {
        t.push_str("---|---|");
    }
    t.push_str("---|\n");
    for r in std::iter::once(&c.reference).chain(&c.methods) {
        let regime = match r.regime {
            Regime::ZeroShot => "zero-shot",
            Regime::Retrain => "retrain",
        };
        let _ = write!(
            t,
            "| {} | {regime} | {} | {:.1} M | {:.3} | {:.4} | {:.2} |",
            r.label,
            r.layers,
            r.params as f64 / 1e6,
            r.flops_per_token / 1e9,
            r.zero_shot.loss,
            r.zero_shot.perplexity
        );
        if healed {
            match &r.healed {
                Some(h) => {
                    let _ = write!(t, " {:.4} | {:.2} |", h.eval.loss, h.eval.perplexity);
                }
                None => t.push_str(" – | – |"),
            }
        }
        let _ = writeln!(t, " {:.1} |", r.wall_s.values().sum::<f64>());
    }
    t
}

/// A self-contained page: the table, the definitions and the figures' SVG inline.
fn html(c: &Comparison, table: &str, figures: &[(&str, &str)], dir: &Path) -> Result<String> {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut h = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>scalpel compare</title>\n<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}\
         figure svg{{max-width:100%;height:auto}}</style></head><body>\n<h1>Comparison on {}</h1>\n<table>\n",
        esc(&c.model.display().to_string())
    );
    for (i, line) in table.lines().filter(|l| !l.starts_with("|---")).enumerate() {
        let cell = if i == 0 { "th" } else { "td" };
        let cells: Vec<String> = line.trim_matches('|').split('|').map(|x| format!("<{cell}>{}</{cell}>", esc(x.trim()))).collect();
        let _ = writeln!(h, "<tr>{}</tr>", cells.concat());
    }
    h.push_str("</table>\n<ul>\n");
    for (k, v) in &c.definitions {
        let _ = writeln!(h, "<li><b>{}</b>: {}</li>", esc(k), esc(v));
    }
    h.push_str("</ul>\n");
    for m in &c.methods {
        let _ = writeln!(h, "<h2>{}</h2><ul>{}</ul>", esc(&m.label), m.notes.iter().map(|n| format!("<li>{}</li>", esc(n))).collect::<String>());
    }
    for (stem, caption) in figures {
        let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg")))?;
        let svg = svg.trim_start_matches(|c| c != '<').to_string();
        let svg = if svg.starts_with("<?xml") { svg.split_once("?>").map_or(svg.clone(), |(_, rest)| rest.to_string()) } else { svg };
        let _ = writeln!(h, "<figure>{svg}<figcaption>{}</figcaption></figure>", esc(caption));
    }
    h.push_str("</body></html>\n");
    Ok(h)
}
