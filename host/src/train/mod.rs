//! `scalpel train`: next-token training of any HF model folder (cut, grown, original, or the same
//! architecture freshly initialised) on tokenized text, with AdamW, warm-up and cosine decay,
//! gradient clipping, optional bf16 mixed precision, and checkpoints that survive `kill -9`.
//!
//! A run folder holds:
//! - `train.json`: the settings (what `--resume` continues with);
//! - `checkpoint/`: `model/` (an HF folder, float32 master weights), `optimizer.safetensors` and
//!   `trainer.json` (step, tokens, time), replaced as a whole at every save;
//! - `model` → `checkpoint/model`, for `scalpel eval OUT/model`;
//! - `log.jsonl`: one line per step (`step, loss, lr, grad_norm, tokens, elapsed_s`, plus `val_loss`);
//! - `loss.{png,svg,csv}` and `record.json` (inputs and their checksums).
//!
//! Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
//! interrupted one would have: its loss curve is the uninterrupted one.

mod adamw;
mod export;

pub use export::export;

use crate::data::Dataset;
use crate::model::checkpoint::{Checkpoint, Dims};
use crate::model::write::{stage, write_model, Folder, DEFAULT_SHARD_BYTES};
use crate::recipe::RUN_RECORD;
use crate::model::Transformer;
use crate::plots;
use adamw::{clip_grad_norm, AdamW};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Everything that decides what a training run computes. Each field is a `scalpel train` flag and
/// a key of a recipe's `train` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    pub steps: u64,
    /// Windows per micro-batch.
    #[arg(long, default_value_t = TrainConfig::default().batch)]
    pub batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = TrainConfig::default().seq)]
    pub seq: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = TrainConfig::default().grad_accum)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, default_value_t = TrainConfig::default().min_lr)]
    pub min_lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = TrainConfig::default().warmup)]
    pub warmup: u64,
    /// After warm-up: cosine decay to --min-lr, or constant.
    #[arg(long, value_enum, default_value_t = TrainConfig::default().schedule)]
    pub schedule: Schedule,
    /// AdamW weight decay (on matrices and embeddings only).
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = TrainConfig::default().clip)]
    pub clip: f64,
    /// Seeds the batches (and a random initialisation).
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    pub seed: u64,
    /// Random windows (true) or the data in order (false; a `[N, T]` tensor's rows, B per step).
    #[arg(long, default_value_t = TrainConfig::default().shuffle, action = clap::ArgAction::Set)]
    pub shuffle: bool,
    /// f32, or bf16 mixed precision (matrix products in bf16, float32 master weights).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().dtype)]
    pub dtype: Precision,
    /// Start from the model's weights (`pretrained`) or from a fresh initialisation of its config (`random`).
    #[arg(long, value_enum, default_value_t = TrainConfig::default().init)]
    pub init: InitFrom,
    /// Validation loss every this many steps (0: only at the end).
    #[arg(long, default_value_t = TrainConfig::default().eval_every)]
    pub eval_every: u64,
    /// Validation windows (of `seq` tokens) for the validation loss.
    #[arg(long, default_value_t = TrainConfig::default().eval_windows)]
    pub eval_windows: usize,
    /// Checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = TrainConfig::default().save_every)]
    pub save_every: u64,
}

/// The argument ids of `TrainConfig`'s flags, one by one: `--resume` refuses them (a run's settings are its
/// train.json's), and clap names only those given when they are listed singly rather than as their group.
pub const FLAGS: [&str; 17] =
    ["steps", "batch", "seq", "grad_accum", "lr", "min_lr", "warmup", "schedule", "weight_decay", "clip", "seed", "shuffle", "dtype", "init", "eval_every", "eval_windows", "save_every"];

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 100,
            batch: 8,
            seq: 256,
            grad_accum: 1,
            lr: 3e-4,
            min_lr: 3e-5,
            warmup: 10,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            clip: 1.0,
            seed: 0,
            shuffle: true,
            dtype: Precision::F32,
            init: InitFrom::Pretrained,
            eval_every: 0,
            eval_windows: 16,
            save_every: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The kind of a forward pass run wholly in this precision (analysis).
    pub fn kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// The kind matrix products run in under mixed precision; `None`: everything in float32.
    fn amp(self) -> Option<Kind> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(Kind::BFloat16),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitFrom {
    Pretrained,
    Random,
}

