//! The CNNs trained from scratch: 3×3 convolutions, each followed by batch-norm, an
//! activation and optionally a 2×2 max-pool, then a classifier head.
//!
//! - `cnn` (the shipped default): conv3×3(c1) → BN → ReLU → maxpool2 → conv3×3(c2) → BN →
//!   ReLU → maxpool2 → fc(hidden) → ReLU → dropout → fc(10).
//! - `six`: three blocks of two conv3×3 → BN → GELU, max-pool after the first two blocks,
//!   global average pooling, fc(10) (the accuracy issue's six-convolution network).
//!
//! Input is 0–1 pixels; normalisation by the data set's mean and standard deviation is the
//! first step of the graph, so the exported ONNX file takes raw 0–1 pixels. Batch-norm lets
//! the network reach its accuracy in far fewer epochs; at export it is folded into the
//! convolutions' weights and biases, so the ONNX graph is plain Conv/Relu (or GELU)/MaxPool/
//! MatMul.
//!
//! On the CPU, training steps run in the training engine (`crate::engine`), and inference runs
//! in NHWC layout through the candle custom ops in `custom_ops.rs`; on other devices the
//! network runs candle's stock NCHW ops with autograd. All read the same parameters, stored in
//! the layout the CPU path wants: conv weights `[out, 3, 3, in]`, and the first fully
//! connected layer's input columns in (y, x, channel) order. Export permutes them to ONNX's
//! `[out, in, 3, 3]` and (channel, y, x).

use super::custom_ops::{batch_norm_act_stock, BatchNormRelu, BiasRelu, Im2Col3x3, MaxPool2x2};
use super::{dropout, flat, Classifier, Params};
use crate::engine::{self, Act, Layer as EngineLayer, Net};
use candle_core::{Device, Result, Tensor, Var};
use fmnist::onnx::Layer;
use fmnist::preprocess::{InputLayout, FMNIST_MEAN, FMNIST_STD};
use fmnist::NUM_CLASSES;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One 3×3 convolution of a [`CnnConfig`] (batch-norm and the activation follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSpec {
    /// Output channels.
    pub width: usize,
    /// A 2×2 max-pool (stride 2, odd sides floored) follows the activation.
    pub pool: bool,
}

/// The shape of a CNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ConfigFile")]
pub struct CnnConfig {
    /// The convolutions, in order.
    pub convs: Vec<ConvSpec>,
    /// The activation after every batch-norm.
    pub act: Act,
    /// Average each channel over the last feature map (else flatten it).
    #[serde(default)]
    pub gap: bool,
    /// Width of the hidden fully connected layer (ReLU); 0 for none.
    pub hidden: usize,
    /// Dropout before the output layer.
    pub dropout: f32,
}

/// What a recipe file may hold: today's form, or the two-convolution form of models trained
/// before the architecture became a list (`weights/fmnist-cnn.json` among them).
#[derive(Deserialize)]
#[serde(untagged)]
enum ConfigFile {
    Current {
        convs: Vec<ConvSpec>,
        act: Act,
        #[serde(default)]
        gap: bool,
        hidden: usize,
        dropout: f32,
    },
    TwoConv {
        conv1: usize,
        conv2: usize,
        hidden: usize,
        dropout: f32,
    },
}

impl From<ConfigFile> for CnnConfig {
    fn from(f: ConfigFile) -> Self {
        match f {
            ConfigFile::Current {
                convs,
                act,
                gap,
                hidden,
                dropout,
            } => CnnConfig {
                convs,
                act,
                gap,
                hidden,
                dropout,
            },
            ConfigFile::TwoConv {
                conv1,
                conv2,
                hidden,
                dropout,
            } => CnnConfig::two_conv(conv1, conv2, hidden, dropout),
        }
    }
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self::two_conv(32, 96, 128, 0.1)
    }
}

impl CnnConfig {
    /// The `cnn` architecture: two pooled ReLU convolutions, a hidden layer, dropout.
    pub fn two_conv(conv1: usize, conv2: usize, hidden: usize, dropout: f32) -> Self {
        let pooled = |width| ConvSpec { width, pool: true };
        CnnConfig {
            convs: vec![pooled(conv1), pooled(conv2)],
            act: Act::Relu,
            gap: false,
            hidden,
            dropout,
        }
    }

