//! `scalpel`: the host program. It loads analyzers and strategies as plugins and applies them to models.

mod calib;
mod cli;
mod cuda;
mod data;
mod gguf;
mod import;
mod inspect;
mod model;
mod plots;
mod plugins;
mod recipe;
mod session;
mod surgery;

fn main() {
    // Before anything touches libtorch's dispatcher, so that `--device cuda` can work.
    cuda::init();
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
