//! Reports: the last step of the pipeline, reading only the store (and the
//! data set for gallery thumbnails). [`data`] builds one model of a sweep
//! from SQLite; [`terminal`] prints it as comfy-tables (`ecic sweep`,
//! `ecic status`, `ecic compare`); the HTML report (`ecic report`) adds
//! plotters charts whose text, Chinese included, is drawn with a bundled
//! CJK font.

mod backend;
pub mod cmd;
pub mod data;
pub mod font;
pub mod stats;
pub mod terminal;

use std::path::PathBuf;

/// Errors of building a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("font {name}: {message}")]
    Font { name: String, message: String },
    #[error("cell `{cell}` is not in sweep `{sweep}`{hint}")]
    NoCell { cell: String, sweep: String, hint: String },
    #[error("cell `{cell}` has no per-image scores on the {split} split (its evaluate stage did not record them)")]
    NoScores { cell: String, split: String },
    #[error("cell `{cell}`: bad per-image score record for image {image}: {message}")]
    BadScores { cell: String, image: String, message: String },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// Attach a path to an I/O error.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ReportError {
    let path = path.into();
    move |source| ReportError::Io { path, source }
}