/// A run: what to train, on what, into which folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub model: PathBuf,
    pub data: PathBuf,
    /// Validation data, when not the data's own validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<PathBuf>,
    pub output: PathBuf,
    pub config: TrainConfig,
}

impl TrainConfig {
    /// The learning rate of step `step` (0-based): linear warm-up, then cosine decay to `min_lr` or constant.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
                let ratio = ((step - self.warmup) as f64 / span).min(1.0);
                self.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (self.lr - self.min_lr)
            }
        }
    }

    /// Refuses settings that cannot train `dims`' model, before anything is written; messages name the
    /// settings as `spelling` says the user sets them.
    pub fn check(&self, dims: &Dims, spelling: Spelling) -> Result<()> {
        let name = |key: &str| spelling.name(key);
        for (key, v) in [("steps", self.steps), ("batch", self.batch as u64), ("grad_accum", self.grad_accum as u64), ("eval_windows", self.eval_windows as u64)] {
            if v < 1 {
                bail!("{} must be at least 1", name(key));
            }
        }
        let set = |key: &str, value: &dyn std::fmt::Display| spelling.set(key, value);
        if self.seq < 2 {
            bail!("{}: a window needs at least 2 tokens", set("seq", &self.seq));
        }
        if self.seq > dims.context {
            bail!("{} exceeds the model's context of {} tokens: set {} or less", set("seq", &self.seq), dims.context, set("seq", &dims.context));
        }
        // A step's token count is kept in a u64, and a micro-batch's float32 logits alone must fit a real device.
        let step_tokens = (self.batch as u128) * (self.grad_accum as u128) * (self.seq as u128);
        if step_tokens > u64::MAX as u128 {
            bail!("{} × {} × {} tokens per step is more than can be counted: lower them", set("batch", &self.batch), set("grad_accum", &self.grad_accum), set("seq", &self.seq));
        }
        let logits = (self.batch as u128) * (self.seq as u128) * (dims.vocab as u128) * 4;
        if logits > MAX_LOGITS_BYTES {
            bail!(
                "{} of {} tokens needs {} GiB for its logits alone, more than any device holds: lower {} ({} gives N times larger steps)",
                set("batch", &self.batch),
                self.seq,
                logits >> 30,
                name("batch"),
                set("grad_accum", &"N")
            );
        }
        for (key, v) in [("lr", self.lr), ("min_lr", self.min_lr), ("weight_decay", self.weight_decay), ("clip", self.clip)] {
            if !v.is_finite() || v < 0.0 {
                bail!("{} must be a finite number ≥ 0, found {v}", name(key));
            }
        }
        Ok(())
    }
}

/// How the user sets the training settings, so that a message names the option they can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// `scalpel train --seq 64` (and a recipe's or train.json's `seq = 64`, which mirrors the flag).
    Flags,
    /// `scalpel compare --heal-set seq=64`.
    HealSet,
}

impl Spelling {
    /// How the user names the setting `key` (a `TrainConfig` field).
    pub fn name(self, key: &str) -> String {
        match self {
            Spelling::Flags => format!("--{}", key.replace('_', "-")),
            Spelling::HealSet => format!("--heal-set {key}"),
        }
    }

    /// How the user writes the setting `key` with `value`: `--seq 64`, `--heal-set seq=64`.
    pub fn set(self, key: &str, value: &dyn std::fmt::Display) -> String {
        match self {
            Spelling::Flags => format!("{} {value}", self.name(key)),
            Spelling::HealSet => format!("{}={value}", self.name(key)),
        }
    }
}

