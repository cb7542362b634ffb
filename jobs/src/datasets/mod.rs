//! The data sets the runtime trains on, built in (`digits`, `genesis`) or read from the user's
//! files (`table`, `text`), one file each, and what the training loop needs of any of them
//! ([`Examples`]), with the order it visits them in. Data sets give model input only through
//! [`crate::input`]: nothing here depends on a model.

mod digits;
mod genesis;
mod images;
mod parquet;
mod table;
mod text;

use std::sync::OnceLock;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

pub(crate) use digits::{Samples, digits};
pub(crate) use genesis::genesis;
pub(crate) use images::Images;
pub use images::{ImageRates, image_folder_rates};
pub(crate) use table::{Table, TableSets};
pub(crate) use text::{Corpus, token};

use crate::error::JobsError;
use crate::input::Input;
use crate::rng::SplitMix64;

/// What the training loop needs of a data set, whichever it is: numbered examples, and the
/// tensors of any of them (inputs and the targets the loss compares the logits with). `Sync`:
/// the next batches are prepared on another thread while a step runs.
pub(crate) trait Examples: Sync {
    fn len(&self) -> usize;

    /// The data of `indices` in epoch `epoch` (augmentation differs by epoch), ready to become
    /// tensors: the part of making a batch that can run beside a step (gathering, augmenting).
    fn prepare(&self, indices: &[usize], epoch: u32) -> Prepared;

    /// The inputs of `indices`, and one target per row of the logits the model gives for them.
    fn batch<B: Backend>(&self, indices: &[usize], device: &B::Device) -> (Input<B>, Target<B>) {
        self.prepare(indices, 0).tensors(device)
    }
}

/// A batch's data before it is on a device.
pub(crate) struct Prepared {
    pub(crate) x: PreparedInput,
    /// One target per row of the logits.
    pub(crate) y: Targets,
}

/// What a batch's examples are to be predicted as.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Targets {
    /// A class (or next character) per row of the logits.
    Classes(Vec<i64>),
    /// A number per example: a table's `target`, standardised.
    Values(Vec<f32>),
}

impl Targets {
    pub(crate) fn len(&self) -> usize {
        match self {
            Targets::Classes(y) => y.len(),
            Targets::Values(y) => y.len(),
        }
    }
}

/// [`Targets`] on a device.
pub(crate) enum Target<B: Backend> {
    Classes(Tensor<B, 1, Int>),
    Values(Tensor<B, 1>),
}

#[cfg(test)]
impl<B: Backend> Target<B> {
    /// The classes, where a test knows its data set has classes.
    pub(crate) fn classes(self) -> Tensor<B, 1, Int> {
        match self {
            Target::Classes(y) => y,
            Target::Values(_) => unreachable!("numbers where classes were expected"),
        }
    }
}

impl<B: Backend> Clone for Target<B> {
    fn clone(&self) -> Self {
        match self {
            Target::Classes(y) => Target::Classes(y.clone()),
            Target::Values(y) => Target::Values(y.clone()),
        }
    }
}

pub(crate) enum PreparedInput {
    /// `rows` examples of `values.len() / rows` numbers each.
    Numbers { values: Vec<f32>, rows: usize },
    /// `rows` windows of `ids.len() / rows` tokens each.
    Tokens { ids: Vec<i64>, rows: usize },
}

impl Prepared {
    pub(crate) fn tensors<B: Backend>(self, device: &B::Device) -> (Input<B>, Target<B>) {
        let n = self.y.len();
        let x = match self.x {
            PreparedInput::Numbers { values, rows } => {
                let width = values.len() / rows.max(1);
                Input::Pixels(Tensor::from_data(TensorData::new(values, [rows, width]), device))
            }
            PreparedInput::Tokens { ids, rows } => {
                let context = ids.len() / rows.max(1);
                Input::Tokens(Tensor::from_data(TensorData::new(ids, [rows, context]), device))
            }
        };
        let y = match self.y {
            Targets::Classes(y) => Target::Classes(Tensor::from_data(TensorData::new(y, [n]), device)),
            Targets::Values(y) => Target::Values(Tensor::from_data(TensorData::new(y, [n]), device)),
        };
        (x, y)
    }
}

/// A line of an embedded data set that does not parse (a build problem, not a user one). Kept
/// apart from [`JobsError`], which cannot be cloned, because the data sets are parsed once per
/// process and every caller gets the failure.
#[derive(Debug, Clone, PartialEq)]
struct BadLine {
    /// 1-based, in the embedded file.
    line: usize,
    reason: String,
}

/// The data set in `cell`, parsed by `parse` on first use.
fn parsed_once<T>(
    cell: &'static OnceLock<Result<T, BadLine>>,
    parse: impl FnOnce() -> Result<T, BadLine>,
) -> Result<&'static T, JobsError> {
    cell.get_or_init(parse).as_ref().map_err(|bad| JobsError::Dataset { line: bad.line, reason: bad.reason.clone() })
}

/// The training order of one epoch: a permutation determined by (seed, epoch) alone, so a run
/// resumed in the middle of an epoch replays exactly the batches it would have seen.
pub(crate) fn epoch_order(seed: u64, epoch: u32, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, u64::from(epoch)).shuffle(&mut order);
    order
}

/// A held-out share of `n` examples of a user's file, drawn by the job's seed on `stream` (each
/// data set kind its own): (training, held-out) indices, or why `fraction` leaves one side empty.
/// `what` names the examples in that error ("rows", "images").
pub(crate) fn split_by_seed(
    n: usize,
    fraction: f64,
    seed: u64,
    stream: u64,
    what: &str,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let n_test = (n as f64 * fraction).round() as usize;
    if n_test == 0 || n_test == n {
        return Err(format!("{n} {what} cannot be split {fraction} held out with {what} on both sides"));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, stream).shuffle(&mut order);
    // The first `n_test` of the order are held out.
    let train = order.split_off(n_test);
    Ok((train, order))
}

/// Batches per epoch; the last, shorter batch is kept so every sample is seen each epoch.
pub(crate) fn batches_per_epoch(n: usize, batch_size: usize) -> usize {
    n.div_ceil(batch_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_depends_on_seed_and_epoch_only() {
        let a = epoch_order(42, 3, 100);
        assert_eq!(a, epoch_order(42, 3, 100));
        assert_ne!(a, epoch_order(42, 4, 100));
        assert_ne!(a, epoch_order(43, 3, 100));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    /// Genesis used to keep its failure as the error's text and wrap it again, as "dataset line
    /// 0: dataset line N: ...".
    #[test]
    fn a_data_set_that_does_not_parse_is_the_same_error_with_its_line_for_every_caller() {
        static BROKEN: OnceLock<Result<(), BadLine>> = OnceLock::new();
        for _ in 0..2 {
            let err = parsed_once(&BROKEN, || Err(BadLine { line: 7, reason: "not a number".into() })).unwrap_err();
            assert_eq!(err.to_string(), "dataset line 7: not a number");
        }
    }

    #[test]
    fn batches_keep_the_remainder() {
        assert_eq!(batches_per_epoch(1437, 64), 23);
        assert_eq!(batches_per_epoch(128, 64), 2);
    }
}
