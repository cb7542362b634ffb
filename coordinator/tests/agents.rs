//! The coordinator's promises about agents, on tokio's paused clock: a whole `serve()` in this
//! process, agents played by the test over real gRPC. Timeouts of many seconds pass in
//! milliseconds, and nothing waits on the machine's speed.

#[path = "support/inprocess.rs"]
mod inprocess;

use std::time::Duration;

use inprocess::{TestAgent, TestCoordinator, running, wait_for};

const SLEEPER: &str = "name: sleeper\ncommand: [\"sleep\", \"1000\"]\nmax_restarts: 0\n";

fn state(job: &gantry_proto::v1::Job) -> &'static str {
    gantry_proto::job_state_name(job.state())
}

#[tokio::test(start_paused = true)]
async fn a_silent_agent_is_lost_after_the_timeout_and_its_job_runs_again_elsewhere() {
    let wall = std::time::Instant::now();
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    let first = a.next_assignment().await;
    assert_eq!(first.attempt, 1);
    let mut b = TestAgent::join(&c, "b").await;

    a.fall_silent();
    let silent_at = tokio::time::Instant::now();
    let second = b.next_assignment().await;
    let moved_after = silent_at.elapsed();
    assert_eq!((second.job_id.as_str(), second.attempt), (id.as_str(), 2));
    // Lost once silent past the 10 s timeout, and placed on the next pass (a tick is 1 s).
    assert!(moved_after > Duration::from_secs(10), "moved after only {moved_after:?}");
    assert!(moved_after < Duration::from_secs(13), "moved only after {moved_after:?}");
    let job = c.job(&id).await;
    assert_eq!(state(&job), "running", "max_restarts is 0, yet a lost node is no failure");
    assert_eq!(job.attempts[0].outcome, "agent a lost");
    assert!(a.session_closed().await, "the silent agent's session is closed");
    assert!(wall.elapsed() < Duration::from_secs(10), "took {:?} of real time", wall.elapsed());
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_reconnects_holding_its_job_keeps_it() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    let assigned = a.next_assignment().await;
    a.leave();
    // Back within the timeout, still running it: nothing is requeued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _a = TestAgent::join_holding(&c, "a", vec![running(&id, assigned.attempt, 0)]).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let job = c.job(&id).await;
    assert_eq!((state(&job), job.attempts.len()), ("running", 1), "{job:?}");
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_reconnects_without_its_job_has_it_requeued_at_once() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    a.next_assignment().await;
    a.leave();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Restarted (its processes gone): it holds nothing, well before the timeout.
    let mut a = TestAgent::join(&c, "a").await;
    let again = a.next_assignment().await;
    assert_eq!(again.attempt, 2);
    let job = c.job(&id).await;
    assert_eq!(job.attempts[0].outcome, "lost: agent a no longer had it");
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_is_requeued_within_max_restarts_then_the_job_fails() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit("name: flaky\ncommand: [\"false\"]\nmax_restarts: 1\n").await;
    let first = a.next_assignment().await;
    a.exit(&id, first.attempt, 0, 1).await;
    let second = a.next_assignment().await;
    assert_eq!(second.attempt, 2);
    a.exit(&id, second.attempt, 0, 1).await;
    let job = wait_for(&c, &id, "fail", |j| state(j) == "failed").await;
    assert_eq!(job.message, "exit code 1 (attempt 2 of 2)");
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_back_off_avoid_the_node_they_failed_on_twice_and_some_exit_codes_are_final() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let spec = "name: flaky\ncommand: [\"false\"]\nmax_restarts: 5\nretry: {backoff: 5s, never_on_exit_codes: [2]}\n";
    let id = c.submit(spec).await;
    // Attempt 1 fails on a: the retry waits 5s; attempt 2 fails there too: 10s, and a is avoided.
    // (Waits are read from the records: joining over real gRPC lets the paused clock jump.)
    let backoff =
        |job: &gantry_proto::v1::Job| job.retry_at_ms.unwrap() - job.attempts.last().unwrap().ended_at_ms.unwrap();
    let first = a.next_assignment().await;
    a.exit(&id, first.attempt, 0, 1).await;
    let job = wait_for(&c, &id, "wait out its backoff", |j| j.pending_code == "backoff").await;
    assert!(job.pending_reason.contains("its last attempt failed; retrying in"), "{}", job.pending_reason);
    assert_eq!((backoff(&job), job.avoided_nodes.len()), (5_000, 0));
    let retry_at = job.retry_at_ms.unwrap();
    let second = a.next_assignment().await;
    let mut b = TestAgent::join(&c, "b").await;
    a.exit(&id, second.attempt, 0, 1).await;
    let job = wait_for(&c, &id, "back off again", |j| j.pending_code == "backoff").await;
    assert_eq!((backoff(&job), job.avoided_nodes.clone()), (10_000, vec!["a".to_string()]), "doubled; a avoided");
    let retry_at = [retry_at, job.retry_at_ms.unwrap()];
    // The third attempt goes to b, not back to a; no attempt started before its backoff ended.
    let third = b.next_assignment().await;
    assert_eq!(third.attempt, 3, "{:?}", c.job(&id).await.attempts);
    let job = c.job(&id).await;
    assert!(job.attempts[1].started_at_ms >= retry_at[0] && job.attempts[2].started_at_ms >= retry_at[1]);
    // Exit code 2 is never retried, with restarts left.
    b.exit(&id, third.attempt, 0, 2).await;
    let job = wait_for(&c, &id, "fail at once", |j| state(j) == "failed").await;
    assert!(job.message.contains("exit code 2 is in retry.never_on_exit_codes"), "{}", job.message);
    assert_eq!(job.attempts.len(), 3);
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_is_told_to_stop_again_until_its_agent_reports_the_exit() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    let assigned = a.next_assignment().await;
    c.users().cancel_job(gantry_proto::v1::CancelJobRequest { job_id: id.clone() }).await.unwrap();
    let stop = a.next_cancel().await;
    assert_eq!((stop.job_id.as_str(), stop.attempt, stop.grace_period_ms), (id.as_str(), 1, 3000));
    let job = c.job(&id).await;
    assert_eq!((state(&job), job.stop_code.as_str(), job.stop_reason.as_str()), ("running", "cancelled", "cancelled"));
    // The agent keeps reporting it running (it missed the first cancel, say): told again.
    a.next_cancel().await;
    a.exit(&id, assigned.attempt, 0, 143).await;
    let job = wait_for(&c, &id, "end cancelled", |j| state(j) == "cancelled").await;
    assert!(job.stop_reason.is_empty(), "a job that has ended is no longer stopping");
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn agents_learn_when_to_fence_and_every_heartbeat_is_acknowledged() {
    let c = TestCoordinator::start().await;
    let reply = c
        .agents()
        .register(gantry_proto::v1::RegisterRequest {
            protocol_version: gantry_proto::PROTOCOL_VERSION,
            name: "probe".into(),
            inventory: Some(inprocess::inventory(1)),
            advertise_addr: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // A 10 s timeout: SIGTERM at 8 s, SIGKILL at 9 s, 1 s before the coordinator moves on.
    assert_eq!((reply.fence_after_ms, reply.fence_grace_ms, reply.agent_timeout_ms), (8_000, 1_000, 10_000));
    let mut a = TestAgent::join(&c, "a").await;
    assert_eq!(a.next_ack().await, 0, "the session's first heartbeat");
    assert_eq!(a.next_ack().await, 1);
    assert_eq!(a.next_ack().await, 2);
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rank_its_agent_stopped_when_cut_off_is_requeued_and_not_counted_as_a_failure() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    let assigned = a.next_assignment().await;
    let fenced = gantry_proto::v1::JobReport {
        phase: gantry_proto::v1::job_report::Phase::Exited as i32,
        signal: Some(15),
        fenced: true,
        message: "stopped by its agent, cut off from the coordinator".into(),
        ..running(&id, assigned.attempt, 0)
    };
    a.report_exit(fenced).await;
    let again = a.next_assignment().await;
    assert_eq!(again.attempt, 2, "max_restarts is 0, yet it runs again");
    let job = c.job(&id).await;
    assert_eq!(job.attempts[0].outcome, "stopped by its agent, cut off from the coordinator");
    assert_ne!(again.master_port, assigned.master_port, "a new attempt meets at a new rendezvous port");
    c.stop().await;
}

#[tokio::test(start_paused = true)]
async fn output_from_an_attempt_the_coordinator_moved_on_from_is_refused_and_counted() {
    let c = TestCoordinator::start().await;
    let mut a = TestAgent::join(&c, "a").await;
    let id = c.submit(SLEEPER).await;
    let first = a.next_assignment().await;
    let mut b = TestAgent::join(&c, "b").await;
    a.fall_silent();
    let second = b.next_assignment().await;
    assert_eq!(second.attempt, 2);

    // Agent a comes back with output of attempt 1, and says it still runs it.
    let mut agents = c.agents();
    let late = gantry_proto::v1::LogBatch {
        job_id: id.clone(),
        attempt: first.attempt,
        rank: 0,
        first_seq: 0,
        lines: vec!["late line".into()],
    };
    let refused = agents.upload_logs(late).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("attempt 1 is over (the job is on attempt 2)"), "{}", refused.message());
    let _a = TestAgent::join_holding(&c, "a", vec![running(&id, first.attempt, 0)]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let current = gantry_proto::v1::LogBatch { attempt: 2, lines: vec!["fine".into()], ..Default::default() };
    agents.upload_logs(gantry_proto::v1::LogBatch { job_id: id.clone(), ..current }).await.unwrap();

    let metrics = c.metrics().await;
    let count = |kind: &str| -> f64 {
        let prefix = format!("gantry_stale_attempt_reports_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{prefix}: {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(count("logs"), 1.0);
    assert!(count("running") >= 1.0, "the stale copy reported running and was told to stop");
    assert_eq!(count("checkpoint"), 0.0);
    c.stop().await;
}
