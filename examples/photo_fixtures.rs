//! Writes the committed sample photos under `fixtures/images/` (used by the Postman
//! collection, the page test and `tests/photos.rs`): fixture images of three classes made to
//! look like product photos (dark item on white, scaled up, off-centre on a wider canvas),
//! as JPEG, PNG and WebP. The file name is the class the model must give.
//!
//! `cargo run --release --example photo_fixtures`

use image::{DynamicImage, GrayImage, ImageFormat, Luma};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string("fixtures/sample.csv")?;
    let rows: Vec<Vec<u8>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    std::fs::create_dir_all("fixtures/images")?;
    // (class label, file name, format, scale, canvas)
    let wanted = [
        (7, "sneaker.jpg", ImageFormat::Jpeg, 240, (420, 300)),
        (1, "trouser.png", ImageFormat::Png, 180, (260, 240)),
        (9, "ankle-boot.webp", ImageFormat::WebP, 200, (300, 260)),
    ];
    for (label, name, format, side, (w, h)) in wanted {
        let row = rows
            .iter()
            .find(|r| r[0] == label)
            .expect("class in the sample");
        let inverted =
            GrayImage::from_fn(28, 28, |x, y| Luma([255 - row[1 + (y * 28 + x) as usize]]));
        let item = image::imageops::resize(
            &inverted,
            side,
            side,
            image::imageops::FilterType::CatmullRom,
        );
        let mut canvas = GrayImage::from_pixel(w, h, Luma([255]));
        image::imageops::replace(
            &mut canvas,
            &item,
            i64::from(w - side) / 3,
            i64::from(h - side) / 2,
        );
        let img = DynamicImage::ImageRgb8(DynamicImage::ImageLuma8(canvas).to_rgb8());
        let path = format!("fixtures/images/{name}");
        if format == ImageFormat::Jpeg {
            let mut out = std::fs::File::create(&path)?;
            img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, 80,
            ))?;
        } else {
            img.save_with_format(&path, format)?;
        }
        println!("{path}");
    }
    Ok(())
}
