//! The engine's layers, each forward pass beside its backward pass. Everything is
//! channels-last (NHWC), over caller-owned buffers.
//!
//! Padding is decided by the consumer: a 3×3 convolution reads its input from a buffer with a
//! one-pixel zero border, so whatever feeds a convolution (the input stage, a batch-norm
//! layer) writes into the interior of such a buffer, and the layer after a convolution
//! (always batch-norm) writes the convolution's output gradient the same way. Padded buffers
//! only ever have their interiors written, and every image keeps its place when the batch
//! size changes, so borders stay zero between steps.

use crate::models::custom_ops::{batch_stats, ordered_sums};
use fmnist::kernels::activation::{gelu, gelu_grad};
use fmnist::kernels::{
    conv_bias_act, matmul_bias_act, outer_sum, sgemm_strided, Mat, PackedB, Windows,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Output rows of a convolution per parallel task.
const CONV_ROWS: usize = 256;
/// Images per parallel task in the per-image passes and per partial weight gradient.
const IMAGES_PER_TASK: usize = 8;

/// The activation after batch-norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    Relu,
    /// Exact GELU, `x·Φ(x)` (the erf form).
    Gelu,
}

/// An activation as the fused passes need it: its value, and the gradient that passes
/// through it. Monomorphised, so the inner loops carry no branch on the kind.
trait Activation: Sync {
    fn f(u: f32) -> f32;
    /// `g · f'(u)`. ReLU passes `g` itself or zero (not `g · 1.0`), which keeps its
    /// gradients bit for bit what they were before GELU existed.
    fn pass(g: f32, u: f32) -> f32;
}

struct Relu;
impl Activation for Relu {
    #[inline(always)]
    fn f(u: f32) -> f32 {
        u.max(0.0)
    }
    #[inline(always)]
    fn pass(g: f32, u: f32) -> f32 {
        if u > 0.0 {
            g
        } else {
            0.0
        }
    }
}

struct Gelu;
impl Activation for Gelu {
    #[inline(always)]
    fn f(u: f32) -> f32 {
        gelu(u)
    }
    #[inline(always)]
    fn pass(g: f32, u: f32) -> f32 {
        g * gelu_grad(u)
    }
}

pub(crate) fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut Vec<T> {
    v.resize(n, T::default());
    v
}

// ---- 3×3 convolution (same size, stride 1, no bias: the batch-norm shift is the bias) ----

/// Convolution weights `[cout, 3, 3, cin]` as the kernel's `[9·cin, cout]` operand.
pub fn pack_conv(w: &[f32], cout: usize, cin: usize) -> PackedB {
    let k = 9 * cin;
    let mut plain = vec![0f32; k * cout];
    for o in 0..cout {
        for (j, v) in w[o * k..(o + 1) * k].iter().enumerate() {
            plain[j * cout + o] = *v;
        }
    }
    PackedB::new(plain, k, cout)
}

/// The weights of the input gradient's convolution: taps flipped, input and output channels
/// swapped, as a `[9·cout, cin]` operand.
pub fn pack_conv_flipped(w: &[f32], cout: usize, cin: usize) -> PackedB {
    let mut plain = vec![0f32; 9 * cout * cin];
    for o in 0..cout {
        for tap in 0..9 {
            let src = &w[(o * 9 + tap) * cin..(o * 9 + tap + 1) * cin];
            let row = (8 - tap) * cout + o;
            plain[row * cin..(row + 1) * cin].copy_from_slice(src);
        }
    }
    PackedB::new(plain, 9 * cout, cin)
}

/// Forward: same-size 3×3 convolution of `n` padded images `[h+2, w+2, cin]` into rows
/// `[n·h·w, packed.n()]`. Backward of the input is the same call on the padded output
/// gradient with [`pack_conv_flipped`] weights.
pub fn conv3x3(
    src: &[f32],
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    packed: &PackedB,
    out: &mut [f32],
) {
    let win = Windows {
        ohw: h * w,
        ow: w,
        img_stride: (h + 2) * (w + 2) * cin,
        row_step: (w + 2) * cin,
        col_step: cin,
        segs: 3,
        seg_len: 3 * cin,
        seg_stride: (w + 2) * cin,
    };
    let cout = packed.n();
    let zero = vec![0f32; cout];
    out[..n * h * w * cout]
        .par_chunks_mut(CONV_ROWS * cout)
        .enumerate()
        .for_each(|(t, o)| {
            conv_bias_act(
                src,
                &win,
                t * CONV_ROWS,
                o.len() / cout,
                packed,
                &zero,
                false,
                o,
            );
        });
}

