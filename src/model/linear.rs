//! The one linear seam: every linear layer of every model is built here.
//!
//! `Builder::linear(name, in, out, bias)` reads the policy (phase, PEFT method, component,
//! target name) and returns a [`Linear`] that is plain, LoRA-wrapped, or a 4-bit QLoRA base
//! with an f32 LoRA path. `Builder::adapter` returns a bottleneck adapter where the policy
//! asks for one. Model code never knows which.
//!
//! QLoRA forward: the frozen base is stored as a Q4_0 `QTensor` and dequantized for each
//! product ([`kernels::quant_linear`]). candle's `QMatMul` gives no gradient to its input;
//! dequantize-per-product does, and at the tiny sizes it was the faster of the two options
//! measured. The dequantized copy lives only while its product runs: the backward dequantizes
//! again rather than keeping it, so a training step holds the base in 4 bits (see
//! docs/models.md, "QLoRA memory").
//!
//! A LoRA linear (on an f32 or a 4-bit base) runs as one op, [`super::lora_linear`], whose
//! autograd node keeps only its input and the two factors: composed from separate ops it kept
//! three more tensors as wide as its output until the backward.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Result as CResult, Tensor};

use super::kernels;
use super::lora_linear::{lora_linear, FrozenBase};
use super::ops::{self, Fwd};
use super::params::{Builder, Init};
use super::ModelError;

