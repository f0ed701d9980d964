//! `scalpel train`: the loss curve equals a plain PyTorch loop's (golden files from
//! tests/golden/make_train_golden.py), a run survives `kill -9` and resumes onto the same curve,
//! a NaN stops it with its last checkpoint intact, and the checkpoint reloads with the same loss.

use crate::{repo, run, scalpel, tiny, token_file, Run};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `scalpel` on one thread: these models are tiny, and test binaries run side by side on few cores,
/// where libtorch's spinning worker threads would only slow each other down.
fn scalpel1() -> Command {
    let mut cmd = scalpel();
    cmd.env("OMP_NUM_THREADS", "1");
    cmd
}

fn golden(name: &str) -> (PathBuf, Value) {
    let dir = repo().join("tests/data/train");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}-losses.json"))).unwrap()).unwrap();
    (dir.join(format!("{name}-batches.safetensors")), expected)
}

/// `scalpel train` with the golden run's settings (`steps`, or the golden count; and `extra` flags)
/// on the tiny model `name`, into `out`.
fn train_cmd(name: &str, out: &Path, steps: Option<u64>, extra: &[&str]) -> Command {
    let (batches, expected) = golden(name);
    let s = &expected["settings"];
    let mut cmd = scalpel1();
    cmd.arg("train").arg(tiny(name)).arg("--data").arg(batches).arg("-o").arg(out);
    cmd.args(["--shuffle", "false", "--schedule", "constant", "--warmup", "0"]);
    cmd.arg("--steps").arg(steps.map_or(s["steps"].to_string(), |n| n.to_string()));
    for key in ["batch", "seq", "lr", "clip"] {
        if !extra.contains(&format!("--{key}").as_str()) {
            cmd.arg(format!("--{key}")).arg(s[key].to_string());
        }
    }
    cmd.arg("--weight-decay").arg(s["weight_decay"].to_string());
    cmd.args(extra);
    cmd
}

/// Starts `cmd`, waits until the run at `out` has logged `lines` steps, and kills it with SIGKILL.
fn kill_after(mut cmd: Command, out: &Path, lines: usize) {
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline && std::fs::read_to_string(out.join("log.jsonl")).map_or(0, |l| l.lines().count()) < lines {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `(step, loss, grad_norm, val_loss)` of each line of a run's log (a line a kill cut short is not one).
fn log(out: &Path) -> Vec<(u64, f64, f64, Option<f64>)> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["grad_norm"].as_f64().unwrap(), v["val_loss"].as_f64()))
        .collect()
}

