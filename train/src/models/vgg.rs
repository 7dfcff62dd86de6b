//! VGG16 from ImageNet-pretrained safetensors, as a frozen feature extractor.
//!
//! Built from candle ops directly rather than candle-transformers' VGG, which takes one
//! 224×224 image at a time, applies ReLU to its logits and has no adaptive pooling: here the
//! backbone is batched, takes any input size ≥ 32 and follows torchvision exactly —
//! 13 conv3×3+ReLU layers in five blocks each ending in a 2×2 max-pool, then
//! `AdaptiveAvgPool2d(7×7)`, flatten, fc6+ReLU, fc7+ReLU (dropout is inference-off), fc8.
//!
//! The weights are plain tensors, never `Var`s: nothing can train them, and the backbone is
//! bit-identical after head training (tested in `transfer`).
//!
//! Two published file layouts are read: torchvision's `vgg16` state dict (`features.N.*`,
//! `classifier.{0,3,6}.*`) and timm's `vgg16.tv_in1k` (`features.N.*`,
//! `pre_logits.fc1.weight` `[4096,512,7,7]` and `pre_logits.fc2.weight` `[4096,4096,1,1]`
//! stored as convolution kernels, `head.fc.*`). The classifier is optional: a file with
//! only the convolutional layers serves the `mlp` head.

use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// torchvision's `features.N` indices of the 13 convolutions.
pub const CONV_INDICES: [usize; 13] = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
/// Convolutions per block; each block ends with a 2×2 max-pool.
pub const BLOCKS: [usize; 5] = [2, 2, 3, 3, 3];
/// Side of the adaptive average pool's output.
pub const POOL_SIDE: usize = 7;
/// Smallest input side: five 2×2 max-pools must leave at least one pixel.
pub const MIN_INPUT: usize = 32;

/// Channel widths of the network. [`VggConfig::VGG16`] is the real one; tests also use
/// narrow copies so that export and serving tests stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VggConfig {
    /// Output channels of the convolutions of each of the five blocks.
    pub widths: [usize; 5],
    /// Width of fc6 and fc7.
    pub fc: usize,
    /// Outputs of fc8 (ImageNet: 1000).
    pub classes: usize,
}

impl VggConfig {
    pub const VGG16: VggConfig = VggConfig {
        widths: [64, 128, 256, 512, 512],
        fc: 4096,
        classes: 1000,
    };

    /// `(in, out)` channels of each of the 13 convolutions.
    pub fn conv_channels(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(13);
        let mut c_in = 3;
        for (block, &n) in BLOCKS.iter().enumerate() {
            for _ in 0..n {
                out.push((c_in, self.widths[block]));
                c_in = self.widths[block];
            }
        }
        out
    }

    /// Channels of the last feature map.
    pub fn feature_channels(&self) -> usize {
        self.widths[4]
    }

    /// Width of the pooled, flattened features (512·7·7 = 25,088 for VGG16).
    pub fn pooled_dim(&self) -> usize {
        self.feature_channels() * POOL_SIDE * POOL_SIDE
    }

    /// The torchvision-layout tensor names and shapes this configuration needs, in state-dict
    /// order (the convolutions, then fc6, fc7, fc8).
    pub fn torchvision_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (&idx, (c_in, c_out)) in CONV_INDICES.iter().zip(self.conv_channels()) {
            out.push((format!("features.{idx}.weight"), vec![c_out, c_in, 3, 3]));
            out.push((format!("features.{idx}.bias"), vec![c_out]));
        }
        let fcs = [
            (0, self.fc, self.pooled_dim()),
            (3, self.fc, self.fc),
            (6, self.classes, self.fc),
        ];
        for (idx, o, i) in fcs {
            out.push((format!("classifier.{idx}.weight"), vec![o, i]));
            out.push((format!("classifier.{idx}.bias"), vec![o]));
        }
        out
    }
}

