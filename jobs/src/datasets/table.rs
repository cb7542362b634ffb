//! Tables: a CSV file with a header, or a Parquet file, with numeric feature columns and one
//! column to predict: a label (a class, by number or by name), or a regression's target.
//! Features (and a target) are standardised with the training rows' mean and standard
//! deviation, which the checkpoint keeps so a served model reads new rows the same way.

use std::collections::BTreeMap;
use std::path::Path;

use gantry_core::spec::Holdout;

use super::text::data_error;
use super::{Samples, split_by_seed};
use crate::error::JobsError;
use crate::input::InputShape;

/// More classes than this is a regression target or an id column given as `label` by mistake.
pub(crate) const MAX_CLASSES: usize = 10_000;
/// The stream of a seed that draws the held-out rows (epoch orders use the epoch number).
const SPLIT_STREAM: u64 = u64::MAX - 3;

/// A table, split and standardised: what the MLP trains and is evaluated on, and its shape.
pub(crate) struct Table {
    pub(crate) sets: TableSets,
    pub(crate) shape: InputShape,
}

/// The training and held-out rows: with classes, or with numbers to predict.
pub(crate) enum TableSets {
    Classes(Samples, Samples),
    Values(Samples<f32>, Samples<f32>),
}

/// One file as read: feature values row-major, and each row's label text with where it is
/// (`line 7` of a CSV file, `row 6` of a Parquet file).
pub(super) struct Rows {
    pub(super) columns: Vec<String>,
    pub(super) x: Vec<f32>,
    pub(super) labels: Vec<(String, String)>,
}

impl Table {
    /// The table at `path`, with its label column `label` (with `regression`, its target
    /// column), held out as `holdout` says (rows drawn by `seed` for a fraction).
    pub(crate) fn read(
        path: &Path,
        label: &str,
        holdout: &Holdout,
        seed: u64,
        regression: bool,
    ) -> Result<Table, JobsError> {
        let rows = read_rows(path, label)?;
        let (train, test, test_path) = match holdout {
            Holdout::Fraction(f) => {
                let (train, test) = split_by_seed(rows.labels.len(), *f, seed, SPLIT_STREAM, "rows")
                    .map_err(|reason| data_error(path, None, reason))?;
                (rows.subset(&train), rows.subset(&test), path)
            }
            Holdout::File(test) => {
                let test_path = Path::new(test);
                let test = read_rows(test_path, label)?;
                if test.columns != rows.columns {
                    let reason =
                        format!("its columns {:?} are not the training file's {:?}", test.columns, rows.columns);
                    return Err(data_error(test_path, Some(1), reason));
                }
                (rows, test, test_path)
            }
        };
        let width = train.columns.len();
        let scale = standardisation(&train.x, width);
        let standardise = |mut x: Vec<f32>| {
            for row in x.chunks_mut(width.max(1)) {
                for (v, (mean, std)) in row.iter_mut().zip(&scale) {
                    *v = (*v - mean) / std;
                }
            }
            x
        };
        if regression {
            let (train_y, test_y) = (numbers(&train, path, label)?, numbers(&test, test_path, label)?);
            let (mean, std) = standardisation(&train_y, 1)[0];
            let z = |y: Vec<f32>| y.into_iter().map(|v| (v - mean) / std).collect();
            let shape = InputShape {
                columns: train.columns.clone(),
                scale: scale.clone(),
                target: Some((mean, std)),
                ..InputShape::numbers(width, 1)
            };
            let sets = TableSets::Values(
                Samples { width, x: standardise(train.x), y: z(train_y) },
                Samples { width, x: standardise(test.x), y: z(test_y) },
            );
            return Ok(Table { sets, shape });
        }
        let classes = classes(&train.labels);
        if classes.len() < 2 || classes.len() > MAX_CLASSES {
            let reason =
                format!("label column `{label}` has {} values: a class label needs 2 to {MAX_CLASSES}", classes.len());
            return Err(data_error(path, None, reason));
        }
        let index: BTreeMap<&str, i64> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i as i64)).collect();
        let class_of = |rows: &Rows, file: &Path| -> Result<Vec<i64>, JobsError> {
            rows.labels
                .iter()
                .map(|(text, at)| {
                    let reason = || format!("label `{text}` is not among the training rows' classes");
                    index.get(text.as_str()).copied().ok_or_else(|| row_error(file, at, reason()))
                })
                .collect()
        };
        let (train_y, test_y) = (class_of(&train, path)?, class_of(&test, test_path)?);
        let shape = InputShape {
            columns: train.columns.clone(),
            labels: classes.clone(),
            scale: scale.clone(),
            ..InputShape::numbers(width, classes.len())
        };
        let sets = TableSets::Classes(
            Samples { width, x: standardise(train.x), y: train_y },
            Samples { width, x: standardise(test.x), y: test_y },
        );
        Ok(Table { sets, shape })
    }
}