/// A micro-batch whose float32 logits exceed this (1 TiB) cannot run anywhere; beyond it the batch buffer
/// allocation itself aborts the process.
const MAX_LOGITS_BYTES: u128 = 1 << 40;

pub const SETTINGS: &str = "train.json";
const CHECKPOINT: &str = "checkpoint";
const LOG: &str = "log.jsonl";
/// A checkpoint's trainer state: its step, tokens and time.
const TRAINER_STATE: &str = "trainer.json";

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub elapsed_s: f64,
    pub model: PathBuf,
}

/// Trainer state kept in a checkpoint beside the weights and the optimizer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    tokens: u64,
    elapsed_s: f64,
}

/// Starts a run in a new folder (`force`: replace an earlier run there).
pub fn start(run: &Run, device: Device, force: bool) -> Result<Summary> {
    // Everything is checked before the folder exists, so a typo leaves nothing behind.
    let (ckpt, data) = check(run)?;
    if let Some(note) = dropout_note(&ckpt.config) {
        eprintln!("note: {note}");
    }
    let staging = stage(&run.output, force, RUN_RECORD)?;
    std::fs::write(staging.path().join(SETTINGS), serde_json::to_string_pretty(run)? + "\n")?;
    std::fs::write(staging.path().join(RUN_RECORD), serde_json::to_string_pretty(&record(run, &data)?)? + "\n")?;
    let out = staging.commit()?;
    let net = initial_net(run, &ckpt, device)?;
    train(run, &out, &ckpt, net, AdamW::new(run.config.weight_decay), &data, TrainerState::default())
}

/// The model and data of a run, with every setting checked against them.
pub fn check(run: &Run) -> Result<(Checkpoint, Dataset)> {
    let ckpt = Checkpoint::open(&run.model)?;
    let data = check_against(run, &ckpt, Spelling::Flags)?;
    Ok((ckpt, data))
}

/// The settings checked against an opened model (the run's, or one with its vocabulary and context), and the data.
pub fn check_against(run: &Run, ckpt: &Checkpoint, spelling: Spelling) -> Result<Dataset> {
    run.config.check(&ckpt.dims, spelling)?;
    open_data(run, ckpt, spelling)
}

/// The network a run starts from: the model's weights, or the seeded fresh initialisation of its config.
pub fn initial_net(run: &Run, ckpt: &Checkpoint, device: Device) -> Result<Transformer> {
    match run.config.init {
        InitFrom::Pretrained => Transformer::load(ckpt, device, Kind::Float),
        InitFrom::Random => Transformer::random(ckpt, device, Kind::Float, run.config.seed),
    }
}

/// scalpel trains without dropout, as modern pre-training does; a config that asks for some is told so.
pub fn dropout_note(config: &Value) -> Option<String> {
    let set: Vec<String> = ["resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"]
        .iter()
        .filter_map(|k| config[*k].as_f64().filter(|&p| p > 0.0).map(|p| format!("{k} = {p}")))
        .collect();
    (!set.is_empty()).then(|| format!("config.json sets dropout ({}); scalpel trains without dropout", set.join(", ")))
}

