//! ggml tensor types and their dequantisation, following gguf-py's `gguf/quants.py` (0.19.0)
//! operation for operation: every product and sum is done in f32 in the order numpy does it
//! there, so the results are bit-identical (tests/golden/make_gguf_fixtures.py checks that).
//! No step may be fused into an FMA: `a * b - c` rounds twice in numpy, and must here too.

use super::grids::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
use anyhow::{anyhow, ensure, Result};

/// Dequantises a whole tensor: `src` is exactly its bytes, `dst` exactly its element count.
pub(super) type Kernel = fn(&[u8], &mut [f32]);

pub(super) struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block, and bytes per block.
    block: usize,
    bytes: usize,
    pub kernel: Option<Kernel>,
}

const fn ty(id: u32, name: &'static str, block: usize, bytes: usize, kernel: Option<Kernel>) -> GgmlType {
    GgmlType { id, name, block, bytes, kernel }
}

/// Every type gguf-py 0.19 knows (constants.py `GGML_QUANT_SIZES`), so that unsupported ones are
/// still size-checked and named in errors. Ids 4 and 5 (Q4_2, Q4_3) were removed from ggml.
pub(super) static GGML_TYPES: &[GgmlType] = &[
    ty(0, "F32", 1, 4, Some(dequant_f32)),
    ty(1, "F16", 1, 2, Some(dequant_f16)),
    ty(2, "Q4_0", 32, 18, Some(dequant_q4_0)),
    ty(3, "Q4_1", 32, 20, Some(dequant_q4_1)),
    ty(6, "Q5_0", 32, 22, Some(dequant_q5_0)),
    ty(7, "Q5_1", 32, 24, Some(dequant_q5_1)),
    ty(8, "Q8_0", 32, 34, Some(dequant_q8_0)),
    ty(9, "Q8_1", 32, 40, None),
    ty(10, "Q2_K", 256, 84, Some(dequant_q2_k)),
    ty(11, "Q3_K", 256, 110, Some(dequant_q3_k)),
    ty(12, "Q4_K", 256, 144, Some(dequant_q4_k)),
    ty(13, "Q5_K", 256, 176, Some(dequant_q5_k)),
    ty(14, "Q6_K", 256, 210, Some(dequant_q6_k)),
    ty(15, "Q8_K", 256, 292, None),
    ty(16, "IQ2_XXS", 256, 66, Some(dequant_iq2_xxs)),
    ty(17, "IQ2_XS", 256, 74, Some(dequant_iq2_xs)),
    ty(18, "IQ3_XXS", 256, 98, Some(dequant_iq3_xxs)),
    ty(19, "IQ1_S", 256, 50, Some(dequant_iq1_s)),
    ty(20, "IQ4_NL", 32, 18, Some(dequant_iq4_nl)),
    ty(21, "IQ3_S", 256, 110, Some(dequant_iq3_s)),
    ty(22, "IQ2_S", 256, 82, Some(dequant_iq2_s)),
    ty(23, "IQ4_XS", 256, 136, Some(dequant_iq4_xs)),
    ty(24, "I8", 1, 1, None),
    ty(25, "I16", 1, 2, None),
    ty(26, "I32", 1, 4, None),
    ty(27, "I64", 1, 8, None),
    ty(28, "F64", 1, 8, Some(dequant_f64)),
    ty(29, "IQ1_M", 256, 56, Some(dequant_iq1_m)),
    ty(30, "BF16", 1, 2, Some(dequant_bf16)),
    ty(34, "TQ1_0", 256, 54, Some(dequant_tq1_0)),
    ty(35, "TQ2_0", 256, 66, Some(dequant_tq2_0)),
    ty(39, "MXFP4", 32, 17, Some(dequant_mxfp4)),
    ty(40, "NVFP4", 64, 36, Some(dequant_nvfp4)),
    ty(41, "Q1_0", 128, 18, None),
];