#[test]
fn the_loss_curve_equals_pytorchs_for_the_same_model_batches_and_adamw() {
    for name in ["tiny-llama", "tiny-gpt2"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        run(&mut train_cmd(name, &out, None, &[])).success();
        let (_, expected) = golden(name);
        let want: Vec<f64> = expected["loss"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let norms: Vec<f64> = expected["grad_norm"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got = log(&out);
        assert_eq!(got.len(), want.len(), "{name}: one log line per step");
        for (i, ((step, loss, norm, _), (w, n))) in got.iter().zip(want.iter().zip(&norms)).enumerate() {
            assert_eq!(*step, i as u64 + 1);
            assert!((loss - w).abs() < 1e-3, "{name} step {step}: loss {loss} vs PyTorch {w}");
            assert!((norm - n).abs() < 1e-3 * n.max(1.0), "{name} step {step}: gradient norm {norm} vs PyTorch {n}");
        }
        assert!(got.last().unwrap().1 < got[0].1 - 0.5, "{name}: the loss falls on learnable data");
        for file in ["train.json", "record.json", "loss.png", "loss.svg", "loss.csv", "checkpoint/trainer.json", "checkpoint/optimizer.safetensors", "model/config.json"] {
            assert!(out.join(file).exists(), "{name}: {file} is written");
        }
    }
}

#[test]
fn a_killed_run_resumes_onto_the_uninterrupted_curve() {
    const STEPS: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    run(&mut train_cmd("tiny-llama", &whole, Some(STEPS), &["--save-every", "7"])).success();
    let expected = log(&whole);

    // Killed before its first checkpoint, then twice while resuming, then resumed to the end.
    let cut = dir.path().join("cut");
    kill_after(train_cmd("tiny-llama", &cut, Some(STEPS), &["--save-every", "7"]), &cut, 3);
    for lines in [40, 100] {
        let mut resume = scalpel1();
        resume.arg("train").arg("--resume").arg(&cut);
        kill_after(resume, &cut, lines);
        assert!(log(&cut).len() < STEPS as usize, "killed before the end");
    }
    run(scalpel1().arg("train").arg("--resume").arg(&cut)).success();
    let resumed = log(&cut);
    assert_eq!(resumed.len(), expected.len(), "one line per step after resuming, none twice");
    for (a, b) in resumed.iter().zip(&expected) {
        assert_eq!(a.0, b.0);
        assert!((a.1 - b.1).abs() < 1e-6, "step {}: resumed loss {} vs uninterrupted {}", a.0, a.1, b.1);
    }
    let hidden: Vec<_> = std::fs::read_dir(&cut).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(hidden.is_empty(), "nothing hidden left behind: {hidden:?}");
}

#[test]
fn resuming_checks_the_settings_of_the_run_folder() {
    // train.json is a file anyone may edit; resuming from a checkpoint once skipped the checks of a new run
    // and aborted on allocating the batch.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&mut train_cmd("tiny-llama", &out, Some(2), &[])).success();
    let settings = out.join("train.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    v["config"]["steps"] = 4.into();
    v["config"]["batch"] = 100_000_000_000u64.into();
    std::fs::write(&settings, v.to_string()).unwrap();
    let r = run(scalpel1().arg("train").arg("--resume").arg(&out)).failure();
    assert!(r.stderr.contains("--batch 100000000000") && !r.stderr.contains("memory allocation"), "{}", r.stderr);
    assert_eq!(log(&out).len(), 2, "nothing trained");
}

#[test]
fn a_log_with_garbage_lines_does_not_fail_a_resume_after_the_work() {
    // Resuming a finished run whose log.jsonl held garbage failed drawing the loss curve ("no loss values to
    // plot"), after the work was done.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&mut train_cmd("tiny-llama", &out, Some(2), &[])).success();
    let path = out.join("log.jsonl");
    let good = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    std::fs::write(&path, format!("{}\nnot json\n{}\n", lines[0], lines[1])).unwrap();
    let r = run(scalpel1().arg("train").arg("--resume").arg(&out)).success();
    assert!(r.stderr.contains("log.jsonl: line 2 is not a log entry"), "names the file and the line: {}", r.stderr);
    assert_eq!(log(&out).len(), 2, "the entries are kept");
    assert!(out.join("loss.svg").exists());
    std::fs::write(&path, b"\x00\xff garbage\n").unwrap();
    let r = run(scalpel1().arg("train").arg("--resume").arg(&out)).success();
    assert!(r.stderr.contains("line 1 is not a log entry") && r.stderr.contains("no loss curve drawn"), "{}", r.stderr);
    // A line a kill tore is what a crash leaves: no warning at all.
    std::fs::write(&path, format!("{}\n{}", lines[0], &lines[1][..lines[1].len() / 2])).unwrap();
    let r = run(scalpel1().arg("train").arg("--resume").arg(&out)).success();
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
    assert_eq!(log(&out).len(), 1);
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let failed: Run = run(&mut train_cmd("tiny-llama", &out, None, &["--lr", "1e30", "--clip", "0", "--save-every", "1"])).failure();
    assert!(failed.stderr.contains("training stopped") && failed.stderr.contains("checkpoint"), "{}", failed.stderr);
    let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/trainer.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step >= 1, "a checkpoint of a step with a finite loss is kept");
    // The kept checkpoint is a model scalpel opens.
    run(scalpel().arg("inspect").arg(out.join("model"))).success();
}

#[test]
fn the_checkpoint_reloads_with_the_loss_the_trainer_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (batches, _) = golden("tiny-llama");
    run(&mut train_cmd("tiny-llama", &out, Some(6), &["--val"]).arg(&batches).args(["--eval-windows", "8"])).success();
    let last = *log(&out).last().unwrap();
    let val = last.3.expect("a validation loss at the end");
    let eval = run(scalpel1().args(["eval", "--json", "--windows", "8", "--tokens", "32", "--data"]).arg(&batches).arg(out.join("model"))).success();
    let v: Value = serde_json::from_str(&eval.stdout).unwrap();
    let nll = v["mean_nll"].as_f64().unwrap();
    assert!((nll - val).abs() < 1e-5, "eval of the checkpoint gives {nll}, the trainer reported {val}");
}

#[test]
fn training_from_a_fresh_initialisation_starts_near_uniform() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&mut train_cmd("tiny-gpt2", &out, Some(3), &["--init", "random"])).success();
    let first = log(&out)[0].1;
    let uniform = (101f64).ln();
    assert!((first - uniform).abs() < 0.1, "a fresh N(0, 0.02) model predicts nearly uniformly: {first} vs ln(101) = {uniform}");
}

