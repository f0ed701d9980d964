//! The math of the attention analyzers, on batches of attention matrices `[..., T, T]` (rows are
//! queries, post-softmax, causal). Every function returns one value per matrix, shape `[...]`.

use crate::lanes::{scale_for, simd, Estimate, Matrix, Real, Sample, Solver, LANES};
use rayon::prelude::*;
use scalpel_sdk::prelude::*;

/// Relative slack of every threshold test: `cum ≥ τ·total·(1 − slack)`. The analytic cases sit exactly
/// on the threshold (identity at T = 100: 90 of 100 units of energy at k = 90), and the rounding of
/// eigenvalues, sums and τ·total must not push k* one past the tie. Far below any real energy gap.
fn slack(certain: bool) -> f64 {
    if certain {
        1e-9
    } else {
        1e-5
    }
}

/// k* = smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσⱼ², as `Int64`, on the CPU whatever the device (eight matrices at a
/// time, `lanes`). `Double`: the exact k* (as float64 arithmetic finds it), computed in float32 wherever
/// float32's error bound decides it; `Float`: float32 alone, which may differ where the energy sits within
/// about 1e-5 (relative) of the threshold.
pub fn energy_rank(attn: &Tensor, tau: f64, kind: Kind) -> Result<Tensor> {
    let certain = match kind {
        Kind::Double => true,
        Kind::Float => false,
        other => bail!("energy_rank computes in Double or Float, not {other:?}"),
    };
    let host = Host::new(attn)?;
    let k = match host.values.kind() {
        Kind::Double => ranks(host.slice::<f64>()?, host.t, tau, certain),
        _ => ranks(host.slice::<f32>()?, host.t, tau, certain),
    }
    .map_err(|i| host.not_finite(i))?;
    host.answer(&k)
}

/// m* = fewest columns whose energies ‖A·ⱼ‖², largest first, reach η·‖A‖²_F, exactly (in float64), as `Int64`.
pub fn mass(attn: &Tensor, eta: f64) -> Result<Tensor> {
    let host = Host::new(attn)?;
    let m = match host.values.kind() {
        Kind::Double => masses(host.slice::<f64>()?, host.t, eta),
        _ => masses(host.slice::<f32>()?, host.t, eta),
    }
    .map_err(|i| host.not_finite(i))?;
    host.answer(&m)
}

/// A batch of matrices `[..., T, T]` as contiguous float32 or float64 values on the CPU.
struct Host {
    values: Tensor,
    batch: Vec<i64>,
    t: usize,
    device: Device,
}

impl Host {
    fn new(attn: &Tensor) -> Result<Self> {
        let (batch, t) = matrix_shape(attn)?;
        let kind = if attn.kind() == Kind::Double { Kind::Double } else { Kind::Float };
        let values = attn.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?;
        Ok(Host { values, batch, t: usize::try_from(t)?, device: attn.device() })
    }

    /// The error for matrix `i`, whose energy is not finite.
    fn not_finite(&self, i: usize) -> scalpel_sdk::Error {
        scalpel_sdk::anyhow!(
            "attention matrix {i} of a batch of {:?} holds NaN or infinite values (the forward pass overflowed: analyze \
             in float32 or check the checkpoint), or entries near 1e154 or more, whose squares overflow float64 (scale \
             them down)",
            self.batch
        )
    }

    fn slice<S: tch::kind::Element>(&self) -> Result<&[S]> {
        ensure!(self.values.kind() == S::KIND, "expected {:?} values, got {:?}", S::KIND, self.values.kind());
        // An empty batch has a null data pointer, which a slice must not hold (the Ok came back as a garbage Err).
        if self.values.numel() == 0 {
            return Ok(&[]);
        }
        // SAFETY: `values` is a contiguous CPU tensor of S, alive as long as the slice.
        Ok(unsafe { std::slice::from_raw_parts(self.values.data_ptr() as *const S, self.values.numel()) })
    }

    /// One value per matrix, shaped like the batch, on the input's device.
    fn answer<T: tch::kind::Element>(&self, per_matrix: &[T]) -> Result<Tensor> {
        Ok(Tensor::from_slice(per_matrix).f_reshape(&self.batch)?.f_to_device(self.device)?)
    }
}

