//! Changing jobs: submit and cancel for people, and applying the lifecycle's transitions
//! ([`crate::lifecycle`]) through the store, then doing what they ask.

use gantry_core::JobSpec;
use tracing::{info, warn};

use super::Coordinator;
use crate::error::{Error, Result};
use crate::lifecycle::{RankEnd, Transition};
use crate::records::{JobRecord, JobState, StopReason};
use crate::stale::StaleKind;

impl Coordinator {
    /// Queues `spec` as a job of `owner` (the submitting token's name).
    pub fn submit(&self, spec: JobSpec, owner: &str) -> Result<JobRecord> {
        spec.validate().map_err(Error::InvalidSpec)?;
        if let Some(from) = spec.train.as_ref().and_then(|t| t.init_from_job()) {
            let (job, _) = gantry_core::spec::parse_checkpoint_ref(from)
                .map_err(|e| Error::InvalidArgument(format!("train.init_from: {e}")))?;
            self.store
                .job(&job)
                .map_err(|_| Error::InvalidArgument(format!("train.init_from: job {job} does not exist")))?;
        }
        let mut spec = spec;
        // Pinned and stored under the lock, so a delete either sees this job or came first.
        let names_pushed =
            spec.fetched_paths_mut().iter().any(|(_, p)| gantry_core::spec::PushedPath::parse(p).is_some());
        let _pinning = names_pushed.then(|| self.datasets_pinning());
        self.pin_datasets(&mut spec)?;
        crate::limits::spec_size(serde_json::to_vec(&spec)?.len())?;
        let spec = self.pin_serve_from(spec)?;
        if spec.serve.is_some()
            && let Some(serving) = self.serving_named(&spec.name)?
        {
            return self.update_serving(&serving, spec, owner);
        }
        let limits = &self.settings.limits;
        self.submit_rate.admit(limits, owner, self.now_ms())?;
        self.queued_by_user.admit(limits, owner)?;
        let job = self.store.submit(spec, owner, self.now_ms()).inspect_err(|_| self.queued_by_user.release(owner))?;
        info!(job = %job.id, name = %job.spec.name, owner, "job queued");
        // A serve job runs from now on: its replicas are what waits to be placed.
        let job = match job.is_serving() {
            true => self.transition(&job.id, |j| j.start_serving())?.0,
            false => job,
        };
        self.changed();
        Ok(job)
    }

    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        let now = self.now_ms();
        let (job, transition) = self.transition(id, |job| job.cancel(now))?;
        if transition.changed() {
            info!(job = %id, "cancel requested");
        }
        Ok(job)
    }

    /// Stops a running job to requeue it: for a higher-priority job, or off an unhealthy GPU.
    pub(super) fn requeue(&self, id: &str, reason: StopReason) -> Result<()> {
        let words = reason.to_string();
        let (_, transition) = self.transition(id, |job| job.requeue_for(reason.clone()))?;
        if transition.changed() {
            info!(job = %id, reason = %words, "stopping to requeue");
        }
        Ok(())
    }

    /// Records that a rank ended (idempotent), and stops the attempt's other ranks if it failed.
    pub(super) fn end_rank(&self, id: &str, attempt: u32, rank: u32, end: RankEnd) -> Result<()> {
        let now = self.now_ms();
        // What the attempt got to, and where the next one resumes: the work it loses if it ends.
        let last_step = self.metrics.last_step(id, attempt);
        let checkpoint_step = self.store.checkpoints(id)?.last().map(|c| c.step);
        let (job, transition) = self.transition(id, |job| {
            let t = job.on_rank_exit(attempt, rank, end.clone(), now);
            job.note_lost_work(attempt, last_step, checkpoint_step);
            t
        })?;
        if transition.changed() {
            info!(job = %id, attempt, rank, state = ?job.state, end = ?end, "rank ended");
        }
        Ok(())
    }

    /// Refuses (and counts) output from an attempt, or a rank of one, that the coordinator has
    /// moved on from; see [`JobRecord::moved_on_from`].
    pub fn take_output(&self, id: &str, attempt: u32, rank: Option<u32>, kind: StaleKind) -> Result<()> {
        let job = self.store.job(id)?;
        match job.moved_on_from(attempt, rank) {
            None => Ok(()),
            Some(why) => {
                self.stale.count(kind);
                warn!(job = %id, attempt, ?rank, kind = kind.label(), %why, "refused output of a stale attempt");
                Err(Error::StaleAttempt { job: id.to_string(), attempt, why: why.to_string() })
            }
        }
    }

    pub(super) fn fail_before_start(&self, id: &str, why: &str) -> Result<()> {
        let now = self.now_ms();
        let (_, transition) = self.transition(id, |job| job.fail_before_start(why, now))?;
        if transition.changed() {
            warn!(job = %id, reason = %why, "job failed before it started");
        }
        Ok(())
    }

    /// Applies one transition atomically in the store, then what it asks: stop the ranks, wake
    /// the scheduler and log followers. Returns the job as it now is.
    pub(super) fn transition(
        &self,
        id: &str,
        mut rule: impl FnMut(&mut JobRecord) -> Transition,
    ) -> Result<(JobRecord, Transition)> {
        let mut transition = Transition::Unchanged;
        let updated = self.store.update(id, |job| {
            transition = rule(job);
            transition.changed()
        })?;
        let Some(job) = updated else { return Ok((self.store.job(id)?, Transition::Unchanged)) };
        if transition.stops_ranks() {
            self.stop_ranks(&job);
        }
        self.changed();
        Ok((job, transition))
    }

    /// Sends SIGTERM-with-grace to every rank of the job's current attempt.
    pub(super) fn stop_ranks(&self, job: &JobRecord) {
        let Some(attempt) = job.current_attempt() else { return };
        if job.state != JobState::Running {
            return;
        }
        let fleet = self.fleet();
        for rank in &attempt.placement {
            if let Some(tx) = fleet.sender(&rank.node) {
                let _ = tx.try_send(self.cancel_message(&job.id, job.attempt));
            }
        }
    }
}
