//! `fmnist-train`: convert data, train, evaluate and export Fashion-MNIST classifiers.

#[macro_use]
mod wide;

mod bench;
mod data;
mod engine;
mod export;
mod features;
mod loader;
mod metrics;
mod models;
mod optim;
mod report;
mod train;
mod transfer;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use fmnist::onnx::model::argmax;
use fmnist::OnnxModel;
use models::cnn::CnnConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

// Training allocates and frees many large tensors every step; mimalloc reuses them far better
// than glibc malloc (about 20 % of a step's time otherwise goes to page faults).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "fmnist-train",
    version,
    about = "Train, evaluate and export Fashion-MNIST classifiers with candle.",
    long_about = "Train, evaluate and export Fashion-MNIST classifiers with candle.\n\n\
        Data can be the Kaggle CSV layout (label,pixel1..pixel784; header optional) or the \
        official IDX files (*-images-idx3-ubyte[.gz], with the labels file beside it).\n\n\
        Typical use:\n  \
        fmnist-train convert --images train-images-idx3-ubyte.gz --out data/fashion-mnist_train.csv\n  \
        fmnist-train train --data data/fashion-mnist_train.csv --test data/fashion-mnist_test.csv\n  \
        fmnist-train train --model vgg16 --weights vgg16.safetensors --input-size 64\n  \
        fmnist-train eval --model weights/fmnist-cnn.onnx --data data/fashion-mnist_test.csv"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and write it as ONNX (+ .safetensors and .json beside it).
    Train(Box<TrainArgs>),
    /// Evaluate an ONNX model or a safetensors checkpoint on a labelled data file.
    Eval(EvalArgs),
    /// Classify image files (photos, drawings): the class and all ten probabilities per file.
    Predict(PredictArgs),
    /// Write an IDX images/labels pair as a Kaggle-layout CSV file.
    Convert(ConvertArgs),
    /// Measure VGG16 feature extraction (images/s per input size) and head-training time.
    BenchVgg(BenchVggArgs),
    /// Compare candle's stock paths with fmnist's kernels in one run: the training step of the
    /// CNN recipes, inference at batch 64 and batch 1 (candle-onnx vs the planned
    /// executor), and VGG16 feature extraction.
    BenchKernels(BenchKernelsArgs),
}

#[derive(Args)]
struct BenchKernelsArgs {
    /// ONNX model for the inference rows.
    #[arg(long, default_value = "weights/fmnist-cnn.onnx")]
    model: PathBuf,
    /// Images the benchmarks feed (cycled).
    #[arg(long, default_value = "fixtures/sample.csv")]
    data: PathBuf,
    /// Minimum seconds measured per row (after a warm-up call).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// VGG16 input sizes to time; give none (`--vgg-sizes`) to skip VGG16.
    #[arg(long, default_values_t = [224, 64], num_args = 0..)]
    vgg_sizes: Vec<usize>,
    /// Leave out the training-step rows.
    #[arg(long)]
    skip_training: bool,
}

#[derive(Args)]
struct BenchVggArgs {
    /// VGG16 safetensors to time; without it, deterministic formula weights of the same
    /// shapes are used (speed does not depend on the values).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images fed through the backbone.
    #[arg(long, default_value = "fixtures/sample.csv")]
    data: PathBuf,
    /// Input sizes to time.
    #[arg(long, default_values_t = [224, 64], num_args = 1..)]
    sizes: Vec<usize>,
    /// Images timed per size (after one warm-up batch).
    #[arg(long, default_value_t = 64)]
    images: usize,
    /// Images per backbone forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Head training is timed on this many rows of synthetic cached features (the full
    /// training set is 60,000).
    #[arg(long, default_value_t = 60_000)]
    head_rows: usize,
    /// Epochs of head training timed, per head.
    #[arg(long, default_value_t = 2)]
    head_epochs: usize,
}

/// `train --convs`: the parsed list.
#[derive(Debug, Clone)]
struct ConvList(Vec<models::cnn::ConvSpec>);