/// What one pass over a matrix tells `ranks`.
struct Facts {
    /// τ·(1 − slack)·‖A‖²_F.
    threshold: f64,
    /// `lanes::scale_for(‖A‖²_F)`.
    scale: f64,
    /// 1 + the last nonzero column of each row.
    widths: Vec<u32>,
    /// k* = 1 for certain.
    rank1: bool,
    /// m* at τ, an upper bound of k* (the best rank-m approximation holds at least the m largest columns' energy):
    /// matrices of similar bounds share a group, so that lanes finish together.
    bound: usize,
    /// The fast paths assume non-negative entries (attention probabilities); others take float64 throughout.
    negative: bool,
}

/// k* of every matrix: k* = 1 where a power step decides it; else float32 in lanes, and float64 in lanes where
/// float32 is not certain (`certain`) or the matrix has negative entries. Err: the first matrix that is not finite.
fn ranks<S: Sample>(values: &[S], t: usize, tau: f64, certain: bool) -> Result<Vec<i64>, usize> {
    let (n, fraction) = (t * t, tau * (1.0 - slack(certain)));
    let facts: Vec<Facts> = values.par_chunks(n).map(|a| simd!(avx2::facts(a, t, fraction), facts(a, t, fraction))).collect();
    if let Some(i) = facts.iter().position(|f| !f.threshold.is_finite()) {
        return Err(i);
    }
    let mut open: Vec<usize> = (0..facts.len()).filter(|&i| !facts[i].rank1).collect();
    open.sort_by_key(|&i| facts[i].bound);
    let matrix = |i: usize| Matrix { values: &values[i * n..(i + 1) * n], widths: &facts[i].widths, threshold: facts[i].threshold, scale: facts[i].scale };
    let (fast, mut unsure): (Vec<usize>, Vec<usize>) = open.iter().partition(|&&i| !facts[i].negative);
    let mut k = vec![1i64; facts.len()];
    for (i, estimate) in solve::<f32, S>(&fast, t, &matrix) {
        k[i] = estimate.rank;
        if certain && !estimate.certain {
            unsure.push(i);
        }
    }
    // Float64 answers are taken as they are: this is "as float64 arithmetic finds it".
    for (i, estimate) in solve::<f64, S>(&unsure, t, &matrix) {
        k[i] = estimate.rank;
    }
    Ok(k)
}

