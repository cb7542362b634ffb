//! The embedded backend (redb), for one machine. redb locks its file, so a second coordinator
//! on the same data directory is refused at open: there is never a second writer to fence.
//!
//! Group commit: concurrent changes share one write transaction and one durable commit. Each
//! change runs in the open transaction, then waits until that transaction is on disk; one of
//! the waiters commits it. While it commits, the next changes queue for the next transaction,
//! so under load each fsync carries many changes, and none is acknowledged before it is durable.

use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{StateStore, job_key, new_job};
use crate::error::{Error, Result};
use crate::records::{AgentRecord, CheckpointRecord, JobRecord};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const CHECKPOINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("checkpoints");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub struct EmbeddedStore {
    db: Database,
    batch: Mutex<Batch>,
    /// Waiters on batch n wait on `settled[n % 2]`, so settling a batch wakes its own changes,
    /// not every writer of the next batch too.
    settled: [Condvar; 2],
}

/// The write transaction being filled, and which batches are settled.
#[derive(Default)]
struct Batch {
    txn: Option<WriteTransaction>,
    /// The number of the batch `txn` holds.
    open: u64,
    /// Every batch up to this number has committed (or failed).
    settled: u64,
    committing: bool,
    /// The last batch whose commit failed, and why.
    failed: Option<(u64, String)>,
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        let db = Database::create(path)?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(CHECKPOINTS)?;
        txn.open_table(AGENTS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(EmbeddedStore { db, batch: Mutex::default(), settled: [Condvar::new(), Condvar::new()] })
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().expect("batch lock poisoned")
    }

    /// Runs `change` in the open batch; if it wrote (it returns true beside its result), returns
    /// once the batch is durable.
    fn write<R>(&self, change: impl FnOnce(&WriteTransaction) -> Result<(R, bool)>) -> Result<R> {
        let mut b = self.lock();
        if b.txn.is_none() {
            // Blocks while the previous batch commits: meanwhile the next changes gather here.
            b.txn = Some(self.db.begin_write()?);
            b.open += 1;
        }
        let batch = b.open;
        let (out, wrote) = change(b.txn.as_ref().expect("a batch is open"))?;
        if !wrote {
            return Ok(out);
        }
        loop {
            if b.settled >= batch {
                return match &b.failed {
                    Some((failed, why)) if *failed == batch => Err(Error::Io {
                        context: "committing the store".into(),
                        source: std::io::Error::other(why.clone()),
                    }),
                    _ => Ok(out),
                };
            }
            if !b.committing && b.open == batch && b.txn.is_some() {
                b.committing = true;
                let txn = b.txn.take().expect("checked");
                drop(b);
                let result = txn.commit();
                b = self.lock();
                b.committing = false;
                b.settled = batch;
                if let Err(e) = result {
                    b.failed = Some((batch, e.to_string()));
                }
                self.settled[(batch % 2) as usize].notify_all();
                // One writer of the next batch takes over committing.
                self.settled[((batch + 1) % 2) as usize].notify_one();
                continue;
            }
            b = self.settled[(batch % 2) as usize].wait(b).expect("batch lock poisoned");
        }
    }
}

impl StateStore for EmbeddedStore {
    fn submit(&self, spec: gantry_core::JobSpec, now_ms: i64) -> Result<JobRecord> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let seq = meta.get("next_job")?.map(|v| v.value()).unwrap_or(1);
            let job = new_job(seq, spec, now_ms);
            let bytes = serde_json::to_vec(&job)?;
            meta.insert("next_job", seq + 1)?;
            txn.open_table(JOBS)?.insert(seq, bytes.as_slice())?;
            Ok((job, true))
        })
    }

    fn job(&self, id: &str) -> Result<JobRecord> {
        let key = job_key(id)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let value = table.get(key)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
        Ok(serde_json::from_slice(value.value())?)
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    fn update_job(&self, id: &str, change: &mut dyn FnMut(&mut JobRecord) -> bool) -> Result<Option<JobRecord>> {
        let key = job_key(id)?;
        self.write(|txn| {
            let mut table = txn.open_table(JOBS)?;
            let mut job: JobRecord = {
                let value = table.get(key)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
                serde_json::from_slice(value.value())?
            };
            if !change(&mut job) {
                return Ok((None, false));
            }
            job.version += 1;
            table.insert(key, serde_json::to_vec(&job)?.as_slice())?;
            Ok((Some(job), true))
        })
    }

    fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        let key = (job_key(&record.job_id)?, record.step);
        let bytes = serde_json::to_vec(record)?;
        self.write(|txn| {
            txn.open_table(CHECKPOINTS)?.insert(key, bytes.as_slice())?;
            Ok(((), true))
        })
    }

    fn checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let key = job_key(job_id)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHECKPOINTS)?;
        let mut out = Vec::new();
        for entry in table.range((key, 0)..=(key, u64::MAX))? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    fn put_agent(&self, record: &AgentRecord) -> Result<()> {
        let bytes = serde_json::to_vec(record)?;
        self.write(|txn| {
            txn.open_table(AGENTS)?.insert(record.name.as_str(), bytes.as_slice())?;
            Ok(((), true))
        })
    }

    fn set_drained(&self, name: &str, drained: bool) -> Result<bool> {
        self.write(|txn| {
            let mut table = txn.open_table(AGENTS)?;
            let record: Option<AgentRecord> = match table.get(name)? {
                Some(v) => Some(serde_json::from_slice(v.value())?),
                None => None,
            };
            let Some(mut r) = record else { return Ok((false, false)) };
            r.drained = drained;
            table.insert(name, serde_json::to_vec(&r)?.as_slice())?;
            Ok((true, true))
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_coordinator_on_the_same_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        assert!(EmbeddedStore::open(&path).is_err());
    }
}
