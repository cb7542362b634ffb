//! The models the runtime trains, one file each, and what the training loop needs of any of
//! them ([`Net`]). Models know their input only through [`crate::input`]: nothing here depends
//! on a data set.

mod cnn;
mod mlp;
mod transformer;

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData, backend::Backend};

pub(crate) use cnn::{Cnn, ConvBlockOps};
pub(crate) use mlp::Mlp;
pub(crate) use transformer::Transformer;

use crate::error::JobsError;
use crate::export;
use crate::input::Input;
use crate::rng::SplitMix64;

/// What the training loop needs of a model, whichever it is.
pub(crate) trait Net<B: Backend>: Module<B> + Sized {
    /// Weights drawn from our own seeded generator (PyTorch's default ranges), so a seed gives
    /// the same model whatever else runs in the process.
    fn init(seed: u64, device: &B::Device) -> Self;

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

    /// Checks a record loaded from `path` has this model's shapes: burn's `load_record` does
    /// not, and a wrong shape would only surface later as a panic inside a matmul.
    fn check_record(record: &<Self as Module<B>>::Record, path: &Path) -> Result<(), JobsError>;
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
