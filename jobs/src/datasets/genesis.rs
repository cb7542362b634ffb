//! The built-in text: the Book of Genesis (KJV, public domain, see data/README.md), with its
//! last tenth of lines held out.

use std::sync::OnceLock;

use super::parsed_once;
use super::text::Corpus;
use crate::error::JobsError;

/// Embedded so the binary is self-contained.
const GENESIS: &str = include_str!("../../data/genesis.txt");
/// The held-out tail: the last tenth of the lines.
const TEST_FRACTION: f64 = 0.1;

/// The embedded corpus, split once per process.
pub(crate) fn genesis() -> Result<&'static Corpus, JobsError> {
    static CORPUS: OnceLock<Result<Corpus, super::BadLine>> = OnceLock::new();
    parsed_once(&CORPUS, || Corpus::split(GENESIS, TEST_FRACTION))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::datasets::Examples;

    #[test]
    fn the_corpus_splits_into_windows_whose_targets_are_the_next_characters() {
        const CONTEXT: usize = 64;
        let (train, test) = genesis().unwrap().windows(CONTEXT);
        // 196,818 characters: about 177,000 train and 20,000 are held out.
        assert!(train.len() > 2_600 && test.len() > 250, "{} {}", train.len(), test.len());
        let (x, y) = train.batch::<NdArray>(&[0, 1], &Default::default());
        let x = x.tokens().into_data().to_vec::<i64>().unwrap();
        let y = y.classes().into_data().to_vec::<i64>().unwrap();
        let text: String = x[..12].iter().map(|&t| (t as u8 - 1 + b' ') as char).collect();
        assert_eq!(text, "In the begin");
        assert_eq!(x[1..CONTEXT], y[..CONTEXT - 1]);
        assert_eq!(y[CONTEXT - 1], x[CONTEXT], "window 1 starts where window 0's targets end");
    }
}
