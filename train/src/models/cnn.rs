//! The default model: a small CNN trained from scratch.
//!
//! conv3×3(c1) → ReLU → maxpool2 → conv3×3(c2) → ReLU → maxpool2 → fc(hidden) → ReLU →
//! dropout → fc(10). Input is 0–1 pixels; normalisation by the data set's mean and standard
//! deviation is the first step of the graph, so the exported ONNX file takes raw 0–1 pixels.
//!
//! On the CPU the network runs in NHWC layout through the kernels in `kernels.rs`; on other
//! devices it runs candle's stock NCHW ops. Both read the same parameters, stored in the
//! layout the CPU path wants: conv weights `[out, 3, 3, in]`, and fc1's input columns in
//! (y, x, channel) order. Export permutes them to ONNX's `[out, in, 3, 3]` and (channel, y, x).

use super::kernels::{BiasRelu, Im2Col3x3, MaxPool2x2};
use super::{dropout, flat, Classifier, Params};
use candle_core::{Device, Result, Tensor, Var};
use fmnist::onnx::Layer;
use fmnist::preprocess::{InputLayout, FMNIST_MEAN, FMNIST_STD};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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
            conv2: 64,
            hidden: 128,
            dropout: 0.3,
        }
    }
}

pub struct Cnn {
    cfg: CnnConfig,
    params: Params,
    conv1: (Var, Var),
    conv2: (Var, Var),
    fc1: (Var, Var),
    fc2: (Var, Var),
}

/// He-uniform bound for a layer feeding a ReLU.
fn he(fan_in: usize) -> f32 {
    (6.0 / fan_in as f32).sqrt()
}

impl Cnn {
    pub fn new(cfg: CnnConfig, r: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        let mut p = Params::default();
        let flat_in = cfg.conv2 * 7 * 7;
        let conv1 = (
            p.uniform("conv1.weight", &[cfg.conv1, 3, 3, 1], he(9), r, device)?,
            p.zeros("conv1.bias", &[cfg.conv1], device)?,
        );
        let conv2 = (
            p.uniform(
                "conv2.weight",
                &[cfg.conv2, 3, 3, cfg.conv1],
                he(9 * cfg.conv1),
                r,
                device,
            )?,
            p.zeros("conv2.bias", &[cfg.conv2], device)?,
        );
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
    fn features_cpu(&self, xs: &Tensor) -> Result<Tensor> {
        let b = xs.dim(0)?;
        // [B,1,28,28] and [B,28,28,1] share one memory layout.
        let xs = xs.reshape((b, 28, 28, 1))?;
        let xs = conv_relu_nhwc(&xs, &self.conv1)?.apply_op1(MaxPool2x2)?;
        let xs = conv_relu_nhwc(&xs, &self.conv2)?.apply_op1(MaxPool2x2)?;
        let xs = xs.reshape((b, 49 * self.cfg.conv2))?;
        xs.matmul(&self.fc1.0.t()?)?
            .apply_op2(&self.fc1.1, BiasRelu)
    }

    /// candle's stock NCHW ops, for devices other than the CPU (and as the tests' reference).
    fn features_stock(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = conv_nchw(xs, &self.conv1)?.relu()?.max_pool2d(2)?;
        let xs = conv_nchw(&xs, &self.conv2)?.relu()?.max_pool2d(2)?;
        let xs = xs.flatten_from(1)?;
        linear(&xs, &self.fc1_nchw()?, &self.fc1.1)?.relu()
    }

    fn forward_with(
        &self,
        xs: &Tensor,
        train: Option<&mut ChaCha8Rng>,
        stock: bool,
    ) -> Result<Tensor> {
        let xs = xs.affine(1.0 / FMNIST_STD as f64, -(FMNIST_MEAN / FMNIST_STD) as f64)?;
        let mut xs = if stock {
            self.features_stock(&xs)?
        } else {
            self.features_cpu(&xs)?
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

/// 3×3 "same" convolution + bias + ReLU in NHWC.
fn conv_relu_nhwc(xs: &Tensor, (w, b): &(Var, Var)) -> Result<Tensor> {
    let (n, h, wd, _) = xs.dims4()?;
    let (o, k) = (w.dim(0)?, w.elem_count() / w.dim(0)?);
    xs.apply_op1(Im2Col3x3)?
        .matmul(&w.reshape((o, k))?.t()?)?
        .apply_op2(b, BiasRelu)?
        .reshape((n, h, wd, o))
}

fn conv_nchw(xs: &Tensor, (w, b): &(Var, Var)) -> Result<Tensor> {
    let c = b.dims()[0];
    xs.conv2d(&weight_nchw(w)?, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)
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
        let conv = |(w, b): &(Var, Var)| -> Result<Layer> {
            let w = weight_nchw(w)?;
            let d = w.dims();
            Ok(Layer::Conv2d {
                weight: flat(&w)?,
                shape: [d[0], d[1], d[2], d[3]],
                bias: flat(b)?,
                stride: 1,
                padding: 1,
            })
        };
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
            conv(&self.conv1)?,
            Layer::Relu,
            Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            conv(&self.conv2)?,
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

    /// The CPU kernels path and candle's stock ops compute the same function and the same
    /// gradients — up to candle 0.11's max-pool backward, which scales every gradient below a
    /// pooling layer by 1/4 (see kernels.rs): conv2 sits below one pool, conv1 below two.
    #[test]
    fn cpu_kernels_match_stock_ops() {
        let dev = Device::Cpu;
        let model = Cnn::new(CnnConfig::default(), &mut rng(1, 2), &dev).unwrap();
        let v: Vec<f32> = (0..5 * 784)
            .map(|i| ((i * 37) % 256) as f32 / 255.0)
            .collect();
        let xs = Tensor::from_vec(v, (5, 1, 28, 28), &dev).unwrap();
        let a = model.forward_with(&xs, None, false).unwrap();
        let b = model.forward_with(&xs, None, true).unwrap();
        let diff = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "logits differ by {diff}");
        let ga = a.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gb = b.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in model.params().vars() {
            let stock_scale = match name.split('.').next().unwrap() {
                "conv1" => 16.0,
                "conv2" => 4.0,
                _ => 1.0,
            };
            let (x, y) = (
                ga.get(var).unwrap(),
                &(gb.get(var).unwrap() * stock_scale).unwrap(),
            );
            let scale = y
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .max(1e-3);
            let d = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d / scale < 1e-3,
                "{name}: gradient differs by {d} (scale {scale})"
            );
        }
    }
}
