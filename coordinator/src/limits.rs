//! What the coordinator takes from one caller, at most. Everything submitted is stored, shown and
//! sent on, so each input has a bound, and each refusal names its limit. (A spec's own fields are
//! bounded in `gantry_core::spec::limits`.)

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// A gRPC message to the users' service (a spec, a request): tonic refuses a larger one from its
/// length prefix, before reading it.
pub const USER_MESSAGE: usize = 4 << 20;
/// A message to the agents' service: a checkpoint chunk is 1 MiB, a log batch a few hundred KiB.
pub const AGENT_MESSAGE: usize = 16 << 20;
/// A job spec as stored.
pub const SPEC_BYTES: usize = 1 << 20;
/// One log line; an agent splits longer output.
pub const LOG_LINE: usize = 64 * 1024;
/// Files in one checkpoint, and a file's path.
pub const CHECKPOINT_FILES: usize = 100_000;
pub const CHECKPOINT_PATH: usize = 1024;

/// The limits an operator may change (`Settings::limits`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Submits per second one user may sustain, and how many may come at once.
    pub submits_per_second: f64,
    pub submit_burst: f64,
    /// Jobs one user may have queued.
    pub queued_per_user: usize,
    /// Bytes in one checkpoint.
    pub checkpoint_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { submits_per_second: 50.0, submit_burst: 200.0, queued_per_user: 10_000, checkpoint_bytes: 4 << 40 }
    }
}

pub fn spec_size(bytes: usize) -> Result<()> {
    if bytes > SPEC_BYTES {
        return Err(Error::LimitExceeded(format!("the job spec is {bytes} bytes; the limit is {SPEC_BYTES}")));
    }
    Ok(())
}

/// A node's name is a host name's: it is shown, used as a label and put in certificates.
pub const NODE_NAME: usize = 253;

pub fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NODE_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "node name `{}`: 1 to {NODE_NAME} letters, digits and - _ ., starting with a letter or digit",
        name.escape_debug()
    )))
}

/// The limits of an upload of files: a checkpoint, or a data set (`what` names which).
pub fn files(limits: &Limits, what: &str, files: usize, bytes: u64, longest_path: usize) -> Result<()> {
    if files > CHECKPOINT_FILES {
        return Err(Error::LimitExceeded(format!("a {what} of {files} files; the limit is {CHECKPOINT_FILES}")));
    }
    if longest_path > CHECKPOINT_PATH {
        return Err(Error::LimitExceeded(format!(
            "a {what} file path of {longest_path} bytes; the limit is {CHECKPOINT_PATH}"
        )));
    }
    if bytes > limits.checkpoint_bytes {
        return Err(Error::LimitExceeded(format!(
            "a {what} of {bytes} bytes; the limit is {}",
            limits.checkpoint_bytes
        )));
    }
    Ok(())
}

/// A data set version's file list is one record of the store (etcd takes at most 1.5 MiB).
pub const DATASET_LISTING: usize = 1 << 20;

/// `bytes`: about what the version's file list takes in the store.
pub fn dataset_listing(bytes: usize) -> Result<()> {
    if bytes > DATASET_LISTING {
        return Err(Error::LimitExceeded(format!(
            "a data set whose file list takes about {bytes} bytes; the limit is {DATASET_LISTING} (about 9,000 files): \
             push fewer, larger files"
        )));
    }
    Ok(())
}

pub fn log_lines<'a>(lines: impl IntoIterator<Item = &'a String>) -> Result<()> {
    match lines.into_iter().map(String::len).max() {
        Some(len) if len > LOG_LINE => {
            Err(Error::LimitExceeded(format!("a log line of {len} bytes; the limit is {LOG_LINE}")))
        }
        _ => Ok(()),
    }
}

