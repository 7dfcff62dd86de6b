//! The ten Fashion-MNIST classes, in label order (label `i` is `CLASS_NAMES[i]`).

/// Number of classes in Fashion-MNIST.
pub const NUM_CLASSES: usize = 10;

/// Class names in label order, as published with the data set.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Side of a Fashion-MNIST image in pixels.
pub const IMAGE_SIDE: usize = 28;
/// Pixels in one Fashion-MNIST image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

/// The class name of a label, or `None` for a label outside 0–9.
pub fn class_name(label: usize) -> Option<&'static str> {
    CLASS_NAMES.get(label).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_label_order() {
        assert_eq!(class_name(0), Some("T-shirt/top"));
        assert_eq!(class_name(9), Some("Ankle boot"));
        assert_eq!(class_name(10), None);
    }
}
