//! The embedded backend (redb), for one machine. redb locks its file, so a second coordinator
//! on the same data directory is refused at open: there is never a second writer to fence.
//!
//! Jobs are read from memory, loaded once at open: the scheduler reads every job on every pass.
//! Changes are prepared by their callers (the change applied, the record encoded) and committed
//! by one writer thread, which takes every change queued while it was committing into one write
//! transaction and one fsync (group commit). A change is acknowledged, and visible to readers,
//! only once it is durable. A job change carries the version it was made from; if the job moved
//! on meanwhile, the caller redoes it on the fresh copy.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{StateStore, job_key};
use crate::auth::TokenRecord;
use crate::error::{Error, Result};
use crate::records::{AgentRecord, CheckpointRecord, DatasetRecord, JobRecord};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const CHECKPOINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("checkpoints");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const DATASETS: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets");
/// Data set name -> its owner's name.
const DATASET_OWNERS: TableDefinition<&str, &str> = TableDefinition::new("dataset_owners");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Changes per write transaction, at most.
const MAX_BATCH: usize = 1024;

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Every job by sequence number, as committed.
    jobs: Arc<Mutex<BTreeMap<u64, JobRecord>>>,
    next_id: AtomicU64,
    /// To the writer; taken on drop, which ends it.
    writes: Option<SyncSender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

/// A prepared change, and where its outcome goes.
struct Write {
    change: Change,
    reply: SyncSender<Result<bool>>,
}

enum Change {
    /// A new job; `next_job` moves past it (once per batch).
    Submit {
        job: JobRecord,
        bytes: Vec<u8>,
    },
    /// A changed job, made from version `from`: refused (false) if the job is at another.
    Job {
        job: JobRecord,
        bytes: Vec<u8>,
        from: u64,
    },
    Checkpoint {
        key: (u64, u64),
        bytes: Vec<u8>,
    },
    /// An agent's record, or its deletion (`None`: false if there was none).
    Agent {
        name: String,
        bytes: Option<Vec<u8>>,
    },
    /// A token's record, or its deletion (`None`: false if there was none).
    Token {
        name: String,
        bytes: Option<Vec<u8>>,
    },
    /// A data set version's record, or its deletion (`None`: false if there was none).
    Dataset {
        name: String,
        bytes: Option<Vec<u8>>,
    },
    /// A data set name's owner, set only if it has none (false: it had one); `None` frees it.
    DatasetOwner {
        name: String,
        owner: Option<String>,
    },
    /// Drained or not; false if no such agent.
    Drain {
        name: String,
        drained: bool,
    },
}

impl EmbeddedStore {
    /// Every record of a table keyed by name.
    fn all<T: serde::de::DeserializeOwned>(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<T>> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(table)?.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        let db = Database::create(path)?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(CHECKPOINTS)?;
        txn.open_table(AGENTS)?;
        txn.open_table(TOKENS)?;
        txn.open_table(DATASETS)?;
        txn.open_table(DATASET_OWNERS)?;
        txn.open_table(META)?;
        txn.commit()?;
        let mut jobs = BTreeMap::new();
        let next_id = {
            let txn = db.begin_read()?;
            for entry in txn.open_table(JOBS)?.iter()? {
                let (key, value) = entry?;
                jobs.insert(key.value(), serde_json::from_slice::<JobRecord>(value.value())?);
            }
            txn.open_table(META)?.get("next_job")?.map(|v| v.value()).unwrap_or(1)
        };
        let (db, jobs) = (Arc::new(db), Arc::new(Mutex::new(jobs)));
        let (writes, queue) = sync_channel(MAX_BATCH);
        let writer = {
            let (db, jobs) = (db.clone(), jobs.clone());
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || write_batches(&db, &jobs, queue))
                .map_err(Error::io("starting the store's writer"))?
        };
        Ok(EmbeddedStore { db, jobs, next_id: AtomicU64::new(next_id), writes: Some(writes), writer: Some(writer) })
    }

    /// Hands `change` to the writer; returns once it is durable.
    fn write(&self, change: Change) -> Result<bool> {
        let (reply, outcome) = sync_channel(1);
        let stopped =
            || Error::Io { context: "the store's writer stopped".into(), source: std::io::ErrorKind::Other.into() };
        let sender = self.writes.as_ref().ok_or_else(stopped)?;
        sender.send(Write { change, reply }).map_err(|_| stopped())?;
        outcome.recv().map_err(|_| stopped())?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it holds.
        self.writes.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Answers for one batch: each writer's reply channel and its outcome.
type Answers = Vec<(SyncSender<Result<bool>>, Result<bool>)>;

/// The writer thread: one transaction per batch of queued changes, then the cache. Waking the
/// waiting callers is left to a second thread, so the next batch's transaction starts at once:
/// with many writers, waking them cost the writer as much as the commit.
fn write_batches(db: &Database, jobs: &Mutex<BTreeMap<u64, JobRecord>>, queue: Receiver<Write>) {
    let (answers, to_wake) = std::sync::mpsc::channel::<Answers>();
    let waker =
        std::thread::Builder::new().name("store-waker".into()).spawn(move || to_wake.into_iter().for_each(wake));
    let Ok(waker) = waker else {
        // No second thread: answer from this one.
        return write_loop(db, jobs, queue, &mut wake);
    };
    write_loop(db, jobs, queue, &mut |batch| {
        let _ = answers.send(batch);
    });
    drop(answers);
    let _ = waker.join();
}

fn wake(batch: Answers) {
    for (reply, outcome) in batch {
        let _ = reply.send(outcome);
    }
}

fn write_loop(
    db: &Database,
    jobs: &Mutex<BTreeMap<u64, JobRecord>>,
    queue: Receiver<Write>,
    answer: &mut dyn FnMut(Answers),
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let answers = match commit(db, jobs, &batch) {
            Ok(applied) => {
                let mut answers = Vec::with_capacity(batch.len());
                let mut cache = jobs.lock().expect("jobs lock poisoned");
                for (w, ok) in batch.into_iter().zip(applied) {
                    if let (true, Change::Submit { job, .. } | Change::Job { job, .. }) = (ok, w.change) {
                        cache.insert(job.seq, job);
                    }
                    answers.push((w.reply, Ok(ok)));
                }
                answers
            }
            Err(e) => {
                let why = e.to_string();
                let failed = |w: Write| {
                    let source = std::io::Error::other(why.clone());
                    (w.reply, Err(Error::Io { context: "committing the store".into(), source }))
                };
                batch.into_iter().map(failed).collect()
            }
        };
        answer(answers);
    }
}

