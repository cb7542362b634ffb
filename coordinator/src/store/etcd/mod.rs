//! The etcd backend: state in etcd, so a coordinator can die and another take over.
//!
//! Leadership and fencing: a coordinator writes only while it holds the leader key, a key bound
//! to its lease. The key's create revision is its fencing token, and every write is one etcd
//! transaction that also compares the leader key's create revision with that token. A leader
//! that lost its lease (paused, partitioned) finds the key gone or re-created by its successor,
//! and its write is refused whatever its own clock says.
//!
//! Reads come from memory: only the leader writes, so after loading everything once it knows
//! every job. Each change is committed to etcd before the cache and the caller see it.
//!
//! Keys, under the prefix: `jobs/<seq, 20 digits>`, `checkpoints/<job>/<step>`,
//! `agents/<name>`, and `leader`. Values are the same JSON records as the embedded store's.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions};
use tracing::info;

mod leader;
mod writer;

pub use leader::leader_of;
use leader::{campaign, keep_alive};
use writer::{Write, write_batches};

use super::{StateStore, job_key};
use crate::auth::TokenRecord;
use crate::error::{Error, Result};
use crate::records::{AgentRecord, CheckpointRecord, DatasetRecord, JobRecord};

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Every key lives under it: one etcd can serve several gantry clusters (and tests).
    pub prefix: String,
    /// How to reach this coordinator, written in the leader key while it leads: followers
    /// forward there (see [`leader_of`]).
    pub name: String,
    /// How long a silent leader keeps the leader key.
    pub lease_ttl: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/gantry".into(),
            name: "coordinator".into(),
            lease_ttl: Duration::from_secs(3),
        }
    }
}

pub struct EtcdStore {
    /// The store's own runtime: the contract is synchronous and may be called from any thread,
    /// the coordinator's runtime included.
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    lease: i64,
    /// The leader key's create revision: every write requires it unchanged.
    token: i64,
    cache: Mutex<Cache>,
    /// Set when etcd no longer renews the lease: the store is deposed.
    lost: Arc<AtomicBool>,
    /// Set by tests: renewals stop, as if the process were paused; nothing else changes.
    paused: Arc<AtomicBool>,
    /// To the writer task, which commits concurrent writes together.
    writes: tokio::sync::mpsc::UnboundedSender<Write>,
}

#[derive(Default)]
struct Cache {
    /// Every job by sequence number, with the mod revision of its key.
    jobs: BTreeMap<u64, (JobRecord, i64)>,
    next_id: u64,
}

