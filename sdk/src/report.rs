//! What analyzers return: named metrics per layer (and per head), each with its spread over sequences.

use crate::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What an analyzer found: named per-layer metrics, notes for the reader, and any extra data as JSON.
///
/// The host stores it under the name the analyzer is registered with (`analyzer`), where later strategies
/// find it through [`Reports::get`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The analyzer that produced it (filled in by the host).
    #[serde(default)]
    pub analyzer: String,
    pub metrics: Vec<Metric>,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Anything else worth keeping, as JSON.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// One quantity measured for every layer, and optionally for every head of every layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// snake_case, e.g. `max_rank`.
    pub name: String,
    /// One line on what it measures.
    #[serde(default)]
    pub about: String,
    /// `[layer]`
    pub per_layer: Vec<f64>,
    /// Standard deviation over sequences, `[layer]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_layer_spread: Option<Vec<f64>>,
    /// `[layer][head]`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_head: Option<Vec<Vec<f64>>>,
    /// Standard deviation over sequences, `[layer][head]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_head_spread: Option<Vec<Vec<f64>>>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }
    /// The report with `metric` added.
    pub fn metric(mut self, metric: Metric) -> Self {
        self.metrics.push(metric);
        self
    }
    /// The report with a note for the reader added (shown with the results, kept in reports.json).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    /// Checks that every metric has one finite value per layer of a model of `layers` blocks, as the host does.
    pub fn check(&self, layers: usize) -> Result<()> {
        for m in &self.metrics {
            crate::ensure!(
                m.per_layer.len() == layers,
                "analyzer `{}` reported {} values of `{}` for a model of {layers} layers",
                self.analyzer,
                m.per_layer.len(),
                m.name
            );
            if let Some(l) = m.per_layer.iter().position(|v| !v.is_finite()) {
                crate::bail!("analyzer `{}` reported a non-finite `{}` for layer {l}", self.analyzer, m.name);
            }
        }
        Ok(())
    }

    /// The metric called `name`, or an error listing the ones there are.
    pub fn get(&self, name: &str) -> Result<&Metric> {
        self.metrics.iter().find(|m| m.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.metrics.iter().map(|m| m.name.as_str()).collect();
            crate::anyhow!("report `{}` has no metric `{name}` (it has: {})", self.analyzer, have.join(", "))
        })
    }
}

impl Metric {
    /// A metric with one value per layer.
    pub fn per_layer(name: impl Into<String>, values: Vec<f64>) -> Self {
        Metric { name: name.into(), per_layer: values, ..Self::default() }
    }
    /// The metric with its one-line description.
    pub fn about(mut self, about: impl Into<String>) -> Self {
        self.about = about.into();
        self
    }
    /// The metric with its per-layer spread (standard deviation over sequences).
    pub fn spread(mut self, spread: Vec<f64>) -> Self {
        self.per_layer_spread = Some(spread);
        self
    }
    /// The metric with its per-head values `[layer][head]`, and their spread when there is one.
    pub fn heads(mut self, per_head: Vec<Vec<f64>>, spread: Option<Vec<Vec<f64>>>) -> Self {
        self.per_head = Some(per_head);
        self.per_head_spread = spread;
        self
    }
}

/// Reports of earlier steps, by analyzer name.
///
/// A report is found by the name its analyzer is registered under (`"attn-rank"`, `"block-influence"`), the
/// name a recipe step uses; the latest run of an analyzer wins. Its metrics are found by their own names
/// ([`Report::get`]): `reports.get("attn-rank")?.get("max_rank")?`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reports(pub BTreeMap<String, Report>);

impl Reports {
    /// The report of `analyzer`, or an error telling the user to run it first.
    pub fn get(&self, analyzer: &str) -> Result<&Report> {
        self.0.get(analyzer).ok_or_else(|| {
            crate::anyhow!("this needs the `{analyzer}` report: run the `{analyzer}` analyzer in an earlier step")
        })
    }
    /// Adds `report` under its `analyzer` name, replacing an earlier one of the same name.
    pub fn insert(&mut self, report: Report) {
        self.0.insert(report.analyzer.clone(), report);
    }
}
