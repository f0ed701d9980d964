//! `{{name}}`: a scalpel plugin with one analyzer and one strategy. Build it with `cargo build --release`, load it
//! with `scalpel --plugins target/release/libscalpel_plugin_{{snake}}.so …` (README.md says more).

use scalpel_sdk::prelude::*;

/// Settings of `{{name}}-update`.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct UpdateConfig {
    /// Measure only the last token of each calibration window instead of every token.
    pub last_token: bool,
}

/// How much each block changes the residual stream, relative to what enters it.
pub struct Update;

impl Analyzer for Update {
    type Config = UpdateConfig;
    fn analyze(&self, model: &Model, config: &UpdateConfig) -> Result<Report> {
        let layers = model.info().layers;
        let mut update = Vec::with_capacity(layers);
        // hidden(l) is the residual stream entering block l, [sequences, tokens, d_model] in float32.
        let mut input = model.hidden(0)?.to_kind(Kind::Double);
        for layer in 0..layers {
            let output = model.hidden(layer + 1)?.to_kind(Kind::Double);
            let (x, y) = if config.last_token { (input.select(1, -1), output.select(1, -1)) } else { (input.shallow_clone(), output.shallow_clone()) };
            let ratio = (&y - &x).norm_scalaropt_dim(2.0, [-1i64], false) / x.norm_scalaropt_dim(2.0, [-1i64], false).clamp_min(1e-12);
            update.push(ratio.mean(Kind::Double).double_value(&[]));
            input = output;
        }
        let metric = Metric::per_layer("update", update).about("mean over tokens of |x_l+1 − x_l| / |x_l|, x_l entering block l");
        Ok(Report::new().metric(metric).note(format!("{} tokens", if config.last_token { "last" } else { "all" })))
    }
}

/// Settings of `{{name}}-drop`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct DropConfig {
    /// How many blocks to remove: those of the smallest `update`.
    pub count: usize,
}

impl Default for DropConfig {
    fn default() -> Self {
        DropConfig { count: 1 }
    }
}

/// Removes the blocks that change the residual stream least, by the `{{name}}-update` report.
pub struct DropLeast;

impl Strategy for DropLeast {
    type Config = DropConfig;
    fn plan(&self, model: &Model, config: &DropConfig, reports: &Reports) -> Result<Plan> {
        let layers = model.info().layers;
        ensure!(config.count < layers, "`count` = {} would remove every one of the {layers} blocks", config.count);
        // A report is found by the name of the analyzer that made it; the error says which step to add.
        let update = &reports.get("{{name}}-update")?.get("update")?.per_layer;
        ensure!(update.len() == layers, "the `{{name}}-update` report covers {} layers, the model has {layers}", update.len());
        let mut order: Vec<usize> = (0..layers).collect();
        order.sort_by(|&a, &b| update[a].total_cmp(&update[b]));
        let dropped = &order[..config.count];
        Ok(Plan::without(layers, dropped)?.note(format!("removed blocks {dropped:?}: the smallest relative update")))
    }
}

scalpel_sdk::analyzer! {
    /// Relative update of every block: how much it changes the residual stream that enters it.
    "{{name}}-update" => Update
}
scalpel_sdk::strategy! {
    /// Removes the `count` blocks with the smallest relative update (run `{{name}}-update` first).
    "{{name}}-drop" => DropLeast
}
scalpel_sdk::export_plugin!();

#[cfg(test)]
mod tests {
    use super::*;
    use scalpel_sdk::testing::{run_analyzer, run_strategy, TestModel};

    /// Block 0 doubles the stream, block 1 leaves it as it is.
    fn doubling_then_idle() -> TestModel {
        let x = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        TestModel::from_hidden(vec![x.copy(), &x * 2.0, &x * 2.0])
    }

    #[test]
    fn a_doubling_block_updates_by_one_and_an_idle_block_by_zero() {
        let report = run_analyzer::<Update>(&doubling_then_idle(), UpdateConfig::default()).unwrap();
        let update = &report.get("update").unwrap().per_layer;
        assert!((update[0] - 1.0).abs() < 1e-6 && update[1] == 0.0, "{update:?}");
    }

    #[test]
    fn every_block_of_a_real_forward_pass_changes_the_stream() {
        let model = TestModel::tiny();
        let report = run_analyzer::<Update>(&model, UpdateConfig { last_token: true }).unwrap();
        assert!(report.get("update").unwrap().per_layer.iter().all(|&u| u > 0.0), "{report:?}");
    }

    #[test]
    fn drop_removes_the_idle_block_and_needs_the_report() {
        let model = doubling_then_idle();
        let e = run_strategy::<DropLeast>(&model, DropConfig::default(), &Reports::default()).unwrap_err();
        assert!(e.to_string().contains("run the `{{name}}-update` analyzer"), "{e}");
        let mut reports = Reports::default();
        reports.insert(run_analyzer::<Update>(&model, UpdateConfig::default()).unwrap());
        assert_eq!(run_strategy::<DropLeast>(&model, DropConfig::default(), &reports).unwrap().sources(), [0]);
        let e = run_strategy::<DropLeast>(&model, serde_json::json!({"cuont": 1}), &reports).unwrap_err();
        assert!(e.to_string().contains("unknown config key `cuont`"), "{e}");
    }
}
