//! The CNN's conv block, `maxpool2x2(relu(conv3x3(x) + bias))`, as a backend operation.
//!
//! Every backend gets burn's module ops (`native`), which autodiff differentiates by itself.
//! The CPU backend, with and without autodiff, runs the hand-written kernels of `kernels.rs`
//! instead: matrix products over the whole batch, and their own backward pass registered with
//! burn's autodiff graph.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};

use super::kernels::{Block, Saved};
use crate::models::cpu::{Cpu, device_tensor, values};

/// Backends the CNN runs on.
pub(crate) trait ConvBlockOps: Backend {
    /// `x` [n, c_in, h, w], `weight` [c_out, c_in, 3, 3], `bias` [c_out] -> [n, c_out, h/2, w/2].
    fn conv_relu_pool(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>) -> Tensor<Self, 4> {
        native(x, weight, bias)
    }
}

/// The block from burn's module ops (convolution and max pooling kernels of their own): the
/// path of GPU backends, where one kernel per op is expected to beat many small ones (not yet
/// measured: no GPU has run it). On the CPU, burn's conv2d with autodiff ran at about 15
/// samples/s on the CNN, hence the kernels below.
fn native<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Tensor<B, 1>) -> Tensor<B, 4> {
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    let y = relu(conv2d(x, weight, Some(bias), options));
    max_pool2d(y, [2, 2], [2, 2], [0, 0], [1, 1], false)
}

#[cfg(feature = "cuda")]
impl ConvBlockOps for burn::backend::Cuda {}

#[cfg(feature = "cuda")]
impl ConvBlockOps for Autodiff<burn::backend::Cuda> {}

// The bf16 tests' backend.
#[cfg(test)]
impl ConvBlockOps for burn_flex::Flex {}

#[cfg(test)]
impl ConvBlockOps for Autodiff<burn_flex::Flex> {}

fn block_of(x: &[usize], weight: &[usize]) -> Block {
    Block { n: x[0], c_in: x[1], c_out: weight[0], h: x[2], w: x[3] }
}

impl ConvBlockOps for Cpu {
    fn conv_relu_pool(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>) -> Tensor<Self, 4> {
        let block = block_of(&x.dims(), &weight.dims());
        let [x, weight] = [x, weight].map(|t| t.into_primitive().tensor());
        let bias = bias.into_primitive().tensor();
        let (y, _) = block.forward(&values(&x), &values(&weight), &values(&bias));
        Tensor::from_primitive(TensorPrimitive::Float(device_tensor(y, &block.output_dims())))
    }
}

/// The backward step of one block: what the forward pass kept, for the hand-written kernels.
#[derive(Debug)]
struct ConvBlockBackward;

#[derive(Debug, Clone)]
struct BackwardState {
    block: Block,
    saved: Arc<Saved>,
    /// The weight tensor itself: a shared handle, not a copy.
    weight: FloatTensor<Cpu>,
}

impl Backward<Cpu, 3> for ConvBlockBackward {
    type State = BackwardState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node, bias_node] = ops.parents;
        let dy = grads.consume::<Cpu>(&ops.node);
        let BackwardState { block, saved, weight } = ops.state;
        let g = block.backward(&saved, &values(&weight), &values(&dy), x_node.is_some());
        if let (Some(node), Some(dx)) = (x_node, g.x) {
            grads.register::<Cpu>(node.id, device_tensor(dx, &[block.n, block.c_in, block.h, block.w]));
        }
        if let Some(node) = weight_node {
            grads.register::<Cpu>(node.id, device_tensor(g.weight, &[block.c_out, block.c_in, 3, 3]));
        }
        if let Some(node) = bias_node {
            grads.register::<Cpu>(node.id, device_tensor(g.bias, &[block.c_out]));
        }
    }
}