pub(super) fn lookup_type(id: u32) -> Option<&'static GgmlType> {
    GGML_TYPES.iter().find(|t| t.id == id)
}

pub(super) fn supported_type_names() -> String {
    GGML_TYPES.iter().filter(|t| t.kernel.is_some()).map(|t| t.name).collect::<Vec<_>>().join(", ")
}

/// (elements, bytes) of a tensor of type `ty` and HF-order `shape`. Blocks run along the
/// innermost dimension, so it must hold whole blocks.
pub(super) fn tensor_size(ty: &GgmlType, shape: &[usize]) -> Result<(usize, usize)> {
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| anyhow!("shape {shape:?} overflows"))?;
    let row = shape.last().copied().unwrap_or(1);
    ensure!(
        row % ty.block == 0,
        "innermost dimension {row} is not a multiple of the {} block size {}",
        ty.name,
        ty.block
    );
    let nbytes =
        (numel / ty.block).checked_mul(ty.bytes).ok_or_else(|| anyhow!("shape {shape:?} overflows"))?;
    Ok((numel, nbytes))
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Runs `block` over each (B-byte input, N-value output) pair; fixed-size arrays let the
/// compiler drop the per-element bounds checks.
fn per_block<const B: usize, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    block: impl Fn(&[u8; B], &mut [f32; N]),
) {
    for (x, y) in src.chunks_exact(B).zip(dst.chunks_exact_mut(N)) {
        block(x.try_into().expect("B bytes"), y.try_into().expect("N values"));
    }
}

fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    per_block::<4, 1>(src, dst, |x, y| y[0] = f32::from_le_bytes(*x));
}

fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    per_block::<2, 1>(src, dst, |x, y| y[0] = half::f16::from_le_bytes(*x).to_f32());
}

fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    per_block::<2, 1>(src, dst, |x, y| y[0] = f32::from_bits((u16::from_le_bytes(*x) as u32) << 16));
}

/// Q8_0: f16 scale d, then 32 signed bytes q; x = q * d.
fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    per_block::<34, 32>(src, dst, |x, y| {
        let d = f16_at(x, 0);
        for (y, &q) in y.iter_mut().zip(&x[2..]) {
            *y = (q as i8) as f32 * d;
        }
    });
}

/// Q4_0: f16 scale d, then 16 bytes whose low nibbles are values 0..16 and high nibbles values
/// 16..32; x = (q - 8) * d.
fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    per_block::<18, 32>(src, dst, |x, y| {
        let d = f16_at(x, 0);
        for (j, &q) in x[2..].iter().enumerate() {
            y[j] = d * ((q & 0x0f) as i32 - 8) as f32;
            y[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
        }
    });
}

/// Q4_1: f16 scale d and f16 minimum m, then nibbles laid out as in Q4_0; x = q * d + m.
fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    per_block::<20, 32>(src, dst, |x, y| {
        let (d, m) = (f16_at(x, 0), f16_at(x, 2));
        for (j, &q) in x[4..].iter().enumerate() {
            y[j] = d * (q & 0x0f) as f32 + m;
            y[j + 16] = d * (q >> 4) as f32 + m;
        }
    });
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, packed in 12
/// bytes: bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 the minimums 0..4; scales
/// and minimums 4..8 take their low 4 bits from bytes 8..12 and their high 2 bits from the top
/// of bytes 0..4 and 4..8 respectively.
fn k_scale_min(s: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    };
    (sc as f32, m as f32)
}

/// Q4_K: 256 values as 8 sub-blocks of 32. f16 d and dmin, 12 bytes of packed 6-bit scales and
/// minimums, then 128 bytes: each 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1
/// in its high nibbles. x = (d * scale) * q - dmin * min.
fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    per_block::<144, 256>(src, dst, |x, y| {
        let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
        let (scales, qs) = (&x[4..16], &x[16..]);
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = k_scale_min(scales, j);
            let (d, m) = (d * sc, dmin * m);
            let (chunk, shift) = (&qs[(j / 2) * 32..][..32], 4 * (j % 2));
            for (y, &q) in y.iter_mut().zip(chunk) {
                *y = d * ((q >> shift) & 0x0f) as f32 - m;
            }
        }
    });
}

