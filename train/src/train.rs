//! The training loop: epochs of shuffled mini-batches, a validation line per epoch, atomic
//! checkpoints, exact resume, and a clean stop on Ctrl-C.

use crate::data::Dataset;
use crate::loader::{self, Augment};
use crate::models::cnn::{Cnn, CnnConfig};
use crate::models::Classifier;
use crate::optim::{lr_at, AdamW, AdamWConfig, Ema};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use fmnist::OnnxModel;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Set by the Ctrl-C handler; the loop checks it after every batch.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// What `train` uses for the flags a user leaves out, per architecture.
#[derive(Debug, Clone, Copy)]
pub struct ArchDefaults {
    pub epochs: usize,
    pub lr: f64,
    pub label_smoothing: f64,
    pub flip_average: bool,
}

/// The default recipe (`make train`, the shipped model): the six-convolution ReLU network,
/// 20 epochs, twice the two-conv learning rate, label smoothing 0.1, flip averaging in the
/// exported graph. Under 10 minutes on the 2-core Xeon with AMX (BENCHMARKS.md).
pub const SIX_DEFAULTS: ArchDefaults = ArchDefaults {
    epochs: 20,
    lr: 4e-3,
    label_smoothing: 0.1,
    flip_average: true,
};

/// The two-convolution CNN's recipe (the shipped model until 2026-12-08): ≥ 0.93 test
/// accuracy in 5 minutes on the Xeon with AMX (BENCHMARKS.md).
pub const TWO_DEFAULTS: ArchDefaults = ArchDefaults {
    epochs: 24,
    lr: 2e-3,
    label_smoothing: 0.0,
    flip_average: false,
};

/// Everything that determines the trained weights (with the data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub model: String,
    pub cnn: CnnConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    pub augment: Augment,
    /// Share of the target mass spread evenly over all classes (0: plain cross-entropy).
    #[serde(default)]
    pub label_smoothing: f64,
    pub val_fraction: f64,
    pub seed: u64,
    /// Decay of the exponential moving average of the weights that is exported (0: the last
    /// weights are exported). With an average, batch-norm statistics are recomputed for it.
    #[serde(default)]
    pub ema: f64,
    /// The exported graph averages each image's logits with those of its mirror image (flip
    /// test-time averaging; twice the compute per prediction). Validation measures it too.
    #[serde(default)]
    pub flip_average: bool,
}

