//! Image uploads: decoding off the async threads with a bound on how many run at once, and
//! the `multipart/form-data` form. The conversion itself is [`crate::photo`], shared with
//! `fmnist-train predict`.

use super::error::ApiError;
use super::infer::InferRequest;
use crate::photo::{photo_pixels, DecodeLimits};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Decodes uploaded images, at most `permits` at a time.
#[derive(Debug, Clone)]
pub struct Decoder {
    permits: Arc<Semaphore>,
    limits: DecodeLimits,
}

impl Decoder {
    pub fn new(concurrent: usize, limits: DecodeLimits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrent.max(1))),
            limits,
        }
    }

    /// The 784 gray pixels (0–255) of each file, in order. Each decode holds a permit and
    /// runs on tokio's blocking pool: a 12-megapixel JPEG takes ~100 ms of CPU, which would
    /// stall every connection on an async thread.
    pub async fn pixels(&self, files: Vec<Bytes>) -> Result<Vec<Vec<u8>>, ApiError> {
        let n = files.len();
        let mut out = Vec::with_capacity(n);
        for (i, file) in files.into_iter().enumerate() {
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|_| ApiError::ShuttingDown)?;
            let limits = self.limits;
            let decoded = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                photo_pixels(&file, limits)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("image decoding failed: {e}")))?;
            out.push(decoded.map_err(|e| number(ApiError::from(e), i, n))?);
        }
        Ok(out)
    }
}

impl Decoder {
    /// The 0–1 pixels of a decoded v2 request, taken out of it: its FP32 values, or its
    /// `BYTES` image files decoded.
    pub async fn request_pixels(&self, req: &mut InferRequest) -> Result<Vec<f32>, ApiError> {
        if req.photos.is_empty() {
            return Ok(std::mem::take(&mut req.pixels));
        }
        let files = std::mem::take(&mut req.photos)
            .into_iter()
            .map(Bytes::from)
            .collect();
        Ok(unit_pixels(&self.pixels(files).await?))
    }
}

/// 0–255 gray pixels of decoded images → the model's 0–1 input.
pub fn unit_pixels(images: &[Vec<u8>]) -> Vec<f32> {
    images
        .iter()
        .flatten()
        .map(|&v| f32::from(v) / 255.0)
        .collect()
}

/// Prefixes "image i: " to the message when a request carries several images.
fn number(e: ApiError, i: usize, n: usize) -> ApiError {
    if n < 2 {
        return e;
    }
    let m = format!("image {i}: {e}");
    match e {
        ApiError::ImageTooLarge(_) => ApiError::ImageTooLarge(m),
        ApiError::UnsupportedImage(_) => ApiError::UnsupportedImage(m),
        ApiError::Unprocessable(_) => ApiError::Unprocessable(m),
        other => other,
    }
}

/// The boundary parameter of a `multipart/form-data` Content-Type (400 when missing).
pub fn boundary(content_type: &str) -> Result<String, ApiError> {
    multer::parse_boundary(content_type).map_err(|e| {
        ApiError::BadRequest(format!(
            "multipart/form-data needs a boundary parameter: {e}"
        ))
    })
}

/// The `file` parts of a collected form body, in order (at least one, at most
/// `max_images`). Other field names are refused (422), as unknown JSON fields are.
pub async fn form_files(
    body: Bytes,
    boundary: &str,
    max_images: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut files = Vec::new();
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::BadRequest(format!("malformed multipart/form-data: {e}")))?;
        let Some(field) = field else {
            break;
        };
        let name = field.name().unwrap_or("").to_string();
        if name != "file" {
            let shown: String = name.chars().take(40).collect();
            return Err(ApiError::Unprocessable(format!(
                "unknown form field {shown:?}; upload images as \"file\" parts"
            )));
        }
        if files.len() == max_images {
            return Err(ApiError::Unprocessable(format!(
                "the form has more than {max_images} files; at most {max_images} per request"
            )));
        }
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::BadRequest(format!("malformed multipart/form-data: {e}")))?;
        files.push(data);
    }
    if files.is_empty() {
        return Err(ApiError::Unprocessable(
            "the form has no \"file\" part".into(),
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &[u8])]) -> Bytes {
        let mut b = Vec::new();
        for (name, data) in parts {
            b.extend_from_slice(
                format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").as_bytes(),
            );
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        Bytes::from(b)
    }

    #[tokio::test]
    async fn form_parts_come_back_in_order_and_other_fields_are_refused() {
        let files = form_files(form(&[("file", b"one"), ("file", b"two")]), "XyZ", 4)
            .await
            .unwrap();
        assert_eq!(files, vec![Bytes::from("one"), Bytes::from("two")]);
        let e = form_files(form(&[("photo", b"x")]), "XyZ", 4)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("\"photo\""), "{e}");
        let e = form_files(form(&[("file", b"a"), ("file", b"b")]), "XyZ", 1)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 422);
        let e = form_files(Bytes::from("--XyZ--\r\n"), "XyZ", 4)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no \"file\""), "{e}");
        let e = form_files(Bytes::from("garbage"), "XyZ", 4)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 400, "{e}");
        assert_eq!(boundary("multipart/form-data").unwrap_err().status(), 400);
        assert_eq!(
            boundary("multipart/form-data; boundary=XyZ").unwrap(),
            "XyZ"
        );
    }
}
