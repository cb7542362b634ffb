//! One test per rule of the job lifecycle, named for the rule.

use gantry_core::JobSpec;

use super::*;
use crate::records::{JobState, RankPlacement, StopReason};

fn job(max_restarts: u32) -> JobRecord {
    let spec = JobSpec::from_yaml(&format!("name: j\nmax_restarts: {max_restarts}\ncommand: [\"true\"]\n")).unwrap();
    crate::store::new_job(7, spec, "alice", 0)
}

fn placement(nodes: &[&str]) -> Vec<RankPlacement> {
    nodes
        .iter()
        .enumerate()
        .map(|(rank, n)| RankPlacement { rank: rank as u32, node: n.to_string(), gpu_uuids: vec![] })
        .collect()
}

/// A job running its next attempt on `nodes` (one rank each).
fn running(max_restarts: u32, nodes: &[&str]) -> JobRecord {
    let mut j = job(max_restarts);
    assert!(j.start_attempt(j.version, placement(nodes), 10).changed());
    j
}

fn exit(code: i32) -> RankEnd {
    RankEnd::Exited { code, why: if code == 0 { "exited 0".into() } else { format!("exit code {code}") } }
}

fn lost(node: &str) -> RankEnd {
    RankEnd::Lost { why: format!("agent {node} lost") }
}

// ---- start ----------------------------------------------------------------------------------

#[test]
fn an_attempt_starts_only_if_the_job_is_unchanged_since_the_plan() {
    let mut j = job(0);
    let planned_at = j.version;
    j.version += 1; // changed (by the store) after the plan was computed
    assert_eq!(j.start_attempt(planned_at, placement(&["a"]), 10), Transition::Unchanged);
    assert_eq!(j.state, JobState::Queued);
    assert!(j.start_attempt(j.version, placement(&["a"]), 10).changed());
    assert_eq!((j.state, j.attempt, j.attempts.len()), (JobState::Running, 1, 1));
}

#[test]
fn a_cancelled_or_running_job_is_not_started_again() {
    let mut j = running(0, &["a"]);
    assert_eq!(j.start_attempt(j.version, placement(&["b"]), 20), Transition::Unchanged);
    let mut j = job(0);
    j.cancel_requested = true;
    assert_eq!(j.start_attempt(j.version, placement(&["a"]), 20), Transition::Unchanged);
}

#[test]
fn a_queued_job_that_cannot_start_fails_with_why() {
    let mut j = job(3);
    assert!(j.fail_before_start("train.init_from: job 2 has no checkpoint", 5).changed());
    assert_eq!(
        (j.state, j.message.as_str(), j.ended_at_ms),
        (JobState::Failed, "train.init_from: job 2 has no checkpoint", Some(5))
    );
    let mut r = running(0, &["a"]);
    assert_eq!(r.fail_before_start("x", 5), Transition::Unchanged, "only a queued job fails before it starts");
}

// ---- cancel ---------------------------------------------------------------------------------

#[test]
fn cancelling_a_queued_job_ends_it_at_once() {
    let mut j = job(0);
    assert_eq!(j.cancel(50), Transition::Changed { stop_ranks: false });
    assert_eq!((j.state, j.ended_at_ms), (JobState::Cancelled, Some(50)));
    assert_eq!(j.message, "cancelled before it started");
}

#[test]
fn cancelling_a_running_job_stops_its_ranks_and_it_ends_cancelled_whatever_they_exit_with() {
    let mut j = running(5, &["a", "b"]);
    assert!(j.cancel(50).stops_ranks());
    assert_eq!((j.state, j.stopping.clone()), (JobState::Running, Some(StopReason::Cancelled)));
    j.on_rank_exit(1, 0, exit(0), 60);
    assert_eq!(j.state, JobState::Running, "ends only once every rank has");
    j.on_rank_exit(1, 1, exit(143), 61);
    assert_eq!((j.state, j.message.as_str(), j.ended_at_ms), (JobState::Cancelled, "cancelled", Some(61)));
}

#[test]
fn cancelling_twice_or_after_the_end_changes_nothing() {
    let mut j = running(0, &["a"]);
    assert!(j.cancel(1).changed());
    assert_eq!(j.cancel(2), Transition::Unchanged);
    let mut done = running(0, &["a"]);
    done.on_rank_exit(1, 0, exit(0), 3);
    assert_eq!(done.cancel(4), Transition::Unchanged);
    assert_eq!(done.state, JobState::Succeeded);
}

