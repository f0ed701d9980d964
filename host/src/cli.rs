//! Command-line interface: raw arguments become validated settings here, and nowhere else.

use crate::model::checkpoint::{parse_dtype, Checkpoint};
use crate::recipe::{self, Calibration, Recipe, Step};
use crate::{cuda, inspect, plugins};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use scalpel_sdk::abi::ItemManifest;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "scalpel", about = "Model surgery on decoder-only language models", long_version = long_version())]
pub struct Cli {
    /// Also load plugins from this folder (repeatable; after the built-in set and SCALPEL_PLUGIN_PATH).
    #[arg(long = "plugins", value_name = "DIR", global = true)]
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
        /// An analyzer or strategy name, e.g. attn-rank.
        name: String,
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
    /// Mean negative log-likelihood and perplexity over consecutive windows of a text file.
    Eval {
        /// An HF model folder (config.json + safetensors).
        model: PathBuf,
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// At most this many windows (0: the whole file).
        #[arg(long, default_value_t = 0)]
        windows: usize,
        /// Prepend the BOS token to each window.
        #[arg(long)]
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
        /// Analyzers to run, in order (default: attn-rank, attn-mass, attn-entropy).
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
        /// Store the new model as f32, f16 or bf16 (default: as the input).
        #[arg(long)]
        dtype: Option<String>,
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
        #[command(flatten)]
        out: OutputArgs,
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
    /// Windows to sample (N).
    #[arg(short = 'n', long, default_value_t = 100)]
    sequences: usize,
    /// Tokens per window (T).
    #[arg(short = 't', long, default_value_t = 100)]
    tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prepend BOS to each window (the paper does not).
    #[arg(long)]
    bos: bool,
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

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    let device = cuda::device(cli.device.as_deref().unwrap_or("cpu"))?;
    match cli.command {
        Command::Inspect { model } if model.extension().is_some_and(|e| e == "gguf") => return inspect::inspect_gguf(&model, cli.json),
        Command::Inspect { model } => return inspect::inspect(&Checkpoint::open(&model)?, cli.json),
        Command::Import { gguf, out, dtype, force } => return crate::import::import(&gguf, &out, parse_dtype(&dtype)?, force),
        Command::Generate { model, prompt, max_tokens, top_p, temperature, seed } => {
            let sampling = inspect::Sampling { top_p, temperature, seed };
            return inspect::generate(&Checkpoint::open(&model)?, device, &prompt, max_tokens, &sampling);
        }
        Command::Eval { model, text, tokens, windows, bos } => {
            return inspect::eval(&Checkpoint::open(&model)?, device, &text, tokens, windows, bos, cli.json)
        }
        Command::Tokenize { model, text } => {
            let ckpt = Checkpoint::open(&model)?;
            let ids = crate::model::tokenizer::Tokenizer::for_model(&model, &ckpt.arch.family)?.encode(&text)?;
            println!("{}", serde_json::to_string(&ids)?);
            return Ok(());
        }
        Command::DeviceCheck { model, windows, tokens } => return inspect::device_check(&Checkpoint::open(&model)?, device, windows, tokens, cli.json),
        _ => {}
    }
    let registry = plugins::Registry::load(&plugins::search_path(&cli.plugin_dirs));
    for w in registry.warnings() {
        eprintln!("warning: {w}");
    }
    let opts = |out: &OutputArgs, maps| recipe::Options { dry_run: out.dry_run, force: out.force, json: cli.json, maps };
    match cli.command {
        Command::Plugins => list_plugins(&registry, cli.json),
        Command::Describe { name } => describe(&registry, &name, cli.json),
        Command::Analyze { model, analyzers, common, calib, maps } => {
            let names = if analyzers.is_empty() { DEFAULT_ANALYZERS.iter().map(|s| s.to_string()).collect() } else { analyzers };
            let steps = steps(&names, false, &common.sets)?;
            let calibration = calib.calib.map(|file| Calibration { file, sequences: calib.sequences, tokens: calib.tokens, seed: calib.seed, bos: calib.bos });
            let recipe = Recipe { model: Some(model), output: common.out.output.clone(), device: cli.device.clone(), dtype: None, calibration, reports: None, steps };
            finish(recipe, &registry, common.print_recipe, &opts(&common.out, maps))
        }
        Command::Apply { model, strategies, reports, common, dtype } => {
            let steps = steps(&strategies, true, &common.sets)?;
            let recipe = Recipe { model: Some(model), output: common.out.output.clone(), device: cli.device.clone(), dtype, calibration: None, reports, steps };
            finish(recipe, &registry, common.print_recipe, &opts(&common.out, vec![]))
        }
        Command::Run { recipe: path, model, calib, out } => {
            let mut recipe = Recipe::load(&path)?;
            recipe.model = model.or(recipe.model);
            recipe.output = out.output.clone().or(recipe.output);
            if let Some(file) = calib {
                let c = recipe.calibration.get_or_insert(Calibration { file: file.clone(), sequences: 100, tokens: 100, seed: 0, bos: false });
                c.file = file;
            }
            recipe.device = cli.device.clone().or(recipe.device);
            recipe::run(&recipe, &registry, &opts(&out, vec![]))
        }
        Command::Inspect { .. } | Command::Import { .. } | Command::Generate { .. } | Command::Eval { .. } | Command::DeviceCheck { .. } | Command::Tokenize { .. } => unreachable!(),
    }
}

/// The paper's three measurements.
const DEFAULT_ANALYZERS: [&str; 3] = ["attn-rank", "attn-mass", "attn-entropy"];

fn finish(recipe: Recipe, registry: &plugins::Registry, print_recipe: bool, opts: &recipe::Options) -> Result<()> {
    if print_recipe {
        print!("{}", recipe.to_toml()?);
        return Ok(());
    }
    recipe::run(&recipe, registry, opts)
}

/// One step per item, with `--set` values routed to their item.
fn steps(names: &[String], strategies: bool, sets: &[String]) -> Result<Vec<Step>> {
    let mut steps: Vec<Step> = names
        .iter()
        .map(|n| Step {
            analyzer: (!strategies).then(|| n.clone()),
            strategy: strategies.then(|| n.clone()),
            config: serde_json::json!({}),
        })
        .collect();
    for set in sets {
        let (key, value) = set.split_once('=').with_context(|| format!("--set {set}: expected KEY=VALUE"))?;
        let (item, key) = match key.rsplit_once('.') {
            Some((item, key)) => (Some(item), key),
            None => (None, key),
        };
        let target = match item {
            Some(item) => steps.iter_mut().find(|s| s.item().map(|(n, _)| n == item).unwrap_or(false)).with_context(|| format!("--set {set}: `{item}` is not one of the steps"))?,
            None if steps.len() == 1 => &mut steps[0],
            None => bail!("--set {set}: several items run; write ITEM.{key}={value}"),
        };
        target.config[key] = parse_value(value).with_context(|| format!("--set {set}"))?;
    }
    Ok(steps)
}

/// A value as TOML reads it (numbers, booleans, arrays, quoted strings); anything else is a plain string.
fn parse_value(text: &str) -> Result<Value> {
    let Ok(t) = toml::from_str::<toml::Table>(&format!("v = {text}")) else { return Ok(Value::from(text)) };
    if recipe::non_finite(&t["v"], "").is_some() {
        bail!("`{text}` is not a finite number (nan and inf are not settings)");
    }
    Ok(serde_json::to_value(&t["v"]).unwrap_or_else(|_| Value::from(text)))
}

fn parse_map(s: &str) -> Result<(usize, usize), String> {
    let (l, h) = s.split_once(':').ok_or("expected LAYER:HEAD")?;
    Ok((l.parse().map_err(|_| "LAYER must be a number")?, h.parse().map_err(|_| "HEAD must be a number")?))
}

fn list_plugins(registry: &plugins::Registry, json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = registry
            .items()
            .map(|it| {
                serde_json::json!({
                    "name": it.item.name, "kind": it.item.kind, "plugin": it.plugin.manifest.plugin,
                    "version": it.plugin.manifest.version, "library": it.plugin.path, "about": first_line(&it.item.doc),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = registry
        .items()
        .map(|it| {
            vec![
                it.item.name.clone(),
                it.item.kind.to_string(),
                format!("{} {}", it.plugin.manifest.plugin, it.plugin.manifest.version),
                first_line(&it.item.doc).to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "KIND", "PLUGIN", "DESCRIPTION"], &rows, Align::Left);
    println!();
    for p in &registry.plugins {
        println!("{} {}  {}", p.manifest.plugin, p.manifest.version, p.path.display());
    }
    Ok(())
}

fn describe(registry: &plugins::Registry, name: &str, json: bool) -> Result<()> {
    let it = registry.get(name, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(it.item)?);
        return Ok(());
    }
    println!("{} ({}, plugin {} {})\n", it.item.name, it.item.kind, it.plugin.manifest.plugin, it.plugin.manifest.version);
    println!("{}\n", it.item.doc);
    let fields = config_fields(it.item);
    if fields.is_empty() {
        println!("No settings.");
    } else {
        println!("Settings (--set KEY=VALUE):");
        print_table(&["KEY", "TYPE", "DEFAULT", "DESCRIPTION"], &fields, Align::Left);
    }
    Ok(())
}

/// One row per config field: key, type, default, doc, read off the item's JSON schema.
fn config_fields(item: &ItemManifest) -> Vec<Vec<String>> {
    let Some(props) = item.schema["properties"].as_object() else { return vec![] };
    props
        .iter()
        .map(|(key, p)| {
            let ty = schema_type(p, &item.schema);
            let default = p.get("default").map_or("-".to_string(), |d| d.to_string());
            let doc = p["description"].as_str().unwrap_or("").replace('\n', " ");
            vec![key.clone(), ty, default, doc]
        })
        .collect()
}

fn schema_type(p: &serde_json::Value, root: &serde_json::Value) -> String {
    if let Some(r) = p["$ref"].as_str() {
        let target = r.rsplit('/').next().unwrap_or(r);
        let def = &root["$defs"][target];
        if let Some(options) = def["enum"].as_array() {
            return options.iter().map(|o| o.as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join("|");
        }
        if let Some(options) = def["oneOf"].as_array() {
            let names: Vec<String> = options.iter().filter_map(|o| o["const"].as_str().or(o["enum"][0].as_str())).map(String::from).collect();
            if !names.is_empty() {
                return names.join("|");
            }
        }
        return target.to_string();
    }
    if let Some(options) = p["enum"].as_array() {
        return options.iter().map(|o| o.as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join("|");
    }
    match &p["type"] {
        serde_json::Value::String(t) if t == "array" => format!("list of {}", schema_type(&p["items"], root)),
        serde_json::Value::String(t) => t.clone(),
        serde_json::Value::Array(ts) => {
            let ts: Vec<&str> = ts.iter().filter_map(|t| t.as_str()).filter(|t| *t != "null").collect();
            format!("{} (optional)", ts.join("|"))
        }
        // Option<T> of a non-primitive T: anyOf [T, null].
        _ => match p["anyOf"].as_array() {
            Some(options) => {
                let inner: Vec<String> = options.iter().filter(|o| o["type"] != "null").map(|o| schema_type(o, root)).collect();
                format!("{} (optional)", inner.join("|"))
            }
            None => "any".into(),
        },
    }
}

fn first_line(doc: &str) -> &str {
    doc.lines().next().unwrap_or("").trim()
}

/// How `print_table` lines up its cells.
#[derive(Clone, Copy, PartialEq)]
pub enum Align {
    /// Text: left-aligned, the last column unpadded.
    Left,
    /// Numbers: every column right-aligned.
    Right,
}

/// The one terminal table of scalpel: columns two spaces apart, sized to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>], align: Align) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, &w))| match align {
                Align::Right => format!("{c:>w$}"),
                Align::Left if i == last => c.to_string(),
                Align::Left => format!("{c:<w$}"),
            })
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header);
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
