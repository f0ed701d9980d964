//! Models: HF checkpoints in and out, the architecture data behind them, GGUF import, the forward pass
//! and tokenizers.

pub mod arch;
pub mod checkpoint;
pub mod forward;
pub mod tokenizer;
pub mod write;

pub use checkpoint::Checkpoint;
pub use forward::Transformer;
