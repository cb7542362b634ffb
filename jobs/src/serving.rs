//! Inference from a checkpoint: [`Predictor`] loads the weights a training run wrote and
//! computes, on the CPU (ndarray, no autodiff), what the model predicts for new input, fed
//! exactly as the data sets feed it in training: pixels scaled to 0..=1 for the digits models,
//! characters as tokens for the language model.

use std::path::Path;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData};

use crate::checkpoint::{self, CheckpointState, MODEL_FILE};
use crate::datasets::{self, token};
use gantry_core::spec::{DatasetKind, DatasetSpec, ModelKind, TrainSpec};

use crate::error::JobsError;
use crate::input::{Input, InputShape};
use crate::models::{Arch, Cnn, Mlp, Net, Transformer, Weights};

/// Inference runs in f32 on the CPU, the precision checkpoints are written in.
type Cpu = NdArray<f32>;

/// The weights of one checkpoint, ready to predict.
enum Loaded {
    Mlp(Mlp<Cpu>),
    /// Boxed, as the transformer: both are far larger than the MLP.
    Cnn(Box<Cnn<Cpu>>),
    Transformer(Box<Transformer<Cpu>>),
}

/// A trained model, loaded from a checkpoint directory for inference.
pub struct Predictor {
    net: Loaded,
    state: CheckpointState,
    device: NdArrayDevice,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor").field("state", &self.state).finish_non_exhaustive()
    }
}

impl Predictor {
    /// Loads the checkpoint directory `dir` (a `step-<N>` written by training): `state.json`
    /// names the model and data set, `model.mpk` holds the weights, checked against the
    /// model's shapes.
    pub fn load(dir: &Path) -> Result<Predictor, JobsError> {
        let state = checkpoint::read_state(dir)?;
        let device = NdArrayDevice::Cpu;
        let arch = Arch { model: state.model_spec.clone(), input: state.input.clone() };
        let net = match state.model_spec.kind {
            ModelKind::Mlp => Loaded::Mlp(load_net(dir, &arch, &device)?),
            ModelKind::Cnn => Loaded::Cnn(Box::new(load_net(dir, &arch, &device)?)),
            ModelKind::Transformer => Loaded::Transformer(Box::new(load_net(dir, &arch, &device)?)),
        };
        Ok(Predictor { net, state, device })
    }

    /// The weights of a SafeTensors file (PyTorch's names and layout, as checkpoints export
    /// them) in the model `spec` trains, read as `init_from: FILE` reads them: what a training
    /// run starting from the file starts with. For the built-in data sets and text; a model of
    /// a table or of images needs its checkpoint (columns' scaling, classes).
    pub fn from_safetensors(path: &Path, spec: &TrainSpec) -> Result<Predictor, JobsError> {
        let input = match &spec.dataset {
            DatasetSpec::Builtin(DatasetKind::Digits) => InputShape::digits(),
            DatasetSpec::Builtin(DatasetKind::Genesis) | DatasetSpec::Text { .. } => InputShape::text(),
            DatasetSpec::Table { .. } | DatasetSpec::Images { .. } => {
                let reason = "a model of a table or an image folder is served from its checkpoint, which knows \
                              its columns or classes, not from weights alone";
                return Err(JobsError::Spec(reason.into()));
            }
        };
        let arch = Arch { model: spec.model.clone(), input };
        let device = NdArrayDevice::Cpu;
        let mut weights = Weights::read(path)?;
        let net = match spec.model.kind {
            ModelKind::Mlp => Loaded::Mlp(Mlp::init(&arch, 0, &device).import(&mut weights)),
            ModelKind::Cnn => Loaded::Cnn(Box::new(Cnn::init(&arch, 0, &device).import(&mut weights))),
            ModelKind::Transformer => {
                Loaded::Transformer(Box::new(Transformer::init(&arch, 0, &device).import(&mut weights)))
            }
        };
        weights.finish()?;
        let state = CheckpointState {
            job_id: None,
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            seed: spec.seed,
            model: spec.model.kind.to_string(),
            dataset: spec.dataset.to_string(),
            format_version: checkpoint::FORMAT_VERSION,
            model_spec: arch.model,
            input: arch.input,
        };
        Ok(Predictor { net, state, device })
    }

    /// `mlp`, `cnn` or `transformer`.
    pub fn model_name(&self) -> &str {
        &self.state.model
    }

    /// `digits`, `genesis`, `table:PATH` or `text:PATH`.
    pub fn dataset_name(&self) -> &str {
        &self.state.dataset
    }

