//! How much each block, or run of blocks, turns the residual stream: block influence (ShortGPT) over every
//! calibration token, and angular distance (Gromov et al.) at each window's last token. Both read the
//! host's hidden states (`hidden(l)` enters block l, `hidden(layers)` leaves the last block, before the
//! final norm) and compute in float64.

use scalpel_sdk::prelude::*;

/// Settings of `block-influence` (it has none).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BlockInfluenceConfig {}

pub struct BlockInfluence;

impl Analyzer for BlockInfluence {
    type Config = BlockInfluenceConfig;
    fn analyze(&self, model: &Model, _: &BlockInfluenceConfig) -> Result<Report> {
        let layers = model.info().layers;
        let (mut bi, mut spread) = (Vec::with_capacity(layers), Vec::with_capacity(layers));
        let mut input = hidden(model, 0)?;
        for layer in 0..layers {
            let output = hidden(model, layer + 1)?;
            // [sequences, T]: one cosine per token; a zero vector counts as orthogonal to everything.
            let cos = Tensor::f_cosine_similarity(&input, &output, -1, 1e-12)?.f_clamp(-1.0, 1.0)?;
            let per_sequence: Vec<f64> = values(&cos.f_mean_dim(1, false, Kind::Double)?)?.iter().map(|c| 1.0 - c).collect();
            bi.push(mean(&per_sequence));
            spread.push(std(&per_sequence));
            input = output;
        }
        let (ranked, device) = (ranked(&bi), input.device());
        Ok(Report::new()
            .metric(
                Metric::per_layer("bi", bi)
                    .about("block influence 1 − mean over tokens of cos(x_l, x_l+1), x_l entering block l; spread: std over sequences")
                    .spread(spread),
            )
            .note(format!("float64 on {device:?}; {}", calibration(model)))
            .note(format!("lowest influence first: {ranked}"))
            .present(Presentation::profile("block importance", &["bi"])))
    }
}

/// Settings of `angular-distance` (it has none).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AngularDistanceConfig {}

/// The `extra` of an `angular-distance` report: everything `prune-block` chooses from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AngularTable {
    /// `distance[l][n - 1]` = d(l, n), for n = 1..=layers − l: mean over windows of arccos(cos(x_l, x_l+n)) / π
    /// at the window's last token.
    pub distance: Vec<Vec<f64>>,
    /// For each block size n = 1..=layers, the start with the smallest distance (the earliest on ties).
    pub best: Vec<Best>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub n: usize,
    pub start: usize,
    pub distance: f64,
}

impl AngularTable {
    /// The table from the pairwise distances `d[a][b]` between the inputs of blocks a < b.
    fn from_pairs(d: &[Vec<f64>]) -> Self {
        let layers = d.len() - 1;
        let distance: Vec<Vec<f64>> = (0..layers).map(|l| (l + 1..=layers).map(|m| d[l][m]).collect()).collect();
        let mut table = AngularTable { distance, best: vec![] };
        table.best = (1..=layers).map(|n| table.best_start(n).expect("every n in 1..=layers has a start")).collect();
        table
    }

    /// d(l, n) for every start l of a run of n blocks, in order of l.
    pub fn starts(&self, n: usize) -> Vec<f64> {
        if n == 0 {
            return vec![];
        }
        self.distance.iter().filter(|row| row.len() >= n).map(|row| row[n - 1]).collect()
    }

    /// The run of `n` blocks whose input and output are closest; `None` when no run of that size fits.
    pub fn best_start(&self, n: usize) -> Option<Best> {
        let starts = self.starts(n);
        let (start, &distance) = starts.iter().enumerate().reduce(|best, next| if next.1 < best.1 { next } else { best })?;
        Some(Best { n, start, distance })
    }
}

pub struct AngularDistance;