#[test]
fn train_has_an_equivalent_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let printed = run(&mut train_cmd("tiny-llama", &out, Some(2), &["--print-recipe"])).success().stdout;
    assert!(printed.contains("[step.train]") || printed.contains("train ="), "{printed}");
    let recipe = dir.path().join("train.toml");
    std::fs::write(&recipe, &printed).unwrap();
    run(scalpel1().arg("run").arg(&recipe)).success();
    assert_eq!(log(&out).len(), 2);
}

#[test]
fn settings_the_model_cannot_train_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // tiny-llama's context is 128 tokens.
    let (batches, _) = golden("tiny-llama");
    let r = run(scalpel1().arg("train").arg(tiny("tiny-llama")).arg("--data").arg(&batches).arg("-o").arg(&out).args(["--seq", "200"])).failure();
    assert!(r.stderr.contains("--seq 200") && r.stderr.contains("context"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
    // With --json the error is also JSON, for scripts.
    let r = run(scalpel1().args(["--json", "train"]).arg(tiny("tiny-llama")).arg("--data").arg(&batches).arg("-o").arg(&out).args(["--seq", "200"])).failure();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("--seq 200"), "{v}");
    let r = run(scalpel1().arg("generate").arg(tiny("tiny-llama")).args(["--prompt", "x", "--top-p", "0"])).failure();
    assert!(r.stderr.contains("--top-p"), "{}", r.stderr);
    // Data shorter than one window, as training or validation data: once found only at the first step, after
    // the run folder was made, which the next run then refused without --force.
    let short = token_file(&dir.path().join("short.bin"), &[1, 2, 3]);
    for (data, val, split) in [(&short, &batches, "training"), (&batches, &short, "validation")] {
        let r = run(scalpel1().arg("train").arg(tiny("tiny-llama")).arg("--data").arg(data).arg("--val").arg(val).arg("-o").arg(&out).args(["--seq", "16"])).failure();
        assert!(r.stderr.contains(&format!("the {split} data")) && r.stderr.contains("fewer than one window of 16"), "{}", r.stderr);
        assert!(!out.exists(), "nothing written");
    }
    // An absurd batch: once an abort on allocating its buffer, or an overflowing token count.
    for (batch, accum, says) in [("100000000000", "1", "for its logits alone"), ("18446744073709551615", "1", "more than can be counted"), ("4", "9223372036854775807", "more than can be counted")] {
        let r = run(scalpel1().arg("train").arg(tiny("tiny-llama")).arg("--data").arg(&batches).arg("-o").arg(&out).args(["--seq", "16", "--batch", batch, "--grad-accum", accum])).failure();
        assert!(r.stderr.contains(says) && !r.stderr.contains("panicked"), "{}", r.stderr);
        assert!(!out.exists(), "nothing written");
    }
}

