//! The CNN's training step on the CPU, written out by hand: forward pass, loss and backward
//! pass over buffers reused from step to step, outside candle's autograd.
//!
//! Why: through autograd every intermediate and every gradient is a freshly allocated (and
//! zeroed) tensor, gradients are summed by generic element-wise ops, and a convolution's
//! weight gradient needs an im2col matrix. For this one fixed network the step is a known
//! sequence of a dozen kernels, so it is cheaper to run them directly:
//! - the convolutions, forward and input gradient alike, go through the serving executor's
//!   kernel (`fmnist::kernels`), which reads 3×3 windows in place from zero-padded
//!   channels-last buffers; the input gradient is the convolution of the padded output
//!   gradient with the flipped, transposed weights;
//! - a weight gradient is three sums of outer products (`kernels::outer_sum`), one per kernel
//!   row, of the padded output gradient with the padded input read in place at the row's
//!   offset (no im2col matrix);
//! - batch-norm, ReLU and 2×2 max-pooling are one pass forward (keeping the arg-max) and two
//!   passes backward;
//! - the input image's gradient, which nothing needs, is never computed.
//!
//! It computes the same function and the same gradients as `Cnn::forward_with` followed by
//! `backward()` (tests below, and a finite-difference check), including the dropout mask,
//! drawn from the same random stream in the same order. Sums are split into fixed chunks
//! combined in order, so a step's result does not depend on the number of threads.

use super::cnn::CnnConfig;
use super::custom_ops::{batch_stats, ordered_sums};
use fmnist::kernels::{conv_bias_act, outer_sum, sgemm_strided, Mat, PackedB, Windows};
use fmnist::preprocess::{FMNIST_MEAN, FMNIST_STD};
use fmnist::NUM_CLASSES;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Output rows of a convolution per parallel task.
const CONV_ROWS: usize = 256;
/// Images per parallel task in the per-image passes and per partial weight gradient.
const IMAGES_PER_TASK: usize = 8;
/// Side of the input images.
const SIDE: usize = 28;

/// One training batch.
pub struct Batch<'a> {
    /// `N × 784` pixels scaled to 0–1.
    pub images: &'a [f32],
    /// `N` labels below 10.
    pub labels: &'a [u32],
    /// Label smoothing in `[0, 1)`.
    pub smoothing: f32,
}

/// What one step computes.
pub struct StepResult {
    /// Mean training loss of the batch.
    pub loss: f32,
    /// Gradients of the mean loss, in the order of `Cnn::params().vars()`.
    pub grads: Vec<Vec<f32>>,
    /// Per batch-norm layer: rows normalised, batch mean and biased batch variance.
    pub batch_stats: [(usize, Vec<f32>, Vec<f32>); 2],
}

/// Buffers kept between steps. Padded buffers only ever have their interiors written, and
/// every image keeps its place when the batch size changes, so borders stay zero.
#[derive(Default)]
pub struct Workspace {
    xpad: Vec<f32>,
    z1: Vec<f32>,
    p1pad: Vec<f32>,
    arg1: Vec<u8>,
    zsel1: Vec<f32>,
    z2: Vec<f32>,
    p2: Vec<f32>,
    arg2: Vec<u8>,
    zsel2: Vec<f32>,
    h: Vec<f32>,
    mask: Vec<f32>,
    hd: Vec<f32>,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    dh: Vec<f32>,
    dp2: Vec<f32>,
    dz2p: Vec<f32>,
    dp1: Vec<f32>,
    dz1p: Vec<f32>,
}

fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut Vec<T> {
    v.resize(n, T::default());
    v
}

/// The parameters, borrowed in `Params` order.
pub struct Weights<'a> {
    pub conv1: &'a [f32],
    pub gamma1: &'a [f32],
    pub beta1: &'a [f32],
    pub conv2: &'a [f32],
    pub gamma2: &'a [f32],
    pub beta2: &'a [f32],
    pub fc1_w: &'a [f32],
    pub fc1_b: &'a [f32],
    pub fc2_w: &'a [f32],
    pub fc2_b: &'a [f32],
}