/// k̂ of the matrices `indices`, eight to a group, the groups spread over the cores.
fn solve<'a, R: Real, S: Sample + 'a>(indices: &[usize], t: usize, matrix: &(impl Fn(usize) -> Matrix<'a, S> + Sync)) -> Vec<(usize, Estimate)> {
    indices
        .par_chunks(LANES)
        .map_init(|| Solver::<R>::new(t), |solver, group| {
            let found = solver.ranks(&group.iter().map(|&i| matrix(i)).collect::<Vec<_>>());
            group.iter().copied().zip(found).collect::<Vec<_>>()
        })
        .flatten()
        .collect()
}

/// The threshold, row widths, rank-1 test and k* bound of one matrix, in float64.
#[inline(always)]
fn facts<S: Sample>(a: &[S], t: usize, fraction: f64) -> Facts {
    let Columns { mut energies, sums: u, widths, negative } = columns(a, t);
    let energy = energies.iter().sum::<f64>();
    let threshold = fraction * energy;
    let rows = || a.chunks_exact(t).zip(&widths).map(|(row, &w)| &row[..w as usize]);
    // One power step of AAᵀ from the all-ones vector: u = Aᵀ1, w = Au, and ‖Aᵀw‖²/‖w‖² ≤ σ₁² (a Rayleigh
    // quotient). AAᵀ is non-negative, so its top eigenvector is too (Perron) and overlaps the start; one step
    // already catches every k* = 1 matrix of real attention, and 60 % of them need it.
    let mut w: Vec<f64> = rows().map(|row| dot(row, &u)).collect();
    // w over its largest entry (any w gives a Rayleigh quotient): ‖Aᵀw‖² grows as the sixth power of the entries and
    // overflowed from entries of about 1e50, and ∞/‖w‖² passed any matrix as rank 1.
    let largest = w.iter().fold(0.0, |m: f64, &x| m.max(x));
    w.iter_mut().for_each(|x| *x /= largest);
    let mut z = vec![0.0; t];
    for (row, &w) in rows().zip(&w) {
        for (z, &x) in z.iter_mut().zip(row) {
            *z += w * x.into();
        }
    }
    let quotient = dot(&z, &z) / dot(&w, &w);
    // Every term is non-negative, so float64 errs by a relative γ's worth at most; a zero matrix gives NaN.
    // Finite: ‖Aᵀw‖² can still overflow where ‖A‖²_F does not (entries near 1e152), and ∞ would pass any matrix.
    let rank1 = !negative && quotient.is_finite() && quotient * (1.0 - 4.0 * t as f64 * f64::EPSILON) >= threshold;
    let bound = if rank1 { 1 } else { smallest_reaching(&mut energies, fraction) as usize };
    Facts { threshold, scale: scale_for(energy), widths, rank1, bound, negative }
}

/// Σ xᵢyᵢ in float64, in four running sums (one would wait on the previous addition every step).
#[inline(always)]
fn dot<S: Sample>(x: &[S], y: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (xs, ys) = (x.chunks_exact(4), y[..x.len()].chunks_exact(4));
    let rest: f64 = xs.remainder().iter().zip(ys.remainder()).map(|(&x, y)| x.into() * y).sum();
    for (x, y) in xs.zip(ys) {
        for i in 0..4 {
            sums[i] += x[i].into() * y[i];
        }
    }
    (sums[0] + sums[1]) + (sums[2] + sums[3]) + rest
}

/// One pass over a row-major t × t matrix, in float64.
struct Columns {
    /// ‖A·ⱼ‖².
    energies: Vec<f64>,
    /// Σᵢ Aᵢⱼ.
    sums: Vec<f64>,
    /// 1 + the last nonzero column of each row.
    widths: Vec<u32>,
    negative: bool,
}

#[inline(always)]
fn columns<S: Sample>(a: &[S], t: usize) -> Columns {
    let (mut energies, mut sums, mut widths) = (vec![0.0; t], vec![0.0; t], vec![0u32; t]);
    let mut negative = false;
    // Whole rows, zeros too, front to back: a first read of the matrix from memory goes at the prefetcher's pace.
    for (i, (row, row_width)) in a.chunks_exact(t).zip(&mut widths).enumerate() {
        for ((e, s), &x) in energies.iter_mut().zip(&mut sums).zip(row) {
            let x: f64 = x.into();
            *e += x * x;
            *s += x;
            negative |= x < 0.0;
        }
        *row_width = width(row, i) as u32;
    }
    Columns { energies, sums, widths, negative }
}

/// 1 + the last nonzero entry of row i, 0 if none. A causal row ends in zeros from i + 1 on: checked without
/// branching (a scan one by one was most of this pass), it leaves the search to the first i + 1 entries.
#[inline(always)]
fn width<S: Sample>(row: &[S], i: usize) -> usize {
    let nonzero = |x: &S| (*x).into() != 0.0;
    let causal = row[(i + 1).min(row.len())..].iter().fold(true, |zero, x| zero & !nonzero(x));
    let end = if causal { i + 1 } else { row.len() };
    row[..end].iter().rposition(nonzero).map_or(0, |p| p + 1)
}

/// m* of every matrix. Err: the first matrix that is not finite.
fn masses<S: Sample>(values: &[S], t: usize, eta: f64) -> Result<Vec<i64>, usize> {
    let m: Vec<Option<i64>> = values
        .par_chunks(t * t)
        .map(|a| {
            let mut energies = simd!(avx2::columns(a, t), columns(a, t)).energies;
            energies.iter().sum::<f64>().is_finite().then(|| smallest_reaching(&mut energies, eta * (1.0 - slack(true))))
        })
        .collect();
    m.into_iter().enumerate().map(|(i, m)| m.ok_or(i)).collect()
}

/// The fewest of `energies`, largest first, whose sum reaches `fraction` of their total (sorts `energies`).
fn smallest_reaching(energies: &mut [f64], fraction: f64) -> i64 {
    energies.sort_unstable_by(|x, y| y.total_cmp(x));
    let threshold = fraction * energies.iter().sum::<f64>();
    let mut sum = 0.0;
    1 + energies
        .iter()
        .take_while(|&&e| {
            sum += e;
            sum < threshold
        })
        .count()
        .min(energies.len() - 1) as i64
}

/// `facts` and `columns` compiled for AVX2 and FMA (`lanes::simd!`).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Facts, Sample};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn facts<S: Sample>(a: &[S], t: usize, fraction: f64) -> Facts {
        super::facts(a, t, fraction)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns<S: Sample>(a: &[S], t: usize) -> super::Columns {
        super::columns(a, t)
    }
}

