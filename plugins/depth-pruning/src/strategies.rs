//! Zero-shot depth pruning as layer maps: remove the blocks with the lowest score of any report
//! (ShortGPT's rule with block influence), or the contiguous run of blocks that turns the residual stream
//! least (Gromov et al.'s rule with angular distance). The kept blocks stay in order.

use crate::analyzers::AngularTable;
use scalpel_sdk::prelude::*;

/// Settings of `drop-layers`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DropLayersConfig {
    /// The per-layer score as REPORT.METRIC; the `count` blocks with the lowest score are removed.
    pub metric: String,
    /// How many blocks to remove by `metric`.
    pub count: Option<usize>,
    /// Remove exactly these blocks instead (then no report is read).
    pub layers: Vec<usize>,
}

impl Default for DropLayersConfig {
    fn default() -> Self {
        DropLayersConfig { metric: "block-influence.bi".into(), count: None, layers: vec![] }
    }
}

pub struct DropLayers;

impl Strategy for DropLayers {
    type Config = DropLayersConfig;
    fn needs(&self, c: &DropLayersConfig) -> Vec<String> {
        match (c.count, c.metric.split_once('.')) {
            (Some(_), Some((report, _))) if c.layers.is_empty() => vec![report.to_string()],
            _ => vec![],
        }
    }
    fn plan(&self, model: &Model, c: &DropLayersConfig, reports: &Reports) -> Result<Plan> {
        let layers = model.info().layers;
        let (removed, why) = match (c.count, c.layers.is_empty()) {
            (None, false) => {
                for (i, &l) in c.layers.iter().enumerate() {
                    ensure!(l < layers, "layer {l} does not exist: the model has layers 0..{layers}");
                    ensure!(!c.layers[..i].contains(&l), "layer {l} is listed twice in `layers`");
                }
                (c.layers.clone(), format!("the listed layers {:?}", c.layers))
            }
            (Some(k), true) => lowest(reports, &c.metric, k, layers)?,
            (Some(_), false) => bail!("give either `count` (remove the lowest blocks by `metric`) or `layers` (an explicit list), not both"),
            (None, true) => bail!("give `count` (how many blocks to remove, lowest `{}` first) or `layers` (which blocks to remove)", c.metric),
        };
        ensure!(removed.len() < layers, "removing {} of {layers} blocks would leave none", removed.len());
        let plan = Plan::without(layers, &removed)?;
        Ok(plan.note(format!("removed blocks {removed:?} ({layers} -> {} layers): {why}", layers - removed.len())))
    }
}

/// The `k` layers with the lowest value of `spec` (REPORT.METRIC), lowest first, with the evidence.
fn lowest(reports: &Reports, spec: &str, k: usize, layers: usize) -> Result<(Vec<usize>, String)> {
    let Some((report, metric)) = spec.split_once('.') else {
        bail!("`metric` must name a report and one of its metrics as REPORT.METRIC, e.g. block-influence.bi; got `{spec}`");
    };
    let values = &reports.get(report)?.get(metric)?.per_layer;
    ensure!(values.len() == layers, "report `{report}` covers {} layers, the model has {layers}", values.len());
    if let Some(l) = values.iter().position(|v| !v.is_finite()) {
        bail!("`{spec}` is not a number at layer {l}: rerun `{report}`");
    }
    ensure!(k >= 1 && k < layers, "`count` = {k} must be in 1..{layers}: at least one block goes and at least one stays");
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b])); // stable: ties go to the earlier layer
    let removed = order[..k].to_vec();
    let shown: Vec<String> = (0..layers).map(|l| format!("{l}:{:.4}", values[l])).collect();
    Ok((removed, format!("the {k} lowest {spec} (per layer {})", shown.join(" "))))
}

/// Settings of `prune-block`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PruneBlockConfig {
    /// How many contiguous blocks to remove.
    pub n: Option<usize>,
    /// The `angular-distance` report to choose from (by analyzer name).
    pub report: String,
}

impl Default for PruneBlockConfig {
    fn default() -> Self {
        PruneBlockConfig { n: None, report: "angular-distance".into() }
    }
}

pub struct PruneBlock;

