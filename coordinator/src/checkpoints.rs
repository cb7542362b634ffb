//! Checkpoint files on disk: `<data-dir>/jobs/<id>/checkpoints/step-<N>/...`.
//!
//! An upload is written into a private incoming directory, every file hashed as it arrives; only
//! when every file is there with the size and sha256 the agent announced is the directory renamed
//! into place and the record committed. A half-received checkpoint is never listed.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::records::{CheckpointRecord, FileRecord};

pub struct CheckpointFiles {
    root: PathBuf,
}

/// The fingerprint of a whole checkpoint: sha256 over "path sha256\n" of its files, sorted.
pub fn fingerprint(files: &[FileRecord]) -> String {
    let mut sorted: Vec<&FileRecord> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut h = Sha256::new();
    for f in sorted {
        h.update(format!("{} {}\n", f.path, f.sha256));
    }
    hex::encode(h.finalize())
}

/// Refuses absolute paths and `..`: an upload may only write inside its own directory.
pub fn safe_relative(path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::InvalidArgument(format!("checkpoint file path `{path}` must be relative, without `..`")));
    }
    Ok(p.to_path_buf())
}

/// One upload in progress.
pub struct Incoming {
    dir: PathBuf,
    final_dir: PathBuf,
    header: CheckpointRecord,
    next_file: usize,
    current: Option<(std::fs::File, Sha256, u64)>,
}

impl CheckpointFiles {
    pub fn new(jobs_dir: PathBuf) -> CheckpointFiles {
        CheckpointFiles { root: jobs_dir }
    }

    pub fn step_dir(&self, job: &str, step: u64) -> PathBuf {
        self.root.join(job).join("checkpoints").join(format!("step-{step}"))
    }

    pub fn begin(&self, header: CheckpointRecord) -> Result<Incoming> {
        let mut seen = std::collections::HashSet::new();
        for f in &header.files {
            safe_relative(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return Err(Error::InvalidArgument(format!("checkpoint file `{}` is listed twice", f.path)));
            }
        }
        // Each upload its own directory: ranks may upload the same step at once.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parent = self.root.join(&header.job_id).join("checkpoints");
        let dir = parent.join(format!(".incoming-{}-{}-{}-{n}", header.step, header.attempt, std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io("creating the checkpoint directory"))?;
        Ok(Incoming { final_dir: self.step_dir(&header.job_id, header.step), dir, header, next_file: 0, current: None })
    }
}

impl Incoming {
    /// Takes the next piece of the stream; files arrive whole and in the header's order.
    pub fn chunk(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<()> {
        loop {
            let expected =
                self.header.files.get(self.next_file).ok_or_else(|| {
                    Error::InvalidArgument(format!("unexpected data for `{path}`: all files received"))
                })?;
            if expected.path == path {
                break;
            }
            // Moving on to another file: the current one must be complete (empty files send no chunk).
            self.finish_file()?;
        }
        let expected = &self.header.files[self.next_file];
        if self.current.is_none() {
            let target = self.dir.join(safe_relative(&expected.path)?);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io("creating a checkpoint subdirectory"))?;
            }
            let f = std::fs::File::create(&target).map_err(Error::io("creating a checkpoint file"))?;
            self.current = Some((f, Sha256::new(), 0));
        }
        let (file, hash, written) = self.current.as_mut().expect("opened above");
        if offset != *written {
            return Err(Error::InvalidArgument(format!("`{path}`: chunk at offset {offset}, expected {written}")));
        }
        file.write_all(data).map_err(Error::io("writing a checkpoint file"))?;
        hash.update(data);
        *written += data.len() as u64;
        Ok(())
    }