impl Analyzer for AngularDistance {
    type Config = AngularDistanceConfig;
    fn analyze(&self, model: &Model, _: &AngularDistanceConfig) -> Result<Report> {
        let layers = model.info().layers;
        // [sequences, layers + 1, d]: each window's last token entering every block, and leaving the last.
        let last: Vec<Tensor> = (0..=layers).map(|l| Ok(hidden(model, l)?.f_select(1, -1)?)).collect::<Result<_>>()?;
        let x = Tensor::f_stack(&last, 1)?;
        let unit = x.f_div(&x.f_norm_scalaropt_dim(2.0, [-1i64], true)?.f_clamp_min(1e-12)?)?;
        // All pairs in one batched product: [sequences, layers + 1, layers + 1].
        let cos = unit.f_bmm(&unit.f_transpose(1, 2)?)?.f_clamp(-1.0, 1.0)?;
        let angle = cos.f_arccos()?.f_div_scalar(std::f64::consts::PI)?;
        let pairs: Vec<Vec<f64>> = Vec::try_from(angle.f_mean_dim(0, false, Kind::Double)?.f_to_device(Device::Cpu)?)?;
        // d(l, 1) per window: the diagonal above the main one.
        let one_block: Vec<Vec<f64>> = Vec::try_from(angle.f_diagonal(1, 1, 2)?.f_to_device(Device::Cpu)?)?;
        let one_block_spread: Vec<f64> = (0..layers).map(|l| std(&one_block.iter().map(|w| w[l]).collect::<Vec<_>>())).collect();
        let table = AngularTable::from_pairs(&pairs);
        let best: Vec<String> = table.best.iter().map(|b| format!("n={}: {}..{} ({:.4})", b.n, b.start, b.start + b.n, b.distance)).collect();
        Ok(Report {
            metrics: vec![Metric::per_layer("distance_n1", table.starts(1))
                .about("angular distance arccos(cos(x_l, x_l+1))/π at the last token, mean over windows; spread: std over windows")
                .spread(one_block_spread)],
            notes: vec![
                format!("float64 on {:?}, last token of each window; {}", x.device(), calibration(model)),
                format!("closest run of n blocks (start..end, distance): {}", best.join(", ")),
            ],
            extra: serde_json::to_value(&table)?,
            present: Some(Presentation::profile("block importance", &["distance_n1"])),
            ..Report::default()
        })
    }
}

/// Settings of `ppl-importance` (it has none).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PplImportanceConfig {}

pub struct PplImportance;

impl Analyzer for PplImportance {
    type Config = PplImportanceConfig;
    fn analyze(&self, model: &Model, _: &PplImportanceConfig) -> Result<Report> {
        let full = model.loss(&[])?;
        let without: Vec<f64> = (0..model.info().layers).map(|l| model.loss(&[l])).collect::<Result<_>>()?;
        let importance: Vec<f64> = without.iter().map(|w| w - full).collect();
        Ok(Report::new()
            .metric(
                Metric::per_layer("ppl_importance", importance.clone())
                    .about("calibration loss with block l skipped minus the full model's, nats/token"),
            )
            .metric(Metric::per_layer("loss_without", without).about("calibration loss with block l skipped, nats/token"))
            .note(format!("full model: {full:.4} nats/token (perplexity {:.2}); {}", full.exp(), calibration(model)))
            .note(format!("least important first: {}", ranked(&importance)))
            .present(Presentation::profile("block importance", &["ppl_importance"])))
    }
}

scalpel_sdk::analyzer! {
    /// Perplexity importance of every block (Shortened LLaMA, Kim et al., arXiv 2402.02834): what skipping it costs.
    ///
    /// `ppl_importance`(l) = calibration loss with block l skipped − the full model's loss, in nats per token
    /// (the log of the perplexity ratio). The host runs the model (`Model::loss`), so this works on every family.
    /// Shortened LLaMA removes the blocks of lowest importance (`drop-layers` with `metric = "ppl_importance"`).
    "ppl-importance" => PplImportance
}

scalpel_sdk::analyzer! {
    /// Block influence of every block (ShortGPT, Men et al., arXiv 2403.03853): how much a block turns its input.
    ///
    /// BI_l = 1 − mean over all calibration tokens of cos(x_l, x_l+1), where x_l is the residual stream entering
    /// block l and x_l+1 the one leaving it (before any final norm). 0: the block leaves every token's direction
    /// unchanged; 1: it turns it by 90° on average. ShortGPT removes the blocks of lowest BI (`drop-layers`).
    "block-influence" => BlockInfluence
}

scalpel_sdk::analyzer! {
    /// Angular distance between the input and the output of every run of blocks (Gromov et al., arXiv 2403.17887).
    ///
    /// d(l, n) = mean over windows of arccos(cos(x_l, x_l+n)) / π at each window's last token, for every start l
    /// and block size n (0: same direction, 0.5: orthogonal, 1: opposite). The metric `distance_n1` is d(l, 1);
    /// the full table and the best start for each n are in the report's `extra` (`distance[l][n-1]`, `best`),
    /// where `prune-block` reads them.
    "angular-distance" => AngularDistance
}

