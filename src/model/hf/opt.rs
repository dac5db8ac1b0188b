//! OPT decoders (`OPTForCausalLM`, and the LM of BLIP-2's OPT checkpoints) onto our decoder in
//! its [`LmLayout::Opt`] form: per layer `self_attn_layer_norm` -> our `input_layernorm`, the
//! separate q/k/v projections (with biases) -> our fused `qkv_proj`, `out_proj` -> `o_proj`,
//! the layer's `final_layer_norm` -> `post_attention_layernorm`, `fc1` / `fc2` -> the MLP's
//! `gate_up_proj` / `down_proj` slots; the decoder's `final_layer_norm` -> `norm`;
//! `embed_positions` keeps transformers' two extra leading rows. The head is tied to the token
//! embeddings unless the config says otherwise.
//!
//! Refused: post-LN OPT (`do_layer_norm_before = false`, OPT-350m), `word_embed_proj_dim` other
//! than `hidden_size` (the `project_in` / `project_out` of OPT-350m), activations other than
//! ReLU, LayerNorms without affine parameters, linears without biases.

use candle_core::Tensor;

use super::cfg::Cfg;
use super::llama::{CausalLm, Text, TextCfg, TextKind};
use super::weights::Reader;
use super::HfError;
use crate::model::config::{LmConfig, LmLayout};

/// Parses an OPT config: a causal LM's top level, or BLIP-2's `text_config`. Omitted keys take
/// `OPTConfig()`'s defaults (OPT-125m).
pub(crate) fn text_config(c: &Cfg<'_>) -> Result<TextCfg, HfError> {
    c.require_str("model_type", "opt", "opt", "the LM must be \"opt\"")?;
    let width = c.usize_or("hidden_size", 768)?;
    let heads = c.usize_or("num_attention_heads", 12)?;
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(c.unsupported(
            "num_attention_heads",
            heads,
            &format!("must divide hidden_size = {width}"),
        ));
    }
    if !c.bool_or("do_layer_norm_before", true)? {
        return Err(c.unsupported(
            "do_layer_norm_before",
            false,
            "our decoder normalises before each sublayer (pre-LN)",
        ));
    }
    let proj = c.usize_or("word_embed_proj_dim", width)?;
    if proj != width {
        return Err(c.unsupported(
            "word_embed_proj_dim",
            proj,
            &format!("project_in/out are not supported; must equal hidden_size = {width}"),
        ));
    }
    c.require_str("activation_function", "relu", "relu", "relu only")?;
    for (k, why) in [
        ("enable_bias", "our OPT linears have biases"),
        (
            "layer_norm_elementwise_affine",
            "our LayerNorms have weights and biases",
        ),
    ] {
        if !c.bool_or(k, true)? {
            return Err(c.unsupported(k, false, why));
        }
    }
    if c.bool_or("_remove_final_layer_norm", false)? {
        return Err(c.unsupported(
            "_remove_final_layer_norm",
            true,
            "our decoder ends with a norm",
        ));
    }
    let vocab = c.usize_or("vocab_size", 50272)?;
    let eos = c.token("eos_token_id")?.unwrap_or(2);
    Ok(TextCfg {
        kind: TextKind::Opt,
        lm: LmConfig {
            width,
            depth: c.usize_or("num_hidden_layers", 12)?,
            heads,
            mlp_hidden: c.usize_or("ffn_dim", 3072)?,
            rope_theta: 10_000.0,
            // `nn.LayerNorm`'s default, which OPT uses; our LayerNorm has the same.
            rms_eps: 1e-5,
            rope_scaling: None,
            layout: LmLayout::Opt {
                positions: c.usize_or("max_position_embeddings", 2048)? + 2,
            },
        },
        vocab,
        kv_heads: heads,
        tied: c.bool_or("tie_word_embeddings", true)?,
        bos: c.token("bos_token_id")?.unwrap_or(2),
        eos,
        pad: c
            .token("pad_token_id")?
            .filter(|&p| (p as usize) < vocab)
            .unwrap_or(eos),
    })
}

/// Our decoder tensor `rest` (the name after `lm.`) from OPT's keys, or `None` if OPT has none.
pub(crate) fn fetch(
    text: &Text,
    rest: &str,
    shape: &[usize],
    r: &mut Reader<'_>,
) -> Option<Result<Tensor, HfError>> {
    let p = &text.prefix;
    match rest {
        "lm_head.weight" => return Some(text.head(shape, r)),
        "embed_tokens.weight" | "embed_positions.weight" => {
            return Some(r.take(&format!("{p}{rest}"), shape))
        }
        "norm.weight" | "norm.bias" => {
            let leaf = rest.trim_start_matches("norm.");
            return Some(r.take(&format!("{p}final_layer_norm.{leaf}"), shape));
        }
        _ => {}
    }
    let (i, leaf) = rest.strip_prefix("layers.")?.split_once('.')?;
    let at = format!("{p}layers.{i}.");
    let (module, kind) = leaf.rsplit_once('.')?;
    let hf = match module {
        "input_layernorm" => "self_attn_layer_norm",
        "post_attention_layernorm" => "final_layer_norm",
        "self_attn.o_proj" => "self_attn.out_proj",
        "mlp.gate_up_proj" => "fc1",
        "mlp.down_proj" => "fc2",
        "self_attn.qkv_proj" => {
            let w = text.cfg.lm.width;
            let part: &[usize] = if kind == "weight" { &[w, w] } else { &[w] };
            let keys = ["q_proj", "k_proj", "v_proj"].map(|q| format!("{at}self_attn.{q}.{kind}"));
            return Some(r.rows(&keys, part));
        }
        _ => return None,
    };
    Some(r.take(&format!("{at}{hf}.{kind}"), shape))
}

/// `OPTForCausalLM`: loadable from Rust (the decoder of BLIP-2's OPT checkpoints, checked on its
/// own), not in a sweep.
pub(crate) const FAMILY: CausalLm = CausalLm {
    architecture: "OPTForCausalLM",
    kind: TextKind::Opt,
};
