//! Depth surgery as layer maps: keep a prefix (Inheritune's inherit step), repeat a range (stacking),
//! duplicate layers in place (SOLAR, LLaMA Pro), or any list of slices (mergekit's passthrough).

use scalpel_sdk::prelude::*;
use std::ops::Range;

/// How the non-block parts are inherited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Inherit {
    /// As the paper describes: embeddings, the first k blocks, final norm and head all inherited.
    #[default]
    Paper,
    /// As the authors' released GPT-2 code does: the final norm and the position embedding start afresh.
    ReleasedCode,
}

/// Where the number of kept layers comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CutRule {
    /// Cut at the start of the trailing run of degenerate layers in a report (needs an earlier analyzer step).
    #[default]
    TrailingDegenerate,
    /// Keep the first half of the layers (the paper's default l = L/2).
    Half,
}

/// Settings of `cutoff`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CutoffConfig {
    /// Keep exactly this many leading layers; unset: decide by `rule`.
    pub keep: Option<usize>,
    /// How to decide when `keep` is unset.
    pub rule: CutRule,
    /// The report whose metric marks degenerate layers.
    pub report: String,
    /// The per-layer metric read from that report.
    pub metric: String,
    /// A layer is degenerate when its metric is at most this (MaxRank 1 is the paper's lazy layer).
    pub threshold: f64,
    /// Never keep fewer layers than this.
    pub min_keep: usize,
    /// When the report shows no trailing degenerate run: `half` falls back to L/2 (noting why); unset is an error.
    pub fallback: Option<CutRule>,
    /// Which reading of the inherit step to follow.
    pub inherit: Inherit,
}

impl Default for CutoffConfig {
    fn default() -> Self {
        CutoffConfig {
            keep: None,
            rule: CutRule::TrailingDegenerate,
            report: "attn-rank".into(),
            metric: "max_rank".into(),
            threshold: 1.0,
            min_keep: 1,
            fallback: None,
            inherit: Inherit::Paper,
        }
    }
}

pub struct Cutoff;

impl Strategy for Cutoff {
    type Config = CutoffConfig;
    fn needs(&self, c: &CutoffConfig) -> Vec<String> {
        match (c.keep, c.rule) {
            (None, CutRule::TrailingDegenerate) => vec![c.report.clone()],
            _ => vec![],
        }
    }
    fn plan(&self, model: &Model, c: &CutoffConfig, reports: &Reports) -> Result<Plan> {
        let layers = model.info().layers;
        let (keep, why) = match (c.keep, c.rule) {
            (Some(k), _) => (k, format!("keep = {k} was given")),
            (None, CutRule::Half) => half(layers),
            (None, CutRule::TrailingDegenerate) => match (trailing_degenerate(reports, c, layers)?, c.fallback) {
                (Ok(found), _) => found,
                (Err(evidence), Some(CutRule::Half)) => {
                    let (keep, why) = half(layers);
                    (keep, format!("{why}, the fallback, because there is {evidence}"))
                }
                (Err(evidence), _) => bail!(
                    "there is {evidence}. Raise `threshold`, give `keep`, use `rule = \"half\"`, or `fallback = \"half\"`"
                ),
            },
        };
        ensure!(c.keep != Some(0), "keep = 0 would leave no layer: a model needs at least one");
        ensure!(keep >= c.min_keep.max(1), "cutoff would keep {keep} layers, fewer than min_keep = {}; {why}", c.min_keep.max(1));
        ensure!(keep <= layers, "cutoff cannot keep {keep} layers of {layers}");
        let mut plan = Plan::ranges(&[0..keep]).note(format!("keep layers 0..{keep} of {layers}: {why}"));
        if c.inherit == Inherit::ReleasedCode {
            plan.reinit = vec!["final_norm".into(), "position_embedding".into()];
            plan = plan.note("inherit = released-code: final norm and position embedding (where the model has one) initialised afresh");
        }
        Ok(plan)
    }
}

fn half(layers: usize) -> (usize, String) {
    (layers / 2, format!("rule `half` (the paper's default l = L/2): {layers} / 2"))
}

