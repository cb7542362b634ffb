//! What a model reads, as a data set gives it: the one thing `models` and `datasets` share, so
//! that neither depends on the other. The shapes here are the data sets' (8x8 digits in ten
//! classes; windows of text over a 96-character vocabulary) and the models are built for them.

use burn::tensor::{Int, Tensor, backend::Backend};

/// Pixels of a digit: 8x8.
pub(crate) const FEATURES: usize = 64;
/// Digits 0..9.
pub(crate) const CLASSES: usize = 10;
/// Characters a language model sees at once.
pub(crate) const CONTEXT: usize = 64;
/// Tokens of the text: the line break, then printable ASCII.
pub(crate) const VOCAB: usize = 96;

/// A batch of model input: pixels (the digits models) or token ids (the language model).
pub(crate) enum Input<B: Backend> {
    /// [batch, FEATURES] pixel intensities in 0..=1.
    Pixels(Tensor<B, 2>),
    /// [batch, CONTEXT] token ids below VOCAB.
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
