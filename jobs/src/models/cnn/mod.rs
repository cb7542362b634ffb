//! The "cnn" model: 3x3 convolutions, each followed by ReLU and 2x2 max pooling, then a linear
//! layer over the classes. By default two blocks of 16 then 32 channels on the 8x8 digits:
//! 1x8x8 -> 16x4x4 -> 32x2x2 -> 10; sized by the spec's `channels`, on any image the data set
//! gives (`InputShape::image`).

use std::path::Path;

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Tensor, TensorData, backend::Backend};

mod conv_block;
mod kernels;

pub(crate) use conv_block::ConvBlockOps;

use super::{Arch, Net, Weights, expect_shape, linear, record_mismatch};
use crate::error::JobsError;
use crate::export;
use crate::input::Input;
use crate::rng::SplitMix64;

const INIT_STREAM: u64 = u64::MAX - 1;

#[derive(Module, Debug)]
pub(crate) struct Cnn<B: Backend> {
    /// Named `conv1`, `conv2`, ... outside gantry.
    convs: Vec<Conv2d<B>>,
    fc: Linear<B>,
    /// The input's sides (constants: not weights, and not in the record's tensors).
    height: usize,
    width: usize,
}

/// The sizes of a CNN for `arch`: its input [channels, height, width], each block's output
/// channels, and the features the last block leaves for the linear layer.
struct Dims {
    image: [usize; 3],
    channels: Vec<usize>,
    flat: usize,
}

impl Dims {
    fn of(arch: &Arch) -> Dims {
        // The spec's checks made sure the data set is images whose sides halve this often.
        let image = arch.input.image.expect("the cnn reads images");
        let channels: Vec<usize> = arch.model.channels().into_iter().map(|c| c as usize).collect();
        let k = channels.len();
        let flat = channels[k - 1] * (image[1] >> k) * (image[2] >> k);
        Dims { image, channels, flat }
    }

