//! Differentiable building-block ops.
//!
//! candle's fused ops (`softmax_last_dim`, `ops::layer_norm`, `rms_norm`, `rotary_emb`) have
//! no backward pass and silently cut gradients, so every op the model trains through is
//! either written here from basic tensor ops or is one of our own fused ops with a backward
//! ([`super::fused`]: softmax, norms, GELU, SwiGLU, RoPE, cross-entropy); [`composed`] keeps
//! the basic-op forms the fused ones are tested against. Maxima subtracted for stability are detached: they do
//! not change the result, and keeping them out of the graph saves backward work.

use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor, D};

use super::fused;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Per-forward context: training mode and the seeded dropout generator.
#[derive(Clone, Copy)]
pub struct Fwd<'a> {
    pub train: bool,
    pub rng: Option<&'a Mutex<ChaCha8Rng>>,
}

impl Fwd<'_> {
    pub const EVAL: Fwd<'static> = Fwd {
        train: false,
        rng: None,
    };
}

/// Inverted dropout with a mask drawn from the seeded generator (candle's own `rand` is
/// not seedable, which would break run-to-run determinism).
pub fn dropout(x: &Tensor, p: f64, fwd: Fwd<'_>) -> Result<Tensor> {
    let Some(rng) = fwd.rng.filter(|_| fwd.train && p > 0.0) else {
        return Ok(x.clone());
    };
    let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { scale })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    fused::softmax(x, 1.0, None)
}

pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&m)?;
    let lse = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
    d.broadcast_sub(&lse)
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    fused::layer_norm(x, w, b, eps)
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    fused::rms_norm(x, w, eps)
}

/// GELU (tanh approximation), fused with its own backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    fused::gelu(x)
}

/// `silu(a) * b` for `x = [a | b]` on the last dim (the SwiGLU of a fused gate/up projection).
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    fused::swiglu(x)
}

/// The same ops written from basic tensor ops: the references the fused ops are tested against
/// (values and gradients), kept so the comparison never depends on the code under test.
pub mod composed {
    use candle_core::{Result, Tensor, D};

    pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        let s = e.sum_keepdim(D::Minus1)?;
        e.broadcast_div(&s)
    }

    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + eps)?.sqrt()?.recip()?;
        xc.broadcast_mul(&inv)?.broadcast_mul(w)?.broadcast_add(b)
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    pub fn swiglu(x: &Tensor) -> Result<Tensor> {
        let h = x.dim(D::Minus1)? / 2;
        x.narrow(D::Minus1, 0, h)?.silu()? * x.narrow(D::Minus1, h, h)?
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
        let mut s = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            s = s.broadcast_add(m)?;
        }
        softmax_last(&s)?.matmul(v)
    }

    pub fn cross_entropy(
        logits: &Tensor,
        targets: &Tensor,
        mask: &Tensor,
        smoothing: f64,
    ) -> Result<Tensor> {
        let logp = super::log_softmax_last(logits)?;
        let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let per_tok = if smoothing > 0.0 {
            let smooth = logp.mean(D::Minus1)?.neg()?;
            ((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?
        } else {
            nll
        };
        let mask = mask.to_dtype(candle_core::DType::F32)?;
        let denom = mask.sum_all()?.maximum(1.0)?;
        (per_tok * mask)?.sum_all()?.div(&denom)
    }
}

/// Rotary position embedding, GPT-NeoX / LLaMA "rotate half" layout:
/// `y1 = x1 cos - x2 sin`, `y2 = x2 cos + x1 sin` over the two halves of each head.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (max_pos, head_dim / 2) angle tables, row-major.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    max_pos: usize,
}

impl Rope {
    pub fn new(head_dim: usize, max_pos: usize, theta: f64, device: &Device) -> Result<Self> {
        Self::scaled(head_dim, max_pos, theta, None, device)
    }

    /// With LongRoPE `scaling` (see [`super::config::RopeScaling`]): frequency `i` divided by
    /// `short_factor[i]`, cos and sin multiplied by `attention_factor`.
    pub fn scaled(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        scaling: Option<&super::config::RopeScaling>,
        _device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let (factors, mag) = match scaling {
            Some(s) => {
                if s.short_factor.len() != half {
                    candle_core::bail!(
                        "rope: {} short factors for {half} rotary frequencies",
                        s.short_factor.len()
                    );
                }
                (s.short_factor.clone(), s.attention_factor)
            }
            None => (vec![1.0; half], 1.0),
        };
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for (i, f) in factors.iter().enumerate() {
                let a = p as f64 / (f * theta.powf(2.0 * i as f64 / head_dim as f64));
                cos.push((mag * a.cos()) as f32);
                sin.push((mag * a.sin()) as f32);
            }
        }
        Ok(Self {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            max_pos,
        })
    }

    /// Tables of the zero rotation (cos 1, sin 0): for decoders without RoPE (OPT) where a
    /// kernel takes tables; rotating by them leaves every value exactly as it is.
    pub fn identity(head_dim: usize, max_pos: usize) -> Self {
        let n = max_pos * (head_dim / 2);
        Self {
            cos: Arc::new(vec![1.0; n]),
            sin: Arc::new(vec![0.0; n]),
            max_pos,
        }
    }

    pub fn max_pos(&self) -> usize {
        self.max_pos
    }

    /// The (cos, sin) tables, (max_pos, head_dim / 2) row-major.
    pub fn tables(&self) -> (&Arc<Vec<f32>>, &Arc<Vec<f32>>) {
        (&self.cos, &self.sin)
    }

    /// `x`: (B, H, T, head_dim) at positions `offset..offset+T`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        if offset + t > self.max_pos {
            candle_core::bail!(
                "rope: positions up to {} exceed the table's {}",
                offset + t,
                self.max_pos
            );
        }
        fused::rope(x, &self.cos, &self.sin, offset)
    }
}

/// Additive causal mask (T, S) for queries at positions `S-T..S` over keys `0..S`.
pub fn causal_mask(t: usize, s: usize, device: &Device) -> Result<Tensor> {
    let off = s - t;
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= i + off { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(data, (t, s), device)
}

/// Scaled dot-product attention; q (B,H,T,d), k/v (B,H,S,d), mask broadcastable to (T,S).
/// Scale, mask and softmax are one fused op.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let s = q.matmul(&k.t()?)?;
    let mask = match mask {
        Some(m) => Some(m.broadcast_as((s.dim(2)?, s.dim(3)?))?.contiguous()?),
        None => None,
    };
    fused::softmax(&s, scale, mask.as_ref())?.matmul(v)
}

/// (B, T, H*d) -> (B, H, T, d), contiguous for the batched matmul.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// (B, H, T, d) -> (B, T, H*d).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, h * d))
}

/// Mean cross-entropy over masked positions with optional label smoothing.
/// `logits` (N, V), `targets` (N,) u32, `mask` (N,) f32. One fused op.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    smoothing: f64,
) -> Result<Tensor> {
    fused::cross_entropy(logits, targets, mask, smoothing)
}
