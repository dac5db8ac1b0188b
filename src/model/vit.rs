//! Vision Transformer encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020),
//! pre-LN blocks, learned position embeddings; a class token, a LayerNorm of the embeddings
//! and another MLP activation only where `VisionConfig::layout` asks for them (CLIP
//! checkpoints, `super::hf`). BLIP-2's tower adds a LayerNorm on the last block's output and
//! hands the class token to its Q-Former with the patch tokens (`layout.post_norm`,
//! `layout.read_class_token`), with its own LayerNorm eps and MLP width
//! (`VisionConfig::norm_eps`, `mlp_hidden`); every other backbone reads patch tokens. Patch
//! embedding is a reshape plus one linear through the seam, equivalent to a stride-p
//! convolution and quantizable like any other linear. `VitStem::Conv` ([`super::conv`], `model.stem = "conv"`) builds the same
//! token grid from log2(p) stages of 3x3 convolution (an unfold plus a linear through the
//! seam), LayerNorm, GELU and 2x2 max pooling instead; `VitStem::PatchConv` does the first
//! halving with a 2x2 patchify linear instead of a full-resolution 3x3 stage.

use candle_core::{Result as CResult, Tensor};

use super::config::{Activation, VisionConfig, VitStem};
use super::conv;
use super::kernels;
use super::linear::{LayerNorm, Linear};
use super::ops::{self, Fwd};
use super::params::{Builder, Init};
use super::ModelError;

#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl Block {
    fn new(b: &Builder<'_>, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let w = cfg.width;
        let (m, eps) = (cfg.mlp_width(), cfg.norm_eps);
        Ok(Self {
            ln1: b.layer_norm_eps("norm1", w, eps)?,
            qkv: b.pp("attn").linear("qkv", w, 3 * w, true)?,
            proj: b.pp("attn").linear("proj", w, w, true)?,
            ln2: b.layer_norm_eps("norm2", w, eps)?,
            fc1: b.pp("mlp").linear("fc1", w, m, true)?,
            fc2: b.pp("mlp").linear("fc2", m, w, true)?,
            heads: cfg.heads,
            act: cfg.layout.act,
        })
    }

    fn forward(&self, x: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let qkv = self.qkv.forward(&self.ln1.forward(x)?, fwd)?;
        let a = kernels::self_attention(&qkv, self.heads, false, None)?;
        let x = (x + self.proj.forward(&a, fwd)?)?;
        let h = activate(self.act, &self.fc1.forward(&self.ln2.forward(&x)?, fwd)?)?;
        x + self.fc2.forward(&h, fwd)?
    }
}

/// One stage of the convolutional stem: 3x3 conv, LayerNorm over channels, GELU, 2x2 max pool.
#[derive(Debug, Clone)]
struct ConvStage {
    conv: Linear,
    norm: LayerNorm,
}

#[derive(Debug, Clone)]
enum Stem {
    Patch(Linear),
    /// An optional 2x2 patchify stage (`patch_conv`), then the conv stages.
    Conv(Option<ConvStage>, Vec<ConvStage>),
}

