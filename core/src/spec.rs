//! The job spec (YAML) as users write it, and the rules a spec must follow before anything is
//! queued. Field names are fixed by the product contract; unknown fields are refused so a typo
//! never silently changes what runs.

use std::collections::BTreeMap;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ParseError;

mod dataset;
mod model;
mod pushed;
mod s3;

pub use dataset::{DatasetSpec, Holdout};
pub use model::ModelSpec;
pub use pushed::{PushedPath, check_name as check_dataset_name};
pub use s3::{Fetched, S3Path};

/// What was wrong with a spec: the field (dotted path, empty when the whole document is broken)
/// and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{reason}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError { field: field.into(), reason: reason.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(default = "default_queue")]
    pub queue: String,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Copies of a `serve:` job, each placed like a job of its own (1 for every other kind).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub replicas: u32,
    /// Seconds; written as `90s`, `30m`, `2h` or `1h30m` in YAML.
    #[serde(
        default,
        rename = "max_duration",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_duration_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<ServeSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A `command:` job's pushed data sets and S3 objects: each variable is set to where the
    /// agent put the reference's file or folder (`dataset://NAME/PATH`, `s3://BUCKET/KEY`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// The container image each rank runs in, through the agent's container engine (a `train:`
    /// job runs gantry's runtime from the agent, mounted in); none: a process on the agent's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub image_pull_policy: PullPolicy,
    /// How failed attempts are retried (within `max_restarts`).
    #[serde(default, skip_serializing_if = "RetrySpec::is_default")]
    pub retry: RetrySpec,
}

/// `key` of mapping `field` is an environment variable's name.
fn check_variable(field: &str, key: &str) -> Result<(), SpecError> {
    let valid = key.len() <= limits::ENV_NAME
        && key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return Ok(());
    }
    let shown: String = key.chars().take(limits::ENV_NAME).collect();
    Err(SpecError::new(
        format!("{field}.{}", shown.escape_debug()),
        format!("is not a variable name (letters, digits and _, at most {})", limits::ENV_NAME),
    ))
}

/// An image reference as engines list what they hold: with a tag (`:latest` when none is
/// given) and without Docker Hub's implied `docker.io/library/`. Two spellings of one image
/// give the same text.
pub fn normalize_image(image: &str) -> String {
    let short = image.strip_prefix("docker.io/").unwrap_or(image);
    let short = short.strip_prefix("library/").unwrap_or(short);
    let tagged = short.contains('@') || short.rsplit('/').next().is_some_and(|last| last.contains(':'));
    if tagged { short.to_string() } else { format!("{short}:latest") }
}

/// `image_pull_policy`: when the agent pulls a job's image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Pulled only when the node does not hold it.
    #[default]
    IfNotPresent,
    /// Pulled for every attempt (a moving tag such as `latest`).
    Always,
    /// Never pulled: the node must hold it.
    Never,
}

impl PullPolicy {
    pub fn is_default(&self) -> bool {
        *self == PullPolicy::IfNotPresent
    }

    pub fn name(self) -> &'static str {
        match self {
            PullPolicy::IfNotPresent => "if_not_present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }

    /// The policy a name on the wire gives; an empty name is the default.
    pub fn parse(name: &str) -> Option<PullPolicy> {
        Some(match name {
            "" | "if_not_present" => PullPolicy::IfNotPresent,
            "always" => PullPolicy::Always,
            "never" => PullPolicy::Never,
            _ => return None,
        })
    }
}

/// The `retry:` section. A failed attempt (not a lost node, not a preemption) is retried after
/// `backoff`, doubled for each failure after the first, at most `max_backoff`; an exit code in
/// `never_on_exit_codes` fails the job at once (a bad argument will not fix itself).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Seconds before the retry after the first failure; 10s when not given.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub backoff: Option<u64>,
    /// The longest wait between attempts; 5m when not given.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_backoff: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub never_on_exit_codes: Vec<i32>,
}

impl RetrySpec {
    pub const DEFAULT_BACKOFF_SECS: u64 = 10;
    pub const DEFAULT_MAX_BACKOFF_SECS: u64 = 300;

    pub fn is_default(&self) -> bool {
        *self == RetrySpec::default()
    }

    /// The wait before the attempt after the `failures`-th failed one (1 for the first).
    pub fn backoff_ms(&self, failures: u32) -> u64 {
        let base = self.backoff.unwrap_or(Self::DEFAULT_BACKOFF_SECS).saturating_mul(1000);
        let most = self.max_backoff.unwrap_or(Self::DEFAULT_MAX_BACKOFF_SECS).saturating_mul(1000);
        let doublings = failures.saturating_sub(1).min(32);
        base.saturating_mul(1u64 << doublings).min(most)
    }

    fn validate(&self) -> Result<(), SpecError> {
        if let (Some(b), Some(m)) = (self.backoff, self.max_backoff)
            && b > m
        {
            return Err(SpecError::new("retry.backoff", "must not be longer than retry.max_backoff"));
        }
        if self.never_on_exit_codes.contains(&0) {
            return Err(SpecError::new("retry.never_on_exit_codes", "0 is success: it is never retried anyway"));
        }
        if self.never_on_exit_codes.len() > limits::EXIT_CODES {
            return Err(SpecError::new("retry.never_on_exit_codes", format!("at most {} codes", limits::EXIT_CODES)));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub nodes: u32,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_gb: Option<f64>,
    #[serde(default = "one_f")]
    pub cpus: f64,
    #[serde(default = "one_f")]
    pub memory_gb: f64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources { nodes: 1, gpus: 0, gpu_model: None, gpu_memory_gb: None, cpus: 1.0, memory_gb: 1.0 }
    }
}

/// The `serve:` section: a trained model answering requests over the Open Inference Protocol,
/// until cancelled. Requests are gathered into one forward pass of up to `max_batch_size`
/// examples, or until the oldest has waited `max_batch_delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSpec {
    /// A `train:` job's checkpoint: `JOB_ID` (its latest when the job is submitted) or `JOB_ID@STEP`.
    pub from: String,
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: u32,
    #[serde(default = "default_max_batch_delay_ms")]
    pub max_batch_delay_ms: u64,
    /// Requests waiting beyond this are refused at once (HTTP 503) rather than queued.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
}

