//! Counterexamples proptest once found for the scheduler's promises, as scenarios. Each runs every
//! promise on its snapshot; its name says what it pinned.

use proptest::test_runner::TestCaseError;

use super::promise;

mod snapshots;

/// Jobs go highest priority first across queues: before, queue b's priority-17 jobs took the room a
/// priority-55 job of queue c needed, and the next pass preempted them for it.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc b266d4b0e2efe8e9` in
/// 030a35c (priority before fair share, held nodes for preemptors).
#[test]
fn priority_before_fair_share_on_an_empty_fleet() -> Result<(), TestCaseError> {
    promise::all(&snapshots::priority_before_fair_share_on_an_empty_fleet())
}

/// A preemptor keeps the node its victims free: a higher-priority job waiting on stopping jobs took
/// that room, and the next pass picked a second set of victims for the same job (fixed by claims,
/// e92c19b).
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc d965d1a56733a4c0` in
/// 030a35c (priority before fair share, held nodes for preemptors).
#[test]
fn a_preemptor_keeps_the_room_its_victims_free_and_picks_no_more() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_preemptor_keeps_the_room_its_victims_free_and_picks_no_more())
}

/// Jobs go highest priority first across queues, with a stopping job on the one node: before, a
/// priority-0 job of queue b went first and the next pass preempted it for a priority-1 job of queue a.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc be5de60eec4618b5` in
/// 030a35c (priority before fair share, held nodes for preemptors).
#[test]
fn priority_before_fair_share_beside_a_stopping_job() -> Result<(), TestCaseError> {
    promise::all(&snapshots::priority_before_fair_share_beside_a_stopping_job())
}

/// Jobs go highest priority first across queues, even one point apart: before, queue a's jobs filled
/// the node and the next pass preempted five of them for a priority-21 job of queue b (one more
/// victim on the next pass was left until e92c19b).
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 908dccb4f77f75a8` in
/// 030a35c (priority before fair share, held nodes for preemptors).
#[test]
fn priority_before_fair_share_by_one_priority_point() -> Result<(), TestCaseError> {
    promise::all(&snapshots::priority_before_fair_share_by_one_priority_point())
}

/// A job that fits waits only for a stated reason: one node, a stopping job, a six-GPU job waiting for
/// it and a CPU job that fits but waits because the node is held for the job ahead. (Saved while
/// e92c19b was written; it fails that check if "held" is not a stated reason, as e92c19b made it.)
///
/// Most likely broke `a_job_that_fits_waits_only_for_a_stated_reason`; saved as `cc 339c668b3ee95fa6` in
/// e92c19b (preemptors claim the nodes they preempted on; reservations count exact GPUs).
#[test]
fn a_job_that_fits_waits_only_because_room_is_held_for_a_job_ahead() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_job_that_fits_waits_only_because_room_is_held_for_a_job_ahead())
}

/// A backfill reservation counts the GPUs of jobs placed in the same pass: before, a two-GPU job
/// looked unreservable, so a one-GPU job got the reservation; the next pass moved it to the
/// two-GPU job and backfilled a job the first pass had kept off the reserved node.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 3b54b13ff1301fed` in
/// e92c19b (preemptors claim the nodes they preempted on; reservations count exact GPUs).
#[test]
fn a_reservation_counts_the_exact_gpus_of_jobs_placed_in_its_pass() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_reservation_counts_the_exact_gpus_of_jobs_placed_in_its_pass())
}

/// A job waits for the room a preempted gang frees on its other, unclaimed node; at e92c19b the next
/// pass preempted jobs on another node for it instead, two of them placed by the first (settled
/// by 3ba624b).
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 669f43c1402904cb` in
/// e92c19b (preemptors claim the nodes they preempted on; reservations count exact GPUs).
#[test]
fn a_plan_settles_when_a_job_waits_on_a_preempted_gangs_other_rank() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_a_job_waits_on_a_preempted_gangs_other_rank())
}

/// A gang is preempted and another job needs a victim on a node the gang shares: the pass finds both,
/// so the next one picks no new victim (a known gap at e92c19b; settled by 3ba624b).
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 9d427fe9e1febc4d` in
/// e92c19b (preemptors claim the nodes they preempted on; reservations count exact GPUs).
#[test]
fn a_plan_settles_when_a_preempted_gang_shares_a_node_with_another_victim() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_a_preempted_gang_shares_a_node_with_another_victim())
}

/// A reserved gang holds its share of its queue's GPU quota: before, later jobs of the queue used it,
/// the gang was quota-blocked on the next pass and its reserved nodes went to others.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 2935578f552f0ee0` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_plan_settles_when_a_reserved_gang_holds_its_queues_quota() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_a_reserved_gang_holds_its_queues_quota())
}

/// The job holding the backfill reservation keeps its turn (`ahead`) when placements shift queue
/// shares: before, the reservation moved to an equal-priority job of another queue, and the next
/// pass placed jobs the first had kept off the reserved nodes.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc e0d88489eb648434` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_plan_settles_when_queue_shares_shift_under_a_reservation() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_queue_shares_shift_under_a_reservation())
}

/// A job whose victim is stopping keeps its turn in the next pass (it is in `ahead`), so an
/// equal-priority job of its queue, submitted earlier, does not take the room being freed.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc 13f54db8f294149b` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_plan_settles_when_the_job_room_is_freed_for_keeps_its_turn() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_the_job_room_is_freed_for_keeps_its_turn())
}

/// A victim chosen late in the pass (a gang) frees room that changes an earlier job's reservation:
/// the pass is re-run over its own result, so the next pass backfills nothing more.
///
/// Broke `scheduling_the_applied_result_again_changes_nothing`; saved as `cc dd1687a75a40761b` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_plan_settles_when_victims_free_room_a_reservation_counted_on() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_plan_settles_when_victims_free_room_a_reservation_counted_on())
}

/// One node: a priority-92 job of queue b is placed, one of queue a preempts for a GPU (a CPU-only
/// job of the lowest priority is spared), and the rest wait on the held node. (Saved while 3ba624b
/// was written; which check it broke there is not known: it passes on the commit before.)
///
/// Broke a promise (which one is not known); saved as `cc fe4b682d2ae52d76` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_preemptor_on_one_node_beside_an_equal_priority_job_of_another_queue() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_preemptor_on_one_node_beside_an_equal_priority_job_of_another_queue())
}

/// Five nodes: a three-node GPU gang blocked, equal-priority jobs of another queue placed, a
/// preemption for a priority-77 job, and a two-node CPU gang reserved beside the held node. (Saved
/// while 3ba624b was written; which check it broke there is not known: it passes on the commit before.)
///
/// Broke a promise (which one is not known); saved as `cc 3f7333753fcf60f9` in
/// 3ba624b (a plan settles, so scheduling its result again changes nothing).
#[test]
fn a_blocked_gang_a_preemption_and_a_reserved_cpu_gang_behind_held_room() -> Result<(), TestCaseError> {
    promise::all(&snapshots::a_blocked_gang_a_preemption_and_a_reserved_cpu_gang_behind_held_room())
}
