use std::collections::BTreeMap;

use gantry_core::ParseError;
use gantry_core::spec::{
    DatasetSpec, Holdout, JobSpec, ModelKind, ModelSpec, Precision, PullPolicy, Resources, RetrySpec, ServeSpec,
    TrainSpec,
};

use crate::v1;

/// A wire message that cannot become a domain value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: &'static str,
    pub reason: String,
}

fn missing(field: &'static str) -> ConvertError {
    ConvertError { field, reason: "missing".into() }
}

fn invalid(field: &'static str, e: ParseError) -> ConvertError {
    ConvertError { field, reason: e.to_string() }
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(s: &JobSpec) -> Self {
        let r = &s.resources;
        let workload = match (&s.train, &s.command, &s.serve) {
            (Some(t), _, _) => Some(v1::job_spec::Workload::Train(v1::TrainSpec {
                model: t.model.kind.name().to_string(),
                dataset: t.dataset.kind_name().to_string(),
                model_sizes: t.model.is_sized().then(|| v1::ModelSizes {
                    hidden: t.model.hidden.clone().unwrap_or_default(),
                    channels: t.model.channels.clone().unwrap_or_default(),
                    image: t.model.image.map(Vec::from).unwrap_or_default(),
                    layers: t.model.layers,
                    width: t.model.width,
                    heads: t.model.heads,
                    context: t.model.context,
                }),
                file_dataset: file_dataset(&t.dataset),
                epochs: t.epochs,
                batch_size: t.batch_size,
                learning_rate: t.learning_rate,
                checkpoint_every_steps: t.checkpoint_every_steps,
                init_from: t.init_from.clone(),
                seed: t.seed,
                classes: t.classes.clone(),
                examples_per_class: t.examples_per_class,
                freeze_backbone: t.freeze_backbone,
                new_head: t.new_head,
                precision: match t.precision {
                    Precision::F32 => v1::Precision::F32,
                    Precision::Bf16 => v1::Precision::Bf16,
                }
                .into(),
            })),
            (None, Some(argv), _) => Some(v1::job_spec::Workload::Command(v1::CommandSpec { argv: argv.clone() })),
            (None, None, Some(v)) => Some(v1::job_spec::Workload::Serve(v1::ServeSpec {
                from: v.from.clone(),
                max_batch_size: v.max_batch_size,
                max_batch_delay_ms: v.max_batch_delay_ms,
                max_queue: v.max_queue,
            })),
            (None, None, None) => None,
        };
        v1::JobSpec {
            name: s.name.clone(),
            priority: s.priority,
            queue: s.queue.clone(),
            resources: Some(v1::Resources {
                nodes: r.nodes,
                gpus: r.gpus,
                gpu_model: r.gpu_model.clone(),
                gpu_memory_gb: r.gpu_memory_gb,
                cpus: r.cpus,
                memory_gb: r.memory_gb,
            }),
            max_restarts: s.max_restarts,
            max_duration_secs: s.max_duration_secs,
            replicas: s.replicas,
            workload,
            env: s.env.clone().into_iter().collect(),
            data: s.data.clone().into_iter().collect(),
            retry: (!s.retry.is_default()).then(|| v1::RetryPolicy {
                backoff_secs: s.retry.backoff,
                max_backoff_secs: s.retry.max_backoff,
                never_on_exit_codes: s.retry.never_on_exit_codes.clone(),
            }),
            image: s.image.clone(),
            image_pull_policy: if s.image_pull_policy.is_default() {
                String::new()
            } else {
                s.image_pull_policy.name().into()
            },
        }
    }
}

fn file_dataset(d: &DatasetSpec) -> Option<v1::FileDataset> {
    let (mut size, mut augment, mut regression) = (Vec::new(), false, false);
    let (path, label, holdout) = match d {
        DatasetSpec::Builtin(_) => return None,
        DatasetSpec::Table { path, label, holdout, regression: r } => {
            regression = *r;
            (path, label.clone(), holdout)
        }
        DatasetSpec::Images { path, size: s, augment: a, holdout } => {
            (size, augment) = (s.to_vec(), *a);
            (path, String::new(), holdout)
        }
        DatasetSpec::Text { path, holdout } => (path, String::new(), holdout),
    };
    let holdout = match holdout {
        Holdout::File(test) => v1::file_dataset::Holdout::Test(test.clone()),
        Holdout::Fraction(f) => v1::file_dataset::Holdout::TestFraction(*f),
    };
    Some(v1::FileDataset { path: path.clone(), label, holdout: Some(holdout), size, augment, regression })
}

/// Names on the wire, as in a spec file: one this build does not know is refused.
fn model_spec(name: &str, sizes: Option<v1::ModelSizes>) -> Result<ModelSpec, ConvertError> {
    let kind: ModelKind = name.parse().map_err(|e| invalid("spec.train.model", e))?;
    let Some(s) = sizes else { return Ok(ModelSpec::of(kind)) };
    let hidden = (!s.hidden.is_empty()).then_some(s.hidden);
    let channels = (!s.channels.is_empty()).then_some(s.channels);
    let image = match s.image[..] {
        [] => None,
        [c, h, w] => Some([c, h, w]),
        _ => return Err(ConvertError { field: "spec.train.model_sizes.image", reason: "needs 3 numbers".into() }),
    };
    Ok(ModelSpec {
        kind,
        hidden,
        channels,
        image,
        layers: s.layers,
        width: s.width,
        heads: s.heads,
        context: s.context,
    })
}

