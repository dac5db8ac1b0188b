//! `Blip2ForConditionalGeneration` with an OPT language model (the `blip2-opt-*` checkpoints):
//! BLIP-2's vision tower, its Q-Former with the learned `query_tokens`, `language_projection`
//! and an OPT decoder ([`super::opt`]). Only a `blip2` model takes it: the tower hands its
//! class token to the Q-Former and the connector is the checkpoint's (Q-Former, queries and
//! projection), which pretrain-align then fine-tunes alone.
//!
//! Keys onto our tensors:
//! - tower (`vision_model.`) onto our ViT with [`VitLayout::blip2`]: the bare parameters
//!   `embeddings.class_embedding` [1, 1, D] and `embeddings.position_embedding` [1, N + 1, D]
//!   lose their leading ones, the patch convolution (with bias) becomes our patch linear,
//!   `self_attn.qkv` (already fused, rows q | k | v) and `self_attn.projection` our `attn.qkv` /
//!   `attn.proj`, `post_layernorm` our `post_norm`. The qkv bias is `qkv.bias`, or in the
//!   earliest conversions `q_bias` and `v_bias` with no key bias, concatenated around zeros.
//! - Q-Former (`qformer.`) onto [`crate::model::qformer`]: `layernorm` as is, per layer
//!   `attention.attention.{query,key,value}` concatenated into `self_attn.qkv`,
//!   `attention.output.{dense,LayerNorm}` -> `self_attn.{o_proj,norm}`, `crossattention.*` ->
//!   `cross_attn.{q_proj, kv_proj (key | value rows), o_proj, norm}`,
//!   `intermediate_query.dense` / `output_query.{dense,LayerNorm}` -> `mlp.{fc1,fc2,norm}`;
//!   `query_tokens` [1, Q, W] -> our [Q, W]; `language_projection` as is.
//!
//! Where the visual tokens go: transformers puts `num_query_tokens` image-token ids before
//! BOS and overwrites their embeddings with the projected queries (its `generate` starts from
//! exactly those ids), so OPT's learned positions count the queries first. Our decoder reads the
//! visual tokens as a prefix, then BOS and the caption, and counts positions from the first
//! visual token: the same sequence.
//!
//! Refused, naming `config.json` and the key: a language model other than OPT (Flan-T5 BLIP-2 is
//! an encoder-decoder), towers or Q-Formers with activations other than exact GELU, a tower
//! without the q/v bias (`qkv_bias = false`).

use candle_core::Tensor;

use super::cfg::Cfg;
use super::clip::{TowerKind, Vision};
use super::llama::Text;
use super::weights::{Reader, Weights};
use super::{opt, Family, HfError, Parts};
use crate::model::config::{
    Backbone, QFormerConfig, QFormerLayout, VisionConfig, VitLayout, VitStem,
};

/// Parses BLIP-2's `vision_config`; omitted keys take `Blip2VisionConfig()`'s defaults
/// (EVA ViT-g/14 at 224 px, LayerNorm eps 1e-6).
pub(crate) fn vision_config(c: &Cfg<'_>) -> Result<VisionConfig, HfError> {
    c.require_str(
        "model_type",
        "blip_2_vision_model",
        "blip_2_vision_model",
        "the vision tower must be \"blip_2_vision_model\"",
    )?;
    c.require_str("hidden_act", "gelu", "gelu", "gelu (exact) only")?;
    if !c.bool_or("qkv_bias", true)? {
        return Err(c.unsupported("qkv_bias", false, "our tower's attention has a q/k/v bias"));
    }
    let (image, patch) = (
        c.usize_or("image_size", 224)?,
        c.usize_or("patch_size", 14)?,
    );
    if patch == 0 || !image.is_multiple_of(patch) {
        return Err(c.unsupported("patch_size", patch, "must divide image_size"));
    }
    let width = c.usize_or("hidden_size", 1408)?;
    let heads = c.usize_or("num_attention_heads", 16)?;
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(c.unsupported(
            "num_attention_heads",
            heads,
            &format!("must divide hidden_size = {width}"),
        ));
    }
    let inter = c.usize_or("intermediate_size", 6144)?;
    if inter == 0 {
        return Err(c.unsupported("intermediate_size", 0, "must be at least 1"));
    }
    let exact = inter.is_multiple_of(width);
    Ok(VisionConfig {
        image_size: image,
        patch_size: patch,
        width,
        depth: c.usize_or("num_hidden_layers", 39)?,
        heads,
        mlp_ratio: (inter / width).max(1),
        layout: VitLayout::blip2(),
        stem: VitStem::Patch,
        norm_eps: c.f64_or("layer_norm_eps", 1e-6)?,
        mlp_hidden: if exact { 0 } else { inter },
    })
}

