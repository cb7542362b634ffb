//! Job output in object storage, so that a new leader has the lines its predecessor received:
//! each log file's new lines are shipped as a segment object,
//! `PREFIX/jobs/<id>/logs/attempt-AAAA-rank-RRRR/<first>-<end>.log` (lines `first..end`), and a
//! coordinator restores a job's files from those segments the first time it touches that job.
//!
//! Lines received but not shipped yet when a leader dies are lost: an agent resends only what
//! was not acknowledged, so they show as `[gantry: line lost]` (numbering is kept).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;
use object_store::path::Path as Key;

use super::{LOST, LogStore};
use crate::error::{Error, Result};
use crate::objects::Objects;

pub struct Archive {
    objects: Objects,
    /// Jobs whose archived lines are in the local files. Held while one is restored: a job's
    /// first append or read waits for it.
    restored: tokio::sync::Mutex<HashSet<String>>,
    /// Per (job, attempt, rank): how much of the local file is in object storage.
    shipped: std::sync::Mutex<HashMap<(String, u32, u32), Shipped>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Shipped {
    lines: u64,
    bytes: u64,
}

/// One archived segment: lines `first..end` of a file.
struct Segment {
    first: u64,
    end: u64,
    key: Key,
}

impl Archive {
    pub fn new(objects: Objects) -> Archive {
        Archive { objects, restored: Default::default(), shipped: Default::default() }
    }

    fn segment_key(&self, job: &str, attempt: u32, rank: u32, first: u64, end: u64) -> Key {
        self.objects
            .job(job)
            .child("logs")
            .child(format!("attempt-{attempt:04}-rank-{rank:04}"))
            .child(format!("{first:012}-{end:012}.log"))
    }

    /// Brings the job's local files up to what is archived, once per process.
    pub async fn restore(&self, store: &LogStore, job: &str) -> Result<()> {
        let mut restored = self.restored.lock().await;
        if restored.contains(job) {
            return Ok(());
        }
        let mut files: BTreeMap<(u32, u32), Vec<Segment>> = BTreeMap::new();
        for meta in self.objects.list(&self.objects.job(job).child("logs")).await? {
            if let Some((attempt, rank, first, end)) = parse_segment(&meta.location) {
                files.entry((attempt, rank)).or_default().push(Segment { first, end, key: meta.location });
            }
        }
        for ((attempt, rank), mut segments) in files {
            segments.sort_by_key(|s| s.first);
            let path = store.file(job, attempt, rank);
            let archived = segments.iter().map(|s| s.end).max().unwrap_or(0);
            // One read of the local file: its lines, and where the archived part ends.
            let (mut held, mut bytes) = lines_and_offset(&path, archived)?;
            if archived > held {
                let mut text = String::new();
                for segment in &segments {
                    if segment.end <= held {
                        continue;
                    }
                    let data = self.objects.get(&segment.key).await?;
                    for _ in held..segment.first {
                        text.push_str(LOST);
                        text.push('\n');
                    }
                    held = held.max(segment.first);
                    for line in data.split_inclusive(|b| *b == b'\n').skip((held - segment.first) as usize) {
                        text.push_str(&String::from_utf8_lossy(line));
                    }
                    held = segment.end;
                }
                store.append_restored(job, attempt, rank, &text, held)?;
                // The file held fewer lines than were archived: it now ends where they do.
                bytes += text.len() as u64;
            }
            let key = (job.to_string(), attempt, rank);
            self.shipped.lock().expect("shipped poisoned").insert(key, Shipped { lines: archived, bytes });
        }
        restored.insert(job.to_string());
        Ok(())
    }

    /// Ships every file's lines that are not in object storage yet.
    pub async fn ship(&self, store: &LogStore) -> Result<()> {
        let held = store.held();
        for ((job, attempt, rank), lines) in held {
            let key = (job.clone(), attempt, rank);
            let from = self.shipped.lock().expect("shipped poisoned").get(&key).copied().unwrap_or_default();
            if lines <= from.lines {
                continue;
            }
            let path = store.file(&job, attempt, rank);
            let data = read_whole_lines(&path, from.bytes)?;
            let count = data.iter().filter(|b| **b == b'\n').count() as u64;
            if count == 0 {
                continue;
            }
            let (bytes, end) = (data.len() as u64, from.lines + count);
            self.objects.put(&self.segment_key(&job, attempt, rank, from.lines, end), Bytes::from(data)).await?;
            let next = Shipped { lines: end, bytes: from.bytes + bytes };
            self.shipped.lock().expect("shipped poisoned").insert(key, next);
        }
        Ok(())
    }
}

/// `.../attempt-AAAA-rank-RRRR/FIRST-END.log` -> (attempt, rank, first, end).
fn parse_segment(key: &Key) -> Option<(u32, u32, u64, u64)> {
    let mut parts: Vec<String> = key.parts().map(|p| p.as_ref().to_string()).collect();
    let segment = parts.pop()?;
    let file = parts.pop()?;
    let (attempt, rank) = file.strip_prefix("attempt-")?.split_once("-rank-")?;
    let (first, end) = segment.strip_suffix(".log")?.split_once('-')?;
    Some((attempt.parse().ok()?, rank.parse().ok()?, first.parse().ok()?, end.parse().ok()?))
}

/// The bytes from `offset` to the end of the last whole line.
fn read_whole_lines(path: &Path, offset: u64) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
    f.seek(SeekFrom::Start(offset)).map_err(Error::io("reading a log"))?;
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(Error::io("reading a log"))?;
    data.truncate(data.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1));
    Ok(data)
}

/// The file's lines (a last one without its line break counts), and where line `n` (counted
/// from 0) starts: the file's length if it has fewer lines. A missing file has none.
fn lines_and_offset(path: &Path, n: u64) -> Result<(u64, u64)> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(Error::io("reading a log")(e)),
    };
    let (mut lines, mut offset) = (0u64, 0u64);
    let mut reader = BufReader::new(f);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line).map_err(Error::io("reading a log"))?;
        if read == 0 {
            return Ok((lines, offset));
        }
        if lines < n {
            offset += read as u64;
        }
        lines += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_offset_counts_every_line_and_finds_where_line_n_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert_eq!(lines_and_offset(&path, 2).unwrap(), (0, 0), "a missing file has no lines");
        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(lines_and_offset(&path, 0).unwrap(), (3, 0));
        assert_eq!(lines_and_offset(&path, 2).unwrap(), (3, 8));
        assert_eq!(lines_and_offset(&path, 3).unwrap(), (3, 14));
        assert_eq!(lines_and_offset(&path, 5).unwrap(), (3, 14), "fewer lines: the file's length");
        // A last line cut short (a crash mid-write) still counts.
        std::fs::write(&path, "one\ntw").unwrap();
        assert_eq!(lines_and_offset(&path, 1).unwrap(), (2, 4));
        assert_eq!(lines_and_offset(&path, 9).unwrap(), (2, 6));
    }
}
