//! Hostile and broken inputs, and killed runs: every kind of defect found by the hardening probe
//! (issue 10), each pinned by a test named after it.

use crate::{run, scalpel, tiny, token_ids_npy, Run};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------------------------
// Helpers: model folders made in a temp dir
// ---------------------------------------------------------------------------------------------------------------

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of a tiny fixture whose config.json is edited by `edit`.
fn edited_copy(dir: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let model = dir.join(format!("{name}-edited"));
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(tiny(name)).unwrap().flatten() {
        if f.path().is_file() {
            std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
        }
    }
    let mut config = read_json(&model.join("config.json"));
    edit(&mut config);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

/// Rewrites a model folder's single safetensors file, tensor by tensor: `edit` may change or drop each.
fn rewrite_weights(model: &Path, edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>) {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, t)| edit(&n, t.dtype(), t.shape().to_vec(), t.data().to_vec()).map(|(d, s, b)| (n, d, s, b)))
        .collect();
    let views: Vec<(String, TensorView)> = kept.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// A Llama-shaped model of zeros, big enough that writing it takes a moment.
pub fn synthetic_llama(dir: &Path, layers: usize, d_model: usize, ff: usize, vocab: usize) -> PathBuf {
    let model = dir.join("synthetic-llama");
    std::fs::create_dir_all(&model).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d_model, "intermediate_size": ff,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": d_model / 8,
        "max_position_embeddings": 256, "vocab_size": vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": true, "torch_dtype": "float32",
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let kv = 4 * (d_model / 8);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, d_model]), ("model.norm.weight".into(), vec![d_model])];
    for i in 0..layers {
        for (n, s) in [
            ("input_layernorm.weight", vec![d_model]),
            ("post_attention_layernorm.weight", vec![d_model]),
            ("self_attn.q_proj.weight", vec![d_model, d_model]),
            ("self_attn.k_proj.weight", vec![kv, d_model]),
            ("self_attn.v_proj.weight", vec![kv, d_model]),
            ("self_attn.o_proj.weight", vec![d_model, d_model]),
            ("mlp.gate_proj.weight", vec![ff, d_model]),
            ("mlp.up_proj.weight", vec![ff, d_model]),
            ("mlp.down_proj.weight", vec![d_model, ff]),
        ] {
            shapes.push((format!("model.layers.{i}.{n}"), s));
        }
    }
    let data: Vec<Vec<u8>> = shapes.iter().map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 4]).collect();
    let views: Vec<(String, TensorView)> = shapes.iter().zip(&data).map(|((n, s), d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &model.join("model.safetensors")).unwrap();
    model
}

/// Runs a command that might hang, killing it after `limit`: a hang is a test failure, not a stuck suite.
fn run_within(cmd: &mut Command, limit: Duration) -> Run {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the command hung for {limit:?}: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run { ok: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into(), stderr: String::from_utf8_lossy(&out.stderr).into() }
}

/// `cmd` exec'ed by a shell after `setup` (resource limits, signal dispositions, a cgroup to join).
fn in_shell(setup: &str, cmd: &Command) -> Command {
    let mut line = format!("{setup} exec");
    for part in std::iter::once(cmd.get_program()).chain(cmd.get_args()) {
        line.push_str(&format!(" '{}'", part.to_string_lossy()));
    }
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(line);
    sh
}

/// A failure that is a clean error (exit 1 with a message), never a panic (101) or a signal.
fn clean_failure(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected a clean error, got {:?}\n{stderr}", out.status);
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
    stderr
}

// ---------------------------------------------------------------------------------------------------------------
// Calibration files
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_truncated_npy_is_refused_instead_of_read_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 4, 16, 103);
    let bytes = std::fs::read(&ids).unwrap();
    // Slightly short (once read from heap memory) and badly short (once a SIGSEGV).
    for cut in [8, bytes.len() / 2] {
        std::fs::write(&ids, &bytes[..bytes.len() - cut]).unwrap();
        let e = clean_failure(scalpel().arg("analyze").arg(tiny("tiny-llama")).arg("--calib").arg(&ids));
        assert!(e.contains("ids.npy") && e.contains("512 bytes") && e.contains("truncated"), "{e}");
    }
}

