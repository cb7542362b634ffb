//! The gRPC services: thin layers that convert messages and call [`crate::control`].

pub mod agent;
pub mod user;

use std::pin::Pin;

use futures::TryStreamExt;
use gantry_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::checkpoints::{CHUNK, CheckpointStorage};
use crate::control::Coordinator;
use crate::records::{CheckpointRecord, FileRecord, JobRecord, JobState};

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
) -> v1::Job {
    let (pending_reason, queue_position, estimated_start_ms) = match (job.state, waiting) {
        (JobState::Queued, Some(w)) => (w.reason, w.position, w.estimated_start_ms.map(|t| t as i64)),
        (JobState::Queued, None) => ("waiting for the next scheduling pass".to_string(), 0, None),
        _ => (String::new(), 0, None),
    };
    v1::Job {
        id: job.id.clone(),
        name: job.spec.name.clone(),
        state: state_to_proto(job.state) as i32,
        spec: Some(v1::JobSpec::from(&job.spec)),
        attempt: job.user_attempt(),
        submitted_at_ms: job.submitted_at_ms,
        ended_at_ms: job.ended_at_ms,
        pending_reason,
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
            })
            .collect(),
        cancel_requested: job.cancel_requested,
        message: job.message.clone(),
        estimated_start_ms,
        preempted_by: job.preempted_by.clone().unwrap_or_default(),
        metrics,
    }
}

pub(crate) fn checkpoint_to_proto(c: &CheckpointRecord) -> v1::Checkpoint {
    v1::Checkpoint {
        job_id: c.job_id.clone(),
        attempt: c.attempt,
        step: c.step,
        bytes: c.bytes,
        sha256: c.sha256.clone(),
        files: c
            .files
            .iter()
            .map(|f| v1::FileDigest { path: f.path.clone(), size: f.size, sha256: f.sha256.clone() })
            .collect(),
        committed_at_ms: c.committed_at_ms,
    }
}

pub(crate) fn checkpoint_from_proto(c: v1::Checkpoint) -> CheckpointRecord {
    CheckpointRecord {
        job_id: c.job_id,
        attempt: c.attempt,
        step: c.step,
        bytes: c.bytes,
        sha256: c.sha256,
        files: c.files.into_iter().map(|f| FileRecord { path: f.path, size: f.size, sha256: f.sha256 }).collect(),
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
    Ok(Box::pin(stream_checkpoint(coordinator.checkpoints.clone(), record)))
}

/// Streams a committed checkpoint: its header, then every file in chunks of up to 1 MiB.
fn stream_checkpoint(
    storage: CheckpointStorage,
    record: CheckpointRecord,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::CheckpointData, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let header = v1::CheckpointData { part: Some(v1::checkpoint_data::Part::Header(checkpoint_to_proto(&record))) };
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        for file in &record.files {
            if let Err(e) = send_file(&storage, &record, file, &tx).await {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Sends one file, its pieces gathered into chunks of up to 1 MiB (an object store's HTTP body
/// comes in much smaller pieces). Returns early, without error, if the receiver is gone.
async fn send_file(
    storage: &CheckpointStorage,
    record: &CheckpointRecord,
    file: &FileRecord,
    tx: &mpsc::Sender<Result<v1::CheckpointData, Status>>,
) -> crate::Result<()> {
    let mut pieces = storage.read(record, file).await?;
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
            let chunk = v1::FileChunk { path: file.path.clone(), offset, data };
            offset += chunk.data.len() as u64;
            if tx.send(Ok(v1::CheckpointData { part: Some(v1::checkpoint_data::Part::Chunk(chunk)) })).await.is_err() {
                return Ok(());
            }
        }
        if last {
            return Ok(());
        }
    }
}
