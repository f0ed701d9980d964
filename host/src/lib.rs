//! The host as a library: `main.rs` is its one user, and the fuzz targets (`host/fuzz`) call the
//! same parsers users reach through it.

pub mod calib;
pub mod cli;
pub mod compare;
pub mod data;
pub mod gguf;
pub mod import;
pub mod inheritune;
pub mod inspect;
pub mod model;
pub mod newplugin;
pub mod pipeline;
pub mod plots;
pub mod plugins;
pub mod present;
pub mod recipe;
pub mod session;
pub mod surgery;
pub mod train;