// ---- requeue: preemption and unhealthy GPUs ------------------------------------------------

#[test]
fn a_preempted_run_is_requeued_and_not_counted_as_an_attempt_even_if_it_exits_0() {
    let mut j = running(0, &["a"]);
    let reason = StopReason::Preempted { for_job: "9".into(), nodes: vec!["a".into()] };
    assert!(j.requeue_for(reason).stops_ranks());
    j.on_rank_exit(1, 0, exit(0), 20);
    assert_eq!((j.state, j.preemptions, j.user_attempt()), (JobState::Queued, 1, 0));
    assert_eq!(j.message, "preempted by job 9; requeued to resume from its latest checkpoint");
    assert_eq!(j.stopping, None, "the stop is over once the attempt has ended");
}

#[test]
fn a_job_on_an_unhealthy_gpu_is_requeued_naming_the_gpu_and_why() {
    let mut j = running(0, &["a"]);
    let reason = StopReason::GpuUnhealthy { node: "a".into(), gpu: "GPU-1".into(), why: "XID 79".into() };
    assert!(j.requeue_for(reason).changed());
    j.on_rank_exit(1, 0, exit(143), 20);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.message, "GPU GPU-1 unhealthy (XID 79); requeued to resume from its latest checkpoint");
}

#[test]
fn only_a_running_job_not_already_stopping_is_requeued() {
    let reason = || StopReason::Preempted { for_job: "9".into(), nodes: vec![] };
    assert_eq!(job(0).requeue_for(reason()), Transition::Unchanged);
    let mut cancelling = running(0, &["a"]);
    cancelling.cancel(1);
    assert_eq!(cancelling.requeue_for(reason()), Transition::Unchanged);
    let mut twice = running(0, &["a"]);
    assert!(twice.requeue_for(reason()).changed());
    assert_eq!(twice.requeue_for(reason()), Transition::Unchanged);
}

// ---- the end of an attempt ------------------------------------------------------------------

#[test]
fn every_rank_exiting_0_succeeds() {
    let mut j = running(0, &["a", "b"]);
    assert_eq!(j.on_rank_exit(1, 1, exit(0), 30), Transition::Changed { stop_ranks: false });
    assert_eq!(j.state, JobState::Running);
    j.on_rank_exit(1, 0, exit(0), 31);
    assert_eq!((j.state, j.ended_at_ms), (JobState::Succeeded, Some(31)));
    assert_eq!(j.current_attempt().unwrap().outcome, "succeeded");
}

#[test]
fn the_first_failing_rank_decides_the_outcome_and_stops_the_others() {
    let mut j = running(0, &["a", "b", "c"]);
    assert_eq!(j.on_rank_exit(1, 1, exit(3), 30), Transition::Changed { stop_ranks: true });
    assert_eq!(j.stopping, Some(StopReason::RankFailed { rank: 1, why: "exit code 3".into() }));
    assert_eq!(j.on_rank_exit(1, 0, exit(143), 31), Transition::Changed { stop_ranks: false });
    j.on_rank_exit(1, 2, exit(143), 32);
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.message, "exit code 3 (attempt 1 of 1)");
}

#[test]
fn a_gang_is_requeued_only_after_every_rank_of_the_attempt_has_ended() {
    let mut j = running(1, &["a", "b"]);
    j.on_rank_exit(1, 0, exit(1), 30);
    assert_eq!(j.state, JobState::Running, "rank 1 still runs");
    assert!(j.is_stopping());
    j.on_rank_exit(1, 1, exit(143), 31);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.message, "attempt 1 ended (exit code 1); retrying in 10s");
}

#[test]
fn failures_count_against_max_restarts_then_the_job_fails() {
    let mut j = running(1, &["a"]);
    j.on_rank_exit(1, 0, exit(2), 30);
    assert_eq!(j.state, JobState::Queued, "first failure: one restart left");
    assert!(j.start_attempt(j.version, placement(&["a"]), 40).changed());
    j.on_rank_exit(2, 0, exit(2), 50);
    assert_eq!((j.state, j.message.as_str()), (JobState::Failed, "exit code 2 (attempt 2 of 2)"));
}

fn with_retry(max_restarts: u32, retry: &str) -> JobRecord {
    let yaml = format!("name: j\nmax_restarts: {max_restarts}\ncommand: [\"true\"]\nretry: {retry}\n");
    crate::store::new_job(7, JobSpec::from_yaml(&yaml).unwrap(), "alice", 0)
}

