//! The node's cache of pushed data sets (`dataset://NAME@SHA256/PATH` in a job's spec) and of
//! the objects the coordinator read for it (`s3://BUCKET/KEY@SHA256`): both are versions named
//! by their content, fetched through the coordinator.
//!
//! Each version is fetched once into `WORK_DIR/datasets/<sha256>/` (`files/` and the
//! `manifest.json` it was fetched with) and shared by every job on the node, across agent
//! restarts. Every time a job starts on it, every file is hashed again and compared with the
//! manifest, and the manifest with the version's name: an entry that is not intact is fetched
//! again. Once the cache holds more than its limit, the versions no running job holds are
//! evicted, least recently used first. The files are root's and read-only to jobs.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use gantry_core::spec::Fetched;
use gantry_proto::v1;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::checkpoints::{describe_files, receive_files};
use crate::error::{Error, Result};

const MANIFEST: &str = "manifest.json";
const FILES: &str = "files";

pub struct DatasetCache {
    root: PathBuf,
    limit_bytes: u64,
    /// How many jobs hold each version; held versions are never evicted.
    holders: Mutex<HashMap<String, usize>>,
    /// One check or fetch of a version at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A version a job holds: kept on the node until dropped.
pub struct Lease {
    cache: Arc<DatasetCache>,
    sha256: String,
}

impl Lease {
    /// The folder of the version's files: what a job's container gets mounted, read-only.
    pub fn files(&self) -> PathBuf {
        self.cache.entry(&self.sha256).join(FILES)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut holders = self.cache.holders.lock().expect("holders lock");
        if let Some(n) = holders.get_mut(&self.sha256) {
            *n -= 1;
            if *n == 0 {
                holders.remove(&self.sha256);
            }
        }
    }
}

/// How a version was found, for the job's log.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// In the cache and intact.
    Cached,
    Fetched {
        bytes: u64,
    },
    /// In the cache but not intact (why), so fetched again.
    Refetched {
        why: String,
        bytes: u64,
    },
}

/// A cache entry, as eviction sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub sha256: String,
    pub bytes: u64,
    pub last_used: SystemTime,
    pub held: bool,
}

/// The entries to evict so that the rest fit in `limit` bytes: least recently used first, never
/// one a job holds (the cache may stay above its limit while they run).
pub fn to_evict(entries: &[Entry], limit: u64) -> Vec<String> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut by_age: Vec<&Entry> = entries.iter().filter(|e| !e.held).collect();
    by_age.sort_by_key(|e| e.last_used);
    let mut out = Vec::new();
    for e in by_age {
        if total <= limit {
            break;
        }
        total -= e.bytes;
        out.push(e.sha256.clone());
    }
    out
}

/// A version's name: sha256 over "path sha256\n" of its files, sorted by path (as the
/// coordinator names it).
pub fn fingerprint(files: &[v1::FileDigest]) -> String {
    let mut sorted: Vec<&v1::FileDigest> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = Sha256::new();
    for f in sorted {
        h.update(format!("{} {}\n", f.path, f.sha256));
    }
    hex::encode(h.finalize())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    files: Vec<(String, u64, String)>,
}

impl Manifest {
    fn of(files: &[v1::FileDigest]) -> Manifest {
        Manifest { files: files.iter().map(|f| (f.path.clone(), f.size, f.sha256.clone())).collect() }
    }

