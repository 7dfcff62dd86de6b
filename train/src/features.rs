//! A file cache of backbone features, so the frozen VGG16 runs once per image, not per epoch.
//!
//! VGG16 at 224×224 costs hundreds of milliseconds per image on a laptop CPU; the head trains
//! on the cached features in seconds per epoch. A cache file holds what it was made from
//! (weights SHA-256, input size, feature kind, data file and its SHA-256, image count) and is
//! used only when all of it matches: anything else is rebuilt, never silently reused.
//!
//! Layout: `FMNFEAT1`, the header length (u64 LE), the JSON header, then `rows × dim` f32 LE
//! values in data-row order. Extraction appends to `<file>.partial` batch by batch, so an
//! interrupted run (Ctrl-C, crash) resumes at the first missing row; the finished file is
//! renamed into place.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FMNFEAT1";

/// What a cache was made from. Two caches are interchangeable only when these are equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    /// SHA-256 of the weights file.
    pub weights_sha256: String,
    /// Input side the images were resized to.
    pub input_size: usize,
    /// Which features: `fc7` (4096 after fc7's ReLU) or `gap` (global-average-pooled
    /// convolutional features).
    pub features: String,
    /// Values per image.
    pub dim: usize,
    /// The data file (as given) and its SHA-256.
    pub data_file: String,
    pub data_sha256: String,
    /// Images taken from it (after --limit).
    pub rows: usize,
}

impl CacheKey {
    /// The cache's file name in `dir`: readable prefix + a digest of the whole key.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        let digest = Sha256::digest(serde_json::to_vec(self).expect("key serialises"));
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        dir.join(format!(
            "vgg16-{}-{}px-{hex}.features",
            self.features, self.input_size
        ))
    }
}

/// What [`load_or_build`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// A complete, matching cache was read.
    Reused,
    /// Extracted from scratch (`reason` says why any old file was not used).
    Built { reason: Option<String> },
    /// An interrupted extraction was continued from this row.
    Resumed { from_row: usize },
}

/// The cached features: `rows × dim` values.
pub struct Features {
    pub values: Vec<f32>,
    pub dim: usize,
    pub origin: Origin,
}

