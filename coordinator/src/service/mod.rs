//! The gRPC services: thin layers that convert messages and call [`crate::control`].

pub mod agent;
pub(crate) mod datasets;
pub mod join;
pub mod user;

use std::pin::Pin;

use futures::{StreamExt, TryStreamExt};
use gantry_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::control::Coordinator;
use crate::files::{CHUNK, FileStorage, Incoming, Manifest};
use crate::records::{CheckpointRecord, DatasetVersion, FileRecord, JobRecord, JobState, StopReason};

pub(crate) fn state_to_proto(s: JobState) -> v1::JobState {
    match s {
        JobState::Queued => v1::JobState::Queued,
        JobState::Running => v1::JobState::Running,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

pub(crate) fn state_name(s: JobState) -> &'static str {
    gantry_proto::job_state_name(state_to_proto(s))
}

pub(crate) fn job_to_proto(
    job: &JobRecord,
    waiting: Option<gantry_core::scheduler::Waiting>,
    metrics: Vec<v1::RankMetrics>,
    who: &crate::auth::Principal,
) -> v1::Job {
    let words = Reasons::of(job, waiting.as_ref());
    let mut spec = v1::JobSpec::from(&job.spec);
    // `env` values may be secrets: only the owner and admins see them.
    let env_redacted = !crate::auth::sees_env(who, &job.owner) && !spec.env.is_empty();
    if env_redacted {
        spec.env.values_mut().for_each(String::clear);
    }
    // A command's arguments may carry secrets too (`--api-key ...`): those who may not read the
    // job (viewers, other users) see the program's name only.
    if crate::auth::authorize(who, crate::auth::Action::ReadJob { owner: &job.owner }).is_err()
        && let Some(v1::job_spec::Workload::Command(command)) = spec.workload.as_mut()
        && command.argv.len() > 1
    {
        command.argv.truncate(1);
        command.argv.push("[arguments hidden]".into());
    }
    let (queue_position, estimated_start_ms) = match (job.state, waiting) {
        (JobState::Queued, Some(w)) => (w.position, w.estimated_start_ms.map(|t| t as i64)),
        _ => (0, None),
    };
    v1::Job {
        id: job.id.clone(),
        name: job.spec.name.clone(),
        state: state_to_proto(job.state) as i32,
        spec: Some(spec),
        owner: job.owner.clone(),
        env_redacted,
        attempt: job.user_attempt(),
        submitted_at_ms: job.submitted_at_ms,
        ended_at_ms: job.ended_at_ms,
        pending_reason: words.pending.clone().map(|p| p.1).unwrap_or_default(),
        pending_code: words.pending.map(|p| p.0.to_string()).unwrap_or_default(),
        queue_position,
        attempts: job
            .attempts
            .iter()
            .map(|a| v1::Attempt {
                attempt: a.attempt,
                placement: a
                    .placement
                    .iter()
                    .map(|r| v1::RankPlacement { rank: r.rank, node: r.node.clone(), gpu_uuids: r.gpu_uuids.clone() })
                    .collect(),
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                exit_code: a.exit_code,
                outcome: a.outcome.clone(),
                resumed_from_step: a.resumed_from_step,
                steps_lost: a.steps_lost,
            })
            .collect(),
        cancel_requested: job.cancel_requested,
        message: job.message.clone(),
        estimated_start_ms,
        preempted_by: match &job.stopping {
            Some(StopReason::Preempted { for_job, .. }) => for_job.clone(),
            _ => String::new(),
        },
        stop_reason: words.stopping.clone().map(|s| s.1).unwrap_or_default(),
        stop_code: words.stopping.map(|s| s.0.to_string()).unwrap_or_default(),
        metrics,
        steps_lost: job.steps_lost(),
        retry_at_ms: job.retry_at_ms.filter(|_| job.state == JobState::Queued),
        avoided_nodes: if job.state == JobState::Queued { job.avoided_nodes() } else { Vec::new() },
        replicas: Vec::new(),
        replica_of: job.replica_of.clone().unwrap_or_default(),
    }
}

/// A job's reasons as people read them, with their codes: the words every edge (gRPC for the
/// CLI, the web page's JSON, `/metrics`) shows, made in this one place.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reasons {
    /// Why a queued job waits.
    pub pending: Option<(&'static str, String)>,
    /// Why a running job is being stopped.
    pub stopping: Option<(&'static str, String)>,
}

impl Reasons {
    pub fn of(job: &JobRecord, waiting: Option<&gantry_core::scheduler::Waiting>) -> Reasons {
        let pending = match (job.state, waiting) {
            (JobState::Queued, Some(w)) => Some((w.reason.code().as_str(), w.reason.to_string())),
            (JobState::Queued, None) => Some(("unscheduled", "waiting for the next scheduling pass".to_string())),
            _ => None,
        };
        let stopping = match job.state {
            JobState::Running => job.stopping.as_ref().map(|s| (s.code(), s.to_string())),
            _ => None,
        };
        Reasons { pending, stopping }
    }
}

pub(crate) fn checkpoint_to_proto(c: &CheckpointRecord) -> v1::Checkpoint {
    v1::Checkpoint {
        job_id: c.job_id.clone(),
        attempt: c.attempt,
        step: c.step,
        bytes: c.bytes,
        sha256: c.sha256.clone(),
        files: c.files.iter().map(file_to_proto).collect(),
        committed_at_ms: c.committed_at_ms,
    }
}

pub(crate) fn file_to_proto(f: &FileRecord) -> v1::FileDigest {
    v1::FileDigest { path: f.path.clone(), size: f.size, sha256: f.sha256.clone() }
}

pub(crate) fn file_from_proto(f: v1::FileDigest) -> FileRecord {
    FileRecord { path: f.path, size: f.size, sha256: f.sha256 }
}

/// What an upload's listing asks to write, for its limits: the files' total size (their sizes,
/// not any total the sender announced; u64::MAX when they overflow it) and the longest path.
pub(crate) fn listed(files: &[v1::FileDigest]) -> (u64, usize) {
    let bytes = files.iter().try_fold(0u64, |sum, f| sum.checked_add(f.size)).unwrap_or(u64::MAX);
    (bytes, files.iter().map(|f| f.path.len()).max().unwrap_or(0))
}

/// Feeds an upload's parts after its header to `incoming` (`chunk_of` says which are chunks;
/// any other part is a second header) and verifies the last files; an upload that breaks off
/// or fails a check is abandoned. `what` names it in errors: "a {what} has one header".
pub(crate) async fn receive_upload<M: Manifest, P>(
    mut incoming: Incoming<M>,
    mut parts: impl Stream<Item = Result<P, Status>> + Unpin,
    chunk_of: impl Fn(P) -> Option<v1::FileChunk>,
    what: &str,
) -> Result<M, Status> {
    loop {
        let failed = match parts.next().await.transpose() {
            Ok(Some(part)) => match chunk_of(part) {
                Some(c) => match incoming.chunk(&c.path, c.offset, &c.data).await {
                    Ok(()) => continue,
                    Err(e) => e.into(),
                },
                None => Status::invalid_argument(format!("a {what} has one header")),
            },
            Ok(None) => break,
            Err(e) => e,
        };
        incoming.abandon().await;
        return Err(failed);
    }
    Ok(incoming.finish().await?)
}

pub(crate) fn checkpoint_from_proto(c: v1::Checkpoint) -> CheckpointRecord {
    CheckpointRecord {
        job_id: c.job_id,
        attempt: c.attempt,
        step: c.step,
        bytes: c.bytes,
        sha256: c.sha256,
        files: c.files.into_iter().map(file_from_proto).collect(),
        committed_at_ms: c.committed_at_ms,
        location: None,
    }
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A checkpoint download, for people and agents alike: the given step or the latest.
pub(crate) fn download(
    coordinator: &Coordinator,
    req: v1::DownloadCheckpointRequest,
) -> Result<BoxStream<v1::CheckpointData>, Status> {
    let record = coordinator.find_checkpoint(&req.job_id, req.step)?;
    Ok(Box::pin(stream_checkpoint(coordinator.files.clone(), record)))
}

/// Streams a committed checkpoint: its header, then every file in chunks of up to 1 MiB.
fn stream_checkpoint(
    storage: FileStorage,
    record: CheckpointRecord,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::CheckpointData, Status>> {
    use v1::checkpoint_data::Part;
    let header = v1::CheckpointData { part: Some(Part::Header(checkpoint_to_proto(&record))) };
    let files = record.files.clone();
    let read = move |file: FileRecord| {
        let (storage, record) = (storage.clone(), record.clone());
        Box::pin(async move { storage.read(&record, &file).await }) as ReadFile
    };
    stream_files(header, files, read, |chunk| v1::CheckpointData { part: Some(Part::Chunk(chunk)) })
}

/// Streams a data set version to an agent: its header, then every file in chunks.
pub(crate) fn stream_dataset(
    storage: FileStorage,
    version: DatasetVersion,
    header: v1::Dataset,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::DatasetData, Status>> {
    use v1::dataset_data::Part;
    let files = version.files.clone();
    let read = move |file: FileRecord| {
        let (storage, version) = (storage.clone(), version.clone());
        Box::pin(async move { storage.read_dataset(&version, &file).await }) as ReadFile
    };
    stream_files(v1::DatasetData { part: Some(Part::Header(header)) }, files, read, |chunk| v1::DatasetData {
        part: Some(Part::Chunk(chunk)),
    })
}

type ReadFile = Pin<Box<dyn std::future::Future<Output = crate::Result<crate::files::FileStream>> + Send>>;

/// `header`, then each file's bytes as `wrap`ped chunks of up to 1 MiB, on a task of its own.
fn stream_files<T: Send + 'static>(
    header: T,
    files: Vec<FileRecord>,
    read: impl Fn(FileRecord) -> ReadFile + Send + 'static,
    wrap: fn(v1::FileChunk) -> T,
) -> tokio_stream::wrappers::ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        for file in files {
            let path = file.path.clone();
            let sent = match read(file).await {
                Ok(pieces) => send_file(pieces, path, &tx, wrap).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Sends one file, its pieces gathered into chunks of up to 1 MiB (an object store's HTTP body
/// comes in much smaller pieces). Returns early, without error, if the receiver is gone.
async fn send_file<T>(
    mut pieces: crate::files::FileStream,
    path: String,
    tx: &mpsc::Sender<Result<T, Status>>,
    wrap: fn(v1::FileChunk) -> T,
) -> crate::Result<()> {
    let mut offset = 0u64;
    let mut buf = Vec::with_capacity(CHUNK);
    loop {
        let piece = pieces.try_next().await?;
        if let Some(piece) = &piece {
            buf.extend_from_slice(piece);
        }
        let last = piece.is_none();
        while buf.len() >= CHUNK || (last && !buf.is_empty()) {
            let data: Vec<u8> = buf.drain(..buf.len().min(CHUNK)).collect();
            let chunk = v1::FileChunk { path: path.clone(), offset, data };
            offset += chunk.data.len() as u64;
            if tx.send(Ok(wrap(chunk))).await.is_err() {
                return Ok(());
            }
        }
        if last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod env_tests {
    use crate::auth::{Principal, Role};

    #[test]
    fn env_values_reach_only_the_owner_and_admins() {
        let spec = gantry_core::JobSpec::from_yaml("name: x\ncommand: [\"true\"]\nenv: {API_KEY: hunter2}\n").unwrap();
        let job = crate::store::new_job(1, spec, "alice", 0);
        let as_ =
            |name: &str, role| super::job_to_proto(&job, None, Vec::new(), &Principal { name: name.into(), role });
        for (seen, who) in [(true, as_("alice", Role::User)), (true, as_("root", Role::Admin))] {
            assert_eq!((who.spec.unwrap().env["API_KEY"] == "hunter2", who.env_redacted), (seen, false));
        }
        for other in [as_("bob", Role::User), as_("alice", Role::Viewer)] {
            assert!(other.env_redacted);
            assert_eq!(other.spec.unwrap().env["API_KEY"], "", "the key stays, its value does not");
        }
    }

    #[test]
    fn command_arguments_reach_only_those_who_may_read_the_job() {
        use gantry_proto::v1::job_spec::Workload;
        let spec =
            gantry_core::JobSpec::from_yaml("name: x\ncommand: [\"train.sh\", \"--api-key\", \"hunter2\"]\n").unwrap();
        let job = crate::store::new_job(1, spec, "alice", 0);
        let argv = |name: &str, role| {
            let proto = super::job_to_proto(&job, None, Vec::new(), &Principal { name: name.into(), role });
            match proto.spec.unwrap().workload {
                Some(Workload::Command(c)) => c.argv,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(argv("alice", Role::User), ["train.sh", "--api-key", "hunter2"]);
        assert_eq!(argv("root", Role::Admin), ["train.sh", "--api-key", "hunter2"]);
        for (name, role) in [("bob", Role::User), ("alice", Role::Viewer)] {
            assert_eq!(argv(name, role), ["train.sh", "[arguments hidden]"]);
        }
    }
}
