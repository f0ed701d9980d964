//! The eigenvalue work behind k*, on the CPU, for eight matrices at once: matrix l of a group lives in lane l
//! of every vector, so each arithmetic step is one SIMD instruction for all eight (AVX2 where the CPU has it).
//!
//! For a group: the Gram matrices G = AAᵀ (their eigenvalues are the σᵢ²), Householder reduction of G to a
//! tridiagonal matrix, then bisection with Sturm counts for the largest eigenvalues, from the top, until every
//! lane's running sum reaches its threshold. Bisection takes the same steps in every lane, where QR iterations
//! would branch per matrix; that is what lets eight matrices go in lockstep. Small matrices one at a time are
//! bound by loop overhead and by the latency of QR's divisions and square roots (libtorch's eigvalsh: about
//! 250 µs a 100 × 100 matrix here; this: about 80 µs).

use std::ops::{Add, Div, Mul, Neg, Sub};

/// True where the CPU has AVX2 and FMA (the answer is cached by std).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[allow(unreachable_code)]
    false
}

/// `$avx2` where the CPU has AVX2 and FMA (and `when` allows), else `$portable`: the same code, compiled for
/// each (LLVM turns an eight-lane loop into one AVX instruction), so the plugin still runs on CPUs without them.
macro_rules! simd {
    ($avx2:expr, $portable:expr) => {
        simd!(when true; $avx2, $portable)
    };
    (when $allowed:expr; $avx2:expr, $portable:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if $allowed && $crate::lanes::has_avx2() {
            // SAFETY: the CPU has the features the function is compiled for.
            #[allow(unused_unsafe)]
            unsafe {
                $avx2
            }
        } else {
            $portable
        }
        #[cfg(not(target_arch = "x86_64"))]
        $portable
    }};
}
pub(crate) use simd;

/// Matrices per group.
pub const LANES: usize = 8;

/// One value per matrix of the group.
type Lanes<R> = [R; LANES];

/// float32 or float64 arithmetic.
pub trait Real:
    Copy + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// Unit roundoff ×2 (machine epsilon), as f64.
    const EPSILON: f64;
    /// Smallest normal number: the floor of a Sturm pivot.
    const MIN_POSITIVE: Self;
    /// Bits of the significand.
    const BITS: usize;
    fn of(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPSILON: f64 = <$t>::EPSILON as f64;
            const MIN_POSITIVE: Self = <$t>::MIN_POSITIVE;
            const BITS: usize = <$t>::MANTISSA_DIGITS as usize;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// The element types of the matrices handed in (attention in float32, or float64).
pub trait Sample: Copy + Into<f64> + Send + Sync {}
impl Sample for f32 {}
impl Sample for f64 {}

/// k̂ of one matrix: the smallest k whose k largest eigenvalues, as computed, reach the threshold, and whether
/// that holds for certain despite rounding (see `Solver::ranks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub rank: i64,
    pub certain: bool,
}

/// Scratch space for groups of `t × t` matrices, reused from group to group.
pub struct Solver<R: Real> {
    t: usize,
    /// The group's matrices, row-major, interleaved: a[i·t + j][l] = Aₗ[i, j].
    a: Vec<Lanes<R>>,
    /// The Gram matrices' lower triangles, row-major, reduced in place.
    g: Vec<Lanes<R>>,
    /// Columns of row i that may be nonzero in any of the group's matrices: 1 + the last nonzero column of rows
    /// 0..=i (i + 1 when causal). Never decreasing, so a row below j has row j's nonzero columns in range.
    width: Vec<usize>,
    diagonal: Vec<Lanes<R>>,
    off_diagonal: Vec<Lanes<R>>,
    /// The off-diagonal squared, and the floor of a Sturm pivot, for the counts.
    off_diagonal_squared: Vec<Lanes<R>>,
    pivot_floor: Lanes<R>,
    v: Vec<Lanes<R>>,
    p: Vec<Lanes<R>>,
    /// Brackets [lo, hi] of the largest eigenvalues, largest first.
    brackets: Vec<(Lanes<R>, Lanes<R>)>,
    /// Whether to use AVX2 where the CPU has it (tests compare both ways).
    simd: bool,
}