/// Continues the run in `out` from its last checkpoint, with the settings it was started with.
pub fn resume(out: &Path, device: Device) -> Result<Summary> {
    let settings = out.join(SETTINGS);
    let text = std::fs::read_to_string(&settings).with_context(|| format!("{} is not a training run folder (no {SETTINGS})", out.display()))?;
    let run: Run = serde_json::from_str(&text).with_context(|| format!("{} is not a valid {SETTINGS}", settings.display()))?;
    // The run folder is wherever it is now, even when it was moved since.
    let run = Run { output: out.to_path_buf(), ..run };
    let ckpt_dir = out.join(CHECKPOINT);
    if !ckpt_dir.join(TRAINER_STATE).exists() {
        // Killed before its first checkpoint: start again from the beginning, in place.
        eprintln!("{} has no checkpoint yet: starting from step 0", out.display());
        let (ckpt, data) = check(&run)?;
        let net = initial_net(&run, &ckpt, device)?;
        return train(&run, out, &ckpt, net, AdamW::new(run.config.weight_decay), &data, TrainerState::default());
    }
    // The checkpoint has everything the model was: resuming does not need the model it started from.
    let saved = Checkpoint::open(&ckpt_dir.join("model"))?;
    // The settings come from a file anyone may edit: they are checked as a new run's are.
    let data = check_against(&run, &saved, Spelling::Flags)?;
    let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(ckpt_dir.join(TRAINER_STATE))?).context("reading trainer.json")?;
    let net = Transformer::load(&saved, device, Kind::Float)?;
    let ckpt = saved;
    let mut opt = AdamW::new(run.config.weight_decay);
    let names: Vec<(&str, &Tensor)> = net.params.iter().filter(|(_, t)| t.is_floating_point()).collect();
    opt.load(&ckpt_dir.join("optimizer.safetensors"), &names)?;
    eprintln!("resuming {} at step {} of {}", out.display(), state.step, run.config.steps);
    train(&run, out, &ckpt, net, opt, &data, state)
}

fn open_data(run: &Run, ckpt: &Checkpoint, spelling: Spelling) -> Result<Dataset> {
    let mut data = Dataset::open(&run.data)?;
    data.check_tokenizer(&run.data, &ckpt.dir, &ckpt.arch.family)?;
    if let Some(val) = &run.val {
        let v = Dataset::open(val)?;
        v.check_tokenizer(val, &ckpt.dir, &ckpt.arch.family)?;
        data.val = Some(v.train);
    }
    if data.val.is_none() && run.config.eval_every > 0 {
        // Without a split the run would train on and never measure one, as if the setting were not given.
        let fix = match spelling {
            Spelling::Flags => "give validation data with --val, or train on a `scalpel data tokenize` folder (it has a validation split)",
            Spelling::HealSet => "give --data a `scalpel data tokenize` folder (it has a validation split), or leave eval_every out",
        };
        bail!("{} measures the validation loss, but {} has no validation split: {fix}", spelling.set("eval_every", &run.config.eval_every), run.data.display());
    }
    let vocab = ckpt.dims.vocab;
    for (split, tokens) in [("training", Some(&data.train)), ("validation", data.val.as_ref())] {
        if let Some(t) = tokens {
            // Checked before the run folder exists: a run that cannot draw one window leaves nothing behind.
            t.fits(run.config.seq, &spelling.name("seq")).with_context(|| format!("the {split} data"))?;
            if t.max_id() as usize >= vocab {
                bail!("the {split} data has token id {} but the model's vocabulary has {vocab}: it was tokenized for another model", t.max_id());
            }
        }
    }
    Ok(data)
}

