//! What the hand-written CPU kernels share: the CPU backend, and moving values between its
//! tensors and plain slices.

use std::borrow::Cow;

use burn::backend::NdArray;
use burn::backend::ndarray::{NdArrayDevice, NdArrayTensor};
use burn::tensor::TensorData;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};

/// The CPU backend the kernels replace burn's ops in.
pub(crate) type Cpu = NdArray<f32>;

/// A CPU tensor's values, borrowed where they are laid out in order (as the models' are).
pub(crate) fn values(t: &FloatTensor<Cpu>) -> Cow<'_, [f32]> {
    let NdArrayTensor::F32(storage) = t else { panic!("the CPU backend computes in f32") };
    let view = storage.view();
    match view.to_slice() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(view.iter().copied().collect()),
    }
}

pub(crate) fn device_tensor(values: Vec<f32>, dims: &[usize]) -> FloatTensor<Cpu> {
    Cpu::float_from_data(TensorData::new(values, dims.to_vec()), &NdArrayDevice::Cpu)
}
