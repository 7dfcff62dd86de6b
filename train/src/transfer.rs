//! VGG16 transfer learning: a frozen pretrained backbone, a small trained head, and a
//! feature cache in between so the backbone runs once per image.
//!
//! Preprocessing is the root library's (pixels/255 → bilinear resize to `--input-size` →
//! three channels) followed by the ImageNet normalisation, which sits inside the model
//! ([`Vgg16::normalize`] here, a Sub/Div pair in the ONNX graph): the exported model takes
//! `[N,3,S,S]` in 0–1, exactly what `fmnist-serve` feeds a 3-channel model.
//!
//! Heads:
//! - `last` — the seed's recipe: fc6/fc7 pretrained and frozen, a new 4096→10 layer trained on
//!   fc7's activations (cached: 4,096 values per image);
//! - `mlp` — for weight files without the classifier: global-average-pooled convolutional
//!   features (512 per image; the 7×7-pooled 25,088 would make a 7 GB cache for 70,000
//!   images) → Linear(512, hidden) → ReLU → dropout → Linear(hidden, 10).

use crate::data::Dataset;
use crate::features::{self, CacheKey, Features, Origin};
use crate::loader;
use crate::models::vgg::{adaptive_avg_pool, Vgg16, POOL_SIDE};
use crate::models::{dropout, flat, Classifier, Params};
use crate::optim::{lr_at, AdamW, AdamWConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use fmnist::onnx::plan::Plan;
use fmnist::onnx::{GraphSpec, Layer};
use fmnist::preprocess::{InputLayout, IMAGENET_MEAN, IMAGENET_STD};
use fmnist::NUM_CLASSES;
use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::ChaCha8Rng;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

/// Which head is trained on the frozen backbone.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HeadMode {
    /// fc6/fc7 pretrained and frozen; only a new 4096→10 output layer is trained.
    Last,
    /// A new small MLP on global-average-pooled convolutional features.
    Mlp,
}

impl HeadMode {
    /// The cached feature kind (part of the cache key).
    pub fn feature_kind(self) -> &'static str {
        match self {
            HeadMode::Last => "fc7",
            HeadMode::Mlp => "gap",
        }
    }
}

/// The head's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadConfig {
    pub mode: HeadMode,
    /// Hidden width of the `mlp` head.
    pub hidden: usize,
    /// Dropout on the head's input during training.
    pub dropout: f32,
}

/// The trained part: one linear layer (`last`) or a two-layer MLP (`mlp`).
pub struct Head {
    pub config: HeadConfig,
    params: Params,
    layers: Vec<(candle_core::Var, candle_core::Var)>,
}

impl Head {
    /// A freshly initialised head for `in_dim` features (PyTorch's default uniform bounds).
    pub fn new(
        config: HeadConfig,
        in_dim: usize,
        r: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<Self> {
        let dims = match config.mode {
            HeadMode::Last => vec![(in_dim, NUM_CLASSES)],
            HeadMode::Mlp => vec![(in_dim, config.hidden), (config.hidden, NUM_CLASSES)],
        };
        let mut params = Params::default();
        let mut layers = Vec::new();
        for (i, (inp, out)) in dims.into_iter().enumerate() {
            let bound = 1.0 / (inp as f32).sqrt();
            let w = params.uniform(&format!("head.{i}.weight"), &[out, inp], bound, r, dev)?;
            let b = params.uniform(&format!("head.{i}.bias"), &[out], bound, r, dev)?;
            layers.push((w, b));
        }
        Ok(Head {
            config,
            params,
            layers,
        })
    }

    /// Logits from features; dropout on the input (and between the MLP's layers) only when
    /// `train` carries a random stream.
    pub fn forward_t(&self, feats: &Tensor, mut train: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let mut x = feats.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            if i > 0 {
                x = x.relu()?;
            }
            if let Some(r) = train.as_deref_mut() {
                x = dropout(&x, self.config.dropout, r)?;
            }
            x = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
        }
        Ok(x)
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    fn export_layers(&self) -> Result<Vec<Layer>> {
        let mut out = Vec::new();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            if i > 0 {
                out.push(Layer::Relu);
            }
            let (o, inp) = w.as_tensor().dims2()?;
            out.push(Layer::Linear {
                weight: flat(w.as_tensor())?,
                in_features: inp,
                out_features: o,
                bias: flat(b.as_tensor())?,
            });
        }
        Ok(out)
    }
}