fn etcd(e: etcd_client::Error) -> Error {
    Error::Store { backend: "etcd", source: Box::new(e) }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl EtcdStore {
    /// Connects, waits to become the leader (campaigning while another coordinator holds the
    /// leader key), then loads the jobs.
    pub fn connect(options: EtcdOptions) -> Result<EtcdStore> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(Error::io("starting the etcd client's runtime"))?;
        let prefix = options.prefix.trim_end_matches('/').to_string();
        let ttl = options.lease_ttl.as_secs().max(1) as i64;
        let (client, lease, token, lost, paused) = rt.block_on(async {
            let connect =
                ConnectOptions::new().with_connect_timeout(Duration::from_secs(3)).with_timeout(Duration::from_secs(5));
            let mut client = Client::connect(&options.endpoints, Some(connect)).await.map_err(etcd)?;
            let lease = client.lease_grant(ttl, None).await.map_err(etcd)?.id();
            let (lost, paused) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
            tokio::spawn(keep_alive(client.clone(), lease, ttl, lost.clone(), paused.clone()));
            let token = campaign(&mut client, &format!("{prefix}/leader"), &options.name, lease).await?;
            Ok::<_, Error>((client, lease, token, lost, paused))
        })?;
        info!(name = %options.name, token, "leading: holding the etcd leader key");
        let (writes, queue) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(write_batches(client.clone(), format!("{prefix}/leader"), token, queue));
        let store =
            EtcdStore { rt: Some(rt), client, prefix, lease, token, cache: Mutex::default(), lost, paused, writes };
        store.load()?;
        Ok(store)
    }

    /// The fencing token: the leader key's create revision.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Stops renewing the lease, as a paused (SIGSTOP) or cut-off leader would, without telling
    /// the rest of the store: what stops its writes then is etcd's fencing alone. For tests.
    pub fn pause_renewals(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.rt.as_ref().expect("the runtime lives as long as the store");
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the etcd store's runtime stopped")
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    fn job_key(seq: u64) -> String {
        format!("jobs/{seq:020}")
    }

    /// The value and mod revision of every key under `rest`, in key order, a page at a time.
    fn range(&self, rest: &str) -> Result<Vec<(Vec<u8>, i64)>> {
        let (start, end) = (self.key(rest), prefix_end(&self.key(rest)));
        let mut client = self.client.clone();
        self.block(async move {
            let mut out = Vec::new();
            let mut from = start.into_bytes();
            loop {
                let options = GetOptions::new().with_range(end.clone()).with_limit(1000);
                let resp = client.get(from.clone(), Some(options)).await.map_err(etcd)?;
                for kv in resp.kvs() {
                    out.push((kv.value().to_vec(), kv.mod_revision()));
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        from = last.key().to_vec();
                        from.push(0);
                    }
                    _ => return Ok(out),
                }
            }
        })
    }

    fn load(&self) -> Result<()> {
        let mut cache = Cache::default();
        for (value, rev) in self.range("jobs/")? {
            let job: JobRecord = serde_json::from_slice(&value)?;
            cache.next_id = cache.next_id.max(job.seq);
            cache.jobs.insert(job.seq, (job, rev));
        }
        cache.next_id += 1;
        *self.cache.lock().expect("cache lock poisoned") = cache;
        Ok(())
    }

    /// Writes `value` at `key` if `condition` holds and this store still leads. Returns the
    /// revision of the commit, or `None` when `condition` failed.
    fn commit(&self, key: String, condition: Option<Compare>, value: Option<Vec<u8>>) -> Result<Option<i64>> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(Error::Fenced("this coordinator's etcd lease is gone".into()));
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.writes
            .send(Write { key, condition, value, reply })
            .map_err(|_| Error::store("etcd")("the etcd writer stopped".into()))?;
        answer.recv().map_err(|_| Error::store("etcd")("the etcd writer stopped".into()))?
    }

    fn put(&self, key: String, value: Vec<u8>) -> Result<i64> {
        let revision = self.commit(key, None, Some(value))?;
        revision.ok_or_else(|| Error::store("etcd")("etcd refused an unconditional write".into()))
    }

    /// A job read from etcd itself, after a conflict.
    fn fetch_job(&self, seq: u64) -> Result<Option<(JobRecord, i64)>> {
        let key = self.key(&Self::job_key(seq));
        let mut client = self.client.clone();
        let resp = self.block(async move { client.get(key, None).await }).map_err(etcd)?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some((serde_json::from_slice(kv.value())?, kv.mod_revision()))),
            None => Ok(None),
        }
    }
}

