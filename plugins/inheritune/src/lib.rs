//! Inheritune (Sanyal et al., arXiv 2404.08634) as a scalpel plugin set: the attention analyzers
//! that find degenerate ("lazy") layers, and the strategies that cut and regrow depth.

mod analyzers;
mod lanes;
pub mod metrics;
mod strategies;

scalpel_sdk::export_plugin!();
