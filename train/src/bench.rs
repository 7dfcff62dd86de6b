//! `fmnist-train bench-kernels`: candle's stock paths against fmnist's kernels, in one run, on
//! the same machine and threads — the training step of the CNN recipes, inference of
//! an ONNX model at batch 64 and batch 1, and VGG16 feature extraction.
//!
//! Every figure is measured by running the real code on the committed sample images for at
//! least `--seconds` per row; nothing is estimated.

use crate::data::Dataset;
use crate::engine::Workspace;
use crate::loader::{self, Augment};
use crate::models::cnn::{Cnn, CnnConfig};
use crate::models::vgg::{formula_tensors, Vgg16, VggConfig};
use crate::models::Classifier;
use crate::optim::{AdamW, AdamWConfig};
use crate::transfer::{self, Head, HeadConfig, HeadMode, Transfer};
use anyhow::{Context, Result};
use candle_core::Device;
use fmnist::kernels::bf16::Bf16Path;
use fmnist::onnx::{writer, Engine, GraphSpec};
use fmnist::{InputLayout, OnnxModel, NUM_CLASSES};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to measure.
pub struct BenchKernels<'a> {
    pub data: &'a Dataset,
    pub model: &'a Path,
    pub seconds: f64,
    pub vgg_sizes: &'a [usize],
    pub skip_training: bool,
}

