//! LLaMA-family decoders (`LlamaForCausalLM`, and the LM inside LLaVA): the text config every
//! decoder family shares, and the mapping of a decoder's keys onto our [`crate::model::lm`]
//! decoder.
//!
//! LLaMA stores `q/k/v_proj` and `gate/up_proj` as separate matrices; our decoder has fused
//! `qkv_proj` / `gate_up_proj`, so they are concatenated (Phi-3 stores them fused already, see
//! [`super::phi3`]). Grouped-query attention is loaded exactly by repeating each key/value head
//! for the query heads of its group (what transformers' `repeat_kv` does at run time), so the
//! decoder stays multi-head. RoPE is stored in the rotate-half layout our kernels use, so nothing
//! is permuted. Tied embeddings give `lm_head` a copy of `embed_tokens`.

use candle_core::Tensor;

use serde_json::Value;

use super::cfg::Cfg;
use super::weights::{Reader, Weights};
use super::{phi3, Family, HfError, Parts};
use crate::model::config::{LmConfig, LmLayout, RopeScaling};

/// Decoder family inside a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextKind {
    Llama,
    Phi3,
    /// See [`super::opt`].
    Opt,
}

impl TextKind {
    fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" => Some(TextKind::Llama),
            // Phi-3-Vision's top level describes its Phi-3 LM (see `super::phi3v`).
            "phi3" | "phi3_v" => Some(TextKind::Phi3),
            _ => None,
        }
    }

    /// What transformers assumes for the keys a `config.json` leaves out.
    fn defaults(self) -> &'static TextDefaults {
        match self {
            TextKind::Llama | TextKind::Opt => &DEFAULTS,
            TextKind::Phi3 => &phi3::DEFAULTS,
        }
    }
}

