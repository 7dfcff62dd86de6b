//! The visual evaluation report (`fmnist-train eval --report DIR`): `DIR/index.html` with its
//! pictures beside it.
//!
//! - `confusion.{png,svg}` and `confusion_normalised.{png,svg}`: the confusion matrix as a
//!   labelled heatmap, in counts and row-normalised (per cent of the true class);
//! - `per_class.{png,svg}`: precision, recall and F1 per class as bars;
//! - `curves.{png,svg}`: loss and accuracy per epoch, when the model's `.json` has a history;
//! - `mistakes/NN.png`: the 30 most confident mistakes, with their classes in the page.
//!
//! Every number comes from the [`Report`] that `--json` writes, and the page tags each one
//! with `data-key` (its path in that JSON) and `data-value` (the exact value), so a test can
//! check that the two agree. The charts are drawn by plotters; the PNGs use a font embedded
//! in the binary (Liberation Sans, `train/assets/`), never the system's fonts, so that the
//! pictures look the same on every machine.

use crate::data::Dataset;
use crate::metrics::Report;
/// One epoch of the training history, as the model's `.json` records it.
use crate::train::EpochSummary as Epoch;
use anyhow::{anyhow, Context, Result};
use fmnist::classes::{CLASS_NAMES, IMAGE_PIXELS, IMAGE_SIDE, NUM_CLASSES};
use fmnist::html::escape;
use fmnist::onnx::model::{argmax, softmax_rows};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::Path;

/// The font every picture is drawn with, embedded (SIL Open Font License 1.1).
static FONT: &[u8] = include_bytes!("../assets/LiberationSans-Regular.ttf");
const FAMILY: &str = "sans-serif";
/// How many mistakes the gallery shows.
pub const MISTAKES: usize = 30;
/// The gallery's images are the 28x28 inputs scaled up by this factor (nearest neighbour).
const GALLERY_SCALE: u32 = 4;

/// A wrongly classified image.
#[derive(Debug, Clone, PartialEq)]
pub struct Mistake {
    /// Row in the data file (0-based, header excluded).
    pub index: usize,
    pub truth: usize,
    pub predicted: usize,
    /// Softmax probability of the predicted class.
    pub confidence: f64,
}

/// The `n` mistakes with the highest confidence, most confident first (ties: lower index).
pub fn confident_mistakes(labels: &[u8], logits: &[Vec<f32>], n: usize) -> Vec<Mistake> {
    let mut all: Vec<Mistake> = labels
        .iter()
        .zip(logits)
        .enumerate()
        .filter_map(|(index, (&t, row))| {
            // The same argmax over logits as the metrics, so the gallery agrees with them.
            let predicted = argmax(row);
            let probs = softmax_rows(row, NUM_CLASSES);
            (predicted != t as usize).then(|| Mistake {
                index,
                truth: t as usize,
                predicted,
                confidence: f64::from(probs[predicted]),
            })
        })
        .collect();
    all.sort_by(|a, b| {
        b.confidence
            .total_cmp(&a.confidence)
            .then(a.index.cmp(&b.index))
    });
    all.truncate(n);
    all
}

/// What the report is about, for its heading.
pub struct Source<'a> {
    pub model: &'a Path,
    pub data: &'a Path,
}

