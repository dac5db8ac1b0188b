//! `LlavaForConditionalGeneration` (the LLaVA-1.5 layout): a CLIP tower ([`super::clip`]), a
//! LLaMA or Phi-3 LM ([`super::llama`]) and the projector `linear_1 -> act -> linear_2`, which
//! becomes our `llava` connector. That connector reads the penultimate block's patch tokens
//! (`vision_feature_layer = -2`, `vision_feature_select_strategy = "default"`), so other
//! feature layers and strategies are refused.

use candle_core::Tensor;
use serde_json::Value;

use super::cfg::Cfg;
use super::clip::{self, Vision};
use super::llama::{self, Text};
use super::weights::{Reader, Weights};
use super::{Family, HfError, Parts};
use crate::model::config::{Activation, Backbone};

/// The projector in a checkpoint: its activation and the prefix of its keys.
#[derive(Debug, Clone)]
pub(crate) struct Projector {
    pub act: Activation,
    pub prefix: String,
}

fn projector_act(c: &Cfg<'_>) -> Result<Activation, HfError> {
    match c.str_or("projector_hidden_act", "gelu")? {
        "gelu" => Ok(Activation::Gelu),
        "gelu_pytorch_tanh" | "gelu_new" => Ok(Activation::GeluTanh),
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => Err(c.unsupported(
            "projector_hidden_act",
            format!("{other:?}"),
            "gelu, gelu_pytorch_tanh or quick_gelu",
        )),
    }
}

pub(crate) struct Llava;

pub(crate) const FAMILY: Llava = Llava;

impl Family for Llava {
    fn architecture(&self) -> &'static str {
        "LlavaForConditionalGeneration"
    }

    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError> {
        let text = llama::text_config(&c.child("text_config")?, Some(c))?;
        let vcfg = clip::vision_config(&c.child("vision_config")?)?;
        let layer = c
            .get("vision_feature_layer")
            .cloned()
            .unwrap_or(Value::from(-2));
        let depth = vcfg.depth as i64;
        if layer.as_i64() != Some(-2) && layer.as_i64() != Some(depth - 1) {
            return Err(c.unsupported(
                "vision_feature_layer",
                layer,
                "our llava connector reads the penultimate block (-2)",
            ));
        }
        let strat = c.str_or("vision_feature_select_strategy", "default")?;
        if strat != "default" {
            return Err(c.unsupported(
                "vision_feature_select_strategy",
                format!("{strat:?}"),
                "our connectors read the patch tokens without the class token (\"default\")",
            ));
        }
        if !c.bool_or("multimodal_projector_bias", true)? {
            return Err(c.unsupported(
                "multimodal_projector_bias",
                false,
                "our projector linears have biases",
            ));
        }
        let act = projector_act(c)?;
        let prefix = w
            .prefix_of(
                &["multi_modal_projector.", "model.multi_modal_projector."],
                "linear_1.weight",
            )
            .ok_or_else(|| w.missing("multi_modal_projector.linear_1.weight"))?;
        Ok(Parts {
            text: Some(Text::locate(text, w)?),
            vision: Some(Vision::locate(vcfg, w)?),
            projector: Some(Projector { act, prefix }),
            ..Parts::default()
        })
    }

    /// The projector, for `llava` models only: `blip2` and `phi3v` cells take the tower and
    /// the LM and train their own connector from the seed.
    fn provides_connector(&self, name: &str, backbone: Backbone) -> bool {
        backbone == Backbone::Llava && name.starts_with("connector.projector.")
    }

    fn connector(
        &self,
        parts: &Parts,
        name: &str,
        shape: &[usize],
        r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        let p = &parts.projector.as_ref()?.prefix;
        let hf = match name.strip_prefix("connector.projector.")? {
            "fc1.weight" => "linear_1.weight",
            "fc1.bias" => "linear_1.bias",
            "fc2.weight" => "linear_2.weight",
            "fc2.bias" => "linear_2.bias",
            _ => return None,
        };
        Some(r.take(&format!("{p}{hf}"), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::VitLayout;
    use std::path::Path;

    /// llava-1.5-7b-hf's config.json as published: transformers writes only non-default keys,
    /// so the LM and tower shapes come from the class defaults.
    #[test]
    fn omitted_keys_take_the_transformers_defaults() {
        let v: Value = serde_json::from_str(
            r#"{
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096,
                            "model_type": "llama", "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
            "vocab_size": 32064}"#,
        )
        .unwrap();
        let top = Cfg::top(Path::new("config.json"), &v);
        let t = llama::text_config(&top.child("text_config").unwrap(), Some(&top)).unwrap();
        assert_eq!(
            (
                t.lm.width,
                t.lm.depth,
                t.lm.heads,
                t.lm.mlp_hidden,
                t.kv_heads
            ),
            (4096, 32, 32, 11008, 32)
        );
        assert_eq!(
            (t.lm.rms_eps, t.lm.rope_theta, t.vocab),
            (1e-5, 10_000.0, 32064)
        );
        assert!(!t.tied);
        let vc = clip::vision_config(&top.child("vision_config").unwrap()).unwrap();
        assert_eq!(
            (
                vc.image_size,
                vc.patch_size,
                vc.width,
                vc.depth,
                vc.heads,
                vc.mlp_ratio
            ),
            (336, 14, 1024, 24, 16, 4)
        );
        assert_eq!(vc.layout, VitLayout::clip(Activation::QuickGelu));
        assert_eq!(projector_act(&top).unwrap(), Activation::Gelu);
    }
}
