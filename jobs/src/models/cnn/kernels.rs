//! Hand-written CPU kernels for the CNN's conv block: a 3x3 convolution with zero padding, bias,
//! ReLU and 2x2 max pooling, forward and backward, on plain `f32` slices.
//!
//! Why: composed from burn's ndarray ops (im2col from nine slices, a batched matmul, pooling as
//! two `max_dim`s) the CNN trained at 0.16x PyTorch's CPU speed, its time in element-wise copies
//! and the gather/scatter of pooling. Here each matrix product (one forward, two backward) covers
//! the whole batch, and pooling keeps the index of each window's maximum for its backward pass.
//!
//! Layout: `x` is [n, c_in, h, w], the weight [c_out, c_in, 3, 3], the output [n, c_out, h/2, w/2],
//! all row-major, as burn and PyTorch keep them.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

/// A window whose maximum plus bias was not positive: ReLU zeroed it, so no gradient flows back.
const DEAD: u32 = u32::MAX;

/// The shapes of one conv block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub n: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

/// What the backward pass needs from the forward pass.
#[derive(Debug, Clone)]
pub(crate) struct Saved {
    /// The input unfolded: [c_in * 9, n * h * w].
    cols: Vec<f32>,
    /// For each output, where in its sample's [h * w] plane the maximum was, or `DEAD`.
    argmax: Vec<u32>,
}

/// Gradients of a block's inputs.
#[derive(Debug)]
pub(crate) struct Grads {
    /// With respect to the input, when asked for.
    pub x: Option<Vec<f32>>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Block {
    fn k(&self) -> usize {
        self.c_in * 9
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// Columns of the convolution's matrix product: one per (sample, pixel).
    fn columns(&self) -> usize {
        self.n * self.plane()
    }

    pub(crate) fn input_len(&self) -> usize {
        self.n * self.c_in * self.plane()
    }

    pub(crate) fn output_dims(&self) -> [usize; 4] {
        [self.n, self.c_out, self.h / 2, self.w / 2]
    }

    fn output_len(&self) -> usize {
        self.output_dims().iter().product()
    }

    /// Output and what the backward pass needs. Panics on slices of other lengths or odd
    /// sides: callers pass tensors whose shapes they built.
    pub(crate) fn forward(&self, x: &[f32], weight: &[f32], bias: &[f32]) -> (Vec<f32>, Saved) {
        assert!(self.h.is_multiple_of(2) && self.w.is_multiple_of(2), "2x2 pooling needs even sides");
        assert_eq!(x.len(), self.input_len());
        assert_eq!(weight.len(), self.c_out * self.k());
        assert_eq!(bias.len(), self.c_out);
        let cols = self.im2col(x);
        let mut pre = vec![0.0; self.c_out * self.columns()];
        general_mat_mul(1.0, &self.weight_view(weight), &self.cols_view(&cols), 0.0, &mut self.pre_view(&mut pre));

        let (oh, ow, plane, columns) = (self.h / 2, self.w / 2, self.plane(), self.columns());
        let mut y = vec![0.0; self.output_len()];
        let mut argmax = vec![DEAD; y.len()];
        for c in 0..self.c_out {
            for n in 0..self.n {
                let pre = &pre[c * columns + n * plane..][..plane];
                let out = (n * self.c_out + c) * oh * ow;
                for oy in 0..oh {
                    for ox in 0..ow {
                        let top = 2 * oy * self.w + 2 * ox;
                        let (mut best, mut max) = (top, pre[top]);
                        // Selects, not branches: which of four random values wins is a coin toss.
                        for at in [top + 1, top + self.w, top + self.w + 1] {
                            let better = pre[at] > max;
                            best = if better { at } else { best };
                            max = if better { pre[at] } else { max };
                        }
                        // ReLU after the maximum: max(relu(a)) == relu(max(a)).
                        let v = max + bias[c];
                        let alive = v > 0.0;
                        y[out + oy * ow + ox] = if alive { v } else { 0.0 };
                        argmax[out + oy * ow + ox] = if alive { best as u32 } else { DEAD };
                    }
                }
            }
        }
        (y, Saved { cols, argmax })
    }

    /// Gradients from the output's gradient `dy`; the input's only when `want_x`.
    pub(crate) fn backward(&self, saved: &Saved, weight: &[f32], dy: &[f32], want_x: bool) -> Grads {
        assert_eq!(dy.len(), self.output_len());
        let (oh, ow, plane, columns) = (self.h / 2, self.w / 2, self.plane(), self.columns());
        // The gradient before pooling: each window's gradient goes to its maximum.
        let mut dpre = vec![0.0; self.c_out * columns];
        let mut bias = vec![0.0; self.c_out];
        for n in 0..self.n {
            for c in 0..self.c_out {
                let out = (n * self.c_out + c) * oh * ow;
                for o in out..out + oh * ow {
                    if saved.argmax[o] != DEAD {
                        dpre[c * columns + n * plane + saved.argmax[o] as usize] = dy[o];
                        bias[c] += dy[o];
                    }
                }
            }
        }
        let dpre_view = ArrayView2::from_shape((self.c_out, columns), &dpre).expect("shape");

        let mut dweight = vec![0.0; weight.len()];
        let mut dweight_view = ArrayViewMut2::from_shape((self.c_out, self.k()), &mut dweight).expect("shape");
        general_mat_mul(1.0, &dpre_view, &self.cols_view(&saved.cols).t(), 0.0, &mut dweight_view);

        let x = want_x.then(|| {
            let mut dcols = vec![0.0; self.k() * columns];
            let mut dcols_view = ArrayViewMut2::from_shape((self.k(), columns), &mut dcols).expect("shape");
            general_mat_mul(1.0, &self.weight_view(weight).t(), &dpre_view, 0.0, &mut dcols_view);
            self.col2im(dcols)
        });
        Grads { x, weight: dweight, bias }
    }

    fn weight_view<'a>(&self, weight: &'a [f32]) -> ArrayView2<'a, f32> {
        ArrayView2::from_shape((self.c_out, self.k()), weight).expect("weight shape")
    }

