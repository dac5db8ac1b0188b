//! CLIP vision towers (`CLIPVisionModel`, and the tower inside LLaVA checkpoints) onto our ViT
//! with [`VitLayout::clip`]: class token, `pre_layrnorm`, a bias-free patch embedding and quick
//! (or exact) GELU. CLIP's separate q/k/v projections become our fused `qkv`, the patch
//! convolution our patch linear. [`Vision`] also carries BLIP-2's tower, whose keys
//! [`super::blip2`] maps.

use candle_core::Tensor;

use super::cfg::Cfg;
use super::weights::{Reader, Weights};
use super::{Family, HfError, Parts};
use crate::model::config::{Activation, VisionConfig, VitLayout, VitStem};

/// Parses a CLIP vision config (a `CLIPVisionModel`'s top level or a VLM's `vision_config`).
pub(crate) fn vision_config(c: &Cfg<'_>) -> Result<VisionConfig, HfError> {
    c.require_str(
        "model_type",
        "clip_vision_model",
        "clip_vision_model",
        "the vision tower must be \"clip_vision_model\"",
    )?;
    let act = match c.str_or("hidden_act", "quick_gelu")? {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        other => {
            return Err(c.unsupported("hidden_act", format!("{other:?}"), "quick_gelu or gelu"))
        }
    };
    let eps = c.f64_or("layer_norm_eps", 1e-5)?;
    if eps != 1e-5 {
        return Err(c.unsupported("layer_norm_eps", eps, "our LayerNorm uses 1e-5"));
    }
    if c.usize_or("num_channels", 3)? != 3 {
        return Err(c.unsupported("num_channels", c.usize_or("num_channels", 3)?, "RGB only"));
    }
    // Omitted keys take `CLIPVisionConfig()`'s defaults (ViT-B/32), as in transformers.
    let (image, patch) = (
        c.usize_or("image_size", 224)?,
        c.usize_or("patch_size", 32)?,
    );
    let width = c.usize_or("hidden_size", 768)?;
    let heads = c.usize_or("num_attention_heads", 12)?;
    let inter = c.usize_or("intermediate_size", 3072)?;
    if patch == 0 || !image.is_multiple_of(patch) {
        return Err(c.unsupported("patch_size", patch, "must divide image_size"));
    }
    if width == 0 || !inter.is_multiple_of(width) {
        return Err(c.unsupported(
            "intermediate_size",
            inter,
            "our ViT needs a whole multiple of hidden_size",
        ));
    }
    Ok(VisionConfig {
        image_size: image,
        patch_size: patch,
        width,
        depth: c.usize_or("num_hidden_layers", 12)?,
        heads,
        mlp_ratio: inter / width,
        layout: VitLayout::clip(act),
        stem: VitStem::Patch,
        norm_eps: eps,
        mlp_hidden: 0,
    })
}

/// Which tower's key layout a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TowerKind {
    Clip,
    /// See [`super::blip2`].
    Blip2,
}

/// A vision tower in a checkpoint: its config, key layout and the prefix of its
/// `embeddings.*` / `encoder.layers.*` keys.
#[derive(Debug, Clone)]
pub(crate) struct Vision {
    pub cfg: VisionConfig,
    pub prefix: String,
    pub kind: TowerKind,
}

impl Vision {
    pub fn locate(cfg: VisionConfig, w: &Weights) -> Result<Self, HfError> {
        let prefixes = [
            "",
            "vision_model.",
            "vision_tower.",
            "vision_tower.vision_model.",
            "model.vision_tower.",
            "model.vision_tower.vision_model.",
            // Phi-3-Vision (`super::phi3v`).
            "model.vision_embed_tokens.img_processor.vision_model.",
        ];
        let prefix = w
            .prefix_of(&prefixes, "embeddings.patch_embedding.weight")
            .ok_or_else(|| w.missing("vision_model.embeddings.patch_embedding.weight"))?;
        Ok(Self {
            cfg,
            prefix,
            kind: TowerKind::Clip,
        })
    }

    /// Our ViT tensor `rest` (the name after `vision.`), or `None` if CLIP has no such tensor.
    pub fn fetch(
        &self,
        rest: &str,
        shape: &[usize],
        r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        if self.kind == TowerKind::Blip2 {
            return super::blip2::fetch_vision(self, rest, shape, r);
        }
        let p = &self.prefix;
        let w = self.cfg.width;
        match rest {
            "patch_embed.weight" => {
                let ps = self.cfg.patch_size;
                let key = format!("{p}embeddings.patch_embedding.weight");
                return Some(
                    r.take(&key, &[w, 3, ps, ps])
                        .and_then(|t| r.op(t.reshape((w, 3 * ps * ps)))),
                );
            }
            "cls_token" => return Some(r.take(&format!("{p}embeddings.class_embedding"), shape)),
            "pos_embed" => {
                return Some(r.take(&format!("{p}embeddings.position_embedding.weight"), shape))
            }
            "pre_norm.weight" | "pre_norm.bias" => {
                let leaf = rest.trim_start_matches("pre_norm.");
                return Some(r.take(&format!("{p}pre_layrnorm.{leaf}"), shape));
            }
            _ => {}
        }
        let (i, leaf) = rest.strip_prefix("blocks.")?.split_once('.')?;
        let at = format!("{p}encoder.layers.{i}.");
        let (module, kind) = leaf.rsplit_once('.')?;
        let hf = match module {
            "norm1" => "layer_norm1",
            "norm2" => "layer_norm2",
            "attn.proj" => "self_attn.out_proj",
            "mlp.fc1" => "mlp.fc1",
            "mlp.fc2" => "mlp.fc2",
            "attn.qkv" => {
                let part: &[usize] = if kind == "weight" { &[w, w] } else { &[w] };
                let keys =
                    ["q_proj", "k_proj", "v_proj"].map(|q| format!("{at}self_attn.{q}.{kind}"));
                return Some(r.rows(&keys, part));
            }
            _ => return None,
        };
        Some(r.take(&format!("{at}{hf}.{kind}"), shape))
    }
}

/// `CLIPVisionModel`: a tower on its own (see [`super::VisionTower`]).
pub(crate) struct ClipVision;

pub(crate) const FAMILY: ClipVision = ClipVision;

impl Family for ClipVision {
    fn architecture(&self) -> &'static str {
        "CLIPVisionModel"
    }

    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError> {
        Ok(Parts {
            vision: Some(Vision::locate(vision_config(c)?, w)?),
            ..Parts::default()
        })
    }
}
