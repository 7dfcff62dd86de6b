//! Photos → the 28×28 gray picture a Fashion-MNIST model expects, shared by the server
//! (`/predict` image bodies, multipart uploads, base64 fields, v2 `BYTES` inputs) and by
//! `fmnist-train predict`.
//!
//! Zalando made Fashion-MNIST from product photos on light backgrounds with six steps: trim the
//! background edges, resize the longest edge to 28 px, sharpen, extend the shorter edge to 28
//! centred, negate, convert to 8-bit gray. [`to_fashion_mnist`] follows them, in this order:
//!
//! 1. **Gray, alpha flattened onto white.** A transparent cut-out is a product on a light
//!    background, which is what the data set was made from. Luma is ITU-R BT.601
//!    (0.299 R + 0.587 G + 0.114 B).
//! 2. **Orientation.** The EXIF orientation of JPEG and WebP files is applied, as a phone
//!    camera means it.
//! 3. **Negate when the background is light.** The background is the median of the border
//!    pixels. Light (above mid-gray) is inverted so that the item is light on black as in the
//!    data set; an image that is already light-on-dark (a drawing, a data set image) passes
//!    through. Zalando negated every photo at the end; negating first is equivalent (every
//!    later step is linear or commutes with it) and lets the trim compare against black.
//! 4. **Trim** the rows and columns whose pixels all lie within 5 % (13 levels) of the
//!    background, as Zalando did against the corner colour. Deviation: the border median is
//!    used instead of one corner, so one dark corner pixel or JPEG ringing does not stop it.
//! 5. **Resize** so the longest edge is 28 px. Deviation: Zalando skipped rows and columns
//!    (nearest neighbour), which aliases badly on multi-megapixel photos; this uses a
//!    triangle filter whose support widens with the scale factor (an area-weighted average).
//!    The photo test (`tests/photos.rs`) passes with it; nearest was not compared there.
//! 6. **Sharpen** with PIL's `SHARPEN` 3×3 kernel, as Zalando did.
//! 7. **Extend** the shorter edge to 28, centred, with black.
//!
//! Decoding bounds: the image crate's [`Limits`] (maximum side and decoded bytes) are set
//! before any pixel buffer is allocated, so a decompression bomb is refused from its header;
//! a JPEG without its end-of-image marker is refused (the decoder would fill the missing
//! rows with gray); the format is sniffed from the content, never taken from a label.

use crate::classes::{IMAGE_PIXELS, IMAGE_SIDE};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits};
use std::io::Cursor;

/// The default decoding bounds: sides up to 12,000 px and 96 MiB of decoded pixels (a
/// 33-megapixel RGB photo; a 12-megapixel phone photo is 36 MiB). Why 96: with the server's
/// two concurrent decodes, eight uploads of a photo at this bound peaked at 381–398 MB of RSS
/// (RELIABILITY.md), inside the Deployment's 512 MiB limit.
pub const DEFAULT_LIMITS: DecodeLimits = DecodeLimits {
    max_side: 12_000,
    max_decoded_bytes: 96 << 20,
};

/// Bounds on one decode, checked from the file's header before pixels are allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest width or height, in pixels.
    pub max_side: u32,
    /// Largest decoded image, in bytes (width × height × bytes per pixel).
    pub max_decoded_bytes: u64,
}

/// Why an image was refused. Each maps to one HTTP status in the server: 413, 415, 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhotoError {
    /// Over the dimension or decoded-size bound (a decompression bomb, or a huge photo).
    #[error("{0}")]
    TooLarge(String),
    /// Not PNG, JPEG, WebP, GIF or BMP, or a variant of one that the decoder does not support.
    #[error("{0}")]
    Unsupported(String),
    /// Corrupt or truncated.
    #[error("{0}")]
    Corrupt(String),
}

/// The formats accepted, by their magic bytes. Browsers label upload parts by file
/// extension, so the label is never trusted.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    match bytes {
        [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(ImageFormat::Png),
        [0xFF, 0xD8, 0xFF, ..] => Some(ImageFormat::Jpeg),
        [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(ImageFormat::Gif),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(ImageFormat::WebP),
        [b'B', b'M', ..] => Some(ImageFormat::Bmp),
        _ => None,
    }
}

fn name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "PNG",
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Gif => "GIF",
        ImageFormat::WebP => "WebP",
        ImageFormat::Bmp => "BMP",
        _ => "image",
    }
}

