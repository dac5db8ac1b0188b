//! Connectors: from encoder features to visual tokens in the LM's width.
//!
//! - `blip2`: Q-Former (Li et al., "BLIP-2", 2023): learned queries, self-attention, then
//!   cross-attention onto the image features, MLP; a linear maps the queries into the LM. The
//!   tiny presets' Q-Former is here; a BLIP-2 checkpoint's (`qformer.layout = "bert"`) is
//!   [`super::qformer`].
//! - `llava`: 2-layer GELU MLP on the penultimate block's patch tokens (Liu et al., "Improved
//!   Baselines with Visual Instruction Tuning", 2023).
//! - `phi3v`: HD transform, laid out as Phi-3-Vision's published checkpoint (Abdin et al.,
//!   "Phi-3 Technical Report", 2024), so that one loads into it ([`super::hf`]): the input image
//!   is cut into a `hd_grid`² grid of local crops, plus a global view resized to one crop by
//!   bicubic interpolation (PyTorch's `interpolate(mode="bicubic")`, as its image processor
//!   makes it); each view is encoded and its penultimate block read (patch tokens); 2x2
//!   neighbouring tokens are concatenated (4x fewer tokens, 4x the width, the 2x2 offset
//!   outermost in the channels); the local crops are stitched back into one grid. In that
//!   merged feature space a learned newline (`sub_sep`) ends every row of both grids and a
//!   learned separator (`glb_sep`) sits between them, crops first:
//!   `[local rows][glb_sep][global rows]` (the checkpoint's `hd_transform_order = "sub_glb"`,
//!   the only order its reference code implements). Then every token, separators included,
//!   goes through the 2-layer projector into the LM's width.
//! - `multilevel` fusion replaces the single feature layer by [`LevelPool`]: per patch token,
//!   softmax weights over the chosen encoder depths (a learned score of each level's
//!   normalised feature) pool the levels into one feature that then feeds the connector.

use candle_core::{Result as CResult, Tensor, D};

use super::config::{Activation, Backbone, Fusion, ModelConfig, QFormerLayout};
use super::kernels;
use super::linear::{LayerNorm, Linear};
use super::lm::CrossAttention;
use super::ops::{self, Fwd};
use super::params::{Builder, Init};
use super::qformer::BertQFormer;
use super::vit::{activate, Vit};
use super::ModelError;