    fn cols_view<'a>(&self, cols: &'a [f32]) -> ArrayView2<'a, f32> {
        ArrayView2::from_shape((self.k(), self.columns()), cols).expect("columns shape")
    }

    fn pre_view<'a>(&self, pre: &'a mut [f32]) -> ArrayViewMut2<'a, f32> {
        ArrayViewMut2::from_shape((self.c_out, self.columns()), pre).expect("output shape")
    }

    /// Row `ci * 9 + ky * 3 + kx` (the weight's flattening) holds, for every sample and pixel
    /// (y, x), the input at (y + ky - 1, x + kx - 1), zero outside the image.
    fn im2col(&self, x: &[f32]) -> Vec<f32> {
        let (plane, columns, shifts) = (self.plane(), self.columns(), self.shifts());
        let mut cols = vec![0.0; self.k() * columns];
        for ci in 0..self.c_in {
            for (k, shift) in shifts.iter().enumerate() {
                let row = &mut cols[(ci * 9 + k) * columns..][..columns];
                for n in 0..self.n {
                    let src = &x[(n * self.c_in + ci) * plane..][..plane];
                    let dst = &mut row[n * plane..][..plane];
                    dst[shift.dst.clone()].copy_from_slice(&src[shift.src.clone()]);
                    for &p in &shift.wrapped {
                        dst[p] = 0.0;
                    }
                }
            }
        }
        cols
    }

    /// The transpose of `im2col`: each column entry's gradient added back to its input pixel.
    fn col2im(&self, mut dcols: Vec<f32>) -> Vec<f32> {
        let (plane, columns, shifts) = (self.plane(), self.columns(), self.shifts());
        let mut dx = vec![0.0; self.input_len()];
        for n in 0..self.n {
            for ci in 0..self.c_in {
                let dst = &mut dx[(n * self.c_in + ci) * plane..][..plane];
                for (k, shift) in shifts.iter().enumerate() {
                    let src = &mut dcols[(ci * 9 + k) * columns + n * plane..][..plane];
                    // What wrapped around a row's edge was padding: it has no pixel to go to.
                    for &p in &shift.wrapped {
                        src[p] = 0.0;
                    }
                    for (d, s) in dst[shift.src.clone()].iter_mut().zip(&src[shift.dst.clone()]) {
                        *d += s;
                    }
                }
            }
        }
        dx
    }

    /// Each kernel position (ky, kx), in the weight's order, as one shift of the flattened
    /// plane: output pixel `p` reads input pixel `p + (ky - 1) * w + (kx - 1)`. `dst` leaves out
    /// the pixels whose source is above or below the image; of the rest, those at the left or
    /// right edge read across a row boundary (`wrapped`) and stand for padding.
    fn shifts(&self) -> Vec<Shift> {
        let (h, w) = (self.h, self.w);
        offsets()
            .map(|(ky, kx)| {
                let rows = usize::from(ky == 0)..h - usize::from(ky == 2);
                // Clip the first or last pixel where the shifted span leaves the plane.
                let start = (rows.start * w).max((w + 1).saturating_sub(ky * w + kx));
                let end = (rows.end * w).min((h * w + w + 1).saturating_sub(ky * w + kx));
                let src = start + ky * w + kx - (w + 1)..end + ky * w + kx - (w + 1);
                let edge = match kx {
                    0 => Some(0),
                    2 => Some(w - 1),
                    _ => None,
                };
                let wrapped = match edge {
                    Some(x) => rows.map(|y| y * w + x).filter(|p| (start..end).contains(p)).collect(),
                    None => Vec::new(),
                };
                Shift { dst: start..end, src, wrapped }
            })
            .collect()
    }
}