fn train(run: &Run, out: &Path, ckpt: &Checkpoint, mut net: Transformer, mut opt: AdamW, data: &Dataset, mut state: TrainerState) -> Result<Summary> {
    let c = &run.config;
    net.params.train();
    net.params.set_amp(c.dtype.amp());
    let mut log = open_log(out, state.step)?;
    let val = match &data.val {
        Some(v) => Some(v.windows(c.seq, c.eval_windows)?),
        None => None,
    };
    let tokens_per_step = (c.batch * c.grad_accum * c.seq) as u64;
    let bar = ProgressBar::new(c.steps).with_style(ProgressStyle::with_template("train {bar:30} {pos}/{len} steps  {msg}  {eta} left").expect("a valid template"));
    bar.set_position(state.step);
    let started = Instant::now();
    let (elapsed_before, first_step) = (state.elapsed_s, state.step);
    // A resumed run reports what its log holds so far, even when no step is left to take.
    let logged = read_log(out).unwrap_or_default();
    let mut last_loss = logged.last().map_or(f64::NAN, |l| l.1);
    let mut last_val = logged.iter().rev().find_map(|l| l.2);
    let mut last_saved = state.step;
    while state.step < c.steps {
        let step = state.step;
        let lr = c.lr_at(step);
        let mut loss_sum = 0.0;
        for micro in 0..c.grad_accum as u64 {
            let ids = data.train.batch(step * c.grad_accum as u64 + micro, c.batch, c.seq, c.seed, c.shuffle)?;
            let loss = net.loss(&ids)?;
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                bar.abandon();
                bail!("the loss became {value} at step {}: training stopped. {}; lower --lr, keep --clip on{}", step + 1, kept(out, last_saved), if c.dtype == Precision::Bf16 { ", or train with --dtype f32" } else { "" });
            }
            (loss / c.grad_accum as f64).backward();
            loss_sum += value;
        }
        let loss = loss_sum / c.grad_accum as f64;
        let grad_norm = clip_grad_norm(net.params.iter().map(|(_, t)| t), c.clip);
        if !grad_norm.is_finite() {
            bar.abandon();
            bail!("the gradient norm became {grad_norm} at step {}: training stopped. {}", step + 1, kept(out, last_saved));
        }
        opt.update(net.params.iter(), lr);
        for (_, t) in net.params.iter() {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
        state.step += 1;
        state.tokens += tokens_per_step;
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        last_loss = loss;
        let mut line = json!({ "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens, "elapsed_s": state.elapsed_s });
        let at_end = state.step == c.steps;
        if let Some(v) = &val {
            if at_end || (c.eval_every > 0 && state.step % c.eval_every == 0) {
                // In float32 whatever the training precision, so rounds and the reference compare alike.
                net.params.set_amp(None);
                let vl = validation_loss(&net, v, c.batch)?;
                net.params.set_amp(c.dtype.amp());
                line["val_loss"] = json!(vl);
                last_val = Some(vl);
            }
        }
        // One write per line: a kill leaves whole lines, or at worst a torn last one that resuming drops.
        log.write_all(format!("{line}\n").as_bytes())?;
        let rate = (state.step - first_step) as f64 * tokens_per_step as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("loss {loss:.4}{}  {rate:.0} tok/s", last_val.map_or(String::new(), |v| format!("  val {v:.4}"))));
        bar.set_position(state.step);
        if at_end || (c.save_every > 0 && state.step % c.save_every == 0) {
            log.flush()?;
            save(out, ckpt, &net, &opt, &state, run)?;
            last_saved = state.step;
        }
    }
    bar.finish_and_clear();
    log.flush()?;
    let logged = read_log(out)?;
    let train_curve = plots::Curve { label: "training".into(), points: logged.iter().map(|&(s, l, _)| (s as f64, l)).collect() };
    let val_curve = plots::Curve { label: "validation".into(), points: logged.iter().filter_map(|&(s, _, v)| Some((s as f64, v?))).collect() };
    let curves: Vec<plots::Curve> = [train_curve, val_curve].into_iter().filter(|c| !c.points.is_empty()).collect();
    if curves.is_empty() {
        // Only when resuming a finished run whose log was unreadable (open_log said which lines): the model is done.
        eprintln!("warning: {} holds no losses: no loss curve drawn", out.join(LOG).display());
    } else {
        plots::loss_curves(&curves, &[], &format!("{}: training loss", crate::pipeline::model_name(&run.model)), out, "loss")?;
    }
    eprintln!(
        "trained {} steps ({} tokens) in {:.1} s: loss {last_loss:.4}{}",
        state.step,
        state.tokens,
        state.elapsed_s,
        last_val.map_or(String::new(), |v| format!(", validation loss {v:.4}"))
    );
    Ok(Summary { steps: state.step, tokens: state.tokens, final_loss: last_loss, val_loss: last_val, elapsed_s: state.elapsed_s, model: out.join("model") })
}

/// What a stopped run still has.
fn kept(out: &Path, last_saved: u64) -> String {
    if last_saved == 0 {
        "No checkpoint was written yet (use --save-every to keep some)".to_string()
    } else {
        format!("The last good checkpoint (step {last_saved}) in {} is intact", out.join(CHECKPOINT).display())
    }
}

/// Mean next-token loss over the validation windows, in batches.
pub fn validation_loss(net: &Transformer, windows: &Tensor, batch: usize) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut n) = (0.0, 0usize);
    for part in windows.split(batch as i64, 0) {
        let rows = part.size()[0] as usize;
        sum += net.loss(&part)?.double_value(&[]) * rows as f64;
        n += rows;
    }
    Ok(sum / n.max(1) as f64)
}

