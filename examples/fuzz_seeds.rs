//! Writes the seed inputs of the fuzz targets (`fuzz/`) into `fuzz/seeds/<target>/`:
//! one or two well-formed inputs per target for libFuzzer to mutate from. The corpus that is
//! committed under `fuzz/corpus/` is what `make fuzz-cmin` keeps after the runs.
//!
//! `cargo run --release --example fuzz_seeds [-- DIR]` (default `fuzz/seeds`).

use candle_onnx::onnx::ModelProto;
use fmnist::onnx::writer::{build_model, GraphSpec, Layer};
use fmnist::server::grpc::pb;
use fmnist::InputLayout;
use prost::Message;
use std::path::Path;

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let d = dir.join(target);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join(name), bytes)
}

/// A small model the planned executor plans: normalize, conv 3×3 (4 channels, padded),
/// ReLU, max-pool 2 then 7, flatten, linear to 10.
fn tiny_cnn() -> ModelProto {
    let w = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * scale)
            .collect()
    };
    let spec = GraphSpec {
        name: "tiny".into(),
        input: InputLayout::Gray,
        num_classes: 10,
        flip_average: false,
        layers: vec![
            Layer::Normalize {
                mean: vec![0.5],
                std: vec![0.25],
            },
            Layer::Conv2d {
                weight: w(36, 0.05),
                shape: [4, 1, 3, 3],
                bias: w(4, 0.01),
                stride: 1,
                padding: 1,
            },
            Layer::Relu,
            Layer::MaxPool2d {
                kernel: 2,
                stride: 2,
            },
            Layer::MaxPool2d {
                kernel: 7,
                stride: 7,
            },
            Layer::Flatten,
            Layer::Linear {
                weight: w(160, 0.1),
                in_features: 16,
                out_features: 10,
                bias: w(10, 0.01),
            },
        ],
        metadata: vec![],
    };
    build_model(&spec).expect("the tiny spec is valid")
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    let dir = Path::new(&dir);
    let pixels = |n: usize| -> Vec<String> { (0..n).map(|i| (i % 256).to_string()).collect() };

    put(dir, "onnx_bytes", "tiny_cnn", &tiny_cnn().encode_to_vec())?;
    // Edit scripts for the shipped model: change an attribute, a dim, an op type.
    put(dir, "onnx_mutate", "attr", &[1, 0, 0, 3])?;
    put(dir, "onnx_mutate", "dims", &[5, 1, 0, 2])?;
    put(dir, "onnx_mutate", "op", &[0, 2, 5])?;

    let single = format!("{{\"image\": [{}]}}", pixels(784).join(","));
    let batch = format!(
        "{{\"images\": [[{}], [{}]]}}",
        pixels(784).join(","),
        pixels(784).join(", ")
    );
    put(dir, "predict_body", "single", single.as_bytes())?;
    put(dir, "predict_body", "batch", batch.as_bytes())?;

    let v2 = format!(
        "{{\"id\": \"a\", \"inputs\": [{{\"name\": \"pixels\", \"shape\": [1, 784], \
         \"datatype\": \"FP32\", \"data\": [{}]}}], \"outputs\": [{{\"name\": \"probabilities\", \
         \"parameters\": {{\"classification\": 3}}}}]}}",
        (0..784)
            .map(|i| format!("{}", (i % 10) as f32 / 10.0))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut json = vec![0u8];
    json.extend_from_slice(v2.as_bytes());
    put(dir, "v2_body", "json", &json)?;
    let floats: Vec<u8> = (0..784)
        .flat_map(|i| ((i % 7) as f32 / 7.0).to_le_bytes())
        .collect();
    let mut raw = vec![1u8];
    raw.extend_from_slice(&floats);
    put(dir, "v2_body", "raw", &raw)?;
    let head = br#"{"inputs":[{"name":"pixels","shape":[1,784],"datatype":"FP32","parameters":{"binary_data_size":3136}}],"parameters":{"binary_data_output":true}}"#;
    let mut ext = vec![2u8];
    ext.extend_from_slice(&(head.len() as u16).to_le_bytes());
    ext.extend_from_slice(head);
    ext.extend_from_slice(&floats);
    put(dir, "v2_body", "binary_extension", &ext)?;
    put(dir, "v2_header_length", "count", b"3136")?;

    let input = pb::model_infer_request::InferInputTensor {
        name: "pixels".into(),
        datatype: "FP32".into(),
        shape: vec![1, 784],
        ..Default::default()
    };
    let req = pb::ModelInferRequest {
        model_name: "fmnist".into(),
        id: "seed".into(),
        inputs: vec![input.clone()],
        raw_input_contents: vec![floats.clone()],
        ..Default::default()
    };
    put(dir, "grpc_infer", "raw_contents", &req.encode_to_vec())?;
    let req = pb::ModelInferRequest {
        inputs: vec![pb::model_infer_request::InferInputTensor {
            contents: Some(pb::InferTensorContents {
                fp32_contents: (0..784).map(|i| (i % 3) as f32 / 2.0).collect(),
                ..Default::default()
            }),
            ..input
        }],
        outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    put(dir, "grpc_infer", "typed_contents", &req.encode_to_vec())?;

    put(
        dir,
        "basic_auth",
        "header",
        b"Basic YWRtaW46cGFzc3dvcmQxMjM=",
    )?;
    put(
        dir,
        "basic_auth",
        "file",
        b"# users\nadmin:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaA\n",
    )?;
    // Small images in every accepted format: a dark bar on white, one with alpha.
    let gray = image::GrayImage::from_fn(24, 16, |x, y| {
        image::Luma([if (6..18).contains(&x) && (4..12).contains(&y) {
            30
        } else {
            240
        }])
    });
    let rgba = image::DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(16, 16, |x, _| {
        image::LumaA([20, if x < 8 { 255 } else { 0 }])
    }));
    let gray = image::DynamicImage::ImageLuma8(gray);
    for (name, img, format) in [
        ("png", &gray, image::ImageFormat::Png),
        ("png_alpha", &rgba, image::ImageFormat::Png),
        ("jpeg", &gray, image::ImageFormat::Jpeg),
        ("gif", &gray, image::ImageFormat::Gif),
        ("bmp", &gray, image::ImageFormat::Bmp),
        ("webp", &rgba, image::ImageFormat::WebP),
    ] {
        let mut out = Vec::new();
        let img = if format == image::ImageFormat::Png || format == image::ImageFormat::WebP {
            img.clone()
        } else {
            image::DynamicImage::ImageRgb8(img.to_rgb8())
        };
        img.write_to(&mut std::io::Cursor::new(&mut out), format)
            .expect("encodes");
        put(dir, "photo", name, &out)?;
    }
    println!("seeds written under {}", dir.display());
    Ok(())
}
