//! `train.dataset`: a data set built into the runtime by name (`digits`, `genesis`), or the
//! user's own files, read on the agent: `{table: PATH, label: COLUMN}` (CSV with a header, or
//! Parquet; `target: COLUMN` for a regression),
//! `{images: DIR, size: [H, W]}` (a folder per class) or `{text: PATH}` (plain text), each
//! with its held-out part as `test: PATH` or `test_fraction: F`.

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{DatasetKind, SpecError};

/// The held-out share when a spec names neither `test` nor `test_fraction`.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;
/// A path, in bytes.
pub const PATH_LIMIT: usize = 4096;

/// Where a job's examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    Builtin(DatasetKind),
    /// Rows of a CSV or Parquet file: numeric feature columns and one column to predict, `label`
    /// (a class, by number or by name) or, with `regression`, a number (`target:` in a spec).
    Table {
        path: String,
        label: String,
        holdout: Holdout,
        regression: bool,
    },
    /// A folder per class of PNG and JPEG images, resized to `size` ([height, width]); with
    /// `augment`, each training image is randomly cropped and flipped every epoch.
    Images {
        path: String,
        size: [u32; 2],
        augment: bool,
        holdout: Holdout,
    },
    /// A plain-text corpus for the character-level language model.
    Text {
        path: String,
        holdout: Holdout,
    },
}

/// The largest side an image is resized to.
pub const IMAGE_SIDE_LIMIT: u32 = 1024;

/// The examples a run is evaluated on.
#[derive(Debug, Clone, PartialEq)]
pub enum Holdout {
    /// A file (a folder, for images) of the same kind.
    File(String),
    /// This share of the examples: rows or images drawn by the job's seed, the end of the text
    /// for a corpus (random windows would share text with the training part).
    Fraction(f64),
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec::Builtin(DatasetKind::default())
    }
}

impl From<DatasetKind> for DatasetSpec {
    fn from(kind: DatasetKind) -> Self {
        DatasetSpec::Builtin(kind)
    }
}

impl DatasetSpec {
    /// Whether the examples are text rather than numbers.
    pub fn is_text(&self) -> bool {
        match self {
            DatasetSpec::Builtin(kind) => kind.is_text(),
            DatasetSpec::Table { .. } | DatasetSpec::Images { .. } => false,
            DatasetSpec::Text { .. } => true,
        }
    }

    /// The built-in data set, if it is one.
    pub fn builtin(&self) -> Option<DatasetKind> {
        match self {
            DatasetSpec::Builtin(kind) => Some(*kind),
            _ => None,
        }
    }

    /// `digits`, `genesis`, `table`, `images` or `text`: what the wire carries as the kind.
    pub fn kind_name(&self) -> &str {
        match self {
            DatasetSpec::Builtin(kind) => kind.name(),
            DatasetSpec::Table { .. } => "table",
            DatasetSpec::Images { .. } => "images",
            DatasetSpec::Text { .. } => "text",
        }
    }

    /// The rules of the mapping; field names in errors are `train.dataset.*`.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (path, holdout, kind) = match self {
            DatasetSpec::Builtin(_) => return Ok(()),
            DatasetSpec::Table { path, label, holdout, regression } => {
                if label.is_empty() {
                    let field = if *regression { "train.dataset.target" } else { "train.dataset.label" };
                    return Err(SpecError::new(field, "must name a column"));
                }
                (path, holdout, "table")
            }
            DatasetSpec::Images { path, size, holdout, .. } => {
                if size.iter().any(|s| *s < 2 || *s > IMAGE_SIDE_LIMIT) {
                    let reason = format!("sides are 2 to {IMAGE_SIDE_LIMIT} pixels, got {size:?}");
                    return Err(SpecError::new("train.dataset.size", reason));
                }
                (path, holdout, "images")
            }
            DatasetSpec::Text { path, holdout } => (path, holdout, "text"),
        };
        check_path(&format!("train.dataset.{kind}"), path)?;
        match holdout {
            Holdout::File(test) => check_path("train.dataset.test", test),
            Holdout::Fraction(f) if !(*f > 0.0 && *f < 1.0) => {
                Err(SpecError::new("train.dataset.test_fraction", format!("must be above 0 and below 1, got {f}")))
            }
            Holdout::Fraction(_) => Ok(()),
        }
    }
}

