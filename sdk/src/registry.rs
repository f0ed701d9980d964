//! The items of one plugin library, collected with `inventory` from `analyzer!` / `strategy!`.

use crate::{Analyzer, Config, Model, Reports, Result, Strategy};
use serde::{Deserialize, Serialize};

/// Whether an item reports ([`Analyzer`]) or plans ([`Strategy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemKind {
    Analyzer,
    Strategy,
}

impl std::fmt::Display for ItemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ItemKind::Analyzer => "analyzer",
            ItemKind::Strategy => "strategy",
        })
    }
}

/// A registered analyzer or strategy.
pub struct Item {
    /// The kebab-case name recipes and reports use.
    pub name: &'static str,
    pub kind: ItemKind,
    /// The doc comment of its registration.
    pub doc: &'static str,
    /// An analyzer `scalpel analyze` runs when none is named.
    pub by_default: bool,
    erased: &'static dyn Erased,
}

impl Item {
    /// An analyzer registration (what [`analyzer!`](crate::analyzer) writes).
    pub const fn analyzer(name: &'static str, doc: &'static str, erased: &'static dyn Erased) -> Self {
        Item { name, kind: ItemKind::Analyzer, doc, by_default: false, erased }
    }
    pub const fn by_default(self) -> Self {
        Item { by_default: true, ..self }
    }
    /// A strategy registration (what [`strategy!`](crate::strategy) writes).
    pub const fn strategy(name: &'static str, doc: &'static str, erased: &'static dyn Erased) -> Self {
        Item { name, kind: ItemKind::Strategy, doc, by_default: false, erased }
    }
    /// The JSON schema of its config.
    pub fn schema(&self) -> serde_json::Value {
        self.erased.schema()
    }
}

inventory::collect!(Item);

pub(crate) fn items() -> impl Iterator<Item = &'static Item> {
    inventory::iter::<Item>.into_iter()
}

fn find(name: &str) -> Result<&'static Item> {
    items().find(|it| it.name == name).ok_or_else(|| crate::anyhow!("this plugin has no item `{name}`"))
}

pub(crate) fn needs(name: &str, config: &str) -> Result<Vec<String>> {
    find(name)?.erased.needs(serde_json::from_str(config)?)
}

/// The registered item whose Rust type is `T`, for tests that name an item by its type.
pub(crate) fn item_of_type<T: 'static>() -> Option<&'static Item> {
    items().find(|it| it.erased.item_type() == std::any::TypeId::of::<T>())
}

pub(crate) fn run(name: &str, model: &Model, config: &str, reports: &str) -> Result<serde_json::Value> {
    let item = find(name)?;
    let config: serde_json::Value = serde_json::from_str(config)?;
    let reports: Reports = if reports.is_empty() { Reports::default() } else { serde_json::from_str(reports)? };
    item.erased.run(name, model, config, &reports)
}

/// An analyzer or strategy with its config type erased.
pub trait Erased: Sync {
    /// The JSON schema of its config.
    fn schema(&self) -> serde_json::Value;
    /// The analyzer's or strategy's own type.
    fn item_type(&self) -> std::any::TypeId;
    /// Parses the config and runs the item registered as `name`: its report or plan as JSON.
    fn run(&self, name: &str, model: &Model, config: serde_json::Value, reports: &Reports) -> Result<serde_json::Value>;
    fn needs(&self, config: serde_json::Value) -> Result<Vec<String>>;
}

/// An [`Analyzer`] behind the erased interface.
pub struct AsAnalyzer<A>(pub A);
/// A [`Strategy`] behind the erased interface.
pub struct AsStrategy<S>(pub S);

impl<A: Analyzer> Erased for AsAnalyzer<A> {
    fn schema(&self) -> serde_json::Value {
        schema::<A::Config>()
    }
    fn item_type(&self) -> std::any::TypeId {
        std::any::TypeId::of::<A>()
    }
    fn run(&self, name: &str, model: &Model, config: serde_json::Value, _: &Reports) -> Result<serde_json::Value> {
        let config = parse_config::<A::Config>(config)?;
        let mut report = self.0.analyze(model, &config)?;
        report.analyzer = name.into();
        // Checked before it becomes JSON, which has no NaN: serde_json writes `null`, and the host could only
        // call the report malformed, not say which value of which metric is wrong.
        report.check(model.info().layers)?;
        if model.info().heads > 0 {
            report.check_heads(model.info().heads)?;
        }
        Ok(serde_json::to_value(report)?)
    }
    fn needs(&self, _: serde_json::Value) -> Result<Vec<String>> {
        Ok(vec![])
    }
}

impl<S: Strategy> Erased for AsStrategy<S> {
    fn schema(&self) -> serde_json::Value {
        schema::<S::Config>()
    }
    fn item_type(&self) -> std::any::TypeId {
        std::any::TypeId::of::<S>()
    }
    fn run(&self, _: &str, model: &Model, config: serde_json::Value, reports: &Reports) -> Result<serde_json::Value> {
        let config = parse_config::<S::Config>(config)?;
        Ok(serde_json::to_value(self.0.plan(model, &config, reports)?)?)
    }
    fn needs(&self, config: serde_json::Value) -> Result<Vec<String>> {
        Ok(self.0.needs(&parse_config::<S::Config>(config)?))
    }
}

fn schema<C: Config>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(C)).expect("a JSON schema serialises")
}

/// Deserialises a config, refusing keys the config does not have (a typo must not pass silently).
fn parse_config<C: Config>(value: serde_json::Value) -> Result<C> {
    let known = schema::<C>();
    let known: Vec<&String> = known["properties"].as_object().map(|p| p.keys().collect()).unwrap_or_default();
    if let Some(given) = value.as_object() {
        for key in given.keys() {
            if !known.contains(&key) {
                let list: Vec<&str> = known.iter().map(|s| s.as_str()).collect();
                crate::bail!("unknown config key `{key}`; known keys: {}", if list.is_empty() { "none".into() } else { list.join(", ") });
            }
        }
    }
    serde_json::from_value(value).map_err(|e| crate::anyhow!("bad config: {e}"))
}
