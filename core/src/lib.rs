//! gantry's I/O-free core: the job spec users write (and its validation), and the placement
//! function the coordinator applies.
//!
//! This crate must never do I/O, spawn tasks or read the clock: time and state come in as data
//! (see [`scheduler::Snapshot`]), so every decision is reproducible in a test.

pub mod error;
pub mod scheduler;
pub mod sim;
pub mod spec;

pub use error::ParseError;
pub use spec::{
    DatasetKind, DatasetSpec, JobSpec, ModelKind, ModelSpec, PullPolicy, Resources, ServeSpec, SpecError, TrainSpec,
};
