//! (being written)
use super::{StageCtx, StageError, StageReport};
pub fn run(_ctx: &StageCtx) -> Result<StageReport, StageError> {
    Err(StageError::msg("evaluate: not available in this build yet"))
}
