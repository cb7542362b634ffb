//! The "mlp" model: 64 -> 128 -> ReLU -> 10.

use std::path::Path;

use burn::module::{Module, ParamId};
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Tensor, backend::Backend};

use super::{Net, expect_shape, linear, record_mismatch};
use crate::error::JobsError;
use crate::export;
use crate::input::{CLASSES, FEATURES, Input};
use crate::rng::SplitMix64;

const HIDDEN: usize = 128;

/// The init stream of a seed; data-order streams use the epoch number, so they never collide.
const INIT_STREAM: u64 = u64::MAX;

#[derive(Module, Debug)]
pub(crate) struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
}

impl<B: Backend> Net<B> for Mlp<B> {
    fn init(seed: u64, device: &B::Device) -> Self {
        let mut rng = SplitMix64::for_stream(seed, INIT_STREAM);
        Mlp {
            fc1: linear(&mut rng, [1, 2], FEATURES, HIDDEN, device),
            fc2: linear(&mut rng, [3, 4], HIDDEN, CLASSES, device),
        }
    }

    fn forward(&self, x: Input<B>) -> Tensor<B, 2> {
        self.fc2.forward(relu(self.fc1.forward(x.pixels())))
    }

    fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = Vec::with_capacity(4);
        for layer in [&self.fc1, &self.fc2] {
            ids.push(layer.weight.id);
            ids.extend(layer.bias.as_ref().map(|b| b.id));
        }
        ids
    }

    fn backbone(&self) -> Vec<(ParamId, usize)> {
        let mut ids = vec![(self.fc1.weight.id, 2)];
        ids.extend(self.fc1.bias.as_ref().map(|b| (b.id, 1)));
        ids
    }

    fn with_head_of(self, other: Self) -> Self {
        Mlp { fc1: self.fc1, fc2: other.fc2 }
    }

    /// `nn.Linear` keeps `weight` as [out, in]; burn keeps [in, out]. So a
    /// `torch.nn.Sequential(Linear(64, 128), ReLU(), Linear(128, 10))` with these keys renamed
    /// loads them as they are.
    fn export(&self) -> Vec<export::Named> {
        let mut out = Vec::new();
        for (name, layer) in [("fc1", &self.fc1), ("fc2", &self.fc2)] {
            out.push(export::tensor(&format!("{name}.weight"), layer.weight.val().transpose()));
            if let Some(bias) = &layer.bias {
                out.push(export::tensor(&format!("{name}.bias"), bias.val()));
            }
        }
        out
    }

    fn check_record(record: &MlpRecord<B>, path: &Path) -> Result<(), JobsError> {
        let check = |name: &str, layer: &burn::nn::LinearRecord<B>, d_in: usize, d_out: usize| {
            expect_shape(path, &format!("{name}.weight"), &layer.weight.val().dims(), &[d_in, d_out])?;
            match &layer.bias {
                Some(bias) => expect_shape(path, &format!("{name}.bias"), &bias.val().dims(), &[d_out]),
                None => Err(record_mismatch(path, format!("{name}.bias is missing"))),
            }
        };
        check("fc1", &record.fc1, FEATURES, HIDDEN)?;
        check("fc2", &record.fc2, HIDDEN, CLASSES)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::nn::LinearConfig;
    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn records_of_other_shapes_are_refused() {
        let device = Default::default();
        let good = Mlp::<NdArray>::init(1, &device);
        let path = Path::new("step-5/model.mpk");
        assert!(Mlp::<NdArray>::check_record(&good.into_record(), path).is_ok());
        let wide = Mlp::<NdArray> {
            fc1: LinearConfig::new(FEATURES, 100).init(&device),
            fc2: LinearConfig::new(100, CLASSES).init(&device),
        };
        let err = Mlp::<NdArray>::check_record(&wide.into_record(), path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "checkpoint step-5/model.mpk cannot be used: fc1.weight has shape [64, 100], expected [64, 128]"
        );
    }

    /// The exported weights, applied as PyTorch applies them (y = x W^T + b, ReLU between),
    /// give the model's own logits: names, shapes and layout are right.
    #[test]
    fn exported_weights_in_pytorch_layout_reproduce_the_forward_pass() {
        let device = Default::default();
        let model = Mlp::<NdArray>::init(7, &device);
        let bytes = crate::export::safetensors(&model.export(), &Default::default());
        let (t, _) = crate::export::tests::read(&bytes);
        assert_eq!(t["fc1.weight"].0, [HIDDEN, FEATURES]);
        assert_eq!(t["fc2.weight"].0, [CLASSES, HIDDEN]);
        assert_eq!(t["fc2.bias"].0, [CLASSES]);
        let x: Vec<f32> = (0..FEATURES).map(|i| (i % 17) as f32 / 4.0).collect();
        use crate::export::tests::Read;
        let linear = |input: &[f32], w: &Read, b: &Read| -> Vec<f32> {
            let (out, inp) = (w.0[0], w.0[1]);
            (0..out).map(|o| b.1[o] + (0..inp).map(|i| w.1[o * inp + i] * input[i]).sum::<f32>()).collect()
        };
        let hidden: Vec<f32> = linear(&x, &t["fc1.weight"], &t["fc1.bias"]).into_iter().map(|v| v.max(0.0)).collect();
        let by_hand = linear(&hidden, &t["fc2.weight"], &t["fc2.bias"]);
        let input = Tensor::<NdArray, 2>::from_data(TensorData::new(x, [1, FEATURES]), &device);
        let logits = model.forward(Input::Pixels(input)).into_data().to_vec::<f32>().unwrap();
        for (a, b) in by_hand.iter().zip(&logits) {
            assert!((a - b).abs() < 1e-4, "{by_hand:?} vs {logits:?}");
        }
    }

    #[test]
    fn init_is_reproducible_from_the_seed() {
        let device = Default::default();
        let weights = |seed| Mlp::<NdArray>::init(seed, &device).fc1.weight.val().into_data();
        assert_eq!(weights(5), weights(5));
        assert_ne!(weights(5), weights(6));
    }
}
