//! Writes a large test photo (default 6000 × 4000 RGB JPEG, 24 megapixels, 69 MiB decoded):
//! a dark shape on a light, noisy background, for measuring the server's memory while it
//! decodes uploads (RELIABILITY.md, "Image uploads").
//!
//! `cargo run --release --example big_photo -- OUT.jpg [WIDTH HEIGHT]`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .ok_or("usage: big_photo OUT.jpg [WIDTH HEIGHT]")?;
    let w: u32 = args.next().map_or(Ok(6000), |v| v.parse())?;
    let h: u32 = args.next().map_or(Ok(4000), |v| v.parse())?;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let noise = ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) >> 28) as u8;
        let inside =
            (x as f32 / w as f32 - 0.5).abs() < 0.2 && (y as f32 / h as f32 - 0.5).abs() < 0.35;
        let v = if inside { 40 + noise } else { 230 + noise };
        image::Rgb([v, v, v.saturating_sub(10)])
    });
    let mut file = std::fs::File::create(&out)?;
    image::DynamicImage::ImageRgb8(img).write_with_encoder(
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 85),
    )?;
    println!("{out}: {w}x{h}");
    Ok(())
}