/// Q5_K: Q4_K plus a fifth bit per value: after the scales come 32 bytes qh, where bit j of
/// qh[l] is the high bit of value l of sub-block j, then the 128 bytes of nibbles.
fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    per_block::<176, 256>(src, dst, |x, y| {
        let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
        let (scales, qh, qs) = (&x[4..16], &x[16..48], &x[48..]);
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = k_scale_min(scales, j);
            let (d, m) = (d * sc, dmin * m);
            let (chunk, shift) = (&qs[(j / 2) * 32..][..32], 4 * (j % 2));
            for ((y, &q), &h) in y.iter_mut().zip(chunk).zip(qh) {
                let q = ((q >> shift) & 0x0f) | (((h >> j) & 1) << 4);
                *y = d * q as f32 - m;
            }
        }
    });
}

/// Q6_K: 256 values in two halves of 128. 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits),
/// 16 signed 8-bit scales (one per 16 values), f16 d last. Within half h, value 32k + l takes its
/// low bits from ql[64h + 32(k%2) + l] (low nibble for k < 2, high nibble otherwise) and its high
/// bits from bits 2k..2k+2 of qh[32h + l]. x = (d * scale) * (q - 32).
fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    per_block::<210, 256>(src, dst, |x, y| {
        let (ql, qh, scales, d) = (&x[..128], &x[128..192], &x[192..208], f16_at(x, 208));
        for (i, y) in y.iter_mut().enumerate() {
            let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
            let lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0f;
            let hi = (qh[32 * h + l] >> (2 * k)) & 0x03;
            let q = (lo | (hi << 4)) as i32 - 32;
            *y = (d * (scales[i / 16] as i8) as f32) * q as f32;
        }
    });
}


fn dequant_f64(src: &[u8], dst: &mut [f32]) {
    // Rounds to nearest, as numpy's astype(float32) does.
    per_block::<8, 1>(src, dst, |x, y| y[0] = f64::from_le_bytes(*x) as f32);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The `n`-th 4-bit value of a 32-value block whose 16 bytes hold values 0..16 in their low
/// nibbles and 16..32 in their high nibbles (Q4_0, Q5_0, IQ4_NL, MXFP4, ...).
fn nibble(qs: &[u8], n: usize) -> u8 {
    (qs[n % 16] >> (4 * (n / 16))) & 0x0f
}

/// Q5_0: f16 d, a u32 of fifth bits (bit j belongs to value j), then nibbles as in Q4_0;
/// x = d * (q - 16).
fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    per_block::<22, 32>(src, dst, |x, y| {
        let (d, qh, qs) = (f16_at(x, 0), u32_at(x, 2), &x[6..]);
        for (j, y) in y.iter_mut().enumerate() {
            let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
            *y = d * (q as i32 - 16) as f32;
        }
    });
}

/// Q5_1: f16 d and f16 minimum m, then Q5_0's fifth bits and nibbles; x = d * q + m.
fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    per_block::<24, 32>(src, dst, |x, y| {
        let (d, m, qh, qs) = (f16_at(x, 0), f16_at(x, 2), u32_at(x, 4), &x[8..]);
        for (j, y) in y.iter_mut().enumerate() {
            let q = nibble(qs, j) | (((qh >> j) & 1) as u8) << 4;
            *y = d * q as f32 + m;
        }
    });
}

/// The 2-bit field of value `i` (0..256) in the 64 bytes `qs` of Q2_K, Q3_K and TQ2_0: each half
/// of 128 values uses 32 bytes, value 32s + l of the half sitting in bits 2s..2s+2 of byte l.
fn crumb(qs: &[u8], i: usize) -> u8 {
    let (half, s, l) = (i / 128, (i % 128) / 32, i % 32);
    (qs[32 * half + l] >> (2 * s)) & 3
}

