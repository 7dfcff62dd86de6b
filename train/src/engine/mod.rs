//! The CPU training engine: a network is a list of layers, each with its forward and
//! backward pass written out side by side (`layers.rs`), run over buffers kept from step to
//! step, outside candle's autograd.
//!
//! Why: through autograd every intermediate and every gradient is a freshly allocated (and
//! zeroed) tensor, gradients are summed by generic element-wise ops, and a convolution's
//! weight gradient needs an im2col matrix. A small classifier's step is a known sequence of a
//! dozen kernels, so it is cheaper to run them directly:
//! - convolutions, forward and input gradient alike, go through the serving executor's
//!   kernel (`fmnist::kernels`), which reads 3×3 windows in place from zero-padded
//!   channels-last buffers; the input gradient is the convolution of the padded output
//!   gradient with the flipped, transposed weights;
//! - a weight gradient is three sums of outer products (`kernels::outer_sum`), one per kernel
//!   row, of the padded output gradient with the padded input read in place (no im2col);
//! - batch-norm, the activation (ReLU or GELU) and 2×2 max-pooling are one pass forward
//!   (keeping the arg-max) and two passes backward;
//! - the input image's gradient, which nothing needs, is never computed.
//!
//! The two-conv CNN and the six-conv default recipe are both just lists of [`Layer`]s. A step
//! computes the same function and the same gradients as candle's autograd over the same ops
//! (tests below, for several networks, widths and batch sizes, and finite differences), including
//! the dropout mask, drawn from the same random stream in the same order. Sums are split into
//! fixed chunks combined in order, so a step's result does not depend on the number of
//! threads.

pub mod layers;

use fmnist::kernels::bf16::Bf16Path;
use fmnist::kernels::conv_bf16;
pub use layers::Act;
use layers::{sized, Bn, BnShape};
use rand_chacha::ChaCha8Rng;

/// The bf16 path `train` uses by default on this CPU: AMX tiles where present (and permitted
/// by the kernel), else none. AVX512_BF16 alone (AMD Zen 4, for instance) is not used: its
/// register kernel measured slower than the fp32 one (BENCHMARKS.md).
pub fn bf16_path() -> Option<Bf16Path> {
    Bf16Path::detect().filter(|p| *p == Bf16Path::Amx)
}

/// One layer of a network, as a recipe names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    /// Same-size 3×3 convolution without bias (stride 1, padding 1); weight `[cout, 3, 3, cin]`.
    /// Must be followed by [`Layer::BnAct`], whose shift is its bias.
    Conv3x3 { cout: usize },
    /// Batch-norm (batch statistics) and an activation, then a 2×2 max-pool (stride 2, odd
    /// sides floored) if `pool`; parameters γ and β `[c]`. Must follow a [`Layer::Conv3x3`].
    BnAct { act: Act, pool: bool },
    /// `y = x · wᵀ + b` over the flattened (NHWC) input, then ReLU if `relu`; weight
    /// `[outputs, inputs]`, bias `[outputs]`.
    Linear { outputs: usize, relu: bool },
    /// Inverted dropout with drop probability `p`.
    Dropout { p: f32 },
    /// The mean of each channel over the image (PyTorch's `AdaptiveAvgPool2d(1)`), `[c]` per
    /// image. Follows batch-norm.
    GlobalAvgPool,
}

/// A layer with the shapes it runs at.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Conv {
        h: usize,
        w: usize,
        cin: usize,
        cout: usize,
    },
    BnAct {
        h: usize,
        w: usize,
        c: usize,
        act: Act,
        pool: bool,
        out_pad: usize,
    },
    Linear {
        inputs: usize,
        outputs: usize,
        relu: bool,
    },
    Dropout {
        p: f32,
        len: usize,
    },
    GlobalAvgPool {
        hw: usize,
        c: usize,
    },
}

/// A network for the engine: its layers resolved against an input shape.
#[derive(Debug, Clone)]
pub struct Net {
    side: usize,
    channels: usize,
    /// Input normalisation `x·mul + add`, applied as the image is copied in.
    norm: (f32, f32),
    layers: Vec<Resolved>,
    bn_eps: f32,
    /// The bf16 tile path the convolutions' products run on, if any ([`Net::with_bf16`]).
    bf16: Option<Bf16Path>,
}

/// Why a list of layers is not a network the engine runs.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NetError {
    #[error("layer {0}: a 3×3 convolution must read the input or follow batch-norm")]
    ConvInput(usize),
    #[error("layer {0}: batch-norm must follow a 3×3 convolution")]
    BnInput(usize),
    #[error("layer {0}: the last layer must be Linear with {1} outputs and no ReLU")]
    Output(usize, usize),
    #[error("layer {0}: 2×2 pooling needs at least 2×2 pixels, got {1}×{2}")]
    SmallPool(usize, usize, usize),
    #[error("layer {0}: dropout probability must be in [0, 1), got {1}")]
    Dropout(usize, f32),
    #[error("layer {0}: a layer needs at least one output")]
    Empty(usize),
    #[error("layer {0}: a convolution after a fully connected layer has no image to read")]
    ConvAfterFlat(usize),
    #[error("layer {0}: global average pooling must follow batch-norm")]
    GapInput(usize),
}

/// One training batch.
pub struct Batch<'a> {
    /// `N × side² × channels` pixels scaled to 0–1.
    pub images: &'a [f32],
    /// `N` labels below the number of outputs.
    pub labels: &'a [u32],
    /// Label smoothing in `[0, 1)`.
    pub smoothing: f32,
}

