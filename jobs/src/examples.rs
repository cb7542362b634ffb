//! What the training loop needs of a data set, whichever it is: numbered examples, and the
//! tensors of any of them (inputs and the targets the loss compares the logits with).

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::model::Input;

pub(crate) trait Examples {
    fn len(&self) -> usize;

    /// The inputs of `indices`, and one target per row of the logits the model gives for them.
    fn batch<B: Backend>(&self, indices: &[usize], device: &B::Device) -> (Input<B>, Tensor<B, 1, Int>);
}
