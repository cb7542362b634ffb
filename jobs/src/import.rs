//! SafeTensors in: weights made outside gantry (PyTorch's `safetensors.torch.save_file`), for
//! `init_from: FILE.safetensors`. Names and layout are those [`crate::export`] writes, so a
//! checkpoint's `model.safetensors` comes back in as it went out. The file's header is checked
//! against its length before any tensor is read; no code in it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::error::JobsError;

/// The longest header we read: PyTorch writes a few hundred bytes per tensor.
const HEADER_LIMIT: usize = 64 * 1024 * 1024;
/// Names listed in an error before "and N more".
const LISTED: usize = 8;

/// The tensors of one file, taken by a model's import one by one; what did not match is kept
/// until [`Weights::finish`] says it all at once.
pub(crate) struct Weights {
    path: PathBuf,
    /// Name -> (shape, values as f32).
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    used: BTreeSet<String>,
    missing: Vec<String>,
    wrong_shape: Vec<String>,
}

impl Weights {
    pub(crate) fn read(path: &Path) -> Result<Weights, JobsError> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e.to_string()))?;
        Weights::parse(path, &bytes)
    }

    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Weights, JobsError> {
        let fail = |reason: String| bad(path, reason);
        let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let n = n.ok_or_else(|| fail("shorter than a SafeTensors header".into()))? as usize;
        if n > HEADER_LIMIT || 8 + n > bytes.len() {
            return Err(fail(format!("header of {n} bytes does not fit a file of {}", bytes.len())));
        }
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| fail(format!("header is not a JSON object: {e}")))?;
        let data = &bytes[8 + n..];
        let mut tensors = BTreeMap::new();
        for (name, entry) in header {
            if name == "__metadata__" {
                continue;
            }
            let entry: Entry = serde_json::from_value(entry).map_err(|e| fail(format!("tensor `{name}`: {e}")))?;
            let values = entry.values(data).map_err(|reason| fail(format!("tensor `{name}`: {reason}")))?;
            tensors.insert(name, (entry.shape, values));
        }
        Ok(Weights {
            path: path.to_path_buf(),
            tensors,
            used: BTreeSet::new(),
            missing: Vec::new(),
            wrong_shape: Vec::new(),
        })
    }

    /// `param` with the values of tensor `name`, or `param` unchanged when the file has no such
    /// tensor or one of another shape (noted for [`Weights::finish`]). `transposed`: the file
    /// holds a linear layer's weight as PyTorch does, [out, in], for burn's [in, out].
    pub(crate) fn take<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        param: Param<Tensor<B, D>>,
        transposed: bool,
    ) -> Param<Tensor<B, D>> {
        let dims = param.val().dims();
        let mut want = dims.to_vec();
        if transposed {
            want.reverse();
        }
        let Some((shape, values)) = self.tensors.get(name) else {
            self.missing.push(format!("{name} {want:?}"));
            return param;
        };
        self.used.insert(name.to_string());
        if *shape != want {
            self.wrong_shape.push(format!("{name} is {shape:?}, the model's is {want:?}"));
            return param;
        }
        let values = match transposed {
            true => transpose(values, want[0], want[1]),
            false => values.clone(),
        };
        let (id, tensor, _) = param.consume();
        let device = tensor.device();
        Param::initialized(id, Tensor::from_data(TensorData::new(values, dims), &device).require_grad())
    }

    /// Every tensor of the model was found with its shape, and the file has no others.
    pub(crate) fn finish(self) -> Result<(), JobsError> {
        let unused: Vec<String> = self.tensors.keys().filter(|n| !self.used.contains(*n)).cloned().collect();
        let mut problems = Vec::new();
        for (what, names) in
            [("missing", &self.missing), ("of another shape", &self.wrong_shape), ("not in this model", &unused)]
        {
            if !names.is_empty() {
                problems.push(format!("{what}: {}", listed(names)));
            }
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(bad(&self.path, format!("its tensors do not match the model's; {}", problems.join("; ")))),
        }
    }
}

fn bad(path: &Path, reason: String) -> JobsError {
    JobsError::Weights { path: path.to_path_buf(), reason }
}

fn listed(names: &[String]) -> String {
    let mut text = names.iter().take(LISTED).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > LISTED {
        text.push_str(&format!(" and {} more", names.len() - LISTED));
    }
    text
}

/// One tensor's header entry.
#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl Entry {
    fn values(&self, data: &[u8]) -> Result<Vec<f32>, String> {
        let [start, end] = self.data_offsets;
        let bytes = data.get(start..end).ok_or_else(|| format!("bytes {start}..{end} are past the file's end"))?;
        let size = match self.dtype.as_str() {
            "F64" => 8,
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => return Err(format!("dtype {other} is not a float type (F64, F32, F16, BF16)")),
        };
        let count = self.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
        if count.and_then(|c| c.checked_mul(size)) != Some(bytes.len()) {
            return Err(format!("{} bytes do not hold shape {:?} of {}", bytes.len(), self.shape, self.dtype));
        }
        let chunks = bytes.chunks_exact(size);
        Ok(match self.dtype.as_str() {
            "F64" => chunks.map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
            "F32" => chunks.map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
            "F16" => chunks.map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => chunks.map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }
}

/// Row-major [rows, cols] to [cols, rows].
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| values[r * cols + c])).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::export::{Named, safetensors};

    #[test]
    fn files_that_are_not_safetensors_are_refused_with_why() {
        let err = |bytes: &[u8]| Weights::parse(Path::new("w.safetensors"), bytes).err().unwrap().to_string();
        assert!(err(b"abc").ends_with("shorter than a SafeTensors header"), "{}", err(b"abc"));
        assert!(err(&[255, 255, 0, 0, 0, 0, 0, 0, b'{']).contains("does not fit a file of 9"));
        let mut good =
            safetensors(&[Named { name: "a".into(), shape: vec![2], values: vec![1.0, 2.0] }], &BTreeMap::new());
        good.truncate(good.len() - 1);
        assert!(err(&good).contains("tensor `a`: bytes 0..8 are past the file's end"), "{}", err(&good));
    }

    #[test]
    fn half_precision_tensors_are_read_as_f32() {
        let header = br#"{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        for v in [1.5f32, -2.0] {
            bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        }
        let w = Weights::parse(Path::new("w"), &bytes).unwrap();
        assert_eq!(w.tensors["w"], (vec![2], vec![1.5, -2.0]));
    }
}