/// A token bucket per user: `submit_burst` submits at once, refilled at `submits_per_second`.
#[derive(Default)]
pub struct SubmitRate {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl SubmitRate {
    /// Takes one submit from `user`'s bucket, or says why not.
    pub fn admit(&self, limits: &Limits, user: &str, now_ms: i64) -> Result<()> {
        let mut buckets = self.buckets.lock().expect("rate lock poisoned");
        let full = Bucket { tokens: limits.submit_burst, at_ms: now_ms };
        let bucket = buckets.entry(user.to_string()).or_insert(full);
        let elapsed = (now_ms - bucket.at_ms).max(0) as f64 / 1000.0;
        bucket.tokens = (bucket.tokens + elapsed * limits.submits_per_second).min(limits.submit_burst);
        bucket.at_ms = now_ms;
        if bucket.tokens < 1.0 {
            return Err(Error::LimitExceeded(format!(
                "{user} submits faster than {} jobs a second (bursts of {}): wait and retry",
                limits.submits_per_second, limits.submit_burst
            )));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

/// Queued jobs per user: counted afresh by every scheduling pass and raised by every submit in
/// between, so it is never below the truth (jobs only leave the queue between passes).
#[derive(Default)]
pub struct QueuedByUser {
    counts: Mutex<HashMap<String, usize>>,
}

impl QueuedByUser {
    pub fn recount<'a>(&self, queued_owners: impl IntoIterator<Item = &'a str>) {
        let mut counts = HashMap::new();
        for owner in queued_owners {
            *counts.entry(owner.to_string()).or_insert(0) += 1;
        }
        *self.counts.lock().expect("queued lock poisoned") = counts;
    }

    /// Counts one more queued job for `user`, unless that would pass the limit.
    pub fn admit(&self, limits: &Limits, user: &str) -> Result<()> {
        let mut counts = self.counts.lock().expect("queued lock poisoned");
        let count = counts.entry(user.to_string()).or_insert(0);
        if *count >= limits.queued_per_user {
            return Err(Error::LimitExceeded(format!(
                "{user} has {count} queued jobs, the most one user may have queued; wait for some to start"
            )));
        }
        *count += 1;
        Ok(())
    }

    /// A submit that was admitted but did not queue.
    pub fn release(&self, user: &str) {
        if let Some(count) = self.counts.lock().expect("queued lock poisoned").get_mut(user) {
            *count = count.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { submits_per_second: 2.0, submit_burst: 3.0, queued_per_user: 2, ..Limits::default() }
    }

    #[test]
    fn a_user_gets_a_burst_then_the_sustained_rate_and_others_are_not_slowed() {
        let rate = SubmitRate::default();
        for _ in 0..3 {
            rate.admit(&limits(), "alice", 0).unwrap();
        }
        let e = rate.admit(&limits(), "alice", 0).unwrap_err();
        assert_eq!(e.code(), crate::Code::TooMany);
        assert!(e.to_string().contains("faster than 2 jobs a second"), "{e}");
        rate.admit(&limits(), "bob", 0).unwrap();
        // Half a second refills one submit at 2 a second.
        rate.admit(&limits(), "alice", 500).unwrap();
        assert!(rate.admit(&limits(), "alice", 500).is_err());
    }

    #[test]
    fn queued_jobs_per_user_are_capped_and_recounted_by_each_pass() {
        let queued = QueuedByUser::default();
        queued.admit(&limits(), "alice").unwrap();
        queued.admit(&limits(), "alice").unwrap();
        let e = queued.admit(&limits(), "alice").unwrap_err();
        assert!(e.to_string().contains("alice has 2 queued jobs"), "{e}");
        queued.admit(&limits(), "bob").unwrap();
        // A pass finds one of alice's jobs started.
        queued.recount(["alice", "bob"]);
        queued.admit(&limits(), "alice").unwrap();
        queued.release("alice");
        queued.admit(&limits(), "alice").unwrap();
    }

    #[test]
    fn sizes_are_bounded_and_the_error_names_the_limit() {
        assert!(spec_size(SPEC_BYTES).is_ok());
        assert!(spec_size(SPEC_BYTES + 1).unwrap_err().to_string().contains("the limit is 1048576"));
        let l = Limits::default();
        let e = files(&l, "data set", CHECKPOINT_FILES + 1, 0, 1).unwrap_err().to_string();
        assert!(e.contains("a data set of 100001 files; the limit is 100000"), "{e}");
        assert!(files(&l, "checkpoint", 1, l.checkpoint_bytes + 1, 1).is_err());
        assert!(files(&l, "checkpoint", 1, 1, CHECKPOINT_PATH + 1).is_err());
        assert!(dataset_listing(DATASET_LISTING).is_ok());
        assert!(dataset_listing(DATASET_LISTING + 1).unwrap_err().to_string().contains("push fewer, larger files"));
        assert!(log_lines(&["x".repeat(LOG_LINE + 1)]).is_err());
        assert!(log_lines(&["ok".to_string()]).is_ok());
    }
}