impl Rows {
    fn subset(&self, rows: &[usize]) -> Rows {
        let w = self.columns.len();
        Rows {
            columns: self.columns.clone(),
            x: rows.iter().flat_map(|&r| self.x[r * w..(r + 1) * w].iter().copied()).collect(),
            labels: rows.iter().map(|&r| self.labels[r].clone()).collect(),
        }
    }
}

/// A Parquet file by its name (`.parquet`, `.pq`), else CSV.
fn read_rows(path: &Path, label: &str) -> Result<Rows, JobsError> {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("parquet" | "pq") => super::parquet::read_rows(path, label),
        _ => read_csv(path, label),
    }
}

/// The label column's position in `header` and the feature columns, or why not.
pub(super) fn split_header(header: &[String], label: &str) -> Result<(usize, Vec<String>), String> {
    let label_at = header
        .iter()
        .position(|h| h == label)
        .ok_or_else(|| format!("no column `{label}` to take labels from; the columns are {}", header.join(", ")))?;
    let columns: Vec<String> =
        header.iter().enumerate().filter(|(i, _)| *i != label_at).map(|(_, h)| h.clone()).collect();
    if columns.is_empty() {
        return Err(format!("`{label}` is the only column: there are no features"));
    }
    Ok((label_at, columns))
}

fn read_csv(path: &Path, label: &str) -> Result<Rows, JobsError> {
    let at = |line: Option<u64>, reason: String| data_error(path, line.map(|l| l as usize), reason);
    let csv_error = |e: csv::Error| {
        let line = e.position().map(|p| p.line());
        match e.into_kind() {
            csv::ErrorKind::Io(e) => at(None, e.to_string()),
            csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                at(line, format!("{len} fields, the header has {expected_len}"))
            }
            csv::ErrorKind::Utf8 { .. } => at(line, "not UTF-8 text".into()),
            other => at(line, format!("{other:?}")),
        }
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_path(path).map_err(csv_error)?;
    let header: Vec<String> = reader.headers().map_err(csv_error)?.iter().map(|h| h.trim().to_string()).collect();
    let (label_at, columns) = split_header(&header, label).map_err(|why| at(Some(1), why))?;
    let mut rows = Rows { columns, x: Vec::new(), labels: Vec::new() };
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, |p| p.line());
        for (i, field) in record.iter().enumerate() {
            let field = field.trim();
            if i == label_at {
                if field.is_empty() {
                    return Err(at(Some(line), format!("column `{label}`: the label is empty")));
                }
                rows.labels.push((field.to_string(), format!("line {line}")));
                continue;
            }
            match field.parse::<f32>() {
                Ok(v) if v.is_finite() => rows.x.push(v),
                _ => return Err(at(Some(line), format!("column `{}`: `{field}` is not a finite number", header[i]))),
            }
        }
    }
    if rows.labels.is_empty() {
        return Err(at(None, "no rows below the header".into()));
    }
    Ok(rows)
}

/// A regression's targets: the label column's values, which must be finite numbers.
fn numbers(rows: &Rows, file: &Path, column: &str) -> Result<Vec<f32>, JobsError> {
    rows.labels
        .iter()
        .map(|(text, at)| match text.parse::<f32>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(row_error(file, at, format!("column `{column}`: the target `{text}` is not a finite number"))),
        })
        .collect()
}

/// A row's error, `at` saying where the row is (`line 7`, `row 6`).
fn row_error(file: &Path, at: &str, reason: String) -> JobsError {
    JobsError::DataFile { path: file.to_path_buf(), at: Some(at.to_string()), reason }
}

/// The distinct labels, in class order: by value where all are numbers (so classes `0..9`
/// are classes 0 to 9), by text otherwise.
fn classes(labels: &[(String, String)]) -> Vec<String> {
    let mut distinct: Vec<String> = labels.iter().map(|(t, _)| t.clone()).collect();
    distinct.sort();
    distinct.dedup();
    let numbers: Option<Vec<f64>> = distinct.iter().map(|t| t.parse::<f64>().ok().filter(|v| v.is_finite())).collect();
    if let Some(numbers) = numbers {
        let mut by_value: Vec<(f64, String)> = numbers.into_iter().zip(distinct).collect();
        by_value.sort_by(|a, b| a.0.total_cmp(&b.0));
        return by_value.into_iter().map(|(_, t)| t).collect();
    }
    distinct
}