    fn digests(&self) -> Vec<v1::FileDigest> {
        let mut out: Vec<v1::FileDigest> = self
            .files
            .iter()
            .map(|(path, size, sha256)| v1::FileDigest { path: path.clone(), size: *size, sha256: sha256.clone() })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

impl DatasetCache {
    pub fn new(root: PathBuf, limit_bytes: u64) -> DatasetCache {
        DatasetCache { root, limit_bytes, holders: Mutex::default(), locks: Mutex::default() }
    }

    fn entry(&self, sha256: &str) -> PathBuf {
        self.root.join(sha256)
    }

    /// Version `sha256`'s files, checked, or fetched with `fetch` (which writes them into the
    /// folder it is given, verified, and returns their digests) when absent or not intact.
    pub async fn acquire<F, Fut>(self: &Arc<Self>, sha256: &str, fetch: F) -> Result<(Lease, PathBuf, Found)>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<Vec<v1::FileDigest>>>,
    {
        if !(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(Error::Dataset(format!("`{sha256}` is not a data set version")));
        }
        // Held from now: an eviction by another job must not remove what this one checks.
        *self.holders.lock().expect("holders lock").entry(sha256.to_string()).or_default() += 1;
        let lease = Lease { cache: self.clone(), sha256: sha256.to_string() };
        let lock = self.locks.lock().expect("locks lock").entry(sha256.to_string()).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        let entry = self.entry(sha256);
        let found = match self.check(sha256).await {
            Ok(()) => Found::Cached,
            Err(why) => {
                let existed = entry.exists();
                let bytes = self.fetch_into(sha256, fetch).await?;
                match existed {
                    true => Found::Refetched { why, bytes },
                    false => Found::Fetched { bytes },
                }
            }
        };
        // Its age for eviction: the last time a job started on it.
        if let Ok(dir) = std::fs::File::open(&entry) {
            let _ = dir.set_modified(SystemTime::now());
        }
        self.evict();
        Ok((lease, entry.join(FILES), found))
    }

    /// Whether the entry is there and intact; why not, if not.
    async fn check(&self, sha256: &str) -> std::result::Result<(), String> {
        let entry = self.entry(sha256);
        if !entry.exists() {
            return Err("not cached".into());
        }
        let sha = sha256.to_string();
        let checked = tokio::task::spawn_blocking(move || -> std::result::Result<(), String> {
            let text = std::fs::read(entry.join(MANIFEST)).map_err(|e| format!("its manifest: {e}"))?;
            let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| format!("its manifest: {e}"))?;
            let want = manifest.digests();
            if fingerprint(&want) != sha {
                return Err("its manifest does not match the version".into());
            }
            let files = entry.join(FILES);
            let got = describe_files(&files, &files).map_err(|e| e.to_string())?;
            if let Some(bad) = differs(&want, &got.files) {
                return Err(bad);
            }
            Ok(())
        });
        checked.await.map_err(|e| format!("checking failed: {e}"))?
    }

    async fn fetch_into<F, Fut>(&self, sha256: &str, fetch: F) -> Result<u64>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: Future<Output = Result<Vec<v1::FileDigest>>>,
    {
        let entry = self.entry(sha256);
        let incoming = self.root.join(format!(".incoming-{sha256}"));
        if incoming.exists() {
            std::fs::remove_dir_all(&incoming).map_err(Error::io(format!("removing {}", incoming.display())))?;
        }
        std::fs::create_dir_all(&incoming).map_err(Error::io(format!("creating {}", incoming.display())))?;
        let fetched = fetch(incoming.join(FILES)).await;
        let files = match fetched {
            Ok(files) if fingerprint(&files) == sha256 => files,
            Ok(_) => {
                let _ = std::fs::remove_dir_all(&incoming);
                return Err(Error::Dataset(format!("the coordinator sent another version than {sha256}")));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&incoming);
                return Err(e);
            }
        };
        let manifest = serde_json::to_vec(&Manifest::of(&files)).map_err(|e| Error::Dataset(e.to_string()))?;
        std::fs::write(incoming.join(MANIFEST), manifest).map_err(Error::io("writing a data set's manifest"))?;
        // Whole or not at all: a crash leaves an `.incoming-` folder, removed by the next fetch.
        // A copy found corrupt is swapped out, not removed first: a job reading it keeps its
        // open files, and every path resolves to an intact copy at any moment. (A container
        // running meanwhile keeps the mount of the old folder, which is removed: it sees it
        // empty, not corrupt.)
        let replaced = self.root.join(format!(".replaced-{sha256}"));
        let _ = std::fs::remove_dir_all(&replaced);
        if entry.exists() {
            std::fs::rename(&entry, &replaced).map_err(Error::io(format!("moving {} aside", entry.display())))?;
        }
        std::fs::rename(&incoming, &entry).map_err(Error::io(format!("moving {} into place", entry.display())))?;
        let _ = std::fs::remove_dir_all(&replaced);
        Ok(files.iter().map(|f| f.size).sum())
    }