#[derive(Debug, Clone)]
enum Base {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

#[derive(Debug, Clone)]
struct Lora {
    /// (r, in)
    a: Tensor,
    /// (out, r), zero at init so the wrapped layer starts equal to its base.
    b: Tensor,
    scale: f64,
    dropout: f64,
}

#[derive(Debug, Clone)]
pub struct Linear {
    base: Base,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl Linear {
    /// The layer from separate ops: base product, then the LoRA delta added. Kept where the
    /// fused op does not apply (dropout on the LoRA input, a trained base) and as the reference
    /// the fused op is tested against.
    pub fn composed(&self, x: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let y = match &self.base {
            Base::Dense(w) => kernels::linear(x, w, self.bias.as_ref())?,
            Base::Quant(q) => kernels::quant_linear(x, q, self.bias.as_ref())?,
        };
        match &self.lora {
            Some(l) => {
                let xd = ops::dropout(x, l.dropout, fwd)?;
                let delta = kernels::linear(&kernels::linear(&xd, &l.a, None)?, &l.b, None)?;
                y + (delta * l.scale)?
            }
            None => Ok(y),
        }
    }

    /// The LoRA linear as one op ([`lora_linear`]) where it computes what [`Self::composed`]
    /// does: no dropout mask to apply, and a frozen base.
    pub fn forward(&self, x: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let Some(l) = &self.lora else {
            return self.composed(x, fwd);
        };
        let dropout = fwd.train && l.dropout > 0.0 && fwd.rng.is_some();
        let frozen = match &self.base {
            Base::Dense(w) => !w.track_op(),
            Base::Quant(_) => true,
        } && !self.bias.as_ref().is_some_and(Tensor::track_op);
        if dropout || !frozen {
            return self.composed(x, fwd);
        }
        let base = match &self.base {
            Base::Dense(w) => FrozenBase::Dense(w.clone()),
            Base::Quant(q) => FrozenBase::Quant(q.clone()),
        };
        lora_linear(x, &base, self.bias.as_ref(), &l.a, &l.b, l.scale)
    }

    /// Whether the base is held 4-bit.
    pub fn is_quantized(&self) -> bool {
        matches!(self.base, Base::Quant(_))
    }
}

/// Houlsby-style bottleneck: `h + up(gelu(down(h)))`, `up` zero-initialised (starts as identity).
#[derive(Debug, Clone)]
pub struct Adapter {
    down: Linear,
    up: Linear,
}

impl Adapter {
    pub fn forward(&self, h: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let z = ops::gelu(&self.down.forward(h, fwd)?)?;
        h + self.up.forward(&z, fwd)?
    }
}

fn plain(w: Tensor, bias: Option<Tensor>) -> Linear {
    Linear {
        base: Base::Dense(w),
        bias,
        lora: None,
    }
}

impl Builder<'_> {
    /// Builds the linear `name` (also its LoRA target name) under this builder's prefix.
    pub fn linear(
        &self,
        name: &str,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<Linear, ModelError> {
        let b = self.pp(name);
        let bound = 1.0 / (inp as f32).sqrt();
        let policy = self.policy;
        let bias = if bias {
            Some(b.base("bias", &[out], Init::Zeros, false)?)
        } else {
            None
        };
        if policy.quantize(self.component)
            && !policy.saved(self.component, &b.prefix)
            && inp.is_multiple_of(32)
        {
            let q = b.base_quantized("weight", &[out, inp], Init::Uniform(bound))?;
            let lora = if policy.lora(self.component, name) {
                Some(b.lora(name, inp, out)?)
            } else {
                None
            };
            return Ok(Linear {
                base: Base::Quant(q),
                bias,
                lora,
            });
        }
        let w = b.base("weight", &[out, inp], Init::Uniform(bound), true)?;
        if !policy.lora(self.component, name) {
            return Ok(plain(w, bias));
        }
        let l = b.lora(name, inp, out)?;
        if policy.inference {
            // Merge for inference: one GEMM per layer and no autograd state.
            let merged = (w + (l.b.matmul(&l.a)? * l.scale)?)?;
            return Ok(plain(merged, bias));
        }
        Ok(Linear {
            base: Base::Dense(w),
            bias,
            lora: Some(l),
        })
    }

    fn lora(&self, _name: &str, inp: usize, out: usize) -> Result<Lora, ModelError> {
        let policy = self.policy;
        let bound = 1.0 / (inp as f32).sqrt();
        let r = policy.peft.rank;
        let a = self.peft("lora_a", &[r, inp], Init::Uniform(bound), true)?;
        let b = self.peft("lora_b", &[out, r], Init::Zeros, true)?;
        Ok(Lora {
            a,
            b,
            scale: policy.peft.alpha / r as f64,
            dropout: policy.peft.dropout,
        })
    }

    /// A bottleneck adapter named `name` of width `dim`, or `None` where the policy has none.
    pub fn adapter(&self, name: &str, dim: usize) -> Result<Option<Adapter>, ModelError> {
        if !self.policy.adapters(self.component) {
            return Ok(None);
        }
        let b = self.pp(name);
        let k = self.policy.peft.adapter_dim;
        let down = b.pp("down");
        let up = b.pp("up");
        let bound = 1.0 / (dim as f32).sqrt();
        let dw = down.peft("weight", &[k, dim], Init::Uniform(bound), true)?;
        let db = down.peft("bias", &[k], Init::Zeros, false)?;
        let uw = up.peft("weight", &[dim, k], Init::Zeros, true)?;
        let ub = up.peft("bias", &[dim], Init::Zeros, false)?;
        Ok(Some(Adapter {
            down: plain(dw, Some(db)),
            up: plain(uw, Some(ub)),
        }))
    }

    /// LayerNorm weights (w, b) named `name`, eps 1e-5 (`nn.LayerNorm`'s default).
    pub fn layer_norm(&self, name: &str, dim: usize) -> Result<LayerNorm, ModelError> {
        self.layer_norm_eps(name, dim, 1e-5)
    }

    /// LayerNorm with its own epsilon (BLIP-2's tower 1e-6, its Q-Former 1e-12).
    pub fn layer_norm_eps(
        &self,
        name: &str,
        dim: usize,
        eps: f64,
    ) -> Result<LayerNorm, ModelError> {
        let b = self.pp(name);
        Ok(LayerNorm {
            w: b.base("weight", &[dim], Init::Ones, false)?,
            b: b.base("bias", &[dim], Init::Zeros, false)?,
            eps,
        })
    }

    pub fn rms_norm(&self, name: &str, dim: usize) -> Result<RmsNorm, ModelError> {
        self.rms_norm_eps(name, dim, 1e-5)
    }

    /// RMSNorm with its own epsilon (a checkpoint's `rms_norm_eps`).
    pub fn rms_norm_eps(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm {
            w: self.pp(name).base("weight", &[dim], Init::Ones, false)?,
            eps,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        ops::layer_norm(x, &self.w, &self.b, self.eps)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        ops::rms_norm(x, &self.w, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// One Q4_0 linear against its f32 weights: relative L2 error of the output. For weights
    /// uniform in a block, Q4_0's step is max/8, so the RMS error is ~max/28 against an RMS
    /// weight of max/1.73, i.e. ~6%; bound at 8%.
    #[test]
    fn q4_0_linear_is_within_8_percent_of_f32() {
        let dev = Device::Cpu;
        let n = 64 * 128;
        use rand::{Rng, SeedableRng};
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let w: Vec<f32> = (0..n).map(|_| r.gen_range(-1.0..1.0)).collect();
        let w = Tensor::from_vec(w, (64, 128), &dev).unwrap();
        let x: Vec<f32> = (0..4 * 128).map(|_| r.gen_range(-1.0..1.0)).collect();
        let x = Tensor::from_vec(x, (4, 128), &dev).unwrap();
        let q = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q4_0).unwrap();
        let lin = Linear {
            base: Base::Quant(Arc::new(q)),
            bias: None,
            lora: None,
        };
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = lin.forward(&x, Fwd::EVAL).unwrap();
        let norm = |t: &Tensor| -> f32 {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let rel = norm(&(&want - &got).unwrap()) / norm(&want);
        eprintln!("Q4_0 linear relative error {rel:.4}");
        assert!(rel > 0.0 && rel < 0.08, "relative error {rel}");
        let bytes = match &lin.base {
            Base::Quant(q) => q.storage_size_in_bytes(),
            Base::Dense(_) => 0,
        };
        assert_eq!(
            bytes,
            n / 32 * 18,
            "Q4_0: 16 bytes of nibbles + f16 scale per 32 weights"
        );
    }
}