#[test]
fn n_and_t_with_a_token_id_file_take_its_first_windows_or_are_refused() {
    // -n and -t were silently ignored for an [N, T] token-id file: the whole file calibrated.
    let dir = tempfile::tempdir().unwrap();
    let ids = token_ids_npy(dir.path(), 6, 24, 103);
    let out = dir.path().join("analysis");
    let analyze = || {
        let mut cmd = scalpel();
        cmd.env("OMP_NUM_THREADS", "1").args(["analyze", "-a", "attn-rank"]).arg(tiny("tiny-llama")).arg("--calib").arg(&ids);
        cmd
    };
    let r = run(analyze().args(["-n", "2", "-t", "16", "-o"]).arg(&out)).success();
    assert!(r.stderr.contains("first 2 of the 6 windows") && r.stderr.contains("first 16 of 24 tokens"), "said so: {}", r.stderr);
    let bytes = std::fs::read(out.join("calibration.safetensors")).unwrap();
    assert_eq!(SafeTensors::deserialize(&bytes).unwrap().tensor("input_ids").unwrap().shape(), [2, 16], "the windows that calibrated");
    for (flag, value) in [("-n", "7"), ("-t", "25")] {
        let e = clean_failure(analyze().args([flag, value]));
        assert!(e.contains("ids.npy holds 6 windows of 24 tokens") && e.contains("at most -n 6 -t 24"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Checkpoints that disagree with their config
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn weights_that_disagree_with_config_are_refused_naming_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Box<dyn FnOnce(&mut Value)>, &str)> = vec![
        ("tiny-llama", Box::new(|c| c["head_dim"] = 16.into()), "self_attn.k_proj.weight` has shape [16, 48], but config.json implies [32, 48]"),
        ("tiny-llama", Box::new(|c| c["num_key_value_heads"] = 3.into()), "k_proj.weight` has shape [16, 48], but config.json implies [24, 48]"),
        ("tiny-llama", Box::new(|c| c["intermediate_size"] = 64.into()), "mlp.down_proj.weight` has shape [48, 80], but config.json implies [48, 64]"),
        ("tiny-gpt2", Box::new(|c| c["n_inner"] = 64.into()), "mlp.c_fc.bias` has shape [128], but config.json implies [64]"),
        ("tiny-gpt2", Box::new(|c| c["n_positions"] = 32.into()), "transformer.wpe.weight` has shape [64, 32], but config.json implies [32, 32]"),
    ];
    for (model, edit, want) in cases {
        let m = edited_copy(dir.path(), model, edit);
        for cmd in ["inspect", "eval"] {
            let mut c = scalpel();
            c.arg(cmd).arg(&m);
            if cmd == "eval" {
                c.arg("--text").arg(m.join("config.json"));
            }
            let e = clean_failure(&mut c);
            assert!(e.contains(want), "{model} {cmd}: {e}");
        }
        std::fs::remove_dir_all(&m).unwrap();
    }
}

#[test]
fn a_vector_where_a_matrix_belongs_and_integer_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    rewrite_weights(&m, |n, d, s, b| Some(if n == "model.layers.1.self_attn.o_proj.weight" { (d, vec![s.iter().product()], b) } else { (d, s, b) }));
    let e = clean_failure(scalpel().arg("inspect").arg(&m));
    assert!(e.contains("model.layers.1.self_attn.o_proj.weight` has shape [2304]") && e.contains("[48, 48]"), "{e}");
    std::fs::remove_dir_all(&m).unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    rewrite_weights(&m, |n, d, s, b| Some(if n == "model.norm.weight" { (Dtype::I32, s, b) } else { (d, s, b) }));
    let e = clean_failure(scalpel().arg("inspect").arg(&m));
    assert!(e.contains("`model.norm.weight` is I32") && e.contains("floating point"), "{e}");
}

#[test]
fn an_untied_config_without_an_lm_head_is_refused_not_tied() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |c| assert_eq!(c["tie_word_embeddings"], false));
    rewrite_weights(&m, |n, d, s, b| (n != "lm_head.weight").then_some((d, s, b)));
    let e = clean_failure(scalpel().arg("inspect").arg(&m));
    assert!(e.contains("tie_word_embeddings: false") && e.contains("lm_head.weight"), "{e}");
}