#[test]
fn a_failed_attempt_is_retried_after_a_backoff_that_doubles() {
    let mut j = with_retry(5, "{backoff: 10s, max_backoff: 15s}");
    let mut waits = Vec::new();
    for attempt in 1..=3 {
        assert!(j.start_attempt(j.version, placement(&[&format!("n{attempt}")]), 1_000).changed());
        assert_eq!(j.retry_at_ms, None, "a start clears the wait");
        j.on_rank_exit(attempt, 0, exit(1), 2_000);
        assert_eq!(j.state, JobState::Queued);
        waits.push(j.retry_at_ms.unwrap() - 2_000);
    }
    assert_eq!(waits, [10_000, 15_000, 15_000], "10s, then doubled but at most 15s");
    assert_eq!(j.message, "attempt 3 ended (exit code 1); retrying in 15s");
}

#[test]
fn a_lost_node_or_a_preemption_is_placed_again_without_a_backoff() {
    let mut j = running(3, &["a"]);
    j.on_rank_exit(1, 0, lost("a"), 30);
    assert_eq!((j.state, j.retry_at_ms), (JobState::Queued, None));
    assert!(j.start_attempt(j.version, placement(&["b"]), 40).changed());
    j.requeue_for(StopReason::Preempted { for_job: "9".into(), nodes: vec![] });
    j.on_rank_exit(2, 0, exit(-15), 50);
    assert_eq!((j.state, j.retry_at_ms), (JobState::Queued, None));
    assert!(j.avoided_nodes().is_empty(), "neither counts against a node");
}

#[test]
fn an_exit_code_never_retried_fails_the_job_at_once() {
    let mut j = with_retry(5, "{never_on_exit_codes: [2]}");
    assert!(j.start_attempt(j.version, placement(&["a"]), 10).changed());
    j.on_rank_exit(1, 0, exit(3), 20);
    assert_eq!(j.state, JobState::Queued, "3 is retried");
    assert!(j.start_attempt(j.version, placement(&["a"]), 30).changed());
    j.on_rank_exit(2, 0, exit(2), 40);
    assert_eq!(j.state, JobState::Failed, "2 is not, with restarts left");
    assert_eq!(j.message, "exit code 2; exit code 2 is in retry.never_on_exit_codes, so it is not retried");
}

#[test]
fn a_run_its_node_could_not_carry_out_is_retried_without_counting_against_max_restarts() {
    let mut j = running(0, &["a"]);
    let fault = RankEnd::NodeFault { why: "container engine: connection refused".into() };
    j.on_rank_exit(1, 0, fault.clone(), 20);
    assert_eq!((j.state, j.user_attempt()), (JobState::Queued, 0), "max_restarts is 0, yet it is retried");
    assert!(j.retry_at_ms.is_some(), "after a backoff");
    assert!(j.start_attempt(j.version, placement(&["a"]), 30).changed());
    j.on_rank_exit(2, 0, fault, 40);
    assert_eq!(j.avoided_nodes(), ["a"], "a node that failed it twice is avoided");
    assert!(j.start_attempt(j.version, placement(&["b"]), 50).changed());
    j.on_rank_exit(3, 0, exit(1), 60);
    assert_eq!((j.state, j.message.as_str()), (JobState::Failed, "exit code 1 (attempt 1 of 1)"));
}

#[test]
fn a_node_two_attempts_failed_on_is_avoided() {
    let mut j = job(5);
    for (attempt, node, end) in [(1, "a", exit(1)), (2, "b", exit(1)), (3, "a", lost("a")), (4, "a", exit(1))] {
        assert!(j.start_attempt(j.version, placement(&[node]), 10).changed());
        assert!(j.avoided_nodes().is_empty(), "before attempt {attempt}");
        j.on_rank_exit(attempt, 0, end, 20);
    }
    assert_eq!(j.avoided_nodes(), ["a"], "two failures on a (the loss there is no failure), one on b");
    // In a gang, the node of the rank that failed first is the one blamed.
    let mut g = running(5, &["x", "y"]);
    g.on_rank_exit(1, 1, exit(1), 20);
    g.on_rank_exit(1, 0, exit(-15), 21);
    assert_eq!(g.attempts[0].failed_on.as_deref(), Some("y"));
}

