//! Token files as llm.c writes them (`dev/data/data_common.py`), and the reader the trainer draws batches from.
//!
//! A file is a header of 256 little-endian int32 (`[0]` magic, `[1]` version, `[2]` token count, the rest zero)
//! followed by the tokens: uint16 for magic 20240520 version 1 (GPT-2), uint32 for magic 20240801 version 7
//! (Llama 3). The same files load in llm.c and nanoGPT-style loaders.

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use tch::{Kind, Tensor};

const HEADER_INTS: usize = 256;
/// The window length in a guard's message: every caller checks `fits` first with the option its user sets.
const WINDOW: &str = "the window length";
pub const HEADER_BYTES: usize = HEADER_INTS * 4;

/// How token ids are stored, which fixes the header's magic and version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    Uint16,
    Uint32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a vocabulary of `vocab` tokens.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenDtype::Uint16
        } else {
            TokenDtype::Uint32
        }
    }
    fn magic_version(self) -> (i32, i32) {
        match self {
            TokenDtype::Uint16 => (20240520, 1),
            TokenDtype::Uint32 => (20240801, 7),
        }
    }
    fn from_header(magic: i32, version: i32) -> Option<Self> {
        [TokenDtype::Uint16, TokenDtype::Uint32].into_iter().find(|d| d.magic_version() == (magic, version))
    }
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        }
    }
    pub fn width(self) -> usize {
        match self {
            TokenDtype::Uint16 => 2,
            TokenDtype::Uint32 => 4,
        }
    }
}

/// Writes `ids` as an llm.c token file (header + ids), checking that every id fits `dtype`.
pub fn write_token_file(path: &Path, ids: &[u32], dtype: TokenDtype) -> Result<()> {
    ensure!(!ids.is_empty(), "{}: refusing to write an empty token file", path.display());
    // llm.c keeps the count in an int32.
    ensure!(ids.len() < i32::MAX as usize, "{}: {} tokens is more than an llm.c file holds (2^31 - 1)", path.display(), ids.len());
    let (magic, version) = dtype.magic_version();
    let mut header = [0i32; HEADER_INTS];
    header[0] = magic;
    header[1] = version;
    header[2] = ids.len() as i32;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + ids.len() * dtype.width());
    bytes.extend(header.iter().flat_map(|h| h.to_le_bytes()));
    match dtype {
        TokenDtype::Uint16 => {
            for &id in ids {
                let id = u16::try_from(id).with_context(|| format!("token id {id} does not fit uint16: write uint32"))?;
                bytes.extend(id.to_le_bytes());
            }
        }
        TokenDtype::Uint32 => bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes())),
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// A memory-mapped llm.c token file, its header checked against its length.
struct Stream {
    map: Mmap,
    dtype: TokenDtype,
    len: usize,
}

impl Stream {
    fn open(path: &Path) -> Result<Self> {
        // Only a regular file: a FIFO named train.bin once hung train and eval.
        let file = scalpel_files::open_regular(path).context("opening a token file")?;
        // SAFETY: the map is read-only; a file changed under a running job is the user's to avoid, as for checkpoints.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let redo = "re-create it with `scalpel data tokenize`";
        ensure!(map.len() >= HEADER_BYTES, "{} is {} bytes, shorter than an llm.c header ({HEADER_BYTES} bytes): not a token file, or truncated; {redo}", path.display(), map.len());
        let int = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        let (magic, version, count) = (int(0), int(1), int(2));
        let dtype = TokenDtype::from_header(magic, version).with_context(|| {
            format!("{} is not an llm.c token file: header magic {magic} version {version}, expected 20240520 v1 (uint16) or 20240801 v7 (uint32)", path.display())
        })?;
        ensure!(count > 0, "{} holds no tokens (header count {count}): {redo} from more text", path.display());
        let len = count as usize;
        let want = HEADER_BYTES + len * dtype.width();
        if map.len() < want {
            bail!("{} is truncated: its header promises {len} tokens ({want} bytes), the file has {} bytes; {redo}", path.display(), map.len());
        }
        ensure!(map.len() == want, "{} has {} bytes after its {len} tokens: not an llm.c token file; {redo}", path.display(), map.len() - want);
        Ok(Stream { map, dtype, len })
    }

