//! The data sets the runtime trains on, one file each, and what the training loop needs of any
//! of them ([`Examples`]), with the order it visits them in. Data sets give model input only
//! through [`crate::input`]: nothing here depends on a model.

mod digits;
mod genesis;

use burn::tensor::{Int, Tensor, backend::Backend};

pub(crate) use digits::{Samples, digits};
pub(crate) use genesis::genesis;

use crate::input::Input;
use crate::rng::SplitMix64;

/// What the training loop needs of a data set, whichever it is: numbered examples, and the
/// tensors of any of them (inputs and the targets the loss compares the logits with).
pub(crate) trait Examples {
    fn len(&self) -> usize;

    /// The inputs of `indices`, and one target per row of the logits the model gives for them.
    fn batch<B: Backend>(&self, indices: &[usize], device: &B::Device) -> (Input<B>, Tensor<B, 1, Int>);
}

/// The training order of one epoch: a permutation determined by (seed, epoch) alone, so a run
/// resumed in the middle of an epoch replays exactly the batches it would have seen.
pub(crate) fn epoch_order(seed: u64, epoch: u32, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::for_stream(seed, u64::from(epoch)).shuffle(&mut order);
    order
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

    #[test]
    fn batches_keep_the_remainder() {
        assert_eq!(batches_per_epoch(1437, 64), 23);
        assert_eq!(batches_per_epoch(128, 64), 2);
    }
}
