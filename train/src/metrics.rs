//! Classification metrics: accuracy, per-class and macro precision/recall/F1, confusion matrix.
//!
//! Conventions: a class that is never predicted has precision 0 (not NaN), a class absent from
//! the labels has recall 0, and F1 is 0 whenever precision + recall is 0. Macro averages are
//! plain means over the ten classes.

use fmnist::classes::{CLASS_NAMES, NUM_CLASSES};
use ndarray::Array2;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassMetrics {
    pub class: &'static str,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub accuracy: f64,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion_matrix[true][predicted]`, rows and columns in label order.
    pub confusion_matrix: Vec<Vec<u64>>,
    pub samples: u64,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl Report {
    /// Builds the report from true labels and predictions (same length, values 0–9).
    pub fn new(labels: &[u8], predictions: &[u8]) -> Self {
        assert_eq!(labels.len(), predictions.len(), "one prediction per label");
        let mut cm = Array2::<u64>::zeros((NUM_CLASSES, NUM_CLASSES));
        for (&t, &p) in labels.iter().zip(predictions) {
            cm[[t as usize, p as usize]] += 1;
        }
        let correct: u64 = cm.diag().sum();
        let per_class: Vec<ClassMetrics> = (0..NUM_CLASSES)
            .map(|c| {
                let tp = cm[[c, c]];
                let predicted = cm.column(c).sum();
                let actual = cm.row(c).sum();
                let precision = ratio(tp, predicted);
                let recall = ratio(tp, actual);
                let f1 = if precision + recall == 0.0 {
                    0.0
                } else {
                    2.0 * precision * recall / (precision + recall)
                };
                ClassMetrics {
                    class: CLASS_NAMES[c],
                    precision,
                    recall,
                    f1,
                    support: actual,
                }
            })
            .collect();
        let mean =
            |f: fn(&ClassMetrics) -> f64| per_class.iter().map(f).sum::<f64>() / NUM_CLASSES as f64;
        Report {
            accuracy: ratio(correct, labels.len() as u64),
            macro_precision: mean(|m| m.precision),
            macro_recall: mean(|m| m.recall),
            macro_f1: mean(|m| m.f1),
            confusion_matrix: cm.outer_iter().map(|r| r.to_vec()).collect(),
            per_class,
            samples: labels.len() as u64,
        }
    }

    /// A table for people: summary, per-class metrics and the confusion matrix.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "samples          {}", self.samples);
        let _ = writeln!(s, "accuracy         {:.4}", self.accuracy);
        let _ = writeln!(s, "macro precision  {:.4}", self.macro_precision);
        let _ = writeln!(s, "macro recall     {:.4}", self.macro_recall);
        let _ = writeln!(s, "macro F1         {:.4}", self.macro_f1);
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9} {:>9} {:>8}",
            "class", "precision", "recall", "f1", "support"
        );
        for m in &self.per_class {
            let _ = writeln!(
                s,
                "{:<12} {:>9.4} {:>9.4} {:>9.4} {:>8}",
                m.class, m.precision, m.recall, m.f1, m.support
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "confusion matrix (rows: true class, columns: predicted)");
        let short: Vec<String> = CLASS_NAMES
            .iter()
            .map(|n| n.chars().take(7).collect())
            .collect();
        let _ = write!(s, "{:<12}", "");
        for h in &short {
            let _ = write!(s, " {h:>7}");
        }
        let _ = writeln!(s);
        for (c, row) in self.confusion_matrix.iter().enumerate() {
            let _ = write!(s, "{:<12}", CLASS_NAMES[c]);
            for v in row {
                let _ = write!(s, " {v:>7}");
            }
            let _ = writeln!(s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_predictions() {
        let labels: Vec<u8> = (0..10).collect();
        let r = Report::new(&labels, &labels);
        assert_eq!(r.accuracy, 1.0);
        assert_eq!(r.macro_f1, 1.0);
        assert!(r.per_class.iter().all(|m| m.support == 1));
    }

    #[test]
    fn hand_computed_case_with_a_class_never_predicted() {
        // true:  0 0 0 1 1 2
        // pred:  0 0 1 1 1 0      (class 2 is never predicted)
        let r = Report::new(&[0, 0, 0, 1, 1, 2], &[0, 0, 1, 1, 1, 0]);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        let c0 = &r.per_class[0];
        assert!((c0.precision - 2.0 / 3.0).abs() < 1e-12); // predicted 0 three times, 2 right
        assert!((c0.recall - 2.0 / 3.0).abs() < 1e-12);
        let c1 = &r.per_class[1];
        assert!((c1.precision - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(c1.recall, 1.0);
        assert!((c1.f1 - 0.8).abs() < 1e-12);
        let c2 = &r.per_class[2];
        assert_eq!(
            (c2.precision, c2.recall, c2.f1, c2.support),
            (0.0, 0.0, 0.0, 1)
        );
        assert!(r.per_class.iter().all(|m| m.precision.is_finite()));
        // Macro over ten classes; classes 3-9 have no support and no predictions: all zero.
        let expected_p = (2.0 / 3.0 + 2.0 / 3.0) / 10.0;
        assert!((r.macro_precision - expected_p).abs() < 1e-12);
        assert_eq!(r.confusion_matrix[2][0], 1);
        assert_eq!(r.confusion_matrix[0][1], 1);
    }

    #[test]
    fn json_has_the_documented_keys() {
        let r = Report::new(&[1, 2], &[1, 1]);
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "per_class",
            "confusion_matrix",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert!(r.table().contains("Trouser"));
    }
}