    /// The `six` architecture: three blocks of two convolutions of `widths[i]` channels,
    /// max-pool after the first two blocks, global average pooling, no hidden layer.
    pub fn six(widths: [usize; 3], act: Act, dropout: f32) -> Self {
        let mut convs = Vec::new();
        for (i, width) in widths.into_iter().enumerate() {
            convs.push(ConvSpec { width, pool: false });
            convs.push(ConvSpec { width, pool: i < 2 });
        }
        CnnConfig {
            convs,
            act,
            gap: true,
            hidden: 0,
            dropout,
        }
    }

    /// Side and channels of the last feature map.
    fn feature_map(&self) -> (usize, usize) {
        let side = self
            .convs
            .iter()
            .fold(28, |s, c| if c.pool { s / 2 } else { s });
        (side, self.convs.last().map_or(1, |c| c.width))
    }

    /// Inputs of the first fully connected layer.
    fn features(&self) -> usize {
        let (side, c) = self.feature_map();
        if self.gap {
            c
        } else {
            side * side * c
        }
    }

    /// The network as the CPU training engine's layers.
    pub fn engine_layers(&self) -> Vec<EngineLayer> {
        let mut l = Vec::new();
        for c in &self.convs {
            l.push(EngineLayer::Conv3x3 { cout: c.width });
            l.push(EngineLayer::BnAct {
                act: self.act,
                pool: c.pool,
            });
        }
        if self.gap {
            l.push(EngineLayer::GlobalAvgPool);
        }
        if self.hidden > 0 {
            l.push(EngineLayer::Linear {
                outputs: self.hidden,
                relu: true,
            });
        }
        if self.dropout > 0.0 {
            l.push(EngineLayer::Dropout { p: self.dropout });
        }
        l.push(EngineLayer::Linear {
            outputs: NUM_CLASSES,
            relu: false,
        });
        l
    }
}

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// A 3×3 convolution without bias followed by batch-norm (whose shift plays the bias) and
/// the activation.
struct ConvBn {
    weight: Var,
    gamma: Var,
    beta: Var,
    running_mean: Var,
    running_var: Var,
    act: Act,
    pool: bool,
}

impl ConvBn {
    fn new(
        p: &mut Params,
        name: &str,
        (cin, spec, act): (usize, ConvSpec, Act),
        r: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let cout = spec.width;
        Ok(Self {
            weight: p.uniform(
                &format!("{name}.weight"),
                &[cout, 3, 3, cin],
                he(9 * cin),
                r,
                dev,
            )?,
            gamma: p.ones(&format!("{name}.bn.weight"), cout, dev)?,
            beta: p.zeros(&format!("{name}.bn.bias"), &[cout], dev)?,
            running_mean: p.buffer(&format!("{name}.bn.running_mean"), &[cout], 0.0, dev)?,
            running_var: p.buffer(&format!("{name}.bn.running_var"), &[cout], 1.0, dev)?,
            act,
            pool: spec.pool,
        })
    }

    /// Per-channel scale and shift that batch-norm applies at inference.
    fn inference_affine(&self) -> Result<(Tensor, Tensor)> {
        let scale = self
            .gamma
            .broadcast_div(&(self.running_var.as_tensor() + BN_EPS as f64)?.sqrt()?)?;
        let shift = (self.beta.as_tensor() - (self.running_mean.as_tensor() * &scale)?)?;
        Ok((scale, shift))
    }

    /// Batch-norm + activation on conv output rows `[M, C]` (NHWC). Training uses the batch
    /// statistics and updates the running ones; inference uses the running ones.
    fn bn_act(&self, rows: &Tensor, train: bool) -> Result<Tensor> {
        let relu_kernel = rows.device().is_cpu() && self.act == Act::Relu;
        if !train {
            let (scale, shift) = self.inference_affine()?;
            let u = rows.broadcast_mul(&scale)?;
            return match self.act {
                Act::Relu if relu_kernel => u.apply_op2(&shift, BiasRelu),
                Act::Relu => u.broadcast_add(&shift)?.relu(),
                Act::Gelu => u.broadcast_add(&shift)?.gelu_erf(),
            };
        }
        let m = rows.dim(0)?;
        let (y, mean, var) = if relu_kernel {
            let op = BatchNormRelu {
                eps: BN_EPS,
                stats: Default::default(),
            };
            let stats = Arc::clone(&op.stats);
            let y = rows.apply_op3(&self.gamma, &self.beta, op)?;
            let s = stats.lock().expect("batch stats lock").clone();
            let c = s.mean.len();
            (
                y,
                Tensor::from_vec(s.mean, c, rows.device())?,
                Tensor::from_vec(s.var, c, rows.device())?,
            )
        } else {
            let (y, mean, var) =
                batch_norm_act_stock(rows, &self.gamma, &self.beta, BN_EPS as f64, self.act)?;
            (y, mean.detach(), var.detach())
        };
        self.update_running(&mean, &var, m)?;
        Ok(y)
    }

