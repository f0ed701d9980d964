//! Calibration windows: N random windows of T tokens from a text file (seeded), or an explicit
//! `[N, T]` tensor of token ids (safetensors or `.npy`) so that anyone can reproduce a run exactly.

use crate::model::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

pub struct Windows {
    /// `[N, T]` int64 token ids, on the CPU.
    pub ids: Tensor,
    /// Where they came from, for the record.
    pub source: String,
}

/// At most this many sampled calibration tokens (2^28: a thousand times the usual 128 × 2048; 2 GiB of ids).
const MAX_CALIBRATION_TOKENS: usize = 1 << 28;

/// Windows sampled from text when -n / `sequences` is not given, and their tokens when -t / `tokens` is not.
const DEFAULT_WINDOWS: usize = 100;
const DEFAULT_TOKENS: usize = 100;

pub struct Sampling {
    /// N, when given: windows sampled from text, or the first N rows of `[N, T]` token ids (none: all of them).
    pub sequences: Option<usize>,
    /// T, when given: tokens per sampled window, or the first T of each row of token ids (none: all of them).
    pub tokens: Option<usize>,
    pub seed: u64,
    /// Prepend the tokenizer's BOS token to every window (the paper does not).
    pub bos: bool,
}

impl Sampling {
    /// N and T of windows drawn from a stream of tokens: as given, else 100 × 100.
    pub fn windows_and_tokens(&self) -> (usize, usize) {
        (self.sequences.unwrap_or(DEFAULT_WINDOWS), self.tokens.unwrap_or(DEFAULT_TOKENS))
    }
}

impl Windows {
    /// Token files are used as they are; text is tokenized with the model's tokenizer (made only then).
    pub fn load(path: &Path, tokenizer: impl FnOnce() -> Result<Tokenizer>, vocab: usize, s: &Sampling) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let w = match ext {
            "safetensors" | "npy" => Self::from_tensor_file(path, s)?,
            _ => Self::from_text(path, &tokenizer()?, s)?,
        };
        let max = w.ids.max().int64_value(&[]);
        if w.ids.min().int64_value(&[]) < 0 || max as usize >= vocab {
            bail!("{}: token ids must lie in 0..{vocab} (the model's vocabulary), found up to {max}", path.display());
        }
        Ok(w)
    }

    fn from_text(path: &Path, tokenizer: &Tokenizer, s: &Sampling) -> Result<Self> {
        let (sequences, tokens) = s.windows_and_tokens();
        if sequences == 0 || tokens < 2 {
            bail!("calibration needs at least one window of at least 2 tokens (got N={sequences}, T={tokens})");
        }
        // Sampled windows are held whole, as int64 ids and then activations: past this the allocation aborts.
        if sequences.checked_mul(tokens).is_none_or(|n| n > MAX_CALIBRATION_TOKENS) {
            bail!("calibration of N={sequences} windows × T={tokens} tokens is more than scalpel samples (at most {MAX_CALIBRATION_TOKENS} tokens): lower -n or -t");
        }
        let text = scalpel_files::read_regular_string(path).with_context(|| format!("reading calibration text {}", path.display()))?;
        let ids = tokenizer.encode(&text)?;
        let body = tokens - usize::from(s.bos);
        if ids.len() < body + 1 {
            bail!("{} has {} tokens: too short for windows of {tokens} tokens", path.display(), ids.len());
        }
        let all = Tensor::from_slice(&ids);
        tch::manual_seed(s.seed as i64);
        let starts = Tensor::randint((ids.len() - body + 1) as i64, [sequences as i64], (Kind::Int64, tch::Device::Cpu));
        let offsets = Tensor::arange(body as i64, (Kind::Int64, tch::Device::Cpu));
        let mut windows = all.index_select(0, &(starts.unsqueeze(1) + offsets.unsqueeze(0)).flatten(0, 1)).reshape([sequences as i64, body as i64]);
        if s.bos {
            let bos = tokenizer.bos().context("--bos was asked for, but the tokenizer has no BOS token")?;
            windows = Tensor::cat(&[Tensor::full([sequences as i64, 1], bos, (Kind::Int64, tch::Device::Cpu)), windows], 1);
        }
        let source = format!("{sequences} windows of {tokens} tokens from {} (seed {}{})", path.display(), s.seed, if s.bos { ", BOS" } else { "" });
        Ok(Windows { ids: windows, source })
    }

    /// The file's `[N, T]` ids, or the first -n rows and -t tokens of each when those are given: asked for
    /// and not used, they once went unnoticed.
    fn from_tensor_file(path: &Path, s: &Sampling) -> Result<Self> {
        if s.bos {
            bail!("--bos prepends BOS to windows sampled from text; {} holds token ids, used as they are: leave --bos out, or put the BOS id first in each row", path.display());
        }
        let ids = read_token_ids(path)?;
        let (n, t) = (ids.size()[0] as usize, ids.size()[1] as usize);
        let (want_n, want_t) = (s.sequences.unwrap_or(n), s.tokens.unwrap_or(t));
        if want_n == 0 || want_t == 0 {
            bail!("calibration needs at least one window of at least one token (got -n {want_n}, -t {want_t})");
        }
        if want_n > n || want_t > t {
            bail!(
                "{} holds {n} windows of {t} tokens, fewer than the {want_n} windows of {want_t} asked for (-n, -t; `sequences`, `tokens` in a recipe): ask for at most -n {n} -t {t}, or leave them out to use the whole file",
                path.display()
            );
        }
        if (want_n, want_t) == (n, t) {
            let source = format!("token ids {:?} from {}", ids.size(), path.display());
            return Ok(Windows { ids, source });
        }
        eprintln!("note: calibrating on the first {want_n} of the {n} windows in {}, their first {want_t} of {t} tokens (-n, -t)", path.display());
        let ids = ids.narrow(0, 0, want_n as i64).narrow(1, 0, want_t as i64).contiguous();
        let source = format!("token ids {:?}, the first of [{n}, {t}], from {}", ids.size(), path.display());
        Ok(Windows { ids, source })
    }
}