/// Writes the report into `dir` (created if missing); returns the path of `index.html`.
pub fn write(
    dir: &Path,
    source: &Source<'_>,
    report: &Report,
    data: &Dataset,
    logits: &[Vec<f32>],
    history: &[Epoch],
) -> Result<std::path::PathBuf> {
    register_font()?;
    std::fs::create_dir_all(dir.join("mistakes"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let both = |name: &str, draw: &dyn Fn(&mut Canvas) -> Result<()>, size: (u32, u32)| {
        let svg = dir.join(format!("{name}.svg"));
        draw(&mut Canvas::Svg(
            SVGBackend::new(&svg, size).into_drawing_area(),
        ))
        .with_context(|| format!("drawing {}", svg.display()))?;
        let png = dir.join(format!("{name}.png"));
        let drawn = draw(&mut Canvas::Png(
            BitMapBackend::new(&png, size).into_drawing_area(),
        ));
        drawn.with_context(|| format!("drawing {}", png.display()))
    };
    let cm = &report.confusion_matrix;
    both("confusion", &|c| confusion(c, cm, false), (820, 720))?;
    both(
        "confusion_normalised",
        &|c| confusion(c, cm, true),
        (820, 720),
    )?;
    both("per_class", &|c| per_class(c, report), (980, 480))?;
    if !history.is_empty() {
        both("curves", &|c| curves(c, history), (980, 400))?;
    }
    let mistakes = confident_mistakes(&data.labels, logits, MISTAKES);
    for (i, m) in mistakes.iter().enumerate() {
        let px = &data.images[m.index * IMAGE_PIXELS..(m.index + 1) * IMAGE_PIXELS];
        let side = IMAGE_SIDE as u32;
        let img = image::GrayImage::from_raw(side, side, px.to_vec())
            .ok_or_else(|| anyhow!("image {} has the wrong size", m.index))?;
        let big = image::imageops::resize(
            &img,
            side * GALLERY_SCALE,
            side * GALLERY_SCALE,
            image::imageops::FilterType::Nearest,
        );
        let p = dir.join(format!("mistakes/{i:02}.png"));
        big.save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let html = page(source, report, &mistakes, !history.is_empty());
    let index = dir.join("index.html");
    fmnist::onnx::writer::write_atomic(&index, html.as_bytes())
        .with_context(|| format!("writing {}", index.display()))?;
    Ok(index)
}

fn register_font() -> Result<()> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is not a valid TrueType font"))
}

/// The two backends every chart is drawn on.
enum Canvas<'a> {
    Svg(DrawingArea<SVGBackend<'a>, Shift>),
    Png(DrawingArea<BitMapBackend<'a>, Shift>),
}

/// Runs a generic drawing function on whichever backend the canvas holds.
macro_rules! on_canvas {
    ($canvas:expr, $f:ident ( $($arg:expr),* )) => {
        match $canvas {
            Canvas::Svg(a) => { $f(a, $($arg),*)?; a.present().map_err(|e| anyhow!("{e}")) }
            Canvas::Png(a) => { $f(a, $($arg),*)?; a.present().map_err(|e| anyhow!("{e}")) }
        }
    };
}

fn confusion(c: &mut Canvas, cm: &[Vec<u64>], normalised: bool) -> Result<()> {
    on_canvas!(c, draw_confusion(cm, normalised))
}

fn per_class(c: &mut Canvas, report: &Report) -> Result<()> {
    on_canvas!(c, draw_per_class(report))
}

fn curves(c: &mut Canvas, history: &[Epoch]) -> Result<()> {
    on_canvas!(c, draw_curves(history))
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// Share of the true class `t` predicted as `p` (0 for an empty row).
pub fn row_share(cm: &[Vec<u64>], t: usize, p: usize) -> f64 {
    let total: u64 = cm[t].iter().sum();
    if total == 0 {
        0.0
    } else {
        cm[t][p] as f64 / total as f64
    }
}

/// White to dark blue.
fn heat(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

/// The heatmap: rows are true classes (top to bottom in label order), columns predictions.
/// Cell colour is the row share in both charts; the text is the count, or the share in per
/// cent. Cells are drawn row by row, so the SVG's numbers read in the JSON's order.
fn draw_confusion<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    cm: &[Vec<u64>],
    normalised: bool,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = NUM_CLASSES as i32;
    let title = if normalised {
        "Confusion matrix, per cent of each true class"
    } else {
        "Confusion matrix, counts"
    };
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(110)
        // plotters' integer ranges are inclusive: `0..n - 1` is n segments.
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())
        .map_err(err)?;
    let name = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => CLASS_NAMES
            .get((n - 1 - *i) as usize)
            .copied()
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(NUM_CLASSES)
        .y_labels(NUM_CLASSES)
        // The column names are drawn below, on two lines: rotated labels are centred on their
        // tick by plotters and half of each would fall inside the matrix.
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| name(v))
        .y_label_style((FAMILY, 13))
        .x_desc("predicted class")
        .y_desc("true class")
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(err)?;
    let below = TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, class) in CLASS_NAMES.iter().enumerate() {
        let (x, y) =
            chart.backend_coord(&(SegmentValue::CenterOf(i as i32), SegmentValue::Exact(0)));
        for (line, word) in class.split_inclusive(['/', ' ']).enumerate() {
            let at = (x, y + 8 + 15 * line as i32);
            root.draw(&Text::new(word.trim_end().to_string(), at, below.clone()))
                .map_err(err)?;
        }
    }
    let light = WHITE;
    let dark = BLACK;
    for (t, row) in cm.iter().enumerate() {
        let y = n - 1 - t as i32;
        for (p, &count) in row.iter().enumerate() {
            let x = p as i32;
            let share = row_share(cm, t, p);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    heat(share).filled(),
                )))
                .map_err(err)?;
            let text = if normalised {
                format!("{:.1}", share * 100.0)
            } else {
                count.to_string()
            };
            let color = if share > 0.5 { &light } else { &dark };
            let style = TextStyle::from((FAMILY, 14).into_font())
                .color(color)
                .pos(Pos::new(HPos::Center, VPos::Center));
            chart
                .draw_series(std::iter::once(Text::new(
                    text,
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    style,
                )))
                .map_err(err)?;
        }
    }
    Ok(())
}

