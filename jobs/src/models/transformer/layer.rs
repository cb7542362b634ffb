//! One transformer layer (burn's pre-norm `TransformerEncoderLayer`, causal) as a backend
//! operation.
//!
//! Every backend gets burn's own layer (`native`), which autodiff differentiates by itself. The
//! CPU backend, with and without autodiff, runs the hand-written kernels of `kernels.rs`
//! instead, with their own backward pass registered with burn's autodiff graph as one node per
//! layer. The weights stay burn's modules, so checkpoints, export and import are unchanged.

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::activation::Activation;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::TransformerEncoderLayer;
use burn::nn::{LayerNorm, Linear};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive, backend::Backend};

use super::kernels::{Affine, Norm, ParamGrads, Params, Saved, Shape};
use crate::models::cpu::{Cpu, device_tensor, values};

/// A layer's parameters in the kernels' order: norm_attn (gamma, beta), query, key, value and
/// output (weight, bias), norm_ff, ff_in, ff_out.
const PARAMS: usize = 16;

/// Backends the transformer runs on.
pub(crate) trait EncoderLayerOps: Backend {
    /// `x` [batch, len, width] through `layer`, each position attending to itself and those
    /// before it.
    fn causal_layer(layer: &TransformerEncoderLayer<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        native(layer, x)
    }
}

/// burn's own layer: the path of GPU backends, and of any layer the kernels do not cover.
fn native<B: Backend>(layer: &TransformerEncoderLayer<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, len, _] = x.dims();
    let mask = generate_autoregressive_mask::<B>(batch, len, &x.device());
    layer.forward(x, None, Some(mask))
}

#[cfg(feature = "cuda")]
impl EncoderLayerOps for burn::backend::Cuda {}

#[cfg(feature = "cuda")]
impl EncoderLayerOps for Autodiff<burn::backend::Cuda> {}

// The bf16 tests' backend.
#[cfg(test)]
impl EncoderLayerOps for burn_flex::Flex {}

#[cfg(test)]
impl EncoderLayerOps for Autodiff<burn_flex::Flex> {}

/// The layer's parameters, when the kernels compute what burn's layer would: pre-norm, no
/// dropout, plain softmax, exact GELU, every bias present and burn's layer-norm epsilon (the
/// model's layers are built so).
fn kernel_params<B: Backend>(layer: &TransformerEncoderLayer<B>) -> Option<[FloatTensor<B>; PARAMS]> {
    let exact_gelu = matches!(&layer.pwff.activation, Activation::Gelu(g) if !g.approximate);
    let no_dropout = [&layer.dropout, &layer.mha.dropout, &layer.pwff.dropout].iter().all(|d| d.prob == 0.0);
    if !(layer.norm_first && exact_gelu && no_dropout && !layer.mha.quiet_softmax) {
        return None;
    }
    let linear = |l: &Linear<B>| {
        Some([l.weight.val().into_primitive().tensor(), l.bias.as_ref()?.val().into_primitive().tensor()])
    };
    let norm = |n: &LayerNorm<B>| {
        Some([n.gamma.val().into_primitive().tensor(), n.beta.as_ref()?.val().into_primitive().tensor()])
    };
    let mha = &layer.mha;
    let pairs = [
        norm(&layer.norm_2)?,
        linear(&mha.query)?,
        linear(&mha.key)?,
        linear(&mha.value)?,
        linear(&mha.output)?,
        norm(&layer.norm_1)?,
        linear(&layer.pwff.linear_inner)?,
        linear(&layer.pwff.linear_outer)?,
    ];
    let tensors: Vec<FloatTensor<B>> = pairs.into_iter().flatten().collect();
    tensors.try_into().ok()
}

fn shape_of(x: &[usize], heads: usize) -> Shape {
    Shape { batch: x[0], len: x[1], width: x[2], heads }
}