fn dataset_spec(kind: &str, files: Option<v1::FileDataset>) -> Result<DatasetSpec, ConvertError> {
    let field = "spec.train.file_dataset";
    let holdout = |f: &v1::FileDataset| match &f.holdout {
        Some(v1::file_dataset::Holdout::Test(test)) => Ok(Holdout::File(test.clone())),
        Some(v1::file_dataset::Holdout::TestFraction(f)) => Ok(Holdout::Fraction(*f)),
        None => Err(missing("spec.train.file_dataset.holdout")),
    };
    match (kind, files) {
        ("table", Some(f)) => {
            Ok(DatasetSpec::Table { holdout: holdout(&f)?, path: f.path, label: f.label, regression: f.regression })
        }
        ("text", Some(f)) => Ok(DatasetSpec::Text { holdout: holdout(&f)?, path: f.path }),
        ("images", Some(f)) => {
            let [h, w] = f.size[..] else {
                return Err(ConvertError { field: "spec.train.file_dataset.size", reason: "needs 2 numbers".into() });
            };
            Ok(DatasetSpec::Images { holdout: holdout(&f)?, path: f.path, size: [h, w], augment: f.augment })
        }
        ("table" | "text" | "images", None) => Err(missing(field)),
        (name, None) => Ok(DatasetSpec::Builtin(name.parse().map_err(|e| invalid("spec.train.dataset", e))?)),
        (_, Some(_)) => Err(ConvertError { field, reason: format!("given with the built-in data set `{kind}`") }),
    }
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = ConvertError;

    fn try_from(s: v1::JobSpec) -> Result<Self, Self::Error> {
        let r = s.resources.ok_or_else(|| missing("spec.resources"))?;
        let (train, command, serve) =
            match s.workload.ok_or_else(|| missing("spec.workload (train, command or serve)"))? {
                v1::job_spec::Workload::Train(t) => (
                    Some(TrainSpec {
                        // Names on the wire, as in a spec file: one this build does not know is refused.
                        model: model_spec(&t.model, t.model_sizes)?,
                        dataset: dataset_spec(&t.dataset, t.file_dataset)?,
                        epochs: t.epochs,
                        batch_size: t.batch_size,
                        learning_rate: t.learning_rate,
                        checkpoint_every_steps: t.checkpoint_every_steps,
                        init_from: t.init_from,
                        seed: t.seed,
                        classes: t.classes,
                        examples_per_class: t.examples_per_class,
                        freeze_backbone: t.freeze_backbone,
                        new_head: t.new_head,
                        precision: match v1::Precision::try_from(t.precision) {
                            Ok(v1::Precision::F32) => Precision::F32,
                            Ok(v1::Precision::Bf16) => Precision::Bf16,
                            Err(_) => {
                                let reason = format!("unknown precision {}", t.precision);
                                return Err(ConvertError { field: "spec.train.precision", reason });
                            }
                        },
                    }),
                    None,
                    None,
                ),
                v1::job_spec::Workload::Command(c) => (None, Some(c.argv), None),
                v1::job_spec::Workload::Serve(v) => (
                    None,
                    None,
                    Some(ServeSpec {
                        from: v.from,
                        max_batch_size: v.max_batch_size,
                        max_batch_delay_ms: v.max_batch_delay_ms,
                        max_queue: v.max_queue,
                    }),
                ),
            };
        let image_pull_policy = PullPolicy::parse(&s.image_pull_policy).ok_or_else(|| ConvertError {
            field: "spec.image_pull_policy",
            reason: format!("unknown policy `{}`, expected if_not_present, always or never", s.image_pull_policy),
        })?;
        Ok(JobSpec {
            name: s.name,
            priority: s.priority,
            queue: s.queue,
            resources: Resources {
                nodes: r.nodes,
                gpus: r.gpus,
                gpu_model: r.gpu_model,
                gpu_memory_gb: r.gpu_memory_gb,
                cpus: r.cpus,
                memory_gb: r.memory_gb,
            },
            max_restarts: s.max_restarts,
            max_duration_secs: s.max_duration_secs,
            // A client that predates the field sends 0: one replica.
            replicas: s.replicas.max(1),
            train,
            command,
            serve,
            env: s.env.into_iter().collect::<BTreeMap<_, _>>(),
            data: s.data.into_iter().collect::<BTreeMap<_, _>>(),
            retry: s
                .retry
                .map(|r| RetrySpec {
                    backoff: r.backoff_secs,
                    max_backoff: r.max_backoff_secs,
                    never_on_exit_codes: r.never_on_exit_codes,
                })
                .unwrap_or_default(),
            image: s.image,
            image_pull_policy,
        })
    }
}