pub(super) fn check_path(field: &str, path: &str) -> Result<(), SpecError> {
    if path.is_empty() || path.len() > PATH_LIMIT || path.contains('\0') {
        return Err(SpecError::new(field, format!("must be a path of 1 to {PATH_LIMIT} bytes, without NUL")));
    }
    match super::Fetched::parse(path) {
        Some(Err(why)) => Err(SpecError::new(field, why)),
        _ => Ok(()),
    }
}

impl std::fmt::Display for DatasetSpec {
    /// The name for progress lines and checkpoints: `digits`, `table:PATH`, `text:PATH`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatasetSpec::Builtin(kind) => f.write_str(kind.name()),
            DatasetSpec::Table { path, .. } => write!(f, "table:{path}"),
            DatasetSpec::Images { path, .. } => write!(f, "images:{path}"),
            DatasetSpec::Text { path, .. } => write!(f, "text:{path}"),
        }
    }
}

/// The mapping form, as written.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Files {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    images: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<[u32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    augment: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test_fraction: Option<f64>,
}

impl Files {
    fn into_spec(self) -> Result<DatasetSpec, String> {
        let holdout = match (self.test, self.test_fraction) {
            (Some(_), Some(_)) => return Err("give `test` or `test_fraction`, not both".into()),
            (Some(test), None) => Holdout::File(test),
            (None, f) => Holdout::Fraction(f.unwrap_or(DEFAULT_TEST_FRACTION)),
        };
        let image_fields = self.size.is_some() || self.augment.is_some();
        match (self.table, self.images, self.text) {
            (Some(_), None, None) | (None, None, Some(_)) if image_fields => {
                Err("`size` and `augment` apply to `images`".into())
            }
            (Some(path), None, None) => match (self.label, self.target) {
                (Some(label), None) => Ok(DatasetSpec::Table { path, label, holdout, regression: false }),
                (None, Some(target)) => Ok(DatasetSpec::Table { path, label: target, holdout, regression: true }),
                (Some(_), Some(_)) => Err("give `label` (a class to predict) or `target` (a number), not both".into()),
                (None, None) => {
                    Err("a `table` needs `label` (the column of classes to predict) or `target` (of numbers)".into())
                }
            },
            (None, Some(_), None) | (None, None, Some(_)) if self.label.is_some() || self.target.is_some() => {
                Err("`label` and `target` apply to a `table` (an image's class is its folder)".into())
            }
            (None, Some(path), None) => match self.size {
                Some(size) => Ok(DatasetSpec::Images { path, size, augment: self.augment.unwrap_or(false), holdout }),
                None => Err("`images` need `size: [HEIGHT, WIDTH]`: what every image is resized to".into()),
            },
            (None, None, Some(path)) => Ok(DatasetSpec::Text { path, holdout }),
            _ => Err("give exactly one of `table`, `images` and `text`".into()),
        }
    }
}

impl Serialize for DatasetSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (holdout, mut files) = match self {
            DatasetSpec::Builtin(kind) => return kind.serialize(s),
            DatasetSpec::Table { path, label, holdout, regression } => {
                let column = Some(label.clone());
                let (label, target) = if *regression { (None, column) } else { (column, None) };
                (holdout, Files { table: Some(path.clone()), label, target, ..Files::default() })
            }
            DatasetSpec::Images { path, size, augment, holdout } => (
                holdout,
                Files { images: Some(path.clone()), size: Some(*size), augment: Some(*augment), ..Files::default() },
            ),
            DatasetSpec::Text { path, holdout } => (holdout, Files { text: Some(path.clone()), ..Files::default() }),
        };
        match holdout {
            Holdout::File(test) => files.test = Some(test.clone()),
            Holdout::Fraction(f) => files.test_fraction = Some(*f),
        }
        files.serialize(s)
    }
}

impl<'de> Deserialize<'de> for DatasetSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NameOrFiles)
    }
}

struct NameOrFiles;

