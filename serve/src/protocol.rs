//! The Open Inference Protocol (KServe v2) over HTTP/JSON: the bodies of its requests and
//! responses, and the check of an inference request against the model's metadata, which turns
//! it into the model's [`Input`].
//!
//! A request for an FP32 model (`[-1, F]`) sends one input of shape `[N, F]` (or `[F]`, one
//! example) with `N * F` numbers, flat or nested row by row; for a text model (BYTES `[-1]`),
//! shape `[N]` and `N` strings. The response has `probabilities`, FP32 `[N, C]`, and for a text
//! model asked to `generate: K` characters (a request parameter), `continuation`, BYTES `[N]`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ServeError;
use crate::model::Input;

/// Free-form parameters of a request, an input or an output.
pub type Parameters = serde_json::Map<String, Value>;

/// The datatype of pixel-like inputs and of probabilities.
pub const FP32: &str = "FP32";
/// The datatype of strings.
pub const BYTES: &str = "BYTES";
/// A classifier's output: one row of class probabilities per example.
pub const PROBABILITIES: &str = "probabilities";
/// A regression's output instead: one row of predicted numbers per example.
pub const PREDICTIONS: &str = "predictions";
/// The output of a text model asked to generate.
pub const CONTINUATION: &str = "continuation";
/// The request parameter asking a text model for a greedy continuation of that many characters.
pub const GENERATE: &str = "generate";
/// The most characters one request may ask to generate.
pub const MAX_GENERATE: u64 = 1024;
/// `platform` in model metadata.
pub const PLATFORM: &str = "gantry";

/// `POST /v2/models/{name}/infer`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    pub inputs: Vec<InputTensor>,
    /// The outputs wanted; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    /// Row-major, flat or nested (the protocol allows both).
    pub data: Value,
}

/// An output a request asks for by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

/// The body of a successful inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferResponse {
    pub model_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The request's `id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<OutputTensor>,
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// Flat, row-major.
    pub data: OutputData,
}

/// An output's elements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
}

/// `GET /v2/models/{name}`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// One input or output of a model; `-1` in a shape is any size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// `GET /v2`'s body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What a model takes, from its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// FP32 `[-1, features]`.
    Floats { features: usize },
    /// BYTES `[-1]`.
    Text,
}

/// A model's metadata, checked to be one the server serves: its input and its classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub input_name: String,
    pub input: InputKind,
    /// `probabilities` or `predictions`.
    pub output_name: String,
    /// Numbers per example in the output: classes, or a regression's predictions.
    pub classes: usize,
}

impl Signature {
    /// Checks `meta` declares exactly one input (FP32 `[-1, F]` or BYTES `[-1]`) and one output,
    /// `probabilities` (or a regression's `predictions`), FP32 `[-1, C]`.
    pub fn of(meta: &ModelMetadata) -> Result<Signature, ServeError> {
        let bad = |reason: String| Err(ServeError::Metadata(reason));
        let [input] = meta.inputs.as_slice() else {
            return bad(format!("a model has exactly one input, this one declares {}", meta.inputs.len()));
        };
        let kind = match (input.datatype.as_str(), input.shape.as_slice()) {
            (FP32, &[-1, f]) if f > 0 => InputKind::Floats { features: f as usize },
            (BYTES, [-1]) => InputKind::Text,
            (datatype, shape) => {
                return bad(format!(
                    "input \"{}\" is {datatype} {shape:?}: expected FP32 [-1, F] or BYTES [-1]",
                    input.name
                ));
            }
        };
        let [output] = meta.outputs.as_slice() else {
            return bad(format!("a model has exactly one output, this one declares {}", meta.outputs.len()));
        };
        let classes = match (output.name.as_str(), output.datatype.as_str(), output.shape.as_slice()) {
            (PROBABILITIES | PREDICTIONS, FP32, &[-1, c]) if c > 0 => c as usize,
            (name, datatype, shape) => {
                return bad(format!(
                    "output \"{name}\" is {datatype} {shape:?}: expected \"{PROBABILITIES}\" or \"{PREDICTIONS}\" FP32 [-1, C]"
                ));
            }
        };
        Ok(Signature { input_name: input.name.clone(), input: kind, output_name: output.name.clone(), classes })
    }
}

