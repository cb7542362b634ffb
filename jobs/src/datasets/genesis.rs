//! The text data set of the character-level language model: the Book of Genesis (KJV, public
//! domain, see data/README.md), as tokens, split into a training part and a held-out tail.
//!
//! Tokens are characters: printable ASCII (space to `~`) and the line break, 96 in all, so any
//! ASCII text fits the same model. An example is a window of `CONTEXT` tokens; its targets are
//! the same window shifted by one (predict every next character).

use std::sync::OnceLock;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::{BadLine, Examples, parsed_once};
use crate::error::JobsError;
use crate::input::{CONTEXT, Input};

/// Embedded so the binary is self-contained.
const GENESIS: &str = include_str!("../../data/genesis.txt");
/// The held-out tail: the last tenth of the lines.
const TEST_PERCENT: usize = 10;

pub(crate) fn token(c: u8) -> Option<i64> {
    match c {
        b'\n' => Some(0),
        b' '..=b'~' => Some(i64::from(c - b' ') + 1),
        _ => None,
    }
}

/// Consecutive windows of a token stream.
pub(crate) struct Windows {
    tokens: Vec<i64>,
}

impl Windows {
    /// Tokens of the text, in windows of `CONTEXT` (plus the one after each, its last target).
    fn new(text: &str, first_line: usize) -> Result<Windows, BadLine> {
        let mut tokens = Vec::with_capacity(text.len());
        for (i, line) in text.split_inclusive('\n').enumerate() {
            for c in line.bytes() {
                let t = token(c).ok_or_else(|| BadLine {
                    line: first_line + i + 1,
                    reason: format!("character {c:#04x} is not printable ASCII"),
                })?;
                tokens.push(t);
            }
        }
        Ok(Windows { tokens })
    }
}

impl Examples for Windows {
    fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / CONTEXT
    }

    fn batch<B: Backend>(&self, indices: &[usize], device: &B::Device) -> (Input<B>, Tensor<B, 1, Int>) {
        let n = indices.len();
        let (mut x, mut y) = (Vec::with_capacity(n * CONTEXT), Vec::with_capacity(n * CONTEXT));
        for &i in indices {
            let start = i * CONTEXT;
            x.extend_from_slice(&self.tokens[start..start + CONTEXT]);
            y.extend_from_slice(&self.tokens[start + 1..start + CONTEXT + 1]);
        }
        (
            Input::Tokens(Tensor::from_data(TensorData::new(x, [n, CONTEXT]), device)),
            Tensor::from_data(TensorData::new(y, [n * CONTEXT]), device),
        )
    }
}

pub(crate) struct Corpus {
    pub(crate) train: Windows,
    pub(crate) test: Windows,
}

/// The embedded corpus, split once per process.
pub(crate) fn genesis() -> Result<&'static Corpus, JobsError> {
    static CORPUS: OnceLock<Result<Corpus, BadLine>> = OnceLock::new();
    parsed_once(&CORPUS, || split(GENESIS))
}

fn split(text: &str) -> Result<Corpus, BadLine> {
    let lines = text.split_inclusive('\n').count();
    let train_lines = lines - lines * TEST_PERCENT / 100;
    let cut: usize = text.split_inclusive('\n').take(train_lines).map(str::len).sum();
    Ok(Corpus { train: Windows::new(&text[..cut], 0)?, test: Windows::new(&text[cut..], train_lines)? })
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    #[test]
    fn the_corpus_splits_into_windows_whose_targets_are_the_next_characters() {
        let corpus = genesis().unwrap();
        // 196,818 characters: about 177,000 train and 20,000 are held out.
        assert!(corpus.train.len() > 2_600 && corpus.test.len() > 250, "{} {}", corpus.train.len(), corpus.test.len());
        let (x, y) = corpus.train.batch::<NdArray>(&[0, 1], &Default::default());
        let x = x.tokens().into_data().to_vec::<i64>().unwrap();
        let y = y.into_data().to_vec::<i64>().unwrap();
        let text: String = x[..12].iter().map(|&t| (t as u8 - 1 + b' ') as char).collect();
        assert_eq!(text, "In the begin");
        assert_eq!(x[1..CONTEXT], y[..CONTEXT - 1]);
        assert_eq!(y[CONTEXT - 1], x[CONTEXT], "window 1 starts where window 0's targets end");
    }

    #[test]
    fn every_token_is_below_the_vocabulary_size_the_models_are_built_for() {
        let tokens: Vec<i64> = (0..=u8::MAX).filter_map(token).collect();
        assert_eq!(tokens.len(), crate::input::VOCAB);
        assert_eq!(tokens.iter().max(), Some(&(crate::input::VOCAB as i64 - 1)));
    }

    #[test]
    fn text_outside_printable_ascii_is_refused_with_its_line() {
        let err = Windows::new("fine\nnot fine: \u{e9}\n", 0).err().unwrap();
        assert_eq!(err, BadLine { line: 2, reason: "character 0xc3 is not printable ASCII".into() });
        // Lines of the held-out part count on from the training part's.
        assert_eq!(Windows::new("\u{e9}", 10).err().unwrap().line, 11);
    }
}
