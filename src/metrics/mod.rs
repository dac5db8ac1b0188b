//! Caption metrics: the last step of the pipeline, used by the `evaluate`
//! stage, by SCST rewards (CIDEr-D) in `train`, by reports (bootstrap) and by
//! `ecic eval`.
//!
//! The numbers are exactly pycocoevalcap 1.2's BLEU-1..4, ROUGE-L and CIDEr-D
//! on pre-tokenized strings (docs/metrics.md): [`tokenize`] cuts a caption, the
//! tokens joined by single spaces are the string pycocoevalcap would score.
//! The tests check every metric against fixtures that pycocoevalcap itself
//! wrote (`scripts/metric-fixtures.sh`).
//!
//! Flow: [`References::new`] tokenizes and interns the references once,
//! counts their n-grams and fixes the CIDEr-D document frequencies; scoring a
//! prediction set then yields an [`Evaluation`]: corpus [`Scores`] and one
//! [`ImageScore`] per image, which carries what [`bootstrap`] needs to
//! recompute corpus scores on a resample.

mod bleu;
pub mod bootstrap;
mod cider;
pub mod cmd;
mod corpus;
pub mod diversity;
pub mod jsonl;
mod ngram;
mod rouge;
mod scores;
mod tokenize;

pub use bleu::BleuCounts;
pub use cider::CiderD;
pub use corpus::{evaluate, References};
pub use scores::{Evaluation, ImageScore, Metric, Scores};
pub use tokenize::{is_py_space, tokenize, tokenize_into, Tokenize, UnknownTokenize};

/// Errors of scoring in memory (file errors live in [`jsonl`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("image {id}: listed twice")]
    DuplicateImage { id: String },
    #[error("image {id}: empty reference list")]
    EmptyReferences { id: String },
    #[error("image {id}: no prediction")]
    MissingPrediction { id: String },
    #[error("image {id}: prediction for an image without references")]
    UnknownImage { id: String },
    #[error("{predictions} predictions in order for {images} reference images")]
    Count { predictions: usize, images: usize },
    #[error("image index {index} out of range ({images} reference images)")]
    ImageIndex { index: usize, images: usize },
    #[error("no images to score")]
    NoImages,
    #[error("bootstrap needs at least one resample")]
    NoResamples,
    #[error("paired bootstrap needs the same images on both sides ({a} and {b} records)")]
    ImageSets { a: usize, b: usize },
    #[error("image {id}: scored for A but not for B")]
    NotInB { id: String },
}