/// One kernel position's copy: `dst` pixels read `src` pixels, one for one, but for `wrapped`.
struct Shift {
    dst: std::ops::Range<usize>,
    src: std::ops::Range<usize>,
    wrapped: Vec<usize>,
}

/// The nine kernel positions, in the weight's order.
fn offsets() -> impl Iterator<Item = (usize, usize)> {
    (0..3).flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    /// The definition, one output at a time.
    fn naive_pre(b: &Block, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut pre = vec![0.0; b.n * b.c_out * b.plane()];
        for n in 0..b.n {
            for co in 0..b.c_out {
                for y in 0..b.h {
                    for xx in 0..b.w {
                        let mut s = bias[co];
                        for ci in 0..b.c_in {
                            for (ky, kx) in offsets() {
                                let (sy, sx) = (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                if sy >= 0 && sx >= 0 && (sy as usize) < b.h && (sx as usize) < b.w {
                                    let v = x[((n * b.c_in + ci) * b.h + sy as usize) * b.w + sx as usize];
                                    s += v * weight[(co * b.c_in + ci) * 9 + ky * 3 + kx];
                                }
                            }
                        }
                        pre[((n * b.c_out + co) * b.h + y) * b.w + xx] = s;
                    }
                }
            }
        }
        pre
    }

    fn naive(b: &Block, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
        let pre = naive_pre(b, x, weight, bias);
        let (oh, ow) = (b.h / 2, b.w / 2);
        let mut y = vec![0.0; b.output_len()];
        for p in 0..b.n * b.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let at = |dy: usize, dx: usize| pre[(p * b.h + 2 * oy + dy) * b.w + 2 * ox + dx].max(0.0);
                    y[(p * oh + oy) * ow + ox] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                }
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    const BLOCK: Block = Block { n: 3, c_in: 2, c_out: 4, h: 6, w: 4 };

    #[test]
    fn forward_matches_the_definition() {
        let mut rng = SplitMix64::for_stream(7, 0);
        let b = BLOCK;
        let (x, w, bias) = (random(&mut rng, b.input_len()), random(&mut rng, b.c_out * 18), random(&mut rng, 4));
        let (y, _) = b.forward(&x, &w, &bias);
        close(&y, &naive(&b, &x, &w, &bias), 1e-5);
        assert!(y.contains(&0.0) && y.iter().any(|v| *v > 0.0), "both ReLU branches are exercised");
    }

    /// Each gradient against a central difference of the loss sum(dy * y).
    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = SplitMix64::for_stream(8, 0);
        let b = BLOCK;
        let (x, w, bias) = (random(&mut rng, b.input_len()), random(&mut rng, b.c_out * 18), random(&mut rng, 4));
        let dy = random(&mut rng, b.output_len());
        let loss = |x: &[f32], w: &[f32], bias: &[f32]| -> f64 {
            naive(&b, x, w, bias).iter().zip(&dy).map(|(y, g)| f64::from(*y) * f64::from(*g)).sum()
        };
        let (_, saved) = b.forward(&x, &w, &bias);
        let grads = b.backward(&saved, &w, &dy, true);
        let eps = 1e-3f32;
        let numeric = |v: &[f32], i: usize, f: &dyn Fn(&[f32]) -> f64| -> f32 {
            let (mut up, mut down) = (v.to_vec(), v.to_vec());
            up[i] += eps;
            down[i] -= eps;
            ((f(&up) - f(&down)) / (2.0 * f64::from(eps))) as f32
        };
        let dx: Vec<f32> = (0..x.len()).map(|i| numeric(&x, i, &|v| loss(v, &w, &bias))).collect();
        let dw: Vec<f32> = (0..w.len()).map(|i| numeric(&w, i, &|v| loss(&x, v, &bias))).collect();
        let db: Vec<f32> = (0..bias.len()).map(|i| numeric(&bias, i, &|v| loss(&x, &w, v))).collect();
        close(grads.x.as_ref().unwrap(), &dx, 2e-2);
        close(&grads.weight, &dw, 2e-2);
        close(&grads.bias, &db, 2e-2);
        assert!(b.backward(&saved, &w, &dy, false).x.is_none());
    }
}