impl ServeSpec {
    /// The rules of the `serve:` section (field names in errors are prefixed `serve.`).
    pub fn validate(&self) -> Result<(), SpecError> {
        parse_checkpoint_ref(&self.from).map_err(|e| SpecError::new("serve.from", e.to_string()))?;
        if !(1..=limits::MAX_BATCH_SIZE).contains(&self.max_batch_size) {
            return Err(SpecError::new(
                "serve.max_batch_size",
                format!("must be 1..{}, got {}", limits::MAX_BATCH_SIZE, self.max_batch_size),
            ));
        }
        if self.max_batch_delay_ms > limits::MAX_BATCH_DELAY_MS {
            return Err(SpecError::new(
                "serve.max_batch_delay_ms",
                format!("must be at most {} ms, got {}", limits::MAX_BATCH_DELAY_MS, self.max_batch_delay_ms),
            ));
        }
        if !(1..=limits::MAX_QUEUE).contains(&self.max_queue) {
            return Err(SpecError::new(
                "serve.max_queue",
                format!("must be 1..{}, got {}", limits::MAX_QUEUE, self.max_queue),
            ));
        }
        Ok(())
    }
}

fn default_max_batch_size() -> u32 {
    32
}
fn default_max_batch_delay_ms() -> u64 {
    2
}
fn default_max_queue() -> u32 {
    1024
}
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// The `train:` section: a job for gantry's own training runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub dataset: DatasetSpec,
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every_steps: u64,
    /// A checkpoint of another job to start from: `JOB_ID` (its latest) or `JOB_ID@STEP`.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Seeds weight initialisation and data order, so a run is reproducible.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Train and test on these classes (digits) only; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<u32>,
    /// At most this many training examples per class (the first ones of the fixed split): to
    /// try learning from little data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples_per_class: Option<u32>,
    /// Train the output layer only, keeping the rest as `init_from` gave it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_backbone: bool,
    /// With `init_from`: take only the backbone, and start the output layer afresh (for classes
    /// the checkpoint was not trained on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub new_head: bool,
    /// What the forward and backward passes compute in; the weights stay f32 either way.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// `train.model`: the models the built-in training runtime knows, by their lowercase names.
/// An unknown name is refused with the valid ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// A multi-layer perceptron on the digits' pixels.
    #[default]
    Mlp,
    /// A small convolutional network on the digits' 8x8 images.
    Cnn,
    /// A small character-level language model (GPT-style) on text.
    Transformer,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::Mlp, ModelKind::Cnn, ModelKind::Transformer];

    /// The name specs, checkpoints and progress lines use.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Transformer => "transformer",
        }
    }

    /// Every name, for messages: "mlp, cnn, transformer".
    pub fn names() -> String {
        ModelKind::ALL.map(ModelKind::name).join(", ")
    }

    /// Whether the model reads text (token ids) rather than images.
    pub fn reads_text(self) -> bool {
        match self {
            ModelKind::Mlp | ModelKind::Cnn => false,
            ModelKind::Transformer => true,
        }
    }
}

/// `train.dataset`: the data sets built into the training runtime, by their lowercase names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// The UCI 8x8 handwritten digits, ten classes.
    #[default]
    Digits,
    /// The Book of Genesis, as characters.
    Genesis,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 2] = [DatasetKind::Digits, DatasetKind::Genesis];

    /// The name specs, checkpoints and progress lines use.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Digits => "digits",
            DatasetKind::Genesis => "genesis",
        }
    }

    /// Every name, for messages: "digits, genesis".
    pub fn names() -> String {
        DatasetKind::ALL.map(DatasetKind::name).join(", ")
    }

    /// Whether the data set is text rather than images.
    pub fn is_text(self) -> bool {
        match self {
            DatasetKind::Digits => false,
            DatasetKind::Genesis => true,
        }
    }

    /// Whether the data set has classes that `classes` and `examples_per_class` can pick.
    pub fn has_classes(self) -> bool {
        match self {
            DatasetKind::Digits => true,
            DatasetKind::Genesis => false,
        }
    }
}

/// `Display`, `FromStr`, `Serialize` and `Deserialize` of a kind, all by `name()`.
macro_rules! impl_names {
    ($kind:ty, $unknown:path) => {
        impl std::fmt::Display for $kind {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $kind {
            type Err = ParseError;

            fn from_str(name: &str) -> Result<Self, ParseError> {
                <$kind>::ALL.into_iter().find(|k| k.name() == name).ok_or_else(|| $unknown(name.to_string()))
            }
        }

        impl Serialize for $kind {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $kind {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(Parsed(|name| name.parse()))
            }
        }
    };
}

impl_names!(ModelKind, ParseError::UnknownModel);
impl_names!(DatasetKind, ParseError::UnknownDataset);

/// `train.precision`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: activations, their gradients and the matrix products in bf16 on a GPU
    /// that has it; weights, their gradients and the optimizer's state in f32.
    Bf16,
}

impl Precision {
    fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            model: ModelSpec::default(),
            dataset: DatasetSpec::default(),
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            checkpoint_every_steps: default_checkpoint_every(),
            init_from: None,
            seed: default_seed(),
            classes: Vec::new(),
            examples_per_class: None,
            freeze_backbone: false,
            new_head: false,
            precision: Precision::F32,
        }
    }
}

fn default_priority() -> u32 {
    50
}
fn default_queue() -> String {
    "default".into()
}
fn default_max_restarts() -> u32 {
    3
}
fn one() -> u32 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_epochs() -> u32 {
    30
}
fn default_batch_size() -> u32 {
    64
}
fn default_learning_rate() -> f64 {
    0.001
}
fn default_checkpoint_every() -> u64 {
    100
}
fn default_seed() -> u64 {
    42
}

