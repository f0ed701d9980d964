//! The math of the attention analyzers, on batches of attention matrices `[..., T, T]` (rows are
//! queries, post-softmax, causal). Every function returns one value per matrix, shape `[...]`.

use rayon::prelude::*;
use scalpel_sdk::prelude::*;
use std::sync::{Mutex, PoisonError};

/// Relative slack of every threshold test: `cum ≥ τ·total·(1 − slack)`. The analytic cases sit exactly
/// on the threshold (identity at T = 100: 90 of 100 units of energy at k = 90), and the rounding of
/// eigenvalues, sums and τ·total must not push k* one past the tie. Far below any real energy gap.
fn slack(kind: Kind) -> f64 {
    if kind == Kind::Float {
        1e-5
    } else {
        1e-9
    }
}

/// Multiplications by AAᵀ before the k* = 1 test: enough for the sink-like matrices it is meant to catch
/// (on the benchmark's attention, one already catches every k* = 1 matrix; none catches about 60 %).
const POWER_STEPS: usize = 1;

/// k* = smallest k with Σ_{i≤k} σᵢ² ≥ τ·Σσⱼ², as `Int64`. `Double`: the exact k* (as float64 arithmetic
/// finds it), computed in float32 wherever float32's error bound decides it; `Float`: float32 alone, which
/// may differ where the energy sits within about 1e-5 (relative) of the threshold.
pub fn energy_rank(attn: &Tensor, tau: f64, kind: Kind) -> Result<Tensor> {
    let (batch, t) = matrix_shape(attn)?;
    let flat = attn.f_reshape([-1, t, t])?;
    let k = on_all_cores(&flat, |a| {
        if kind == Kind::Double {
            certified_rank(&a, tau)
        } else {
            rank_of_batch(&a.f_to_kind(kind)?, tau, kind)
        }
    })?;
    Ok(k.f_reshape(&batch)?)
}

/// The exact k* of a `[B, T, T]` batch of non-negative matrices, from float32 where that is certain.
///
/// Float32 eigenvalues of the Gram matrix G = AAᵀ are each within δ = 2·T·ε₃₂·‖G‖₂ of G's: forming G from
/// a non-negative A errs by at most γ_T·G entrywise (≤ T·ε₃₂/2·‖G‖₂ in norm), and LAPACK's symmetric
/// eigensolvers are backward stable with an error of p(T)·ε₃₂·‖G‖₂ (LAPACK Users' Guide; p(T) = T here,
/// generous against the guide's p = 1). So the sum of the top j is within j·δ of the true one (Lidskii).
/// A float64 input rounded to float32 perturbs A entrywise by a relative ε₃₂, well within δ's generosity.
/// Where the float32 k̂ clears the threshold by more than that on both sides (k̂ reaches it, k̂ − 1 does
/// not), k* = k̂ for certain; the others, 1 to 3 % of real attention, are solved again in float64.
fn certified_rank(input: &Tensor, tau: f64) -> Result<Tensor> {
    let (b, t, _) = input.size3()?;
    let a = input.f_to_kind(Kind::Float)?;
    let threshold = a.f_square()?.f_sum_dim_intlist(&[1, 2][..], false, Kind::Double)? * (tau * (1.0 - slack(Kind::Double)));
    // k* = 1 where one power step's Rayleigh quotient, a lower bound of σ₁², already reaches the threshold;
    // everything in it is a sum of non-negative terms, so float32 errs by a relative γ's worth at most.
    let quotient = power_quotient(&a, Kind::Float)?;
    let rank1 = quotient.f_mul_scalar(1.0 - 4.0 * t as f64 * f64::from(f32::EPSILON))?.f_ge_tensor(&threshold)?;
    let k = Tensor::f_ones([b], (Kind::Int64, a.device()))?;
    let open = rank1.logical_not().nonzero().squeeze_dim(1);
    if open.numel() == 0 {
        return Ok(k);
    }
    let a = a.f_index_select(0, &open)?;
    let threshold = threshold.f_index_select(0, &open)?;
    let energy = gram_energy(&a)?.f_to_kind(Kind::Double)?;
    let delta = energy.f_select(1, 0)? * (2.0 * t as f64 * f64::from(f32::EPSILON));
    let guess = smallest_reaching(&energy, &threshold)?.clamp_max(t);
    let (reached, before) = sums_at(&energy, &guess)?;
    let sure = (reached - guess.to_kind(Kind::Double) * &delta)
        .f_ge_tensor(&threshold)?
        .logical_and(&(before + (&guess - 1).to_kind(Kind::Double) * &delta).f_lt_tensor(&threshold)?);
    // The float64 answer for the input as given (not its float32 rounding).
    let exact = |unsure: &Tensor| rank_of_batch(&input.f_index_select(0, &open.f_index_select(0, unsure)?)?.f_to_kind(Kind::Double)?, tau, Kind::Double);
    let rank = redo_unsure(guess, &sure, exact)?;
    Ok(k.f_index_copy(0, &open, &rank)?)
}

