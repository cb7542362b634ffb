//! The embedded backend (redb), for one machine. redb locks its file, so a second coordinator
//! on the same data directory is refused at open: there is never a second writer to fence.
//!
//! Group commit: each change is its own transaction, committed without fsync, and then waits
//! for a durable commit that covers it. One waiter at a time makes that commit (an empty one:
//! redb's durable commit persists every commit before it) while the others queue behind it, so
//! concurrent changes share one fsync, and none returns before it is on disk.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{StateStore, job_key, new_job};
use crate::error::{Error, Result};
use crate::records::{AgentRecord, CheckpointRecord, JobRecord};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const CHECKPOINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("checkpoints");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub struct EmbeddedStore {
    db: Database,
    /// Commits made so far, durable or not.
    committed: AtomicU64,
    sync: Mutex<SyncState>,
    synced_cv: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Every commit up to this count is on disk.
    synced: u64,
    syncing: bool,
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
        Ok(EmbeddedStore { db, committed: AtomicU64::new(0), sync: Mutex::default(), synced_cv: Condvar::new() })
    }

    fn begin(&self) -> Result<WriteTransaction> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None).map_err(|e| Error::Store(e.into()))?;
        Ok(txn)
    }

    /// Commits `txn` and returns once it is durable.
    fn commit(&self, txn: WriteTransaction) -> Result<()> {
        txn.commit()?;
        let mine = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        let mut state = self.sync.lock().expect("sync lock poisoned");
        loop {
            if state.synced >= mine {
                return Ok(());
            }
            if state.syncing {
                state = self.synced_cv.wait(state).expect("sync lock poisoned");
                continue;
            }
            state.syncing = true;
            drop(state);
            // Every commit counted now finished before this durable one begins.
            let target = self.committed.load(Ordering::SeqCst);
            let result: Result<()> = (|| Ok(self.db.begin_write()?.commit()?))();
            state = self.sync.lock().expect("sync lock poisoned");
            state.syncing = false;
            if result.is_ok() {
                state.synced = state.synced.max(target);
            }
            self.synced_cv.notify_all();
            result?;
        }
    }
}

impl StateStore for EmbeddedStore {
    fn submit(&self, spec: gantry_core::JobSpec, now_ms: i64) -> Result<JobRecord> {
        let txn = self.begin()?;
        let job = {
            let mut meta = txn.open_table(META)?;
            let seq = meta.get("next_job")?.map(|v| v.value()).unwrap_or(1);
            meta.insert("next_job", seq + 1)?;
            let job = new_job(seq, spec, now_ms);
            txn.open_table(JOBS)?.insert(seq, serde_json::to_vec(&job)?.as_slice())?;
            job
        };
        self.commit(txn)?;
        Ok(job)
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
        let txn = self.begin()?;
        let updated = {
            let mut table = txn.open_table(JOBS)?;
            let mut job: JobRecord = {
                let value = table.get(key)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
                serde_json::from_slice(value.value())?
            };
            if !change(&mut job) {
                None
            } else {
                job.version += 1;
                table.insert(key, serde_json::to_vec(&job)?.as_slice())?;
                Some(job)
            }
        };
        if updated.is_some() {
            self.commit(txn)?;
        } else {
            txn.abort()?;
        }
        Ok(updated)
    }

    fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        let key = (job_key(&record.job_id)?, record.step);
        let txn = self.begin()?;
        txn.open_table(CHECKPOINTS)?.insert(key, serde_json::to_vec(record)?.as_slice())?;
        self.commit(txn)?;
        Ok(())
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
        let txn = self.begin()?;
        txn.open_table(AGENTS)?.insert(record.name.as_str(), serde_json::to_vec(record)?.as_slice())?;
        self.commit(txn)?;
        Ok(())
    }

    fn set_drained(&self, name: &str, drained: bool) -> Result<bool> {
        let txn = self.begin()?;
        let found = {
            let mut table = txn.open_table(AGENTS)?;
            let record: Option<AgentRecord> = match table.get(name)? {
                Some(v) => Some(serde_json::from_slice(v.value())?),
                None => None,
            };
            match record {
                Some(mut r) => {
                    r.drained = drained;
                    table.insert(name, serde_json::to_vec(&r)?.as_slice())?;
                    true
                }
                None => false,
            }
        };
        self.commit(txn)?;
        Ok(found)
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
