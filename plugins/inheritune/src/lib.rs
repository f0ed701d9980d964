//! Inheritune (arXiv 2404.08634) as a scalpel plugin set.
scalpel_sdk::export_plugin!();