/// Token ids from a `.npy` or `.safetensors` file: an int64 `[N, T]` tensor with N, T > 0.
/// Every length is checked against the bytes present before libtorch sees any of them.
pub fn read_token_ids(path: &Path) -> Result<Tensor> {
    token_ids_from_bytes(&scalpel_files::read_regular(path)?, path)
}

/// [`read_token_ids`] on bytes already read; `path` names them in messages, and its extension picks the format.
pub fn token_ids_from_bytes(bytes: &[u8], path: &Path) -> Result<Tensor> {
    let ids = if path.extension().is_some_and(|e| e == "npy") {
        let (shape, values) = npy::parse(bytes).with_context(|| format!("{} is not a usable .npy file", path.display()))?;
        // Checked before libtorch sees the shape: it refuses (with a panic in tch) dims whose product
        // overflows even when another dim is 0, as in (9992, 99999999999993, 0, 914086625) (found by fuzzing).
        if shape.len() != 2 {
            bail!("{} must hold token ids of shape [N, T]; it holds shape {shape:?}", path.display());
        }
        let shape: Vec<i64> = shape.iter().map(|&d| i64::try_from(d)).collect::<Result<_, _>>().context("its shape overflows")?;
        Tensor::from_slice(&values).f_reshape(shape)?
    } else {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file (truncated or corrupt?): {e}", path.display()))?;
        let names = st.names();
        let name = match names.as_slice() {
            [one] => one.to_string(),
            _ if names.iter().any(|n| *n == "input_ids") => "input_ids".to_string(),
            _ => bail!("{} holds {} tensors and none is called `input_ids`", path.display(), names.len()),
        };
        let view = st.tensor(&name)?;
        let kind = match view.dtype() {
            safetensors::Dtype::I64 => Kind::Int64,
            safetensors::Dtype::I32 => Kind::Int,
            safetensors::Dtype::I16 => Kind::Int16,
            safetensors::Dtype::U8 => Kind::Uint8,
            other => bail!("{} must hold an integer tensor of shape [N, T]; `{name}` is {other:?}", path.display()),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        // The safetensors crate has checked that the data length matches dtype and shape.
        Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Int64)
    };
    if ids.dim() != 2 {
        bail!("{} must hold token ids of shape [N, T]; it holds shape {:?}", path.display(), ids.size());
    }
    if ids.size().iter().any(|&d| d == 0) {
        bail!("{} holds an empty tensor {:?}: calibration needs at least one window of at least one token", path.display(), ids.size());
    }
    Ok(ids)
}