#[derive(Debug, Clone)]
struct QLayer {
    ln1: LayerNorm,
    qkv: Linear,
    o: Linear,
    ln2: LayerNorm,
    cross: CrossAttention,
    ln3: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

#[derive(Debug, Clone)]
pub struct QFormer {
    queries: Tensor,
    layers: Vec<QLayer>,
    ln_out: LayerNorm,
}

impl QFormer {
    fn new(b: &Builder<'_>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let q = &cfg.qformer;
        let w = q.width;
        let layers = (0..q.depth)
            .map(|i| {
                let l = b.pp("layers").pp(i);
                Ok(QLayer {
                    ln1: l.layer_norm("ln1", w)?,
                    qkv: l.pp("self_attn").linear("qkv", w, 3 * w, true)?,
                    o: l.pp("self_attn").linear("o_proj", w, w, true)?,
                    ln2: l.layer_norm("ln2", w)?,
                    cross: CrossAttention::new(
                        &l.pp("cross_attn"),
                        w,
                        cfg.vision.width,
                        q.heads,
                        true,
                    )?,
                    ln3: l.layer_norm("ln3", w)?,
                    fc1: l.pp("mlp").linear("fc1", w, 4 * w, true)?,
                    fc2: l.pp("mlp").linear("fc2", 4 * w, w, true)?,
                    heads: q.heads,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            queries: b.base("query_tokens", &[q.queries, w], Init::Normal(0.02), false)?,
            layers,
            ln_out: b.layer_norm("ln_out", w)?,
        })
    }

    fn forward(&self, img: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let bsz = img.dim(0)?;
        let (n, w) = self.queries.dims2()?;
        let mut x = self
            .queries
            .unsqueeze(0)?
            .broadcast_as((bsz, n, w))?
            .contiguous()?;
        for l in &self.layers {
            let qkv = l.qkv.forward(&l.ln1.forward(&x)?, fwd)?;
            let a = kernels::self_attention(&qkv, l.heads, false, None)?;
            x = (&x + l.o.forward(&a, fwd)?)?;
            let (mk, mv) = l.cross.memory(img, fwd)?;
            x = (&x + l.cross.forward(&l.ln2.forward(&x)?, &mk, &mv, fwd)?)?;
            let h = ops::gelu(&l.fc1.forward(&l.ln3.forward(&x)?, fwd)?)?;
            x = (&x + l.fc2.forward(&h, fwd)?)?;
        }
        self.ln_out.forward(&x)
    }
}

/// Learned attention pooling over encoder depths (the `multilevel` feature).
#[derive(Debug, Clone)]
pub struct LevelPool {
    ln: LayerNorm,
    score: Linear,
    level_bias: Tensor,
}

impl LevelPool {
    fn new(b: &Builder<'_>, dim: usize, levels: usize) -> Result<Self, ModelError> {
        Ok(Self {
            ln: b.layer_norm("ln", dim)?,
            score: b.linear("score", dim, 1, false)?,
            level_bias: b.base("level_bias", &[levels, 1], Init::Zeros, false)?,
        })
    }

    fn forward(&self, feats: &[Tensor], fwd: Fwd<'_>) -> CResult<Tensor> {
        let st = Tensor::stack(feats, 2)?; // (B,N,L,D)
        let s = self
            .score
            .forward(&self.ln.forward(&st)?, fwd)?
            .broadcast_add(&self.level_bias)?; // (B,N,L,1)
        let wts = ops::softmax_last(&s.squeeze(D::Minus1)?)?.unsqueeze(D::Minus1)?;
        st.broadcast_mul(&wts)?.sum(2)
    }
}

/// The `blip2` connector's Q-Former, by `qformer.layout`.
#[derive(Debug, Clone)]
enum Queries {
    Tiny(QFormer),
    Bert(BertQFormer),
}

impl Queries {
    fn new(b: &Builder<'_>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        Ok(match cfg.qformer.layout {
            QFormerLayout::Tiny => Queries::Tiny(QFormer::new(b, cfg)?),
            QFormerLayout::Bert { .. } => Queries::Bert(BertQFormer::new(b, cfg)?),
        })
    }

