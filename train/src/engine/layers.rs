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
use fmnist::kernels::activation::{gelu, gelu_and_grad, gelu_grad};
use fmnist::kernels::bf16::{Bf16Path, PackedBf16};
use fmnist::kernels::conv_bf16;
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
    /// Whether the forward pass keeps `f'(u)` for the backward pass (where `f'` costs more
    /// than reading it back: GELU's error function, not ReLU's comparison).
    const KEEPS_GRADIENT: bool;
    fn f(u: f32) -> f32;
    /// `(f(u), f'(u))`, the same bits as [`Activation::f`] and `pass(1, u)`.
    fn f_and_grad(u: f32) -> (f32, f32);
    /// `g · f'(u)`. ReLU passes `g` itself or zero (not `g · 1.0`), which keeps its
    /// gradients bit for bit what they were before GELU existed.
    fn pass(g: f32, u: f32) -> f32;
}

struct Relu;
impl Activation for Relu {
    const KEEPS_GRADIENT: bool = false;
    #[inline(always)]
    fn f(u: f32) -> f32 {
        u.max(0.0)
    }
    #[inline(always)]
    fn f_and_grad(u: f32) -> (f32, f32) {
        (Self::f(u), if u > 0.0 { 1.0 } else { 0.0 })
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
    const KEEPS_GRADIENT: bool = true;
    #[inline(always)]
    fn f(u: f32) -> f32 {
        gelu(u)
    }
    #[inline(always)]
    fn f_and_grad(u: f32) -> (f32, f32) {
        gelu_and_grad(u)
    }
    #[inline(always)]
    fn pass(g: f32, u: f32) -> f32 {
        g * gelu_grad(u)
    }
}

/// What a batch-norm pass stores: fp32, or bf16 (rounded to nearest even as it is stored)
/// when a bf16 convolution reads the buffer next.
pub trait Store: Copy + Default + Send + Sync {
    fn store(v: f32) -> Self;
}

impl Store for f32 {
    #[inline(always)]
    fn store(v: f32) -> f32 {
        v
    }
}

impl Store for u16 {
    #[inline(always)]
    fn store(v: f32) -> u16 {
        fmnist::kernels::bf16::to_bf16(v)
    }
}

pub(crate) fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut Vec<T> {
    v.resize(n, T::default());
    v
}

// ---- 3×3 convolution (same size, stride 1, no bias: the batch-norm shift is the bias) ----

/// Convolution weights `[cout, 3, 3, cin]` as the `[9·cin, cout]` matrix the kernels take.
fn conv_matrix(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let k = 9 * cin;
    let mut plain = vec![0f32; k * cout];
    for o in 0..cout {
        for (j, v) in w[o * k..(o + 1) * k].iter().enumerate() {
            plain[j * cout + o] = *v;
        }
    }
    plain
}

/// The weights of the input gradient's convolution: taps flipped, input and output channels
/// swapped, as a `[9·cout, cin]` matrix.
fn conv_matrix_flipped(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut plain = vec![0f32; 9 * cout * cin];
    for o in 0..cout {
        for tap in 0..9 {
            let src = &w[(o * 9 + tap) * cin..(o * 9 + tap + 1) * cin];
            let row = (8 - tap) * cout + o;
            plain[row * cin..(row + 1) * cin].copy_from_slice(src);
        }
    }
    plain
}

/// Convolution weights `[cout, 3, 3, cin]` as the kernel's `[9·cin, cout]` operand.
pub fn pack_conv(w: &[f32], cout: usize, cin: usize) -> PackedB {
    PackedB::new(conv_matrix(w, cout, cin), 9 * cin, cout)
}

/// [`conv_matrix_flipped`] packed for the fp32 kernel.
pub fn pack_conv_flipped(w: &[f32], cout: usize, cin: usize) -> PackedB {
    PackedB::new(conv_matrix_flipped(w, cout, cin), 9 * cout, cin)
}

/// `[9·cin][cout]` (tap-major rows) → `[cout][9·cin]`, the weight's own layout.
fn from_conv_matrix(total: &[f32], cout: usize) -> Vec<f32> {
    let k = total.len() / cout;
    let mut dw = vec![0f32; total.len()];
    for (j, row) in total.chunks_exact(cout).enumerate() {
        for (o, v) in row.iter().enumerate() {
            dw[o * k + j] = *v;
        }
    }
    dw
}

/// A 3×3 convolution whose products run in bf16 tiles (`fmnist::kernels::conv_bf16`). Its
/// input and output gradient arrive as bf16 padded buffers, written in bf16 by the
/// batch-norm passes that produce them (rounding as they store, so no pass over fp32 copies
/// rounds them again), and are read in place; products are accumulated in fp32 on the padded
/// grid and their interior copied out. Weights stay fp32 (rounded into the packed operand
/// each step), as does everything around the products.
#[derive(Default)]
pub struct Bf16Conv {
    xt: Vec<u16>,
    wide: Vec<f32>,
    wpack: PackedBf16,
    dpack: PackedBf16,
}

impl Bf16Conv {
    /// `out[n·h·w, cout]` from the bf16 padded input `xb` (`n` images `[h+2, w+2, cin]`,
    /// [`conv_bf16::padded_buffer`]) and the weight `[cout, 3, 3, cin]`.
    pub fn forward(
        &mut self,
        path: Bf16Path,
        xb: &[u16],
        n: usize,
        (h, w, cin, cout): (usize, usize, usize, usize),
        weight: &[f32],
        out: &mut [f32],
    ) {
        self.wpack
            .fill(&conv_matrix(weight, cout, cin), 9 * cin, cout);
        let rows = conv_bf16::grid_rows(n, h, w);
        sized(&mut self.wide, rows * cout);
        conv_bf16::conv3x3_bf16(path, xb, n, h, w, cin, &self.wpack, &mut self.wide);
        conv_bf16::interior(&self.wide, n, h, w, cout, out);
    }

