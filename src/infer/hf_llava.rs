//! The Hugging Face LLaVA layout of an export, written beside ecic's own files when the model is
//! LLaVA-shaped, so that `transformers` loads the directory as a `LlavaForConditionalGeneration`
//! (`scripts/hf-llava-check.sh` does, and compares its greedy captions with ecic's).
//!
//! LLaVA-shaped means what the LLaVA-1.5 architecture can express: the `llava` backbone with
//! `early` fusion (visual tokens as a prefix of the text), a CLIP-layout tower (class token,
//! `pre_layrnorm`, bias-free patch convolution: what `model.checkpoint` with a LLaVA or CLIP
//! checkpoint builds), LoRA merged or none (bottleneck adapters have no place in it), no
//! retrieval. The tiny presets' tower has neither class token nor pre-norm, which CLIP cannot
//! switch off, so their exports carry ecic's layout only, and `ecic export` says so.
//!
//! The mapping is the inverse of [`crate::model::hf`]'s: our fused `qkv` / `qkv_proj` /
//! `gate_up_proj` are split into q/k/v and gate/up (the LM is written as LLaMA, with as many
//! key/value heads as query heads), the patch linear becomes the convolution. Our tower builds
//! only the blocks the projector reads (up to the penultimate one, LLaVA's
//! `vision_feature_layer = -2`); the last CLIP layer, whose output LLaVA never reads, is
//! written as zeros, and so is CLIP's `post_layernorm` (ones/zeros), used only for CLIP's
//! pooled output. The image token is our pad id (never a model input otherwise).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::model::{
    Activation, Backbone, Fusion, ModelConfig, PeftConfig, PeftMethod, VitLayout, VitStem,
};

use super::{io_err, InferError};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";

/// Why a model has no LLaVA layout, or `None` when it has one.
pub fn not_llava_shaped(cfg: &ModelConfig, peft: &PeftConfig) -> Option<String> {
    let v = &cfg.vision;
    if cfg.backbone != Backbone::Llava {
        return Some(format!("backbone {:?} is not llava", cfg.backbone).to_lowercase());
    }
    if cfg.fusion != Fusion::Early {
        return Some("only early fusion (visual tokens as a text prefix) is LLaVA's".into());
    }
    if v.stem != VitStem::Patch || v.layout != VitLayout::clip(v.layout.act) {
        return Some(
            "the vision tower is not CLIP-shaped (class token, pre-norm, bias-free patch embedding); the tiny presets' is not"
                .into(),
        );
    }
    if peft.method == PeftMethod::Adapter {
        return Some("bottleneck adapters have no place in LLaVA's layers".into());
    }
    if cfg.retrieved > 0 {
        return Some("retrieval-augmented decoding is not LLaVA's".into());
    }
    None
}

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::GeluTanh => "gelu_pytorch_tanh",
        Activation::Gelu => "gelu",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// The `config.json` of the model.
pub fn config(cfg: &ModelConfig) -> serde_json::Value {
    let (v, l) = (&cfg.vision, &cfg.lm);
    let patches = (v.image_size / v.patch_size).pow(2);
    json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": cfg.pad_id,
        "image_seq_length": patches,
        "projector_hidden_act": act_name(cfg.projector_act),
        "multimodal_projector_bias": true,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": false,
        "dtype": "float32",
        "text_config": {
            "model_type": "llama",
            "hidden_size": l.width,
            "intermediate_size": l.mlp_hidden,
            "num_hidden_layers": l.depth,
            "num_attention_heads": l.heads,
            "num_key_value_heads": l.heads,
            "head_dim": l.width / l.heads,
            "hidden_act": "silu",
            "max_position_embeddings": patches + cfg.max_caption_len + 2,
            "rms_norm_eps": l.rms_eps,
            "rope_theta": l.rope_theta,
            "rope_parameters": { "rope_theta": l.rope_theta, "rope_type": "default" },
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "vocab_size": cfg.vocab_size,
            "pad_token_id": cfg.pad_id,
            "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.eos_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": v.width * v.mlp_ratio,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": act_name(v.layout.act),
            "layer_norm_eps": 1e-5,
        },
    })
}