/// An inference request, checked: the model's input, and what to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub input: Input,
    /// Characters to generate after each prompt (text models, `parameters.generate`).
    pub generate: Option<usize>,
    /// Whether the response includes the model's output (`probabilities`, or `predictions`).
    pub probabilities: bool,
    /// Whether the response includes `continuation` (only with `generate`).
    pub continuation: bool,
}

/// Checks `request` against the model's `signature` and turns it into the model's input. Every
/// error names the field, e.g. `inputs[0].shape: expected [N, 64], got [3, 65]`.
pub fn validate(request: &InferRequest, signature: &Signature) -> Result<Validated, ServeError> {
    let bad = |msg: String| Err(ServeError::BadRequest(msg));
    let [tensor] = request.inputs.as_slice() else {
        return bad(format!(
            "inputs: expected exactly one input (\"{}\"), got {}",
            signature.input_name,
            request.inputs.len()
        ));
    };
    if tensor.name != signature.input_name {
        return bad(format!("inputs[0].name: expected \"{}\", got \"{}\"", signature.input_name, tensor.name));
    }
    let mut values = Vec::new();
    flatten(&tensor.data, &mut values)
        .map_err(|()| ServeError::BadRequest("inputs[0].data: expected an array".into()))?;
    let input = match signature.input {
        InputKind::Floats { features } => floats(tensor, features, &values)?,
        InputKind::Text => text(tensor, &values)?,
    };
    let generate = generate(request, signature)?;
    let (mut probabilities, mut continuation) = (true, generate.is_some());
    if let Some(wanted) = &request.outputs {
        (probabilities, continuation) = (false, false);
        for (i, output) in wanted.iter().enumerate() {
            match output.name.as_str() {
                name if name == signature.output_name => probabilities = true,
                CONTINUATION if generate.is_some() => continuation = true,
                CONTINUATION => {
                    return bad(format!("outputs[{i}].name: \"{CONTINUATION}\" needs parameters.{GENERATE}"));
                }
                other => {
                    return bad(format!("outputs[{i}].name: this model has no output \"{other}\""));
                }
            }
        }
    }
    Ok(Validated { input, generate, probabilities, continuation })
}

/// The elements of nested arrays, in order; `Err` when `value` is not an array.
fn flatten<'v>(value: &'v Value, into: &mut Vec<&'v Value>) -> Result<(), ()> {
    let Value::Array(items) = value else { return Err(()) };
    for item in items {
        match item {
            Value::Array(_) => flatten(item, into)?,
            other => into.push(other),
        }
    }
    Ok(())
}

fn floats(tensor: &InputTensor, features: usize, values: &[&Value]) -> Result<Input, ServeError> {
    let bad = |msg: String| Err(ServeError::BadRequest(msg));
    if tensor.datatype != FP32 {
        return bad(format!("inputs[0].datatype: expected {FP32}, got {}", tensor.datatype));
    }
    let rows = match *tensor.shape.as_slice() {
        [n, f] if f == features as i64 && n >= 0 => n as usize,
        [f] if f == features as i64 => 1,
        _ => return bad(format!("inputs[0].shape: expected [N, {features}], got {:?}", tensor.shape)),
    };
    if rows == 0 {
        return bad(format!("inputs[0].shape: expected at least one row, got {:?}", tensor.shape));
    }
    // A shape of 2^58 rows must not wrap around to match an empty `data`.
    let expected = rows.saturating_mul(features);
    if values.len() != expected {
        return bad(format!("inputs[0].data: shape {:?} needs {expected} numbers, got {}", tensor.shape, values.len()));
    }
    let mut data = Vec::with_capacity(expected);
    for (i, value) in values.iter().enumerate() {
        let x = value.as_f64().map(|x| x as f32).filter(|x| x.is_finite());
        match x {
            Some(x) => data.push(x),
            None => return bad(format!("inputs[0].data[{i}]: expected a finite FP32 number, got {value}")),
        }
    }
    Ok(Input::Floats { rows, data })
}