    /// Each block's (input, output) channels.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        std::iter::once(self.image[0]).chain(self.channels.iter().copied()).zip(self.channels.iter().copied())
    }
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
    fn init(arch: &Arch, seed: u64, device: &B::Device) -> Self {
        let dims = Dims::of(arch);
        let mut rng = SplitMix64::for_stream(seed, INIT_STREAM);
        // Ids 11, 12 for the first block's weight and bias, 13, 14 for the next, ... then the
        // linear layer's.
        let convs: Vec<Conv2d<B>> = dims
            .blocks()
            .enumerate()
            .map(|(i, (c_in, c_out))| conv(&mut rng, [11 + 2 * i as u64, 12 + 2 * i as u64], c_in, c_out, device))
            .collect();
        let k = convs.len() as u64;
        let fc = linear(&mut rng, [11 + 2 * k, 12 + 2 * k], dims.flat, arch.input.classes, device);
        Cnn { convs, fc, height: dims.image[1], width: dims.image[2] }
    }

    fn forward(&self, x: Input<B>) -> Tensor<B, 2> {
        let x = x.pixels();
        let [batch, _] = x.dims();
        let c_in = self.convs[0].weight.dims()[1];
        let x = x.reshape([batch, c_in, self.height, self.width]);
        let x = self.convs.iter().fold(x, |x, layer| block(layer, x));
        let flat = self.fc.weight.dims()[0];
        self.fc.forward(x.reshape([batch, flat]))
    }

    fn param_ids(&self) -> Vec<ParamId> {
        let mut ids: Vec<ParamId> = self.convs.iter().map(|c| c.weight.id).collect();
        ids.push(self.fc.weight.id);
        ids.extend(self.convs.iter().filter_map(|c| c.bias.as_ref()).map(|b| b.id));
        ids.extend(self.fc.bias.as_ref().map(|b| b.id));
        ids
    }

    fn backbone(&self) -> Vec<(ParamId, usize)> {
        let mut ids: Vec<(ParamId, usize)> = self.convs.iter().map(|c| (c.weight.id, 4)).collect();
        ids.extend(self.convs.iter().filter_map(|c| c.bias.as_ref()).map(|b| (b.id, 1)));
        ids
    }

    fn with_head_of(self, other: Self) -> Self {
        Cnn { fc: other.fc, ..self }
    }

    /// PyTorch's layout: conv weights are [out, in, kh, kw] in both; linear weights transpose.
    fn export(&self) -> Vec<export::Named> {
        let mut out = Vec::new();
        for (i, layer) in self.convs.iter().enumerate() {
            out.push(export::tensor(&format!("conv{}.weight", i + 1), layer.weight.val()));
            if let Some(bias) = &layer.bias {
                out.push(export::tensor(&format!("conv{}.bias", i + 1), bias.val()));
            }
        }
        out.push(export::tensor("fc.weight", self.fc.weight.val().transpose()));
        if let Some(bias) = &self.fc.bias {
            out.push(export::tensor("fc.bias", bias.val()));
        }
        out
    }

    fn import(mut self, weights: &mut Weights) -> Self {
        for (i, layer) in self.convs.iter_mut().enumerate() {
            let name = format!("conv{}", i + 1);
            layer.weight = weights.take(&format!("{name}.weight"), layer.weight.clone(), false);
            layer.bias = layer.bias.take().map(|b| weights.take(&format!("{name}.bias"), b, false));
        }
        self.fc.weight = weights.take("fc.weight", self.fc.weight.clone(), true);
        self.fc.bias = self.fc.bias.take().map(|b| weights.take("fc.bias", b, false));
        self
    }

    fn check_record(record: &CnnRecord<B>, arch: &Arch, path: &Path) -> Result<(), JobsError> {
        let dims = Dims::of(arch);
        if record.convs.len() != dims.channels.len() {
            let reason = format!("it has {} conv blocks, this model {}", record.convs.len(), dims.channels.len());
            return Err(record_mismatch(path, reason));
        }
        for (i, ((c_in, c_out), layer)) in dims.blocks().zip(&record.convs).enumerate() {
            expect_shape(path, &format!("conv{}.weight", i + 1), &layer.weight.val().dims(), &[c_out, c_in, 3, 3])?;
        }
        expect_shape(path, "fc.weight", &record.fc.weight.val().dims(), &[dims.flat, arch.input.classes])
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::module::Module;

    use gantry_core::spec::{ModelKind, ModelSpec};

    use super::*;
    use crate::input::{CLASSES, InputShape};

    const C1: usize = 16;
    const FLAT: usize = 32 * 2 * 2;

    fn arch() -> Arch {
        Arch::digits(ModelSpec::of(ModelKind::Cnn))
    }

    #[test]
    fn records_of_other_shapes_are_refused_and_init_follows_the_seed() {
        let device = Default::default();
        let model = Cnn::<NdArray>::init(&arch(), 3, &device);
        assert_eq!(model.forward(Input::Pixels(Tensor::zeros([5, 64], &device))).dims(), [5, CLASSES]);
        let same = Cnn::<NdArray>::init(&arch(), 3, &device);
        assert_eq!(model.convs[1].weight.val().into_data(), same.convs[1].weight.val().into_data());
        let path = Path::new("model.mpk");
        assert!(Cnn::<NdArray>::check_record(&model.into_record(), &arch(), path).is_ok());
        let mut other = Cnn::<NdArray>::init(&arch(), 3, &device);
        other.fc = burn::nn::LinearConfig::new(FLAT, 5).init(&device);
        other.height = 8;
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

    /// A sized CNN on colour images that are not square: three blocks take 3x16x24 to
    /// 8x2x3, and its weights round-trip through SafeTensors.
    #[test]
    fn a_sized_cnn_reads_colour_images_of_any_even_sides() {
        let device = Default::default();
        let spec = ModelSpec { channels: Some(vec![4, 6, 8]), ..ModelSpec::of(ModelKind::Cnn) };
        let mut input = InputShape::numbers(3 * 16 * 24, 5);
        input.image = Some([3, 16, 24]);
        let arch = Arch { model: spec, input };
        let model = Cnn::<NdArray>::init(&arch, 1, &device);
        let x = Tensor::<NdArray, 2>::from_data(
            TensorData::new((0..2 * 3 * 16 * 24).map(|i| (i % 7) as f32 / 7.0).collect::<Vec<_>>(), [2, 3 * 16 * 24]),
            &device,
        );
        let logits = model.forward(Input::Pixels(x.clone()));
        assert_eq!(logits.dims(), [2, 5]);
        assert_eq!(model.fc.weight.dims(), [8 * 2 * 3, 5]);
        let bytes = crate::export::safetensors(&model.export(), &Default::default());
        let mut weights = Weights::parse(Path::new("c.safetensors"), &bytes).unwrap();
        let copy = Cnn::<NdArray>::init(&arch, 2, &device).import(&mut weights);
        weights.finish().unwrap();
        assert_eq!(copy.forward(Input::Pixels(x)).into_data(), logits.into_data());
        assert!(Cnn::<NdArray>::check_record(&model.into_record(), &arch, Path::new("m")).is_ok());
    }
}