/// What one step computes.
pub struct StepResult {
    /// Mean training loss of the batch.
    pub loss: f32,
    /// Gradients of the mean loss, in parameter order ([`Net::param_shapes`]).
    pub grads: Vec<Vec<f32>>,
    /// Per batch-norm layer, in order: rows normalised, batch mean and biased batch variance.
    pub batch_stats: Vec<(usize, Vec<f32>, Vec<f32>)>,
}

/// A layer's buffers, kept between steps.
#[derive(Default)]
struct Buffers {
    /// A bf16 convolution's own buffers.
    conv: layers::Bf16Conv,
    /// The layer's output (padded when a convolution reads it).
    out: Vec<f32>,
    /// The output in bf16 instead, padded, when a bf16 convolution reads it.
    outb: Vec<u16>,
    /// The gradient of the loss with respect to `out` (padded when `out` is a convolution's).
    dout: Vec<f32>,
    /// A bf16 convolution's output gradient, padded, in bf16 instead of `dout`.
    doutb: Vec<u16>,
    /// Max-pool winners and their conv values; dropout's mask.
    arg: Vec<u8>,
    zsel: Vec<f32>,
    mask: Vec<f32>,
    /// The activation's gradient at every value, when the forward pass keeps it.
    grad: Vec<f32>,
    bn: Bn,
}

/// Buffers kept between steps, one set per layer. Grows to the largest batch seen.
#[derive(Default)]
pub struct Workspace {
    input: Vec<f32>,
    /// The input in bf16, when a bf16 convolution reads it first.
    inputb: Vec<u16>,
    layers: Vec<Buffers>,
}