#[test]
fn an_unknown_torch_dtype_is_refused_by_value() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |c| c["torch_dtype"] = "float8_e4m3".into());
    let e = clean_failure(scalpel().arg("inspect").arg(&m));
    assert!(e.contains("`torch_dtype` is \"float8_e4m3\""), "{e}");
}

// ---------------------------------------------------------------------------------------------------------------
// Plans, files that are not files, paths that leave the model folder
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn an_absurd_stack_count_is_refused_before_allocating() {
    let start = Instant::now();
    let e = clean_failure(scalpel().args(["apply", "-s", "stack", "--set", "times=1000000000", "--dry-run"]).arg(tiny("tiny-llama")));
    assert!(e.contains("refuses more than 4096"), "{e}");
    let e = clean_failure(scalpel().args(["apply", "-s", "stack", "--set", "times=1000000", "--dry-run"]).arg(tiny("tiny-llama")));
    assert!(e.contains("4000000 layers"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_fifo_named_like_a_model_file_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    assert!(Command::new("mkfifo").arg(m.join("model.safetensors")).status().unwrap().success());
    let r = run_within(scalpel().arg("inspect").arg(&m), Duration::from_secs(30)).failure();
    assert!(r.stderr.contains("not a regular file") && r.stderr.contains("FIFO"), "{}", r.stderr);
    // A FIFO tokenizer.json beside good weights: inspect reports no tokenizer instead of waiting.
    let m = edited_copy(dir.path(), "tiny-gpt2", |_| {});
    assert!(Command::new("mkfifo").arg(m.join("tokenizer.json")).status().unwrap().success());
    let r = run_within(scalpel().arg("inspect").arg(&m), Duration::from_secs(30)).success();
    assert!(r.stdout.contains("not a regular file"), "{}", r.stdout);
}

#[test]
fn a_fifo_given_as_data_recipe_reports_or_text_does_not_hang() {
    // Each of these once blocked forever waiting for a writer.
    let dir = tempfile::tempdir().unwrap();
    let fifo = |name: &str| {
        let p = dir.path().join(name);
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
        p
    };
    let (bin, toml, txt, json) = (fifo("train.bin"), fifo("recipe.toml"), fifo("book.txt"), fifo("reports.json"));
    let recipe = dir.path().join("cut.toml");
    std::fs::write(&recipe, format!("reports = {:?}\n[[step]]\nstrategy = \"cutoff\"\nconfig = {{ keep = 2 }}\n", json.display().to_string())).unwrap();
    let out = dir.path().join("out");
    let gpt2 = tiny("tiny-gpt2");
    let attempts: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["train".into(), tiny("tiny-llama").into(), "--data".into(), bin.clone().into(), "-o".into(), out.clone().into(), "--seq".into(), "16".into()],
        vec!["eval".into(), gpt2.clone().into(), "--data".into(), bin.into(), "--tokens".into(), "16".into()],
        vec!["eval".into(), gpt2.clone().into(), "--text".into(), txt.clone().into(), "--tokens".into(), "16".into()],
        vec!["run".into(), toml.into(), "--model".into(), tiny("tiny-llama").into(), "-o".into(), out.clone().into()],
        vec!["run".into(), recipe.into(), "--model".into(), tiny("tiny-llama").into(), "-o".into(), out.clone().into()],
        vec!["data".into(), "tokenize".into(), txt.clone().into(), "--tokenizer".into(), gpt2.clone().into(), "-o".into(), out.clone().into()],
    ];
    for args in attempts {
        let r = run_within(scalpel().env("OMP_NUM_THREADS", "1").args(&args), Duration::from_secs(30)).failure();
        assert!(r.stderr.contains("not a regular file (a FIFO)"), "{args:?}: {}", r.stderr);
    }
    assert!(!out.exists());
    // A FIFO generation_config.json is passed over, as a missing one is.
    let m = edited_copy(dir.path(), "tiny-gpt2", |_| {});
    std::fs::remove_file(m.join("generation_config.json")).unwrap();
    assert!(Command::new("mkfifo").arg(m.join("generation_config.json")).status().unwrap().success());
    run_within(scalpel().env("OMP_NUM_THREADS", "1").arg("generate").arg(&m).args(["--prompt", "!", "--max-tokens", "3"]), Duration::from_secs(30)).success();
}

#[test]
fn a_fifo_named_like_a_plugin_is_skipped_with_a_warning_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("libscalpel_plugin_fifo.so");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // On the plugin path (a folder) and named explicitly (`--plugins FILE`): a warning each time, never a hang.
    for how in [dir.path(), fifo.as_path()] {
        let r = run_within(scalpel().arg("--plugins").arg(how).arg("plugins"), Duration::from_secs(30)).success();
        assert!(r.stderr.contains("plugin skipped") && r.stderr.contains("not a regular file (a FIFO)"), "{}", r.stderr);
        assert!(r.stdout.contains("attn-rank"), "the built-in plugins still load: {}", r.stdout);
    }
}

