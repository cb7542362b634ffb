//! Job output on disk: one file per (job, attempt, rank) under `<data-dir>/jobs/<id>/logs/`.
//!
//! Agents upload numbered lines and may resend after a reconnect; a line is appended only once
//! (its sequence number is the file's line count), so retries never duplicate output. With object
//! storage, the files are also shipped there (`archive`), for the next leader.

mod archive;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::objects::Objects;

/// What stands for a line that never arrived.
const LOST: &str = "[gantry: line lost]";

/// The most lines a batch may say were lost before it (a bound on what a client can make us write).
const MAX_GAP: u64 = 100_000;

pub struct LogStore {
    root: PathBuf,
    /// Lines held per (job, attempt, rank); counted from the file on first use. A std mutex:
    /// held only around a file append, never across an await.
    next_seq: Mutex<HashMap<(String, u32, u32), u64>>,
    changed: tokio::sync::watch::Sender<u64>,
    archive: Option<archive::Archive>,
}

/// Where a reader of a job's logs is: how far it got in each file.
#[derive(Debug, Default, Clone)]
pub struct LogCursor {
    offsets: HashMap<PathBuf, u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub attempt: u32,
    pub rank: u32,
    pub text: String,
}

impl LogStore {
    pub fn new(jobs_dir: PathBuf) -> LogStore {
        LogStore {
            root: jobs_dir,
            next_seq: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            archive: None,
        }
    }

    /// Also keeps the logs in object storage.
    pub fn archive_to(&mut self, objects: Objects) {
        self.archive = Some(archive::Archive::new(objects));
    }

    pub fn archived(&self) -> bool {
        self.archive.is_some()
    }

    /// Brings a job's files up to what object storage holds; call before a job's first append
    /// or read in this process (later calls return at once).
    pub async fn restore(&self, job: &str) -> Result<()> {
        match &self.archive {
            Some(archive) => archive.restore(self, job).await,
            None => Ok(()),
        }
    }

    /// Ships what object storage does not hold yet.
    pub async fn ship(&self) -> Result<()> {
        match &self.archive {
            Some(archive) => archive.ship(self).await,
            None => Ok(()),
        }
    }

    /// Lines held per file appended to in this process.
    fn held(&self) -> Vec<((String, u32, u32), u64)> {
        self.next_seq.lock().expect("log index poisoned").iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Appends lines restored from object storage; the file then holds `lines` lines.
    fn append_restored(&self, job: &str, attempt: u32, rank: u32, text: &str, lines: u64) -> Result<()> {
        let mut seqs = self.next_seq.lock().expect("log index poisoned");
        append_text(&self.file(job, attempt, rank), text)?;
        seqs.insert((job.to_string(), attempt, rank), lines);
        drop(seqs);
        self.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    fn dir(&self, job: &str) -> PathBuf {
        self.root.join(job).join("logs")
    }

    fn file(&self, job: &str, attempt: u32, rank: u32) -> PathBuf {
        self.dir(job).join(format!("attempt-{attempt:04}-rank-{rank:04}.log"))
    }

    /// Appends the lines not held yet; returns the next sequence number expected.
    pub fn append(&self, job: &str, attempt: u32, rank: u32, first_seq: u64, lines: &[String]) -> Result<u64> {
        let path = self.file(job, attempt, rank);
        let mut seqs = self.next_seq.lock().expect("log index poisoned");
        let key = (job.to_string(), attempt, rank);
        let next = match seqs.get(&key) {
            Some(n) => *n,
            None => count_lines(&path)?,
        };
        if first_seq > next + MAX_GAP {
            return Err(Error::InvalidArgument(format!(
                "log batch starts at line {first_seq}, but only {next} lines are held: resend from {next}"
            )));
        }
        // Lines before `first_seq` that never arrived (lost with a crashed coordinator's page cache;
        // the agent has dropped them) are marked, so line numbers stay sequence numbers.
        let lost = first_seq.saturating_sub(next);
        let skip = next.saturating_sub(first_seq) as usize;
        let fresh = lines.get(skip..).unwrap_or(&[]);
        let mut marked: Vec<String> = (0..lost).map(|_| LOST.to_string()).collect();
        marked.extend(fresh.iter().cloned());
        let fresh = marked;
        if !fresh.is_empty() {
            let mut buf = String::with_capacity(fresh.iter().map(|l| l.len() + 1).sum());
            for line in &fresh {
                // A line never contains a newline: the agent splits on them.
                buf.push_str(&line.replace('\n', " "));
                buf.push('\n');
            }
            append_text(&path, &buf)?;
        }
        let next = next + fresh.len() as u64;
        seqs.insert(key, next);
        drop(seqs);
        self.changed.send_modify(|v| *v += 1);
        Ok(next)
    }

    /// A receiver that changes whenever any log grows: followers wait on it.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Complete lines written since `cursor`, attempts in order, then ranks.
    pub fn read_new(&self, job: &str, cursor: &mut LogCursor) -> Result<Vec<Line>> {
        let mut files: Vec<(u32, u32, PathBuf)> = match std::fs::read_dir(self.dir(job)) {
            Ok(entries) => entries.filter_map(|e| e.ok()).filter_map(|e| parse_name(&e.path())).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("listing logs")(e)),
        };
        files.sort();
        let mut out = Vec::new();
        for (attempt, rank, path) in files {
            let offset = cursor.offsets.entry(path.clone()).or_insert(0);
            let mut f = std::fs::File::open(&path).map_err(Error::io("opening a log"))?;
            f.seek(SeekFrom::Start(*offset)).map_err(Error::io("reading a log"))?;
            let mut bytes = Vec::new();
            f.read_to_end(&mut bytes).map_err(Error::io("reading a log"))?;
            // Only whole lines: a writer may be mid-append.
            let end = bytes.iter().rposition(|b| *b == b'\n').map(|p| p + 1).unwrap_or(0);
            for line in bytes[..end].split_inclusive(|b| *b == b'\n') {
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                out.push(Line { attempt, rank, text });
            }
            *offset += end as u64;
        }
        Ok(out)
    }
}

fn parse_name(path: &Path) -> Option<(u32, u32, PathBuf)> {
    let name = path.file_name()?.to_str()?.strip_prefix("attempt-")?.strip_suffix(".log")?;
    let (attempt, rank) = name.split_once("-rank-")?;
    Some((attempt.parse().ok()?, rank.parse().ok()?, path.to_path_buf()))
}

/// Appends whole lines to a log file, creating it (and its directory) if need be.
fn append_text(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("creating the log directory"))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(Error::io("appending logs"))
}