#[test]
fn the_cut_and_heal_recipe_profiles_cuts_and_trains_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (batches, _) = golden("tiny-llama");
    let recipe = repo().join("examples/recipes/cut-and-heal.toml");
    // The example's sizes are for real models; the tiny model gets shorter windows through a copy.
    let text = std::fs::read_to_string(&recipe).unwrap().replace("steps = 100, batch = 8, seq = 256", "steps = 4, batch = 4, seq = 32").replace("sequences = 100\ntokens = 100", "sequences = 4\ntokens = 16");
    // The batches have no validation split of their own, and the recipe measures one (eval_every): they serve as it.
    let text = format!("val = {:?}\n{text}", batches.display().to_string());
    let copy = dir.path().join("cut-and-heal.toml");
    std::fs::write(&copy, text).unwrap();
    run(scalpel1().arg("run").arg(&copy).arg("--model").arg(tiny("tiny-llama")).arg("--calib").arg(&batches).arg("--data").arg(&batches).arg("-o").arg(&out)).success();
    for file in ["reports.json", "model/config.json", "train/log.jsonl", "train/model/config.json"] {
        assert!(out.join(file).exists(), "{file} is written");
    }
    assert_eq!(log(&out.join("train")).len(), 4);
}

#[test]
fn settings_given_beside_resume_are_refused_not_ignored() {
    // `train --resume RUN --steps 200` once continued with train.json's steps and said nothing of --steps.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    run(&mut train_cmd("tiny-llama", &out, Some(2), &[])).success();
    for flags in [&["--steps", "4"][..], &["--lr", "1"], &["--eval-every", "1"], &["--force"]] {
        let r = run(scalpel1().arg("train").arg("--resume").arg(&out).args(flags)).failure();
        assert!(r.stderr.contains("--resume") && r.stderr.contains(flags[0]) && r.stderr.contains("cannot be used with"), "{flags:?}: {}", r.stderr);
        assert!(!r.stderr.contains("--min-lr"), "only the flags given are named: {}", r.stderr);
    }
    assert_eq!(log(&out).len(), 2, "nothing trained");
    // The loop's own flags and its training's, beside inheritune --resume.
    for flags in [&["--grow", "3"][..], &["--steps", "9"], &["--max-rounds", "5"]] {
        let r = run(scalpel1().arg("inheritune").arg("--resume").arg(&out).args(flags)).failure();
        assert!(r.stderr.contains("--resume") && r.stderr.contains(flags[0]) && r.stderr.contains("cannot be used with"), "{flags:?}: {}", r.stderr);
    }
    // --device is where to run, not a setting of the run: it stays allowed.
    run(scalpel1().args(["--device", "cpu", "train", "--resume"]).arg(&out)).success();
}

#[test]
fn a_run_resumes_after_the_model_it_started_from_is_gone() {
    // The model folder a run starts from (a cut, say) may be removed or replaced once the run has checkpoints;
    // every save after a resume still read its companion files from there, and failed after the work.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(tiny("tiny-llama")).unwrap().flatten() {
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    std::fs::write(model.join("tokenizer_config.json"), "{}").unwrap();
    let out = dir.path().join("run");
    let (batches, expected) = golden("tiny-llama");
    let s = &expected["settings"];
    let mut cmd = scalpel1();
    cmd.arg("train").arg(&model).arg("--data").arg(&batches).arg("-o").arg(&out).args(["--steps", "150", "--save-every", "2", "--shuffle", "false"]);
    cmd.arg("--batch").arg(s["batch"].to_string()).arg("--seq").arg(s["seq"].to_string());
    kill_after(cmd, &out, 5);
    assert!(out.join("checkpoint/trainer.json").exists() && log(&out).len() < 150, "killed after a checkpoint, before the end");
    std::fs::remove_dir_all(&model).unwrap();
    run(scalpel1().arg("train").arg("--resume").arg(&out)).success();
    assert_eq!(log(&out).len(), 150);
    assert!(out.join("model/tokenizer_config.json").exists(), "the companions travel with the checkpoints");
}

