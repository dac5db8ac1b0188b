//! Fused linear and self-attention CPU ops with their own backward, calling `gemm` (the crate
//! candle's CPU matmul runs on) directly.
//!
//! Why: at the tiny preset a training step was dominated by graph overhead, not by FLOPs. A
//! linear through candle's basic ops is reshape -> transpose -> matmul -> reshape -> broadcast
//! add, and in backward each of those nodes allocates a zero gradient and adds into it; the
//! matmul node also computes the gradient of a frozen weight (LoRA / QLoRA / adapter bases),
//! which is then thrown away. Self-attention was narrow x3 (whose backward pads each slice with
//! zeros back to the full qkv width), three head-split copies, two RoPE ops, two batched
//! matmuls run one small gemm after another, softmax and a head-merge copy.
//!
//! - [`linear`]: `y = x w^T (+ b)` for `x` of any rank; backward computes `dx` only when `x` is
//!   tracked, `dw`/`db` only when the weight/bias is (a frozen base costs no weight gradient).
//! - [`quant_linear`]: the same with a 4-bit weight (QLoRA's frozen base), dequantized for the
//!   forward product and again for `dx`, so no f32 copy of it outlives one product; a weight of
//!   more than 4M values is dequantized and multiplied in blocks of output rows, so its whole
//!   f32 form never exists at once (a real LM head's would be 260 MB).
//! - The LoRA linear on a frozen base, built from these products, is its own op in
//!   [`super::lora_linear`].
//! - [`self_attention`]: from the fused `qkv` projection (B, T, 3W) straight to the merged-head
//!   output (B, T, W): optional RoPE on q and k, scale, optional causal mask, softmax, weighted
//!   sum; every (batch, head) pair is one task on the rayon pool (candle's batched matmul ran
//!   them one after another). The forward keeps the probabilities and rotated q/k for the
//!   backward.
//!
//! The arithmetic is the same as the composed forms (`ops::composed::attention`, a matmul); the
//! tests in `tests/model.rs` compare values and gradients.

use std::sync::{Arc, Mutex};

use candle_core::quantized::QTensor;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fused::slice;

/// Runs `f` on the contiguous f32 data of `t` (copied first only if `t` is strided).
pub(super) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice(c, l)?),
        _ => candle_core::bail!("fused op: CPU tensors only"),
    }
}

/// Splits one gemm over the rayon pool only when it is large enough to gain from it.
pub(super) fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// One strided operand: data, row stride, column stride.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a>(pub(super) &'a [f32], pub(super) usize, pub(super) usize);

