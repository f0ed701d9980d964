//! Just enough of R's lazy-load databases (`*.rdb`) to read character vectors: R packages on Debian ship
//! their data sets this way (janeaustenr's novels among them).
//!
//! An `.rdb` is a run of blocks, each a big-endian uint32 (the uncompressed size) and a zlib stream; each block
//! holds one object in R's XDR serialization (`X\n`, format version 2 or 3, then the object).

use anyhow::{bail, ensure, Context, Result};
use flate2::{Decompress, FlushDecompress, Status};

const STRSXP: i32 = 16;
const CHARSXP: i32 = 9;
const LATIN1_MASK: i32 = 1 << 2;

/// Every object of the database, in file order; each must be a plain character vector (no attributes).
pub fn string_vectors(rdb: &[u8]) -> Result<Vec<Vec<String>>> {
    let mut objects = Vec::new();
    let mut pos = 0;
    while pos < rdb.len() {
        let size = rdb.get(pos..pos + 4).context("the .rdb ends inside a block header")?;
        let size = u32::from_be_bytes(size.try_into().unwrap()) as usize;
        let mut z = Decompress::new(true);
        let mut out = Vec::with_capacity(size);
        let status = z.decompress_vec(&rdb[pos + 4..], &mut out, FlushDecompress::Finish).context("a block of the .rdb is not zlib data (bzip2 and xz blocks are not supported)")?;
        ensure!(status == Status::StreamEnd && out.len() == size, "a block of the .rdb at byte {pos} is truncated");
        objects.push(unserialize_strings(&out).with_context(|| format!("the object at byte {pos} of the .rdb"))?);
        pos += 4 + z.total_in() as usize;
    }
    Ok(objects)
}

/// Reads big-endian int32s and byte runs, every read checked against the bytes left.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).with_context(|| format!("the data ends at byte {}, {n} more were expected", self.bytes.len()))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn int(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
}

fn unserialize_strings(bytes: &[u8]) -> Result<Vec<String>> {
    let mut r = Reader { bytes, pos: 0 };
    ensure!(r.take(2)? == b"X\n", "not R's XDR serialization (only the binary XDR format is read)");
    let version = r.int()?;
    r.int()?; // the writer's R version
    r.int()?; // the oldest R that reads it
    match version {
        2 => {}
        3 => {
            let n = r.int()?;
            r.take(usize::try_from(n).context("a negative encoding-name length")?)?;
        }
        v => bail!("R serialization format {v} (2 and 3 are read)"),
    }
    let flags = r.int()?;
    ensure!(flags == STRSXP, "expected a plain character vector (flags {STRSXP}), found flags {flags:#x}");
    let len = r.int()?;
    let len = usize::try_from(len).context("long vectors are not supported")?;
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let flags = r.int()?;
        ensure!(flags & 0xff == CHARSXP, "element {i} is not a string (type {})", flags & 0xff);
        let n = r.int()?;
        if n == -1 {
            out.push(String::new()); // NA
            continue;
        }
        let raw = r.take(usize::try_from(n).with_context(|| format!("element {i} has length {n}"))?)?;
        out.push(if flags & (LATIN1_MASK << 12) != 0 {
            raw.iter().map(|&b| b as char).collect()
        } else {
            String::from_utf8(raw.to_vec()).with_context(|| format!("element {i} is not UTF-8"))?
        });
    }
    ensure!(r.pos == bytes.len(), "{} bytes follow the character vector", bytes.len() - r.pos);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A block as R's `lazyLoadDBinsertValue` writes it: `c("Hi", NA, "é")`.
    fn block() -> Vec<u8> {
        let mut s = b"X\n".to_vec();
        for v in [3, 0x40200, 0x30500, 5] {
            s.extend(i32::to_be_bytes(v));
        }
        s.extend(b"UTF-8");
        for v in [STRSXP, 3, CHARSXP | (1 << 18), 2] {
            s.extend(i32::to_be_bytes(v));
        }
        s.extend(b"Hi");
        for v in [CHARSXP, -1, CHARSXP | (1 << 15), 2] {
            s.extend(i32::to_be_bytes(v));
        }
        s.extend("é".as_bytes());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&s).unwrap();
        let mut out = (s.len() as u32).to_be_bytes().to_vec();
        out.extend(z.finish().unwrap());
        out
    }

    #[test]
    fn reads_each_blocks_character_vector() {
        let mut rdb = block();
        rdb.extend(block());
        let v = string_vectors(&rdb).unwrap();
        assert_eq!(v, vec![vec!["Hi".to_string(), String::new(), "é".into()]; 2]);
        let cut = &rdb[..rdb.len() - 5];
        assert!(string_vectors(cut).is_err());
    }
}
