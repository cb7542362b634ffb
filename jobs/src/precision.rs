//! bf16 mixed precision (`train.precision: bf16`) with f32 master weights: the weights, their
//! gradients and Adam's state stay f32; each step computes with a bf16 copy of the weights, so
//! the forward pass, the matrix products and the activations' gradients run in bf16, and the
//! logits go back to f32 for the loss. Unlike PyTorch's autocast, layer norms and softmax run
//! in bf16 too: burn's modules compute in their input's dtype.
//!
//! The copy is made with burn's differentiable cast: the gradient of each f32 weight flows back
//! through it, so the optimizer and checkpoints never see a bf16 tensor, and a checkpoint of a
//! bf16 run resumes under either precision.

use burn::module::{ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use gantry_core::spec::Precision;

use crate::device::Device;
use crate::input::Input;
use crate::models::Net;

/// What a run computes in, once the device has had its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compute {
    pub(crate) precision: Precision,
}

impl Compute {
    pub(crate) const F32: Compute = Compute { precision: Precision::F32 };

    /// `asked` on `device`, or f32 with a note saying why when the device cannot compute in
    /// bf16: the backend has no bf16 (the CPU's), or `no_bf16` says why the hardware has none
    /// (a GPU older than Ampere). `shown` is how the run names the device.
    pub(crate) fn choose<B: Backend>(
        asked: Precision,
        device: &B::Device,
        shown: Device,
        no_bf16: Option<&str>,
    ) -> (Compute, Option<String>) {
        if asked != Precision::Bf16 {
            return (Compute { precision: asked }, None);
        }
        let why = match no_bf16 {
            Some(why) => why.to_string(),
            None if !B::supports_dtype(device, DType::BF16) => format!("device {shown} has no bf16"),
            None => return (Compute { precision: asked }, None),
        };
        (Compute::F32, Some(format!("precision bf16 asked for, but {why}: training in f32")))
    }

    /// `model`'s logits for `x`, in f32, computed in this precision.
    pub(crate) fn forward<B: Backend, M: Net<B>>(self, model: &M, x: Input<B>) -> Tensor<B, 2> {
        match self.precision {
            Precision::F32 => model.forward(x),
            Precision::Bf16 => {
                let half = model.clone().map(&mut CastWeights(FloatDType::BF16));
                half.forward(x.cast(FloatDType::BF16)).cast(FloatDType::F32)
            }
        }
    }
}

/// Maps a module's float weights to a dtype. Under autodiff the cast is recorded, so the copy's
/// gradients reach the original weights.
struct CastWeights(FloatDType);

impl<B: Backend> ModuleMapper<B> for CastWeights {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.cast(self.0), mapper)
    }
}

impl<B: Backend> Input<B> {
    /// Pixels in `dtype`; token ids are integers and stay as they are.
    fn cast(self, dtype: FloatDType) -> Self {
        match self {
            Input::Pixels(x) => Input::Pixels(x.cast(dtype)),
            tokens => tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::ndarray::NdArrayDevice;
    use burn::backend::{Autodiff, NdArray};
    use burn::module::{AutodiffModule, Module, ModuleVisitor};
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer};
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::bf16;
    use burn_flex::{Flex, FlexDevice};

    use super::*;
    use crate::datasets::{self, Examples};
    use gantry_core::spec::{ModelKind, ModelSpec};

    use crate::input::InputShape;
    use crate::models::{Arch, Cnn, Mlp, Transformer};

    /// A backend that computes in bf16 on the CPU.
    type Train = Autodiff<Flex>;
    const BF16: Compute = Compute { precision: Precision::Bf16 };

    #[test]
    fn bf16_is_used_where_the_backend_has_it_and_refused_with_a_reason_where_not() {
        assert_eq!(Compute::choose::<Train>(Precision::Bf16, &FlexDevice, Device::Cpu, None), (BF16, None));
        let cpu = NdArrayDevice::Cpu;
        let (compute, note) = Compute::choose::<Autodiff<NdArray<f32>>>(Precision::Bf16, &cpu, Device::Cpu, None);
        assert_eq!(compute, Compute::F32);
        assert_eq!(note.unwrap(), "precision bf16 asked for, but device cpu has no bf16: training in f32");
        assert_eq!(Compute::choose::<Train>(Precision::F32, &FlexDevice, Device::Cpu, None), (Compute::F32, None));
        // The hardware's word wins over the backend's (cubecl says bf16 on every GPU).
        let (compute, note) = Compute::choose::<Train>(Precision::Bf16, &FlexDevice, Device::Cpu, Some("it is old"));
        assert_eq!(compute, Compute::F32);
        assert_eq!(note.unwrap(), "precision bf16 asked for, but it is old: training in f32");
    }

    /// Every float weight's value (or gradient) with its dtype, in visiting order.
    struct Weights<'a> {
        grads: Option<&'a <Train as AutodiffBackend>::Gradients>,
        found: Vec<(DType, Vec<f32>)>,
    }