    /// Optimizer updates the weights had when the checkpoint was taken.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Numbers per example (64 pixels of an 8x8 digit, each 0..=1; a table's feature
    /// columns); `None` for text.
    pub fn input_width(&self) -> Option<usize> {
        match self.net {
            Loaded::Mlp(_) | Loaded::Cnn(_) => Some(self.state.input.width),
            Loaded::Transformer(_) => None,
        }
    }

    /// Probabilities per example: 10 digits, a table's classes, or the vocabulary's characters
    /// (1 for a regression: its prediction).
    pub fn classes(&self) -> usize {
        self.state.input.classes
    }

    /// Whether it predicts a number (a table's `target`) rather than class probabilities.
    pub fn is_regression(&self) -> bool {
        self.state.input.target.is_some()
    }

    /// What the model was built as and reads: a table's columns and class labels among it.
    pub fn input(&self) -> &crate::input::InputShape {
        &self.state.input
    }

    /// Class probabilities (softmax), `rows * classes`, for `rows` examples of
    /// [`Predictor::input_width`] numbers each, row-major: digits scaled as the digits data
    /// set scales them (0..=1, the CSV's 0..16 over 16); a table's columns as in its file
    /// (standardised here as training standardised them). For a regression, each example's
    /// predicted target instead, in the target column's units.
    pub fn predict_pixels(&self, rows: usize, pixels: &[f32]) -> Result<Vec<f32>, JobsError> {
        let width = self.state.input.width;
        if pixels.len() != rows * width {
            return Err(JobsError::BadInput(format!(
                "{rows} examples need {} numbers, got {}",
                rows * width,
                pixels.len()
            )));
        }
        let mut values = pixels.to_vec();
        let scale = &self.state.input.scale;
        if !scale.is_empty() {
            for row in values.chunks_mut(width) {
                for (v, (mean, std)) in row.iter_mut().zip(scale) {
                    *v = (*v - mean) / std;
                }
            }
        }
        let x = Input::Pixels(Tensor::<Cpu, 2>::from_data(TensorData::new(values, [rows, width]), &self.device));
        let logits = match &self.net {
            Loaded::Mlp(net) => net.forward(x),
            Loaded::Cnn(net) => net.forward(x),
            Loaded::Transformer(_) => return Err(self.wrong_input("pixels")),
        };
        if let Some((mean, std)) = self.state.input.target {
            // Trained on the standardised target: back to its units.
            let z = logits.into_data().to_vec::<f32>().expect("f32 outputs");
            return Ok(z.into_iter().map(|v| v * std + mean).collect());
        }
        Ok(probabilities(logits))
    }

    /// Probabilities of the next character after each prompt, `prompts.len() * VOCAB`: the
    /// model reads the last `context` characters of each (64 unless the spec sized it). Characters are tokens as the
    /// data set makes them (printable ASCII and the line break, in that order: token 0 is
    /// `\n`, token 1 + c - ' ' is c); any other character, or an empty prompt, is an error.
    pub fn predict_text(&self, prompts: &[String]) -> Result<Vec<f32>, JobsError> {
        let net = self.transformer()?;
        let context = self.context();
        let windows = prompts.iter().enumerate().map(|(i, p)| window(i, p, context)).collect::<Result<Vec<_>, _>>()?;
        Ok(probabilities(self.last_logits(net, &windows)))
    }

    /// `prompt` followed by `chars` characters, each the model's most likely next one.
    pub fn continue_text(&self, prompt: &str, chars: usize) -> Result<String, JobsError> {
        let net = self.transformer()?;
        let mut tokens = tokens(0, prompt)?;
        let mut text = prompt.to_string();
        for _ in 0..chars {
            let start = tokens.len().saturating_sub(self.context());
            let logits = self.last_logits(net, &[tokens[start..].to_vec()]);
            let next = logits.argmax(1).into_data().convert::<i64>().to_vec::<i64>().expect("one token")[0];
            tokens.push(next);
            text.push(character(next));
        }
        Ok(text)
    }

    /// Checks prompts as [`Predictor::predict_text`] would, without running the model.
    pub fn check_prompts(prompts: &[String]) -> Result<(), JobsError> {
        prompts.iter().enumerate().try_for_each(|(i, p)| tokens(i, p).map(|_| ()))
    }

    /// Characters the language model reads at once.
    fn context(&self) -> usize {
        self.state.model_spec.context() as usize
    }

    fn transformer(&self) -> Result<&Transformer<Cpu>, JobsError> {
        match &self.net {
            Loaded::Transformer(net) => Ok(net),
            Loaded::Mlp(_) | Loaded::Cnn(_) => Err(self.wrong_input("text")),
        }
    }

    fn wrong_input(&self, given: &str) -> JobsError {
        JobsError::BadInput(format!("model `{}` does not read {given}", self.state.model))
    }

