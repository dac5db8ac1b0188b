//! `exp` over slices in a form the compiler vectorises, for the fused ops' softmax,
//! cross-entropy, sigmoid and tanh; and row reductions (sum, dot product, maximum) in 8
//! interleaved lanes.
//!
//! libm's scalar `expf` was ~9% of a training step at the tiny preset (attention softmax over
//! every score, log-softmax over the 3,000-word vocabulary, SiLU and GELU over every hidden
//! unit). The release build targets baseline x86-64 (SSE2), where neither libm's `expf` nor
//! `wide::f32x8::exp` (tried: its f32x8 is emulated there and was as slow as libm in a
//! training step) vectorises; this branch-free form does: 1.3-1.7 ns per value against libm's
//! 3.4 (a micro-benchmark over 3,000-value rows), within 1 ulp of libm on
//! [-87, 88]. Below -87 it gives 0 (libm: at most 1.7e-38), above 88 infinity (libm: up to
//! 3.4e38 before 88.72), NaN stays NaN. A value never depends on its position in a slice.
//!
//! # Instruction sets
//!
//! One binary serves every x86-64 host (Slurm nodes differ), so nothing is compiled for the
//! build machine's CPU. Instead the hot kernels (these functions and the fused ops, attention
//! softmax and Q4_0 dequantisation that call them) run inside [`dispatch`], which picks at run
//! time, once per process, the best of AVX-512 (x86-64-v4), AVX2+FMA (x86-64-v3) or baseline
//! SSE2 (pulp's detection) and compiles the closure's body once per level. Every function here is
//! `#[inline(always)]` so that it is compiled inside the dispatched body, at that body's level.
//! The code never asks for fused multiply-adds (Rust never contracts `a * b + c` on its own) and
//! the lane order of the reductions is fixed, so every level gives the same bits as baseline;
//! `tests/kernels_isa.rs` checks that for every level the host has.

/// `exp(x)`: Cody-Waite range reduction `x = n ln2 + r`, a degree-7 polynomial for `exp(r)`,
/// `2^n` built in the exponent bits. Round-to-nearest of `x log2 e` by the 1.5 * 2^23 trick,
/// so no float-to-int conversion stands in the way of vectorising.
#[inline(always)]
pub fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(-87.0, 88.0);
    let t = c * LOG2E + MAGIC;
    let n = t - MAGIC;
    let nbits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = c - n * LN2_HI;
    let r = r - n * LN2_LO;
    let p = ((((r * (1.0 / 5040.0) + 1.0 / 720.0) * r + 1.0 / 120.0) * r + 1.0 / 24.0) * r
        + 1.0 / 6.0)
        * r
        + 0.5;
    let e = (p * (r * r) + r + 1.0) * f32::from_bits(nbits.wrapping_add(127) << 23);
    let e = if x > 88.0 { f32::INFINITY } else { e };
    let e = if x < -87.0 { 0.0 } else { e };
    if x.is_nan() {
        x
    } else {
        e
    }
}

/// `x <- exp(x)` for every element.
#[inline(always)]
pub fn exp_in_place(xs: &mut [f32]) {
    xs.iter_mut().for_each(|v| *v = exp1(*v));
}

/// An instruction-set level of the x86-64 psABI that [`dispatch`] can compile for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Baseline x86-64 (SSE2), or any other architecture.
    Baseline,
    /// x86-64-v3: AVX2, FMA, BMI1/2.
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL on top of v3.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];

    /// What benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline (x86-64 SSE2)",
            Isa::Avx2 => "avx2+fma (x86-64-v3)",
            Isa::Avx512 => "avx512 (x86-64-v4)",
        }
    }

    /// pulp's token for this level, `None` where the CPU lacks it.
    fn arch(self) -> Option<pulp::Arch> {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Baseline => Some(pulp::Arch::Scalar),
                Isa::Avx2 => pulp::x86::V3::try_new().map(pulp::Arch::V3),
                Isa::Avx512 => pulp::x86::V4::try_new().map(pulp::Arch::V4),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (self == Isa::Baseline).then(pulp::Arch::new)
        }
    }

    /// Whether this CPU runs this level.
    pub fn available(self) -> bool {
        self.arch().is_some()
    }
}

/// The level [`dispatch`] runs at: 0 until detected, else 1 + index in [`Isa::ALL`].
static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The level the kernels run at in this process (the best the CPU has, unless
/// [`force_isa`] chose another).
pub fn isa() -> Isa {
    use std::sync::atomic::Ordering::Relaxed;
    match LEVEL.load(Relaxed) {
        0 => {
            let best = Isa::ALL
                .into_iter()
                .rev()
                .find(|l| l.available())
                .unwrap_or(Isa::Baseline);
            LEVEL.store(best as u8 + 1, Relaxed);
            best
        }
        n => Isa::ALL[usize::from(n - 1).min(2)],
    }
}

/// Run every later kernel at `level` (tests comparing the levels; a benchmark measuring one).
/// Refused, returning false, where the CPU lacks the level.
pub fn force_isa(level: Isa) -> bool {
    let ok = level.available();
    if ok {
        LEVEL.store(level as u8 + 1, std::sync::atomic::Ordering::Relaxed);
    }
    ok
}

/// `f()`, compiled once per [`Isa`] level and run at [`isa`]'s. Everything `f` calls must be
/// inlined into it to be compiled at that level: closures handed in here are marked
/// `#[inline(always)]`, as are the functions of this module.
#[inline(always)]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    match isa().arch() {
        Some(arch) => arch.dispatch(f),
        None => f(),
    }
}

