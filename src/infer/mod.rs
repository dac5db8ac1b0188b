//! After the sweep: a trained model out of the cache and into use.
//!
//! [`Predictor::load`] takes a MODEL as the command line names it ([`source`]): a recorded cell
//! (`SWEEP/CELL`, or `SWEEP:best` for the best valid CIDEr-D), a directory written by
//! `ecic export` ([`export`]), or a training stage's checkpoint directory (a cache entry with a
//! `lineage.json`). It builds the model for decoding, and prepares every image exactly as the
//! preprocess stage prepares a scored split (the clean view: centre square, box-filter resize,
//! the same normalisation; [`images`]), so that captioning the valid split's images through
//! `ecic predict` repeats the cell's evaluate stage caption for caption: same pixels, same
//! decoding settings (the evaluate stage's recorded parameters), same batches of
//! [`crate::stages::EVALUATE_BATCH`] images.
//!
//! [`export`] writes a model as a self-contained directory (LoRA folded into the base, f32
//! safetensors or Q8_0/Q4_0 GGUF) and loads it back; [`hf_llava`] adds the Hugging Face LLaVA
//! layout beside it for models that have one.
//!
//! The command-line faces are in [`cmd`] (`ecic predict`, `ecic export`); `ecic serve`
//! ([`crate::serve`]) holds one [`Predictor`] behind HTTP.
//!
//! Retrieval-augmented models (`model.retrieve`) and `rerank` decoding read the training split
//! beside the image; neither travels outside a sweep, and both are refused with that reason.

pub mod cmd;
pub mod export;
pub mod hf_llava;
pub mod images;
pub mod source;

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use crate::data::tokenizer::CaptionTokenizer;
use crate::decode::{DecodeConfig, DecodeError};
use crate::model::{Captioner, ModelError};

pub use images::ImageSpec;
pub use source::ModelRef;

/// Errors of loading a model for inference, exporting it, or captioning with it.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// MODEL names nothing usable; `reason` says what was looked for.
    #[error("model `{model}`: {reason}")]
    BadModel { model: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Stage(#[from] crate::stages::StageError),
    #[error("{path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error(transparent)]
    Muge(#[from] crate::data::muge::MugeError),
    #[error("decoding: {0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> InferError + '_ {
    move |source| InferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A model ready to caption: built for decoding, with its tokenizer, the image preparation
/// its preprocess stage used and the decoding its evaluate stage used.
pub struct Predictor {
    model: Captioner,
    tok: CaptionTokenizer,
    pub image: ImageSpec,
    /// The decoding the model's evaluate stage used (or greedy, for a bare checkpoint).
    pub decoding: DecodeConfig,
    /// The evaluate stage's seed (sampling methods draw from `seed + first row of the batch`).
    pub seed: u64,
    /// What was loaded, in words (printed by the commands, answered by `/healthz`).
    pub origin: String,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("origin", &self.origin)
            .field("image", &self.image)
            .field("decoding", &self.decoding)
            .finish_non_exhaustive()
    }
}

impl Predictor {
    /// Loads MODEL (see the module doc); `runs` is the runs directory whose store and cache
    /// hold recorded cells.
    pub fn load(model: &str, runs: &std::path::Path) -> Result<Predictor, InferError> {
        source::resolve(model, runs)?.into_predictor()
    }

    /// The model's configuration.
    pub fn config(&self) -> &crate::model::ModelConfig {
        self.model.config()
    }

    /// Captions of a batch of prepared images ([`ImageSpec::pixels`]), in order. `cfg` is
    /// checked against the model (its `max_len` is capped by what the model's positions
    /// allow).
    pub fn caption(
        &self,
        pixels: &[&[f32]],
        cfg: &DecodeConfig,
        seed: u64,
    ) -> Result<Vec<String>, InferError> {
        if pixels.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.image.size as usize;
        let per = 3 * s * s;
        let mut data = Vec::with_capacity(pixels.len() * per);
        for p in pixels {
            if p.len() != per {
                return Err(InferError::Unsupported(format!(
                    "an image of {} values where the model reads 3x{s}x{s}",
                    p.len()
                )));
            }
            data.extend_from_slice(p);
        }
        let images = Tensor::from_vec(data, (pixels.len(), 3, s, s), &Device::Cpu)?;
        let ids = crate::decode::generate(&self.model, &images, cfg, seed)?;
        Ok(ids.iter().map(|t| self.tok.decode(t)).collect())
    }
}
