//! Weighs the v2 JSON decoders (issue: "serde's typed request structs against the project's own
//! JSON value type"): peak heap and time to decode one 256-image infer body, flat `[N,784]`
//! data and nested `[N,1,28,28]` data, with
//! - `serde_json::Value` (the general tree),
//! - typed structs (`deny_unknown_fields`; the data as an untagged flat-or-nested enum, which
//!   is how serde expresses "numbers nested to any depth"),
//! - `fmnist::server::http::json::Json` (what the server uses), followed by the validation
//!   that turns it into pixels.
//!
//! `cargo run --release --example v2_decoders` prints one row per decoder and body.

use serde::Deserialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts live and peak heap bytes.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    id: Option<String>,
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
    inputs: Vec<Input>,
    outputs: Option<Vec<Output>>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Option<Data>,
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Output {
    name: String,
    parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

#[allow(dead_code)]
#[derive(Deserialize)]
#[serde(untagged)]
enum Data {
    Flat(Vec<f32>),
    Nested(Vec<Data>),
}

/// A named decoder run on the body; returns something derived from its result.
type Decoder<'a> = (&'static str, Box<dyn Fn() -> usize + 'a>);

/// Peak heap above the start, and the best of `runs` times, for `f`.
fn measure<T>(runs: usize, mut f: impl FnMut() -> T) -> (usize, f64) {
    let mut best = f64::INFINITY;
    let mut peak = 0;
    for _ in 0..runs {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let t = Instant::now();
        let out = f();
        best = best.min(t.elapsed().as_secs_f64());
        peak = peak.max(PEAK.load(Ordering::Relaxed) - base);
        drop(out);
    }
    (peak, best)
}

fn main() {
    let n = 256;
    let values: Vec<f32> = (0..n * 784).map(|i| (i % 256) as f32 / 255.0).collect();
    let flat =
        serde_json::json!({"inputs": [{"name": "input", "shape": [n, 784], "datatype": "FP32",
        "data": values}]})
        .to_string();
    let nested_data: Vec<Vec<Vec<Vec<f32>>>> = values
        .chunks(784)
        .map(|img| vec![img.chunks(28).map(<[f32]>::to_vec).collect()])
        .collect();
    let nested = serde_json::json!({"inputs": [{"name": "input", "shape": [n, 1, 28, 28], "datatype": "FP32",
        "data": nested_data}]})
    .to_string();
    println!(
        "{:<44} {:>12} {:>10}",
        "decoder (256 images, one request)", "peak heap", "best ms"
    );
    for (label, body) in [("flat [256,784]", &flat), ("nested [256,1,28,28]", &nested)] {
        println!("-- {label}: body {:.1} MB", body.len() as f64 / 1e6);
        let rows: [Decoder; 3] = [
            (
                "serde_json::Value",
                Box::new(|| {
                    let v: serde_json::Value = serde_json::from_str(body).unwrap();
                    v.is_object() as usize
                }),
            ),
            (
                "typed structs (deny_unknown_fields, untagged)",
                Box::new(|| {
                    let v: Body = serde_json::from_str(body).unwrap();
                    v.inputs.len()
                }),
            ),
            (
                "fmnist Json + validation to pixels",
                Box::new(|| {
                    fmnist::server::http::v2::decode(body.as_bytes(), None, 256)
                        .unwrap()
                        .pixels
                        .len()
                }),
            ),
        ];
        for (name, f) in rows {
            let (peak, best) = measure(10, &f);
            println!(
                "{name:<44} {:>9.1} MB {:>10.1}",
                peak as f64 / 1e6,
                best * 1e3
            );
        }
    }
}