impl<'a> Weights<'a> {
    /// From the flat parameters in `Params` order.
    pub fn from_flat(p: &'a [Vec<f32>]) -> Self {
        assert_eq!(p.len(), 10, "the CNN has ten parameter tensors");
        Weights {
            conv1: &p[0],
            gamma1: &p[1],
            beta1: &p[2],
            conv2: &p[3],
            gamma2: &p[4],
            beta2: &p[5],
            fc1_w: &p[6],
            fc1_b: &p[7],
            fc2_w: &p[8],
            fc2_b: &p[9],
        }
    }
}

/// Batch-norm of one layer during a training step: batch statistics and the affine map
/// `y = z·scale + shift` they give (the same arithmetic as the autograd path's kernel).
struct Bn<'a> {
    mean: Vec<f32>,
    var: Vec<f32>,
    inv: Vec<f32>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    gamma: &'a [f32],
}

impl<'a> Bn<'a> {
    fn new(z: &[f32], c: usize, gamma: &'a [f32], beta: &[f32], eps: f32) -> Self {
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
            gamma,
        }
    }
}

/// Convolution weights `[cout, 3, 3, cin]` as the kernel's `[9·cin, cout]` operand.
fn pack_conv(w: &[f32], cout: usize, cin: usize) -> PackedB {
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
fn pack_conv_flipped(w: &[f32], cout: usize, cin: usize) -> PackedB {
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

/// Same-size 3×3 convolution of `n` padded images `[h+2, w+2, cin]` into rows
/// `[n·h·w, packed.n()]`.
fn conv3x3(
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

/// Offsets of a 2×2 window's four positions (row-major) from its top-left one, in rows of
/// width `w` with `c` channels.
fn window_offsets(w: usize, c: usize) -> [usize; 4] {
    [0, c, w * c, (w + 1) * c]
}

/// Batch-norm + ReLU + 2×2 max-pool of conv rows `z` (`n` images `[h, w, c]`), into `out`
/// (images `[h/2 + 2·pad, w/2 + 2·pad, c]`, interior only), keeping which of the four window
/// positions (row-major, the first on ties) won and its conv value (`zsel`).
#[allow(clippy::too_many_arguments)]
fn bn_relu_pool(
    z: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bn: &Bn,
    out: &mut [f32],
    pad: usize,
    arg: &mut [u8],
    zsel: &mut [f32],
) {
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
                            let (z, x) = (zq[ch], (zq[ch] * sc[ch] + sh[ch]).max(0.0));
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

/// Backward of [`bn_relu_pool`]: from the pooled gradient `dp` (`[n, h/2, w/2, c]`) to the
/// gradient of the conv rows, written into the interior of `dz` (images `[h+2, w+2, c]`).
/// `zsel` holds the winners' conv values, as [`bn_relu_pool`] left them. Returns (dγ, dβ).
#[allow(clippy::too_many_arguments)]
fn pool_bn_backward(
    dp: &[f32],
    arg: &[u8],
    zsel: &[f32],
    z: &[f32],
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    bn: &Bn,
    dz: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let (oh, ow) = (h / 2, w / 2);
    let pooled = oh * ow * c;
    let wp = w + 2;
    let img_p = (h + 2) * wp * c;
    let z_offs = window_offsets(w, c);
    let d_offs = window_offsets(wp, c);
    let (sc, sh, mean) = (&bn.scale[..c], &bn.shift[..c], &bn.mean[..c]);
    // Pass 1: per chunk of images, Σg' and Σg'·(z − μ) per channel, g' being the gradient
    // that reaches the conv output: the pooled gradient at the arg-max where the ReLU
    // passed, zero elsewhere. Only the winners' conv values (`zsel`) are read.
    let chunk = IMAGES_PER_TASK * pooled;
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dp[..n * pooled]
        .par_chunks(chunk)
        .zip(zsel[..n * pooled].par_chunks(chunk))
        .map(|(g, zs)| {
            let (mut sg_v, mut sgx_v) = (vec![0f32; c], vec![0f32; c]);
            // Slices of exactly `c` values let the compiler drop bounds checks and vectorise.
            let (sg, sgx) = (&mut sg_v[..c], &mut sgx_v[..c]);
            for (g, zs) in g.chunks_exact(c).zip(zs.chunks_exact(c)) {
                for ch in 0..c {
                    let gp = if zs[ch] * sc[ch] + sh[ch] > 0.0 {
                        g[ch]
                    } else {
                        0.0
                    };
                    sg[ch] += gp;
                    sgx[ch] += gp * (zs[ch] - mean[ch]);
                }
            }
            (sg_v, sgx_v)
        })
        .collect();
    let (db, dg) = ordered_sums(&partial, c);
    let dbeta: Vec<f32> = db.iter().map(|v| *v as f32).collect();
    let dgamma: Vec<f32> = (0..c).map(|i| (dg[i] * bn.inv[i] as f64) as f32).collect();
    // Pass 2: dz = γ·inv/M · (M·g' − Σg' − x̂·Σg'x̂), with x̂ = (z − μ)·inv, as
    // dz = a·g' + b + e·z per channel, at every position of every window.
    let m = (n * h * w) as f32;
    let k: Vec<f32> = (0..c).map(|i| bn.gamma[i] * bn.inv[i] / m).collect();
    let ca: Vec<f32> = (0..c).map(|i| k[i] * m).collect();
    let ce: Vec<f32> = (0..c).map(|i| -k[i] * dgamma[i] * bn.inv[i]).collect();
    let cb: Vec<f32> = (0..c)
        .map(|i| -k[i] * dbeta[i] + k[i] * dgamma[i] * bn.inv[i] * mean[i])
        .collect();
    let (ca, cb, ce) = (&ca[..c], &cb[..c], &ce[..c]);
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
                            let pass = a[ch] as usize == q && zq[ch] * sc[ch] + sh[ch] > 0.0;
                            let gp = if pass { g[ch] } else { 0.0 };
                            dq[ch] = ca[ch] * gp + cb[ch] + ce[ch] * zq[ch];
                        }
                    }
                }
            }
        });
    (dgamma, dbeta)
}

