//! Serve jobs on the control side: a submission that names a model already served updates it,
//! and each pass applies [`rollout::decide`] to every serve job's replicas and rebuilds the
//! routes the HTTP side forwards requests by.

use std::collections::HashMap;

use gantry_core::JobSpec;
use gantry_proto::v1;
use tracing::{info, warn};

use super::Coordinator;
use crate::error::{Error, Result};
use crate::records::{JobRecord, JobState};
use crate::serving::{replica_spec, rollout};

impl Coordinator {
    /// `serve.from` as the exact checkpoint it names now (`JOB@STEP`): a serve job keeps
    /// serving that one until updated, whatever its source trains later.
    pub(super) fn pin_serve_from(&self, mut spec: JobSpec) -> Result<JobSpec> {
        let Some(serve) = spec.serve.as_mut() else { return Ok(spec) };
        let (job, _) = gantry_core::spec::parse_checkpoint_ref(&serve.from)
            .map_err(|e| Error::InvalidArgument(format!("serve.from: {e}")))?;
        let source = self
            .store
            .job(&job)
            .map_err(|_| Error::InvalidArgument(format!("serve.from: job {job} does not exist")))?;
        if source.spec.train.is_none() {
            return Err(Error::InvalidArgument(format!(
                "serve.from: job {job} is not a train job: only the runtime's checkpoints can be served"
            )));
        }
        let (job, step) = self.named_checkpoint("serve.from", &serve.from)?;
        serve.from = format!("{job}@{step}");
        Ok(spec)
    }

    /// The live serve job serving model `name`, if any.
    pub(super) fn serving_named(&self, name: &str) -> Result<Option<JobRecord>> {
        // One being cancelled is on its way out: a new submission of the name starts afresh.
        let live = |j: &JobRecord| j.is_serving() && !j.state.is_terminal() && !j.cancel_requested;
        Ok(self.store.jobs()?.into_iter().find(|j| live(j) && j.spec.name == name))
    }

    /// A new spec for serve job `job`: its replicas are replaced one at a time by the passes.
    pub(super) fn update_serving(&self, job: &JobRecord, spec: JobSpec, owner: &str) -> Result<JobRecord> {
        if job.owner != owner {
            return Err(Error::PermissionDenied(format!(
                "model {} is served by job {} of {}: only its owner may update it",
                job.spec.name, job.id, job.owner
            )));
        }
        let updated = self.store.update(&job.id, |j| {
            if j.state.is_terminal() || j.cancel_requested || j.spec == spec {
                return false;
            }
            j.spec = spec.clone();
            true
        })?;
        let job = match updated {
            Some(job) => job,
            None => self.store.job(&job.id)?,
        };
        info!(job = %job.id, model = %job.spec.name, from = ?job.spec.serve.as_ref().map(|s| &s.from), "serve job updated");
        self.changed();
        Ok(job)
    }

    /// One step of every serve job toward what its spec asks for. The routes are published
    /// before any replica is stopped, so no request is sent to one already told to stop; a
    /// serve job that cannot be stepped (a store error) is logged and the others go on.
    pub fn reconcile_serving(&self) -> Result<()> {
        let jobs = self.store.jobs()?;
        let now = self.now_ms();
        let mut replicas: HashMap<&str, Vec<&JobRecord>> = HashMap::new();
        for job in &jobs {
            if let Some(of) = &job.replica_of {
                replicas.entry(of.as_str()).or_default().push(job);
            }
        }
        let (addrs, drained): (HashMap<String, String>, Vec<String>) = {
            let fleet = self.fleet();
            let addrs = fleet.agents.iter().map(|(name, a)| (name.clone(), a.addr.clone())).collect();
            (addrs, fleet.agents.iter().filter(|(_, a)| a.drained).map(|(name, _)| name.clone()).collect())
        };
        // A replica on a drained node is replaced like an outdated one: a new one elsewhere
        // first, then it stops.
        let on_drained =
            |r: &JobRecord| r.current_attempt().is_some_and(|a| a.placement.iter().any(|p| drained.contains(&p.node)));
        let ready = |r: &JobRecord| -> Option<String> {
            let port = self.serving.ready_port(&r.id).filter(|p| p.attempt == r.attempt)?;
            let attempt = r.current_attempt()?;
            if r.state != JobState::Running || r.is_stopping() || r.cancel_requested {
                return None;
            }
            let node = &attempt.placement.first()?.node;
            let host = addrs.get(node).filter(|a| !a.is_empty()).map(String::as_str).unwrap_or("127.0.0.1");
            Some(format!("{}:{}", bracket_v6(host), port.port))
        };
        let mut routes = HashMap::new();
        let mut steps = Vec::new();
        for job in jobs.iter().filter(|j| j.is_serving() && !j.state.is_terminal()) {
            let wanted = replica_spec(&job.spec);
            let mine = replicas.get(job.id.as_str()).map(Vec::as_slice).unwrap_or_default();
            let live: Vec<rollout::Replica> = mine
                .iter()
                .filter(|r| !r.state.is_terminal())
                .map(|r| rollout::Replica {
                    id: r.id.clone(),
                    current: r.spec == wanted && !on_drained(r),
                    ready: ready(r).is_some(),
                    stopping: r.cancel_requested,
                })
                .collect();
            let failed: Vec<&JobRecord> =
                mine.iter().copied().filter(|r| r.state == JobState::Failed && r.spec == wanted).collect();
            let decision = rollout::decide(&rollout::State {
                wanted: job.spec.replicas as usize,
                cancelled: job.cancel_requested,
                live: &live,
                failed_current: failed.len(),
            });
            // Routed: ready, and not about to be stopped.
            let routed: Vec<(String, String)> = mine
                .iter()
                .filter(|r| !decision.stop.contains(&r.id))
                .filter_map(|r| ready(r).map(|addr| (r.id.clone(), addr)))
                .collect();
            if !job.cancel_requested {
                routes.insert(job.spec.name.clone(), (job.id.clone(), routed));
            }
            steps.push((job, wanted, decision, failed));
        }
        let live: std::collections::HashSet<&str> = jobs
            .iter()
            .filter(|j| j.replica_of.is_some() && j.state == JobState::Running)
            .map(|j| j.id.as_str())
            .collect();
        self.serving.retain(&|id| live.contains(id));
        let addrs: std::collections::HashSet<String> =
            routes.values().flat_map(|(_, rs)| rs.iter().map(|(_, a)| a.clone())).collect();
        self.serving.pool.retain(&|a| addrs.contains(a));
        self.serving.set_routes(routes);
        for (job, wanted, decision, failed) in steps {
            if let Err(e) = self.step_serving(job, &wanted, &decision, &failed, now) {
                warn!(job = %job.id, error = %e, "could not step a serve job; trying again next pass");
            }
        }
        Ok(())
    }