impl JobSpec {
    /// Parses and validates a YAML spec. Errors name the field and the reason.
    pub fn from_yaml(text: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = serde_yaml::from_str(text).map_err(yaml_error)?;
        spec.validate()?;
        Ok(spec)
    }

    /// The rules serde cannot express. Called at submit by the CLI and again by the coordinator,
    /// which must not trust its clients.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.trim().is_empty() {
            return Err(SpecError::new("name", "must not be empty"));
        }
        let name_char = |c: char| c.is_ascii_alphanumeric() || " ._-:@+".contains(c);
        if self.name.len() > limits::NAME || !self.name.chars().all(name_char) {
            return Err(SpecError::new(
                "name",
                format!("must be at most {} letters, digits, spaces and . _ - : @ +", limits::NAME),
            ));
        }
        if self.priority > 100 {
            return Err(SpecError::new("priority", format!("must be 0..100, got {}", self.priority)));
        }
        if self.queue.trim().is_empty() {
            return Err(SpecError::new("queue", "must not be empty"));
        }
        let queue_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if self.queue.len() > limits::QUEUE || !self.queue.chars().all(queue_char) {
            return Err(SpecError::new(
                "queue",
                format!("must be at most {} letters, digits and . _ -", limits::QUEUE),
            ));
        }
        self.retry.validate()?;
        if let Some(image) = &self.image {
            let image_char = |c: char| c.is_ascii_alphanumeric() || "._-/:@".contains(c);
            if image.is_empty() || image.len() > limits::IMAGE || !image.chars().all(image_char) {
                return Err(SpecError::new(
                    "image",
                    format!("must be an image reference (NAME[:TAG] or NAME@DIGEST), at most {} bytes", limits::IMAGE),
                ));
            }
        } else if !self.image_pull_policy.is_default() {
            return Err(SpecError::new("image_pull_policy", "applies to jobs with an `image:` only"));
        }
        let r = &self.resources;
        if r.nodes == 0 {
            return Err(SpecError::new("resources.nodes", "must be at least 1"));
        }
        if !(r.cpus.is_finite() && r.cpus > 0.0) {
            return Err(SpecError::new("resources.cpus", format!("must be a positive number, got {}", r.cpus)));
        }
        if !(r.memory_gb.is_finite() && r.memory_gb >= 0.0) {
            return Err(SpecError::new("resources.memory_gb", format!("must be zero or more, got {}", r.memory_gb)));
        }
        if let Some(m) = r.gpu_memory_gb
            && !(m.is_finite() && m >= 0.0)
        {
            return Err(SpecError::new("resources.gpu_memory_gb", format!("must be zero or more, got {m}")));
        }
        if r.gpus == 0 && (r.gpu_model.is_some() || r.gpu_memory_gb.is_some()) {
            return Err(SpecError::new("resources.gpus", "gpu_model and gpu_memory_gb need gpus of at least 1"));
        }
        let kinds = [self.train.is_some(), self.command.is_some(), self.serve.is_some()];
        match kinds.iter().filter(|k| **k).count() {
            1 => {}
            0 => return Err(SpecError::new("train", "give exactly one of `train`, `command` and `serve`")),
            _ => {
                return Err(SpecError::new("train", "give exactly one of `train`, `command` and `serve`, not several"));
            }
        }
        if self.replicas == 0 || self.replicas > limits::REPLICAS {
            return Err(SpecError::new("replicas", format!("must be 1..{}, got {}", limits::REPLICAS, self.replicas)));
        }
        if self.replicas != 1 && self.serve.is_none() {
            return Err(SpecError::new(
                "replicas",
                "applies to `serve:` jobs; a train or command job spans machines with resources.nodes",
            ));
        }
        if let Some(serve) = &self.serve {
            serve.validate()?;
            if r.nodes != 1 {
                return Err(SpecError::new("resources.nodes", "a serve job's replica runs on one node: use replicas"));
            }
        }
        match (&self.train, &self.command) {
            (None, None) | (Some(_), Some(_)) => {}
            (None, Some(cmd)) => {
                if cmd.is_empty() || cmd[0].is_empty() {
                    return Err(SpecError::new("command", "must name a program to run"));
                }
                if cmd.len() > limits::COMMAND_ARGS
                    || cmd.iter().map(String::len).sum::<usize>() > limits::COMMAND_BYTES
                {
                    return Err(SpecError::new(
                        "command",
                        format!("at most {} arguments of {} bytes in all", limits::COMMAND_ARGS, limits::COMMAND_BYTES),
                    ));
                }
            }
            (Some(t), None) => {
                t.validate()?;
                // The CPU backend computes in f32 only: asking a CPU job for bf16 is a mistake
                // better told now than found in its log.
                if t.precision == Precision::Bf16 && r.gpus == 0 {
                    return Err(SpecError::new(
                        "train.precision",
                        "bf16 runs on GPUs only: this job asks for none (resources.gpus is 0)",
                    ));
                }
            }
        }
        if self.env.len() > limits::ENV_ENTRIES {
            return Err(SpecError::new("env", format!("at most {} variables", limits::ENV_ENTRIES)));
        }
        for (key, value) in &self.env {
            check_variable("env", key)?;
            if value.len() > limits::ENV_VALUE || value.contains('\0') {
                return Err(SpecError::new(
                    format!("env.{key}"),
                    format!("must be at most {} bytes, without NUL", limits::ENV_VALUE),
                ));
            }
        }
        self.validate_data()
    }

    fn validate_data(&self) -> Result<(), SpecError> {
        if self.data.is_empty() {
            return Ok(());
        }
        if self.command.is_none() {
            return Err(SpecError::new(
                "data",
                "is for `command:` jobs: a train job names its files in train.dataset and train.init_from",
            ));
        }
        if self.data.len() > limits::ENV_ENTRIES {
            return Err(SpecError::new("data", format!("at most {} variables", limits::ENV_ENTRIES)));
        }
        for (key, reference) in &self.data {
            check_variable("data", key)?;
            let field = format!("data.{key}");
            if self.env.contains_key(key) {
                return Err(SpecError::new(field, "is set in env as well: name the path's variable once"));
            }
            match Fetched::parse(reference) {
                Some(Ok(_)) if reference.len() <= dataset::PATH_LIMIT => {}
                Some(Err(why)) => return Err(SpecError::new(field, why)),
                _ => {
                    return Err(SpecError::new(
                        field,
                        "must be dataset://NAME[/PATH] or s3://BUCKET/KEY (a local path needs no entry: the command reads it where it is)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every reference the agent fetches for this job (`dataset://`, `s3://`) or path it reads,
    /// with its field: the train spec's files and the `data:` entries.
    pub fn fetched_paths_mut(&mut self) -> Vec<(String, &mut String)> {
        let mut paths: Vec<(String, &mut String)> = match self.train.as_mut() {
            Some(train) => train.file_paths_mut().into_iter().map(|(f, p)| (f.to_string(), p)).collect(),
            None => Vec::new(),
        };
        paths.extend(self.data.iter_mut().map(|(k, v)| (format!("data.{k}"), v)));
        paths
    }

    /// The checkpoint of another job this one starts from, with the field that names it:
    /// `train.init_from` or `serve.from`.
    pub fn starts_from(&self) -> Option<(&'static str, &str)> {
        match (&self.train, &self.serve) {
            (Some(t), _) => t.init_from_job().map(|f| ("train.init_from", f)),
            (None, Some(s)) => Some(("serve.from", s.from.as_str())),
            (None, None) => None,
        }
    }

    /// Memory asked for, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        (self.resources.memory_gb * GIB) as u64
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

impl TrainSpec {
    /// The rules of the `train:` section (field names in errors are prefixed `train.`).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.model.validate()?;
        self.dataset.validate()?;
        // Numbers or text: each model reads one kind.
        if self.model.kind.reads_text() != self.dataset.is_text() {
            let reason = match self.model.kind {
                ModelKind::Transformer => {
                    "the transformer is a language model: it trains on text (`genesis` or `{text: PATH}`)"
                }
                ModelKind::Mlp | ModelKind::Cnn => "text trains the `transformer` only",
            };
            return Err(SpecError::new("train.dataset", reason));
        }
        if let Some(image) = self.image() {
            self.model.check_image(image)?;
        } else if self.model.kind == ModelKind::Cnn {
            return Err(SpecError::new(
                "train.dataset",
                "the cnn reads images: it trains on `digits` or `{images: DIR}`",
            ));
        }
        let digits = self.dataset.builtin().is_some_and(DatasetKind::has_classes);
        if !digits && (!self.classes.is_empty() || self.examples_per_class.is_some()) {
            return Err(SpecError::new("train.classes", "classes and examples_per_class apply to `digits` only"));
        }
        if let Some(c) = self.classes.iter().find(|c| **c >= 10) {
            return Err(SpecError::new("train.classes", format!("digits are 0 to 9, got {c}")));
        }
        let distinct: std::collections::BTreeSet<&u32> = self.classes.iter().collect();
        if distinct.len() != self.classes.len() || self.classes.len() == 1 {
            return Err(SpecError::new("train.classes", "must be two or more distinct digits, or empty for all"));
        }
        if self.examples_per_class == Some(0) {
            return Err(SpecError::new("train.examples_per_class", "must be at least 1"));
        }
        if self.epochs == 0 {
            return Err(SpecError::new("train.epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(SpecError::new("train.batch_size", "must be at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(SpecError::new("train.learning_rate", "must be a positive number"));
        }
        if self.checkpoint_every_steps == 0 {
            return Err(SpecError::new("train.checkpoint_every_steps", "must be at least 1"));
        }
        if let Some(from) = self.init_from_job() {
            parse_checkpoint_ref(from).map_err(|e| SpecError::new("train.init_from", e.to_string()))?;
        }
        if let Some(path) = self.init_from_file() {
            dataset::check_path("train.init_from", path)?;
        }
        Ok(())
    }

    /// Every path the spec names a file or folder by, with its field: the data set's, its
    /// held-out part's and a weights file's. Local paths, `dataset://` and `s3://` references alike.
    pub fn file_paths_mut(&mut self) -> Vec<(&'static str, &mut String)> {
        let mut paths = Vec::new();
        let (field, path, holdout) = match &mut self.dataset {
            DatasetSpec::Builtin(_) => ("", None, None),
            DatasetSpec::Table { path, holdout, .. } => ("train.dataset.table", Some(path), Some(holdout)),
            DatasetSpec::Images { path, holdout, .. } => ("train.dataset.images", Some(path), Some(holdout)),
            DatasetSpec::Text { path, holdout } => ("train.dataset.text", Some(path), Some(holdout)),
        };
        paths.extend(path.map(|p| (field, p)));
        if let Some(Holdout::File(test)) = holdout {
            paths.push(("train.dataset.test", test));
        }
        if let Some(from) = self.init_from.as_mut().filter(|f| f.ends_with(SAFETENSORS_SUFFIX)) {
            paths.push(("train.init_from", from));
        }
        paths
    }

    /// Makes relative paths of the data set and of a weights file relative to `base` (the spec
    /// file's directory), as Compose and Kubernetes read paths in their files: the job runs in
    /// a directory of its own on an agent, where a relative path would mean something else.
    /// `dataset://` and `s3://` references are left as they are.
    pub fn anchor_paths(&mut self, base: &std::path::Path) {
        for (_, path) in self.file_paths_mut() {
            let url = path.starts_with(pushed::SCHEME) || path.starts_with(s3::SCHEME);
            if !path.is_empty() && !url && std::path::Path::new(path.as_str()).is_relative() {
                *path = base.join(path.as_str()).display().to_string();
            }
        }
    }

    /// The images the job trains on, as [channels, height, width]: the digits' [1, 8, 8], or an
    /// image folder's size with the model's channels (`model.image`, else 3: colour).
    pub fn image(&self) -> Option<[u32; 3]> {
        match &self.dataset {
            DatasetSpec::Builtin(DatasetKind::Digits) => Some([1, 8, 8]),
            DatasetSpec::Images { size, .. } => Some([self.model.image.map_or(3, |[c, _, _]| c), size[0], size[1]]),
            _ => None,
        }
    }

    /// `init_from` when it names a SafeTensors file (on the agent) rather than a job.
    pub fn init_from_file(&self) -> Option<&str> {
        self.init_from.as_deref().filter(|f| f.ends_with(SAFETENSORS_SUFFIX))
    }

    /// `init_from` when it names another job's checkpoint: `JOB_ID` or `JOB_ID@STEP`.
    pub fn init_from_job(&self) -> Option<&str> {
        self.init_from.as_deref().filter(|f| !f.ends_with(SAFETENSORS_SUFFIX))
    }
}

/// How `init_from` tells a weights file from a job id.
pub const SAFETENSORS_SUFFIX: &str = ".safetensors";

/// `JOB_ID` or `JOB_ID@STEP` → (job id, step).
pub fn parse_checkpoint_ref(text: &str) -> Result<(String, Option<u64>), ParseError> {
    let (job, step) = match text.split_once('@') {
        Some((job, step)) => {
            let step = step.parse::<u64>().map_err(|_| ParseError::CheckpointStep(step.to_string()))?;
            (job, Some(step))
        }
        None => (text, None),
    };
    if job.is_empty() {
        return Err(ParseError::CheckpointJob);
    }
    Ok((job.to_string(), step))
}

/// Turns serde_yaml's message ("resources.gpus: invalid value ... at line 4 column 9") into a
/// field and a reason.
fn yaml_error(e: serde_yaml::Error) -> SpecError {
    let text = e.to_string();
    // serde_yaml prefixes the dotted path and a colon when the error is inside a field.
    if let Some((path, reason)) = text.split_once(": ")
        && !path.contains(' ')
        && !path.is_empty()
    {
        return SpecError::new(path, reason);
    }
    SpecError::new("", format!("broken YAML: {text}"))
}

/// `90s`, `30m`, `2h`, `1h30m`, `1d` → seconds.
pub fn parse_duration(text: &str) -> Result<u64, ParseError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ParseError::EmptyDuration);
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(ParseError::NotADuration(text.to_string())),
        };
        let n: u64 = number.parse().map_err(|_| ParseError::NotADuration(text.to_string()))?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() {
        return Err(ParseError::DurationWithoutUnit(text.to_string()));
    }
    if total == 0 {
        return Err(ParseError::ZeroDuration);
    }
    Ok(total)
}

pub fn format_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || out.is_empty() {
        out += &format!("{s}s");
    }
    out
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct MaybeDuration;

    impl<'de> Visitor<'de> for MaybeDuration {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as 90s, 30m, 2h or 1h30m")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(Parsed(parse_duration)).map(Some)
        }
    }

    d.deserialize_option(MaybeDuration)
}

/// Reads a string with `.0`. A value is checked while its own deserializer runs, so that
/// serde_yaml's error names its field: checked after it is read, it would name the parent
/// (`train: unknown model ...`, or no field at all).
struct Parsed<T>(fn(&str) -> Result<T, ParseError>);

impl<T> Visitor<'_> for Parsed<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<T, E> {
        (self.0)(text).map_err(E::custom)
    }
}