impl Net {
    /// Resolves `layers` for square images of `side` pixels and `channels` channels, scaled
    /// by `norm` (`x·mul + add`) on the way in; the last layer's outputs are the classes.
    pub fn new(
        side: usize,
        channels: usize,
        norm: (f32, f32),
        layers: &[Layer],
        classes: usize,
        bn_eps: f32,
    ) -> Result<Net, NetError> {
        let (mut h, mut w, mut c) = (side, side, channels);
        let mut flat: Option<usize> = None;
        let mut out = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| &layers[j]);
            let r = match *layer {
                Layer::Conv3x3 { cout } => {
                    if flat.is_some() {
                        return Err(NetError::ConvAfterFlat(i));
                    }
                    if !matches!(prev, None | Some(Layer::BnAct { .. })) {
                        return Err(NetError::ConvInput(i));
                    }
                    if cout == 0 {
                        return Err(NetError::Empty(i));
                    }
                    let r = Resolved::Conv { h, w, cin: c, cout };
                    c = cout;
                    r
                }
                Layer::BnAct { act, pool } => {
                    if !matches!(prev, Some(Layer::Conv3x3 { .. })) {
                        return Err(NetError::BnInput(i));
                    }
                    if pool && (h < 2 || w < 2) {
                        return Err(NetError::SmallPool(i, h, w));
                    }
                    let next_conv = matches!(layers.get(i + 1), Some(Layer::Conv3x3 { .. }));
                    let r = Resolved::BnAct {
                        h,
                        w,
                        c,
                        act,
                        pool,
                        out_pad: usize::from(next_conv),
                    };
                    if pool {
                        (h, w) = (h / 2, w / 2);
                    }
                    r
                }
                Layer::Linear { outputs, relu } => {
                    if outputs == 0 {
                        return Err(NetError::Empty(i));
                    }
                    let inputs = flat.unwrap_or(h * w * c);
                    flat = Some(outputs);
                    Resolved::Linear {
                        inputs,
                        outputs,
                        relu,
                    }
                }
                Layer::GlobalAvgPool => {
                    if flat.is_some() || !matches!(prev, Some(Layer::BnAct { .. })) {
                        return Err(NetError::GapInput(i));
                    }
                    let r = Resolved::GlobalAvgPool { hw: h * w, c };
                    flat = Some(c);
                    r
                }
                Layer::Dropout { p } => {
                    if !(0.0..1.0).contains(&p) {
                        return Err(NetError::Dropout(i, p));
                    }
                    Resolved::Dropout {
                        p,
                        len: flat.unwrap_or(h * w * c),
                    }
                }
            };
            out.push(r);
        }
        match layers.last() {
            Some(Layer::Linear {
                outputs,
                relu: false,
            }) if *outputs == classes => {}
            _ => return Err(NetError::Output(layers.len().saturating_sub(1), classes)),
        }
        Ok(Net {
            side,
            channels,
            norm,
            layers: out,
            bn_eps,
            bf16: None,
        })
    }

    /// Runs the convolutions whose input and output channels are multiples of 32 (a tile's
    /// 32 values must not straddle two kernel rows) as bf16 tile products on `path`, with
    /// fp32 master weights, fp32 accumulation and fp32 everywhere else. `path` must be a
    /// tile path (AMX, or the emulation in tests); panics otherwise.
    pub fn with_bf16(mut self, path: Bf16Path) -> Net {
        assert!(
            matches!(path, Bf16Path::Amx | Bf16Path::Emulated),
            "the engine's bf16 convolutions need tiles, not {}",
            path.name()
        );
        self.bf16 = Some(path);
        self
    }

    /// The bf16 path convolution `(cin, cout)` runs on, if any.
    fn conv_bf16(&self, cin: usize, cout: usize) -> Option<Bf16Path> {
        self.bf16
            .filter(|_| cin.is_multiple_of(32) && cout.is_multiple_of(32))
    }

    /// The bf16 path of layer `i` if it is a convolution that runs in bf16.
    fn bf16_conv_at(&self, i: usize) -> Option<Bf16Path> {
        match self.layers.get(i) {
            Some(&Resolved::Conv { cin, cout, .. }) => self.conv_bf16(cin, cout),
            _ => None,
        }
    }

    /// The kernel path this network's step runs, which fixes the bits a seed gives:
    /// `"amx-bf16"` (or `"emulated-bf16"`) when a convolution runs in bf16, else the fp32
    /// kernels' path (`"avx512-fp32"` or `"portable-fp32"`).
    pub fn kernel_path(&self) -> &'static str {
        let bf16 = self.layers.iter().find_map(|l| match *l {
            Resolved::Conv { cin, cout, .. } => self.conv_bf16(cin, cout),
            _ => None,
        });
        bf16.map_or_else(fmnist::kernels::fp32_path, Bf16Path::name)
    }

    /// Shapes of the parameters, in the order steps take and return them: per layer, a
    /// convolution's weight `[cout, 3, 3, cin]`, batch-norm's γ and β `[c]`, a linear
    /// layer's weight `[outputs, inputs]` and bias `[outputs]`.
    pub fn param_shapes(&self) -> Vec<Vec<usize>> {
        let mut s = Vec::new();
        for l in &self.layers {
            match *l {
                Resolved::Conv { cin, cout, .. } => s.push(vec![cout, 3, 3, cin]),
                Resolved::BnAct { c, .. } => {
                    s.push(vec![c]);
                    s.push(vec![c]);
                }
                Resolved::Linear {
                    inputs, outputs, ..
                } => {
                    s.push(vec![outputs, inputs]);
                    s.push(vec![outputs]);
                }
                Resolved::Dropout { .. } | Resolved::GlobalAvgPool { .. } => {}
            }
        }
        s
    }

    /// Padding of the input buffer: 1 when a convolution reads it.
    fn input_pad(&self) -> usize {
        usize::from(matches!(self.layers.first(), Some(Resolved::Conv { .. })))
    }

    /// Forward and backward pass of one batch. `params` are in [`Net::param_shapes`] order;
    /// `r` is the batch's random stream after the batch was drawn (dropout masks come from it,
    /// layer by layer, as on the autograd path).
    pub fn step(
        &self,
        params: &[Vec<f32>],
        batch: &Batch,
        r: &mut ChaCha8Rng,
        ws: &mut Workspace,
    ) -> StepResult {
        let shapes = self.param_shapes();
        assert_eq!(params.len(), shapes.len(), "parameter count");
        for (p, s) in params.iter().zip(&shapes) {
            assert_eq!(p.len(), s.iter().product::<usize>(), "parameter size");
        }
        let n = batch.labels.len();
        let per_image = self.side * self.side * self.channels;
        assert_eq!(batch.images.len(), n * per_image, "pixels per image");
        assert!(n > 0, "an empty batch");
        ws.layers.resize_with(self.layers.len(), Buffers::default);

        // Input: normalised, into the interior of a padded buffer when a convolution reads it.
        let (side, ch, pad) = (self.side, self.channels, self.input_pad());
        let ps = side + 2 * pad;
        let (mul, add) = self.norm;
        {
            use rayon::prelude::*;
            sized(&mut ws.input, n * ps * ps * ch)
                .par_chunks_mut(ps * ps * ch)
                .zip(batch.images.par_chunks(per_image))
                .for_each(|(d, s)| {
                    for y in 0..side {
                        let row =
                            &mut d[((y + pad) * ps + pad) * ch..((y + pad) * ps + pad + side) * ch];
                        for (d, s) in row.iter_mut().zip(&s[y * side * ch..(y + 1) * side * ch]) {
                            *d = s * mul + add;
                        }
                    }
                });
        }

        if self.bf16_conv_at(0).is_some() {
            conv_bf16::round_padded(&ws.input, n, side, side, ch, &mut ws.inputb);
        }

        // ---- forward
        let mut pi = 0;
        let mut bn_stats = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let (input, inputb, cur) = io(ws, i);
            match *layer {
                Resolved::Conv { h, w, cin, cout } => {
                    sized(&mut cur.out, n * h * w * cout);
                    if let Some(path) = self.conv_bf16(cin, cout) {
                        let shape = (h, w, cin, cout);
                        cur.conv
                            .forward(path, inputb, n, shape, &params[pi], &mut cur.out);
                        pi += 1;
                        continue;
                    }
                    layers::conv3x3(
                        input,
                        n,
                        h,
                        w,
                        cin,
                        &layers::pack_conv(&params[pi], cout, cin),
                        &mut cur.out,
                    );
                    pi += 1;
                }
                Resolved::BnAct {
                    h,
                    w,
                    c,
                    act,
                    pool,
                    out_pad,
                } => {
                    let s = BnShape {
                        n,
                        h,
                        w,
                        c,
                        out_pad,
                    };
                    let z = &input[..n * h * w * c];
                    cur.bn = Bn::new(z, c, &params[pi], &params[pi + 1], self.bn_eps);
                    bn_stats.push((n * h * w, cur.bn.mean.clone(), cur.bn.var.clone()));
                    // A bf16 convolution next reads the output in bf16 only.
                    let to_bf16 = self.bf16_conv_at(i + 1).is_some();
                    let (oh, ow) = if pool { (h / 2, w / 2) } else { (h, w) };
                    let op = out_pad;
                    if to_bf16 {
                        conv_bf16::padded_buffer(&mut cur.outb, n, oh, ow, c);
                    } else {
                        sized(&mut cur.out, n * (oh + 2 * op) * (ow + 2 * op) * c);
                    }
                    let bn = &cur.bn;
                    if pool {
                        sized(&mut cur.arg, n * oh * ow * c);
                        sized(&mut cur.zsel, n * oh * ow * c);
                        let (arg, zsel) = (&mut cur.arg, &mut cur.zsel);
                        match to_bf16 {
                            true => layers::bn_act_pool(act, z, s, bn, &mut cur.outb, arg, zsel),
                            false => layers::bn_act_pool(act, z, s, bn, &mut cur.out, arg, zsel),
                        }
                    } else {
                        match to_bf16 {
                            true => layers::bn_act(act, z, s, bn, &mut cur.outb, &mut cur.grad),
                            false => layers::bn_act(act, z, s, bn, &mut cur.out, &mut cur.grad),
                        }
                    }
                    pi += 2;
                }
                Resolved::Linear {
                    inputs,
                    outputs,
                    relu,
                } => {
                    layers::linear(
                        &input[..n * inputs],
                        &params[pi],
                        &params[pi + 1],
                        n,
                        (inputs, outputs),
                        relu,
                        &mut cur.out,
                    );
                    pi += 2;
                }
                Resolved::Dropout { p, len } => {
                    layers::dropout(&input[..n * len], p, r, &mut cur.mask, &mut cur.out);
                }
                Resolved::GlobalAvgPool { hw, c } => {
                    layers::global_avg_pool(input, n, hw, c, &mut cur.out);
                }
            }
        }

        // ---- loss: (1 − s)·NLL + s·mean(−log p), and its gradient.
        let last = ws.layers.last_mut().expect("a network has layers");
        let k = match self.layers.last() {
            Some(Resolved::Linear { outputs, .. }) => *outputs,
            _ => unreachable!("checked by Net::new"),
        };
        let loss = softmax_cross_entropy(&last.out[..n * k], batch, k, &mut last.dout);

        // ---- backward
        let mut grads: Vec<Vec<f32>> = vec![Vec::new(); params.len()];
        let mut bi = bn_stats.len();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let (input, inputb, cur, dprev) = io_back(ws, i);
            match *layer {
                Resolved::Conv { h, w, cin, cout } => {
                    pi -= 1;
                    let dinput = dprev.map(|(d, _)| d);
                    if let Some(path) = self.conv_bf16(cin, cout) {
                        let shape = (h, w, cin, cout);
                        let (w, db) = (&params[pi], &cur.doutb);
                        grads[pi] = cur.conv.backward(path, inputb, n, shape, w, db, dinput);
                        continue;
                    }
                    grads[pi] = layers::conv3x3_weight_grad(&cur.dout, input, n, h, w, cin, cout);
                    if let Some(dx) = dinput {
                        sized(dx, n * h * w * cin);
                        layers::conv3x3(
                            &cur.dout,
                            n,
                            h,
                            w,
                            cout,
                            &layers::pack_conv_flipped(&params[pi], cout, cin),
                            dx,
                        );
                    }
                }
                Resolved::BnAct {
                    h,
                    w,
                    c,
                    act,
                    pool,
                    out_pad,
                } => {
                    pi -= 2;
                    bi -= 1;
                    let s = BnShape {
                        n,
                        h,
                        w,
                        c,
                        out_pad,
                    };
                    let (dz, dzb) = dprev.expect("batch-norm follows a convolution");
                    let z = &input[..n * h * w * c];
                    let (dy, bn) = (&mut cur.dout, &cur.bn);
                    // The convolution before, if bf16, reads its output gradient in bf16 only.
                    let (dg, db) = match (pool, self.bf16_conv_at(i - 1).is_some()) {
                        (true, true) => {
                            conv_bf16::padded_buffer(dzb, n, h, w, c);
                            layers::bn_act_pool_backward(
                                act, dy, &cur.arg, &cur.zsel, z, s, bn, dzb,
                            )
                        }
                        (true, false) => {
                            sized(dz, n * (h + 2) * (w + 2) * c);
                            layers::bn_act_pool_backward(act, dy, &cur.arg, &cur.zsel, z, s, bn, dz)
                        }
                        (false, true) => {
                            conv_bf16::padded_buffer(dzb, n, h, w, c);
                            layers::bn_act_backward(act, dy, z, &cur.grad, s, bn, dzb)
                        }
                        (false, false) => {
                            sized(dz, n * (h + 2) * (w + 2) * c);
                            layers::bn_act_backward(act, dy, z, &cur.grad, s, bn, dz)
                        }
                    };
                    grads[pi] = dg;
                    grads[pi + 1] = db;
                }
                Resolved::Linear {
                    inputs,
                    outputs,
                    relu,
                } => {
                    pi -= 2;
                    let (gw, gb) = layers::linear_backward(
                        &mut cur.dout,
                        &cur.out,
                        relu,
                        &input[..n * inputs],
                        &params[pi],
                        n,
                        (inputs, outputs),
                        dprev.map(|(d, _)| d),
                    );
                    grads[pi] = gw;
                    grads[pi + 1] = gb;
                }
                Resolved::Dropout { len, .. } => {
                    if let Some((dx, _)) = dprev {
                        layers::dropout_backward(&cur.dout[..n * len], &cur.mask[..n * len], dx);
                    }
                }
                Resolved::GlobalAvgPool { hw, c } => {
                    if let Some((dx, _)) = dprev {
                        layers::global_avg_pool_backward(&cur.dout, n, hw, c, dx);
                    }
                }
            }
        }
        debug_assert_eq!((pi, bi), (0, 0));
        StepResult {
            loss,
            grads,
            batch_stats: bn_stats,
        }
    }
}

