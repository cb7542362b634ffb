//! Agents' sessions: registration, the long-lived stream and its heartbeats, reconciling what an
//! agent holds against what the store expects, and reaping agents that fell silent.

use std::collections::BTreeSet;

use gantry_proto::v1;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Coordinator;
use crate::error::{Error, Result};
use crate::fleet::{AgentConn, Session};
use crate::lifecycle::{RankEnd, ReportAction};
use crate::records::{AgentRecord, JobState, StopReason};
use crate::stale::StaleKind;

impl Coordinator {
    pub fn register_agent(&self, name: &str, inventory: v1::Inventory, addr: String) -> Result<()> {
        let bytes = prost::Message::encode_to_vec(&inventory);
        let drained = self.fleet().agents.get(name).is_some_and(|a| a.drained);
        let record = AgentRecord { name: name.to_string(), inventory: bytes, registered_at_ms: self.now_ms(), drained };
        self.store.put_agent(&record)?;
        let now = self.settings.clock.now();
        let mut fleet = self.fleet();
        let entry = fleet.agents.entry(name.to_string()).or_insert_with(|| AgentConn {
            inventory: inventory.clone(),
            addr: addr.clone(),
            last_seen: now,
            session: None,
            drained,
        });
        entry.inventory = inventory;
        entry.addr = addr;
        entry.last_seen = now;
        info!(agent = %name, gpus = entry.inventory.gpus.len(), "agent registered");
        Ok(())
    }