/// The hidden states entering block `layer` as float64, checked to be `[sequences, T, d]`.
fn hidden(model: &Model, layer: usize) -> Result<Tensor> {
    let h = model.hidden(layer)?;
    let size = h.size();
    ensure!(
        size.len() == 3 && size.iter().all(|&s| s > 0),
        "the hidden states entering layer {layer} should be [sequences, tokens, d_model], got {size:?}"
    );
    Ok(h.f_to_kind(Kind::Double)?)
}

/// A 1-D tensor's values on the CPU.
fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?)?)
}

/// Layers from the lowest value up, as `layer:value`.
fn ranked(values: &[f64]) -> String {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order.iter().map(|&l| format!("{l}:{:.4}", values[l])).collect::<Vec<_>>().join(" ")
}

fn calibration(model: &Model) -> String {
    match &model.info().calibration {
        Some(c) => format!("{} windows of {} tokens from {}", c.sequences, c.tokens, c.source),
        None => "the host's calibration windows".into(),
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Population standard deviation (0 for one sequence), as the other analyzers report spreads.
fn std(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::{AngularDistance, AngularTable, BlockInfluence};
    use scalpel_sdk::prelude::*;
    use scalpel_sdk::testing::{run_analyzer, TestModel};
    use serde_json::json;
    use std::f64::consts::PI;

    const T: i64 = 4;
    const D: i64 = 8;

    fn analyze<A: Analyzer>(model: &TestModel) -> Report {
        run_analyzer::<A>(model, json!({})).unwrap()
    }

    fn table(model: &TestModel) -> AngularTable {
        serde_json::from_value(analyze::<AngularDistance>(model).extra).unwrap()
    }

    /// The same `[T, d]` states in every one of `sequences` windows.
    fn repeated(states: Vec<Tensor>, sequences: i64) -> TestModel {
        TestModel::from_hidden(states.into_iter().map(|s| s.unsqueeze(0).repeat([sequences, 1, 1])).collect())
    }

    /// Every token of every block's input along the 2-D direction at `angle` radians, `[T, D]`.
    fn at_angle(angle: f64) -> Tensor {
        let mut v = vec![0.0; D as usize];
        (v[0], v[1]) = (angle.cos(), angle.sin());
        Tensor::from_slice(&v).unsqueeze(0).repeat([T, 1])
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() <= tol), "{got:?} vs {want:?}");
    }

    #[test]
    fn identical_states_have_no_influence_and_no_distance() {
        let x = Tensor::randn([3, T, D], (Kind::Double, Device::Cpu));
        let model = TestModel::from_hidden(vec![x.copy(), x.copy(), x.copy(), x]);
        let bi = analyze::<BlockInfluence>(&model);
        assert_close(&bi.get("bi").unwrap().per_layer, &[0.0; 3], 1e-15);
        // arccos is steep at 1: a cosine one ulp below 1 is an angle of 2e-8.
        let t = table(&model);
        assert!(t.distance.iter().flatten().all(|&d| d.abs() < 1e-7), "{:?}", t.distance);
        assert_eq!(t.distance.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2, 1]);
    }

    #[test]
    fn orthogonal_states_have_influence_one_and_distance_one_half() {
        let states = (0..5).map(|l| Tensor::eye(D, (Kind::Double, Device::Cpu)).narrow(0, l, 1).repeat([T, 1])).collect();
        let model = repeated(states, 2);
        assert_close(&analyze::<BlockInfluence>(&model).get("bi").unwrap().per_layer, &[1.0; 4], 1e-15);
        let t = table(&model);
        assert!(t.distance.iter().flatten().all(|&d| (d - 0.5).abs() < 1e-15), "{:?}", t.distance);
    }

    #[test]
    fn opposite_states_have_influence_two_and_distance_one() {
        let x = Tensor::randn([T, D], (Kind::Double, Device::Cpu));
        let model = repeated(vec![x.copy(), -&x, x.copy()], 2);
        assert_close(&analyze::<BlockInfluence>(&model).get("bi").unwrap().per_layer, &[2.0, 2.0], 1e-12);
        // Cosines of -1 - ε are clamped: no NaN.
        let t = table(&model);
        assert_close(&t.distance[0], &[1.0, 0.0], 1e-7);
        assert_close(&t.distance[1], &[1.0], 1e-7);
    }

    #[test]
    fn a_turn_of_sixty_degrees_per_block() {
        // Block l turns the stream by 60°: runs of n blocks turn it by 60n°, seen as at most 180°.
        let model = repeated((0..5).map(|l| at_angle(l as f64 * PI / 3.0)).collect(), 2);
        let report = analyze::<BlockInfluence>(&model);
        assert_close(&report.get("bi").unwrap().per_layer, &[0.5; 4], 1e-12);
        let t = table(&model);
        assert_close(&t.distance[0], &[1.0 / 3.0, 2.0 / 3.0, 1.0, 2.0 / 3.0], 1e-7);
        assert_close(&t.starts(2), &[2.0 / 3.0; 3], 1e-7);
        let report = analyze::<AngularDistance>(&model);
        assert_close(&report.get("distance_n1").unwrap().per_layer, &[1.0 / 3.0; 4], 1e-12);
    }

    #[test]
    fn influence_averages_every_token_and_distance_reads_the_last() {
        // Only the last token turns, by 90°, in every block.
        let states: Vec<Tensor> = (0..4)
            .map(|l| {
                let s = at_angle(0.0);
                s.narrow(0, T - 1, 1).copy_(&at_angle(l as f64 * PI / 2.0).narrow(0, 0, 1));
                s
            })
            .collect();
        let model = repeated(states, 3);
        assert_close(&analyze::<BlockInfluence>(&model).get("bi").unwrap().per_layer, &[1.0 / T as f64; 3], 1e-12);
        assert_close(&table(&model).distance[0], &[0.5, 1.0, 0.5], 1e-7);
    }

    #[test]
    fn spreads_and_means_are_over_windows() {
        // Window 0 never turns; window 1 turns by 90° in block 0 only.
        let e = |i| Tensor::eye(D, (Kind::Double, Device::Cpu)).narrow(0, i, 1).repeat([T, 1]);
        let model = TestModel::from_hidden(vec![
            Tensor::stack(&[e(0), e(0)], 0),
            Tensor::stack(&[e(0), e(1)], 0),
            Tensor::stack(&[e(0), e(1)], 0),
        ]);
        let bi = analyze::<BlockInfluence>(&model);
        let bi = bi.get("bi").unwrap();
        assert_close(&bi.per_layer, &[0.5, 0.0], 1e-15);
        assert_close(bi.per_layer_spread.as_ref().unwrap(), &[0.5, 0.0], 1e-15);
        let report = analyze::<AngularDistance>(&model);
        let d = report.get("distance_n1").unwrap();
        assert_close(&d.per_layer, &[0.25, 0.0], 1e-7);
        assert_close(d.per_layer_spread.as_ref().unwrap(), &[0.25, 0.0], 1e-7);
    }

    #[test]
    fn the_best_start_for_each_block_size_is_the_closest_run() {
        // Angles 0°, 90°, 100°, 112°, 200°, 203°: a different run is closest for each size.
        let degrees = [0.0, 90.0, 100.0, 112.0, 200.0, 203.0];
        let model = repeated(degrees.iter().map(|d: &f64| at_angle(d.to_radians())).collect(), 2);
        let report = analyze::<AngularDistance>(&model);
        let t: AngularTable = serde_json::from_value(report.extra.clone()).unwrap();
        let best: Vec<(usize, usize)> = t.best.iter().map(|b| (b.n, b.start)).collect();
        // n = 1: 4..5 turns 3°; n = 2: 1..3 turns 22°; n = 3: 2..5 turns 103°; n = 4: 1..5 turns 113°;
        // n = 5: 0..5 turns 203°, seen as 157°.
        assert_eq!(best, [(1, 4), (2, 1), (3, 2), (4, 1), (5, 0)]);
        assert_close(&t.best.iter().map(|b| b.distance * 180.0).collect::<Vec<_>>(), &[3.0, 22.0, 103.0, 113.0, 157.0], 1e-6);
        assert!(report.notes.iter().any(|n| n.contains("n=2: 1..3 (0.1222)")), "{:?}", report.notes);
    }

    #[test]
    fn a_model_without_hidden_states_and_a_stray_setting_are_errors() {
        let e = run_analyzer::<BlockInfluence>(&TestModel::shape(2), json!({})).unwrap_err();
        assert!(e.to_string().contains("no hidden states entering layer 0"), "{e}");
        let e = run_analyzer::<AngularDistance>(&TestModel::shape(2), json!({"n": 1})).unwrap_err();
        assert!(e.to_string().contains("unknown config key `n`"), "{e}");
    }
}