/// Layer `i`'s input (fp32 and bf16: whichever its producer wrote) and its buffers.
fn io(ws: &mut Workspace, i: usize) -> (&[f32], &[u16], &mut Buffers) {
    if i == 0 {
        (&ws.input, &ws.inputb, &mut ws.layers[0])
    } else {
        let (before, rest) = ws.layers.split_at_mut(i);
        (&before[i - 1].out, &before[i - 1].outb, &mut rest[0])
    }
}

/// The gradient buffers of a layer's input, fp32 and bf16.
type InputGrads<'a> = (&'a mut Vec<f32>, &'a mut Vec<u16>);

/// Layer `i`'s input (fp32 and bf16), its buffers, and the gradient buffers of its input
/// (none for the network's input, whose gradient nothing needs).
fn io_back(ws: &mut Workspace, i: usize) -> (&[f32], &[u16], &mut Buffers, Option<InputGrads<'_>>) {
    if i == 0 {
        (&ws.input, &ws.inputb, &mut ws.layers[0], None)
    } else {
        let (before, rest) = ws.layers.split_at_mut(i);
        let prev = &mut before[i - 1];
        (
            &prev.out,
            &prev.outb,
            &mut rest[0],
            Some((&mut prev.dout, &mut prev.doutb)),
        )
    }
}

