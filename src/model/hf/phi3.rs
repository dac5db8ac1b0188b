//! Phi-3 decoders (`Phi3ForCausalLM`, and Phi-3 LMs inside LLaVA checkpoints): a LLaMA-family
//! decoder ([`super::llama`]) that stores attention and MLP input projections fused
//! (`qkv_proj`: q, then k, then v rows; `gate_up_proj`: gate, then up), as our decoder does.
//! Long-context Phi-3 checkpoints (Phi-3-mini-128k, Phi-3-vision) use LongRoPE
//! (`rope_scaling.type = "su"`), read by [`super::llama::text_config`].

use candle_core::Tensor;

use super::llama::{CausalLm, TextDefaults, TextKind};
use super::weights::Reader;
use super::HfError;

/// `Phi3Config()`'s defaults (Phi-3-mini).
pub(crate) const DEFAULTS: TextDefaults = TextDefaults {
    vocab: 32064,
    hidden: 3072,
    inter: 8192,
    layers: 32,
    heads: 32,
    rms_eps: 1e-5,
    max_pos: 4096,
    bos: 1,
    eos: 32000,
};

pub(crate) const FAMILY: CausalLm = CausalLm {
    architecture: "Phi3ForCausalLM",
    kind: TextKind::Phi3,
};

/// The q (`w` rows), k and v (`kvw` rows each) parts of the fused `qkv_proj` at `key`.
pub(crate) fn split_qkv(
    key: &str,
    w: usize,
    kvw: usize,
    r: &mut Reader<'_>,
) -> Result<(Tensor, Tensor, Tensor), HfError> {
    let f = r.take(key, &[w + 2 * kvw, w])?;
    Ok((
        r.op(f.narrow(0, 0, w))?,
        r.op(f.narrow(0, w, kvw))?,
        r.op(f.narrow(0, w + kvw, kvw))?,
    ))
}