    /// Every complete entry, with its size and age.
    fn entries(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let holders = self.holders.lock().expect("holders lock").clone();
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                let sha256 = e.file_name().to_str()?.to_string();
                if sha256.starts_with('.') {
                    return None;
                }
                let text = std::fs::read(e.path().join(MANIFEST)).ok();
                let bytes = text
                    .and_then(|t| serde_json::from_slice::<Manifest>(&t).ok())
                    .map_or(0, |m| m.files.iter().map(|f| f.1).sum());
                let last_used = e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let held = holders.contains_key(&sha256);
                Some(Entry { sha256, bytes, last_used, held })
            })
            .collect()
    }

    fn evict(&self) {
        for sha256 in to_evict(&self.entries(), self.limit_bytes) {
            let entry = self.entry(&sha256);
            let doomed = self.root.join(format!(".evicting-{sha256}"));
            {
                // Taken by a job since the listing: kept. Otherwise moved aside while no job can
                // take it, so a job that takes it next finds it absent and fetches it.
                let holders = self.holders.lock().expect("holders lock");
                if holders.contains_key(&sha256) || std::fs::rename(&entry, &doomed).is_err() {
                    continue;
                }
            }
            match std::fs::remove_dir_all(&doomed) {
                Ok(()) => tracing::info!(%sha256, "evicted a data set version from the cache"),
                Err(e) => tracing::warn!(%sha256, error = %e, "could not evict a data set version"),
            }
        }
    }
}

/// The first way `got` (on disk) differs from `want` (the manifest), if any.
fn differs(want: &[v1::FileDigest], got: &[v1::FileDigest]) -> Option<String> {
    for w in want {
        match got.iter().find(|g| g.path == w.path) {
            None => return Some(format!("`{}` is missing", w.path)),
            Some(g) if g.size != w.size || g.sha256 != w.sha256 => {
                return Some(format!("`{}` does not match its sha256", w.path));
            }
            Some(_) => {}
        }
    }
    got.iter().find(|g| !want.iter().any(|w| w.path == g.path)).map(|g| format!("`{}` is not in it", g.path))
}

/// Fetches version `sha256` from the coordinator into `dest`, verified; returns its digests.
pub async fn download(
    client: &mut crate::coordinators::Client,
    sha256: &str,
    name: String,
    dest: &Path,
) -> Result<Vec<v1::FileDigest>> {
    use v1::dataset_data::Part;
    let req = v1::DownloadDatasetRequest { sha256: sha256.to_string(), name };
    let mut stream = client.download_dataset(req).await?.into_inner();
    let header = match stream.next().await {
        Some(Ok(v1::DatasetData { part: Some(Part::Header(h)) })) => h,
        Some(Err(e)) => return Err(e.into()),
        _ => return Err(Error::Dataset("download did not start with a header".into())),
    };
    let chunks = stream.map(|part| match part?.part {
        Some(Part::Chunk(chunk)) => Ok(chunk),
        _ => Err(Error::Dataset("unexpected second header".into())),
    });
    receive_files(dest, &header.files, chunks).await?;
    Ok(header.files)
}