/// Parses `qformer_config` with `queries` learned queries; omitted keys take
/// `Blip2QFormerConfig()`'s defaults (BERT-base: 768 wide, 12 layers).
pub(crate) fn qformer_config(c: &Cfg<'_>, queries: usize) -> Result<QFormerConfig, HfError> {
    c.require_str(
        "model_type",
        "blip_2_qformer",
        "blip_2_qformer",
        "the Q-Former must be \"blip_2_qformer\"",
    )?;
    c.require_str("hidden_act", "gelu", "gelu", "gelu (exact) only")?;
    let width = c.usize_or("hidden_size", 768)?;
    let heads = c.usize_or("num_attention_heads", 12)?;
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(c.unsupported(
            "num_attention_heads",
            heads,
            &format!("must divide hidden_size = {width}"),
        ));
    }
    let cross_every = c.usize_or("cross_attention_frequency", 2)?;
    if cross_every == 0 {
        return Err(c.unsupported("cross_attention_frequency", 0, "must be at least 1"));
    }
    let mlp_hidden = c.usize_or("intermediate_size", 3072)?;
    if mlp_hidden == 0 {
        return Err(c.unsupported("intermediate_size", 0, "must be at least 1"));
    }
    Ok(QFormerConfig {
        queries,
        width,
        depth: c.usize_or("num_hidden_layers", 12)?,
        heads,
        layout: QFormerLayout::Bert {
            cross_every,
            mlp_hidden,
            eps: c.f64_or("layer_norm_eps", 1e-12)?,
        },
    })
}

/// The checkpoint's connector: its Q-Former's shape and the prefix of `query_tokens`,
/// `qformer.*` and `language_projection.*`.
#[derive(Debug, Clone)]
pub(crate) struct Connector {
    pub cfg: QFormerConfig,
    prefix: String,
}

/// Our tower tensor `rest` (the name after `vision.`) from BLIP-2's keys.
pub(crate) fn fetch_vision(
    v: &Vision,
    rest: &str,
    shape: &[usize],
    r: &mut Reader<'_>,
) -> Option<Result<Tensor, HfError>> {
    let p = &v.prefix;
    let w = v.cfg.width;
    let e = format!("{p}embeddings.");
    match rest {
        "patch_embed.weight" => {
            let ps = v.cfg.patch_size;
            let key = format!("{e}patch_embedding.weight");
            return Some(
                r.take(&key, &[w, 3, ps, ps])
                    .and_then(|t| r.op(t.reshape((w, 3 * ps * ps)))),
            );
        }
        "patch_embed.bias" => return Some(r.take(&format!("{e}patch_embedding.bias"), shape)),
        "cls_token" => {
            let key = format!("{e}class_embedding");
            return Some(r.take(&key, &[1, 1, w]).and_then(|t| r.op(t.reshape(w))));
        }
        "pos_embed" => {
            let key = format!("{e}position_embedding");
            let mut full = vec![1];
            full.extend_from_slice(shape);
            return Some(r.take(&key, &full).and_then(|t| r.op(t.reshape(shape))));
        }
        "post_norm.weight" | "post_norm.bias" => {
            let leaf = rest.trim_start_matches("post_norm.");
            return Some(r.take(&format!("{p}post_layernorm.{leaf}"), shape));
        }
        _ => {}
    }
    let (i, leaf) = rest.strip_prefix("blocks.")?.split_once('.')?;
    let at = format!("{p}encoder.layers.{i}.");
    let (module, kind) = leaf.rsplit_once('.')?;
    let hf = match module {
        "norm1" => "layer_norm1",
        "norm2" => "layer_norm2",
        "attn.proj" => "self_attn.projection",
        "mlp.fc1" => "mlp.fc1",
        "mlp.fc2" => "mlp.fc2",
        "attn.qkv"
            if kind == "bias" && !r.weights().contains(&format!("{at}self_attn.qkv.bias")) =>
        {
            return Some(split_qkv_bias(&at, w, r));
        }
        "attn.qkv" => "self_attn.qkv",
        _ => return None,
    };
    Some(r.take(&format!("{at}{hf}.{kind}"), shape))
}