/// A matrix handed to `Solver::ranks`: row-major `t × t`, and the width of each row (1 + its last nonzero column).
pub struct Matrix<'a, S> {
    pub values: &'a [S],
    pub widths: &'a [u32],
    /// τ·‖A‖²_F (with whatever slack the caller wants), in f64.
    pub threshold: f64,
    /// A power of two the values are multiplied by (`scale_for`), the threshold by its square.
    pub scale: f64,
}

/// The power of two that brings a matrix of Frobenius energy ‖A‖²_F = `energy` to an energy of about 1 to 4. Unscaled,
/// float32 squares entries of 1e-12 to zero twice over (Gram, then Householder) and entries of 1e10 to infinity, and
/// float64 does the same at 1e-80 and 1e80: k̂ came out wrong, in float32 even marked certain. Exact, so k* is kept.
pub fn scale_for(energy: f64) -> f64 {
    if energy > 0.0 && energy.is_finite() {
        2f64.powi(-(energy.sqrt().log2().floor() as i32))
    } else {
        1.0
    }
}

impl<R: Real> Solver<R> {
    pub fn new(t: usize) -> Self {
        let lanes = || vec![[R::ZERO; LANES]; t];
        Solver {
            t,
            a: vec![[R::ZERO; LANES]; t * t],
            g: vec![[R::ZERO; LANES]; t * t],
            width: vec![0; t],
            diagonal: lanes(),
            off_diagonal: lanes(),
            off_diagonal_squared: lanes(),
            pivot_floor: [R::ZERO; LANES],
            v: lanes(),
            p: lanes(),
            brackets: Vec::with_capacity(t),
            simd: true,
        }
    }

    /// k̂ for each of up to `LANES` matrices. `certain` is true where k̂ is k* for certain despite rounding: the
    /// computed eigenvalues of G are each within δ = 2·T·ε·‖G‖₂ of the true ones (forming G from a non-negative A
    /// errs by γ_T·G entrywise, at most T·ε/2·‖G‖₂ in norm; Householder reduction is backward stable with an error
    /// of a modest p(T)·ε·‖G‖₂, p(T) = T here, generous; bisection of a tridiagonal matrix with Sturm counts is
    /// exact for entries perturbed by a few ε), so the sum of the top j is within j·δ (Lidskii), plus the width
    /// of the brackets, which are the ones summed. Where k̂ reaches the threshold by that much and k̂ − 1 misses
    /// it by that much, k̂ = k*.
    pub fn ranks<S: Sample>(&mut self, matrices: &[Matrix<S>]) -> Vec<Estimate> {
        assert!(!matrices.is_empty() && matrices.len() <= LANES, "a group holds 1 to {LANES} matrices");
        // Each stage apart: inlined into a single body they ran about 1.7× slower.
        simd!(when self.simd; avx2::load(self, matrices), self.load(matrices));
        simd!(when self.simd; avx2::gram(self), self.gram());
        simd!(when self.simd; avx2::tridiagonalise(self), self.tridiagonalise());
        self.decide(&thresholds(matrices), matrices.len())
    }

    /// Interleaves the matrices into lanes; a group of fewer than `LANES` repeats its first matrix.
    #[inline(always)]
    fn load<S: Sample>(&mut self, matrices: &[Matrix<S>]) {
        let t = self.t;
        let mut width = 0;
        for i in 0..t {
            width = matrices.iter().map(|m| m.widths[i] as usize).fold(width, usize::max);
            self.width[i] = width;
            let row = &mut self.a[i * t..i * t + width];
            for l in 0..LANES {
                let m = &matrices[if l < matrices.len() { l } else { 0 }];
                for (x, &y) in row.iter_mut().zip(&m.values[i * t..i * t + width]) {
                    x[l] = R::of(y.into() * m.scale);
                }
            }
        }
    }

