//! A step's gradients across data-parallel ranks: flattened in the model's parameter order
//! (the same on every rank), summed around the ring, and put back.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::dist::Ring;
use crate::error::JobsError;

/// Replaces `grads` by the sum over ranks of each rank's `grads` times its `share` (its part of
/// the global batch, so the sum is the global batch's mean gradient). `extra` rides along in the
/// same exchange and is summed too (the loss, the stop votes). A parameter without a gradient
/// here (this rank's shard was empty) counts as zeros.
pub(crate) fn all_reduce<B: AutodiffBackend, M: AutodiffModule<B>>(
    ring: &mut Ring,
    model: &M,
    grads: &mut GradientsParams,
    share: f32,
    extra: &mut [f32],
) -> Result<(), JobsError> {
    let mut flat = Flatten::<B> { grads, share, values: Vec::new(), _backend: Default::default() };
    model.visit(&mut flat);
    let mut values = flat.values;
    let n = values.len();
    values.extend_from_slice(extra);
    ring.all_reduce_sum(&mut values)?;
    extra.copy_from_slice(&values[n..]);
    model.visit(&mut Restore::<B> { grads, values: &values[..n], at: 0, _backend: Default::default() });
    Ok(())
}

struct Flatten<'a, B> {
    grads: &'a mut GradientsParams,
    share: f32,
    values: Vec<f32>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.grads.remove::<B::InnerBackend, D>(param.id) {
            Some(grad) => {
                let data = grad.into_data().convert::<f32>();
                let values = data.as_slice::<f32>().expect("converted to f32");
                self.values.extend(values.iter().map(|v| v * self.share));
            }
            None => self.values.extend(std::iter::repeat_n(0.0, param.val().shape().num_elements())),
        }
    }
}

struct Restore<'a, B> {
    grads: &'a mut GradientsParams,
    values: &'a [f32],
    at: usize,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Restore<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.shape();
        let n = shape.num_elements();
        let data = TensorData::new(self.values[self.at..self.at + n].to_vec(), shape);
        self.at += n;
        let grad = Tensor::<B::InnerBackend, D>::from_data(data, &value.device());
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}