    /// Carries out one serve job's rollout decision.
    fn step_serving(
        &self,
        job: &JobRecord,
        wanted: &JobSpec,
        decision: &rollout::Decision,
        failed: &[&JobRecord],
        now: i64,
    ) -> Result<()> {
        if job.state == JobState::Queued {
            self.transition(&job.id, |j| j.start_serving())?;
        }
        for id in &decision.stop {
            info!(job = %job.id, replica = %id, "stopping a replica");
            self.cancel(id)?;
        }
        for _ in 0..decision.create {
            let replica = self.store.submit_replica(wanted.clone(), &job.owner, &job.id, now)?;
            info!(job = %job.id, replica = %replica.id, "replica queued");
            self.changed();
        }
        if decision.ended {
            let why = decision.give_up.then(|| {
                let last = failed.iter().max_by_key(|r| r.seq).map(|r| r.message.as_str()).unwrap_or("");
                format!("its replicas keep failing ({} did): {last}", failed.len())
            });
            if let Some(why) = &why {
                warn!(job = %job.id, reason = %why, "serve job failed");
            }
            self.transition(&job.id, |j| j.end_serving(why.as_deref(), now))?;
        }
        Ok(())
    }
}

impl Coordinator {
    /// Serve job `job`'s replicas, newest first, as `gantry job` shows them.
    pub fn replicas(&self, job: &JobRecord) -> Result<Vec<v1::Replica>> {
        Ok(self.replicas_among(job, &self.store.jobs()?))
    }

    /// [`Coordinator::replicas`], from `jobs` already read.
    fn replicas_among(&self, job: &JobRecord, jobs: &[JobRecord]) -> Vec<v1::Replica> {
        let routed = self.serving.model(&job.spec.name).filter(|m| m.job_id == job.id);
        let mut out: Vec<(u64, v1::Replica)> = jobs
            .iter()
            .filter(|r| r.replica_of.as_deref() == Some(job.id.as_str()))
            .map(|r| {
                let url = routed
                    .as_ref()
                    .and_then(|m| m.replicas.iter().find(|x| x.job_id == r.id))
                    .map(|x| format!("http://{}", x.addr))
                    .unwrap_or_default();
                let state = match (r.state, r.cancel_requested || r.is_stopping(), url.is_empty()) {
                    (JobState::Running, true, _) => "stopping",
                    (JobState::Running, false, false) => "ready",
                    (JobState::Running, false, true) => "starting",
                    (state, _, _) => crate::service::state_name(state),
                };
                let node = r.current_attempt().and_then(|a| a.placement.first()).map(|p| p.node.clone());
                let from = r.spec.serve.as_ref().map(|s| s.from.clone()).unwrap_or_default();
                let replica = v1::Replica {
                    job_id: r.id.clone(),
                    state: state.into(),
                    node: node.unwrap_or_default(),
                    url,
                    from,
                };
                (r.seq, replica)
            })
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.0));
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// Every running serve job: the model it serves and its replicas (live ones only).
    pub fn endpoints(&self) -> Result<Vec<v1::Endpoint>> {
        let mut out = Vec::new();
        let jobs = self.store.jobs()?;
        for job in jobs.iter().filter(|j| j.is_serving() && !j.state.is_terminal()) {
            let replicas = self.replicas_among(job, &jobs);
            let live = ["queued", "starting", "ready", "stopping"];
            out.push(v1::Endpoint {
                model: job.spec.name.clone(),
                job_id: job.id.clone(),
                from: job.spec.serve.as_ref().map(|s| s.from.clone()).unwrap_or_default(),
                replicas_wanted: job.spec.replicas,
                replicas: replicas.into_iter().filter(|r| live.contains(&r.state.as_str())).collect(),
            });
        }
        Ok(out)
    }
}

/// An IPv6 address in a `host:port` needs brackets.
fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() }
}