fn ser_duration<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(secs) => s.serialize_str(&format_duration(*secs)),
        None => s.serialize_none(),
    }
}

/// The most a job spec may hold: everything submitted is stored, shown and sent to agents, so
/// nothing in it is unbounded. Errors name the limit.
pub mod limits {
    /// A job's name, in bytes.
    pub const NAME: usize = 128;
    /// A queue's name, in bytes.
    pub const QUEUE: usize = 64;
    /// `command:` arguments, and their bytes in all.
    pub const COMMAND_ARGS: usize = 1024;
    pub const COMMAND_BYTES: usize = 256 * 1024;
    /// `env:` entries, a name's bytes, a value's bytes.
    pub const ENV_ENTRIES: usize = 256;
    pub const ENV_NAME: usize = 128;
    pub const ENV_VALUE: usize = 32 * 1024;
    /// An image reference, in bytes.
    pub const IMAGE: usize = 512;
    /// `retry.never_on_exit_codes` entries.
    pub const EXIT_CODES: usize = 256;
    /// A serve job's replicas.
    pub const REPLICAS: u32 = 64;
    /// `serve:` batching: examples in one forward pass, the longest wait, requests queued.
    pub const MAX_BATCH_SIZE: u32 = 4096;
    pub const MAX_BATCH_DELAY_MS: u64 = 1000;
    pub const MAX_QUEUE: u32 = 100_000;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: digits-mlp\ntrain:\n  epochs: 2\n";

