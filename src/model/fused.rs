//! Fused CPU ops with their own backward pass (candle's fused forms have none).
//!
//! Each op here replaces a chain of 4-10 basic tensor ops in [`super::ops`]: every basic op is
//! one pass over memory forward, and in backward one more plus a zero-filled gradient buffer
//! per node, which at the tiny preset cost more than the matmuls. The formulas are the same
//! as the composed forms (the tests compare values and gradients against them); the forward
//! runs row by row over a contiguous last dimension, the backward is computed in plain Rust
//! and returned as a constant (second-order gradients are not needed).
//!
//! Row-local work runs on the rayon pool when there is more than one thread and the tensor is
//! large enough ([`par`]); sums across rows (norm weight gradients, the cross-entropy total)
//! stay sequential in row order, so results are bitwise the same whatever the thread count.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::vmath::{self, exp_in_place};

/// Whether an op over `len` floats goes to the rayon pool (below ~32k floats a task costs more
/// than it saves).
fn par(len: usize) -> bool {
    len >= 1 << 15 && candle_core::utils::get_num_threads() > 1
}

/// Runs `f(row index, input row, output row)` over the rows of `x` and `y` (row lengths `nx`,
/// `ny`), on the rayon pool when [`par`] says so. Rows are independent, so the result does not
/// depend on the thread count. Each row runs inside [`vmath::dispatch`]: callers mark `f`
/// `#[inline(always)]` so that its body is compiled for each instruction-set level.
pub(crate) fn rows<F>(x: &[f32], nx: usize, y: &mut [f32], ny: usize, f: F)
where
    F: Fn(usize, &[f32], &mut [f32]) + Sync + Send,
{
    let f = |r, xr: &[f32], yr: &mut [f32]| {
        vmath::dispatch(
            #[inline(always)]
            || f(r, xr, yr),
        )
    };
    if par(x.len()) {
        x.par_chunks_exact(nx)
            .zip(y.par_chunks_exact_mut(ny))
            .enumerate()
            .for_each(|(r, (xr, yr))| f(r, xr, yr));
    } else {
        x.chunks_exact(nx)
            .zip(y.chunks_exact_mut(ny))
            .enumerate()
            .for_each(|(r, (xr, yr))| f(r, xr, yr));
    }
}

/// [`rows`] with a second input of row length `nx` (the incoming gradient).
pub(crate) fn rows2<F>(x: &[f32], g: &[f32], ng: usize, nx: usize, y: &mut [f32], f: F)
where
    F: Fn(usize, &[f32], &[f32], &mut [f32]) + Sync + Send,
{
    let f = |r, xr: &[f32], gr: &[f32], yr: &mut [f32]| {
        vmath::dispatch(
            #[inline(always)]
            || f(r, xr, gr, yr),
        )
    };
    if par(x.len()) {
        x.par_chunks_exact(nx)
            .zip(g.par_chunks_exact(ng))
            .zip(y.par_chunks_exact_mut(nx))
            .enumerate()
            .for_each(|(r, ((xr, gr), yr))| f(r, xr, gr, yr));
    } else {
        x.chunks_exact(nx)
            .zip(g.chunks_exact(ng))
            .zip(y.chunks_exact_mut(nx))
            .enumerate()
            .for_each(|(r, ((xr, gr), yr))| f(r, xr, gr, yr));
    }
}

/// The f32 data of a contiguous CPU storage (fused, kernel and conv ops).
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

/// A tensor's f32 values: its own storage where it is contiguous on the CPU (no copy; the
/// backward passes read every activation and gradient this way), else a contiguous copy.
pub(crate) enum Data<'a> {
    /// candle's read guard on the storage, and the tensor's range in it.
    Borrowed(
        Box<dyn std::ops::Deref<Target = Storage> + Sync + 'a>,
        usize,
        usize,
    ),
    Owned(Vec<f32>),
}