fn parse_convs(text: &str) -> std::result::Result<ConvList, String> {
    let specs = text
        .split(',')
        .map(|item| {
            let item = item.trim();
            let (width, pool) = match item.strip_suffix('p') {
                Some(w) => (w, true),
                None => (item, false),
            };
            match width.parse::<usize>() {
                Ok(width) if width > 0 => Ok(models::cnn::ConvSpec { width, pool }),
                _ => Err(format!(
                    "'{item}' is not a convolution: a width of at least 1, optionally followed by 'p' (pool), e.g. 32p,64,64p"
                )),
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(ConvList(specs))
}

/// The CNN architectures `train --arch` offers (see `models/cnn.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Arch {
    Two,
    Six,
}

#[derive(Args)]
struct TrainArgs {
    /// Training data (CSV or IDX images file).
    #[arg(long, default_value = "data/fashion-mnist_train.csv")]
    data: PathBuf,
    /// Test data evaluated once training ends (through the exported ONNX file); the
    /// metrics go into the .json written beside the model.
    #[arg(long)]
    test: Option<PathBuf>,
    /// Where to write the ONNX model [default: weights/fmnist-cnn.onnx, or
    /// weights/fmnist-vgg16.onnx for --model vgg16]. The .safetensors weights and .json
    /// summary go beside it, and so does the checkpoint (.ckpt.*) while a CNN trains.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model: 'cnn' (trained from scratch; the default and the shipped model) or 'vgg16'
    /// (transfer learning: ImageNet-pretrained VGG16 from --weights, frozen; only a new head
    /// is trained, on backbone features cached in --cache-dir).
    #[arg(long, default_value = "cnn", value_parser = ["cnn", "vgg16"])]
    model: String,
    /// vgg16: ImageNet-pretrained VGG16 safetensors, torchvision layout (features.N.*,
    /// classifier.{0,3,6}.*) or timm's vgg16.tv_in1k (pre_logits.fc1/fc2, head.fc).
    /// `make vgg16-weights` downloads timm's file.
    #[arg(long, required_if_eq("model", "vgg16"))]
    weights: Option<PathBuf>,
    /// vgg16: 'last' trains a new 4096→10 layer on the frozen fc6/fc7 (the seed's recipe);
    /// 'mlp' trains a small MLP on average-pooled convolutional features (works with weight
    /// files that have no classifier).
    #[arg(long, value_enum, default_value_t = transfer::HeadMode::Last)]
    head: transfer::HeadMode,
    /// vgg16: side the 28×28 images are resized to (bilinear, as PyTorch). 224 is VGG16's
    /// native size and costs ~10× more per image than 64 (BENCHMARKS.md); 32 is the smallest
    /// possible.
    #[arg(long, default_value_t = 224)]
    input_size: usize,
    /// vgg16 with --head mlp: hidden width of the MLP.
    #[arg(long, default_value_t = 256)]
    head_hidden: usize,
    /// vgg16: folder of the backbone feature caches (keyed by weights, input size, head and
    /// data; a cache that does not match is rebuilt; an interrupted extraction resumes).
    #[arg(long, default_value = "data/vgg-cache")]
    cache_dir: PathBuf,
    /// vgg16: images per backbone forward pass during feature extraction.
    #[arg(long, default_value_t = 16)]
    extract_batch: usize,
    /// Passes over the training data [default: 20 for --arch six, 24 for --arch two, 18 for
    /// vgg16].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per optimisation step.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (AdamW; linear warm-up, then cosine decay to zero) [default: 4e-3 for
    /// --arch six, 2e-3 for --arch two and vgg16].
    #[arg(long)]
    lr: Option<f64>,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Length of the learning-rate warm-up, in epochs.
    #[arg(long, default_value_t = 0.5)]
    warmup_epochs: f64,
    /// Training-time augmentation (cnn; vgg16 trains on cached features of the plain images).
    #[arg(long, value_enum, default_value_t = loader::Augment::FlipShift)]
    augment: loader::Augment,
    /// Label smoothing: share of each target spread evenly over the ten classes [default: 0.1
    /// for --arch six, 0 for --arch two].
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// cnn: export an exponential moving average of the weights with this decay (e.g. 0.999)
    /// instead of the last weights; batch-norm statistics are then recomputed for it on 100
    /// training batches. 0: off.
    #[arg(long, default_value_t = 0.0)]
    ema: f64,
    /// cnn: export a graph that scores each image by the mean of its logits and those of its
    /// mirror image (flip test-time averaging, written in plain ONNX operators that the
    /// planned executor and onnxruntime run). Twice the compute per prediction; validation
    /// and --test measure the averaged scores. The default for --arch six.
    #[arg(long, overrides_with = "no_flip_average")]
    flip_average: bool,
    /// cnn: export a single-pass graph (half the serving cost of --flip-average); the default
    /// for --arch two.
    #[arg(long, overrides_with = "flip_average")]
    no_flip_average: bool,
    /// Share of the training file held out (stratified) for the per-epoch validation line.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Seed for the split, shuffling, augmentation, dropout and initial weights: the same
    /// seed and data give the same weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// cnn: the network. 'six' (the default, the shipped model): three blocks of two
    /// convolutions with batch-norm and ReLU (--six-widths), max-pool after the first two
    /// blocks, global average pooling, one output layer. 'two' (the shipped model until
    /// 2026-12-08): two pooled ReLU convolutions (--cnn-sizes), a hidden layer, dropout; about
    /// a fifth of the arithmetic of 'six' per image, and 1.1 points less accurate
    /// (BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = Arch::Six)]
    arch: Arch,
    /// --arch two: width of the first and second convolution and of the hidden layer.
    #[arg(long, default_values_t = [32, 96, 128], num_args = 3, value_names = ["C1", "C2", "HIDDEN"])]
    cnn_sizes: Vec<usize>,
    /// --arch six: width of the convolutions of each of the three blocks.
    #[arg(long, default_values_t = [32, 64, 128], num_args = 3, value_names = ["W1", "W2", "W3"])]
    six_widths: Vec<usize>,
    /// cnn: the convolutions, replacing --arch's (its head stays): widths separated by
    /// commas, a 'p' after a width adds a 2×2 max-pool after that convolution. '32p,96p' is
    /// --arch two's default; '32p,64,64p' adds a convolution at 14×14.
    #[arg(long, value_parser = parse_convs, value_name = "SPEC")]
    convs: Option<ConvList>,
    /// cnn: the activation after each batch-norm ('gelu' costs a quarter more training time
    /// than 'relu' on the six-conv network for no measured gain) [default: relu].
    #[arg(long, value_enum)]
    act: Option<engine::Act>,
    /// Dropout before the output layer [default: 0.1 for --arch two, 0 for six, 0.3 for the
    /// vgg16 head].
    #[arg(long)]
    dropout: Option<f32>,
    /// Continue the interrupted run whose checkpoint sits beside --out.
    #[arg(long)]
    resume: bool,
    /// Use only the first N images of --data (quick experiments).
    #[arg(long)]
    limit: Option<usize>,
    /// Train on the CPU even when built with CUDA and a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Keep every convolution in fp32. By default, on a CPU with AMX, the convolutions whose
    /// input and output channels are multiples of 32 run as bf16 tile products (fp32 master
    /// weights, fp32 sums, fp32 everywhere else); CPUs without AMX (AMD Zen 4 included) train
    /// in fp32 either way. The kernel path is logged and recorded as `cpu_path` in the .json.
    #[arg(long)]
    fp32: bool,
    /// Also measure accuracy on --test after every epoch (for time-to-accuracy benchmarks;
    /// never used to choose anything).
    #[arg(long, requires = "test")]
    track_test: bool,
    /// No progress bars or per-epoch lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// An ONNX model, or a .safetensors checkpoint (its recipe is read from the .json beside it).
    #[arg(long)]
    model: PathBuf,
    /// Labelled data (CSV or IDX images file).
    #[arg(long, default_value = "data/fashion-mnist_test.csv")]
    data: PathBuf,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write a visual report into this directory (created if missing): index.html with
    /// the confusion matrix as heatmaps (counts and per cent), per-class precision/recall/F1
    /// bars, the 30 most confident mistakes, and the training curves when the model's .json
    /// has a history. PNG and SVG pictures; the numbers are the same as --json's.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Fail (exit 1) when accuracy is below this value.
    #[arg(long)]
    min_accuracy: Option<f64>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Write every image's logits as JSON (`{"logits": [[10 floats], ...]}`), for comparing
    /// runtimes.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Which runtime runs an ONNX model: 'auto' (fmnist's planned executor where the graph
    /// allows it, as the server does) or 'candle-onnx' (candle-onnx's interpreter, the
    /// reference the executor is tested against).
    #[arg(long, value_enum, default_value_t = fmnist::server::config::EngineChoice::Auto)]
    engine: fmnist::server::config::EngineChoice,
    /// Flip test-time averaging: score each image by the mean of its logits and those of its
    /// mirror image (twice the compute). A measurement of what averaging would give a
    /// single-pass model; a file trained with it (the default recipe's) averages already,
    /// and so does evaluating its .safetensors checkpoint.
    #[arg(long)]
    flip_average: bool,
}

#[derive(Args)]
#[command(long_about = "Classify image files with an ONNX model.\n\n\
    Each file (PNG, JPEG, WebP, GIF or BMP, recognised by its content) goes through the same \
    conversion the server applies to uploads: EXIF orientation, gray with transparency on \
    white, inverted when the background is light, trimmed, resized to 28 px on its longest \
    edge, sharpened and centred (see the fmnist::photo documentation). Prints one line per \
    file: the class, its probability and all ten probabilities; --json prints one JSON object \
    per line instead. A file that cannot be read or decoded is reported by name and the others \
    are still classified; the exit status is 1 if any failed.\n\n\
    Example:\n  fmnist-train predict --model weights/fmnist-cnn.onnx shoe.jpg shirt.png")]
struct PredictArgs {
    /// The ONNX model.
    #[arg(long, default_value = "weights/fmnist-cnn.onnx")]
    model: PathBuf,
    /// One JSON object per file (file, label, class, probabilities) instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the 28x28 picture the model saw beside each input, as FILE.seen.png.
    #[arg(long)]
    save_seen: bool,
    /// Image files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct ConvertArgs {
    /// IDX images file (gzipped or not).
    #[arg(long)]
    images: PathBuf,
    /// IDX labels file; by default the official name beside --images.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// CSV file to write.
    #[arg(long)]
    out: PathBuf,
}

fn device(force_cpu: bool) -> Result<Device> {
    if force_cpu {
        return Ok(Device::Cpu);
    }
    Ok(Device::cuda_if_available(0)?)
}

fn load_data(path: &Path, limit: Option<usize>) -> Result<data::Dataset> {
    let d = data::load(path)?;
    Ok(match limit {
        Some(n) if n < d.len() => d.select(&(0..n).collect::<Vec<_>>()),
        _ => d,
    })
}

/// Every image's logits from an ONNX model, with a progress bar on a terminal (indicatif
/// draws nothing when stderr is not one, so logs and CI stay clean).
fn onnx_logits(model: &OnnxModel, d: &data::Dataset, batch: usize) -> Result<Vec<Vec<f32>>> {
    let bar = indicatif::ProgressBar::new(d.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} images ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let out = train::onnx_logits(model, d, batch, &bar);
    bar.finish_and_clear();
    out
}

fn predictions(logits: &[Vec<f32>]) -> Vec<u8> {
    logits.iter().map(|row| argmax(row) as u8).collect()
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    if a.model == "vgg16" {
        return cmd_train_vgg(a);
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("weights/fmnist-cnn.onnx"));
    let dev = device(a.cpu)?;
    let started = Instant::now();
    let d = load_data(&a.data, a.limit)?;
    let data_sha =
        data::sha256_file(&a.data).with_context(|| format!("hashing {}", a.data.display()))?;
    let test = match &a.test {
        Some(p) => Some(load_data(p, None)?),
        None => None,
    };
    let defaults = match a.arch {
        Arch::Six => train::SIX_DEFAULTS,
        Arch::Two => train::TWO_DEFAULTS,
    };
    let mut recipe = train::Recipe {
        model: a.model.clone(),
        cnn: match a.arch {
            Arch::Two => {
                let s = &a.cnn_sizes;
                let mut c = CnnConfig::two_conv(s[0], s[1], s[2], a.dropout.unwrap_or(0.1));
                c.act = a.act.unwrap_or(engine::Act::Relu);
                c
            }
            Arch::Six => {
                let w = &a.six_widths;
                CnnConfig::six(
                    [w[0], w[1], w[2]],
                    a.act.unwrap_or(engine::Act::Relu),
                    a.dropout.unwrap_or(0.0),
                )
            }
        },
        epochs: a.epochs.unwrap_or(defaults.epochs),
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or(defaults.lr),
        weight_decay: a.weight_decay,
        warmup_epochs: a.warmup_epochs,
        augment: a.augment,
        label_smoothing: a.label_smoothing.unwrap_or(defaults.label_smoothing),
        ema: a.ema,
        flip_average: match (a.flip_average, a.no_flip_average) {
            (true, _) => true,
            (_, true) => false,
            _ => defaults.flip_average,
        },
        val_fraction: a.val_fraction,
        seed: a.seed,
    };
    if let Some(ConvList(convs)) = &a.convs {
        recipe.cnn.convs = convs.clone();
    }
    let dev_used = dev.clone();
    let run = train::TrainRun {
        data: &d,
        track: if a.track_test { test.as_ref() } else { None },
        data_sha256: data_sha.clone(),
        out: out.clone(),
        resume: a.resume,
        bf16: if a.fp32 || !dev.is_cpu() {
            None
        } else {
            engine::bf16_path()
        },
        device: dev,
        quiet: a.quiet,
    };
    let (model, history, seconds, ema_val_accuracy) = match train::train(&run, recipe)? {
        train::Outcome::Stopped { checkpoint } => {
            eprintln!(
                "stopped; progress saved in {}. Run the same command with --resume to continue.",
                checkpoint.display()
            );
            std::process::exit(130);
        }
        train::Outcome::Finished {
            model,
            history,
            seconds,
            ema_val_accuracy,
        } => (model, history, seconds, ema_val_accuracy),
    };
    let (ckpt_st, ckpt_js) = train::checkpoint_paths(&out);
    let state: train::CheckpointState = serde_json::from_slice(&std::fs::read(&ckpt_js)?)?;
    // Nothing that varies between runs (times) goes into the model file: the same seed, data
    // and kernel path give the same file, SHA-256 included. The .json keeps the times.
    let summary = serde_json::json!({
        "recipe": state.recipe,
        "train_data_sha256": data_sha,
        "train_images": d.len(),
        // Of the weights the file holds: the average's when there is one.
        "final_val_accuracy": ema_val_accuracy.or(history.last().and_then(|h| h.val_accuracy)),
    });
    export::export(
        model.as_ref(),
        &out,
        vec![("training".to_string(), summary.to_string())],
        state.recipe.flip_average,
    )?;
    let test_report = match (&test, &a.test) {
        (Some(t), Some(path)) => {
            let onnx = OnnxModel::load(&out)?;
            let preds = predictions(&onnx_logits(&onnx, t, 500)?);
            let r = metrics::Report::new(&t.labels, &preds);
            eprintln!(
                "test accuracy {:.4} on {} images ({})",
                r.accuracy,
                t.len(),
                path.display()
            );
            Some((r, data::sha256_file(path)?))
        }
        _ => None,
    };
    let model_sha = data::sha256_file(&out)?;
    let info = serde_json::json!({
        "model_file": out.file_name().map(|f| f.to_string_lossy().to_string()),
        "model_sha256": model_sha,
        "created_by": format!("fmnist-train {}", env!("CARGO_PKG_VERSION")),
        "recipe": state.recipe,
        "seed": state.recipe.seed,
        "cpu_path": model.kernel_path(&dev_used),
        "train_data": { "file": a.data, "sha256": data_sha, "images": d.len() },
        "test_data": test_report.as_ref().map(|(_, sha)| serde_json::json!({
            "file": a.test, "sha256": sha, "images": test.as_ref().map(|t| t.len()) })),
        "test_metrics": test_report.as_ref().map(|(r, _)| r),
        "training_seconds": seconds,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "epochs": history,
    });
    let js = out.with_extension("json");
    fmnist::onnx::writer::write_atomic(&js, &serde_json::to_vec_pretty(&info)?)?;
    // The run is complete and exported: the checkpoint has served its purpose.
    let _ = std::fs::remove_file(&ckpt_st);
    let _ = std::fs::remove_file(&ckpt_js);
    eprintln!(
        "wrote {} (+ .safetensors, .json) in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `train --model vgg16`: features through the frozen backbone (cached), then the head.
fn cmd_train_vgg(a: TrainArgs) -> Result<()> {
    use transfer::HeadMode;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("weights/fmnist-vgg16.onnx"));
    let weights = a
        .weights
        .clone()
        .context("--model vgg16 needs --weights FILE")?;
    if a.input_size < models::vgg::MIN_INPUT {
        bail!(
            "--input-size {} is too small: VGG16 needs at least {}",
            a.input_size,
            models::vgg::MIN_INPUT
        );
    }
    let dev = device(a.cpu)?;
    let started = Instant::now();
    let d = load_data(&a.data, a.limit)?;
    let data_sha =
        data::sha256_file(&a.data).with_context(|| format!("hashing {}", a.data.display()))?;
    let vgg = models::vgg::Vgg16::load(&weights, &dev)?;
    if a.head == HeadMode::Last && vgg.classifier.is_none() {
        bail!(
            "{} has no classifier (fc6/fc7), which --head last keeps frozen; use --head mlp",
            weights.display()
        );
    }
    let weights_sha = transfer::file_sha256(&weights)?;
    if !a.quiet {
        eprintln!(
            "VGG16 from {} ({} layout), input {}x{}, head {:?}; device {:?}",
            weights.display(),
            vgg.layout,
            a.input_size,
            a.input_size,
            a.head,
            dev
        );
    }
    let features_of = |data: &data::Dataset, file: &Path, sha: &str| {
        transfer::cached_features(
            &vgg,
            a.head,
            a.input_size,
            &weights_sha,
            data,
            file,
            sha,
            &a.cache_dir,
            a.extract_batch,
            a.quiet,
        )
    };
    let feats = features_of(&d, &a.data, &data_sha).map_err(stopped_exits)?;
    let recipe = transfer::HeadRecipe {
        head: transfer::HeadConfig {
            mode: a.head,
            hidden: a.head_hidden,
            dropout: a.dropout.unwrap_or(transfer::HEAD_DROPOUT),
        },
        input_size: a.input_size,
        epochs: a.epochs.unwrap_or(transfer::HEAD_EPOCHS),
        batch_size: a.batch_size,
        lr: a.lr.unwrap_or(transfer::HEAD_LR),
        weight_decay: a.weight_decay,
        val_fraction: a.val_fraction,
        seed: a.seed,
    };
    let head_started = Instant::now();
    let (head, history) = transfer::train_head(&feats, &d, &recipe, &dev, a.quiet)?;
    let head_seconds = head_started.elapsed().as_secs_f64();
    let test_report = match &a.test {
        Some(path) => {
            let t = load_data(path, None)?;
            let sha = data::sha256_file(path)?;
            let tf = features_of(&t, path, &sha).map_err(stopped_exits)?;
            let rows: Vec<usize> = (0..t.len()).collect();
            let preds = transfer::head_predictions(&head, &tf, &rows, &dev)?;
            let r = metrics::Report::new(&t.labels, &preds);
            eprintln!(
                "test accuracy {:.4} on {} images ({})",
                r.accuracy,
                t.len(),
                path.display()
            );
            Some((r, sha, t.len()))
        }
        None => None,
    };
    let summary = serde_json::json!({
        "recipe": { "model": "vgg16", "head": recipe },
        "weights_sha256": weights_sha,
        "train_data_sha256": data_sha,
        "train_images": d.len(),
        "head_training_seconds": head_seconds,
    });
    let model = transfer::Transfer {
        backbone: vgg,
        head,
        input_size: a.input_size,
    };
    export::export(
        &model,
        &out,
        vec![("training".to_string(), summary.to_string())],
        false,
    )?;
    let info = serde_json::json!({
        "model_file": out.file_name().map(|f| f.to_string_lossy().to_string()),
        "model_sha256": data::sha256_file(&out)?,
        "created_by": format!("fmnist-train {}", env!("CARGO_PKG_VERSION")),
        "recipe": { "model": "vgg16", "head": recipe },
        "safetensors": "the trained head only; the backbone is the weights file below, unchanged",
        "backbone": { "file": weights, "sha256": weights_sha, "layout": model.backbone.layout },
        "seed": a.seed,
        "train_data": { "file": a.data, "sha256": data_sha, "images": d.len() },
        "test_data": test_report.as_ref().map(|(_, sha, n)| serde_json::json!({
            "file": a.test, "sha256": sha, "images": n })),
        "test_metrics": test_report.as_ref().map(|(r, _, _)| r),
        "head_training_seconds": head_seconds,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "epochs": history,
    });
    fmnist::onnx::writer::write_atomic(
        &out.with_extension("json"),
        &serde_json::to_vec_pretty(&info)?,
    )?;
    eprintln!(
        "wrote {} (+ .safetensors with the head, .json) in {:.0}s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn print_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.context("writing to standard output")?),
    }
}

/// Ctrl-C during feature extraction: say where the work is kept and exit 130.
fn stopped_exits(e: anyhow::Error) -> anyhow::Error {
    if let Some(stop) = e.downcast_ref::<features::Interrupted>() {
        eprintln!("{stop}. Run the same command again to resume.");
        std::process::exit(130);
    }
    e
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    use fmnist::photo::{photo_pixels, DEFAULT_LIMITS};
    let model = OnnxModel::load(&a.model)?;
    let mut failed = 0;
    for file in &a.files {
        let pixels = std::fs::read(file)
            .with_context(|| format!("cannot read {}", file.display()))
            .and_then(|bytes| {
                photo_pixels(&bytes, DEFAULT_LIMITS)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
            });
        let pixels = match pixels {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
                continue;
            }
        };
        if a.save_seen {
            let seen = file.with_extension(format!(
                "{}.seen.png",
                file.extension()
                    .map(|e| e.to_string_lossy())
                    .unwrap_or_default()
            ));
            image::GrayImage::from_raw(28, 28, pixels.clone())
                .context("28x28 picture")?
                .save(&seen)
                .with_context(|| format!("cannot write {}", seen.display()))?;
        }
        let logits = model
            .logits_for_pixels(&[&pixels])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let probs = fmnist::onnx::model::softmax_rows(&logits, fmnist::NUM_CLASSES);
        let label = argmax(&probs);
        if a.json {
            let by_class: serde_json::Map<String, serde_json::Value> = fmnist::CLASS_NAMES
                .iter()
                .zip(&probs)
                .map(|(c, p)| (c.to_string(), serde_json::json!(p)))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "file": file.display().to_string(),
                    "label": label,
                    "class": fmnist::CLASS_NAMES[label],
                    "probabilities": by_class,
                })
            );
        } else {
            let all: Vec<String> = fmnist::CLASS_NAMES
                .iter()
                .zip(&probs)
                .map(|(c, p)| format!("{c} {p:.3}"))
                .collect();
            println!(
                "{}: {} ({:.1} %)  [{}]",
                file.display(),
                fmnist::CLASS_NAMES[label],
                probs[label] * 100.0,
                all.join(", ")
            );
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} files could not be classified",
            a.files.len()
        );
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let d = load_data(&a.data, None)?;
    let ext = a
        .model
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase());
    // Which runtime computed the logits, so that a check against another runtime says
    // what it checked (the planned executor, or candle-onnx and why).
    let mut engine = String::from("candle (the training graph)");
    let mut onnx = None;
    let mut candle = None;
    // A checkpoint whose export averages over the mirror image is scored the same way, so
    // that its figures are the exported file's.
    let mut recipe_flips = false;
    match ext.as_deref() {
        Some("onnx") => {
            let m = OnnxModel::load(&a.model)?.with_engine(a.engine.into());
            engine = m.engine_description();
            onnx = Some(m);
        }
        Some("safetensors") => {
            let js = a.model.with_extension("json");
            let info: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&js)
                    .with_context(|| format!("reading the recipe in {}", js.display()))?,
            )
            .with_context(|| format!("{} is not valid JSON", js.display()))?;
            if info["recipe"]["model"] == "vgg16" {
                bail!(
                    "{} holds only a VGG16 transfer model's head; evaluate its .onnx file",
                    a.model.display()
                );
            }
            let recipe: train::Recipe = serde_json::from_value(info["recipe"].clone())
                .with_context(|| format!("{} has no usable 'recipe'", js.display()))?;
            let dev = Device::Cpu;
            let model = train::build_model(&recipe, &dev)?;
            let tensors = candle_core::safetensors::load(&a.model, &dev)
                .with_context(|| format!("reading {}", a.model.display()))?;
            models::Classifier::params(&model).assign(&tensors, &a.model)?;
            recipe_flips = recipe.flip_average;
            candle = Some(model);
        }
        _ => bail!(
            "{}: expected an .onnx model or a .safetensors checkpoint",
            a.model.display()
        ),
    };
    let run = |d: &data::Dataset| -> Result<Vec<Vec<f32>>> {
        match (&onnx, &candle) {
            (Some(m), _) => onnx_logits(m, d, a.batch_size),
            (_, Some(model)) => Ok(
                train::predict(model, d, a.batch_size.max(1), &Device::Cpu)?.to_vec2::<f32>()?
            ),
            _ => unreachable!("one of the two was loaded above"),
        }
    };
    let mut logits = run(&d)?;
    if a.flip_average || recipe_flips {
        for (l, f) in logits.iter_mut().zip(run(&d.mirrored())?) {
            l.iter_mut().zip(f).for_each(|(x, y)| *x = 0.5 * (*x + y));
        }
        engine.push_str(if recipe_flips {
            ", flip-averaged as its export"
        } else {
            ", flip-averaged"
        });
    }
    if let Some(p) = &a.logits_out {
        let json = serde_json::to_vec(&serde_json::json!({ "logits": logits }))?;
        fmnist::onnx::writer::write_atomic(p, &json)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let report = metrics::Report::new(&d.labels, &predictions(&logits));
    print_stdout(&format!(
        "model  {}\nengine {engine}\ndata   {}\n\n{}",
        a.model.display(),
        a.data.display(),
        report.table()
    ))?;
    if let Some(j) = &a.json {
        fmnist::onnx::writer::write_atomic(j, &serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", j.display()))?;
    }
    if let Some(dir) = &a.report {
        let history = training_history(&a.model)?;
        let source = report::Source {
            model: &a.model,
            data: &a.data,
        };
        let index = report::write(dir, &source, &report, &d, &logits, &history)?;
        eprintln!("report: {}", index.display());
    }
    if let Some(min) = a.min_accuracy {
        if report.accuracy < min {
            bail!(
                "accuracy {:.4} is below the required {min}",
                report.accuracy
            );
        }
    }
    Ok(())
}

/// The per-epoch history in the `.json` beside a model: empty when there is no such file or
/// it has no `epochs` (an exported or converted model); an unreadable one is an error.
fn training_history(model: &Path) -> Result<Vec<train::EpochSummary>> {
    let js = model.with_extension("json");
    let bytes = match std::fs::read(&js) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", js.display())),
    };
    let info: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not valid JSON", js.display()))?;
    match info.get("epochs") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(e) => serde_json::from_value(e.clone())
            .with_context(|| format!("{}: 'epochs' is not a training history", js.display())),
    }
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let d = match &a.labels {
        Some(l) => data::read_idx(&a.images, l)?,
        None => data::load(&a.images)?,
    };
    data::write_csv(&a.out, &d)?;
    eprintln!("wrote {} images to {}", d.len(), a.out.display());
    Ok(())
}