fn count_lines(path: &Path) -> Result<u64> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(BufReader::new(f).split(b'\n').count() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io("counting log lines")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("line {i}")).collect()
    }

    #[test]
    fn resent_lines_are_appended_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path().to_path_buf());
        assert_eq!(store.append("1", 1, 0, 0, &lines(0..5)).unwrap(), 5);
        assert_eq!(store.append("1", 1, 0, 3, &lines(3..8)).unwrap(), 8);
        // A restarted coordinator counts the file again.
        let again = LogStore::new(dir.path().to_path_buf());
        assert_eq!(again.append("1", 1, 0, 0, &lines(0..8)).unwrap(), 8);
        let mut cursor = LogCursor::default();
        let got: Vec<String> = again.read_new("1", &mut cursor).unwrap().into_iter().map(|l| l.text).collect();
        assert_eq!(got, lines(0..8));
        assert!(again.read_new("1", &mut cursor).unwrap().is_empty());
    }

    #[test]
    fn a_gap_is_marked_and_numbering_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path().to_path_buf());
        assert_eq!(store.append("1", 1, 0, 2, &lines(2..4)).unwrap(), 4);
        let got = store.read_new("1", &mut LogCursor::default()).unwrap();
        assert_eq!(got[0].text, "[gantry: line lost]");
        assert_eq!(got[3].text, "line 3");
    }

    #[test]
    fn attempts_are_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path().to_path_buf());
        store.append("1", 2, 0, 0, &["second".into()]).unwrap();
        store.append("1", 1, 0, 0, &["first".into()]).unwrap();
        let got = store.read_new("1", &mut LogCursor::default()).unwrap();
        assert_eq!(got.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["first", "second"]);
    }

    fn archived_store(dir: &Path, objects: &std::sync::Arc<object_store::memory::InMemory>) -> LogStore {
        let objects = Objects::new(objects.clone(), "cluster", "memory://cluster").unwrap();
        let mut store = LogStore::new(dir.to_path_buf());
        store.archive_to(objects);
        store
    }

    async fn all_lines(store: &LogStore, job: &str) -> Vec<String> {
        store.restore(job).await.unwrap();
        store.read_new(job, &mut LogCursor::default()).unwrap().into_iter().map(|l| l.text).collect()
    }

    #[tokio::test]
    async fn a_coordinator_with_an_empty_data_dir_restores_shipped_lines_and_goes_on() {
        let objects = std::sync::Arc::new(object_store::memory::InMemory::new());
        let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = archived_store(a.path(), &objects);
        leader.restore("1").await.unwrap();
        assert_eq!(leader.append("1", 1, 0, 0, &lines(0..5)).unwrap(), 5);
        leader.append("1", 1, 1, 0, &lines(100..102)).unwrap();
        leader.ship().await.unwrap();
        // Received after the last shipment: lost with this leader.
        leader.append("1", 1, 0, 5, &lines(5..8)).unwrap();

        let next = archived_store(b.path(), &objects);
        let mut want = lines(0..5);
        want.extend(lines(100..102));
        assert_eq!(all_lines(&next, "1").await, want);
        // The agent resends from its last acknowledged line (8): 5..8 are marked lost.
        assert_eq!(next.append("1", 1, 0, 8, &lines(8..10)).unwrap(), 10);
        next.ship().await.unwrap();

        let third = archived_store(c.path(), &objects);
        let mut want = lines(0..5);
        want.extend(std::iter::repeat_n(LOST.to_string(), 3));
        want.extend(lines(8..10));
        want.extend(lines(100..102));
        assert_eq!(all_lines(&third, "1").await, want);
    }

    #[tokio::test]
    async fn a_restarted_coordinator_ships_what_it_had_not() {
        let objects = std::sync::Arc::new(object_store::memory::InMemory::new());
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = archived_store(a.path(), &objects);
        first.restore("1").await.unwrap();
        first.append("1", 1, 0, 0, &lines(0..5)).unwrap();
        first.ship().await.unwrap();
        first.append("1", 1, 0, 5, &lines(5..8)).unwrap();
        // Same data directory, new process: it holds 8 lines, the archive 5.
        let again = archived_store(a.path(), &objects);
        assert_eq!(all_lines(&again, "1").await, lines(0..8));
        assert_eq!(again.append("1", 1, 0, 8, &lines(8..9)).unwrap(), 9);
        again.ship().await.unwrap();
        let elsewhere = archived_store(b.path(), &objects);
        assert_eq!(all_lines(&elsewhere, "1").await, lines(0..9));
        // Shipping again with nothing new writes nothing.
        use futures::StreamExt;
        let before = object_store::ObjectStore::list(objects.as_ref(), None).count().await;
        again.ship().await.unwrap();
        assert_eq!(object_store::ObjectStore::list(objects.as_ref(), None).count().await, before);
    }
}