/// Backbone + head, as one classifier of `[N,3,S,S]` images in 0–1.
pub struct Transfer {
    pub backbone: Vgg16,
    pub head: Head,
    pub input_size: usize,
}

/// The backbone's features for the head, from `[N,3,S,S]` images in 0–1.
pub fn backbone_features(vgg: &Vgg16, mode: HeadMode, images: &Tensor) -> Result<Tensor> {
    let x = Vgg16::normalize(images)?;
    Ok(match mode {
        HeadMode::Last => vgg.fc7(&vgg.pooled(&x)?)?,
        HeadMode::Mlp => adaptive_avg_pool(&vgg.features(&x)?, 1)?.flatten_from(1)?,
    })
}

/// Width of the features `mode` caches.
pub fn feature_dim(vgg: &Vgg16, mode: HeadMode) -> usize {
    match mode {
        HeadMode::Last => vgg.config.fc,
        HeadMode::Mlp => vgg.config.feature_channels(),
    }
}

impl Classifier for Transfer {
    fn forward_t(
        &self,
        xs: &Tensor,
        train: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let feats = backbone_features(&self.backbone, self.head.config.mode, xs)
            .map_err(candle_core::Error::wrap)?;
        self.head
            .forward_t(&feats, train)
            .map_err(candle_core::Error::wrap)
    }

    fn layout(&self) -> InputLayout {
        InputLayout::Rgb {
            size: self.input_size,
        }
    }

    fn params(&self) -> &Params {
        self.head.params()
    }

    fn export_layers(&self) -> candle_core::Result<Vec<Layer>> {
        let mut layers = backbone_layers(&self.backbone, self.head.config.mode, self.input_size)?;
        layers.extend(
            self.head
                .export_layers()
                .map_err(candle_core::Error::wrap)?,
        );
        Ok(layers)
    }
}

/// The frozen part as ONNX layers: ImageNet normalisation, the 13 convolutions and pools, then
/// fc6/fc7 (`last`) or global average pooling (`mlp`) — what [`backbone_features`] computes.
fn backbone_layers(
    vgg: &Vgg16,
    mode: HeadMode,
    input_size: usize,
) -> candle_core::Result<Vec<Layer>> {
    {
        let mut layers = vec![Layer::Normalize {
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
        }];
        let mut conv = 0;
        for &n in &crate::models::vgg::BLOCKS {
            for _ in 0..n {
                let (w, b) = &vgg.convs[conv];
                let d = w.dims4()?;
                layers.push(Layer::Conv2d {
                    weight: flat(w)?,
                    shape: [d.0, d.1, d.2, d.3],
                    bias: flat(b)?,
                    stride: 1,
                    padding: 1,
                });
                layers.push(Layer::Relu);
                conv += 1;
            }
            layers.push(Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            });
        }
        let side = Vgg16::feature_side(input_size);
        match mode {
            HeadMode::Last => {
                layers.push(Layer::AdaptiveAvgPool2d {
                    in_h: side,
                    in_w: side,
                    out: POOL_SIDE,
                });
                layers.push(Layer::Flatten);
                let [fc6, fc7, _] = vgg
                    .classifier
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("no classifier to export".into()))?;
                for fc in [fc6, fc7] {
                    let (o, i) = fc.weight.dims2()?;
                    layers.push(Layer::Linear {
                        weight: flat(&fc.weight)?,
                        in_features: i,
                        out_features: o,
                        bias: flat(&fc.bias)?,
                    });
                    layers.push(Layer::Relu);
                }
            }
            HeadMode::Mlp => {
                layers.push(Layer::AdaptiveAvgPool2d {
                    in_h: side,
                    in_w: side,
                    out: 1,
                });
                layers.push(Layer::Flatten);
            }
        }
        Ok(layers)
    }
}

