//! The "transformer" model: a GPT-style character-level language model. Token and position
//! embeddings, `layers` pre-norm transformer blocks with causal self-attention (`heads` heads,
//! a feed-forward of 4 x `width`), a final layer norm, and a linear head over the vocabulary.
//! By default 2 blocks of width 64 with 4 heads, reading 64 characters.

mod kernels;
mod layer;
mod math;

use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::{Arch, Net, Weights, expect_shape, record_mismatch};
use crate::error::JobsError;
use crate::export;
use crate::import::transpose;
use crate::input::{Input, VOCAB};
use crate::rng::SplitMix64;

pub(crate) use layer::EncoderLayerOps;

const INIT_STREAM: u64 = u64::MAX - 2;
/// GPT-2's initial spread of weights.
const INIT_STD: f32 = 0.02;

#[derive(Module, Debug)]
pub(crate) struct Transformer<B: Backend> {
    tokens: Embedding<B>,
    positions: Embedding<B>,
    blocks: TransformerEncoder<B>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl<B: EncoderLayerOps> Net<B> for Transformer<B> {
    fn init(arch: &Arch, seed: u64, device: &B::Device) -> Self {
        let Sizes { width, heads, layers, context } = Sizes::of(arch);
        let blocks = TransformerEncoderConfig::new(width, 4 * width, heads, layers)
            .with_norm_first(true)
            // No dropout: it would draw from the backend's process-wide generator, and data
            // parallel ranks and exact resume need every step to be reproducible.
            .with_dropout(0.0)
            .init(device);
        let model = Transformer {
            tokens: EmbeddingConfig::new(VOCAB, width).init(device),
            positions: EmbeddingConfig::new(context, width).init(device),
            blocks,
            norm: LayerNormConfig::new(width).init(device),
            head: LinearConfig::new(width, VOCAB).init(device),
        };
        // burn drew those from its own generator; redraw every weight from the seed, with
        // fixed ids, as the other models do.
        model.map(&mut Reinit { rng: SplitMix64::for_stream(seed, INIT_STREAM), path: Vec::new(), next_id: 100 })
    }

    fn forward(&self, x: Input<B>) -> Tensor<B, 2> {
        let tokens = x.tokens();
        let [batch, len] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device).reshape([1, len]).repeat_dim(0, batch);
        let mut h = self.tokens.forward(tokens) + self.positions.forward(positions);
        for layer in &self.blocks.layers {
            h = B::causal_layer(layer, h);
        }
        self.head.forward(self.norm.forward(h)).reshape([batch * len, VOCAB])
    }

    fn param_ids(&self) -> Vec<ParamId> {
        self.params(false).into_iter().map(|p| p.id).collect()
    }

    /// Read on every step of a frozen-backbone run: ids and ranks only, no weights copied.
    fn backbone(&self) -> Vec<(ParamId, usize)> {
        let head = [Some(self.head.weight.id), self.head.bias.as_ref().map(|b| b.id)];
        self.params(false).into_iter().filter(|p| !head.contains(&Some(p.id))).map(|p| (p.id, p.shape.len())).collect()
    }

    fn with_head_of(self, other: Self) -> Self {
        Transformer { head: other.head, ..self }
    }

    /// Named by module path ("blocks.layers.0.mha.query.weight"); linear weights transposed to
    /// PyTorch's [out, in].
    fn export(&self) -> Vec<export::Named> {
        self.params(true)
            .into_iter()
            .map(|p| {
                let mut values = p.values;
                let mut shape = p.shape;
                if p.in_linear && shape.len() == 2 {
                    values = transpose(&values, shape[0], shape[1]);
                    shape.reverse();
                }
                export::Named { name: p.path, shape, values }
            })
            .collect()
    }

    fn import(self, weights: &mut Weights) -> Self {
        self.map(&mut Import { weights, path: Vec::new() })
    }