/// Mean label-smoothed cross-entropy of `logits` (`[n, k]`), and its gradient into `dlogits`.
fn softmax_cross_entropy(logits: &[f32], batch: &Batch, k: usize, dlogits: &mut Vec<f32>) -> f32 {
    let n = batch.labels.len();
    let s = batch.smoothing;
    let mut loss = 0f64;
    sized(dlogits, n * k);
    for (i, (row, d)) in logits
        .chunks_exact(k)
        .zip(dlogits.chunks_exact_mut(k))
        .enumerate()
    {
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
    (loss / n as f64) as f32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::loader::rng;
    use crate::models::custom_ops::{batch_norm_act_stock, Im2Col3x3, MaxPool2x2};
    use candle_core::{Device, Tensor, Var, D};
    use rand::Rng;

    const EPS: f32 = 1e-5;
    const NORM: (f32, f32) = (1.0 / 0.35, -0.29 / 0.35);

    /// Images with structure (smooth blobs plus noise) and cycling labels. No two pixels are
    /// equal (no clamping): equal patches give exact max-pool ties, which two implementations
    /// summing in different orders may break differently.
    pub(crate) fn batch(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut r = rng(seed, 9);
        let images = (0..n * 784)
            .map(|i| {
                let (y, x) = ((i % 784) / 28, i % 28);
                let blob = (((y as f32 - 14.0).powi(2)
                    + (x as f32 - 10.0 - (i / 784 % 7) as f32).powi(2))
                    / -60.0)
                    .exp();
                0.6 * blob + 0.4 * r.random::<f32>()
            })
            .collect();
        let labels = (0..n).map(|i| (i as u32 * 7 + seed as u32) % 10).collect();
        (images, labels)
    }

    /// He-uniform weights, γ around 1, β and biases small but not zero (so every term of the
    /// batch-norm and bias gradients is exercised).
    fn init(net: &Net, seed: u64) -> Vec<Vec<f32>> {
        let mut r = rng(seed, 1);
        let mut draw = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| r.random_range(lo..hi)).collect()
        };
        let mut p = Vec::new();
        for l in &net.layers {
            match *l {
                Resolved::Conv { cin, cout, .. } => {
                    let b = (6.0 / (9 * cin) as f32).sqrt();
                    p.push(draw(9 * cin * cout, -b, b));
                }
                Resolved::BnAct { c, .. } => {
                    p.push(draw(c, 0.6, 1.4));
                    p.push(draw(c, -0.2, 0.2));
                }
                Resolved::Linear {
                    inputs, outputs, ..
                } => {
                    let b = (6.0 / inputs as f32).sqrt();
                    p.push(draw(inputs * outputs, -b, b));
                    p.push(draw(outputs, -0.2, 0.2));
                }
                Resolved::Dropout { .. } | Resolved::GlobalAvgPool { .. } => {}
            }
        }
        p
    }

    struct Reference {
        loss: f32,
        grads: Vec<Vec<f32>>,
        stats: Vec<(Vec<f32>, Vec<f32>)>,
    }

    /// The same network through candle's ops and autograd: im2col + matmul convolutions,
    /// batch-norm from candle's mean and variance, candle's `relu` and `gelu_erf`, the
    /// project's max-pool op (candle 0.11's stock one has a wrong gradient), candle's matmul,
    /// the shared dropout helper and the training loss.
    fn reference(
        layers: &[Layer],
        params: &[Vec<f32>],
        shapes: &[Vec<usize>],
        images: &[f32],
        labels: &[u32],
        s: f32,
        r: &mut ChaCha8Rng,
    ) -> Reference {
        let dev = Device::Cpu;
        let n = labels.len();
        let vars: Vec<Var> = params
            .iter()
            .zip(shapes)
            .map(|(p, s)| {
                Var::from_tensor(&Tensor::from_vec(p.clone(), s.as_slice(), &dev).unwrap()).unwrap()
            })
            .collect();
        let mut x = Tensor::from_vec(images.to_vec(), (n, 28, 28, 1), &dev)
            .unwrap()
            .affine(NORM.0 as f64, NORM.1 as f64)
            .unwrap();
        let mut pi = 0;
        let mut stats = Vec::new();
        for layer in layers {
            x = match *layer {
                Layer::Conv3x3 { cout } => {
                    let w = vars[pi].as_tensor();
                    pi += 1;
                    let (n, h, wd, _) = x.dims4().unwrap();
                    let k = w.elem_count() / cout;
                    x.apply_op1(Im2Col3x3)
                        .unwrap()
                        .matmul(&w.reshape((cout, k)).unwrap().t().unwrap())
                        .unwrap()
                        .reshape((n, h, wd, cout))
                        .unwrap()
                }
                Layer::BnAct { act, pool } => {
                    let (g, b) = (vars[pi].as_tensor(), vars[pi + 1].as_tensor());
                    pi += 2;
                    let (n, h, w, c) = x.dims4().unwrap();
                    let rows = x.reshape((n * h * w, c)).unwrap();
                    let (y, mean, var) =
                        batch_norm_act_stock(&rows, g, b, EPS as f64, act).unwrap();
                    stats.push((
                        mean.to_vec1::<f32>().unwrap(),
                        var.to_vec1::<f32>().unwrap(),
                    ));
                    let y = y.reshape((n, h, w, c)).unwrap();
                    if pool {
                        y.apply_op1(MaxPool2x2).unwrap()
                    } else {
                        y
                    }
                }
                Layer::Linear { relu, .. } => {
                    let (w, b) = (vars[pi].as_tensor(), vars[pi + 1].as_tensor());
                    pi += 2;
                    let y = x
                        .flatten_from(1)
                        .unwrap()
                        .matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(b)
                        .unwrap();
                    if relu {
                        y.relu().unwrap()
                    } else {
                        y
                    }
                }
                Layer::Dropout { p } => crate::models::dropout(&x, p, r).unwrap(),
                Layer::GlobalAvgPool => x.mean(1).unwrap().mean(1).unwrap(),
            };
        }
        let ys = Tensor::from_vec(labels.to_vec(), n, &dev).unwrap();
        let logits = x.flatten_from(1).unwrap();
        assert_eq!(logits.dim(D::Minus1).unwrap(), 10);
        let loss = crate::train::training_loss(&logits, &ys, s as f64).unwrap();
        let g = loss.backward().unwrap();
        Reference {
            loss: loss.to_scalar::<f32>().unwrap(),
            grads: vars
                .iter()
                .map(|v| {
                    g.get(v)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect(),
            stats,
        }
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0f32, |a, x| a.max(x.abs()))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    fn conv(cout: usize, act: Act, pool: bool) -> [Layer; 2] {
        [Layer::Conv3x3 { cout }, Layer::BnAct { act, pool }]
    }

    fn linear(outputs: usize, relu: bool) -> Layer {
        Layer::Linear { outputs, relu }
    }

    /// The two-conv CNN's shape.
    fn cnn(c1: usize, c2: usize, hidden: usize, p: f32) -> Vec<Layer> {
        let mut l = Vec::new();
        l.extend(conv(c1, Act::Relu, true));
        l.extend(conv(c2, Act::Relu, true));
        l.extend([
            linear(hidden, true),
            Layer::Dropout { p },
            linear(10, false),
        ]);
        l
    }

    /// Three blocks of two convolutions, pooling after each block (the last block's pool
    /// floors an odd side) and a linear classifier.
    fn six(widths: [usize; 3], act: Act) -> Vec<Layer> {
        let mut l = Vec::new();
        for w in widths {
            l.extend(conv(w, act, false));
            l.extend(conv(w, act, true));
        }
        l.push(linear(10, false));
        l
    }

    /// The accuracy issue's six-convolution network: pooling after the first two blocks,
    /// global average pooling, a linear classifier.
    fn six_gap(widths: [usize; 3], act: Act) -> Vec<Layer> {
        let mut l = Vec::new();
        for (i, w) in widths.into_iter().enumerate() {
            l.extend(conv(w, act, false));
            l.extend(conv(w, act, i < 2));
        }
        l.extend([Layer::GlobalAvgPool, linear(10, false)]);
        l
    }

    /// `tol`: the largest gradient difference allowed, relative to the largest gradient.
    fn check(name: &str, layers: &[Layer], n: usize, s: f32, seed: u64, tol: f32) {
        let net = Net::new(28, 1, NORM, layers, 10, EPS).unwrap();
        let shapes = net.param_shapes();
        let params = init(&net, seed);
        let (images, labels) = batch(n, seed);
        let want = reference(
            layers,
            &params,
            &shapes,
            &images,
            &labels,
            s,
            &mut rng(seed, 3),
        );
        let b = Batch {
            images: &images,
            labels: &labels,
            smoothing: s,
        };
        let got = net.step(&params, &b, &mut rng(seed, 3), &mut Workspace::default());
        assert!(
            (want.loss - got.loss).abs() <= 2e-5 * want.loss.abs().max(1.0),
            "{name}: loss {} vs {}",
            want.loss,
            got.loss
        );
        for (t, (a, b)) in want.grads.iter().zip(&got.grads).enumerate() {
            let scale = max_abs(a).max(1e-6);
            let d = max_diff(a, b);
            assert!(
                d / scale < tol
                    && (!name.starts_with("DIAGX") || {
                        eprintln!("{name} {t} {}", d / scale);
                        true
                    }),
                "{name}: parameter {t} {:?}: gradient differs by {d} (scale {scale})",
                shapes[t]
            );
        }
        assert_eq!(want.stats.len(), got.batch_stats.len());
        for (i, ((m, v), (rows, gm, gv))) in want.stats.iter().zip(&got.batch_stats).enumerate() {
            assert_eq!(*rows * gm.len(), n * (rows / n) * m.len());
            assert!(
                max_diff(m, gm) <= 1e-5 * max_abs(m).max(1.0),
                "{name}: bn {i} mean"
            );
            assert!(
                max_diff(v, gv) <= 1e-4 * max_abs(v).max(1.0),
                "{name}: bn {i} variance"
            );
        }
    }

    /// Same loss, gradients and batch statistics as candle's autograd over the same ops, for
    /// the two-conv CNN and a six-convolution GELU network; widths that take the AVX-512
    /// kernels (multiples of 16) and widths that take the portable ones; batches of one image
    /// up to several parallel chunks; with and without dropout and label smoothing.
    #[test]
    fn matches_candle_autograd() {
        check("cnn 32/96", &cnn(32, 96, 128, 0.1), 17, 0.0, 1, 2e-4);
        check("cnn odd", &cnn(8, 24, 20, 0.0), 1, 0.1, 2, 2e-4);
        check("cnn dropout", &cnn(16, 48, 33, 0.5), 9, 0.2, 3, 2e-4);
        check("six relu", &six([16, 16, 32], Act::Relu), 1, 0.1, 6, 2e-4);
        check("six gelu", &six([16, 32, 64], Act::Gelu), 5, 0.1, 4, 2e-4);
        check("six gelu odd", &six([5, 7, 9], Act::Gelu), 3, 0.0, 5, 2e-4);
        let gap = six_gap([16, 32, 48], Act::Gelu);
        check("six gap", &gap, 9, 0.1, 11, 2e-4);
        check(
            "six gap odd",
            &six_gap([3, 5, 7], Act::Gelu),
            2,
            0.0,
            8,
            2e-4,
        );
        check(
            "six gap relu",
            &six_gap([16, 32, 48], Act::Relu),
            7,
            0.1,
            7,
            2e-4,
        );
        // GELU is not monotonic: below its minimum (u ≈ −0.75) two values of a pooling window
        // can give GELU values within f32 rounding of each other, and the two
        // implementations' rounding (the engine's conv kernels and f64-chunked statistics
        // against candle's) can then pick different winners. This batch has such a window:
        // its gradients differ by up to 3.4e-3 of their largest value (the others: ~1e-5).
        check("six gap tie", &gap, 7, 0.1, 7, 5e-3);
    }

    /// Each layer type in the smallest network around it: a convolution with each
    /// activation and no pooling straight into the classifier, a pooled one, an MLP with
    /// dropout, and a single linear layer.
    #[test]
    fn each_layer_matches_candle_autograd() {
        for act in [Act::Relu, Act::Gelu] {
            let mut l = conv(16, act, false).to_vec();
            l.push(linear(10, false));
            check(&format!("conv+bn {act:?}"), &l, 4, 0.1, 7, 2e-4);
            let mut l = conv(6, act, true).to_vec();
            l.push(linear(10, false));
            check(&format!("conv+bn+pool {act:?}"), &l, 3, 0.0, 8, 2e-4);
        }
        let mlp = [
            linear(33, true),
            Layer::Dropout { p: 0.3 },
            linear(10, false),
        ];
        check("mlp", &mlp, 6, 0.1, 9, 2e-4);
        check("linear", &[linear(10, false)], 2, 0.0, 10, 2e-4);
    }

    /// Central finite differences of the loss agree with the analytic gradient on the
    /// coordinates with the largest gradients of every parameter tensor: for a smooth network
    /// (GELU, no max-pooling, global average pooling) and for the two-conv CNN's shape (ReLU,
    /// max-pool, dropout with a fixed mask).
    #[test]
    fn finite_differences() {
        let mut smooth = Vec::new();
        smooth.extend(conv(4, Act::Gelu, false));
        smooth.extend(conv(6, Act::Gelu, false));
        smooth.extend(conv(5, Act::Gelu, false));
        smooth.extend([Layer::GlobalAvgPool, linear(10, false)]);
        // Steps: large where the loss is smooth (f32 rounding of the loss, ~2e-7, stays far
        // below the step), small where a ReLU or max-pool kink could be crossed.
        for (name, layers, h) in [
            ("smooth", smooth, 1e-2f32),
            ("cnn", cnn(8, 16, 16, 0.2), 2e-4),
        ] {
            let net = Net::new(28, 1, NORM, &layers, 10, EPS).unwrap();
            let mut p = init(&net, 11);
            let (images, labels) = batch(6, 4);
            let loss_at = |p: &[Vec<f32>]| {
                let b = Batch {
                    images: &images,
                    labels: &labels,
                    smoothing: 0.1,
                };
                net.step(p, &b, &mut rng(0, 0), &mut Workspace::default())
            };
            let grads = loss_at(&p).grads;
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
                        "{name}: tensor {t} index {j}: finite difference {fd}, gradient {g}"
                    );
                }
            }
        }
    }

    /// A second step on the same workspace with a smaller batch (the last batch of an epoch)
    /// gives what a fresh workspace gives: no stale values leak through reused buffers.
    #[test]
    fn reused_workspace_is_clean() {
        let mut layers = six([16, 16, 32], Act::Gelu);
        layers.splice(
            layers.len() - 1..,
            [
                linear(24, true),
                Layer::Dropout { p: 0.1 },
                linear(10, false),
            ],
        );
        let net = Net::new(28, 1, NORM, &layers, 10, EPS).unwrap();
        let p = init(&net, 7);
        let mut ws = Workspace::default();
        let step = |images: &[f32], labels: &[u32], ws: &mut Workspace| {
            let b = Batch {
                images,
                labels,
                smoothing: 0.0,
            };
            net.step(&p, &b, &mut rng(1, 1), ws)
        };
        let (big, big_labels) = batch(20, 1);
        step(&big, &big_labels, &mut ws);
        let (small, small_labels) = batch(3, 2);
        let reused = step(&small, &small_labels, &mut ws);
        let fresh = step(&small, &small_labels, &mut Workspace::default());
        assert_eq!(reused.loss, fresh.loss);
        assert_eq!(reused.grads, fresh.grads);
    }

    /// ‖a − b‖ / ‖a‖ over all gradients at once.
    fn relative_l2(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
        let (mut d, mut s) = (0f64, 0f64);
        for (a, b) in a.iter().zip(b) {
            for (x, y) in a.iter().zip(b) {
                d += ((x - y) as f64).powi(2);
                s += (*x as f64).powi(2);
            }
        }
        (d / s).sqrt()
    }

    /// Whole networks with bf16 convolutions against the fp32 step on the same batch, on the
    /// scalar emulation of the tiles (every machine) and on AMX where present.
    ///
    /// The kernels are checked against their definitions in `fmnist::kernels::conv_bf16` and
    /// each layer against fp32 in `layers.rs`; through a network the differences are not
    /// small, because gradients of small batches are sensitive: multiplying the fp32 step's
    /// convolution weights by random factors within 1 ± 2^-9 (bf16's rounding) alone moves
    /// the gradients by 0.6–12 % (relative L2 over all of them). So the bound is relative to that
    /// sensitivity, measured per network: the bf16 step differs from fp32 by at most 3 times
    /// what the perturbation does (measured: 1.1–1.4 times), and by under 20 % — a wiring
    /// error (a flipped tap, a wrong offset) moves them by 100 % or more. Loss within 1 %.
    /// AMX and the emulation sum the same rounded products in different pair order, so they
    /// agree to within 1 %; each path gives the same bits again, and on one thread.
    #[test]
    fn bf16_matches_fp32_within_its_rounding() {
        let nets = [
            ("cnn 32/96", cnn(32, 96, 128, 0.1), 16),
            ("six gelu 32/32/64", six([32, 32, 64], Act::Gelu), 3),
            ("six gap relu 32/64/32", six_gap([32, 64, 32], Act::Relu), 8),
        ];
        let mut paths = vec![Bf16Path::Emulated];
        if Bf16Path::Amx.supported() {
            paths.push(Bf16Path::Amx);
        } else {
            eprintln!("skipped: amx-bf16 is not available on this CPU");
        }
        for (name, layers, n) in nets {
            let fp32 = Net::new(28, 1, NORM, &layers, 10, EPS).unwrap();
            assert_eq!(fp32.kernel_path(), fmnist::kernels::fp32_path());
            let params = init(&fp32, 9);
            let (images, labels) = batch(n, 9);
            let b = Batch {
                images: &images,
                labels: &labels,
                smoothing: 0.1,
            };
            let step = |net: &Net, params: &[Vec<f32>]| {
                net.step(params, &b, &mut rng(9, 3), &mut Workspace::default())
            };
            let want = step(&fp32, &params);
            let mut perturbed = params.clone();
            let mut r = rng(17, 1);
            for (p, s) in perturbed.iter_mut().zip(fp32.param_shapes()) {
                if s.len() == 4 {
                    p.iter_mut()
                        .for_each(|v| *v *= 1.0 + r.random_range(-1.0..1.0) * 2f32.powi(-9));
                }
            }
            let sensitivity = relative_l2(&want.grads, &step(&fp32, &perturbed).grads);
            let mut emulated = None;
            for &path in &paths {
                let net = fp32.clone().with_bf16(path);
                assert_eq!(net.kernel_path(), path.name());
                let got = step(&net, &params);
                let what = format!("{name} on {}", path.name());
                assert!(
                    (got.loss - want.loss).abs() <= 1e-2 * want.loss,
                    "{what}: loss {} vs {}",
                    got.loss,
                    want.loss
                );
                let d = relative_l2(&want.grads, &got.grads);
                eprintln!("{what}: gradients {d:.4} from fp32 (perturbed fp32: {sensitivity:.4})");
                assert!(
                    d <= 3.0 * sensitivity && d < 0.2,
                    "{what}: {d} vs {sensitivity}"
                );
                // Same path, same bits: a second step, and one on a single thread.
                let again = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap()
                    .install(|| step(&net, &params));
                assert_eq!((again.loss, &again.grads), (got.loss, &got.grads), "{what}");
                match &emulated {
                    None => emulated = Some(got),
                    Some(e) => {
                        let d = relative_l2(&e.grads, &got.grads);
                        assert!(d <= sensitivity, "{what} vs emulated: {d}");
                    }
                }
            }
        }
    }

    /// Lists the engine cannot run are refused with the layer and the reason.
    #[test]
    fn bad_networks_are_refused() {
        let new = |l: &[Layer]| Net::new(28, 1, NORM, l, 10, EPS).unwrap_err();
        let bn = Layer::BnAct {
            act: Act::Relu,
            pool: false,
        };
        assert_eq!(new(&[bn, linear(10, false)]), NetError::BnInput(0));
        assert_eq!(
            new(&[Layer::Conv3x3 { cout: 4 }, Layer::Conv3x3 { cout: 4 }]),
            NetError::ConvInput(1)
        );
        assert_eq!(new(&[linear(10, true)]), NetError::Output(0, 10));
        assert_eq!(new(&[linear(7, false)]), NetError::Output(0, 10));
        assert_eq!(
            new(&[linear(5, true), Layer::Conv3x3 { cout: 4 }]),
            NetError::ConvAfterFlat(1)
        );
        assert_eq!(
            new(&[Layer::Dropout { p: 1.0 }, linear(10, false)]),
            NetError::Dropout(0, 1.0)
        );
        let mut small = Vec::new();
        for _ in 0..5 {
            small.extend(conv(4, Act::Relu, true));
        }
        small.push(linear(10, false));
        assert_eq!(new(&small), NetError::SmallPool(9, 1, 1));
        assert_eq!(
            new(&[Layer::GlobalAvgPool, linear(10, false)]),
            NetError::GapInput(0)
        );
    }
}