impl std::ops::Deref for Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Data::Borrowed(guard, a, b) => match &***guard {
                Storage::Cpu(CpuStorage::F32(v)) => &v[*a..*b],
                _ => unreachable!("checked when borrowed"),
            },
            Data::Owned(v) => v,
        }
    }
}

pub(crate) fn data(t: &Tensor) -> Result<Data<'_>> {
    let (s, l) = t.storage_and_layout();
    if let (Storage::Cpu(CpuStorage::F32(_)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
        return Ok(Data::Borrowed(Box::new(s), a, b));
    }
    drop(s);
    Ok(Data::Owned(t.flatten_all()?.to_vec1::<f32>()?))
}

fn out(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// `softmax(x * scale + mask)` over the last dim; `mask` (T, S) repeats over leading dims.
struct Softmax {
    scale: f32,
    mask: Option<Arc<Vec<f32>>>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "ecic-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let n = l.dims()[l.dims().len() - 1];
        let mut y = vec![0f32; x.len()];
        let mrows = self.mask.as_ref().map_or(1, |m| m.len() / n);
        rows(
            x,
            n,
            &mut y,
            n,
            #[inline(always)]
            |r, xr, yr| {
                match &self.mask {
                    Some(m) => {
                        let mr = &m[(r % mrows) * n..(r % mrows + 1) * n];
                        for ((o, &a), &b) in yr.iter_mut().zip(xr).zip(mr) {
                            *o = a * self.scale + b;
                        }
                    }
                    None => yr
                        .iter_mut()
                        .zip(xr)
                        .for_each(|(o, &a)| *o = a * self.scale),
                }
                let mx = vmath::max(yr);
                yr.iter_mut().for_each(|o| *o -= mx);
                exp_in_place(yr);
                let sum = vmath::sum(yr);
                let inv = 1.0 / sum;
                yr.iter_mut().for_each(|o| *o *= inv);
            },
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let n = y.dim(candle_core::D::Minus1)?;
        let (yv, gv) = (data(y)?, data(g)?);
        let mut dx = vec![0f32; yv.len()];
        rows2(
            &yv,
            &gv,
            n,
            n,
            &mut dx,
            #[inline(always)]
            |_, yr, gr, dr| {
                let dot = vmath::dot(yr, gr);
                for ((d, &a), &b) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = self.scale * a * (b - dot);
                }
            },
        );
        Ok(Some(out(dx, y)?))
    }
}

/// Softmax over the last dim of `x * scale + mask` (mask (T,S) constant, broadcast over rows).
pub fn softmax(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let mask = match mask {
        Some(m) => Some(Arc::new(data(m)?.to_vec())),
        None => None,
    };
    x.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
        mask,
    })
}

/// RMSNorm `x / sqrt(mean(x²) + eps) * w` over the last dim.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "ecic-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        rows(
            x,
            n,
            &mut y,
            n,
            #[inline(always)]
            |_, xr, yr| {
                let ms = vmath::dot(xr, xr) / n as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for ((o, &a), &b) in yr.iter_mut().zip(xr).zip(w) {
                    *o = a * inv * b;
                }
            },
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, gv) = (data(x)?, data(w)?, data(g)?);
        let n = wv.len();
        let inv_of = |xr: &[f32]| {
            let ms = vmath::dot(xr, xr) / n as f32;
            1.0 / (ms + self.eps).sqrt()
        };
        // Each row's 1/rms, once, for both passes below.
        let mut invs = vec![0f32; xv.len() / n];
        rows(
            &xv,
            n,
            &mut invs,
            1,
            #[inline(always)]
            |_, xr, o| o[0] = inv_of(xr),
        );
        let mut dx = vec![0f32; xv.len()];
        rows2(
            &xv,
            &gv,
            n,
            n,
            &mut dx,
            #[inline(always)]
            |r, xr, gr, dr| {
                let inv = invs[r];
                // dxhat = g*w; dx = inv * (dxhat - xhat * mean(dxhat * xhat)).
                let dot = inv * vmath::dot3(gr, &wv, xr) / n as f32;
                for i in 0..n {
                    dr[i] = inv * (gr[i] * wv[i] - xr[i] * inv * dot);
                }
            },
        );
        // The weight gradient sums over rows: in row order, on this thread.
        let mut dw = vec![0f32; n];
        vmath::dispatch(
            #[inline(always)]
            || {
                for ((xr, gr), &inv) in xv.chunks_exact(n).zip(gv.chunks_exact(n)).zip(&invs) {
                    for i in 0..n {
                        dw[i] += gr[i] * (xr[i] * inv);
                    }
                }
            },
        );
        Ok((Some(out(dx, x)?), Some(out(dw, w)?)))
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// LayerNorm `(x - mean) / sqrt(var + eps) * w + b` over the last dim.
struct LayerNorm {
    eps: f32,
}

