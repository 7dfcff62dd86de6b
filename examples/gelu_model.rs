//! Writes a seeded random network of the shape the next default recipe aims at (three blocks
//! of two 3×3 convolutions with exact GELU, 32/64/128 channels, max-pool, a linear layer), so
//! that `make test-onnxruntime` can check that onnxruntime agrees with the planned executor on
//! GELU (written as the opset-13 `Div → Erf → Add → Mul → Mul` chain) before any trained model
//! uses it. The weights are random (He-scaled): agreement, not accuracy, is what it checks.
//!
//! `cargo run --release --example gelu_model -- OUT.onnx`

use fmnist::onnx::writer::{write_model, GraphSpec, Layer};
use fmnist::InputLayout;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .ok_or("usage: gelu_model OUT.onnx")?;
    let mut state = 42u64;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut layers = vec![Layer::Normalize {
        mean: vec![0.286],
        std: vec![0.353],
    }];
    let (mut c, mut side) = (1, 28);
    for width in [32, 64, 128] {
        for _ in 0..2 {
            // Uniform in ±√(6/fan_in): He initialisation's variance.
            let scale = (6.0 / (9 * c) as f32).sqrt();
            layers.push(Layer::Conv2d {
                weight: (0..width * c * 9).map(|_| uniform() * scale).collect(),
                shape: [width, c, 3, 3],
                bias: (0..width).map(|_| uniform() * 0.1).collect(),
                stride: 1,
                padding: 1,
            });
            layers.push(Layer::Gelu);
            c = width;
        }
        layers.push(Layer::MaxPool2d {
            kernel: 2,
            stride: 2,
        });
        side /= 2;
    }
    layers.push(Layer::Flatten);
    let features = c * side * side;
    let scale = (3.0 / features as f32).sqrt();
    layers.push(Layer::Linear {
        weight: (0..10 * features).map(|_| uniform() * scale).collect(),
        in_features: features,
        out_features: 10,
        bias: (0..10).map(|_| uniform() * 0.1).collect(),
    });
    let spec = GraphSpec {
        name: "gelu-six-conv-random".into(),
        input: InputLayout::Gray,
        num_classes: 10,
        flip_average: false,
        layers,
        metadata: vec![],
    };
    write_model(std::path::Path::new(&out), &spec)?;
    println!("{out}: six-conv GELU network, random weights");
    Ok(())
}
