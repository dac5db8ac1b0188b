//! Connectors: from encoder features to visual tokens in the LM's width.
//!
//! - `blip2`: Q-Former (Li et al., "BLIP-2", 2023): learned queries, self-attention, then
//!   cross-attention onto the image features, MLP; a linear maps the queries into the LM. The
//!   tiny presets' Q-Former is here; a BLIP-2 checkpoint's (`qformer.layout = "bert"`) is
//!   [`super::qformer`].
//! - `llava`: 2-layer GELU MLP on the penultimate block's patch tokens (Liu et al., "Improved
//!   Baselines with Visual Instruction Tuning", 2023).
//! - `phi3v`: HD transform (Phi-3-Vision): the input image is cut into a `hd_grid`² grid of
//!   local crops plus a global view resized to one crop; each view is encoded, 2x2 neighbouring
//!   tokens are concatenated (4x fewer tokens), the local crops are stitched back into one grid
//!   and a learned newline token ends every row; then `[local rows][glb_sep][global rows]`
//!   goes through the 2-layer projector.
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
    lm_width: usize,
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
        let levels = match (cfg.fusion, cfg.backbone) {
            (Fusion::Multilevel, _) => cfg.levels(),
            (_, Backbone::Llava) => vec![cfg.vision.depth - 1],
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
                sub_sep: conn.base("sub_sep", &[dl], Init::Normal(0.02), false)?,
                glb_sep: conn.base("glb_sep", &[dl], Init::Normal(0.02), false)?,
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
            lm_width: dl,
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
                // Views: the global image (average-pooled to one crop) then the g*g crops, row-major.
                let global = if g > 1 {
                    images.avg_pool2d(g)?
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
                // 2x2 token merge: (V, side, side, dv) -> (V, m, m, 4dv).
                let merged = f
                    .reshape((f.dim(0)?, m, 2, m, 2, dv))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((f.dim(0)?, m, m, 4 * dv))?;
                let tok = fc2.forward(&activate(self.act, &fc1.forward(&merged, fwd)?)?, fwd)?; // (V, m, m, dl)
                let dl = self.lm_width;
                let glb = tok.narrow(0, 0, bsz)?;
                let loc = tok
                    .narrow(0, bsz, bsz * g * g)?
                    .reshape((bsz, g, g, m, m, dl))?
                    .permute((0, 1, 3, 2, 4, 5))?
                    .reshape((bsz, g * m, g * m, dl))?;
                let rows = |x: &Tensor| -> CResult<Tensor> {
                    let (b, r, cc, d) = x.dims4()?;
                    let nl = sub_sep.reshape((1, 1, 1, d))?.broadcast_as((b, r, 1, d))?;
                    Tensor::cat(&[x, &nl], 2)?.reshape((b, r * (cc + 1), d))
                };
                let sep = glb_sep.reshape((1, 1, dl))?.broadcast_as((bsz, 1, dl))?;
                Tensor::cat(&[rows(&loc)?, sep, rows(&glb)?], 1)
            }
        }
    }

    fn vit_patch(&self) -> usize {
        (self.image_size as f64 / (self.vit.tokens() as f64).sqrt()).round() as usize
    }
}
