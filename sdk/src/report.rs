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
    /// Checks the report against a model of `layers` blocks, as the host does: every metric has one finite value
    /// per layer, per-layer spreads match, per-head values (and their spreads) are one row per layer of one width,
    /// every value is finite (JSON, the form a report travels in, has no NaN), and the presentation names
    /// metrics the report has.
    pub fn check(&self, layers: usize) -> Result<()> {
        let who = &self.analyzer;
        for m in &self.metrics {
            let name = &m.name;
            crate::ensure!(m.per_layer.len() == layers, "analyzer `{who}` reported {} values of `{name}` for a model of {layers} layers", m.per_layer.len());
            if let Some(spread) = &m.per_layer_spread {
                crate::ensure!(spread.len() == layers, "analyzer `{who}` reported {} spreads of `{name}` for a model of {layers} layers", spread.len());
            }
            if let Some(rows) = &m.per_head {
                crate::ensure!(rows.len() == layers, "analyzer `{who}` reported per-head values of `{name}` for {} layers of a model of {layers}", rows.len());
                let width = rows.first().map_or(0, Vec::len);
                if let Some((l, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
                    crate::bail!("analyzer `{who}` reported {} heads of `{name}` in layer {l} but {width} in layer 0", row.len());
                }
                if let Some(spread) = &m.per_head_spread {
                    crate::ensure!(
                        spread.len() == layers && spread.iter().all(|r| r.len() == width),
                        "analyzer `{who}`: the per-head spread of `{name}` is not shaped like its per-head values [{layers}][{width}]"
                    );
                }
            }
            let non_finite = |what: &str, at: String| crate::anyhow!("analyzer `{who}` reported a non-finite {what}`{name}` for {at}");
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
        if let Some(p) = &self.present {
            // The host draws from these names; a typo once left a figure out without a word.
            for metric in p.profile.iter().chain(p.mark.as_ref().map(|m| &m.metric)).chain(&p.attention_maps_by) {
                if self.get(metric).is_err() {
                    let have: Vec<&str> = self.metrics.iter().map(|m| m.name.as_str()).collect();
                    crate::bail!("the presentation of analyzer `{who}` names the metric `{metric}`, which the report does not have (it has: {})", have.join(", "));
                }
            }
            if let Some(by) = &p.attention_maps_by {
                crate::ensure!(self.get(by)?.per_head.is_some(), "analyzer `{who}` picks attention maps by `{by}`, which has no per-head values");
            }
        }
        Ok(())
    }

    /// Checks that the metric picking attention maps has one value per attention head of a model with `heads`.
    pub fn check_heads(&self, heads: usize) -> Result<()> {
        let Some(by) = self.present.as_ref().and_then(|p| p.attention_maps_by.as_ref()) else { return Ok(()) };
        let width = self.get(by)?.per_head.as_ref().and_then(|rows| rows.first()).map_or(0, Vec::len);
        crate::ensure!(
            width == heads,
            "analyzer `{}` picks attention maps by `{by}`, whose per-head values have {width} heads; the model has {heads}",
            self.analyzer
        );
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
    fn per_head_values_and_spreads_are_one_row_per_layer_of_one_width() {
        let check = |m: Metric| Report { analyzer: "a".into(), ..Report::new().metric(m) }.check(2).map_err(|e| e.to_string());
        let m = || Metric::per_layer("m", vec![0.0, 1.0]);
        assert!(check(m().heads(vec![vec![1.0; 3]; 2], Some(vec![vec![0.0; 3]; 2]))).is_ok());
        let e = check(m().heads(vec![vec![1.0; 3]], None)).unwrap_err();
        assert!(e.contains("analyzer `a` reported per-head values of `m` for 1 layers of a model of 2"), "{e}");
        let e = check(m().heads(vec![vec![1.0; 3], vec![1.0; 2]], None)).unwrap_err();
        assert!(e.contains("2 heads of `m` in layer 1 but 3 in layer 0"), "{e}");
        let e = check(m().heads(vec![vec![1.0; 3]; 2], Some(vec![vec![0.0; 2]; 2]))).unwrap_err();
        assert!(e.contains("the per-head spread of `m` is not shaped like its per-head values [2][3]"), "{e}");
        let e = check(m().spread(vec![0.0])).unwrap_err();
        assert!(e.contains("1 spreads of `m` for a model of 2 layers"), "{e}");
    }

    #[test]
    fn the_presentation_names_metrics_the_report_has() {
        let r = |p: Presentation| {
            let m = Metric::per_layer("m", vec![0.0, 1.0]).heads(vec![vec![1.0; 3]; 2], None);
            Report { analyzer: "a".into(), ..Report::new().metric(m).metric(Metric::per_layer("flag", vec![0.0, 1.0])).present(p) }
        };
        assert!(r(Presentation::profile("t", &["m", "flag"]).mark("flag", "x").attention_maps_by("m")).check(2).is_ok());
        // A typo once left the profile figure out, or drew no maps, without a word.
        let e = r(Presentation::profile("t", &["m", "mm"])).check(2).unwrap_err().to_string();
        assert!(e.contains("the presentation of analyzer `a` names the metric `mm`, which the report does not have (it has: m, flag)"), "{e}");
        assert!(r(Presentation::profile("t", &["m"]).mark("flg", "x")).check(2).unwrap_err().to_string().contains("`flg`"));
        let e = r(Presentation::profile("t", &["m"]).attention_maps_by("flag")).check(2).unwrap_err().to_string();
        assert!(e.contains("picks attention maps by `flag`, which has no per-head values"), "{e}");
        let e = r(Presentation::profile("t", &[]).attention_maps_by("m")).check_heads(4).unwrap_err().to_string();
        assert!(e.contains("picks attention maps by `m`, whose per-head values have 3 heads; the model has 4"), "{e}");
    }

    #[test]
    fn marked_layers_come_from_the_named_flag() {
        let present = Presentation::profile("t", &["flag"]).mark("flag", "x");
        let r = Report::new().metric(Metric::per_layer("flag", vec![0.0, 1.0])).present(present);
        assert_eq!(r.marked_layers(), Some(vec![false, true]));
        assert_eq!(Report::new().marked_layers(), None);
    }
}
