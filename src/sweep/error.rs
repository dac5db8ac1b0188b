//! What can stop a sweep, typed so that the command line decides its exit
//! code from the kind alone (see [`SweepError::is_bad_input`]).

use crate::cache::CacheError;
use crate::exec::ExecError;
use crate::plan::PlanError;
use crate::spec::SpecError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// Options that contradict each other or are out of range.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The data set: missing, unreadable, or a split a stage needs is absent.
    #[error("{0}")]
    Data(String),
    #[error("generating the synthetic data set: {0}")]
    Synth(#[from] crate::data::synth::SynthError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Some stages failed (their reasons were printed with the summary).
    #[error("{failed} stage(s) failed")]
    Failed { failed: usize },
    /// Stopped by Ctrl-C, SIGTERM or SIGHUP.
    #[error("interrupted; run the same command again to resume")]
    Interrupted,
}

impl SweepError {
    /// Found in what the user gave, before anything ran (the README's exit
    /// code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SweepError::Usage(_) | SweepError::Spec(_) | SweepError::Data(_)
        )
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SweepError {
        let what = what.into();
        move |source| SweepError::Io { what, source }
    }
}
