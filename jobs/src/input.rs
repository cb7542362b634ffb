//! What a model reads, as a data set gives it: the one thing `models` and `datasets` share, so
//! that neither depends on the other. A data set says what its examples are ([`InputShape`]:
//! numbers per example and classes) and a model is built for that shape; the built-in shapes
//! are the digits' (8x8 pixels in ten classes) and text's (a 96-character vocabulary).

use burn::tensor::{Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

/// Pixels of a digit: 8x8.
pub(crate) const FEATURES: usize = 64;
/// Digits 0..9.
pub(crate) const CLASSES: usize = 10;
/// Tokens of the text: the line break, then printable ASCII.
pub(crate) const VOCAB: usize = 96;

/// What a data set's examples are, as a model is built for them and a checkpoint records them
/// (so a served model reads its input as training did).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputShape {
    /// Numbers per example (pixels, a table's feature columns); 0 for text.
    pub width: usize,
    /// What the model predicts one of: classes, or the vocabulary's characters.
    pub classes: usize,
    /// Images' [channels, height, width], their numbers laid out in that order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<[usize; 3]>,
    /// A table's feature columns, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// A table's label values, in class order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The (mean, standard deviation) each of a table's columns was standardised with, from
    /// the training rows: new input is scaled the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale: Vec<(f32, f32)>,
    /// A regression: the (mean, standard deviation) the target column was standardised with,
    /// from the training rows. The model predicts one standardised number (`classes` is 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<(f32, f32)>,
}

impl InputShape {
    /// The digits: 64 pixels in 0..=1, ten classes.
    pub(crate) fn digits() -> InputShape {
        InputShape { image: Some([1, 8, 8]), ..InputShape::numbers(FEATURES, CLASSES) }
    }

    /// Text: characters as tokens of the vocabulary.
    pub(crate) fn text() -> InputShape {
        InputShape::numbers(0, VOCAB)
    }

    pub(crate) fn numbers(width: usize, classes: usize) -> InputShape {
        InputShape {
            width,
            classes,
            image: None,
            columns: Vec::new(),
            labels: Vec::new(),
            scale: Vec::new(),
            target: None,
        }
    }
}

/// A batch of model input: pixels (the digits models) or token ids (the language model).
pub(crate) enum Input<B: Backend> {
    /// [batch, width] numbers: pixel intensities in 0..=1, or a table's standardised columns.
    Pixels(Tensor<B, 2>),
    /// [batch, context] token ids below VOCAB.
    Tokens(Tensor<B, 2, Int>),
}

impl<B: Backend> Clone for Input<B> {
    fn clone(&self) -> Self {
        match self {
            Input::Pixels(x) => Input::Pixels(x.clone()),
            Input::Tokens(x) => Input::Tokens(x.clone()),
        }
    }
}

impl<B: Backend> Input<B> {
    /// The training loop pairs each model with its kind of data (an exhaustive match on the
    /// spec's model and dataset), so a mismatch is a bug, not bad input.
    pub(crate) fn pixels(self) -> Tensor<B, 2> {
        match self {
            Input::Pixels(x) => x,
            Input::Tokens(_) => unreachable!("a pixel model was given tokens"),
        }
    }

    pub(crate) fn tokens(self) -> Tensor<B, 2, Int> {
        match self {
            Input::Tokens(x) => x,
            Input::Pixels(_) => unreachable!("a token model was given pixels"),
        }
    }
}
