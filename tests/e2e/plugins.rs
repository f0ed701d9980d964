//! Loading plugins: the built-in sets, the example plugin, and one broken fixture per load error.

use crate::{example_plugin, plugin_dir, run, scalpel};

fn item_names(json: &str) -> Vec<String> {
    let items: serde_json::Value = serde_json::from_str(json).expect("`plugins --json` prints JSON");
    items.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap().to_string()).collect()
}

/// The warning for an item exported by two libraries names the item and both files.
fn assert_clash(stderr: &str, item: &str, files: [&str; 2]) {
    let ok = stderr.contains(&format!("item `{item}` is exported by both")) && files.iter().all(|f| stderr.contains(f));
    assert!(ok, "expected a clash on `{item}` between {files:?}:\n{stderr}");
}

#[test]
fn lists_both_builtin_sets_and_no_example() {
    let out = run(scalpel().args(["plugins", "--json"])).success();
    let names = item_names(&out.stdout);
    for expected in ["attn-rank", "cutoff", "block-influence", "angular-distance", "drop-layers", "prune-block"] {
        assert!(names.contains(&expected.to_string()), "{expected} missing from {names:?}");
    }
    assert!(
        !names.contains(&"weight-norms".to_string()),
        "the example plugin loads only when asked for (a libscalpel_plugin_hello.so left by an older build? \
         `cargo xtask build` removes it): {names:?}"
    );
    assert!(out.stderr.is_empty(), "a clean search path warns about nothing: {}", out.stderr);
}

#[test]
fn the_example_loads_when_named_and_its_drop_layers_clashes_with_the_builtin_one() {
    let out = run(scalpel().arg("--plugins").arg(example_plugin()).args(["plugins", "--json"])).success();
    let names = item_names(&out.stdout);
    assert!(names.contains(&"weight-norms".to_string()), "{names:?}");
    assert!(!names.contains(&"drop-layers".to_string()), "an ambiguous name is served by neither: {names:?}");
    assert_clash(&out.stderr, "drop-layers", ["libscalpel_plugin_depth_pruning.so", "libscalpel_example_hello.so"]);
    let out = run(scalpel().arg("--plugins").arg(example_plugin()).args(["describe", "drop-layers"])).failure();
    assert!(out.stderr.contains("depth_pruning.so") && out.stderr.contains("example_hello.so") && out.stderr.contains("remove one"), "{}", out.stderr);
}

#[test]
fn describe_shows_fields_types_defaults_and_docs() {
    let out = run(scalpel().arg("--plugins").arg(example_plugin()).args(["describe", "weight-norms"])).success();
    assert!(out.stdout.contains("Sum of the Frobenius norms"), "{}", out.stdout);
    let row = out.stdout.lines().find(|l| l.starts_with("per_element")).expect("a row for per_element");
    assert!(row.contains("boolean") && row.contains("false") && row.contains("square root"), "{row}");
}

#[test]
fn describe_of_an_unknown_item_lists_the_known_ones() {
    let out = run(scalpel().args(["describe", "no-such-thing"])).failure();
    assert!(out.stderr.contains("no item called `no-such-thing`") && out.stderr.contains("block-influence"), "{}", out.stderr);
}

#[test]
fn version_names_sdk_tch_libtorch_and_cuda() {
    let out = run(scalpel().arg("--version")).success();
    for part in ["scalpel-sdk 0.1.0", "tch 0.24.0", "libtorch 2.11.0", "cuda:"] {
        assert!(out.stdout.contains(part), "{part} missing from {}", out.stdout);
    }
}

#[test]
fn cuda_on_a_cpu_only_libtorch_says_why() {
    if scalpel().arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).contains("cuda: available")).unwrap_or(false) {
        return; // a GPU machine: nothing to refuse
    }
    let out = run(scalpel().args(["--device", "cuda", "plugins"])).failure();
    assert!(out.stderr.contains("CPU-only") && out.stderr.contains("LD_LIBRARY_PATH"), "{}", out.stderr);
}

/// Each broken library is refused with its own message; the good plugins still load.
fn refused_with(fixtures: &[(&str, &str)], message: &[&str]) {
    let dir = plugin_dir(fixtures);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["plugins", "--json"])).success();
    for m in message {
        assert!(out.stderr.contains(m), "expected `{m}` in:\n{}", out.stderr);
    }
    let names = item_names(&out.stdout);
    assert!(names.contains(&"attn-rank".to_string()), "good plugins must still be listed: {names:?}");
}

#[test]
fn a_library_that_is_not_a_plugin() {
    refused_with(&[("not-a-plugin", "stranger")], &["libscalpel_plugin_stranger.so", "not a scalpel plugin", "export_plugin!"]);
}

#[test]
fn a_plugin_built_against_another_sdk_layout() {
    // An SDK of the same version number but an older interface (what a plugin built against an older checkout
    // gets) was told to "rebuild it against scalpel-sdk 0.1.0", the version it was built against: the fix is the folder.
    let sdk = format!("rebuild it against this host's SDK: point the `path` of `scalpel-sdk` in its Cargo.toml at {}", scalpel_sdk::SOURCE_DIR);
    refused_with(&[("other-layout", "old")], &["libscalpel_plugin_old.so", "different layout", "the interface can change while the version stays", &sdk]);
}