/// Replaces every pinned `dataset://` and `s3://` reference of `paths` by the cached path, fetching what
/// the node lacks. The leases keep those versions on the node while the job runs; `log` gets
/// one line per version.
pub async fn resolve(
    cache: &Arc<DatasetCache>,
    paths: Vec<(String, &mut String)>,
    coordinators: &crate::coordinators::Coordinators,
    log: &mut Vec<String>,
) -> Result<Vec<Lease>> {
    let mut leases = Vec::new();
    for (field, path) in paths {
        let Some(parsed) = Fetched::parse(path) else { continue };
        let r = parsed.map_err(|why| Error::Dataset(format!("{field}: {why}")))?;
        let Some(version) = r.version() else {
            return Err(Error::Dataset(format!("{field}: `{path}` names no version (the coordinator pins it)")));
        };
        let name = r.label();
        let at = match &r {
            Fetched::Pushed(_) => format!("data set {name}"),
            Fetched::S3(_) => name.clone(),
        };
        let mut client = coordinators.client();
        let record = r.record_name();
        let fetch = |dest: PathBuf| async move { download(&mut client, version, record, &dest).await };
        let (lease, files, found) = cache.acquire(version, fetch).await.map_err(|e| match (&r, e) {
            // Read where they are, S3 objects can change after the pin; a pushed copy cannot.
            (Fetched::S3(_), Error::Mismatch) => Error::Dataset(format!(
                "{name}: the objects no longer hold the bytes the job was pinned to when it was accepted \
                 (changed in the bucket since?): submit the job again to read them as they are now"
            )),
            (_, e) => Error::Dataset(format!("{name}: {e}")),
        })?;
        log.push(match found {
            Found::Cached => format!("{at}: in this node's cache, verified"),
            Found::Fetched { bytes } => format!("{at}: fetched {bytes} bytes into this node's cache"),
            Found::Refetched { why, bytes } => {
                format!("{at}: the cached copy is corrupt ({why}): fetched {bytes} bytes again")
            }
        });
        *path = local_path(&files, r.path_in_version()).display().to_string();
        leases.push(lease);
    }
    Ok(leases)
}