/// Weight gradient `[cout, 3, 3, cin]` of a same-size 3×3 convolution, from the padded
/// output gradient `dzp` (`n` images `[h+2, w+2, cout]`, zero border) and the padded input
/// `xpad` (`[h+2, w+2, cin]`). In the flattened padded grid, kernel row `ky` pairs output row
/// `r` with the `3·cin` consecutive input values starting at row `r + (ky−1)·(w+2) − 1`, read
/// in place (row `r`'s run starts `cin` values after row `r − 1`'s). The zero border makes
/// every pairing that crosses an image edge vanish, so each kernel row is one sum of outer
/// products over all rows at once, with no im2col matrix. Partial sums per chunk of images
/// are added in order, so the result does not depend on the number of threads.
fn weight_grad(
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

/// Column sums of rows of width `c`.
/// Backward of a fully connected layer `y = x · wᵀ + b` over `n` rows, `w` being
/// `[outputs, inputs]`: returns the weight and bias gradients and writes the input gradient
/// `dy · w` into `dx`. `threads`: split the products over rayon's threads (worth it for fc1).
fn linear_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    (inputs, outputs): (usize, usize),
    dx: &mut Vec<f32>,
    threads: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut gw = vec![0f32; outputs * inputs];
    let dyt = Mat::transposed(dy, outputs);
    sgemm_strided(
        outputs,
        inputs,
        n,
        dyt,
        Mat::rows(x, inputs),
        &mut gw,
        inputs,
        threads,
    );
    sized(dx, n * inputs);
    let (dy, w) = (Mat::rows(dy, outputs), Mat::rows(w, inputs));
    sgemm_strided(n, inputs, outputs, dy, w, dx, inputs, threads);
    (gw, sum_rows(dy.data, outputs))
}