    /// The lower triangle of G = AAᵀ: G[i, j] = Σₖ A[i, k]·A[j, k], over row j's width for i ≥ j.
    #[inline(always)]
    fn gram(&mut self) {
        let (t, a, g, width) = (self.t, &self.a, &mut self.g, &self.width);
        for j in 0..t {
            let aj = &a[j * t..j * t + width[j]];
            let k = aj.len();
            let mut i = j;
            // Four rows at a time share the loads of row j.
            while i + 4 <= t {
                let row = |r: usize| &a[(i + r) * t..(i + r) * t + k];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let zero = [R::ZERO; LANES];
                let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
                for k in 0..k {
                    let x = aj[k];
                    s0 = mul_add(r0[k], x, s0);
                    s1 = mul_add(r1[k], x, s1);
                    s2 = mul_add(r2[k], x, s2);
                    s3 = mul_add(r3[k], x, s3);
                }
                for (r, s) in [s0, s1, s2, s3].into_iter().enumerate() {
                    g[(i + r) * t + j] = s;
                }
                i += 4;
            }
            for i in i..t {
                g[i * t + j] = a[i * t..i * t + k].iter().zip(aj).fold([R::ZERO; LANES], |s, (x, y)| mul_add(*x, *y, s));
            }
        }
    }

    /// Householder reduction of G (lower triangle) to tridiagonal form, as LAPACK's sytd2 does it: for each
    /// column k, the reflector H = I − τvvᵀ that zeroes the column below its subdiagonal, applied to the
    /// trailing block as A ← A − vwᵀ − wvᵀ with w = p − (τ/2)(pᵀv)v, p = τAv.
    #[inline(always)]
    fn tridiagonalise(&mut self) {
        let t = self.t;
        for k in 0..t {
            self.diagonal[k] = self.g[k * t + k];
            if k + 1 == t {
                break;
            }
            let m = t - k - 1;
            let below = |r: usize| (k + 1 + r) * t + k;
            let alpha = self.g[below(0)];
            let mut sigma = [R::ZERO; LANES];
            for r in 1..m {
                let x = self.g[below(r)];
                sigma = mul_add(x, x, sigma);
            }
            let (mut tau, mut beta, mut scale) = ([R::ZERO; LANES], alpha, [R::ZERO; LANES]);
            for l in 0..LANES {
                // A column already zero below the subdiagonal needs no reflector (τ = 0).
                if sigma[l] > R::ZERO {
                    let norm = (alpha[l] * alpha[l] + sigma[l]).sqrt();
                    let b = if alpha[l] > R::ZERO { -norm } else { norm };
                    tau[l] = (b - alpha[l]) / b;
                    scale[l] = R::ONE / (alpha[l] - b);
                    beta[l] = b;
                }
            }
            self.off_diagonal[k] = beta;
            if m == 1 {
                continue;
            }
            let (v, p) = (&mut self.v[..m], &mut self.p[..m]);
            v[0] = [R::ONE; LANES];
            for (r, v) in v.iter_mut().enumerate().skip(1) {
                *v = mul(self.g[below(r)], scale);
            }
            symv_lower(&self.g, t, k + 1, v, p);
            let mut pv = [R::ZERO; LANES];
            for (p, v) in p.iter_mut().zip(v.iter()) {
                *p = mul(*p, tau);
                pv = mul_add(*p, *v, pv);
            }
            let half_tau_pv = mul(mul([R::of(0.5); LANES], tau), pv);
            for (p, v) in p.iter_mut().zip(v.iter()) {
                *p = sub(*p, mul(half_tau_pv, *v));
            }
            syr2_lower(&mut self.g, t, k + 1, v, p);
        }
    }