/// A JPEG's last scan must be followed by the end-of-image marker (FF D9). Inside
/// entropy-coded data a 0xFF byte is always stuffed (FF 00) or a restart marker, so FF D9
/// after the last start-of-scan (FF DA) is the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

fn decode_error(format: &str, e: ImageError) -> PhotoError {
    match e {
        ImageError::Limits(l) => {
            PhotoError::TooLarge(format!("the {format} image is too large: {l}"))
        }
        ImageError::Unsupported(u) => PhotoError::Unsupported(format!(
            "this {format} file uses a feature not supported: {u}"
        )),
        other => PhotoError::Corrupt(format!(
            "the {format} file is corrupt or truncated: {other}"
        )),
    }
}

/// Decodes an image file into gray pixels, alpha flattened onto white and the EXIF
/// orientation applied, within `limits`.
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<GrayImage, PhotoError> {
    let Some(format) = sniff(bytes) else {
        let what = match image::guess_format(bytes) {
            Ok(f) => format!("a {f:?} image"),
            Err(_) if bytes.is_empty() => "empty".to_string(),
            Err(_) => {
                let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
                format!("not an image (it starts with {})", head.join(" "))
            }
        };
        return Err(PhotoError::Unsupported(format!(
            "the file is {what}; accepted formats are PNG, JPEG, WebP, GIF and BMP"
        )));
    };
    let fname = name(format);
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(PhotoError::Corrupt(
            "the JPEG file is truncated: it has no end-of-image marker after its last scan".into(),
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(l);
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(fname, e))?;
    let (w, h) = decoder.dimensions();
    if decoder.total_bytes() > limits.max_decoded_bytes {
        return Err(PhotoError::TooLarge(format!(
            "the {fname} image is {w}×{h} ({} MiB decoded); the limit is {} MiB",
            decoder.total_bytes() >> 20,
            limits.max_decoded_bytes >> 20
        )));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(fname, e))?;
    let mut gray = DynamicImage::ImageLuma8(flatten_gray(img));
    gray.apply_orientation(orientation);
    Ok(gray.into_luma8())
}

/// BT.601 luma with alpha composited onto white.
fn flatten_gray(img: DynamicImage) -> GrayImage {
    let luma =
        |r: u8, g: u8, b: u8| 0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b);
    let over_white = |v: f32, a: u8| {
        let a = f32::from(a) / 255.0;
        (v * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8
    };
    match img {
        DynamicImage::ImageLuma8(g) => g,
        DynamicImage::ImageRgb8(rgb) => GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            let p = rgb.get_pixel(x, y).0;
            image::Luma([luma(p[0], p[1], p[2]).round().clamp(0.0, 255.0) as u8])
        }),
        DynamicImage::ImageLumaA8(la) => GrayImage::from_fn(la.width(), la.height(), |x, y| {
            let p = la.get_pixel(x, y).0;
            image::Luma([over_white(f32::from(p[0]), p[1])])
        }),
        other => {
            let rgba = other.into_rgba8();
            GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
                let p = rgba.get_pixel(x, y).0;
                image::Luma([over_white(luma(p[0], p[1], p[2]), p[3])])
            })
        }
    }
}

/// How far (in gray levels) a pixel may be from the background and still be trimmed: 5 %.
const TRIM_TOLERANCE: i16 = 13;

/// PIL's `ImageFilter.SHARPEN`, which Zalando applied.
const SHARPEN: [f32; 9] = [
    -2.0 / 16.0,
    -2.0 / 16.0,
    -2.0 / 16.0,
    -2.0 / 16.0,
    32.0 / 16.0,
    -2.0 / 16.0,
    -2.0 / 16.0,
    -2.0 / 16.0,
    -2.0 / 16.0,
];

/// [`SHARPEN`] with the edge pixels repeated outward (image's `filter3x3` leaves the border
/// black, which on a 28-px picture erases the item's outline).
fn sharpen(img: &GrayImage) -> GrayImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let at = |x: i64, y: i64| {
        f32::from(
            img.get_pixel(x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32)
                .0[0],
        )
    };
    GrayImage::from_fn(img.width(), img.height(), |x, y| {
        let (x, y) = (i64::from(x), i64::from(y));
        let mut acc = 0.0;
        for (i, k) in SHARPEN.iter().enumerate() {
            acc += k * at(x + i as i64 % 3 - 1, y + i as i64 / 3 - 1);
        }
        image::Luma([acc.round().clamp(0.0, 255.0) as u8])
    })
}