impl Strategy for PruneBlock {
    type Config = PruneBlockConfig;
    fn needs(&self, c: &PruneBlockConfig) -> Vec<String> {
        if c.n.is_some() { vec![c.report.clone()] } else { vec![] }
    }
    fn plan(&self, model: &Model, c: &PruneBlockConfig, reports: &Reports) -> Result<Plan> {
        let layers = model.info().layers;
        let Some(n) = c.n else { bail!("give `n`, the number of contiguous blocks to remove (1..{layers})") };
        ensure!(n >= 1 && n < layers, "`n` = {n} must be in 1..{layers}: at least one block goes and at least one stays");
        let report = reports.get(&c.report)?;
        let table: AngularTable = serde_json::from_value(report.extra.clone())
            .with_context(|| format!("report `{}` has no angular-distance table in its `extra`: rerun `angular-distance`", c.report))?;
        ensure!(table.distance.len() == layers, "report `{}` covers {} layers, the model has {layers}", c.report, table.distance.len());
        let best = table.best_start(n).ok_or_else(|| anyhow!("report `{}` has no distances for runs of {n} blocks", c.report))?;
        let end = best.start + n;
        let shown: Vec<String> = table.starts(n).iter().enumerate().map(|(l, d)| format!("{l}:{d:.4}")).collect();
        Ok(Plan::without(layers, &(best.start..end).collect::<Vec<_>>())?.note(format!(
            "removed blocks {}..{end} ({layers} -> {} layers): the smallest angular distance d({}, {n}) = {:.4} between the input of \
             block {} and of block {end} (d(l, {n}) per start l: {})",
            best.start,
            layers - n,
            best.start,
            best.distance,
            best.start,
            shown.join(" ")
        )))
    }
}

/// Settings of `random-init`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RandomInitConfig {
    /// How many blocks the fresh model has; unset: as many as the input.
    pub layers: Option<usize>,
    /// Seeds the initialisation, so that a comparison can be rerun exactly.
    pub seed: u64,
}

pub struct RandomInit;

impl Strategy for RandomInit {
    type Config = RandomInitConfig;
    fn plan(&self, model: &Model, c: &RandomInitConfig, _: &Reports) -> Result<Plan> {
        let input = model.info().layers;
        let layers = c.layers.unwrap_or(input);
        ensure!(layers >= 1, "`layers` = 0 would leave no block: a model needs at least one");
        scalpel_sdk::check_depth(layers)?;
        // Every block has the input's shapes, so any source block serves; nothing of it is kept.
        let mut plan = Plan::ranges(&[0..layers.min(input)]);
        plan.layers.extend((input..layers).map(|j| LayerSource { from: j % input, edits: vec![] }));
        plan.reinit = vec!["all".into()];
        plan.seed = c.seed;
        Ok(plan.note(format!("the same architecture with {layers} blocks, freshly initialised as transformers does (seed {})", c.seed)))
    }
}

scalpel_sdk::strategy! {
    /// Removes the k blocks with the lowest score of a report's per-layer metric, or an explicit list of blocks.
    ///
    /// With the default `metric = "block-influence.bi"` this is ShortGPT (arXiv 2403.03853): the blocks that
    /// turn the residual stream least go. Any REPORT.METRIC works, lowest first. The scores are kept in the
    /// plan's notes.
    "drop-layers" => DropLayers
}

scalpel_sdk::strategy! {
    /// Removes the contiguous n blocks whose input and output are closest in angle (Gromov et al., arXiv 2403.17887).
    ///
    /// Reads the `angular-distance` report: the start l minimising d(l, n), the earliest on ties; blocks l..l+n go.
    /// The paper heals the pruned model afterwards with a little training.
    "prune-block" => PruneBlock
}

scalpel_sdk::strategy! {
    /// The same architecture at a given depth, freshly initialised: the "same size from scratch" baseline.
    ///
    /// Every tensor (embeddings, blocks, norms, head) is drawn as transformers initialises a new model of the
    /// family (normal(0, initializer_range) matrices, ones for norms, zeros for biases), seeded by `seed`.
    /// Only worth comparing after training (`scalpel compare --heal-steps`, or `scalpel train`).
    "random-init" => RandomInit
}

#[cfg(test)]
mod tests {
    use super::{DropLayers, PruneBlock};
    use crate::analyzers::AngularDistance;
    use scalpel_sdk::prelude::*;
    use scalpel_sdk::testing::{run_analyzer, run_strategy, TestModel};

    /// Runs a strategy on a model of `layers` blocks through the plugin boundary, as the host does.
    fn plan<S: Strategy>(layers: usize, config: &str, reports: &Reports) -> Result<Plan> {
        run_strategy::<S>(&TestModel::shape(layers), serde_json::from_str::<serde_json::Value>(config)?, reports)
    }

    fn report(analyzer: &str, metric: &str, values: &[f64]) -> Reports {
        let mut r = Report::new().metric(Metric::per_layer(metric, values.to_vec()));
        r.analyzer = analyzer.into();
        let mut reports = Reports::default();
        reports.insert(r);
        reports
    }