/// `q_bias | 0 | v_bias`: the fused bias of conversions that stored the query and value
/// biases alone (the key projection has none).
fn split_qkv_bias(at: &str, w: usize, r: &mut Reader<'_>) -> Result<Tensor, HfError> {
    let q = r.take(&format!("{at}self_attn.q_bias"), &[w])?;
    let v = r.take(&format!("{at}self_attn.v_bias"), &[w])?;
    let k = r.op(q.zeros_like())?;
    r.op(Tensor::cat(&[q, k, v], 0))
}

pub(crate) struct Blip2;

pub(crate) const FAMILY: Blip2 = Blip2;

impl Family for Blip2 {
    fn architecture(&self) -> &'static str {
        "Blip2ForConditionalGeneration"
    }

    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError> {
        let tc = c.child("text_config")?;
        let lm = tc.str_or("model_type", "opt")?;
        if lm != "opt" {
            return Err(tc.unsupported(
                "model_type",
                format!("{lm:?}"),
                "only BLIP-2 with an OPT language model is supported (Flan-T5 BLIP-2 is an \
                 encoder-decoder, which our decoder-only captioner does not load)",
            ));
        }
        let text = opt::text_config(&tc)?;
        let vcfg = vision_config(&c.child("vision_config")?)?;
        let queries = c.usize_or("num_query_tokens", 32)?;
        if queries == 0 {
            return Err(c.unsupported("num_query_tokens", 0, "must be at least 1"));
        }
        let qcfg = qformer_config(&c.child("qformer_config")?, queries)?;
        let tower = w
            .prefix_of(
                &["vision_model.", "model.vision_model."],
                "embeddings.patch_embedding.weight",
            )
            .ok_or_else(|| w.missing("vision_model.embeddings.patch_embedding.weight"))?;
        let prefix = w
            .prefix_of(&["", "model."], "query_tokens")
            .ok_or_else(|| w.missing("query_tokens"))?;
        Ok(Parts {
            text: Some(Text::locate(text, w)?),
            vision: Some(Vision {
                cfg: vcfg,
                prefix: tower,
                kind: TowerKind::Blip2,
            }),
            qformer: Some(Connector { cfg: qcfg, prefix }),
            ..Parts::default()
        })
    }

    fn backbone(&self) -> Option<Backbone> {
        Some(Backbone::Blip2)
    }

    fn provides_connector(&self, name: &str, backbone: Backbone) -> bool {
        backbone == Backbone::Blip2
            && (name.starts_with("connector.qformer.")
                || name.starts_with("connector.language_projection."))
    }

    fn connector(
        &self,
        parts: &Parts,
        name: &str,
        shape: &[usize],
        r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        let conn = parts.qformer.as_ref()?;
        let p = &conn.prefix;
        if let Some(leaf) = name.strip_prefix("connector.language_projection.") {
            return Some(r.take(&format!("{p}language_projection.{leaf}"), shape));
        }
        let rest = name.strip_prefix("connector.qformer.")?;
        let (qw, qn) = (conn.cfg.width, conn.cfg.queries);
        match rest {
            "query_tokens" => {
                let key = format!("{p}query_tokens");
                return Some(
                    r.take(&key, &[1, qn, qw])
                        .and_then(|t| r.op(t.reshape((qn, qw)))),
                );
            }
            "layernorm.weight" | "layernorm.bias" => {
                return Some(r.take(&format!("{p}qformer.{rest}"), shape))
            }
            _ => {}
        }
        let (i, leaf) = rest.strip_prefix("layers.")?.split_once('.')?;
        let at = format!("{p}qformer.encoder.layer.{i}.");
        let (module, kind) = leaf.rsplit_once('.')?;
        let vw = parts.vision.as_ref()?.cfg.width;
        let part = |inp: usize| -> Vec<usize> {
            if kind == "weight" {
                vec![qw, inp]
            } else {
                vec![qw]
            }
        };
        let hf = match module {
            "self_attn.qkv" => {
                let keys = ["query", "key", "value"]
                    .map(|m| format!("{at}attention.attention.{m}.{kind}"));
                return Some(r.rows(&keys, &part(qw)));
            }
            "cross_attn.kv_proj" => {
                let keys =
                    ["key", "value"].map(|m| format!("{at}crossattention.attention.{m}.{kind}"));
                return Some(r.rows(&keys, &part(vw)));
            }
            "self_attn.o_proj" => "attention.output.dense",
            "self_attn.norm" => "attention.output.LayerNorm",
            "cross_attn.q_proj" => "crossattention.attention.query",
            "cross_attn.o_proj" => "crossattention.output.dense",
            "cross_attn.norm" => "crossattention.output.LayerNorm",
            "mlp.fc1" => "intermediate_query.dense",
            "mlp.fc2" => "output_query.dense",
            "mlp.norm" => "output_query.LayerNorm",
            _ => return None,
        };
        Some(r.take(&format!("{at}{hf}.{kind}"), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Blip2-opt-2.7b's config as transformers writes it leaves the tower and Q-Former at their
    /// class defaults: EVA ViT-g (MLP 6144 for width 1408, not a whole multiple), eps 1e-6, a
    /// BERT-base Q-Former with cross-attention every second layer.
    #[test]
    fn omitted_keys_take_the_transformers_defaults() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
                "num_query_tokens": 32, "image_token_index": 50265,
                "qformer_config": {"model_type": "blip_2_qformer"},
                "vision_config": {"model_type": "blip_2_vision_model"},
                "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240,
                                "num_hidden_layers": 32, "num_attention_heads": 32,
                                "vocab_size": 50304, "word_embed_proj_dim": 2560,
                                "eos_token_id": 50118}}"#,
        )
        .unwrap();
        let top = Cfg::top(Path::new("config.json"), &v);
        let vc = vision_config(&top.child("vision_config").unwrap()).unwrap();
        assert_eq!(
            (vc.image_size, vc.patch_size, vc.width, vc.depth, vc.heads),
            (224, 14, 1408, 39, 16)
        );
        assert_eq!((vc.mlp_width(), vc.norm_eps), (6144, 1e-6));
        assert_eq!(vc.layout, VitLayout::blip2());
        let q = qformer_config(&top.child("qformer_config").unwrap(), 32).unwrap();
        assert_eq!((q.queries, q.width, q.depth, q.heads), (32, 768, 12, 12));
        assert_eq!(
            q.layout,
            QFormerLayout::Bert {
                cross_every: 2,
                mlp_hidden: 3072,
                eps: 1e-12
            }
        );
        let t = opt::text_config(&top.child("text_config").unwrap()).unwrap();
        assert_eq!((t.lm.width, t.vocab, t.eos, t.bos), (2560, 50304, 50118, 2));
        assert!(t.tied);
    }
}
