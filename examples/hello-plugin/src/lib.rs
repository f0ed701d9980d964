//! A complete third-party scalpel plugin: one analyzer and one strategy. Copy this folder to start yours.
//! Build with `cargo build --release`, then load it with `scalpel --plugins target/release/libscalpel_example_hello.so`
//! (an example stays off the default plugin path; see Cargo.toml for naming yours).

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
            let prefix = format!(".{layer}.");
            for name in info.tensors.iter().filter(|n| n.contains(&prefix) && n.ends_with("weight")) {
                let t = model.tensor(name)?;
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
        let keep: Vec<_> = (0..model.info().layers).filter(|l| !config.layers.contains(l)).map(|l| l..l + 1).collect();
        Ok(Plan::ranges(&keep).note(format!("dropped layers {:?}", config.layers)))
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