    fn forward(&self, img: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        match self {
            Queries::Tiny(q) => q.forward(img, fwd),
            Queries::Bert(q) => q.forward(img, fwd),
        }
    }
}

#[derive(Debug, Clone)]
enum Head {
    Blip2 {
        qformer: Queries,
        proj: Linear,
    },
    Mlp {
        fc1: Linear,
        fc2: Linear,
    },
    Phi3v {
        fc1: Linear,
        fc2: Linear,
        sub_sep: Tensor,
        glb_sep: Tensor,
    },
}

/// The vision encoder plus the backbone's connector: images -> visual tokens (B, Nv, D_lm).
#[derive(Debug, Clone)]
pub struct Visual {
    vit: Vit,
    pool: Option<LevelPool>,
    head: Head,
    backbone: Backbone,
    /// Encoder block outputs (1-based) read; one entry unless `multilevel`.
    levels: Vec<usize>,
    image_size: usize,
    grid: usize,
    /// Projector activation (`ModelConfig::projector_act`).
    act: Activation,
}

impl Visual {
    /// `vision` builds the encoder (vision component), `conn` the connector.
    pub(crate) fn new(
        vision: &Builder<'_>,
        conn: &Builder<'_>,
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let dv = cfg.vision.width;
        let dl = cfg.lm.width;
        // LLaVA and Phi-3-Vision read the penultimate block (their `vision_feature_layer` /
        // `layer_idx` -2); the Q-Former reads the last.
        let levels = match (cfg.fusion, cfg.backbone) {
            (Fusion::Multilevel, _) => cfg.levels(),
            (_, Backbone::Llava | Backbone::Phi3v) => vec![cfg.vision.depth - 1],
            _ => vec![cfg.vision.depth],
        };
        let vit = Vit::new(
            vision,
            &cfg.vision,
            levels.iter().copied().max().unwrap_or(1),
        )?;
        let pool = if levels.len() > 1 {
            Some(LevelPool::new(&conn.pp("level_pool"), dv, levels.len())?)
        } else {
            None
        };
        let head = match cfg.backbone {
            Backbone::Blip2 => Head::Blip2 {
                qformer: Queries::new(&conn.pp("qformer"), cfg)?,
                proj: conn.linear("language_projection", cfg.qformer.width, dl, true)?,
            },
            Backbone::Llava => Head::Mlp {
                fc1: conn.pp("projector").linear("fc1", dv, dl, true)?,
                fc2: conn.pp("projector").linear("fc2", dl, dl, true)?,
            },
            Backbone::Phi3v => Head::Phi3v {
                fc1: conn.pp("projector").linear("fc1", 4 * dv, dl, true)?,
                fc2: conn.pp("projector").linear("fc2", dl, dl, true)?,
                sub_sep: conn.base("sub_sep", &[4 * dv], Init::Normal(0.02), false)?,
                glb_sep: conn.base("glb_sep", &[4 * dv], Init::Normal(0.02), false)?,
            },
        };
        Ok(Self {
            vit,
            pool,
            head,
            backbone: cfg.backbone,
            levels,
            image_size: cfg.vision.image_size,
            grid: cfg.hd_grid,
            act: cfg.projector_act,
        })
    }

    /// Number of visual tokens handed to the LM.
    pub fn num_tokens(&self, cfg: &ModelConfig) -> usize {
        match self.backbone {
            Backbone::Blip2 => cfg.qformer.queries,
            Backbone::Llava => self.vit.tokens(),
            Backbone::Phi3v => {
                let side = (self.image_size / cfg.vision.patch_size) / 2;
                let local = side * self.grid;
                local * (local + 1) + 1 + side * (side + 1)
            }
        }
    }

    fn features(&self, images: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let upto = self.levels.iter().copied().max().unwrap_or(1);
        let outs = self.vit.forward(images, upto, fwd)?;
        let feats: Vec<Tensor> = self.levels.iter().map(|&l| outs[l - 1].clone()).collect();
        match &self.pool {
            Some(p) => p.forward(&feats, fwd),
            None => Ok(feats[0].clone()),
        }
    }

