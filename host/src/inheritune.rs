//! `scalpel inheritune`: the method of the paper, end to end. Profile the reference, inherit its first
//! l blocks, train, compare with the reference's validation loss, and while the small model is worse,
//! grow it by Δ blocks and train again.
//!
//! Every cut and growth is a recipe run through the same plugin items as `scalpel apply` (any strategy,
//! third-party ones included), and every training run is a `scalpel train` run. The run folder holds
//! `round-K/` (the round's model, reports and `train/` run), `inheritune.json` (settings and rounds),
//! `summary.md` and `rounds.{png,svg,csv}`. A killed run resumes at the round and step it reached.
//!
//! Two readings of growth, since the paper's text and the authors' logs differ:
//! - `restart`: round K inherits the reference's first l + (K-1)Δ blocks afresh (the authors' logs);
//! - `warm`: round K grows round K-1's trained model with a strategy (`stack` of its top Δ blocks by
//!   default, or `duplicate` with zeroed copies, or any other).

use crate::model::{Checkpoint, Transformer};
use crate::pipeline;
use crate::plots;
use crate::plugins::Registry;
use crate::recipe::{Calibration, Options, Recipe, Step};
use crate::train::{self, TrainConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::Kind;

/// Where the first round's depth comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    /// The analyzers profile the reference and `cutoff` picks l (falling back to L/2, with the evidence).
    Auto,
    /// l = L/2, the paper's default.
    Half,
    /// l given.
    #[serde(untagged)]
    Layers(usize),
}

impl std::str::FromStr for StartAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(StartAt::Auto),
            "half" => Ok(StartAt::Half),
            n => n.parse().map(StartAt::Layers).map_err(|_| format!("`{n}`: use auto, half or a number of layers")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Growth {
    /// Each round inherits the reference's first l + Δ blocks afresh.
    Restart,
    /// Each round grows the previous round's trained model.
    Warm,
}

/// When the small model is good enough.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The reference's own validation loss.
    Ref,
    #[serde(untagged)]
    Loss(f64),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ref" => Ok(Target::Ref),
            v => v.parse::<f64>().ok().filter(|v| v.is_finite()).map(Target::Loss).ok_or_else(|| format!("`{v}`: use ref or a loss value")),
        }
    }
}

/// The loop's own settings: a recipe's `[inheritune]` table, or `scalpel inheritune`'s flags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Loop {
    pub start: StartAt,
    /// Blocks added per round (Δ).
    pub grow: usize,
    pub max_rounds: usize,
    pub growth: Growth,
    pub target: Target,
    /// The strategy that inherits blocks, and its settings (`keep` is set by the loop).
    pub cut: String,
    pub cut_config: Value,
    /// The strategy that grows a trained model (`warm`), and its settings.
    pub grow_with: String,
    pub grow_config: Value,
}

impl Default for Loop {
    fn default() -> Self {
        Loop {
            start: StartAt::Half,
            grow: 2,
            max_rounds: 3,
            growth: Growth::Restart,
            target: Target::Ref,
            cut: "cutoff".into(),
            cut_config: json!({}),
            grow_with: "stack".into(),
            grow_config: json!({}),
        }
    }
}

/// Everything a run needs; kept in `inheritune.json` so that `--resume` continues with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub reference: PathBuf,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    /// Calibration text (or `[N, T]` ids) for `start = auto`; default: windows of the validation data.
    pub calib: Option<PathBuf>,
    pub output: PathBuf,
    #[serde(flatten)]
    pub method: Loop,
    /// Training of every round: `steps` is steps per round.
    pub train: TrainConfig,
    pub device: Option<String>,
}