#[test]
fn a_shard_index_cannot_name_files_outside_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    for bad in ["../../../../etc/passwd", "/etc/passwd", "sub/../../model.safetensors"] {
        let index = json!({ "metadata": {}, "weight_map": { "model.embed_tokens.weight": bad, "model.norm.weight": "model.safetensors" } });
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let e = clean_failure(scalpel().arg("inspect").arg(&m));
        assert!(e.contains(&format!("names the shard `{bad}`")) && e.contains("not a file inside the model folder"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writers: what scalpel writes it would also read; --force replaces only its own outputs
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_dtype_conversion_keeps_integer_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    let path = m.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<u8> = (0..6i64).flat_map(|i| i.to_le_bytes()).collect();
    let mut views: Vec<(String, TensorView)> = st.tensors();
    views.push(("model.position_ids".into(), TensorView::new(Dtype::I64, vec![6], &ids).unwrap()));
    safetensors::serialize_to_file(views, None, &dir.path().join("w")).unwrap();
    std::fs::rename(dir.path().join("w"), &path).unwrap();
    let out = dir.path().join("bf16");
    run(scalpel().args(["apply", "--dtype", "bf16"]).arg(&m).arg("-o").arg(&out)).success();
    let written = std::fs::read(out.join("model/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&written).unwrap();
    assert_eq!(st.tensor("model.position_ids").unwrap().dtype(), Dtype::I64);
    assert_eq!(st.tensor("model.position_ids").unwrap().data(), &ids[..]);
    assert_eq!(st.tensor("model.norm.weight").unwrap().dtype(), Dtype::BF16);
}

#[test]
fn force_replaces_only_an_earlier_output_never_the_input_or_a_stray_file() {
    let dir = tempfile::tempdir().unwrap();
    let m = edited_copy(dir.path(), "tiny-llama", |_| {});
    let weights = std::fs::read(m.join("model.safetensors")).unwrap();
    let e = clean_failure(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2", "--force"]).arg(&m).arg("-o").arg(m.join("model.safetensors")));
    assert!(e.contains("not an earlier output"), "{e}");
    assert_eq!(std::fs::read(m.join("model.safetensors")).unwrap(), weights, "the input was touched");
    let foreign = dir.path().join("notes");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("mine.txt"), "keep me").unwrap();
    let e = clean_failure(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2", "--force"]).arg(&m).arg("-o").arg(&foreign));
    assert!(e.contains("not an earlier output"), "{e}");
    assert!(foreign.join("mine.txt").exists());
    // An earlier output is replaced, atomically, and nothing hidden stays behind.
    let out = dir.path().join("out");
    run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=2"]).arg(&m).arg("-o").arg(&out)).success();
    run(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=3", "--force"]).arg(&m).arg("-o").arg(&out)).success();
    assert_eq!(read_json(&out.join("model/config.json"))["num_hidden_layers"], 3);
    assert_eq!(hidden(dir.path()), Vec::<String>::new());
}

fn hidden(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------------------------
// GGUF files that describe no usable model
// ---------------------------------------------------------------------------------------------------------------

/// A GGUF metadata value.
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
}

/// A GGUF v3 file of F32 tensors (`ne` in GGUF order, innermost first); data are zeros.
pub fn write_gguf(path: &Path, version: u32, kv: &[(&str, Meta)], tensors: &[(&str, Vec<u64>)]) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        string(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(list) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((list.len() as u64).to_le_bytes());
                for s in list {
                    string(&mut out, s);
                }
            }
        }
    }
    let mut offset = 0u64;
    for (name, ne) in tensors {
        string(&mut out, name);
        out.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend(offset.to_le_bytes());
        offset += (ne.iter().product::<u64>() * 4).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.resize(out.len() + offset as usize, 0);
    std::fs::write(path, out).unwrap();
}

/// The metadata and tensors of a Llama of `layers` blocks (hidden `d`, FFN `ff`, vocabulary 64).
fn gguf_llama(layers: u32, d: u64, ff: u64) -> (Vec<(&'static str, Meta)>, Vec<(String, Vec<u64>)>) {
    let vocab = 64u64;
    let kv = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(d as u32)),
        ("llama.feed_forward_length", Meta::U32(ff as u32)),
        ("llama.block_count", Meta::U32(layers)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.context_length", Meta::U32(128)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs((0..vocab).map(|i| format!("t{i}")).collect())),
        ("tokenizer.ggml.merges", Meta::Strs(vec![])),
    ];
    let kvd = d / 2;
    let mut t = vec![("token_embd.weight".to_string(), vec![d, vocab]), ("output_norm.weight".to_string(), vec![d])];
    for i in 0..layers {
        for (n, ne) in [
            ("attn_norm.weight", vec![d]),
            ("attn_q.weight", vec![d, d]),
            ("attn_k.weight", vec![d, kvd]),
            ("attn_v.weight", vec![d, kvd]),
            ("attn_output.weight", vec![d, d]),
            ("ffn_norm.weight", vec![d]),
            ("ffn_gate.weight", vec![d, ff]),
            ("ffn_up.weight", vec![d, ff]),
            ("ffn_down.weight", vec![ff, d]),
        ] {
            t.push((format!("blk.{i}.{n}"), ne));
        }
    }
    (kv, t)
}

fn write_gguf_model(path: &Path, kv: &[(&str, Meta)], tensors: &[(String, Vec<u64>)]) {
    let t: Vec<(&str, Vec<u64>)> = tensors.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
    write_gguf(path, 3, kv, &t);
}

/// Found by fuzzing (host/fuzz/regressions/gguf/crash-d950…): `import` wrote a tokenizer.json whose merges
/// name a token outside the vocabulary, which scalpel then could not read.
#[test]
fn a_gguf_tokenizer_that_would_not_load_is_refused_by_import() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = (dir.path().join("m.gguf"), dir.path().join("out"));
    let (mut kv, t) = gguf_llama(1, 32, 64);
    kv.iter_mut().find(|(k, _)| *k == "tokenizer.ggml.merges").unwrap().1 = Meta::Strs(vec!["t1 02".into()]);
    write_gguf_model(&file, &kv, &t);
    let e = clean_failure(scalpel().arg("import").arg(&file).arg(&out));
    assert!(e.contains("its tokenizer cannot be converted") && e.contains("02"), "{e}");
    assert!(!out.exists());
}

#[test]
fn a_gguf_that_describes_no_usable_model_is_not_imported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.gguf");
    let out = dir.path().join("out");
    // The well-formed baseline imports and loads.
    let (kv, t) = gguf_llama(2, 32, 64);
    write_gguf_model(&file, &kv, &t);
    run(scalpel().arg("import").arg(&file).arg(&out)).success();
    run(scalpel().arg("inspect").arg(&out)).success();
    type Break = Box<dyn Fn(&mut Vec<(&'static str, Meta)>, &mut Vec<(String, Vec<u64>)>)>;
    let set = |key: &'static str, v: fn() -> Meta| -> Break {
        Box::new(move |kv, _| {
            kv.iter_mut().find(|(k, _)| *k == key).unwrap().1 = v();
        })
    };
    let cases: Vec<(&str, Break, &str)> = vec![
        ("block_count 0", set("llama.block_count", || Meta::U32(0)), "block_count is 0"),
        ("context_length 0", set("llama.context_length", || Meta::U32(0)), "context_length is 0"),
        ("NaN eps", set("llama.attention.layer_norm_rms_epsilon", || Meta::F32(f32::NAN)), "not a finite positive number"),
        ("no tensors", Box::new(|_, t| t.clear()), "holds no tensors"),
        ("a layer that does not exist", Box::new(|_, t| t.push(("blk.7.attn_norm.weight".into(), vec![32]))), "belongs to layer 7, but block_count says 2"),
        ("zero dims", Box::new(|_, t| t.iter_mut().find(|(n, _)| n == "blk.1.ffn_up.weight").unwrap().1 = vec![32, 0]), "blk.1.ffn_up.weight` has shape [0, 32]"),
    ];
    for (what, breaks, want) in cases {
        let (mut kv, mut t) = gguf_llama(2, 32, 64);
        breaks(&mut kv, &mut t);
        write_gguf_model(&file, &kv, &t);
        let dest = dir.path().join("broken");
        let e = clean_failure(scalpel().arg("import").arg(&file).arg(&dest));
        assert!(e.contains(want), "{what}: {e}");
        assert!(!dest.exists(), "{what}: an output was written");
    }
    // embedding_length 0 with matching tensors: the zero-size tensors are refused.
    let (mut kv, mut t) = gguf_llama(2, 32, 64);
    set("llama.embedding_length", || Meta::U32(0))(&mut kv, &mut t);
    write_gguf_model(&file, &kv, &t);
    assert!(!run(scalpel().arg("import").arg(&file).arg(dir.path().join("e0"))).ok);
    assert!(!dir.path().join("e0").exists());
}

#[test]
fn a_gguf_of_version_zero_is_not_called_big_endian() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v0.gguf");
    write_gguf(&file, 0, &[], &[]);
    let e = clean_failure(scalpel().arg("inspect").arg(&file));
    assert!(e.contains("unsupported GGUF version 0") && !e.contains("big-endian"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn nan_and_inf_settings_say_they_are_not_finite_numbers() {
    for v in ["nan", "inf", "-inf", "[1.0, nan]"] {
        let e = clean_failure(scalpel().args(["apply", "-s", "cutoff", "--set"]).arg(format!("threshold={v}")).arg("--dry-run").arg(tiny("tiny-llama")));
        assert!(e.contains("not a finite number") && !e.contains("invalid type: null"), "{v}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, format!("model = {:?}\n[[step]]\nstrategy = \"cutoff\"\nconfig = {{ threshold = nan }}\n", tiny("tiny-llama"))).unwrap();
    let e = clean_failure(scalpel().arg("run").arg(&recipe).arg("--dry-run"));
    assert!(e.contains("step[0].config.threshold") && e.contains("not a finite number"), "{e}");
}

#[test]
fn keep_zero_says_zero_layers() {
    let e = clean_failure(scalpel().args(["apply", "-s", "cutoff", "--set", "keep=0", "--dry-run"]).arg(tiny("tiny-llama")));
    assert!(e.contains("keep = 0 would leave no layer") && !e.contains("min_keep"), "{e}");
}

#[test]
fn eval_checks_the_window_size_and_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "hello world, this is a test of the evaluation. ".repeat(20)).unwrap();
    let e = clean_failure(scalpel().arg("eval").arg(tiny("tiny-llama")).arg("--text").arg(&text).args(["--tokens", "0"]));
    assert!(e.contains("--tokens 0") && e.contains("at least 2"), "{e}");
    // tiny-gpt2 has 101 tokens, but the built-in GPT-2 tokenizer gives ids up to 50256.
    let e = clean_failure(scalpel().arg("eval").arg(tiny("tiny-gpt2")).arg("--text").arg(&text).args(["--tokens", "32"]));
    assert!(e.contains("token id") && e.contains("vocabulary is 0..101"), "{e}");
}

#[test]
fn a_write_error_is_reported_once() {
    // A file-size limit fails writes the way a full disk does (EFBIG instead of ENOSPC), through the
    // same error path; SIGXFSZ is ignored so the write returns the error instead of killing the run.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut cmd = scalpel();
    cmd.args(["apply", "-s", "stack"]).arg(tiny("tiny-llama")).arg("-o").arg(&out);
    let r = in_shell("trap '' XFSZ; ulimit -f 64;", &cmd).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches("File too large").count(), 1, "{stderr}");
    assert!(!out.exists() && hidden(dir.path()).is_empty(), "{:?}", hidden(dir.path()));
}

// ---------------------------------------------------------------------------------------------------------------
// Kills
// ---------------------------------------------------------------------------------------------------------------

/// A run to kill: `command` writes `output`; `inputs` must never change; `valid` says whether a
/// complete output is there (e.g. `scalpel inspect` accepts it).
pub struct KillCase<'a> {
    pub command: &'a dyn Fn() -> Command,
    pub output: &'a Path,
    pub inputs: &'a [PathBuf],
    pub valid: &'a dyn Fn(&Path) -> bool,
}

fn fingerprint(paths: &[PathBuf]) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    paths
        .iter()
        .map(|p| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(p).unwrap().hash(&mut h);
            h.finish()
        })
        .collect()
}