#[inline(always)]
fn ln_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let n = xr.len() as f32;
    let mean = vmath::sum(xr) / n;
    let var = vmath::sum_sq_dev(xr, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "ecic-layer-norm"
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
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        rows(
            x,
            n,
            &mut y,
            n,
            #[inline(always)]
            |_, xr, yr| {
                let (mean, inv) = ln_stats(xr, self.eps);
                for i in 0..n {
                    yr[i] = (xr[i] - mean) * inv * w[i] + b[i];
                }
            },
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, gv) = (data(x)?, data(w)?, data(g)?);
        let n = wv.len();
        // Each row's (mean, 1/std), once, for both passes below.
        let mut stats = vec![0f32; 2 * (xv.len() / n)];
        rows(
            &xv,
            n,
            &mut stats,
            2,
            #[inline(always)]
            |_, xr, o| {
                (o[0], o[1]) = ln_stats(xr, self.eps);
            },
        );
        let mut dx = vec![0f32; xv.len()];
        rows2(
            &xv,
            &gv,
            n,
            n,
            &mut dx,
            #[inline(always)]
            |r, xr, gr, dr| {
                let (mean, inv) = (stats[2 * r], stats[2 * r + 1]);
                // dxhat = g*w; dx = inv * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                let (mut s1, mut s2) = (0f32, 0f32);
                for i in 0..n {
                    let xh = (xr[i] - mean) * inv;
                    let d = gr[i] * wv[i];
                    s1 += d;
                    s2 += d * xh;
                }
                let (s1, s2) = (s1 / n as f32, s2 / n as f32);
                for i in 0..n {
                    let xh = (xr[i] - mean) * inv;
                    dr[i] = inv * (gr[i] * wv[i] - s1 - xh * s2);
                }
            },
        );
        // Weight and bias gradients sum over rows: in row order, on this thread.
        let mut dw = vec![0f32; n];
        let mut db = vec![0f32; n];
        vmath::dispatch(
            #[inline(always)]
            || {
                for ((xr, gr), st) in xv
                    .chunks_exact(n)
                    .zip(gv.chunks_exact(n))
                    .zip(stats.chunks_exact(2))
                {
                    let (mean, inv) = (st[0], st[1]);
                    for i in 0..n {
                        dw[i] += gr[i] * ((xr[i] - mean) * inv);
                        db[i] += gr[i];
                    }
                }
            },
        );
        Ok((Some(out(dx, x)?), Some(out(dw, w)?), Some(out(db, b)?)))
    }
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)

/// tanh of every element of `u`, in place, through one `exp` each (libm's tanhf goes through
/// expm1f and was 8% of a training step). |u| > 15 gives ±1 (exactly what f32 rounds to).
#[inline(always)]
fn tanh_in_place(u: &mut [f32]) {
    u.iter_mut().for_each(|v| *v = 2.0 * v.clamp(-15.0, 15.0));
    exp_in_place(u);
    u.iter_mut().for_each(|e| *e = (*e - 1.0) / (*e + 1.0));
}