    /// Running averages of the batch statistics over `m` rows, with the unbiased variance
    /// (as PyTorch keeps them).
    fn update_running(&self, mean: &Tensor, var: &Tensor, m: usize) -> Result<()> {
        let unbiased = (var * (m as f64 / (m.max(2) - 1) as f64))?;
        let k = BN_MOMENTUM as f64;
        self.running_mean
            .set(&((self.running_mean.as_tensor() * (1.0 - k))? + (mean * k)?)?.detach())?;
        self.running_var
            .set(&((self.running_var.as_tensor() * (1.0 - k))? + (unbiased * k)?)?.detach())?;
        Ok(())
    }

    /// Convolution + batch-norm + activation (+ pool) in NHWC with fmnist's kernels.
    fn forward_nhwc(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (n, h, w, _) = xs.dims4()?;
        let (o, k) = (
            self.weight.dim(0)?,
            self.weight.elem_count() / self.weight.dim(0)?,
        );
        let rows = xs
            .apply_op1(Im2Col3x3)?
            .matmul(&self.weight.reshape((o, k))?.t()?)?;
        let ys = self.bn_act(&rows, train)?.reshape((n, h, w, o))?;
        if self.pool {
            ys.apply_op1(MaxPool2x2)
        } else {
            Ok(ys)
        }
    }

    /// The same with candle's stock NCHW ops.
    fn forward_nchw(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = xs.conv2d(&weight_nchw(&self.weight)?, 1, 1, 1, 1)?;
        let (n, c, h, w) = ys.dims4()?;
        let rows = ys.permute((0, 2, 3, 1))?.reshape((n * h * w, c))?;
        let ys = self
            .bn_act(&rows, train)?
            .reshape((n, h, w, c))?
            .permute((0, 3, 1, 2))?;
        if self.pool {
            ys.max_pool2d(2)
        } else {
            Ok(ys)
        }
    }

    /// The ONNX layers: the convolution with batch-norm folded in (`w·s`, bias `β − μ·s`),
    /// the activation, the pool.
    fn export(&self) -> Result<Vec<Layer>> {
        let (scale, shift) = self.inference_affine()?;
        let w = weight_nchw(&self.weight)?;
        let w = w.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        let d = w.dims();
        let mut out = vec![
            Layer::Conv2d {
                weight: flat(&w)?,
                shape: [d[0], d[1], d[2], d[3]],
                bias: flat(&shift)?,
                stride: 1,
                padding: 1,
            },
            match self.act {
                Act::Relu => Layer::Relu,
                Act::Gelu => Layer::Gelu,
            },
        ];
        if self.pool {
            out.push(Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            });
        }
        Ok(out)
    }
}

pub struct Cnn {
    cfg: CnnConfig,
    params: Params,
    /// The same network as a list of the CPU training engine's layers.
    net: Net,
    convs: Vec<ConvBn>,
    /// The hidden layer, when the recipe has one.
    fc1: Option<(Var, Var)>,
    /// The output layer.
    out: (Var, Var),
}

/// He-uniform bound for a layer feeding a ReLU.
fn he(fan_in: usize) -> f32 {
    (6.0 / fan_in as f32).sqrt()
}

impl Params {
    /// A trainable `[n]` parameter of ones (batch-norm scale).
    fn ones(&mut self, name: &str, n: usize, device: &Device) -> Result<Var> {
        let var = Var::from_tensor(&Tensor::ones(n, candle_core::DType::F32, device)?)?;
        self.push(name, var.clone());
        Ok(var)
    }
}

