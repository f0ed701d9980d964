//! The stable ABI between the scalpel host and its plugins. The only module that knows `abi_stable`.
//!
//! What crosses, and why it is sound:
//! - The root module [`PluginRef`]: two `extern "C"` functions, checked by abi_stable's version and
//!   layout checks when the host loads the library.
//! - Configs, reports, plans and the manifest travel as JSON text ([`RString`]): data, not layouts.
//! - The model view travels as a `#[sabi_trait]` object ([`FfiModel`]) that the host lends for one call.
//! - Tensors travel as [`FfiTensor`]: a libtorch tensor pointer plus the free function of the library
//!   that created it. Host and plugins share one libtorch, so the receiver takes its own reference
//!   (a shallow clone) and hands the original back to its creator to release.
//! - No panic crosses: every call is wrapped in `catch_unwind` on the side that runs it.
//!
//! Libraries are never unloaded: a returned tensor's free function lives in the library that made it.

use crate::registry::{self, ItemKind};
use crate::{model, Model, ModelSource, Result};
use abi_stable::{
    declare_root_module_statics, export_root_module,
    library::RootModule,
    package_version_strings,
    prefix_type::PrefixTypeTrait,
    sabi_trait,
    sabi_types::{RRef, VersionStrings},
    std_types::{RErr, ROk, RResult, RSlice, RStr, RString},
    StableAbi,
};
use serde::{Deserialize, Serialize};
use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use tch::Tensor;


/// The root module every plugin library exports (the SDK exports it on the plugin's behalf).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's [`Manifest`] as JSON.
    pub manifest: extern "C" fn() -> RResult<RString, RString>,
    /// Runs one item: `(item name, model view, config JSON, reports JSON)` -> report or plan JSON.
    pub call: extern "C" fn(RStr<'_>, FfiModel<'_>, RStr<'_>, RStr<'_>) -> RResult<RString, RString>,
    /// The analyzers a strategy reads with a config: `(item name, config JSON)` -> JSON list of names.
    #[sabi(last_prefix_field)]
    pub needs: extern "C" fn(RStr<'_>, RStr<'_>) -> RResult<RString, RString>,
}

impl RootModule for PluginRef {
    declare_root_module_statics! {PluginRef}
    const BASE_NAME: &'static str = "scalpel_plugin";
    const NAME: &'static str = "scalpel_plugin";
    // The SDK's version: abi_stable refuses a plugin built against an incompatible one.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[export_root_module]
fn root_module() -> PluginRef {
    PluginModule { manifest, call, needs }.leak_into_prefix()
}

/// Why a library could not be loaded as a plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The dynamic loader refused it, with dlerror's reason (not an ELF file, an undefined symbol, a missing dependency).
    NotALibrary(String),
    /// A shared library that exports no scalpel root module.
    NotAPlugin,
    /// Built against another version of the SDK.
    Version { plugin: String, host: String },
    /// The same version, but another layout of the plugin interface (another checkout of the SDK).
    Layout,
    /// Anything else abi_stable reports.
    Other(String),
}

/// Loads the plugin library at `path` and checks its SDK version and the layout of its interface. Loading runs the
/// library's initialisers; it is never unloaded (a tensor's free function lives in the library that made it).
pub fn load(path: &Path) -> Result<PluginRef, LoadError> {
    // SAFETY: plugin files are trusted code by design; loading them is what this function is for.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading says only "dlopen failed": dlerror's reason is its source, and it is what says what is wrong.
        LoadError::NotALibrary(std::error::Error::source(&e).map_or_else(|| e.to_string(), |why| why.to_string()))
    })?;
    let has_root = unsafe { lib.get::<*const ()>(abi_stable::library::ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes()) }.is_ok();
    std::mem::forget(lib);
    if !has_root {
        return Err(LoadError::NotAPlugin);
    }
    // `RootModule::load_from_*` is avoided: it caches one module per type, and a host loads many.
    let loaded = abi_stable::library::lib_header_from_path(path).and_then(|header| header.init_root_module::<PluginRef>());
    loaded.map_err(|e| match e {
        abi_stable::library::LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => {
            LoadError::Version { plugin: actual_version.to_string(), host: expected_version.to_string() }
        }
        // abi_stable's full comparison runs to hundreds of lines; the verdict is what helps.
        abi_stable::library::LibraryError::AbiInstability(_) => LoadError::Layout,
        other => LoadError::Other(other.to_string().trim().to_string()),
    })
}

/// Who a plugin library is, registered by `export_plugin!()`.
pub struct PluginIdentity {
    pub name: &'static str,
    pub version: &'static str,
    pub libtorch: &'static str,
}
inventory::collect!(PluginIdentity);

/// What a plugin says about itself when loaded: identity, the versions it was built against, its items.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub plugin: String,
    pub version: String,
    pub sdk: String,
    pub tch: String,
    pub libtorch: String,
    pub items: Vec<ItemManifest>,
}