/// Calls `f` until `seconds` have passed (at least `min_calls` times) after one warm-up call;
/// returns the per-call durations.
fn timed(
    seconds: f64,
    min_calls: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<Duration>> {
    f()?;
    let limit = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut times = Vec::new();
    while times.len() < min_calls || started.elapsed() < limit {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    Ok(times)
}

fn percentile(times: &mut [Duration], p: f64) -> Duration {
    times.sort();
    times[((times.len() - 1) as f64 * p).round() as usize]
}

fn per_second(times: &[Duration], items: usize) -> f64 {
    let total: f64 = times.iter().map(|d| d.as_secs_f64()).sum();
    (times.len() * items) as f64 / total
}

fn images(data: &Dataset, n: usize) -> Vec<&[u8]> {
    (0..n).map(|i| data.image(i % data.len())).collect()
}

pub fn run(b: &BenchKernels) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    println!(
        "fmnist bench-kernels: CPU, {threads} threads (candle), {} rayon threads, >= {:.1} s per row",
        rayon::current_num_threads(),
        b.seconds
    );
    if !b.skip_training {
        training_step(b)?;
    }
    bf16_products(b.seconds)?;
    inference(b)?;
    if !b.vgg_sizes.is_empty() {
        vgg(b)?;
    }
    Ok(())
}

/// One optimizer step (forward, loss, backward, AdamW) at batch 128 with flips and shifts: the
/// two-conv CNN (`train --arch two`) through candle's autograd (stock ops, fmnist's custom
/// ops) and through the training engine, then the six-convolution GELU network (the issue's
/// peer, `scripts/bench_pytorch.py --net six`) through autograd and the engine, then the
/// default recipe's six-convolution ReLU network (`--net six-relu`) through the engine.
fn training_step(b: &BenchKernels) -> Result<()> {
    let dev = Device::Cpu;
    let rows: Vec<usize> = (0..128).map(|i| i % b.data.len()).collect();
    let six = CnnConfig::six([32, 64, 128], crate::engine::Act::Gelu, 0.0);
    let six_relu = CnnConfig::six([32, 64, 128], crate::engine::Act::Relu, 0.0);
    /// How a row's step runs.
    #[derive(Clone, Copy, PartialEq)]
    enum Step {
        /// candle's autograd over its stock NCHW ops (true) or over fmnist's custom ops.
        Autograd(bool),
        /// The training engine, fp32 or with bf16 convolutions on AMX.
        Engine { bf16: bool },
    }
    const ENGINE_FP32: &str = "fmnist training engine, fp32 (train --fp32)";
    const ENGINE_BF16: &str = "fmnist training engine, amx-bf16 (train's default here)";
    /// A network's title, its shape, and its rows: label and step implementation.
    type Rows<'a> = (&'a str, CnnConfig, Vec<(&'a str, Step)>);
    let rows_of: [Rows; 3] = [
        (
            "two-conv CNN 32-96-128 (--arch two)",
            CnnConfig::default(),
            vec![
                (
                    "candle stock conv2d/max_pool2d (NCHW)",
                    Step::Autograd(true),
                ),
                (
                    "fmnist kernels (NHWC im2col+GEMM, fused BN+ReLU, pool)",
                    Step::Autograd(false),
                ),
                (ENGINE_FP32, Step::Engine { bf16: false }),
                (ENGINE_BF16, Step::Engine { bf16: true }),
            ],
        ),
        (
            "six-conv GELU 32/64/128 (--arch six --act gelu)",
            six,
            vec![
                (
                    "candle autograd (fmnist custom ops + GELU)",
                    Step::Autograd(false),
                ),
                (ENGINE_FP32, Step::Engine { bf16: false }),
                (ENGINE_BF16, Step::Engine { bf16: true }),
            ],
        ),
        (
            "six-conv ReLU 32/64/128 (--arch six, the default recipe)",
            six_relu,
            vec![
                (ENGINE_FP32, Step::Engine { bf16: false }),
                (ENGINE_BF16, Step::Engine { bf16: true }),
            ],
        ),
    ];
    for (title, cfg, variants) in rows_of {
        println!("\n[training step] {title}, batch 128 (forward + backward + AdamW)");
        for (label, step) in variants {
            let mut model = Cnn::new(cfg.clone(), &mut loader::rng(1, 1), &dev)?;
            if step == (Step::Engine { bf16: true }) {
                if !Bf16Path::Amx.supported() {
                    println!("  {label:<58} skipped: no AMX on this CPU");
                    continue;
                }
                model = model.with_bf16(Bf16Path::Amx);
            }
            let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
            let mut r = loader::rng(1, 2);
            let mut ws = Workspace::default();
            let times = timed(b.seconds, 3, || {
                let batch = loader::make_batch(
                    b.data,
                    &rows,
                    model.layout(),
                    Augment::FlipShift,
                    &mut r,
                    &dev,
                )?;
                match step {
                    Step::Autograd(stock) => {
                        let logits = model.forward_with(&batch.images, Some(&mut r), stock)?;
                        let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
                        opt.step(model.params(), &loss.backward()?, 1e-3)?;
                    }
                    Step::Engine { .. } => {
                        let (_, grads) = model.cpu_train_step(
                            &batch.images,
                            &batch.labels,
                            0.0,
                            &mut r,
                            &mut ws,
                        )?;
                        opt.step_flat(model.params(), &grads, 1e-3)?;
                    }
                }
                Ok(())
            })?;
            println!(
                "  {label:<58} {:>8.0} img/s",
                per_second(&times, rows.len())
            );
        }
    }
    Ok(())
}

/// The matrix products of the training step, fp32 (the packed AVX-512 kernel the step runs
/// today, or `gemm`) against each bf16 path this CPU has, at the step's shapes, on all
/// threads. bf16 inputs are rounded once outside the timed loop (as packed weights would be);
/// the "+ rounding" figure includes rounding `a` on every call.
fn bf16_products(seconds: f64) -> Result<()> {
    use fmnist::kernels::bf16::{gemm_bf16, Bf16Rows, PackedBf16};
    use fmnist::kernels::{matmul_bias_act, PackedB};
    use rayon::prelude::*;
    println!(
        "\n[matrix products] GFLOP/s, all threads; bf16 path detected: {}",
        Bf16Path::detect().map_or("none (fp32 only)", |p| p.name())
    );
    let shapes = [
        (
            "conv2 forward as GEMM (128·14·14 × 288 × 96)",
            128 * 14 * 14,
            9 * 32,
            96,
        ),
        (
            "conv2 input grad as GEMM (128·14·14 × 864 × 32)",
            128 * 14 * 14,
            9 * 96,
            32,
        ),
        ("fc1 forward (128 × 4704 × 128)", 128, 7 * 7 * 96, 128),
    ];
    let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
    for (label, m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let w: Vec<f32> = (0..k * n).map(|i| value(i + 17)).collect();
        let flops = 2.0 * (m * k * n) as f64;
        let mut c = vec![0f32; m * n];
        println!("  {label}");
        let packed = PackedB::new(w.clone(), k, n);
        let bias = vec![0f32; n];
        const ROWS: usize = 256;
        let times = timed(seconds, 3, || {
            c.par_chunks_mut(ROWS * n).enumerate().for_each(|(t, c)| {
                let rows = c.len() / n;
                matmul_bias_act(
                    &a[t * ROWS * k..][..rows * k],
                    rows,
                    &packed,
                    &bias,
                    false,
                    c,
                );
            });
            Ok(())
        })?;
        let fp32 = per_second(&times, 1) * flops / 1e9;
        println!(
            "    {:<34} {fp32:>8.1}",
            format!("fp32 ({})", packed.kernel_name())
        );
        let pb = PackedBf16::new(&w, k, n);
        let mut pa = Bf16Rows::from_f32(&a, m, k);
        for path in [Bf16Path::Amx, Bf16Path::Avx512Bf16] {
            if !path.supported() {
                println!("    {:<34} {:>8}", path.name(), "n/a on this CPU");
                continue;
            }
            let times = timed(seconds, 3, || {
                gemm_bf16(path, &pa, &pb, &mut c, n, true);
                Ok(())
            })?;
            let bare = per_second(&times, 1) * flops / 1e9;
            let times = timed(seconds, 3, || {
                pa.fill(&a, m, k);
                gemm_bf16(path, &pa, &pb, &mut c, n, true);
                Ok(())
            })?;
            let with = per_second(&times, 1) * flops / 1e9;
            println!(
                "    {:<34} {bare:>8.1}  ({:.2}x fp32; {with:.1} + rounding)",
                path.name(),
                bare / fp32
            );
        }
    }
    Ok(())
}

/// The ONNX model through candle-onnx and through the planned executor.
fn inference(b: &BenchKernels) -> Result<()> {
    println!(
        "\n[inference] {} (preprocessing included)",
        b.model.display()
    );
    for (label, engine) in [
        ("candle-onnx simple_eval", Engine::CandleOnnx),
        ("fmnist planned executor", Engine::Auto),
    ] {
        let m = OnnxModel::load(b.model)?.with_engine(engine);
        if engine == Engine::Auto && !m.engine_description().starts_with("planned") {
            println!("  {label:<30} {}", m.engine_description());
            continue;
        }
        let batch = images(b.data, 64);
        let t64 = timed(b.seconds, 3, || {
            m.logits_for_pixels(&batch)?;
            Ok(())
        })?;
        let one = images(b.data, 1);
        let mut t1 = timed(b.seconds, 20, || {
            m.logits_for_pixels(&one)?;
            Ok(())
        })?;
        println!(
            "  {label:<30} batch 64: {:>8.0} img/s   batch 1: p50 {:>7.1} µs  p99 {:>7.1} µs",
            per_second(&t64, 64),
            percentile(&mut t1, 0.5).as_secs_f64() * 1e6,
            percentile(&mut t1, 0.99).as_secs_f64() * 1e6,
        );
        if let (Engine::Auto, Some(plan)) = (engine, m.plan()) {
            // Where the time goes: each step's share, median of 50 runs, batch 64 and 1.
            for n in [64, 1] {
                let imgs = images(b.data, n);
                let x = fmnist::preprocess::batch_from_pixels(&imgs, m.layout(), &Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let runs: Vec<_> = (0..50).map(|_| plan.profile(&x, n)).collect();
                let mut parts = Vec::new();
                for i in 0..runs[0].len() {
                    let mut t: Vec<Duration> = runs.iter().map(|r| r[i].1).collect();
                    parts.push(format!(
                        "{} {:.0}µs",
                        runs[0][i].0,
                        percentile(&mut t, 0.5).as_secs_f64() * 1e6
                    ));
                }
                println!("    batch {n:>2} steps: {}", parts.join(" | "));
            }
        }
    }
    Ok(())
}

/// VGG16 (deterministic formula weights; speed does not depend on the values) up to fc7:
/// candle's stock NCHW ops, fmnist's candle kernels (the training path), and the exported
/// ONNX graph through the planned executor (the serving path, with a 10-class head).
fn vgg(b: &BenchKernels) -> Result<()> {
    let dev = Device::Cpu;
    for &size in b.vgg_sizes {
        println!("\n[VGG16 {size}x{size}] images/s, batch 8 (resize + replication + normalisation included)");
        let backbone = || {
            Vgg16::from_tensors(
                formula_tensors(VggConfig::VGG16),
                VggConfig::VGG16,
                Path::new("formula weights"),
            )
        };
        let vgg = backbone()?;
        let layout = InputLayout::Rgb { size };
        let batch = images(b.data, 8);
        let x = fmnist::preprocess::batch_from_pixels(&batch, layout, &dev)?;
        let stock = timed(b.seconds, 1, || {
            let n = Vgg16::normalize(&x)?;
            let f = vgg.features_stock(&n)?;
            let pooled = crate::models::vgg::adaptive_avg_pool(&f, 7)?.flatten_from(1)?;
            vgg.fc7(&pooled)?;
            Ok(())
        })?;
        println!(
            "  {:<58} {:>8.2} img/s",
            "candle stock conv2d (NCHW)",
            per_second(&stock, 8)
        );
        let ours = timed(b.seconds, 1, || {
            transfer::backbone_features(&vgg, HeadMode::Last, &x)?;
            Ok(())
        })?;
        println!(
            "  {:<58} {:>8.2} img/s",
            "fmnist candle kernels (NHWC, training path)",
            per_second(&ours, 8)
        );
        let head = Head::new(
            HeadConfig {
                mode: HeadMode::Last,
                hidden: 256,
                dropout: 0.0,
            },
            4096,
            &mut loader::rng(1, 3),
            &dev,
        )?;
        let model = Transfer {
            backbone: backbone()?,
            head,
            input_size: size,
        };
        let spec = GraphSpec {
            name: "vgg16-bench".into(),
            input: layout,
            num_classes: NUM_CLASSES,
            flip_average: false,
            layers: model.export_layers()?,
            metadata: vec![],
        };
        let proto = writer::build_model(&spec)?;
        let onnx = OnnxModel::from_proto(PathBuf::from("vgg16-bench.onnx"), proto, 0)
            .context("planning the VGG16 graph")?;
        drop(model);
        let planned = timed(b.seconds, 1, || {
            onnx.logits_for_pixels(&batch)?;
            Ok(())
        })?;
        println!(
            "  {:<58} {:>8.2} img/s",
            format!("fmnist planned executor ({})", onnx.engine_description()),
            per_second(&planned, 8)
        );
    }
    Ok(())
}