impl Cnn {
    /// A freshly initialised network. Parameters are named `conv1.…`, `conv2.…`, …, then
    /// `fc1.*` (the hidden layer) and `fc2.*` (the output layer), or `fc.*` for the output
    /// layer of a network without a hidden one.
    pub fn new(cfg: CnnConfig, r: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        if cfg.convs.is_empty() || cfg.convs.iter().any(|c| c.width == 0) {
            candle_core::bail!("a CNN needs at least one convolution, each with channels");
        }
        let mut p = Params::default();
        let mut convs = Vec::new();
        let mut cin = 1;
        for (i, spec) in cfg.convs.iter().enumerate() {
            let name = format!("conv{}", i + 1);
            convs.push(ConvBn::new(
                &mut p,
                &name,
                (cin, *spec, cfg.act),
                r,
                device,
            )?);
            cin = spec.width;
        }
        let feat = cfg.features();
        let (fc1, out_in, out_name) = if cfg.hidden > 0 {
            let fc1 = (
                p.uniform("fc1.weight", &[cfg.hidden, feat], he(feat), r, device)?,
                p.zeros("fc1.bias", &[cfg.hidden], device)?,
            );
            (Some(fc1), cfg.hidden, "fc2")
        } else {
            (None, feat, "fc")
        };
        // The output layer is not followed by a ReLU: Glorot-style bound.
        let out_bound = (6.0 / (out_in + NUM_CLASSES) as f32).sqrt();
        let out = (
            p.uniform(
                &format!("{out_name}.weight"),
                &[NUM_CLASSES, out_in],
                out_bound,
                r,
                device,
            )?,
            p.zeros(&format!("{out_name}.bias"), &[NUM_CLASSES], device)?,
        );
        let net = Net::new(
            28,
            1,
            (1.0 / FMNIST_STD, -FMNIST_MEAN / FMNIST_STD),
            &cfg.engine_layers(),
            NUM_CLASSES,
            BN_EPS,
        )
        .map_err(|e| candle_core::Error::Msg(format!("CNN {cfg:?}: {e}")))?;
        Ok(Self {
            cfg,
            params: p,
            net,
            convs,
            fc1,
            out,
        })
    }

    /// The first fully connected layer's weight `[out, features]`, with its input columns in
    /// NCHW-flatten order (channel, y, x) when it reads a flattened feature map.
    fn first_fc_nchw(&self, w: &Tensor) -> Result<Tensor> {
        if self.cfg.gap {
            return Ok(w.clone());
        }
        let (side, c) = self.cfg.feature_map();
        let outputs = w.dim(0)?;
        w.reshape((outputs, side, side, c))?
            .permute((0, 3, 1, 2))?
            .reshape((outputs, c * side * side))
    }

    /// The hidden layer's weight (if any) and the output layer's, with whichever reads the
    /// feature map taking its columns in NCHW-flatten order: what candle's stock NCHW path and
    /// the ONNX graph multiply by.
    fn fc_weights_nchw(&self) -> Result<(Option<Tensor>, Tensor)> {
        let out = self.out.0.as_tensor();
        Ok(match &self.fc1 {
            Some((w, _)) => (Some(self.first_fc_nchw(w)?), out.clone()),
            None => (None, self.first_fc_nchw(out)?),
        })
    }

    /// The fully connected head on `[B, features]`: the hidden layer (ReLU), dropout during
    /// training, the output layer. `fc1_w` is the hidden layer's weight in the order `xs`
    /// uses, `out_w` the output layer's.
    fn head(
        &self,
        xs: &Tensor,
        (fc1_w, out_w): (Option<&Tensor>, &Tensor),
        cpu: bool,
        train: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        if let (Some((_, b)), Some(w)) = (&self.fc1, fc1_w) {
            let h = xs.matmul(&w.t()?)?;
            xs = if cpu {
                h.apply_op2(b, BiasRelu)?
            } else {
                h.broadcast_add(b)?.relu()?
            };
        }
        if let Some(r) = train {
            xs = dropout(&xs, self.cfg.dropout, r)?;
        }
        linear(&xs, out_w, &self.out.1)
    }

    /// Runs the engine's convolutions in bf16 on `path` ([`engine::Net::with_bf16`]).
    pub fn with_bf16(mut self, path: fmnist::kernels::bf16::Bf16Path) -> Self {
        self.net = self.net.with_bf16(path);
        self
    }