    #[test]
    fn drop_layers_removes_the_lowest_scores_with_the_evidence() {
        let reports = report("block-influence", "bi", &[0.9, 0.05, 0.3, 0.02, 0.2, 0.6]);
        let p = plan::<DropLayers>(6, r#"{"count": 2}"#, &reports).unwrap();
        assert_eq!(p.sources(), [0, 2, 4, 5]);
        assert!(p.notes[0].contains("removed blocks [3, 1]") && p.notes[0].contains("block-influence.bi") && p.notes[0].contains("3:0.0200"), "{:?}", p.notes);
    }

    #[test]
    fn drop_layers_reads_any_named_metric_and_breaks_ties_by_order() {
        let reports = report("weight-norms", "weight_norm", &[1.0, 0.5, 0.5, 2.0]);
        let p = plan::<DropLayers>(4, r#"{"metric": "weight-norms.weight_norm", "count": 1}"#, &reports).unwrap();
        assert_eq!(p.sources(), [0, 2, 3]);
    }

    #[test]
    fn drop_layers_with_an_explicit_list_needs_no_report() {
        let p = plan::<DropLayers>(5, r#"{"layers": [4, 1]}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), [0, 2, 3]);
        let e = plan::<DropLayers>(5, r#"{"layers": [1, 5]}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("layer 5 does not exist"), "{e}");
        let e = plan::<DropLayers>(5, r#"{"layers": [2, 2]}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = plan::<DropLayers>(2, r#"{"layers": [0, 1]}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("would leave none"), "{e}");
    }

    #[test]
    fn drop_layers_explains_what_is_missing_or_wrong() {
        let bi = report("block-influence", "bi", &[0.1, 0.2, 0.3]);
        let e = |config: &str, reports: &Reports| plan::<DropLayers>(3, config, reports).unwrap_err().to_string();
        assert!(e("{}", &bi).contains("give `count`"));
        assert!(e(r#"{"count": 1, "layers": [0]}"#, &bi).contains("not both"));
        assert!(e(r#"{"count": 1}"#, &Reports::default()).contains("run the `block-influence` analyzer"));
        assert!(e(r#"{"count": 3}"#, &bi).contains("must be in 1..3"));
        assert!(e(r#"{"count": 1, "metric": "bi"}"#, &bi).contains("REPORT.METRIC"));
        assert!(e(r#"{"count": 1, "metric": "block-influence.cos"}"#, &bi).contains("has no metric `cos`"));
        let e = plan::<DropLayers>(4, r#"{"count": 1}"#, &bi).unwrap_err().to_string();
        assert!(e.contains("covers 3 layers, the model has 4"), "{e}");
    }

    /// The angular-distance report of blocks that turn the stream by the given angles, through the plugin.
    fn angular(degrees: &[f64]) -> Reports {
        let states = degrees
            .iter()
            .map(|d: &f64| {
                let v = Tensor::from_slice(&[d.to_radians().cos(), d.to_radians().sin()]);
                v.view([1, 1, 2]).repeat([2, 3, 1])
            })
            .collect();
        let r = run_analyzer::<AngularDistance>(&TestModel::from_hidden(states), serde_json::json!({})).unwrap();
        let mut reports = Reports::default();
        reports.insert(r);
        reports
    }

    #[test]
    fn prune_block_removes_the_closest_run_of_n() {
        // Inputs of blocks 0..6 at these angles: blocks 2..4 turn the stream by 5° together.
        let reports = angular(&[0.0, 60.0, 120.0, 123.0, 125.0, 170.0, 240.0]);
        let p = plan::<PruneBlock>(6, r#"{"n": 2}"#, &reports).unwrap();
        assert_eq!(p.sources(), [0, 1, 4, 5]);
        assert!(p.notes[0].contains("removed blocks 2..4") && p.notes[0].contains("d(2, 2) = 0.0278"), "{:?}", p.notes);
        let p = plan::<PruneBlock>(6, r#"{"n": 1}"#, &reports).unwrap();
        assert_eq!(p.sources(), [0, 1, 2, 4, 5]);
    }

    #[test]
    fn prune_block_explains_what_is_missing_or_wrong() {
        let reports = angular(&[0.0, 10.0, 30.0, 60.0]);
        let e = |config: &str, layers, reports: &Reports| plan::<PruneBlock>(layers, config, reports).unwrap_err().to_string();
        assert!(e("{}", 3, &reports).contains("give `n`"));
        assert!(e(r#"{"n": 3}"#, 3, &reports).contains("must be in 1..3"));
        assert!(e(r#"{"n": 1}"#, 3, &Reports::default()).contains("run the `angular-distance` analyzer"));
        assert!(e(r#"{"n": 1}"#, 4, &reports).contains("covers 3 layers, the model has 4"));
        let bi = report("block-influence", "bi", &[0.1, 0.2, 0.3]);
        assert!(e(r#"{"n": 1, "report": "block-influence"}"#, 3, &bi).contains("no angular-distance table"));
    }
}
