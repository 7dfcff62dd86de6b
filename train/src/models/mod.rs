//! Models that fmnist trains, behind one small trait, and the parameter store they share.

pub mod cnn;
pub mod custom_ops;
pub mod vgg;

use candle_core::{DType, Device, Result, Tensor, Var};
use fmnist::onnx::Layer;
use fmnist::preprocess::InputLayout;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// A trainable image classifier.
pub trait Classifier {
    /// Logits `[N, 10]` for a batch in [`Classifier::layout`]. `train` carries the random
    /// stream for dropout during training; `None` means inference.
    fn forward_t(&self, xs: &Tensor, train: Option<&mut ChaCha8Rng>) -> Result<Tensor>;
    /// The input the model expects.
    fn layout(&self) -> InputLayout;
    /// The parameters training updates.
    fn params(&self) -> &Params;
    /// The model as ONNX layers (inference form: no dropout).
    fn export_layers(&self) -> Result<Vec<Layer>>;
}

/// Named parameters in creation order. Initialised from a seeded stream (candle's own CPU
/// random generator cannot be seeded), so the same seed gives the same starting weights.
/// Buffers (batch-norm running statistics) are saved and loaded with the parameters but are
/// not trained.
#[derive(Debug, Default)]
pub struct Params {
    vars: Vec<(String, Var)>,
    buffers: Vec<(String, Var)>,
}

impl Params {
    /// Adds a parameter drawn uniformly from `[-bound, bound]`.
    pub fn uniform(
        &mut self,
        name: &str,
        shape: &[usize],
        bound: f32,
        r: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Var> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| r.random_range(-bound..=bound)).collect();
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, device)?)?;
        self.vars.push((name.to_string(), var.clone()));
        Ok(var)
    }

    /// Adds an existing variable as a trainable parameter.
    pub fn push(&mut self, name: &str, var: Var) {
        self.vars.push((name.to_string(), var));
    }

    /// Adds a zero-initialised parameter.
    pub fn zeros(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Var> {
        let var = Var::zeros(shape, DType::F32, device)?;
        self.vars.push((name.to_string(), var.clone()));
        Ok(var)
    }

    /// Adds a buffer filled with `value`.
    pub fn buffer(
        &mut self,
        name: &str,
        shape: &[usize],
        value: f32,
        device: &Device,
    ) -> Result<Var> {
        let var = Var::from_tensor(&Tensor::full(value, shape, device)?)?;
        self.buffers.push((name.to_string(), var.clone()));
        Ok(var)
    }

    /// The trainable parameters.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn all(&self) -> impl Iterator<Item = &(String, Var)> {
        self.vars.iter().chain(&self.buffers)
    }

    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Parameters and buffers as a name → tensor map (for safetensors).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.all()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Overwrites every parameter and buffer from a map, checking that names and shapes match.
    pub fn assign(&self, from: &HashMap<String, Tensor>, source: &Path) -> anyhow::Result<()> {
        for (name, var) in self.all() {
            let t = from.get(name).ok_or_else(|| {
                anyhow::anyhow!("{}: tensor '{name}' is missing", source.display())
            })?;
            if t.dims() != var.dims() {
                anyhow::bail!(
                    "{}: tensor '{name}' has shape {:?}, expected {:?}",
                    source.display(),
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// A tensor's values as a flat `Vec<f32>` on the CPU.
pub fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec1()
}

/// Inverted dropout with a mask drawn from our seeded stream: kept values are scaled by
/// `1 / (1 - p)` so inference needs no rescaling.
pub fn dropout(xs: &Tensor, p: f32, r: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(xs.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..xs.elem_count())
        .map(|_| if r.random::<f32>() < p { 0.0 } else { scale })
        .collect();
    xs.mul(&Tensor::from_vec(mask, xs.shape(), xs.device())?)
}