/// The start of the trailing run of layers whose metric is at most the threshold, with the evidence;
/// or, when the last layer is not degenerate, the evidence of that.
fn trailing_degenerate(reports: &Reports, c: &CutoffConfig, layers: usize) -> Result<std::result::Result<(usize, String), String>> {
    let values = &reports.get(&c.report)?.get(&c.metric)?.per_layer;
    ensure!(values.len() == layers, "report `{}` covers {} layers, the model has {layers}", c.report, values.len());
    let run = values.iter().rev().take_while(|&&v| v <= c.threshold).count();
    let start = layers - run;
    let shown: Vec<String> = values.iter().enumerate().map(|(l, v)| format!("{l}:{v:.2}")).collect();
    if run == 0 {
        return Ok(Err(format!(
            "no trailing run of degenerate layers: the last layer's {} is {:.2} > threshold {} (per layer {})",
            c.metric,
            values[layers - 1],
            c.threshold,
            shown.join(" ")
        )));
    }
    let why = format!(
        "layers {start}..{layers} all have {}.{} <= {} (rule `trailing-degenerate`; per layer {})",
        c.report,
        c.metric,
        c.threshold,
        shown.join(" ")
    );
    Ok(Ok((start, why)))
}

/// Settings of `stack`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct StackConfig {
    /// First block of the repeated range.
    pub start: usize,
    /// One past the last block of the range; unset: the last layer.
    pub end: Option<usize>,
    /// How many times the range appears in the result (2 doubles it).
    pub times: usize,
}

impl Default for StackConfig {
    fn default() -> Self {
        StackConfig { start: 0, end: None, times: 2 }
    }
}

pub struct Stack;

impl Strategy for Stack {
    type Config = StackConfig;
    fn plan(&self, model: &Model, c: &StackConfig, _: &Reports) -> Result<Plan> {
        let layers = model.info().layers;
        let range = checked_range(c.start, c.end.unwrap_or(layers), layers)?;
        ensure!(c.times >= 1, "times must be at least 1");
        // Checked before the plan is built: a huge `times` must be an error, not an allocation.
        let depth = range.len().checked_mul(c.times - 1).and_then(|extra| extra.checked_add(layers));
        scalpel_sdk::check_depth(depth.unwrap_or(usize::MAX))?;
        // Blocks before the range stay, the range repeats, blocks after it follow.
        let mut slices = vec![0..range.start];
        slices.extend(std::iter::repeat_n(range.clone(), c.times));
        slices.push(range.end..layers);
        slices.retain(|r| !r.is_empty());
        Ok(Plan::ranges(&slices).note(format!("layers {}..{} repeated {} times ({layers} -> {} layers)", range.start, range.end, c.times, layers + range.len() * (c.times - 1))))
    }
}

/// Settings of `duplicate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DuplicateConfig {
    /// Duplicate each of these layers in place (the copy follows the original).
    pub layers: Vec<usize>,
    /// SOLAR depth up-scaling with overlap m: layers [0, n-m) followed by [m, n). Use instead of `layers`.
    pub overlap: Option<usize>,
    /// Zero the copies' output projections, so the grown model computes what the original did (LLaMA Pro).
    pub zero_copies: bool,
}

pub struct Duplicate;

impl Strategy for Duplicate {
    type Config = DuplicateConfig;
    fn plan(&self, model: &Model, c: &DuplicateConfig, _: &Reports) -> Result<Plan> {
        let n = model.info().layers;
        let (mut plan, copies): (Plan, Vec<usize>) = match (c.overlap, c.layers.is_empty()) {
            (Some(m), true) => {
                ensure!(m < n, "overlap {m} must be smaller than the {n} layers");
                let plan = Plan::ranges(&[0..n - m, m..n]).note(format!("SOLAR depth up-scaling: [0, {}) + [{m}, {n})", n - m));
                let copies = (n - m..plan.layers.len()).collect();
                (plan, copies)
            }
            (None, false) => {
                if let Some(&bad) = c.layers.iter().find(|&&l| l >= n) {
                    bail!("layer {bad} does not exist: the model has layers 0..{n}");
                }
                scalpel_sdk::check_depth(n.saturating_add(c.layers.len()))?;
                let mut slices = Vec::new();
                let mut copies = Vec::new();
                for l in 0..n {
                    slices.push(l..l + 1);
                    for _ in c.layers.iter().filter(|&&x| x == l) {
                        slices.push(l..l + 1);
                        copies.push(slices.len() - 1);
                    }
                }
                (Plan::ranges(&slices).note(format!("layers {:?} duplicated in place", c.layers)), copies)
            }
            _ => bail!("give either `layers` (in-place copies) or `overlap` (SOLAR), not both or neither"),
        };
        if c.zero_copies {
            for j in copies {
                plan.layers[j].edits.push(Edit::ZeroOutput);
            }
            plan = plan.note("copies have zeroed output projections: the model's function is unchanged at insertion");
        }
        Ok(plan)
    }
}

