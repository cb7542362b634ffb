//! The "cnn" model, on the same 8x8 images: two 3x3 convolutions (16 then 32 channels), each
//! followed by ReLU and 2x2 max pooling, then a linear layer: 1x8x8 -> 16x4x4 -> 32x2x2 -> 10.

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Tensor, TensorData, backend::Backend};

mod conv_block;
mod kernels;

pub(crate) use conv_block::ConvBlockOps;

use super::{Arch, Net, Weights, expect_shape, linear};
use crate::error::JobsError;
use crate::export;
use crate::input::{CLASSES, Input};
use crate::rng::SplitMix64;

const INIT_STREAM: u64 = u64::MAX - 1;
const C1: usize = 16;
const C2: usize = 32;
const FLAT: usize = C2 * 2 * 2;

#[derive(Module, Debug)]
pub(crate) struct Cnn<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    fc: Linear<B>,
}

fn conv<B: Backend>(rng: &mut SplitMix64, ids: [u64; 2], c_in: usize, c_out: usize, device: &B::Device) -> Conv2d<B> {
    let mut layer = Conv2dConfig::new([c_in, c_out], [3, 3]).with_padding(PaddingConfig2d::Same).init(device);
    // PyTorch's default range, from our own seeded generator.
    let k = 1.0 / ((c_in * 9) as f32).sqrt();
    let mut uniform = |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * k).collect() };
    let weight = Tensor::<B, 4>::from_data(TensorData::new(uniform(c_out * c_in * 9), [c_out, c_in, 3, 3]), device);
    let bias = Tensor::<B, 1>::from_data(TensorData::new(uniform(c_out), [c_out]), device);
    layer.weight = Param::initialized(ParamId::from(ids[0]), weight.require_grad());
    layer.bias = Some(Param::initialized(ParamId::from(ids[1]), bias.require_grad()));
    layer
}

fn block<B: ConvBlockOps>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let bias = match &layer.bias {
        Some(bias) => bias.val(),
        // In the input's dtype: bf16 in a bf16 run.
        None => Tensor::<B, 1>::zeros([layer.weight.dims()[0]], &x.device()).cast(x.dtype()),
    };
    B::conv_relu_pool(x, layer.weight.val(), bias)
}

impl<B: ConvBlockOps> Net<B> for Cnn<B> {
    /// The spec has no sizes for the CNN, and it reads the digits only (both checked there).
    fn init(_: &Arch, seed: u64, device: &B::Device) -> Self {
        let mut rng = SplitMix64::for_stream(seed, INIT_STREAM);
        Cnn {
            conv1: conv(&mut rng, [11, 12], 1, C1, device),
            conv2: conv(&mut rng, [13, 14], C1, C2, device),
            fc: linear(&mut rng, [15, 16], FLAT, CLASSES, device),
        }
    }

    fn forward(&self, x: Input<B>) -> Tensor<B, 2> {
        let x = x.pixels();
        let [batch, _] = x.dims();
        let x = x.reshape([batch, 1, 8, 8]);
        let x = block(&self.conv1, x);
        let x = block(&self.conv2, x);
        self.fc.forward(x.reshape([batch, FLAT]))
    }

    fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = vec![self.conv1.weight.id, self.conv2.weight.id, self.fc.weight.id];
        ids.extend([&self.conv1.bias, &self.conv2.bias].into_iter().flatten().map(|b| b.id));
        ids.extend(self.fc.bias.as_ref().map(|b| b.id));
        ids
    }

    fn backbone(&self) -> Vec<(ParamId, usize)> {
        let mut ids = vec![(self.conv1.weight.id, 4), (self.conv2.weight.id, 4)];
        ids.extend([&self.conv1.bias, &self.conv2.bias].into_iter().flatten().map(|b| (b.id, 1)));
        ids
    }

    fn with_head_of(self, other: Self) -> Self {
        Cnn { fc: other.fc, ..self }
    }

    /// PyTorch's layout: conv weights are [out, in, kh, kw] in both; linear weights transpose.
    fn export(&self) -> Vec<export::Named> {
        let mut out = Vec::new();
        for (name, layer) in [("conv1", &self.conv1), ("conv2", &self.conv2)] {
            out.push(export::tensor(&format!("{name}.weight"), layer.weight.val()));
            if let Some(bias) = &layer.bias {
                out.push(export::tensor(&format!("{name}.bias"), bias.val()));
            }
        }
        out.push(export::tensor("fc.weight", self.fc.weight.val().transpose()));
        if let Some(bias) = &self.fc.bias {
            out.push(export::tensor("fc.bias", bias.val()));
        }
        out
    }

    fn import(mut self, weights: &mut Weights) -> Self {
        for (name, layer) in [("conv1", &mut self.conv1), ("conv2", &mut self.conv2)] {
            layer.weight = weights.take(&format!("{name}.weight"), layer.weight.clone(), false);
            layer.bias = layer.bias.take().map(|b| weights.take(&format!("{name}.bias"), b, false));
        }
        self.fc.weight = weights.take("fc.weight", self.fc.weight.clone(), true);
        self.fc.bias = self.fc.bias.take().map(|b| weights.take("fc.bias", b, false));
        self
    }

    fn check_record(record: &CnnRecord<B>, _: &Arch, path: &Path) -> Result<(), JobsError> {
        expect_shape(path, "conv1.weight", &record.conv1.weight.val().dims(), &[C1, 1, 3, 3])?;
        expect_shape(path, "conv2.weight", &record.conv2.weight.val().dims(), &[C2, C1, 3, 3])?;
        expect_shape(path, "fc.weight", &record.fc.weight.val().dims(), &[FLAT, CLASSES])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::module::Module;

    use gantry_core::spec::{ModelKind, ModelSpec};

    use super::*;

    fn arch() -> Arch {
        Arch::digits(ModelSpec::of(ModelKind::Cnn))
    }

    #[test]
    fn records_of_other_shapes_are_refused_and_init_follows_the_seed() {
        let device = Default::default();
        let model = Cnn::<NdArray>::init(&arch(), 3, &device);
        assert_eq!(model.forward(Input::Pixels(Tensor::zeros([5, 64], &device))).dims(), [5, CLASSES]);
        let same = Cnn::<NdArray>::init(&arch(), 3, &device);
        assert_eq!(model.conv2.weight.val().into_data(), same.conv2.weight.val().into_data());
        let path = Path::new("model.mpk");
        assert!(Cnn::<NdArray>::check_record(&model.into_record(), &arch(), path).is_ok());
        let mut other = Cnn::<NdArray>::init(&arch(), 3, &device);
        other.fc = burn::nn::LinearConfig::new(FLAT, 5).init(&device);
        let err = Cnn::<NdArray>::check_record(&other.into_record(), &arch(), path).unwrap_err();
        assert!(err.to_string().contains("fc.weight has shape [128, 5]"), "{err}");
    }

    #[test]
    fn export_names_and_shapes_follow_pytorch() {
        let device = Default::default();
        let names: Vec<(String, Vec<usize>)> =
            Cnn::<NdArray>::init(&arch(), 1, &device).export().into_iter().map(|t| (t.name, t.shape)).collect();
        assert_eq!(names[0], ("conv1.weight".to_string(), vec![C1, 1, 3, 3]));
        assert_eq!(names[4], ("fc.weight".to_string(), vec![CLASSES, FLAT]));
    }
}
