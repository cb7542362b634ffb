//! The "mlp" model: input -> hidden layers, each followed by ReLU -> classes. By default
//! 64 -> 128 -> ReLU -> 10, on the digits.

use std::path::Path;

use burn::module::{Module, ParamId};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, backend::Backend};

use super::{Arch, Net, Weights, expect_shape, linear, record_mismatch};
use crate::error::JobsError;
use crate::export;
use crate::input::Input;
use crate::rng::SplitMix64;

/// The init stream of a seed; data-order streams use the epoch number, so they never collide.
const INIT_STREAM: u64 = u64::MAX;

#[derive(Module, Debug)]
pub(crate) struct Mlp<B: Backend> {
    /// Hidden layers then the output layer, named `fc1`, `fc2`, ... outside gantry.
    layers: Vec<Linear<B>>,
}

/// The widths from input to output: `[in, hidden..., classes]`.
fn widths(arch: &Arch) -> Vec<usize> {
    let mut w = vec![arch.input.width];
    w.extend(arch.model.hidden().into_iter().map(|h| h as usize));
    w.push(arch.input.classes);
    w
}

impl<B: Backend> Net<B> for Mlp<B> {
    fn init(arch: &Arch, seed: u64, device: &B::Device) -> Self {
        let mut rng = SplitMix64::for_stream(seed, INIT_STREAM);
        let widths = widths(arch);
        let layers = widths
            .windows(2)
            .enumerate()
            // Ids 1, 2 for the first layer's weight and bias, 3, 4 for the next, ...
            .map(|(i, w)| linear(&mut rng, [2 * i as u64 + 1, 2 * i as u64 + 2], w[0], w[1], device))
            .collect();
        Mlp { layers }
    }

    fn forward(&self, x: Input<B>) -> Tensor<B, 2> {
        let (last, hidden) = self.layers.split_last().expect("an MLP has an output layer");
        let h = hidden.iter().fold(x.pixels(), |h, layer| relu(layer.forward(h)));
        last.forward(h)
    }

    fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = Vec::with_capacity(2 * self.layers.len());
        for layer in &self.layers {
            ids.push(layer.weight.id);
            ids.extend(layer.bias.as_ref().map(|b| b.id));
        }
        ids
    }

    fn backbone(&self) -> Vec<(ParamId, usize)> {
        let mut ids = Vec::new();
        for layer in &self.layers[..self.layers.len() - 1] {
            ids.push((layer.weight.id, 2));
            ids.extend(layer.bias.as_ref().map(|b| (b.id, 1)));
        }
        ids
    }

    fn with_head_of(mut self, mut other: Self) -> Self {
        let head = other.layers.pop().expect("an MLP has an output layer");
        *self.layers.last_mut().expect("an MLP has an output layer") = head;
        self
    }

    /// `nn.Linear` keeps `weight` as [out, in]; burn keeps [in, out]. So a
    /// `torch.nn.Sequential(Linear(64, 128), ReLU(), Linear(128, 10))` with these keys renamed
    /// loads them as they are.
    fn export(&self) -> Vec<export::Named> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            out.push(export::tensor(&format!("fc{}.weight", i + 1), layer.weight.val().transpose()));
            if let Some(bias) = &layer.bias {
                out.push(export::tensor(&format!("fc{}.bias", i + 1), bias.val()));
            }
        }
        out
    }

    fn import(mut self, weights: &mut Weights) -> Self {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let name = format!("fc{}", i + 1);
            layer.weight = weights.take(&format!("{name}.weight"), layer.weight.clone(), true);
            layer.bias = layer.bias.take().map(|bias| weights.take(&format!("{name}.bias"), bias, false));
        }
        self
    }

    fn check_record(record: &MlpRecord<B>, arch: &Arch, path: &Path) -> Result<(), JobsError> {
        let widths = widths(arch);
        if record.layers.len() != widths.len() - 1 {
            let reason = format!("it has {} layers, this model {}", record.layers.len(), widths.len() - 1);
            return Err(record_mismatch(path, reason));
        }
        for (i, layer) in record.layers.iter().enumerate() {
            let name = format!("fc{}", i + 1);
            let (d_in, d_out) = (widths[i], widths[i + 1]);
            expect_shape(path, &format!("{name}.weight"), &layer.weight.val().dims(), &[d_in, d_out])?;
            match &layer.bias {
                Some(bias) => expect_shape(path, &format!("{name}.bias"), &bias.val().dims(), &[d_out])?,
                None => return Err(record_mismatch(path, format!("{name}.bias is missing"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::TensorData;
    use gantry_core::spec::{ModelKind, ModelSpec};

    use super::*;
    use crate::input::{CLASSES, FEATURES};

    fn digits_arch() -> Arch {
        Arch::digits(ModelSpec::of(ModelKind::Mlp))
    }

    #[test]
    fn records_of_other_shapes_are_refused() {
        let device = Default::default();
        let good = Mlp::<NdArray>::init(&digits_arch(), 1, &device);
        let path = Path::new("step-5/model.mpk");
        assert!(Mlp::<NdArray>::check_record(&good.into_record(), &digits_arch(), path).is_ok());
        let wide = ModelSpec { hidden: Some(vec![100]), ..ModelSpec::of(ModelKind::Mlp) };
        let wide = Mlp::<NdArray>::init(&Arch::digits(wide), 1, &device);
        let err = Mlp::<NdArray>::check_record(&wide.into_record(), &digits_arch(), path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint step-5/model.mpk cannot be used: fc1.weight has shape [64, 100], expected [64, 128]"
        );
        let deep = ModelSpec { hidden: Some(vec![128, 32]), ..ModelSpec::of(ModelKind::Mlp) };
        let deep = Mlp::<NdArray>::init(&Arch::digits(deep), 1, &device);
        let err = Mlp::<NdArray>::check_record(&deep.into_record(), &digits_arch(), path).unwrap_err();
        assert!(err.to_string().ends_with("it has 3 layers, this model 2"), "{err}");
    }

    /// The exported weights, applied as PyTorch applies them (y = x W^T + b, ReLU between),
    /// give the model's own logits: names, shapes and layout are right, for any depth.
    #[test]
    fn exported_weights_in_pytorch_layout_reproduce_the_forward_pass() {
        let device = Default::default();
        let spec = ModelSpec { hidden: Some(vec![32, 16]), ..ModelSpec::of(ModelKind::Mlp) };
        let model = Mlp::<NdArray>::init(&Arch::digits(spec), 7, &device);
        let bytes = crate::export::safetensors(&model.export(), &Default::default());
        let (t, _) = crate::export::tests::read(&bytes);
        assert_eq!(t["fc1.weight"].0, [32, FEATURES]);
        assert_eq!(t["fc3.weight"].0, [CLASSES, 16]);
        assert_eq!(t["fc3.bias"].0, [CLASSES]);
        let x: Vec<f32> = (0..FEATURES).map(|i| (i % 17) as f32 / 4.0).collect();
        use crate::export::tests::Read;
        let linear = |input: &[f32], w: &Read, b: &Read| -> Vec<f32> {
            let (out, inp) = (w.0[0], w.0[1]);
            (0..out).map(|o| b.1[o] + (0..inp).map(|i| w.1[o * inp + i] * input[i]).sum::<f32>()).collect()
        };
        let relu = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|v| v.max(0.0)).collect() };
        let h1 = relu(linear(&x, &t["fc1.weight"], &t["fc1.bias"]));
        let h2 = relu(linear(&h1, &t["fc2.weight"], &t["fc2.bias"]));
        let by_hand = linear(&h2, &t["fc3.weight"], &t["fc3.bias"]);
        let input = Tensor::<NdArray, 2>::from_data(TensorData::new(x, [1, FEATURES]), &device);
        let logits = model.forward(Input::Pixels(input)).into_data().to_vec::<f32>().unwrap();
        for (a, b) in by_hand.iter().zip(&logits) {
            assert!((a - b).abs() < 1e-4, "{by_hand:?} vs {logits:?}");
        }
    }

    #[test]
    fn init_is_reproducible_from_the_seed() {
        let device = Default::default();
        let weights = |seed| Mlp::<NdArray>::init(&digits_arch(), seed, &device).layers[0].weight.val().into_data();
        assert_eq!(weights(5), weights(5));
        assert_ne!(weights(5), weights(6));
    }
}
