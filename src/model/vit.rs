//! Vision Transformer encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2020),
//! pre-LN blocks, learned position embeddings, no class token (every backbone reads patch
//! tokens). Patch embedding is a reshape plus one linear through the seam, equivalent to a
//! stride-p convolution and quantizable like any other linear.

use candle_core::{Result as CResult, Tensor};

use super::config::VisionConfig;
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
}

impl Block {
    fn new(b: &Builder<'_>, cfg: &VisionConfig) -> Result<Self, ModelError> {
        let w = cfg.width;
        Ok(Self {
            ln1: b.layer_norm("norm1", w)?,
            qkv: b.pp("attn").linear("qkv", w, 3 * w, true)?,
            proj: b.pp("attn").linear("proj", w, w, true)?,
            ln2: b.layer_norm("norm2", w)?,
            fc1: b.pp("mlp").linear("fc1", w, w * cfg.mlp_ratio, true)?,
            fc2: b.pp("mlp").linear("fc2", w * cfg.mlp_ratio, w, true)?,
            heads: cfg.heads,
        })
    }

    fn forward(&self, x: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let qkv = self.qkv.forward(&self.ln1.forward(x)?, fwd)?;
        let a = kernels::self_attention(&qkv, self.heads, false, None)?;
        let x = (x + self.proj.forward(&a, fwd)?)?;
        let h = ops::gelu(&self.fc1.forward(&self.ln2.forward(&x)?, fwd)?)?;
        x + self.fc2.forward(&h, fwd)?
    }
}

#[derive(Debug, Clone)]
pub struct Vit {
    patch: Linear,
    pos: Tensor,
    blocks: Vec<Block>,
    patch_size: usize,
    image_size: usize,
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
        let blocks = (0..blocks.min(cfg.depth))
            .map(|i| Block::new(&b.pp("blocks").pp(i), cfg))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patch: b.linear("patch_embed", 3 * p * p, cfg.width, true)?,
            pos: b.base("pos_embed", &[n, cfg.width], Init::Normal(0.02), false)?,
            blocks,
            patch_size: p,
            image_size: cfg.image_size,
        })
    }

    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Block outputs `1..=upto` (index 0 of the result is block 1) for images (B,3,S,S).
    pub fn forward(&self, images: &Tensor, upto: usize, fwd: Fwd<'_>) -> CResult<Vec<Tensor>> {
        let (bsz, c, h, w) = images.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = images
            .reshape((bsz, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((bsz, gh * gw, c * p * p))?;
        let mut x = self
            .patch
            .forward(&patches, fwd)?
            .broadcast_add(&self.pos)?;
        let mut outs = Vec::with_capacity(upto);
        for blk in self.blocks.iter().take(upto) {
            x = blk.forward(&x, fwd)?;
            outs.push(x.clone());
        }
        Ok(outs)
    }
}