fn params_of<'a>(v: &'a [Cow<'a, [f32]>; PARAMS]) -> Params<'a> {
    let affine = |i: usize| Affine { weight: &v[i], bias: &v[i + 1] };
    let norm = |i: usize| Norm { gamma: &v[i], beta: &v[i + 1] };
    Params {
        norm_attn: norm(0),
        query: affine(2),
        key: affine(4),
        value: affine(6),
        output: affine(8),
        norm_ff: norm(10),
        ff_in: affine(12),
        ff_out: affine(14),
    }
}

/// The shapes of the parameters' gradients, in the same order.
fn param_dims(shape: &Shape) -> [Vec<usize>; PARAMS] {
    let (w, h) = (shape.width, 4 * shape.width);
    let square = [vec![w, w], vec![w]];
    [
        [vec![w], vec![w]],
        square.clone(),
        square.clone(),
        square.clone(),
        square,
        [vec![w], vec![w]],
        [vec![w, h], vec![h]],
        [vec![h, w], vec![w]],
    ]
    .concat()
    .try_into()
    .expect("16 shapes")
}

fn flatten(g: ParamGrads) -> [Vec<f32>; PARAMS] {
    [g.norm_attn, g.query, g.key, g.value, g.output, g.norm_ff, g.ff_in, g.ff_out].concat().try_into().expect("16")
}

/// The kernels' forward pass on the CPU tensors of `x` and the parameters.
fn forward(x: &FloatTensor<Cpu>, params: &[&FloatTensor<Cpu>; PARAMS], heads: usize) -> (Shape, Vec<f32>, Saved) {
    let shape = shape_of(&x.shape().dims::<3>(), heads);
    let v = params.map(values);
    let (y, saved) = shape.forward(&values(x), &params_of(&v));
    (shape, y, saved)
}

impl EncoderLayerOps for Cpu {
    fn causal_layer(layer: &TransformerEncoderLayer<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let Some(params) = kernel_params(layer) else { return native(layer, x) };
        let x = x.into_primitive().tensor();
        let (shape, y, _) = forward(&x, &params.each_ref(), layer.mha.n_heads);
        Tensor::from_primitive(TensorPrimitive::Float(device_tensor(y, &[shape.batch, shape.len, shape.width])))
    }
}

/// The backward step of one layer.
#[derive(Debug)]
struct LayerBackward;

#[derive(Debug, Clone)]
struct BackwardState {
    shape: Shape,
    saved: Arc<Saved>,
    /// The parameters themselves: shared handles, not copies.
    params: [FloatTensor<Cpu>; PARAMS],
}

impl Backward<Cpu, { PARAMS + 1 }> for LayerBackward {
    type State = BackwardState;

    fn backward(self, ops: Ops<Self::State, { PARAMS + 1 }>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, param_nodes @ ..] = ops.parents;
        let dy = grads.consume::<Cpu>(&ops.node);
        let BackwardState { shape, saved, params } = ops.state;
        let v = params.each_ref().map(values);
        let (dx, g) = shape.backward(&saved, &params_of(&v), &values(&dy), x_node.is_some());
        if let (Some(node), Some(dx)) = (x_node, dx) {
            grads.register::<Cpu>(node.id, device_tensor(dx, &[shape.batch, shape.len, shape.width]));
        }
        for ((node, g), dims) in param_nodes.into_iter().zip(flatten(g)).zip(param_dims(&shape)) {
            if let Some(node) = node {
                grads.register::<Cpu>(node.id, device_tensor(g, &dims));
            }
        }
    }
}

