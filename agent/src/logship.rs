//! Ships one job rank's output to the coordinator: numbered lines, in order, each line at least
//! once (the coordinator drops repeats by number), retried while the coordinator is away.

use std::collections::VecDeque;
use std::time::Duration;

use gantry_proto::v1;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::coordinators::Coordinators;

const MAX_BATCH: usize = 1000;
const MAX_BATCH_BYTES: usize = 1 << 20;

pub struct LogShipper {
    pub job_id: String,
    pub attempt: u32,
    pub rank: u32,
    pub coordinators: Coordinators,
}

impl LogShipper {
    /// Runs until `lines` closes and everything received has been acknowledged.
    pub async fn run(self, mut lines: mpsc::Receiver<String>) {
        let mut pending: VecDeque<String> = VecDeque::new();
        let mut base: u64 = 0; // sequence number of pending[0]
        let mut open = true;
        let mut backoff = Duration::from_millis(100);
        while open || !pending.is_empty() {
            if pending.is_empty() {
                match lines.recv().await {
                    Some(line) => pending.push_back(line),
                    None => break,
                }
            }
            // Take whatever else is ready, up to a batch.
            while open && pending.len() < MAX_BATCH * 4 {
                match lines.try_recv() {
                    Ok(line) => pending.push_back(line),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            let mut bytes = 0;
            let batch: Vec<String> = pending
                .iter()
                .take(MAX_BATCH)
                .take_while(|l| {
                    bytes += l.len();
                    bytes <= MAX_BATCH_BYTES
                })
                .cloned()
                .collect();
            let batch = if batch.is_empty() { vec![pending[0].clone()] } else { batch };
            let request = v1::LogBatch {
                job_id: self.job_id.clone(),
                attempt: self.attempt,
                rank: self.rank,
                first_seq: base,
                lines: batch,
            };
            match self.coordinators.client().upload_logs(request).await {
                Ok(ack) => {
                    let next = ack.into_inner().next_seq;
                    // Drop what the coordinator holds; anything after `next` is sent again.
                    let drop = next.saturating_sub(base).min(pending.len() as u64) as usize;
                    pending.drain(..drop);
                    base += drop as u64;
                    backoff = Duration::from_millis(100);
                }
                Err(e) if retryable(&e) => {
                    debug!(job = %self.job_id, error = %e, "log upload failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    // The coordinator refuses this batch for good (e.g. the job is gone): retrying
                    // would hold the job's exit report forever.
                    warn!(job = %self.job_id, error = %e, lines = pending.len(), "coordinator refused logs; dropping them");
                    return;
                }
            }
        }
    }
}

/// Failures that may pass: the coordinator is away, restarting, or busy.
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
    )
}