    #[test]
    fn minimal_train_spec_gets_defaults() {
        let spec = JobSpec::from_yaml(GOOD).unwrap();
        assert_eq!(spec.priority, 50);
        assert_eq!(spec.queue, "default");
        assert_eq!(spec.resources.nodes, 1);
        assert_eq!(spec.train.unwrap().epochs, 2);
    }

    #[test]
    fn names_queues_env_and_commands_have_limits_that_errors_name() {
        let refused = |extra: &str| JobSpec::from_yaml(&format!("name: j\ncommand: [\"true\"]\n{extra}")).unwrap_err();
        let long = "x".repeat(limits::NAME + 1);
        let e = JobSpec::from_yaml(&format!("name: {long}\ncommand: [\"true\"]\n")).unwrap_err();
        assert!(e.field == "name" && e.reason.contains("at most 128"), "{e}");
        let e = JobSpec::from_yaml("name: \"a<script>\"\ncommand: [\"true\"]\n").unwrap_err();
        assert_eq!(e.field, "name");
        assert_eq!(refused("queue: \"a/b\"\n").field, "queue");
        assert_eq!(refused(&format!("queue: {}\n", "q".repeat(65))).field, "queue");
        assert!(refused("env: {\"1A\": x}\n").reason.contains("not a variable name"));
        assert!(refused("env: {\"A B\": x}\n").reason.contains("not a variable name"));
        let big = "v".repeat(limits::ENV_VALUE + 1);
        assert!(refused(&format!("env: {{A: {big}}}\n")).reason.contains("at most 32768 bytes"));
        let many: Vec<String> = (0..=limits::ENV_ENTRIES).map(|i| format!("V{i}: x")).collect();
        assert!(refused(&format!("env: {{{}}}\n", many.join(", "))).reason.contains("at most 256 variables"));
        let args = vec!["\"a\""; limits::COMMAND_ARGS + 1].join(", ");
        let e = JobSpec::from_yaml(&format!("name: j\ncommand: [{args}]\n")).unwrap_err();
        assert!(e.field == "command" && e.reason.contains("at most 1024 arguments"), "{e}");
        // What people write is fine.
        JobSpec::from_yaml(
            "name: lr sweep 3e-4 @ v2\nqueue: research.vision_1\ncommand: [\"true\"]\nenv: {HF_TOKEN: abc, _X1: y}\n",
        )
        .unwrap();
    }