    fn id(&self, i: usize) -> u32 {
        let w = self.dtype.width();
        let b = &self.map[HEADER_BYTES + i * w..HEADER_BYTES + (i + 1) * w];
        match self.dtype {
            TokenDtype::Uint16 => u16::from_le_bytes([b[0], b[1]]) as u32,
            TokenDtype::Uint32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    fn push_window(&self, start: usize, seq: usize, out: &mut Vec<i64>) {
        out.extend((start..start + seq).map(|i| self.id(i) as i64));
    }
}

enum Store {
    Stream(Stream),
    /// `[N, T]` int64 on the CPU.
    Rows(Tensor),
}

/// One split of token ids: a memory-mapped llm.c token file, or the rows of an integer [N, T] tensor.
pub struct Tokens {
    store: Store,
    max_id: OnceLock<u32>,
    /// The last (seed, epoch)'s row permutation (tensor rows, shuffled): it costs O(N), a step needs one or two.
    permutation: Mutex<Option<((u64, u64), Vec<usize>)>>,
}

impl Tokens {
    /// An llm.c token file; its largest id is scanned once, on demand.
    pub fn open_bin(path: &Path) -> Result<Tokens> {
        Ok(Tokens::new(Store::Stream(Stream::open(path)?), None))
    }

    /// The rows of an integer `[N, T]` tensor.
    pub fn from_rows(ids: Tensor) -> Result<Tokens> {
        ensure!(ids.dim() == 2, "token rows must be a [N, T] tensor, got shape {:?}", ids.size());
        ensure!(ids.size().iter().all(|&d| d > 0), "token rows {:?} are empty: need at least one row of one token", ids.size());
        let ids = ids.to_kind(Kind::Int64).to_device(tch::Device::Cpu).contiguous();
        let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        ensure!(min >= 0 && max <= u32::MAX as i64, "token ids must lie in 0..2^32, found {min}..={max}");
        Ok(Tokens::new(Store::Rows(ids), Some(max as u32)))
    }

    fn new(store: Store, max_id: Option<u32>) -> Tokens {
        let cell = OnceLock::new();
        if let Some(m) = max_id {
            let _ = cell.set(m);
        }
        Tokens { store, max_id: cell, permutation: Mutex::new(None) }
    }

    /// Total token count (N*T for a tensor).
    pub fn tokens(&self) -> usize {
        match &self.store {
            Store::Stream(s) => s.len,
            Store::Rows(t) => t.numel(),
        }
    }

    /// The largest id: the trainer checks it against the model's vocabulary.
    pub fn max_id(&self) -> u32 {
        *self.max_id.get_or_init(|| match &self.store {
            Store::Stream(s) => (0..s.len).map(|i| s.id(i)).max().unwrap_or(0),
            Store::Rows(t) => t.max().int64_value(&[]) as u32,
        })
    }

    /// `[batch, seq]` int64 ids for training step `step`: a pure function of its arguments, so a resumed run
    /// sees exactly the batches it would have seen. The windows are those `order` names.
    pub fn batch(&self, step: u64, batch: usize, seq: usize, seed: u64, shuffle: bool) -> Result<Tensor> {
        let order = self.order(step, batch, seq, seed, shuffle)?;
        match &self.store {
            Store::Stream(s) => {
                let mut out = Vec::with_capacity(batch * seq);
                for &start in &order {
                    s.push_window(start as usize, seq, &mut out);
                }
                Ok(Tensor::from_slice(&out).reshape([batch as i64, seq as i64]))
            }
            Store::Rows(t) => {
                let rows: Vec<i64> = order.iter().map(|&r| r as i64).collect();
                Ok(t.index_select(0, &Tensor::from_slice(&rows)).narrow(1, 0, seq as i64).contiguous())
            }
        }
    }

    /// Which windows step `step` trains on: their start offsets in a token file, or row ids of a tensor.
    /// - token file, shuffled: windows at random offsets drawn from ChaCha8 seeded by `seed`, stream `step`;
    /// - token file, in order: consecutive non-overlapping windows, wrapping at the end;
    /// - tensor rows, in order: rows `(step*batch + b) % N`, their first `seq` ids;
    /// - tensor rows, shuffled: the same walk through a seeded permutation of the rows, a new one each epoch.
    pub fn order(&self, step: u64, batch: usize, seq: usize, seed: u64, shuffle: bool) -> Result<Vec<u64>> {
        ensure!(batch > 0 && seq > 0, "a batch needs at least one row of one token (got batch {batch}, seq {seq})");
        let first = step.checked_mul(batch as u64).context("step * batch overflows")?;
        match &self.store {
            Store::Stream(s) => {
                self.fits(seq, WINDOW)?;
                if shuffle {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(step);
                    let starts = (s.len - seq + 1) as u64;
                    Ok((0..batch).map(|_| below(rng.next_u64(), starts)).collect())
                } else {
                    let windows = (s.len / seq) as u64;
                    Ok((0..batch as u64).map(|b| ((first + b) % windows) * seq as u64).collect())
                }
            }
            Store::Rows(t) => {
                self.fits(seq, WINDOW)?;
                let n = t.size()[0] as u64;
                let mut cache = self.permutation.lock().unwrap();
                let mut rows = Vec::with_capacity(batch);
                for g in first..first + batch as u64 {
                    let (epoch, pos) = (g / n, (g % n) as usize);
                    if !shuffle {
                        rows.push(pos as u64);
                        continue;
                    }
                    if cache.as_ref().is_none_or(|(key, _)| *key != (seed, epoch)) {
                        *cache = Some(((seed, epoch), permutation(n as usize, seed, epoch)));
                    }
                    rows.push(cache.as_ref().unwrap().1[pos] as u64);
                }
                Ok(rows)
            }
        }
    }

    /// Refuses windows of `seq` tokens that this data cannot give even once; `option` names how the user sets
    /// `seq` (`--seq`, `--eval-tokens`, …), so that the message says what to change.
    pub fn fits(&self, seq: usize, option: &str) -> Result<()> {
        match &self.store {
            Store::Stream(s) => ensure!(s.len >= seq, "the token file holds {} tokens, fewer than one window of {seq}: set {option} to {} or less, or give more text", s.len, s.len),
            Store::Rows(t) => {
                let width = t.size()[1] as usize;
                ensure!(seq <= width, "the token rows are {width} tokens long, shorter than windows of {seq}: set {option} to {width} or less");
            }
        }
        Ok(())
    }

    /// A token file (windows are cut from a stream), rather than tensor rows.
    pub fn is_stream(&self) -> bool {
        matches!(self.store, Store::Stream(_))
    }

    /// The `[N, T]` rows of tensor data.
    pub fn rows(&self) -> Result<Tensor> {
        match &self.store {
            Store::Rows(t) => Ok(t.shallow_clone()),
            Store::Stream(_) => bail!("token-file data has no rows"),
        }
    }

    /// Up to `max` consecutive non-overlapping `[n, seq]` windows from the start (for validation loss);
    /// tensor rows: the first `max` rows, their first `seq` ids.
    pub fn windows(&self, seq: usize, max: usize) -> Result<Tensor> {
        ensure!(seq > 0 && max > 0, "validation needs at least one window of one token (got seq {seq}, max {max})");
        match &self.store {
            Store::Stream(s) => {
                self.fits(seq, WINDOW)?;
                let n = (s.len / seq).min(max);
                let mut out = Vec::with_capacity(n * seq);
                for w in 0..n {
                    s.push_window(w * seq, seq, &mut out);
                }
                Ok(Tensor::from_slice(&out).reshape([n as i64, seq as i64]))
            }
            Store::Rows(t) => {
                self.fits(seq, WINDOW)?;
                let n = t.size()[0];
                // In usize: `max` may be usize::MAX ("all"), which is -1 as an i64.
                let keep = (n as usize).min(max) as i64;
                Ok(t.narrow(0, 0, keep).narrow(1, 0, seq as i64).contiguous())
            }
        }
    }
}

/// A permutation of `0..n`: Fisher-Yates on ChaCha8 seeded by `seed`, stream `stream`.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, below(rng.next_u64(), i as u64 + 1) as usize);
    }
    p
}