/// Mean row entropy Hᵢ = −Σⱼ Aᵢⱼ log Aᵢⱼ (nats, 0·log 0 = 0), and the mean of Hᵢ / log i over rows
/// i ≥ 2 (row i, 1-based, has i admissible keys; row 1 has one key and no choice, so it is left out).
/// In float64 on the CPU, one matrix at a time: a logarithm for each nonzero entry, no temporaries (libtorch's
/// float64 `xlogy` over whole layers took about 4 s on SmolLM2, three times rank and mass together).
pub fn entropy(attn: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, t) = matrix_shape(attn)?;
    ensure!(t >= 2, "normalised entropy needs windows of at least 2 tokens, got {t}");
    let host = Host::new(attn)?;
    let both: Vec<(f64, f64)> = match host.values.kind() {
        Kind::Double => host.slice::<f64>()?.par_chunks(host.t * host.t).map(|a| row_entropies(a, host.t)).collect(),
        _ => host.slice::<f32>()?.par_chunks(host.t * host.t).map(|a| row_entropies(a, host.t)).collect(),
    };
    if let Some(i) = both.iter().position(|(h, n)| !h.is_finite() || !n.is_finite()) {
        bail!("{}; entropy also needs entries of at least 0", host.not_finite(i));
    }
    let (h, normalised): (Vec<f64>, Vec<f64>) = both.into_iter().unzip();
    Ok((host.answer(&h)?, host.answer(&normalised)?))
}

/// The mean row entropy of a row-major t × t matrix, and the mean of Hᵢ / log i over rows i ≥ 2 (1-based).
fn row_entropies<S: Sample>(a: &[S], t: usize) -> (f64, f64) {
    let (mut sum, mut normalised) = (0.0, 0.0);
    for (i, row) in a.chunks_exact(t).enumerate() {
        let h: f64 = -row.iter().map(|&x| x.into()).filter(|&x| x != 0.0).map(|x| x * x.ln()).sum::<f64>();
        sum += h;
        if i > 0 {
            normalised += h / ((i + 1) as f64).ln();
        }
    }
    (sum / t as f64, normalised / (t - 1) as f64)
}

/// Mean over rows of Aᵢ₀, the attention paid to the first position.
pub fn sink_fraction(attn: &Tensor) -> Result<Tensor> {
    matrix_shape(attn)?;
    // The first column only, then float64: not the whole layer in float64.
    Ok(attn.f_select(-1, 0)?.f_to_kind(Kind::Double)?.f_mean_dim(-1, false, None)?)
}

/// k* and m* of every matrix in f64, the per-sequence definitions of the paper; for benchmarks.
pub fn rank_and_mass(attn: &Tensor, tau: f64, eta: f64) -> Result<(Tensor, Tensor)> {
    Ok((energy_rank(attn, tau, Kind::Double)?, mass(attn, eta)?))
}