#[test]
fn the_steps_an_attempt_ran_past_the_latest_checkpoint_are_recorded_as_lost() {
    let mut j = running(3, &["a"]);
    j.note_lost_work(1, Some(250), Some(200));
    assert_eq!(j.attempts[0].steps_lost, None, "not while it runs");
    j.on_rank_exit(1, 0, exit(1), 30);
    j.note_lost_work(1, Some(250), Some(200));
    j.note_lost_work(1, Some(999), Some(0));
    assert_eq!(j.attempts[0].steps_lost, Some(50), "recorded once, at its end");
    assert!(j.start_attempt(j.version, placement(&["a"]), 40).changed());
    j.on_rank_exit(2, 0, exit(1), 50);
    j.note_lost_work(2, Some(80), None);
    assert_eq!(j.steps_lost(), 130, "no checkpoint: every step is lost");
    assert!(j.start_attempt(j.version, placement(&["a"]), 60).changed());
    j.on_rank_exit(3, 0, exit(1), 70);
    j.note_lost_work(3, None, Some(200));
    assert_eq!((j.attempts[2].steps_lost, j.steps_lost()), (None, 130), "no steps reported: unknown");
}

#[test]
fn a_lost_node_requeues_the_job_without_counting_against_max_restarts() {
    let mut j = running(0, &["a", "b"]);
    assert!(j.on_rank_exit(1, 1, lost("b"), 30).stops_ranks());
    assert_eq!(j.stopping, Some(StopReason::AgentLost { node: "b".into() }));
    j.on_rank_exit(1, 0, exit(143), 31);
    assert_eq!(j.state, JobState::Queued, "max_restarts is 0, yet a lost node is no failure");
    assert!(j.current_attempt().unwrap().lost);
    assert_eq!(j.message, "attempt 1 ended (agent b lost); requeued");
}

#[test]
fn a_ranks_second_report_changes_nothing() {
    let mut j = running(0, &["a", "b"]);
    assert!(j.on_rank_exit(1, 0, exit(0), 30).changed());
    assert_eq!(j.on_rank_exit(1, 0, exit(0), 31), Transition::Unchanged);
    assert_eq!(j.on_rank_exit(1, 0, exit(5), 31), Transition::Unchanged, "the first report stands");
}

#[test]
fn an_exit_from_another_attempt_or_an_unplaced_rank_changes_nothing() {
    let mut j = running(0, &["a"]);
    assert_eq!(j.on_rank_exit(2, 0, exit(1), 30), Transition::Unchanged);
    assert_eq!(j.on_rank_exit(1, 4, exit(1), 30), Transition::Unchanged);
    assert_eq!(j.state, JobState::Running);
}

// ---- agents' reports ------------------------------------------------------------------------

#[test]
fn an_exit_of_the_expected_attempt_ends_the_rank_and_one_from_elsewhere_is_only_released() {
    let j = running(0, &["a", "b"]);
    assert_eq!(j.on_report("b", 1, 1, true), ReportAction::End);
    assert_eq!(j.on_report("a", 1, 1, true), ReportAction::Release, "rank 1 is not on a");
    assert_eq!(j.on_report("b", 0, 1, true), ReportAction::Release, "an older attempt");
}

#[test]
fn a_running_attempt_the_coordinator_moved_on_from_is_stopped() {
    let mut j = running(0, &["a"]);
    j.on_rank_exit(1, 0, lost("a"), 30); // requeued while the agent was away
    assert_eq!(j.on_report("a", 1, 0, false), ReportAction::StopStale);
}

#[test]
fn output_of_an_attempt_the_coordinator_moved_on_from_is_refused() {
    let mut j = running(0, &["a", "b"]);
    assert_eq!(j.moved_on_from(1, Some(0)), None, "the current attempt's ranks are heard");
    assert_eq!(j.moved_on_from(1, None), None);
    j.on_rank_exit(1, 1, lost("b"), 30);
    assert_eq!(j.moved_on_from(1, Some(1)), Some(MovedOn::RankLost), "b was declared lost: its copy is stale");
    assert_eq!(j.moved_on_from(1, Some(0)), None, "rank 0 on a is stopping, and its last words count");
    j.on_rank_exit(1, 0, exit(143), 31);
    assert!(j.start_attempt(j.version, placement(&["c", "d"]), 40).changed());
    assert_eq!(j.moved_on_from(1, Some(0)), Some(MovedOn::Attempt { current: 2 }));
    assert_eq!(j.moved_on_from(1, None), Some(MovedOn::Attempt { current: 2 }));
    assert_eq!(j.moved_on_from(2, Some(1)), None, "the new attempt starts with no lost rank");
}