fn sum_rows(rows: &[f32], c: usize) -> Vec<f32> {
    let mut s = vec![0f32; c];
    for row in rows.chunks_exact(c) {
        s.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
    s
}

/// Forward and backward pass of one batch. `r` is the batch's random stream after the
/// batch was drawn; the dropout mask comes from it, as on the autograd path.
pub fn train_step(
    cfg: &CnnConfig,
    wt: &Weights,
    batch: &Batch,
    bn_eps: f32,
    r: &mut ChaCha8Rng,
    ws: &mut Workspace,
) -> StepResult {
    let (c1, c2, hid) = (cfg.conv1, cfg.conv2, cfg.hidden);
    let n = batch.labels.len();
    assert_eq!(batch.images.len(), n * SIDE * SIDE, "784 pixels per image");
    assert!(n > 0, "an empty batch");
    let feat = 49 * c2;
    let k = NUM_CLASSES;

    // ---- forward
    let (mul, add) = (1.0 / FMNIST_STD, -FMNIST_MEAN / FMNIST_STD);
    let pad1 = (SIDE + 2) * (SIDE + 2);
    sized(&mut ws.xpad, n * pad1)
        .par_chunks_mut(pad1)
        .zip(batch.images.par_chunks(SIDE * SIDE))
        .for_each(|(d, s)| {
            for y in 0..SIDE {
                for x in 0..SIDE {
                    d[(y + 1) * (SIDE + 2) + x + 1] = s[y * SIDE + x] * mul + add;
                }
            }
        });
    sized(&mut ws.z1, n * SIDE * SIDE * c1);
    conv3x3(
        &ws.xpad,
        n,
        SIDE,
        SIDE,
        1,
        &pack_conv(wt.conv1, c1, 1),
        &mut ws.z1,
    );
    let bn1 = Bn::new(&ws.z1, c1, wt.gamma1, wt.beta1, bn_eps);
    sized(&mut ws.p1pad, n * 16 * 16 * c1);
    sized(&mut ws.arg1, n * 196 * c1);
    sized(&mut ws.zsel1, n * 196 * c1);
    bn_relu_pool(
        &ws.z1,
        n,
        SIDE,
        SIDE,
        c1,
        &bn1,
        &mut ws.p1pad,
        1,
        &mut ws.arg1,
        &mut ws.zsel1,
    );

    sized(&mut ws.z2, n * 196 * c2);
    conv3x3(
        &ws.p1pad,
        n,
        14,
        14,
        c1,
        &pack_conv(wt.conv2, c2, c1),
        &mut ws.z2,
    );
    let bn2 = Bn::new(&ws.z2, c2, wt.gamma2, wt.beta2, bn_eps);
    sized(&mut ws.p2, n * feat);
    sized(&mut ws.arg2, n * 49 * c2);
    sized(&mut ws.zsel2, n * 49 * c2);
    bn_relu_pool(
        &ws.z2,
        n,
        14,
        14,
        c2,
        &bn2,
        &mut ws.p2,
        0,
        &mut ws.arg2,
        &mut ws.zsel2,
    );

    // fc1 + ReLU, dropout, fc2.
    sized(&mut ws.h, n * hid);
    sgemm_strided(
        n,
        hid,
        feat,
        Mat::rows(&ws.p2, feat),
        Mat::transposed(wt.fc1_w, feat),
        &mut ws.h,
        hid,
        true,
    );
    for row in ws.h.chunks_exact_mut(hid) {
        row.iter_mut()
            .zip(wt.fc1_b)
            .for_each(|(v, b)| *v = (*v + b).max(0.0));
    }
    let p = cfg.dropout;
    let keep = 1.0 / (1.0 - p);
    for m in sized(&mut ws.mask, n * hid).iter_mut() {
        *m = if p > 0.0 && r.random::<f32>() < p {
            0.0
        } else if p > 0.0 {
            keep
        } else {
            1.0
        };
    }
    sized(&mut ws.hd, n * hid);
    for ((d, h), m) in ws.hd.iter_mut().zip(&ws.h).zip(&ws.mask) {
        *d = h * m;
    }
    sized(&mut ws.logits, n * k);
    sgemm_strided(
        n,
        k,
        hid,
        Mat::rows(&ws.hd, hid),
        Mat::transposed(wt.fc2_w, hid),
        &mut ws.logits,
        k,
        false,
    );

    // ---- loss: (1 − s)·NLL + s·mean(−log p), and its gradient.
    let s = batch.smoothing;
    let mut loss = 0f64;
    sized(&mut ws.dlogits, n * k);
    for (i, (row, d)) in ws
        .logits
        .chunks_exact_mut(k)
        .zip(ws.dlogits.chunks_exact_mut(k))
        .enumerate()
    {
        row.iter_mut().zip(wt.fc2_b).for_each(|(v, b)| *v += b);
        let max = row.iter().fold(f32::NEG_INFINITY, |a, v| a.max(*v));
        let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
        let y = batch.labels[i] as usize;
        assert!(y < k, "label {y} out of range");
        let mean_logit = row.iter().sum::<f32>() / k as f32;
        loss += ((1.0 - s) * (lse - row[y]) + s * (lse - mean_logit)) as f64;
        for (j, (dv, v)) in d.iter_mut().zip(row.iter()).enumerate() {
            let target = if j == y { 1.0 - s } else { 0.0 } + s / k as f32;
            *dv = ((v - lse).exp() - target) / n as f32;
        }
    }

    // ---- backward
    let (g_fc2_w, g_fc2_b) = linear_backward(
        &ws.dlogits,
        &ws.hd,
        wt.fc2_w,
        n,
        (hid, k),
        &mut ws.dh,
        false,
    );
    for ((d, m), h) in ws.dh.iter_mut().zip(&ws.mask).zip(&ws.h) {
        *d = if *h > 0.0 { *d * m } else { 0.0 };
    }
    let (g_fc1_w, g_fc1_b) =
        linear_backward(&ws.dh, &ws.p2, wt.fc1_w, n, (feat, hid), &mut ws.dp2, true);

    sized(&mut ws.dz2p, n * 16 * 16 * c2);
    let (g_gamma2, g_beta2) = pool_bn_backward(
        &ws.dp2,
        &ws.arg2,
        &ws.zsel2,
        &ws.z2,
        n,
        14,
        14,
        c2,
        &bn2,
        &mut ws.dz2p,
    );
    let g_conv2 = weight_grad(&ws.dz2p, &ws.p1pad, n, 14, 14, c1, c2);
    sized(&mut ws.dp1, n * 196 * c1);
    conv3x3(
        &ws.dz2p,
        n,
        14,
        14,
        c2,
        &pack_conv_flipped(wt.conv2, c2, c1),
        &mut ws.dp1,
    );

    sized(&mut ws.dz1p, n * pad1 * c1);
    let (g_gamma1, g_beta1) = pool_bn_backward(
        &ws.dp1,
        &ws.arg1,
        &ws.zsel1,
        &ws.z1,
        n,
        SIDE,
        SIDE,
        c1,
        &bn1,
        &mut ws.dz1p,
    );
    let g_conv1 = weight_grad(&ws.dz1p, &ws.xpad, n, SIDE, SIDE, 1, c1);

    StepResult {
        loss: (loss / n as f64) as f32,
        grads: vec![
            g_conv1, g_gamma1, g_beta1, g_conv2, g_gamma2, g_beta2, g_fc1_w, g_fc1_b, g_fc2_w,
            g_fc2_b,
        ],
        batch_stats: [
            (n * SIDE * SIDE, bn1.mean, bn1.var),
            (n * 196, bn2.mean, bn2.var),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::rng;
    use crate::models::cnn::Cnn;
    use crate::models::{flat, Classifier};
    use candle_core::{Device, Tensor};

    const EPS: f32 = 1e-5;

    /// Images with structure (smooth blobs plus noise) and cycling labels.
    fn batch(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut r = rng(seed, 9);
        let images = (0..n * 784)
            .map(|i| {
                let (y, x) = ((i % 784) / 28, i % 28);
                let blob = (((y as f32 - 14.0).powi(2)
                    + (x as f32 - 10.0 - (i / 784 % 7) as f32).powi(2))
                    / -60.0)
                    .exp();
                (0.7 * blob + 0.3 * r.random::<f32>()).min(1.0)
            })
            .collect();
        let labels = (0..n).map(|i| (i as u32 * 7 + seed as u32) % 10).collect();
        (images, labels)
    }

    fn params(model: &Cnn) -> Vec<Vec<f32>> {
        model
            .params()
            .vars()
            .iter()
            .map(|(_, v)| flat(v.as_tensor()).unwrap())
            .collect()
    }

    /// The autograd path: `forward_with` on fmnist's candle kernels, then `backward()`.
    fn autograd(
        model: &Cnn,
        images: &[f32],
        labels: &[u32],
        s: f32,
        seed: u64,
    ) -> (f32, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        let n = labels.len();
        let xs = Tensor::from_vec(images.to_vec(), (n, 1, 28, 28), &dev).unwrap();
        let ys = Tensor::from_vec(labels.to_vec(), n, &dev).unwrap();
        let logits = model
            .forward_with(&xs, Some(&mut rng(seed, 3)), false)
            .unwrap();
        let loss = crate::train::training_loss(&logits, &ys, s as f64).unwrap();
        let grads = loss.backward().unwrap();
        let g = model
            .params()
            .vars()
            .iter()
            .map(|(_, v)| flat(grads.get(v).unwrap()).unwrap())
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |a, x| a.max(x.abs()))
    }

    /// Same loss, same gradients and same running statistics as autograd, for the shipped
    /// sizes (AVX-512 kernel widths) and odd ones (the portable path), batches of one image
    /// up to several parallel chunks, with and without dropout and label smoothing.
    #[test]
    fn matches_autograd() {
        let dev = Device::Cpu;
        let cases = [
            (CnnConfig::default(), 17, 0.0),
            (CnnConfig::default(), 1, 0.1),
            (
                CnnConfig {
                    conv1: 8,
                    conv2: 24,
                    hidden: 20,
                    dropout: 0.0,
                },
                40,
                0.0,
            ),
            (
                CnnConfig {
                    conv1: 16,
                    conv2: 48,
                    hidden: 33,
                    dropout: 0.5,
                },
                9,
                0.2,
            ),
        ];
        for (i, (cfg, n, s)) in cases.into_iter().enumerate() {
            let seed = 100 + i as u64;
            let a = Cnn::new(cfg.clone(), &mut rng(seed, 1), &dev).unwrap();
            let b = Cnn::new(cfg.clone(), &mut rng(seed, 1), &dev).unwrap();
            let (images, labels) = batch(n, seed);
            let (loss_a, grads_a) = autograd(&a, &images, &labels, s, seed);
            let ys = Tensor::from_vec(labels.clone(), n, &dev).unwrap();
            let xs = Tensor::from_vec(images.clone(), (n, 1, 28, 28), &dev).unwrap();
            let mut ws = Workspace::default();
            let (loss_b, grads_b) = b
                .cpu_train_step(&xs, &ys, s, &mut rng(seed, 3), &mut ws)
                .unwrap();
            assert!(
                (loss_a - loss_b).abs() <= 1e-5 * loss_a.abs().max(1.0),
                "case {i}: loss {loss_a} vs {loss_b}"
            );
            for ((name, _), (ga, gb)) in a.params().vars().iter().zip(grads_a.iter().zip(&grads_b))
            {
                assert_eq!(ga.len(), gb.len(), "case {i}: {name}");
                let scale = max_abs(ga).max(1e-6);
                let d = max_abs(&ga.iter().zip(gb).map(|(x, y)| x - y).collect::<Vec<_>>());
                assert!(
                    d / scale < 1e-4,
                    "case {i}: {name} gradient differs by {d} (scale {scale})"
                );
            }
            let ta = a.params().tensors();
            let tb = b.params().tensors();
            for name in ["conv1.bn.running_mean", "conv2.bn.running_var"] {
                let (x, y) = (flat(&ta[name]).unwrap(), flat(&tb[name]).unwrap());
                let d = max_abs(&x.iter().zip(&y).map(|(p, q)| p - q).collect::<Vec<_>>());
                assert!(
                    d <= 1e-5 * max_abs(&x).max(1.0),
                    "case {i}: {name} differs by {d}"
                );
            }
        }
    }

    /// A second step on the same workspace with a smaller batch (the last batch of an epoch)
    /// gives what a fresh workspace gives: no stale values leak through reused buffers.
    #[test]
    fn reused_workspace_is_clean() {
        let cfg = CnnConfig::default();
        let model = Cnn::new(cfg.clone(), &mut rng(7, 1), &Device::Cpu).unwrap();
        let p = params(&model);
        let w = Weights::from_flat(&p);
        let mut ws = Workspace::default();
        let (big, big_labels) = batch(20, 1);
        let step = |images: &[f32], labels: &[u32], ws: &mut Workspace| {
            let b = Batch {
                images,
                labels,
                smoothing: 0.0,
            };
            train_step(&cfg, &w, &b, EPS, &mut rng(1, 1), ws)
        };
        step(&big, &big_labels, &mut ws);
        let (small, small_labels) = batch(3, 2);
        let reused = step(&small, &small_labels, &mut ws);
        let fresh = step(&small, &small_labels, &mut Workspace::default());
        assert_eq!(reused.loss, fresh.loss);
        assert_eq!(reused.grads, fresh.grads);
    }

    /// Central finite differences of the loss agree with the analytic gradient on the
    /// coordinates with the largest gradients of every parameter tensor.
    #[test]
    fn finite_differences() {
        let cfg = CnnConfig {
            conv1: 8,
            conv2: 16,
            hidden: 16,
            dropout: 0.0,
        };
        let model = Cnn::new(cfg.clone(), &mut rng(3, 1), &Device::Cpu).unwrap();
        let mut p = params(&model);
        let (images, labels) = batch(6, 4);
        let loss_at = |p: &[Vec<f32>]| {
            let b = Batch {
                images: &images,
                labels: &labels,
                smoothing: 0.1,
            };
            train_step(
                &cfg,
                &Weights::from_flat(p),
                &b,
                EPS,
                &mut rng(0, 0),
                &mut Workspace::default(),
            )
        };
        let grads = loss_at(&p).grads;
        let h = 1e-3f32;
        for t in 0..p.len() {
            let mut idx: Vec<usize> = (0..grads[t].len()).collect();
            idx.sort_by(|&a, &b| grads[t][b].abs().total_cmp(&grads[t][a].abs()));
            for &j in idx.iter().take(3) {
                let orig = p[t][j];
                p[t][j] = orig + h;
                let up = loss_at(&p).loss as f64;
                p[t][j] = orig - h;
                let down = loss_at(&p).loss as f64;
                p[t][j] = orig;
                let fd = ((up - down) / (2.0 * h as f64)) as f32;
                let g = grads[t][j];
                assert!(
                    (fd - g).abs() <= 0.03 * g.abs() + 5e-4,
                    "tensor {t} index {j}: finite difference {fd}, gradient {g}"
                );
            }
        }
    }
}