    /// The number of eigenvalues of each lane's tridiagonal matrix below each of four shifts (Sturm counts from
    /// the LDLᵀ pivots; four independent chains hide the latency of the division).
    #[inline(always)]
    fn count_below(&self, x: [Lanes<R>; 4]) -> [Lanes<R>; 4] {
        let (d, e2, pivmin) = (&self.diagonal, &self.off_diagonal_squared, self.pivot_floor);
        #[inline(always)]
        fn step<R: Real>(d: Lanes<R>, x: Lanes<R>, e2: Lanes<R>, q: Lanes<R>, pivmin: Lanes<R>, c: &mut Lanes<R>) -> Lanes<R> {
            let mut next = q;
            for l in 0..LANES {
                let y = (d[l] - x[l]) - e2[l] / q[l];
                // A zero pivot would divide by zero next; LAPACK's dlaebz moves it to −pivmin.
                let y = if y.abs() < pivmin[l] { -pivmin[l] } else { y };
                next[l] = y;
                c[l] = c[l] + if y < R::ZERO { R::ONE } else { R::ZERO };
            }
            next
        }
        let mut c = [[R::ZERO; LANES]; 4];
        let infinite = [R::of(f64::INFINITY); LANES];
        let zero = [R::ZERO; LANES];
        let mut q = [zero; 4];
        for s in 0..4 {
            q[s] = step(d[0], x[s], zero, infinite, pivmin, &mut c[s]);
        }
        for (d, e2) in d[1..self.t].iter().zip(&e2[..self.t - 1]) {
            q[0] = step(*d, x[0], *e2, q[0], pivmin, &mut c[0]);
            q[1] = step(*d, x[1], *e2, q[1], pivmin, &mut c[1]);
            q[2] = step(*d, x[2], *e2, q[2], pivmin, &mut c[2]);
            q[3] = step(*d, x[3], *e2, q[3], pivmin, &mut c[3]);
        }
        c
    }

    /// Brackets the largest eigenvalues four at a time until every lane's sum reaches its threshold, then k̂.
    fn decide(&mut self, thresholds: &Lanes<f64>, used: usize) -> Vec<Estimate> {
        let t = self.t;
        let (mut low, mut high) = ([R::of(f64::INFINITY); LANES], [R::of(f64::NEG_INFINITY); LANES]);
        let mut largest_e2 = [R::ZERO; LANES];
        for i in 0..t {
            let e = |i: usize| if i < t - 1 { self.off_diagonal[i] } else { [R::ZERO; LANES] };
            let (left, right) = (if i > 0 { e(i - 1) } else { [R::ZERO; LANES] }, e(i));
            for l in 0..LANES {
                let radius = left[l].abs() + right[l].abs();
                let d = self.diagonal[i][l];
                if d - radius < low[l] {
                    low[l] = d - radius;
                }
                if d + radius > high[l] {
                    high[l] = d + radius;
                }
                let e2 = right[l] * right[l];
                self.off_diagonal_squared[i][l] = e2;
                if e2 > largest_e2[l] {
                    largest_e2[l] = e2;
                }
            }
        }
        for l in 0..LANES {
            self.pivot_floor[l] = R::MIN_POSITIVE * if largest_e2[l] > R::ONE { largest_e2[l] } else { R::ONE };
            // G is positive semi-definite: its largest eigenvalues are not below zero.
            if low[l] < R::ZERO {
                low[l] = R::ZERO;
            }
        }
        let tolerance = R::of(t as f64 * R::EPSILON / 2.0);
        self.brackets.clear();
        let mut sums = [0.0f64; LANES];
        let mut top = high;
        let mut k = 0;
        // At least one block: δ comes from the largest eigenvalue's bracket (a zero matrix's threshold is 0).
        while k == 0 || (k < t && (0..used).any(|l| sums[l] < thresholds[l])) {
            // Eigenvalues k + 1 ..= k + 4 (1-based, largest first) all lie in [low, top].
            let (mut lo, mut hi) = ([low; 4], [top; 4]);
            // Halve until every bracket is narrower than T·ε/2 of the largest eigenvalue (a quarter of δ), or
            // the floats run out (the cap: each step gains a bit).
            for _ in 0..2 * R::BITS {
                let largest = if k == 0 { hi[0] } else { self.brackets[0].1 };
                if !(0..4).any(|r| (0..LANES).any(|l| hi[r][l] - lo[r][l] > largest[l] * tolerance)) {
                    break;
                }
                let mut x = lo;
                for r in 0..4 {
                    for l in 0..LANES {
                        x[r][l] = R::of(0.5) * (lo[r][l] + hi[r][l]);
                    }
                }
                let below = simd!(when self.simd; avx2::count_below(self, x), self.count_below(x));
                for r in 0..4 {
                    // λ_{k+r+1} ≥ x exactly when at least k + r + 1 eigenvalues are not below x.
                    // As floats: past the last eigenvalue (t − k − r − 1 < 0) a usize would wrap, or panic in debug.
                    let rank = R::of(t as f64 - (k + r + 1) as f64);
                    for l in 0..LANES {
                        if below[r][l] <= rank {
                            lo[r][l] = x[r][l];
                        } else {
                            hi[r][l] = x[r][l];
                        }
                    }
                }
            }
            for r in 0..4.min(t - k) {
                self.brackets.push((lo[r], hi[r]));
                for l in 0..LANES {
                    sums[l] += 0.5 * (lo[r][l].to_f64() + hi[r][l].to_f64());
                }
            }
            top = hi[3.min(t - k - 1)];
            k += 4;
        }
        (0..used).map(|l| self.estimate(l, thresholds[l])).collect()
    }