#[test]
fn eval_every_without_validation_data_is_refused() {
    // The golden batches are `[N, T]` ids with no validation split: --eval-every once trained without a word
    // and logged no validation loss at all.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let r = run(&mut train_cmd("tiny-llama", &out, Some(2), &["--eval-every", "1"])).failure();
    assert!(r.stderr.contains("--eval-every 1") && r.stderr.contains("no validation split") && r.stderr.contains("--val"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
    let (batches, _) = golden("tiny-llama");
    run(&mut train_cmd("tiny-llama", &out, Some(2), &["--eval-every", "1", "--val"]).arg(&batches)).success();
    assert!(log(&out).iter().all(|l| l.3.is_some()), "a validation loss at every step");
}

/// A copy of tiny-llama (103 ids) in `dir` with a word-level tokenizer.json whose `<s>` is id `bos`.
fn tiny_llama_with_tokenizer(dir: &Path, bos: u32) -> PathBuf {
    std::fs::create_dir(dir).unwrap();
    for entry in std::fs::read_dir(tiny("tiny-llama")).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for (i, word) in ["<unk>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "."].iter().enumerate() {
        vocab.insert(word.to_string(), (i as u32 + 20).into());
    }
    vocab.insert("<s>".into(), bos.into());
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "<unk>" }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir.to_path_buf()
}

#[test]
fn data_tokenized_for_another_tokenizer_is_refused() {
    // Ids below the model's vocabulary size passed the only check there was, though another tokenizer made them
    // (SmolLM2's data on a Qwen model): the run trained on tokens that mean other words.
    let dir = tempfile::tempdir().unwrap();
    let mine = tiny_llama_with_tokenizer(&dir.path().join("mine"), 1);
    let other = tiny_llama_with_tokenizer(&dir.path().join("other"), 2);
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for i in 0..10 {
        std::fs::write(docs.join(format!("{i}.txt")), "the quick brown fox jumps over the lazy dog . ".repeat(8 + i)).unwrap();
    }
    let data = dir.path().join("data");
    run(scalpel().args(["data", "tokenize"]).arg(&docs).arg("--tokenizer").arg(&mine).arg("-o").arg(&data)).success();
    let out = dir.path().join("run");
    let train = |model: &Path| {
        let mut cmd = scalpel1();
        cmd.arg("train").arg(model).arg("--data").arg(&data).arg("-o").arg(&out).args(["--steps", "1", "--batch", "2", "--seq", "16", "--eval-windows", "1"]);
        cmd
    };
    let r = run(&mut train(&other)).failure();
    assert!(r.stderr.contains("was tokenized with the tokenizer of") && r.stderr.contains("has it as id 2") && r.stderr.contains("--tokenizer"), "{}", r.stderr);
    assert!(!out.exists(), "nothing written");
    // The same data as validation beside other training data is checked alike.
    let (batches, _) = golden("tiny-llama");
    let r = run(scalpel1().arg("train").arg(&other).arg("--data").arg(&batches).arg("--val").arg(&data).arg("-o").arg(&out).args(["--seq", "16"])).failure();
    assert!(r.stderr.contains("was tokenized with the tokenizer of"), "{}", r.stderr);
    run(&mut train(&mine)).success();
    // eval (and compare's --eval, which reads its data the same way) too.
    let eval = |model: &Path| run(scalpel1().arg("eval").arg(model).arg("--data").arg(&data).args(["--tokens", "16", "--windows", "1"]));
    let r = eval(&other).failure();
    assert!(r.stderr.contains("was tokenized with the tokenizer of"), "{}", r.stderr);
    eval(&mine).success();
}
