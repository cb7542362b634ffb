//! The element-wise functions of the transformer's kernels, written so the compiler vectorizes
//! their loops: no calls into libm, no branches, float-to-int conversions done on the bits.
//! A libm `expf` per element would cost the feed-forward's GELU as much as its matrix products.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts, so `x - n ln 2` loses nothing to rounding for the `n` that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds a float below 2^22 in magnitude to an integer, and leaves that
/// integer in the low bits of the sum.
const ROUND: f32 = 12_582_912.0;

/// e^x, within about 2 units in the last place for x in [-87, 88] (clamped to that range: the
/// kernels never need more). e^x = 2^n e^r with |r| <= ln 2 / 2, and e^r by its Taylor series to
/// r^6 (the next term is below 1.2e-7 relative).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The integer n sits in the low bits of `shifted`; 2^n is n + 127 in the exponent field.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// The error function, within 5e-7 in f32 arithmetic (Abramowitz and Stegun, Handbook of Mathematical Functions,
/// formula 7.1.26), odd by construction.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// GELU as burn and PyTorch define it by default: x Phi(x), with the exact normal CDF.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// The derivative of [`gelu`]: Phi(x) + x phi(x).
#[inline(always)]
pub(crate) fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

/// Runs `f` compiled for the widest vector unit this CPU has (AVX-512, AVX2, or the baseline's
/// SSE2): `f` (a closure marked `#[inline(always)]`, or it is compiled once, for the baseline)
/// and what it inlines are compiled into each. The same IEEE operations in any width
/// give the same bits (nothing is fused), so the choice never changes a result.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { with_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `out[i] = op(out[i], x[i])`, on the widest vector unit.
pub(crate) fn zip_apply(out: &mut [f32], x: &[f32], op: impl Fn(f32, f32) -> f32) {
    assert_eq!(out.len(), x.len());
    widest(
        #[inline(always)]
        || {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = op(*o, v);
            }
        },
    )
}

/// The sum of `values`, over eight running sums (so the loop vectorizes) added in a fixed order.
#[inline(always)]
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> impl Iterator<Item = f32> {
        (-8000..=8000).map(|i| i as f32 / 1000.0)
    }

    #[test]
    fn zip_apply_and_sum_compute_what_plain_loops_do() {
        let x: Vec<f32> = grid().step_by(13).collect();
        let mut out = vec![2.0; x.len()];
        zip_apply(&mut out, &x, |o, v| o * gelu(v));
        for (o, v) in out.iter().zip(&x) {
            assert_eq!(o.to_bits(), (2.0 * gelu(*v)).to_bits(), "at {v}");
        }
        let values: Vec<f32> = (0..1003).map(|i| i as f32 * 0.5).collect();
        assert_eq!(sum(&values), 1003.0 * 1002.0 / 4.0);
    }

    #[test]
    fn exp_is_within_a_few_ulps() {
        for x in (-8700..=8800).map(|i| i as f32 / 100.0) {
            let (ours, libm) = (exp(x), x.exp());
            assert!((ours - libm).abs() <= 3.0 * f32::EPSILON * libm, "exp({x}): {ours} vs {libm}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0), "clamped");
    }

    #[test]
    fn erf_matches_the_series_in_f64() {
        // erf by its Taylor series in f64 for |x| <= 3; beyond, 1 - erfc by erfc's asymptotic
        // series (its first omitted term is below 1e-8 there).
        let reference = |x: f64| -> f64 {
            let a = x.abs();
            if a > 3.0 {
                let s = 1.0 / (2.0 * a * a);
                let erfc =
                    (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * (1.0 - s + 3.0 * s * s - 15.0 * s * s * s);
                return x.signum() * (1.0 - erfc);
            }
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        for x in grid() {
            let (ours, exact) = (erf(x) as f64, reference(x as f64));
            assert!((ours - exact).abs() < 5e-7, "erf({x}): {ours} vs {exact}");
        }
    }

    #[test]
    fn gelu_grad_is_the_derivative_of_gelu() {
        for x in grid().step_by(7) {
            let h = 1e-2;
            let numeric = (gelu(x + h) as f64 - gelu(x - h) as f64) / (2.0 * h as f64);
            assert!((gelu_grad(x) as f64 - numeric).abs() < 2e-3, "at {x}: {} vs {numeric}", gelu_grad(x));
        }
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(3.0) - 3.0 * 0.998_650_1).abs() < 1e-5);
    }
}
