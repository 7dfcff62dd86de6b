//! Reading Fashion-MNIST: the Kaggle CSV layout (with polars) and the official IDX files.
//!
//! Every error names the file and, for CSV, the 1-based line and column of the first bad cell,
//! so a user can open the file at the spot. Lines count the header when there is one.

use fmnist::classes::{IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};
use polars::prelude::*;
use std::io::{BufRead, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const CSV_COLUMNS: usize = IMAGE_PIXELS + 1;

/// Images and labels, row-major `u8` pixels (784 per image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

/// What went wrong while reading a data file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the file holds no images")]
    Empty { path: PathBuf },
    #[error(
        "{path}, line {line}: expected {CSV_COLUMNS} columns (label + 784 pixels), found {found}"
    )]
    ColumnCount {
        path: PathBuf,
        line: usize,
        found: usize,
    },
    #[error("{path}, line {line}, column {column}: {message}")]
    Cell {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: CSV could not be read: {message}")]
    Csv { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Idx { path: PathBuf, message: String },
    #[error("{images} has {n_images} images but {labels} has {n_labels} labels")]
    Mismatch {
        images: PathBuf,
        labels: PathBuf,
        n_images: usize,
        n_labels: usize,
    },
    #[error(
        "{path}: unrecognised data file; expected a Kaggle-style .csv or an IDX images file \
         (*-images-idx3-ubyte or *-images-idx3-ubyte.gz)"
    )]
    UnknownFormat { path: PathBuf },
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 784 pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// The same images mirrored left to right (the training augmentation's flip), same labels.
    pub fn mirrored(&self) -> Dataset {
        let mut images = self.images.clone();
        for row in images.chunks_exact_mut(fmnist::classes::IMAGE_SIDE) {
            row.reverse();
        }
        Dataset {
            images,
            labels: self.labels.clone(),
        }
    }

    /// A new data set with the given rows, in that order.
    pub fn select(&self, rows: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(rows.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(rows.len());
        for &r in rows {
            images.extend_from_slice(self.image(r));
            labels.push(self.labels[r]);
        }
        Dataset { images, labels }
    }

    /// Number of images of each class.
    #[cfg(test)]
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// Loads a data file, choosing the reader from its name: `.csv` for the Kaggle layout, or an
/// IDX images file whose labels file is found beside it by the official naming
/// (`…-images-idx3-ubyte[.gz]` ↔ `…-labels-idx1-ubyte[.gz]`).
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.to_ascii_lowercase().ends_with(".csv") {
        read_csv(path)
    } else if name.contains("images-idx3") {
        let labels = path.with_file_name(name.replace("images-idx3", "labels-idx1"));
        read_idx(path, &labels)
    } else {
        Err(DataError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether the first line is a header: its first field is not a number.
fn first_line(path: &Path) -> Result<Option<String>, DataError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut line = String::new();
    let n = std::io::BufReader::new(file)
        .read_line(&mut line)
        .map_err(io_err(path))?;
    Ok((n > 0).then_some(line))
}

/// Reads the Kaggle CSV layout: `label,pixel1,…,pixel784`, header optional.
pub fn read_csv(path: &Path) -> Result<Dataset, DataError> {
    let Some(first) = first_line(path)? else {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    };
    let first_field = first.split(',').next().unwrap_or("").trim();
    let has_header = first_field.parse::<f64>().is_err();
    let header_lines = usize::from(has_header);
    let schema: Schema = (0..CSV_COLUMNS)
        .map(|c| {
            let name = if c == 0 {
                "label".to_string()
            } else {
                format!("pixel{c}")
            };
            Field::new(name.into(), DataType::Int64)
        })
        .collect();
    let read = CsvReadOptions::default()
        .with_has_header(has_header)
        .with_schema(Some(Arc::new(schema)))
        .with_raise_if_empty(false)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish());
    let df = match read {
        Ok(df) => df,
        // polars' own message names neither line nor column reliably; find the first bad
        // cell ourselves, and fall back to polars' words if the scan finds nothing.
        Err(e) => {
            scan_csv(path, header_lines)?;
            return Err(DataError::Csv {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    if df.height() == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    if df.width() != CSV_COLUMNS {
        return Err(DataError::ColumnCount {
            path: path.to_path_buf(),
            line: 1,
            found: df.width(),
        });
    }
    let n = df.height();
    let mut labels = vec![0u8; n];
    let mut images = vec![0u8; n * IMAGE_PIXELS];
    for (c, column) in df.columns().iter().enumerate() {
        let values = column
            .as_materialized_series()
            .i64()
            .map_err(|e| DataError::Csv {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let limit = if c == 0 { NUM_CLASSES as i64 - 1 } else { 255 };
        for (row, v) in values.iter().enumerate() {
            let line = row + 1 + header_lines;
            let cell = |message: String| DataError::Cell {
                path: path.to_path_buf(),
                line,
                column: c + 1,
                message,
            };
            let v = match v {
                Some(v) => v,
                // A short row: polars pads missing fields with nulls.
                None => {
                    scan_csv(path, header_lines)?;
                    return Err(cell("value is missing".into()));
                }
            };
            if !(0..=limit).contains(&v) {
                let what = if c == 0 { "label" } else { "pixel" };
                return Err(cell(format!("{what} {v} is outside 0–{limit}")));
            }
            if c == 0 {
                labels[row] = v as u8;
            } else {
                images[row * IMAGE_PIXELS + c - 1] = v as u8;
            }
        }
    }
    Ok(Dataset { images, labels })
}

/// Walks the file line by line and reports the first structural problem: a wrong number of
/// columns, or a cell that is not an integer in range. Returns `Ok` if it finds none.
fn scan_csv(path: &Path, header_lines: usize) -> Result<(), DataError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    for (i, line) in std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .skip(header_lines)
    {
        let line = line.map_err(io_err(path))?;
        let lineno = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        if fields.len() != CSV_COLUMNS {
            return Err(DataError::ColumnCount {
                path: path.to_path_buf(),
                line: lineno,
                found: fields.len(),
            });
        }
        for (c, f) in fields.iter().enumerate() {
            let limit = if c == 0 { NUM_CLASSES as i64 - 1 } else { 255 };
            let what = if c == 0 { "label" } else { "pixel" };
            let message = match f.trim().parse::<i64>() {
                Ok(v) if (0..=limit).contains(&v) => continue,
                Ok(v) => format!("{what} {v} is outside 0–{limit}"),
                Err(_) => format!("{what} {f:?} is not an integer"),
            };
            return Err(DataError::Cell {
                path: path.to_path_buf(),
                line: lineno,
                column: c + 1,
                message,
            });
        }
    }
    Ok(())
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic bytes.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Idx {
                path: path.to_path_buf(),
                message: format!("gzip data is corrupt or truncated: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file: checks the magic number and that the data is as long as the header says.
fn parse_idx(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>, DataError> {
    let fail = |message: String| DataError::Idx {
        path: path.to_path_buf(),
        message,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(fail(format!(
            "truncated IDX header: {} bytes, need {header}",
            bytes.len()
        )));
    }
    let word = |i: usize| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if word(0) != magic {
        return Err(fail(format!(
            "bad IDX magic number {:#010x}, expected {magic:#010x}",
            word(0)
        )));
    }
    let shape: Vec<usize> = (1..=dims).map(|i| word(i) as usize).collect();
    let expected = header + shape.iter().product::<usize>();
    if bytes.len() != expected {
        return Err(fail(format!(
            "truncated or oversized IDX file: header {shape:?} needs {expected} bytes, file has {}",
            bytes.len()
        )));
    }
    Ok(shape)
}

/// Reads an official IDX pair (gzipped or not).
pub fn read_idx(images_path: &Path, labels_path: &Path) -> Result<Dataset, DataError> {
    let img = read_maybe_gz(images_path)?;
    let shape = parse_idx(images_path, &img, 0x0000_0803, 3)?;
    if shape[1] != IMAGE_SIDE || shape[2] != IMAGE_SIDE {
        return Err(DataError::Idx {
            path: images_path.to_path_buf(),
            message: format!("images are {}x{}, expected 28x28", shape[1], shape[2]),
        });
    }
    let lbl = read_maybe_gz(labels_path)?;
    let lshape = parse_idx(labels_path, &lbl, 0x0000_0801, 1)?;
    if shape[0] != lshape[0] {
        return Err(DataError::Mismatch {
            images: images_path.to_path_buf(),
            labels: labels_path.to_path_buf(),
            n_images: shape[0],
            n_labels: lshape[0],
        });
    }
    if shape[0] == 0 {
        return Err(DataError::Empty {
            path: images_path.to_path_buf(),
        });
    }
    let labels = lbl[8..].to_vec();
    if let Some(i) = labels.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(DataError::Idx {
            path: labels_path.to_path_buf(),
            message: format!("label {} of item {i} is outside 0–9", labels[i]),
        });
    }
    Ok(Dataset {
        images: img[16..].to_vec(),
        labels,
    })
}

/// Writes a data set in the Kaggle CSV layout with a header row, atomically.
pub fn write_csv(path: &Path, data: &Dataset) -> Result<(), DataError> {
    let mut buf = BufWriter::new(Vec::with_capacity(data.len() * 2400));
    let io = io_err(path);
    let result = (|| {
        write!(buf, "label")?;
        for p in 1..=IMAGE_PIXELS {
            write!(buf, ",pixel{p}")?;
        }
        writeln!(buf)?;
        for i in 0..data.len() {
            write!(buf, "{}", data.labels[i])?;
            for p in data.image(i) {
                write!(buf, ",{p}")?;
            }
            writeln!(buf)?;
        }
        let bytes = buf.into_inner().map_err(|e| e.into_error())?;
        fmnist::onnx::writer::write_atomic(path, &bytes)
    })();
    result.map_err(io)
}

/// SHA-256 of a file, hex-encoded (recorded with trained models so a result can be traced
/// back to its data).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_reverses_every_row_and_keeps_the_labels() {
        let d = Dataset {
            images: (0..2 * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect(),
            labels: vec![3, 7],
        };
        let m = d.mirrored();
        for i in 0..2 {
            for r in 0..28 {
                for c in 0..28 {
                    assert_eq!(m.image(i)[r * 28 + c], d.image(i)[r * 28 + 27 - c]);
                }
            }
        }
        assert_eq!(m.labels, d.labels);
        assert_eq!(m.mirrored().images, d.images);
    }

    fn row(label: &str, pixel: &str) -> String {
        let mut s = label.to_string();
        for i in 0..IMAGE_PIXELS {
            s.push(',');
            s.push_str(if i == 10 { pixel } else { "7" });
        }
        s.push('\n');
        s
    }

    fn header() -> String {
        let mut s = "label".to_string();
        for p in 1..=IMAGE_PIXELS {
            s.push_str(&format!(",pixel{p}"));
        }
        s + "\n"
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_csv_with_and_without_header() {
        let dir = tempfile::tempdir().unwrap();
        let body = row("3", "200") + &row("9", "0");
        let a = read_csv(&write(&dir, "a.csv", &(header() + &body))).unwrap();
        let b = read_csv(&write(&dir, "b.csv", &body)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.labels, vec![3, 9]);
        assert_eq!(a.image(0)[10], 200);
        assert_eq!(a.image(1)[0], 7);
    }

    fn expect_err(text: &str, want: &str) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "bad.csv", text);
        let err = read_csv(&p).unwrap_err().to_string();
        assert!(err.contains("bad.csv"), "{err}");
        assert!(err.contains(want), "expected {want:?} in {err:?}");
    }

    #[test]
    fn names_line_and_column_of_bad_cells() {
        let good = row("1", "5");
        expect_err(
            &(header() + &good + &row("12", "5")),
            "line 3, column 1: label 12 is outside 0–9",
        );
        expect_err(
            &(good.clone() + &row("1", "256")),
            "line 2, column 12: pixel 256 is outside 0–255",
        );
        expect_err(
            &(good.clone() + &row("1", "-1")),
            "line 2, column 12: pixel -1 is outside",
        );
        expect_err(
            &(good.clone() + &row("1", "abc")),
            "line 2, column 12: pixel \"abc\" is not an integer",
        );
        expect_err(&(good.clone() + &row("1", "1.5")), "line 2, column 12");
    }

    #[test]
    fn names_line_of_wrong_column_count() {
        let good = row("1", "5");
        let short = good.replacen(",7", "", 1);
        let long = good.replace('\n', ",7\n");
        expect_err(&(header() + &good + &short), "line 3: expected 785 columns");
        expect_err(&(good.clone() + &long), "line 2: expected 785 columns");
    }

    #[test]
    fn empty_files_are_errors() {
        expect_err("", "holds no images");
        expect_err(&header(), "holds no images");
    }

    fn idx_pair(dir: &tempfile::TempDir, n: u32, truncate: usize) -> (PathBuf, PathBuf) {
        let mut img = vec![0, 0, 8, 3];
        for d in [n, 28, 28] {
            img.extend_from_slice(&d.to_be_bytes());
        }
        img.extend((0..n as usize * 784).map(|i| (i % 251) as u8));
        img.truncate(img.len() - truncate);
        let mut lbl = vec![0, 0, 8, 1];
        lbl.extend_from_slice(&n.to_be_bytes());
        lbl.extend((0..n).map(|i| (i % 10) as u8));
        let gz = |bytes: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap()
        };
        let ip = dir.path().join("t-images-idx3-ubyte.gz");
        let lp = dir.path().join("t-labels-idx1-ubyte.gz");
        std::fs::write(&ip, gz(&img)).unwrap();
        std::fs::write(&lp, gz(&lbl)).unwrap();
        (ip, lp)
    }

    #[test]
    fn idx_round_trips_through_csv() {
        let dir = tempfile::tempdir().unwrap();
        let (ip, _) = idx_pair(&dir, 12, 0);
        let d = load(&ip).unwrap();
        assert_eq!(d.len(), 12);
        assert_eq!(d.labels[11], 1);
        let csv = dir.path().join("out.csv");
        write_csv(&csv, &d).unwrap();
        assert_eq!(load(&csv).unwrap(), d);
    }

    #[test]
    fn truncated_idx_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (ip, _) = idx_pair(&dir, 3, 100);
        let err = load(&ip).unwrap_err().to_string();
        assert!(
            err.contains("t-images-idx3-ubyte.gz") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn unknown_format_is_reported() {
        let err = load(Path::new("x/data.parquet")).unwrap_err().to_string();
        assert!(err.contains("unrecognised data file"), "{err}");
    }
}