    /// k̂ of lane l from its brackets, and whether it is certain (see `ranks`).
    fn estimate(&self, l: usize, threshold: f64) -> Estimate {
        let delta = 2.0 * self.t as f64 * R::EPSILON * self.brackets[0].1[l].to_f64();
        let (mut low, mut mid, mut high_before) = (0.0, 0.0, 0.0);
        for (k, (lo, hi)) in self.brackets.iter().enumerate() {
            let (lo, hi) = (lo[l].to_f64(), hi[l].to_f64());
            low += lo;
            mid += 0.5 * (lo + hi);
            if mid >= threshold {
                let rank = k as f64 + 1.0;
                let certain = low - rank * delta >= threshold && high_before + (rank - 1.0) * delta < threshold;
                return Estimate { rank: rank as i64, certain };
            }
            high_before += hi;
        }
        // Rounding left the whole spectrum short of the threshold (τ = 1, or a zero matrix's NaN threshold).
        Estimate { rank: self.t as i64, certain: false }
    }
}

fn thresholds<S>(matrices: &[Matrix<S>]) -> Lanes<f64> {
    let mut out = [f64::INFINITY; LANES];
    for (o, m) in out.iter_mut().zip(matrices) {
        *o = m.threshold * m.scale * m.scale;
    }
    out
}

/// c + a·b, lane by lane (a multiplication and an addition, no fused rounding: the same on every CPU).
#[inline(always)]
fn mul_add<R: Real>(a: Lanes<R>, b: Lanes<R>, c: Lanes<R>) -> Lanes<R> {
    let mut out = c;
    for l in 0..LANES {
        out[l] = c[l] + a[l] * b[l];
    }
    out
}

#[inline(always)]
fn add<R: Real>(a: Lanes<R>, b: Lanes<R>) -> Lanes<R> {
    let mut out = a;
    for l in 0..LANES {
        out[l] = a[l] + b[l];
    }
    out
}

#[inline(always)]
fn sub<R: Real>(a: Lanes<R>, b: Lanes<R>) -> Lanes<R> {
    let mut out = a;
    for l in 0..LANES {
        out[l] = a[l] - b[l];
    }
    out
}

#[inline(always)]
fn mul<R: Real>(a: Lanes<R>, b: Lanes<R>) -> Lanes<R> {
    let mut out = a;
    for l in 0..LANES {
        out[l] = a[l] * b[l];
    }
    out
}