    #[test]
    fn unknown_field_is_refused_with_its_name() {
        let err = JobSpec::from_yaml("name: x\ncommand: [true]\nresources:\n  gpuz: 1\n").unwrap_err();
        assert_eq!(err.field, "resources");
        assert!(err.reason.contains("unknown field `gpuz`"), "{err}");
    }

    #[test]
    fn precision_is_f32_or_bf16_and_bf16_needs_a_gpu() {
        let spec = |text: &str| JobSpec::from_yaml(text);
        assert_eq!(spec(GOOD).unwrap().train.unwrap().precision, Precision::F32);
        let gpu = spec("name: t\nresources: {gpus: 1}\ntrain: {precision: bf16}\n").unwrap();
        assert_eq!(gpu.train.as_ref().unwrap().precision, Precision::Bf16);
        // It survives the trip through the coordinator's JSON.
        let again: JobSpec = serde_json::from_str(&serde_json::to_string(&gpu).unwrap()).unwrap();
        assert_eq!(again, gpu);

        let err = spec("name: t\ntrain: {precision: bf16}\n").unwrap_err();
        assert_eq!(err.field, "train.precision");
        assert!(err.reason.contains("GPUs only"), "{err}");
        let err = spec("name: t\nresources: {gpus: 1}\ntrain: {precision: fp16}\n").unwrap_err();
        assert!(err.to_string().contains("unknown variant `fp16`"), "{err}");
    }

    #[test]
    fn train_subsets_are_checked() {
        let err = |extra: &str| JobSpec::from_yaml(&format!("name: t\ntrain: {{{extra}}}\n")).unwrap_err().to_string();
        assert!(err("classes: [3, 12]").contains("train.classes"), "{}", err("classes: [3, 12]"));
        assert!(err("classes: [3, 3]").contains("distinct"));
        assert!(err("classes: [3]").contains("two or more"));
        assert!(err("examples_per_class: 0").contains("train.examples_per_class"));
        let ok =
            JobSpec::from_yaml("name: t\ntrain: {classes: [5, 6], examples_per_class: 50, freeze_backbone: true}\n");
        let train = ok.unwrap().train.unwrap();
        assert_eq!((train.classes, train.examples_per_class, train.freeze_backbone), (vec![5, 6], Some(50), true));
    }

    #[test]
    fn relative_data_and_weights_paths_are_anchored_at_the_spec_files_directory() {
        let yaml =
            "name: t\ntrain: {dataset: {table: d/a.csv, label: y, test: /abs/b.csv}, init_from: w.safetensors}\n";
        let mut train = JobSpec::from_yaml(yaml).unwrap().train.unwrap();
        train.anchor_paths(std::path::Path::new("/specs"));
        let DatasetSpec::Table { path, holdout, .. } = &train.dataset else { unreachable!() };
        assert_eq!((path.as_str(), holdout), ("/specs/d/a.csv", &Holdout::File("/abs/b.csv".into())));
        assert_eq!(train.init_from.as_deref(), Some("/specs/w.safetensors"));
        let mut by_job = TrainSpec { init_from: Some("job-3@10".into()), ..TrainSpec::default() };
        by_job.anchor_paths(std::path::Path::new("/specs"));
        assert_eq!(by_job.init_from.as_deref(), Some("job-3@10"));
        let pushed = "name: t\ntrain: {dataset: {text: 'dataset://corpus/a.txt'}, model: transformer}\n";
        let mut train = JobSpec::from_yaml(pushed).unwrap().train.unwrap();
        train.anchor_paths(std::path::Path::new("/specs"));
        assert_eq!(train.file_paths_mut()[0], ("train.dataset.text", &mut "dataset://corpus/a.txt".to_string()));
    }

