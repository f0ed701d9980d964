//! # scalpel-sdk: write analyzers and surgery strategies for scalpel
//!
//! A plugin is a `cdylib` crate. Its author needs a handful of nouns and two verbs:
//!
//! | noun | what it is |
//! |---|---|
//! | [`Model`] | a read-only view of the model being operated on: its shape ([`ModelInfo`]), its weights, and on demand the attention probabilities and hidden states of each layer over the calibration windows |
//! | [`Report`] | what an analyzer found: named metrics per layer (and per head), plus notes |
//! | [`Plan`] | what a strategy wants done: output layer `j` is a copy of input layer `i`, plus per-layer edits |
//! | [`Reports`] | the reports of earlier steps, by analyzer name, for strategies that choose from evidence |
//! | [`testing`] | an in-memory model and typed calls, to test items without the host |
//! | a config | an ordinary `serde` + `schemars` struct with `Default`; its doc comments become `scalpel describe` |
//!
//! | verb | trait |
//! |---|---|
//! | analyze | [`Analyzer::analyze`] |
//! | plan | [`Strategy::plan`] |
//!
//! Register each item with [`analyzer!`] or [`strategy!`] (its doc comment becomes its description), and
//! write [`export_plugin!`] once per crate. Nothing else: the stable ABI lives in the `abi` module and never
//! shows in plugin code. A panic or error inside an item becomes an error naming the plugin and the item;
//! the host carries on.
//!
//! ```no_run
//! use scalpel_sdk::prelude::*;
//!
//! /// Settings of `layer-count`.
//! #[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
//! #[serde(default)]
//! pub struct LayerCountConfig {
//!     /// Multiply the count by this.
//!     pub scale: f64,
//! }
//!
//! pub struct LayerCount;
//!
//! impl Analyzer for LayerCount {
//!     type Config = LayerCountConfig;
//!     fn analyze(&self, model: &Model, config: &LayerCountConfig) -> Result<Report> {
//!         let n = model.info().layers as f64;
//!         Ok(Report::new().note(format!("{} layers", n * config.scale)))
//!     }
//! }
//!
//! scalpel_sdk::analyzer! {
//!     /// Counts the layers of the model.
//!     "layer-count" => LayerCount
//! }
//! scalpel_sdk::export_plugin!();
//! ```

#[allow(non_local_definitions, non_camel_case_types)]
pub mod abi;
pub mod cuda;
mod model;
mod plan;
mod registry;
mod report;
pub mod testing;

pub use model::{Block, Calibration, Model, ModelInfo, ModelSource};
pub use plan::{check_depth, Edit, LayerSource, Plan, MAX_LAYERS};
pub use registry::{Item, ItemKind};
pub use report::{LayerMark, Metric, Presentation, Report, Reports};

/// What every fallible SDK call returns; any error type converts into it with `?`.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;
pub use anyhow::{anyhow, bail, ensure, Context, Error};

/// The SDK's own version: a plugin built against another minor version (0.x) is refused.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The folder this SDK was built from: `scalpel new-plugin` points a new crate's `scalpel-sdk` dependency here.
pub const SOURCE_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// The `tch` crate every plugin and the host must share (they share one libtorch).
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch release that `tch` [`TCH_VERSION`] binds.
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// A config struct: deserialised from the user's `--set key=value` pairs or recipe table, described
/// to users from its JSON schema (doc comments become help text, `Default` gives the defaults).
pub trait Config: serde::de::DeserializeOwned + serde::Serialize + schemars::JsonSchema + Default {}
impl<T: serde::de::DeserializeOwned + serde::Serialize + schemars::JsonSchema + Default> Config for T {}

/// Looks at a model and reports what it finds: the first verb.
pub trait Analyzer: Sync + 'static {
    /// Its settings, from `--set key=value` or a recipe table.
    type Config: Config;
    /// The report on `model`: one value per layer for each metric.
    fn analyze(&self, model: &Model, config: &Self::Config) -> Result<Report>;
}

/// Decides what to cut, repeat or insert: the second verb.
///
/// Its [`Plan`] is validated, composed with the plans of earlier strategies ([`Plan::then`]) and written by the host.
pub trait Strategy: Sync + 'static {
    /// Its settings, from `--set key=value` or a recipe table.
    type Config: Config;
    /// The plan for `model`, from the reports of earlier steps (found by analyzer name, see [`Reports`]).
    fn plan(&self, model: &Model, config: &Self::Config, reports: &Reports) -> Result<Plan>;
    /// The analyzers whose reports `plan` reads with this config. The host runs those missing with
    /// their defaults before planning, so `apply -s NAME` works without naming them. Optional.
    fn needs(&self, _config: &Self::Config) -> Vec<String> {
        Vec::new()
    }
}

/// Everything a plugin file needs in one `use`.
pub mod prelude {
    pub use crate::{
        anyhow, bail, ensure, Analyzer, Context, Edit, LayerMark, LayerSource, Metric, Model, ModelInfo, Plan,
        Presentation, Report, Reports, Result, Strategy,
    };
    pub use schemars::JsonSchema;
    pub use serde::{Deserialize, Serialize};
    pub use tch::{self, Device, Kind, Tensor};
}

/// Registers an analyzer under a kebab-case name; its doc comment is its description. Ending with
/// `, default` makes it one of the analyzers `scalpel analyze` runs when none is named.
///
/// ```ignore
/// scalpel_sdk::analyzer! {
///     /// Counts the layers of the model.
///     "layer-count" => LayerCount, default
/// }
/// ```
#[macro_export]
macro_rules! analyzer {
    ($(#[doc = $doc:literal])* $name:literal => $item:expr) => {
        $crate::__private::inventory::submit! {
            $crate::Item::analyzer($name, concat!($($doc, "\n",)*), &$crate::__private::AsAnalyzer($item))
        }
    };
    ($(#[doc = $doc:literal])* $name:literal => $item:expr, default) => {
        $crate::__private::inventory::submit! {
            $crate::Item::analyzer($name, concat!($($doc, "\n",)*), &$crate::__private::AsAnalyzer($item)).by_default()
        }
    };
}

/// Registers a strategy under a kebab-case name; its doc comment is its description.
#[macro_export]
macro_rules! strategy {
    ($(#[doc = $doc:literal])* $name:literal => $item:expr) => {
        $crate::__private::inventory::submit! {
            $crate::Item::strategy($name, concat!($($doc, "\n",)*), &$crate::__private::AsStrategy($item))
        }
    };
}

/// Makes this crate a scalpel plugin. Write it once, at the crate root.
#[macro_export]
macro_rules! export_plugin {
    () => {
        $crate::export_plugin!(@libtorch $crate::LIBTORCH_VERSION);
    };
    // For test fixtures that must claim another libtorch; not for plugin authors.
    (@libtorch $libtorch:expr) => {
        $crate::__private::inventory::submit! {
            $crate::abi::PluginIdentity {
                name: env!("CARGO_PKG_NAME"),
                version: env!("CARGO_PKG_VERSION"),
                libtorch: $libtorch,
            }
        }
    };
}

#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{AsAnalyzer, AsStrategy};
    pub use inventory;
}
