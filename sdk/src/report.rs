//! What analyzers return: named metrics per layer (and per head), each with its spread over sequences.

use crate::{Plan, Result};
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
    /// How the host should draw this report; without it, the host plots the first metrics as they come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<Presentation>,
}

/// How a report wants to be shown: data the host reads, so that it never needs to know an analyzer by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Presentation {
    /// What the profile figure shows, e.g. "attention profile".
    pub title: String,
    /// The per-layer metrics that make the profile figure, in order.
    #[serde(default)]
    pub profile: Vec<String>,
    /// A per-layer flag metric (non-zero marks the layer), shaded in the figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<LayerMark>,
    /// A per-head metric whose lowest and highest heads get their attention maps drawn; only reports
    /// about attention set it, so that maps are drawn only when attention was analyzed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_maps_by: Option<String>,
}

impl Presentation {
    /// A profile figure called `title` showing `metrics`.
    pub fn profile(title: &str, metrics: &[&str]) -> Self {
        Presentation { title: title.into(), profile: metrics.iter().map(|m| m.to_string()).collect(), ..Self::default() }
    }
    /// Shade the layers where the per-layer `metric` is non-zero, called `label` in the legend.
    pub fn mark(mut self, metric: &str, label: &str) -> Self {
        self.mark = Some(LayerMark { metric: metric.into(), label: label.into() });
        self
    }
    /// Draw attention maps of the heads with the lowest and highest per-head `metric`.
    pub fn attention_maps_by(mut self, metric: &str) -> Self {
        self.attention_maps_by = Some(metric.into());
        self
    }
}

/// Layers flagged by a metric, and what the legend calls them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerMark {
    /// A per-layer metric of the same report: non-zero marks the layer.
    pub metric: String,
    /// The legend's words, e.g. "lazy layer (MaxRank = 1)".
    pub label: String,
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
    /// How the host should draw this report.
    pub fn present(mut self, presentation: Presentation) -> Self {
        self.present = Some(presentation);
        self
    }
    /// The layers flagged by the presentation's mark, when it has one.
    pub fn marked_layers(&self) -> Option<Vec<bool>> {
        let mark = self.present.as_ref()?.mark.as_ref()?;
        Some(self.get(&mark.metric).ok()?.per_layer.iter().map(|&v| v != 0.0).collect())
    }
    /// The report as it reads for the model `plan` makes: output layer `j` takes the values of its source
    /// layer. What a strategy after another strategy sees, so that its indices are the planned model's.
    pub fn through(&self, plan: &Plan) -> Report {
        let pick = |v: &Vec<f64>| plan.layers.iter().map(|l| v.get(l.from).copied().unwrap_or(f64::NAN)).collect::<Vec<f64>>();
        let pick_rows = |v: &Vec<Vec<f64>>| plan.layers.iter().map(|l| v.get(l.from).cloned().unwrap_or_default()).collect::<Vec<_>>();
        let metrics = self
            .metrics
            .iter()
            .map(|m| Metric {
                name: m.name.clone(),
                about: m.about.clone(),
                per_layer: pick(&m.per_layer),
                per_layer_spread: m.per_layer_spread.as_ref().map(pick),
                per_head: m.per_head.as_ref().map(pick_rows),
                per_head_spread: m.per_head_spread.as_ref().map(pick_rows),
            })
            .collect();
        Report { metrics, ..self.clone() }
    }
    /// Checks that every metric has one finite value per layer of a model of `layers` blocks, as the host does,
    /// and that its spreads and per-head values are finite too (JSON, the form a report travels in, has no NaN).
    pub fn check(&self, layers: usize) -> Result<()> {
        for m in &self.metrics {
            crate::ensure!(
                m.per_layer.len() == layers,
                "analyzer `{}` reported {} values of `{}` for a model of {layers} layers",
                self.analyzer,
                m.per_layer.len(),
                m.name
            );
            let non_finite = |what: &str, at: String| crate::anyhow!("analyzer `{}` reported a non-finite {what}`{}` for {at}", self.analyzer, m.name);
            let first_bad = |values: &[f64]| values.iter().position(|v| !v.is_finite());
            if let Some(l) = first_bad(&m.per_layer) {
                return Err(non_finite("", format!("layer {l}")));
            }
            if let Some(l) = m.per_layer_spread.as_deref().and_then(first_bad) {
                return Err(non_finite("spread of ", format!("layer {l}")));
            }
            for (what, rows) in [("", &m.per_head), ("spread of ", &m.per_head_spread)] {
                for (l, row) in rows.iter().flatten().enumerate() {
                    if let Some(h) = first_bad(row) {
                        return Err(non_finite(what, format!("layer {l} head {h}")));
                    }
                }
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
    /// Every report as it reads for the model `plan` makes (see [`Report::through`]).
    pub fn through(&self, plan: &Plan) -> Reports {
        Reports(self.0.iter().map(|(k, r)| (k.clone(), r.through(plan))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_follows_its_layers_through_a_plan() {
        let r = Report::new().metric(Metric::per_layer("m", vec![10.0, 11.0, 12.0]).heads(vec![vec![0.0], vec![1.0], vec![2.0]], None));
        let t = r.through(&Plan::ranges(&[2..3, 0..2, 1..2]));
        assert_eq!(t.metrics[0].per_layer, [12.0, 10.0, 11.0, 11.0]);
        assert_eq!(t.metrics[0].per_head.as_ref().unwrap()[0], [2.0]);
    }

    #[test]
    fn marked_layers_come_from_the_named_flag() {
        let present = Presentation::profile("t", &["flag"]).mark("flag", "x");
        let r = Report::new().metric(Metric::per_layer("flag", vec![0.0, 1.0])).present(present);
        assert_eq!(r.marked_layers(), Some(vec![false, true]));
        assert_eq!(Report::new().marked_layers(), None);
    }
}