    /// The logits at the last token of each window, [windows, VOCAB]. Windows of different
    /// lengths share one forward pass, padded on the right: attention is causal, so what
    /// follows a position never changes its prediction, and every window starts at position 0
    /// as the data set's windows do.
    fn last_logits(&self, net: &Transformer<Cpu>, windows: &[Vec<i64>]) -> Tensor<Cpu, 2> {
        let longest = windows.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(windows.len() * longest);
        for w in windows {
            ids.extend_from_slice(w);
            ids.resize(ids.len() + longest - w.len(), 0);
        }
        let x = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids, [windows.len(), longest]), &self.device);
        let logits = net.forward(Input::Tokens(x));
        let rows: Vec<i64> = windows.iter().enumerate().map(|(i, w)| (i * longest + w.len() - 1) as i64).collect();
        let rows = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(rows, [windows.len()]), &self.device);
        logits.select(0, rows)
    }
}

/// The digits' held-out test split, as training evaluates on it: 360 rows of 64 pixels in
/// 0..=1 (row-major) and their labels. The split is fixed, whatever the spec's seed.
pub fn digits_test_split() -> Result<(Vec<f32>, Vec<u32>), JobsError> {
    let test = &datasets::digits()?.test;
    Ok((test.x.clone(), test.y.iter().map(|&y| y as u32).collect()))
}

fn load_net<M: Net<Cpu>>(dir: &Path, arch: &Arch, device: &NdArrayDevice) -> Result<M, JobsError> {
    let record: <M as Module<Cpu>>::Record = checkpoint::load_record(dir, MODEL_FILE, device)?;
    M::check_record(&record, arch, &dir.join(MODEL_FILE))?;
    // The seed does not matter: every weight is replaced by the record's.
    Ok(M::init(arch, 0, device).load_record(record))
}

fn probabilities(logits: Tensor<Cpu, 2>) -> Vec<f32> {
    softmax(logits, 1).into_data().to_vec::<f32>().expect("f32 logits")
}

/// The tokens of prompt `i`.
fn tokens(i: usize, prompt: &str) -> Result<Vec<i64>, JobsError> {
    if prompt.is_empty() {
        return Err(JobsError::BadInput(format!("prompt {i} is empty: the model needs a character to go on from")));
    }
    prompt
        .chars()
        .map(|c| {
            u8::try_from(c).ok().and_then(token).ok_or_else(|| {
                JobsError::BadInput(format!(
                    "prompt {i}: character {c:?} (U+{:04X}) has no token: the model reads printable ASCII and line breaks",
                    u32::from(c)
                ))
            })
        })
        .collect()
}

/// The last `context` tokens of prompt `i`.
fn window(i: usize, prompt: &str, context: usize) -> Result<Vec<i64>, JobsError> {
    let mut t = tokens(i, prompt)?;
    Ok(t.split_off(t.len().saturating_sub(context)))
}

/// The character of a token (the inverse of the data set's `token`).
fn character(token: i64) -> char {
    match token {
        0 => '\n',
        t => char::from(b' ' + (t - 1) as u8),
    }
}

#[cfg(test)]
mod tests {
    use gantry_core::spec::ModelSpec;

    use super::*;
    use crate::checkpoint::FORMAT_VERSION;
    use crate::env::RunEnv;
    use crate::input::VOCAB;

    const CONTEXT: usize = 64;

    fn state(kind: ModelKind) -> CheckpointState {
        let (dataset, input) = match kind {
            ModelKind::Transformer => ("genesis", InputShape::text()),
            ModelKind::Mlp | ModelKind::Cnn => ("digits", InputShape::digits()),
        };
        CheckpointState {
            job_id: None,
            step: 5,
            epoch: 0,
            batch_in_epoch: 5,
            seed: 1,
            model: kind.to_string(),
            dataset: dataset.into(),
            format_version: FORMAT_VERSION,
            model_spec: ModelSpec::of(kind),
            input,
        }
    }

    /// A checkpoint of freshly initialised weights, written as training writes them.
    fn save<M: Net<Cpu>>(dir: &Path, state: &CheckpointState) -> std::path::PathBuf {
        let arch = Arch { model: state.model_spec.clone(), input: state.input.clone() };
        let model = M::init(&arch, state.seed, &NdArrayDevice::Cpu);
        checkpoint::save::<Cpu, _, _>(dir, state, model.into_record(), (), &[]).unwrap().0
    }