impl Settings {
    /// A recipe with an `[inheritune]` table: `model` is the reference, its train step trains each round.
    pub fn from_recipe(r: &Recipe) -> Result<Self> {
        let abs = |p: &Option<PathBuf>, what: &str| -> Result<PathBuf> {
            let p = p.as_ref().with_context(|| format!("the Inheritune recipe needs `{what}`"))?;
            Ok(std::path::absolute(p)?)
        };
        let (Some(mut train), 1) = (r.steps.iter().find_map(|s| s.train.clone()), r.steps.len()) else {
            bail!("an Inheritune recipe has exactly one step, `train = {{ … }}` (the training of each round); cut and growth are set in [inheritune]");
        };
        // What the loop would not read is refused, not dropped: it once ran without a word of these.
        for (key, given) in [("dtype", r.dtype.is_some()), ("reports", r.reports.is_some()), ("regime", r.regime.is_some())] {
            if given {
                bail!("the Inheritune loop does not read `{key}` (every round is a float32 cutoff of the reference, trained): remove it from the recipe");
            }
        }
        let method = r.inheritune.clone().unwrap_or_default();
        if let Some(c) = &r.calibration {
            if method.start != StartAt::Auto {
                bail!("the calibration {} is read only to choose the first depth (`start = \"auto\"`, --start auto): remove it, or start at auto", c.file.display());
            }
            if c.sequences.is_some() || c.tokens.is_some() || c.seed != 0 || c.bos || c.precision != Default::default() {
                bail!("the Inheritune loop reads only the calibration's `file` (all of its windows of token ids, or 100 windows of 100 tokens of text, as the paper, in float32): remove `sequences`, `tokens`, `seed`, `bos` and `precision`, or give [N, T] ids made to measure");
            }
        }
        if train.eval_every == 0 {
            // Each round's curve needs a few validation points to be worth drawing.
            train.eval_every = (train.steps / 5).max(1);
        }
        Ok(Settings {
            reference: abs(&r.model, "model")?,
            data: abs(&r.data, "data")?,
            val: r.val.as_ref().map(std::path::absolute).transpose()?,
            calib: r.calibration.as_ref().map(|c| std::path::absolute(&c.file)).transpose()?,
            output: abs(&r.output, "output")?,
            method,
            train,
            device: r.device.clone(),
        })
    }
}

/// One finished round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub layers: usize,
    pub parameters: usize,
    pub steps: u64,
    pub tokens: u64,
    pub val_loss: f64,
    pub wall_s: f64,
}

/// `inheritune.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub settings: Settings,
    pub reference_layers: usize,
    pub reference_val_loss: f64,
    pub rounds: Vec<Round>,
    /// Why the loop stopped, once it has.
    pub stopped: Option<String>,
}

const STATE: &str = "inheritune.json";

/// Runs the loop in a new folder (`force`: replace an earlier run there).
pub fn run(s: Settings, registry: &Registry, force: bool, progress: &dyn Fn(&str)) -> Result<State> {
    let state = start(&s, force, progress)?;
    rounds(state, registry, progress)
}

/// Continues the run in `out` at the round and step it reached.
pub fn resume(out: &Path, device: Option<String>, registry: &Registry, progress: &dyn Fn(&str)) -> Result<State> {
    let text = scalpel_files::read_regular_string(&out.join(STATE)).with_context(|| format!("{} is not an inheritune run folder (no {STATE})", out.display()))?;
    let mut state: State = serde_json::from_str(&text).with_context(|| format!("{} is not a valid {STATE}", out.join(STATE).display()))?;
    // The run folder is wherever it is now (it may have been moved), on the device asked for now.
    state.settings.output = std::path::absolute(out)?;
    if device.is_some() {
        state.settings.device = device;
    }
    rounds(state, registry, progress)
}