/// The backbone through fmnist's planned executor (the serving kernels: convolution windows
/// read in place, AVX-512 where present), about 2.5–3× faster than running it through candle
/// on the CPU. `None` off the CPU, or if the planner refuses the graph.
pub fn backbone_plan(vgg: &Vgg16, mode: HeadMode, input_size: usize) -> Option<Plan> {
    if !vgg.device().is_cpu() {
        return None;
    }
    let layout = InputLayout::Rgb { size: input_size };
    let spec = GraphSpec {
        name: "vgg16-backbone".into(),
        input: layout,
        num_classes: feature_dim(vgg, mode),
        flip_average: false,
        layers: backbone_layers(vgg, mode, input_size).ok()?,
        metadata: vec![],
    };
    let proto = fmnist::onnx::writer::build_model(&spec).ok()?;
    Plan::from_model_proto(&proto, layout).ok()
}

/// Hex SHA-256 of a file (the weights' identity in the cache key).
pub fn file_sha256(path: &Path) -> Result<String> {
    crate::data::sha256_file(path).with_context(|| format!("hashing {}", path.display()))
}

/// Features of every image of `data` through the backbone, from the cache when it matches.
#[allow(clippy::too_many_arguments)]
pub fn cached_features(
    vgg: &Vgg16,
    mode: HeadMode,
    input_size: usize,
    weights_sha256: &str,
    data: &Dataset,
    data_file: &Path,
    data_sha256: &str,
    cache_dir: &Path,
    batch: usize,
    quiet: bool,
) -> Result<Features> {
    let key = CacheKey {
        weights_sha256: weights_sha256.to_string(),
        input_size,
        features: mode.feature_kind().to_string(),
        dim: feature_dim(vgg, mode),
        data_file: data_file.display().to_string(),
        data_sha256: data_sha256.to_string(),
        rows: data.len(),
    };
    let path = key.path_in(cache_dir);
    let layout = InputLayout::Rgb { size: input_size };
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(data.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "features {prefix} [{bar:30}] {pos}/{len} images {per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}px", input_size));
    let plain = !quiet && !std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let dev = vgg.device().clone();
    let mut first = None;
    let plan = backbone_plan(vgg, mode, input_size);
    let feats = features::load_or_build(
        &path,
        &key,
        batch,
        |start, end| {
            let images: Vec<&[u8]> = (start..end).map(|i| data.image(i)).collect();
            let x = fmnist::preprocess::batch_from_pixels(&images, layout, &dev)?;
            match &plan {
                Some(p) => Ok(p.run(&flat(&x)?, images.len())?),
                None => Ok(flat(&backbone_features(vgg, mode, &x)?)?),
            }
        },
        |done| {
            let first_row = *first.get_or_insert(done);
            bar.set_position(done as u64);
            if plain && (last_line.elapsed().as_secs() >= 30 || done == data.len()) {
                let rate = (done - first_row) as f64 / started.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "features {input_size}px: {done}/{} images, {rate:.1} img/s",
                    data.len()
                );
                last_line = Instant::now();
            }
        },
        || crate::train::STOP.load(std::sync::atomic::Ordering::SeqCst),
    );
    bar.finish_and_clear();
    let feats = feats?;
    if !quiet {
        let secs = started.elapsed().as_secs_f64();
        match &feats.origin {
            Origin::Reused => eprintln!("features: reusing {}", path.display()),
            Origin::Built { reason } => {
                if let Some(r) = reason {
                    eprintln!("features: {r}");
                }
                eprintln!(
                    "features: extracted {} images in {secs:.1}s ({:.1} img/s) -> {}",
                    data.len(),
                    data.len() as f64 / secs.max(1e-9),
                    path.display()
                );
            }
            Origin::Resumed { from_row } => eprintln!(
                "features: resumed at image {from_row}, finished in {secs:.1}s -> {}",
                path.display()
            ),
        }
    }
    Ok(feats)
}

/// Default epochs of a VGG16 head (`--epochs` when not given).
pub const HEAD_EPOCHS: usize = 18;
/// Default dropout of a VGG16 head (`--dropout` when not given).
pub const HEAD_DROPOUT: f32 = 0.3;
/// Default peak learning rate of the head.
pub const HEAD_LR: f64 = 2e-3;

/// Head-training settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HeadRecipe {
    pub head: HeadConfig,
    pub input_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub val_fraction: f64,
    pub seed: u64,
}

/// One epoch's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeadEpoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
}

fn rows_tensor(feats: &Features, rows: &[usize], dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(rows.len() * feats.dim);
    for &r in rows {
        v.extend_from_slice(feats.row(r));
    }
    Ok(Tensor::from_vec(v, (rows.len(), feats.dim), dev)?)
}

