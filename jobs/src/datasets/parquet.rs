//! Parquet tables: the same rows as a CSV file's (numeric features, one label column), read
//! with the parquet crate's row reader. Errors name the row (the first is row 1).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use super::table::{Rows, split_header};
use crate::error::JobsError;

pub(super) fn read_rows(path: &Path, label: &str) -> Result<Rows, JobsError> {
    let at = |row: Option<usize>, reason: String| JobsError::DataFile {
        path: path.to_path_buf(),
        at: row.map(|r| format!("row {r}")),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| at(None, e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| at(None, format!("not a Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let header: Vec<String> = schema.root_schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let (label_at, columns) = split_header(&header, label).map_err(|why| at(None, why))?;
    let mut rows = Rows { columns, x: Vec::new(), labels: Vec::new() };
    let iter = reader.get_row_iter(None).map_err(|e| at(None, e.to_string()))?;
    for (i, row) in iter.enumerate() {
        let n = i + 1;
        let row = row.map_err(|e| at(Some(n), e.to_string()))?;
        for (c, (name, field)) in row.get_column_iter().enumerate() {
            if c == label_at {
                let text = match field {
                    Field::Null => return Err(at(Some(n), format!("column `{label}`: the label is empty (null)"))),
                    Field::Str(s) => s.trim().to_string(),
                    other if number(other).is_some() => other.to_string(),
                    other => return Err(at(Some(n), format!("column `{label}`: `{other}` is not a class label"))),
                };
                rows.labels.push((text, format!("row {n}")));
                continue;
            }
            match number(field) {
                Some(v) if v.is_finite() => rows.x.push(v as f32),
                _ => return Err(at(Some(n), format!("column `{name}`: `{field}` is not a finite number"))),
            }
        }
    }
    if rows.labels.is_empty() {
        return Err(at(None, "no rows".into()));
    }
    Ok(rows)
}

/// A numeric cell's value; booleans are 0 and 1.
fn number(field: &Field) -> Option<f64> {
    Some(match *field {
        Field::Bool(v) => f64::from(u8::from(v)),
        Field::Byte(v) => f64::from(v),
        Field::Short(v) => f64::from(v),
        Field::Int(v) => f64::from(v),
        Field::Long(v) => v as f64,
        Field::UByte(v) => f64::from(v),
        Field::UShort(v) => f64::from(v),
        Field::UInt(v) => f64::from(v),
        Field::ULong(v) => v as f64,
        Field::Float16(v) => f64::from(v),
        Field::Float(v) => f64::from(v),
        Field::Double(v) => v,
        _ => return None,
    })
}