/// Settings of `slices`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SlicesConfig {
    /// Half-open [start, end) layer ranges, concatenated in order (mergekit `passthrough` `layer_range`s).
    pub ranges: Vec<[usize; 2]>,
}

pub struct Slices;

impl Strategy for Slices {
    type Config = SlicesConfig;
    fn plan(&self, model: &Model, c: &SlicesConfig, _: &Reports) -> Result<Plan> {
        let n = model.info().layers;
        ensure!(!c.ranges.is_empty(), "give at least one range, e.g. ranges = [[0, 6], [3, 9]]");
        let ranges: Vec<Range<usize>> = c.ranges.iter().map(|&[a, b]| checked_range(a, b, n)).collect::<Result<_>>()?;
        scalpel_sdk::check_depth(ranges.iter().fold(0usize, |sum, r| sum.saturating_add(r.len())))?;
        let shown: Vec<String> = ranges.iter().map(|r| format!("[{}, {})", r.start, r.end)).collect();
        Ok(Plan::ranges(&ranges).note(format!("slices {}", shown.join(" + "))))
    }
}

fn checked_range(start: usize, end: usize, layers: usize) -> Result<Range<usize>> {
    ensure!(start < end, "the range [{start}, {end}) is empty");
    ensure!(end <= layers, "the range [{start}, {end}) goes past the model's {layers} layers");
    Ok(start..end)
}

scalpel_sdk::strategy! {
    /// Keeps the first k blocks: Inheritune's inherit step.
    ///
    /// k is given (`keep`), or read off an analyzer's report: the start of the trailing run of
    /// degenerate layers (by default MaxRank <= 1 in `attn-rank`, the paper's lazy layers), printed
    /// with its evidence. `inherit` picks the paper's reading (everything inherited) or the authors'
    /// released code (final norm and position embedding initialised afresh).
    "cutoff" => Cutoff
}

scalpel_sdk::strategy! {
    /// Grows depth by repeating a block range (stacking, G_stack): 6 layers -> 12 from [0, 6) twice.
    "stack" => Stack
}

scalpel_sdk::strategy! {
    /// Duplicates layers in place, or SOLAR depth up-scaling [0, n-m) + [m, n); copies can start as identities (LLaMA Pro).
    "duplicate" => Duplicate
}

scalpel_sdk::strategy! {
    /// Any concatenation of half-open layer ranges, as mergekit's passthrough merge does.
    "slices" => Slices
}

#[cfg(test)]
mod tests {
    use super::*;
    use scalpel_sdk::testing::{run_strategy, TestModel};
    use scalpel_sdk::{Metric, Report};

    /// Runs a strategy on a model of `layers` blocks through the plugin boundary, as the host does.
    fn plan<S: Strategy>(layers: usize, config: &str, reports: &Reports) -> Result<Plan> {
        run_strategy::<S>(&TestModel::shape(layers), serde_json::from_str::<serde_json::Value>(config)?, reports)
    }

    fn rank_report(max_rank: &[f64]) -> Reports {
        let mut reports = Reports::default();
        let mut r = Report::new().metric(Metric::per_layer("max_rank", max_rank.to_vec()));
        r.analyzer = "attn-rank".into();
        reports.insert(r);
        reports
    }

