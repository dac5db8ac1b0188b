//! `Phi3VForCausalLM` (Phi-3-Vision, e.g. microsoft/Phi-3-vision-128k-instruct): a Phi-3 LM
//! ([`super::phi3`], LongRoPE included) whose config is the top level of `config.json`, and an
//! image-embedding module under `model.vision_embed_tokens.` that becomes our `phi3v`
//! connector: a CLIP tower (`img_processor.vision_model.*`, [`super::clip`]), the learned
//! separators `sub_GN` (row newline) and `glb_GN` (between the crops and the global view), both
//! of the 2x2-merged feature width, and the projector `img_projection.0 -> GELU ->
//! img_projection.2`.
//!
//! The checkpoint has no transformers class: its model code is published beside the weights
//! (`image_embedding_phi3_v.py`). That code builds CLIP ViT-L/14 at 336 px whatever
//! `config.json` says (`img_processor.model_name` must name it), so a config without a tower
//! description gets that tower. A tower of another shape (the tiny test checkpoint's) is
//! described by a CLIP `vision_config` inside `img_processor`, an addition of ours that the
//! published configs do not carry.
//!
//! Refused, naming the key: another `img_processor.name`, `layer_idx` other than the
//! penultimate block, `type_feature` other than `"patch"`, `image_dim_out` / `num_img_tokens`
//! that disagree with the tower, `embd_layer` without the HD transform and its learnable
//! separators, a projection other than the 2-layer MLP, and `hd_transform_order` other than
//! `"sub_glb"` (the only order the reference code implements; its default, `"glb_sub"`, fails
//! there too). How the image tokens are placed in our captioning form is in `docs/models.md`.

use candle_core::Tensor;
use serde_json::{json, Value};

use super::cfg::Cfg;
use super::clip::{self, Vision};
use super::llama::{self, Text, TextKind};
use super::llava::Projector;
use super::weights::{Reader, Weights};
use super::{Family, HfError, Parts};
use crate::model::config::{Activation, Backbone, VisionConfig};

/// Where the image-embedding module keeps its tensors.
const EMBED: &str = "model.vision_embed_tokens.";

/// The one tower the published code builds.
const REFERENCE_TOWER: &str = "openai/clip-vit-large-patch14-336";

/// The CLIP config the published code hard-codes for [`REFERENCE_TOWER`].
fn reference_tower(path: &std::path::Path) -> Result<VisionConfig, HfError> {
    let v = json!({
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    });
    clip::vision_config(&Cfg::top(path, &v))
}

/// The tower of `img_processor`: its `vision_config` if it has one, else the reference's.
fn tower(ip: &Cfg<'_>) -> Result<VisionConfig, HfError> {
    ip.require_str(
        "name",
        "",
        "clip_vision_model",
        "the image encoder must be a CLIP tower (\"clip_vision_model\")",
    )?;
    if ip.get("vision_config").is_some() {
        return clip::vision_config(&ip.child("vision_config")?);
    }
    match ip.str_or("model_name", "")? {
        REFERENCE_TOWER => reference_tower(ip.path),
        other => Err(ip.unsupported(
            "model_name",
            format!("{other:?}"),
            &format!(
                "Phi-3-Vision's code builds {REFERENCE_TOWER:?} only; describe another tower \
                 in img_processor.vision_config"
            ),
        )),
    }
}

/// Checks `img_processor` against the tower `v`: the features are the penultimate block's
/// patch tokens, `image_dim_out` wide, `num_img_tokens` per view after the 2x2 merge.
fn check_features(ip: &Cfg<'_>, v: &VisionConfig) -> Result<(), HfError> {
    let layer = ip.get("layer_idx").cloned().unwrap_or(Value::from(-2));
    if layer.as_i64() != Some(-2) && layer.as_i64() != Some(v.depth as i64 - 1) {
        return Err(ip.unsupported(
            "layer_idx",
            layer,
            "our phi3v connector reads the penultimate block (-2)",
        ));
    }
    ip.require_str(
        "type_feature",
        "patch",
        "patch",
        "our connectors read the patch tokens without the class token (\"patch\")",
    )?;
    let dim = ip.usize("image_dim_out")?;
    if dim != v.width {
        return Err(ip.unsupported(
            "image_dim_out",
            dim,
            &format!("the tower is {} wide", v.width),
        ));
    }
    let side = v.image_size / v.patch_size;
    if side % 2 != 0 {
        return Err(ip.unsupported(
            "vision_config.image_size",
            v.image_size,
            "the 2x2 token merge needs an even patch grid",
        ));
    }
    let n = ip.usize("num_img_tokens")?;
    if n != (side / 2).pow(2) {
        return Err(ip.unsupported(
            "num_img_tokens",
            n,
            &format!(
                "a {side}x{side} patch grid merged 2x2 gives {} tokens per view",
                (side / 2).pow(2)
            ),
        ));
    }
    Ok(())
}