/// A decoder's shape and special ids, as our model needs them.
#[derive(Debug, Clone)]
pub(crate) struct TextCfg {
    pub kind: TextKind,
    pub lm: LmConfig,
    pub vocab: usize,
    pub kv_heads: usize,
    pub tied: bool,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

/// Values transformers assumes for keys a `config.json` leaves out (it writes only those that
/// differ from the class defaults, e.g. llava-1.5's `text_config` holds little more than
/// `model_type` and `vocab_size`).
pub(crate) struct TextDefaults {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub rms_eps: f64,
    pub max_pos: usize,
    pub bos: u32,
    pub eos: u32,
}

/// `LlamaConfig()`'s defaults.
const DEFAULTS: TextDefaults = TextDefaults {
    vocab: 32000,
    hidden: 4096,
    inter: 11008,
    layers: 32,
    heads: 32,
    rms_eps: 1e-6,
    max_pos: 2048,
    bos: 1,
    eos: 2,
};

/// Parses a decoder config: the top level of a causal-LM checkpoint (`top = None`) or the
/// `text_config` of a VLM (`top` = its top level, which may hold `tie_word_embeddings`).
pub(crate) fn text_config(c: &Cfg<'_>, top: Option<&Cfg<'_>>) -> Result<TextCfg, HfError> {
    // LlavaConfig's text model defaults to LLaMA.
    let ty = c.str_or("model_type", if top.is_some() { "llama" } else { "" })?;
    let kind = TextKind::from_model_type(ty).ok_or_else(|| {
        c.unsupported(
            "model_type",
            format!("{ty:?}"),
            "the LM must be \"llama\" or \"phi3\"",
        )
    })?;
    let d = kind.defaults();
    let width = c.usize_or("hidden_size", d.hidden)?;
    let heads = c.usize_or("num_attention_heads", d.heads)?;
    let kv_heads = c.usize_or("num_key_value_heads", heads)?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(c.unsupported(
            "num_key_value_heads",
            kv_heads,
            &format!("must divide num_attention_heads = {heads}"),
        ));
    }
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(c.unsupported(
            "num_attention_heads",
            heads,
            &format!("must divide hidden_size = {width}"),
        ));
    }
    if let Some(hd) = c.get("head_dim") {
        if hd.as_u64() != Some((width / heads) as u64) {
            return Err(c.unsupported(
                "head_dim",
                hd,
                "our decoder needs head_dim = hidden_size / num_attention_heads",
            ));
        }
    }
    c.require_str("hidden_act", "silu", "silu", "the LM MLP is SwiGLU (silu)")?;
    for k in ["attention_bias", "mlp_bias"] {
        if c.bool_or(k, false)? {
            return Err(c.unsupported(k, true, "our decoder's linears have no bias"));
        }
    }
    let mut theta = c.f64_or("rope_theta", 10_000.0)?;
    let mut rope_scaling = None;
    // Configs written before transformers 5 say `rope_scaling` (with `type`), later ones
    // `rope_parameters` (with `rope_type`, and `rope_theta` inside).
    if c.get("rope_scaling").is_some() {
        let rs = c.child("rope_scaling")?;
        let key = if rs.get("type").is_some() {
            "type"
        } else {
            "rope_type"
        };
        let ty = rs.str_or(key, "default")?;
        rope_scaling = rope_type(c, &rs, key, ty, width / heads, d)?;
    }
    if c.get("rope_parameters").is_some() {
        let rp = c.child("rope_parameters")?;
        let ty = rp.str_or("rope_type", "default")?;
        rope_scaling = rope_type(c, &rp, "rope_type", ty, width / heads, d)?;
        theta = rp.f64_or("rope_theta", theta)?;
        let f = rp.f64_or("partial_rotary_factor", 1.0)?;
        if f != 1.0 {
            return Err(rp.unsupported("partial_rotary_factor", f, "RoPE must cover the head"));
        }
    }
    let f = c.f64_or("partial_rotary_factor", 1.0)?;
    if f != 1.0 {
        return Err(c.unsupported("partial_rotary_factor", f, "RoPE must cover the head"));
    }
    let vocab = c.usize_or("vocab_size", d.vocab)?;
    let tied = match top {
        Some(t) if c.get("tie_word_embeddings").is_none() => {
            t.bool_or("tie_word_embeddings", false)?
        }
        _ => c.bool_or("tie_word_embeddings", false)?,
    };
    let eos = c.token("eos_token_id")?.unwrap_or(d.eos);
    Ok(TextCfg {
        kind,
        lm: LmConfig {
            width,
            depth: c.usize_or("num_hidden_layers", d.layers)?,
            heads,
            mlp_hidden: c.usize_or("intermediate_size", d.inter)?,
            rope_theta: theta,
            rms_eps: c.f64_or("rms_norm_eps", d.rms_eps)?,
            rope_scaling,
            layout: LmLayout::Llama,
        },
        vocab,
        kv_heads,
        tied,
        bos: c.token("bos_token_id")?.unwrap_or(d.bos),
        eos,
        pad: c
            .token("pad_token_id")?
            .filter(|&p| (p as usize) < vocab)
            .unwrap_or(eos),
    })
}

