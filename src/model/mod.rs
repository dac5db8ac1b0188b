//! Vision-language captioning models on candle (CPU f32): the step between the data tensors
//! (`data`) and the training stages (`train`, `stages`); `decode` generates from them.
//!
//! # Three independent axes
//!
//! **Backbone** (see [`connector`]): `blip2` (ViT -> Q-Former -> linear), `llava` (ViT
//! penultimate block -> 2-layer MLP), `phi3v` (HD transform as Phi-3-Vision: global view + 2x2
//! local crops, penultimate block -> 2x2 token merge -> newline / global separator tokens in
//! the merged feature space -> projector). Each yields visual tokens
//! in the LM's width.
//!
//! **Fusion** (where those tokens enter the causal LM, [`lm`]):
//! - `early`: visual tokens are a prefix of the text sequence; all decoder layers see them
//!   through causal self-attention (blip2: 16 query tokens; llava: 16 patch tokens; phi3v: 27
//!   HD tokens at the tiny preset, i.e. 4 merged tokens per view: 2x2 crops stitched into a
//!   4x4 grid + 4 newlines, separator, 2x2 global + 2 newlines).
//! - `late`: the text sequence alone goes through the decoder; only the top
//!   `fusion_opts.late_layers` layers get a cross-attention sublayer onto the visual tokens
//!   (on a checkpoint scaled by tanh(gate), gates zero at init, `fusion_opts.late_gated`: the
//!   model starts equal to the checkpoint, which has no such layers).
//! - `multilevel`: the connector reads several encoder depths (`fusion_opts.levels`, default
//!   every block) pooled per patch token by learned attention weights over levels (for blip2 the
//!   Q-Former attends to the pooled features, for phi3v each HD view is pooled before the merge),
//!   and the resulting tokens enter `fusion_opts.inject` decoder layers (default all) through
//!   cross-attention scaled by tanh(gate), gates initialised to zero.
//!
//! **PEFT** ([`PeftConfig`], through the one linear seam in [`linear`]): `full`, `lora`, `qlora`
//! (Q4_0 frozen base, f32 LoRA), `adapter` (bottleneck after attention and MLP). Per component:
//! the vision encoder is frozen (or LoRA on its attention, `peft.vision = "lora"`), the connector
//! (Q-Former / projectors / separators / level pooling / cross-attention) is always fully
//! trained, the LM follows the method. `full` trains the LM fully; the encoder follows
//! `peft.vision` for every method so the PEFT axis compares LM methods only. A LoRA linear on
//! its frozen base runs as one op with its own backward ([`lora_linear`]), so that training
//! keeps no output-wide intermediate of it for the backward.
//!
//! # Phases and checkpoints
//! [`Phase::Align`] builds the base without PEFT parameters. With `pretrained = true` it trains
//! the connector only (and the components `align_unfreeze` names): the encoder and LM come from a
//! real checkpoint loaded by [`hf`] through [`Captioner::load_pretrained`], or, for the tiny
//! presets, from the foundation stages through [`Captioner::load_foundation`] (the tower
//! pretrained contrastively by [`clip`], the LM as a causal LM on generic captions); the align
//! output then holds the whole base, see [`Captioner::save_base`]. Without (`pretrained =
//! false`) it trains everything from the seed. [`Phase::Adapt`] loads that checkpoint as the frozen base
//! ([`Captioner::load_base`]), adds the PEFT parameters and trains them with the connector; SCST
//! continues the same parameters. [`Captioner::save_trained`] writes only the trainable tensors
//! (safetensors); base + trained deltas rebuild the model exactly because every tensor not in a
//! checkpoint is initialised deterministically from `(seed, name)`.

pub mod captioner;
pub mod clip;
pub mod config;
pub mod connector;
pub mod conv;
pub mod fused;
pub mod hf;
pub mod kernels;
pub mod linear;
pub mod lm;
pub mod lora_linear;
pub mod ops;
pub mod params;
pub mod qformer;
pub mod quant;
pub mod vit;
pub mod vmath;

use std::path::PathBuf;

pub use captioner::{prompt_tensor, Captioner, Inputs, ParamCounts, TeacherForcing, TrainableVar};
pub use config::{
    Activation, Backbone, Fusion, LmConfig, LmLayout, ModelConfig, PeftConfig, PeftMethod, Phase,
    QFormerLayout, RopeScaling, VisionConfig, VisionPolicy, VitLayout, VitStem,
};
pub use lm::LmState;
pub use params::Component;

/// Errors of model construction, checkpoints and forward passes.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model configuration: {}", problems.join("; "))]
    Config { problems: Vec<String> },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("bad model input: {0}")]
    Input(String),
    #[error("checkpoint {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("checkpoint {path}: tensor {name} is not a {what} tensor of this model")]
    UnknownTensor {
        path: PathBuf,
        name: String,
        what: &'static str,
    },
    #[error("checkpoint {path}: {count} base tensors missing, e.g. {example}")]
    MissingTensors {
        path: PathBuf,
        count: usize,
        example: String,
    },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// Boxed: its variants carry paths and shapes, and `ModelError` travels in every `Result`.
    #[error(transparent)]
    Hf(Box<hf::HfError>),
}

impl From<hf::HfError> for ModelError {
    fn from(e: hf::HfError) -> Self {
        ModelError::Hf(Box::new(e))
    }
}
