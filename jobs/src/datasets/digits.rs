//! The digits data set: parsing the embedded CSV, and the fixed train/test split.

use std::sync::OnceLock;

use super::{BadLine, Examples, Prepared, PreparedInput, Targets, parsed_once};
use crate::error::JobsError;
use crate::input::{CLASSES, FEATURES};
use crate::rng::SplitMix64;

/// Embedded so the binary is self-contained; see data/README.md for source and licence.
const DIGITS_CSV: &str = include_str!("../../data/digits.csv");

/// The split must not depend on the spec's seed: a job initialised from another job's weights
/// would otherwise be evaluated on samples it was trained on.
const SPLIT_SEED: u64 = 0x6761_6e74_7279; // "gantry"
/// 80% of the samples train (1,437 of 1,797), the rest (360) are held out for testing.
const TRAIN_PERCENT: usize = 80;

/// Numbered examples of `width` numbers each and a target, row-major: sample `i` is
/// `x[i * width..(i + 1) * width]`. The digits, and the rows of a table. The target is a class
/// (`i64`), or a regression's standardised number (`f32`).
#[derive(Debug)]
pub(crate) struct Samples<Y = i64> {
    pub(crate) width: usize,
    pub(crate) x: Vec<f32>,
    pub(crate) y: Vec<Y>,
}

impl Examples for Samples {
    fn len(&self) -> usize {
        self.y.len()
    }

    fn prepare(&self, indices: &[usize], _: u32) -> Prepared {
        let (values, y) = self.gather(indices);
        Prepared { x: PreparedInput::Numbers { values, rows: indices.len() }, y: Targets::Classes(y) }
    }
}

impl Examples for Samples<f32> {
    fn len(&self) -> usize {
        self.y.len()
    }

    fn prepare(&self, indices: &[usize], _: u32) -> Prepared {
        let (values, y) = self.gather(indices);
        Prepared { x: PreparedInput::Numbers { values, rows: indices.len() }, y: Targets::Values(y) }
    }
}

impl<Y: Copy> Samples<Y> {
    /// Copies the given samples into fresh buffers, ready to become tensors.
    pub(crate) fn gather(&self, indices: &[usize]) -> (Vec<f32>, Vec<Y>) {
        let w = self.width;
        let mut x = Vec::with_capacity(indices.len() * w);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.x[i * w..(i + 1) * w]);
            y.push(self.y[i]);
        }
        (x, y)
    }
}

impl Samples {
    /// The samples of `classes` (all if empty), at most `per_class` of each, in split order;
    /// and the samples of those classes left over by the limit.
    pub(crate) fn select(&self, classes: &[u32], per_class: Option<u32>) -> (Samples, Samples) {
        let mut taken = [0u32; CLASSES];
        let (mut keep, mut rest) = (Vec::new(), Vec::new());
        for i in 0..self.len() {
            let class = self.y[i] as usize;
            if !(classes.is_empty() || classes.contains(&(class as u32))) {
                continue;
            }
            if per_class.is_none_or(|n| taken[class] < n) {
                taken[class] += 1;
                keep.push(i);
            } else {
                rest.push(i);
            }
        }
        (self.subset(&keep), self.subset(&rest))
    }

    /// Both sets of samples, `self`'s first.
    pub(crate) fn join(mut self, other: Samples) -> Samples {
        self.x.extend(other.x);
        self.y.extend(other.y);
        self
    }

    /// The given samples, in that order.
    pub(crate) fn subset(&self, indices: &[usize]) -> Samples {
        let (x, y) = self.gather(indices);
        Samples { width: self.width, x, y }
    }
}

#[derive(Debug)]
pub(crate) struct Digits {
    pub(crate) train: Samples,
    pub(crate) test: Samples,
}

/// The data set, parsed and split once per process.
pub(crate) fn digits() -> Result<&'static Digits, JobsError> {
    static DIGITS: OnceLock<Result<Digits, BadLine>> = OnceLock::new();
    parsed_once(&DIGITS, || parse_and_split(DIGITS_CSV))
}

fn parse_and_split(csv: &str) -> Result<Digits, BadLine> {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for (n, line) in csv.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line_no = n + 1;
        let mut count = 0;
        for (col, field) in line.split(',').enumerate() {
            let value: u8 = field.trim().parse().map_err(|_| BadLine {
                line: line_no,
                reason: format!("column {}: `{field}` is not a number", col + 1),
            })?;
            if col < FEATURES {
                if value > 16 {
                    return Err(BadLine {
                        line: line_no,
                        reason: format!("pixel {} is {value}, expected 0..16", col + 1),
                    });
                }
                x.push(f32::from(value) / 16.0);
            } else if col == FEATURES {
                if usize::from(value) >= CLASSES {
                    return Err(BadLine { line: line_no, reason: format!("label is {value}, expected 0..9") });
                }
                y.push(i64::from(value));
            }
            count += 1;
        }
        if count != FEATURES + 1 {
            return Err(BadLine { line: line_no, reason: format!("{count} columns, expected {}", FEATURES + 1) });
        }
    }

    let mut order: Vec<usize> = (0..y.len()).collect();
    SplitMix64::new(SPLIT_SEED).shuffle(&mut order);
    let n_train = y.len() * TRAIN_PERCENT / 100;
    let (train_idx, test_idx) = order.split_at(n_train);
    let all = Samples { width: FEATURES, x, y };
    Ok(Digits { train: all.subset(train_idx), test: all.subset(test_idx) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_fixed_80_20() {
        let d = digits().unwrap();
        assert_eq!(d.train.len(), 1437);
        assert_eq!(d.test.len(), 360);
        assert_eq!(d.train.x.len(), 1437 * FEATURES);
        assert!(d.train.x.iter().all(|&p| (0.0..=1.0).contains(&p)));
        // Every class is represented in the test set.
        for c in 0..CLASSES as i64 {
            assert!(d.test.y.contains(&c), "class {c} missing from test set");
        }
    }

    #[test]
    fn broken_csv_is_an_error() {
        assert_eq!(parse_and_split("1,2,3\n").unwrap_err().line, 1);
        let bad_label = format!("{}17\n", "0,".repeat(FEATURES));
        assert!(parse_and_split(&bad_label).unwrap_err().reason.contains("label"));
    }
}
