//! The etcd writer: one task that commits concurrent writes together, each transaction fenced
//! by the leader key.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use super::etcd;
use crate::error::{Error, Result};

/// One key to write, on a condition, and where the outcome goes.
pub(super) struct Write {
    pub key: String,
    pub condition: Option<Compare>,
    /// `None` deletes the key.
    pub value: Option<Vec<u8>>,
    pub reply: std::sync::mpsc::SyncSender<Result<Option<i64>>>,
}

/// Writes per transaction: etcd's default `--max-txn-ops` is 128.
const MAX_BATCH: usize = 100;

/// Group commit: the writes queued while a transaction is in flight go together in the next
/// one (distinct keys only: etcd refuses a key twice in one transaction). Every transaction also
/// requires the leader key unchanged. If a batch fails, its writes are tried one by one, so
/// each gets its own answer.
pub(super) async fn write_batches(
    client: Client,
    leader: String,
    token: i64,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Write>,
) {
    let mut carried: Option<Write> = None;
    loop {
        let first = match carried.take() {
            Some(w) => w,
            None => match queue.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut keys = std::collections::HashSet::from([first.key.clone()]);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(next) = queue.try_recv() else { break };
            if !keys.insert(next.key.clone()) {
                carried = Some(next);
                break;
            }
            batch.push(next);
        }
        let together = if batch.len() > 1 { Some(transact(&client, &leader, token, &batch).await) } else { None };
        match together {
            Some(Ok(Some(revision))) => {
                for w in batch {
                    let _ = w.reply.send(Ok(Some(revision)));
                }
            }
            _ => {
                for w in batch {
                    let outcome = transact(&client, &leader, token, std::slice::from_ref(&w)).await;
                    let _ = w.reply.send(outcome);
                }
            }
        }
    }
}

/// One transaction for `writes`: the revision if every condition held, `None` if one failed.
async fn transact(client: &Client, leader: &str, token: i64, writes: &[Write]) -> Result<Option<i64>> {
    let mut compares = vec![Compare::create_revision(leader, CompareOp::Equal, token)];
    compares.extend(writes.iter().filter_map(|w| w.condition.clone()));
    let ops: Vec<TxnOp> = writes
        .iter()
        .map(|w| match &w.value {
            Some(value) => TxnOp::put(w.key.clone(), value.clone(), None),
            None => TxnOp::delete(w.key.clone(), None),
        })
        .collect();
    let txn = Txn::new().when(compares).and_then(ops).or_else(vec![TxnOp::get(leader, None)]);
    let resp = client.clone().txn(txn).await.map_err(etcd)?;
    if resp.succeeded() {
        return Ok(Some(resp.header().map_or(0, |h| h.revision())));
    }
    let still_leader = resp.op_responses().into_iter().any(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().is_some_and(|kv| kv.create_revision() == token),
        _ => false,
    });
    if still_leader {
        Ok(None)
    } else {
        Err(Error::Fenced("another coordinator leads now; this one may not write".into()))
    }
}