/// `kill -9` of a run at several moments spread over its duration (measured by one full run first).
/// After each kill the output is absent or complete and valid, and the inputs are unchanged. A final
/// full run then succeeds, reports any leftovers it removed, and leaves nothing hidden beside the output.
pub fn kill_test(case: &KillCase, moments: usize) {
    let before = fingerprint(case.inputs);
    let parent = case.output.parent().unwrap();
    let started = Instant::now();
    let out = (case.command)().output().unwrap();
    assert!(out.status.success(), "the uninterrupted run fails: {}", String::from_utf8_lossy(&out.stderr));
    let full = started.elapsed();
    assert!((case.valid)(case.output), "the uninterrupted run wrote no valid output");
    std::fs::remove_dir_all(case.output).unwrap();
    let mut killed = 0;
    for k in 0..moments {
        // From just after start-up to the end, where the rename happens.
        let delay = full.mul_f64(0.1 + 0.9 * k as f64 / moments.max(1) as f64);
        let mut child = (case.command)().stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();
        assert_eq!(fingerprint(case.inputs), before, "kill after {delay:?}: an input changed");
        if case.output.exists() {
            assert!((case.valid)(case.output), "kill after {delay:?}: the output is there but not valid");
        }
    }
    assert!(killed > 0, "every run finished before its kill: the case is too small to test kills");
    let leftovers = !hidden(parent).is_empty();
    eprintln!("{killed} of {moments} runs killed (a full run takes {full:?}); leftovers before the next run: {:?}", hidden(parent));
    let out = (case.command)().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the run after the kills fails: {stderr}");
    assert!((case.valid)(case.output));
    assert_eq!(hidden(parent), Vec::<String>::new(), "hidden leftovers after the next run");
    if leftovers {
        assert!(stderr.contains("left behind by an earlier run"), "leftovers were removed silently: {stderr}");
    }
    assert_eq!(fingerprint(case.inputs), before);
}