/// NumPy's `.npy` format (versions 1 to 3), integer arrays only. Parsed here, not by libtorch, so a
/// short or lying file is an error instead of a crash or a read past the buffer.
mod npy {
    use anyhow::{bail, ensure, Context, Result};

    const MAGIC: &[u8] = b"\x93NUMPY";

    /// The shape and the values (as i64) of a little-endian, C-order integer array.
    pub fn parse(bytes: &[u8]) -> Result<(Vec<usize>, Vec<i64>)> {
        ensure!(bytes.len() >= 10 && bytes.starts_with(MAGIC), "it does not start with the .npy magic bytes");
        let (header_len, start) = match bytes[6] {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
            2 | 3 => {
                ensure!(bytes.len() >= 12, "its header is truncated");
                (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12)
            }
            v => bail!("format version {v} is not one NumPy writes (1, 2 or 3)"),
        };
        let header = bytes.get(start..start.saturating_add(header_len)).context("its header is truncated")?;
        let header = std::str::from_utf8(header).context("its header is not text")?;
        let dict = Dict::parse(header)?;
        let descr = dict.string("descr")?;
        ensure!(!dict.boolean("fortran_order")?, "it is stored in Fortran order; save it with numpy.ascontiguousarray");
        let shape = dict.shape()?;
        // The split below is by bytes: a non-ASCII descr would cut a character (found by fuzzing).
        ensure!(descr.is_ascii(), "unknown dtype `{descr}`");
        let (order, kind, size) = (&descr[..descr.len().min(1)], &descr[descr.len().min(1)..descr.len().min(2)], &descr[descr.len().min(2)..]);
        let size: usize = size.parse().ok().with_context(|| format!("unknown dtype `{descr}`"))?;
        ensure!(
            matches!(kind, "i" | "u") && matches!(size, 1 | 2 | 4 | 8),
            "its dtype `{descr}` is not an integer type: token ids are integers (e.g. numpy.int64)"
        );
        ensure!(order == "<" || order == "|" || (order == "=" && cfg!(target_endian = "little")), "its dtype `{descr}` is not little-endian");
        let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).context("its shape overflows")?;
        let need = numel.checked_mul(size).context("its shape overflows")?;
        let data = &bytes[start + header_len..];
        ensure!(
            data.len() == need,
            "its header says shape {shape:?} of `{descr}` ({need} bytes), but {} bytes of data follow (truncated or corrupt?)",
            data.len()
        );
        let values = data
            .chunks_exact(size)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..size].copy_from_slice(c);
                // Sign-extend signed types narrower than 8 bytes.
                let v = u64::from_le_bytes(b);
                if kind == "i" && size < 8 {
                    let shift = 64 - 8 * size as u32;
                    Ok(((v << shift) as i64) >> shift)
                } else {
                    i64::try_from(v).ok().context("a token id does not fit in 64-bit signed integers")
                }
            })
            .collect::<Result<Vec<i64>>>()?;
        Ok((shape, values))
    }

    /// The header: a Python dict literal with string keys, e.g.
    /// `{'descr': '<i8', 'fortran_order': False, 'shape': (3, 4), }`.
    struct Dict<'a>(Vec<(&'a str, &'a str)>);

    impl<'a> Dict<'a> {
        fn parse(text: &'a str) -> Result<Self> {
            let body = text.trim().strip_prefix('{').and_then(|t| t.strip_suffix('}')).context("its header is not a dictionary")?;
            let mut entries = Vec::new();
            let mut rest = body.trim_start();
            while !rest.is_empty() {
                let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"').context("a header key is not a string")?;
                let end = rest[1..].find(quote).context("a header key is not closed")? + 1;
                let key = &rest[1..end];
                rest = rest[end + 1..].trim_start().strip_prefix(':').context("a header key has no value")?.trim_start();
                // A value ends at the first comma outside brackets and quotes.
                let (mut depth, mut in_str, mut cut) = (0i32, None, rest.len());
                for (i, c) in rest.char_indices() {
                    match (c, in_str) {
                        ('\'' | '"', None) => in_str = Some(c),
                        (c, Some(q)) if c == q => in_str = None,
                        (_, Some(_)) => {}
                        ('(' | '[', None) => depth += 1,
                        (')' | ']', None) => depth -= 1,
                        (',', None) if depth == 0 => {
                            cut = i;
                            break;
                        }
                        _ => {}
                    }
                }
                entries.push((key, rest[..cut].trim()));
                rest = rest[cut..].strip_prefix(',').unwrap_or(&rest[cut..]).trim_start();
            }
            Ok(Dict(entries))
        }

        fn get(&self, key: &str) -> Result<&'a str> {
            self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v).with_context(|| format!("its header has no `{key}`"))
        }

        fn string(&self, key: &str) -> Result<&'a str> {
            let v = self.get(key)?;
            v.strip_prefix(['\'', '"'])
                .and_then(|v| v.strip_suffix(['\'', '"']))
                .with_context(|| format!("its header's `{key}` is `{v}`, not a string (structured dtypes are not token ids)"))
        }

        fn boolean(&self, key: &str) -> Result<bool> {
            match self.get(key)? {
                "True" => Ok(true),
                "False" => Ok(false),
                v => bail!("its header's `{key}` is `{v}`, not True or False"),
            }
        }

        fn shape(&self) -> Result<Vec<usize>> {
            let v = self.get("shape")?;
            let inner = v.strip_prefix('(').and_then(|v| v.strip_suffix(')')).with_context(|| format!("its header's shape `{v}` is not a tuple"))?;
            inner
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| d.parse::<usize>().ok().with_context(|| format!("its header's shape `{v}` holds `{d}`, not a size")))
                .collect()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A version-1 .npy file as NumPy writes it.
        fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
            let mut header = format!("{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}", if fortran { "True" } else { "False" });
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut out = MAGIC.to_vec();
            out.extend([1, 0]);
            out.extend((header.len() as u16).to_le_bytes());
            out.extend(header.as_bytes());
            out.extend(data);
            out
        }

        fn le<T: Copy, const N: usize>(values: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            values.iter().flat_map(|&v| f(v)).collect()
        }

        #[test]
        fn integer_arrays_of_every_width_read_back() {
            let (shape, v) = parse(&npy("<i8", false, "(2, 3)", &le(&[0i64, 1, 2, 3, 4, 50_000], i64::to_le_bytes))).unwrap();
            assert_eq!((shape, v), (vec![2, 3], vec![0, 1, 2, 3, 4, 50_000]));
            assert_eq!(parse(&npy("<i4", false, "(1, 2)", &le(&[7i32, -1], i32::to_le_bytes))).unwrap().1, vec![7, -1]);
            assert_eq!(parse(&npy("<u2", false, "(1, 2)", &le(&[65535u16, 3], u16::to_le_bytes))).unwrap().1, vec![65535, 3]);
            assert_eq!(parse(&npy("|u1", false, "(2, 1)", &[200, 4])).unwrap().1, vec![200, 4]);
            assert_eq!(parse(&npy("|i1", false, "(1, 1)", &[0xff])).unwrap().1, vec![-1]);
        }

        #[test]
        fn short_or_long_data_is_refused_before_reading() {
            let full = le(&[1i64, 2, 3, 4], i64::to_le_bytes);
            let e = parse(&npy("<i8", false, "(2, 2)", &full[..31])).unwrap_err().to_string();
            assert!(e.contains("(32 bytes)") && e.contains("31 bytes of data"), "{e}");
            // A header that claims a huge shape must not allocate or read anything.
            let e = parse(&npy("<i8", false, "(1000000000000, 1000000)", &full)).unwrap_err().to_string();
            assert!(e.contains("overflows") || e.contains("bytes of data"), "{e}");
            assert!(parse(&npy("<i8", false, "(1, 4)", &[full.clone(), vec![0]].concat())).is_err());
        }

        #[test]
        fn unusable_layouts_and_types_are_refused_by_name() {
            let d = le(&[1i64, 2], i64::to_le_bytes);
            assert!(parse(&npy("<i8", true, "(1, 2)", &d)).unwrap_err().to_string().contains("Fortran"));
            assert!(parse(&npy(">i8", false, "(1, 2)", &d)).unwrap_err().to_string().contains("little-endian"));
            assert!(parse(&npy("<f8", false, "(1, 2)", &d)).unwrap_err().to_string().contains("not an integer"));
            assert!(parse(&npy("<u8", false, "(1, 1)", &u64::MAX.to_le_bytes())).unwrap_err().to_string().contains("64-bit"));
            assert!(parse(b"\x93NUMPY\x01\x00\xff\xff{").unwrap_err().to_string().contains("truncated"));
            assert!(parse(b"PK\x03\x04 not npy").unwrap_err().to_string().contains("magic"));
            // host/fuzz/regressions/npy: a dtype whose first character is not ASCII panicked on a byte slice.
            assert!(parse(&npy("\u{216}8", false, "(1, 2)", &d)).unwrap_err().to_string().contains("unknown dtype"));
        }

        #[test]
        fn empty_arrays_with_huge_dims_are_refused_without_a_panic() {
            // host/fuzz/regressions/npy: zero elements, but dims whose product overflows; libtorch's reshape panicked.
            let bytes = npy("<i8", false, "(9992, 99999999999993, 0, 914086625, 0, 2)", &[]);
            let e = super::super::token_ids_from_bytes(&bytes, std::path::Path::new("ids.npy")).unwrap_err().to_string();
            assert!(e.contains("shape [N, T]"), "{e}");
            let e = super::super::token_ids_from_bytes(&npy("<i8", false, "(0, 99999999999993)", &[]), std::path::Path::new("ids.npy")).unwrap_err().to_string();
            assert!(e.contains("empty"), "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_give_the_first_n_windows_of_t_tokens_asked_for() {
        // -n and -t were silently ignored for a token-id file: the whole [N, T] file calibrated.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.safetensors");
        let ids = Tensor::arange(15, (Kind::Int64, tch::Device::Cpu)).reshape([3, 5]);
        Tensor::write_safetensors(&[("input_ids", &ids)], &path).unwrap();
        let text = || bail!("a token-id file needs no tokenizer");
        let load = |sequences, tokens| Windows::load(&path, text, 100, &Sampling { sequences, tokens, seed: 0, bos: false });
        assert_eq!(load(None, None).unwrap().ids.size(), [3, 5], "not asked: the whole file");
        let w = load(Some(2), Some(4)).unwrap();
        assert_eq!(Vec::<Vec<i64>>::try_from(&w.ids).unwrap(), vec![vec![0, 1, 2, 3], vec![5, 6, 7, 8]]);
        assert!(w.source.contains("the first of [3, 5]"), "{}", w.source);
        assert_eq!(load(Some(3), None).unwrap().ids.size(), [3, 5]);
        for (n, t) in [(Some(4), None), (None, Some(6))] {
            let e = load(n, t).err().unwrap().to_string();
            assert!(e.contains("holds 3 windows of 5 tokens") && e.contains("at most -n 3 -t 5"), "{e}");
        }
        assert!(load(Some(0), None).err().unwrap().to_string().contains("at least one window"));
        // --bos was silently ignored too: the ids are used as they are, so it is refused.
        let e = Windows::load(&path, text, 100, &Sampling { sequences: None, tokens: None, seed: 0, bos: true }).err().unwrap().to_string();
        assert!(e.contains("--bos") && e.contains("leave --bos out"), "{e}");
    }

    #[test]
    fn absurd_window_counts_are_refused_before_any_allocation() {
        // -n 100000000000 once panicked in libtorch on an 800 GB allocation; usize::MAX wrapped to a negative size.
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("a.txt");
        std::fs::write(&text, "one two three four five six seven eight nine ten").unwrap();
        let gpt2 = || Ok(Tokenizer::Gpt2(tiktoken_rs::r50k_base()?));
        for (sequences, tokens) in [(100_000_000_000, 16), (usize::MAX, 2), (2, usize::MAX)] {
            let err = Windows::load(&text, gpt2, 50257, &Sampling { sequences: Some(sequences), tokens: Some(tokens), seed: 0, bos: false }).err().unwrap().to_string();
            assert!(err.contains("more than scalpel samples"), "{err}");
        }
        let w = Windows::load(&text, gpt2, 50257, &Sampling { sequences: Some(3), tokens: Some(4), seed: 0, bos: false }).unwrap();
        assert_eq!(w.ids.size(), [3, 4]);
    }
}
