//! scalpel's per-user cache folder. The xtask compiles this file too (`#[path]`): it fetches libtorch into the
//! same cache before any `scalpel` exists, and neither crate can depend on the other.

use anyhow::{Context, Result};
use std::path::PathBuf;

/// `$SCALPEL_CACHE`, else `$XDG_CACHE_HOME/scalpel`, else `~/.cache/scalpel`; created if missing.
pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("SCALPEL_CACHE") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("scalpel")
    } else {
        let home = std::env::var_os("HOME").context("neither SCALPEL_CACHE nor HOME is set: set SCALPEL_CACHE to a writable folder")?;
        PathBuf::from(home).join(".cache").join("scalpel")
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the cache {} (set SCALPEL_CACHE elsewhere)", dir.display()))?;
    Ok(dir)
}