/// Cross-entropy with optional label smoothing: `(1-ε)·NLL + ε·mean over classes of -log p`.
pub(crate) fn training_loss(
    logits: &Tensor,
    labels: &Tensor,
    smoothing: f64,
) -> candle_core::Result<Tensor> {
    if smoothing <= 0.0 {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    let nll = candle_nn::loss::nll(&logp, labels)?;
    let uniform = logp.mean(candle_core::D::Minus1)?.mean_all()?.neg()?;
    (nll * (1.0 - smoothing))? + (uniform * smoothing)?
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    /// Accuracy on the test set, only when tracking was asked for (benchmarks).
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    pub lr_end: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// What a checkpoint's JSON half records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub recipe: Recipe,
    pub data_sha256: String,
    /// Next epoch to run (0-based) and next batch within it.
    pub epoch: usize,
    pub batch: usize,
    pub step: usize,
    pub history: Vec<EpochSummary>,
    pub elapsed_seconds: f64,
    /// The kernel path the steps so far ran on ([`Cnn::kernel_path`]); empty in checkpoints
    /// written before it was recorded.
    #[serde(default)]
    pub kernel_path: String,
}

/// Paths of the checkpoint pair for an output model path.
pub fn checkpoint_paths(out: &Path) -> (PathBuf, PathBuf) {
    (
        out.with_extension("ckpt.safetensors"),
        out.with_extension("ckpt.json"),
    )
}

/// The model a recipe describes, initialised from the recipe's seed.
pub fn build_model(recipe: &Recipe, device: &Device) -> Result<Cnn> {
    match recipe.model.as_str() {
        "cnn" => Ok(Cnn::new(
            recipe.cnn.clone(),
            &mut loader::rng(recipe.seed, loader::streams::INIT),
            device,
        )?),
        other => bail!("unknown model '{other}' (available: cnn)"),
    }
}

/// Saves named tensors as safetensors through a temporary file and a rename.
pub fn save_tensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    candle_core::safetensors::save(tensors, &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

fn save_checkpoint(
    out: &Path,
    model: &dyn Classifier,
    (opt, ema): (&AdamW, Option<&Ema>),
    state: &CheckpointState,
) -> Result<()> {
    let (st, js) = checkpoint_paths(out);
    let mut tensors = model.params().tensors();
    tensors.extend(opt.state(model.params()));
    if let Some(ema) = ema {
        tensors.extend(ema.state(model.params())?);
    }
    save_tensors_atomic(&st, &tensors)?;
    let json = serde_json::to_vec_pretty(state)?;
    fmnist::onnx::writer::write_atomic(&js, &json)
        .with_context(|| format!("writing {}", js.display()))?;
    Ok(())
}

/// Logits of the model for every image of `data`, in batches, without gradients.
pub fn predict(
    model: &dyn Classifier,
    data: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let rows: Vec<usize> = (0..data.len()).collect();
    let mut r = loader::rng(0, 0);
    let mut out = Vec::new();
    for chunk in rows.chunks(batch) {
        let b = loader::make_batch(data, chunk, model.layout(), Augment::None, &mut r, device)?;
        out.push(model.forward_t(&b.images, None)?.detach());
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Logits of an ONNX model for every image of `data`, `batch` images per run; `bar` counts
/// the images done.
pub fn onnx_logits(
    model: &OnnxModel,
    data: &Dataset,
    batch: usize,
    bar: &ProgressBar,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(data.len());
    let rows: Vec<usize> = (0..data.len()).collect();
    for chunk in rows.chunks(batch.max(1)) {
        let images: Vec<&[u8]> = chunk.iter().map(|&i| data.image(i)).collect();
        out.extend(model.logits_for_pixels(&images)?.to_vec2::<f32>()?);
        bar.inc(chunk.len() as u64);
    }
    Ok(out)
}

/// Mean cross-entropy and accuracy of `model` on `data`. On the CPU this runs the graph the
/// export writes, through the planned executor (the server's runtime) when it covers the
/// graph: it measures what the exported file computes, and for the six-convolution network
/// it is several times faster than the model's candle forward pass, which validation used to
/// take from every epoch. Elsewhere, and for graphs the executor does not plan, the model's
/// own forward pass runs.
fn validate(
    model: &dyn Classifier,
    data: &Dataset,
    device: &Device,
    flip_average: bool,
) -> Result<(f64, f64)> {
    let planned = match device.is_cpu() {
        true => Some(crate::export::in_memory(model, flip_average)?).filter(|m| m.plan().is_some()),
        false => None,
    };
    let logits = match planned {
        Some(onnx) => onnx_logits(&onnx, data, 500, &ProgressBar::hidden())?,
        None => predict(model, data, 1000, device)?.to_vec2::<f32>()?,
    };
    let (mut loss, mut correct) = (0f64, 0usize);
    for (row, &label) in logits.iter().zip(&data.labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        loss += max + sum.ln() - row[label as usize] as f64;
        correct += usize::from(fmnist::onnx::model::argmax(row) == label as usize);
    }
    let n = data.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// Batches [`recalibrate_bn`] runs.
const RECALIBRATION_BATCHES: usize = 100;

/// Recomputes the batch-norm running statistics for the model's current weights (after the
/// weight average replaced them): [`RECALIBRATION_BATCHES`] batches of `rows`, un-augmented
/// (cycled if fewer), through the network in training mode, without updates. The running
/// averages (momentum 0.1) then weigh what came before by 0.9¹⁰⁰ ≈ 3·10⁻⁵. On the CPU the
/// batches go through the training engine's step (its gradients unused), as in training: the
/// same statistics training kept, at the engine's speed rather than candle's.
pub fn recalibrate_bn(
    model: &Cnn,
    data: &Dataset,
    rows: &[usize],
    batch_size: usize,
    device: &Device,
) -> Result<()> {
    let mut r = loader::rng(0, 0);
    let cycled: Vec<usize> = rows
        .iter()
        .copied()
        .cycle()
        .take(RECALIBRATION_BATCHES * batch_size)
        .collect();
    let mut workspace = crate::engine::Workspace::default();
    for chunk in cycled.chunks(batch_size) {
        let b = loader::make_batch(data, chunk, model.layout(), Augment::None, &mut r, device)?;
        if device.is_cpu() {
            model.cpu_train_step(&b.images, &b.labels, 0.0, &mut r, &mut workspace)?;
        } else {
            model.forward_t(&b.images, Some(&mut r))?;
        }
    }
    Ok(())
}

pub struct TrainRun<'a> {
    pub data: &'a Dataset,
    /// A labelled set to measure after every epoch (benchmarks only).
    pub track: Option<&'a Dataset>,
    pub data_sha256: String,
    pub out: PathBuf,
    pub resume: bool,
    /// The bf16 tile path for the engine's convolutions; `None`: fp32.
    pub bf16: Option<fmnist::kernels::bf16::Bf16Path>,
    pub device: Device,
    pub quiet: bool,
}

pub enum Outcome {
    Finished {
        model: Box<Cnn>,
        history: Vec<EpochSummary>,
        seconds: f64,
        /// Validation accuracy of the exported weights when they are the weight average (the
        /// history's last line measured the last weights).
        ema_val_accuracy: Option<f64>,
    },
    Stopped {
        checkpoint: PathBuf,
    },
}

/// Trains according to `recipe`, or continues the checkpoint beside `run.out`.
pub fn train(run: &TrainRun, recipe: Recipe) -> Result<Outcome> {
    let (ckpt_st, ckpt_js) = checkpoint_paths(&run.out);
    let (recipe, mut state, saved) = if run.resume {
        let text = std::fs::read(&ckpt_js).with_context(|| {
            format!(
                "--resume: no checkpoint at {} (nothing to resume)",
                ckpt_js.display()
            )
        })?;
        let state: CheckpointState = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a valid checkpoint", ckpt_js.display()))?;
        if state.data_sha256 != run.data_sha256 {
            bail!(
                "--resume: checkpoint {} was made from different training data (SHA-256 {}, this file {})",
                ckpt_js.display(),
                state.data_sha256,
                run.data_sha256
            );
        }
        if state.recipe != recipe {
            eprintln!(
                "note: resuming with the checkpoint's recipe; training flags given now are ignored"
            );
        }
        let tensors = candle_core::safetensors::load(&ckpt_st, &run.device)
            .with_context(|| format!("reading {}", ckpt_st.display()))?;
        (state.recipe.clone(), state, Some(tensors))
    } else {
        if ckpt_js.exists() {
            bail!(
                "{} holds an interrupted run; pass --resume to continue it, or delete it to start over",
                ckpt_js.display()
            );
        }
        let state = CheckpointState {
            recipe: recipe.clone(),
            data_sha256: run.data_sha256.clone(),
            epoch: 0,
            batch: 0,
            step: 0,
            history: Vec::new(),
            elapsed_seconds: 0.0,
            kernel_path: String::new(),
        };
        (recipe, state, None)
    };
    if recipe.batch_size == 0 || recipe.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    if !(0.0..1.0).contains(&recipe.label_smoothing) {
        bail!(
            "--label-smoothing must be in [0, 1), got {}",
            recipe.label_smoothing
        );
    }
    if !(0.0..1.0).contains(&recipe.ema) {
        bail!("--ema must be in [0, 1), got {}", recipe.ema);
    }
    if !(0.0..1.0).contains(&recipe.val_fraction) {
        bail!(
            "--val-fraction must be in [0, 1), got {}",
            recipe.val_fraction
        );
    }

    let mut model = build_model(&recipe, &run.device)?;
    if let Some(path) = run.bf16 {
        model = model.with_bf16(path);
    }
    let kernels = model.kernel_path(&run.device);
    if !state.kernel_path.is_empty() && state.kernel_path != kernels {
        eprintln!(
            "warning: the checkpoint was trained on the {} kernel path and continues on {}: \
             the weights will not be bit-identical to an uninterrupted run",
            state.kernel_path, kernels
        );
    }
    state.kernel_path = kernels.to_string();
    let mut opt = AdamW::new(
        model.params(),
        AdamWConfig {
            weight_decay: recipe.weight_decay,
            ..Default::default()
        },
    )?;
    let mut ema = if recipe.ema > 0.0 {
        Some(Ema::new(model.params(), recipe.ema)?)
    } else {
        None
    };
    if let Some(t) = &saved {
        model.params().assign(t, &ckpt_st)?;
        opt.restore(model.params(), t, state.step)?;
        if let Some(ema) = &mut ema {
            ema.restore(model.params(), t)?;
        }
    }

    let (train_rows, val_rows) = loader::split(run.data, recipe.val_fraction, recipe.seed);
    if train_rows.is_empty() {
        bail!(
            "no training images left after holding out --val-fraction {}",
            recipe.val_fraction
        );
    }
    let val = run.data.select(&val_rows);
    let batches_per_epoch = train_rows.len().div_ceil(recipe.batch_size);
    let total_steps = batches_per_epoch * recipe.epochs;
    let warmup = ((recipe.warmup_epochs * batches_per_epoch as f64) as usize).min(total_steps / 2);
    if !run.quiet {
        eprintln!(
            "training {} ({} parameters) on {} images, validating on {}; {} epochs of {} batches; device {:?}, kernels {}",
            recipe.model,
            model.params().count(),
            train_rows.len(),
            val_rows.len(),
            recipe.epochs,
            batches_per_epoch,
            run.device,
            kernels
        );
    }
    let mut workspace = crate::engine::Workspace::default();
    let plain_progress = !run.quiet && !std::io::stderr().is_terminal();
    let started = Instant::now();
    let elapsed_before = state.elapsed_seconds;
    while state.epoch < recipe.epochs {
        let epoch = state.epoch;
        let order = loader::epoch_order(&train_rows, recipe.seed, epoch);
        let bar = if run.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(batches_per_epoch as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, recipe.epochs));
        bar.set_position(state.batch as u64);
        let epoch_start = Instant::now();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        let mut lr = 0.0;
        let first = state.batch;
        let stopped = std::thread::scope(|scope| -> Result<bool> {
            // The batches are drawn and augmented on a thread of their own, one or two ahead
            // of the step, so that work overlaps the step's serial parts instead of adding
            // to them. Each batch comes with its random stream, whose rest the step's
            // dropout draws from: the same numbers in the same order as without the thread.
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let (data, order, layout) = (run.data, &order, model.layout());
            let (size, aug, seed) = (recipe.batch_size, recipe.augment, recipe.seed);
            scope.spawn(move || {
                for b in first..batches_per_epoch {
                    let rows = &order[b * size..((b + 1) * size).min(order.len())];
                    // One random stream per batch: a run resumed mid-epoch draws exactly
                    // what an uninterrupted one would.
                    let mut r = loader::rng(
                        seed,
                        loader::streams::EPOCH_BASE + ((epoch as u64) << 32) + b as u64,
                    );
                    let batch = loader::make_batch(data, rows, layout, aug, &mut r, &Device::Cpu);
                    if tx.send((batch, r)).is_err() {
                        return; // the loop stopped early
                    }
                }
            });
            for b in first..batches_per_epoch {
                if STOP.load(Ordering::SeqCst) {
                    bar.abandon();
                    state.batch = b;
                    return Ok(true);
                }
                let (batch, mut r) = rx.recv().context("the batch thread ended early")?;
                let mut batch = batch?;
                if !run.device.is_cpu() {
                    batch.images = batch.images.to_device(&run.device)?;
                    batch.labels = batch.labels.to_device(&run.device)?;
                }
                lr = lr_at(state.step, total_steps, warmup, recipe.lr);
                let l = if run.device.is_cpu() {
                    // The CPU training engine (engine/): same function, same
                    // gradients, several times faster than autograd.
                    let (loss, grads) = model.cpu_train_step(
                        &batch.images,
                        &batch.labels,
                        recipe.label_smoothing as f32,
                        &mut r,
                        &mut workspace,
                    )?;
                    opt.step_flat(model.params(), &grads, lr)?;
                    loss as f64
                } else {
                    let logits = model.forward_t(&batch.images, Some(&mut r))?;
                    let loss = training_loss(&logits, &batch.labels, recipe.label_smoothing)?;
                    let grads = loss.backward()?;
                    opt.step(model.params(), &grads, lr)?;
                    loss.to_scalar::<f32>()? as f64
                };
                state.step += 1;
                if let Some(ema) = &mut ema {
                    ema.update(model.params(), state.step)?;
                }
                if !l.is_finite() {
                    bail!(
                        "loss became {l} at epoch {} batch {b}; lower --lr",
                        epoch + 1
                    );
                }
                loss_sum += l * batch.len as f64;
                seen += batch.len;
                let secs = epoch_start.elapsed().as_secs_f64().max(1e-9);
                let msg = format!(
                    "loss {:.4} {:.0} img/s",
                    loss_sum / seen as f64,
                    seen as f64 / secs
                );
                // Without a terminal (CI, `make train > log`) the bar is hidden: print a plain
                // progress line every ~10 % instead.
                if plain_progress && (b + 1) % (batches_per_epoch / 10).max(1) == 0 {
                    let eta = secs / (b + 1 - first) as f64 * (batches_per_epoch - b - 1) as f64;
                    eprintln!(
                        "  epoch {}/{} batch {}/{batches_per_epoch}: {msg}, ETA {eta:.0}s",
                        epoch + 1,
                        recipe.epochs,
                        b + 1
                    );
                }
                bar.set_message(msg);
                bar.inc(1);
            }
            Ok(false)
        })?;
        if stopped {
            state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
            save_checkpoint(&run.out, &model, (&opt, ema.as_ref()), &state)?;
            return Ok(Outcome::Stopped {
                checkpoint: ckpt_js,
            });
        }
        bar.finish_and_clear();
        let seconds = epoch_start.elapsed().as_secs_f64();
        let (val_loss, val_accuracy) = if val.is_empty() {
            (None, None)
        } else {
            let (l, a) = validate(&model, &val, &run.device, recipe.flip_average)?;
            (Some(l), Some(a))
        };
        let test_accuracy = match run.track {
            Some(t) => Some(validate(&model, t, &run.device, recipe.flip_average)?.1),
            None => None,
        };
        let summary = EpochSummary {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            val_loss,
            val_accuracy,
            test_accuracy,
            lr_end: lr,
            seconds,
            images_per_second: seen as f64 / seconds.max(1e-9),
        };
        if !run.quiet {
            let val_text = match (val_loss, val_accuracy) {
                (Some(l), Some(a)) => format!("val loss {l:.4} val acc {a:.4}"),
                _ => "no validation split".to_string(),
            };
            let val_text = match test_accuracy {
                Some(a) => format!("{val_text}  test acc {a:.4}"),
                None => val_text,
            };
            eprintln!(
                "epoch {}/{}: train loss {:.4}  {}  {:.1}s  {:.0} img/s",
                epoch + 1,
                recipe.epochs,
                summary.train_loss,
                val_text,
                seconds,
                summary.images_per_second
            );
        }
        state.history.push(summary);
        state.epoch += 1;
        state.batch = 0;
        state.elapsed_seconds = elapsed_before + started.elapsed().as_secs_f64();
        save_checkpoint(&run.out, &model, (&opt, ema.as_ref()), &state)?;
    }
    let mut ema_val_accuracy = None;
    if let Some(ema) = &ema {
        ema.assign_to(model.params())?;
        let rows = loader::epoch_order(&train_rows, recipe.seed, recipe.epochs);
        recalibrate_bn(&model, run.data, &rows, recipe.batch_size, &run.device)?;
        if !val.is_empty() {
            let (l, a) = validate(&model, &val, &run.device, recipe.flip_average)?;
            ema_val_accuracy = Some(a);
            if !run.quiet {
                eprintln!(
                    "weight average (decay {}), batch-norm statistics recomputed: val loss {l:.4} val acc {a:.4}",
                    recipe.ema
                );
            }
        }
    }
    Ok(Outcome::Finished {
        model: Box::new(model),
        history: state.history,
        seconds: elapsed_before + started.elapsed().as_secs_f64(),
        ema_val_accuracy,
    })
}
