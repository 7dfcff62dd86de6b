//! Splitting, shuffling, augmenting and batching — all driven by one seed, so a run can be
//! repeated (or resumed) exactly.

use crate::data::Dataset;
use candle_core::{Device, Tensor};
use fmnist::classes::{IMAGE_PIXELS, IMAGE_SIDE};
use fmnist::preprocess::{push_image, scale_pixels, InputLayout};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A reproducible random stream for one purpose (`stream` keeps purposes independent).
pub fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// Random streams, by purpose.
pub mod streams {
    pub const SPLIT: u64 = 1;
    pub const INIT: u64 = 2;
    /// Epoch `e` uses `EPOCH_BASE + e` for its order, augmentation and dropout.
    pub const EPOCH_BASE: u64 = 1000;
}

/// Splits rows into (train, validation), stratified by class so every class is represented
/// in both in proportion. `fraction` is the share held out for validation.
pub fn split(data: &Dataset, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut r = rng(seed, streams::SPLIT);
    let mut train = Vec::new();
    let mut val = Vec::new();
    for class in 0..fmnist::NUM_CLASSES as u8 {
        let mut rows: Vec<usize> = (0..data.len())
            .filter(|&i| data.labels[i] == class)
            .collect();
        rows.shuffle(&mut r);
        let n_val = ((rows.len() as f64) * fraction).round() as usize;
        val.extend_from_slice(&rows[..n_val]);
        train.extend_from_slice(&rows[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// Training-time augmentation.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// Images as they are.
    None,
    /// Random horizontal flips.
    Flip,
    /// Random horizontal flips and shifts of up to 2 pixels in each direction.
    FlipShift,
}

/// Writes one augmented image (u8 → 0–1 values) into `out`.
fn augmented(src: &[u8], aug: Augment, r: &mut ChaCha8Rng, out: &mut Vec<f32>) {
    let (flip, dy, dx) = match aug {
        Augment::None => (false, 0, 0),
        Augment::Flip => (r.random_bool(0.5), 0, 0),
        Augment::FlipShift => (
            r.random_bool(0.5),
            r.random_range(-2i32..=2),
            r.random_range(-2i32..=2),
        ),
    };
    if !flip && dy == 0 && dx == 0 {
        scale_pixels(src, out);
        return;
    }
    let side = IMAGE_SIDE as i32;
    for y in 0..side {
        for x in 0..side {
            let sy = y - dy;
            let sx0 = x - dx;
            let sx = if flip { side - 1 - sx0 } else { sx0 };
            let v = if (0..side).contains(&sy) && (0..side).contains(&sx) {
                src[(sy * side + sx) as usize] as f32 / 255.0
            } else {
                0.0
            };
            out.push(v);
        }
    }
}

/// One mini-batch: the input tensor and the labels.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub len: usize,
}

/// The order of training rows in epoch `epoch` (0-based).
pub fn epoch_order(rows: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut order = rows.to_vec();
    order.shuffle(&mut rng(seed, streams::EPOCH_BASE + epoch as u64));
    order
}

/// Builds a batch from the given rows. The last batch of an epoch may be short; it is used,
/// not dropped, so every image is seen each epoch.
pub fn make_batch(
    data: &Dataset,
    rows: &[usize],
    layout: InputLayout,
    aug: Augment,
    r: &mut ChaCha8Rng,
    device: &Device,
) -> candle_core::Result<Batch> {
    let mut values = Vec::with_capacity(rows.len() * layout.values_per_image());
    let mut unit = Vec::with_capacity(IMAGE_PIXELS);
    let mut labels = Vec::with_capacity(rows.len());
    for &row in rows {
        unit.clear();
        augmented(data.image(row), aug, r, &mut unit);
        push_image(&unit, layout, &mut values);
        labels.push(data.labels[row] as u32);
    }
    Ok(Batch {
        images: Tensor::from_vec(values, layout.batch_shape(rows.len()), device)?,
        labels: Tensor::from_vec(labels, rows.len(), device)?,
        len: rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize) -> Dataset {
        Dataset {
            images: (0..n * IMAGE_PIXELS).map(|i| (i % 256) as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
        }
    }

    #[test]
    fn split_is_seeded_disjoint_and_stratified() {
        let d = toy(200);
        let (t1, v1) = split(&d, 0.2, 7);
        let (t2, v2) = split(&d, 0.2, 7);
        assert_eq!((t1.clone(), v1.clone()), (t2, v2));
        assert_eq!(v1.len(), 40);
        assert_eq!(t1.len() + v1.len(), 200);
        assert!(v1.iter().all(|i| !t1.contains(i)));
        let val = d.select(&v1);
        assert!(val.class_counts().iter().all(|&c| c == 4));
        let (_, v3) = split(&d, 0.2, 8);
        assert_ne!(v1, v3, "a different seed gives a different split");
    }

    #[test]
    fn epochs_shuffle_differently_but_reproducibly() {
        let rows: Vec<usize> = (0..100).collect();
        assert_eq!(epoch_order(&rows, 1, 0), epoch_order(&rows, 1, 0));
        assert_ne!(epoch_order(&rows, 1, 0), epoch_order(&rows, 1, 1));
        let mut sorted = epoch_order(&rows, 1, 3);
        sorted.sort_unstable();
        assert_eq!(sorted, rows);
    }

    #[test]
    fn flip_mirrors_rows() {
        let src: Vec<u8> = (0..IMAGE_PIXELS).map(|i| (i % IMAGE_SIDE) as u8).collect();
        let mut r = rng(0, 0);
        // Draw until a flip happens; the first row must then read 27, 26, ...
        for _ in 0..64 {
            let mut out = Vec::new();
            augmented(&src, Augment::Flip, &mut r, &mut out);
            if out[0] != 0.0 {
                assert_eq!(out[0], 27.0 / 255.0);
                assert_eq!(out[27], 0.0);
                return;
            }
        }
        panic!("no flip in 64 draws");
    }

    #[test]
    fn last_short_batch_is_kept() {
        let d = toy(10);
        let mut r = rng(0, 0);
        let b = make_batch(
            &d,
            &[7, 8, 9],
            InputLayout::Gray,
            Augment::None,
            &mut r,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(b.images.dims(), &[3, 1, 28, 28]);
        assert_eq!(b.labels.to_vec1::<u32>().unwrap(), vec![7, 8, 9]);
    }
}
