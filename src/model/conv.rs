//! The optional convolutional stem of the ViT (`model.stem = "conv"`), as two CPU ops with
//! their own backward over channel-last (B, H, W, C) maps: a 3x3 "same" unfold (im2col) and a
//! 2x2 max pool.
//!
//! A 3x3 convolution is then `unfold` followed by one linear through the seam (weight
//! (out, 9·in), taps in row-major (ky, kx) order, channels innermost), so it is initialised,
//! frozen, LoRA-wrapped or quantized like every other linear. Channel-last maps also make the
//! per-pixel LayerNorm a last-dim norm and the final map already token-major.
//!
//! Why a stem at all: trained from scratch on the synthetic set's 1,000 generic-domain images,
//! under direct category supervision, the plain patchify stem does not learn the product's
//! silhouette within hundreds of steps; a stack of small convolutions with pooling does (Xiao
//! et al., "Early Convolutions Help Transformers See Better", 2021). Through the captioning
//! loss at the ablation's budget it did not help (figures in docs/models.md), so it is an
//! option, not the tiny presets' default.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::fused::{data, rows, rows2, slice};

fn dims4(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match *l.dims() {
        [b, h, w, c] => Ok((b, h, w, c)),
        ref d => candle_core::bail!("conv stem op needs a (B, H, W, C) map, got {d:?}"),
    }
}

/// The in-bounds source pixel of tap `k` (0..9) of output pixel (y, x), if any.
#[inline]
fn tap(y: usize, x: usize, k: usize, h: usize, w: usize) -> Option<usize> {
    let sy = (y + k / 3).checked_sub(1).filter(|&v| v < h)?;
    let sx = (x + k % 3).checked_sub(1).filter(|&v| v < w)?;
    Some(sy * w + sx)
}

/// Calls `f(tap offset in the unfolded row, source pixel)` for every in-bounds tap of every
/// pixel of an `h x w` map, in one fixed order (the fold's sums depend on it).
fn for_each_tap(h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    for p in 0..h * w {
        for k in 0..9 {
            if let Some(q) = tap(p / w, p % w, k, h, w) {
                f(p * 9 + k, q);
            }
        }
    }
}

/// (B, H, W, C) -> (B, H, W, 9C): each pixel's 3x3 neighbourhood, zero outside the map.
struct Unfold3;

impl CustomOp1 for Unfold3 {
    fn name(&self) -> &'static str {
        "ecic-unfold3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, h, w, c) = dims4(l)?;
        let mut y = vec![0f32; x.len() * 9];
        if !x.is_empty() {
            rows(x, h * w * c, &mut y, h * w * 9 * c, |_, xi, yi| {
                for_each_tap(h, w, |t, q| {
                    yi[t * c..(t + 1) * c].copy_from_slice(&xi[q * c..(q + 1) * c]);
                });
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((b, h, w, 9 * c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1(Fold3 { like: x.dims4()? })?))
    }
}

/// The adjoint of [`Unfold3`]: sums each tap's gradient back onto its source pixel.
struct Fold3 {
    like: (usize, usize, usize, usize),
}

impl CustomOp1 for Fold3 {
    fn name(&self) -> &'static str {
        "ecic-fold3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = slice(s, l)?;
        let (b, h, w, c) = self.like;
        if l.dims() != [b, h, w, 9 * c] {
            candle_core::bail!(
                "fold3x3: gradient {:?} does not fit {:?}",
                l.dims(),
                self.like
            );
        }
        let mut dx = vec![0f32; b * h * w * c];
        if !dx.is_empty() {
            rows(g, h * w * 9 * c, &mut dx, h * w * c, |_, gi, di| {
                for_each_tap(h, w, |t, q| {
                    di[q * c..(q + 1) * c]
                        .iter_mut()
                        .zip(&gi[t * c..(t + 1) * c])
                        .for_each(|(d, &v)| *d += v);
                });
            });
        }
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// 3x3 "same" neighbourhoods of a channel-last map: (B, H, W, C) -> (B, H, W, 9C).
pub fn unfold3x3(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Unfold3)
}

/// The input index of the maximum of 2x2 window (oy, ox), channel `ch` (first maximum wins).
#[inline]
fn window_max(xi: &[f32], w: usize, c: usize, oy: usize, ox: usize, ch: usize) -> usize {
    let at = |dy: usize, dx: usize| ((2 * oy + dy) * w + 2 * ox + dx) * c + ch;
    let mut best = at(0, 0);
    for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
        let i = at(dy, dx);
        if xi[i] > xi[best] {
            best = i;
        }
    }
    best
}

/// 2x2 max pooling, stride 2, of a channel-last map with even H and W.
struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "ecic-maxpool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let (b, h, w, c) = dims4(l)?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("maxpool2: H and W must be even, got {h}x{w}");
        }
        let (oh, ow) = (h / 2, w / 2);
        let mut y = vec![0f32; b * oh * ow * c];
        if !y.is_empty() {
            rows(x, h * w * c, &mut y, oh * ow * c, |_, xi, yi| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ch in 0..c {
                            yi[(oy * ow + ox) * c + ch] = xi[window_max(xi, w, c, oy, ox, ch)];
                        }
                    }
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((b, oh, ow, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (b, h, w, c) = x.dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let (xv, gv) = (data(x)?, data(g)?);
        let mut dx = vec![0f32; xv.len()];
        if !dx.is_empty() {
            rows2(
                &xv,
                &gv,
                oh * ow * c,
                h * w * c,
                &mut dx,
                |_, xi, gi, di| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            for ch in 0..c {
                                di[window_max(xi, w, c, oy, ox, ch)] = gi[(oy * ow + ox) * c + ch];
                            }
                        }
                    }
                },
            );
        }
        Ok(Some(Tensor::from_vec(dx, (b, h, w, c), x.device())?))
    }
}

