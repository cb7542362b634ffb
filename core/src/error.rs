//! The error of the core's parsers: the texts gantry reads besides a whole spec (durations,
//! checkpoint references, model and dataset names, job traces). A spec's validation answers
//! with [`SpecError`](crate::SpecError) instead, which names the field at fault.

use crate::spec::{DatasetKind, ModelKind};

/// A text that is not what it should be; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A duration with nothing in it.
    #[error("empty duration")]
    EmptyDuration,

    /// A duration that is not numbers each followed by a unit.
    #[error("`{0}` is not a duration (use e.g. 90s, 30m, 2h, 1h30m)")]
    NotADuration(String),

    /// A duration whose last number has no unit.
    #[error("`{0}` needs a unit (s, m, h or d)")]
    DurationWithoutUnit(String),

    /// A duration of zero seconds: a timeout or limit that would fire at once.
    #[error("must be longer than zero")]
    ZeroDuration,

    /// A checkpoint reference `JOB_ID@STEP` whose step is not a number.
    #[error("`{0}` is not a step number (use JOB_ID@STEP)")]
    CheckpointStep(String),

    /// A checkpoint reference without a job id.
    #[error("must name a job id (JOB_ID or JOB_ID@STEP)")]
    CheckpointJob,

    /// A model name the training runtime does not know.
    #[error("unknown model `{0}`, expected one of: {names}", names = ModelKind::names())]
    UnknownModel(String),

    /// A dataset name the training runtime does not know.
    #[error("unknown dataset `{0}`, expected one of: {names}", names = DatasetKind::names())]
    UnknownDataset(String),

    /// A job trace without even a header line.
    #[error("empty trace")]
    EmptyTrace,

    /// A trace header without a column the simulator needs (named by its first spelling).
    #[error("trace header lacks `{0}`")]
    TraceColumn(&'static str),

    /// A trace row with fewer fields than the columns read from it. Rows count from 1, the
    /// header's being 1.
    #[error("row {row}: too few columns")]
    TraceRowShort { row: usize },

    /// A trace field that should be a number.
    #[error("row {row}: `{value}` is not a number")]
    TraceNumber { row: usize, value: String },

    /// A trace `submit_time` that is neither seconds nor a `YYYY-MM-DD HH:MM:SS` from 2000 on.
    #[error("row {row}: bad submit_time")]
    TraceSubmitTime { row: usize },
}