/// The median of the border pixels.
fn background(img: &GrayImage) -> u8 {
    let (w, h) = img.dimensions();
    let mut border: Vec<u8> = Vec::with_capacity(2 * (w + h) as usize);
    for x in 0..w {
        border.push(img.get_pixel(x, 0).0[0]);
        border.push(img.get_pixel(x, h - 1).0[0]);
    }
    for y in 0..h {
        border.push(img.get_pixel(0, y).0[0]);
        border.push(img.get_pixel(w - 1, y).0[0]);
    }
    border.sort_unstable();
    border[border.len() / 2]
}

/// The bounding box (x, y, w, h) of the pixels further than the tolerance from `bg`, or the
/// whole image when there are none.
fn content_box(img: &GrayImage, bg: u8) -> (u32, u32, u32, u32) {
    let (w, h) = img.dimensions();
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for (x, y, p) in img.enumerate_pixels() {
        if (i16::from(p.0[0]) - i16::from(bg)).abs() > TRIM_TOLERANCE {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (0, 0, w, h)
    } else {
        (x0, y0, x1 - x0 + 1, y1 - y0 + 1)
    }
}

/// The conversion steps of the module documentation, on a decoded gray image: 784 pixels
/// 0–255, row-major, light item on black. Takes the image by value and works in place (the
/// crop is a view), so a decode's peak memory is its decoded image plus one gray copy.
pub fn to_fashion_mnist(mut img: GrayImage) -> Vec<u8> {
    let side = IMAGE_SIDE as u32;
    if img.width() == 0 || img.height() == 0 {
        return vec![0; IMAGE_PIXELS];
    }
    let mut bg = background(&img);
    if bg > 127 {
        image::imageops::invert(&mut img);
        bg = 255 - bg;
    }
    let (x, y, w, h) = content_box(&img, bg);
    let cropped = image::imageops::crop_imm(&img, x, y, w, h);
    let long = w.max(h);
    let scale = |v: u32| {
        ((u64::from(v) * u64::from(side) + u64::from(long) / 2) / u64::from(long))
            .clamp(1, u64::from(side)) as u32
    };
    let (nw, nh) = (scale(w), scale(h));
    let small = image::imageops::resize(&*cropped, nw, nh, FilterType::Triangle);
    let sharp = sharpen(&small);
    let mut out = GrayImage::new(side, side);
    image::imageops::replace(
        &mut out,
        &sharp,
        i64::from((side - nw) / 2),
        i64::from((side - nh) / 2),
    );
    out.into_raw()
}

/// Decode + convert: what the server and `fmnist-train predict` run on an uploaded file.
pub fn photo_pixels(bytes: &[u8], limits: DecodeLimits) -> Result<Vec<u8>, PhotoError> {
    decode(bytes, limits).map(to_fashion_mnist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgba, RgbaImage};

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    fn jpeg(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
        out
    }

    /// PNG's chunk CRC (CRC-32, bitwise).
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// A dark 40×20 bar on a white 200×100 canvas, off-centre.
    fn product_photo() -> GrayImage {
        GrayImage::from_fn(200, 100, |x, y| {
            Luma([if (30..70).contains(&x) && (50..70).contains(&y) {
                20
            } else {
                250
            }])
        })
    }

    #[test]
    fn formats_are_sniffed_by_content() {
        let img = DynamicImage::ImageLuma8(product_photo());
        assert_eq!(sniff(&png(&img)), Some(ImageFormat::Png));
        assert_eq!(sniff(&jpeg(&img)), Some(ImageFormat::Jpeg));
        assert_eq!(sniff(b"GIF89a...."), Some(ImageFormat::Gif));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(ImageFormat::WebP));
        assert_eq!(sniff(b"{\"image\": []}"), None);
        let e = decode(b"II*\0\x08\0\0\0", DEFAULT_LIMITS).unwrap_err();
        assert!(
            matches!(&e, PhotoError::Unsupported(m) if m.contains("Tiff")),
            "{e}"
        );
        let e = decode(b"hello", DEFAULT_LIMITS).unwrap_err();
        assert!(
            matches!(&e, PhotoError::Unsupported(m) if m.contains("68 65 6c 6c 6f")),
            "{e}"
        );
    }

    #[test]
    fn a_light_background_is_trimmed_negated_and_centred() {
        let px = to_fashion_mnist(product_photo());
        // The 40×20 bar fills the width and half the height, centred: rows 7..21.
        let at = |x: usize, y: usize| px[y * 28 + x];
        assert!(at(14, 14) > 200, "item light: {}", at(14, 14));
        assert!(at(14, 2) < 10 && at(14, 25) < 10, "background black");
        assert!(
            at(0, 14) > 150 && at(27, 14) > 150,
            "the bar spans the width"
        );
    }

    #[test]
    fn light_on_dark_passes_through() {
        // A data-set-like image (light item on black) stays as it is, up to the sharpen.
        let img = GrayImage::from_fn(28, 28, |x, _| {
            Luma([if (4..24).contains(&x) { 200 } else { 0 }])
        });
        let px = to_fashion_mnist(img);
        assert!(px[14 * 28 + 14] >= 190 && px[14 * 28 + 1] == 0);
    }

    #[test]
    fn alpha_is_flattened_onto_white() {
        // A transparent canvas with an opaque dark 20×10 bar: the transparent part is
        // background, so the bar becomes a light 28×14 band on black.
        let img = RgbaImage::from_fn(60, 60, |x, y| {
            if (20..40).contains(&x) && (25..35).contains(&y) {
                Rgba([10, 10, 10, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let px = photo_pixels(&png(&DynamicImage::ImageRgba8(img)), DEFAULT_LIMITS).unwrap();
        assert!(px[14 * 28 + 14] > 200 && px[0] == 0);
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 40×20 JPEG whose left half is dark, tagged "rotate 90° clockwise" (orientation 6):
        // shown upright it is 20×40 with the dark half on top.
        let img = GrayImage::from_fn(40, 20, |x, _| Luma([if x < 20 { 0 } else { 255 }]));
        let plain = jpeg(&DynamicImage::ImageLuma8(img));
        // An APP1 Exif segment with one IFD0 entry: Orientation (0x0112) = 6.
        let tiff: &[u8] = &[
            b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0,
            0, 0, 0,
        ];
        let mut app1 = vec![0xFF, 0xE1];
        let len = (2 + 6 + tiff.len()) as u16;
        app1.extend_from_slice(&len.to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(tiff);
        let mut tagged = plain[..2].to_vec();
        tagged.extend_from_slice(&app1);
        tagged.extend_from_slice(&plain[2..]);
        let g = decode(&tagged, DEFAULT_LIMITS).unwrap();
        assert_eq!(g.dimensions(), (20, 40));
        assert!(g.get_pixel(10, 5).0[0] < 60 && g.get_pixel(10, 35).0[0] > 200);
    }

    #[test]
    fn bombs_truncation_and_corruption_get_their_own_errors() {
        let img = DynamicImage::ImageLuma8(product_photo());
        // A PNG whose header claims 100,000 × 100,000: refused from the header.
        let mut bomb = png(&img);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode(&bomb, DEFAULT_LIMITS).unwrap_err();
        assert!(matches!(e, PhotoError::TooLarge(_)), "{e}");
        // Within the side limit but over the decoded-bytes bound.
        let small = DecodeLimits {
            max_side: 12_000,
            max_decoded_bytes: 10_000,
        };
        let e = decode(&png(&img), small).unwrap_err();
        assert!(
            matches!(&e, PhotoError::TooLarge(m) if m.contains("200×100")),
            "{e}"
        );
        // Truncated JPEG: no end marker.
        let j = jpeg(&img);
        let e = decode(&j[..j.len() * 2 / 3], DEFAULT_LIMITS).unwrap_err();
        assert!(
            matches!(&e, PhotoError::Corrupt(m) if m.contains("truncated")),
            "{e}"
        );
        // Truncated PNG.
        let p = png(&img);
        let e = decode(&p[..p.len() / 2], DEFAULT_LIMITS).unwrap_err();
        assert!(
            matches!(&e, PhotoError::Corrupt(m) if m.contains("PNG")),
            "{e}"
        );
        // Garbage after a valid magic.
        let mut g = b"GIF89a".to_vec();
        g.extend_from_slice(&[0xAB; 40]);
        assert!(matches!(
            decode(&g, DEFAULT_LIMITS),
            Err(PhotoError::Corrupt(_))
        ));
        // The label is irrelevant; the content decides.
        assert!(decode(&j, DEFAULT_LIMITS).is_ok());
    }
}
