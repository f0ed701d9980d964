//! Finding, loading and calling plugins.
//!
//! A plugin is a file `libscalpel_plugin_<name>.so`. The search path is, in order: the folder of the
//! `scalpel` binary and its `plugins/` subfolder (the built-in set), every folder of
//! `SCALPEL_PLUGIN_PATH` (colon-separated), then every `--plugins DIR`. A library named explicitly
//! (`--plugins FILE`) loads whatever its file name: example plugins are named `libscalpel_example_*`
//! so that they stay off the default path. A library that fails to load is reported with the reason
//! and the fix, and the others load anyway.

use anyhow::{anyhow, bail, Context, Result};
use scalpel_sdk::abi::{self, ItemManifest, LoadError, Manifest, PluginRef};
use scalpel_sdk::{ItemKind, ModelSource};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FILE_PREFIX: &str = "libscalpel_plugin_";
const CLASH_FIX: &str = "remove one of the files from the plugin path, or rename the item in one of them";

pub struct Plugin {
    pub path: PathBuf,
    pub manifest: Manifest,
    module: PluginRef,
}

/// One analyzer or strategy, with the plugin that provides it.
pub struct ItemRef<'a> {
    pub plugin: &'a Plugin,
    pub item: &'a ItemManifest,
}

#[derive(Default)]
pub struct Registry {
    pub plugins: Vec<Plugin>,
    /// Libraries that could not be used, each with the reason and the fix.
    pub problems: Vec<String>,
    /// item name -> (plugin index, item index)
    items: BTreeMap<String, (usize, usize)>,
    /// Names exported by more than one library, with the message naming them.
    clashes: BTreeMap<String, String>,
}

/// The folders searched, in order.
pub fn search_path(extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        // The built-in `plugins/` subfolder is optional; every other entry was named by someone and must exist.
        dirs.extend(Some(exe_dir.join("plugins")).filter(|d| d.exists()));
        dirs.push(exe_dir);
    }
    if let Some(path) = std::env::var_os("SCALPEL_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()));
    }
    dirs.extend(extra.iter().cloned());
    dirs
}

impl Registry {
    /// Loads every plugin on the search path.
    pub fn load(dirs: &[PathBuf]) -> Self {
        let mut reg = Registry::default();
        let mut seen = Vec::new();
        for dir in dirs {
            // A library named explicitly (`--plugins FILE`) loads whatever its name: that is how examples load.
            // Anything there that is not a folder counts as named, so a FIFO or device is reported, not skipped.
            let files = if dir.is_dir() {
                plugin_files(dir)
            } else if dir.exists() {
                vec![dir.clone()]
            } else {
                // A typo in --plugins or SCALPEL_PLUGIN_PATH once loaded nothing from it without a word.
                reg.problems.push(format!("{} does not exist: check the --plugins or SCALPEL_PLUGIN_PATH entry", dir.display()));
                vec![]
            };
            for path in files {
                let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
                if seen.contains(&canonical) {
                    continue;
                }
                seen.push(canonical);
                match load_plugin(&path) {
                    Ok(plugin) => reg.add(plugin),
                    Err(e) => reg.problems.push(format!("{e:#}")),
                }
            }
        }
        reg
    }

    fn add(&mut self, plugin: Plugin) {
        let index = self.plugins.len();
        for (i, item) in plugin.manifest.items.iter().enumerate() {
            if let Some(clash) = self.clashes.get_mut(&item.name) {
                clash.push_str(&format!(" and {}", plugin.path.display()));
            } else if let Some((other, _)) = self.items.remove(&item.name) {
                // Ambiguous: neither copy is served until one is removed.
                let message = format!(
                    "item `{}` is exported by both {} and {}",
                    item.name,
                    self.plugins[other].path.display(),
                    plugin.path.display()
                );
                self.clashes.insert(item.name.clone(), message);
            } else {
                self.items.insert(item.name.clone(), (index, i));
            }
        }
        self.plugins.push(plugin);
    }

    /// Everything worth a warning: libraries that failed to load, and names exported twice.
    pub fn warnings(&self) -> Vec<String> {
        let failed = self.problems.iter().map(|p| format!("plugin skipped: {p}"));
        failed.chain(self.clashes.values().map(|c| format!("{c}; neither is used: {CLASH_FIX}"))).collect()
    }

    pub fn items(&self) -> impl Iterator<Item = ItemRef<'_>> {
        self.items.values().map(|&(p, i)| ItemRef { plugin: &self.plugins[p], item: &self.plugins[p].manifest.items[i] })
    }

    /// The analyzers `scalpel analyze` runs when none is named: those their plugins mark as default.
    pub fn default_analyzers(&self) -> Vec<String> {
        self.items().filter(|it| it.item.kind == ItemKind::Analyzer && it.item.by_default).map(|it| it.item.name.clone()).collect()
    }

    /// The item called `name`, of the given kind when one is given.
    pub fn get(&self, name: &str, kind: Option<ItemKind>) -> Result<ItemRef<'_>> {
        if let Some(clash) = self.clashes.get(name) {
            bail!("{clash}: {CLASH_FIX}");
        }
        let Some(&(p, i)) = self.items.get(name) else {
            let known: Vec<&str> =
                self.items().filter(|it| kind.is_none_or(|k| it.item.kind == k)).map(|it| it.item.name.as_str()).collect();
            let what = kind.map_or("item".to_string(), |k| k.to_string());
            bail!("no {what} called `{name}` is loaded (known: {}); `scalpel plugins` lists them", known.join(", "));
        };
        let it = ItemRef { plugin: &self.plugins[p], item: &self.plugins[p].manifest.items[i] };
        if let Some(kind) = kind {
            if it.item.kind != kind {
                bail!("`{name}` is a {}, not a {kind}", it.item.kind);
            }
        }
        Ok(it)
    }
}