    /// Opens an agent's session. The first heartbeat lists every job the agent holds: reconcile
    /// it against what the store expects on that node before anything new is sent there.
    pub fn attach_session(
        &self,
        name: &str,
        first: v1::Heartbeat,
        tx: mpsc::Sender<v1::CoordinatorMessage>,
    ) -> Result<u64> {
        if !self.fleet().agents.contains_key(name) {
            return Err(Error::NotRegistered(name.to_string()));
        }
        let held: BTreeSet<(&str, u32, u32)> =
            first.jobs.iter().map(|r| (r.job_id.as_str(), r.attempt, r.rank)).collect();
        // Reconcile while the node is still unschedulable, so nothing placed on it now can be
        // mistaken for a job it lost.
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            for (rank, _) in job.ranks_on(|node| node == name) {
                if !held.contains(&(job.id.as_str(), job.attempt, rank)) {
                    warn!(job = %job.id, agent = %name, "agent no longer holds the job");
                    let why = format!("lost: agent {name} no longer had it");
                    self.end_rank(&job.id, job.attempt, rank, RankEnd::Lost { why })?;
                }
            }
        }
        let session = {
            let mut fleet = self.fleet();
            let id = fleet.next_session_id();
            let agent = fleet.agents.get_mut(name).expect("checked above");
            agent.session = Some(Session { id, tx: tx.clone() });
            agent.last_seen = self.settings.clock.now();
            if let Some(inv) = first.inventory.clone() {
                agent.inventory = inv;
            }
            id
        };
        let seq = first.seq;
        for report in first.jobs {
            self.job_report(name, report)?;
        }
        let _ = tx.try_send(ack(seq));
        info!(agent = %name, session, "agent session open");
        self.changed();
        Ok(session)
    }

    pub fn detach_session(&self, name: &str, session: u64) {
        let mut fleet = self.fleet();
        if let Some(agent) = fleet.agents.get_mut(name)
            && agent.session.as_ref().is_some_and(|s| s.id == session)
        {
            agent.session = None;
            info!(agent = %name, "agent session closed");
        }
    }

    pub fn heartbeat(&self, name: &str, hb: v1::Heartbeat) -> Result<()> {
        let unhealthy: Vec<(String, String)> = hb
            .inventory
            .as_ref()
            .map(|inv| {
                inv.gpus.iter().filter(|g| !g.healthy).map(|g| (g.uuid.clone(), g.health_reason.clone())).collect()
            })
            .unwrap_or_default();
        let session = {
            let now = self.settings.clock.now();
            let mut fleet = self.fleet();
            let agent = fleet.agents.get_mut(name);
            agent.and_then(|agent| {
                agent.last_seen = now;
                if let Some(inv) = hb.inventory {
                    agent.inventory = inv;
                }
                agent.session.as_ref().map(|s| s.tx.clone())
            })
        };
        if !unhealthy.is_empty() {
            self.stop_jobs_on_unhealthy_gpus(name, &unhealthy)?;
        }
        for m in hb.metrics {
            if !self.metrics.record(m) {
                self.stale.count(StaleKind::Metrics);
            }
        }
        // Every report, not only exits: a running attempt the coordinator moved on from is
        // stopped, and a stop the agent missed while away is sent again.
        for report in hb.jobs {
            self.job_report(name, report)?;
        }
        // Recorded: the agent may count itself heard until now (see `Settings::fencing`).
        if let Some(tx) = session {
            let _ = tx.try_send(ack(hb.seq));
        }
        Ok(())
    }

    /// What an agent says about one attempt. Idempotent: agents repeat exits until released.
    pub fn job_report(&self, name: &str, report: v1::JobReport) -> Result<()> {
        let job = match self.store.job(&report.job_id) {
            Ok(job) => job,
            Err(Error::JobNotFound(_)) => {
                self.release(name, &report.job_id, report.attempt);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let exited = report.phase == v1::job_report::Phase::Exited as i32;
        match job.on_report(name, report.attempt, report.rank, exited) {
            ReportAction::End => {
                let why = if report.message.is_empty() { describe_exit(&report) } else { report.message.clone() };
                // Stopped by its own agent, cut off: like a lost node, not the job's failure.
                let end = if report.fenced {
                    RankEnd::Lost { why }
                } else if report.node_fault {
                    RankEnd::NodeFault { why }
                } else {
                    RankEnd::Exited { code: report.exit_code.unwrap_or_else(|| -report.signal.unwrap_or(9)), why }
                };
                self.end_rank(&job.id, report.attempt, report.rank, end)?;
                self.release(name, &report.job_id, report.attempt);
            }
            ReportAction::Release => {
                if job.moved_on_from(report.attempt, Some(report.rank)).is_some() {
                    self.stale.count(StaleKind::Exit);
                }
                self.release(name, &report.job_id, report.attempt)
            }
            action @ (ReportAction::StopStale | ReportAction::RepeatStop) => {
                if action == ReportAction::StopStale {
                    self.stale.count(StaleKind::Running);
                    warn!(job = %job.id, attempt = report.attempt, agent = %name, "stopping a stale attempt");
                }
                if let Some(tx) = self.fleet().sender(name) {
                    let _ = tx.try_send(self.cancel_message(&job.id, report.attempt));
                }
            }
            ReportAction::Nothing => {
                if job.replica_of.is_some() {
                    let port = u16::try_from(report.serve_port).unwrap_or(0);
                    self.serving.report(&job.id, report.attempt, if exited { 0 } else { port });
                }
            }
        }
        Ok(())
    }

    fn release(&self, name: &str, job_id: &str, attempt: u32) {
        if let Some(tx) = self.fleet().sender(name) {
            let _ = tx.try_send(v1::CoordinatorMessage {
                msg: Some(v1::coordinator_message::Msg::Release(v1::Release { job_id: job_id.to_string(), attempt })),
            });
        }
    }

    /// A job on a GPU that turned unhealthy is stopped with its grace period (time to
    /// checkpoint) and requeued elsewhere; it does not count as a failed attempt.
    fn stop_jobs_on_unhealthy_gpus(&self, node: &str, unhealthy: &[(String, String)]) -> Result<()> {
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running && !j.is_stopping()) {
            let Some(attempt) = job.current_attempt() else { continue };
            let hit = attempt
                .placement
                .iter()
                .filter(|r| r.node == node)
                .flat_map(|r| r.gpu_uuids.iter())
                .find_map(|uuid| unhealthy.iter().find(|(u, _)| u == uuid));
            if let Some((uuid, why)) = hit {
                warn!(job = %job.id, gpu = %uuid, reason = %why, "GPU unhealthy: stopping its job to requeue it");
                let reason = StopReason::GpuUnhealthy { node: node.to_string(), gpu: uuid.clone(), why: why.clone() };
                self.requeue(&job.id, reason)?;
            }
        }
        Ok(())
    }

    /// Requeues work from agents that have been silent past the timeout, and closes their
    /// sessions: a cut-off network leaves the connection open, silent, with nobody to notice.
    /// (When the network returns, the agent sees its session end, and opens a new one.) Agents
    /// known from before a restart count from the restart, so they have the same time to come
    /// back.
    pub fn reap_lost_agents(&self) -> Result<()> {
        let timeout = self.settings.agent_timeout;
        let now = self.settings.clock.now();
        let (lost, known): (Vec<String>, Vec<String>) = {
            let mut fleet = self.fleet();
            let lost: Vec<String> = fleet
                .agents
                .iter()
                .filter(|(_, a)| now.duration_since(a.last_seen) > timeout)
                .map(|(n, _)| n.clone())
                .collect();
            for name in &lost {
                let agent = fleet.agents.get_mut(name).expect("listed above");
                if agent.session.take().is_some() {
                    let silent_s = now.duration_since(agent.last_seen).as_secs();
                    warn!(agent = %name, silent_s, "agent silent: closing its session");
                }
            }
            (lost, fleet.agents.keys().cloned().collect())
        };
        let grace_over = now.duration_since(self.started) > timeout;
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            let gone =
                job.ranks_on(|node| lost.iter().any(|l| l == node) || (grace_over && !known.iter().any(|k| k == node)));
            for (rank, node) in gone {
                warn!(job = %job.id, agent = %node, "agent lost; ending its rank");
                self.end_rank(&job.id, job.attempt, rank, RankEnd::Lost { why: format!("agent {node} lost") })?;
            }
        }
        Ok(())
    }
}

fn ack(seq: u64) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage { msg: Some(v1::coordinator_message::Msg::Ack(v1::HeartbeatAck { seq })) }
}

fn describe_exit(report: &v1::JobReport) -> String {
    match (report.exit_code, report.signal) {
        (Some(0), _) => "exited 0".into(),
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}