/// Output channels of the conv stem's stages: `base`, 2·`base`, 4·`base`, ... capped at
/// `width`, the last one `width`.
fn conv_channels(patch: usize, width: usize, base: usize) -> Vec<usize> {
    let stages = patch.trailing_zeros() as usize;
    (0..stages)
        .map(|i| {
            if i + 1 == stages {
                width
            } else {
                (base << i).min(width)
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Vit {
    stem: Stem,
    pos: Tensor,
    blocks: Vec<Block>,
    patch_size: usize,
    image_size: usize,
    /// Class token (`layout.class_token`), first in the sequence, dropped from [`Vit::forward`]
    /// unless `read_class_token`.
    cls: Option<Tensor>,
    /// LayerNorm of the embeddings before the first block (`layout.pre_norm`).
    pre_norm: Option<LayerNorm>,
    /// LayerNorm of the last block's output (`layout.post_norm`), with that block's number.
    post_norm: Option<(LayerNorm, usize)>,
    /// [`Vit::forward`] keeps the class token (`layout.read_class_token`).
    read_class_token: bool,
}

/// An MLP activation, differentiable (exact GELU through candle's erf op, which has a
/// backward; quick GELU from basic ops).
pub(crate) fn activate(act: Activation, x: &Tensor) -> CResult<Tensor> {
    match act {
        Activation::GeluTanh => ops::gelu(x),
        Activation::Gelu => x.gelu_erf(),
        Activation::QuickGelu => {
            let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
            x * s
        }
    }
}

impl Vit {
    /// Builds the first `blocks` blocks only: deeper ones would never be read (llava stops at
    /// the penultimate block) and would sit in the store as parameters without gradients.
    pub(crate) fn new(
        b: &Builder<'_>,
        cfg: &VisionConfig,
        blocks: usize,
    ) -> Result<Self, ModelError> {
        let p = cfg.patch_size;
        let n = (cfg.image_size / p).pow(2);
        let lay = cfg.layout;
        let cls = if lay.class_token {
            Some(b.base("cls_token", &[cfg.width], Init::Normal(0.02), false)?)
        } else {
            None
        };
        let pre_norm = if lay.pre_norm {
            Some(b.layer_norm_eps("pre_norm", cfg.width, cfg.norm_eps)?)
        } else {
            None
        };
        // Built only with the last block: the norm belongs to the tower's final output.
        let post_norm = if lay.post_norm && blocks >= cfg.depth {
            Some((
                b.layer_norm_eps("post_norm", cfg.width, cfg.norm_eps)?,
                cfg.depth,
            ))
        } else {
            None
        };
        let blocks = (0..blocks.min(cfg.depth))
            .map(|i| Block::new(&b.pp("blocks").pp(i), cfg))
            .collect::<Result<_, _>>()?;
        let stem = match cfg.stem {
            VitStem::Patch => {
                Stem::Patch(b.linear("patch_embed", 3 * p * p, cfg.width, !lay.patch_bias_free)?)
            }
            VitStem::Conv | VitStem::PatchConv => {
                let mut cin = 3;
                // `patch_conv` is the cheap stem: half the channels at each resolution.
                let base = if cfg.stem == VitStem::PatchConv {
                    8
                } else {
                    16
                };
                let mut channels = conv_channels(p, cfg.width, base);
                let first = if cfg.stem == VitStem::PatchConv {
                    // The patchify stage takes the first stage's channels; the 3x3 stages keep
                    // theirs, one fewer.
                    let cout = channels.remove(0);
                    let s = b.pp("stem").pp("patch");
                    let st = ConvStage {
                        conv: s.linear("proj", 4 * cin, cout, true)?,
                        norm: s.layer_norm("norm", cout)?,
                    };
                    cin = cout;
                    Some(st)
                } else {
                    None
                };
                let mut stages = Vec::new();
                for (i, cout) in channels.into_iter().enumerate() {
                    let s = b.pp("stem").pp(i);
                    stages.push(ConvStage {
                        conv: s.linear("conv", 9 * cin, cout, true)?,
                        norm: s.layer_norm("norm", cout)?,
                    });
                    cin = cout;
                }
                Stem::Conv(first, stages)
            }
        };
        Ok(Self {
            stem,
            pos: b.base(
                "pos_embed",
                &[n + usize::from(lay.class_token), cfg.width],
                Init::Normal(0.02),
                false,
            )?,
            blocks,
            patch_size: p,
            image_size: cfg.image_size,
            cls,
            pre_norm,
            post_norm,
            read_class_token: lay.class_token && lay.read_class_token,
        })
    }

    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Block outputs `1..=upto` (index 0 of the result is block 1) for images (B,3,S,S), the
    /// last block's through the post-norm (if any); patch tokens only, unless the layout reads
    /// the class token too.
    pub fn forward(&self, images: &Tensor, upto: usize, fwd: Fwd<'_>) -> CResult<Vec<Tensor>> {
        let outs = self.hidden_states(images, upto, fwd)?.into_iter().skip(1);
        outs.enumerate()
            .map(|(i, x)| {
                let x = match &self.post_norm {
                    Some((ln, last)) if i + 1 == *last => ln.forward(&x)?,
                    _ => x,
                };
                if self.cls.is_none() || self.read_class_token {
                    return Ok(x);
                }
                let n = x.dim(1)? - 1;
                x.narrow(1, 1, n)
            })
            .collect()
    }

    /// The embeddings as the first block reads them (after the pre-norm, if any), then block
    /// outputs `1..=upto`, class token included: Hugging Face's `hidden_states`.
    pub fn hidden_states(
        &self,
        images: &Tensor,
        upto: usize,
        fwd: Fwd<'_>,
    ) -> CResult<Vec<Tensor>> {
        let (bsz, c, h, w) = images.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let mut x = match &self.stem {
            Stem::Patch(patch) => {
                let patches = images
                    .reshape((bsz, c, gh, p, gw, p))?
                    .permute((0, 2, 4, 1, 3, 5))?
                    .reshape((bsz, gh * gw, c * p * p))?;
                patch.forward(&patches, fwd)?
            }
            Stem::Conv(first, stages) => {
                // Channel-last throughout: the final (B, gh, gw, width) map is token-major.
                let mut m = match first {
                    None => images.permute((0, 2, 3, 1))?.contiguous()?,
                    Some(st) => {
                        // Each 2x2 patch (channels innermost, then x, then y) -> one pixel.
                        let (hh, hw) = (h / 2, w / 2);
                        let patches = images
                            .reshape((bsz, c, hh, 2, hw, 2))?
                            .permute((0, 2, 4, 3, 5, 1))?
                            .reshape((bsz, hh * hw, 4 * c))?;
                        let y = ops::gelu(&st.norm.forward(&st.conv.forward(&patches, fwd)?)?)?;
                        let d = y.dim(2)?;
                        y.reshape((bsz, hh, hw, d))?
                    }
                };
                for st in stages {
                    let (b, mh, mw, _) = m.dims4()?;
                    let cols = conv::unfold3x3(&m)?;
                    let cols = cols.reshape((b, mh * mw, cols.dim(3)?))?;
                    let y = ops::gelu(&st.norm.forward(&st.conv.forward(&cols, fwd)?)?)?;
                    let cout = y.dim(2)?;
                    m = conv::max_pool2(&y.reshape((b, mh, mw, cout))?)?;
                }
                let d = m.dim(3)?;
                m.reshape((bsz, gh * gw, d))?
            }
        };
        if let Some(cls) = &self.cls {
            let d = cls.dim(0)?;
            let cls = cls.reshape((1, 1, d))?.broadcast_as((bsz, 1, d))?;
            x = Tensor::cat(&[&cls, &x], 1)?;
        }
        let mut x = x.broadcast_add(&self.pos)?;
        if let Some(ln) = &self.pre_norm {
            x = ln.forward(&x)?;
        }
        let mut outs = Vec::with_capacity(upto + 1);
        outs.push(x.clone());
        for blk in self.blocks.iter().take(upto) {
            x = blk.forward(&x, fwd)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }
}
