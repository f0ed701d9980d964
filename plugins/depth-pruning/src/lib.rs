//! Depth pruning as a scalpel plugin set: measure how little each block (or run of blocks) changes the
//! residual stream, then remove the blocks that change it least. Zero-shot pruning, to be healed by training.
//!
//! - `block-influence` (ShortGPT, Men et al., arXiv 2403.03853) and `drop-layers`
//! - `angular-distance` (Gromov et al., arXiv 2403.17887) and `prune-block`

mod analyzers;
mod strategies;

scalpel_sdk::export_plugin!();