impl<'de> Visitor<'de> for NameOrFiles {
    type Value = DatasetSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a data set name (digits, genesis) or a mapping such as {table: data.csv, label: class}")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<DatasetSpec, E> {
        name.parse().map(DatasetSpec::Builtin).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DatasetSpec, A::Error> {
        Files::deserialize(de::value::MapAccessDeserializer::new(map))?.into_spec().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<DatasetSpec, String> {
        serde_yaml::from_str::<DatasetSpec>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn names_and_file_mappings_parse_and_round_trip() {
        assert_eq!(parse("genesis").unwrap(), DatasetSpec::Builtin(DatasetKind::Genesis));
        let table = parse("{table: data/iris.csv, label: species}").unwrap();
        assert_eq!(
            table,
            DatasetSpec::Table {
                path: "data/iris.csv".into(),
                label: "species".into(),
                holdout: Holdout::Fraction(DEFAULT_TEST_FRACTION),
                regression: false,
            }
        );
        let prices = parse("{table: homes.parquet, target: price}").unwrap();
        assert!(matches!(&prices, DatasetSpec::Table { label, regression: true, .. } if label == "price"));
        assert_eq!(table.to_string(), "table:data/iris.csv");
        let images = parse("{images: pics, size: [32, 48], augment: true}").unwrap();
        assert_eq!(
            images,
            DatasetSpec::Images {
                path: "pics".into(),
                size: [32, 48],
                augment: true,
                holdout: Holdout::Fraction(DEFAULT_TEST_FRACTION)
            }
        );
        let text = parse("{text: corpus.txt, test: held-out.txt}").unwrap();
        assert_eq!(
            text,
            DatasetSpec::Text { path: "corpus.txt".into(), holdout: Holdout::File("held-out.txt".into()) }
        );
        for spec in [DatasetSpec::default(), table, prices, images, text] {
            let yaml = serde_yaml::to_string(&spec).unwrap();
            assert_eq!(parse(&yaml).unwrap(), spec, "{yaml}");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<DatasetSpec>(&json).unwrap(), spec, "{json}");
        }
    }

    #[test]
    fn mappings_that_do_not_say_one_thing_are_refused_with_why() {
        let err = |yaml: &str| parse(yaml).unwrap_err();
        assert!(
            err("{table: a.csv}").contains("a `table` needs `label` (the column of classes"),
            "{}",
            err("{table: a.csv}")
        );
        assert!(err("{table: a.csv, label: y, target: z}").contains("not both"));
        assert!(err("{table: a.csv, text: b.txt, label: y}").contains("exactly one of `table`, `images` and `text`"));
        assert!(err("{text: b.txt, label: y}").contains("`label` and `target` apply to a `table`"));
        assert!(err("{images: p, size: [8, 8], target: y}").contains("`label` and `target` apply to a `table`"));
        assert!(err("{text: b.txt, test: c, test_fraction: 0.1}").contains("not both"));
        assert!(err("{images: pics}").contains("`images` need `size: [HEIGHT, WIDTH]`"));
        assert!(err("{text: b.txt, size: [8, 8]}").contains("`size` and `augment` apply to `images`"));
        assert!(err("{images: pics, size: [8]}").contains("size"), "{}", err("{images: pics, size: [8]}"));
        assert!(err("{table: a.csv, lable: y}").contains("unknown field `lable`"));
        let invalid = |yaml: &str| parse(yaml).unwrap().validate().unwrap_err().to_string();
        assert_eq!(
            invalid("{text: b.txt, test_fraction: 1.0}"),
            "train.dataset.test_fraction: must be above 0 and below 1, got 1"
        );
        assert_eq!(
            invalid("{table: '', label: y}"),
            "train.dataset.table: must be a path of 1 to 4096 bytes, without NUL"
        );
        assert_eq!(
            invalid("{table: 's3://b', label: y}"),
            "train.dataset.table: `s3://b` names no object: write s3://BUCKET/KEY, a file or a folder"
        );
        assert!(parse("{table: 's3://b/a.csv', label: y}").unwrap().validate().is_ok());
        assert_eq!(
            invalid("{table: 'dataset://wine@v1/a.csv', label: y}"),
            "train.dataset.table: `@v1` is not a data set version (64 lowercase hex digits of its sha256)"
        );
        assert!(parse("{table: 'dataset://wine/a.csv', label: y}").unwrap().validate().is_ok());
    }
}