/// The leading (batch) dims and T of a `[..., T, T]` tensor.
fn matrix_shape(attn: &Tensor) -> Result<(Vec<i64>, i64)> {
    let size = attn.size();
    match size.as_slice() {
        [batch @ .., r, c] if r == c && *r > 0 => Ok((batch.to_vec(), *r)),
        _ => bail!("expected square attention matrices [..., T, T], got shape {size:?}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `[t, t]` f64 matrix with entries `f(i, j)` (0-based).
    fn matrix(t: i64, f: impl Fn(i64, i64) -> f64) -> Tensor {
        let data: Vec<f64> = (0..t).flat_map(|i| (0..t).map(move |j| (i, j))).map(|(i, j)| f(i, j)).collect();
        Tensor::from_slice(&data).reshape([t, t])
    }

    pub(crate) fn identity(t: i64) -> Tensor {
        matrix(t, |i, j| (i == j) as i64 as f64)
    }

    /// Every row on the first position.
    pub(crate) fn sink(t: i64) -> Tensor {
        matrix(t, |_, j| (j == 0) as i64 as f64)
    }

    /// Row i (1-based) spreads evenly over its i admissible keys.
    pub(crate) fn uniform(t: i64) -> Tensor {
        matrix(t, |i, j| if j <= i { 1.0 / (i + 1) as f64 } else { 0.0 })
    }

    /// Row i on column i − 1; the first row on itself.
    fn previous(t: i64) -> Tensor {
        matrix(t, |i, j| (j == (i - 1).max(0)) as i64 as f64)
    }

    /// Softmax of random causal logits, with a random temperature and a random pull towards position 0:
    /// from diffuse heads to attention sinks, like the heads of a real model.
    fn attention_like(b: i64, t: i64) -> Tensor {
        let opts = (Kind::Double, Device::Cpu);
        let scale = Tensor::rand([b, 1, 1], opts) * 4.0;
        let pull = Tensor::rand([b, 1, 1], opts) * 12.0 - 2.0;
        let logits = Tensor::randn([b, t, t], opts) * scale + sink(t) * pull;
        let future = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        logits.masked_fill(&future, f64::NEG_INFINITY).softmax(-1, Kind::Double)
    }

    fn ints(t: &Tensor) -> Vec<i64> {
        Vec::try_from(t.reshape([-1])).unwrap()
    }

    fn scalar(t: Tensor) -> f64 {
        t.double_value(&[])
    }

    #[test]
    fn analytic_rank_and_mass_at_100_tokens() {
        let mixture = sink(100) * 0.9 + uniform(100) * 0.1;
        let cases = [
            ("identity", identity(100), 90, 90),
            ("sink", sink(100), 1, 1),
            ("uniform", uniform(100), 5, 30),
            ("previous", previous(100), 89, 89),
            ("0.9 sink + 0.1 uniform", mixture, 1, 1),
        ];
        for (name, a, rank, columns) in cases {
            let (k, m) = rank_and_mass(&a, 0.9, 0.9).unwrap();
            assert_eq!((scalar(k), scalar(m)), (rank as f64, columns as f64), "{name}");
            assert_eq!(scalar(energy_rank(&a, 0.9, Kind::Float).unwrap()), rank as f64, "{name} in f32");
        }
    }

    #[test]
    fn analytic_rank_and_mass_at_40_tokens() {
        let (k, m) = rank_and_mass(&Tensor::stack(&[identity(40), uniform(40)], 0), 0.9, 0.9).unwrap();
        assert_eq!((ints(&k), ints(&m)), (vec![36, 4], vec![36, 14]));
    }

    #[test]
    fn ties_at_the_threshold_resolve_as_in_exact_arithmetic() {
        // Rows 3c, 3c+1, 3c+2 all on key c: σ² = column counts, 3 (33 times) and 1, so 30 of them hold
        // exactly 90 of 100 units; eigvalsh returns the 3s with rounding errors (31 without the slack).
        let a = matrix(100, |i, j| (j == i / 3) as i64 as f64);
        assert_eq!(scalar(energy_rank(&a, 0.9, Kind::Double).unwrap()), 30.0);
        assert_eq!(scalar(energy_rank(&a, 0.9, Kind::Float).unwrap()), 30.0);
        assert_eq!(scalar(mass(&a, 0.9).unwrap()), 30.0);
    }

    /// k* straight from the definition: singular values, squared, summed until they reach τ.
    fn reference_rank(a: &Tensor, tau: f64) -> Vec<i64> {
        let sigma: Vec<Vec<f64>> = Vec::try_from(a.svd(true, false).1).unwrap();
        let total: Vec<f64> = Vec::try_from(a.square().sum_dim_intlist(&[1, 2][..], false, None)).unwrap();
        let smallest = |s: &Vec<f64>, total: f64| {
            let mut cum = 0.0;
            1 + s
                .iter()
                .take_while(|x| {
                    cum += *x * *x;
                    cum < tau * total * (1.0 - 1e-9)
                })
                .count() as i64
        };
        sigma.iter().zip(total).map(|(s, total)| smallest(s, total)).collect()
    }

    /// m* straight from the definition, in plain Rust.
    fn reference_mass(a: &Tensor, eta: f64) -> Vec<i64> {
        let a: Vec<Vec<Vec<f64>>> = Vec::try_from(a).unwrap();
        a.iter()
            .map(|m| {
                let mut energy: Vec<f64> = (0..m.len()).map(|j| m.iter().map(|row| row[j] * row[j]).sum()).collect();
                energy.sort_by(|x, y| y.total_cmp(x));
                let total: f64 = energy.iter().sum();
                let mut cum = 0.0;
                1 + energy
                    .iter()
                    .take_while(|e| {
                        cum += *e;
                        cum < eta * total * (1.0 - 1e-9)
                    })
                    .count() as i64
            })
            .collect()
    }

    #[test]
    fn fast_path_equals_the_definition() {
        tch::manual_seed(7);
        let t = 60;
        let weights = Tensor::linspace(0.0, 1.0, 101, (Kind::Double, Device::Cpu)).reshape([-1, 1, 1]);
        let blend = |x: Tensor, y: Tensor| &weights * x + (1.0 - &weights) * y;
        let batch = Tensor::cat(
            &[
                attention_like(300, t),
                blend(sink(t), uniform(t)),
                blend(sink(t), identity(t)),
                blend(sink(t), previous(t)),
                blend(uniform(t), identity(t)),
            ],
            0,
        );
        for tau in [0.5, 0.9, 0.99] {
            let k = energy_rank(&batch, tau, Kind::Double).unwrap();
            assert_eq!(ints(&k), reference_rank(&batch, tau), "tau = {tau}");
            assert!(ints(&k).iter().filter(|&&k| k == 1).count() > 50, "the test must exercise the early exit");
            assert_eq!(ints(&mass(&batch, tau).unwrap()), reference_mass(&batch, tau), "eta = {tau}");
            // Float32 attention, as the model hands it out: the exact answer for those very values.
            let single = batch.to_kind(Kind::Float);
            let widened = single.to_kind(Kind::Double);
            assert_eq!(ints(&energy_rank(&single, tau, Kind::Double).unwrap()), reference_rank(&widened, tau), "f32 in, tau = {tau}");
            assert_eq!(ints(&mass(&single, tau).unwrap()), reference_mass(&widened, tau), "f32 in, eta = {tau}");
        }
    }

    /// One matrix of kind `kind` (see `KINDS`), t × t, float64: the shapes the contract of `energy_rank` covers.
    fn any_matrix(kind: usize, t: i64) -> Tensor {
        let opts = (Kind::Double, Device::Cpu);
        let rand = |r: i64, c: i64| Tensor::rand([r, c], opts);
        let inner = 1 + (rand(1, 1).double_value(&[0, 0]) * 3.0) as i64;
        match kind {
            0 => attention_like(1, t).squeeze_dim(0),
            1 => (Tensor::randn([t, t], opts) * 3.0).softmax(-1, Kind::Double),
            // Zeros anywhere: rows whose nonzeros are not a prefix, zero rows and columns.
            2 => rand(t, t) * rand(t, t).gt(0.4 + 0.55 * rand(1, 1).double_value(&[0, 0])).to_kind(Kind::Double),
            3 => rand(t, t).triu(0),
            4 => Tensor::randn([t, t], opts),
            5 => rand(t, inner).matmul(&rand(inner, t)),
            6 => Tensor::randn([t, inner], opts).matmul(&Tensor::randn([inner, t], opts)),
            7 => Tensor::eye(t, opts) + rand(t, t) * 1e-3,
            // Exact ties: a permutation, and rows sharing keys (σ² = how many rows share each key).
            8 => Tensor::eye(t, opts).index_select(0, &Tensor::randperm(t, (Kind::Int64, Device::Cpu))),
            9 => matrix(t, |i, j| (j == i / inner) as i64 as f64),
            10 => Tensor::diag(&Tensor::randint(3, [t], opts), 0),
            11 => rand(t, t) * rand(t, 1).gt(0.3).to_kind(Kind::Double) * rand(1, t).gt(0.3).to_kind(Kind::Double),
            _ => Tensor::zeros([t, t], opts),
        }
    }
    const KINDS: [&str; 13] = [
        "causal attention",
        "dense softmax",
        "sparse",
        "upper triangular",
        "signed",
        "low rank",
        "signed low rank",
        "near identity",
        "permutation",
        "shared keys",
        "integer diagonal",
        "zero rows and columns",
        "zero",
    ];

    #[test]
    fn energy_rank_and_mass_equal_the_definitions_on_any_matrix() {
        tch::manual_seed(2026);
        let (mut checked, mut wrong) = (0, vec![]);
        for (round, t) in [1i64, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 31, 33].into_iter().enumerate() {
            for single in [false, true] {
                // A mixed batch of n (not a multiple of 8) with two batch dims; scales from tiny to huge.
                let n = 6 + 11 * (round % 3) as i64;
                let mut scales = vec![1.0, 1.0, 1.0, 1e-30, 1e-20, 1e-12, 1e12, 1e20];
                if !single {
                    scales.extend([1e-100, 1e60, 1e100]);
                }
                let labels: Vec<(usize, f64)> = (0..2 * n as usize).map(|i| ((i * 7 + round) % KINDS.len(), scales[(i * 5 + round / 2) % scales.len()])).collect();
                let batch = Tensor::stack(&labels.iter().map(|&(kind, scale)| any_matrix(kind, t) * scale).collect::<Vec<_>>(), 0).reshape([2, n, t, t]);
                let (batch, widened) = if single {
                    let b = batch.to_kind(Kind::Float);
                    let w = b.to_kind(Kind::Double);
                    (b, w)
                } else {
                    (batch.shallow_clone(), batch)
                };
                let flat = widened.reshape([-1, t, t]);
                for tau in [0.5, 0.9, 0.99] {
                    let (k, m) = (energy_rank(&batch, tau, Kind::Double).unwrap(), mass(&batch, tau).unwrap());
                    assert_eq!(k.size(), [2, n]);
                    let (expected_k, expected_m) = (reference_rank(&flat, tau), reference_mass(&flat, tau));
                    for (i, ((&k, &m), &(kind, scale))) in ints(&k).iter().zip(&ints(&m)).zip(&labels).enumerate() {
                        let what = format!("matrix {i}: {} × {scale:e}, T = {t}, tau = {tau}, float32 input: {single}", KINDS[kind]);
                        if (k, m) != (expected_k[i], expected_m[i]) {
                            let values = Vec::<f64>::try_from(flat.get(i as i64).reshape([-1])).unwrap();
                            wrong.push(format!("{what}: k* {k} (expected {}), m* {m} (expected {}), {values:?}", expected_k[i], expected_m[i]));
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{} of {checked} wrong:\n{}", wrong.len(), wrong.iter().map(|w| &w[..w.len().min(400)]).collect::<Vec<_>>().join("\n"));
        assert!(checked > 2000, "{checked}");
    }

    #[test]
    fn k_star_is_exact_a_hair_either_side_of_the_threshold() {
        // τ a relative 1e-4 to 3e-8 either side of where k* steps: inside float32's margin, so only a sound
        // certificate (or float64) keeps the answer exact.
        tch::manual_seed(17);
        let (mut checked, mut wrong) = (0, vec![]);
        for t in [3i64, 7, 16, 33, 100] {
            let batch = Tensor::stack(&(0..12).map(|i| any_matrix([0, 1, 2, 3, 5, 7][i % 6], t)).collect::<Vec<_>>(), 0);
            let sigma: Vec<Vec<f64>> = Vec::try_from(batch.svd(true, false).1.square()).unwrap();
            for (i, s) in sigma.iter().enumerate() {
                let total: f64 = s.iter().sum();
                let k = 1 + (i * 5) % t as usize;
                let cum: f64 = s[..k].iter().sum();
                for delta in [-1e-4, -1e-6, -1e-7, -3e-8, 3e-8, 1e-7, 1e-6, 1e-4] {
                    let tau = cum / total * (1.0 + delta);
                    if !(tau > 0.0 && tau < 1.0) {
                        continue;
                    }
                    let a = batch.get(i as i64);
                    let (found, expected) = (ints(&energy_rank(&a, tau, Kind::Double).unwrap())[0], reference_rank(&a.unsqueeze(0), tau)[0]);
                    if found != expected {
                        wrong.push(format!("T = {t}, matrix {i}, k = {k}, delta = {delta:e}: {found}, expected {expected}"));
                    }
                    checked += 1;
                }
            }
        }
        assert!(wrong.is_empty(), "{} of {checked} wrong:\n{}", wrong.len(), wrong.join("\n"));
        assert!(checked > 400, "{checked}");
    }

    #[test]
    fn k_star_does_not_change_with_the_scale_of_the_matrix() {
        // Unscaled, float32 squared 1e-12 to zero (and said "certain"), float64 did at 1e-100, both overflowed above,
        // and the power step passed every matrix of entries ≥ 1e50 as rank 1 (identity × 1e60: 1, not 36).
        let batch = Tensor::stack(&[identity(40), uniform(40), previous(40), sink(40) * 0.2 + uniform(40) * 0.8], 0);
        let expected = reference_rank(&batch, 0.9);
        assert_eq!(expected[..3], [36, 4, 35]);
        for scale in [1e-30, 1e-20, 1e-12, 1e12, 1e20, 1e30] {
            assert_eq!(ints(&energy_rank(&(&batch * scale).to_kind(Kind::Float), 0.9, Kind::Double).unwrap()), expected, "float32 × {scale:e}");
        }
        for scale in [1e-150, 1e-100, 1e-30, 1e-12, 1e12, 1e30, 1e60, 1e100, 1e150] {
            assert_eq!(ints(&energy_rank(&(&batch * scale), 0.9, Kind::Double).unwrap()), expected, "float64 × {scale:e}");
        }
        // Half the rows all ones, the others on the diagonal: ‖Aᵀw‖² is 20 times ‖A‖²_F, and overflowed where ‖A‖²_F does not.
        let block = matrix(40, |i, j| if i < 20 { 1.0 } else { (i == j) as i64 as f64 });
        assert_eq!(reference_rank(&block.unsqueeze(0), 0.99), [13]);
        assert_eq!(ints(&energy_rank(&(block * 3e152), 0.99, Kind::Double).unwrap()), [13]);
    }

    #[test]
    fn zero_nan_and_negative_matrices() {
        let zeros = Tensor::zeros([2, 30, 30], (Kind::Float, Device::Cpu));
        assert_eq!(ints(&energy_rank(&zeros, 0.9, Kind::Double).unwrap()), [1, 1]);
        assert_eq!(ints(&mass(&zeros, 0.9).unwrap()), [1, 1]);
        let broken = uniform(30).expand([3, 30, 30], false).copy();
        let _ = broken.get(2).get(5).get(1).fill_(f64::NAN);
        for e in [energy_rank(&broken, 0.9, Kind::Double).unwrap_err(), mass(&broken, 0.9).unwrap_err(), entropy(&broken).unwrap_err()] {
            assert!(e.to_string().contains("attention matrix 2 of a batch of [3]") && e.to_string().contains("NaN"), "{e}");
        }
        // Not attention: the float32 bounds assume non-negative entries, so these take float64 throughout.
        tch::manual_seed(3);
        let signed = Tensor::randn([40, 25, 25], (Kind::Double, Device::Cpu)) * Tensor::rand([40, 1, 1], (Kind::Double, Device::Cpu)).exp();
        for tau in [0.5, 0.9] {
            assert_eq!(ints(&energy_rank(&signed, tau, Kind::Double).unwrap()), reference_rank(&signed, tau), "tau = {tau}");
        }
    }

    #[test]
    fn one_power_step_settles_sink_heads() {
        let facts = |a: Tensor| {
            let a = Vec::<f64>::try_from(a.reshape([-1])).unwrap();
            super::facts(&a, 100, 0.9 * (1.0 - slack(true)))
        };
        assert!(facts(sink(100) * 0.9 + uniform(100) * 0.1).rank1);
        assert!(facts(sink(100)).rank1);
        let identity = facts(identity(100));
        assert!(!identity.rank1 && identity.bound == 90 && identity.widths.iter().enumerate().all(|(i, &w)| w as usize == i + 1));
    }

    #[test]
    fn batch_dims_are_kept() {
        let a = uniform(10).expand([2, 3, 10, 10], false);
        assert_eq!(energy_rank(&a, 0.9, Kind::Double).unwrap().size(), [2, 3]);
        assert_eq!(mass(&a, 0.9).unwrap().size(), [2, 3]);
        assert_eq!(entropy(&a).unwrap().1.size(), [2, 3]);
        assert!(energy_rank(&Tensor::ones([3, 4], (Kind::Double, Device::Cpu)), 0.9, Kind::Double).is_err());
        // No matrices at all: a null data pointer, once read as a slice, crashed the process.
        let none = Tensor::zeros([0, 2, 5, 5], (Kind::Float, Device::Cpu));
        assert_eq!(energy_rank(&none, 0.9, Kind::Double).unwrap().size(), [0, 2]);
        assert_eq!(mass(&none, 0.9).unwrap().size(), [0, 2]);
        assert_eq!(entropy(&none).unwrap().0.size(), [0, 2]);
    }

    #[test]
    fn entropy_equals_libtorchs_xlogy() {
        tch::manual_seed(11);
        let a = attention_like(50, 33);
        let rows = -a.xlogy(&a).sum_dim_intlist(-1, false, None);
        let keys = Tensor::arange_start(2, 34, (Kind::Double, Device::Cpu)).log();
        let (h, normalised) = entropy(&a).unwrap();
        assert!(h.allclose(&rows.mean_dim(-1, false, None), 1e-12, 1e-12, false));
        assert!(normalised.allclose(&(rows.narrow(-1, 1, 32) / keys).mean_dim(-1, false, None), 1e-12, 1e-12, false));
        assert_eq!(entropy(&a.to_kind(Kind::Float)).unwrap().0.kind(), Kind::Double);
    }

    #[test]
    fn entropy_and_sink_fraction() {
        let (h, normalised) = entropy(&uniform(100)).unwrap();
        assert!((scalar(h) - 3.637).abs() < 5e-4);
        assert!((scalar(normalised) - 1.0).abs() < 1e-12);
        let (h, normalised) = entropy(&sink(100)).unwrap();
        assert_eq!((scalar(h), scalar(normalised)), (0.0, 0.0));
        assert_eq!(scalar(sink_fraction(&sink(100)).unwrap()), 1.0);
        assert!((scalar(sink_fraction(&identity(100)).unwrap()) - 0.01).abs() < 1e-15);
    }
}