/// The cached path `path` of a version means: "" is the whole version, its one file when it is
/// a single file at the top (a pushed file), else the folder.
fn local_path(files: &Path, path: &str) -> PathBuf {
    if !path.is_empty() {
        return files.join(path);
    }
    let entries: Vec<_> = std::fs::read_dir(files).map(|d| d.filter_map(|e| e.ok()).collect()).unwrap_or_default();
    match entries.as_slice() {
        [only] if only.file_type().is_ok_and(|t| t.is_file()) => only.path(),
        _ => files.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(path: &str, data: &[u8]) -> v1::FileDigest {
        v1::FileDigest { path: path.into(), size: data.len() as u64, sha256: hex::encode(Sha256::digest(data)) }
    }

    /// A stand-in for the coordinator: writes `files` into the folder and counts its calls.
    fn source(
        files: &'static [(&'static str, &'static [u8])],
        calls: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl FnOnce(PathBuf) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<v1::FileDigest>>> + Send>> {
        move |dest| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                for (path, data) in files {
                    let target = dest.join(path);
                    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                    std::fs::write(target, data).unwrap();
                }
                Ok(files.iter().map(|(p, d)| digest(p, d)).collect())
            })
        }
    }

    const WINE: &[(&str, &[u8])] = &[("wine.csv", b"a,b\n1,2\n")];
    const PICS: &[(&str, &[u8])] = &[("0/a.png", b"0123456789"), ("1/b.png", b"abcdefghij")];

    fn version(files: &[(&str, &[u8])]) -> String {
        fingerprint(&files.iter().map(|(p, d)| digest(p, d)).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn a_version_is_fetched_once_shared_kept_across_restarts_and_fetched_again_when_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sha = version(WINE);
        let cache = Arc::new(DatasetCache::new(dir.path().to_path_buf(), 1 << 30));
        let (_a, files, found) = cache.acquire(&sha, source(WINE, calls.clone())).await.unwrap();
        assert_eq!(found, Found::Fetched { bytes: 8 });
        assert_eq!(std::fs::read(files.join("wine.csv")).unwrap(), b"a,b\n1,2\n");
        let (_b, _, found) = cache.acquire(&sha, source(WINE, calls.clone())).await.unwrap();
        assert_eq!(found, Found::Cached);
        // A new cache on the same folder: an agent restarted.
        let cache = Arc::new(DatasetCache::new(dir.path().to_path_buf(), 1 << 30));
        let (_c, _, found) = cache.acquire(&sha, source(WINE, calls.clone())).await.unwrap();
        assert_eq!(found, Found::Cached);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        std::fs::write(files.join("wine.csv"), b"a,b\n1,3\n").unwrap();
        let (_d, _, found) = cache.acquire(&sha, source(WINE, calls.clone())).await.unwrap();
        assert_eq!(found, Found::Refetched { why: "`wine.csv` does not match its sha256".into(), bytes: 8 });
        assert_eq!(std::fs::read(files.join("wine.csv")).unwrap(), b"a,b\n1,2\n");
        std::fs::write(files.join("extra.txt"), b"x").unwrap();
        let (_e, _, found) = cache.acquire(&sha, source(WINE, calls.clone())).await.unwrap();
        assert!(matches!(found, Found::Refetched { why, .. } if why == "`extra.txt` is not in it"));
    }

    #[tokio::test]
    async fn what_the_source_sends_must_be_the_version_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(DatasetCache::new(dir.path().to_path_buf(), 1 << 30));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let Err(e) = cache.acquire(&version(PICS), source(WINE, calls)).await else { panic!("another version kept") };
        assert!(e.to_string().contains("another version"), "{e}");
        assert!(!dir.path().join(version(PICS)).exists());
    }

    const TEXT: &[(&str, &[u8])] = &[("a.txt", b"hello")];

    #[tokio::test]
    async fn versions_no_job_holds_are_evicted_oldest_first_above_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (wine, pics, text) = (version(WINE), version(PICS), version(TEXT));
        // Held by a running job: kept even above the limit.
        let cache = Arc::new(DatasetCache::new(dir.path().to_path_buf(), 10));
        let held = cache.acquire(&wine, source(WINE, calls.clone())).await.unwrap();
        let pics_lease = cache.acquire(&pics, source(PICS, calls.clone())).await.unwrap();
        assert!(dir.path().join(&wine).exists() && dir.path().join(&pics).exists());
        drop((held, pics_lease));
        // 8 + 20 + 5 bytes against a limit of 30: the least recently used one goes (wine, not
        // the larger pics), and only as many as needed.
        let cache = Arc::new(DatasetCache::new(dir.path().to_path_buf(), 30));
        for (sha, files) in [(&wine, WINE), (&pics, PICS)] {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _used = cache.acquire(sha, source(files, calls.clone())).await.unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _text = cache.acquire(&text, source(TEXT, calls.clone())).await.unwrap();
        let left: Vec<bool> = [&wine, &pics, &text].iter().map(|s| dir.path().join(s).exists()).collect();
        assert_eq!(left, [false, true, true]);
        assert!(!dir.path().join(format!(".evicting-{wine}")).exists());
    }

    #[test]
    fn eviction_takes_the_oldest_unheld_until_under_the_limit() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let e = |sha: &str, bytes, age, held| Entry { sha256: sha.into(), bytes, last_used: at(age), held };
        let entries = [e("a", 10, 1, true), e("b", 10, 2, false), e("c", 10, 3, false), e("d", 10, 4, false)];
        assert_eq!(to_evict(&entries, 40), Vec::<String>::new());
        assert_eq!(to_evict(&entries, 30), ["b"]);
        assert_eq!(to_evict(&entries, 25), ["b", "c"]);
        assert_eq!(to_evict(&entries, 0), ["b", "c", "d"]);
    }

    #[test]
    fn a_pushed_file_is_its_version_and_a_pushed_folder_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("wine.csv"), b"x").unwrap();
        assert_eq!(local_path(dir.path(), ""), dir.path().join("wine.csv"));
        assert_eq!(local_path(dir.path(), "wine.csv"), dir.path().join("wine.csv"));
        std::fs::create_dir(dir.path().join("more")).unwrap();
        assert_eq!(local_path(dir.path(), ""), dir.path());
    }
}
