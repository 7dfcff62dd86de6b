//! The default model: a small CNN trained from scratch.
//!
//! conv3×3(c1) → batch-norm → ReLU → maxpool2 → conv3×3(c2) → batch-norm → ReLU → maxpool2 →
//! fc(hidden) → ReLU → dropout → fc(10). Input is 0–1 pixels; normalisation by the data set's
//! mean and standard deviation is the first step of the graph, so the exported ONNX file takes
//! raw 0–1 pixels. Batch-norm lets the network reach its accuracy in far fewer epochs; at
//! export it is folded into the convolutions' weights and biases, so the ONNX graph is plain
//! Conv/Relu/MaxPool/MatMul.
//!
//! On the CPU the network runs in NHWC layout through the candle custom ops in `custom_ops.rs`; on other
//! devices it runs candle's stock NCHW ops. Both read the same parameters, stored in the
//! layout the CPU path wants: conv weights `[out, 3, 3, in]`, and fc1's input columns in
//! (y, x, channel) order. Export permutes them to ONNX's `[out, in, 3, 3]` and (channel, y, x).

use super::custom_ops::{batch_norm_relu_stock, BatchNormRelu, BiasRelu, Im2Col3x3, MaxPool2x2};
use super::{cnn_step, dropout, flat, Classifier, Params};
use candle_core::{Device, Result, Tensor, Var};
use fmnist::onnx::Layer;
use fmnist::preprocess::{InputLayout, FMNIST_MEAN, FMNIST_STD};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Sizes of the CNN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CnnConfig {
    pub conv1: usize,
    pub conv2: usize,
    pub hidden: usize,
    pub dropout: f32,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            conv1: 32,
            conv2: 96,
            hidden: 128,
            dropout: 0.1,
        }
    }
}

const BN_EPS: f32 = 1e-5;
const BN_MOMENTUM: f32 = 0.1;

/// A 3×3 convolution without bias followed by batch-norm (whose shift plays the bias).
struct ConvBn {
    weight: Var,
    gamma: Var,
    beta: Var,
    running_mean: Var,
    running_var: Var,
}

