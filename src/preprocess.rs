//! Pixels → model input, shared by training and serving.
//!
//! Every model fmnist writes takes pixels scaled to 0–1 and normalises inside its own graph,
//! so the only work outside the model is scaling, and — for models that want 3×S×S input,
//! such as VGG16 — a bilinear resize and gray→RGB channel replication. Both are written by
//! hand here, with PyTorch's `interpolate(mode="bilinear", align_corners=False)` semantics,
//! so that a model trained in PyTorch or in fmnist sees exactly the same numbers.

use crate::classes::{IMAGE_PIXELS, IMAGE_SIDE};
use candle_core::{Device, Tensor};

/// ImageNet channel means (RGB), as used by torchvision's pretrained models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Mean of Fashion-MNIST training pixels scaled to 0–1 (used inside the CNN graph).
pub const FMNIST_MEAN: f32 = 0.2860;
/// Standard deviation of Fashion-MNIST training pixels scaled to 0–1.
pub const FMNIST_STD: f32 = 0.3530;

/// The input a model wants, derived from its declared input shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLayout {
    /// `[N, 784]`: flat rows of pixels.
    Flat,
    /// `[N, 1, 28, 28]`: one gray channel.
    Gray,
    /// `[N, 3, size, size]`: resized and replicated to three channels.
    Rgb { size: usize },
}

impl InputLayout {
    /// Number of f32 values one image occupies in this layout.
    pub fn values_per_image(&self) -> usize {
        match self {
            InputLayout::Flat | InputLayout::Gray => IMAGE_PIXELS,
            InputLayout::Rgb { size } => 3 * size * size,
        }
    }

    /// The shape with a symbolic batch dimension, e.g. `[N,1,28,28]`.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.batch_shape(1)[1..]
            .iter()
            .map(|d| d.to_string())
            .collect();
        format!("[N,{}]", dims.join(","))
    }

    /// The tensor shape for a batch of `n` images.
    pub fn batch_shape(&self, n: usize) -> Vec<usize> {
        match self {
            InputLayout::Flat => vec![n, IMAGE_PIXELS],
            InputLayout::Gray => vec![n, 1, IMAGE_SIDE, IMAGE_SIDE],
            InputLayout::Rgb { size } => vec![n, 3, *size, *size],
        }
    }
}

/// Scales 0–255 pixels to 0–1.
pub fn scale_pixels(pixels: &[u8], out: &mut Vec<f32>) {
    out.extend(pixels.iter().map(|&p| p as f32 / 255.0));
}

/// Bilinear resize of one `h×w` plane to `out_h×out_w`, with PyTorch's
/// `align_corners=False` (half-pixel) rule and no antialiasing: the source coordinate of
/// output pixel `o` is `(o + 0.5) * in / out - 0.5`, clamped at 0 below, and the upper
/// neighbour is clamped to the last row/column.
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(src.len(), h * w, "resize_bilinear: plane is not {h}x{w}");
    let ys = axis_weights(h, out_h);
    let xs = axis_weights(w, out_w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, ly) in &ys {
        let row0 = &src[y0 * w..(y0 + 1) * w];
        let row1 = &src[y1 * w..(y1 + 1) * w];
        for &(x0, x1, lx) in &xs {
            let top = row0[x0] * (1.0 - lx) + row0[x1] * lx;
            let bottom = row1[x0] * (1.0 - lx) + row1[x1] * lx;
            out.push(top * (1.0 - ly) + bottom * ly);
        }
    }
    out
}

/// For each output index along one axis: (lower source index, upper source index, weight of
/// the upper one).
fn axis_weights(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

/// Appends one image (784 values in 0–1) to `out` in the given layout: unchanged for the
/// gray layouts, resized to `size×size` and replicated to three channels for RGB.
pub fn push_image(unit_pixels: &[f32], layout: InputLayout, out: &mut Vec<f32>) {
    debug_assert_eq!(unit_pixels.len(), IMAGE_PIXELS);
    match layout {
        InputLayout::Flat | InputLayout::Gray => out.extend_from_slice(unit_pixels),
        InputLayout::Rgb { size } => {
            let plane = if size == IMAGE_SIDE {
                unit_pixels.to_vec()
            } else {
                resize_bilinear(unit_pixels, IMAGE_SIDE, IMAGE_SIDE, size, size)
            };
            for _ in 0..3 {
                out.extend_from_slice(&plane);
            }
        }
    }
}

/// Builds the model input for a batch of images given as 0–255 pixel rows.
pub fn batch_from_pixels(
    images: &[&[u8]],
    layout: InputLayout,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut values = Vec::with_capacity(images.len() * layout.values_per_image());
    let mut unit = Vec::with_capacity(IMAGE_PIXELS);
    for image in images {
        unit.clear();
        scale_pixels(image, &mut unit);
        push_image(&unit, layout, &mut values);
    }
    Tensor::from_vec(values, layout.batch_shape(images.len()), device)
}

/// Builds the model input for a batch of images given as 0–1 values (784 per image).
pub fn batch_from_unit(
    images: &[f32],
    layout: InputLayout,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = images.len() / IMAGE_PIXELS;
    let values = match layout {
        InputLayout::Flat | InputLayout::Gray => images.to_vec(),
        InputLayout::Rgb { .. } => {
            let mut values = Vec::with_capacity(n * layout.values_per_image());
            for image in images.chunks_exact(IMAGE_PIXELS) {
                push_image(image, layout, &mut values);
            }
            values
        }
    };
    Tensor::from_vec(values, layout.batch_shape(n), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_is_exact() {
        let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(resize_bilinear(&src, 4, 4, 4, 4), src);
    }

    #[test]
    fn upsample_matches_pytorch_half_pixel_rule() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]),
        //     size=4, mode="bilinear", align_corners=False)
        let src = [0.0, 1.0, 2.0, 3.0];
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        let got = resize_bilinear(&src, 2, 2, 4, 4);
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn downsample_by_two_averages_pairs() {
        // align_corners=False at exactly half size samples between pixel pairs.
        let src = [0.0, 2.0, 4.0, 6.0];
        assert_eq!(resize_bilinear(&src, 1, 4, 1, 2), vec![1.0, 5.0]);
    }

    #[test]
    fn rgb_layout_replicates_the_resized_plane() {
        let pixels: Vec<u8> = (0..784).map(|i| (i % 256) as u8).collect();
        let t = batch_from_pixels(&[&pixels], InputLayout::Rgb { size: 32 }, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 32, 32]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[..1024], v[1024..2048]);
        assert_eq!(v[..1024], v[2048..]);
    }

    #[test]
    fn gray_layout_scales_to_unit_range() {
        let pixels = vec![255u8; 784];
        let t = batch_from_pixels(&[&pixels, &pixels], InputLayout::Gray, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 1, 28, 28]);
        let max = t.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(max, 1.0);
    }
}