    fn finish_file(&mut self) -> Result<()> {
        let expected = self.header.files[self.next_file].clone();
        let (file, hash, written) = match self.current.take() {
            Some(c) => c,
            None => {
                // No chunk at all: an empty file.
                let target = self.dir.join(safe_relative(&expected.path)?);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(Error::io("creating a checkpoint subdirectory"))?;
                }
                let f = std::fs::File::create(&target).map_err(Error::io("creating a checkpoint file"))?;
                (f, Sha256::new(), 0)
            }
        };
        file.sync_all().map_err(Error::io("syncing a checkpoint file"))?;
        let digest = hex::encode(hash.finalize());
        if written != expected.size || digest != expected.sha256 {
            return Err(Error::DataLoss(format!(
                "`{}`: received {written} bytes with sha256 {digest}, announced {} bytes with sha256 {}",
                expected.path, expected.size, expected.sha256
            )));
        }
        self.next_file += 1;
        Ok(())
    }

    /// Verifies the last files and moves the checkpoint into place. Returns the record to commit.
    pub fn finish(mut self) -> Result<CheckpointRecord> {
        let result = self.verify_and_commit();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        result
    }

    fn verify_and_commit(&mut self) -> Result<CheckpointRecord> {
        while self.next_file < self.header.files.len() {
            self.finish_file()?;
        }
        // Renaming onto a step directory that exists fails (it is never empty): the same step
        // uploaded again (a retry, another rank) leaves the first in place, and the caller keeps
        // the first record.
        match std::fs::rename(&self.dir, &self.final_dir) {
            Ok(()) => {
                if let Some(parent) = self.final_dir.parent() {
                    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(Error::io("syncing checkpoints"))?;
                }
            }
            Err(_) if self.final_dir.exists() => {
                std::fs::remove_dir_all(&self.dir).map_err(Error::io("removing a duplicate upload"))?;
            }
            Err(e) => return Err(Error::io("committing the checkpoint")(e)),
        }
        let mut record = self.header.clone();
        record.bytes = record.files.iter().map(|f| f.size).sum();
        record.sha256 = fingerprint(&record.files);
        Ok(record)
    }

    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8]) -> FileRecord {
        FileRecord { path: path.into(), size: data.len() as u64, sha256: hex::encode(Sha256::digest(data)) }
    }

    fn header(files: Vec<FileRecord>) -> CheckpointRecord {
        CheckpointRecord {
            job_id: "1".into(),
            attempt: 1,
            step: 10,
            bytes: 0,
            sha256: String::new(),
            files,
            committed_at_ms: 0,
        }
    }

    #[test]
    fn a_verified_upload_lands_in_its_step_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files = CheckpointFiles::new(dir.path().to_path_buf());
        let mut up =
            files.begin(header(vec![file("a.bin", b"hello"), file("empty", b""), file("sub/b", b"xy")])).unwrap();
        up.chunk("a.bin", 0, b"hel").unwrap();
        up.chunk("a.bin", 3, b"lo").unwrap();
        up.chunk("sub/b", 0, b"xy").unwrap();
        let record = up.finish().unwrap();
        assert_eq!(record.bytes, 7);
        let step = files.step_dir("1", 10);
        assert_eq!(std::fs::read(step.join("a.bin")).unwrap(), b"hello");
        assert_eq!(std::fs::read(step.join("sub/b")).unwrap(), b"xy");
        assert!(step.join("empty").exists());
    }

    #[test]
    fn a_corrupted_upload_is_refused_and_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let files = CheckpointFiles::new(dir.path().to_path_buf());
        let mut up = files.begin(header(vec![file("a.bin", b"hello")])).unwrap();
        up.chunk("a.bin", 0, b"jello").unwrap();
        assert!(matches!(up.finish(), Err(Error::DataLoss(_))));
        assert!(!files.step_dir("1", 10).exists());
    }

    #[test]
    fn a_second_upload_of_a_step_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let files = CheckpointFiles::new(dir.path().to_path_buf());
        let mut first = files.begin(header(vec![file("a", b"one")])).unwrap();
        let mut second = files.begin(header(vec![file("a", b"two")])).unwrap();
        first.chunk("a", 0, b"one").unwrap();
        second.chunk("a", 0, b"two").unwrap();
        first.finish().unwrap();
        second.finish().unwrap();
        assert_eq!(std::fs::read(files.step_dir("1", 10).join("a")).unwrap(), b"one");
        let leftovers = std::fs::read_dir(dir.path().join("1/checkpoints")).unwrap().count();
        assert_eq!(leftovers, 1, "no incoming directory left behind");
    }

    #[test]
    fn a_file_listed_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = CheckpointFiles::new(dir.path().to_path_buf());
        assert!(files.begin(header(vec![file("a", b"x"), file("a", b"x")])).is_err());
    }

    #[test]
    fn paths_outside_the_checkpoint_are_refused() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/./b").is_ok());
    }
}
