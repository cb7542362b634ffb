//! Text for the character-level language model: the built-in Genesis and the user's own
//! corpora. Tokens are characters: printable ASCII (space to `~`) and the line break, 96 in
//! all, so any ASCII text fits the same model (a CR before a line break is dropped). An example
//! is a window of `context` tokens; its targets are the same window shifted by one (predict
//! every next character).

use std::path::Path;

use gantry_core::spec::Holdout;

use super::{BadLine, Examples, Prepared, PreparedInput, Targets};
use crate::error::JobsError;

pub(crate) fn token(c: u8) -> Option<i64> {
    match c {
        b'\n' => Some(0),
        b' '..=b'~' => Some(i64::from(c - b' ') + 1),
        _ => None,
    }
}

/// The tokens of `text`, whose first line is line `first_line + 1` of its file.
pub(crate) fn tokenize(text: &str, first_line: usize) -> Result<Vec<i64>, BadLine> {
    let mut tokens = Vec::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let (body, crlf) = match line.strip_suffix("\r\n") {
            Some(body) => (body, true),
            None => (line, false),
        };
        for &c in body.as_bytes().iter().chain(crlf.then_some(&b'\n')) {
            let t = token(c).ok_or_else(|| BadLine {
                line: first_line + i + 1,
                reason: format!("character {c:#04x} is not printable ASCII (the model reads ASCII text)"),
            })?;
            tokens.push(t);
        }
    }
    Ok(tokens)
}

/// A corpus as tokens: the part trained on and the held-out part.
pub(crate) struct Corpus {
    pub(crate) train: Vec<i64>,
    pub(crate) test: Vec<i64>,
}

impl Corpus {
    /// `text` with its last `fraction` of lines held out.
    pub(super) fn split(text: &str, fraction: f64) -> Result<Corpus, BadLine> {
        let lines = text.split_inclusive('\n').count();
        // Rounded down, as Genesis's tenth always was (the epsilon keeps 0.1 x 1530 at 153).
        let test_lines = ((lines as f64 * fraction + 1e-9) as usize).clamp(1, lines.max(1));
        let train_lines = lines.saturating_sub(test_lines);
        let cut: usize = text.split_inclusive('\n').take(train_lines).map(str::len).sum();
        Ok(Corpus { train: tokenize(&text[..cut], 0)?, test: tokenize(&text[cut..], train_lines)? })
    }

    /// The user's corpus at `path`, held out as `holdout` says; every window must fit at least
    /// once in each part.
    pub(crate) fn read(path: &Path, holdout: &Holdout, context: usize) -> Result<Corpus, JobsError> {
        let text = read_text(path)?;
        fn at(path: &Path) -> impl Fn(BadLine) -> JobsError + '_ {
            move |bad| data_error(path, Some(bad.line), bad.reason)
        }
        let corpus = match holdout {
            Holdout::Fraction(f) => Corpus::split(&text, *f).map_err(at(path))?,
            Holdout::File(test) => {
                let test = Path::new(test);
                let test_tokens = tokenize(&read_text(test)?, 0).map_err(at(test))?;
                Corpus { train: tokenize(&text, 0).map_err(at(path))?, test: test_tokens }
            }
        };
        for (part, tokens) in [("training", &corpus.train), ("held-out", &corpus.test)] {
            if tokens.len() <= context {
                let reason = format!(
                    "the {part} text has {} characters, fewer than one window of the model's context {context} plus one",
                    tokens.len()
                );
                return Err(data_error(path, None, reason));
            }
        }
        Ok(corpus)
    }

    /// Windows of `context` tokens over each part.
    pub(crate) fn windows(&self, context: usize) -> (Windows<'_>, Windows<'_>) {
        (Windows { tokens: &self.train, context }, Windows { tokens: &self.test, context })
    }
}

fn read_text(path: &Path) -> Result<String, JobsError> {
    let bytes = std::fs::read(path).map_err(|e| data_error(path, None, e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = before.iter().filter(|b| **b == b'\n').count() + 1;
        data_error(path, Some(line), "not UTF-8 text".into())
    })
}

pub(super) fn data_error(path: &Path, line: Option<usize>, reason: String) -> JobsError {
    JobsError::DataFile { path: path.to_path_buf(), at: line.map(|l| format!("line {l}")), reason }
}

/// Consecutive windows of a token stream.
pub(crate) struct Windows<'a> {
    tokens: &'a [i64],
    context: usize,
}

impl Examples for Windows<'_> {
    fn len(&self) -> usize {
        self.tokens.len().saturating_sub(1) / self.context
    }

    fn prepare(&self, indices: &[usize], _: u32) -> Prepared {
        let (n, context) = (indices.len(), self.context);
        let (mut x, mut y) = (Vec::with_capacity(n * context), Vec::with_capacity(n * context));
        for &i in indices {
            let start = i * context;
            x.extend_from_slice(&self.tokens[start..start + context]);
            y.extend_from_slice(&self.tokens[start + 1..start + context + 1]);
        }
        Prepared { x: PreparedInput::Tokens { ids: x, rows: n }, y: Targets::Classes(y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_is_below_the_vocabulary_size_the_models_are_built_for() {
        let tokens: Vec<i64> = (0..=u8::MAX).filter_map(token).collect();
        assert_eq!(tokens.len(), crate::input::VOCAB);
        assert_eq!(tokens.iter().max(), Some(&(crate::input::VOCAB as i64 - 1)));
    }

    #[test]
    fn text_outside_printable_ascii_is_refused_with_its_line_and_crlf_is_a_line_break() {
        let err = tokenize("fine\nnot fine: \u{e9}\n", 0).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.starts_with("character 0xc3 is not printable ASCII"), "{}", err.reason);
        // Lines of the held-out part count on from the training part's.
        assert_eq!(tokenize("\u{e9}", 10).unwrap_err().line, 11);
        assert_eq!(tokenize("a\r\nb", 0).unwrap(), tokenize("a\nb", 0).unwrap());
    }

    #[test]
    fn user_corpora_are_split_by_lines_and_too_short_parts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(&path, "abcdefgh\n".repeat(10)).unwrap();
        let corpus = Corpus::read(&path, &Holdout::Fraction(0.2), 8).unwrap();
        assert_eq!((corpus.train.len(), corpus.test.len()), (72, 18));
        let err = Corpus::read(&path, &Holdout::Fraction(0.1), 16).err().unwrap().to_string();
        assert!(
            err.ends_with(
                "the held-out text has 9 characters, fewer than one window of the model's context 16 plus one"
            ),
            "{err}"
        );
        std::fs::write(&path, b"ok\n\xff\n").unwrap();
        let err = Corpus::read(&path, &Holdout::Fraction(0.5), 1).err().unwrap().to_string();
        assert_eq!(err, format!("data set {} line 2: not UTF-8 text", path.display()));
        let missing = dir.path().join("none.txt");
        let err = Corpus::read(&missing, &Holdout::Fraction(0.5), 1).err().unwrap().to_string();
        assert!(err.starts_with(&format!("data set {}: No such file", missing.display())), "{err}");
    }
}