/// Q2_K: 16 scale bytes (low nibble: scale, high nibble: minimum, one per 16 values), 64 bytes of
/// 2-bit values, f16 d and dmin last. x = (d * scale) * q - dmin * min.
fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    per_block::<84, 256>(src, dst, |x, y| {
        let (scales, qs, d, dmin) = (&x[..16], &x[16..80], f16_at(x, 80), f16_at(x, 82));
        for (i, y) in y.iter_mut().enumerate() {
            let sc = scales[i / 16];
            let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
            *y = dl * crumb(qs, i) as f32 - ml;
        }
    });
}

/// Q3_K: 32 bytes hmask (bit i/32 of byte i%32 is value i's high bit, inverted: a clear bit
/// subtracts 4), 64 bytes of 2-bit values, 12 bytes of 16 packed 6-bit scales (biased by 32), f16
/// d last. x = (d * scale) * q.
fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    per_block::<110, 256>(src, dst, |x, y| {
        let (hmask, qs, s, d) = (&x[..32], &x[32..96], &x[96..108], f16_at(x, 108));
        // Scale j: low 4 bits from the low (j < 8) or high nibble of byte j % 8, high 2 bits from
        // bits 2(j/4).. of byte 8 + j % 4.
        let dl: [f32; 16] = std::array::from_fn(|j| {
            let lo = (s[j % 8] >> (4 * (j / 8))) & 0x0f;
            let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            d * (((lo | hi << 4) as i8) - 32) as f32
        });
        for (i, y) in y.iter_mut().enumerate() {
            let high = (hmask[i % 32] >> (i / 32)) & 1;
            let q = crumb(qs, i) as i8 - if high == 0 { 4 } else { 0 };
            *y = dl[i / 16] * q as f32;
        }
    });
}

/// TQ1_0: 48 + 4 bytes each packing five (or four) ternary digits as a base-3 fraction, f16 d
/// last. Digit k of byte b is the top of (b * 3^k mod 256) * 3 / 256. x = d * (digit - 1).
fn dequant_tq1_0(src: &[u8], dst: &mut [f32]) {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    per_block::<54, 256>(src, dst, |x, y| {
        let d = f16_at(x, 52);
        for (i, y) in y.iter_mut().enumerate() {
            // Values 0..160 come from bytes 0..32, 160..240 from 32..48, 240..256 from 48..52.
            let (byte, k) = match i {
                0..160 => (x[i % 32], i / 32),
                160..240 => (x[32 + (i - 160) % 16], (i - 160) / 16),
                _ => (x[48 + (i - 240) % 4], (i - 240) / 4),
            };
            let digit = ((byte.wrapping_mul(POW3[k]) as u16 * 3) >> 8) as i32;
            *y = d * (digit - 1) as f32;
        }
    });
}

/// TQ2_0: 64 bytes of 2-bit values laid out as in Q2_K, f16 d last; x = d * (q - 1).
fn dequant_tq2_0(src: &[u8], dst: &mut [f32]) {
    per_block::<66, 256>(src, dst, |x, y| {
        let d = f16_at(x, 64);
        for (i, y) in y.iter_mut().enumerate() {
            *y = d * (crumb(&x[..64], i) as i32 - 1) as f32;
        }
    });
}

/// IQ4_NL's 16 non-linear levels, also used by IQ4_XS.
const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// IQ4_NL: f16 d, then nibbles as in Q4_0 indexing IQ4_LEVELS; x = d * level.
fn dequant_iq4_nl(src: &[u8], dst: &mut [f32]) {
    per_block::<18, 32>(src, dst, |x, y| {
        let d = f16_at(x, 0);
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * IQ4_LEVELS[nibble(&x[2..], j) as usize] as f32;
        }
    });
}

