//! Matrix products on `f32` slices for the hand-written CPU kernels, through the `gemm` crate:
//! its AVX-512 and AVX2/FMA kernels are picked at run time, and a product may use every core
//! (rayon). ndarray's products (matrixmultiply) have AVX2 kernels only and one thread, which
//! left the transformer at a fifth of PyTorch's speed on these machines.
//!
//! A view is a matrix laid over a slice with a stride for rows and one for columns, so a
//! transpose, a column block (one attention head) or a row block is a view, not a copy.

use std::ops::Range;

use gemm::Parallelism;

/// A matrix read from a slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A matrix written into a slice.
#[derive(Debug)]
pub(crate) struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

/// The last element a view reaches must be inside its slice: `gemm` takes raw pointers.
fn check_fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
        assert!(last < len, "a {rows}x{cols} view (strides {row_stride}, {col_stride}) overruns {len} values");
    }
}

impl<'a> View<'a> {
    /// `rows` x `cols`, row-major, packed.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View::strided(data, rows, cols, cols)
    }

    /// `rows` x `cols` from the start of `data`, each row `row_stride` values after the last.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> View<'a> {
        check_fits(data.len(), rows, cols, row_stride, 1);
        View { data, rows, cols, row_stride, col_stride: 1 }
    }

    /// Rows `rows` and columns `cols` of this view.
    pub(crate) fn block(self, rows: Range<usize>, cols: Range<usize>) -> View<'a> {
        assert!(rows.end <= self.rows && cols.end <= self.cols, "a block past its view");
        let (n_rows, n_cols) = (rows.len(), cols.len());
        if n_rows == 0 || n_cols == 0 {
            return View { data: &[], rows: n_rows, cols: n_cols, ..self };
        }
        let data = &self.data[rows.start * self.row_stride + cols.start * self.col_stride..];
        check_fits(data.len(), n_rows, n_cols, self.row_stride, self.col_stride);
        View { data, rows: n_rows, cols: n_cols, ..self }
    }

    /// The transpose, over the same values.
    pub(crate) fn t(self) -> View<'a> {
        View { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

impl<'a> ViewMut<'a> {
    pub(crate) fn new(data: &'a mut [f32], rows: usize, cols: usize) -> ViewMut<'a> {
        ViewMut::strided(data, rows, cols, cols)
    }

    pub(crate) fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> ViewMut<'a> {
        check_fits(data.len(), rows, cols, row_stride, 1);
        ViewMut { data, rows, cols, row_stride }
    }

    /// Rows `rows` and columns `cols` of this view.
    pub(crate) fn block(self, rows: Range<usize>, cols: Range<usize>) -> ViewMut<'a> {
        assert!(rows.end <= self.rows && cols.end <= self.cols, "a block past its view");
        if rows.is_empty() || cols.is_empty() {
            return ViewMut { data: &mut [], rows: rows.len(), cols: cols.len(), row_stride: self.row_stride };
        }
        let data = &mut self.data[rows.start * self.row_stride + cols.start..];
        ViewMut::strided(data, rows.len(), cols.len(), self.row_stride)
    }
}

/// Whether one product may spread over the rayon pool: yes for the large products of a whole
/// batch, no inside a task that is itself one of many run in parallel (a head's attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// `out = scale * a * b`, or `out += scale * a * b` when `accumulate`. Each output value is
/// summed in the same order whatever the thread count, so results repeat to the bit.
pub(crate) fn matmul(out: ViewMut<'_>, a: View<'_>, b: View<'_>, scale: f32, accumulate: bool, threads: Threads) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!((out.rows, out.cols), (a.rows, b.cols), "output shape");
    if out.rows == 0 || out.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..out.rows {
                out.data[r * out.row_stride..][..out.cols].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::All => Parallelism::Rayon(0),
        Threads::One => Parallelism::None,
    };
    let stride = |s: usize| s as isize;
    // SAFETY: every view was checked to lie inside its slice, and `out` is borrowed mutably, so
    // it overlaps neither input.
    unsafe {
        gemm::gemm(
            out.rows,
            out.cols,
            a.cols,
            out.data.as_mut_ptr(),
            1,
            stride(out.row_stride),
            accumulate,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn naive(a: View<'_>, b: View<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|k| a.data[i * a.row_stride + k * a.col_stride] * b.data[k * b.row_stride + j * b.col_stride])
                    .sum();
            }
        }
        out
    }

    fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    #[test]
    fn products_of_transposed_and_strided_views_match_the_definition() {
        let mut rng = SplitMix64::for_stream(3, 0);
        let (a, b) = (random(&mut rng, 7 * 5), random(&mut rng, 9 * 5));
        // a [7, 5] times b's transpose [5, 9] read from a [9, 5] slice.
        let (va, vb) = (View::new(&a, 7, 5), View::new(&b, 9, 5).t());
        let mut out = vec![1.0; 7 * 9];
        matmul(ViewMut::new(&mut out, 7, 9), va, vb, 2.0, false, Threads::All);
        for (x, y) in out.iter().zip(naive(va, vb)) {
            assert!((x - 2.0 * y).abs() < 1e-5, "{x} vs 2 * {y}");
        }
        // Columns 2..5 of a row-strided block, accumulated onto what is there.
        let cols = View::strided(&a[2..], 7, 3, 5);
        let c = random(&mut rng, 3 * 4);
        let mut acc = vec![0.5; 7 * 4];
        matmul(ViewMut::new(&mut acc, 7, 4), cols, View::new(&c, 3, 4), 1.0, true, Threads::One);
        for (x, y) in acc.iter().zip(naive(cols, View::new(&c, 3, 4))) {
            assert!((x - 0.5 - y).abs() < 1e-5);
        }
    }

    #[test]
    fn a_block_of_a_transposed_view_is_the_transposed_block() {
        let x: Vec<f32> = (0..20).map(|v| v as f32).collect();
        // x as [4, 5]; its transpose [5, 4]; rows 1..3 and columns 2..4 of that are x[2..4][1..3].
        let b = View::new(&x, 4, 5).t().block(1..3, 2..4);
        let ones = [1.0; 2];
        let mut out = [0.0; 2];
        matmul(ViewMut::new(&mut out, 2, 1), b, View::new(&ones, 2, 1), 1.0, false, Threads::One);
        assert_eq!(out, [x[2 * 5 + 1] + x[3 * 5 + 1], x[2 * 5 + 2] + x[3 * 5 + 2]]);
        let mut y = vec![0.0; 20];
        let block = ViewMut::new(&mut y, 4, 5).block(1..3, 3..5);
        matmul(block, View::new(&ones, 2, 1), View::new(&ones, 1, 2), 1.0, false, Threads::One);
        assert_eq!(y.iter().sum::<f32>(), 4.0);
        assert_eq!([y[8], y[9], y[13], y[14]], [1.0; 4]);
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_its_slice_is_refused() {
        View::strided(&[0.0; 10], 3, 3, 4);
    }
}