/// Checks `embd_layer`: the HD transform with learnable separators, crops first, and the
/// 2-layer MLP projector (what our `phi3v` connector is).
fn check_embedding(e: &Cfg<'_>) -> Result<(), HfError> {
    e.require_str("embedding_cls", "image", "image", "\"image\" only")?;
    for k in ["use_hd_transform", "with_learnable_separator"] {
        if !e.bool_or(k, false)? {
            return Err(e.unsupported(
                k,
                false,
                "our phi3v connector is the HD transform with learned separators",
            ));
        }
    }
    e.require_str(
        "projection_cls",
        "linear",
        "mlp",
        "our phi3v projector is the 2-layer MLP (\"mlp\")",
    )?;
    let order = e.str_or("hd_transform_order", "glb_sub")?;
    if order != "sub_glb" {
        return Err(e.unsupported(
            "hd_transform_order",
            format!("{order:?}"),
            "crops, separator, global view (\"sub_glb\") only, the order Phi-3-Vision's \
             code implements",
        ));
    }
    Ok(())
}

pub(crate) struct Phi3V;

pub(crate) const FAMILY: Phi3V = Phi3V;

impl Family for Phi3V {
    fn architecture(&self) -> &'static str {
        "Phi3VForCausalLM"
    }

    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError> {
        let text = llama::text_config(c, None)?;
        if text.kind != TextKind::Phi3 {
            return Err(c.unsupported(
                "model_type",
                format!("{:?}", text.kind),
                "Phi-3-Vision's LM is a Phi-3 (\"phi3_v\")",
            ));
        }
        let ip = c.child("img_processor")?;
        let vcfg = tower(&ip)?;
        check_features(&ip, &vcfg)?;
        check_embedding(&c.child("embd_layer")?)?;
        for k in ["glb_GN", "sub_GN", "img_projection.0.weight"] {
            if !w.contains(&format!("{EMBED}{k}")) {
                return Err(w.missing(&format!("{EMBED}{k}")));
            }
        }
        Ok(Parts {
            text: Some(Text::locate(text, w)?),
            vision: Some(Vision::locate(vcfg, w)?),
            // The reference's `nn.GELU()`: exact.
            projector: Some(Projector {
                act: Activation::Gelu,
                prefix: EMBED.to_string(),
            }),
            qformer: None,
        })
    }

    /// The HD connector is only `phi3v`'s.
    fn backbone(&self) -> Option<Backbone> {
        Some(Backbone::Phi3v)
    }

    fn provides_connector(&self, name: &str, backbone: Backbone) -> bool {
        backbone == Backbone::Phi3v
            && (name.starts_with("connector.projector.")
                || name == "connector.sub_sep"
                || name == "connector.glb_sep")
    }

    fn connector(
        &self,
        parts: &Parts,
        name: &str,
        shape: &[usize],
        r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        let p = &parts.projector.as_ref()?.prefix;
        // The separators are stored with leading unit dimensions ([1, 1, 4C], [1, 1, 1, 4C]).
        let sep = |key: &str, dims: &[usize], r: &mut Reader<'_>| {
            r.take(&format!("{p}{key}"), dims)
                .and_then(|t| r.op(t.flatten_all()))
        };
        let dm = *shape.first()?;
        let hf = match name.strip_prefix("connector.")? {
            "sub_sep" => return Some(sep("sub_GN", &[1, 1, 1, dm], r)),
            "glb_sep" => return Some(sep("glb_GN", &[1, 1, dm], r)),
            "projector.fc1.weight" => "img_projection.0.weight",
            "projector.fc1.bias" => "img_projection.0.bias",
            "projector.fc2.weight" => "img_projection.2.weight",
            "projector.fc2.bias" => "img_projection.2.bias",
            _ => return None,
        };
        Some(r.take(&format!("{p}{hf}"), shape))
    }
}
