//! Recipes: a model, calibration and training data, and a list of steps, each naming a plugin item
//! and its config, or a training run. `scalpel run` executes one (`pipeline.rs`); `analyze`, `apply`
//! and `train` build one from their flags and run it the same way, so every ad-hoc command has an
//! equivalent recipe (`--print-recipe`). This file is the recipe as data, nothing more.

use crate::train::{Precision, TrainConfig};
use anyhow::{bail, Context, Result};
use scalpel_sdk::ItemKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

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
    /// Training data for a `train` step: a `scalpel data tokenize` folder, an llm.c `.bin`, or `[N, T]` ids.
    pub data: Option<PathBuf>,
    /// Validation data for a `train` step (default: the data's own validation split).
    pub val: Option<PathBuf>,
    /// For `scalpel compare`: how to read the method's result (default: `retrain` for a fresh model, else `zero-shot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regime: Option<Regime>,
    /// Run the Inheritune loop (`model` is the reference; the `train` step trains each round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inheritune: Option<crate::inheritune::Loop>,
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
}

/// How a method's model is meant to be used, which decides how a comparison reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// Pruning: the model is used as written, at most lightly healed.
    ZeroShot,
    /// An initialisation for training (Inheritune, a fresh model): judged after training.
    Retrain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// A text file (windows are sampled from it), or `[N, T]` token ids as .safetensors / .npy.
    pub file: PathBuf,
    /// Windows sampled from text (default 100); of `[N, T]` token ids, the first N rows (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequences: Option<usize>,
    /// Tokens per sampled window (default 100); of token ids, the first T of each row (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    /// Prepend BOS to each window (the paper does not).
    #[serde(default)]
    pub bos: bool,
    /// The forward pass over the windows: f32, or bf16 (weights and activations; attention probabilities
    /// are still softmaxed in f32) where bf16 units make it faster.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
}

impl Calibration {
    /// `file` with every other setting at its default: what a calibration given only as a file means.
    pub fn of(file: PathBuf) -> Self {
        Calibration { file, sequences: None, tokens: None, seed: 0, bos: false, precision: Precision::F32 }
    }
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub analyzer: Option<String>,
    pub strategy: Option<String>,
    /// Train the model the steps before made (or the recipe's model): `train = { steps = 50, … }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainConfig>,
    #[serde(default = "empty_table", skip_serializing_if = "is_empty_table")]
    pub config: Value,
}

fn empty_table() -> Value {
    json!({})
}

fn is_empty_table(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.is_empty())
}

/// What a step does.
pub enum StepKind<'a> {
    /// A plugin item, by name.
    Item(&'a str, ItemKind),
    Train(&'a TrainConfig),
}

impl Step {
    pub fn analyzer(name: &str) -> Self {
        Step { analyzer: Some(name.into()), strategy: None, train: None, config: empty_table() }
    }
    pub fn strategy(name: &str, config: Value) -> Self {
        Step { analyzer: None, strategy: Some(name.into()), train: None, config }
    }
    pub fn train(config: TrainConfig) -> Self {
        Step { analyzer: None, strategy: None, train: Some(config), config: empty_table() }
    }

    pub fn kind(&self) -> Result<StepKind<'_>> {
        match (&self.analyzer, &self.strategy, &self.train) {
            (Some(a), None, None) => Ok(StepKind::Item(a, ItemKind::Analyzer)),
            (None, Some(s), None) => Ok(StepKind::Item(s, ItemKind::Strategy)),
            (None, None, Some(t)) => Ok(StepKind::Train(t)),
            _ => bail!("each step names exactly one `analyzer = \"…\"`, `strategy = \"…\"` or `train = {{ … }}`"),
        }
    }

    /// The plugin item this step runs, if it runs one.
    pub fn item(&self) -> Option<(&str, ItemKind)> {
        match self.kind() {
            Ok(StepKind::Item(name, kind)) => Some((name, kind)),
            _ => None,
        }
    }
}

/// `analyze` without `-a`: the analyzers the loaded plugins mark as default, in front of the steps.
pub fn add_default_analyzers(recipe: &mut Recipe, registry: &crate::plugins::Registry) -> Result<()> {
    let names = registry.default_analyzers();
    if names.is_empty() {
        bail!("no loaded plugin marks an analyzer as default: name one with -a NAME (`scalpel plugins` lists them)");
    }
    recipe.steps.splice(0..0, names.iter().map(|n| Step::analyzer(n)));
    Ok(())
}

/// How to run, beyond the recipe itself.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dry_run: bool,
    pub force: bool,
    /// Attention maps to draw, as (layer, head); empty: a default spread of layers.
    pub maps: Vec<(usize, usize)>,
    /// `analyze` named no analyzer: run those the plugins mark as default.
    pub default_analyzers: bool,
}

impl Recipe {
    /// The same recipe with every path absolute, for records that outlive the working directory.
    pub fn with_absolute_paths(&self) -> Result<Recipe> {
        let abs = |p: &Option<PathBuf>| p.as_deref().map(std::path::absolute).transpose();
        let mut r = self.clone();
        (r.model, r.output, r.reports, r.data, r.val) = (abs(&self.model)?, abs(&self.output)?, abs(&self.reports)?, abs(&self.data)?, abs(&self.val)?);
        if let Some(c) = &mut r.calibration {
            c.file = std::path::absolute(&c.file)?;
        }
        Ok(r)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = scalpel_files::read_regular_string(path).with_context(|| format!("reading recipe {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// A recipe from its text; `path` names it in messages, and relative paths in it are taken from its folder.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let recipe: Recipe = toml::from_str(text).with_context(|| format!("{} is not a valid recipe", path.display()))?;
        if let Some(key) = toml::from_str(text).ok().and_then(|t| non_finite(&toml::Value::Table(t), "")) {
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
        recipe.data.as_mut().map(rebase);
        recipe.val.as_mut().map(rebase);
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
        for p in [&mut r.model, &mut r.output, &mut r.reports, &mut r.data, &mut r.val].into_iter().flatten() {
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
pub const RUN_RECORD: &str = "record.json";