impl Drop for EtcdStore {
    /// Hands leadership over at once rather than after the lease's TTL.
    fn drop(&mut self) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            let (mut client, lease) = (self.client.clone(), self.lease);
            self.block(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
            });
        }
        // Without waiting: the store may be dropped on another runtime's thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl StateStore for EtcdStore {
    fn insert_job(&self, make: &mut dyn FnMut(u64) -> JobRecord) -> Result<JobRecord> {
        let seq = {
            let mut cache = self.cache.lock().expect("cache lock poisoned");
            cache.next_id += 1;
            cache.next_id - 1
        };
        let job = make(seq);
        let key = self.key(&Self::job_key(seq));
        let absent = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
        match self.commit(key, Some(absent), Some(serde_json::to_vec(&job)?))? {
            Some(rev) => {
                self.cache.lock().expect("cache lock poisoned").jobs.insert(seq, (job.clone(), rev));
                Ok(job)
            }
            None => Err(Error::store("etcd")(
                format!("job id {seq} is taken: another writer without the leader key").into(),
            )),
        }
    }

    fn job(&self, id: &str) -> Result<JobRecord> {
        let seq = job_key(id)?;
        let cache = self.cache.lock().expect("cache lock poisoned");
        cache.jobs.get(&seq).map(|(j, _)| j.clone()).ok_or_else(|| Error::JobNotFound(id.to_string()))
    }

    fn jobs(&self) -> Result<Vec<JobRecord>> {
        Ok(self.cache.lock().expect("cache lock poisoned").jobs.values().map(|(j, _)| j.clone()).collect())
    }

    fn update_job(&self, id: &str, change: &mut dyn FnMut(&mut JobRecord) -> bool) -> Result<Option<JobRecord>> {
        let seq = job_key(id)?;
        let mut current = {
            let cache = self.cache.lock().expect("cache lock poisoned");
            cache.jobs.get(&seq).cloned().ok_or_else(|| Error::JobNotFound(id.to_string()))?
        };
        loop {
            let (mut job, rev) = current;
            if !change(&mut job) {
                return Ok(None);
            }
            job.version += 1;
            let key = self.key(&Self::job_key(seq));
            let same = Compare::mod_revision(key.clone(), CompareOp::Equal, rev);
            if let Some(new_rev) = self.commit(key, Some(same), Some(serde_json::to_vec(&job)?))? {
                let mut cache = self.cache.lock().expect("cache lock poisoned");
                cache.jobs.insert(seq, (job.clone(), new_rev));
                return Ok(Some(job));
            }
            // Changed underneath (a concurrent update of the same job): start from etcd's copy.
            current = self.fetch_job(seq)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
            self.cache.lock().expect("cache lock poisoned").jobs.insert(seq, current.clone());
        }
    }

    fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        let key = self.key(&format!("checkpoints/{:020}/{:020}", job_key(&record.job_id)?, record.step));
        self.put(key, serde_json::to_vec(record)?).map(|_| ())
    }

    fn checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let rest = format!("checkpoints/{:020}/", job_key(job_id)?);
        self.range(&rest)?.into_iter().map(|(v, _)| Ok(serde_json::from_slice(&v)?)).collect()
    }

    fn put_agent(&self, record: &AgentRecord) -> Result<()> {
        self.put(self.key(&format!("agents/{}", record.name)), serde_json::to_vec(record)?).map(|_| ())
    }

    fn set_drained(&self, name: &str, drained: bool) -> Result<bool> {
        let key = self.key(&format!("agents/{name}"));
        loop {
            let mut client = self.client.clone();
            let k = key.clone();
            let resp = self.block(async move { client.get(k, None).await }).map_err(etcd)?;
            let Some(kv) = resp.kvs().first() else { return Ok(false) };
            let mut record: AgentRecord = serde_json::from_slice(kv.value())?;
            record.drained = drained;
            let same = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
            if self.commit(key.clone(), Some(same), Some(serde_json::to_vec(&record)?))?.is_some() {
                return Ok(true);
            }
        }
    }

    fn deposed(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.range("agents/")?.into_iter().map(|(v, _)| Ok(serde_json::from_slice(&v)?)).collect()
    }

    fn put_token(&self, record: &TokenRecord) -> Result<()> {
        self.put(self.key(&format!("tokens/{}", record.name)), serde_json::to_vec(record)?).map(|_| ())
    }

    fn delete_agent(&self, name: &str) -> Result<bool> {
        let key = self.key(&format!("agents/{name}"));
        let present = Compare::create_revision(key.clone(), CompareOp::Greater, 0);
        Ok(self.commit(key, Some(present), None)?.is_some())
    }

    fn delete_token(&self, name: &str) -> Result<bool> {
        let key = self.key(&format!("tokens/{name}"));
        // Only an existing key is deleted, so the answer says whether there was one.
        let present = Compare::create_revision(key.clone(), CompareOp::Greater, 0);
        Ok(self.commit(key, Some(present), None)?.is_some())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>> {
        self.range("tokens/")?.into_iter().map(|(v, _)| Ok(serde_json::from_slice(&v)?)).collect()
    }

    fn put_dataset(&self, record: &DatasetRecord) -> Result<()> {
        let key = self.key(&format!("datasets/{}/{}", record.name, record.version.sha256));
        self.put(key, serde_json::to_vec(record)?).map(|_| ())
    }

    fn delete_dataset(&self, name: &str, sha256: &str) -> Result<bool> {
        let key = self.key(&format!("datasets/{name}/{sha256}"));
        let present = Compare::create_revision(key.clone(), CompareOp::Greater, 0);
        Ok(self.commit(key, Some(present), None)?.is_some())
    }

    fn claim_dataset(&self, name: &str, owner: &str) -> Result<String> {
        let key = self.key(&format!("dataset-owners/{name}"));
        loop {
            let absent = Compare::create_revision(key.clone(), CompareOp::Equal, 0);
            if self.commit(key.clone(), Some(absent), Some(owner.as_bytes().to_vec()))?.is_some() {
                return Ok(owner.to_string());
            }
            let mut client = self.client.clone();
            let read = key.clone();
            let resp = self.block(async move { client.get(read, None).await }).map_err(etcd)?;
            if let Some(kv) = resp.kvs().first() {
                return Ok(String::from_utf8_lossy(kv.value()).into_owned());
            }
            // Freed between the two: claim again.
        }
    }

    fn release_dataset(&self, name: &str) -> Result<()> {
        self.commit(self.key(&format!("dataset-owners/{name}")), None, None).map(|_| ())
    }

    fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        self.range("datasets/")?.into_iter().map(|(v, _)| Ok(serde_json::from_slice(&v)?)).collect()
    }
}