/// A weights file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VggError {
    #[error("cannot read VGG16 weights {path}: {source}")]
    Read {
        path: PathBuf,
        source: candle_core::Error,
    },
    #[error("{path}: tensor '{key}' is missing (expected shape {expected:?}; {layout} layout)")]
    Missing {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        layout: &'static str,
    },
    #[error("{path}: tensor '{key}' has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: neither torchvision ('features.0.weight') nor timm VGG16 tensors found; first keys: {keys}")]
    NotVgg { path: PathBuf, keys: String },
    #[error("input size {0} is too small: VGG16 needs at least {MIN_INPUT}×{MIN_INPUT}")]
    InputTooSmall(usize),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One fully connected layer: `weight` `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Dense {
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// The pretrained network: 13 convolutions and, when the file has them, fc6/fc7/fc8.
#[derive(Debug, Clone)]
pub struct Vgg16 {
    pub config: VggConfig,
    /// `(weight [out,in,3,3], bias [out])` of each convolution.
    pub convs: Vec<(Tensor, Tensor)>,
    /// fc6, fc7, fc8; `None` for a file without the classifier.
    pub classifier: Option<[Dense; 3]>,
    /// Which layout the file used ("torchvision" or "timm").
    pub layout: &'static str,
    /// The convolution kernels as `[3·3·in, out]` matrices for the channels-last CPU path,
    /// made on its first use and kept (not rebuilt for every batch).
    kernels_nhwc: std::sync::OnceLock<Vec<Tensor>>,
}

impl Vgg16 {
    /// Reads a safetensors file in either published layout (see the module docs).
    pub fn load(path: &Path, device: &Device) -> Result<Self, VggError> {
        let tensors =
            candle_core::safetensors::load(path, device).map_err(|source| VggError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_tensors(tensors, VggConfig::VGG16, path)
    }

    /// Builds the network from named tensors (either layout), checking every name and shape.
    pub fn from_tensors(
        mut t: HashMap<String, Tensor>,
        config: VggConfig,
        source: &Path,
    ) -> Result<Self, VggError> {
        if !t.contains_key("features.0.weight") {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            let keys = keys
                .iter()
                .take(5)
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(VggError::NotVgg {
                path: source.to_path_buf(),
                keys,
            });
        }
        let timm = t.contains_key("pre_logits.fc1.weight") || t.contains_key("head.fc.weight");
        let layout = if timm { "timm" } else { "torchvision" };
        let shapes = config.torchvision_shapes();
        let c = config.feature_channels();
        let fc_names: [(&str, &str, Vec<usize>); 3] = if timm {
            [
                (
                    "pre_logits.fc1.weight",
                    "pre_logits.fc1.bias",
                    vec![config.fc, c, POOL_SIDE, POOL_SIDE],
                ),
                (
                    "pre_logits.fc2.weight",
                    "pre_logits.fc2.bias",
                    vec![config.fc, config.fc, 1, 1],
                ),
                (
                    "head.fc.weight",
                    "head.fc.bias",
                    vec![config.classes, config.fc],
                ),
            ]
        } else {
            [
                (
                    "classifier.0.weight",
                    "classifier.0.bias",
                    shapes[26].1.clone(),
                ),
                (
                    "classifier.3.weight",
                    "classifier.3.bias",
                    shapes[28].1.clone(),
                ),
                (
                    "classifier.6.weight",
                    "classifier.6.bias",
                    shapes[30].1.clone(),
                ),
            ]
        };
        // The classifier is all or nothing: a file with none of it is a backbone-only file.
        let has_classifier = fc_names.iter().any(|(w, _, _)| t.contains_key(*w));
        let mut take = |key: &str, expected: &[usize], stored: &[usize]| {
            let tensor = t.remove(key).ok_or_else(|| VggError::Missing {
                path: source.to_path_buf(),
                key: key.to_string(),
                expected: stored.to_vec(),
                layout,
            })?;
            if tensor.dims() != stored {
                return Err(VggError::Shape {
                    path: source.to_path_buf(),
                    key: key.to_string(),
                    expected: stored.to_vec(),
                    found: tensor.dims().to_vec(),
                });
            }
            // timm stores fc1/fc2 as convolution kernels; as a matrix they are the same numbers
            // in the same order (a 7×7 kernel over a 7×7 map is a dot product with the
            // flattened map).
            Ok::<_, VggError>(tensor.to_dtype(DType::F32)?.reshape(expected)?)
        };
        let mut convs = Vec::with_capacity(13);
        for pair in shapes[..26].chunks(2) {
            let w = take(&pair[0].0, &pair[0].1, &pair[0].1)?;
            let b = take(&pair[1].0, &pair[1].1, &pair[1].1)?;
            convs.push((w, b));
        }
        let classifier = if has_classifier {
            let mut fcs = Vec::with_capacity(3);
            for (i, (w, b, stored)) in fc_names.iter().enumerate() {
                let matrix = &shapes[26 + 2 * i].1;
                let weight = take(w, matrix, stored)?;
                let bias = take(b, &shapes[27 + 2 * i].1, &shapes[27 + 2 * i].1)?;
                fcs.push(Dense { weight, bias });
            }
            let fc8 = fcs.pop().expect("three layers");
            let fc7 = fcs.pop().expect("three layers");
            let fc6 = fcs.pop().expect("three layers");
            Some([fc6, fc7, fc8])
        } else {
            None
        };
        Ok(Vgg16 {
            config,
            convs,
            classifier,
            layout,
            kernels_nhwc: std::sync::OnceLock::new(),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.convs[0].0.device()
    }

    /// Side of the last feature map for an input of side `size` (five halvings, floored).
    pub fn feature_side(size: usize) -> usize {
        size >> 5
    }

    /// The 13 convolutions with their ReLUs and the five max-pools, on an input already
    /// normalised with the ImageNet statistics: `[N,3,S,S]` → `[N,C,S/32,S/32]`.
    ///
    /// On the CPU, when every pooled side is even (S a multiple of 32: 32, 64, 224, ...),
    /// this runs channels-last with fmnist's kernels (3×3 im2col + one GEMM + fused
    /// bias/ReLU per layer, a 2×2 max-pool) — about twice as fast as candle's NCHW conv2d;
    /// elsewhere it uses candle's stock ops. Both give the same numbers up to summation
    /// order (tested).
    pub fn features(&self, xs: &Tensor) -> Result<Tensor, VggError> {
        let size = xs.dim(D::Minus1)?;
        if size < MIN_INPUT || xs.dim(D::Minus2)? < MIN_INPUT {
            return Err(VggError::InputTooSmall(size));
        }
        if xs.device().is_cpu() && size % 32 == 0 && xs.dim(D::Minus2)? % 32 == 0 {
            return Ok(self.features_nhwc(xs)?);
        }
        self.features_stock(xs)
    }

    /// Channels-last CPU path of [`Vgg16::features`].
    fn features_nhwc(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        use super::custom_ops::{BiasRelu, Im2Col3x3, MaxPool2x2};
        let kernels = match self.kernels_nhwc.get() {
            Some(k) => k,
            None => {
                // [o, i, ky, kx] -> [ky, kx, i, o]: the im2col column order (ky, kx, c).
                let made = self
                    .convs
                    .iter()
                    .map(|(w, _)| {
                        let (o, i, kh, kw) = w.dims4()?;
                        w.permute((2, 3, 1, 0))?
                            .contiguous()?
                            .reshape((kh * kw * i, o))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                self.kernels_nhwc.get_or_init(|| made)
            }
        };
        let mut x = xs.permute((0, 2, 3, 1))?.contiguous()?;
        let mut layer = 0;
        for &n in &BLOCKS {
            for _ in 0..n {
                let (w_t, b) = (&kernels[layer], &self.convs[layer].1);
                let (bn, h, wd, _) = x.dims4()?;
                x = x
                    .apply_op1(Im2Col3x3)?
                    .matmul(w_t)?
                    .apply_op2(b, BiasRelu)?
                    .reshape((bn, h, wd, w_t.dim(1)?))?;
                layer += 1;
            }
            x = x.apply_op1(MaxPool2x2)?;
        }
        x.permute((0, 3, 1, 2))?.contiguous()
    }

    /// candle's stock NCHW path of [`Vgg16::features`] (any size, any device).
    pub fn features_stock(&self, xs: &Tensor) -> Result<Tensor, VggError> {
        let mut x = xs.clone();
        let mut layer = 0;
        for &n in &BLOCKS {
            for _ in 0..n {
                let (w, b) = &self.convs[layer];
                x = x
                    .conv2d(w, 1, 1, 1, 1)?
                    .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?
                    .relu()?;
                layer += 1;
            }
            x = x.max_pool2d(2)?;
        }
        Ok(x)
    }

    /// `(x - mean) / std` with ImageNet's per-channel statistics, on `[N,3,S,S]` in 0–1.
    pub fn normalize(xs: &Tensor) -> candle_core::Result<Tensor> {
        let dev = xs.device();
        let mean = Tensor::new(&fmnist::preprocess::IMAGENET_MEAN, dev)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&fmnist::preprocess::IMAGENET_STD, dev)?.reshape((1, 3, 1, 1))?;
        xs.broadcast_sub(&mean)?.broadcast_div(&std)
    }

    /// torchvision's `flatten(avgpool(features(x)))` on a normalised input: `[N, C·7·7]`.
    pub fn pooled(&self, normalized: &Tensor) -> Result<Tensor, VggError> {
        let f = self.features(normalized)?;
        Ok(adaptive_avg_pool(&f, POOL_SIDE)?.flatten_from(1)?)
    }

    /// fc7 activations (after its ReLU) from pooled features.
    pub fn fc7(&self, pooled: &Tensor) -> Result<Tensor, VggError> {
        let [fc6, fc7, _] = self.classifier_or_err()?;
        Ok(fc7.forward(&fc6.forward(pooled)?.relu()?)?.relu()?)
    }

    /// ImageNet logits from fc7 activations (used to check parity with PyTorch).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn logits(&self, fc7: &Tensor) -> Result<Tensor, VggError> {
        let [_, _, fc8] = self.classifier_or_err()?;
        Ok(fc8.forward(fc7)?)
    }

    fn classifier_or_err(&self) -> Result<&[Dense; 3], VggError> {
        self.classifier.as_ref().ok_or_else(|| {
            VggError::Candle(candle_core::Error::Msg(
                "these VGG16 weights have no classifier (fc6/fc7/fc8): use --head mlp".into(),
            ))
        })
    }
}

/// Deterministic weights for a whole network, with no file: parameter `k` (torchvision
/// state-dict order), element `i` is a SplitMix64 hash of `(k << 32 | i)` mapped to [-1, 1),
/// scaled He-uniform (biases ×0.01). This is the formula PyTorch's reference values were
/// computed with (fixtures/vgg16_reference.safetensors), and what `bench-vgg` runs when no
/// weights file is given (speed does not depend on the values).
pub fn formula_tensors(config: VggConfig) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (k, (name, shape)) in config.torchvision_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let fan_in = (n / shape[0]) as f64;
        let scale = if name.ends_with("bias") {
            0.01
        } else {
            (6.0 / fan_in).sqrt()
        };
        let values: Vec<f32> = (0..n as u64)
            .map(|i| {
                let mut z = ((k as u64) << 32 | i).wrapping_add(0x9E3779B97F4A7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                let u = (z >> 40) as f64 / (1u64 << 24) as f64;
                (scale * (2.0 * u - 1.0)) as f32
            })
            .collect();
        out.insert(
            name,
            Tensor::from_vec(values, shape, &Device::Cpu).expect("shape matches"),
        );
    }
    out
}

/// torchvision's `AdaptiveAvgPool2d(out)` on `[N,C,H,W]`. Output cell `i` along an axis of
/// length `n` averages input `floor(i·n/out) .. ceil((i+1)·n/out)`; the pool is separable, so
/// it is two matrix products with [`fmnist::onnx::adaptive_pool_matrix`] — the same matrices
/// the ONNX export uses.
pub fn adaptive_avg_pool(xs: &Tensor, out: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let dev = xs.device();
    let ph = Tensor::from_vec(fmnist::onnx::adaptive_pool_matrix(h, out), (out, h), dev)?;
    let pw_t = Tensor::from_vec(fmnist::onnx::adaptive_pool_matrix(w, out), (out, w), dev)?
        .t()?
        .contiguous()?;
    ph.broadcast_matmul(&xs.contiguous()?)?
        .broadcast_matmul(&pw_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::custom_ops::tests::{max_abs, max_diff};
    use fmnist::preprocess::{batch_from_pixels, InputLayout};

    fn reference() -> HashMap<String, Tensor> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/vgg16_reference.safetensors");
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    /// Largest absolute difference, and the same relative to the reference's largest value.
    fn compare(ours: &Tensor, theirs: &Tensor) -> (f32, f32) {
        assert_eq!(ours.dims(), theirs.dims());
        let diff = max_diff(ours, theirs);
        (diff, diff / max_abs(theirs).max(1e-12))
    }

    #[test]
    fn preprocessing_and_vgg16_match_pytorch_at_224_64_and_32() {
        let r = reference();
        let vgg = Vgg16::from_tensors(
            formula_tensors(VggConfig::VGG16),
            VggConfig::VGG16,
            Path::new("formula"),
        )
        .unwrap();
        assert_eq!(vgg.layout, "torchvision");
        let pixels: Vec<Vec<u8>> = r["pixels"]
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|img| img.into_iter().flatten().map(|p| p as u8).collect())
            .collect();
        let images: Vec<&[u8]> = pixels.iter().map(|p| p.as_slice()).collect();
        for size in [32, 64, 224] {
            let rgb = batch_from_pixels(&images, InputLayout::Rgb { size }, &Device::Cpu).unwrap();
            let (d, _) = compare(
                &rgb.narrow(1, 0, 1).unwrap(),
                &r[&format!("resized_{size}")],
            );
            assert!(d <= 1e-5, "resized_{size}: max diff {d}");
            let input = Vgg16::normalize(&rgb).unwrap();
            let (d, _) = compare(&input, &r[&format!("input_{size}")]);
            assert!(d <= 1e-5, "input_{size}: max diff {d}");
            let pooled = vgg.pooled(&input).unwrap();
            let (_, rel) = compare(&pooled, &r[&format!("pooled_{size}")]);
            assert!(rel <= 1e-3, "pooled_{size}: relative diff {rel}");
            let fc7 = vgg.fc7(&pooled).unwrap();
            let (_, rel) = compare(&fc7, &r[&format!("fc7_{size}")]);
            assert!(rel <= 1e-3, "fc7_{size}: relative diff {rel}");
            let logits = vgg.logits(&fc7).unwrap();
            let (_, rel) = compare(&logits, &r[&format!("logits_{size}")]);
            assert!(rel <= 1e-3, "logits_{size}: relative diff {rel}");
        }
    }

    #[test]
    fn timm_layout_gives_the_same_network_as_torchvision() {
        // A narrow VGG keeps this fast; the key mapping and reshapes are what is tested.
        let cfg = VggConfig {
            widths: [4, 4, 8, 8, 8],
            fc: 16,
            classes: 5,
        };
        let tv = formula_tensors(cfg);
        let mut timm = HashMap::new();
        for (k, v) in &tv {
            let (name, t) = match k.as_str() {
                "classifier.0.weight" => (
                    "pre_logits.fc1.weight".to_string(),
                    v.reshape((16, 8, 7, 7)).unwrap(),
                ),
                "classifier.0.bias" => ("pre_logits.fc1.bias".to_string(), v.clone()),
                "classifier.3.weight" => (
                    "pre_logits.fc2.weight".to_string(),
                    v.reshape((16, 16, 1, 1)).unwrap(),
                ),
                "classifier.3.bias" => ("pre_logits.fc2.bias".to_string(), v.clone()),
                "classifier.6.weight" => ("head.fc.weight".to_string(), v.clone()),
                "classifier.6.bias" => ("head.fc.bias".to_string(), v.clone()),
                _ => (k.clone(), v.clone()),
            };
            timm.insert(name, t);
        }
        let a = Vgg16::from_tensors(tv, cfg, Path::new("tv")).unwrap();
        let b = Vgg16::from_tensors(timm, cfg, Path::new("timm")).unwrap();
        assert_eq!(b.layout, "timm");
        let x = Tensor::rand(0f32, 1f32, (2, 3, 40, 40), &Device::Cpu).unwrap();
        let la = a.logits(&a.fc7(&a.pooled(&x).unwrap()).unwrap()).unwrap();
        let lb = b.logits(&b.fc7(&b.pooled(&x).unwrap()).unwrap()).unwrap();
        assert_eq!(compare(&la, &lb).0, 0.0);
    }

    #[test]
    fn wrong_or_missing_tensors_are_named_with_their_shapes() {
        let cfg = VggConfig {
            widths: [4, 4, 8, 8, 8],
            fc: 16,
            classes: 5,
        };
        let mut t = formula_tensors(cfg);
        t.insert(
            "features.10.weight".into(),
            Tensor::zeros((4, 4, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Vgg16::from_tensors(t, cfg, Path::new("w.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("features.10.weight"),
            "{err}"
        );
        assert!(
            err.contains("[4, 4, 3, 3]") && err.contains("[8, 4, 3, 3]"),
            "{err}"
        );

        let mut t = formula_tensors(cfg);
        t.remove("features.12.bias");
        let err = Vgg16::from_tensors(t, cfg, Path::new("w"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'features.12.bias' is missing") && err.contains("[8]"),
            "{err}"
        );

        let mut t = formula_tensors(cfg);
        t.remove("classifier.3.weight");
        let err = Vgg16::from_tensors(t, cfg, Path::new("w"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("classifier.3.weight") && err.contains("[16, 16]"),
            "{err}"
        );

        // A backbone-only file is fine (for --head mlp); an unrelated file is not VGG.
        let mut t = formula_tensors(cfg);
        t.retain(|k, _| k.starts_with("features."));
        assert!(Vgg16::from_tensors(t, cfg, Path::new("w"))
            .unwrap()
            .classifier
            .is_none());
        let mut other = HashMap::new();
        other.insert(
            "conv1.weight".to_string(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let err = Vgg16::from_tensors(other, cfg, Path::new("resnet.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv1.weight") && err.contains("torchvision"),
            "{err}"
        );
    }

    #[test]
    fn channels_last_kernels_match_candles_stock_path() {
        let cfg = VggConfig {
            widths: [8, 8, 16, 16, 16],
            fc: 16,
            classes: 5,
        };
        let vgg = Vgg16::from_tensors(formula_tensors(cfg), cfg, Path::new("w")).unwrap();
        for (n, size) in [(1, 32), (3, 64)] {
            let x = Tensor::rand(-2f32, 2f32, (n, 3, size, size), &Device::Cpu).unwrap();
            let fast = vgg.features_nhwc(&x).unwrap();
            let stock = vgg.features_stock(&x).unwrap();
            let (_, rel) = compare(&fast, &stock);
            assert!(rel < 1e-5, "{n}x{size}: relative diff {rel}");
        }
    }

    #[test]
    fn inputs_below_32_are_refused() {
        let cfg = VggConfig {
            widths: [4, 4, 8, 8, 8],
            fc: 16,
            classes: 5,
        };
        let vgg = Vgg16::from_tensors(formula_tensors(cfg), cfg, Path::new("w")).unwrap();
        let x = Tensor::zeros((1, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(vgg.features(&x), Err(VggError::InputTooSmall(28))));
    }
}
