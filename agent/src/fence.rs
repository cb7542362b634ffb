//! One running copy of a job: an agent that no coordinator has heard for a while stops its jobs
//! itself, before the coordinator declares it lost and places them elsewhere.
//!
//! "Heard" means a heartbeat the coordinator acknowledged, counted from when that heartbeat was
//! sent: the coordinator's own clock for this agent started no earlier, so an agent that stops
//! its jobs `after` that has done so `grace + margin` before the coordinator's timeout, whatever
//! the network did in between (a link cut both ways, or one way only, or a frozen coordinator).
//! Pure: times come in as arguments.

use std::collections::VecDeque;
use std::time::Duration;

use gantry_proto::v1;
use tokio::time::Instant;

/// What the coordinator asked for when the agent registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Stop jobs once no heartbeat sent in this long has been acknowledged.
    pub after: Duration,
    /// Between SIGTERM and SIGKILL when stopping them.
    pub grace: Duration,
}

impl Policy {
    /// None from a coordinator that predates fencing (it sends 0).
    pub fn from_reply(reply: &v1::RegisterResponse) -> Option<Policy> {
        (reply.fence_after_ms > 0).then(|| Policy {
            after: Duration::from_millis(reply.fence_after_ms),
            grace: Duration::from_millis(reply.fence_grace_ms),
        })
    }
}

/// Heartbeats not yet acknowledged, kept at most this many: older ones no longer matter.
const UNACKED: usize = 64;

#[derive(Debug, Default)]
pub struct Heard {
    policy: Option<Policy>,
    next_seq: u64,
    /// (seq, when sent), oldest first.
    unacked: VecDeque<(u64, Instant)>,
    /// When the latest acknowledged heartbeat was sent.
    heard_at: Option<Instant>,
    /// Already fenced since last heard: do it once.
    fenced: bool,
}

impl Heard {
    pub fn set_policy(&mut self, policy: Option<Policy>) {
        self.policy = policy;
    }

    /// A heartbeat is sent now: its number.
    pub fn sent(&mut self, now: Instant) -> u64 {
        self.next_seq += 1;
        if self.unacked.len() == UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back((self.next_seq, now));
        self.next_seq
    }

    /// The coordinator recorded heartbeat `seq` (and so everything before it).
    pub fn acked(&mut self, seq: u64) {
        let Some(&(_, sent)) = self.unacked.iter().find(|(s, _)| *s == seq) else { return };
        self.unacked.retain(|(s, _)| *s > seq);
        if self.heard_at.is_none_or(|h| sent > h) {
            self.heard_at = Some(sent);
            self.fenced = false;
        }
    }

    /// Whether a session opened at `opened` has gone unacknowledged so long that its coordinator
    /// is likely frozen or cut off (a stream to a stopped process stays open, silent): time to
    /// try the next coordinator, well before the jobs must stop.
    pub fn session_stale(&self, opened: Instant, now: Instant, interval: Duration) -> bool {
        let Some(policy) = self.policy else { return false };
        let since = self.heard_at.map_or(opened, |h| h.max(opened));
        now.duration_since(since) > (policy.after / 2).max(interval * 3)
    }

    /// Whether to stop the jobs now, and with what grace: once per time cut off.
    pub fn fence_now(&mut self, now: Instant) -> Option<Duration> {
        let (policy, heard_at) = (self.policy?, self.heard_at?);
        if self.fenced || now.duration_since(heard_at) < policy.after {
            return None;
        }
        self.fenced = true;
        Some(policy.grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { after: Duration::from_secs(7), grace: Duration::from_secs(2) };

    fn heard() -> (Heard, Instant) {
        let mut h = Heard::default();
        h.set_policy(Some(POLICY));
        (h, Instant::now())
    }

    #[test]
    fn an_agent_never_heard_or_told_no_policy_never_fences() {
        let (mut h, t0) = heard();
        h.sent(t0);
        assert_eq!(h.fence_now(t0 + Duration::from_secs(60)), None, "no heartbeat acknowledged yet: no job either");
        let mut old = Heard::default();
        let seq = old.sent(t0);
        old.acked(seq);
        assert_eq!(old.fence_now(t0 + Duration::from_secs(60)), None, "an older coordinator sent no policy");
    }

    #[test]
    fn it_fences_once_after_the_last_acknowledged_heartbeat_was_sent() {
        let (mut h, t0) = heard();
        let first = h.sent(t0);
        let second = h.sent(t0 + Duration::from_secs(1));
        h.acked(first);
        // Sent at t0+1 s but never acknowledged: it does not count.
        let _ = second;
        assert_eq!(h.fence_now(t0 + Duration::from_millis(6_999)), None);
        assert_eq!(h.fence_now(t0 + Duration::from_secs(7)), Some(POLICY.grace));
        assert_eq!(h.fence_now(t0 + Duration::from_secs(8)), None, "once");
    }

    #[test]
    fn a_session_unacknowledged_for_half_the_fence_time_is_given_up_on() {
        let (mut h, t0) = heard();
        let second = Duration::from_secs(1);
        let seq = h.sent(t0);
        h.acked(seq);
        assert!(!h.session_stale(t0, t0 + Duration::from_millis(3_500), second));
        assert!(h.session_stale(t0, t0 + Duration::from_millis(3_600), second), "half of 7 s");
        // A session opened later counts from its opening, not from a cut long ago.
        let reopened = t0 + Duration::from_secs(60);
        assert!(!h.session_stale(reopened, reopened + Duration::from_secs(1), second));
    }

    #[test]
    fn time_counts_from_the_send_not_from_the_late_ack() {
        let (mut h, t0) = heard();
        let seq = h.sent(t0);
        // The ack arrives 5 s late (a slow path one way): the coordinator's clock for this
        // agent started at or after t0, so t0 is what counts.
        h.acked(seq);
        assert_eq!(h.fence_now(t0 + Duration::from_secs(7)), Some(POLICY.grace));
    }

    #[test]
    fn an_ack_after_a_fence_rearms_it_and_an_old_ack_does_not_move_time_back() {
        let (mut h, t0) = heard();
        let a = h.sent(t0);
        let b = h.sent(t0 + Duration::from_secs(1));
        h.acked(b);
        h.acked(a); // late and older: ignored
        assert_eq!(h.fence_now(t0 + Duration::from_millis(7_500)), None, "heard at t0+1 s");
        assert!(h.fence_now(t0 + Duration::from_secs(8)).is_some());
        let c = h.sent(t0 + Duration::from_secs(9));
        h.acked(c);
        assert_eq!(h.fence_now(t0 + Duration::from_secs(10)), None);
        assert!(h.fence_now(t0 + Duration::from_secs(16)).is_some(), "fences again when cut off again");
    }
}