impl ItemRef<'_> {
    /// Runs the item through the plugin boundary. A panic or error inside the plugin comes back as an
    /// error naming the plugin and the item.
    pub fn call(&self, model: &dyn ModelSource, config: &serde_json::Value, reports: &serde_json::Value) -> Result<serde_json::Value> {
        let out = abi::call_item(self.plugin.module, &self.item.name, model, &config.to_string(), &reports.to_string())
            .with_context(|| format!("{} `{}` (plugin {}) failed", self.item.kind, self.item.name, self.plugin.manifest.plugin))?;
        serde_json::from_str(&out).with_context(|| format!("`{}` returned malformed JSON", self.item.name))
    }

    /// The analyzers a strategy reads with `config` (none for an analyzer).
    pub fn needs(&self, config: &serde_json::Value) -> Result<Vec<String>> {
        if self.item.kind != ItemKind::Strategy {
            return Ok(vec![]);
        }
        abi::item_needs(self.plugin.module, &self.item.name, &config.to_string())
            .with_context(|| format!("strategy `{}` (plugin {}) failed", self.item.name, self.plugin.manifest.plugin))
    }
}

/// The `libscalpel_plugin_*.so` files of a folder, sorted; none when it cannot be read.
fn plugin_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(FILE_PREFIX) && name.ends_with(".so")
        })
        .collect();
    files.sort();
    files
}

/// Loads one plugin library and checks that it was built for this host.
pub fn load_plugin(path: &Path) -> Result<Plugin> {
    // dlopen of a FIFO blocks until a writer comes, and of a device reads it: only regular files are opened.
    scalpel_files::open_regular(path)?;
    let module = abi::load(path).map_err(|e| explain(path, e))?;
    let manifest = abi::read_manifest(module).with_context(|| format!("{}: reading its manifest failed", path.display()))?;
    check_fingerprint(&manifest).with_context(|| format!("{} (plugin {} {})", path.display(), manifest.plugin, manifest.version))?;
    Ok(Plugin { path: path.to_path_buf(), manifest, module })
}

/// How to rebuild a plugin for this host: the SDK is not on crates.io, so the fix is the folder this host's came from.
fn rebuild_fix() -> String {
    let sdk = Path::new(scalpel_sdk::SOURCE_DIR);
    let folder = if sdk.join("Cargo.toml").is_file() {
        sdk.display().to_string()
    } else {
        "the `sdk` folder of the scalpel checkout this host was built from".to_string()
    };
    format!(
        "rebuild it against this host's SDK: point the `path` of `scalpel-sdk` in its Cargo.toml at {folder} (scalpel-sdk {}), then `cargo build --release`",
        scalpel_sdk::SDK_VERSION
    )
}

fn explain(path: &Path, e: LoadError) -> anyhow::Error {
    let fix = rebuild_fix();
    let file = path.display();
    match e {
        LoadError::NotALibrary(reason) => {
            // dlerror starts with the path, which the message already names.
            let reason = reason.strip_prefix(&format!("{file}: ")).unwrap_or(&reason);
            anyhow!(
                "{file}: cannot be loaded as a shared library: {reason}; a plugin is a cdylib built for this machine against \
                 scalpel-sdk {} and libtorch {}: {fix}, or take it off the plugin path",
                scalpel_sdk::SDK_VERSION,
                scalpel_sdk::LIBTORCH_VERSION
            )
        }
        LoadError::NotAPlugin => anyhow!(
            "{file}: not a scalpel plugin (it exports no scalpel root module); a plugin crate must be a cdylib \
             that depends on scalpel-sdk and writes `scalpel_sdk::export_plugin!();`"
        ),
        LoadError::Version { plugin, host } => anyhow!("{file}: built against scalpel-sdk {plugin}, but this host speaks scalpel-sdk {host}: {fix}"),
        LoadError::Layout => anyhow!(
            "{file}: its plugin interface has a different layout from this host's: it was built against another scalpel-sdk \
             (another checkout or version; the interface can change while the version stays): {fix}"
        ),
        LoadError::Other(message) => anyhow!("{file}: {message}"),
    }
}

fn check_fingerprint(m: &Manifest) -> Result<()> {
    let fix = rebuild_fix();
    if m.tch != scalpel_sdk::TCH_VERSION {
        bail!("built with tch {}, this host uses tch {}: {fix}", m.tch, scalpel_sdk::TCH_VERSION);
    }
    if m.libtorch != scalpel_sdk::LIBTORCH_VERSION {
        bail!(
            "built for libtorch {}, this host runs libtorch {}; tensors cannot cross between them: {fix}",
            m.libtorch,
            scalpel_sdk::LIBTORCH_VERSION
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// README: `sdk/src/abi.rs` is the only file that knows the ABI. A host that cannot name abi_stable or dlopen a
    /// library itself keeps it so (it once checked the root-module symbol and matched abi_stable's errors here).
    #[test]
    fn only_the_sdk_knows_the_abi() {
        let manifest: toml::Value = toml::from_str(include_str!("../Cargo.toml")).unwrap();
        let deps = manifest["dependencies"].as_table().unwrap();
        for crate_name in ["abi_stable", "libloading"] {
            assert!(!deps.contains_key(crate_name), "the host depends on {crate_name}: load plugins through scalpel_sdk::abi::load");
        }
    }
}
