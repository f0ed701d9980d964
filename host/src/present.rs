//! Everything scalpel shows on the terminal: tables, the layer profile, plans, written outputs,
//! plugin lists and item descriptions. Commands compute; this module presents.

use crate::pipeline::Finished;
use crate::plugins;
use anyhow::Result;
use scalpel_sdk::abi::ItemManifest;
use scalpel_sdk::{Plan, Reports};
use serde_json::json;
use std::path::Path;

/// A recipe run: the profile and the analyzers' notes, the plan, what was written and trained.
pub fn finished(f: &Finished, json: bool, dry_run: bool) -> Result<()> {
    let o = &f.outcome;
    let (ckpt_layers, layers_key) = (o.input_layers, o.layers_key.as_str());
    if json {
        // One JSON document per part, as each part has always printed: the reports, the plan, the training.
        if !o.reports.0.is_empty() {
            println!("{}", serde_json::to_string_pretty(&o.reports)?);
        }
        if o.plan.is_some() {
            println!("{}", serde_json::to_string_pretty(&json!({ "plan": o.plan, "config": o.config }))?);
        }
        if let Some(t) = &f.trained {
            println!("{}", serde_json::to_string_pretty(t)?);
        }
        return Ok(());
    }
    if !o.reports.0.is_empty() {
        print_profile(&o.reports, o.plan.as_ref(), ckpt_layers);
        for r in o.reports.0.values() {
            for n in &r.notes {
                println!("{}: {n}", r.analyzer);
            }
        }
    }
    if let (Some(plan), Some(config)) = (&o.plan, &o.config) {
        println!("\nplan: {ckpt_layers} layers -> {} layers", plan.layers.len());
        println!("  output layer <- input layer: {}", describe_sources(plan));
        for (j, l) in plan.layers.iter().enumerate().filter(|(_, l)| !l.edits.is_empty()) {
            println!("  output layer {j}: {:?}", l.edits);
        }
        for n in &plan.notes {
            println!("  why: {n}");
        }
        for w in &o.warnings {
            println!("  note: {w}");
        }
        println!("  config.json: {layers_key} {ckpt_layers} -> {}", config[layers_key]);
    }
    if dry_run {
        println!("dry run: nothing written");
    }
    if let Some(dest) = &f.written {
        written(dest)?;
    }
    if let Some(t) = &f.trained {
        println!(
            "\ntrained {} steps, {} tokens, {:.1} s: loss {:.4}{}; model in {}",
            t.steps,
            t.tokens,
            t.elapsed_s,
            t.final_loss,
            t.val_loss.map_or(String::new(), |v| format!(", validation loss {v:.4}")),
            t.model.display()
        );
    }
    Ok(())
}

/// The rounds of an Inheritune run and why it stopped.
pub fn inheritune(state: &crate::inheritune::State, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(state)?);
        return Ok(());
    }
    println!("\n{}", crate::inheritune::summary_table(state));
    written(&state.settings.output)
}

/// The table of a comparison and the files it wrote.
pub fn comparison(c: &crate::compare::Comparison, output: &Path, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    println!("\n{}", crate::compare::markdown_table(c));
    written(output)
}

/// The files of an output folder, one line per stem: `profile.{csv,png,svg}`.
pub fn written(dest: &Path) -> Result<()> {
    println!("\nwritten to {}:", dest.display());
    let mut stems: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for entry in std::fs::read_dir(dest)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (stem, ext) = name.rsplit_once('.').map_or((name.clone(), String::new()), |(s, e)| (s.to_string(), e.to_string()));
        stems.entry(stem).or_default().push(ext);
    }
    for (stem, mut exts) in stems {
        exts.sort();
        let shown = match exts.as_slice() {
            _ if dest.join(&stem).join("config.json").is_file() => format!("{stem}/  (the new model: an HF folder)"),
            _ if dest.join(&stem).is_dir() => format!("{stem}/"),
            [e] if e.is_empty() => stem.clone(),
            [e] => format!("{stem}.{e}"),
            _ => format!("{stem}.{{{}}}", exts.join(",")),
        };
        println!("  {shown}");
    }
    Ok(())
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
    print_table(&header, &rows, Align::Right);
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
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

pub fn list_plugins(registry: &plugins::Registry, json: bool) -> Result<()> {
    if json {
        let items: Vec<_> = registry
            .items()
            .map(|it| {
                serde_json::json!({
                    "name": it.item.name, "kind": it.item.kind, "plugin": it.plugin.manifest.plugin,
                    "version": it.plugin.manifest.version, "library": it.plugin.path, "about": first_line(&it.item.doc),
                    "default": it.item.by_default,
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
                // `analyze` runs the default analyzers when none is named.
                if it.item.by_default { format!("{} (default)", it.item.kind) } else { it.item.kind.to_string() },
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

pub fn describe(registry: &plugins::Registry, name: &str, json: bool) -> Result<()> {
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