impl ConvBn {
    fn new(
        p: &mut Params,
        name: &str,
        cin: usize,
        cout: usize,
        r: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
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

    /// Batch-norm + ReLU on conv output rows `[M, C]` (NHWC). Training uses the batch
    /// statistics and updates the running ones; inference uses the running ones.
    fn bn_relu(&self, rows: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let (scale, shift) = self.inference_affine()?;
            return if rows.device().is_cpu() {
                rows.broadcast_mul(&scale)?.apply_op2(&shift, BiasRelu)
            } else {
                rows.broadcast_mul(&scale)?.broadcast_add(&shift)?.relu()
            };
        }
        let m = rows.dim(0)?;
        let (y, mean, var) = if rows.device().is_cpu() {
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
                batch_norm_relu_stock(rows, &self.gamma, &self.beta, BN_EPS as f64)?;
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

    /// Convolution + batch-norm + ReLU in NHWC with fmnist's kernels.
    fn forward_nhwc(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let (n, h, w, _) = xs.dims4()?;
        let (o, k) = (
            self.weight.dim(0)?,
            self.weight.elem_count() / self.weight.dim(0)?,
        );
        let rows = xs
            .apply_op1(Im2Col3x3)?
            .matmul(&self.weight.reshape((o, k))?.t()?)?;
        self.bn_relu(&rows, train)?.reshape((n, h, w, o))
    }

    /// The same with candle's stock NCHW convolution.
    fn forward_nchw(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let ys = xs.conv2d(&weight_nchw(&self.weight)?, 1, 1, 1, 1)?;
        let (n, c, h, w) = ys.dims4()?;
        let rows = ys.permute((0, 2, 3, 1))?.reshape((n * h * w, c))?;
        self.bn_relu(&rows, train)?
            .reshape((n, h, w, c))?
            .permute((0, 3, 1, 2))
    }

    /// The ONNX convolution with batch-norm folded in: `w·s`, bias `β − μ·s`.
    fn export(&self) -> Result<Layer> {
        let (scale, shift) = self.inference_affine()?;
        let w = weight_nchw(&self.weight)?;
        let w = w.broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        let d = w.dims();
        Ok(Layer::Conv2d {
            weight: flat(&w)?,
            shape: [d[0], d[1], d[2], d[3]],
            bias: flat(&shift)?,
            stride: 1,
            padding: 1,
        })
    }
}

pub struct Cnn {
    cfg: CnnConfig,
    params: Params,
    conv1: ConvBn,
    conv2: ConvBn,
    fc1: (Var, Var),
    fc2: (Var, Var),
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
    pub fn new(cfg: CnnConfig, r: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        let mut p = Params::default();
        let flat_in = cfg.conv2 * 7 * 7;
        let conv1 = ConvBn::new(&mut p, "conv1", 1, cfg.conv1, r, device)?;
        let conv2 = ConvBn::new(&mut p, "conv2", cfg.conv1, cfg.conv2, r, device)?;
        let fc1 = (
            p.uniform("fc1.weight", &[cfg.hidden, flat_in], he(flat_in), r, device)?,
            p.zeros("fc1.bias", &[cfg.hidden], device)?,
        );
        // The output layer is not followed by a ReLU: Glorot-style bound.
        let out_bound = (6.0 / (cfg.hidden + 10) as f32).sqrt();
        let fc2 = (
            p.uniform("fc2.weight", &[10, cfg.hidden], out_bound, r, device)?,
            p.zeros("fc2.bias", &[10], device)?,
        );
        Ok(Self {
            cfg,
            params: p,
            conv1,
            conv2,
            fc1,
            fc2,
        })
    }

    /// fc1's weight with its input columns in NCHW-flatten order (channel, y, x).
    fn fc1_nchw(&self) -> Result<Tensor> {
        let (hidden, c) = (self.cfg.hidden, self.cfg.conv2);
        self.fc1
            .0
            .reshape((hidden, 7, 7, c))?
            .permute((0, 3, 1, 2))?
            .reshape((hidden, c * 49))
    }

    /// The NHWC path with fmnist's CPU kernels.
    fn features_cpu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let b = xs.dim(0)?;
        // [B,1,28,28] and [B,28,28,1] share one memory layout.
        let xs = xs.reshape((b, 28, 28, 1))?;
        let xs = self.conv1.forward_nhwc(&xs, train)?.apply_op1(MaxPool2x2)?;
        let xs = self.conv2.forward_nhwc(&xs, train)?.apply_op1(MaxPool2x2)?;
        let xs = xs.reshape((b, 49 * self.cfg.conv2))?;
        xs.matmul(&self.fc1.0.t()?)?
            .apply_op2(&self.fc1.1, BiasRelu)
    }

    /// candle's stock NCHW ops, for devices other than the CPU (and as the tests' reference).
    fn features_stock(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.conv1.forward_nchw(xs, train)?.max_pool2d(2)?;
        let xs = self.conv2.forward_nchw(&xs, train)?.max_pool2d(2)?;
        let xs = xs.flatten_from(1)?;
        linear(&xs, &self.fc1_nchw()?, &self.fc1.1)?.relu()
    }

    /// One training step on the CPU through the hand-written forward and backward pass
    /// ([`cnn_step`]): returns the mean loss and the gradients in `params().vars()` order,
    /// and updates the batch-norm running statistics. `r` supplies the dropout mask, as
    /// `forward_t` would draw it.
    pub fn cpu_train_step(
        &self,
        images: &Tensor,
        labels: &Tensor,
        smoothing: f32,
        r: &mut ChaCha8Rng,
        ws: &mut cnn_step::Workspace,
    ) -> Result<(f32, Vec<Vec<f32>>)> {
        let flat_params = self
            .params
            .vars()
            .iter()
            .map(|(_, v)| flat(v.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        let images = flat(images)?;
        let labels = labels.to_vec1::<u32>()?;
        let batch = cnn_step::Batch {
            images: &images,
            labels: &labels,
            smoothing,
        };
        let out = cnn_step::train_step(
            &self.cfg,
            &cnn_step::Weights::from_flat(&flat_params),
            &batch,
            BN_EPS,
            r,
            ws,
        );
        let dev = self.conv1.weight.device().clone();
        for (layer, (m, mean, var)) in [&self.conv1, &self.conv2].into_iter().zip(out.batch_stats) {
            let c = mean.len();
            layer.update_running(
                &Tensor::from_vec(mean, c, &dev)?,
                &Tensor::from_vec(var, c, &dev)?,
                m,
            )?;
        }
        Ok((out.loss, out.grads))
    }

    pub fn forward_with(
        &self,
        xs: &Tensor,
        train: Option<&mut ChaCha8Rng>,
        stock: bool,
    ) -> Result<Tensor> {
        let xs = xs.affine(1.0 / FMNIST_STD as f64, -(FMNIST_MEAN / FMNIST_STD) as f64)?;
        let training = train.is_some();
        let mut xs = if stock {
            self.features_stock(&xs, training)?
        } else {
            self.features_cpu(&xs, training)?
        };
        if let Some(r) = train {
            xs = dropout(&xs, self.cfg.dropout, r)?;
        }
        linear(&xs, &self.fc2.0, &self.fc2.1)
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
        Ok(vec![
            Layer::Normalize {
                mean: vec![FMNIST_MEAN],
                std: vec![FMNIST_STD],
            },
            self.conv1.export()?,
            Layer::Relu,
            Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            self.conv2.export()?,
            Layer::Relu,
            Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            Layer::Flatten,
            linear(&self.fc1_nchw()?, &self.fc1.1)?,
            Layer::Relu,
            linear(&self.fc2.0, &self.fc2.1)?,
        ])
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
        let rm = |m: &Cnn| m.conv2.running_mean.as_tensor().to_vec1::<f32>().unwrap();
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
}