/// The sums of the first k and k − 1 entries of `energy` `[b, T]` (sorted descending), for `k` `[b]` in 1..=T.
fn sums_at(energy: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
    let cum = Tensor::f_cat(&[energy.f_zeros_like()?.narrow(1, 0, 1), energy.f_cumsum(1, Kind::Double)?], 1)?;
    let at = |k: &Tensor| -> Result<Tensor> { Ok(cum.f_gather(1, &k.unsqueeze(1), false)?.squeeze_dim(1)) };
    Ok((at(k)?, at(&(k - 1))?))
}

/// `guess`, with the entries where `sure` is false replaced by `exact` of their indices.
fn redo_unsure(guess: Tensor, sure: &Tensor, exact: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let unsure = sure.logical_not().nonzero().squeeze_dim(1);
    if unsure.numel() == 0 {
        return Ok(guess);
    }
    Ok(guess.f_index_copy(0, &unsure, &exact(&unsure)?)?)
}

/// The eigenvalues σᵢ² of AAᵀ for a `[B, T, T]` batch, largest first.
fn gram_energy(a: &Tensor) -> Result<Tensor> {
    let gram = a.f_bmm(&a.f_transpose(1, 2)?)?;
    if gram.device() == Device::Cpu {
        energy_of(&gram)
    } else {
        // libtorch's batched eigensolvers are slower on a GPU than on the CPU for matrices this small
        // (libtorch.md: 0.6 ms a matrix on an H200): the GPU makes the Gram matrices, the cores do the rest.
        Ok(on_all_cores(&gram.f_to_device(Device::Cpu)?, |g| energy_of(&g))?.f_to_device(gram.device())?)
    }
}

/// The Rayleigh quotient of AAᵀ after `POWER_STEPS` power steps from the all-ones vector, in `kind`,
/// returned as float64: a lower bound of σ₁². AAᵀ is non-negative, so its top eigenvector is too (Perron)
/// and overlaps the start. A zero matrix gives NaN, which fails every threshold test.
fn power_quotient(a: &Tensor, kind: Kind) -> Result<Tensor> {
    let (b, t, _) = a.size3()?;
    let squared_norm =
        |x: &Tensor| -> Result<Tensor> { Ok(x.f_norm_scalaropt_dim_dtype(2, [1, 2], false, Kind::Double)?.square()) };
    let at = a.f_transpose(1, 2)?;
    let mut v = Tensor::f_ones([b, t, 1], (kind, a.device()))?;
    for _ in 0..POWER_STEPS {
        let w = a.f_bmm(&at.f_bmm(&v)?)?;
        v = &w / w.f_norm_scalaropt_dim(2, [1, 2], true)?;
    }
    // vᵀAAᵀv / vᵀv ≤ σ₁² for any v.
    Ok(squared_norm(&at.f_bmm(&v)?)? / squared_norm(&v)?)
}

