//! The `fmnist-train` binary end to end: data errors, training on the fixture, evaluation,
//! determinism, and resuming after Ctrl-C.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fmnist-train"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sample.csv")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// `fmnist-train eval --model M --data D` plus `extra` flags.
fn eval(model: &Path, data: &Path, extra: &[&str]) -> Output {
    bin()
        .arg("eval")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn train_args<'a>(out: &'a str, epochs: &'a str) -> Vec<&'a str> {
    let data = Box::leak(fixture().to_string_lossy().to_string().into_boxed_str());
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        epochs,
        "--batch-size",
        "32",
        "--val-fraction",
        "0.1",
        "--seed",
        "7",
        "--quiet",
    ]
}

#[test]
fn bad_csv_rows_are_reported_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    // Line 5 of the file: pixel column 3 becomes 300.
    let mut cells: Vec<&str> = lines[4].split(',').collect();
    cells[3] = "300";
    lines[4] = cells.join(",");
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let o = run(&[
        "train",
        "--data",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("m.onnx").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("bad.csv") && e.contains("line 5, column 4") && e.contains("pixel 300"),
        "{e}"
    );
    assert!(
        !dir.path().join("m.onnx").exists(),
        "no model may be written from bad data"
    );

    let o = eval(Path::new("x.onnx"), &dir.path().join("missing.csv"), &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("missing.csv"), "{}", stderr(&o));
}