/// Commits `batch` in one write transaction: which changes applied.
fn commit(db: &Database, jobs: &Mutex<BTreeMap<u64, JobRecord>>, batch: &[Write]) -> Result<Vec<bool>> {
    // The versions as this batch leaves them, so two changes of one job in a batch chain.
    let mut versions: BTreeMap<u64, u64> = BTreeMap::new();
    let txn = db.begin_write()?;
    let applied = {
        let mut tables = Tables {
            jobs: txn.open_table(JOBS)?,
            checkpoints: txn.open_table(CHECKPOINTS)?,
            agents: txn.open_table(AGENTS)?,
            tokens: txn.open_table(TOKENS)?,
            datasets: txn.open_table(DATASETS)?,
            dataset_owners: txn.open_table(DATASET_OWNERS)?,
        };
        let cache = jobs.lock().expect("jobs lock poisoned");
        batch.iter().map(|w| apply(&mut tables, &cache, &mut versions, &w.change)).collect::<Result<Vec<bool>>>()?
    };
    // Once per batch: the next id moves past every job submitted in it.
    let submitted = batch.iter().filter_map(|w| match &w.change {
        Change::Submit { job, .. } => Some(job.seq + 1),
        _ => None,
    });
    if let Some(next) = submitted.max() {
        let mut meta = txn.open_table(META)?;
        let stored = meta.get("next_job")?.map(|v| v.value()).unwrap_or(1);
        meta.insert("next_job", stored.max(next))?;
    }
    txn.commit()?;
    Ok(applied)
}

/// A batch's tables, opened once for all its changes.
struct Tables<'txn> {
    jobs: redb::Table<'txn, u64, &'static [u8]>,
    checkpoints: redb::Table<'txn, (u64, u64), &'static [u8]>,
    agents: redb::Table<'txn, &'static str, &'static [u8]>,
    tokens: redb::Table<'txn, &'static str, &'static [u8]>,
    datasets: redb::Table<'txn, &'static str, &'static [u8]>,
    dataset_owners: redb::Table<'txn, &'static str, &'static str>,
}