/// k* of a `[B, T, T]` batch in `kind`. σ₁² ≥ τ‖A‖²_F is exactly the case k* = 1, and the power quotient
/// is a lower bound of σ₁²: matrices it already lifts over the threshold are k* = 1 for certain. Only the
/// others pay for eigenvalues, those of the Gram matrix AAᵀ (σᵢ²), which libtorch computes faster than
/// singular values (and `linalg_svd` needs a driver, which fails on the CPU).
fn rank_of_batch(a: &Tensor, tau: f64, kind: Kind) -> Result<Tensor> {
    let b = a.size()[0];
    let threshold = a.f_norm_scalaropt_dim_dtype(2, [1, 2], false, Kind::Double)?.square() * (tau * (1.0 - slack(kind)));
    let quotient = power_quotient(a, kind)?;
    let k = Tensor::f_ones([b], (Kind::Int64, a.device()))?;
    let open = quotient.f_ge_tensor(&threshold)?.logical_not().nonzero().squeeze_dim(1);
    if open.numel() == 0 {
        return Ok(k);
    }
    let energy = gram_energy(&a.f_index_select(0, &open)?)?;
    Ok(k.f_index_copy(0, &open, &smallest_reaching(&energy, &threshold.index_select(0, &open))?)?)
}

/// The eigenvalues σᵢ² of Gram matrices, largest first.
fn energy_of(gram: &Tensor) -> Result<Tensor> {
    // Ascending eigenvalues; round-off may leave tiny negatives of a PSD matrix, which are zero.
    Ok(gram.f_linalg_eigvalsh("L")?.flip([1]).clamp_min(0.0))
}

/// m* = fewest columns whose energies ‖A·ⱼ‖², largest first, reach η·‖A‖²_F, exactly (as float64 finds
/// it), as `Int64`. The energies are sums of non-negative squares, so float32 computes each of them, their
/// partial sums and the total within a relative γ_T ≤ T·ε₃₂ (float64 input, rounded to float32 first,
/// adds 2·ε₃₂ relative at most); where m̂ clears the threshold by more than
/// that on both sides it is certain, and the others (under 1 % of real attention) are summed again in f64.
pub fn mass(attn: &Tensor, eta: f64) -> Result<Tensor> {
    let (batch, t) = matrix_shape(attn)?;
    let m = on_all_cores(&attn.f_reshape([-1, t, t])?, |a| {
        let threshold_of = |energy: &Tensor| energy.sum_dim_intlist(-1, false, None) * (eta * (1.0 - slack(Kind::Double)));
        let exact = |a: &Tensor| -> Result<Tensor> {
            let energy = a.f_norm_scalaropt_dim_dtype(2, [1], false, Kind::Double)?.square();
            smallest_reaching(&energy.sort(-1, true).0, &threshold_of(&energy))
        };
        let energy = a.f_to_kind(Kind::Float)?.f_square()?.f_sum_dim_intlist(&[1][..], false, Kind::Float)?.f_to_kind(Kind::Double)?;
        let energy = energy.sort(-1, true).0;
        let threshold = threshold_of(&energy);
        let guess = smallest_reaching(&energy, &threshold)?.clamp_max(t);
        let (reached, before) = sums_at(&energy, &guess)?;
        let margin = 3.0 * t as f64 * f64::from(f32::EPSILON);
        let sure = reached.f_ge_tensor(&(&threshold * (1.0 + margin)))?.logical_and(&before.f_lt_tensor(&(&threshold * (1.0 - margin)))?);
        redo_unsure(guess, &sure, |unsure| exact(&a.f_index_select(0, unsure)?))
    })?;
    Ok(m.f_reshape(&batch)?)
}