/// IQ4_XS: f16 d, a u16 of the scales' high 2 bits, 4 bytes of their low nibbles, then per
/// 32-value sub-block 16 bytes of IQ4_NL nibbles. x = (d * (scale - 32)) * level.
fn dequant_iq4_xs(src: &[u8], dst: &mut [f32]) {
    per_block::<136, 256>(src, dst, |x, y| {
        let (d, scales_h, scales_l) = (f16_at(x, 0), u16_at(x, 2), &x[4..8]);
        for (k, y) in y.chunks_exact_mut(32).enumerate() {
            let lo = (scales_l[k / 2] >> (4 * (k % 2))) & 0x0f;
            let hi = ((scales_h >> (2 * k)) & 3) as u8;
            let dl = d * (((lo | hi << 4) as i8) - 32) as f32;
            let qs = &x[8 + 16 * k..][..16];
            for (j, y) in y.iter_mut().enumerate() {
                *y = dl * IQ4_LEVELS[nibble(qs, j) as usize] as f32;
            }
        }
    });
}

/// MXFP4's e2m1 levels, doubled.
const MXFP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// MXFP4: one e8m0 exponent byte, then nibbles as in Q4_0 indexing MXFP4_LEVELS. The scale is
/// half of 2^(e - 127) (halved because the levels are doubled), built from its bits.
fn dequant_mxfp4(src: &[u8], dst: &mut [f32]) {
    per_block::<17, 32>(src, dst, |x, y| {
        let e = x[0] as u32;
        let d = f32::from_bits(if e < 2 { 0x0020_0000 << e } else { (e - 1) << 23 });
        for (j, y) in y.iter_mut().enumerate() {
            *y = d * MXFP4_LEVELS[nibble(&x[1..], j) as usize] as f32;
        }
    });
}

/// NVFP4: four unsigned e4m3 scales, one per 16 values, then per 16 values 8 bytes whose low
/// nibbles are values 0..8 and high nibbles 8..16, indexing MXFP4_LEVELS.
fn dequant_nvfp4(src: &[u8], dst: &mut [f32]) {
    per_block::<36, 64>(src, dst, |x, y| {
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let d = ue4m3_half(x[s]);
            let qs = &x[4 + 8 * s..][..8];
            for (j, y) in y.iter_mut().enumerate() {
                let q = (qs[j % 8] >> (4 * (j / 8))) & 0x0f;
                *y = d * MXFP4_LEVELS[q as usize] as f32;
            }
        }
    });
}

/// Half an unsigned e4m3 value (bias 7, no sign; the sign bit is ignored as gguf-py does, and 0
/// and 0x7f, its NaN, read as 0). Every step is exact in f32.
fn ue4m3_half(b: u8) -> f32 {
    let (exp, man) = (((b >> 3) & 0x0f) as i32, (b & 7) as f32);
    let raw = if exp == 0 { man * 2f32.powi(-9) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) };
    if b == 0 || b == 0x7f {
        0.0
    } else {
        raw * 0.5
    }
}

/// Entry `i` of llama.cpp's `ksigns_iq2xs`: seven sign bits and an eighth that makes the count of
/// minus signs even.
fn ksigns(i: u32) -> u8 {
    (i | (i.count_ones() & 1) << 7) as u8
}

/// Value `j` of grid row `row`: byte j of the packed entry.
fn grid8(row: u64, j: usize) -> f32 {
    (row >> (8 * j)) as u8 as f32
}

fn sign(bits: u8, j: usize, v: f32) -> f32 {
    if (bits >> j) & 1 == 0 {
        v
    } else {
        -v
    }
}