/// Stages one change; false if it does not apply (a stale job change, an unknown agent).
fn apply(
    tables: &mut Tables,
    cache: &BTreeMap<u64, JobRecord>,
    versions: &mut BTreeMap<u64, u64>,
    change: &Change,
) -> Result<bool> {
    match change {
        Change::Submit { job, bytes } => {
            tables.jobs.insert(job.seq, bytes.as_slice())?;
            versions.insert(job.seq, job.version);
        }
        Change::Job { job, bytes, from } => {
            let current = versions.get(&job.seq).copied().or_else(|| cache.get(&job.seq).map(|j| j.version));
            if current != Some(*from) {
                return Ok(false);
            }
            tables.jobs.insert(job.seq, bytes.as_slice())?;
            versions.insert(job.seq, job.version);
        }
        Change::Checkpoint { key, bytes } => {
            tables.checkpoints.insert(*key, bytes.as_slice())?;
        }
        Change::Agent { name, bytes: Some(bytes) } => {
            tables.agents.insert(name.as_str(), bytes.as_slice())?;
        }
        Change::Agent { name, bytes: None } => return Ok(tables.agents.remove(name.as_str())?.is_some()),
        Change::Drain { name, drained } => {
            let record: Option<AgentRecord> = match tables.agents.get(name.as_str())? {
                Some(v) => Some(serde_json::from_slice(v.value())?),
                None => None,
            };
            let Some(mut record) = record else { return Ok(false) };
            record.drained = *drained;
            tables.agents.insert(name.as_str(), serde_json::to_vec(&record)?.as_slice())?;
        }
        Change::Token { name, bytes: Some(bytes) } => {
            tables.tokens.insert(name.as_str(), bytes.as_slice())?;
        }
        Change::Token { name, bytes: None } => return Ok(tables.tokens.remove(name.as_str())?.is_some()),
        Change::Dataset { name, bytes: Some(bytes) } => {
            tables.datasets.insert(name.as_str(), bytes.as_slice())?;
        }
        Change::Dataset { name, bytes: None } => return Ok(tables.datasets.remove(name.as_str())?.is_some()),
        Change::DatasetOwner { name, owner: Some(owner) } => {
            if tables.dataset_owners.get(name.as_str())?.is_some() {
                return Ok(false);
            }
            tables.dataset_owners.insert(name.as_str(), owner.as_str())?;
        }
        Change::DatasetOwner { name, owner: None } => {
            tables.dataset_owners.remove(name.as_str())?;
        }
    }
    Ok(true)
}

impl StateStore for EmbeddedStore {
    fn insert_job(&self, make: &mut dyn FnMut(u64) -> JobRecord) -> Result<JobRecord> {
        let seq = self.next_id.fetch_add(1, Ordering::SeqCst);
        let job = make(seq);
        let bytes = serde_json::to_vec(&job)?;
        self.write(Change::Submit { job: job.clone(), bytes })?;
        Ok(job)
    }

    fn job(&self, id: &str) -> Result<JobRecord> {
        let key = job_key(id)?;
        let jobs = self.jobs.lock().expect("jobs lock poisoned");
        jobs.get(&key).cloned().ok_or_else(|| Error::JobNotFound(id.to_string()))
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        Ok(self.jobs.lock().expect("jobs lock poisoned").values().cloned().collect())
    }

    fn update_job(&self, id: &str, change: &mut dyn FnMut(&mut JobRecord) -> bool) -> Result<Option<JobRecord>> {
        loop {
            let mut job = self.job(id)?;
            let from = job.version;
            if !change(&mut job) {
                return Ok(None);
            }
            job.version = from + 1;
            let bytes = serde_json::to_vec(&job)?;
            if self.write(Change::Job { job: job.clone(), bytes, from })? {
                return Ok(Some(job));
            }
            // Another change of this job got in first: redo this one on the fresh copy.
        }
    }

    fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        let key = (job_key(&record.job_id)?, record.step);
        self.write(Change::Checkpoint { key, bytes: serde_json::to_vec(record)? }).map(|_| ())
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
        self.write(Change::Agent { name: record.name.clone(), bytes: Some(serde_json::to_vec(record)?) }).map(|_| ())
    }

    fn set_drained(&self, name: &str, drained: bool) -> Result<bool> {
        self.write(Change::Drain { name: name.to_string(), drained })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.all(AGENTS)
    }

    fn delete_agent(&self, name: &str) -> Result<bool> {
        self.write(Change::Agent { name: name.to_string(), bytes: None })
    }

    fn put_token(&self, record: &TokenRecord) -> Result<()> {
        self.write(Change::Token { name: record.name.clone(), bytes: Some(serde_json::to_vec(record)?) }).map(|_| ())
    }

    fn delete_token(&self, name: &str) -> Result<bool> {
        self.write(Change::Token { name: name.to_string(), bytes: None })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.all(TOKENS)
    }

    fn put_dataset(&self, record: &DatasetRecord) -> Result<()> {
        let key = format!("{}/{}", record.name, record.version.sha256);
        self.write(Change::Dataset { name: key, bytes: Some(serde_json::to_vec(record)?) }).map(|_| ())
    }

    fn delete_dataset(&self, name: &str, sha256: &str) -> Result<bool> {
        self.write(Change::Dataset { name: format!("{name}/{sha256}"), bytes: None })
    }

    fn claim_dataset(&self, name: &str, owner: &str) -> Result<String> {
        loop {
            let change = Change::DatasetOwner { name: name.to_string(), owner: Some(owner.to_string()) };
            if self.write(change)? {
                return Ok(owner.to_string());
            }
            let txn = self.db.begin_read()?;
            if let Some(holder) = txn.open_table(DATASET_OWNERS)?.get(name)? {
                return Ok(holder.value().to_string());
            }
            // Freed between the two: claim again.
        }
    }

    fn release_dataset(&self, name: &str) -> Result<()> {
        self.write(Change::DatasetOwner { name: name.to_string(), owner: None }).map(|_| ())
    }

    fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        self.all(DATASETS)
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