/// The smallest k whose first k `energy` entries (sorted descending along the last dim) sum to at
/// least `threshold` (one per row).
fn smallest_reaching(energy: &Tensor, threshold: &Tensor) -> Result<Tensor> {
    let cum = energy.f_cumsum(-1, Kind::Double)?;
    Ok(cum.f_lt_tensor(&threshold.unsqueeze(-1))?.sum_dim_intlist(-1, false, Kind::Int64) + 1)
}

/// Mean row entropy Hᵢ = −Σⱼ Aᵢⱼ log Aᵢⱼ (nats, 0·log 0 = 0), and the mean of Hᵢ / log i over rows
/// i ≥ 2 (row i, 1-based, has i admissible keys; row 1 has one key and no choice, so it is left out).
pub fn entropy(attn: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, t) = matrix_shape(attn)?;
    ensure!(t >= 2, "normalised entropy needs windows of at least 2 tokens, got {t}");
    let a = attn.f_to_kind(Kind::Double)?;
    let rows = -a.f_xlogy(&a)?.f_sum_dim_intlist(-1, false, None)?;
    let keys = Tensor::f_arange_start(2, t + 1, (Kind::Double, a.device()))?.log();
    let normalised = (rows.narrow(-1, 1, t - 1) / keys).mean_dim(-1, false, None);
    Ok((rows.mean_dim(-1, false, None), normalised))
}

/// Mean over rows of Aᵢ₀, the attention paid to the first position.
pub fn sink_fraction(attn: &Tensor) -> Result<Tensor> {
    matrix_shape(attn)?;
    Ok(attn.f_to_kind(Kind::Double)?.f_select(-1, 0)?.f_mean_dim(-1, false, None)?)
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

/// Runs `f` on slices of `CHUNK` matrices of the batch `x` (dim 0), spread over the rayon threads when on
/// the CPU: libtorch's batched eigvalsh walks the batch on one thread, and slices this small recycle
/// their temporaries (a whole batch's 72 MB ones cost fresh pages every time, about 25 % of the run).
/// On a GPU one call already fills the device.
fn on_all_cores(x: &Tensor, f: impl Fn(Tensor) -> Result<Tensor> + Sync) -> Result<Tensor> {
    if x.device() != Device::Cpu {
        return f(x.shallow_clone());
    }
    let _serial = SerialTorch::new();
    let parts = x.f_split(CHUNK, 0)?.into_par_iter().map(&f).collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&parts, 0)?)
}

/// libtorch's intra-op threads set to one while any of these lives, then restored (the host waits on this
/// call meanwhile): rayon already keeps every core busy, and libtorch's own threads on top of it only
/// spin; with them the same work took 2.5× the CPU time and wall time. Counted, so that concurrent calls
/// restore the host's setting, not each other's.
struct SerialTorch;

/// Live `SerialTorch`s, and the thread count to restore when the last one goes.
static SERIAL: Mutex<(usize, i32)> = Mutex::new((0, 0));

impl SerialTorch {
    fn new() -> Self {
        let mut serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        if serial.0 == 0 {
            serial.1 = tch::get_num_threads();
            tch::set_num_threads(1);
        }
        serial.0 += 1;
        SerialTorch
    }
}

impl Drop for SerialTorch {
    fn drop(&mut self) {
        let mut serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        serial.0 -= 1;
        if serial.0 == 0 {
            tch::set_num_threads(serial.1);
        }
    }
}

/// Matrices per slice on the CPU: 5 MB of f64 at T = 100.
const CHUNK: i64 = 64;

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

    #[test]
    fn batch_dims_are_kept() {
        let a = uniform(10).expand([2, 3, 10, 10], false);
        assert_eq!(energy_rank(&a, 0.9, Kind::Double).unwrap().size(), [2, 3]);
        assert_eq!(mass(&a, 0.9).unwrap().size(), [2, 3]);
        assert_eq!(entropy(&a).unwrap().1.size(), [2, 3]);
        assert!(energy_rank(&Tensor::ones([3, 4], (Kind::Double, Device::Cpu)), 0.9, Kind::Double).is_err());
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