impl Mat<'_> {
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * self.1 + (cols - 1) * self.2 < self.0.len(),
                "gemm operand out of bounds"
            );
        }
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] a (m x k) . b (k x n)`.
pub(super) fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k);
    b.check(k, n);
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "gemm destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index gemm touches lies inside the slices (checked above): rows 0..m and
    // columns 0..n of dst, 0..m x 0..k of a and 0..k x 0..n of b with the given strides.
    unsafe { gemm_raw((m, n, k), dst.as_mut_ptr(), dst_rs, accumulate, a, b, par) }
}

/// gemm with unit column stride for `dst` and `alpha = beta = 1`.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of rows `0..m` x columns
/// `0..n` at row stride `dst_rs`, and `a`, `b` must hold `m x k` and `k x n` at their strides.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.0.as_ptr(),
        a.2 as isize,
        a.1 as isize,
        b.0.as_ptr(),
        b.2 as isize,
        b.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    )
}

/// `a (m x k) . b (k x n)` into a new `m x n` buffer (row stride n). The buffer is not
/// zero-filled first: gemm overwrites every element (`read_dst` false), which saves a memset
/// pass on the calling thread per linear forward and backward.
pub(super) fn mm_new(
    (m, n, k): (usize, usize, usize),
    a: Mat<'_>,
    b: Mat<'_>,
    par: Parallelism,
) -> Vec<f32> {
    let len = m * n;
    if k == 0 || len == 0 {
        return vec![0f32; len];
    }
    a.check(m, k);
    b.check(k, n);
    let mut dst: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the operands are in bounds (checked above) and the destination has capacity
    // for m x n elements at row stride n. With `read_dst` false gemm only writes the
    // destination, and it writes every one of its m x n elements; the length is set after
    // that, so no uninitialised element is ever read or referenced.
    unsafe {
        gemm_raw((m, n, k), dst.as_mut_ptr(), n, false, a, b, par);
        dst.set_len(len);
    }
    dst
}

/// `y (rows x out) = x (rows x in) . w^T [+ b]`.
pub(super) fn linear_fwd(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let rows = x.len() / inp;
    let Some(b) = b else {
        return mm_new(
            (rows, out, inp),
            Mat(x, inp, 1),
            Mat(w, 1, inp),
            parallelism(rows, out, inp),
        );
    };
    let mut y = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    mm(
        (rows, out, inp),
        &mut y,
        out,
        true,
        Mat(x, inp, 1),
        Mat(w, 1, inp),
        parallelism(rows, out, inp),
    );
    y
}

pub(super) fn out_shape(l: &Layout, out: usize) -> Shape {
    let mut d = l.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    Shape::from(d)
}

/// Gradients of a linear: `(dx, dw, db)`, each only where the argument is tracked.
pub(super) type LinearGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

pub(super) fn linear_bwd(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    g: &Tensor,
) -> Result<LinearGrads> {
    let (out, inp) = w.dims2()?;
    let rows = x.elem_count() / inp;
    with_data(g, |gv| {
        let dx = if x.track_op() {
            let dx = with_data(w, |wv| {
                Ok(mm_new(
                    (rows, inp, out),
                    Mat(gv, out, 1),
                    Mat(wv, inp, 1),
                    parallelism(rows, inp, out),
                ))
            })?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_data(x, |xv| {
                Ok(mm_new(
                    (out, inp, rows),
                    Mat(gv, 1, out),
                    Mat(xv, inp, 1),
                    parallelism(out, inp, rows),
                ))
            })?;
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => {
                let mut db = vec![0f32; out];
                for r in gv.chunks_exact(out) {
                    db.iter_mut().zip(r).for_each(|(d, &v)| *d += v);
                }
                Some(Tensor::from_vec(db, b.shape(), b.device())?)
            }
            _ => None,
        };
        Ok((dx, dw, db))
    })
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "ecic-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = (l2.dims()[0], l2.dims()[1]);
        let y = linear_fwd(slice(s1, l1)?, slice(s2, l2)?, None, inp, out);
        Ok((CpuStorage::F32(y), out_shape(l1, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, None, g)?;
        Ok((dx, dw))
    }
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "ecic-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = (l2.dims()[0], l2.dims()[1]);
        let y = linear_fwd(
            slice(s1, l1)?,
            slice(s2, l2)?,
            Some(slice(s3, l3)?),
            inp,
            out,
        );
        Ok((CpuStorage::F32(y), out_shape(l1, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<LinearGrads> {
        linear_bwd(x, w, Some(b), g)
    }
}

/// `x (..., in) . w^T + b` with `w` (out, in), `b` (out,).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    if w.rank() != 2 || w.dim(1)? != inp {
        candle_core::bail!(
            "linear: weight {:?} does not take input {:?}",
            w.dims(),
            x.dims()
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, Linear),
    }
}

/// `x . dequantize(w)^T` for a frozen 4-bit weight (QLoRA's base): the weight is dequantized
/// for the product and dropped, and dequantized again in the backward for `dx` (a frozen
/// weight has no gradient of its own). Keeping the dequantized weight as a graph input instead
/// would hold an f32 copy of every quantized layer from the forward to the backward, i.e. the
/// whole f32 base during a training step.
struct QuantLinear(Arc<QTensor>);

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "ecic-quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, _) = self.0.shape().dims2()?;
        let y = quant_fwd(slice(s, l)?, &self.0)?;
        Ok((CpuStorage::F32(y), out_shape(l, out)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = with_data(g, |gv| quant_dx(gv, &self.0))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Most f32 values of a 4-bit weight dequantized at once (16 MB). A larger weight is
/// dequantized and multiplied in blocks of output rows, so that its f32 form never exists
/// whole: a real LM head (32k x 2k) would otherwise add 260 MB to a step's peak, twice the
/// head's 4-bit size, and an MLP projection 90 MB. Every weight of the tiny presets fits one
/// block, which is then the single product it always was.
const DEQUANT_BLOCK: usize = 1 << 22;

/// Output rows of `q` (out, in) per dequantized block.
fn quant_rows_per_block(q: &QTensor) -> Result<(usize, usize, usize)> {
    let (out, inp) = q.shape().dims2()?;
    Ok((out, inp, (DEQUANT_BLOCK / inp.max(1)).clamp(1, out.max(1))))
}

/// Rows `r0..r1` of the 4-bit weight `q` (out, in) as f32, row-major.
fn dequantize_rows(q: &QTensor, inp: usize, r0: usize, r1: usize) -> Result<Vec<f32>> {
    let (out, _) = q.shape().dims2()?;
    if r0 == 0 && r1 == out {
        let w = super::quant::dequantize(q, &candle_core::Device::Cpu)?;
        return w.flatten_all()?.to_vec1::<f32>();
    }
    if q.dtype() != candle_core::quantized::GgmlDType::Q4_0 || !inp.is_multiple_of(32) {
        // Other types only come whole from candle: slice the rows out of it.
        let w = super::quant::dequantize(q, &candle_core::Device::Cpu)?;
        return w.narrow(0, r0, r1 - r0)?.flatten_all()?.to_vec1::<f32>();
    }
    let data = q.data()?;
    let row_bytes = inp / 32 * 18;
    let mut w = vec![0f32; (r1 - r0) * inp];
    super::quant::dequantize_q4_0(&data[r0 * row_bytes..r1 * row_bytes], &mut w);
    Ok(w)
}

/// `x (rows x in) . dequantize(q)^T`, one block of output rows at a time.
pub(super) fn quant_fwd(x: &[f32], q: &QTensor) -> Result<Vec<f32>> {
    let (out, inp, block) = quant_rows_per_block(q)?;
    if block >= out {
        let w = dequantize_rows(q, inp, 0, out)?;
        return Ok(linear_fwd(x, &w, None, inp, out));
    }
    let rows = x.len() / inp;
    let mut y: Vec<f32> = vec![0f32; rows * out];
    for r0 in (0..out).step_by(block) {
        let r1 = (r0 + block).min(out);
        let w = dequantize_rows(q, inp, r0, r1)?;
        mm(
            (rows, r1 - r0, inp),
            &mut y[r0..],
            out,
            false,
            Mat(x, inp, 1),
            Mat(&w, 1, inp),
            parallelism(rows, r1 - r0, inp),
        );
    }
    Ok(y)
}

/// `g (rows x out) . dequantize(q)`: the input gradient of [`quant_fwd`], accumulated over
/// the same blocks of output rows.
pub(super) fn quant_dx(g: &[f32], q: &QTensor) -> Result<Vec<f32>> {
    let (out, inp, block) = quant_rows_per_block(q)?;
    let rows = g.len() / out;
    if block >= out {
        let w = dequantize_rows(q, inp, 0, out)?;
        return Ok(mm_new(
            (rows, inp, out),
            Mat(g, out, 1),
            Mat(&w, inp, 1),
            parallelism(rows, inp, out),
        ));
    }
    let mut dx = vec![0f32; rows * inp];
    for r0 in (0..out).step_by(block) {
        let r1 = (r0 + block).min(out);
        let w = dequantize_rows(q, inp, r0, r1)?;
        mm(
            (rows, inp, r1 - r0),
            &mut dx,
            inp,
            r0 > 0,
            Mat(&g[r0..], out, 1),
            Mat(&w, inp, 1),
            parallelism(rows, inp, r1 - r0),
        );
    }
    Ok(dx)
}

/// `x (..., in) . dequantize(w)^T + b` with `w` a 4-bit (out, in) weight, holding its f32 form
/// only while one product runs (see [`QuantLinear`]).
pub fn quant_linear(x: &Tensor, w: &Arc<QTensor>, b: Option<&Tensor>) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    if w.shape().rank() != 2 || w.shape().dims()[1] != inp {
        candle_core::bail!(
            "quant_linear: weight {:?} does not take input {:?}",
            w.shape().dims(),
            x.dims()
        );
    }
    let y = x.contiguous()?.apply_op1(QuantLinear(w.clone()))?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// What the attention forward keeps for its backward.
struct Saved {
    /// Softmax probabilities (B*H, T, T).
    p: Vec<f32>,
    /// Rotated queries and keys, head-major (B*H, T, d).
    q: Vec<f32>,
    k: Vec<f32>,
}

struct Attention {
    heads: usize,
    causal: bool,
    /// RoPE (cos, sin) tables (max_pos, d/2), positions from 0.
    rope: Option<(Arc<Vec<f32>>, Arc<Vec<f32>>)>,
    saved: Mutex<Option<Arc<Saved>>>,
}

/// Rotates head rows (each `d` wide) in place, row `p` at position `first + p`; `sign` -1
/// applies the inverse rotation (the backward of the rotation).
fn rotate(rows: &mut [f32], d: usize, first: usize, (cos, sin): (&[f32], &[f32]), sign: f32) {
    let half = d / 2;
    for (p, r) in rows.chunks_exact_mut(d).enumerate() {
        let at = (first + p) * half;
        let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
        for i in 0..half {
            let (x1, x2) = (r[i], r[i + half]);
            let si = sign * s[i];
            r[i] = x1 * c[i] - x2 * si;
            r[i + half] = x2 * c[i] + x1 * si;
        }
    }
}

/// Softmax in place of the first `valid` scores of a row (scaled by `scale`); the rest become 0.
/// Inlined into its callers' [`super::vmath::dispatch`] bodies.
#[inline(always)]
fn softmax_row(r: &mut [f32], valid: usize, scale: f32) {
    let (live, masked) = r.split_at_mut(valid);
    masked.fill(0.0);
    let mx = super::vmath::max(live) * scale;
    live.iter_mut().for_each(|v| *v = *v * scale - mx);
    super::vmath::exp_in_place(live);
    let sum = super::vmath::sum(live);
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|v| *v *= inv);
}

impl Attention {
    /// Rotates head rows at positions `0..` when RoPE is on (see [`rotate`]).
    fn rotate_in_place(&self, rows: &mut [f32], d: usize, sign: f32) {
        if let Some((cos, sin)) = &self.rope {
            rotate(rows, d, 0, (&cos[..], &sin[..]), sign);
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "ecic-self-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, t, c3) = match l.dims() {
            &[b, t, c] => (b, t, c),
            d => candle_core::bail!("self_attention: qkv must be (B,T,3W), got {d:?}"),
        };
        let (w, h) = (c3 / 3, self.heads);
        let d = w / h;
        if let Some((cos, _)) = &self.rope {
            if cos.len() < t * (d / 2) {
                candle_core::bail!("self_attention: {t} positions exceed the RoPE table");
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        let bh = b * h;
        let mut q = vec![0f32; bh * t * d];
        let mut k = vec![0f32; bh * t * d];
        let mut p = vec![0f32; bh * t * t];
        let mut o = vec![0f32; bh * t * d];
        q.par_chunks_mut(t * d)
            .zip(k.par_chunks_mut(t * d))
            .zip(p.par_chunks_mut(t * t))
            .zip(o.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(idx, (((qh, kh), ph), oh))| {
                let (bi, hi) = (idx / h, idx % h);
                let base = bi * t * c3;
                for ti in 0..t {
                    let row = &x[base + ti * c3..base + (ti + 1) * c3];
                    qh[ti * d..(ti + 1) * d].copy_from_slice(&row[hi * d..(hi + 1) * d]);
                    kh[ti * d..(ti + 1) * d].copy_from_slice(&row[w + hi * d..w + (hi + 1) * d]);
                }
                self.rotate_in_place(qh, d, 1.0);
                self.rotate_in_place(kh, d, 1.0);
                mm(
                    (t, t, d),
                    ph,
                    t,
                    false,
                    Mat(qh, d, 1),
                    Mat(kh, 1, d),
                    Parallelism::None,
                );
                super::vmath::dispatch(
                    #[inline(always)]
                    || {
                        for (i, r) in ph.chunks_exact_mut(t).enumerate() {
                            softmax_row(r, if self.causal { i + 1 } else { t }, scale);
                        }
                    },
                );
                let v = &x[base + 2 * w + hi * d..];
                mm(
                    (t, d, t),
                    oh,
                    d,
                    false,
                    Mat(ph, t, 1),
                    Mat(v, c3, 1),
                    Parallelism::None,
                );
            });
        let mut y = vec![0f32; b * t * w];
        for (idx, oh) in o.chunks_exact(t * d).enumerate() {
            let (bi, hi) = (idx / h, idx % h);
            for ti in 0..t {
                let at = bi * t * w + ti * w + hi * d;
                y[at..at + d].copy_from_slice(&oh[ti * d..(ti + 1) * d]);
            }
        }
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Saved { p, q, k }));
        Ok((CpuStorage::F32(y), Shape::from((b, t, w))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(sv) = saved else {
            candle_core::bail!("self_attention: backward without a forward");
        };
        let (b, t, c3) = x.dims3()?;
        let (w, h) = (c3 / 3, self.heads);
        let d = w / h;
        let scale = 1.0 / (d as f32).sqrt();
        let bh = b * h;
        let mut dq = vec![0f32; bh * t * d];
        let mut dk = vec![0f32; bh * t * d];
        let mut dv = vec![0f32; bh * t * d];
        with_data(x, |xv| {
            with_data(g, |gv| {
                dq.par_chunks_mut(t * d)
                    .zip(dk.par_chunks_mut(t * d))
                    .zip(dv.par_chunks_mut(t * d))
                    .enumerate()
                    .for_each(|(idx, ((dqh, dkh), dvh))| {
                        let (bi, hi) = (idx / h, idx % h);
                        let ph = &sv.p[idx * t * t..(idx + 1) * t * t];
                        let qh = &sv.q[idx * t * d..(idx + 1) * t * d];
                        let kh = &sv.k[idx * t * d..(idx + 1) * t * d];
                        let go = &gv[bi * t * w + hi * d..];
                        let v = &xv[bi * t * c3 + 2 * w + hi * d..];
                        // dV = P^T dO
                        mm(
                            (t, d, t),
                            dvh,
                            d,
                            false,
                            Mat(ph, 1, t),
                            Mat(go, w, 1),
                            Parallelism::None,
                        );
                        // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) * scale
                        let mut ds = vec![0f32; t * t];
                        mm(
                            (t, t, d),
                            &mut ds,
                            t,
                            false,
                            Mat(go, w, 1),
                            Mat(v, 1, c3),
                            Parallelism::None,
                        );
                        super::vmath::dispatch(
                            #[inline(always)]
                            || {
                                for (dr, pr) in ds.chunks_exact_mut(t).zip(ph.chunks_exact(t)) {
                                    let dot = super::vmath::dot(dr, pr);
                                    for (a, &pv) in dr.iter_mut().zip(pr) {
                                        *a = pv * (*a - dot) * scale;
                                    }
                                }
                            },
                        );
                        // dQ = dS K, dK = dS^T Q (in rotated coordinates), then un-rotate.
                        mm(
                            (t, d, t),
                            dqh,
                            d,
                            false,
                            Mat(&ds, t, 1),
                            Mat(kh, d, 1),
                            Parallelism::None,
                        );
                        mm(
                            (t, d, t),
                            dkh,
                            d,
                            false,
                            Mat(&ds, 1, t),
                            Mat(qh, d, 1),
                            Parallelism::None,
                        );
                        self.rotate_in_place(dqh, d, -1.0);
                        self.rotate_in_place(dkh, d, -1.0);
                    });
                Ok(())
            })
        })?;
        let mut dx = vec![0f32; b * t * c3];
        for (idx, ((dqh, dkh), dvh)) in dq
            .chunks_exact(t * d)
            .zip(dk.chunks_exact(t * d))
            .zip(dv.chunks_exact(t * d))
            .enumerate()
        {
            let (bi, hi) = (idx / h, idx % h);
            for ti in 0..t {
                let at = bi * t * c3 + ti * c3 + hi * d;
                let src = ti * d..(ti + 1) * d;
                dx[at..at + d].copy_from_slice(&dqh[src.clone()]);
                dx[at + w..at + w + d].copy_from_slice(&dkh[src.clone()]);
                dx[at + 2 * w..at + 2 * w + d].copy_from_slice(&dvh[src]);
            }
        }
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Multi-head self-attention from a fused projection `qkv` (B, T, 3W) laid out `[q | k | v]`
/// (each W = heads x d wide, head-major within) to the merged-head output (B, T, W). `rope`:
/// (cos, sin) tables of positions `0..`; `causal`: query i sees keys `0..=i`.
pub fn self_attention(
    qkv: &Tensor,
    heads: usize,
    causal: bool,
    rope: Option<(&Arc<Vec<f32>>, &Arc<Vec<f32>>)>,
) -> Result<Tensor> {
    let c3 = qkv.dim(candle_core::D::Minus1)?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!("self_attention: width {c3} does not split into 3 x {heads} heads");
    }
    qkv.contiguous()?.apply_op1(Attention {
        heads,
        causal,
        rope: rope.map(|(c, s)| (c.clone(), s.clone())),
        saved: Mutex::new(None),
    })
}

/// Self-attention keys and values of the rows being decoded, preallocated for `cap` positions
/// and written in place ([`cached_attention`]); K and V are each laid out (rows, heads, cap, d)
/// and positions `0..len` are filled. Decoding is detached: nothing here has a backward.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Buffers [`KvCache::select`] gathers into and then swaps with (kept between steps).
    k2: Vec<f32>,
    v2: Vec<f32>,
    rows: usize,
    heads: usize,
    d: usize,
    cap: usize,
    len: usize,
}

impl KvCache {
    pub fn new(rows: usize, heads: usize, d: usize, cap: usize) -> Self {
        let n = rows * heads * cap * d;
        Self {
            k: vec![0f32; n],
            v: vec![0f32; n],
            k2: Vec::new(),
            v2: Vec::new(),
            rows,
            heads,
            d,
            cap,
            len: 0,
        }
    }

    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps rows `idx` (beam reordering, expansion to beams / samples): row `r` becomes old
    /// row `idx[r]`. Only the filled positions are copied.
    pub fn select(&mut self, idx: &[u32]) -> Result<()> {
        if let Some(&bad) = idx.iter().find(|&&i| i as usize >= self.rows) {
            candle_core::bail!("kv cache: row {bad} of {}", self.rows);
        }
        let blk = self.cap * self.d;
        let used = self.len * self.d;
        let need = idx.len() * self.heads * blk;
        if self.k2.len() != need {
            self.k2 = vec![0f32; need];
            self.v2 = vec![0f32; need];
        }
        let hb = self.heads * blk;
        for (bufs, (src_k, src_v)) in self
            .k2
            .chunks_exact_mut(hb)
            .zip(self.v2.chunks_exact_mut(hb))
            .zip(idx.iter().map(|&i| {
                let at = i as usize * hb;
                (&self.k[at..at + hb], &self.v[at..at + hb])
            }))
        {
            let (dk, dv) = bufs;
            for h in 0..self.heads {
                let at = h * blk;
                dk[at..at + used].copy_from_slice(&src_k[at..at + used]);
                dv[at..at + used].copy_from_slice(&src_v[at..at + used]);
            }
        }
        std::mem::swap(&mut self.k, &mut self.k2);
        std::mem::swap(&mut self.v, &mut self.v2);
        self.rows = idx.len();
        Ok(())
    }
}

/// Decoding self-attention over a [`KvCache`]: `qkv` (N, T, 3W) holds the projections of `T`
/// new positions per row (`[q | k | v]`, head-major within each W), placed after the `len`
/// cached ones. RoPE (tables `rope`, positions from 0) rotates q and k; the new keys and values
/// are written into the cache in place; query `i` attends to positions `0..=len + i`. Returns
/// the merged-head output (N, T, W). No backward (decoding runs on detached weights).
pub fn cached_attention(
    qkv: &Tensor,
    heads: usize,
    rope: (&[f32], &[f32]),
    cache: &mut KvCache,
) -> Result<Tensor> {
    let (n, t, c3) = qkv.dims3()?;
    let w = c3 / 3;
    if heads != cache.heads || c3 != 3 * heads * cache.d || n != cache.rows {
        candle_core::bail!(
            "cached_attention: qkv {:?} does not fit a cache of {} rows x {} heads x {}",
            qkv.dims(),
            cache.rows,
            cache.heads,
            cache.d
        );
    }
    let (d, cap, offset) = (cache.d, cache.cap, cache.len);
    let l = offset + t;
    if l > cap || rope.0.len() < l * (d / 2) || rope.1.len() < l * (d / 2) {
        candle_core::bail!("cached_attention: {l} positions exceed the cache or RoPE table");
    }
    let scale = 1.0 / (d as f32).sqrt();
    let blk = cap * d;
    let mut y = vec![0f32; n * t * w];
    with_data(qkv, |x| {
        cache
            .k
            .par_chunks_mut(heads * blk)
            .zip(cache.v.par_chunks_mut(heads * blk))
            .zip(y.par_chunks_mut(t * w))
            .enumerate()
            .for_each(|(r, ((kr, vr), yr))| {
                let xr = &x[r * t * c3..(r + 1) * t * c3];
                let mut q = vec![0f32; t * d];
                let mut p = vec![0f32; t * l];
                for h in 0..heads {
                    let kh = &mut kr[h * blk..(h + 1) * blk];
                    let vh = &mut vr[h * blk..(h + 1) * blk];
                    for (ti, row) in xr.chunks_exact(c3).enumerate() {
                        let at = (offset + ti) * d;
                        q[ti * d..(ti + 1) * d].copy_from_slice(&row[h * d..(h + 1) * d]);
                        kh[at..at + d].copy_from_slice(&row[w + h * d..w + (h + 1) * d]);
                        vh[at..at + d].copy_from_slice(&row[2 * w + h * d..2 * w + (h + 1) * d]);
                    }
                    rotate(&mut q, d, offset, rope, 1.0);
                    rotate(&mut kh[offset * d..l * d], d, offset, rope, 1.0);
                    mm(
                        (t, l, d),
                        &mut p,
                        l,
                        false,
                        Mat(&q, d, 1),
                        Mat(kh, 1, d),
                        Parallelism::None,
                    );
                    super::vmath::dispatch(
                        #[inline(always)]
                        || {
                            for (i, pr) in p.chunks_exact_mut(l).enumerate() {
                                softmax_row(pr, offset + i + 1, scale);
                            }
                        },
                    );
                    mm(
                        (t, d, l),
                        &mut yr[h * d..],
                        w,
                        false,
                        Mat(&p, l, 1),
                        Mat(vh, d, 1),
                        Parallelism::None,
                    );
                }
            });
        Ok(())
    })?;
    cache.len = l;
    Tensor::from_vec(y, (n, t, w), qkv.device())
}
