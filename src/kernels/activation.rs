//! GELU (the exact, erf form), forward and backward side by side, for the executor and the
//! training engine.
//!
//! `gelu(x) = x · Φ(x) = x/2 · (1 + erf(x/√2))`, which is what ONNX's `Gelu` (opset 20,
//! `approximate="none"`), PyTorch's `nn.GELU()` and the `Div → Erf → Add → Mul → Mul` chain
//! PyTorch exports at opset 13 compute. Rust's standard library has no `erf`, and calling
//! libm's `exp` once per value costs more than the convolution that produced the value, so
//! both are written here without branches: the loops over slices vectorise.

/// `e^x` for `x` in f32's range, within 3 ulp: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, a
/// degree-7 Taylor polynomial for `e^r`, and `2^n` put into the exponent bits. Inputs are
/// clamped to `[-87, 88]`, so tiny results flush to about 1.6e-38 instead of denormals and
/// huge ones to 1.65e38 instead of infinity (neither reaches the activations below).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, so that n·LN2_HI is exact for the |n| ≤ 127 used here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (and vectorises).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The error function within 2.5e-7 (absolute). Below |x| = 0.75 its Maclaurin series to the
/// x¹⁷ term (truncation error < 1e-9); above, Abramowitz & Stegun's formula 7.1.26,
/// `1 − t·P(t)·e^(−x²)` with `t = 1/(1 + 0.3275911·|x|)` (error ≤ 1.5e-7), which near zero
/// would lose digits to the cancellation in `1 − …`. Both are computed and one is selected,
/// so loops over this vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    // 2/√π · (−1)ⁿ / (n!·(2n+1)), n = 8 down to 0.
    const SERIES: [f32; 9] = [
        1.646_211_4e-6,
        -1.492_565e-5,
        1.205_533_3e-4,
        -8.548_327e-4,
        5.223_977_6e-3,
        -2.686_617_1e-2,
        0.112_837_92,
        -0.376_126_4,
        std::f32::consts::FRAC_2_SQRT_PI,
    ];
    let x2 = a * a;
    let small = a * SERIES.iter().fold(0.0, |p, &c| p * x2 + c);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4;
    p = p * t - 1.453_152;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let large = 1.0 - p * t * exp(-x2);
    let y = if a < 0.75 { small } else { large };
    y.copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density at 0.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `x · Φ(x)`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// The derivative of [`gelu`]: `Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

/// [`gelu`] and [`gelu_grad`] together, sharing the error function: the same expressions, so
/// the same bits as calling both. The training engine's forward pass keeps the gradient for
/// its backward pass, which then evaluates no error function.
#[inline(always)]
pub fn gelu_and_grad(x: f32) -> (f32, f32) {
    let e = erf(x * FRAC_1_SQRT_2);
    (
        0.5 * x * (1.0 + e),
        0.5 * (1.0 + e) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x),
    )
}

/// [`gelu`] over a slice, in place.
pub fn gelu_in_place(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = gelu(*v));
}

/// Backward of [`gelu_in_place`]: `grad[i] *= gelu'(input[i])`, where `input` is what the
/// forward pass read.
pub fn gelu_backward(input: &[f32], grad: &mut [f32]) {
    assert_eq!(input.len(), grad.len(), "gelu_backward: lengths differ");
    grad.iter_mut()
        .zip(input)
        .for_each(|(g, &x)| *g *= gelu_grad(x));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64 by its Maclaurin series, exact to ~1e-11 for |x| ≤ 4 (the largest term
    /// there is ~1e5); beyond 4, erf is 1 to within 2e-8.
    fn erf_reference(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let mut term = x; // (-1)^n x^(2n+1) / n!
        let mut sum = 0.0;
        for n in 0..200 {
            let add = term / (2 * n + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid() -> impl Iterator<Item = f32> {
        (-12_000..=12_000)
            .map(|i| i as f32 * 1e-3)
            .chain([0.0, -0.0, 1e-30, -1e-30, 1e-6, 50.0, -50.0, 1e4, -1e4])
    }

    #[test]
    fn exp_is_within_three_ulp_over_the_range_used() {
        for i in -8_700..=8_800 {
            let x = i as f32 * 1e-2;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(
                ((got - want) / want).abs() < 3.6e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn erf_is_within_2_5e7_of_the_series() {
        let mut worst = 0f64;
        for x in grid() {
            let err = (erf(x) as f64 - erf_reference(x as f64)).abs();
            worst = worst.max(err);
            assert!(err < 2.5e-7, "erf({x}) = {}, error {err}", erf(x));
        }
        assert_eq!(erf(0.0), 0.0);
        assert!(worst > 0.0, "the comparison compared nothing");
        // Odd, exactly.
        for x in grid() {
            assert_eq!(erf(-x), -erf(x), "erf(-{x})");
        }
    }

    #[test]
    fn gelu_matches_its_definition_and_limits() {
        for x in grid() {
            let xd = x as f64;
            let want = 0.5 * xd * (1.0 + erf_reference(xd / 2f64.sqrt()));
            let got = gelu(x) as f64;
            assert!(
                (got - want).abs() <= 2.5e-7 * xd.abs().max(1.0),
                "gelu({x}) = {got}, want {want}"
            );
        }
        assert_eq!(gelu(10.0), 10.0);
        assert_eq!(gelu(-10.0), 0.0);
        // The minimum, at x ≈ -0.7518, is ≈ -0.16997.
        assert!((gelu(-0.7518) + 0.169_97).abs() < 1e-5);
    }

    #[test]
    fn gelu_grad_matches_the_derivative_and_finite_differences() {
        let f = |x: f64| 0.5 * x * (1.0 + erf_reference(x / 2f64.sqrt()));
        for i in -600..=600 {
            let x = i as f64 * 1e-2;
            let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let analytic = 0.5 * (1.0 + erf_reference(x / 2f64.sqrt())) + x * density;
            let h = 1e-4;
            let finite = (f(x + h) - f(x - h)) / (2.0 * h);
            assert!(
                (analytic - finite).abs() < 1e-6,
                "gelu'({x}): formula {analytic}, finite difference {finite}"
            );
            let got = gelu_grad(x as f32) as f64;
            assert!(
                (got - analytic).abs() < 1e-6,
                "gelu'({x}) = {got}, want {analytic}"
            );
        }
    }

    /// The shared evaluation is bit for bit the two separate ones (the training engine's
    /// golden hashes depend on it).
    #[test]
    fn gelu_and_grad_equal_the_separate_functions() {
        for x in grid() {
            let (f, d) = gelu_and_grad(x);
            assert_eq!(f.to_bits(), gelu(x).to_bits(), "gelu({x})");
            assert_eq!(d.to_bits(), gelu_grad(x).to_bits(), "gelu'({x})");
        }
    }

    #[test]
    fn slice_forms_apply_the_scalar_ones() {
        let input: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let mut y = input.clone();
        gelu_in_place(&mut y);
        let mut g = vec![2.0f32; input.len()];
        gelu_backward(&input, &mut g);
        for (i, &x) in input.iter().enumerate() {
            assert_eq!(y[i], gelu(x));
            assert_eq!(g[i], 2.0 * gelu_grad(x));
        }
    }
}