#[test]
fn a_plugin_built_for_another_libtorch() {
    refused_with(&[("wrong-libtorch", "lt")], &["built for libtorch 2.10.0", "this host runs libtorch 2.11.0", "rebuild"]);
}

#[test]
fn two_plugins_exporting_the_same_item() {
    let dir = plugin_dir(&[("twin", "twin_a"), ("twin", "twin_b")]);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["plugins", "--json"])).success();
    assert_clash(&out.stderr, "fixture-twin", ["libscalpel_plugin_twin_a.so", "libscalpel_plugin_twin_b.so"]);
    // Using the ambiguous name is an error that names both files.
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["describe", "fixture-twin"])).failure();
    assert!(out.stderr.contains("twin_a.so") && out.stderr.contains("twin_b.so"), "{}", out.stderr);
}

#[test]
fn a_file_that_is_not_a_library_at_all() {
    let dir = tempfile::tempdir().unwrap();
    // Longer than an ELF header, so that the loader reads it and says why it is none.
    std::fs::write(dir.path().join("libscalpel_plugin_text.so"), "not an ELF file\n".repeat(8)).unwrap();
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["plugins", "--json"])).success();
    // dlerror's reason was once dropped for libloading's bare "dlopen failed".
    for part in ["libscalpel_plugin_text.so", "cannot be loaded as a shared library", "invalid ELF header", "rebuild it"] {
        assert!(out.stderr.contains(part), "`{part}` in:\n{}", out.stderr);
    }
}

#[test]
fn a_library_with_an_undefined_symbol_says_which() {
    // What a plugin linked against another libtorch looks like to the loader: a symbol this process lacks.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("undefined.c");
    std::fs::write(&source, "extern int scalpel_no_such_symbol(void);\nint f(void) { return scalpel_no_such_symbol(); }\n").unwrap();
    let lib = dir.path().join("libscalpel_plugin_undefined.so");
    // Bound at load time, as Rust links cdylibs (-z now): C's lazy binding would load it and fail only on a call.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(&cc).args(["-shared", "-fPIC", "-Wl,-z,now", "-o"]).arg(&lib).arg(&source).status();
    assert!(built.is_ok_and(|s| s.success()), "{cc} (the C compiler torch-sys builds with) could not build the test library");
    let out = run(scalpel().arg("--plugins").arg(&lib).args(["plugins", "--json"])).success();
    for part in ["libscalpel_plugin_undefined.so", "undefined symbol: scalpel_no_such_symbol", "rebuild it"] {
        assert!(out.stderr.contains(part), "`{part}` in:\n{}", out.stderr);
    }
}

#[test]
fn the_plugin_path_variable_is_searched() {
    let dir = plugin_dir(&[("wrong-libtorch", "via_env")]);
    let out = run(scalpel().env("SCALPEL_PLUGIN_PATH", dir.path()).args(["plugins", "--json"])).success();
    assert!(out.stderr.contains("libscalpel_plugin_via_env.so"), "{}", out.stderr);
}

#[test]
fn a_plugin_folder_that_does_not_exist_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder");
    let out = run(scalpel().arg("--plugins").arg(&missing).args(["plugins", "--json"])).success();
    assert!(out.stderr.contains("no-such-folder does not exist"), "{}", out.stderr);
    let out = run(scalpel().env("SCALPEL_PLUGIN_PATH", &missing).args(["plugins", "--json"])).success();
    assert!(out.stderr.contains("no-such-folder does not exist"), "{}", out.stderr);
    // The built-in set alone warns about nothing.
    assert!(!run(scalpel().args(["plugins", "--json"])).success().stderr.contains("warning"));
}

#[test]
fn a_plugin_panic_is_told_once_with_where_and_a_libtorch_error_without_its_cpp_frames() {
    let dir = plugin_dir(&[("panics", "panics")]);
    let calib = tempfile::tempdir().unwrap();
    let ids = crate::token_ids_npy(calib.path(), 2, 8, 103);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["analyze", "-a", "fixture-panic"]).arg(crate::tiny("tiny-llama")).arg("--calib").arg(&ids))
        .failure();
    // The plugin's panic hook once printed the panic above the error that tells it again.
    assert_eq!(out.stderr.matches("deliberate panic").count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("panicked: deliberate panic inside an analyzer (at tests/fixtures/panics/src/lib.rs:"), "{}", out.stderr);
    let out = run(scalpel().arg("--plugins").arg(dir.path()).args(["apply", "-s", "fixture-torch-error", "--dry-run"]).arg(crate::tiny("tiny-llama"))).failure();
    assert!(out.stderr.contains("mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"), "{}", out.stderr);
    assert!(!out.stderr.contains("Exception raised from") && !out.stderr.contains("frame #"), "{}", out.stderr);
}
