//! What a serve job's replicas should become, from what they are: a pure function, so every
//! step of a rolling update is a test. Updates surge by one (at most `wanted + 1` replicas
//! live) and keep every ready replica until a new one is ready to take its place, so the
//! endpoint never has fewer ready replicas than it had.

/// One live (not ended) replica, as the rollout sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    /// It runs the serve job's present spec (an older one is replaced).
    pub current: bool,
    /// It answers requests.
    pub ready: bool,
    /// Its stop has been asked for: it counts as live until it ends, but serves nothing.
    pub stopping: bool,
}

/// What the serve job stands at.
#[derive(Debug, Clone)]
pub struct State<'a> {
    pub wanted: usize,
    /// The serve job was cancelled: every replica stops.
    pub cancelled: bool,
    pub live: &'a [Replica],
    /// Replicas of the present spec that ended failed (their own retries exhausted).
    pub failed_current: usize,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// New replicas of the present spec to queue.
    pub create: usize,
    /// Replicas to stop.
    pub stop: Vec<String>,
    /// Nothing is left running and nothing will be: the serve job ends.
    pub ended: bool,
    /// Its replicas keep failing: no more are made, and the serve job fails once none runs.
    pub give_up: bool,
}

/// Replicas of one spec that may end failed before the serve job stops making more: each has
/// retried on its own (`max_restarts`, with backoff) first, so this many is a broken model.
pub const FAILED_REPLICAS_LIMIT: usize = 3;

pub fn decide(s: &State) -> Decision {
    let mut d = Decision::default();
    if s.cancelled {
        d.stop = s.live.iter().filter(|r| !r.stopping).map(|r| r.id.clone()).collect();
        d.ended = s.live.is_empty();
        return d;
    }
    d.give_up = s.failed_current >= FAILED_REPLICAS_LIMIT;
    let active: Vec<&Replica> = s.live.iter().filter(|r| !r.stopping).collect();
    let mut current: Vec<&Replica> = active.iter().copied().filter(|r| r.current).collect();
    // Not-ready ones first: they are the ones to give up when there are too many.
    let mut old: Vec<&Replica> = active.iter().copied().filter(|r| !r.current).collect();
    old.sort_by_key(|r| r.ready);
    current.sort_by_key(|r| r.ready);
    let ready_current = current.iter().filter(|r| r.ready).count();

    if !d.give_up && current.len() < s.wanted {
        let missing = s.wanted - current.len();
        d.create = if old.is_empty() {
            missing
        } else {
            // Rolling: one more than wanted at most, counting replicas still stopping.
            (s.wanted + 1).saturating_sub(s.live.len()).min(missing)
        };
    }
    // An old replica goes once the ready new ones and the other old ones still make `wanted`.
    let mut old_left = old.len();
    for r in &old {
        if ready_current + old_left > s.wanted {
            d.stop.push(r.id.clone());
            old_left -= 1;
        }
    }
    if current.len() > s.wanted {
        d.stop.extend(current.iter().take(current.len() - s.wanted).map(|r| r.id.clone()));
    }
    d.ended = d.give_up && s.live.is_empty();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, current: bool, ready: bool) -> Replica {
        Replica { id: id.into(), current, ready, stopping: false }
    }

    fn decide_for(wanted: usize, live: &[Replica]) -> Decision {
        decide(&State { wanted, cancelled: false, live, failed_current: 0 })
    }

    #[test]
    fn a_new_serve_job_queues_all_its_replicas_at_once() {
        assert_eq!(decide_for(3, &[]), Decision { create: 3, ..Default::default() });
        assert_eq!(decide_for(3, &[r("a", true, false)]).create, 2);
        assert_eq!(decide_for(2, &[r("a", true, true), r("b", true, false)]), Decision::default());
    }

    #[test]
    fn a_rolling_update_never_has_fewer_ready_replicas_nor_more_than_one_extra() {
        // Simulate: each step applies the decision; new replicas become ready a step later,
        // stopped ones end a step later.
        let wanted = 2;
        let mut live = vec![r("o1", false, true), r("o2", false, true)];
        let mut next = 0;
        for _ in 0..20 {
            let d = decide_for(wanted, &live);
            let ready = |l: &[Replica]| l.iter().filter(|x| x.ready && !x.stopping).count();
            let before = ready(&live);
            // Ended: what was stopping. Ready: what was created.
            live.retain(|x| !x.stopping);
            for x in live.iter_mut() {
                x.ready |= x.current;
                if d.stop.contains(&x.id) {
                    x.stopping = true;
                }
            }
            for _ in 0..d.create {
                next += 1;
                live.push(r(&format!("n{next}"), true, false));
            }
            assert!(live.len() <= wanted + 1, "{live:?}");
            assert!(ready(&live) >= before.min(wanted), "lost a ready replica: {live:?}");
            if live.iter().all(|x| x.current && x.ready && !x.stopping) && live.len() == wanted {
                return;
            }
        }
        panic!("the rollout did not finish: {live:?}");
    }

    #[test]
    fn an_update_whose_new_replica_never_gets_ready_keeps_the_old_ones() {
        let live = [r("o1", false, true), r("o2", false, true), r("n1", true, false)];
        assert_eq!(decide_for(2, &live), Decision::default());
    }

    #[test]
    fn old_replicas_that_do_not_answer_go_first() {
        let live = [r("o1", false, true), r("o2", false, false), r("n1", true, true)];
        assert_eq!(decide_for(2, &live).stop, vec!["o2".to_string()]);
    }

    #[test]
    fn fewer_replicas_wanted_stops_the_extra_ones_not_ready_first() {
        let live = [r("a", true, true), r("b", true, false), r("c", true, true)];
        assert_eq!(decide_for(2, &live).stop, vec!["b".to_string()]);
    }

    #[test]
    fn a_cancelled_serve_job_stops_every_replica_and_ends_when_none_is_left() {
        let mut live = vec![r("a", true, true), r("b", false, true)];
        live[1].stopping = true;
        let d = decide(&State { wanted: 2, cancelled: true, live: &live, failed_current: 0 });
        assert_eq!((d.stop, d.ended, d.create), (vec!["a".to_string()], false, 0));
        assert!(decide(&State { wanted: 2, cancelled: true, live: &[], failed_current: 0 }).ended);
    }

    #[test]
    fn replicas_that_keep_failing_are_not_made_again() {
        let d = decide(&State { wanted: 2, cancelled: false, live: &[], failed_current: FAILED_REPLICAS_LIMIT });
        assert_eq!((d.create, d.give_up, d.ended), (0, true, true));
        let d = decide(&State { wanted: 2, cancelled: false, live: &[], failed_current: 1 });
        assert_eq!(d.create, 2);
    }
}
