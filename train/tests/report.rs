//! `fmnist-train eval --report DIR` end to end: the shipped model on the fixture sample, then
//! every number in the HTML and in the SVG text is checked against `--json`, and every picture
//! must decode.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `fmnist-train eval` of the shipped model on the fixture sample.
fn eval() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmnist-train"));
    cmd.arg("eval")
        .arg("--model")
        .arg(root().join("weights/fmnist-cnn.onnx"))
        .arg("--data")
        .arg(root().join("fixtures/sample.csv"));
    cmd
}

/// Runs the eval once and returns the report directory (kept alive by the TempDir).
fn report() -> (tempfile::TempDir, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = eval()
        .arg("--json")
        .arg(dir.path().join("metrics.json"))
        .arg("--report")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("index.html"),
        "the report's path is printed: {stderr}"
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap())
            .unwrap();
    let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    (dir, json, html)
}

/// The value of an attribute `name="..."` in `tag` (no entity decoding is needed for the
/// numbers and keys read here).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// Every `<td data-key=.. data-value=..>shown</td>` as (key, exact value, shown text).
fn cells(html: &str) -> Vec<(String, String, String)> {
    html.split("<td ")
        .skip(1)
        .filter_map(|rest| {
            let (tag, after) = rest.split_once('>')?;
            let shown = after.split_once("</td>")?.0;
            Some((
                attr(&format!(" {tag}"), "data-key")?.to_string(),
                attr(&format!(" {tag}"), "data-value")?.to_string(),
                shown.to_string(),
            ))
        })
        .collect()
}

/// Follows a dotted path such as `per_class.3.f1` into the JSON.
fn lookup<'a>(json: &'a Value, key: &str) -> &'a Value {
    key.split('.')
        .fold(json, |v, part| match part.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[part],
        })
}

/// The text content of every `<text>` element of an SVG, trimmed.
fn svg_texts(path: &Path) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap();
    svg.split("<text")
        .skip(1)
        .map(|rest| {
            let body = rest.split_once('>').unwrap().1;
            body.split_once("</text>").unwrap().0.trim().to_string()
        })
        .collect()
}

fn matrix(json: &Value) -> Vec<Vec<u64>> {
    json["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn every_number_in_the_report_is_the_json_s_and_every_picture_decodes() {
    let (dir, json, html) = report();
    let dir = dir.path();

    // The HTML tables: each cell names its JSON path and carries the exact value.
    let cells = cells(&html);
    assert_eq!(
        cells.len(),
        5 + 10 * 4 + 100,
        "summary, per-class and matrix cells"
    );
    for (key, exact, shown) in &cells {
        let want = lookup(&json, key);
        assert!(!want.is_null(), "{key} is not in the JSON");
        let want = want.as_f64().unwrap();
        assert_eq!(exact.parse::<f64>().unwrap(), want, "{key}");
        let count = key == "samples" || key.ends_with("support") || key.starts_with("confusion");
        let rounded = if count {
            format!("{want}")
        } else {
            format!("{want:.4}")
        };
        assert_eq!(
            shown, &rounded,
            "{key} is shown rounded from the same value"
        );
    }
    assert_eq!(
        json["samples"].as_u64(),
        Some(400),
        "the fixture has 400 images"
    );

    // The counts heatmap: its integers, read row by row, are the matrix.
    let cm = matrix(&json);
    let counts: Vec<u64> = svg_texts(&dir.join("confusion.svg"))
        .iter()
        .filter_map(|t| t.parse().ok())
        .collect();
    assert_eq!(counts, cm.concat());

    // The normalised heatmap: per cent of each row, one decimal.
    let shares: Vec<String> = svg_texts(&dir.join("confusion_normalised.svg"))
        .into_iter()
        .filter(|t| t.contains('.') && t.parse::<f64>().is_ok())
        .collect();
    let want: Vec<String> = cm
        .iter()
        .flat_map(|row| {
            let total: u64 = row.iter().sum();
            row.iter().map(move |&c| {
                let share = if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                };
                format!("{:.1}", share * 100.0)
            })
        })
        .collect();
    assert_eq!(shares, want);

    // The bars' value labels: precision for every class, then recall, then F1.
    let labels: Vec<String> = svg_texts(&dir.join("per_class.svg"))
        .into_iter()
        .filter(|t| t.len() == 5 && t.as_bytes()[1] == b'.' && t.parse::<f64>().is_ok())
        .collect();
    let per_class = json["per_class"].as_array().unwrap();
    let want: Vec<String> = ["precision", "recall", "f1"]
        .iter()
        .flat_map(|m| {
            per_class
                .iter()
                .map(move |c| format!("{:.3}", c[*m].as_f64().unwrap()))
        })
        .collect();
    assert_eq!(labels, want);

    // The gallery: wrong predictions only, most confident first, as many as there are mistakes
    // (up to 30), each with its picture.
    let wrong = json["samples"].as_u64().unwrap() - (0..10).map(|i| cm[i][i]).sum::<u64>();
    let items: Vec<&str> = html.split("<li data-row=").skip(1).collect();
    assert_eq!(items.len() as u64, wrong.min(30));
    let mut last = f64::INFINITY;
    for (i, item) in items.iter().enumerate() {
        let tag = format!(" data-row={}", item.split_once('>').unwrap().0);
        let truth: usize = attr(&tag, "data-truth").unwrap().parse().unwrap();
        let predicted: usize = attr(&tag, "data-predicted").unwrap().parse().unwrap();
        let confidence: f64 = attr(&tag, "data-confidence").unwrap().parse().unwrap();
        assert_ne!(truth, predicted, "gallery item {i} is a mistake");
        assert!(confidence <= last && confidence > 0.0 && confidence <= 1.0);
        last = confidence;
        assert!(item.contains(&format!("src=\"mistakes/{i:02}.png\"")));
    }

    // The shipped model's .json has its training history, so the curves are drawn.
    assert!(html.contains("src=\"curves.png\""));

    // Every picture decodes, and the page links only pictures that exist.
    let mut pictures: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("mistakes")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    pictures.sort();
    assert_eq!(pictures.len(), 4 + items.len(), "{pictures:?}");
    for p in &pictures {
        let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(img.width() > 0 && img.height() > 0);
    }
    for name in ["confusion", "confusion_normalised", "per_class", "curves"] {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}.svg"
        );
    }
    for src in html
        .split("src=\"")
        .skip(1)
        .map(|s| s.split_once('"').unwrap().0)
    {
        assert!(
            dir.join(src).is_file(),
            "the page links {src}, which is missing"
        );
    }
}

#[test]
fn a_report_directory_that_cannot_be_made_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let out = eval()
        .arg("--report")
        .arg(blocker.join("report"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("report"), "{err}");
    assert_eq!(
        std::fs::read(&blocker).unwrap(),
        b"not a directory",
        "nothing is overwritten"
    );
}
