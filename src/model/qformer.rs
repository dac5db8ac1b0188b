//! BLIP-2's Q-Former as its checkpoints hold it (Li et al., "BLIP-2: Bootstrapping
//! Language-Image Pre-training with Frozen Image Encoders and Large Language Models", 2023),
//! the `blip2` connector's [`QFormerLayout::Bert`] form; the tiny presets keep their own
//! pre-LN one in [`super::connector`].
//!
//! It is a BERT encoder run on the learned query embeddings alone: a LayerNorm on the queries,
//! then per layer self-attention, cross-attention onto the tower's output (in layers `0,
//! cross_every, 2 * cross_every, ...` only) and an exact-GELU MLP, each sublayer post-LN
//! (`LayerNorm(x + sublayer(x))`, eps from the config, 1e-12 in BLIP-2) and without a final
//! norm. Captioning checkpoints run no text through it, so there are no masks and only the
//! query MLP (`intermediate_query` / `output_query`) exists. The self-attention's separate
//! query/key/value projections are held fused (`self_attn.qkv`, rows q | k | v), the
//! cross-attention's key/value as one `kv_proj`; names under `connector.qformer` follow
//! BLIP-2's modules, `super::hf::blip2` maps them onto its keys.

use candle_core::{Result as CResult, Tensor};

use super::config::{ModelConfig, QFormerLayout};
use super::kernels;
use super::linear::{LayerNorm, Linear};
use super::lm::CrossAttention;
use super::ops::Fwd;
use super::params::{Builder, Init};
use super::ModelError;

#[derive(Debug, Clone)]
struct Layer {
    qkv: Linear,
    o_proj: Linear,
    attn_norm: LayerNorm,
    /// Cross-attention onto the image features and the LayerNorm after it, where the layer has
    /// one.
    cross: Option<(CrossAttention, LayerNorm)>,
    fc1: Linear,
    fc2: Linear,
    mlp_norm: LayerNorm,
    heads: usize,
}

/// The checkpoint-shaped Q-Former: images' features (B, N, D_vision) -> query outputs
/// (B, queries, width).
#[derive(Debug, Clone)]
pub struct BertQFormer {
    queries: Tensor,
    layernorm: LayerNorm,
    layers: Vec<Layer>,
}

impl BertQFormer {
    /// Builds it under `b` (`connector.qformer`); `cfg.qformer.layout` must be `Bert`.
    pub(crate) fn new(b: &Builder<'_>, cfg: &ModelConfig) -> Result<Self, ModelError> {
        let q = &cfg.qformer;
        let QFormerLayout::Bert {
            cross_every,
            mlp_hidden,
            eps,
        } = q.layout
        else {
            return Err(ModelError::Config {
                problems: vec!["qformer.layout is not \"bert\"".into()],
            });
        };
        let w = q.width;
        let layers = (0..q.depth)
            .map(|i| {
                let l = b.pp("layers").pp(i);
                let sa = l.pp("self_attn");
                let cross = if i % cross_every.max(1) == 0 {
                    let ca = l.pp("cross_attn");
                    Some((
                        CrossAttention::new(&ca, w, cfg.vision.width, q.heads, true)?,
                        ca.layer_norm_eps("norm", w, eps)?,
                    ))
                } else {
                    None
                };
                let mlp = l.pp("mlp");
                Ok(Layer {
                    qkv: sa.linear("qkv", w, 3 * w, true)?,
                    o_proj: sa.linear("o_proj", w, w, true)?,
                    attn_norm: sa.layer_norm_eps("norm", w, eps)?,
                    cross,
                    fc1: mlp.linear("fc1", w, mlp_hidden, true)?,
                    fc2: mlp.linear("fc2", mlp_hidden, w, true)?,
                    mlp_norm: mlp.layer_norm_eps("norm", w, eps)?,
                    heads: q.heads,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            queries: b.base("query_tokens", &[q.queries, w], Init::Normal(0.02), false)?,
            layernorm: b.layer_norm_eps("layernorm", w, eps)?,
            layers,
        })
    }

    pub(crate) fn forward(&self, img: &Tensor, fwd: Fwd<'_>) -> CResult<Tensor> {
        let bsz = img.dim(0)?;
        let (n, w) = self.queries.dims2()?;
        let q = self.queries.unsqueeze(0)?.broadcast_as((bsz, n, w))?;
        let mut x = self.layernorm.forward(&q.contiguous()?)?;
        for l in &self.layers {
            let a = kernels::self_attention(&l.qkv.forward(&x, fwd)?, l.heads, false, None)?;
            x = l.attn_norm.forward(&(&x + l.o_proj.forward(&a, fwd)?)?)?;
            if let Some((cross, norm)) = &l.cross {
                let (k, v) = cross.memory(img, fwd)?;
                x = norm.forward(&(&x + cross.forward(&x, &k, &v, fwd)?)?)?;
            }
            let h = l.fc1.forward(&x, fwd)?.gelu_erf()?;
            x = l.mlp_norm.forward(&(&x + l.fc2.forward(&h, fwd)?)?)?;
        }
        Ok(x)
    }
}