impl ConvBlockOps for Autodiff<Cpu> {
    fn conv_relu_pool(x: Tensor<Self, 4>, weight: Tensor<Self, 4>, bias: Tensor<Self, 1>) -> Tensor<Self, 4> {
        let block = block_of(&x.dims(), &weight.dims());
        let (x, weight, bias) =
            (x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor());
        let (y, saved) = block.forward(&values(&x.primitive), &values(&weight.primitive), &values(&bias.primitive));
        let nodes = [x.node, weight.node, bias.node];
        let y = device_tensor(y, &block.output_dims());
        let out = match ConvBlockBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish(BackwardState { block, saved: Arc::new(saved), weight: weight.primitive }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::ops::PadMode;

    use super::*;
    use crate::models::cpu::testing::{assert_close, random};
    use crate::rng::SplitMix64;

    type Train = Autodiff<Cpu>;

    /// How far the kernels may be from burn's ops, relative to 1 + |value|.
    const TOLERANCE: f32 = 1e-4;

    /// The block from burn's tensor ops, differentiated by burn itself: the reference both
    /// other paths are tested against.
    fn composed<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Tensor<B, 1>) -> Tensor<B, 4> {
        pool2(relu(conv3x3(x, weight, bias)))
    }

    /// A 3x3 convolution with zero padding, as one matrix product: the nine shifted views of the
    /// padded input stacked into columns (im2col).
    fn conv3x3<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Tensor<B, 1>) -> Tensor<B, 4> {
        let [batch, c_in, h, w] = x.dims();
        let c_out = weight.dims()[0];
        let padded = x.pad((1, 1, 1, 1), PadMode::Constant(0.0));
        let mut shifted = Vec::with_capacity(9);
        for dy in 0..3 {
            for dx in 0..3 {
                shifted.push(padded.clone().slice([0..batch, 0..c_in, dy..dy + h, dx..dx + w]).reshape([
                    batch,
                    c_in,
                    1,
                    h * w,
                ]));
            }
        }
        // [batch, c_in, 9, h*w] -> [batch, c_in*9, h*w]: channel-major, then kernel position, as
        // the weight [c_out, c_in, 3, 3] flattens.
        let columns = Tensor::cat(shifted, 2).reshape([batch, c_in * 9, h * w]);
        let kernel = weight.reshape([1, c_out, c_in * 9]).expand([batch, c_out, c_in * 9]);
        let out = kernel.matmul(columns) + bias.reshape([1, c_out, 1]);
        out.reshape([batch, c_out, h, w])
    }

    /// 2x2 max pooling with stride 2, as reshapes and maxima.
    fn pool2<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, c, h, w] = x.dims();
        x.reshape([batch, c, h / 2, 2, w / 2, 2]).max_dim(5).max_dim(3).reshape([batch, c, h / 2, w / 2])
    }

    /// The kernels, through burn's autodiff graph, against burn's own ops differentiated by
    /// burn: the same outputs and the same gradients of input, weight and bias.
    #[test]
    fn the_cpu_kernels_match_the_composed_ops_forward_and_backward() {
        let mut rng = SplitMix64::for_stream(5, 0);
        let x = random(&mut rng, [4, 3, 8, 6]).require_grad();
        let weight = random(&mut rng, [5, 3, 3, 3]).require_grad();
        let bias = random(&mut rng, [5]).require_grad();
        // A loss that weighs every output differently, so each gradient entry is distinct.
        let mix = random(&mut rng, [4, 5, 4, 3]);
        let run = |f: fn(Tensor<Train, 4>, Tensor<Train, 4>, Tensor<Train, 1>) -> Tensor<Train, 4>| {
            let y = f(x.clone(), weight.clone(), bias.clone());
            let grads = (y.clone() * mix.clone()).sum().backward();
            let g = |t: &Tensor<Train, 4>| t.grad(&grads).unwrap();
            (y.inner(), g(&x), g(&weight), bias.grad(&grads).unwrap())
        };
        let ours = run(<Train as ConvBlockOps>::conv_relu_pool);
        let theirs = run(composed::<Train>);
        assert_close("output", ours.0, theirs.0, TOLERANCE);
        assert_close("d input", ours.1, theirs.1, TOLERANCE);
        assert_close("d weight", ours.2, theirs.2, TOLERANCE);
        assert_close("d bias", ours.3, theirs.3, TOLERANCE);

        // Without autodiff (evaluation), the same forward pass.
        let (x, weight, bias) = (x.inner(), weight.inner(), bias.inner());
        let inner = <Cpu as ConvBlockOps>::conv_relu_pool(x.clone(), weight.clone(), bias.clone());
        assert_close("inner output", inner, composed(x, weight, bias), TOLERANCE);
    }

    /// The GPU path's module ops compute the same block (checked here on the CPU backend, where
    /// burn's conv2d is slow but correct).
    #[test]
    fn the_module_ops_compute_the_same_block() {
        let mut rng = SplitMix64::for_stream(9, 0);
        let x = random::<4>(&mut rng, [3, 2, 8, 8]).inner();
        let weight = random::<4>(&mut rng, [4, 2, 3, 3]).inner();
        let bias = random::<1>(&mut rng, [4]).inner();
        assert_close("native", native(x.clone(), weight.clone(), bias.clone()), composed(x, weight, bias), TOLERANCE);
    }

    /// An input that needs no gradient (the pixels) gets none; the weights still do.
    #[test]
    fn an_input_without_gradient_gets_none() {
        let mut rng = SplitMix64::for_stream(6, 0);
        let x = random(&mut rng, [2, 1, 4, 4]);
        let weight = random(&mut rng, [3, 1, 3, 3]).require_grad();
        let bias = random(&mut rng, [3]).require_grad();
        let grads = Train::conv_relu_pool(x.clone(), weight.clone(), bias).sum().backward();
        assert!(x.grad(&grads).is_none());
        assert_eq!(weight.grad(&grads).unwrap().dims(), [3, 1, 3, 3]);
    }
}