fn rounds(mut state: State, registry: &Registry, progress: &dyn Fn(&str)) -> Result<State> {
    let out = state.settings.output.clone();
    let device = scalpel_sdk::cuda::device(state.settings.device.as_deref().unwrap_or("cpu"))?;
    let s = state.settings.clone();
    let total = state.reference_layers;
    let target = match s.method.target {
        Target::Ref => state.reference_val_loss,
        Target::Loss(v) => v,
    };
    while state.stopped.is_none() {
        let k = state.rounds.len() + 1;
        let dir = out.join(format!("round-{k}"));
        if !dir.join("model").is_dir() {
            progress(&format!("round {k}: making the model"));
            let recipe = round_recipe(&s, &state, &dir)?;
            pipeline::run(&recipe, registry, &Options { force: true, ..Options::default() }, progress)?;
        }
        let model = Checkpoint::open(&dir.join("model"))?;
        let layers = model.dims.layers;
        let run_dir = dir.join("train");
        let summary = if run_dir.join(train::SETTINGS).exists() {
            progress(&format!("round {k}: {layers} layers, continuing its training"));
            train::resume(&run_dir, device)?
        } else {
            progress(&format!("round {k}: {layers} layers, training {} steps", s.train.steps));
            let run = train::Run { model: dir.join("model"), data: s.data.clone(), val: s.val.clone(), output: run_dir.clone(), config: s.train.clone() };
            train::start(&run, device, false)?
        };
        let val_loss = summary.val_loss.context("the round's training reported no validation loss")?;
        state.rounds.push(Round {
            round: k,
            layers,
            parameters: model.parameters(),
            steps: summary.steps,
            tokens: summary.tokens,
            val_loss,
            wall_s: summary.elapsed_s,
        });
        state.stopped = if val_loss <= target {
            Some(format!("round {k} ({layers} layers) reached validation loss {val_loss:.4} ≤ target {target:.4}"))
        } else if layers >= total {
            Some(format!("round {k} has {layers} layers, the reference's depth ({total})"))
        } else if k >= s.method.max_rounds {
            Some(format!("the round limit (--max-rounds {k}) is reached; the last round has validation loss {val_loss:.4} > target {target:.4}"))
        } else {
            None
        };
        save_state(&out, &state)?;
    }
    present_files(&out, &state)?;
    Ok(state)
}

/// Creates the run folder: settings, and the reference's validation loss everything is compared with.
fn start(s: &Settings, force: bool, progress: &dyn Fn(&str)) -> Result<State> {
    if s.method.grow == 0 || s.method.max_rounds == 0 {
        bail!("--grow and --max-rounds must be at least 1");
    }
    let reference = Checkpoint::open(&s.reference)?;
    // Every round trains on this data with these settings, and a round's model has the reference's vocabulary and
    // context: checked here, a bad id or a too-short file no longer fails round 1 inside a run folder already made.
    // The loop sets eval_every itself; a missing validation split is named below as the loop's own need.
    let config = TrainConfig { eval_every: 0, ..s.train.clone() };
    let run = train::Run { model: s.reference.clone(), data: s.data.clone(), val: s.val.clone(), output: s.output.clone(), config };
    let data = train::check_against(&run, &reference, train::Spelling::Flags)?;
    let val = data.val.context("inheritune compares validation losses: the data has no validation split; give --val DATA")?;
    if let StartAt::Layers(l) = s.method.start {
        if l == 0 || l > reference.dims.layers {
            bail!("--start {l}: the reference has {} layers", reference.dims.layers);
        }
    }
    let device = scalpel_sdk::cuda::device(s.device.as_deref().unwrap_or("cpu"))?;
    progress("validation loss of the reference …");
    let windows = val.windows(s.train.seq, s.train.eval_windows)?;
    let net = Transformer::load(&reference, device, Kind::Float)?;
    let reference_val_loss = train::validation_loss(&net, &windows, s.train.batch)?;
    drop(net);
    progress(&format!("reference: {} layers, validation loss {reference_val_loss:.4}", reference.dims.layers));
    let staging = crate::model::write::stage(&s.output, force, STATE)?;
    let state = State { settings: s.clone(), reference_layers: reference.dims.layers, reference_val_loss, rounds: vec![], stopped: None };
    std::fs::write(staging.path().join(STATE), serde_json::to_string_pretty(&state)? + "\n")?;
    if s.method.start == StartAt::Auto && s.calib.is_none() {
        // The paper's analysis windows: N = 100 windows of T = 100 tokens of validation text.
        let calib = val.windows(100, 100)?;
        tch::Tensor::write_safetensors(&[("input_ids", &calib)], staging.path().join("calibration.safetensors"))?;
    }
    staging.commit()?;
    Ok(state)
}