    /// The weight gradient from the bf16 padded input `xb` (as the forward pass read it) and
    /// the bf16 padded output gradient `db` (zero border), and the input gradient
    /// `[n·h·w, cin]` into `dx` when it is wanted.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        path: Bf16Path,
        xb: &[u16],
        n: usize,
        (h, w, cin, cout): (usize, usize, usize, usize),
        weight: &[f32],
        db: &[u16],
        dx: Option<&mut Vec<f32>>,
    ) -> Vec<f32> {
        let rows = conv_bf16::grid_rows(n, h, w);
        self.dpack.fill_rounded(&db[(w + 3) * cout..], rows, cout);
        let stride = conv_bf16::transpose_padded(xb, n, h, w, cin, &mut self.xt);
        let mut total = vec![0f32; 9 * cin * cout];
        conv_bf16::weight_grad_bf16(
            path,
            &self.xt,
            stride,
            n,
            h,
            w,
            cin,
            &self.dpack,
            &mut total,
        );
        if let Some(dx) = dx {
            let flipped = conv_matrix_flipped(weight, cout, cin);
            self.wpack.fill(&flipped, 9 * cout, cin);
            sized(&mut self.wide, rows * cin);
            conv_bf16::conv3x3_bf16(path, db, n, h, w, cout, &self.wpack, &mut self.wide);
            conv_bf16::interior(&self.wide, n, h, w, cin, sized(dx, n * h * w * cin));
        }
        from_conv_matrix(&total, cout)
    }
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
    from_conv_matrix(&total, cout)
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
/// GELU also keeps its gradient at every value in `grad` (`[n, h, w, c]`) for
/// [`bn_act_backward`]; ReLU leaves `grad` alone.
pub fn bn_act<O: Store>(
    act: super::Act,
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [O],
    grad: &mut Vec<f32>,
) {
    match act {
        Act::Relu => bn_act_with::<Relu, O>(z, s, bn, out, grad),
        Act::Gelu => bn_act_with::<Gelu, O>(z, s, bn, out, grad),
    }
}

fn bn_act_with<A: Activation, O: Store>(
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [O],
    grad: &mut Vec<f32>,
) {
    let BnShape { n, h, w, c, .. } = s;
    let pad = s.out_pad;
    let pw = w + 2 * pad;
    let out_img = (h + 2 * pad) * pw * c;
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    let img = h * w * c;
    // An image of `grad` per image (ReLU: one unused value).
    let per = if A::KEEPS_GRADIENT { img } else { 1 };
    out[..n * out_img]
        .par_chunks_mut(out_img)
        .zip(sized(grad, n * per).par_chunks_mut(per))
        .enumerate()
        .for_each(|(i, (o, d))| {
            let zi = &z[i * img..(i + 1) * img];
            bn_act_image::<A, O>(zi, o, d, sc, sh, (h, w, c), pad);
        });
}

wide_fn! {
    /// One image of [`bn_act`].
    fn bn_act_image<A: Activation, O: Store>(
        zi: &[f32],
        o: &mut [O],
        d: &mut [f32],
        sc: &[f32],
        sh: &[f32],
        hwc: (usize, usize, usize),
        pad: usize,
    ) {
        let (h, w, c) = hwc;
        let pw = w + 2 * pad;
        let (sc, sh) = (&sc[..c], &sh[..c]);
        for y in 0..h {
            let ob = ((y + pad) * pw + pad) * c;
            let o = &mut o[ob..ob + w * c];
            let zr = &zi[y * w * c..(y + 1) * w * c];
            if A::KEEPS_GRADIENT {
                let dr = &mut d[y * w * c..(y + 1) * w * c];
                for ((o, z), d) in o
                    .chunks_exact_mut(c)
                    .zip(zr.chunks_exact(c))
                    .zip(dr.chunks_exact_mut(c))
                {
                    for ch in 0..c {
                        let (f, g) = A::f_and_grad(z[ch] * sc[ch] + sh[ch]);
                        o[ch] = O::store(f);
                        d[ch] = g;
                    }
                }
                continue;
            }
            for (o, z) in o.chunks_exact_mut(c).zip(zr.chunks_exact(c)) {
                for ch in 0..c {
                    o[ch] = O::store(A::f(z[ch] * sc[ch] + sh[ch]));
                }
            }
        }
    }
}

/// Forward: batch-norm + activation + 2×2 max-pool of conv rows `z`, into the interior of
/// `out` (images `[⌊h/2⌋ + 2·pad, ⌊w/2⌋ + 2·pad, c]`; an odd side's last row or column is
/// dropped, as PyTorch and ONNX pool), keeping which of the four window positions (row-major,
/// the first on ties) won and its conv value (`zsel`).
pub fn bn_act_pool<O: Store>(
    act: Act,
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [O],
    arg: &mut [u8],
    zsel: &mut [f32],
) {
    match act {
        Act::Relu => bn_act_pool_with::<Relu, O>(z, s, bn, out, arg, zsel),
        Act::Gelu => bn_act_pool_with::<Gelu, O>(z, s, bn, out, arg, zsel),
    }
}

fn bn_act_pool_with<A: Activation, O: Store>(
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    out: &mut [O],
    arg: &mut [u8],
    zsel: &mut [f32],
) {
    let BnShape { n, h, w, c, .. } = s;
    let pad = s.out_pad;
    let (oh, ow) = (h / 2, w / 2);
    let pw = ow + 2 * pad;
    let out_img = (oh + 2 * pad) * pw * c;
    let (sc, sh) = (&bn.scale[..c], &bn.shift[..c]);
    out[..n * out_img]
        .par_chunks_mut(out_img)
        .zip(arg[..n * oh * ow * c].par_chunks_mut(oh * ow * c))
        .zip(zsel[..n * oh * ow * c].par_chunks_mut(oh * ow * c))
        .enumerate()
        .for_each(|(img, ((o, a), zs))| {
            let zi = &z[img * h * w * c..(img + 1) * h * w * c];
            bn_act_pool_image::<A, O>(zi, o, a, zs, sc, sh, (h, w, c), pad);
        });
}

wide_fn! {
    /// One image of [`bn_act_pool`].
    fn bn_act_pool_image<A: Activation, O: Store>(
        zi: &[f32],
        o: &mut [O],
        a: &mut [u8],
        zs: &mut [f32],
        sc: &[f32],
        sh: &[f32],
        hwc: (usize, usize, usize),
        pad: usize,
    ) {
        let (h, w, c) = hwc;
        let (oh, ow) = (h / 2, w / 2);
        let pw = ow + 2 * pad;
        let (sc, sh) = (&sc[..c], &sh[..c]);
        // Each pair of rows' activations first, as the plain channel loop [`bn_act_image`]
        // runs (it vectorises), then the 2×2 comparisons over them: the same values, the same
        // first-wins order.
        let mut xs_v = vec![0f32; 2 * w * c];
        // The pooled row in fp32, stored (and rounded, for a bf16 output) in one plain loop
        // after the comparisons: rounding inside them kept them from vectorising.
        let mut row_v = vec![0f32; ow * c];
        for oy in 0..oh {
            let zr = &zi[2 * oy * w * c..(2 * oy + 2) * w * c];
            for (x, z) in xs_v.chunks_exact_mut(c).zip(zr.chunks_exact(c)) {
                for ch in 0..c {
                    x[ch] = A::f(z[ch] * sc[ch] + sh[ch]);
                }
            }
            for ox in 0..ow {
                let at = [0, c, w * c, (w + 1) * c].map(|d| 2 * ox * c + d);
                let zq = at.map(|i| &zr[i..i + c]);
                let xq = at.map(|i| &xs_v[i..i + c]);
                let o = &mut row_v[ox * c..(ox + 1) * c];
                let a = &mut a[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                let zs = &mut zs[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                for ch in 0..c {
                    let (mut best, mut k, mut zb) = (f32::NEG_INFINITY, 0u8, 0.0);
                    for q in 0..4 {
                        let (z, x) = (zq[q][ch], xq[q][ch]);
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
            let ob = ((oy + pad) * pw + pad) * c;
            for (o, &v) in o[ob..ob + ow * c].iter_mut().zip(&row_v) {
                *o = O::store(v);
            }
        }
    }
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

/// Per chunk of rows, Σg' and Σg'·(z − μ) per channel, with `g' = A::pass(dy, z·scale +
/// shift)`; `dy` is overwritten with `g'`, which the second pass then reads instead of
/// evaluating the activation's gradient again.
/// With `kept`, the activation's gradient the forward pass kept, `g' = dy·kept` instead.
fn bn_partial_sums<A: Activation>(
    dy: &mut [f32],
    z: &[f32],
    kept: Option<&[f32]>,
    c: usize,
    rows_per_task: usize,
    bn: &Bn,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let chunk = rows_per_task * c;
    match kept {
        Some(kept) => dy
            .par_chunks_mut(chunk)
            .zip(z.par_chunks(chunk))
            .zip(kept[..z.len()].par_chunks(chunk))
            .map(|((g, zs), d)| bn_partial_sums_kept_chunk(g, zs, d, c, &bn.mean))
            .collect(),
        None => dy
            .par_chunks_mut(chunk)
            .zip(z.par_chunks(chunk))
            .map(|(g, zs)| bn_partial_sums_chunk::<A>(g, zs, c, &bn.scale, &bn.shift, &bn.mean))
            .collect(),
    }
}

wide_fn! {
    /// One chunk of [`bn_partial_sums`] from the kept gradient `d`: the same sums in the
    /// same order, `g'` the same product.
    fn bn_partial_sums_kept_chunk(
        g: &mut [f32],
        zs: &[f32],
        d: &[f32],
        c: usize,
        mean: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut sg_v, mut sgx_v) = (vec![0f32; c], vec![0f32; c]);
        let (sg, sgx, mean) = (&mut sg_v[..c], &mut sgx_v[..c], &mean[..c]);
        for ((g, zs), d) in g.chunks_exact_mut(c).zip(zs.chunks_exact(c)).zip(d.chunks_exact(c)) {
            for ch in 0..c {
                let gp = g[ch] * d[ch];
                g[ch] = gp;
                sg[ch] += gp;
                sgx[ch] += gp * (zs[ch] - mean[ch]);
            }
        }
        (sg_v, sgx_v)
    }
}

wide_fn! {
    /// One chunk of [`bn_partial_sums`].
    fn bn_partial_sums_chunk<A: Activation>(
        g: &mut [f32],
        zs: &[f32],
        c: usize,
        sc: &[f32],
        sh: &[f32],
        mean: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut sg_v, mut sgx_v) = (vec![0f32; c], vec![0f32; c]);
        // Slices of exactly `c` values let the compiler drop bounds checks and vectorise.
        let (sg, sgx) = (&mut sg_v[..c], &mut sgx_v[..c]);
        let (sc, sh, mean) = (&sc[..c], &sh[..c], &mean[..c]);
        for (g, zs) in g.chunks_exact_mut(c).zip(zs.chunks_exact(c)) {
            for ch in 0..c {
                let gp = A::pass(g[ch], zs[ch] * sc[ch] + sh[ch]);
                g[ch] = gp;
                sg[ch] += gp;
                sgx[ch] += gp * (zs[ch] - mean[ch]);
            }
        }
        (sg_v, sgx_v)
    }
}

/// Backward of [`bn_act`]: from the output gradient `dy` (`[n, h, w, c]`, unpadded) to the
/// conv rows' gradient, written into the interior of `dz` (images `[h+2, w+2, c]`).
/// Returns (dγ, dβ).
/// `grad` is what [`bn_act`] kept.
pub fn bn_act_backward<O: Store>(
    act: Act,
    dy: &mut [f32],
    z: &[f32],
    grad: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [O],
) -> (Vec<f32>, Vec<f32>) {
    match act {
        Act::Relu => bn_act_backward_with::<Relu, O>(dy, z, grad, s, bn, dz),
        Act::Gelu => bn_act_backward_with::<Gelu, O>(dy, z, grad, s, bn, dz),
    }
}

fn bn_act_backward_with<A: Activation, O: Store>(
    dy: &mut [f32],
    z: &[f32],
    grad: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [O],
) -> (Vec<f32>, Vec<f32>) {
    let BnShape { n, h, w, c, .. } = s;
    let len = n * h * w * c;
    let kept = A::KEEPS_GRADIENT.then_some(grad);
    let rows = IMAGES_PER_TASK * h * w;
    let partial = bn_partial_sums::<A>(&mut dy[..len], &z[..len], kept, c, rows, bn);
    let (ca, cb, ce, dgamma, dbeta) = bn_backward_coefficients(bn, &partial, c, n * h * w);
    let k = BackCoefficients {
        ca: &ca,
        cb: &cb,
        ce: &ce,
    };
    let img_p = (h + 2) * (w + 2) * c;
    dz[..n * img_p]
        .par_chunks_mut(img_p)
        .enumerate()
        .for_each(|(img, d)| {
            let rows = img * h * w * c..(img + 1) * h * w * c;
            bn_act_backward_image::<O>(&z[rows.clone()], &dy[rows], d, &k, (h, w, c));
        });
    (dgamma, dbeta)
}

/// Per channel, the backward map `dz = a·g' + b + e·z`.
struct BackCoefficients<'a> {
    ca: &'a [f32],
    cb: &'a [f32],
    ce: &'a [f32],
}

wide_fn! {
    /// One image of [`bn_act_backward`]'s second pass, from `g'` (the first pass's).
    fn bn_act_backward_image<O: Store>(
        zi: &[f32],
        gi: &[f32],
        d: &mut [O],
        k: &BackCoefficients,
        hwc: (usize, usize, usize),
    ) {
        let (h, w, c) = hwc;
        let wp = w + 2;
        let (ca, cb, ce) = (&k.ca[..c], &k.cb[..c], &k.ce[..c]);
        for y in 0..h {
            let rz = &zi[y * w * c..(y + 1) * w * c];
            let rg = &gi[y * w * c..(y + 1) * w * c];
            let db = ((y + 1) * wp + 1) * c;
            let rd = &mut d[db..db + w * c];
            for ((d, z), gp) in rd
                .chunks_exact_mut(c)
                .zip(rz.chunks_exact(c))
                .zip(rg.chunks_exact(c))
            {
                for ch in 0..c {
                    d[ch] = O::store(ca[ch] * gp[ch] + cb[ch] + ce[ch] * z[ch]);
                }
            }
        }
    }
}

/// Backward of [`bn_act_pool`]: from the pooled gradient `dp` (`[n, h/2, w/2, c]`) to the
/// gradient of the conv rows, written into the interior of `dz` (images `[h+2, w+2, c]`).
/// `zsel` holds the winners' conv values, as [`bn_act_pool`] left them. Returns (dγ, dβ).
#[allow(clippy::too_many_arguments)]
pub fn bn_act_pool_backward<O: Store>(
    act: Act,
    dp: &mut [f32],
    arg: &[u8],
    zsel: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [O],
) -> (Vec<f32>, Vec<f32>) {
    match act {
        Act::Relu => bn_act_pool_backward_with::<Relu, O>(dp, arg, zsel, z, s, bn, dz),
        Act::Gelu => bn_act_pool_backward_with::<Gelu, O>(dp, arg, zsel, z, s, bn, dz),
    }
}

fn bn_act_pool_backward_with<A: Activation, O: Store>(
    dp: &mut [f32],
    arg: &[u8],
    zsel: &[f32],
    z: &[f32],
    s: BnShape,
    bn: &Bn,
    dz: &mut [O],
) -> (Vec<f32>, Vec<f32>) {
    let BnShape { n, h, w, c, .. } = s;
    let (oh, ow) = (h / 2, w / 2);
    let pooled = oh * ow * c;
    let img_p = (h + 2) * (w + 2) * c;
    // Pass 1: the gradient reaches only each window's winner, so only the winners' conv
    // values (`zsel`) are read; `dp` becomes the winners' g'.
    let partial = bn_partial_sums::<A>(
        &mut dp[..n * pooled],
        &zsel[..n * pooled],
        None,
        c,
        IMAGES_PER_TASK * oh * ow,
        bn,
    );
    let (ca, cb, ce, dgamma, dbeta) = bn_backward_coefficients(bn, &partial, c, n * h * w);
    let k = BackCoefficients {
        ca: &ca,
        cb: &cb,
        ce: &ce,
    };
    // Pass 2: every position of every window.
    dz[..n * img_p]
        .par_chunks_mut(img_p)
        .enumerate()
        .for_each(|(img, d)| {
            let pooled_img = img * pooled..(img + 1) * pooled;
            bn_act_pool_backward_image::<O>(
                &z[img * h * w * c..(img + 1) * h * w * c],
                &arg[pooled_img.clone()],
                &dp[pooled_img],
                d,
                &k,
                (h, w, c),
            );
        });
    (dgamma, dbeta)
}

wide_fn! {
    /// One image of [`bn_act_pool_backward`]'s second pass, from the winners' `g'`.
    fn bn_act_pool_backward_image<O: Store>(
        zi: &[f32],
        arg: &[u8],
        gp: &[f32],
        d: &mut [O],
        k: &BackCoefficients,
        hwc: (usize, usize, usize),
    ) {
        let (h, w, c) = hwc;
        let (oh, ow) = (h / 2, w / 2);
        let wp = w + 2;
        let z_offs = window_offsets(w, c);
        let d_offs = window_offsets(wp, c);
        let (ca, cb, ce) = (&k.ca[..c], &k.cb[..c], &k.ce[..c]);
        for oy in 0..oh {
            for ox in 0..ow {
                let pb = (oy * ow + ox) * c;
                let (a, gp) = (&arg[pb..pb + c], &gp[pb..pb + c]);
                let ztop = (2 * oy * w + 2 * ox) * c;
                let dtop = ((2 * oy + 1) * wp + 2 * ox + 1) * c;
                for q in 0..4 {
                    let zq = &zi[ztop + z_offs[q]..ztop + z_offs[q] + c];
                    let dq = &mut d[dtop + d_offs[q]..dtop + d_offs[q] + c];
                    for ch in 0..c {
                        // Only the window's winner gets a gradient through the pool.
                        let gq = if a[ch] as usize == q { gp[ch] } else { 0.0 };
                        dq[ch] = O::store(ca[ch] * gq + cb[ch] + ce[ch] * zq[ch]);
                    }
                }
            }
        }
        // An odd side's last row or column is in no window (the pool floors, as PyTorch's and
        // ONNX's do): no gradient reaches it through the pool, but batch-norm's statistics still
        // tie it to every other value.
        for y in 0..h {
            let xs = if y < 2 * oh { 2 * ow..w } else { 0..w };
            for x in xs {
                let zq = &zi[(y * w + x) * c..(y * w + x + 1) * c];
                let db = ((y + 1) * wp + x + 1) * c;
                let dq = &mut d[db..db + c];
                for ch in 0..c {
                    dq[ch] = O::store(cb[ch] + ce[ch] * zq[ch]);
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::rng;
    use rand::Rng;

    /// `n` padded images `[h+2, w+2, c]` with values in ±1 and a zero border.
    fn padded(n: usize, h: usize, w: usize, c: usize, seed: u64) -> Vec<f32> {
        let mut r = rng(seed, 2);
        let mut x = vec![0f32; n * (h + 2) * (w + 2) * c];
        for i in 0..n {
            for y in 1..=h {
                let at = ((i * (h + 2) + y) * (w + 2) + 1) * c;
                x[at..at + w * c].fill_with(|| r.random_range(-1.0..1.0));
            }
        }
        x
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }

    /// |got − fp32| ≤ 2^-7 · Σ|a||b| per value: each bf16 operand is within 2^-9 of its fp32
    /// value, so each product within about 2^-8; the bound leaves a factor 2 for fp32 sums.
    fn within(what: &str, got: &[f32], fp32: &[f32], magnitude: &[f32]) {
        assert_eq!(got.len(), fp32.len(), "{what}");
        for (i, ((g, e), m)) in got.iter().zip(fp32).zip(magnitude).enumerate() {
            let tol = m * 2f32.powi(-7) + 1e-6;
            assert!((g - e).abs() <= tol, "{what}[{i}]: {g} vs {e} (tol {tol})");
        }
    }

    /// The bf16 convolution layer's forward, weight gradient and input gradient against the
    /// fp32 kernels on the same data, within bf16's rounding of each sum's magnitude (the
    /// same fp32 kernels over absolute values), for one and several images, square and
    /// oblong, on the emulated tiles and on AMX where present. A reused layer (a smaller
    /// batch after a larger one) gives the fresh layer's bits.
    #[test]
    fn bf16_convolution_matches_fp32() {
        let mut paths = vec![Bf16Path::Emulated];
        if Bf16Path::Amx.supported() {
            paths.push(Bf16Path::Amx);
        } else {
            eprintln!("skipped: amx-bf16 is not available on this CPU");
        }
        for path in paths {
            let mut reused = Bf16Conv::default();
            for (n, h, w, cin, cout) in [(4, 9, 9, 32, 64), (1, 7, 7, 64, 32), (2, 5, 3, 32, 96)] {
                let what = format!("{} {n}×{h}×{w} {cin}→{cout}", path.name());
                let x = padded(n, h, w, cin, 1);
                let dz = padded(n, h, w, cout, 2);
                let weight: Vec<f32> = {
                    let mut r = rng(3, 3);
                    (0..cout * 9 * cin)
                        .map(|_| r.random_range(-0.2..0.2))
                        .collect()
                };
                let shape = (h, w, cin, cout);
                let (mut xb, mut db) = (Vec::new(), Vec::new());
                conv_bf16::round_padded(&x, n, h, w, cin, &mut xb);
                conv_bf16::round_padded(&dz, n, h, w, cout, &mut db);
                let mut fresh = Bf16Conv::default();
                let mut z = vec![f32::NAN; n * h * w * cout];
                fresh.forward(path, &xb, n, shape, &weight, &mut z);
                let mut z32 = vec![0f32; n * h * w * cout];
                conv3x3(&x, n, h, w, cin, &pack_conv(&weight, cout, cin), &mut z32);
                let mut mag = vec![0f32; n * h * w * cout];
                conv3x3(
                    &abs(&x),
                    n,
                    h,
                    w,
                    cin,
                    &pack_conv(&abs(&weight), cout, cin),
                    &mut mag,
                );
                within(&format!("{what} forward"), &z, &z32, &mag);

                let mut dx = Vec::new();
                let dw = fresh.backward(path, &xb, n, shape, &weight, &db, Some(&mut dx));
                let dw32 = conv3x3_weight_grad(&dz, &x, n, h, w, cin, cout);
                let dw_mag = conv3x3_weight_grad(&abs(&dz), &abs(&x), n, h, w, cin, cout);
                within(&format!("{what} weight gradient"), &dw, &dw32, &dw_mag);
                let mut dx32 = vec![0f32; n * h * w * cin];
                let flipped = pack_conv_flipped(&weight, cout, cin);
                conv3x3(&dz, n, h, w, cout, &flipped, &mut dx32);
                let mut dx_mag = vec![0f32; n * h * w * cin];
                let flipped = pack_conv_flipped(&abs(&weight), cout, cin);
                conv3x3(&abs(&dz), n, h, w, cout, &flipped, &mut dx_mag);
                within(&format!("{what} input gradient"), &dx, &dx32, &dx_mag);

                let mut z2 = vec![f32::NAN; n * h * w * cout];
                reused.forward(path, &xb, n, shape, &weight, &mut z2);
                let mut dx2 = Vec::new();
                let dw2 = reused.backward(path, &xb, n, shape, &weight, &db, Some(&mut dx2));
                assert_eq!((z2, dw2, dx2), (z, dw, dx), "{what}: reused layer");
            }
        }
    }
}