    #[test]
    fn cutoff_keeps_a_given_prefix() {
        let p = plan::<Cutoff>(12, r#"{"keep": 6}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), (0..6).collect::<Vec<_>>());
        assert!(p.reinit.is_empty());
    }

    #[test]
    fn cutoff_finds_the_trailing_run_of_lazy_layers() {
        // Layer 2 is lazy but followed by a live layer: only the trailing run counts.
        let reports = rank_report(&[12.0, 30.0, 1.0, 4.0, 1.0, 1.0]);
        let p = plan::<Cutoff>(6, "{}", &reports).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2, 3]);
        assert!(p.notes[0].contains("layers 4..6") && p.notes[0].contains("5:1.00"), "{:?}", p.notes);
    }

    #[test]
    fn cutoff_without_lazy_layers_explains_the_way_out() {
        let e = plan::<Cutoff>(3, "{}", &rank_report(&[5.0, 3.0, 2.0])).unwrap_err().to_string();
        assert!(e.contains("no trailing run") && e.contains("threshold") && e.contains("2:2.00"), "{e}");
        let p = plan::<Cutoff>(3, r#"{"threshold": 3.0}"#, &rank_report(&[5.0, 3.0, 2.0])).unwrap();
        assert_eq!(p.sources(), vec![0]);
    }

    #[test]
    fn cutoff_falls_back_to_half_with_the_reason_when_asked() {
        let p = plan::<Cutoff>(6, r#"{"fallback": "half"}"#, &rank_report(&[5.0, 3.0, 2.0, 9.0, 4.0, 3.0])).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2]);
        assert!(p.notes[0].contains("fallback") && p.notes[0].contains("no trailing run") && p.notes[0].contains("5:3.00"), "{:?}", p.notes);
    }

    #[test]
    fn cutoff_without_the_report_says_which_analyzer_to_run() {
        let e = plan::<Cutoff>(4, "{}", &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("attn-rank"), "{e}");
    }

    #[test]
    fn cutoff_in_the_released_code_reading_reinitialises_norm_and_positions() {
        let p = plan::<Cutoff>(8, r#"{"rule": "half", "inherit": "released-code"}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources().len(), 4);
        assert_eq!(p.reinit, vec!["final_norm", "position_embedding"]);
    }

    #[test]
    fn stack_doubles_a_six_layer_model() {
        let p = plan::<Stack>(6, "{}", &Reports::default()).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]);
        let p = plan::<Stack>(6, r#"{"start": 2, "end": 4, "times": 3}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2, 3, 2, 3, 2, 3, 4, 5]);
    }

    #[test]
    fn duplicate_in_place_and_solar() {
        let p = plan::<Duplicate>(4, r#"{"layers": [1, 3]}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 1, 2, 3, 3]);
        let p = plan::<Duplicate>(8, r#"{"overlap": 2}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn duplicate_can_zero_only_the_copies() {
        let p = plan::<Duplicate>(3, r#"{"layers": [1], "zero_copies": true}"#, &Reports::default()).unwrap();
        let zeroed: Vec<bool> = p.layers.iter().map(|l| l.edits.contains(&Edit::ZeroOutput)).collect();
        assert_eq!(zeroed, vec![false, false, true, false]);
    }

    #[test]
    fn slices_match_mergekit_ranges_and_refuse_bad_ones() {
        let p = plan::<Slices>(6, r#"{"ranges": [[0, 4], [2, 6]]}"#, &Reports::default()).unwrap();
        assert_eq!(p.sources(), vec![0, 1, 2, 3, 2, 3, 4, 5]);
        let e = plan::<Slices>(6, r#"{"ranges": [[0, 7]]}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("past the model's 6 layers"), "{e}");
    }

    #[test]
    fn absurd_repeat_counts_are_refused_before_allocating() {
        let refused = |item: &str, e: scalpel_sdk::Error| assert!(e.to_string().contains("refuses more than 4096"), "{item}: {e}");
        refused("stack", plan::<Stack>(6, r#"{"times": 1000000000}"#, &Reports::default()).unwrap_err());
        refused("stack", plan::<Stack>(6, r#"{"times": 18446744073709551615}"#, &Reports::default()).unwrap_err());
        refused("duplicate", plan::<Duplicate>(6, &format!(r#"{{"layers": {:?}}}"#, vec![0; 5000]), &Reports::default()).unwrap_err());
        refused("slices", plan::<Slices>(6, &format!(r#"{{"ranges": {:?}}}"#, vec![[0, 6]; 1000]), &Reports::default()).unwrap_err());
        assert_eq!(plan::<Stack>(6, r#"{"times": 600}"#, &Reports::default()).unwrap().layers.len(), 3600);
    }

    #[test]
    fn keeping_zero_layers_says_so() {
        let e = plan::<Cutoff>(6, r#"{"keep": 0}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("keep = 0 would leave no layer") && !e.contains("min_keep"), "{e}");
    }

    #[test]
    fn a_typo_in_a_config_key_is_refused() {
        let e = plan::<Stack>(6, r#"{"tims": 3}"#, &Reports::default()).unwrap_err().to_string();
        assert!(e.contains("unknown config key `tims`") && e.contains("times"), "{e}");
    }
}
