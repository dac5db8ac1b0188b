//! A LoRA linear on a frozen base as one CPU op with its own backward:
//! `y = x W^T (+ b) + s (x A^T) B^T` (Hu et al., "LoRA", 2021), for an f32 or a 4-bit (QLoRA)
//! base `W`.
//!
//! Why: composed from [`super::kernels::linear`] and tensor arithmetic, the LoRA path leaves
//! three tensors as wide as the layer's output in the autograd graph until the backward (the
//! base product, the low-rank product and its scaled copy, which the sum's node holds). At a
//! real LM's sizes that was most of a training step's memory beside a 4-bit base
//! (docs/models.md, "QLoRA memory"). This op's node holds only its inputs (`x`, `A`, `B`);
//! the backward recomputes the rank-r projection `x A^T` (rows x r x in multiply-adds, a small
//! share of the base product's rows x out x in).
//!
//! The arithmetic is the composed form's, step for step: the same products (same gemm calls),
//! the scaled delta added as `y + (d * s + 0)` as candle's affine and add compute it, the
//! input gradient summed as `g W + (g s B) A`. So values and gradients are bitwise those of
//! the composed form (`tests/model.rs` checks both). Dropout on the LoRA input keeps the
//! composed form (the mask would be one more input to save).

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::slice;
use super::kernels::{linear_fwd, mm_new, out_shape, parallelism, quant_dx, quant_fwd, Mat};

/// The frozen base of a LoRA linear.
#[derive(Debug, Clone)]
pub enum FrozenBase {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

struct LoraLinear {
    base: FrozenBase,
    bias: Option<Tensor>,
    scale: f64,
}

/// Runs `f` on the contiguous f32 values of a frozen tensor.
fn values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    super::kernels::with_data(t, f)
}

impl LoraLinear {
    /// `x W^T (+ b)` as the composed form computes it: the bias inside the dense product, or
    /// added after the 4-bit one.
    fn base_fwd(&self, x: &[f32], inp: usize, out: usize) -> Result<Vec<f32>> {
        match (&self.base, &self.bias) {
            (FrozenBase::Dense(w), None) => values(w, |wv| Ok(linear_fwd(x, wv, None, inp, out))),
            (FrozenBase::Dense(w), Some(b)) => values(w, |wv| {
                values(b, |bv| Ok(linear_fwd(x, wv, Some(bv), inp, out)))
            }),
            (FrozenBase::Quant(q), bias) => {
                let mut y = quant_fwd(x, q)?;
                if let Some(b) = bias {
                    values(b, |bv| {
                        for row in y.chunks_exact_mut(out) {
                            row.iter_mut().zip(bv).for_each(|(v, &c)| *v += c);
                        }
                        Ok(())
                    })?;
                }
                Ok(y)
            }
        }
    }

    /// `g W`, the base's share of the input gradient.
    fn base_dx(&self, g: &[f32], inp: usize, out: usize) -> Result<Vec<f32>> {
        let rows = g.len() / out;
        match &self.base {
            FrozenBase::Dense(w) => values(w, |wv| {
                Ok(mm_new(
                    (rows, inp, out),
                    Mat(g, out, 1),
                    Mat(wv, inp, 1),
                    parallelism(rows, inp, out),
                ))
            }),
            FrozenBase::Quant(q) => quant_dx(g, q),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "ecic-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (r, inp) = (la.dims()[0], la.dims()[1]);
        let out = lb.dims()[0];
        let x = slice(sx, lx)?;
        let mut y = self.base_fwd(x, inp, out)?;
        let h = linear_fwd(x, slice(sa, la)?, None, inp, r);
        let d = linear_fwd(&h, slice(sb, lb)?, None, r, out);
        let s = self.scale as f32;
        y.iter_mut().zip(&d).for_each(|(v, &d)| *v += d * s + 0.0);
        Ok((CpuStorage::F32(y), out_shape(lx, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, inp) = a.dims2()?;
        let out = b.dim(0)?;
        let s = self.scale as f32;
        values(g, |gv| {
            let rows = gv.len() / out;
            let gs: Vec<f32> = gv.iter().map(|&v| v * s + 0.0).collect();
            // The rank-r projection is recomputed rather than kept from the forward.
            let (h, dh, da) = values(x, |xv| {
                let h = values(a, |av| Ok(linear_fwd(xv, av, None, inp, r)))?;
                let dh = values(b, |bv| {
                    Ok(mm_new(
                        (rows, r, out),
                        Mat(&gs, out, 1),
                        Mat(bv, r, 1),
                        parallelism(rows, r, out),
                    ))
                })?;
                let da = a.track_op().then(|| {
                    mm_new(
                        (r, inp, rows),
                        Mat(&dh, 1, r),
                        Mat(xv, inp, 1),
                        parallelism(r, inp, rows),
                    )
                });
                Ok((h, dh, da))
            })?;
            let db = b.track_op().then(|| {
                mm_new(
                    (out, r, rows),
                    Mat(&gs, 1, out),
                    Mat(&h, r, 1),
                    parallelism(out, r, rows),
                )
            });
            let dx = if x.track_op() {
                let mut dx = self.base_dx(gv, inp, out)?;
                let lora = values(a, |av| {
                    Ok(mm_new(
                        (rows, inp, r),
                        Mat(&dh, r, 1),
                        Mat(av, inp, 1),
                        parallelism(rows, inp, r),
                    ))
                })?;
                dx.iter_mut().zip(&lora).for_each(|(v, &l)| *v += l);
                Some(Tensor::from_vec(dx, x.shape(), x.device())?)
            } else {
                None
            };
            let da = da
                .map(|v| Tensor::from_vec(v, a.shape(), a.device()))
                .transpose()?;
            let db = db
                .map(|v| Tensor::from_vec(v, b.shape(), b.device()))
                .transpose()?;
            Ok((dx, da, db))
        })
    }
}

/// `x (..., in) . W^T (+ bias) + scale (x A^T) B^T` with a frozen base `W` (out, in) and
/// optional frozen `bias` (out,), LoRA factors `a` (r, in) and `b` (out, r). The base and bias
/// must not be tracked: the op computes no gradient for them.
pub fn lora_linear(
    x: &Tensor,
    base: &FrozenBase,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let (r, a_in) = a.dims2()?;
    let (out, b_r) = b.dims2()?;
    let base_dims = match base {
        FrozenBase::Dense(w) => w.dims().to_vec(),
        FrozenBase::Quant(q) => q.shape().dims().to_vec(),
    };
    if a_in != inp || b_r != r || base_dims != [out, inp] {
        candle_core::bail!(
            "lora_linear: base {base_dims:?}, A {:?} and B {:?} do not take input {:?}",
            a.dims(),
            b.dims(),
            x.dims()
        );
    }
    let tracked = match base {
        FrozenBase::Dense(w) => w.track_op(),
        FrozenBase::Quant(_) => false,
    } || bias.is_some_and(Tensor::track_op);
    if tracked {
        candle_core::bail!("lora_linear: the base weight and bias must be frozen");
    }
    let op = LoraLinear {
        base: match base {
            FrozenBase::Dense(w) => FrozenBase::Dense(w.contiguous()?),
            FrozenBase::Quant(q) => FrozenBase::Quant(q.clone()),
        },
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}