    /// Served predictions are the training job's evaluation: a short run's reported accuracy
    /// is what the predictor's argmax scores on the same held-out digits.
    #[test]
    fn serving_a_trained_checkpoint_scores_the_accuracy_training_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TrainSpec { epochs: 2, ..TrainSpec::default() };
        let env = RunEnv { checkpoint_dir: Some(dir.path().to_path_buf()), ..RunEnv::default() };
        let outcome = crate::train(&spec, &env, &mut Vec::new()).unwrap();
        let predictor = Predictor::load(outcome.last_checkpoint.as_ref().unwrap()).unwrap();
        assert_eq!((predictor.model_name(), predictor.dataset_name()), ("mlp", "digits"));
        assert_eq!((predictor.step(), predictor.input_width(), predictor.classes()), (outcome.steps, Some(64), 10));

        let (x, y) = digits_test_split().unwrap();
        let probs = predictor.predict_pixels(y.len(), &x).unwrap();
        let correct = probs
            .chunks(10)
            .zip(&y)
            .filter(|(row, label)| {
                let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
                best as u32 == **label
            })
            .count();
        assert_eq!(correct as f64 / y.len() as f64, outcome.test_accuracy);
        assert!(outcome.test_accuracy > 0.5, "{outcome:?}");
        assert!(probs.chunks(10).all(|row| (row.iter().sum::<f32>() - 1.0).abs() < 1e-5));
        // One row alone is the same prediction as in the batch.
        let one = predictor.predict_pixels(1, &x[64..128]).unwrap();
        assert!(one.iter().zip(&probs[10..20]).all(|(a, b)| (a - b).abs() < 1e-6));
        assert!(predictor.predict_pixels(2, &x[..64]).is_err());
        assert!(predictor.predict_text(&["a".into()]).is_err());
    }

    #[test]
    fn the_cnn_loads_and_predicts_digits() {
        let dir = tempfile::tempdir().unwrap();
        let path = save::<Cnn<Cpu>>(dir.path(), &state(ModelKind::Cnn));
        let predictor = Predictor::load(&path).unwrap();
        let (x, _) = digits_test_split().unwrap();
        assert_eq!(predictor.predict_pixels(3, &x[..3 * 64]).unwrap().len(), 30);
    }

    #[test]
    fn the_language_model_predicts_each_prompt_as_if_alone_and_continues_greedily() {
        let dir = tempfile::tempdir().unwrap();
        let path = save::<Transformer<Cpu>>(dir.path(), &state(ModelKind::Transformer));
        let p = Predictor::load(&path).unwrap();
        assert_eq!((p.input_width(), p.classes(), p.step()), (None, VOCAB, 5));
        let long = "And God said, Let there be light: and there was light. And God saw the light.".to_string();
        let prompts = vec!["In the".to_string(), long.clone(), "\n".to_string()];
        let together = p.predict_text(&prompts).unwrap();
        assert_eq!(together.len(), 3 * VOCAB);
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = p.predict_text(std::slice::from_ref(prompt)).unwrap();
            let row = &together[i * VOCAB..(i + 1) * VOCAB];
            assert!(alone.iter().zip(row).all(|(a, b)| (a - b).abs() < 1e-5), "prompt {i}");
        }
        // Only the last CONTEXT characters count.
        let tail = long[long.len() - CONTEXT..].to_string();
        let (a, b) = (p.predict_text(std::slice::from_ref(&long)).unwrap(), p.predict_text(&[tail]).unwrap());
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-6));

        let text = p.continue_text("In the", 5).unwrap();
        assert_eq!(text.len(), 11);
        assert!(text.starts_with("In the"));
        assert_eq!(text, p.continue_text("In the", 5).unwrap());
        // The first character added is the most likely one.
        let probs = p.predict_text(&["In the".into()]).unwrap();
        let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(text.chars().nth(6), Some(character(best as i64)));

        let err = p.predict_text(&["caf\u{e9}".into()]).unwrap_err().to_string();
        assert!(err.contains("prompt 0: character '\u{e9}' (U+00E9) has no token"), "{err}");
        assert!(p.predict_text(&[String::new()]).unwrap_err().to_string().contains("prompt 0 is empty"));
        assert!(
            Predictor::check_prompts(&["ok".into(), "tab\t".into()]).unwrap_err().to_string().contains("prompt 1:")
        );
        assert!(p.predict_pixels(1, &[0.0; 64]).is_err());
        assert!((0..VOCAB as i64).all(|t| token(character(t) as u8) == Some(t)));
    }

    #[test]
    fn weights_of_another_model_are_refused() {
        // The weights of one model under another's name are refused by the shape check.
        let dir = tempfile::tempdir().unwrap();
        let path = save::<Mlp<Cpu>>(dir.path(), &state(ModelKind::Cnn));
        assert!(Predictor::load(&path).is_err());
    }
}