/// A uniform draw from `0..n` out of 64 random bits (multiply-shift: no modulo bias worth the name).
fn below(bits: u64, n: u64) -> u64 {
    ((bits as u128 * n as u128) >> 64) as u64
}

/// What `scalpel data tokenize` writes beside the token files.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Manifest {
    /// "llm.c": the token files' layout.
    pub format: String,
    pub dtype: TokenDtype,
    pub vocab_size: usize,
    pub tokenizer: TokenizerInfo,
    pub seed: u64,
    pub val_fraction: f64,
    pub sources: Vec<SourceInfo>,
    pub train: SplitInfo,
    pub val: Option<SplitInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TokenizerInfo {
    /// The model folder the tokenizer came from.
    pub model: PathBuf,
    pub name: String,
    /// sha256 of the folder's tokenizer.json (absent for the built-in GPT-2 BPE).
    pub tokenizer_json_sha256: Option<String>,
    /// The token written before every document, as llm.c does with GPT-2's <|endoftext|>.
    pub separator: String,
    pub separator_id: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SourceInfo {
    /// A fetched source's name, or the file or folder given.
    pub name: String,
    pub path: PathBuf,
    /// For a fetched source: the pinned package's sha256; else the sha256 of the documents read, in order.
    pub sha256: String,
    pub documents: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SplitInfo {
    pub file: String,
    pub documents: usize,
    pub tokens: usize,
    pub max_id: u32,
}

/// Training data and, when there is one, its validation split.
pub struct Dataset {
    pub train: Tokens,
    pub val: Option<Tokens>,
    /// For logs and record.json.
    pub source: String,
    /// Files read, for checksums in record.json.
    pub files: Vec<PathBuf>,
    /// The tokenizer that made the ids, when a manifest says (a bare token file does not).
    pub tokenizer: Option<TokenizerInfo>,
}

impl Dataset {
    /// Refuses ids made by another tokenizer than `model`'s: its separator must be the same token at the same id.
    /// A model with no tokenizer of its own has nothing to compare with. The vocabulary-size check alone let data of
    /// a smaller vocabulary (SmolLM2's, on a Qwen model) train on tokens that mean other words.
    pub fn check_tokenizer(&self, data: &Path, model: &Path, family: &str) -> Result<()> {
        let (Some(info), Ok(tokenizer)) = (&self.tokenizer, crate::model::tokenizer::Tokenizer::for_model(model, family)) else { return Ok(()) };
        let id = match &tokenizer {
            crate::model::tokenizer::Tokenizer::Hf(t) => t.token_to_id(&info.separator),
            crate::model::tokenizer::Tokenizer::Gpt2(_) => (info.separator == "<|endoftext|>").then_some(50256),
        };
        if id == Some(info.separator_id) {
            return Ok(());
        }
        let theirs = id.map_or("has no such token".to_string(), |i| format!("has it as id {i}"));
        bail!(
            "{} was tokenized with the tokenizer of {} ({} is id {}), and {}'s tokenizer {theirs}: the ids would mean other tokens. Tokenize the text again for this model: scalpel data tokenize SOURCES --tokenizer {} -o DIR",
            data.display(),
            info.model.display(),
            info.separator,
            info.separator_id,
            model.display(),
            model.display()
        );
    }
}

impl Dataset {
    /// A tokenized folder (manifest.json + train.bin [+ val.bin]), a single llm.c .bin file (train only), or an
    /// integer [N, T] tensor as .safetensors/.npy (train only).
    pub fn open(path: &Path) -> Result<Dataset> {
        if path.is_dir() {
            return Self::open_folder(path);
        }
        ensure!(path.exists(), "{} does not exist: pass a folder from `scalpel data tokenize`, an llm.c .bin file, or a [N, T] .safetensors/.npy", path.display());
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let train = match ext {
            "bin" => Tokens::open_bin(path)?,
            "safetensors" | "npy" => Tokens::from_rows(crate::calib::read_token_ids(path)?).with_context(|| format!("reading {}", path.display()))?,
            _ => bail!("{}: unknown data (.{ext}); expected a folder from `scalpel data tokenize`, an llm.c .bin file, or a [N, T] .safetensors/.npy (for text, run `scalpel data tokenize` first)", path.display()),
        };
        let source = match &train.store {
            Store::Stream(s) => format!("{} {} tokens from {}", s.len, s.dtype.name(), path.display()),
            Store::Rows(t) => format!("token rows {:?} from {}", t.size(), path.display()),
        };
        Ok(Dataset { train, val: None, source, files: vec![path.to_path_buf()], tokenizer: None })
    }

    fn open_folder(dir: &Path) -> Result<Dataset> {
        let file = dir.join("manifest.json");
        let text = scalpel_files::read_regular_string(&file).with_context(|| format!("{} has no manifest.json: is it a folder from `scalpel data tokenize`?", dir.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("{} is not a scalpel data manifest", file.display()))?;
        let open = |split: &SplitInfo| -> Result<(Tokens, PathBuf)> {
            // The token files live inside the folder: a name that climbs out of it or is absolute is refused.
            ensure!(
                scalpel_files::names_a_file_inside(&split.file),
                "{}'s manifest.json names the token file `{}`, which is not a file inside that folder",
                dir.display(),
                split.file
            );
            let path = dir.join(&split.file);
            let t = Tokens::open_bin(&path)?;
            let Store::Stream(s) = &t.store else { unreachable!() };
            ensure!(s.dtype == m.dtype && s.len == split.tokens, "{} holds {} {} tokens, its manifest says {} {}: re-create the folder with `scalpel data tokenize`", path.display(), s.len, s.dtype.name(), split.tokens, m.dtype.name());
            // The vocabulary check rests on the largest id: scanned, not taken on the manifest's word (a wrong
            // one let an id past the vocabulary into the forward pass, a libtorch crash).
            ensure!(t.max_id() == split.max_id, "{} holds ids up to {}, its manifest says {}: re-create the folder with `scalpel data tokenize`", path.display(), t.max_id(), split.max_id);
            Ok((t, path))
        };
        let (train, train_file) = open(&m.train)?;
        let mut files = vec![file, train_file];
        let val = match &m.val {
            Some(v) => {
                let (t, f) = open(v)?;
                files.push(f);
                Some(t)
            }
            None => None,
        };
        let names: Vec<&str> = m.sources.iter().map(|s| s.name.as_str()).collect();
        let source = format!("{} ({}; {} train + {} val tokens, {})", dir.display(), names.join(", "), m.train.tokens, m.val.as_ref().map_or(0, |v| v.tokens), m.tokenizer.name);
        Ok(Dataset { train, val, source, files, tokenizer: Some(m.tokenizer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(t: &Tensor) -> Vec<Vec<i64>> {
        Vec::<Vec<i64>>::try_from(t).unwrap()
    }

    fn file(dir: &Path, name: &str, ids: &[u32], dtype: TokenDtype) -> PathBuf {
        let p = dir.join(name);
        write_token_file(&p, ids, dtype).unwrap();
        p
    }

    #[test]
    fn token_files_round_trip_in_both_widths() {
        let dir = tempfile::tempdir().unwrap();
        let small: Vec<u32> = (0..100).map(|i| i * 600).collect();
        let t = Tokens::open_bin(&file(dir.path(), "a.bin", &small, TokenDtype::Uint16)).unwrap();
        assert_eq!((t.tokens(), t.max_id()), (100, 59400));
        assert_eq!(ids(&t.windows(10, 100).unwrap())[3], (30..40).map(|i| i * 600).collect::<Vec<i64>>());
        let big: Vec<u32> = vec![5, 70000, 151935, 0];
        let p = file(dir.path(), "b.bin", &big, TokenDtype::Uint32);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024 + 16);
        let t = Tokens::open_bin(&p).unwrap();
        assert_eq!((t.tokens(), t.max_id()), (4, 151935));
        assert_eq!(ids(&t.windows(4, 1).unwrap()), vec![vec![5, 70000, 151935, 0]]);
        // uint16 cannot hold a Llama-3-sized id
        assert!(write_token_file(&dir.path().join("c.bin"), &big, TokenDtype::Uint16).unwrap_err().to_string().contains("does not fit uint16"));
        assert_eq!(TokenDtype::for_vocab(50257), TokenDtype::Uint16);
        assert_eq!(TokenDtype::for_vocab(65536), TokenDtype::Uint16);
        assert_eq!(TokenDtype::for_vocab(65537), TokenDtype::Uint32);
    }

    #[test]
    fn data_too_short_for_one_window_names_the_option_the_caller_gave() {
        // compare sets the window as `--heal-set seq=`: a hint naming `--seq` sent its users to a flag it has not.
        let dir = tempfile::tempdir().unwrap();
        let stream = Tokens::open_bin(&file(dir.path(), "a.bin", &[1, 2, 3, 4, 5], TokenDtype::Uint16)).unwrap();
        let rows = Tokens::from_rows(Tensor::zeros([2, 4], (Kind::Int64, tch::Device::Cpu))).unwrap();
        assert!(stream.fits(5, "--seq").is_ok() && rows.fits(4, "--seq").is_ok());
        let e = stream.fits(6, "--heal-set seq").unwrap_err().to_string();
        assert!(e.contains("holds 5 tokens") && e.contains("set --heal-set seq to 5 or less") && !e.contains("--seq"), "{e}");
        let e = rows.fits(8, "--eval-tokens").unwrap_err().to_string();
        assert!(e.contains("4 tokens long") && e.contains("set --eval-tokens to 4 or less") && !e.contains("--seq"), "{e}");
    }

    #[test]
    fn all_windows_of_token_rows_is_every_row() {
        // `eval --windows 0` asks for all of them (usize::MAX): once a panic in libtorch's narrow.
        let t = Tokens::from_rows(Tensor::arange(12, (Kind::Int64, tch::Device::Cpu)).reshape([3, 4])).unwrap();
        assert_eq!(ids(&t.windows(2, usize::MAX).unwrap()), vec![vec![0, 1], vec![4, 5], vec![8, 9]]);
        assert_eq!(ids(&t.windows(4, 2).unwrap()).len(), 2);
    }

    #[test]
    fn the_header_is_llm_cs() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(file(dir.path(), "a.bin", &[1, 2, 3], TokenDtype::Uint16)).unwrap();
        let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!((int(0), int(1), int(2)), (20240520, 1, 3));
        assert!((3..256).all(|i| int(i) == 0));
        assert_eq!(&bytes[1024..], &[1, 0, 2, 0, 3, 0]);
        let bytes = std::fs::read(file(dir.path(), "b.bin", &[1], TokenDtype::Uint32)).unwrap();
        assert_eq!((i32::from_le_bytes(bytes[0..4].try_into().unwrap()), i32::from_le_bytes(bytes[4..8].try_into().unwrap())), (20240801, 7));
    }

    #[test]
    fn damaged_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "a.bin", &(0..50).collect::<Vec<u32>>(), TokenDtype::Uint16);
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 3]).unwrap();
        let err = Tokens::open_bin(&p).err().unwrap().to_string();
        assert!(err.contains("truncated") && err.contains("promises 50 tokens"), "{err}");
        std::fs::write(&p, &full[..100]).unwrap();
        assert!(Tokens::open_bin(&p).err().unwrap().to_string().contains("shorter than an llm.c header"));
        let mut wrong = full.clone();
        wrong[0] ^= 1;
        std::fs::write(&p, &wrong).unwrap();
        assert!(Tokens::open_bin(&p).err().unwrap().to_string().contains("not an llm.c token file"));
        let mut empty = full[..1024].to_vec();
        empty[8..12].copy_from_slice(&0i32.to_le_bytes());
        std::fs::write(&p, &empty).unwrap();
        assert!(Tokens::open_bin(&p).err().unwrap().to_string().contains("holds no tokens"));
        assert!(write_token_file(&p, &[], TokenDtype::Uint16).is_err());
        // A FIFO is refused at once instead of blocking until a writer comes.
        let fifo = dir.path().join("fifo.bin");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = format!("{:#}", Tokens::open_bin(&fifo).err().unwrap());
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn batches_are_a_pure_function_of_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "a.bin", &(0..1000).collect::<Vec<u32>>(), TokenDtype::Uint16);
        let (a, b) = (Tokens::open_bin(&p).unwrap(), Tokens::open_bin(&p).unwrap());
        // A resumed run opens the file anew and asks for step 7 first: it must get what the first run got.
        let first = ids(&a.batch(7, 4, 16, 42, true).unwrap());
        for step in [0, 3, 7] {
            let _ = b.batch(step, 4, 16, 42, true).unwrap();
        }
        assert_eq!(first, ids(&b.batch(7, 4, 16, 42, true).unwrap()));
        assert_ne!(first, ids(&a.batch(8, 4, 16, 42, true).unwrap()));
        assert_ne!(first, ids(&a.batch(7, 4, 16, 43, true).unwrap()));
        for row in &first {
            assert_eq!(row.len(), 16);
            assert!(row.windows(2).all(|w| w[1] == w[0] + 1), "a window is consecutive tokens: {row:?}");
        }
        // In order: consecutive windows, wrapping after the last whole one (1000 / 300 = 3 windows).
        assert_eq!(ids(&a.batch(0, 2, 300, 0, false).unwrap()).iter().map(|r| r[0]).collect::<Vec<_>>(), vec![0, 300]);
        assert_eq!(ids(&a.batch(1, 2, 300, 0, false).unwrap()).iter().map(|r| r[0]).collect::<Vec<_>>(), vec![600, 0]);
        assert!(a.batch(0, 1, 1001, 0, true).is_err());
    }

    #[test]
    fn tensor_rows_keep_their_order_unless_shuffled() {
        let rows = Tensor::arange(5 * 4, (Kind::Int64, tch::Device::Cpu)).reshape([5, 4]);
        let t = Tokens::from_rows(rows).unwrap();
        assert_eq!((t.tokens(), t.max_id()), (20, 19));
        assert_eq!(ids(&t.batch(0, 2, 4, 0, false).unwrap()), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        // Step 2 of batch 2 takes rows 4 and 0 (wrapping), their first 3 ids.
        assert_eq!(ids(&t.batch(2, 2, 3, 0, false).unwrap()), vec![vec![16, 17, 18], vec![0, 1, 2]]);
        assert!(t.batch(0, 1, 5, 0, false).unwrap_err().to_string().contains("shorter than windows of 5: set the window length to 4 or less"));
        // Shuffled: each epoch (5 rows) visits every row once, in an order that depends on the seed and epoch.
        let epoch = |e: u64, seed: u64| -> Vec<i64> { (0..5).map(|s| ids(&t.batch(e * 5 + s, 1, 1, seed, true).unwrap())[0][0] / 4).collect() };
        let mut seen = epoch(0, 1);
        assert_eq!(seen, epoch(0, 1));
        assert!(seen != epoch(1, 1) || seen != epoch(2, 1));
        assert!(seen != epoch(0, 2) || seen != epoch(0, 3), "the seed changes the order");
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(ids(&t.windows(2, 3).unwrap()), vec![vec![0, 1], vec![4, 5], vec![8, 9]]);
    }

    #[test]
    fn a_tensor_file_is_train_rows_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ids.npy");
        Tensor::arange(6, (Kind::Int64, tch::Device::Cpu)).reshape([3, 2]).write_npy(&p).unwrap();
        let d = Dataset::open(&p).unwrap();
        assert!(d.val.is_none() && d.source.contains("[3, 2]"));
        assert_eq!(ids(&d.train.batch(1, 2, 2, 0, false).unwrap()), vec![vec![4, 5], vec![0, 1]]);
        let text = dir.path().join("book.txt");
        std::fs::write(&text, "words").unwrap();
        assert!(Dataset::open(&text).err().unwrap().to_string().contains("scalpel data tokenize"));
    }

    #[test]
    fn a_tokenized_folder_opens_with_both_splits() {
        let dir = tempfile::tempdir().unwrap();
        file(dir.path(), "train.bin", &[1, 2, 3, 4], TokenDtype::Uint16);
        file(dir.path(), "val.bin", &[9, 8], TokenDtype::Uint16);
        let split = |file: &str, tokens, max_id| SplitInfo { file: file.into(), documents: 1, tokens, max_id };
        let m = Manifest {
            format: "llm.c".into(),
            dtype: TokenDtype::Uint16,
            vocab_size: 10,
            tokenizer: TokenizerInfo { model: "m".into(), name: "t".into(), tokenizer_json_sha256: None, separator: "<s>".into(), separator_id: 1 },
            seed: 0,
            val_fraction: 0.5,
            sources: vec![SourceInfo { name: "x".into(), path: "x".into(), sha256: "0".into(), documents: 2 }],
            train: split("train.bin", 4, 4),
            val: Some(split("val.bin", 2, 9)),
        };
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_string(&m).unwrap()).unwrap();
        let d = Dataset::open(dir.path()).unwrap();
        assert_eq!((d.train.tokens(), d.val.as_ref().unwrap().max_id(), d.files.len()), (4, 9, 3));
        // A manifest that disagrees with its files is caught.
        let mut bad = m.clone();
        bad.train.tokens = 5;
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_string(&bad).unwrap()).unwrap();
        assert!(Dataset::open(dir.path()).err().unwrap().to_string().contains("its manifest says 5"));
        // A manifest that understates the largest id, or names a file outside its folder, is caught.
        let mut bad = m.clone();
        bad.val.as_mut().unwrap().max_id = 3;
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_string(&bad).unwrap()).unwrap();
        let err = Dataset::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("holds ids up to 9, its manifest says 3"), "{err}");
        let outside = tempfile::tempdir().unwrap();
        file(outside.path(), "train.bin", &[1, 2, 3, 4], TokenDtype::Uint16);
        for name in [format!("../{}/train.bin", outside.path().file_name().unwrap().to_string_lossy()), outside.path().join("train.bin").display().to_string(), String::new()] {
            let mut bad = m.clone();
            bad.train.file = name.clone();
            std::fs::write(dir.path().join("manifest.json"), serde_json::to_string(&bad).unwrap()).unwrap();
            let err = Dataset::open(dir.path()).err().unwrap().to_string();
            assert!(err.contains("not a file inside"), "{name}: {err}");
        }
        // A lone .bin is train only.
        let d = Dataset::open(&dir.path().join("val.bin")).unwrap();
        assert!(d.val.is_none() && d.train.tokens() == 2);
    }
}