/// The RoPE variant `ty` (read from `key`) of the rope object `r` (`rope_scaling` or
/// `rope_parameters`) in the decoder config `c`: plain, or LongRoPE (Phi-3's "su"), whose
/// defaults follow transformers' `_compute_longrope_parameters`.
fn rope_type(
    c: &Cfg<'_>,
    r: &Cfg<'_>,
    key: &str,
    ty: &str,
    head_dim: usize,
    d: &TextDefaults,
) -> Result<Option<RopeScaling>, HfError> {
    match ty {
        "default" => Ok(None),
        "su" | "longrope" => {
            let short = r
                .get("short_factor")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    r.err(format!(
                        "{} must be a list of numbers",
                        r.key("short_factor")
                    ))
                })?;
            if short.len() != head_dim / 2 {
                return Err(r.unsupported(
                    "short_factor",
                    format!("a list of {}", short.len()),
                    &format!("one factor per rotary frequency ({})", head_dim / 2),
                ));
            }
            let max = c.usize_or("max_position_embeddings", d.max_pos)?;
            let orig = r.usize_or(
                "original_max_position_embeddings",
                c.usize_or("original_max_position_embeddings", max)?,
            )?;
            let factor = r.f64_or("factor", max as f64 / orig as f64)?;
            let default_attn = if factor <= 1.0 {
                1.0
            } else {
                (1.0 + factor.ln() / (orig as f64).ln()).sqrt()
            };
            Ok(Some(RopeScaling {
                short_factor: short,
                attention_factor: r.f64_or("attention_factor", default_attn)?,
                original_max_position_embeddings: orig,
            }))
        }
        other => Err(r.unsupported(
            key,
            format!("{other:?}"),
            "plain RoPE or LongRoPE (\"su\" / \"longrope\") only",
        )),
    }
}

/// A decoder in a checkpoint: its config and where its keys are.
#[derive(Debug, Clone)]
pub(crate) struct Text {
    pub cfg: TextCfg,
    /// Prefix of `embed_tokens`, `layers.*` and `norm`.
    pub prefix: String,
    /// The output head's key, absent in files of tied models.
    pub head: Option<String>,
}

impl Text {
    /// Locates the decoder of `cfg` in `w`: under `model.` (causal LMs), `language_model.model.`
    /// (LLaVA as converted), `model.language_model.` (transformers 5.x) and others.
    pub fn locate(cfg: TextCfg, w: &Weights) -> Result<Self, HfError> {
        let prefixes: &[&str] = match cfg.kind {
            TextKind::Opt => &[
                "model.decoder.",
                "language_model.model.decoder.",
                "model.language_model.decoder.",
                "language_model.decoder.",
            ],
            _ => &[
                "model.",
                "language_model.model.",
                "model.language_model.",
                "language_model.",
                "",
            ],
        };
        let prefix = w
            .prefix_of(prefixes, "embed_tokens.weight")
            .ok_or_else(|| w.missing(&format!("{}embed_tokens.weight", prefixes[0])))?;
        let head = [
            "lm_head.weight",
            "language_model.lm_head.weight",
            "model.lm_head.weight",
        ]
        .iter()
        .find(|k| w.contains(k))
        .map(|k| (*k).to_string());
        Ok(Self { cfg, prefix, head })
    }

    /// The output head: the file's, or for tied models a copy of the token embeddings.
    pub fn head(&self, shape: &[usize], r: &mut Reader<'_>) -> Result<Tensor, HfError> {
        match (&self.head, self.cfg.tied) {
            (Some(k), _) => r.take(k, shape),
            (None, true) => r.take(&format!("{}embed_tokens.weight", self.prefix), shape),
            (None, false) => Err(r.weights().missing("lm_head.weight")),
        }
    }

    /// Our decoder tensor `rest` (the name after `lm.`), or `None` if the decoder has no such
    /// tensor.
    pub fn fetch(
        &self,
        rest: &str,
        shape: &[usize],
        r: &mut Reader<'_>,
    ) -> Option<Result<Tensor, HfError>> {
        let t = &self.cfg;
        let p = &self.prefix;
        if t.kind == TextKind::Opt {
            return super::opt::fetch(self, rest, shape, r);
        }
        if rest == "lm_head.weight" {
            return Some(self.head(shape, r));
        }
        let Some(layer) = rest.strip_prefix("layers.") else {
            return match rest {
                "embed_tokens.weight" | "norm.weight" => Some(r.take(&format!("{p}{rest}"), shape)),
                _ => None,
            };
        };
        let (i, leaf) = layer.split_once('.')?;
        let at = format!("{p}layers.{i}.");
        Some(match leaf {
            "input_layernorm.weight"
            | "post_attention_layernorm.weight"
            | "self_attn.o_proj.weight"
            | "mlp.down_proj.weight" => r.take(&format!("{at}{leaf}"), shape),
            "self_attn.qkv_proj.weight" => self.qkv(&at, r),
            "mlp.gate_up_proj.weight" => match t.kind {
                TextKind::Llama => {
                    let keys = ["gate", "up"].map(|m| format!("{at}mlp.{m}_proj.weight"));
                    r.rows(&keys, &[t.lm.mlp_hidden, t.lm.width])
                }
                TextKind::Phi3 | TextKind::Opt => r.take(&format!("{at}{leaf}"), shape),
            },
            _ => return None,
        })
    }

