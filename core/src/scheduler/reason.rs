//! Why a job waits, as data. The scheduler records reasons; they become words only where people
//! read them (the CLI, the web page, `/metrics`), all through [`WaitReason`]'s `Display`, so every
//! edge says the same thing. [`WaitReason::code`] is the stable name for scripts and labels.

use std::fmt;

use crate::spec::Resources;

/// Why a queued job was not placed in the last pass.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitReason {
    /// Its queue's running jobs (and the jobs ahead of it with room held) use the queue's GPU
    /// quota.
    Quota { queue: String, in_use: u32, quota: u32, held: u32 },
    /// It cannot fit the fleet as it stands, however long it waits.
    CannotFit { needs: Resources, why: Unfit },
    /// It fits the fleet, but not now.
    NoRoom { needs: Resources, short: Short, reserved_ahead: bool, held_for_higher: bool, start: Start },
    /// Lower-priority jobs are being stopped to make room for it.
    Preempting { victims: Vec<String> },
    /// Jobs already stopping (preempted or cancelled) free the room it needs.
    WaitingForStopping,
    /// Its last attempt failed: it waits `retry.backoff` before the next (the coordinator holds
    /// it out of the pass until then).
    Backoff { in_ms: u64 },
}

/// Why a job can never fit the fleet as it stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Unfit {
    /// No agent is connected and taking new work.
    NoNodes,
    Cpus {
        want: f64,
        most: f64,
    },
    Memory {
        gb: f64,
    },
    /// Fewer nodes are connected than the gang has ranks.
    Nodes {
        connected: usize,
    },
    /// No node has that many matching GPUs.
    GpusPerNode {
        most: u32,
    },
    /// Too few nodes have that many matching GPUs for the gang.
    GpuNodes {
        enough: usize,
    },
}

/// What is missing right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Short {
    /// Its GPUs: the most matching GPUs free on any one node.
    Gpus {
        largest_free: usize,
    },
    /// A gang: not enough nodes have room at once.
    Nodes,
    CpusOrMemory,
}

/// When a job that waits for room may start.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Not worked out: an earlier job holds the backfill reservation.
    NotEstimated,
    /// It holds the reservation: room frees up in this long (from the pass's `now`).
    Reserved { in_ms: u64 },
    /// It would hold the reservation, but running jobs have no `max_duration` to go by.
    Unknown,
}

/// The kind of a [`WaitReason`], as scripts and Prometheus labels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WaitCode {
    Quota,
    CannotFit,
    NoRoom,
    Reserved,
    HeldForHigher,
    Preempting,
    WaitingForStopping,
    Backoff,
}

impl WaitCode {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitCode::Quota => "quota",
            WaitCode::CannotFit => "cannot_fit",
            WaitCode::NoRoom => "no_room",
            WaitCode::Reserved => "reserved",
            WaitCode::HeldForHigher => "held_for_higher",
            WaitCode::Preempting => "preempting",
            WaitCode::WaitingForStopping => "waiting_for_stopping",
            WaitCode::Backoff => "backoff",
        }
    }
}

impl WaitReason {
    /// The most specific kind: a job with the reservation is `reserved`, one whose usable room is
    /// held for a higher-priority job is `held_for_higher`.
    pub fn code(&self) -> WaitCode {
        match self {
            WaitReason::Quota { .. } => WaitCode::Quota,
            WaitReason::CannotFit { .. } => WaitCode::CannotFit,
            WaitReason::NoRoom { start: Start::Reserved { .. }, .. } => WaitCode::Reserved,
            WaitReason::NoRoom { held_for_higher: true, .. } => WaitCode::HeldForHigher,
            WaitReason::NoRoom { .. } => WaitCode::NoRoom,
            WaitReason::Preempting { .. } => WaitCode::Preempting,
            WaitReason::WaitingForStopping => WaitCode::WaitingForStopping,
            WaitReason::Backoff { .. } => WaitCode::Backoff,
        }
    }