/// The names scripts rely on (`queued`, `running`, ...).
pub fn job_state_name(state: v1::JobState) -> &'static str {
    match state {
        v1::JobState::Unspecified => "unknown",
        v1::JobState::Queued => "queued",
        v1::JobState::Running => "running",
        v1::JobState::Succeeded => "succeeded",
        v1::JobState::Failed => "failed",
        v1::JobState::Cancelled => "cancelled",
    }
}

pub fn parse_job_state(name: &str) -> Option<v1::JobState> {
    Some(match name {
        "queued" => v1::JobState::Queued,
        "running" => v1::JobState::Running,
        "succeeded" => v1::JobState::Succeeded,
        "failed" => v1::JobState::Failed,
        "cancelled" => v1::JobState::Cancelled,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_the_wire() {
        let spec = JobSpec::from_yaml(
            "name: x\npriority: 70\nresources: {gpus: 2, gpu_model: H100}\ntrain: {epochs: 3, init_from: j1@10, precision: bf16}\nenv: {A: b}\n",
        )
        .unwrap();
        let wire = v1::JobSpec::from(&spec);
        assert_eq!(JobSpec::try_from(wire).unwrap(), spec);
        let command = "name: c\ncommand: [train.sh]\ndata: {WINE: 'dataset://wine/a.csv', PICS: 's3://b/pics'}\n";
        let spec = JobSpec::from_yaml(command).unwrap();
        assert_eq!(spec.data.len(), 2);
        assert_eq!(JobSpec::try_from(v1::JobSpec::from(&spec)).unwrap(), spec);
    }

    #[test]
    fn sized_models_and_file_data_sets_round_trip_through_the_wire() {
        for train in [
            "{model: {kind: mlp, hidden: [32, 16]}, dataset: {table: a.csv, label: y, test: b.csv}}",
            "{model: mlp, dataset: {table: homes.parquet, target: price}}",
            "{model: {kind: transformer, layers: 3, context: 32}, dataset: {text: t.txt, test_fraction: 0.1}}",
            "{model: {kind: cnn, channels: [4, 8], image: [1, 16, 16]}, dataset: {images: p, size: [16, 16], augment: true}}",
        ] {
            let spec = JobSpec::from_yaml(&format!("name: x\ntrain: {train}\n")).unwrap();
            assert_eq!(JobSpec::try_from(v1::JobSpec::from(&spec)).unwrap(), spec, "{train}");
        }
        let spec = JobSpec::from_yaml("name: x\ntrain: {dataset: {table: a.csv, label: y}}\n").unwrap();
        let mut wire = v1::JobSpec::from(&spec);
        let Some(v1::job_spec::Workload::Train(train)) = wire.workload.as_mut() else { unreachable!() };
        train.file_dataset = None;
        assert_eq!(JobSpec::try_from(wire).unwrap_err().to_string(), "spec.train.file_dataset: missing");
    }

    #[test]
    fn an_unknown_precision_is_an_error_not_a_default() {
        let spec = JobSpec::from_yaml("name: x\nresources: {gpus: 1}\ntrain: {precision: bf16}\n").unwrap();
        let mut wire = v1::JobSpec::from(&spec);
        let Some(v1::job_spec::Workload::Train(train)) = wire.workload.as_mut() else { unreachable!() };
        train.precision = 7;
        assert_eq!(JobSpec::try_from(wire).unwrap_err().to_string(), "spec.train.precision: unknown precision 7");
    }

    #[test]
    fn an_unknown_model_or_dataset_is_an_error_not_a_default() {
        let spec = JobSpec::from_yaml("name: x\ntrain: {model: cnn}\n").unwrap();
        let wire = v1::JobSpec::from(&spec);
        let Some(v1::job_spec::Workload::Train(train)) = &wire.workload else { unreachable!() };
        assert_eq!((train.model.as_str(), train.dataset.as_str()), ("cnn", "digits"));
        let with = |edit: &dyn Fn(&mut v1::TrainSpec)| {
            let mut wire = wire.clone();
            let Some(v1::job_spec::Workload::Train(train)) = wire.workload.as_mut() else { unreachable!() };
            edit(train);
            JobSpec::try_from(wire).unwrap_err().to_string()
        };
        assert_eq!(
            with(&|t| t.model = "resnet".into()),
            "spec.train.model: unknown model `resnet`, expected one of: mlp, cnn, transformer"
        );
        assert_eq!(
            with(&|t| t.dataset = String::new()),
            "spec.train.dataset: unknown dataset ``, expected one of: digits, genesis"
        );
    }

    #[test]
    fn missing_workload_is_an_error_not_a_default() {
        let spec = JobSpec::from_yaml("name: x\ncommand: [true]\n").unwrap();
        let mut wire = v1::JobSpec::from(&spec);
        wire.workload = None;
        assert_eq!(JobSpec::try_from(wire).unwrap_err().field, "spec.workload (train, command or serve)");
    }
}
