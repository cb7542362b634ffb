//! SafeTensors, the format weights leave gantry in: an 8-byte little-endian header length, a
//! JSON header naming each tensor's dtype, shape and byte range, then the raw little-endian
//! data. PyTorch, JAX and Hugging Face load it without running any code from the file.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;

/// One float32 tensor: name, shape, values in row-major order.
pub(crate) struct Named {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A burn tensor's values, as they are laid out (transpose first where PyTorch differs).
pub(crate) fn tensor<B: Backend, const D: usize>(name: &str, t: burn::tensor::Tensor<B, D>) -> Named {
    Named {
        name: name.into(),
        shape: t.dims().to_vec(),
        values: t.into_data().to_vec::<f32>().expect("float32 weights"),
    }
}

/// The file's bytes. `metadata` goes in the header's `__metadata__` (strings only, as the
/// format requires).
pub(crate) fn safetensors(tensors: &[Named], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings serialize"));
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        for v in &t.values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [start, data.len()] }),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("a JSON object serializes");
    // The data starts 8-byte aligned, so readers can map it in place.
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Shape and values.
    pub(crate) type Read = (Vec<usize>, Vec<f32>);

    /// A reader, from the format's description: name -> (shape, values), and the metadata.
    pub(crate) fn read(bytes: &[u8]) -> (BTreeMap<String, Read>, BTreeMap<String, String>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, entry) in header {
            if name == "__metadata__" {
                metadata = serde_json::from_value(entry).unwrap();
                continue;
            }
            assert_eq!(entry["dtype"], "F32");
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
            let [start, end]: [usize; 2] = serde_json::from_value(entry["data_offsets"].clone()).unwrap();
            let values = data[start..end].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            tensors.insert(name, (shape, values));
        }
        (tensors, metadata)
    }

    #[test]
    fn tensors_and_metadata_round_trip_and_data_is_aligned() {
        let tensors = [
            Named { name: "a.weight".into(), shape: vec![2, 3], values: vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5] },
            Named { name: "a.bias".into(), shape: vec![2], values: vec![0.25, f32::MIN_POSITIVE] },
        ];
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors(&tensors, &metadata);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!((8 + n).is_multiple_of(8));
        assert_eq!(bytes.len(), 8 + n + 8 * 4);
        let (read, meta) = read(&bytes);
        assert_eq!(read["a.weight"], (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]));
        assert_eq!(read["a.bias"].1, vec![0.25, f32::MIN_POSITIVE]);
        assert_eq!(meta["format"], "pt");
    }
}