/// `f(offset, block of y)` over the blocks of [`BLOCK`] elements of `y` (the closure reads its
/// inputs at `offset..offset + block.len()`), on the rayon pool when [`par`] says so (blocks are
/// independent: the result does not depend on it); dispatched as in [`rows`].
fn blocks<F>(y: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let f = |at, yb: &mut [f32]| {
        vmath::dispatch(
            #[inline(always)]
            || f(at, yb),
        )
    };
    if par(y.len()) {
        y.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(i, b)| f(i * BLOCK, b));
    } else {
        y.chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(i, b)| f(i * BLOCK, b));
    }
}

const BLOCK: usize = 1024;

/// The argument of GELU's tanh.
#[inline(always)]
fn gelu_u(v: f32) -> f32 {
    GELU_K * (v + 0.044_715 * v * v * v)
}

/// GELU, tanh approximation (the form candle's `gelu` computes).
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "ecic-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        blocks(
            &mut y,
            #[inline(always)]
            |at, yb| {
                let xb = &x[at..at + yb.len()];
                yb.iter_mut().zip(xb).for_each(|(o, &v)| *o = gelu_u(v));
                tanh_in_place(yb);
                yb.iter_mut()
                    .zip(xb)
                    .for_each(|(t, &v)| *t = 0.5 * v * (1.0 + *t));
            },
        );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (xv, gv) = (data(x)?, data(g)?);
        // dx = g * (0.5 (1 + t) + 0.5 v (1 - t^2) k (1 + 3 c v^2)).
        let mut dx = vec![0f32; xv.len()];
        blocks(
            &mut dx,
            #[inline(always)]
            |at, db| {
                let (xb, gb) = (&xv[at..at + db.len()], &gv[at..at + db.len()]);
                db.iter_mut().zip(xb).for_each(|(o, &v)| *o = gelu_u(v));
                tanh_in_place(db);
                for ((t, &v), &gr) in db.iter_mut().zip(xb).zip(gb) {
                    *t = gr
                        * (0.5 * (1.0 + *t)
                            + 0.5 * v * (1.0 - *t * *t) * GELU_K * (1.0 + 3.0 * 0.044_715 * v * v));
                }
            },
        );
        Ok(Some(out(dx, x)?))
    }
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// `out[i] = sigmoid(a[i])`.
#[inline(always)]
fn sigmoid_into(a: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(a).for_each(|(o, &v)| *o = -v);
    exp_in_place(out);
    out.iter_mut().for_each(|e| *e = 1.0 / (1.0 + *e));
}

/// SwiGLU on a fused `gate_up` projection: `[a | b]` (…, 2h) -> `silu(a) * b` (…, h).
struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "ecic-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let dims = l.dims();
        let h2 = dims[dims.len() - 1];
        let h = h2 / 2;
        let mut y = vec![0f32; x.len() / 2];
        rows(
            x,
            h2,
            &mut y,
            h,
            #[inline(always)]
            |_, r, yr| {
                let (a, b) = r.split_at(h);
                sigmoid_into(a, yr);
                for ((o, &a), &b) in yr.iter_mut().zip(a).zip(b) {
                    *o *= a * b;
                }
            },
        );
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = h;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (xv, gv) = (data(x)?, data(g)?);
        let h2 = x.dim(candle_core::D::Minus1)?;
        let h = h2 / 2;
        let mut dx = vec![0f32; xv.len()];
        rows2(
            &xv,
            &gv,
            h,
            h2,
            &mut dx,
            #[inline(always)]
            |_, r, gr, dr| {
                let (a, b) = r.split_at(h);
                let (da, db) = dr.split_at_mut(h);
                sigmoid_into(a, db);
                for i in 0..h {
                    let s = db[i];
                    da[i] = gr[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
                    db[i] = gr[i] * a[i] * s;
                }
            },
        );
        Ok(Some(out(dx, x)?))
    }
}

pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SwiGlu)
}