/// Partial results kept by the reductions below: a strict left-to-right sum is one dependent
/// add per element (4 cycles each), which no compiler may reorder; 8 independent lanes
/// vectorise. The order is fixed (lane `i` takes elements `i, i + 8, ...`, then the lanes and
/// the tail are combined the same way every time), so a result depends only on the values.
const LANES: usize = 8;

#[inline(always)]
fn combine(acc: [f32; LANES], tail: f32) -> f32 {
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail
}

/// `sum_i f(a_i, b_i)` over two slices of one length, in [`LANES`] lanes.
#[inline(always)]
fn reduce2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    let tail = ta.iter().zip(tb).map(|(&x, &y)| f(x, y)).sum::<f32>();
    combine(acc, tail)
}

/// `sum x`.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    reduce2(x, x, |v, _| v)
}

/// `sum a * b`.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce2(a, b, |x, y| x * y)
}

/// `sum a * b * c` over three slices of one length.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f32; LANES];
    let full = n - n % LANES;
    for ((x, y), z) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
        .zip(c[..full].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += x[i] * y[i] * z[i];
        }
    }
    let tail = (full..n).map(|i| a[i] * b[i] * c[i]).sum::<f32>();
    combine(acc, tail)
}

/// `sum (x - c)^2`.
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    reduce2(x, x, |v, _| (v - c) * (v - c))
}

/// The largest element (`-inf` for an empty slice; NaN elements are skipped, as by `f32::max`).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = x.chunks_exact(LANES);
    let tail = c
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for ch in c {
        for i in 0..LANES {
            acc[i] = acc[i].max(ch[i]);
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_f64_sums_and_keep_their_order() {
        for n in [0usize, 1, 7, 8, 9, 31, 128, 3000] {
            let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i as f32) * 1.37).cos() - 0.2).collect();
            let s64: f64 = a.iter().map(|&v| v as f64).sum();
            let d64: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let q64: f64 = a.iter().map(|&v| (v as f64 - 0.5).powi(2)).sum();
            let tol = 1e-5 * (n as f64 + 1.0);
            assert!((sum(&a) as f64 - s64).abs() < tol, "sum n={n}");
            assert!((dot(&a, &b) as f64 - d64).abs() < tol, "dot n={n}");
            assert!((sum_sq_dev(&a, 0.5) as f64 - q64).abs() < tol, "sq n={n}");
            let t64: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| x as f64 * y as f64 * y as f64)
                .sum();
            assert!((dot3(&a, &b, &b) as f64 - t64).abs() < tol, "dot3 n={n}");
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a).to_bits(), m.to_bits(), "max n={n}");
            // Same values, same bits, wherever the slice comes from.
            let copy = a.clone();
            assert_eq!(sum(&copy).to_bits(), sum(&a).to_bits());
        }
        assert_eq!(max(&[f32::NAN, 1.0, -2.0]), 1.0);
    }

    #[test]
    fn matches_libm_within_one_ulp_and_handles_the_edges() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.0443).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 87.99, -86.99, 88.7, -87.3, -103.0, -200.0,
        ]);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for ((&x, &w), &g) in xs.iter().zip(&want).zip(&got) {
            let ulp = (w.to_bits() as i64 - g.to_bits() as i64).abs();
            if (-87.0..=88.0).contains(&x) {
                assert!(ulp <= 1, "exp({x}) = {g}, libm {w}");
            } else {
                assert!(g == 0.0 || g == f32::INFINITY, "exp({x}) = {g}");
            }
            assert_eq!(g.to_bits(), exp1(x).to_bits(), "exp1({x})");
        }
        let mut edge = vec![f32::NEG_INFINITY, -1e30, f32::INFINITY, 1e30, f32::NAN];
        exp_in_place(&mut edge);
        assert_eq!(edge[0], 0.0);
        assert_eq!(edge[1], 0.0);
        assert_eq!(edge[2], f32::INFINITY);
        assert_eq!(edge[3], f32::INFINITY);
        assert!(edge[4].is_nan());
    }

    #[test]
    fn a_value_does_not_depend_on_its_position() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut all = xs.clone();
        exp_in_place(&mut all);
        for s in 0..xs.len() {
            let mut part = xs[s..].to_vec();
            exp_in_place(&mut part);
            for (a, b) in part.iter().zip(&all[s..]) {
                assert_eq!(a.to_bits(), b.to_bits());
            }
        }
    }
}
