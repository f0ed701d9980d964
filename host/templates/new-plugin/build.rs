// Test binaries load libtorch at run time: an rpath to the libtorch torch-sys built against lets
// `cargo test` run with no LD_LIBRARY_PATH. (The plugin library itself uses the host's libtorch.)
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