/// The log, cut back to the steps the checkpoint holds: a killed run may have logged steps past it, the last
/// line perhaps torn. Any other line that is no log entry (an edit, a disk error) is dropped with a warning
/// naming it: the log only draws the loss curve, so it never stops a run.
fn open_log(out: &Path, step: u64) -> Result<std::fs::File> {
    let path = out.join(LOG);
    let (kept, unreadable) = match std::fs::read(&path) {
        Ok(bytes) => cut_log(&bytes, step),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (vec![], vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !unreadable.is_empty() {
        let numbers: Vec<String> = unreadable.iter().map(|n| n.to_string()).collect();
        let what = if numbers.len() == 1 { format!("line {} is not a log entry", numbers[0]) } else { format!("lines {} are not log entries", numbers.join(", ")) };
        eprintln!("warning: {}: {what} (one JSON object with a step and a loss per line): dropped, so the loss curve lacks it", path.display());
    }
    scalpel_files::write_file(&path, &kept)?;
    Ok(std::fs::OpenOptions::new().append(true).open(&path)?)
}

/// The lines of a log up to checkpoint step `step`, and the numbers (from 1) of the lines that are no log
/// entry, other than a last one a kill tore (it has no newline) and blank ones.
fn cut_log(bytes: &[u8], step: u64) -> (Vec<u8>, Vec<usize>) {
    let (mut kept, mut unreadable) = (Vec::new(), Vec::new());
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        match log_entry(line) {
            Some((s, ..)) if s <= step => {
                kept.extend_from_slice(line.trim_ascii_end());
                kept.push(b'\n');
            }
            Some(_) => {}
            None if !line.ends_with(b"\n") || line.trim_ascii().is_empty() => {}
            None => unreadable.push(i + 1),
        }
    }
    (kept, unreadable)
}

/// `(step, loss, val_loss)` of one line of a log, if it is an entry.
fn log_entry(line: &[u8]) -> Option<(u64, f64, Option<f64>)> {
    let v: Value = serde_json::from_slice(line).ok()?;
    Some((v["step"].as_u64()?, v["loss"].as_f64()?, v["val_loss"].as_f64()))
}

/// `(step, loss, val_loss)` of every logged step.
pub fn read_log(out: &Path) -> Result<Vec<(u64, f64, Option<f64>)>> {
    let bytes = std::fs::read(out.join(LOG)).with_context(|| format!("reading {}", out.join(LOG).display()))?;
    Ok(bytes.split(|&b| b == b'\n').filter_map(log_entry).collect())
}

/// Weights, optimizer and trainer state, replaced as one folder: a kill leaves the old or the new.
fn save(out: &Path, ckpt: &Checkpoint, net: &Transformer, opt: &AdamW, state: &TrainerState, run: &Run) -> Result<()> {
    let staging = stage(&out.join(CHECKPOINT), true, TRAINER_STATE)?;
    let record = json!({
        "produced_by": format!("scalpel {} train", env!("CARGO_PKG_VERSION")),
        "trained_from": run.model,
        "init": run.config.init,
        "step": state.step,
        "tokens": state.tokens,
    });
    let mut config = ckpt.config.clone();
    config["torch_dtype"] = json!("float32");
    // Tokenizer and generation files come from the model being trained: a resumed run's is its last checkpoint, and
    // the folder the run started from may be gone by then (it once failed the first save after resuming).
    let folder = Folder { config: &config, companions_from: Some(&ckpt.dir), extra_files: vec![], record: &record };
    write_model(&staging.path().join("model"), false, folder, net.params.out_tensors(safetensors::Dtype::F32), DEFAULT_SHARD_BYTES)?;
    opt.save(&staging.path().join("optimizer.safetensors"))?;
    std::fs::write(staging.path().join(TRAINER_STATE), serde_json::to_string_pretty(state)? + "\n")?;
    staging.commit()?;
    let link = out.join("model");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(Path::new(CHECKPOINT).join("model"), &link)?;
    }
    Ok(())
}