/// IQ2_XXS: f16 d, then per 32 values two u32: four byte indices into IQ2XXS_GRID (8 values
/// each), and four 7-bit sign indices plus a 4-bit scale s on top. x = ±(d * (0.5 + s) * 0.25) * g.
fn dequant_iq2_xxs(src: &[u8], dst: &mut [f32]) {
    per_block::<66, 256>(src, dst, |x, y| {
        let d = f16_at(x, 0);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let at = 2 + 8 * ib;
            let aux = u32_at(x, at + 4);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let (row, signs) = (IQ2XXS_GRID[x[at + l] as usize], ksigns((aux >> (7 * l)) & 127));
                for (j, y) in y.iter_mut().enumerate() {
                    *y = sign(signs, j, db * grid8(row, j));
                }
            }
        }
    });
}

/// The 4-bit scale of 16-value group `k` in the 8 scale bytes of IQ2_XS/IQ2_S, as
/// d * (0.5 + s) * 0.25.
fn iq2_scale(d: f32, scales: &[u8], k: usize) -> f32 {
    d * (0.5 + ((scales[k / 2] >> (4 * (k % 2))) & 0x0f) as f32) * 0.25
}

/// IQ2_XS: f16 d, 32 u16 (a 9-bit IQ2XS_GRID index and a 7-bit sign index per 8 values), 8
/// bytes of 4-bit scales (one per 16 values).
fn dequant_iq2_xs(src: &[u8], dst: &mut [f32]) {
    per_block::<74, 256>(src, dst, |x, y| {
        let (d, scales) = (f16_at(x, 0), &x[66..74]);
        for (g, y) in y.chunks_exact_mut(8).enumerate() {
            let q = u16_at(x, 2 + 2 * g) as u32;
            let (db, row, signs) = (iq2_scale(d, scales, g / 2), IQ2XS_GRID[(q & 511) as usize], ksigns(q >> 9));
            for (j, y) in y.iter_mut().enumerate() {
                *y = sign(signs, j, db * grid8(row, j));
            }
        }
    });
}

/// IQ2_S: f16 d, 32 low bytes of 10-bit IQ2S_GRID indices, 32 sign bytes (one per 8 values), 8
/// bytes holding the indices' top 2 bits, 8 bytes of 4-bit scales (one per 16 values).
fn dequant_iq2_s(src: &[u8], dst: &mut [f32]) {
    per_block::<82, 256>(src, dst, |x, y| {
        let (d, qs, signs, qh, scales) = (f16_at(x, 0), &x[2..34], &x[34..66], &x[66..74], &x[74..82]);
        for (g, y) in y.chunks_exact_mut(8).enumerate() {
            let idx = qs[g] as usize | (((qh[g / 4] >> (2 * (g % 4))) & 3) as usize) << 8;
            let (db, row) = (iq2_scale(d, scales, g / 2), IQ2S_GRID[idx]);
            for (j, y) in y.iter_mut().enumerate() {
                *y = sign(signs[g], j, db * grid8(row, j));
            }
        }
    });
}

/// IQ3_XXS: f16 d, 64 byte indices into IQ3XXS_GRID (4 values each), then per 32 values a u32 of
/// four 7-bit sign indices and a 4-bit scale s on top. x = ±(d * (0.5 + s) * 0.5) * g.
fn dequant_iq3_xxs(src: &[u8], dst: &mut [f32]) {
    per_block::<98, 256>(src, dst, |x, y| {
        let (d, qs) = (f16_at(x, 0), &x[2..66]);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let aux = u32_at(x, 66 + 4 * ib);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let signs = ksigns((aux >> (7 * l)) & 127);
                for (j, y) in y.iter_mut().enumerate() {
                    let row = IQ3XXS_GRID[qs[8 * ib + 2 * l + j / 4] as usize] as u64;
                    *y = sign(signs, j, db * grid8(row, j % 4));
                }
            }
        }
    });
}