/// One analyzer or strategy as the host sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemManifest {
    pub name: String,
    pub kind: ItemKind,
    /// The doc comment of its registration.
    pub doc: String,
    /// JSON schema of its config (doc comments, types, defaults).
    pub schema: serde_json::Value,
    /// An analyzer `scalpel analyze` runs when none is named.
    #[serde(default)]
    pub by_default: bool,
}

/// The manifest of the library this code is linked into.
pub fn local_manifest() -> Result<Manifest> {
    let ids: Vec<&PluginIdentity> = inventory::iter::<PluginIdentity>.into_iter().collect();
    let id = match ids.as_slice() {
        [id] => id,
        [] => crate::bail!("this library registers analyzers or strategies but has no `scalpel_sdk::export_plugin!();`"),
        _ => crate::bail!("`export_plugin!()` appears {} times; write it once per crate", ids.len()),
    };
    Ok(Manifest {
        plugin: id.name.into(),
        version: id.version.into(),
        sdk: crate::SDK_VERSION.into(),
        tch: crate::TCH_VERSION.into(),
        libtorch: id.libtorch.into(),
        items: registry::items()
            .map(|it| ItemManifest { name: it.name.into(), kind: it.kind, doc: doc_text(it.doc), schema: it.schema(), by_default: it.by_default })
            .collect(),
    })
}

/// A doc comment as written: `///` lines arrive with the space after the slashes.
fn doc_text(doc: &str) -> String {
    doc.lines().map(|l| l.strip_prefix(' ').unwrap_or(l)).collect::<Vec<_>>().join("\n").trim().to_string()
}

extern "C" fn manifest() -> RResult<RString, RString> {
    guarded(|| Ok(serde_json::to_string(&local_manifest()?)?))
}

extern "C" fn call(item: RStr<'_>, model: FfiModel<'_>, config: RStr<'_>, reports: RStr<'_>) -> RResult<RString, RString> {
    guarded(|| {
        let model = Model::from_ffi(model)?;
        let out = registry::run(item.as_str(), &model, config.as_str(), reports.as_str())?;
        Ok(serde_json::to_string(&out)?)
    })
}

extern "C" fn needs(item: RStr<'_>, config: RStr<'_>) -> RResult<RString, RString> {
    guarded(|| Ok(serde_json::to_string(&registry::needs(item.as_str(), config.as_str())?)?))
}

/// Runs `f`, turning its error or panic into a message for the other side.
fn guarded(f: impl FnOnce() -> Result<String>) -> RResult<RString, RString> {
    match catching(f) {
        Ok(Ok(s)) => ROk(s.into()),
        Ok(Err(e)) => RErr(without_cpp_frames(&format!("{e:#}")).into()),
        Err(panic) => RErr(panic.into()),
    }
}

thread_local! {
    /// Inside `catching` on this thread: the panic hook records instead of printing.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static CAUGHT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`; a panic comes back as one line, `panicked: MESSAGE (at FILE:LINE)`, instead of being printed by the
/// panic hook as well (twice, a libtorch error with its C++ frames each time). Panics elsewhere print as before.
fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(|c| c.get()) {
                // Where in the plugin's own code; a line inside a dependency (tch's generated wrappers) says nothing.
                let own = info.location().filter(|l| !l.file().contains("/.cargo/registry/"));
                let at = own.map(|l| format!(" (at {}:{})", l.file(), l.line())).unwrap_or_default();
                let message = without_cpp_frames(&panic_message(info.payload()));
                CAUGHT.with(|c| *c.borrow_mut() = Some(format!("panicked: {message}{at}")));
            } else {
                previous(info)
            }
        }));
    });
    let outer = CATCHING.with(|c| c.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|panic| CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| format!("panicked: {}", panic_message(&*panic))))
}

/// libtorch's message without the C++ stack it appends to every error ("Exception raised from … frame #0 …"),
/// dozens of lines that say nothing to a plugin author. tch's errors carry it as is, a panic's `Debug` escaped.
fn without_cpp_frames(message: &str) -> String {
    let Some(at) = message.find("Exception raised from") else { return message.to_string() };
    let kept = message[..at].trim_end();
    let kept = kept.strip_suffix("\\n").unwrap_or(kept).trim_end();
    // An unwrapped `Torch("…")` keeps its closing quote and parenthesis.
    let close = if kept.contains("Torch(\"") { "\")" } else { "" };
    format!("{kept}{close}")
}

pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

// ---- the model view ----