    /// Our fused, multi-head `qkv_proj` of layer `at`.
    fn qkv(&self, at: &str, r: &mut Reader<'_>) -> Result<Tensor, HfError> {
        let t = &self.cfg;
        let w = t.lm.width;
        let hd = w / t.lm.heads;
        let kvw = t.kv_heads * hd;
        let (q, k, v) = match t.kind {
            TextKind::Llama | TextKind::Opt => (
                r.take(&format!("{at}self_attn.q_proj.weight"), &[w, w])?,
                r.take(&format!("{at}self_attn.k_proj.weight"), &[kvw, w])?,
                r.take(&format!("{at}self_attn.v_proj.weight"), &[kvw, w])?,
            ),
            TextKind::Phi3 => {
                phi3::split_qkv(&format!("{at}self_attn.qkv_proj.weight"), w, kvw, r)?
            }
        };
        let rep = t.lm.heads / t.kv_heads;
        let k = r.op(repeat_heads(&k, t.kv_heads, rep, hd))?;
        let v = r.op(repeat_heads(&v, t.kv_heads, rep, hd))?;
        r.op(Tensor::cat(&[q, k, v], 0))
    }
}

/// Rows of `w` (kv_heads * hd, in) with each head repeated `rep` times consecutively: head j of
/// the result is key/value head j / rep, as Hugging Face's `repeat_kv` pairs them.
fn repeat_heads(w: &Tensor, kv_heads: usize, rep: usize, hd: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(w.clone());
    }
    let inp = w.dim(1)?;
    w.reshape((kv_heads, 1, hd, inp))?
        .broadcast_as((kv_heads, rep, hd, inp))?
        .reshape((kv_heads * rep * hd, inp))
}

/// A causal LM on its own (`LlamaForCausalLM`, `Phi3ForCausalLM`): loadable from Rust, not in a
/// sweep (a sweep needs a vision tower too).
pub(crate) struct CausalLm {
    pub architecture: &'static str,
    pub kind: TextKind,
}

pub(crate) const FAMILY: CausalLm = CausalLm {
    architecture: "LlamaForCausalLM",
    kind: TextKind::Llama,
};

impl Family for CausalLm {
    fn architecture(&self) -> &'static str {
        self.architecture
    }

    fn configure(&self, c: &Cfg<'_>, w: &Weights) -> Result<Parts, HfError> {
        let t = match self.kind {
            TextKind::Opt => super::opt::text_config(c)?,
            _ => text_config(c, None)?,
        };
        if t.kind != self.kind {
            return Err(c.unsupported("model_type", format!("{:?}", t.kind), self.architecture));
        }
        Ok(Parts {
            text: Some(Text::locate(t, w)?),
            ..Parts::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grouped_query_heads_repeat_in_transformers_order() {
        // 2 kv heads of 1 row each, 3 query heads per group: rows 0 0 0 1 1 1.
        let w = Tensor::new(&[[0f32, 0.5], [1.0, 1.5]], &Device::Cpu).unwrap();
        let r = repeat_heads(&w, 2, 3, 1).unwrap();
        let rows: Vec<Vec<f32>> = r.to_vec2().unwrap();
        let first: Vec<f32> = rows.iter().map(|r| r[0]).collect();
        assert_eq!(first, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }
}
