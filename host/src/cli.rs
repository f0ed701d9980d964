//! Command-line interface: raw arguments become validated settings here, and nowhere else.

use crate::{cuda, plugins};
use anyhow::Result;
use clap::{Parser, Subcommand};
use scalpel_sdk::abi::ItemManifest;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "scalpel", about = "Model surgery on decoder-only language models", long_version = long_version())]
pub struct Cli {
    /// Also load plugins from this folder (repeatable; after the built-in set and SCALPEL_PLUGIN_PATH).
    #[arg(long = "plugins", value_name = "DIR", global = true)]
    plugin_dirs: Vec<PathBuf>,
    /// Where to compute: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", global = true)]
    device: String,
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
    let _device = cuda::device(&cli.device)?;
    let registry = plugins::Registry::load(&plugins::search_path(&cli.plugin_dirs));
    for w in registry.warnings() {
        eprintln!("warning: {w}");
    }
    match &cli.command {
        Command::Plugins => list_plugins(&registry, cli.json),
        Command::Describe { name } => describe(&registry, name, cli.json),
    }
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
    let rows: Vec<[String; 4]> = registry
        .items()
        .map(|it| {
            [
                it.item.name.clone(),
                it.item.kind.to_string(),
                format!("{} {}", it.plugin.manifest.plugin, it.plugin.manifest.version),
                first_line(&it.item.doc).to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "KIND", "PLUGIN", "DESCRIPTION"], &rows);
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
        print_table(&["KEY", "TYPE", "DEFAULT", "DESCRIPTION"], &fields);
    }
    Ok(())
}

/// One row per config field: key, type, default, doc, read off the item's JSON schema.
fn config_fields(item: &ItemManifest) -> Vec<[String; 4]> {
    let Some(props) = item.schema["properties"].as_object() else { return vec![] };
    props
        .iter()
        .map(|(key, p)| {
            let ty = schema_type(p, &item.schema);
            let default = p.get("default").map_or("-".to_string(), |d| d.to_string());
            let doc = p["description"].as_str().unwrap_or("").replace('\n', " ");
            [key.clone(), ty, default, doc]
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
        _ => p.get("anyOf").map_or("any".into(), |_| "see --json".into()),
    }
}

fn first_line(doc: &str) -> &str {
    doc.lines().next().unwrap_or("").trim()
}

pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut width = header.map(|h| h.len());
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