#[test]
fn a_rank_told_to_stop_is_told_again_until_it_has() {
    let mut j = running(0, &["a"]);
    assert_eq!(j.on_report("a", 1, 0, false), ReportAction::Nothing);
    j.cancel(5);
    assert_eq!(j.on_report("a", 1, 0, false), ReportAction::RepeatStop);
}

#[test]
fn ranks_on_lost_nodes_are_those_not_yet_ended() {
    let mut j = running(0, &["a", "b", "a"]);
    j.on_rank_exit(1, 0, exit(0), 5);
    assert_eq!(j.ranks_on(|n| n == "a"), [(2, "a".to_string())]);
    assert!(job(0).ranks_on(|_| true).is_empty(), "a queued job has no ranks");
}

// ---- reasons and records --------------------------------------------------------------------

#[test]
fn stop_reasons_have_one_wording_and_a_code() {
    let cases = [
        (StopReason::Cancelled, "cancelled", "cancelled"),
        (StopReason::Preempted { for_job: "4".into(), nodes: vec![] }, "preempted", "preempted by job 4"),
        (
            StopReason::GpuUnhealthy { node: "a".into(), gpu: "GPU-1".into(), why: "XID 79".into() },
            "gpu_unhealthy",
            "GPU GPU-1 unhealthy (XID 79)",
        ),
        (StopReason::AgentLost { node: "b".into() }, "agent_lost", "agent b lost"),
        (StopReason::RankFailed { rank: 2, why: "exit code 1".into() }, "rank_failed", "rank 2 failed (exit code 1)"),
    ];
    for (reason, code, words) in cases {
        assert_eq!((reason.code(), reason.to_string().as_str()), (code, words));
    }
}

#[test]
fn records_written_with_preempted_by_text_read_as_typed_stop_reasons() {
    let mut value = serde_json::to_value(running(0, &["a"])).unwrap();
    let object = value.as_object_mut().unwrap();
    object.remove("stopping");
    object.insert("preempted_by".into(), "GPU GPU-9 unhealthy (XID 48)".into());
    let old: JobRecord = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(
        old.stopping,
        Some(StopReason::GpuUnhealthy { node: String::new(), gpu: "GPU-9".into(), why: "XID 48".into() })
    );
    value.as_object_mut().unwrap().insert("preempted_by".into(), "12".into());
    let old: JobRecord = serde_json::from_value(value).unwrap();
    assert_eq!(old.stopping, Some(StopReason::Preempted { for_job: "12".into(), nodes: vec![] }));
    let new = running(0, &["a"]);
    let round: JobRecord = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
    assert_eq!(round.stopping, None);
}

// ---- serve jobs ---------------------------------------------------------------------------------

fn serving() -> JobRecord {
    let spec = JobSpec::from_yaml("name: api\nreplicas: 2\nserve: {from: \"3@10\"}\n").unwrap();
    crate::store::new_job(9, spec, "alice", 0)
}

#[test]
fn a_serve_job_runs_from_its_submission_without_an_attempt_of_its_own() {
    let mut j = serving();
    assert!(j.start_serving().changed());
    assert_eq!((j.state, j.attempt), (JobState::Running, 0));
    assert_eq!(j.start_serving(), Transition::Unchanged);
    // Its replicas run; it is never placed itself.
    let mut replica = serving();
    replica.replica_of = Some(j.id.clone());
    assert_eq!(replica.start_serving(), Transition::Unchanged);
    assert_eq!(replica.state, JobState::Queued);
}

#[test]
fn a_cancelled_serve_job_ends_once_its_replicas_have() {
    let mut j = serving();
    j.start_serving();
    assert!(j.cancel(20).changed());
    assert_eq!(j.state, JobState::Running, "still running while its replicas stop");
    assert!(j.end_serving(None, 30).changed());
    assert_eq!((j.state, j.ended_at_ms, j.message.as_str()), (JobState::Cancelled, Some(30), "cancelled"));
}

#[test]
fn a_serve_job_fails_only_when_told_why_its_replicas_cannot_run() {
    let mut j = serving();
    j.start_serving();
    assert_eq!(j.end_serving(None, 30), Transition::Unchanged);
    assert!(j.end_serving(Some("replicas keep failing: exit code 1"), 30).changed());
    assert_eq!((j.state, j.message.as_str()), (JobState::Failed, "replicas keep failing: exit code 1"));
}