    /// Whether the job waits for something other than room on the fleet as the pass left it: a
    /// quota, room held for it or for another job, or jobs that are stopping.
    pub fn waits_by_policy(&self) -> bool {
        match self {
            WaitReason::Quota { .. }
            | WaitReason::Preempting { .. }
            | WaitReason::WaitingForStopping
            | WaitReason::Backoff { .. } => true,
            WaitReason::NoRoom { reserved_ahead, held_for_higher, start, .. } => {
                *reserved_ahead || *held_for_higher || matches!(start, Start::Reserved { .. })
            }
            WaitReason::CannotFit { .. } => false,
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::Quota { queue, in_use, quota, held } => {
                write!(f, "queue {queue} is at its GPU quota ({in_use} of {quota} in use")?;
                if *held > 0 {
                    write!(f, ", {held} held for waiting jobs ahead of it")?;
                }
                write!(f, ")")
            }
            WaitReason::CannotFit { needs, why } => write!(f, "needs {}; {why}", describe(needs)),
            WaitReason::NoRoom { needs, short, reserved_ahead, held_for_higher, start } => {
                write!(f, "needs {}; ", describe(needs))?;
                match short {
                    Short::Gpus { largest_free } => write!(f, "the largest free block is {largest_free}")?,
                    Short::Nodes => write!(f, "not enough nodes have room at once")?,
                    Short::CpusOrMemory => write!(f, "waiting for CPUs or memory to free up")?,
                }
                if *reserved_ahead {
                    write!(f, "; nodes are reserved for a job ahead of it")?;
                }
                if *held_for_higher {
                    write!(f, "; room it could use is held for a higher-priority job")?;
                }
                match start {
                    Start::NotEstimated => Ok(()),
                    Start::Reserved { in_ms } => write!(f, "; reserved, estimated start in {}", in_time(*in_ms)),
                    Start::Unknown => write!(f, "; no start estimate (running jobs have no max_duration)"),
                }
            }
            WaitReason::Preempting { victims } => {
                write!(f, "preempting lower-priority job(s) {}", victims.join(", "))
            }
            WaitReason::WaitingForStopping => write!(f, "waiting for stopping jobs to free their resources"),
            WaitReason::Backoff { in_ms } => {
                write!(f, "its last attempt failed; retrying in {} (retry.backoff)", in_time(*in_ms))
            }
        }
    }
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::NoNodes => write!(f, "no agent is connected and taking new work (disconnected or drained)"),
            Unfit::Cpus { want, most } => write!(f, "no node has {want} CPUs (the most is {most})"),
            Unfit::Memory { gb } => write!(f, "no node has {gb} GB of memory"),
            Unfit::Nodes { connected } => write!(f, "only {connected} nodes are connected"),
            Unfit::GpusPerNode { most } => {
                write!(f, "no node has that many matching GPUs (the most on one node is {most})")
            }
            Unfit::GpuNodes { enough } => write!(f, "only {enough} nodes have that many matching GPUs"),
        }
    }
}

fn in_time(ms: u64) -> String {
    let secs = ms.div_ceil(1000);
    if secs < 60 { format!("{secs}s") } else { crate::spec::format_duration(secs.div_ceil(60) * 60) }
}

/// "8 GPUs of model H100, 4 CPUs, 32 GB memory on one node"
pub fn describe(want: &Resources) -> String {
    let mut parts = Vec::new();
    if want.gpus > 0 {
        let mut g = format!("{} GPU{}", want.gpus, if want.gpus == 1 { "" } else { "s" });
        if let Some(m) = &want.gpu_model {
            g += &format!(" of model {m}");
        }
        if let Some(gb) = want.gpu_memory_gb {
            g += &format!(" with at least {gb} GB");
        }
        parts.push(g);
    }
    parts.push(format!("{} CPUs", want.cpus));
    parts.push(format!("{} GB memory", want.memory_gb));
    let each = if want.nodes > 1 { format!(" on each of {} nodes", want.nodes) } else { " on one node".into() };
    format!("{}{each}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(gpus: u32) -> Resources {
        Resources { gpus, ..Resources::default() }
    }

    #[test]
    fn every_reason_has_words_and_a_code() {
        let cases = [
            (WaitReason::Quota { queue: "a".into(), in_use: 3, quota: 3, held: 2 }, "quota", "(3 of 3 in use, 2 held"),
            (
                WaitReason::CannotFit { needs: needs(9), why: Unfit::GpusPerNode { most: 8 } },
                "cannot_fit",
                "the most on one node is 8",
            ),
            (
                WaitReason::NoRoom {
                    needs: needs(4),
                    short: Short::Gpus { largest_free: 2 },
                    reserved_ahead: false,
                    held_for_higher: false,
                    start: Start::Reserved { in_ms: 3_600_000 },
                },
                "reserved",
                "the largest free block is 2; reserved, estimated start in 1h",
            ),
            (
                WaitReason::NoRoom {
                    needs: needs(1),
                    short: Short::CpusOrMemory,
                    reserved_ahead: true,
                    held_for_higher: true,
                    start: Start::NotEstimated,
                },
                "held_for_higher",
                "reserved for a job ahead of it; room it could use is held",
            ),
            (
                WaitReason::NoRoom {
                    needs: needs(0),
                    short: Short::Nodes,
                    reserved_ahead: false,
                    held_for_higher: false,
                    start: Start::Unknown,
                },
                "no_room",
                "not enough nodes have room at once; no start estimate",
            ),
            (WaitReason::Preempting { victims: vec!["4".into(), "7".into()] }, "preempting", "job(s) 4, 7"),
            (WaitReason::WaitingForStopping, "waiting_for_stopping", "stopping jobs"),
            (WaitReason::Backoff { in_ms: 20_000 }, "backoff", "failed; retrying in 20s"),
        ];
        for (reason, code, words) in cases {
            assert_eq!(reason.code().as_str(), code);
            assert!(reason.to_string().contains(words), "{reason}");
        }
    }
}