fn cmd_bench_vgg(a: BenchVggArgs) -> Result<()> {
    use models::vgg::{formula_tensors, Vgg16, VggConfig};
    use transfer::HeadMode;
    let dev = Device::Cpu;
    let threads = candle_core::utils::get_num_threads();
    let vgg = match &a.weights {
        Some(w) => Vgg16::load(w, &dev)?,
        None => Vgg16::from_tensors(
            formula_tensors(VggConfig::VGG16),
            VggConfig::VGG16,
            Path::new("formula weights"),
        )?,
    };
    let source = a
        .weights
        .as_ref()
        .map_or("formula weights".to_string(), |w| w.display().to_string());
    println!(
        "VGG16 ({source}), CPU, {threads} threads, batch {}",
        a.batch
    );
    let d = load_data(&a.data, None)?;
    anyhow::ensure!(!d.is_empty(), "{} has no images", a.data.display());
    let rows: Vec<usize> = (0..a.images.max(1)).map(|i| i % d.len()).collect();
    for &size in &a.sizes {
        let layout = fmnist::InputLayout::Rgb { size };
        // What `train --model vgg16` runs: the planned executor where it applies.
        let plan = transfer::backbone_plan(&vgg, HeadMode::Last, size);
        let run = |chunk: &[usize]| -> Result<()> {
            let images: Vec<&[u8]> = chunk.iter().map(|&i| d.image(i)).collect();
            let x = fmnist::preprocess::batch_from_pixels(&images, layout, &dev)?;
            match &plan {
                Some(p) => {
                    p.run(&models::flat(&x)?, images.len())?;
                }
                None => {
                    transfer::backbone_features(&vgg, HeadMode::Last, &x)?;
                }
            }
            Ok(())
        };
        run(&rows[..a.batch.min(rows.len())])?; // warm-up
        let started = Instant::now();
        for chunk in rows.chunks(a.batch.max(1)) {
            run(chunk)?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "features {size:>3}x{size:<3} {:>8.1} img/s  {:>8.1} ms/img  ({} images, preprocessing + 13 convs + fc6/fc7, {})",
            rows.len() as f64 / secs,
            secs * 1000.0 / rows.len() as f64,
            rows.len(),
            if plan.is_some() { "planned executor" } else { "candle" }
        );
    }
    // Head training reads cached features and the labels only (never the images); its cost
    // depends only on the features' shape.
    let labels = data::Dataset {
        labels: (0..a.head_rows).map(|i| (i % 10) as u8).collect(),
        images: Vec::new(),
    };
    for mode in [HeadMode::Last, HeadMode::Mlp] {
        let dim = transfer::feature_dim(&vgg, mode);
        let mut r = loader::rng(1, 1);
        let values: Vec<f32> = (0..a.head_rows * dim)
            .map(|_| rand::Rng::random::<f32>(&mut r))
            .collect();
        let feats = features::Features {
            values,
            dim,
            origin: features::Origin::Reused,
        };
        let recipe = transfer::HeadRecipe {
            head: transfer::HeadConfig {
                mode,
                hidden: 256,
                dropout: transfer::HEAD_DROPOUT,
            },
            input_size: 224,
            epochs: a.head_epochs.max(1),
            batch_size: 128,
            lr: 2e-3,
            weight_decay: 1e-4,
            val_fraction: 0.05,
            seed: 1,
        };
        let started = Instant::now();
        let (_, history) = transfer::train_head(&feats, &labels, &recipe, &dev, true)?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "head {:<4} on {} x {dim} features: {:.2} s/epoch (batch 128, incl. validation)",
            format!("{mode:?}").to_lowercase(),
            a.head_rows,
            secs / history.len() as f64
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    fmnist::report::exit_code(run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    ctrlc::set_handler(|| {
        if train::STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // Second Ctrl-C: the user really wants out.
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing the current batch and saving a checkpoint (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    match cli.command {
        Command::Train(a) => cmd_train(*a),
        Command::Eval(a) => cmd_eval(a),
        Command::Convert(a) => cmd_convert(a),
        Command::Predict(a) => cmd_predict(a),
        Command::BenchVgg(a) => cmd_bench_vgg(a),
        Command::BenchKernels(a) => {
            let d = load_data(&a.data, None)?;
            anyhow::ensure!(!d.is_empty(), "{} has no images", a.data.display());
            bench::run(&bench::BenchKernels {
                data: &d,
                model: &a.model,
                seconds: a.seconds,
                vgg_sizes: &a.vgg_sizes,
                skip_training: a.skip_training,
            })
        }
    }
}