/// Each column's mean and standard deviation (1 where a column is constant).
fn standardisation(x: &[f32], width: usize) -> Vec<(f32, f32)> {
    let n = (x.len() / width.max(1)).max(1) as f64;
    (0..width)
        .map(|c| {
            let column = x.iter().skip(c).step_by(width);
            let mean = column.clone().map(|v| f64::from(*v)).sum::<f64>() / n;
            let var = column.map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / n;
            let std = if var > 1e-12 { var.sqrt() } else { 1.0 };
            (mean as f32, std as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_table_is_split_by_the_seed_standardised_and_named_labels_become_classes() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("size,kind,weight\n");
        for i in 0..50 {
            text.push_str(&format!("{},{},{}\n", i, ["cat", "dog"][i % 2], 2 * i));
        }
        let path = write(dir.path(), "a.csv", &text);
        let classes = |seed| {
            let t = Table::read(&path, "kind", &Holdout::Fraction(0.2), seed, false).unwrap();
            let TableSets::Classes(train, test) = t.sets else { panic!("classes expected") };
            (train, test, t.shape)
        };
        let (train, test, shape) = classes(7);
        assert_eq!((train.y.len(), test.y.len()), (40, 10));
        assert_eq!((shape.width, shape.classes), (2, 2));
        assert_eq!(shape.columns, ["size", "weight"]);
        assert_eq!(shape.labels, ["cat", "dog"]);
        let mean: f32 = train.x.iter().step_by(2).sum::<f32>() / 40.0;
        assert!(mean.abs() < 1e-5, "standardised column mean {mean}");
        let (_, again, _) = classes(7);
        assert_eq!((&again.y, &again.x), (&test.y, &test.x));
        let (_, other, _) = classes(8);
        assert_ne!(other.x, test.x, "another seed holds out other rows");
    }

    #[test]
    fn a_regression_target_is_standardised_and_kept_for_serving() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("size,price\n");
        for i in 0..20 {
            text.push_str(&format!("{i},{}\n", 100 + 10 * i));
        }
        let path = write(dir.path(), "homes.csv", &text);
        let t = Table::read(&path, "price", &Holdout::Fraction(0.25), 3, true).unwrap();
        let TableSets::Values(train, test) = t.sets else { panic!("values expected") };
        assert_eq!((train.y.len(), test.y.len(), t.shape.classes), (15, 5, 1));
        let (mean, std) = t.shape.target.unwrap();
        let restored: Vec<f32> = train.y.iter().map(|z| z * std + mean).collect();
        assert!(restored.iter().all(|p| (p - 100.0) % 10.0 < 1e-3 || (p - 100.0) % 10.0 > 9.999), "{restored:?}");
        assert!(train.y.iter().sum::<f32>().abs() < 1e-4, "standardised: mean 0");
        let bad = write(dir.path(), "bad.csv", "size,price\n1,2\n2,n/a\n3,4\n");
        let e = Table::read(&bad, "price", &Holdout::Fraction(0.34), 3, true).err().unwrap().to_string();
        assert_eq!(
            e,
            format!("data set {} line 3: column `price`: the target `n/a` is not a finite number", bad.display())
        );
    }

    #[test]
    fn numeric_labels_are_classes_in_numeric_order() {
        let labels: Vec<(String, String)> =
            ["10", "9", "2", "9"].iter().map(|t| (t.to_string(), String::new())).collect();
        assert_eq!(classes(&labels), ["2", "9", "10"]);
    }

    #[test]
    fn bad_files_are_refused_with_their_name_line_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let err = |text: &str, label: &str| {
            let path = write(dir.path(), "bad.csv", text);
            let err = Table::read(&path, label, &Holdout::Fraction(0.5), 1, false).err().unwrap().to_string();
            err.strip_prefix(&format!("data set {}", path.display())).unwrap().to_string()
        };
        assert_eq!(err("a,y\n1,0\nx,1\n", "y"), " line 3: column `a`: `x` is not a finite number");
        assert_eq!(err("a,y\n1,0\n2\n", "y"), " line 3: 1 fields, the header has 2");
        assert_eq!(err("a,b\n1,0\n", "y"), " line 1: no column `y` to take labels from; the columns are a, b");
        assert_eq!(err("a,y\n1,0\n2,0\n", "y"), ": label column `y` has 1 values: a class label needs 2 to 10000");
        assert_eq!(err("a,y\n", "y"), ": no rows below the header");
        let train = write(dir.path(), "train.csv", "a,y\n1,0\n2,1\n");
        let test = write(dir.path(), "test.csv", "a,y\n1,0\n2,7\n");
        let e =
            Table::read(&train, "y", &Holdout::File(test.display().to_string()), 1, false).err().unwrap().to_string();
        assert_eq!(e, format!("data set {} line 3: label `7` is not among the training rows' classes", test.display()));
    }
}