/// IQ3_S: f16 d, 64 low bytes of 9-bit IQ3S_GRID indices (4 values each), 8 bytes of their top
/// bits, 32 sign bytes (one per 8 values), 4 bytes of 4-bit scales (one per 32 values).
/// x = ±(d * (1 + 2s)) * g.
fn dequant_iq3_s(src: &[u8], dst: &mut [f32]) {
    per_block::<110, 256>(src, dst, |x, y| {
        let (d, qs, qh, signs, scales) = (f16_at(x, 0), &x[2..66], &x[66..74], &x[74..106], &x[106..110]);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let s = (scales[ib / 2] >> (4 * (ib % 2))) & 0x0f;
            let db = d * (1 + 2 * s) as f32;
            for (j, y) in y.iter_mut().enumerate() {
                let (i, k) = (32 * ib + j, 8 * ib + j / 4);
                let idx = qs[k] as usize | (((qh[k / 8] >> (k % 8)) & 1) as usize) << 8;
                *y = sign(signs[i / 8], i % 8, db * grid8(IQ3S_GRID[idx] as u64, j % 4));
            }
        }
    });
}

/// IQ1_S/IQ1_M shift every grid value by ±1/8.
const IQ1_DELTA: f32 = 0.125;

/// Value `j` of IQ1S_GRID row `idx` (-1, 0 or 1, stored as i8).
fn grid_iq1(idx: usize, j: usize) -> f32 {
    (IQ1S_GRID[idx] >> (8 * j)) as u8 as i8 as f32
}

/// IQ1_S: f16 d, 32 low bytes of 11-bit IQ1S_GRID indices (8 values each), then per 32 values a
/// u16: 3 top index bits for each of its four groups, a 3-bit scale s and the delta's sign.
/// x = (d * (2s + 1)) * (g ± 1/8).
fn dequant_iq1_s(src: &[u8], dst: &mut [f32]) {
    per_block::<50, 256>(src, dst, |x, y| {
        let (d, qs) = (f16_at(x, 0), &x[2..34]);
        for (ib, y) in y.chunks_exact_mut(32).enumerate() {
            let h = u16_at(x, 34 + 2 * ib);
            let dl = d * (2 * ((h >> 12) & 7) + 1) as f32;
            let delta = if h & 0x8000 == 0 { IQ1_DELTA } else { -IQ1_DELTA };
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let idx = qs[4 * ib + l] as usize | (((h >> (3 * l)) & 7) as usize) << 8;
                for (j, y) in y.iter_mut().enumerate() {
                    *y = dl * (grid_iq1(idx, j) + delta);
                }
            }
        }
    });
}

/// IQ1_M: 32 low bytes of IQ1S_GRID indices, 16 bytes of nibbles (per 8 values: 3 top index bits
/// and the delta's sign), then four u16 whose low 12 bits hold 3-bit scales (one per 16 values)
/// and whose top nibbles together make the f16 d. x = (d * (2s + 1)) * (g ± 1/8).
fn dequant_iq1_m(src: &[u8], dst: &mut [f32]) {
    per_block::<56, 256>(src, dst, |x, y| {
        let (qs, qh) = (&x[..32], &x[32..48]);
        let sc: [u16; 4] = std::array::from_fn(|i| u16_at(x, 48 + 2 * i));
        let d_bits = (sc[0] & 0xf000) >> 12 | (sc[1] & 0xf000) >> 8 | (sc[2] & 0xf000) >> 4 | (sc[3] & 0xf000);
        let d = half::f16::from_bits(d_bits).to_f32();
        for (g, y) in y.chunks_exact_mut(8).enumerate() {
            let k = g / 2;
            let dl = d * (2 * ((sc[k / 4] >> (3 * (k % 4))) & 7) + 1) as f32;
            let nib = (qh[g / 2] >> (4 * (g % 2))) & 0x0f;
            let idx = qs[g] as usize | ((nib & 7) as usize) << 8;
            let delta = if nib & 8 == 0 { IQ1_DELTA } else { -IQ1_DELTA };
            for (j, y) in y.iter_mut().enumerate() {
                *y = dl * (grid_iq1(idx, j) + delta);
            }
        }
    });
}