    #[test]
    fn a_command_jobs_data_are_references_named_by_variables() {
        let job = |extra: &str| JobSpec::from_yaml(&format!("name: j\ncommand: [\"true\"]\n{extra}"));
        let refused = |extra: &str| job(extra).unwrap_err().to_string();
        let mut ok = job("data: {WINE: 'dataset://wine/wine.csv', PICS: 's3://lab/pics'}\n").unwrap();
        let fields: Vec<String> = ok.fetched_paths_mut().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["data.PICS", "data.WINE"]);
        assert_eq!(
            refused("data: {\"1A\": 'dataset://wine'}\n"),
            "data.1A: is not a variable name (letters, digits and _, at most 128)"
        );
        assert!(
            refused("data: {W: /data/wine.csv}\n")
                .starts_with("data.W: must be dataset://NAME[/PATH] or s3://BUCKET/KEY")
        );
        assert!(refused("data: {W: 's3://lab'}\n").contains("data.W: `s3://lab` names no object"));
        assert!(refused("env: {W: x}\ndata: {W: 'dataset://wine'}\n").contains("data.W: is set in env as well"));
        let train = "name: t\ntrain: {model: mlp}\ndata: {W: 'dataset://wine'}\n";
        assert!(JobSpec::from_yaml(train).unwrap_err().to_string().contains("data: is for `command:` jobs"));
    }

    #[test]
    fn each_model_trains_on_its_kind_of_data() {
        let err = |train: &str| JobSpec::from_yaml(&format!("name: t\ntrain: {{{train}}}\n")).unwrap_err().to_string();
        assert!(err("model: transformer").contains("trains on text (`genesis` or"), "{}", err("model: transformer"));
        assert!(err("model: mlp, dataset: genesis").contains("text trains the `transformer` only"));
        assert!(err("model: mlp, dataset: {text: a.txt}").contains("text trains the `transformer` only"));
        assert!(err("model: cnn, dataset: {table: a.csv, label: y}").contains("the cnn reads images"));
        assert!(err("model: {kind: cnn, channels: [4, 4, 4, 4]}").contains("must be multiples of 16, got 8x8"));
        assert!(JobSpec::from_yaml("name: t\ntrain: {model: cnn, dataset: {images: p, size: [12, 16]}}\n").is_ok());
        assert!(
            err("model: {kind: cnn, image: [1, 12, 16]}, dataset: {images: p, size: [12, 12]}")
                .contains("train.model.image")
        );
        assert!(err("dataset: {table: a.csv, label: y}, classes: [1, 2]").contains("`digits` only"));
        assert!(err("model: {kind: mlp, width: 8}").contains("train.model.width: applies to `transformer` only"));
        assert!(
            JobSpec::from_yaml("name: t\ntrain: {model: {kind: transformer, width: 32}, dataset: {text: a}}\n").is_ok()
        );
        assert!(err("model: transformer, dataset: genesis, classes: [1, 2]").contains("`digits` only"));
        assert!(JobSpec::from_yaml("name: t\ntrain: {model: transformer, dataset: genesis}\n").is_ok());
    }

    #[test]
    fn an_unknown_model_or_dataset_is_refused_with_its_field_and_the_valid_names() {
        let err = JobSpec::from_yaml("name: t\ntrain:\n  model: resnet\n").unwrap_err();
        assert_eq!(err.field, "train.model", "{err}");
        assert!(err.reason.starts_with("unknown model `resnet`, expected one of: mlp, cnn, transformer"), "{err}");
        let err = JobSpec::from_yaml("name: t\ntrain: {dataset: mnist}\n").unwrap_err();
        assert_eq!(err.field, "train.dataset", "{err}");
        assert!(err.reason.starts_with("unknown dataset `mnist`, expected one of: digits, genesis"), "{err}");
        // The coordinator keeps specs as JSON: same check there.
        let err = serde_json::from_str::<TrainSpec>(r#"{"model": "MLP"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown model `MLP`"), "{err}");
    }

    #[test]
    fn model_and_dataset_names_are_the_lowercase_ones_in_yaml_and_json() {
        let spec = JobSpec::from_yaml("name: t\ntrain: {model: transformer, dataset: genesis}\n").unwrap();
        let train = spec.train.as_ref().unwrap();
        assert_eq!((train.model.kind, train.dataset.builtin()), (ModelKind::Transformer, Some(DatasetKind::Genesis)));
        let yaml = serde_yaml::to_string(&spec).unwrap();
        assert!(yaml.contains("model: transformer\n") && yaml.contains("dataset: genesis\n"), "{yaml}");
        let json = serde_json::to_string(train).unwrap();
        assert!(json.contains(r#""model":"transformer","dataset":"genesis""#), "{json}");
        assert_eq!(serde_json::from_str::<TrainSpec>(&json).unwrap(), *train);
        for kind in ModelKind::ALL {
            assert_eq!(kind.name().parse::<ModelKind>(), Ok(kind));
        }
        for kind in DatasetKind::ALL {
            assert_eq!(kind.to_string().parse::<DatasetKind>(), Ok(kind));
        }
        let defaults = JobSpec::from_yaml(GOOD).unwrap().train.unwrap();
        assert_eq!((defaults.model, defaults.dataset), (ModelSpec::of(ModelKind::Mlp), DatasetKind::Digits.into()));
    }

    #[test]
    fn negative_gpus_is_refused() {
        let err = JobSpec::from_yaml("name: x\ncommand: [true]\nresources:\n  gpus: -1\n").unwrap_err();
        assert_eq!(err.field, "resources.gpus");
        assert!(err.reason.contains("-1"), "{err}");
    }

    #[test]
    fn exactly_one_of_train_command_and_serve_is_allowed() {
        let both = JobSpec::from_yaml("name: x\ncommand: [true]\ntrain: {}\n").unwrap_err();
        assert!(both.reason.contains("not several"), "{both}");
        let both = JobSpec::from_yaml("name: x\nserve: {from: \"1\"}\ntrain: {}\n").unwrap_err();
        assert!(both.reason.contains("not several"), "{both}");
        let neither = JobSpec::from_yaml("name: x\n").unwrap_err();
        assert!(neither.reason.contains("exactly one"), "{neither}");
    }

    #[test]
    fn a_serve_spec_gets_batching_defaults_and_its_limits_name_the_field() {
        let spec = JobSpec::from_yaml("name: api\nreplicas: 2\nserve: {from: \"3@690\"}\n").unwrap();
        let serve = spec.serve.as_ref().unwrap();
        assert_eq!((spec.replicas, serve.max_batch_size, serve.max_batch_delay_ms, serve.max_queue), (2, 32, 2, 1024));
        let refused = |yaml: &str| JobSpec::from_yaml(yaml).unwrap_err();
        assert_eq!(refused("name: a\nserve: {from: \"3@x\"}\n").field, "serve.from");
        assert_eq!(refused("name: a\nserve: {from: \"3\", max_batch_size: 0}\n").field, "serve.max_batch_size");
        assert_eq!(
            refused("name: a\nserve: {from: \"3\", max_batch_delay_ms: 5000}\n").field,
            "serve.max_batch_delay_ms"
        );
        assert_eq!(refused("name: a\nserve: {from: \"3\", max_queue: 0}\n").field, "serve.max_queue");
        assert_eq!(refused("name: a\nserve: {from: \"3\", batch: 4}\n").field, "serve");
        assert_eq!(refused("name: a\nreplicas: 0\nserve: {from: \"3\"}\n").field, "replicas");
        let e = refused("name: a\nreplicas: 2\ncommand: [\"true\"]\n");
        assert!(e.field == "replicas" && e.reason.contains("resources.nodes"), "{e}");
        let e = refused("name: a\nresources: {nodes: 2}\nserve: {from: \"3\"}\n");
        assert_eq!(e.field, "resources.nodes");
    }

    #[test]
    fn broken_yaml_is_refused() {
        let err = JobSpec::from_yaml("name: [unclosed\n").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn durations_round_trip() {
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(parse_duration("10"), Err(ParseError::DurationWithoutUnit("10".into())));
        assert_eq!(
            parse_duration("5x").unwrap_err().to_string(),
            "`5x` is not a duration (use e.g. 90s, 30m, 2h, 1h30m)"
        );
        assert_eq!(parse_duration("0s"), Err(ParseError::ZeroDuration));
        // The field is named: it used to be "broken YAML: `2x` is not a duration".
        let err = JobSpec::from_yaml("name: x\ncommand: [true]\nmax_duration: 2x\n").unwrap_err();
        assert_eq!(err.field, "max_duration", "{err}");
        let err = JobSpec::from_yaml("name: x\ncommand: [true]\nmax_duration: 90\n").unwrap_err();
        assert!(err.to_string().starts_with("max_duration: `90` needs a unit"), "{err}");
        let none = JobSpec::from_yaml("name: x\ncommand: [true]\nmax_duration: null\n").unwrap();
        assert_eq!(none.max_duration_secs, None);
        let spec = JobSpec::from_yaml("name: x\ncommand: [true]\nmax_duration: 2h\n").unwrap();
        assert_eq!(spec.max_duration_secs, Some(7200));
        // As the coordinator keeps it.
        for spec in [spec, none] {
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
        }
    }

    #[test]
    fn checkpoint_refs_parse() {
        assert_eq!(parse_checkpoint_ref("j1").unwrap(), ("j1".into(), None));
        assert_eq!(parse_checkpoint_ref("j1@200").unwrap(), ("j1".into(), Some(200)));
        assert_eq!(parse_checkpoint_ref("j1@x"), Err(ParseError::CheckpointStep("x".into())));
        let err = JobSpec::from_yaml("name: t\ntrain: {init_from: \"@5\"}\n").unwrap_err();
        assert_eq!(err.to_string(), "train.init_from: must name a job id (JOB_ID or JOB_ID@STEP)");
    }

    #[test]
    fn retry_backs_off_doubling_up_to_its_most_and_refuses_nonsense() {
        let spec = JobSpec::from_yaml("name: x\ncommand: [true]\n").unwrap();
        assert!(spec.retry.is_default());
        assert_eq!([1, 2, 3].map(|n| spec.retry.backoff_ms(n)), [10_000, 20_000, 40_000]);
        assert_eq!(spec.retry.backoff_ms(10), 300_000, "capped at 5m");
        let yaml = "name: x\ncommand: [true]\nretry: {backoff: 2s, max_backoff: 5s, never_on_exit_codes: [2, 64]}\n";
        let spec = JobSpec::from_yaml(yaml).unwrap();
        assert_eq!([1, 2, 3, 40].map(|n| spec.retry.backoff_ms(n)), [2_000, 4_000, 5_000, 5_000]);
        assert_eq!(spec.retry.never_on_exit_codes, [2, 64]);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
        for (yaml, field, words) in [
            ("retry: {backoff: 1m, max_backoff: 10s}", "retry.backoff", "longer than"),
            ("retry: {never_on_exit_codes: [0]}", "retry.never_on_exit_codes", "0 is success"),
            ("retry: {backof: 1s}", "retry", "unknown field"),
        ] {
            let err = JobSpec::from_yaml(&format!("name: x\ncommand: [true]\n{yaml}\n")).unwrap_err();
            assert!(err.field.starts_with(field) && err.to_string().contains(words), "{yaml}: {err}");
        }
    }

    #[test]
    fn an_image_runs_a_command_and_names_its_pull_policy() {
        let spec = JobSpec::from_yaml("name: x\nimage: pytorch:2.11\ncommand: [python3, t.py]\n").unwrap();
        assert_eq!((spec.image.as_deref(), spec.image_pull_policy), (Some("pytorch:2.11"), PullPolicy::IfNotPresent));
        let yaml = "name: x\nimage: registry.local/team/img@sha256:ab12\nimage_pull_policy: never\ncommand: [a]\n";
        let spec = JobSpec::from_yaml(yaml).unwrap();
        assert_eq!(spec.image_pull_policy, PullPolicy::Never);
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&json).unwrap(), spec);
        for (yaml, field) in [
            ("image: \"a b\"\ncommand: [a]", "image"),
            ("image_pull_policy: always\ncommand: [a]", "image_pull_policy"),
            ("image: x\nimage_pull_policy: sometimes\ncommand: [a]", "image_pull_policy"),
        ] {
            let err = JobSpec::from_yaml(&format!("name: x\n{yaml}\n")).unwrap_err();
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }

    #[test]
    fn image_references_normalize_as_engines_list_them() {
        for (given, listed) in [
            ("python", "python:latest"),
            ("docker.io/library/python:3.12", "python:3.12"),
            ("docker.io/pytorch/pytorch", "pytorch/pytorch:latest"),
            ("registry.local:5000/team/img", "registry.local:5000/team/img:latest"),
            ("registry.local:5000/team/img:v2", "registry.local:5000/team/img:v2"),
            ("img@sha256:ab12", "img@sha256:ab12"),
        ] {
            assert_eq!(normalize_image(given), listed, "{given}");
        }
    }
}