fn inspects(model: &Path) -> bool {
    scalpel().arg("inspect").arg(model).output().unwrap().status.success()
}

#[test]
fn kill_9_of_apply_leaves_the_old_output_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_llama(dir.path(), 8, 512, 1024, 1000);
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let out = outputs.join("stacked");
    let command = || {
        let mut c = scalpel();
        c.args(["apply", "-s", "stack", "--force"]).arg(&model).arg("-o").arg(&out);
        c
    };
    let valid = |o: &Path| o.join("record.json").is_file() && inspects(&o.join("model"));
    let inputs = [model.join("model.safetensors"), model.join("config.json")];
    kill_test(&KillCase { command: &command, output: &out, inputs: &inputs, valid: &valid }, 6);
}

#[test]
fn kill_9_of_import_leaves_no_half_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big.gguf");
    let (kv, t) = gguf_llama(6, 512, 1024);
    write_gguf_model(&file, &kv, &t);
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let out = outputs.join("imported");
    let command = || {
        let mut c = scalpel();
        c.arg("import").arg(&file).arg(&out).arg("--force");
        c
    };
    kill_test(&KillCase { command: &command, output: &out, inputs: &[file.clone()], valid: &|o: &Path| inspects(o) }, 6);
}

// ---------------------------------------------------------------------------------------------------------------
// Memory: surgery streams, so it runs in a memory cgroup far smaller than the model
// ---------------------------------------------------------------------------------------------------------------

