//! `scalpel new-plugin NAME [DIR]`: a standalone plugin crate that builds and tests outside this repository.
//!
//! The SDK is not on crates.io, so the crate depends on the `sdk` folder this scalpel was built from, finds
//! libtorch through a `.cargo/config.toml` naming the libtorch this process runs on, and pins every crate to
//! the versions scalpel's own `Cargo.lock` holds.

use anyhow::{bail, Context, Result};
use scalpel_files::{StagedDir, Replace};
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("../templates/new-plugin/Cargo.toml");
const BUILD_RS: &str = include_str!("../templates/new-plugin/build.rs");
const LIB_RS: &str = include_str!("../templates/new-plugin/lib.rs");
const README: &str = include_str!("../templates/new-plugin/README.md");
const CONFIG: &str = include_str!("../templates/new-plugin/config.toml");
const GITIGNORE: &str = include_str!("../templates/new-plugin/gitignore");
/// The versions scalpel was built and tested with.
const WORKSPACE_LOCK: &str = include_str!("../../Cargo.lock");

/// Writes the crate for plugin `name` into `dir` (default: `./scalpel-plugin-NAME`) and returns where it went.
pub fn create(name: &str, dir: Option<&Path>) -> Result<PathBuf> {
    check_name(name)?;
    let dest = dir.map_or_else(|| PathBuf::from(format!("scalpel-plugin-{name}")), Path::to_path_buf);
    if dest.symlink_metadata().is_ok() {
        bail!("{} already exists: name a folder that does not (new-plugin never writes over anything)", dest.display());
    }
    let sdk = Path::new(scalpel_sdk::SOURCE_DIR);
    if !sdk.join("Cargo.toml").is_file() {
        bail!(
            "the SDK this scalpel was built from is gone from {}: the new crate depends on it by path (the SDK is not on \
             crates.io); build scalpel from a checkout that stays where it is, then run new-plugin again",
            sdk.display()
        );
    }
    let libtorch = libtorch()?;
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{snake}}", &name.replace('-', "_"))
            .replace("{{sdk}}", &sdk.display().to_string())
            .replace("{{libtorch}}", &libtorch.display().to_string())
            .replace("{{libtorch_version}}", scalpel_sdk::LIBTORCH_VERSION)
            .replace("{{tch}}", scalpel_sdk::TCH_VERSION)
            .replace("{{scalpel_version}}", env!("CARGO_PKG_VERSION"))
    };
    let staged = StagedDir::new(&dest, Replace::Never)?;
    let root = staged.path();
    for dir in ["src", ".cargo"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    for (file, template) in [
        ("Cargo.toml", CARGO_TOML),
        ("build.rs", BUILD_RS),
        ("src/lib.rs", LIB_RS),
        ("README.md", README),
        (".cargo/config.toml", CONFIG),
        (".gitignore", GITIGNORE),
    ] {
        std::fs::write(root.join(file), fill(template)).with_context(|| format!("writing {file}"))?;
    }
    std::fs::write(root.join("Cargo.lock"), registry_lock(WORKSPACE_LOCK))?;
    staged.commit()
}

/// A crate name part cargo and the plugin file name both accept: `my-plugin`.
fn check_name(name: &str) -> Result<()> {
    let ok = name.split('-').all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !ok {
        bail!("`{name}` is not a plugin name: use lowercase letters, digits and single dashes, starting with a letter (e.g. `my-pruning`)");
    }
    // The built library is `libscalpel_plugin_NAME.so`, and a file name holds at most 255 bytes: a crate with a
    // longer name was written but could not be built into a library.
    let most = 255 - "libscalpel_plugin_.so".len();
    if name.len() > most {
        bail!("`{name}` is {} characters long: a plugin name has at most {most}, so that its library's file name fits", name.len());
    }
    Ok(())
}

/// The libtorch folder this process runs on (the parent of the loaded `libtorch_cpu.so`'s folder).
fn libtorch() -> Result<PathBuf> {
    let dir = scalpel_sdk::cuda::libtorch_dir().and_then(|lib| lib.parent().map(Path::to_path_buf));
    match dir {
        Some(dir) if dir.join("include/torch").is_dir() => Ok(dir),
        Some(dir) => bail!(
            "the libtorch this scalpel runs on ({}) has no headers, which building a plugin needs: set LIBTORCH to a \
             libtorch {} folder with include/ and lib/ (`cargo xtask setup` in a scalpel checkout fetches one), then run \
             new-plugin again from that environment",
            dir.display(),
            scalpel_sdk::LIBTORCH_VERSION
        ),
        None => bail!("cannot tell which libtorch this process loaded (no libtorch_cpu.so in /proc/self/maps)"),
    }
}

/// The lock file's registry packages, plus the SDK: the workspace's own crates are not the new crate's.
fn registry_lock(lock: &str) -> String {
    let mut parts = lock.split("\n[[package]]\n");
    let mut out = parts.next().unwrap_or_default().to_string();
    for package in parts.filter(|p| p.contains("\nsource = ") || p.starts_with("name = \"scalpel-sdk\"\n")) {
        out.push_str("\n[[package]]\n");
        out.push_str(package);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_make_a_crate_and_a_library_name() {
        for good in ["x", "my-pruning", "prune2"] {
            check_name(good).unwrap();
        }
        for bad in ["", "My", "2x", "a--b", "a-", "a_b", "a/b", "-a"] {
            assert!(check_name(bad).unwrap_err().to_string().contains("lowercase letters"), "{bad}");
        }
        check_name(&"a".repeat(234)).unwrap();
        assert!(check_name(&"a".repeat(235)).unwrap_err().to_string().contains("at most 234"));
    }

    #[test]
    fn the_lock_keeps_registry_crates_and_the_sdk_only() {
        let lock = registry_lock(WORKSPACE_LOCK);
        assert!(lock.contains("name = \"torch-sys\"\nversion = \"0.24.0\"") && lock.contains("name = \"scalpel-sdk\""), "{lock}");
        assert!(!lock.contains("name = \"scalpel\"\n") && !lock.contains("name = \"scalpel-plugin-inheritune\""));
        assert!(lock.starts_with("# This file is automatically @generated by Cargo."));
    }
}
