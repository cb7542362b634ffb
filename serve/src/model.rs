//! What the server runs: any [`Model`] (the CLI implements it over the training runtime), fed
//! [`Input`]s that rows of several requests were concatenated into.

use crate::protocol::ModelMetadata;

/// A model's input, for one request or for a batch of several concatenated.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `rows` examples of `data.len() / rows` features each, row-major.
    Floats { rows: usize, data: Vec<f32> },
    /// One prompt per row (language models).
    Text(Vec<String>),
}

impl Input {
    /// Examples in this input: what a batch's size counts.
    pub fn rows(&self) -> usize {
        match self {
            Input::Floats { rows, .. } => *rows,
            Input::Text(prompts) => prompts.len(),
        }
    }
}

/// A model the server can serve. It runs on one thread of its own, which owns it: no `Sync`
/// needed, and `&mut self` for models that keep scratch space.
///
/// It declares exactly one input (FP32 `[-1, F]`, or BYTES `[-1]` for text) and one output,
/// `probabilities`, FP32 `[-1, C]`.
pub trait Model: Send + 'static {
    /// The model's inputs and outputs; `name` and `versions` are filled in by the server from
    /// its configuration.
    fn metadata(&self) -> ModelMetadata;

    /// Checks one request's input before it joins a batch (e.g. characters a language model
    /// has no token for), so a bad request gets a 400 of its own instead of failing the others
    /// batched with it. Shapes and datatypes were checked against [`Model::metadata`] already.
    fn validate(&self, _input: &Input) -> Result<(), String> {
        Ok(())
    }

    /// One forward pass over rows gathered from several requests: rows * classes probabilities.
    fn forward(&mut self, input: Input) -> Result<Vec<f32>, String>;

    /// Greedy continuation of each prompt by `chars` characters (language models only).
    fn continue_text(&mut self, _prompts: &[String], _chars: usize) -> Result<Vec<String>, String> {
        Err("this model does not generate text".into())
    }
}