/// Our merged tensors under transformers' `LlavaForConditionalGeneration` state-dict names.
pub fn tensors(
    cfg: &ModelConfig,
    ours: &std::collections::BTreeMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>, InferError> {
    let get = |k: &str| {
        ours.get(k).cloned().ok_or_else(|| {
            InferError::Unsupported(format!("the model has no tensor {k} for the LLaVA layout"))
        })
    };
    let (v, l) = (&cfg.vision, &cfg.lm);
    let (w, vw) = (l.width, v.width);
    let mut out = HashMap::new();
    // Language model (LLaMA names).
    let lm = "model.language_model.";
    out.insert(
        format!("{lm}embed_tokens.weight"),
        get("lm.embed_tokens.weight")?,
    );
    out.insert(format!("{lm}norm.weight"), get("lm.norm.weight")?);
    out.insert("lm_head.weight".into(), get("lm.lm_head.weight")?);
    for i in 0..l.depth {
        let (o, h) = (format!("lm.layers.{i}."), format!("{lm}layers.{i}."));
        for leaf in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
        ] {
            out.insert(format!("{h}{leaf}"), get(&format!("{o}{leaf}"))?);
        }
        let qkv = get(&format!("{o}self_attn.qkv_proj.weight"))?;
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.insert(
                format!("{h}self_attn.{name}.weight"),
                qkv.narrow(0, j * w, w)?.contiguous()?,
            );
        }
        let gu = get(&format!("{o}mlp.gate_up_proj.weight"))?;
        let hid = l.mlp_hidden;
        out.insert(
            format!("{h}mlp.gate_proj.weight"),
            gu.narrow(0, 0, hid)?.contiguous()?,
        );
        out.insert(
            format!("{h}mlp.up_proj.weight"),
            gu.narrow(0, hid, hid)?.contiguous()?,
        );
    }
    // Projector.
    for (o, h) in [("fc1", "linear_1"), ("fc2", "linear_2")] {
        for kind in ["weight", "bias"] {
            out.insert(
                format!("model.multi_modal_projector.{h}.{kind}"),
                get(&format!("connector.projector.{o}.{kind}"))?,
            );
        }
    }
    // Vision tower (CLIP names).
    let vt = "model.vision_tower.";
    let ps = v.patch_size;
    out.insert(
        format!("{vt}embeddings.patch_embedding.weight"),
        get("vision.patch_embed.weight")?.reshape((vw, 3, ps, ps))?,
    );
    out.insert(
        format!("{vt}embeddings.class_embedding"),
        get("vision.cls_token")?,
    );
    out.insert(
        format!("{vt}embeddings.position_embedding.weight"),
        get("vision.pos_embed")?,
    );
    for kind in ["weight", "bias"] {
        out.insert(
            format!("{vt}pre_layrnorm.{kind}"),
            get(&format!("vision.pre_norm.{kind}"))?,
        );
    }
    let dev = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &dev);
    let mlp = vw * v.mlp_ratio;
    for i in 0..v.depth {
        let (o, h) = (
            format!("vision.blocks.{i}."),
            format!("{vt}encoder.layers.{i}."),
        );
        let built = ours.contains_key(&format!("{o}norm1.weight"));
        for (mo, mh, rows, cols) in [
            ("norm1", "layer_norm1", vw, 0),
            ("norm2", "layer_norm2", vw, 0),
            ("attn.proj", "self_attn.out_proj", vw, vw),
            ("mlp.fc1", "mlp.fc1", mlp, vw),
            ("mlp.fc2", "mlp.fc2", vw, mlp),
        ] {
            let (wt, bt) = if built {
                (
                    get(&format!("{o}{mo}.weight"))?,
                    get(&format!("{o}{mo}.bias"))?,
                )
            } else if cols == 0 {
                (
                    Tensor::ones(rows, candle_core::DType::F32, &dev)?,
                    zeros(&[rows])?,
                )
            } else {
                (zeros(&[rows, cols])?, zeros(&[rows])?)
            };
            out.insert(format!("{h}{mh}.weight"), wt);
            out.insert(format!("{h}{mh}.bias"), bt);
        }
        let (qw, qb) = if built {
            (
                get(&format!("{o}attn.qkv.weight"))?,
                get(&format!("{o}attn.qkv.bias"))?,
            )
        } else {
            (zeros(&[3 * vw, vw])?, zeros(&[3 * vw])?)
        };
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.insert(
                format!("{h}self_attn.{name}.weight"),
                qw.narrow(0, j * vw, vw)?.contiguous()?,
            );
            out.insert(
                format!("{h}self_attn.{name}.bias"),
                qb.narrow(0, j * vw, vw)?.contiguous()?,
            );
        }
    }
    out.insert(
        format!("{vt}post_layernorm.weight"),
        Tensor::ones(vw, candle_core::DType::F32, &dev)?,
    );
    out.insert(format!("{vt}post_layernorm.bias"), zeros(&[vw])?);
    Ok(out)
}

/// Writes `config.json` and `model.safetensors` into `dir` when the model is LLaVA-shaped;
/// returns why not otherwise (nothing written).
pub fn write_if_llava(
    cfg: &ModelConfig,
    peft: &PeftConfig,
    dir: &Path,
    ours: &std::collections::BTreeMap<String, Tensor>,
) -> Result<Option<String>, InferError> {
    if let Some(why) = not_llava_shaped(cfg, peft) {
        return Ok(Some(why));
    }
    let t = tensors(cfg, ours)?;
    let p = dir.join(WEIGHTS);
    candle_core::safetensors::save(&t, &p).map_err(|e| InferError::Format {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let c = dir.join(CONFIG);
    std::fs::write(
        &c,
        serde_json::to_vec_pretty(&config(cfg)).expect("a config serializes"),
    )
    .map_err(io_err(&c))?;
    Ok(None)
}
