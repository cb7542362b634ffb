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

/// What the kernels' tests share: random inputs, and comparing the kernels with burn's ops.
#[cfg(test)]
pub(crate) mod testing {
    use burn::backend::Autodiff;
    use burn::backend::ndarray::NdArrayDevice;
    use burn::tensor::{Tensor, TensorData};

    use super::Cpu;
    use crate::rng::SplitMix64;

    /// A tensor of values from [-1, 1), on the CPU backend with autodiff.
    pub(crate) fn random<const D: usize>(rng: &mut SplitMix64, dims: [usize; D]) -> Tensor<Autodiff<Cpu>, D> {
        let values: Vec<f32> = (0..dims.iter().product()).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        Tensor::from_data(TensorData::new(values, dims), &NdArrayDevice::Cpu)
    }

    /// Panics unless the kernels' `a` is within `tolerance` of the composed ops' `b` everywhere,
    /// relative to 1 + |b|.
    pub(crate) fn assert_close<const D: usize>(what: &str, a: Tensor<Cpu, D>, b: Tensor<Cpu, D>, tolerance: f32) {
        let (a, b) = (a.into_data().into_vec::<f32>().unwrap(), b.into_data().into_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tolerance * (1.0 + y.abs()), "{what}[{i}]: kernels {x}, composed {y}");
        }
    }
}