/// p = Av for the symmetric m × m block of g at (base, base), m = v.len(), from its lower triangle.
#[inline(always)]
fn symv_lower<R: Real>(g: &[Lanes<R>], t: usize, base: usize, v: &[Lanes<R>], p: &mut [Lanes<R>]) {
    let m = v.len();
    p.fill([R::ZERO; LANES]);
    let row = |i: usize| &g[(base + i) * t + base..(base + i) * t + base + i + 1];
    let mut i = 0;
    // Four rows at a time: each p[j] is loaded and stored once for the four. Whole-vector steps (`mul_add`), not
    // loops over the four rows, or LLVM vectorises across the rows and shuffles.
    while i + 4 <= m {
        let (r0, r1, r2, r3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        let (v0, v1, v2, v3) = (v[i], v[i + 1], v[i + 2], v[i + 3]);
        let zero = [R::ZERO; LANES];
        let (mut s0, mut s1, mut s2, mut s3) = (zero, zero, zero, zero);
        for j in 0..i {
            let (g0, g1, g2, g3, vj) = (r0[j], r1[j], r2[j], r3[j], v[j]);
            s0 = mul_add(g0, vj, s0);
            s1 = mul_add(g1, vj, s1);
            s2 = mul_add(g2, vj, s2);
            s3 = mul_add(g3, vj, s3);
            p[j] = mul_add(g3, v3, mul_add(g2, v2, mul_add(g1, v1, mul_add(g0, v0, p[j]))));
        }
        // The 4 × 4 block on the diagonal.
        let (rows, vi, mut sums) = ([r0, r1, r2, r3], [v0, v1, v2, v3], [s0, s1, s2, s3]);
        for r in 0..4 {
            for c in 0..r {
                let x = rows[r][i + c];
                sums[r] = mul_add(x, vi[c], sums[r]);
                sums[c] = mul_add(x, vi[r], sums[c]);
            }
            sums[r] = mul_add(rows[r][i + r], vi[r], sums[r]);
        }
        for (r, s) in sums.into_iter().enumerate() {
            p[i + r] = add(p[i + r], s);
        }
        i += 4;
    }
    for i in i..m {
        let (r, vi) = (row(i), v[i]);
        let mut s = [R::ZERO; LANES];
        for ((g, vj), pj) in r[..i].iter().zip(&v[..i]).zip(&mut p[..i]) {
            s = mul_add(*g, *vj, s);
            *pj = mul_add(*g, vi, *pj);
        }
        p[i] = mul_add(r[i], vi, add(p[i], s));
    }
}

/// A ← A − vwᵀ − wvᵀ on the lower triangle of the m × m block of g at (base, base).
#[inline(always)]
fn syr2_lower<R: Real>(g: &mut [Lanes<R>], t: usize, base: usize, v: &[Lanes<R>], w: &[Lanes<R>]) {
    for i in 0..v.len() {
        let start = (base + i) * t + base;
        let (vi, wi) = (v[i], w[i]);
        for ((x, vj), wj) in g[start..=start + i].iter_mut().zip(&v[..=i]).zip(&w[..=i]) {
            *x = sub(*x, mul_add(wi, *vj, mul(vi, *wj)));
        }
    }
}

/// The stages compiled for AVX2 and FMA. Each calls an `#[inline(always)]` function, which is what makes it
/// compiled with these features.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Lanes, Matrix, Real, Sample, Solver};

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn load<R: Real, S: Sample>(s: &mut Solver<R>, matrices: &[Matrix<S>]) {
        s.load(matrices)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gram<R: Real>(s: &mut Solver<R>) {
        s.gram()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tridiagonalise<R: Real>(s: &mut Solver<R>) {
        s.tridiagonalise()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn count_below<R: Real>(s: &Solver<R>, x: [Lanes<R>; 4]) -> [Lanes<R>; 4] {
        s.count_below(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random causal row-stochastic matrix, from sink-like to diffuse by `seed`.
    fn attention(t: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let (temperature, sink) = (0.2 + 4.0 * next(), 10.0 * next() - 2.0);
        let mut a = vec![0.0; t * t];
        for i in 0..t {
            let row = &mut a[i * t..(i + 1) * t];
            for (j, x) in row[..=i].iter_mut().enumerate() {
                *x = (temperature * (2.0 * next() - 1.0) + if j == 0 { sink } else { 0.0 }).exp();
            }
            let sum: f64 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= sum);
        }
        a
    }

    fn widths(a: &[f64], t: usize) -> Vec<u32> {
        a.chunks(t).map(|row| row.iter().rposition(|&x| x != 0.0).map_or(0, |p| p as u32 + 1)).collect()
    }

    fn ranks<R: Real>(solver: &mut Solver<R>, matrices: &[(Vec<f64>, Vec<u32>)], tau: f64) -> Vec<Estimate> {
        let group: Vec<Matrix<f64>> = matrices
            .iter()
            .map(|(a, w)| {
                let energy = a.iter().map(|x| x * x).sum::<f64>();
                Matrix { values: a, widths: w, threshold: tau * energy, scale: scale_for(energy) }
            })
            .collect();
        solver.ranks(&group)
    }

    #[test]
    fn a_diagonal_matrix_has_its_squared_entries_as_eigenvalues() {
        // σᵢ² = 16, 9, 4, 1 of 30: τ = 0.5 needs 16 (k = 1), τ = 0.8 needs 16 + 9 = 25 (k = 2), τ = 0.9 needs 29.
        let t = 4;
        let mut a = vec![0.0; t * t];
        for (i, x) in [1.0, 4.0, 2.0, 3.0].into_iter().enumerate() {
            a[i * t + i] = x;
        }
        let w = widths(&a, t);
        // The last: 30 of 30 is within float32's margin of 30·(1 − 1e-9), so not certain in float32.
        for (tau, k, certain) in [(0.5, 1, true), (0.8, 2, true), (0.9, 3, true), (1.0 - 1e-9, 4, false)] {
            let found = ranks(&mut Solver::<f32>::new(t), &[(a.clone(), w.clone())], tau)[0];
            assert_eq!(found, Estimate { rank: k, certain }, "tau = {tau}");
            assert_eq!(ranks(&mut Solver::<f64>::new(t), &[(a.clone(), w.clone())], tau)[0].rank, k, "tau = {tau} in f64");
        }
    }

    #[test]
    fn lanes_do_not_mix_and_simd_matches_the_portable_code() {
        let t = 37;
        let matrices: Vec<(Vec<f64>, Vec<u32>)> = (0..11).map(|s| attention(t, s)).map(|a| (a.clone(), widths(&a, t))).collect();
        let alone: Vec<Estimate> = matrices.iter().map(|m| ranks(&mut Solver::<f32>::new(t), std::slice::from_ref(m), 0.9)[0]).collect();
        assert!(alone.iter().any(|e| e.rank > 3), "the test needs matrices of some rank: {alone:?}");
        let mut solver = Solver::<f32>::new(t);
        let grouped: Vec<Estimate> = matrices.chunks(LANES).flat_map(|g| ranks(&mut solver, g, 0.9)).collect();
        assert_eq!(grouped, alone, "a matrix's answer must not depend on its group");
        solver.simd = false;
        let portable: Vec<Estimate> = matrices.chunks(LANES).flat_map(|g| ranks(&mut solver, g, 0.9)).collect();
        assert_eq!(portable, alone, "the AVX2 build must compute what the portable one does");
    }

    #[test]
    fn scale_for_brings_any_energy_near_1_by_a_power_of_two() {
        for energy in [5e-324, 1e-320, 1e-30, 0.3, 1.0, 3.999, 4.0, 17.0, 1e30, 1e300, f64::MAX] {
            let scale = scale_for(energy);
            assert!(scale.to_bits() & ((1u64 << 52) - 1) == 0, "{energy:e}: {scale:e} is not a power of two");
            // [1, 4) but for the rounding of the square root (f64::MAX: 1 − 2⁻⁵³).
            assert!((0.99..4.0).contains(&(energy * scale * scale)), "{energy:e}: {scale:e}");
        }
        assert_eq!((scale_for(0.0), scale_for(f64::INFINITY), scale_for(f64::NAN)), (1.0, 1.0, 1.0));
    }

    #[test]
    fn a_zero_matrix_and_a_tie_are_left_to_float64() {
        let t = 12;
        let zero = (vec![0.0; t * t], vec![0; t]);
        assert_eq!(ranks(&mut Solver::<f32>::new(t), &[zero], 0.9)[0], Estimate { rank: 1, certain: false });
        // Rows 3c..3c+2 all on key c: σ² = 3 four times (12 units), and τ = 0.5 lands exactly on 2 of them.
        let a: Vec<f64> = (0..t * t).map(|n| ((n % t) == (n / t) / 3) as u8 as f64).collect();
        let w = widths(&a, t);
        assert!(!ranks(&mut Solver::<f32>::new(t), &[(a.clone(), w.clone())], 0.5)[0].certain);
        assert_eq!(ranks(&mut Solver::<f64>::new(t), &[(a, w)], 0.5 * (1.0 - 1e-9))[0].rank, 2);
    }
}
