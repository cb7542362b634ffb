//! Read views for people: the CLI, `gantry top`, the web page and `/metrics` all read these.

use std::collections::HashMap;

use gantry_core::scheduler;
use gantry_proto::v1;
use tracing::info;

use super::Coordinator;
use crate::error::{Error, Result};
use crate::records::{JobRecord, JobState};

/// What running jobs hold on one node.
#[derive(Debug, Clone, Default)]
pub struct NodeUsage {
    pub jobs: Vec<String>,
    pub cpus_used: f64,
    pub memory_used_bytes: u64,
}

/// One agent as the coordinator sees it now.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub inventory: v1::Inventory,
    /// Wall-clock milliseconds of its last heartbeat (or registration).
    pub last_seen_ms: i64,
}

impl Coordinator {
    /// Every GPU of the fleet with its node and the running job on it (if any).
    pub fn gpus(&self) -> Result<Vec<(String, v1::GpuInfo, Option<String>)>> {
        let mut on_gpu = HashMap::new();
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            for rank in job.current_attempt().map(|a| a.placement.as_slice()).unwrap_or(&[]) {
                for uuid in &rank.gpu_uuids {
                    on_gpu.insert(uuid.clone(), job.id.clone());
                }
            }
        }
        Ok(self
            .nodes()
            .into_iter()
            .flat_map(|node| {
                let on_gpu = &on_gpu;
                let name = node.name;
                node.inventory.gpus.into_iter().map(move |g| {
                    let job = on_gpu.get(&g.uuid).cloned();
                    (name.clone(), g, job)
                })
            })
            .collect())
    }

    /// Per node: its running jobs and the CPUs and memory they hold.
    pub fn usage_by_node(&self) -> Result<HashMap<String, NodeUsage>> {
        let mut usage: HashMap<String, NodeUsage> = HashMap::new();
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            for rank in job.current_attempt().map(|a| a.placement.as_slice()).unwrap_or(&[]) {
                let entry = usage.entry(rank.node.clone()).or_default();
                entry.jobs.push(job.id.clone());
                entry.cpus_used += job.spec.resources.cpus;
                entry.memory_used_bytes += job.spec.memory_bytes();
            }
        }
        Ok(usage)
    }

    /// Jobs placed since this coordinator started.
    pub fn placements(&self) -> u64 {
        self.placements.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn waiting(&self, id: &str) -> Option<scheduler::Waiting> {
        self.waiting.lock().expect("waiting lock poisoned").get(id).cloned()
    }

    /// Every job with its place in the queue, in the order people read them (the CLI, the web
    /// page and `gantry top` all show this order): see [`display_order`].
    pub fn listed_jobs(&self) -> Result<Vec<(JobRecord, Option<scheduler::Waiting>)>> {
        let jobs = self.store.jobs()?;
        let mut jobs: Vec<_> = {
            let waiting = self.waiting.lock().expect("waiting lock poisoned");
            jobs.into_iter()
                .map(|j| {
                    let w = waiting.get(&j.id).cloned();
                    (j, w)
                })
                .collect()
        };
        display_order(&mut jobs);
        Ok(jobs)
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        let clock = self.settings.clock;
        self.fleet()
            .agents
            .iter()
            .map(|(name, a)| NodeView {
                name: name.clone(),
                connected: a.session.is_some(),
                inventory: a.inventory.clone(),
                last_seen_ms: clock.ms_at(a.last_seen),
            })
            .collect()
    }

    pub fn drained(&self, name: &str) -> bool {
        self.fleet().agents.get(name).is_some_and(|a| a.drained)
    }

    /// Drains (or undrains) a node: it keeps its running jobs and receives nothing new.
    pub fn drain(&self, name: &str, drained: bool) -> Result<()> {
        if !self.store.set_drained(name, drained)? {
            return Err(Error::NodeNotFound(name.to_string()));
        }
        if let Some(agent) = self.fleet().agents.get_mut(name) {
            agent.drained = drained;
        }
        info!(node = %name, drained, "node drain changed");
        self.changed();
        Ok(())
    }

    /// Removes a node: its agent's certificates stop working at once (its session ends within
    /// a second), its record goes, and the placement loop requeues its running jobs as from a
    /// lost node. An agent that still holds a valid join token may join again, as a new node;
    /// revoking the token keeps it out. Returns how many certificates ended.
    pub fn remove_node(&self, name: &str) -> Result<usize> {
        let certificates = self.tokens.forget_node(name)?;
        let recorded = self.store.delete_agent(name)?;
        let connected = self.fleet().agents.remove(name).is_some();
        if !recorded && !connected && certificates == 0 {
            return Err(Error::NodeNotFound(name.to_string()));
        }
        info!(node = %name, certificates, "node removed");
        self.changed();
        Ok(certificates)
    }
}

/// The queue first, in the order it will run; then running jobs; then the rest; newest first
/// within the last two.
pub fn display_order(jobs: &mut [(JobRecord, Option<scheduler::Waiting>)]) {
    jobs.sort_by_key(|(j, w)| match j.state {
        JobState::Queued => (0, w.as_ref().map_or(i64::from(u32::MAX), |w| i64::from(w.position)), j.seq),
        JobState::Running => (1, -(j.seq as i64), j.seq),
        _ => (2, -(j.seq as i64), j.seq),
    });
}

#[cfg(test)]
mod tests {
    use gantry_core::JobSpec;

    use super::*;

    #[test]
    fn jobs_list_queue_in_run_order_then_running_then_the_rest_newest_first() {
        let spec = JobSpec::from_yaml("name: j\ncommand: [\"true\"]\n").unwrap();
        let job = |seq, state| JobRecord { state, ..crate::store::new_job(seq, spec.clone(), "alice", 0) };
        let waiting = |position| {
            Some(scheduler::Waiting {
                job_id: String::new(),
                reason: scheduler::WaitReason::WaitingForStopping,
                position,
                estimated_start_ms: None,
            })
        };
        let mut jobs = vec![
            (job(1, JobState::Succeeded), None),
            (job(2, JobState::Running), None),
            (job(3, JobState::Queued), waiting(2)),
            (job(4, JobState::Failed), None),
            (job(5, JobState::Queued), waiting(1)),
            (job(6, JobState::Running), None),
        ];
        display_order(&mut jobs);
        let order: Vec<u64> = jobs.iter().map(|(j, _)| j.seq).collect();
        assert_eq!(order, [5, 3, 6, 2, 4, 1]);
    }
}