    /// Heads split the same weights differently, so only the state's spec tells them apart.
    fn check_record(record: &TransformerRecord<B>, arch: &Arch, path: &Path) -> Result<(), JobsError> {
        let Sizes { width, layers, context, .. } = Sizes::of(arch);
        expect_shape(path, "tokens.weight", &record.tokens.weight.val().dims(), &[VOCAB, width])?;
        expect_shape(path, "positions.weight", &record.positions.weight.val().dims(), &[context, width])?;
        expect_shape(path, "head.weight", &record.head.weight.val().dims(), &[width, VOCAB])?;
        let blocks = &record.blocks.layers;
        if blocks.len() != layers {
            return Err(record_mismatch(
                path,
                format!("it has {} transformer blocks, expected {layers}", blocks.len()),
            ));
        }
        for (i, layer) in blocks.iter().enumerate() {
            let inner = layer.pwff.linear_inner.weight.val().dims();
            let name = format!("blocks.layers.{i}.pwff.linear_inner.weight");
            expect_shape(path, &name, &inner, &[width, 4 * width])?;
        }
        Ok(())
    }
}

/// The sizes of the spec, as burn's configs take them.
struct Sizes {
    width: usize,
    heads: usize,
    layers: usize,
    context: usize,
}

impl Sizes {
    fn of(arch: &Arch) -> Sizes {
        let m = &arch.model;
        Sizes {
            width: m.width() as usize,
            heads: m.heads() as usize,
            layers: m.layers() as usize,
            context: m.context() as usize,
        }
    }
}

/// One parameter, as a visit finds it.
struct ParamInfo {
    id: ParamId,
    path: String,
    shape: Vec<usize>,
    /// The weights, when asked for (export); empty otherwise.
    values: Vec<f32>,
    in_linear: bool,
}

impl<B: Backend> Transformer<B> {
    fn params(&self, with_values: bool) -> Vec<ParamInfo> {
        let mut visitor = Params { path: Vec::new(), found: Vec::new(), with_values };
        self.visit(&mut visitor);
        visitor.found
    }
}

/// Collects every float parameter with its module path.
struct Params {
    /// (field name, type of the module holding it) of each step down.
    path: Vec<(String, String)>,
    found: Vec<ParamInfo>,
    with_values: bool,
}

impl<B: Backend> ModuleVisitor<B> for Params {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.into(), container_type.into()));
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        // Each entry names a field and the type that holds it: a weight of a Linear.
        let in_linear = self.path.last().is_some_and(|(_, holder)| holder == "Struct:Linear");
        self.found.push(ParamInfo {
            id: param.id,
            path: self.path.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join("."),
            shape: value.dims().to_vec(),
            values: match self.with_values {
                true => value.into_data().convert::<f32>().to_vec::<f32>().expect("f32 weights"),
                false => Vec::new(),
            },
            in_linear,
        });
    }
}

/// Redraws every float parameter from our generator, by kind: layer-norm scales 1, biases and
/// shifts 0, every weight matrix normal(0, 0.02). Ids are numbered in visit order.
struct Reinit {
    rng: SplitMix64,
    path: Vec<String>,
    next_id: u64,
}

impl<B: Backend> ModuleMapper<B> for Reinit {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.into());
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, _) = param.consume();
        let (shape, device) = (tensor.shape(), tensor.device());
        let n = shape.num_elements();
        let values: Vec<f32> = match self.path.last().map(String::as_str) {
            Some("gamma") => vec![1.0; n],
            Some("beta" | "bias") => vec![0.0; n],
            _ => (0..n).map(|_| self.rng.next_normal() * INIT_STD).collect(),
        };
        let id = ParamId::from(self.next_id);
        self.next_id += 1;
        Param::initialized(id, Tensor::from_data(TensorData::new(values, shape), &device).require_grad())
    }
}

/// Takes every float parameter from a SafeTensors file by its module path, as `export` names
/// it; a linear layer's 2-D weight is in PyTorch's [out, in] there.
struct Import<'w> {
    weights: &'w mut Weights,
    /// (field name, type of the module holding it) of each step down.
    path: Vec<(String, String)>,
}

