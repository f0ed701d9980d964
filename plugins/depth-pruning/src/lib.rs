//! Depth pruning as a scalpel plugin set: measure how little each block (or run of blocks) changes the
//! residual stream, then remove the blocks that change it least. Zero-shot pruning, to be healed by training.
//!
//! - `block-influence` (ShortGPT, Men et al., arXiv 2403.03853) and `drop-layers`
//! - `angular-distance` (Gromov et al., arXiv 2403.17887) and `prune-block`

mod analyzers;
mod strategies;

scalpel_sdk::export_plugin!();

/// Models with given hidden states, run through the plugin boundary as the host runs items.
#[cfg(test)]
mod testing {
    use scalpel_sdk::abi::{call_item, local_plugin};
    use scalpel_sdk::prelude::*;
    use scalpel_sdk::{Calibration, ModelInfo, ModelSource};

    /// `states[l]`, `[sequences, T, d]`, enters block l; the last one leaves the last block.
    pub struct Hidden {
        info: ModelInfo,
        states: Vec<Tensor>,
    }

    impl Hidden {
        pub fn new(states: Vec<Tensor>) -> Self {
            let size = states[0].size();
            let calibration = Calibration { sequences: size[0] as usize, tokens: size[1] as usize, source: "synthetic".into() };
            let info = ModelInfo { layers: states.len() - 1, calibration: Some(calibration), ..ModelInfo::default() };
            Hidden { info, states }
        }

        /// The same `[T, d]` states in every one of `sequences` windows.
        pub fn repeated(states: Vec<Tensor>, sequences: i64) -> Self {
            Self::new(states.into_iter().map(|s| s.unsqueeze(0).repeat([sequences, 1, 1])).collect())
        }
    }

    impl ModelSource for Hidden {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn tensor(&self, name: &str) -> Result<Tensor> {
            bail!("no weight `{name}` in a model made of hidden states")
        }
        fn attention(&self, _: usize) -> Result<Tensor> {
            bail!("no attention in a model made of hidden states")
        }
        fn hidden(&self, layer: usize) -> Result<Tensor> {
            self.states.get(layer).map(Tensor::copy).ok_or_else(|| anyhow!("no hidden states entering layer {layer}"))
        }
    }

    /// Runs an item as the host does: JSON in, JSON out.
    pub fn run<T: serde::de::DeserializeOwned>(item: &str, model: &dyn ModelSource, config: &str, reports: &Reports) -> Result<T> {
        Ok(serde_json::from_str(&call_item(local_plugin(), item, model, config, &serde_json::to_string(reports)?)?)?)
    }

    /// A model of `layers` blocks with no hidden states: strategies read only its shape.
    pub fn shape(layers: usize) -> Hidden {
        Hidden { info: ModelInfo { layers, ..ModelInfo::default() }, states: vec![] }
    }
}