fn text(tensor: &InputTensor, values: &[&Value]) -> Result<Input, ServeError> {
    let bad = |msg: String| Err(ServeError::BadRequest(msg));
    if tensor.datatype != BYTES {
        return bad(format!("inputs[0].datatype: expected {BYTES}, got {}", tensor.datatype));
    }
    let rows = match *tensor.shape.as_slice() {
        [n] if n > 0 => n as usize,
        [0] => return bad("inputs[0].shape: expected at least one string, got [0]".into()),
        _ => return bad(format!("inputs[0].shape: expected [N], got {:?}", tensor.shape)),
    };
    if values.len() != rows {
        return bad(format!("inputs[0].data: shape {:?} needs {rows} strings, got {}", tensor.shape, values.len()));
    }
    let mut prompts = Vec::with_capacity(rows);
    for (i, value) in values.iter().enumerate() {
        match value.as_str() {
            Some(s) => prompts.push(s.to_string()),
            None => return bad(format!("inputs[0].data[{i}]: expected a string, got {value}")),
        }
    }
    Ok(Input::Text(prompts))
}

/// `parameters.generate`: an integer in 1..=MAX_GENERATE, for text models only.
fn generate(request: &InferRequest, signature: &Signature) -> Result<Option<usize>, ServeError> {
    let Some(value) = request.parameters.as_ref().and_then(|p| p.get(GENERATE)) else { return Ok(None) };
    if signature.input != InputKind::Text {
        return Err(ServeError::BadRequest(format!(
            "parameters.{GENERATE}: this model does not generate text (only language models do)"
        )));
    }
    match value.as_u64() {
        Some(k) if (1..=MAX_GENERATE).contains(&k) => Ok(Some(k as usize)),
        _ => Err(ServeError::BadRequest(format!(
            "parameters.{GENERATE}: expected an integer from 1 to {MAX_GENERATE}, got {value}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pixels(features: i64) -> ModelMetadata {
        ModelMetadata {
            name: "m".into(),
            versions: vec!["1".into()],
            platform: PLATFORM.into(),
            inputs: vec![TensorMetadata { name: "pixels".into(), datatype: FP32.into(), shape: vec![-1, features] }],
            outputs: vec![TensorMetadata { name: PROBABILITIES.into(), datatype: FP32.into(), shape: vec![-1, 10] }],
        }
    }

    fn text_model() -> ModelMetadata {
        let mut meta = pixels(1);
        meta.inputs[0] = TensorMetadata { name: "text".into(), datatype: BYTES.into(), shape: vec![-1] };
        meta
    }

    fn check(meta: &ModelMetadata, body: Value) -> Result<Validated, String> {
        let request: InferRequest = serde_json::from_value(body).unwrap();
        validate(&request, &Signature::of(meta).unwrap()).map_err(|e| e.to_string())
    }

    fn tensor(name: &str, shape: Value, datatype: &str, data: Value) -> Value {
        json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]})
    }

    #[test]
    fn flat_and_nested_data_give_the_same_rows() {
        let meta = pixels(2);
        let flat = check(&meta, tensor("pixels", json!([2, 2]), FP32, json!([1, 2, 3, 4.5]))).unwrap();
        let nested = check(&meta, tensor("pixels", json!([2, 2]), FP32, json!([[1, 2], [3, 4.5]]))).unwrap();
        assert_eq!(flat, nested);
        assert_eq!(flat.input, Input::Floats { rows: 2, data: vec![1.0, 2.0, 3.0, 4.5] });
        assert!(flat.probabilities && !flat.continuation && flat.generate.is_none());
        let one = check(&meta, tensor("pixels", json!([2]), FP32, json!([1, 2]))).unwrap();
        assert_eq!(one.input, Input::Floats { rows: 1, data: vec![1.0, 2.0] });
    }

    #[test]
    fn a_shape_too_large_to_count_is_refused_not_wrapped() {
        let huge = 1i64 << 58;
        let err = check(&pixels(64), tensor("pixels", json!([huge, 64]), FP32, json!([]))).unwrap_err();
        assert!(err.starts_with("inputs[0].data: shape"), "{err}");
    }

    #[test]
    fn every_error_names_its_field() {
        let meta = pixels(64);
        let cases = [
            (tensor("pixels", json!([3, 65]), FP32, json!([])), "inputs[0].shape: expected [N, 64], got [3, 65]"),
            (tensor("x", json!([1, 64]), FP32, json!([])), "inputs[0].name: expected \"pixels\", got \"x\""),
            (tensor("pixels", json!([1, 64]), "INT32", json!([])), "inputs[0].datatype: expected FP32, got INT32"),
            (tensor("pixels", json!([0, 64]), FP32, json!([])), "inputs[0].shape: expected at least one row"),
            (
                tensor("pixels", json!([1, 64]), FP32, json!([1, 2])),
                "inputs[0].data: shape [1, 64] needs 64 numbers, got 2",
            ),
            (tensor("pixels", json!([1, 64]), FP32, json!(3)), "inputs[0].data: expected an array"),
            (json!({"inputs": []}), "inputs: expected exactly one input (\"pixels\"), got 0"),
        ];
        for (body, want) in cases {
            let err = check(&meta, body).unwrap_err();
            assert!(err.starts_with(want), "{err} does not start with {want}");
        }
        let mut data = vec![json!(0.5); 64];
        data[5] = json!("x");
        let err = check(&meta, tensor("pixels", json!([1, 64]), FP32, json!(data))).unwrap_err();
        assert_eq!(err, "inputs[0].data[5]: expected a finite FP32 number, got \"x\"");
        let mut body = tensor("pixels", json!([64]), FP32, json!(vec![0; 64]));
        body["parameters"] = json!({"generate": 5});
        assert!(check(&meta, body).unwrap_err().starts_with("parameters.generate: this model does not generate"));
        let mut body = tensor("pixels", json!([64]), FP32, json!(vec![0; 64]));
        body["outputs"] = json!([{"name": "logits"}]);
        assert_eq!(check(&meta, body).unwrap_err(), "outputs[0].name: this model has no output \"logits\"");
    }

    #[test]
    fn text_models_take_strings_and_may_generate() {
        let meta = text_model();
        let mut body = tensor("text", json!([2]), BYTES, json!(["In the", "And God"]));
        body["parameters"] = json!({"generate": 8});
        let v = check(&meta, body.clone()).unwrap();
        assert_eq!(v.input, Input::Text(vec!["In the".into(), "And God".into()]));
        assert_eq!(v.generate, Some(8));
        assert!(v.probabilities && v.continuation);
        body["parameters"] = json!({"generate": 0});
        assert!(check(&meta, body.clone()).unwrap_err().starts_with("parameters.generate: expected an integer"));
        body["parameters"] = json!({"generate": "5"});
        assert!(check(&meta, body).is_err());
        let err = check(&meta, tensor("text", json!([2]), BYTES, json!(["a", 3]))).unwrap_err();
        assert_eq!(err, "inputs[0].data[1]: expected a string, got 3");
        let err = check(&meta, tensor("text", json!([2, 1]), BYTES, json!(["a", "b"]))).unwrap_err();
        assert_eq!(err, "inputs[0].shape: expected [N], got [2, 1]");
    }

    #[test]
    fn metadata_the_server_cannot_serve_is_refused() {
        assert_eq!(Signature::of(&pixels(64)).unwrap().input, InputKind::Floats { features: 64 });
        assert_eq!(Signature::of(&text_model()).unwrap().input, InputKind::Text);
        let mut two = pixels(64);
        two.inputs.push(two.inputs[0].clone());
        assert!(Signature::of(&two).unwrap_err().to_string().contains("exactly one input"));
        let mut logits = pixels(64);
        logits.outputs[0].name = "logits".into();
        assert!(Signature::of(&logits).unwrap_err().to_string().contains("output \"logits\""));
    }

    #[test]
    fn a_regression_answers_predictions_and_is_asked_for_them_by_that_name() {
        let mut regression = pixels(3);
        regression.outputs[0] = TensorMetadata { name: PREDICTIONS.into(), datatype: FP32.into(), shape: vec![-1, 1] };
        let signature = Signature::of(&regression).unwrap();
        assert_eq!((signature.output_name.as_str(), signature.classes), (PREDICTIONS, 1));
        let mut body = tensor("pixels", json!([1, 3]), FP32, json!([1.0, 2.0, 3.0]));
        body["outputs"] = json!([{"name": PREDICTIONS}]);
        assert!(check(&regression, body.clone()).unwrap().probabilities);
        body["outputs"] = json!([{"name": PROBABILITIES}]);
        let e = check(&regression, body).unwrap_err();
        assert!(e.contains("outputs[0].name: this model has no output \"probabilities\""), "{e}");
    }
}