/// The classes `head` predicts for the given cached rows.
pub fn head_predictions(
    head: &Head,
    feats: &Features,
    rows: &[usize],
    dev: &Device,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(1000) {
        let logits = head.forward_t(&rows_tensor(feats, chunk, dev)?, None)?;
        out.extend(
            logits
                .argmax(1)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|p| p as u8),
        );
    }
    Ok(out)
}

/// Accuracy of `head` on the given cached rows.
pub fn head_accuracy(
    head: &Head,
    feats: &Features,
    labels: &[u8],
    rows: &[usize],
    dev: &Device,
) -> Result<f64> {
    let preds = head_predictions(head, feats, rows, dev)?;
    let correct = rows
        .iter()
        .zip(preds)
        .filter(|(&r, p)| labels[r] == *p)
        .count();
    Ok(correct as f64 / rows.len().max(1) as f64)
}

/// Trains a new head on cached features (split into train/validation by `recipe`).
pub fn train_head(
    feats: &Features,
    data: &Dataset,
    recipe: &HeadRecipe,
    dev: &Device,
    quiet: bool,
) -> Result<(Head, Vec<HeadEpoch>)> {
    if recipe.batch_size == 0 || recipe.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    let (train_rows, val_rows) = loader::split(data, recipe.val_fraction, recipe.seed);
    if train_rows.is_empty() {
        bail!(
            "no training images left after holding out --val-fraction {}",
            recipe.val_fraction
        );
    }
    let mut init = loader::rng(recipe.seed, loader::streams::INIT);
    let head = Head::new(recipe.head, feats.dim, &mut init, dev)?;
    let mut opt = AdamW::new(
        head.params(),
        AdamWConfig {
            weight_decay: recipe.weight_decay,
            ..Default::default()
        },
    )?;
    let per_epoch = train_rows.len().div_ceil(recipe.batch_size);
    let total = per_epoch * recipe.epochs;
    let warmup = (per_epoch / 2).min(total / 2);
    let mut history = Vec::new();
    for epoch in 0..recipe.epochs {
        let started = Instant::now();
        let order = loader::epoch_order(&train_rows, recipe.seed, epoch);
        let mut r = loader::rng(recipe.seed, loader::streams::EPOCH_BASE + epoch as u64);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (b, chunk) in order.chunks(recipe.batch_size).enumerate() {
            let x = rows_tensor(feats, chunk, dev)?;
            let y = Tensor::from_vec(
                chunk
                    .iter()
                    .map(|&i| data.labels[i] as u32)
                    .collect::<Vec<_>>(),
                chunk.len(),
                dev,
            )?;
            let logits = head.forward_t(&x, Some(&mut r))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            opt.step(
                head.params(),
                &grads,
                lr_at(epoch * per_epoch + b, total, warmup, recipe.lr),
            )?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            seen += chunk.len();
        }
        let val_accuracy = if val_rows.is_empty() {
            None
        } else {
            Some(head_accuracy(&head, feats, &data.labels, &val_rows, dev)?)
        };
        let e = HeadEpoch {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            val_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        if !quiet {
            eprintln!(
                "head epoch {}/{}: loss {:.4}, val accuracy {}, {:.2}s",
                e.epoch,
                recipe.epochs,
                e.train_loss,
                e.val_accuracy.map_or("-".into(), |a| format!("{a:.4}")),
                e.seconds
            );
        }
        history.push(e);
    }
    Ok((head, history))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::assert_onnx_matches;
    use crate::models::vgg::{formula_tensors, VggConfig};

    const NARROW: VggConfig = VggConfig {
        widths: [8, 8, 16, 16, 16],
        fc: 32,
        classes: 7,
    };

    fn sample() -> Dataset {
        crate::data::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sample.csv"))
            .unwrap()
    }

    fn backbone() -> Vgg16 {
        Vgg16::from_tensors(formula_tensors(NARROW), NARROW, Path::new("formula")).unwrap()
    }

    fn snapshot(vgg: &Vgg16) -> Vec<Vec<f32>> {
        let mut out: Vec<Vec<f32>> = vgg
            .convs
            .iter()
            .flat_map(|(w, b)| [flat(w).unwrap(), flat(b).unwrap()])
            .collect();
        for fc in vgg.classifier.as_ref().unwrap() {
            out.push(flat(&fc.weight).unwrap());
            out.push(flat(&fc.bias).unwrap());
        }
        out
    }

    fn recipe(mode: HeadMode) -> HeadRecipe {
        HeadRecipe {
            head: HeadConfig {
                mode,
                hidden: 24,
                dropout: 0.1,
            },
            input_size: 32,
            epochs: 4,
            batch_size: 32,
            lr: 5e-3,
            weight_decay: 1e-4,
            val_fraction: 0.1,
            seed: 5,
        }
    }

    /// Features, head training, the frozen backbone, and the exported ONNX model, per head.
    fn whole_path(mode: HeadMode) {
        let data = sample().select(&(0..160).collect::<Vec<_>>());
        let dev = Device::Cpu;
        let vgg = backbone();
        let before = snapshot(&vgg);
        // On the CPU the features come from the planned executor; below they are checked
        // against candle's forward pass.
        assert!(backbone_plan(&vgg, mode, 32).is_some());
        let dir = tempfile::tempdir().unwrap();
        let feats = cached_features(
            &vgg,
            mode,
            32,
            "formula",
            &data,
            Path::new("sample.csv"),
            "sample-sha",
            dir.path(),
            20,
            true,
        )
        .unwrap();
        assert_eq!(feats.dim, feature_dim(&vgg, mode));
        assert_eq!(feats.values.len(), data.len() * feats.dim);
        // The cached features are what the backbone computes for those images (up to the
        // summation order of a different batch size).
        let some: Vec<&[u8]> = (5..9).map(|i| data.image(i)).collect();
        let x = fmnist::preprocess::batch_from_pixels(&some, InputLayout::Rgb { size: 32 }, &dev)
            .unwrap();
        let direct = flat(&backbone_features(&vgg, mode, &x).unwrap()).unwrap();
        let cached = &feats.values[5 * feats.dim..9 * feats.dim];
        let scale = cached.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = direct
            .iter()
            .zip(cached)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * scale.max(1.0), "cache differs by {diff}");

        let (head, history) = train_head(&feats, &data, &recipe(mode), &dev, true).unwrap();
        assert_eq!(history.len(), 4);
        assert!(history.iter().all(|e| e.train_loss.is_finite()));
        assert!(
            history[3].train_loss < history[0].train_loss,
            "loss did not fall: {history:?}"
        );
        let model = Transfer {
            backbone: vgg,
            head,
            input_size: 32,
        };
        // Only the head is a parameter; the backbone is untouched, bit for bit.
        assert!(model
            .params()
            .vars()
            .iter()
            .all(|(n, _)| n.starts_with("head.")));
        assert_eq!(snapshot(&model.backbone), before);

        let out = dir.path().join("vgg.onnx");
        crate::export::export(&model, &out, vec![], false).unwrap();
        assert_onnx_matches(&model, &out, &data, 1e-3);
        // The safetensors sibling holds the head only.
        let st = candle_core::safetensors::load(out.with_extension("safetensors"), &dev).unwrap();
        assert!(st.keys().all(|k| k.starts_with("head.")), "{:?}", st.keys());
    }

    #[test]
    fn last_head_trains_on_fc7_with_a_frozen_backbone_and_exports() {
        whole_path(HeadMode::Last);
    }

    #[test]
    fn mlp_head_trains_on_pooled_features_and_exports() {
        whole_path(HeadMode::Mlp);
    }

    #[test]
    fn onnx_adaptive_pool_upsamples_like_torchvision_at_64() {
        // At 64x64 the last map is 2x2 and AdaptiveAvgPool2d(7) upsamples it: the export's
        // MatMul pair must agree with the candle model there too (fc6 sees 7x7 cells).
        let data = sample().select(&(0..12).collect::<Vec<_>>());
        let dev = Device::Cpu;
        let mut r = loader::rng(1, 2);
        let model = Transfer {
            backbone: backbone(),
            head: Head::new(recipe(HeadMode::Last).head, NARROW.fc, &mut r, &dev).unwrap(),
            input_size: 64,
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vgg64.onnx");
        crate::export::export(&model, &out, vec![], false).unwrap();
        assert_onnx_matches(&model, &out, &data, 1e-4);
    }
}