/// The model view as it crosses the boundary; the host implements it over its own model.
#[sabi_trait]
pub trait FfiModelView {
    /// [`model::ModelInfo`] as JSON.
    fn info(&self) -> RString;
    fn tensor(&self, name: RStr<'_>) -> RResult<FfiTensor, RString>;
    fn attention(&self, layer: usize) -> RResult<FfiTensor, RString>;
    fn hidden(&self, layer: usize) -> RResult<FfiTensor, RString>;
    #[sabi(last_prefix_field)]
    fn loss(&self, skip: RSlice<'_, usize>) -> RResult<f64, RString>;
}

/// A model view lent for the duration of one call.
pub type FfiModel<'a> = FfiModelView_TO<'a, RRef<'a, ()>>;

/// Adapts the host's [`ModelSource`] to the boundary, catching its panics too.
struct Lend<'a>(&'a dyn ModelSource);

impl FfiModelView for Lend<'_> {
    fn info(&self) -> RString {
        serde_json::to_string(self.0.info()).expect("ModelInfo serialises").into()
    }
    fn tensor(&self, name: RStr<'_>) -> RResult<FfiTensor, RString> {
        tensor_result(|| self.0.tensor(name.as_str()))
    }
    fn attention(&self, layer: usize) -> RResult<FfiTensor, RString> {
        tensor_result(|| self.0.attention(layer))
    }
    fn hidden(&self, layer: usize) -> RResult<FfiTensor, RString> {
        tensor_result(|| self.0.hidden(layer))
    }
    fn loss(&self, skip: RSlice<'_, usize>) -> RResult<f64, RString> {
        match catching(|| self.0.loss(skip.as_slice())) {
            Ok(Ok(v)) => ROk(v),
            Ok(Err(e)) => RErr(without_cpp_frames(&format!("{e:#}")).into()),
            Err(panic) => RErr(format!("the host {panic}").into()),
        }
    }
}

fn tensor_result(f: impl FnOnce() -> Result<Tensor>) -> RResult<FfiTensor, RString> {
    match catching(f) {
        Ok(Ok(t)) => ROk(FfiTensor::new(t)),
        Ok(Err(e)) => RErr(without_cpp_frames(&format!("{e:#}")).into()),
        Err(panic) => RErr(format!("the host {panic}").into()),
    }
}

/// Lends `source` as an [`FfiModel`] for the duration of `f`.
pub fn lend<R>(source: &dyn ModelSource, f: impl FnOnce(FfiModel<'_>) -> R) -> R {
    let lend = Lend(source);
    f(FfiModelView_TO::from_ptr(RRef::new(&lend), abi_stable::sabi_trait::TD_Opaque))
}

pub(crate) fn view_info(view: &FfiModel<'_>) -> Result<model::ModelInfo> {
    Ok(serde_json::from_str(view.info().as_str())?)
}

pub(crate) fn view_tensor(r: RResult<FfiTensor, RString>) -> Result<Tensor> {
    r.into_result().map(FfiTensor::into_tensor).map_err(|e| crate::anyhow!("{e}"))
}

// ---- tensors ----

/// An owned libtorch tensor handle that carries the free function of the library that created it.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiTensor {
    ptr: *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
}

unsafe extern "C" fn free_tensor(ptr: *mut c_void) {
    drop(Tensor::from_ptr(ptr as _));
}

impl FfiTensor {
    pub fn new(tensor: Tensor) -> Self {
        let mut tensor = ManuallyDrop::new(tensor);
        FfiTensor { ptr: tensor.as_mut_ptr() as *mut c_void, free: free_tensor }
    }

    /// Takes a reference of our own, then lets the creator release its handle.
    pub fn into_tensor(self) -> Tensor {
        // The creator's handle stays alive until `self` drops, after the clone.
        let theirs = ManuallyDrop::new(unsafe { Tensor::from_ptr(self.ptr as _) });
        theirs.shallow_clone()
    }
}

impl Drop for FfiTensor {
    fn drop(&mut self) {
        // Released by the library that allocated the handle, never by ours.
        unsafe { (self.free)(self.ptr) }
    }
}

/// Calls one item of a loaded plugin, the way the host does.
pub fn call_item(plugin: PluginRef, item: &str, source: &dyn ModelSource, config: &str, reports: &str) -> Result<String> {
    let call = plugin.call();
    lend(source, |view| call(item.into(), view, config.into(), reports.into()))
        .into_result()
        .map(String::from)
        .map_err(|e| crate::anyhow!("{e}"))
}

/// The analyzers a strategy of a loaded plugin reads with `config` (JSON).
pub fn item_needs(plugin: PluginRef, item: &str, config: &str) -> Result<Vec<String>> {
    let needs = plugin.needs();
    let text = needs(item.into(), config.into()).into_result().map_err(|e| crate::anyhow!("{e}"))?;
    Ok(serde_json::from_str(text.as_str())?)
}

/// Reads the manifest of a loaded plugin.
pub fn read_manifest(plugin: PluginRef) -> Result<Manifest> {
    let text = plugin.manifest()().into_result().map_err(|e| crate::anyhow!("{e}"))?;
    Ok(serde_json::from_str(text.as_str())?)
}

/// The root module of the library this code is linked into, for in-process tests of the boundary.
pub fn local_plugin() -> PluginRef {
    static LOCAL: std::sync::OnceLock<PluginRef> = std::sync::OnceLock::new();
    *LOCAL.get_or_init(root_module)
}