/// A memory cgroup capped at `bytes`, removed on drop: cgroup v2 under this process's own group,
/// or v1's memory hierarchy. None (with the reason) where cgroups are not writable here.
struct MemoryCap {
    dir: PathBuf,
    /// The file that reports the peak usage.
    peak: &'static str,
}

impl MemoryCap {
    fn new(bytes: u64) -> Result<Self, String> {
        // One per test: tests of one process run in parallel.
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!("scalpel-test-{}-{}", std::process::id(), COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let root = Path::new("/sys/fs/cgroup");
        let (dir, limits, peak): (PathBuf, &[&str], _) = if root.join("cgroup.controllers").exists() {
            let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
            let path = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
            (root.join(path.trim_start_matches('/')).join(name), &["memory.max", "memory.swap.max"], "memory.peak")
        } else if root.join("memory").is_dir() {
            (root.join("memory").join(name), &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"], "memory.max_usage_in_bytes")
        } else {
            return Err("no memory cgroup hierarchy under /sys/fs/cgroup".into());
        };
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cap = MemoryCap { dir, peak };
        // The first limit must hold; the swap limit exists only where swap accounting is on.
        std::fs::write(cap.dir.join(limits[0]), bytes.to_string()).map_err(|e| format!("cannot set {}: {e}", limits[0]))?;
        let swap = if limits[1] == "memory.swap.max" { 0 } else { bytes };
        let _ = std::fs::write(cap.dir.join(limits[1]), swap.to_string());
        Ok(cap)
    }

    /// The cap for the test `name`, or None after saying why the test is skipped.
    fn for_test(name: &str, bytes: u64) -> Option<Self> {
        Self::new(bytes).map_err(|why| eprintln!("SKIPPED {name}: cgroups are not writable here ({why})")).ok()
    }

    /// `cmd` run inside the cgroup (a shell moves itself in, then execs the command).
    fn run(&self, cmd: &Command) -> std::process::Output {
        in_shell(&format!("echo $$ > '{}' &&", self.dir.join("cgroup.procs").display()), cmd).output().unwrap()
    }

    fn peak_bytes(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(self.peak)).ok()?.trim().parse().ok()
    }
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn surgery_on_a_model_twice_its_memory_cap_completes() {
    // libtorch alone holds 59 MB of anonymous memory once its static initialisers have run (measured by
    // loading libtorch_cpu.so into Python), whatever the command: a 64 MB cap left scalpel about 5 MB of
    // its own and killed it now and then. 96 MB leaves 37 MB for surgery on a model of 203 MB.
    const CAP: u64 = 96 << 20;
    let Some(cap) = MemoryCap::for_test("surgery_on_a_model_twice_its_memory_cap_completes", CAP) else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_llama(dir.path(), 8, 768, 2048, 2000);
    let size = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    assert!(size > 2 * CAP, "the model ({size} bytes) must be over twice the cap");
    let out = dir.path().join("grown");
    let mut cmd = scalpel();
    cmd.args(["apply", "-s", "duplicate", "--set", "overlap=2"]).arg(&model).arg("-o").arg(&out);
    let r = cap.run(&cmd);
    assert!(r.status.success(), "killed or failed under a {CAP}-byte cap: {:?}\n{}", r.status, String::from_utf8_lossy(&r.stderr));
    eprintln!("peak memory of the capped run: {:?} MB (model {} MB)", cap.peak_bytes().map(|b| b >> 20), size >> 20);
    assert_eq!(read_json(&out.join("model/config.json"))["num_hidden_layers"], 12);
    run(scalpel().arg("inspect").arg(out.join("model"))).success();
}

/// Analysis streams the checkpoint a block at a time: a model whose float32 weights alone exceed the cap
/// is analysed inside it (loading it whole, as eval does, would be killed).
#[test]
fn analysis_of_a_model_bigger_than_its_memory_cap_completes() {
    const CAP: u64 = 512 << 20;
    let Some(cap) = MemoryCap::for_test("analysis_of_a_model_bigger_than_its_memory_cap_completes", CAP) else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_llama(dir.path(), 24, 768, 2048, 2000);
    let size = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    assert!(size > CAP, "the model's float32 weights ({size} bytes) must exceed the cap");
    let ids = token_ids_npy(dir.path(), 8, 64, 2000);
    let out = dir.path().join("analysis");
    let mut cmd = scalpel();
    cmd.args(["analyze", "-a", "attn-rank"]).arg(&model).arg("--calib").arg(&ids).arg("-o").arg(&out).env("OMP_NUM_THREADS", "1");
    let r = cap.run(&cmd);
    assert!(r.status.success(), "killed or failed under a {CAP}-byte cap: {:?}\n{}", r.status, String::from_utf8_lossy(&r.stderr));
    eprintln!("peak memory of the capped analysis: {:?} MB (model {} MB)", cap.peak_bytes().map(|b| b >> 20), size >> 20);
    let reports = read_json(&out.join("reports.json"));
    assert_eq!(reports["attn-rank"]["metrics"][0]["per_layer"].as_array().map(Vec::len), Some(24));
}
