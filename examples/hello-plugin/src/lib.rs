//! A complete third-party scalpel plugin: one analyzer, one strategy, and their tests without the host.
//! Build with `cargo build --release`, then load it with `scalpel --plugins target/release/libscalpel_example_hello.so`
//! (an example stays off the default plugin path; see Cargo.toml for naming yours). `scalpel new-plugin NAME`
//! writes a crate like this one that builds outside the repository.

use scalpel_sdk::prelude::*;

/// Settings of `weight-norms`.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct WeightNormsConfig {
    /// Divide each norm by the square root of the tensor's element count (an RMS instead of a norm).
    pub per_element: bool,
}

pub struct WeightNorms;

impl Analyzer for WeightNorms {
    type Config = WeightNormsConfig;
    fn analyze(&self, model: &Model, config: &WeightNormsConfig) -> Result<Report> {
        let info = model.info();
        let mut norms = vec![0.0; info.layers];
        let mut device = Device::Cpu;
        for (layer, norm) in norms.iter_mut().enumerate() {
            // A block's tensors by their name inside the block (`self_attn.q_proj.weight`), whatever the family.
            let block = model.block(layer)?;
            for name in block.names().into_iter().filter(|n| n.ends_with("weight")) {
                let t = block.tensor(name)?;
                device = t.device();
                let scale = if config.per_element { (t.numel() as f64).sqrt() } else { 1.0 };
                *norm += t.to_kind(Kind::Double).norm().double_value(&[]) / scale;
            }
        }
        let metric = Metric::per_layer("weight_norm", norms).about("sum of the Frobenius norms of a block's weights");
        Ok(Report::new().metric(metric).note(format!("computed on {device:?}")))
    }
}

/// Settings of `drop-layers`.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct DropLayersConfig {
    /// Indices of the blocks to remove.
    pub layers: Vec<usize>,
}

pub struct DropLayers;

impl Strategy for DropLayers {
    type Config = DropLayersConfig;
    fn plan(&self, model: &Model, config: &DropLayersConfig, _: &Reports) -> Result<Plan> {
        Ok(Plan::without(model.info().layers, &config.layers)?.note(format!("dropped layers {:?}", config.layers)))
    }
}

scalpel_sdk::analyzer! {
    /// Sum of the Frobenius norms of each block's weight matrices.
    "weight-norms" => WeightNorms
}
scalpel_sdk::strategy! {
    /// Removes the listed blocks and keeps the rest in order.
    "drop-layers" => DropLayers
}
scalpel_sdk::export_plugin!();

#[cfg(test)]
mod tests {
    use super::*;
    use scalpel_sdk::testing::{run_analyzer, run_strategy, TestModel};

    #[test]
    fn weight_norms_sum_every_weight_of_each_block() {
        let model = TestModel::tiny();
        let report = run_analyzer::<WeightNorms>(&model, WeightNormsConfig::default()).unwrap();
        let info = scalpel_sdk::ModelSource::info(&model);
        let norm = |name: &String| scalpel_sdk::ModelSource::tensor(&model, name).unwrap().to_kind(Kind::Double).norm().double_value(&[]);
        let want: Vec<f64> = (0..info.layers)
            .map(|l| info.tensors.iter().filter(|n| n.starts_with(&format!("model.layers.{l}."))).map(norm).sum())
            .collect();
        let got = &report.get("weight_norm").unwrap().per_layer;
        assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-9 * w), "{got:?} vs {want:?}");
        let rms = run_analyzer::<WeightNorms>(&model, WeightNormsConfig { per_element: true }).unwrap();
        assert!(rms.get("weight_norm").unwrap().per_layer.iter().zip(got).all(|(r, n)| r < n), "an RMS is below the norm of a tensor of many elements");
    }

    #[test]
    fn drop_layers_keeps_the_rest_in_order() {
        let plan = run_strategy::<DropLayers>(&TestModel::shape(5), DropLayersConfig { layers: vec![3, 1] }, &Reports::default()).unwrap();
        assert_eq!(plan.sources(), [0, 2, 4]);
        let e = run_strategy::<DropLayers>(&TestModel::shape(2), DropLayersConfig { layers: vec![0, 1] }, &Reports::default()).unwrap_err();
        assert!(e.to_string().contains("keeps no layer"), "{e}");
        let e = run_strategy::<DropLayers>(&TestModel::shape(2), serde_json::json!({"layer": [0]}), &Reports::default()).unwrap_err();
        assert!(e.to_string().contains("unknown config key `layer`"), "{e}");
        // A block the model does not have was once skipped without a word, and nothing was dropped.
        let e = run_strategy::<DropLayers>(&TestModel::shape(4), DropLayersConfig { layers: vec![1, 9] }, &Reports::default()).unwrap_err();
        assert!(e.to_string().contains("layer 9 does not exist: the model has layers 0..4"), "{e}");
    }
}