impl Features {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Interrupting extraction (Ctrl-C) leaves the partial file to resume from.
#[derive(Debug, thiserror::Error)]
#[error("feature extraction stopped at row {done} of {total}; {partial} keeps the rows done")]
pub struct Interrupted {
    pub done: usize,
    pub total: usize,
    pub partial: String,
}

fn read_header(file: &mut impl Read) -> Result<(CacheKey, u64)> {
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("not an fmnist feature cache");
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 20 {
        bail!("header length {len} is implausible");
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let key: CacheKey = serde_json::from_slice(&header).context("header is not valid")?;
    Ok((key, 16 + len))
}

fn header_bytes(key: &CacheKey) -> Vec<u8> {
    let json = serde_json::to_vec(key).expect("key serialises");
    let mut out = Vec::with_capacity(16 + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Why the file at `path` cannot serve `key`, or its values.
fn read_complete(path: &Path, key: &CacheKey) -> Result<std::result::Result<Vec<f32>, String>> {
    let mut f = BufReader::new(File::open(path)?);
    let (found, start) = match read_header(&mut f) {
        Ok(h) => h,
        Err(e) => return Ok(Err(format!("unreadable header ({e})"))),
    };
    if &found != key {
        return Ok(Err(differences(&found, key)));
    }
    let expected = start + (key.rows * key.dim * 4) as u64;
    let len = std::fs::metadata(path)?.len();
    if len != expected {
        return Ok(Err(format!("{len} bytes, expected {expected}")));
    }
    let mut bytes = Vec::with_capacity(key.rows * key.dim * 4);
    f.read_to_end(&mut bytes)?;
    Ok(Ok(decode(&bytes)))
}

fn decode(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The fields on which two keys differ, for the "rebuilding because" message.
fn differences(found: &CacheKey, wanted: &CacheKey) -> String {
    let (a, b) = (
        serde_json::to_value(found).expect("key serialises"),
        serde_json::to_value(wanted).expect("key serialises"),
    );
    let fields: Vec<String> = a
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, v)| format!("{k} {v} (wanted {})", b[k.as_str()]))
        .collect();
    format!("made for other inputs: {}", fields.join(", "))
}

/// Returns the features for `key`, reading `path` when it matches, otherwise extracting them
/// with `extract(start, end)` (the `dim` values of rows `start..end`, in order) in batches of
/// `batch` rows. `progress(done)` is called after each batch; `stop()` is polled between
/// batches and, when true, ends the run with [`Interrupted`] (the partial file stays).
pub fn load_or_build(
    path: &Path,
    key: &CacheKey,
    batch: usize,
    mut extract: impl FnMut(usize, usize) -> Result<Vec<f32>>,
    mut progress: impl FnMut(usize),
    stop: impl Fn() -> bool,
) -> Result<Features> {
    let mut reason = None;
    if path.exists() {
        match read_complete(path, key).with_context(|| format!("reading {}", path.display()))? {
            Ok(values) => {
                return Ok(Features {
                    values,
                    dim: key.dim,
                    origin: Origin::Reused,
                })
            }
            Err(why) => reason = Some(format!("{}: {why}; rebuilding", path.display())),
        }
    }
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let row_bytes = (key.dim * 4) as u64;
    // Continue a partial file made for the same key (its rows are read back once); start
    // over otherwise. Every row ends up in `values` as well as in the file.
    let mut done = 0usize;
    let mut values: Vec<f32> = Vec::new();
    let mut file = None;
    if partial.exists() {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&partial)
            .with_context(|| format!("opening {}", partial.display()))?;
        if let Ok((found, start)) = read_header(&mut f) {
            if &found == key {
                let len = f.metadata()?.len();
                done = (((len.saturating_sub(start)) / row_bytes) as usize).min(key.rows);
                // Drop a half-written last row.
                f.set_len(start + done as u64 * row_bytes)?;
                f.seek(SeekFrom::Start(start))?;
                let mut bytes = vec![0u8; done * key.dim * 4];
                f.read_exact(&mut bytes)?;
                values = decode(&bytes);
                file = Some(f);
            }
        }
    }
    let resumed = file.is_some() && done > 0;
    let mut file = match file {
        Some(f) => f,
        None => {
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut f = File::create(&partial)
                .with_context(|| format!("creating {}", partial.display()))?;
            f.write_all(&header_bytes(key))?;
            f
        }
    };
    let origin = if resumed {
        Origin::Resumed { from_row: done }
    } else {
        Origin::Built { reason }
    };
    progress(done);
    while done < key.rows {
        if stop() {
            file.sync_all()?;
            return Err(Interrupted {
                done,
                total: key.rows,
                partial: partial.display().to_string(),
            }
            .into());
        }
        let end = (done + batch.max(1)).min(key.rows);
        let rows = extract(done, end)?;
        if rows.len() != (end - done) * key.dim {
            bail!(
                "feature extractor gave {} values for rows {done}..{end} (dim {})",
                rows.len(),
                key.dim
            );
        }
        let mut bytes = Vec::with_capacity(rows.len() * 4);
        for v in &rows {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        file.write_all(&bytes)
            .with_context(|| format!("writing {}", partial.display()))?;
        values.extend_from_slice(&rows);
        done = end;
        progress(done);
    }
    file.sync_all()?;
    drop(file);
    std::fs::rename(&partial, path)
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    Ok(Features {
        values,
        dim: key.dim,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn key(rows: usize) -> CacheKey {
        CacheKey {
            weights_sha256: "ab".repeat(32),
            input_size: 32,
            features: "gap".into(),
            dim: 3,
            data_file: "fixtures/sample.csv".into(),
            data_sha256: "cd".repeat(32),
            rows,
        }
    }

    /// Deterministic fake "features": row r → [r, r+0.5, -r].
    fn extractor(calls: &Cell<usize>) -> impl FnMut(usize, usize) -> Result<Vec<f32>> + '_ {
        move |s, e| {
            calls.set(calls.get() + (e - s));
            Ok((s..e)
                .flat_map(|r| [r as f32, r as f32 + 0.5, -(r as f32)])
                .collect())
        }
    }

    #[test]
    fn built_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(10);
        let path = k.path_in(dir.path());
        let calls = Cell::new(0);
        let f = load_or_build(&path, &k, 4, extractor(&calls), |_| {}, || false).unwrap();
        assert_eq!(f.origin, Origin::Built { reason: None });
        assert_eq!(calls.get(), 10);
        assert_eq!(f.row(7), &[7.0, 7.5, -7.0]);
        let g = load_or_build(&path, &k, 4, extractor(&calls), |_| {}, || false).unwrap();
        assert_eq!(g.origin, Origin::Reused);
        assert_eq!(calls.get(), 10, "a matching cache must not be re-extracted");
        assert_eq!(f.values, g.values);
    }

    #[test]
    fn a_cache_for_other_inputs_is_rebuilt_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("explicit.features");
        let calls = Cell::new(0);
        load_or_build(&path, &key(6), 4, extractor(&calls), |_| {}, || false).unwrap();
        // Same file name, different weights: the header disagrees, so it is rebuilt.
        let mut other = key(6);
        other.weights_sha256 = "ef".repeat(32);
        let f = load_or_build(&path, &other, 4, extractor(&calls), |_| {}, || false).unwrap();
        match &f.origin {
            Origin::Built { reason: Some(r) } => {
                assert!(
                    r.contains("weights_sha256") && r.contains("rebuilding"),
                    "{r}"
                )
            }
            o => panic!("expected a rebuild, got {o:?}"),
        }
        assert_eq!(calls.get(), 12);
        // A truncated file is rebuilt too.
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 5).unwrap();
        let f = load_or_build(&path, &other, 4, extractor(&calls), |_| {}, || false).unwrap();
        assert!(matches!(f.origin, Origin::Built { reason: Some(_) }));
        // A different key also names a different default file.
        assert_ne!(key(6).path_in(dir.path()), other.path_in(dir.path()));
    }

    #[test]
    fn an_interrupted_extraction_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(11);
        let path = k.path_in(dir.path());
        let calls = Cell::new(0);
        let batches = Cell::new(0);
        let err = load_or_build(
            &path,
            &k,
            4,
            extractor(&calls),
            |_| batches.set(batches.get() + 1),
            || batches.get() > 2, // progress(0), then two batches: stop after 8 rows
        )
        .err()
        .unwrap();
        let stopped = err.downcast_ref::<Interrupted>().unwrap();
        assert_eq!((stopped.done, stopped.total), (8, 11));
        assert!(!path.exists());
        // A torn write: half a row at the end of the partial file is dropped on resume.
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap()
            .write_all(&[1, 2, 3, 4, 5, 6])
            .unwrap();
        let f = load_or_build(&path, &k, 4, extractor(&calls), |_| {}, || false).unwrap();
        assert_eq!(f.origin, Origin::Resumed { from_row: 8 });
        assert_eq!(calls.get(), 11, "rows 0..8 must not be extracted twice");
        let fresh_dir = tempfile::tempdir().unwrap();
        let fresh = load_or_build(
            &k.path_in(fresh_dir.path()),
            &k,
            5,
            extractor(&Cell::new(0)),
            |_| {},
            || false,
        )
        .unwrap();
        assert_eq!(f.values, fresh.values);
        assert!(!partial.exists());
    }
}