/// 2x2 max pooling, stride 2, of a channel-last map (B, H, W, C) with even H and W.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seeded(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// unfold + linear equals candle's own NCHW conv2d (padding 1), values and gradients of
    /// both the input and the weight.
    #[test]
    fn unfold_then_linear_is_a_3x3_convolution() {
        let (b, h, w, cin, cout) = (2, 6, 4, 3, 5);
        let x = Var::from_tensor(&seeded((b, h, w, cin), 1)).unwrap();
        // candle's kernel layout (out, in, ky, kx); ours (out, ky, kx, in) flattened.
        let k = Var::from_tensor(&seeded((cout, cin, 3, 3), 2)).unwrap();
        let ours_w = k
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((cout, 9 * cin))
            .unwrap();
        let ours = unfold3x3(&x)
            .unwrap()
            .reshape((b * h * w, 9 * cin))
            .unwrap()
            .matmul(&ours_w.t().unwrap())
            .unwrap()
            .reshape((b, h, w, cout))
            .unwrap();
        let theirs = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .conv2d(&k, 1, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert!(max_abs(&ours, &theirs) < 1e-5);
        let probe = seeded((b, h, w, cout), 3);
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [x.as_tensor(), k.as_tensor()] {
            let (a, c) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(
                max_abs(a, c) < 1e-4,
                "gradient differs by {}",
                max_abs(a, c)
            );
        }
    }

    /// Values equal candle's NCHW `max_pool2d`. Gradients are checked against max pooling
    /// written as two max reductions over a (B, H/2, 2, W/2, 2, C) view: candle's own
    /// `max_pool2d` backward scales a unique maximum's gradient by 1/4 (it multiplies by the
    /// share of maxima in the window where it should divide), so it cannot be the reference.
    #[test]
    fn max_pool_matches_candle_in_value_and_reductions_in_gradient() {
        let (b, h, w, c) = (2, 4, 6, 3);
        let x = Var::from_tensor(&seeded((b, h, w, c), 4)).unwrap();
        let ours = max_pool2(&x).unwrap();
        let candle = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .max_pool2d(2)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        assert_eq!(ours.dims(), &[b, h / 2, w / 2, c]);
        assert!(max_abs(&ours, &candle) == 0.0);
        let reduced = x
            .reshape((b, h / 2, 2, w / 2, 2, c))
            .unwrap()
            .max(4)
            .unwrap()
            .max(2)
            .unwrap();
        assert!(max_abs(&ours, &reduced) == 0.0);
        let probe = seeded((b, h / 2, w / 2, c), 5);
        let g1 = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&reduced * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, r) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
        assert!(
            max_abs(a, r) < 1e-6,
            "gradient differs by {}",
            max_abs(a, r)
        );
        // Every window routes its gradient to exactly one input.
        let nonzero = a
            .ne(0f32)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let per = nonzero.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(per as usize, b * (h / 2) * (w / 2) * c);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let x = seeded((1, 3, 4, 2), 6);
        assert!(max_pool2(&x).is_err());
        assert!(unfold3x3(&x.flatten_from(2).unwrap()).is_err());
    }
}