fn record(run: &Run, data: &Dataset) -> Result<Value> {
    let mut inputs = serde_json::Map::new();
    for path in data.files.iter().chain([&run.model.join("config.json")]) {
        inputs.insert(std::path::absolute(path)?.display().to_string(), Value::from(crate::data::sources::sha256_file(path)?));
    }
    Ok(json!({
        "produced_by": format!("scalpel {}", env!("CARGO_PKG_VERSION")),
        "libtorch": scalpel_sdk::LIBTORCH_VERSION,
        "command": std::env::args().collect::<Vec<_>>(),
        "run": run,
        "data": data.source,
        "training_tokens": data.train.tokens(),
        "inputs_sha256": inputs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u64) -> String {
        format!("{}\n", json!({ "step": step, "loss": 4.5, "lr": 1e-4 }))
    }

    #[test]
    fn flags_lists_every_training_flag() {
        use clap::Args;
        let ids: Vec<String> = TrainConfig::augment_args(clap::Command::new("train")).get_arguments().map(|a| a.get_id().to_string()).collect();
        assert_eq!(ids, FLAGS, "FLAGS must name every TrainConfig flag, or --resume lets the missing one through unread");
    }

    #[test]
    fn settings_are_named_as_the_caller_spells_them() {
        // compare takes them as `--heal-set seq=`: a message naming `--seq` sent its users to a flag it has not.
        let dims = Dims { layers: 2, heads: 2, kv_heads: 2, d_model: 8, head_dim: 4, vocab: 100, context: 128, intermediate: 16 };
        let config = TrainConfig { seq: 200, ..TrainConfig::default() };
        let e = config.check(&dims, Spelling::Flags).unwrap_err().to_string();
        assert!(e.contains("--seq 200 exceeds") && e.contains("set --seq 128 or less"), "{e}");
        let e = config.check(&dims, Spelling::HealSet).unwrap_err().to_string();
        assert!(e.contains("--heal-set seq=200 exceeds") && e.contains("set --heal-set seq=128 or less") && !e.contains("--seq"), "{e}");
        let e = TrainConfig { grad_accum: 0, ..TrainConfig::default() }.check(&dims, Spelling::HealSet).unwrap_err().to_string();
        assert!(e.contains("--heal-set grad_accum must be at least 1"), "{e}");
        assert!(TrainConfig { seq: 128, ..TrainConfig::default() }.check(&dims, Spelling::HealSet).is_ok());
    }

    #[test]
    fn a_log_with_unreadable_lines_is_cut_with_them_named() {
        // Resuming a finished run whose log held garbage once failed drawing the loss curve, after the work.
        let torn = &entry(3)[..20];
        let log = format!("not json\n{}\u{7f}\n\n{}{{\"step\": 2}}\n{}{torn}", entry(1), entry(2), entry(3));
        let mut bytes = log.into_bytes();
        bytes.splice(0..0, [0xff, b'\n']);
        let (kept, unreadable) = cut_log(&bytes, 2);
        assert_eq!(String::from_utf8(kept).unwrap(), entry(1) + &entry(2), "the entries up to the checkpoint, nothing else");
        // Not the blank line 5, the step past the checkpoint (8) or the torn last line (9): a kill leaves those.
        assert_eq!(unreadable, vec![1, 2, 4, 7]);
        // The realistic case, a kill mid-write, cuts silently.
        let (kept, unreadable) = cut_log((entry(1) + torn).as_bytes(), 1);
        assert_eq!((String::from_utf8(kept).unwrap(), unreadable), (entry(1), vec![]));
    }
}