impl<B: Backend> ModuleMapper<B> for Import<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push((name.into(), container_type.into()));
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let in_linear = D == 2 && self.path.last().is_some_and(|(_, holder)| holder == "Struct:Linear");
        let name = self.path.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(".");
        self.weights.take(&name, param, in_linear)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use gantry_core::spec::{ModelKind, ModelSpec};

    use super::*;
    use crate::input::InputShape;

    const CONTEXT: usize = 64;
    const WIDTH: usize = 64;

    fn arch() -> Arch {
        Arch { model: ModelSpec::of(ModelKind::Transformer), input: InputShape::text() }
    }

    #[test]
    fn the_model_predicts_every_next_character_and_only_looks_back() {
        let device = Default::default();
        let model = Transformer::<NdArray>::init(&arch(), 1, &device);
        let tokens = |last: i64| {
            let mut t: Vec<i64> = (0..CONTEXT as i64).map(|i| i % 50 + 1).collect();
            t[CONTEXT - 1] = last;
            Input::Tokens(Tensor::<NdArray, 2, Int>::from_data(TensorData::new(t, [1, CONTEXT]), &device))
        };
        let (a, b) = (model.forward(tokens(5)), model.forward(tokens(9)));
        assert_eq!(a.dims(), [CONTEXT, VOCAB]);
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        // Changing the last character changes only the last position's prediction: causal.
        let before = (CONTEXT - 1) * VOCAB;
        assert_eq!(a[..before], b[..before]);
        assert_ne!(a[before..], b[before..]);
    }

    #[test]
    fn init_follows_the_seed_and_export_names_the_weights() {
        let device = Default::default();
        let names = |seed| -> Vec<(String, Vec<usize>, Vec<f32>)> {
            Transformer::<NdArray>::init(&arch(), seed, &device)
                .export()
                .into_iter()
                .map(|t| (t.name, t.shape, t.values))
                .collect()
        };
        let (a, b, c) = (names(1), names(1), names(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let find = |name: &str| a.iter().find(|t| t.0 == name).unwrap_or_else(|| panic!("{name} in {a:?}"));
        assert_eq!(find("tokens.weight").1, [VOCAB, WIDTH]);
        assert_eq!(find("head.weight").1, [VOCAB, WIDTH], "PyTorch's [out, in]");
        assert!(find("norm.gamma").2.iter().all(|v| *v == 1.0));
        assert!(
            a.iter().any(|t| t.0.starts_with("blocks.layers.1.")),
            "{:?}",
            a.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
    }

    #[test]
    fn records_of_other_shapes_are_refused() {
        let device = Default::default();
        let good = Transformer::<NdArray>::init(&arch(), 1, &device);
        let path = Path::new("model.mpk");
        assert!(Transformer::<NdArray>::check_record(&good.clone().into_record(), &arch(), path).is_ok());
        let wide = Transformer { head: LinearConfig::new(WIDTH, 10).init(&device), ..good };
        let err = Transformer::<NdArray>::check_record(&wide.into_record(), &arch(), path).unwrap_err();
        assert!(err.to_string().contains("head.weight has shape [64, 10]"), "{err}");
    }

    /// A sized model's exported weights come back in through the SafeTensors import as they
    /// went out: every name found, every shape right, the same logits.
    #[test]
    fn a_sized_model_round_trips_through_safetensors() {
        let device = Default::default();
        let spec = ModelSpec { layers: Some(3), width: Some(32), heads: Some(2), context: Some(16), ..arch().model };
        let arch = Arch { model: spec, input: InputShape::text() };
        let trained = Transformer::<NdArray>::init(&arch, 1, &device);
        let bytes = crate::export::safetensors(&trained.export(), &Default::default());
        let mut weights = Weights::parse(Path::new("t.safetensors"), &bytes).unwrap();
        let fresh = Transformer::<NdArray>::init(&arch, 2, &device).import(&mut weights);
        weights.finish().unwrap();
        let tokens =
            Tensor::<NdArray, 2, Int>::from_data(TensorData::new((0..16).collect::<Vec<i64>>(), [1, 16]), &device);
        let logits =
            |m: &Transformer<NdArray>| m.forward(Input::Tokens(tokens.clone())).into_data().to_vec::<f32>().unwrap();
        assert_eq!(logits(&trained), logits(&fresh));
        // Weights of the default size do not fit: the error lists what differs.
        let mut weights = Weights::parse(Path::new("t.safetensors"), &bytes).unwrap();
        let _ = Transformer::<NdArray>::init(&self::arch(), 2, &device).import(&mut weights);
        let err = weights.finish().unwrap_err().to_string();
        assert!(err.contains("of another shape: tokens.weight is [96, 32], the model's is [96, 64]"), "{err}");
        assert!(err.contains("not in this model: blocks.layers.2."), "{err}");
    }
}