#[test]
fn trains_on_the_fixture_and_evaluates_the_exported_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let out_s = out.to_str().unwrap();
    let mut args = train_args(out_s, "8");
    let fx = fixture();
    args.extend(["--test", fx.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    for ext in ["onnx", "safetensors", "json"] {
        assert!(out.with_extension(ext).exists(), "{ext} missing");
    }
    assert!(
        !out.with_extension("ckpt.json").exists(),
        "checkpoint left behind"
    );
    let info: Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let epochs = info["epochs"].as_array().unwrap();
    let first = epochs[0]["train_loss"].as_f64().unwrap();
    let last = epochs.last().unwrap()["train_loss"].as_f64().unwrap();
    assert!(last < first * 0.7, "loss did not fall: {first} -> {last}");
    assert_eq!(info["seed"], 7);
    assert_eq!(info["model_sha256"].as_str().unwrap().len(), 64);
    let acc = info["test_metrics"]["accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.5,
        "accuracy {acc} does not beat chance (0.1) by a margin"
    );

    // eval agrees for the ONNX file and the safetensors checkpoint, and writes JSON.
    let json_path = dir.path().join("eval.json");
    let o = eval(&out, &fx, &["--json", json_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("macro F1")
            && table.contains("confusion matrix")
            && table.contains("Ankle boot")
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    for k in [
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "per_class",
        "confusion_matrix",
    ] {
        assert!(report.get(k).is_some(), "{k}");
    }
    assert_eq!(report["accuracy"], info["test_metrics"]["accuracy"]);
    let st = out.with_extension("safetensors");
    let o = eval(&st, &fx, &["--json", json_path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report2: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(report2["confusion_matrix"], report["confusion_matrix"]);

    let o = eval(&out, &fx, &["--min-accuracy", "0.999"]);
    assert!(
        !o.status.success(),
        "--min-accuracy must fail a model below it"
    );

    // --flip-average scores each image by the mean of its logits and its mirror image's
    // (here the file's own averaging already has).
    let text = std::fs::read_to_string(&fx).unwrap();
    let mut lines = text.lines();
    let mut mirrored = format!("{}\n", lines.next().unwrap());
    for line in lines {
        let v: Vec<&str> = line.split(',').collect();
        let mut row = vec![v[0]];
        for r in 0..28 {
            row.extend(v[1 + r * 28..1 + (r + 1) * 28].iter().rev());
        }
        mirrored.push_str(&(row.join(",") + "\n"));
    }
    let mirror_csv = dir.path().join("mirrored.csv");
    std::fs::write(&mirror_csv, mirrored).unwrap();
    let logits = |data: &Path, extra: &[&str]| -> Vec<Vec<f64>> {
        let path = dir.path().join("logits.json");
        let mut args = vec!["--logits-out", path.to_str().unwrap()];
        args.extend(extra);
        let o = eval(&out, data, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        serde_json::from_value(v["logits"].clone()).unwrap()
    };
    let (plain, flipped) = (logits(&fx, &[]), logits(&mirror_csv, &[]));
    let averaged = logits(&fx, &["--flip-average"]);
    assert_eq!(averaged.len(), plain.len());
    for ((a, p), f) in averaged.iter().zip(&plain).zip(&flipped) {
        for j in 0..10 {
            assert!(
                (a[j] - 0.5 * (p[j] + f[j])).abs() < 1e-5,
                "{a:?} vs {p:?} and {f:?}"
            );
        }
    }
    // The default recipe's file averages over the mirror image itself: an image and its
    // mirror image get the same scores (a single-pass file's differ:
    // train_flip_average_builds_the_averaging_into_the_file).
    for (p, f) in plain.iter().zip(&flipped) {
        for j in 0..10 {
            assert!((p[j] - f[j]).abs() < 1e-5, "{p:?} vs its mirror's {f:?}");
        }
    }
    let o = eval(&out, &fx, &["--flip-average"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("flip-averaged"));
}

/// `train --flip-average` trains the same weights and writes a file whose scores are the
/// flip-averaged scores of the plain file (`eval --flip-average`), on the planned executor.
#[test]
fn train_flip_average_builds_the_averaging_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture();
    let (plain, flip) = (dir.path().join("plain.onnx"), dir.path().join("flip.onnx"));
    for (out, extra) in [
        (&plain, &["--no-flip-average"]),
        (&flip, &["--flip-average"]),
    ] {
        let mut args = train_args(out.to_str().unwrap(), "2");
        args.extend(["--arch", "six", "--six-widths", "8", "8", "16"]);
        args.extend(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let read = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(
        read(&plain.with_extension("safetensors")),
        read(&flip.with_extension("safetensors")),
        "--flip-average changed the training"
    );
    let info: Value = serde_json::from_slice(&read(&flip.with_extension("json"))).unwrap();
    assert_eq!(info["recipe"]["flip_average"], true);
    let logits = |model: &Path, extra: &[&str]| -> Vec<Vec<f64>> {
        let path = dir.path().join("logits.json");
        let mut args = vec!["--logits-out", path.to_str().unwrap()];
        args.extend(extra);
        let o = eval(model, &fx, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("engine planned"),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let v: Value = serde_json::from_slice(&read(&path)).unwrap();
        serde_json::from_value(v["logits"].clone()).unwrap()
    };
    let (want, got) = (logits(&plain, &["--flip-average"]), logits(&flip, &[]));
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        for j in 0..10 {
            assert!((w[j] - g[j]).abs() < 1e-5, "{w:?} vs {g:?}");
        }
    }
    assert_ne!(got, logits(&plain, &[]), "the file does not average");
}

#[test]
fn same_seed_same_weights_and_resume_after_ctrl_c_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.onnx");
    // Same file name in another folder: the graph is named after the file.
    std::fs::create_dir(dir.path().join("b")).unwrap();
    let b = dir.path().join("b").join("a.onnx");
    let c = dir.path().join("c.onnx");
    // With a weight average (--ema), whose state the checkpoint must carry too.
    let args_for = |p: &Path| {
        let mut v = train_args(
            Box::leak(p.to_str().unwrap().to_string().into_boxed_str()),
            "6",
        );
        v.extend(["--ema", "0.9"]);
        v
    };
    for p in [&a, &b] {
        let o = run(&args_for(p));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let weights = |p: &Path| std::fs::read(p.with_extension("safetensors")).unwrap();
    assert_eq!(
        weights(&a),
        weights(&b),
        "same seed and data gave different weights"
    );
    assert!(
        std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
        "same seed and data gave different ONNX files"
    );

    // Interrupt a run with SIGINT, then resume it: the result equals the uninterrupted run.
    let mut args = args_for(&c);
    args.retain(|a| *a != "--quiet");
    let mut child = bin().args(&args).stderr(Stdio::piped()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let mut e = err;
        let _ = e.read_to_string(&mut s);
        s
    });
    let ckpt = c.with_extension("ckpt.json");
    let start = Instant::now();
    while !ckpt.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    if status.success() {
        panic!("the run finished before the interrupt arrived; log:\n{log}");
    }
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("--resume"), "{log}");
    assert!(ckpt.exists());
    assert!(!c.exists(), "no final model before the run completes");

    // Without --resume the checkpoint is protected.
    let o = run(&args_for(&c));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"));

    let mut args = args_for(&c);
    args.push("--resume");
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        weights(&a),
        weights(&c),
        "resumed run differs from the uninterrupted one"
    );
}

#[test]
fn convert_writes_kaggle_csv_from_idx() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut img = vec![0u8, 0, 8, 3];
    for d in [2u32, 28, 28] {
        img.extend_from_slice(&d.to_be_bytes());
    }
    img.extend((0..2 * 784).map(|i| (i % 256) as u8));
    let mut lbl = vec![0u8, 0, 8, 1, 0, 0, 0, 2, 4, 9];
    let gz = |b: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    std::fs::write(dir.path().join("x-images-idx3-ubyte.gz"), gz(&img)).unwrap();
    std::fs::write(dir.path().join("x-labels-idx1-ubyte.gz"), gz(&lbl)).unwrap();
    let out = dir.path().join("x.csv");
    let o = run(&[
        "convert",
        "--images",
        dir.path().join("x-images-idx3-ubyte.gz").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0].starts_with("label,pixel1,pixel2"));
    assert!(lines[1].starts_with("4,0,1,2,"));
    assert!(lines[2].starts_with("9,"));
    // A labels file that disagrees in length is refused.
    lbl[7] = 3;
    lbl.push(1);
    std::fs::write(dir.path().join("x-labels-idx1-ubyte.gz"), gz(&lbl)).unwrap();
    let o = run(&[
        "convert",
        "--images",
        dir.path().join("x-images-idx3-ubyte.gz").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("2 images but"), "{}", stderr(&o));
}

/// A backbone-only VGG16 file (the 13 convolutions in torchvision's names and shapes) with
/// deterministic He-uniform values: what `--head mlp` needs, 59 MB instead of 528.
fn write_vgg_backbone(path: &Path) {
    use candle_core::{Device, Tensor};
    let idx = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28];
    let widths = [
        64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,
    ];
    let mut tensors = std::collections::HashMap::new();
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut c_in = 3;
    for (i, &c_out) in idx.iter().zip(&widths) {
        let bound = (6.0 / (c_in * 9) as f32).sqrt();
        let w: Vec<f32> = (0..c_out * c_in * 9).map(|_| next() * bound).collect();
        let b: Vec<f32> = (0..c_out).map(|_| next() * 0.01).collect();
        let dev = &Device::Cpu;
        tensors.insert(
            format!("features.{i}.weight"),
            Tensor::from_vec(w, (c_out, c_in, 3, 3), dev).unwrap(),
        );
        tensors.insert(
            format!("features.{i}.bias"),
            Tensor::from_vec(b, c_out, dev).unwrap(),
        );
        c_in = c_out;
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn http(addr: &str, request: String) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[test]
fn vgg16_transfer_trains_from_a_cache_evaluates_and_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("vgg16-backbone.safetensors");
    write_vgg_backbone(&weights);
    let out = dir.path().join("vgg.onnx");
    let cache = dir.path().join("cache");
    let data = fixture();
    let args = |head: &str| -> Vec<String> {
        [
            "train",
            "--model",
            "vgg16",
            "--head",
            head,
            "--input-size",
            "32",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--limit",
            "120",
            "--extract-batch",
            "40",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--weights".into(),
            weights.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--cache-dir".into(),
            cache.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ])
        .collect()
    };
    // No --weights: clap names the flag.
    let o = run(&["train", "--model", "vgg16", "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--weights"), "{}", stderr(&o));
    // --head last needs fc6/fc7, which a backbone-only file lacks.
    let o = bin().args(args("last")).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no classifier") && stderr(&o).contains("--head mlp"),
        "{}",
        stderr(&o)
    );

    let o = bin().args(args("mlp")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("features: extracted 120 images"),
        "{}",
        stderr(&o)
    );
    for ext in ["onnx", "safetensors", "json"] {
        assert!(out.with_extension(ext).exists(), "{ext} missing");
    }
    let info: Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(info["recipe"]["model"], "vgg16");
    assert_eq!(info["recipe"]["head"]["head"]["mode"], "mlp");
    assert_eq!(info["epochs"].as_array().unwrap().len(), 3);
    let caches: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(caches.len(), 1, "one finished cache file, no .partial left");

    // The second run reads the cache instead of running the backbone again.
    let first_head = std::fs::read(out.with_extension("safetensors")).unwrap();
    let o = bin().args(args("mlp")).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("features: reusing"), "{}", stderr(&o));
    // Same seed, same head, bit for bit (the ONNX metadata records timings, so compare the
    // weights).
    assert!(std::fs::read(out.with_extension("safetensors")).unwrap() == first_head);

    // eval works on the transfer model; the safetensors (head only) is refused clearly.
    let o = eval(&out, &data, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("accuracy"));
    let o = eval(&out.with_extension("safetensors"), &data, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("evaluate its .onnx file"),
        "{}",
        stderr(&o)
    );

    // fmnist-serve serves it unchanged: 3-channel input, resized by the server.
    let serve = Path::new(env!("CARGO_BIN_EXE_fmnist-train")).with_file_name("fmnist-serve");
    assert!(
        serve.exists(),
        "{} is missing: build the workspace first (make build)",
        serve.display()
    );
    let mut child = Command::new(&serve)
        .args(["--listen", "127.0.0.1:0", "--model"])
        .arg(&out)
        .env("FMNIST_BASIC_AUTH", "t:pw-for-this-test")
        .env("FMNIST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("fmnist-serve listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    let text = std::fs::read_to_string(&data).unwrap();
    let row = text.lines().nth(1).unwrap();
    let pixels = row.split_once(',').unwrap().1;
    let body = format!("{{\"image\":[{pixels}]}}");
    let (status, answer) = http(
        &addr,
        format!(
            "POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dDpwdy1mb3ItdGhpcy10ZXN0\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let model = fmnist::OnnxModel::load(&out).unwrap();
    let image: Vec<u8> = pixels.split(',').map(|p| p.parse().unwrap()).collect();
    let logits = model
        .logits_for_pixels(&[&image])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(
        answer["label"].as_u64().unwrap() as usize,
        fmnist::onnx::model::argmax(&logits[0])
    );
}

/// Where the golden weight hashes live: one per CPU kernel path.
fn golden_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden_weights.json")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// A short seeded run on the fixture must give the committed weights, bit for bit, for each
/// kernel path this CPU takes — the default one (amx-bf16 where AMX is present) and the one
/// `--fp32` forces (the `.json` records it as `cpu_path`): the hash changes whenever the
/// numerics do, so an accidental change fails here. A path with no committed hash fails and
/// says how to record one; a change made on purpose is re-recorded in the same commit
/// (`FMNIST_RECORD_GOLDEN=1`), with the reason in the commit message.
#[test]
fn golden_weights_for_this_cpu_path() {
    use sha2::{Digest, Sha256};
    let mut runs: Vec<(String, String)> = Vec::new();
    for extra in [&[][..], &["--fp32"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("golden.onnx");
        let out_s = out.to_str().unwrap().to_string();
        let mut args = train_args(&out_s, "2");
        args.extend(extra.iter().copied());
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let info: Value =
            serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
        let path = info["cpu_path"]
            .as_str()
            .expect("the model's .json records cpu_path")
            .to_string();
        if extra.is_empty() {
            eprintln!("default kernel path here: {path}");
        } else {
            assert!(path.ends_with("fp32"), "--fp32 trained on {path}");
        }
        let weights = std::fs::read(out.with_extension("safetensors")).unwrap();
        if runs.iter().all(|(p, _)| *p != path) {
            runs.push((path, format!("{:x}", Sha256::digest(&weights))));
        }
    }
    let file = golden_file();
    let mut golden: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    if std::env::var_os("FMNIST_RECORD_GOLDEN").is_some() {
        for (path, sha) in &runs {
            golden.insert(
                path.clone(),
                serde_json::json!({ "sha256": sha, "recorded_on": cpu_model() }),
            );
            eprintln!("recorded {sha} for {path} in {}", file.display());
        }
        let text = serde_json::to_string_pretty(&golden).unwrap() + "\n";
        std::fs::write(&file, text).unwrap();
        return;
    }
    let record = format!(
        "FMNIST_RECORD_GOLDEN=1 cargo test --release -p fmnist-train --test cli golden \
         and commit {}",
        file.display()
    );
    for (path, sha) in runs {
        let Some(want) = golden.get(&path) else {
            panic!(
                "no golden weight hash for CPU path {path} (this CPU: {}); record one with: \
                 {record}",
                cpu_model()
            );
        };
        assert_eq!(
            want["sha256"].as_str(),
            Some(sha.as_str()),
            "the weights of the seeded fixture run changed on CPU path {path} (committed hash \
             recorded on {}, this CPU: {}). If the numerics changed on purpose, re-record \
             with: {record}, and say why in the commit",
            want["recorded_on"],
            cpu_model()
        );
    }
}
