//! Hand-written CPU kernels for one pre-norm transformer layer, forward and backward, on plain
//! `f32` slices:
//!
//! ```text
//! a  = layer_norm(x)                      (norm_attn: burn's `norm_2`)
//! x1 = x + attention(a) W_o + b_o         (causal, `heads` heads)
//! c  = layer_norm(x1)                     (norm_ff: burn's `norm_1`)
//! y  = x1 + gelu(c W_1 + b_1) W_2 + b_2
//! ```
//!
//! Why: composed from burn's ndarray ops the 4 x 256 transformer trained at a fifth of PyTorch's
//! CPU speed, its time in single-threaded matrix products, element-wise copies and the autodiff
//! graph's many small nodes. Here each linear map is one product over the whole batch on every
//! core, attention runs a batch element per task, and the element-wise steps are single loops.
//!
//! Layout: `x` and `y` are [rows = batch * len, width], row-major; weights are [in, out] as burn's
//! `Linear` keeps them.

use rayon::prelude::*;

use super::math::{exp, gelu, gelu_grad, sum, widest, zip_apply};
use crate::models::buffers::{give, take};
use crate::models::matmul::{Threads, View, ViewMut, matmul};

/// burn's default layer-norm epsilon, which the model's layers use.
const EPSILON: f32 = 1e-5;

/// Rows handed to one rayon task at least: a row is a few hundred values.
const MIN_ROWS: usize = 32;

/// The sizes of one layer's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    pub batch: usize,
    pub len: usize,
    pub width: usize,
    pub heads: usize,
}

/// A linear map's weight [in, out] and bias [out].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Affine<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
}

/// A layer norm's scale and shift.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Norm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
}

/// A layer's parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params<'a> {
    pub norm_attn: Norm<'a>,
    pub query: Affine<'a>,
    pub key: Affine<'a>,
    pub value: Affine<'a>,
    pub output: Affine<'a>,
    pub norm_ff: Norm<'a>,
    pub ff_in: Affine<'a>,
    pub ff_out: Affine<'a>,
}

/// Gradients of a layer's parameters, in the layout of [`Params`].
#[derive(Debug, Default)]
pub(crate) struct ParamGrads {
    pub norm_attn: [Vec<f32>; 2],
    pub query: [Vec<f32>; 2],
    pub key: [Vec<f32>; 2],
    pub value: [Vec<f32>; 2],
    pub output: [Vec<f32>; 2],
    pub norm_ff: [Vec<f32>; 2],
    pub ff_in: [Vec<f32>; 2],
    pub ff_out: [Vec<f32>; 2],
}

/// The activations the backward pass needs from the forward pass (it is given the weights
/// again, as burn keeps them).
#[derive(Debug)]
pub(crate) struct Saved {
    /// The attention's normalized input, its output `a`, and 1 / std per row.
    attn_hat: Vec<f32>,
    attn_in: Vec<f32>,
    attn_rstd: Vec<f32>,
    /// Queries, keys and values side by side: [rows, 3 * width].
    qkv: Vec<f32>,
    /// Attention weights per batch element and head: [batch, heads, len, len], zero above the
    /// diagonal.
    probs: Vec<f32>,
    /// The heads' outputs side by side: [rows, width].
    context: Vec<f32>,
    ff_hat: Vec<f32>,
    ff_in: Vec<f32>,
    ff_rstd: Vec<f32>,
    /// The feed-forward's hidden layer before and after GELU: [rows, 4 * width].
    hidden_pre: Vec<f32>,
    hidden: Vec<f32>,
}

impl Params<'_> {
    /// The three projections' weights side by side: [width, 3 * width], one product for all.
    fn qkv_weight(&self, width: usize) -> Vec<f32> {
        side_by_side(&[self.query.weight, self.key.weight, self.value.weight], width)
    }
}

/// The large buffers go back to the pool, for the next step.
impl Drop for Saved {
    fn drop(&mut self) {
        let buffers = [
            &mut self.attn_hat,
            &mut self.attn_in,
            &mut self.qkv,
            &mut self.probs,
            &mut self.context,
            &mut self.ff_hat,
            &mut self.ff_in,
            &mut self.hidden_pre,
            &mut self.hidden,
        ];
        for buffer in buffers {
            give(std::mem::take(buffer));
        }
    }
}

impl Shape {
    pub(crate) fn rows(&self) -> usize {
        self.batch * self.len
    }

    fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    fn hidden(&self) -> usize {
        4 * self.width
    }

    fn check(&self, x: &[f32], p: &Params<'_>) {
        let (w, h) = (self.width, self.hidden());
        assert!(self.heads > 0 && w.is_multiple_of(self.heads), "width {w} in {} heads", self.heads);
        assert_eq!(x.len(), self.rows() * w, "input");
        for norm in [p.norm_attn, p.norm_ff] {
            assert_eq!((norm.gamma.len(), norm.beta.len()), (w, w), "layer norm");
        }
        for (affine, d_in, d_out) in
            [(p.query, w, w), (p.key, w, w), (p.value, w, w), (p.output, w, w), (p.ff_in, w, h), (p.ff_out, h, w)]
        {
            assert_eq!((affine.weight.len(), affine.bias.len()), (d_in * d_out, d_out), "linear {d_in} -> {d_out}");
        }
    }

    /// The layer's output, and what its backward pass needs. Panics on slices of other lengths:
    /// callers pass tensors whose shapes they built.
    pub(crate) fn forward(&self, x: &[f32], p: &Params<'_>) -> (Vec<f32>, Saved) {
        self.check(x, p);
        let (n, w, h) = (self.rows(), self.width, self.hidden());
        let (attn_in, attn_hat, attn_rstd) = layer_norm(x, w, p.norm_attn);

        let qkv_weight = p.qkv_weight(w);
        let qkv_bias = [p.query.bias, p.key.bias, p.value.bias].concat();
        let mut qkv = broadcast_rows(&qkv_bias, n);
        add_product(&mut qkv, &attn_in, &qkv_weight, n, w, 3 * w);
        let (context, probs) = self.attention(&qkv);

        let mut x1 = plus_rows(x, p.output.bias);
        add_product(&mut x1, &context, p.output.weight, n, w, w);

        let (ff_in, ff_hat, ff_rstd) = layer_norm(&x1, w, p.norm_ff);
        let mut hidden_pre = broadcast_rows(p.ff_in.bias, n);
        add_product(&mut hidden_pre, &ff_in, p.ff_in.weight, n, w, h);
        let mut hidden = take(hidden_pre.len());
        hidden.par_chunks_mut(h).zip(hidden_pre.par_chunks(h)).with_min_len(MIN_ROWS).for_each(|(out, pre)| {
            zip_apply(out, pre, |_, v| gelu(v));
        });

        let mut y = plus_rows(&x1, p.ff_out.bias);
        give(x1);
        add_product(&mut y, &hidden, p.ff_out.weight, n, h, w);

        let saved =
            Saved { attn_hat, attn_in, attn_rstd, qkv, probs, context, ff_hat, ff_in, ff_rstd, hidden_pre, hidden };
        (y, saved)
    }