/// Slots per class on the bar chart's x axis: precision, recall, F1 and a gap.
const SLOTS: i32 = 4;

fn draw_per_class<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = NUM_CLASSES as i32 * SLOTS;
    let mut chart = ChartBuilder::on(root)
        .caption("Precision, recall and F1 per class", (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // Headroom above 1.0 for the value labels and the legend, which then covers no bar.
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0f64..1.32)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n as usize)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) if i % SLOTS == 1 => CLASS_NAMES
                .get((i / SLOTS) as usize)
                .copied()
                .unwrap_or("")
                .to_string(),
            _ => String::new(),
        })
        .y_labels(7)
        .y_label_formatter(&|v| {
            if *v <= 1.0 + 1e-9 {
                format!("{v:.1}")
            } else {
                String::new()
            }
        })
        .x_label_style((FAMILY, 13))
        .y_label_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    let colors = [
        RGBColor(31, 78, 156),
        RGBColor(230, 120, 20),
        RGBColor(11, 107, 46),
    ];
    let names = ["precision", "recall", "F1"];
    let value_style = TextStyle::from((FAMILY, 11).into_font())
        .transform(FontTransform::Rotate270)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (k, (color, name)) in colors.into_iter().zip(names).enumerate() {
        let value = |c: &crate::metrics::ClassMetrics| [c.precision, c.recall, c.f1][k];
        chart
            .draw_series(report.per_class.iter().enumerate().map(|(c, m)| {
                let x = c as i32 * SLOTS + k as i32;
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(x), 0.0),
                        (SegmentValue::Exact(x + 1), value(m)),
                    ],
                    color.filled(),
                );
                bar.set_margin(0, 0, 1, 1);
                bar
            }))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(report.per_class.iter().enumerate().map(|(c, m)| {
                let x = c as i32 * SLOTS + k as i32;
                Text::new(
                    format!("{:.3}", value(m)),
                    (SegmentValue::CenterOf(x), value(m) + 0.01),
                    value_style.clone(),
                )
            }))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The series' legend, in a corner the chart leaves free for it.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    corner: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FAMILY, 13))
        .draw()
        .map_err(err)
}