    /// Images (B,3,S,S), S = [`ModelConfig::input_size`] -> (B, Nv, D_lm).
    pub fn forward(&self, images: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        match &self.head {
            Head::Blip2 { qformer, proj } => {
                proj.forward(&qformer.forward(&self.features(images, fwd)?, fwd)?, fwd)
            }
            Head::Mlp { fc1, fc2 } => fc2.forward(
                &activate(self.act, &fc1.forward(&self.features(images, fwd)?, fwd)?)?,
                fwd,
            ),
            Head::Phi3v {
                fc1,
                fc2,
                sub_sep,
                glb_sep,
            } => {
                let (bsz, c, h, _) = images.dims4()?;
                let s = self.image_size;
                let g = self.grid;
                if h != s * g {
                    candle_core::bail!("phi3v expects {}x{} images, got {h}", s * g, s * g);
                }
                // Views: the global image (bicubic, resized to one crop) then the g*g crops,
                // row-major, as Phi-3-Vision's image processor stacks them.
                let global = if g > 1 {
                    bicubic_resize(images, s)?
                } else {
                    images.clone()
                };
                let crops = images
                    .reshape((bsz, c, g, s, g, s))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .reshape((bsz * g * g, c, s, s))?;
                let views = Tensor::cat(&[global, crops], 0)?;
                let f = self.features(&views, fwd)?; // (B*(1+g²), n, dv)
                let side = s / self.vit_patch();
                let m = side / 2;
                let dv = f.dim(2)?;
                let dm = 4 * dv;
                // 2x2 token merge: (V, side, side, dv) -> (V, m, m, 4dv), channel (dy*2+dx)*dv + c.
                let merged = f
                    .reshape((f.dim(0)?, m, 2, m, 2, dv))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((f.dim(0)?, m, m, dm))?;
                let glb = merged.narrow(0, 0, bsz)?;
                let loc = merged
                    .narrow(0, bsz, bsz * g * g)?
                    .reshape((bsz, g, g, m, m, dm))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((bsz, g * m, g * m, dm))?;
                let rows = |x: &Tensor| -> CResult<Tensor> {
                    let (b, r, cc, d) = x.dims4()?;
                    let nl = sub_sep.reshape((1, 1, 1, d))?.broadcast_as((b, r, 1, d))?;
                    Tensor::cat(&[x, &nl], 2)?.reshape((b, r * (cc + 1), d))
                };
                let sep = glb_sep.reshape((1, 1, dm))?.broadcast_as((bsz, 1, dm))?;
                let hd = Tensor::cat(&[rows(&loc)?, sep, rows(&glb)?], 1)?;
                fc2.forward(&activate(self.act, &fc1.forward(&hd, fwd)?)?, fwd)
            }
        }
    }

    fn vit_patch(&self) -> usize {
        (self.image_size as f64 / (self.vit.tokens() as f64).sqrt()).round() as usize
    }
}

/// Bicubic resize of square images (B,C,H,H) to (B,C,out,out) as PyTorch's
/// `interpolate(mode="bicubic", align_corners=False)` without antialiasing: cubic convolution
/// with a = -0.75 at source position `(i + 0.5) * H / out - 0.5`, borders clamped. Separable,
/// so one (out, H) matrix applied to rows and columns.
pub(crate) fn bicubic_resize(images: &Tensor, out: usize) -> CResult<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    if h != w {
        candle_core::bail!("bicubic_resize expects square images, got {h}x{w}");
    }
    let m = Tensor::from_vec(bicubic_weights(h, out), (out, h), images.device())?
        .to_dtype(images.dtype())?;
    // Columns: x (.., H, W) @ mᵀ (W, out); rows: m (out, H) @ that.
    let cols = images.broadcast_matmul(&m.t()?)?;
    m.broadcast_matmul(&cols)
}

/// The (out, inp) matrix of [`bicubic_resize`]: row i holds the four taps of output pixel i.
fn bicubic_weights(inp: usize, out: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f64 / out as f64;
    let mut m = vec![0f32; out * inp];
    for i in 0..out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let x0 = src.floor();
        let t = src - x0;
        let taps = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, wk) in taps.iter().enumerate() {
            let j = (x0 as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[i * inp + j] += *wk as f32;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// PyTorch's `interpolate(arange(8.).reshape(1,1,1,8), size=(1,4), mode="bicubic")` gives
    /// [0.40625, 2.5, 4.5, 6.59375] (taps clamped at the borders); a constant stays constant.
    #[test]
    fn bicubic_weights_match_pytorch() {
        let m = bicubic_weights(8, 4);
        let row = |i: usize| -> f32 { (0..8).map(|j| m[i * 8 + j] * j as f32).sum() };
        let want = [0.40625f32, 2.5, 4.5, 6.59375];
        for (i, w) in want.iter().enumerate() {
            assert!((row(i) - w).abs() < 1e-6, "{i}: {} vs {w}", row(i));
            let sum: f32 = m[i * 8..(i + 1) * 8].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
        let x = Tensor::ones((1, 2, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = bicubic_resize(&x, 4).unwrap();
        assert_eq!(y.dims(), &[1, 2, 4, 4]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|v| (v - 1.0).abs() < 1e-6));
    }
}
