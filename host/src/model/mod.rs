//! Models: HF checkpoints in and out, the architecture data behind them, one forward pass with a
//! module per family, the parameter store shared by analysis, eval, generate and training, and
//! tokenizers.

pub mod arch;
pub mod checkpoint;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod params;
pub mod qwen3;
pub mod tokenizer;
pub mod transformer;
pub mod write;

pub use checkpoint::Checkpoint;
pub use transformer::Transformer;