/// Loss (left) and accuracy (right) per epoch.
fn draw_curves<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, history: &[Epoch]) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, 2));
    let last = history.iter().map(|e| e.epoch).max().unwrap_or(1).max(2);
    let blue = RGBColor(31, 78, 156);
    let orange = RGBColor(230, 120, 20);
    /// A named line: its legend, the value it reads from an epoch, its colour.
    type Line = (&'static str, fn(&Epoch) -> Option<f64>, RGBColor);
    // Each legend goes where its lines are not: loss falls, accuracy rises.
    let sides: [(&str, SeriesLabelPosition, [Line; 2]); 2] = [
        (
            "Loss per epoch",
            SeriesLabelPosition::UpperRight,
            [
                ("train loss", |e| Some(e.train_loss), blue),
                ("validation loss", |e| e.val_loss, orange),
            ],
        ),
        (
            "Accuracy per epoch",
            SeriesLabelPosition::LowerRight,
            [
                ("validation accuracy", |e| e.val_accuracy, blue),
                ("test accuracy", |e| e.test_accuracy, orange),
            ],
        ),
    ];
    for (area, (title, corner, lines)) in panels.iter().zip(sides) {
        let values: Vec<f64> = lines
            .iter()
            .flat_map(|(_, pick, _)| history.iter().filter_map(pick))
            .collect();
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if values.is_empty() {
            (0.0, 1.0)
        } else {
            let pad = ((hi - lo) * 0.08).max(0.005);
            (lo - pad, hi + pad)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            // Half an epoch either side, so the first and last points are not cut in half.
            .build_cartesian_2d(0.5..last as f64 + 0.5, lo..hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(last.min(12))
            .x_label_formatter(&|v| {
                if v.fract() == 0.0 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.3}"))
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 14))
            .draw()
            .map_err(err)?;
        for (name, pick, color) in lines {
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter_map(|e| pick(e).map(|v| (e.epoch as f64, v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        legend(&mut chart, corner)?;
    }
    Ok(())
}

/// A table cell that shows `shown` and carries the exact value and its JSON path.
fn cell(key: &str, exact: impl std::fmt::Display, shown: impl std::fmt::Display) -> String {
    format!("<td data-key=\"{key}\" data-value=\"{exact}\">{shown}</td>")
}

fn page(source: &Source<'_>, r: &Report, mistakes: &[Mistake], curves: bool) -> String {
    let mut h = String::new();
    let title = format!("fmnist evaluation: {}", source.model.display());
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{t}</h1>\n\
         <p>Data: <code>{d}</code>, {n} images. Written by <code>fmnist-train eval --report</code>; \
         every number here is also in <code>--json</code>.</p>\n",
        t = escape(&title),
        d = escape(&source.data.display().to_string()),
        n = r.samples,
    );
    h.push_str("<h2>Summary</h2>\n<table class=\"summary\">\n<tbody>\n");
    for (name, key, v) in [
        ("Accuracy", "accuracy", r.accuracy),
        ("Macro precision", "macro_precision", r.macro_precision),
        ("Macro recall", "macro_recall", r.macro_recall),
        ("Macro F1", "macro_f1", r.macro_f1),
    ] {
        let _ = writeln!(
            h,
            "<tr><th scope=\"row\">{name}</th>{}</tr>",
            cell(key, v, format!("{v:.4}"))
        );
    }
    let _ = writeln!(
        h,
        "<tr><th scope=\"row\">Images</th>{}</tr>\n</tbody>\n</table>",
        cell("samples", r.samples, r.samples)
    );

    h.push_str(
        "<h2>Confusion matrix</h2>\n\
         <p>Rows are the true classes, columns the predicted ones; the colour is the share of the \
         row. The same counts are in the table below the pictures.</p>\n\
         <figure><a href=\"confusion.svg\"><img src=\"confusion.png\" width=\"820\" height=\"720\" \
         alt=\"Confusion matrix heatmap, counts (the table below has the same numbers)\"></a>\
         <figcaption>Counts (<a href=\"confusion.svg\">SVG</a>)</figcaption></figure>\n\
         <figure><a href=\"confusion_normalised.svg\"><img src=\"confusion_normalised.png\" width=\"820\" \
         height=\"720\" alt=\"Confusion matrix heatmap, per cent of each true class\"></a>\
         <figcaption>Per cent of each true class (<a href=\"confusion_normalised.svg\">SVG</a>)</figcaption></figure>\n",
    );
    h.push_str(
        "<div class=\"scroll\"><table class=\"matrix\">\n<caption>Confusion matrix (counts): true class \
         by row, predicted class by column</caption>\n<thead><tr><th scope=\"col\">true \\ predicted</th>",
    );
    for name in CLASS_NAMES {
        let _ = write!(h, "<th scope=\"col\">{}</th>", escape(name));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for (t, row) in r.confusion_matrix.iter().enumerate() {
        let _ = write!(h, "<tr><th scope=\"row\">{}</th>", escape(CLASS_NAMES[t]));
        for (p, &count) in row.iter().enumerate() {
            h.push_str(&cell(&format!("confusion_matrix.{t}.{p}"), count, count));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table></div>\n");

    h.push_str(
        "<h2>Per class</h2>\n<figure><a href=\"per_class.svg\"><img src=\"per_class.png\" width=\"980\" \
         height=\"480\" alt=\"Bars of precision, recall and F1 for each class (numbers in the table below)\"></a>\
         <figcaption>Precision, recall and F1 (<a href=\"per_class.svg\">SVG</a>)</figcaption></figure>\n\
         <table class=\"classes\">\n<thead><tr><th scope=\"col\">class</th><th scope=\"col\">precision</th>\
         <th scope=\"col\">recall</th><th scope=\"col\">F1</th><th scope=\"col\">support</th></tr></thead>\n<tbody>\n",
    );
    for (i, c) in r.per_class.iter().enumerate() {
        let key = |f: &str| format!("per_class.{i}.{f}");
        let _ = writeln!(
            h,
            "<tr><th scope=\"row\">{}</th>{}{}{}{}</tr>",
            escape(c.class),
            cell(
                &key("precision"),
                c.precision,
                format!("{:.4}", c.precision)
            ),
            cell(&key("recall"), c.recall, format!("{:.4}", c.recall)),
            cell(&key("f1"), c.f1, format!("{:.4}", c.f1)),
            cell(&key("support"), c.support, c.support),
        );
    }
    h.push_str("</tbody>\n</table>\n");

    h.push_str("<h2>Training curves</h2>\n");
    if curves {
        h.push_str(
            "<figure><a href=\"curves.svg\"><img src=\"curves.png\" width=\"980\" height=\"400\" \
             alt=\"Training and validation loss, and validation and test accuracy, per epoch\"></a>\
             <figcaption>From the training history in the model's .json (<a href=\"curves.svg\">SVG</a>)\
             </figcaption></figure>\n",
        );
    } else {
        h.push_str("<p>The model's .json has no training history, so there are no curves.</p>\n");
    }

    let _ = writeln!(
        h,
        "<h2>The {} most confident mistakes</h2>\n<p>The images as the model saw them, most \
         confident first. Row: the image's row in the data file (0-based, header excluded).</p>\n\
         <ol class=\"gallery\">",
        mistakes.len()
    );
    for (i, m) in mistakes.iter().enumerate() {
        let _ = writeln!(
            h,
            "<li data-row=\"{row}\" data-truth=\"{t}\" data-predicted=\"{p}\" data-confidence=\"{c}\">\
             <img src=\"mistakes/{i:02}.png\" width=\"112\" height=\"112\" alt=\"row {row}: a {tn} taken for a {pn}\">\
             <span>row {row}<br>true: {tn}<br>predicted: {pn}<br>{pct:.1} %</span></li>",
            row = m.index,
            t = m.truth,
            p = m.predicted,
            c = m.confidence,
            tn = escape(CLASS_NAMES[m.truth]),
            pn = escape(CLASS_NAMES[m.predicted]),
            pct = m.confidence * 100.0,
        );
    }
    h.push_str("</ol>\n</main>\n</body>\n</html>\n");
    h
}

const STYLE: &str = "body { font: 16px/1.5 system-ui, sans-serif; color: #1a1a1a; margin: 0 auto; \
max-width: 1020px; padding: 0 1rem 2rem; }\n\
img { max-width: 100%; height: auto; }\n\
a { color: #0645ad; }\n\
figure { margin: 1rem 0; }\n\
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }\n\
th, td { padding: 0.2rem 0.5rem; border-bottom: 1px solid #ccc; text-align: right; }\n\
th[scope=row] { text-align: left; }\n\
caption { text-align: left; font-weight: 600; }\n\
.scroll { overflow-x: auto; }\n\
.gallery { list-style: none; padding: 0; display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 0.75rem; }\n\
.gallery li { display: flex; gap: 0.5rem; align-items: center; font-size: 0.85rem; }\n\
.gallery img { image-rendering: pixelated; border: 1px solid #555; }\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mistakes_are_the_most_confident_wrong_ones_in_order() {
        let labels = [0u8, 1, 2, 3];
        let logits = vec![
            vec![5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], // right
            vec![0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], // wrong, less sure
            vec![9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], // wrong, sure
            vec![0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0], // wrong, as sure
        ];
        let m = confident_mistakes(&labels, &logits, 2);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].index, m[0].truth, m[0].predicted), (2, 2, 0));
        assert_eq!((m[1].index, m[1].truth, m[1].predicted), (3, 3, 4));
        assert!(m[0].confidence > 0.99);
        assert_eq!(confident_mistakes(&labels, &logits, 10).len(), 3);
    }

    #[test]
    fn row_shares_and_empty_rows() {
        let cm = vec![vec![3, 1], vec![0, 0]];
        assert_eq!(row_share(&cm, 0, 0), 0.75);
        assert_eq!(row_share(&cm, 1, 1), 0.0);
    }

    #[test]
    fn the_embedded_font_loads() {
        register_font().unwrap();
    }
}
