//! The models the runtime trains, one file each, and what the training loop needs of any of
//! them ([`Net`]). Models know their input only through [`crate::input`]: nothing here depends
//! on a data set.

mod buffers;
mod cnn;
mod cpu;
mod matmul;
mod mlp;
mod transformer;

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use gantry_core::spec::ModelSpec;

pub(crate) use cnn::{Cnn, ConvBlockOps};
pub(crate) use mlp::Mlp;
pub(crate) use transformer::{EncoderLayerOps, Transformer};

use crate::error::JobsError;
use crate::export;
pub(crate) use crate::import::Weights;
use crate::input::{Input, InputShape};
use crate::rng::SplitMix64;

/// Backends every model runs on: burn's ops, with hand-written kernels where a backend has
/// them (the CPU's).
pub(crate) trait ModelOps: ConvBlockOps + EncoderLayerOps {}
impl<B: ConvBlockOps + EncoderLayerOps> ModelOps for B {}

/// What a model is built as: its kind and sizes from the spec, its input and output from the
/// data set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Arch {
    pub(crate) model: ModelSpec,
    pub(crate) input: InputShape,
}

impl Arch {
    /// `model` on the digits.
    #[cfg(test)]
    pub(crate) fn digits(model: ModelSpec) -> Arch {
        Arch { model, input: InputShape::digits() }
    }
}

/// What the training loop needs of a model, whichever it is.
pub(crate) trait Net<B: Backend>: Module<B> + Sized {
    /// Weights drawn from our own seeded generator (PyTorch's default ranges), so a seed gives
    /// the same model whatever else runs in the process.
    fn init(arch: &Arch, seed: u64, device: &B::Device) -> Self;

    /// Logits, one row per prediction: [batch, 10] for the digits, [batch * context, vocab]
    /// for the language model.
    fn forward(&self, x: Input<B>) -> Tensor<B, 2>;

    /// The ids the optimizer state is keyed by.
    fn param_ids(&self) -> Vec<ParamId>;

    /// The parameters below the output layer, what `freeze_backbone` keeps: id and rank.
    fn backbone(&self) -> Vec<(ParamId, usize)>;

    /// This model with `other`'s output layer: a backbone from one task, a fresh head for another.
    fn with_head_of(self, other: Self) -> Self;

    /// The weights as PyTorch names and lays them out, for SafeTensors.
    fn export(&self) -> Vec<export::Named>;

    /// This model with every weight taken from `weights`, named and laid out as [`Net::export`]
    /// writes them (the mirror of it). Names missing or of another shape are noted in
    /// `weights`, which says what did not match once the whole model was visited.
    fn import(self, weights: &mut Weights) -> Self;

    /// Checks a record loaded from `path` has `arch`'s shapes: burn's `load_record` does not,
    /// and a wrong shape would only surface later as a panic inside a matmul.
    fn check_record(record: &<Self as Module<B>>::Record, arch: &Arch, path: &Path) -> Result<(), JobsError>;
}

/// A record check's verdict on one tensor.
fn expect_shape(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Result<(), JobsError> {
    match got == want {
        true => Ok(()),
        false => Err(record_mismatch(path, format!("{name} has shape {got:?}, expected {want:?}"))),
    }
}

/// The error of a record that does not fit the model, for `reason`.
fn record_mismatch(path: &Path, reason: String) -> JobsError {
    JobsError::CheckpointMismatch { path: path.to_path_buf(), reason }
}

/// Parameter ids are fixed rather than random so that two runs that reach the same weights
/// write byte-identical model records (and the optimizer state, keyed by these ids, matches).
fn linear<B: Backend>(rng: &mut SplitMix64, ids: [u64; 2], d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    let k = 1.0 / (d_in as f32).sqrt();
    let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * k).collect() };
    let weight = Tensor::<B, 2>::from_data(TensorData::new(uniform(d_in * d_out), [d_in, d_out]), device);
    let bias = Tensor::<B, 1>::from_data(TensorData::new(uniform(d_out), [d_out]), device);
    Linear {
        weight: Param::initialized(ParamId::from(ids[0]), weight.require_grad()),
        bias: Some(Param::initialized(ParamId::from(ids[1]), bias.require_grad())),
    }
}