impl EncoderLayerOps for Autodiff<Cpu> {
    fn causal_layer(layer: &TransformerEncoderLayer<Self>, x: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let Some(params) = kernel_params(layer) else { return native(layer, x) };
        let x = x.into_primitive().tensor();
        let (shape, y, saved) = forward(&x.primitive, &params.each_ref().map(|p| &p.primitive), layer.mha.n_heads);
        let handles = params.each_ref().map(|p| p.primitive.clone());
        let mut nodes = vec![x.node];
        nodes.extend(params.map(|p| p.node));
        let nodes = nodes.try_into().expect("17 nodes");
        let y = device_tensor(y, &[shape.batch, shape.len, shape.width]);
        let out = match LayerBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(BackwardState { shape, saved: Arc::new(saved), params: handles }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::ndarray::NdArrayDevice;
    use burn::module::AutodiffModule;
    use burn::nn::transformer::TransformerEncoderConfig;
    use burn::tensor::activation::softmax;

    use super::*;
    use crate::models::cpu::testing::{assert_close, random};
    use crate::rng::SplitMix64;

    type Train = Autodiff<Cpu>;

    /// How far the kernels may be from burn's ops, relative to 1 + |value|.
    const TOLERANCE: f32 = 2e-4;

    fn layer<B: Backend>(width: usize, heads: usize, device: &B::Device) -> TransformerEncoderLayer<B> {
        let config = TransformerEncoderConfig::new(width, 4 * width, heads, 1).with_norm_first(true).with_dropout(0.0);
        let mut layers = config.init::<B>(device).layers;
        layers.pop().unwrap()
    }

    /// The layer from burn's tensor ops, with GELU's exact derivative (burn's own GELU
    /// differentiates its tanh approximation): the reference the kernels are tested against.
    fn composed<B: Backend>(layer: &TransformerEncoderLayer<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, width] = x.dims();
        let heads = layer.mha.n_heads;
        let d = width / heads;
        let linear = |l: &Linear<B>, x: Tensor<B, 3>| {
            x.matmul(l.weight.val().unsqueeze()) + l.bias.as_ref().unwrap().val().unsqueeze()
        };
        let split = |t: Tensor<B, 3>| t.reshape([batch, len, heads, d]).swap_dims(1, 2);
        let a = layer.norm_2.forward(x.clone());
        let (q, k, v) = (
            split(linear(&layer.mha.query, a.clone())),
            split(linear(&layer.mha.key, a.clone())),
            split(linear(&layer.mha.value, a)),
        );
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f32).sqrt());
        let future = Tensor::<B, 2, burn::tensor::Bool>::tril_mask([len, len], 0, &x.device()).unsqueeze::<4>();
        let p = softmax(scores.mask_fill(future, -1e9), 3);
        let context = p.matmul(v).swap_dims(1, 2).reshape([batch, len, width]);
        let x1 = x + linear(&layer.mha.output, context);
        let pre = linear(&layer.pwff.linear_inner, layer.norm_1.forward(x1.clone()));
        let hidden = pre.clone().mul((pre.div_scalar(std::f32::consts::SQRT_2).erf() + 1.0).div_scalar(2.0));
        x1 + linear(&layer.pwff.linear_outer, hidden)
    }

    /// The kernels, through burn's autodiff graph, against burn's ops differentiated by burn:
    /// the same output and the same gradients of the input and of all sixteen parameters.
    #[test]
    fn the_cpu_kernels_match_the_composed_ops_forward_and_backward() {
        let mut rng = SplitMix64::for_stream(11, 0);
        let device = NdArrayDevice::Cpu;
        let layer = layer::<Train>(16, 4, &device);
        let x = random(&mut rng, [2, 45, 16]).require_grad();
        // A loss that weighs every output differently, so each gradient entry is distinct.
        // 45 positions: attention's blocks of 32, the last one partial.
        let mix = random(&mut rng, [2, 45, 16]);
        let run = |f: &dyn Fn(Tensor<Train, 3>) -> Tensor<Train, 3>| {
            let y = f(x.clone());
            let grads = (y.clone() * mix.clone()).sum().backward();
            (y.inner(), x.grad(&grads).unwrap(), grads)
        };
        let ours = run(&|x| Train::causal_layer(&layer, x));
        let theirs = run(&|x| composed(&layer, x));
        assert_close("output", ours.0, theirs.0, TOLERANCE);
        assert_close("d input", ours.1, theirs.1, TOLERANCE);
        let mha = &layer.mha;
        let pwff = &layer.pwff;
        let weights = [&mha.query, &mha.key, &mha.value, &mha.output, &pwff.linear_inner, &pwff.linear_outer];
        for (i, l) in weights.into_iter().enumerate() {
            let (w, b) = (&l.weight, l.bias.as_ref().unwrap());
            assert_close(
                &format!("linear {i} weight"),
                w.grad(&ours.2).unwrap(),
                w.grad(&theirs.2).unwrap(),
                TOLERANCE,
            );
            assert_close(&format!("linear {i} bias"), b.grad(&ours.2).unwrap(), b.grad(&theirs.2).unwrap(), TOLERANCE);
        }
        for (i, n) in [&layer.norm_1, &layer.norm_2].into_iter().enumerate() {
            let (g, b) = (&n.gamma, n.beta.as_ref().unwrap());
            assert_close(&format!("norm {i} gamma"), g.grad(&ours.2).unwrap(), g.grad(&theirs.2).unwrap(), TOLERANCE);
            assert_close(&format!("norm {i} beta"), b.grad(&ours.2).unwrap(), b.grad(&theirs.2).unwrap(), TOLERANCE);
        }

        // Without autodiff (evaluation), the same forward pass, and burn's own layer agrees.
        let inner = layer.valid();
        let x = x.inner();
        let kernels = <Cpu as EncoderLayerOps>::causal_layer(&inner, x.clone());
        assert_close("inner output", kernels.clone(), composed(&inner, x.clone()), TOLERANCE);
        assert_close("burn's layer", kernels, native(&inner, x), TOLERANCE);
    }

    /// A layer the kernels do not cover (post-norm) takes burn's path.
    #[test]
    fn a_post_norm_layer_is_left_to_burn() {
        let device = NdArrayDevice::Cpu;
        let config = TransformerEncoderConfig::new(8, 32, 2, 1).with_dropout(0.0);
        let layer = config.init::<Cpu>(&device).layers.pop().unwrap();
        assert!(kernel_params(&layer).is_none());
        let x = random(&mut SplitMix64::for_stream(1, 0), [2, 3, 8]).inner();
        assert_close("post-norm", Cpu::causal_layer(&layer, x.clone()), native(&layer, x), TOLERANCE);
    }
}