/// The recipe that makes round `k`'s model: inherit from the reference (round 1, or `restart`), or grow
/// the previous round's trained model (`warm`).
fn round_recipe(s: &Settings, state: &State, dir: &Path) -> Result<Recipe> {
    let mut recipe = Recipe { output: Some(dir.to_path_buf()), device: s.device.clone(), ..Recipe::default() };
    let previous = state.rounds.last();
    match (previous, s.method.growth) {
        (Some(prev), Growth::Warm) => {
            recipe.model = Some(s.output.join(format!("round-{}", prev.round)).join("train/model"));
            recipe.steps.push(Step::strategy(&s.method.grow_with, grow_config(s, prev.layers, state.reference_layers)?));
        }
        _ => {
            recipe.model = Some(s.reference.clone());
            let mut config = s.method.cut_config.clone();
            let keep = match (previous, s.method.start) {
                (Some(prev), _) => Some((prev.layers + s.method.grow).min(state.reference_layers)),
                (None, StartAt::Layers(l)) => Some(l),
                (None, StartAt::Half) => Some(state.reference_layers / 2),
                (None, StartAt::Auto) => None,
            };
            match keep {
                Some(l) => config["keep"] = json!(l),
                None => {
                    // The strategy's own rule on the reference's profile (the analyzers it needs run first),
                    // L/2 when it finds nothing.
                    let file = s.calib.clone().unwrap_or_else(|| s.output.join("calibration.safetensors"));
                    recipe.calibration = Some(Calibration::of(file));
                    if config.get("fallback").is_none() {
                        config["fallback"] = json!("half");
                    }
                }
            }
            recipe.steps.push(Step::strategy(&s.method.cut, config));
        }
    }
    Ok(recipe)
}

/// Settings that grow a model of `layers` blocks by Δ with the built-in strategies (the top Δ blocks
/// repeated, or duplicated in place as zeroed copies); a third-party strategy gets `--grow-set` as given.
fn grow_config(s: &Settings, layers: usize, total: usize) -> Result<Value> {
    let mut config = s.method.grow_config.clone();
    // Never past the reference's depth: the last round may grow by less.
    let delta = s.method.grow.min(layers).min(total.saturating_sub(layers)).max(1);
    match s.method.grow_with.as_str() {
        "stack" => {
            config["start"] = json!(layers - delta);
            config["times"] = json!(2);
        }
        "duplicate" if config.get("layers").is_none() && config.get("overlap").is_none() => {
            config["layers"] = json!((layers - delta..layers).collect::<Vec<_>>());
        }
        _ => {}
    }
    Ok(config)
}

fn save_state(out: &Path, state: &State) -> Result<()> {
    scalpel_files::write_file(&out.join(STATE), (serde_json::to_string_pretty(state)? + "\n").as_bytes())
}

/// `summary.md` and the rounds' loss curves against the reference's loss.
fn present_files(out: &Path, state: &State) -> Result<()> {
    scalpel_files::write_file(&out.join("summary.md"), summary_table(state).as_bytes())?;
    let mut curves = Vec::new();
    for r in &state.rounds {
        let log = train::read_log(&out.join(format!("round-{}/train", r.round)))?;
        let val: Vec<(f64, f64)> = log.iter().filter_map(|&(s, _, v)| Some((s as f64, v?))).collect();
        let (what, points) = if val.len() >= 2 { ("validation", val) } else { ("training", log.iter().map(|&(s, l, _)| (s as f64, l)).collect()) };
        curves.push(plots::Curve { label: format!("round {} ({} layers), {what}", r.round, r.layers), points });
    }
    let reference = [(format!("reference ({} layers) validation", state.reference_layers), state.reference_val_loss)];
    let name = crate::pipeline::model_name(&state.settings.reference);
    plots::loss_curves(&curves, &reference, &format!("Inheritune from {name}: loss per round"), out, "rounds")?;
    Ok(())
}

/// The rounds as a Markdown table, with the reference's loss beside each.
pub fn summary_table(state: &State) -> String {
    let mut t = String::from("| round | layers | parameters | steps | tokens | validation loss | reference loss | wall (s) |\n|---|---|---|---|---|---|---|---|\n");
    for r in &state.rounds {
        t += &format!(
            "| {} | {} | {:.1} M | {} | {} | {:.4} | {:.4} | {:.1} |\n",
            r.round,
            r.layers,
            r.parameters as f64 / 1e6,
            r.steps,
            r.tokens,
            r.val_loss,
            state.reference_val_loss,
            r.wall_s
        );
    }
    if let Some(why) = &state.stopped {
        t += &format!("\nStopped: {why}.\n");
    }
    t
}