    /// The kernel path a training step on `device` runs, which fixes the order of every sum
    /// and so the bits a seed gives: on the CPU the engine's ([`engine::Net::kernel_path`]),
    /// elsewhere `"candle-cuda"` or `"candle-metal"` (candle's ops with autograd).
    pub fn kernel_path(&self, device: &Device) -> &'static str {
        if device.is_cpu() {
            self.net.kernel_path()
        } else if device.is_cuda() {
            "candle-cuda"
        } else {
            "candle-metal"
        }
    }

    /// One training step on the CPU through the training engine ([`engine`]): returns the
    /// mean loss and the gradients in `params().vars()` order, and updates the batch-norm
    /// running statistics. `r` supplies the dropout mask, as `forward_t` would draw it.
    pub fn cpu_train_step(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        r: &mut ChaCha8Rng,
        ws: &mut engine::Workspace,
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let flat_params = self
            .params
            .vars()
            .iter()
            .map(|(_, v)| flat(v.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        let images = flat(images)?;
        let labels = labels.to_vec1::<u32>()?;
        let batch = engine::Batch {
            images: &images,
            labels: &labels,
            smoothing,
        };
        let out = self.net.step(&flat_params, &batch, r, ws);
        let dev = self.out.0.device().clone();
        for (layer, (m, mean, var)) in self.convs.iter().zip(out.batch_stats) {
            let c = mean.len();
            layer.update_running(
                &Tensor::from_vec(mean, c, &dev)?,
                &Tensor::from_vec(var, c, &dev)?,
                m,
            )?;
        }
        Ok((out.loss, out.grads))
    }

    /// Logits for `xs` (`[B, 1, 28, 28]`, 0–1 pixels). `train` carries the dropout stream
    /// during training; `stock` runs candle's stock NCHW ops instead of the CPU custom ops.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        train: Option<&mut ChaCha8Rng>,
        stock: bool,
    ) -> Result<Tensor> {
        let xs = xs.affine(1.0 / FMNIST_STD as f64, -(FMNIST_MEAN / FMNIST_STD) as f64)?;
        let training = train.is_some();
        let b = xs.dim(0)?;
        if stock {
            let mut xs = xs;
            for c in &self.convs {
                xs = c.forward_nchw(&xs, training)?;
            }
            let xs = if self.cfg.gap {
                xs.mean(3)?.mean(2)?
            } else {
                xs.flatten_from(1)?
            };
            let (fc1_w, out_w) = self.fc_weights_nchw()?;
            return self.head(&xs, (fc1_w.as_ref(), &out_w), false, train);
        }
        // [B,1,28,28] and [B,28,28,1] share one memory layout.
        let mut xs = xs.reshape((b, 28, 28, 1))?;
        for c in &self.convs {
            xs = c.forward_nhwc(&xs, training)?;
        }
        let xs = if self.cfg.gap {
            xs.mean(2)?.mean(1)?
        } else {
            xs.flatten_from(1)?
        };
        let fc1_w = self.fc1.as_ref().map(|(w, _)| w.as_tensor());
        self.head(&xs, (fc1_w, self.out.0.as_tensor()), true, train)
    }
}

/// `[out, 3, 3, in]` → `[out, in, 3, 3]`.
fn weight_nchw(w: &Tensor) -> Result<Tensor> {
    w.permute((0, 3, 1, 2))?.contiguous()
}

fn linear(xs: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    xs.matmul(&w.t()?)?.broadcast_add(b)
}

impl Classifier for Cnn {
    fn forward_t(&self, xs: &Tensor, train: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        self.forward_with(xs, train, !xs.device().is_cpu())
    }

