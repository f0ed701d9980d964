//! The attention analyzers of Inheritune: rank, mass and entropy of every head's attention matrix,
//! summarised per head and per layer. Each pulls one layer's attention at a time.

use crate::metrics;
use scalpel_sdk::prelude::*;

/// Settings of `attn-rank`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RankConfig {
    /// Energy threshold τ in (0, 1]: k* is the fewest singular values whose squares hold τ of ‖A‖²_F.
    pub tau: f64,
    /// Which matrices to take the rank of.
    pub mode: RankMode,
    /// Floating-point precision of the eigenvalues.
    pub precision: Precision,
}

impl Default for RankConfig {
    fn default() -> Self {
        RankConfig { tau: 0.9, mode: RankMode::PerSequence, precision: Precision::F64 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RankMode {
    /// k* of every sequence's matrix, averaged over sequences (the paper's definition).
    PerSequence,
    /// k* of the matrix averaged over sequences, as the authors' demo notebook computes it (no spreads).
    MeanMatrix,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 64-bit: ties at the threshold resolve as in exact arithmetic.
    F64,
    /// 32-bit: about 1.5× as fast on the CPU (not on a GPU); k* may differ where the energy sits within
    /// about 1e-5 (relative) of the threshold.
    F32,
}

pub struct AttnRank;

impl Analyzer for AttnRank {
    type Config = RankConfig;
    fn analyze(&self, model: &Model, config: &RankConfig) -> Result<Report> {
        check_fraction("tau", config.tau)?;
        let (kind, precision) = match config.precision {
            Precision::F64 => (Kind::Double, "f64"),
            Precision::F32 => (Kind::Float, "f32"),
        };
        let (per_sequence, mode) = match config.mode {
            RankMode::PerSequence => (true, "per-sequence"),
            RankMode::MeanMatrix => (false, "mean-matrix"),
        };
        let mut max = Collector::new(OverHeads::Max, true);
        let mut mean = Collector::new(OverHeads::Mean, false);
        for layer in 0..model.info().layers {
            let attn = attention(model, layer)?;
            let attn = if per_sequence { attn } else { attn.f_mean_dim(0, true, Kind::Double)? };
            let k = metrics::energy_rank(&attn, config.tau, kind)?;
            max.push(&k)?;
            mean.push(&k)?;
        }
        let tau = config.tau;
        let spread = if per_sequence { "; spread: std over sequences of the per-sequence max over heads" } else { "" };
        let max = max.metric(
            "max_rank",
            format!("MaxRank: max over heads of k* (fewest σᵢ² reaching τ = {tau} of ‖A‖²_F){spread}"),
            per_sequence,
        );
        let lazy: Vec<f64> = max.per_layer.iter().map(|&r| if r == 1.0 { 1.0 } else { 0.0 }).collect();
        let lazy_layers: Vec<String> = (0..lazy.len()).filter(|&l| lazy[l] == 1.0).map(|l| l.to_string()).collect();
        let lazy_note = if lazy_layers.is_empty() {
            "no lazy layers".into()
        } else {
            format!("lazy layers: {}", lazy_layers.join(", "))
        };
        Ok(Report::new()
            .metric(max)
            .metric(mean.metric("mean_rank", format!("mean over heads of k* at τ = {tau}"), per_sequence))
            .metric(
                Metric::per_layer("lazy", lazy).about("1 where MaxRank = 1: every head rank-1 (a lazy layer), else 0"),
            )
            .note(format!("τ = {tau}, {mode}, {precision}; {}", calibration(model)))
            .note(lazy_note)
            .present(attention_profile(&["max_rank"], "max_rank").mark("lazy", "lazy layer (MaxRank = 1)")))
    }
}

/// Settings of `attn-mass`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MassConfig {
    /// Energy threshold η in (0, 1]: m* is the fewest columns whose energies ‖A·ⱼ‖² hold η of ‖A‖²_F.
    pub eta: f64,
}

impl Default for MassConfig {
    fn default() -> Self {
        MassConfig { eta: 0.9 }
    }
}

pub struct AttnMass;

impl Analyzer for AttnMass {
    type Config = MassConfig;
    fn analyze(&self, model: &Model, config: &MassConfig) -> Result<Report> {
        check_fraction("eta", config.eta)?;
        let mut avg = Collector::new(OverHeads::Mean, true);
        let mut max = Collector::new(OverHeads::Max, false);
        for layer in 0..model.info().layers {
            let m = metrics::mass(&attention(model, layer)?, config.eta)?;
            avg.push(&m)?;
            max.push(&m)?;
        }
        let eta = config.eta;
        Ok(Report::new()
            .metric(avg.metric(
                "avg_mass",
                format!("AvgMass: mean over heads of m* (fewest columns reaching η = {eta} of ‖A‖²_F)"),
                true,
            ))
            .metric(max.metric("max_mass", format!("max over heads of m* at η = {eta}"), true))
            .note(format!("η = {eta}; {}", calibration(model)))
            .present(attention_profile(&["avg_mass"], "avg_mass")))
    }
}

/// Settings of `attn-entropy` (it has none).
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EntropyConfig {}

pub struct AttnEntropy;

impl Analyzer for AttnEntropy {
    type Config = EntropyConfig;
    fn analyze(&self, model: &Model, _: &EntropyConfig) -> Result<Report> {
        let new = || Collector::new(OverHeads::Mean, true);
        let (mut entropy, mut normalised, mut sink) = (new(), new(), new());
        for layer in 0..model.info().layers {
            let attn = attention(model, layer)?;
            let (h, hn) = metrics::entropy(&attn)?;
            entropy.push(&h)?;
            normalised.push(&hn)?;
            sink.push(&metrics::sink_fraction(&attn)?)?;
        }
        Ok(Report::new()
            .metric(entropy.metric("entropy", "mean row entropy −Σⱼ Aᵢⱼ log Aᵢⱼ, nats", true))
            .metric(normalised.metric(
                "entropy_normalized",
                "mean over rows i ≥ 2 of Hᵢ / log i (1 = uniform over the causal keys)",
                true,
            ))
            .metric(sink.metric("sink_fraction", "mean over rows of the attention on position 0", true))
            .note(calibration(model))
            .present(attention_profile(&["entropy_normalized"], "entropy_normalized")))
    }
}

scalpel_sdk::analyzer! {
    /// Energy rank k* of every attention matrix, and the lazy layers of Inheritune (arXiv 2404.08634).
    ///
    /// k* is the fewest singular values whose squares hold τ of ‖A‖²_F, for each calibration sequence, head
    /// and layer. Rank(h,l) is its mean over sequences (the per-head values of `max_rank`), MaxRank(l) the
    /// max over heads (`max_rank`), `mean_rank` the mean over heads, and a layer is lazy when MaxRank(l) = 1.
    /// The paper: τ = 0.9, per sequence, on 100 windows of 100 tokens.
    "attn-rank" => AttnRank, default
}

scalpel_sdk::analyzer! {
    /// Attention mass m* of every attention matrix (Inheritune, arXiv 2404.08634).
    ///
    /// m* is the fewest columns (keys) whose energies ‖A·ⱼ‖², largest first, hold η of ‖A‖²_F. Mass(h,l) is
    /// its mean over sequences, AvgMass(l) the mean over heads (`avg_mass`), and `max_mass` the max over
    /// heads. The paper: η = 0.9.
    "attn-mass" => AttnMass, default
}

scalpel_sdk::analyzer! {
    /// Row entropy of every attention matrix, raw and causal-normalised, and the attention on position 0.
    ///
    /// Hᵢ = −Σⱼ Aᵢⱼ log Aᵢⱼ in nats, averaged over rows (`entropy`); Hᵢ / log i over rows i ≥ 2, where row i
    /// has i admissible keys (`entropy_normalized`, 1 for uniform attention); the mean of Aᵢ₀ (`sink_fraction`).
    /// Not defined by the paper; per head the mean over sequences, per layer the mean over heads.
    "attn-entropy" => AttnEntropy, default
}

/// The host draws these metrics in its "attention profile" figure, and attention maps of the heads with the
/// lowest and highest `maps_by`.
fn attention_profile(metrics: &[&str], maps_by: &str) -> Presentation {
    Presentation::profile("attention profile", metrics).attention_maps_by(maps_by)
}

fn check_fraction(name: &str, value: f64) -> Result<()> {
    ensure!(value > 0.0 && value <= 1.0, "`{name}` must be in (0, 1], got {value}");
    Ok(())
}

/// Attention of `layer`, checked to be `[sequences, heads, T, T]` with at least one sequence.
fn attention(model: &Model, layer: usize) -> Result<Tensor> {
    let attn = model.attention(layer)?;
    let size = attn.size();
    ensure!(
        size.len() == 4 && size[0] > 0 && size[1] > 0 && size[2] == size[3],
        "layer {layer}: expected attention [sequences, heads, T, T], got {size:?}"
    );
    Ok(attn)
}

fn calibration(model: &Model) -> String {
    match &model.info().calibration {
        Some(c) => c.source.clone(),
        None => "calibration windows of the host".into(),
    }
}

/// How a layer's value is formed from its heads' values.
#[derive(Clone, Copy)]
enum OverHeads {
    Mean,
    Max,
}

impl OverHeads {
    fn apply(self, values: &[f64]) -> f64 {
        match self {
            OverHeads::Mean => mean(values),
            OverHeads::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// One metric, filled in layer by layer from per-matrix values `[sequences, heads]`. Per head: mean and
/// (population) std over sequences. Per layer: the heads' means reduced over heads, and the std over
/// sequences of the per-sequence reduction over heads.
struct Collector {
    over_heads: OverHeads,
    keep_heads: bool,
    layer: Vec<f64>,
    layer_spread: Vec<f64>,
    head: Vec<Vec<f64>>,
    head_spread: Vec<Vec<f64>>,
}

impl Collector {
    fn new(over_heads: OverHeads, keep_heads: bool) -> Self {
        Collector { over_heads, keep_heads, layer: vec![], layer_spread: vec![], head: vec![], head_spread: vec![] }
    }

    fn push(&mut self, values: &Tensor) -> Result<()> {
        let rows: Vec<Vec<f64>> = Vec::try_from(values.f_to_device(Device::Cpu)?.f_to_kind(Kind::Double)?)?;
        let columns: Vec<Vec<f64>> = (0..rows[0].len()).map(|h| rows.iter().map(|r| r[h]).collect()).collect();
        let head: Vec<f64> = columns.iter().map(|c| mean(c)).collect();
        self.layer.push(self.over_heads.apply(&head));
        self.layer_spread.push(std(&rows.iter().map(|r| self.over_heads.apply(r)).collect::<Vec<_>>()));
        self.head.push(head);
        self.head_spread.push(columns.iter().map(|c| std(c)).collect());
        Ok(())
    }

    /// The metric; `spreads` is false when each head had one matrix (nothing to spread over).
    fn metric(self, name: &str, about: impl Into<String>, spreads: bool) -> Metric {
        let mut metric = Metric::per_layer(name, self.layer).about(about);
        if spreads {
            metric = metric.spread(self.layer_spread);
        }
        if self.keep_heads {
            metric = metric.heads(self.head, spreads.then_some(self.head_spread));
        }
        metric
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Population standard deviation (divides by n, like numpy's default; 0 for one sequence).
fn std(values: &[f64]) -> f64 {
    let m = mean(values);
    (values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::{AttnEntropy, AttnMass, AttnRank};
    use crate::metrics::tests::{identity, sink, uniform};
    use scalpel_sdk::abi::{local_plugin, read_manifest};
    use scalpel_sdk::prelude::*;
    use scalpel_sdk::testing::{run_analyzer, TestModel};
    use serde_json::json;

    const T: i64 = 100;

    /// `[2, 3, T, T]` from a pattern per (sequence, head).
    fn layer(pattern: impl Fn(usize, usize) -> Tensor) -> Tensor {
        let seq = |n| Tensor::stack(&(0..3).map(|h| pattern(n, h)).collect::<Vec<_>>(), 0);
        Tensor::stack(&[seq(0), seq(1)], 0)
    }

    /// Two sequences, three heads, five layers of known attention.
    fn synthetic() -> TestModel {
        TestModel::from_attention(vec![
            layer(|_, _| identity(T)),
            layer(|_, _| uniform(T)),
            layer(|_, h| if h < 2 { sink(T) } else { sink(T) * 0.9 + uniform(T) * 0.1 }),
            layer(|_, h| [identity(T), uniform(T), sink(T)][h].shallow_clone()),
            layer(|n, _| if n == 0 { identity(T) } else { sink(T) }),
        ])
    }

    /// Equal up to the float32 rounding of the attention the model hands out.
    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} vs {want:?}");
    }

    #[test]
    fn rank_through_the_plugin_boundary() {
        let report = run_analyzer::<AttnRank>(&synthetic(), json!({})).unwrap();
        let max = report.get("max_rank").unwrap();
        assert_eq!(max.per_layer, [90.0, 5.0, 1.0, 90.0, 45.5]);
        assert_eq!(max.per_head.as_ref().unwrap()[3], [90.0, 5.0, 1.0]);
        // Layer 4: identity on one sequence, sinks on the other.
        assert_eq!(max.per_head_spread.as_ref().unwrap()[4], [44.5; 3]);
        assert_eq!(max.per_layer_spread.as_ref().unwrap(), &[0.0, 0.0, 0.0, 0.0, 44.5]);
        assert_eq!(report.get("mean_rank").unwrap().per_layer, [90.0, 5.0, 1.0, 32.0, 45.5]);
        assert_eq!(report.get("lazy").unwrap().per_layer, [0.0, 0.0, 1.0, 0.0, 0.0]);
        assert!(report.notes.iter().any(|n| n == "lazy layers: 2"), "{:?}", report.notes);
    }

    #[test]
    fn rank_settings_change_the_result() {
        let max = |config| run_analyzer::<AttnRank>(&synthetic(), config).unwrap().get("max_rank").unwrap().clone();
        assert_eq!(max(json!({"tau": 0.5})).per_layer[0], 50.0);
        assert_eq!(max(json!({"precision": "f32"})).per_layer, [90.0, 5.0, 1.0, 90.0, 45.5]);
        let mean_matrix = max(json!({"mode": "mean-matrix"}));
        assert_eq!(mean_matrix.per_layer[..4], [90.0, 5.0, 1.0, 90.0]);
        assert_eq!((mean_matrix.per_layer_spread, mean_matrix.per_head_spread), (None, None));
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let e = run_analyzer::<AttnRank>(&synthetic(), json!({"taux": 0.5})).unwrap_err().to_string();
        assert!(e.contains("taux"), "{e}");
        let e = run_analyzer::<AttnMass>(&synthetic(), json!({"eta": 1.5})).unwrap_err().to_string();
        assert!(e.contains("eta"), "{e}");
        let e = run_analyzer::<AttnEntropy>(&synthetic(), json!({"tau": 0.9})).unwrap_err().to_string();
        assert!(e.contains("tau"), "{e}");
    }

    #[test]
    fn mass_through_the_plugin_boundary() {
        let report = run_analyzer::<AttnMass>(&synthetic(), json!({})).unwrap();
        assert_close(&report.get("avg_mass").unwrap().per_layer, &[90.0, 30.0, 1.0, 121.0 / 3.0, 45.5]);
        assert_eq!(report.get("max_mass").unwrap().per_layer, [90.0, 30.0, 1.0, 90.0, 45.5]);
        assert_eq!(report.get("avg_mass").unwrap().per_head_spread.as_ref().unwrap()[4], [44.5; 3]);
    }

    #[test]
    fn entropy_through_the_plugin_boundary() {
        let report = run_analyzer::<AttnEntropy>(&synthetic(), json!({})).unwrap();
        let entropy = &report.get("entropy").unwrap().per_layer;
        assert_eq!((entropy[0], entropy[4]), (0.0, 0.0));
        assert!((entropy[1] - 3.637).abs() < 5e-4, "{entropy:?}");
        assert_close(&report.get("entropy_normalized").unwrap().per_layer[..2], &[0.0, 1.0]);
        let sink = &report.get("sink_fraction").unwrap().per_layer;
        assert_close(
            &[sink[0], sink[3]],
            &[0.01, (0.01 + (1..=100).map(|i| 1.0 / i as f64).sum::<f64>() / 100.0 + 1.0) / 3.0],
        );
    }

    #[test]
    fn the_manifest_describes_each_analyzer() {
        let manifest = read_manifest(local_plugin()).unwrap();
        for name in ["attn-rank", "attn-mass", "attn-entropy"] {
            let item = manifest.items.iter().find(|i| i.name == name).unwrap();
            assert!(item.doc.lines().count() > 2, "{name}: {}", item.doc);
        }
        let rank = manifest.items.iter().find(|i| i.name == "attn-rank").unwrap();
        assert_eq!(rank.schema["properties"]["tau"]["default"], 0.9);
        assert!(rank.schema["properties"]["tau"]["description"].as_str().unwrap().contains("τ"));
    }
}
