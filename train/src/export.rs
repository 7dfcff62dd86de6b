//! Trained model → ONNX file (through `fmnist::onnx::writer`) + safetensors.

use crate::models::Classifier;
use crate::train::save_tensors_atomic;
use anyhow::{Context, Result};
use fmnist::onnx::{writer, GraphSpec};
use fmnist::OnnxModel;
use fmnist::{CLASS_NAMES, NUM_CLASSES};
use std::path::Path;

/// Writes `out` (ONNX) and its `.safetensors` sibling. `metadata` is stored in the ONNX file
/// beside the class names. `flip_average`: the graph averages each image's logits with its
/// mirror image's ([`GraphSpec::flip_average`]).
pub fn export(
    model: &dyn Classifier,
    out: &Path,
    metadata: Vec<(String, String)>,
    flip_average: bool,
) -> Result<()> {
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "fmnist".into());
    writer::write_model(out, &graph_spec(model, name, metadata, flip_average)?)?;
    let st = out.with_extension("safetensors");
    save_tensors_atomic(&st, &model.params().tensors())
        .with_context(|| format!("writing {}", st.display()))?;
    Ok(())
}

/// The ONNX graph of `model` as [`export`] writes it, class names first in its metadata.
fn graph_spec(
    model: &dyn Classifier,
    name: String,
    metadata: Vec<(String, String)>,
    flip_average: bool,
) -> Result<GraphSpec> {
    let mut meta = vec![(
        "class_names".to_string(),
        serde_json::to_string(&CLASS_NAMES)?,
    )];
    meta.extend(metadata);
    Ok(GraphSpec {
        name,
        input: model.layout(),
        num_classes: NUM_CLASSES,
        layers: model.export_layers()?,
        flip_average,
        metadata: meta,
    })
}

/// The graph [`export`] would write for `model`, loaded in memory as the server loads a file
/// (the planned executor when it covers the graph). Validation runs through it: it measures
/// what the exported file computes, and the executor is several times faster than candle's
/// forward pass.
pub fn in_memory(model: &dyn Classifier, flip_average: bool) -> Result<OnnxModel> {
    let spec = graph_spec(model, "validation".into(), vec![], flip_average)?;
    let proto = writer::build_model(&spec)?;
    Ok(OnnxModel::from_proto(
        std::path::PathBuf::from("<in memory>"),
        proto,
        0,
    )?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::Dataset;
    use crate::loader;
    use crate::models::cnn::{Cnn, CnnConfig};
    use candle_core::Device;
    use fmnist::onnx::model::argmax;

    /// The exported file at `out`, run through candle-onnx, gives `model`'s logits (within
    /// `tol`) and the same class on every image of `data`. Returns the loaded file.
    pub(crate) fn assert_onnx_matches(
        model: &dyn Classifier,
        out: &Path,
        data: &Dataset,
        tol: f32,
    ) -> OnnxModel {
        let onnx = OnnxModel::load(out).unwrap();
        assert_eq!(onnx.layout(), model.layout());
        let ours = crate::train::predict(model, data, 100, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let images: Vec<&[u8]> = (0..data.len()).map(|i| data.image(i)).collect();
        let theirs = onnx
            .logits_for_pixels(&images)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < tol, "image {i}: logits differ by {diff}");
            assert_eq!(argmax(a), argmax(b), "image {i}: {a:?} vs {b:?}");
        }
        onnx
    }

    #[test]
    fn onnx_file_matches_the_candle_model_on_every_fixture_image() {
        let data = crate::data::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sample.csv"),
        )
        .unwrap();
        let model = Cnn::new(CnnConfig::default(), &mut loader::rng(3, 0), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        export(&model, &out, vec![("k".into(), "v".into())], false).unwrap();
        assert!(out.with_extension("safetensors").exists());
        let onnx = assert_onnx_matches(&model, &out, &data, 1e-4);
        assert_eq!(onnx.metadata_value("k"), Some("v"));
        assert!(onnx
            .metadata_value("class_names")
            .unwrap()
            .contains("Ankle boot"));
    }

    /// The six-convolution GELU network (odd-sided pooling is not needed: it pools 28 → 14 →
    /// 7, then averages) exports to a file the planned executor runs, not the candle-onnx
    /// fall-back, with the candle model's logits.
    #[test]
    fn six_conv_gelu_export_runs_on_the_planned_executor() {
        use crate::engine::Act;
        let data = crate::data::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/sample.csv"),
        )
        .unwrap()
        .select(&(0..40).collect::<Vec<_>>());
        let cfg = CnnConfig::six([8, 16, 32], Act::Gelu, 0.0);
        let model = Cnn::new(cfg, &mut loader::rng(4, 0), &Device::Cpu).unwrap();
        // Move the batch-norm running statistics off their initial values.
        let xs = loader::make_batch(
            &data,
            &(0..16).collect::<Vec<_>>(),
            model.layout(),
            loader::Augment::None,
            &mut loader::rng(0, 0),
            &Device::Cpu,
        )
        .unwrap();
        for _ in 0..3 {
            model
                .forward_t(&xs.images, Some(&mut loader::rng(0, 0)))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("six.onnx");
        export(&model, &out, vec![], false).unwrap();
        let onnx = assert_onnx_matches(&model, &out, &data, 1e-4);
        assert!(onnx.plan().is_some(), "{}", onnx.engine_description());
    }
}