/// Backward of the weights: `[cout, 3, 3, cin]` from the padded output gradient `dzp` (`n`
/// images `[h+2, w+2, cout]`, zero border) and the padded input `xpad` (`[h+2, w+2, cin]`).
/// In the flattened padded grid, kernel row `ky` pairs output row `r` with the `3·cin`
/// consecutive input values starting at row `r + (ky−1)·(w+2) − 1`, read in place (row `r`'s
/// run starts `cin` values after row `r − 1`'s). The zero border makes every pairing that
/// crosses an image edge vanish, so each kernel row is one sum of outer products over all
/// rows at once, with no im2col matrix. Partial sums per chunk of images are added in order,
/// so the result does not depend on the number of threads.
pub fn conv3x3_weight_grad(
    dzp: &[f32],
    xpad: &[f32],
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
) -> Vec<f32> {
    let wp = w + 2;
    let per_img = (h + 2) * wp;
    let margin = wp + 1;
    let rows = n * per_img;
    let span = 3 * cin;
    let partial: Vec<Vec<f32>> = (0..n.div_ceil(IMAGES_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let ra = (t * IMAGES_PER_TASK * per_img).max(margin);
            let rb = ((t + 1) * IMAGES_PER_TASK * per_img).min(rows - margin);
            // [ky][3·cin][cout]
            let mut acc = vec![0f32; 3 * span * cout];
            if rb <= ra {
                return acc;
            }
            for ky in 0..3 {
                let first = (ra + ky * wp - margin) * cin;
                outer_sum(
                    rb - ra,
                    span,
                    &xpad[first..first + (rb - ra - 1) * cin + span],
                    cin,
                    cout,
                    &dzp[ra * cout..rb * cout],
                    cout,
                    &mut acc[ky * span * cout..(ky + 1) * span * cout],
                );
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; 3 * span * cout];
    for p in &partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    // [9·cin][cout] → [cout][9·cin]
    let mut dw = vec![0f32; cout * 3 * span];
    for (j, row) in total.chunks_exact(cout).enumerate() {
        for (o, v) in row.iter().enumerate() {
            dw[o * 3 * span + j] = *v;
        }
    }
    dw
}

// ---- batch-norm + activation (+ 2×2 max-pool), fused ----

/// Batch-norm of one layer during a training step: batch statistics and the affine map
/// `u = z·scale + shift` they give (the same arithmetic as the autograd path's kernel).
#[derive(Default)]
pub struct Bn {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    inv: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    gamma: Vec<f32>,
}

impl Bn {
    pub fn new(z: &[f32], c: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Self {
        let (mean, var) = batch_stats(z, c);
        let inv: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let scale: Vec<f32> = (0..c).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
        let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
        Bn {
            mean,
            var,
            inv,
            scale,
            shift,
            gamma: gamma.to_vec(),
        }
    }
}

/// Shape of a batch-norm layer's input: `n` images of conv rows `[h, w, c]`, and the padding
/// of the buffer its output goes to.
#[derive(Debug, Clone, Copy)]
pub struct BnShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub out_pad: usize,
}

/// Offsets of a 2×2 window's four positions (row-major) from its top-left one, in rows of
/// width `w` with `c` channels.
fn window_offsets(w: usize, c: usize) -> [usize; 4] {
    [0, c, w * c, (w + 1) * c]
}

/// Forward: batch-norm + activation of conv rows `z`, into the interior of `out`
/// (images `[h + 2·pad, w + 2·pad, c]`).
pub fn bn_act(act: super::Act, z: &[f32], s: BnShape, bn: &Bn, out: &mut [f32]) {
    match act {
        Act::Relu => bn_act_with::<Relu>(z, s, bn, out),
        Act::Gelu => bn_act_with::<Gelu>(z, s, bn, out),
    }
}

fn bn_act_with<A: Activation>(z: &[f32], s: BnShape, bn: &Bn, out: &mut [f32]) {
    let BnShape { n, h, w, c, .. } = s;
    let pad = s.out_pad;
    let pw = w + 2 * pad;
    let out_img = (h + 2 * pad) * pw * c;
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    out[..n * out_img]
        .par_chunks_mut(out_img)
        .enumerate()
        .for_each(|(img, o)| {
            let zi = &z[img * h * w * c..(img + 1) * h * w * c];
            for y in 0..h {
                let ob = ((y + pad) * pw + pad) * c;
                let o = &mut o[ob..ob + w * c];
                let zr = &zi[y * w * c..(y + 1) * w * c];
                for (o, z) in o.chunks_exact_mut(c).zip(zr.chunks_exact(c)) {
                    for ch in 0..c {
                        o[ch] = A::f(z[ch] * sc[ch] + sh[ch]);
                    }
                }
            }
        });
}

/// Forward: batch-norm + activation + 2×2 max-pool of conv rows `z`, into the interior of
/// `out` (images `[⌊h/2⌋ + 2·pad, ⌊w/2⌋ + 2·pad, c]`; an odd side's last row or column is
/// dropped, as PyTorch and ONNX pool), keeping which of the four window positions (row-major,
/// the first on ties) won and its conv value (`zsel`).
pub fn bn_act_pool(
    act: Act,
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [f32],
    arg: &mut [u8],
    zsel: &mut [f32],
) {
    match act {
        Act::Relu => bn_act_pool_with::<Relu>(z, s, bn, out, arg, zsel),
        Act::Gelu => bn_act_pool_with::<Gelu>(z, s, bn, out, arg, zsel),
    }
}

fn bn_act_pool_with<A: Activation>(
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [f32],
    arg: &mut [u8],
    zsel: &mut [f32],
) {
    let BnShape { n, h, w, c, .. } = s;
    let pad = s.out_pad;
    let (oh, ow) = (h / 2, w / 2);
    let pw = ow + 2 * pad;
    let out_img = (oh + 2 * pad) * pw * c;
    let offs = window_offsets(w, c);
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    out[..n * out_img]
        .par_chunks_mut(out_img)
        .zip(arg[..n * oh * ow * c].par_chunks_mut(oh * ow * c))
        .zip(zsel[..n * oh * ow * c].par_chunks_mut(oh * ow * c))
        .enumerate()
        .for_each(|(img, ((o, a), zs))| {
            let zi = &z[img * h * w * c..(img + 1) * h * w * c];
            for oy in 0..oh {
                for ox in 0..ow {
                    let top = (2 * oy * w + 2 * ox) * c;
                    let zq = offs.map(|d| &zi[top + d..top + d + c]);
                    let ob = ((oy + pad) * pw + ox + pad) * c;
                    let o = &mut o[ob..ob + c];
                    let a = &mut a[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                    let zs = &mut zs[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                    for ch in 0..c {
                        let (mut best, mut k, mut zb) = (f32::NEG_INFINITY, 0u8, 0.0);
                        for (q, zq) in zq.iter().enumerate() {
                            let (z, x) = (zq[ch], A::f(zq[ch] * sc[ch] + sh[ch]));
                            let better = x > best;
                            best = if better { x } else { best };
                            k = if better { q as u8 } else { k };
                            zb = if better { z } else { zb };
                        }
                        o[ch] = best;
                        a[ch] = k;
                        zs[ch] = zb;
                    }
                }
            }
        });
}

/// The per-channel map from `g'` (the gradient reaching `u = z·scale + shift`, summed as Σg'
/// and Σg'·(z − μ) over `m` rows) to the conv rows' gradient: `dz = a·g' + b + e·z`, from
/// `dz = γ·inv/M · (M·g' − Σg' − x̂·Σg'x̂)` with `x̂ = (z − μ)·inv`. Returns (a, b, e, dγ, dβ).
#[allow(clippy::type_complexity)]
fn bn_backward_coefficients(
    bn: &Bn,
    partial: &[(Vec<f32>, Vec<f32>)],
    c: usize,
    m: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let (db, dg) = ordered_sums(partial, c);
    let dbeta: Vec<f32> = db.iter().map(|v| *v as f32).collect();
    let dgamma: Vec<f32> = (0..c).map(|i| (dg[i] * bn.inv[i] as f64) as f32).collect();
    let m = m as f32;
    let k: Vec<f32> = (0..c).map(|i| bn.gamma[i] * bn.inv[i] / m).collect();
    let ca: Vec<f32> = (0..c).map(|i| k[i] * m).collect();
    let ce: Vec<f32> = (0..c).map(|i| -k[i] * dgamma[i] * bn.inv[i]).collect();
    let cb: Vec<f32> = (0..c)
        .map(|i| -k[i] * dbeta[i] + k[i] * dgamma[i] * bn.inv[i] * bn.mean[i])
        .collect();
    (ca, cb, ce, dgamma, dbeta)
}

/// Per chunk of rows, Σg' and Σg'·(z − μ) per channel; `g'` comes from `gp(row index, ch)`.
fn bn_partial_sums(
    dy: &[f32],
    z: &[f32],
    c: usize,
    rows_per_task: usize,
    gp: impl Fn(f32, f32, usize) -> f32 + Sync,
    mean: &[f32],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let chunk = rows_per_task * c;
    dy.par_chunks(chunk)
        .zip(z.par_chunks(chunk))
        .map(|(g, zs)| {
            let (mut sg_v, mut sgx_v) = (vec![0f32; c], vec![0f32; c]);
            // Slices of exactly `c` values let the compiler drop bounds checks and vectorise.
            let (sg, sgx) = (&mut sg_v[..c], &mut sgx_v[..c]);
            let mean = &mean[..c];
            for (g, zs) in g.chunks_exact(c).zip(zs.chunks_exact(c)) {
                for ch in 0..c {
                    let gp = gp(g[ch], zs[ch], ch);
                    sg[ch] += gp;
                    sgx[ch] += gp * (zs[ch] - mean[ch]);
                }
            }
            (sg_v, sgx_v)
        })
        .collect()
}

/// Backward of [`bn_act`]: from the output gradient `dy` (`[n, h, w, c]`, unpadded) to the
/// conv rows' gradient, written into the interior of `dz` (images `[h+2, w+2, c]`).
/// Returns (dγ, dβ).
pub fn bn_act_backward(
    act: Act,
    dy: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    match act {
        Act::Relu => bn_act_backward_with::<Relu>(dy, z, s, bn, dz),
        Act::Gelu => bn_act_backward_with::<Gelu>(dy, z, s, bn, dz),
    }
}

fn bn_act_backward_with<A: Activation>(
    dy: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let BnShape { n, h, w, c, .. } = s;
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    let len = n * h * w * c;
    let partial = bn_partial_sums(
        &dy[..len],
        &z[..len],
        c,
        IMAGES_PER_TASK * h * w,
        |g, z, ch| A::pass(g, z * sc[ch] + sh[ch]),
        &bn.mean,
    );
    let (ca, cb, ce, dgamma, dbeta) = bn_backward_coefficients(bn, &partial, c, n * h * w);
    let (ca, cb, ce) = (&ca[..c], &cb[..c], &ce[..c]);
    let wp = w + 2;
    let img_p = (h + 2) * wp * c;
    dz[..n * img_p]
        .par_chunks_mut(img_p)
        .enumerate()
        .for_each(|(img, d)| {
            let base = img * h * w * c;
            for y in 0..h {
                let rz = &z[base + y * w * c..base + (y + 1) * w * c];
                let rg = &dy[base + y * w * c..base + (y + 1) * w * c];
                let db = ((y + 1) * wp + 1) * c;
                let rd = &mut d[db..db + w * c];
                for ((d, z), g) in rd
                    .chunks_exact_mut(c)
                    .zip(rz.chunks_exact(c))
                    .zip(rg.chunks_exact(c))
                {
                    for ch in 0..c {
                        let gp = A::pass(g[ch], z[ch] * sc[ch] + sh[ch]);
                        d[ch] = ca[ch] * gp + cb[ch] + ce[ch] * z[ch];
                    }
                }
            }
        });
    (dgamma, dbeta)
}

/// Backward of [`bn_act_pool`]: from the pooled gradient `dp` (`[n, h/2, w/2, c]`) to the
/// gradient of the conv rows, written into the interior of `dz` (images `[h+2, w+2, c]`).
/// `zsel` holds the winners' conv values, as [`bn_act_pool`] left them. Returns (dγ, dβ).
#[allow(clippy::too_many_arguments)]
pub fn bn_act_pool_backward(
    act: Act,
    dp: &[f32],
    arg: &[u8],
    zsel: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    match act {
        Act::Relu => bn_act_pool_backward_with::<Relu>(dp, arg, zsel, z, s, bn, dz),
        Act::Gelu => bn_act_pool_backward_with::<Gelu>(dp, arg, zsel, z, s, bn, dz),
    }
}

fn bn_act_pool_backward_with<A: Activation>(
    dp: &[f32],
    arg: &[u8],
    zsel: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let BnShape { n, h, w, c, .. } = s;
    let (oh, ow) = (h / 2, w / 2);
    let pooled = oh * ow * c;
    let wp = w + 2;
    let img_p = (h + 2) * wp * c;
    let z_offs = window_offsets(w, c);
    let d_offs = window_offsets(wp, c);
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    // Pass 1: the gradient reaches only each window's winner, so only the winners' conv
    // values (`zsel`) are read.
    let partial = bn_partial_sums(
        &dp[..n * pooled],
        &zsel[..n * pooled],
        c,
        IMAGES_PER_TASK * oh * ow,
        |g, z, ch| A::pass(g, z * sc[ch] + sh[ch]),
        &bn.mean,
    );
    let (ca, cb, ce, dgamma, dbeta) = bn_backward_coefficients(bn, &partial, c, n * h * w);
    let (ca, cb, ce) = (&ca[..c], &cb[..c], &ce[..c]);
    // Pass 2: every position of every window.
    dz[..n * img_p]
        .par_chunks_mut(img_p)
        .enumerate()
        .for_each(|(img, d)| {
            let zi = &z[img * h * w * c..(img + 1) * h * w * c];
            for oy in 0..oh {
                for ox in 0..ow {
                    let pb = img * pooled + (oy * ow + ox) * c;
                    let (a, g) = (&arg[pb..pb + c], &dp[pb..pb + c]);
                    let ztop = (2 * oy * w + 2 * ox) * c;
                    let dtop = ((2 * oy + 1) * wp + 2 * ox + 1) * c;
                    for q in 0..4 {
                        let zq = &zi[ztop + z_offs[q]..ztop + z_offs[q] + c];
                        let dq = &mut d[dtop + d_offs[q]..dtop + d_offs[q] + c];
                        for ch in 0..c {
                            let gin = if a[ch] as usize == q { g[ch] } else { 0.0 };
                            let gp = A::pass(gin, zq[ch] * sc[ch] + sh[ch]);
                            dq[ch] = ca[ch] * gp + cb[ch] + ce[ch] * zq[ch];
                        }
                    }
                }
            }
            // An odd side's last row or column is in no window (the pool floors, as
            // PyTorch's and ONNX's do): no gradient reaches it through the pool, but
            // batch-norm's statistics still tie it to every other value.
            for y in 0..h {
                let xs = if y < 2 * oh { 2 * ow..w } else { 0..w };
                for x in xs {
                    let zq = &zi[(y * w + x) * c..(y * w + x + 1) * c];
                    let db = ((y + 1) * wp + x + 1) * c;
                    let dq = &mut d[db..db + c];
                    for ch in 0..c {
                        dq[ch] = cb[ch] + ce[ch] * zq[ch];
                    }
                }
            }
        });
    (dgamma, dbeta)
}

// ---- fully connected ----

/// Forward: `y = x · wᵀ + b` over `n` rows, `w` being `[outputs, inputs]`, then ReLU if asked.
///
/// Through the project's kernel (`kernels::matmul_bias_act`, rows split over threads), not
/// the `gemm` crate: `gemm` sizes its blocks of the summed dimension from the CPU's cache
/// sizes, so with thousands of inputs (the CNN's first fully connected layer reads 4,704) two
/// CPUs on the same kernel path would sum in different orders and train different bits. The
/// AVX-512 kernel sums each output in one fixed order on every CPU that has it.
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    (inputs, outputs): (usize, usize),
    relu: bool,
    y: &mut Vec<f32>,
) {
    sized(y, n * outputs);
    // Large layers: each thread takes a band of output columns (whole 16-column panels), so
    // it streams only its share of the weights, which stays in its core's cache across the
    // row blocks. Small ones: one call.
    let per_band = if threads(inputs, outputs) && outputs.is_multiple_of(16) {
        let bands = rayon::current_num_threads().min(outputs / 16);
        (outputs / 16).div_ceil(bands) * 16
    } else {
        outputs
    };
    let cols: Vec<(usize, usize)> = (0..outputs)
        .step_by(per_band)
        .map(|c0| (c0, (c0 + per_band).min(outputs)))
        .collect();
    let parts: Vec<Vec<f32>> = cols
        .par_iter()
        .map(|&(c0, c1)| {
            let width = c1 - c0;
            let mut wt = vec![0f32; inputs * width];
            for (o, row) in w.chunks_exact(inputs).skip(c0).take(width).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    wt[i * width + o] = *v;
                }
            }
            let packed = PackedB::new(wt, inputs, width);
            let mut part = vec![0f32; n * width];
            matmul_bias_act(&x[..n * inputs], n, &packed, &b[c0..c1], relu, &mut part);
            part
        })
        .collect();
    for (&(c0, c1), part) in cols.iter().zip(&parts) {
        for (row, src) in y.chunks_exact_mut(outputs).zip(part.chunks_exact(c1 - c0)) {
            row[c0..c1].copy_from_slice(src);
        }
    }
}

/// Whether a layer's products are worth splitting over rayon's threads.
fn threads(inputs: usize, outputs: usize) -> bool {
    inputs * outputs >= 1 << 16
}

/// Backward of [`linear`]: returns the weight and bias gradients and, when `dx` is given,
/// writes the input gradient `dy · w` into it. `y` is the forward output: with `relu`, `dy`
/// is first zeroed where the ReLU was closed.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dy: &mut [f32],
    y: &[f32],
    relu: bool,
    x: &[f32],
    w: &[f32],
    n: usize,
    (inputs, outputs): (usize, usize),
    dx: Option<&mut Vec<f32>>,
) -> (Vec<f32>, Vec<f32>) {
    let dy = &mut dy[..n * outputs];
    if relu {
        for (d, y) in dy.iter_mut().zip(y) {
            *d = if *y > 0.0 { *d } else { 0.0 };
        }
    }
    let threads = threads(inputs, outputs);
    let mut gw = vec![0f32; outputs * inputs];
    sgemm_strided(
        outputs,
        inputs,
        n,
        Mat::transposed(dy, outputs),
        Mat::rows(x, inputs),
        &mut gw,
        inputs,
        threads,
    );
    if let Some(dx) = dx {
        sized(dx, n * inputs);
        let (dy, w) = (Mat::rows(dy, outputs), Mat::rows(w, inputs));
        sgemm_strided(n, inputs, outputs, dy, w, dx, inputs, threads);
    }
    let mut gb = vec![0f32; outputs];
    for row in dy.chunks_exact(outputs) {
        gb.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
    (gw, gb)
}

// ---- dropout ----

/// Forward: inverted dropout. The mask is drawn from `r` in order (`len` values), kept
/// values scaled by `1 / (1 − p)`; with `p = 0` nothing is drawn.
pub fn dropout(
    x: &[f32],
    p: f32,
    r: &mut rand_chacha::ChaCha8Rng,
    mask: &mut Vec<f32>,
    y: &mut Vec<f32>,
) {
    use rand::Rng;
    let keep = 1.0 / (1.0 - p);
    for m in sized(mask, x.len()).iter_mut() {
        *m = if p > 0.0 && r.random::<f32>() < p {
            0.0
        } else if p > 0.0 {
            keep
        } else {
            1.0
        };
    }
    sized(y, x.len());
    for ((d, h), m) in y.iter_mut().zip(x).zip(mask.iter()) {
        *d = h * m;
    }
}

/// Backward of [`dropout`]: `dx = dy · mask`.
pub fn dropout_backward(dy: &[f32], mask: &[f32], dx: &mut Vec<f32>) {
    sized(dx, mask.len());
    for ((d, g), m) in dx.iter_mut().zip(dy).zip(mask) {
        *d = g * m;
    }
}

// ---- global average pooling ----

/// Forward: the mean of each channel over the `hw` positions of each image (`[n, hw, c]` →
/// `[n, c]`), summed in position order.
pub fn global_avg_pool(x: &[f32], n: usize, hw: usize, c: usize, y: &mut Vec<f32>) {
    sized(y, n * c);
    let k = 1.0 / hw as f32;
    for (img, out) in x[..n * hw * c]
        .chunks_exact(hw * c)
        .zip(y.chunks_exact_mut(c))
    {
        out.fill(0.0);
        for px in img.chunks_exact(c) {
            out.iter_mut().zip(px).for_each(|(o, v)| *o += v);
        }
        out.iter_mut().for_each(|o| *o *= k);
    }
}

/// Backward of [`global_avg_pool`]: every position gets its channel's gradient over `hw`.
pub fn global_avg_pool_backward(dy: &[f32], n: usize, hw: usize, c: usize, dx: &mut Vec<f32>) {
    sized(dx, n * hw * c);
    let k = 1.0 / hw as f32;
    for (img, g) in dx.chunks_exact_mut(hw * c).zip(dy[..n * c].chunks_exact(c)) {
        for px in img.chunks_exact_mut(c) {
            px.iter_mut().zip(g).for_each(|(d, g)| *d = g * k);
        }
    }
}