    impl ModuleVisitor<Train> for Weights<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Train, D>>) {
            let data = match self.grads {
                Some(grads) => param.val().grad(grads).expect("every weight has a gradient").into_data(),
                None => param.val().into_data(),
            };
            let dtype = data.dtype;
            self.found.push((dtype, data.convert::<f32>().to_vec().unwrap()));
        }
    }

    fn weights<M: Module<Train>>(
        model: &M,
        grads: Option<&<Train as AutodiffBackend>::Gradients>,
    ) -> Vec<(DType, Vec<f32>)> {
        let mut visitor = Weights { grads, found: Vec::new() };
        model.visit(&mut visitor);
        visitor.found
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
    }

    /// One step of `M` in bf16 against the same step in f32, from the same weights.
    fn one_step<M: Net<Train> + AutodiffModule<Train>>(kind: ModelKind, examples: &impl Examples, n: usize) {
        let input = match kind {
            ModelKind::Transformer => InputShape::text(),
            ModelKind::Mlp | ModelKind::Cnn => InputShape::digits(),
        };
        let model = M::init(&Arch { model: ModelSpec::of(kind), input }, 7, &FlexDevice);
        let indices: Vec<usize> = (0..n).collect();
        let (x, y) = examples.batch::<Train>(&indices, &FlexDevice);
        let y = y.classes();
        let loss_fn = CrossEntropyLossConfig::new().init::<Train>(&FlexDevice);

        let reference = Compute::F32.forward(&model, x.clone());
        let logits = BF16.forward(&model, x);
        assert_eq!(logits.dtype(), DType::F32, "the loss gets f32 logits");
        let [got, want] = [&logits, &reference].map(|t| t.to_data().to_vec::<f32>().unwrap());
        // The output layer computed in bf16: every logit is a bf16 value, which the f32 ones
        // are not, and they are close to the f32 model's (bf16 keeps 8 significant bits).
        assert!(got.iter().all(|v| bf16::from_f32(*v).to_f32() == *v), "logits not computed in bf16");
        assert!(want.iter().any(|v| bf16::from_f32(*v).to_f32() != *v));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(worst <= 0.05 * scale.max(1.0), "bf16 logits {worst} away from f32 ones (scale {scale})");

        let grads = loss_fn.forward(logits, y.clone()).backward();
        let reference_grads = loss_fn.forward(reference, y).backward();
        let (half, full) = (weights(&model, Some(&grads)), weights(&model, Some(&reference_grads)));
        let largest = full.iter().map(|(_, r)| norm(r)).fold(0.0, f64::max);
        for (i, ((dtype, g), (_, r))) in half.iter().zip(&full).enumerate() {
            // The gradient reaches the f32 weight through the cast, as f32.
            assert_eq!(*dtype, DType::F32, "gradient {i}");
            println!("gradient {i}: norm {:.3e} (f32 {:.3e}), cosine {:.4}", norm(g), norm(r), cosine(g, r));
            if norm(r) < 1e-4 * largest {
                // Zero but for rounding (attention's key bias: softmax ignores a constant added
                // to every score): no direction to compare, only that it stays as small.
                assert!(norm(g) < 1e-2 * largest, "gradient {i}: {} where f32's is {}", norm(g), norm(r));
                continue;
            }
            let similarity = cosine(g, r);
            assert!(similarity > 0.99, "gradient {i} points elsewhere than f32's: cosine {similarity}");
        }

        let before = weights(&model, None);
        let mut optim = AdamConfig::new().init::<Train, M>();
        let grads = GradientsParams::from_grads(grads, &model);
        let model = optim.step(1e-3, model, grads);
        let after = weights(&model, None);
        assert!(after.iter().all(|(dtype, _)| *dtype == DType::F32), "the weights stay f32");
        assert!(after.iter().zip(&before).all(|((_, a), (_, b))| a != b), "every weight tensor was updated");
    }

    #[test]
    fn a_bf16_step_of_the_mlp_computes_in_bf16_and_updates_f32_weights() {
        one_step::<Mlp<Train>>(ModelKind::Mlp, &datasets::digits().unwrap().train, 64);
    }

    #[test]
    fn a_bf16_step_of_the_cnn_computes_in_bf16_and_updates_f32_weights() {
        one_step::<Cnn<Train>>(ModelKind::Cnn, &datasets::digits().unwrap().train, 64);
    }

    #[test]
    fn a_bf16_step_of_the_transformer_computes_in_bf16_and_updates_f32_weights() {
        one_step::<Transformer<Train>>(ModelKind::Transformer, &datasets::genesis().unwrap().windows(64).0, 8);
    }
}
