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
}

#[test]
fn same_seed_same_weights_and_resume_after_ctrl_c_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.onnx");
    let b = dir.path().join("b.onnx");
    let c = dir.path().join("c.onnx");
    for p in [&a, &b] {
        let o = run(&train_args(p.to_str().unwrap(), "6"));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let weights = |p: &Path| std::fs::read(p.with_extension("safetensors")).unwrap();
    assert_eq!(
        weights(&a),
        weights(&b),
        "same seed and data gave different weights"
    );

    // Interrupt a run with SIGINT, then resume it: the result equals the uninterrupted run.
    let mut args = train_args(c.to_str().unwrap(), "6");
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
    let o = run(&train_args(c.to_str().unwrap(), "6"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--resume"));

    let mut args = train_args(c.to_str().unwrap(), "6");
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