/// Rotary embedding ("rotate half") at positions `offset..offset+T` of x (B,H,T,d).
struct Rope {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    offset: usize,
}

impl Rope {
    /// `sign` +1: rotate by the angle (forward); -1: by its negative (backward).
    fn rotate(&self, x: &[f32], t: usize, d: usize, sign: f32) -> Vec<f32> {
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        rows(
            x,
            d,
            &mut y,
            d,
            #[inline(always)]
            |r, xr, yr| {
                let p = self.offset + r % t;
                let (c, s) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                for i in 0..half {
                    let (x1, x2) = (xr[i], xr[i + half]);
                    let si = sign * s[i];
                    yr[i] = x1 * c[i] - x2 * si;
                    yr[i + half] = x2 * c[i] + x1 * si;
                }
            },
        );
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "ecic-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        Ok((
            CpuStorage::F32(self.rotate(slice(s, l)?, t, d, 1.0)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, t, d) = x.dims4()?;
        Ok(Some(out(self.rotate(&data(g)?, t, d, -1.0), x)?))
    }
}

/// `cos`/`sin`: (max_pos, d/2) angle tables, row-major.
pub fn rope(x: &Tensor, cos: &Arc<Vec<f32>>, sin: &Arc<Vec<f32>>, offset: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        offset,
    })
}

/// Mean masked cross-entropy with label smoothing over logits (N, V): one scalar.
struct CrossEntropy {
    targets: Vec<u32>,
    /// mask / max(sum(mask), 1) per row.
    weight: Vec<f32>,
    smoothing: f32,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "ecic-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let v = l.dims()[1];
        // Each row's term (rows of weight 0 have none), then their sum in row order.
        let mut terms = vec![0f32; x.len() / v];
        rows(
            x,
            v,
            &mut terms,
            1,
            #[inline(always)]
            |r, xr, term| {
                let (t, w) = (self.targets[r], self.weight[r]);
                if w == 0.0 {
                    return;
                }
                let mx = vmath::max(xr);
                let mut e: Vec<f32> = xr.iter().map(|a| a - mx).collect();
                exp_in_place(&mut e);
                let lse = mx + vmath::sum(&e).ln();
                let nll = lse - xr[t as usize];
                let smooth = lse - vmath::sum(xr) / v as f32;
                term[0] = w * ((1.0 - self.smoothing) * nll + self.smoothing * smooth);
            },
        );
        let mut total = 0f64;
        for (&term, &w) in terms.iter().zip(&self.weight) {
            if w != 0.0 {
                total += term as f64;
            }
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_scalar::<f32>()?;
        let xv = data(x)?;
        let v = x.dim(1)?;
        let mut dx = vec![0f32; xv.len()];
        let sv = self.smoothing / v as f32;
        rows(
            &xv,
            v,
            &mut dx,
            v,
            #[inline(always)]
            |r, xr, dr| {
                let (t, w) = (self.targets[r], self.weight[r]);
                if w == 0.0 {
                    return;
                }
                let mx = vmath::max(xr);
                dr.iter_mut().zip(xr).for_each(|(d, &a)| *d = a - mx);
                exp_in_place(dr);
                let sum = vmath::sum(dr);
                let k = g * w / sum;
                dr.iter_mut().for_each(|d| *d = *d * k - g * w * sv);
                dr[t as usize] -= g * w * (1.0 - self.smoothing);
            },
        );
        Ok(Some(out(dx, x)?))
    }
}

/// `logits` (N, V), `targets` (N,) u32, `mask` (N,): the value of `ops::cross_entropy`.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    let v = logits.dim(1)?;
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target id {bad} is outside the vocabulary of {v}");
    }
    let mask = data(&mask.to_dtype(candle_core::DType::F32)?)?.to_vec();
    let denom = mask.iter().sum::<f32>().max(1.0);
    let weight = mask.iter().map(|m| m / denom).collect();
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets,
        weight,
        smoothing: smoothing as f32,
    })
}