    /// Causal self-attention from queries, keys and values side by side: the heads' outputs side
    /// by side [rows, width], and the attention weights.
    fn attention(&self, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (t, w, d) = (self.len, self.width, self.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let mut context = take(self.rows() * w);
        let mut probs = take(self.batch * self.heads * t * t);
        let per_sample = context.par_chunks_mut(t * w).zip(probs.par_chunks_mut(self.heads * t * t));
        per_sample.zip(qkv.par_chunks(t * 3 * w)).for_each(|((context, probs), qkv)| {
            for (head, p) in probs.chunks_mut(t * t).enumerate() {
                let [q, k, v] = [0, w, 2 * w].map(|at| View::strided(&qkv[at + head * d..], t, d, 3 * w));
                // Scores of each block of queries against the keys up to its last one.
                for r in causal_blocks(t) {
                    let scores = ViewMut::new(p, t, t).block(r.clone(), 0..r.end);
                    matmul(scores, q.block(r.clone(), 0..d), k.block(0..r.end, 0..d).t(), scale, false, Threads::One);
                }
                widest(
                    #[inline(always)]
                    || causal_softmax(p, t),
                );
                for r in causal_blocks(t) {
                    let out = ViewMut::strided(&mut context[head * d..], t, d, w).block(r.clone(), 0..d);
                    let weights = View::new(p, t, t).block(r.clone(), 0..r.end);
                    matmul(out, weights, v.block(0..r.end, 0..d), 1.0, false, Threads::One);
                }
            }
        });
        (context, probs)
    }

    /// Gradients from the output's gradient `dy`: the input's (when `want_x`) and every
    /// parameter's. `p` are the parameters the forward pass that saved `s` was given.
    pub(crate) fn backward(
        &self,
        s: &Saved,
        p: &Params<'_>,
        dy: &[f32],
        want_x: bool,
    ) -> (Option<Vec<f32>>, ParamGrads) {
        let (n, w, h) = (self.rows(), self.width, self.hidden());
        assert_eq!(dy.len(), n * w, "output gradient");
        // y = x1 + hidden W_2 + b_2
        let mut g =
            ParamGrads { ff_out: [product_grad(&s.hidden, dy, n, h, w), column_sums(dy, w)], ..ParamGrads::default() };
        let mut d_hidden = input_grad(dy, p.ff_out.weight, n, h, w);
        d_hidden.par_chunks_mut(h).zip(s.hidden_pre.par_chunks(h)).with_min_len(MIN_ROWS).for_each(|(d, pre)| {
            zip_apply(d, pre, |d, v| d * gelu_grad(v));
        });
        // hidden_pre = ff_in W_1 + b_1
        g.ff_in = [product_grad(&s.ff_in, &d_hidden, n, w, h), column_sums(&d_hidden, h)];
        let d_ff_in = input_grad(&d_hidden, p.ff_in.weight, n, w, h);
        give(d_hidden);
        // x1 feeds both the residual and the norm.
        let mut d_x1: Vec<f32> = dy.par_iter().copied().collect();
        g.norm_ff = layer_norm_backward(&d_ff_in, &s.ff_hat, &s.ff_rstd, p.norm_ff.gamma, &mut d_x1);
        give(d_ff_in);

        // x1 = x + context W_o + b_o
        g.output = [product_grad(&s.context, &d_x1, n, w, w), column_sums(&d_x1, w)];
        let d_context = input_grad(&d_x1, p.output.weight, n, w, w);
        let d_qkv = self.attention_backward(s, &d_context);
        give(d_context);

        // qkv = attn_in [W_q W_k W_v] + b
        let d_weight = product_grad(&s.attn_in, &d_qkv, n, w, 3 * w);
        let d_bias = column_sums(&d_qkv, 3 * w);
        let [wq, wk, wv] = [0, 1, 2].map(|i| columns(&d_weight, w, 3 * w, i * w, w));
        give(d_weight);
        let [bq, bk, bv] = [0, 1, 2].map(|i| d_bias[i * w..(i + 1) * w].to_vec());
        (g.query, g.key, g.value) = ([wq, bq], [wk, bk], [wv, bv]);
        let d_attn_in = input_grad(&d_qkv, &p.qkv_weight(w), n, w, 3 * w);
        // x feeds both the residual and the norm.
        let mut d_x = d_x1;
        g.norm_attn = layer_norm_backward(&d_attn_in, &s.attn_hat, &s.attn_rstd, p.norm_attn.gamma, &mut d_x);
        give(d_attn_in);
        give(d_qkv);
        (want_x.then_some(d_x), g)
    }

    /// The gradient of queries, keys and values, side by side, from the heads' outputs'.
    fn attention_backward(&self, s: &Saved, d_context: &[f32]) -> Vec<f32> {
        let (t, w, d) = (self.len, self.width, self.head_dim());
        let scale = 1.0 / (d as f32).sqrt();
        let mut d_qkv = take(self.rows() * 3 * w);
        let per_sample = d_qkv.par_chunks_mut(t * 3 * w).zip(d_context.par_chunks(t * w));
        per_sample.zip(s.qkv.par_chunks(t * 3 * w).zip(s.probs.par_chunks(self.heads * t * t))).for_each(
            |((d_qkv, d_context), (qkv, probs))| {
                let mut d_scores = vec![0.0; t * t];
                for (head, weights) in probs.chunks(t * t).enumerate() {
                    let [q, k, v] = [0, w, 2 * w].map(|at| View::strided(&qkv[at + head * d..], t, d, 3 * w));
                    let d_out = View::strided(&d_context[head * d..], t, d, w);
                    let p = View::new(weights, t, t);
                    let head_of = |at: usize| at + head * d;
                    // A block of keys and values is seen by the queries from its first on.
                    for c in causal_blocks(t) {
                        let dv = ViewMut::strided(&mut d_qkv[head_of(2 * w)..], t, d, 3 * w).block(c.clone(), 0..d);
                        matmul(
                            dv,
                            p.block(c.start..t, c.clone()).t(),
                            d_out.block(c.start..t, 0..d),
                            1.0,
                            false,
                            Threads::One,
                        );
                    }
                    d_scores.fill(0.0);
                    for r in causal_blocks(t) {
                        let ds = ViewMut::new(&mut d_scores, t, t).block(r.clone(), 0..r.end);
                        matmul(ds, d_out.block(r.clone(), 0..d), v.block(0..r.end, 0..d).t(), 1.0, false, Threads::One);
                    }
                    softmax_backward(&mut d_scores, weights, t);
                    let ds = View::new(&d_scores, t, t);
                    for r in causal_blocks(t) {
                        let dq = ViewMut::strided(&mut d_qkv[head_of(0)..], t, d, 3 * w).block(r.clone(), 0..d);
                        matmul(dq, ds.block(r.clone(), 0..r.end), k.block(0..r.end, 0..d), scale, false, Threads::One);
                    }
                    for c in causal_blocks(t) {
                        let dk = ViewMut::strided(&mut d_qkv[head_of(w)..], t, d, 3 * w).block(c.clone(), 0..d);
                        matmul(
                            dk,
                            ds.block(c.start..t, c.clone()).t(),
                            q.block(c.start..t, 0..d),
                            scale,
                            false,
                            Threads::One,
                        );
                    }
                }
            },
        );
        d_qkv
    }
}

/// Positions in blocks of 32: attention computes a block of queries against the keys up to the
/// block's last, about half of the [len, len] products a full matrix would take.
fn causal_blocks(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    const BLOCK: usize = 32;
    (0..len).step_by(BLOCK).map(move |start| start..(start + BLOCK).min(len))
}

/// Row `i` of the [len, len] scores: softmax over positions 0..=i, zero after.
#[inline(always)]
fn causal_softmax(scores: &mut [f32], len: usize) {
    for (i, row) in scores.chunks_mut(len).enumerate() {
        let (seen, future) = row.split_at_mut(i + 1);
        let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for v in seen.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / sum(seen);
        seen.iter_mut().for_each(|v| *v *= inv);
        future.fill(0.0);
    }
}

/// From the gradient of the attention weights `p` to that of the scores, in place:
/// ds_ij = p_ij (dp_ij - sum_k p_ik dp_ik). Zero where `p` is, above the diagonal.
fn softmax_backward(d: &mut [f32], p: &[f32], len: usize) {
    for (d, p) in d.chunks_mut(len).zip(p.chunks(len)) {
        let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
        for (d, &p) in d.iter_mut().zip(p) {
            *d = p * (*d - dot);
        }
    }
}

/// Layer norm over rows of `width`: the output, the normalized input, and 1 / std per row.
fn layer_norm(x: &[f32], width: usize, norm: Norm<'_>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = take(x.len());
    let mut hat = take(x.len());
    let mut rstd = vec![0.0; x.len() / width];
    let outputs = y.par_chunks_mut(width).zip(hat.par_chunks_mut(width)).zip(rstd.par_iter_mut());
    outputs.zip(x.par_chunks(width)).with_min_len(MIN_ROWS).for_each(|(((y, hat), rstd), x)| {
        let mean = x.iter().sum::<f32>() / width as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        *rstd = 1.0 / (var + EPSILON).sqrt();
        for i in 0..width {
            hat[i] = (x[i] - mean) * *rstd;
            y[i] = hat[i] * norm.gamma[i] + norm.beta[i];
        }
    });
    (y, hat, rstd)
}

/// Adds the input gradient of a layer norm, from its output's gradient `dy`, to `dx`; returns
/// the gradients of its scale and shift.
fn layer_norm_backward(dy: &[f32], hat: &[f32], rstd: &[f32], gamma: &[f32], dx: &mut [f32]) -> [Vec<f32>; 2] {
    let width = gamma.len();
    let rows = dx.par_chunks_mut(width).zip(dy.par_chunks(width)).zip(hat.par_chunks(width).zip(rstd.par_iter()));
    rows.with_min_len(MIN_ROWS).for_each(|((dx, dy), (hat, &rstd))| {
        let (mut mean_g, mut mean_gh) = (0.0, 0.0);
        for i in 0..width {
            let g = dy[i] * gamma[i];
            mean_g += g;
            mean_gh += g * hat[i];
        }
        (mean_g, mean_gh) = (mean_g / width as f32, mean_gh / width as f32);
        for i in 0..width {
            dx[i] += rstd * (dy[i] * gamma[i] - mean_g - hat[i] * mean_gh);
        }
    });
    [column_sums_of(dy, Some(hat), width), column_sums(dy, width)]
}

/// The gradient of `W` in `out = input W` ([rows, d_in] x [d_in, d_out]): input^T d_out.
fn product_grad(input: &[f32], d_out: &[f32], rows: usize, d_in: usize, d_outs: usize) -> Vec<f32> {
    let mut g = take(d_in * d_outs);
    let (input, d_out) = (View::new(input, rows, d_in), View::new(d_out, rows, d_outs));
    matmul(ViewMut::new(&mut g, d_in, d_outs), input.t(), d_out, 1.0, false, Threads::All);
    g
}

/// `out += input W`, with `input` [rows, d_in] and `W` [d_in, d_out]: a linear map onto its bias
/// or its residual.
fn add_product(out: &mut [f32], input: &[f32], weight: &[f32], rows: usize, d_in: usize, d_out: usize) {
    let (input, weight) = (View::new(input, rows, d_in), View::new(weight, d_in, d_out));
    matmul(ViewMut::new(out, rows, d_out), input, weight, 1.0, true, Threads::All);
}

/// The gradient of `input` in `out = input W` ([rows, d_in] x [d_in, d_out]): d_out W^T.
fn input_grad(d_out: &[f32], weight: &[f32], rows: usize, d_in: usize, d_outs: usize) -> Vec<f32> {
    let mut g = take(rows * d_in);
    let (d_out, weight) = (View::new(d_out, rows, d_outs), View::new(weight, d_in, d_outs));
    matmul(ViewMut::new(&mut g, rows, d_in), d_out, weight.t(), 1.0, false, Threads::All);
    g
}

/// Rows per partial sum of a column sum: fixed, so the order of additions, and so the result,
/// does not depend on how many threads there are.
const SUM_ROWS: usize = 256;

/// Sums over rows of `x` (of `x * y` element-wise, when given): a bias's or a scale's gradient.
fn column_sums_of(x: &[f32], y: Option<&[f32]>, width: usize) -> Vec<f32> {
    let block = SUM_ROWS * width;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(block)
        .enumerate()
        .map(|(i, x)| {
            let mut sums = vec![0.0; width];
            match y {
                None => x.chunks(width).for_each(|row| sums.iter_mut().zip(row).for_each(|(s, v)| *s += v)),
                Some(y) => {
                    for (row, other) in x.chunks(width).zip(y[i * block..][..x.len()].chunks(width)) {
                        sums.iter_mut().zip(row).zip(other).for_each(|((s, a), b)| *s += a * b);
                    }
                }
            }
            sums
        })
        .collect();
    let mut total = vec![0.0; width];
    for partial in partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    total
}

fn column_sums(x: &[f32], width: usize) -> Vec<f32> {
    column_sums_of(x, None, width)
}

/// `rows` copies of `row`: an output that starts as its bias.
fn broadcast_rows(row: &[f32], rows: usize) -> Vec<f32> {
    let mut out = take(rows * row.len());
    out.par_chunks_mut(row.len()).with_min_len(MIN_ROWS).for_each(|r| r.copy_from_slice(row));
    out
}

/// `x` with `row` added to each of its rows.
fn plus_rows(x: &[f32], row: &[f32]) -> Vec<f32> {
    let mut out = take(x.len());
    let rows = out.par_chunks_mut(row.len()).zip(x.par_chunks(row.len()));
    rows.with_min_len(MIN_ROWS).for_each(|(out, x)| {
        out.iter_mut().zip(x).zip(row).for_each(|((o, x), b)| *o = x + b);
    });
    out
}

/// Matrices of `rows` rows side by side: [rows, sum of their widths], each packed.
fn side_by_side(parts: &[&[f32]], rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for r in 0..rows {
        for part in parts {
            let cols = part.len() / rows;
            out.extend_from_slice(&part[r * cols..(r + 1) * cols]);
        }
    }
    out
}

/// Columns `from..from + count` of a [rows, width] matrix, packed.
fn columns(x: &[f32], rows: usize, width: usize, from: usize, count: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| x[r * width + from..][..count].iter().copied()).collect()
}
