//! Checkpoint records: committing a verified upload, and finding the one a download asks for.

use tracing::info;

use super::Coordinator;
use crate::error::{Error, Result};
use crate::records::CheckpointRecord;
use crate::stale::StaleKind;

impl Coordinator {
    /// The checkpoint `from` names (`JOB_ID`: its latest; `JOB_ID@STEP`), as `(job, step)`.
    /// `InvalidArgument`, prefixed with `field`, when it is malformed or does not exist.
    pub(super) fn named_checkpoint(&self, field: &str, from: &str) -> Result<(String, u64)> {
        let (job, step) = gantry_core::spec::parse_checkpoint_ref(from)
            .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
        let checkpoints = self.store.checkpoints(&job)?;
        let found = match step {
            Some(step) => checkpoints.iter().find(|c| c.step == step),
            None => checkpoints.last(),
        };
        match found {
            Some(c) => Ok((job, c.step)),
            None => {
                let at = step.map(|s| format!(" at step {s}")).unwrap_or_default();
                Err(Error::InvalidArgument(format!("{field}: job {job} has no checkpoint{at}")))
            }
        }
    }

    pub fn commit_checkpoint(&self, record: CheckpointRecord) -> Result<CheckpointRecord> {
        // Checked when the upload began, and again now: a new attempt may have started since.
        self.take_output(&record.job_id, record.attempt, None, StaleKind::Checkpoint)?;
        // A step already recorded keeps its first record: its files are the ones on disk.
        if let Some(existing) = self.store.checkpoints(&record.job_id)?.into_iter().find(|c| c.step == record.step) {
            return Ok(existing);
        }
        let mut record = record;
        record.committed_at_ms = self.now_ms();
        self.store.put_checkpoint(&record)?;
        info!(job = %record.job_id, step = record.step, bytes = record.bytes, "checkpoint committed");
        Ok(record)
    }

    /// The checkpoint a download asks for: the given step, or the latest.
    pub fn find_checkpoint(&self, job_id: &str, step: Option<u64>) -> Result<CheckpointRecord> {
        self.store.job(job_id)?;
        let all = self.store.checkpoints(job_id)?;
        let found = match step {
            Some(step) => all.into_iter().find(|c| c.step == step),
            None => all.into_iter().last(),
        };
        found.ok_or_else(|| Error::CheckpointNotFound { job: job_id.to_string(), step })
    }
}