    fn layout(&self) -> InputLayout {
        InputLayout::Gray
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn export_layers(&self) -> Result<Vec<Layer>> {
        let linear = |w: &Tensor, b: &Tensor| -> Result<Layer> {
            let d = w.dims();
            Ok(Layer::Linear {
                weight: flat(w)?,
                in_features: d[1],
                out_features: d[0],
                bias: flat(b)?,
            })
        };
        let mut layers = vec![Layer::Normalize {
            mean: vec![FMNIST_MEAN],
            std: vec![FMNIST_STD],
        }];
        for c in &self.convs {
            layers.extend(c.export()?);
        }
        if self.cfg.gap {
            let (side, _) = self.cfg.feature_map();
            layers.push(Layer::AdaptiveAvgPool2d {
                in_h: side,
                in_w: side,
                out: 1,
            });
        }
        layers.push(Layer::Flatten);
        let (fc1_w, out_w) = self.fc_weights_nchw()?;
        if let (Some(w), Some((_, b))) = (fc1_w, &self.fc1) {
            layers.push(linear(&w, b)?);
            layers.push(Layer::Relu);
        }
        layers.push(linear(&out_w, &self.out.1)?);
        Ok(layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::rng;
    use crate::models::custom_ops::tests::{max_abs, max_diff};

    fn input(n: usize) -> Tensor {
        let v: Vec<f32> = (0..n * 784)
            .map(|i| ((i * 37) % 256) as f32 / 255.0)
            .collect();
        Tensor::from_vec(v, (n, 1, 28, 28), &Device::Cpu).unwrap()
    }

    /// The CPU kernels path and candle's stock ops compute the same function and the same
    /// gradients — up to candle 0.11's max-pool backward, which scales every gradient below a
    /// pooling layer by 1/4 (see custom_ops.rs): conv2 sits below one pool, conv1 below two.
    #[test]
    fn cpu_kernels_match_stock_ops() {
        let dev = Device::Cpu;
        let a_model = Cnn::new(CnnConfig::default(), &mut rng(1, 2), &dev).unwrap();
        let b_model = Cnn::new(CnnConfig::default(), &mut rng(1, 2), &dev).unwrap();
        let xs = input(5);
        for train in [false, true] {
            // Same dropout draws on both sides.
            let (mut r1, mut r2) = (rng(5, 5), rng(5, 5));
            let a = a_model
                .forward_with(&xs, train.then_some(&mut r1), false)
                .unwrap();
            let b = b_model
                .forward_with(&xs, train.then_some(&mut r2), true)
                .unwrap();
            let diff = max_diff(&a, &b);
            assert!(diff < 1e-3, "train={train}: logits differ by {diff}");
            if !train {
                continue;
            }
            let ga = a.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let gb = b.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for ((name, va), (_, vb)) in a_model.params().vars().iter().zip(b_model.params().vars())
            {
                let stock_scale = match name.split('.').next().unwrap() {
                    "conv1" => 16.0,
                    "conv2" => 4.0,
                    _ => 1.0,
                };
                let (x, y) = (
                    ga.get(va).unwrap(),
                    &(gb.get(vb).unwrap() * stock_scale).unwrap(),
                );
                let scale = max_abs(y).max(1e-3);
                let d = max_diff(x, y);
                assert!(
                    d / scale < 2e-3,
                    "{name}: gradient differs by {d} (scale {scale})"
                );
            }
        }
        // Running statistics moved, identically on both paths.
        let rm = |m: &Cnn| {
            m.convs[1]
                .running_mean
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert!(rm(&a_model).iter().any(|v| *v != 0.0));
        let d = rm(&a_model)
            .iter()
            .zip(rm(&b_model))
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4);
    }

    /// Folding batch-norm into the convolution changes nothing at inference.
    #[test]
    fn folded_export_matches_inference() {
        let dev = Device::Cpu;
        let model = Cnn::new(CnnConfig::default(), &mut rng(2, 2), &dev).unwrap();
        // Move the running statistics away from their initial values.
        for _ in 0..3 {
            model
                .forward_with(&input(8), Some(&mut rng(0, 0)), false)
                .unwrap();
        }
        let layers = model.export_layers().unwrap();
        let Layer::Conv2d { bias, .. } = &layers[1] else {
            panic!("conv expected")
        };
        assert!(bias.iter().any(|b| *b != 0.0));
        let ours = model.forward_with(&input(3), None, false).unwrap();
        let stock = model.forward_with(&input(3), None, true).unwrap();
        let diff = max_diff(&ours, &stock);
        assert!(diff < 1e-4, "{diff}");
    }

    /// The CNN's engine step gives the loss, gradients and running statistics of its own
    /// candle forward pass under autograd (the path other devices train on), with dropout
    /// and label smoothing, at the shipped widths and at odd ones.
    #[test]
    fn engine_step_matches_autograd() {
        let dev = Device::Cpu;
        let odd = CnnConfig::two_conv(16, 48, 33, 0.5);
        let six = CnnConfig::six([8, 16, 32], Act::Gelu, 0.2);
        for (i, (cfg, n, s)) in [
            (CnnConfig::default(), 17, 0.0),
            (odd, 9, 0.2),
            (six, 5, 0.1),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 100 + i as u64;
            let a = Cnn::new(cfg.clone(), &mut rng(seed, 1), &dev).unwrap();
            let b = Cnn::new(cfg.clone(), &mut rng(seed, 1), &dev).unwrap();
            let (images, labels) = crate::engine::tests::batch(n, seed);
            let xs = Tensor::from_vec(images, (n, 1, 28, 28), &dev).unwrap();
            let ys = Tensor::from_vec(labels, n, &dev).unwrap();
            let logits = a.forward_with(&xs, Some(&mut rng(seed, 3)), false).unwrap();
            let loss = crate::train::training_loss(&logits, &ys, s as f64).unwrap();
            let grads = loss.backward().unwrap();
            let loss_a = loss.to_scalar::<f32>().unwrap();
            let mut ws = crate::engine::Workspace::default();
            let (loss_b, grads_b) = b
                .cpu_train_step(&xs, &ys, s, &mut rng(seed, 3), &mut ws)
                .unwrap();
            assert!(
                (loss_a - loss_b).abs() <= 1e-5 * loss_a.abs().max(1.0),
                "case {i}: loss {loss_a} vs {loss_b}"
            );
            for ((name, v), gb) in a.params().vars().iter().zip(&grads_b) {
                let ga = grads.get(v).unwrap();
                let gb = Tensor::from_vec(gb.clone(), ga.shape(), &dev).unwrap();
                let scale = max_abs(ga).max(1e-6);
                let d = max_diff(ga, &gb);
                assert!(
                    d / scale < 1e-4,
                    "case {i}: {name} gradient differs by {d} (scale {scale})"
                );
            }
            let (ta, tb) = (a.params().tensors(), b.params().tensors());
            for name in ["conv1.bn.running_mean", "conv2.bn.running_var"] {
                // (every conv has them; the first two stand for all)
                let d = max_diff(&ta[name], &tb[name]);
                assert!(
                    d <= 1e-5 * max_abs(&ta[name]).max(1.0),
                    "case {i}: {name} differs by {d}"
                );
            }
        }
    }

    /// The six-convolution GELU network: the CPU custom-op path and candle's stock ops give
    /// the same logits, in training (batch statistics, same dropout draws) and at inference.
    #[test]
    fn six_conv_cpu_path_matches_stock_ops() {
        let dev = Device::Cpu;
        let cfg = CnnConfig::six([8, 16, 24], Act::Gelu, 0.2);
        let a = Cnn::new(cfg.clone(), &mut rng(6, 2), &dev).unwrap();
        let b = Cnn::new(cfg, &mut rng(6, 2), &dev).unwrap();
        for train in [true, false] {
            let (mut r1, mut r2) = (rng(5, 5), rng(5, 5));
            let x = a.forward_with(&input(6), train.then_some(&mut r1), false);
            let y = b.forward_with(&input(6), train.then_some(&mut r2), true);
            let diff = max_diff(&x.unwrap(), &y.unwrap());
            assert!(diff < 1e-3, "train={train}: logits differ by {diff}");
        }
        assert!(a.params().tensors().contains_key("fc.weight"));
        assert!(a.params().tensors().contains_key("conv6.bn.running_var"));
    }

    /// Recipes written before the architecture became a list still load, as the same CNN.
    #[test]
    fn two_conv_recipes_still_load() {
        let old = r#"{"conv1": 32, "conv2": 96, "hidden": 128, "dropout": 0.1}"#;
        let cfg: CnnConfig = serde_json::from_str(old).unwrap();
        assert_eq!(cfg, CnnConfig::default());
        let text = serde_json::to_string(&CnnConfig::six([32, 64, 128], Act::Gelu, 0.0)).unwrap();
        let back: CnnConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, CnnConfig::six([32, 64, 128], Act::Gelu, 0.0));
    }
}
