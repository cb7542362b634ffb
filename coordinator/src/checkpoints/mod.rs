//! Checkpoint files: verified as they arrive, kept in the data directory or in object storage,
//! and streamed back for resumes and downloads.
//!
//! Every file is hashed as it arrives; only when each is there with the size and sha256 the agent
//! announced is the upload committed, so a half-received checkpoint is never listed.

mod disk;
mod object;

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::objects::Objects;
use crate::records::{CheckpointRecord, FileRecord};

/// Downloads are sent in pieces of at most this size.
pub const CHUNK: usize = 1 << 20;

pub type FileStream = BoxStream<'static, Result<Bytes>>;

/// Where checkpoints are kept. New ones go to object storage when it is configured; records
/// without a `location` (written before it was) are still read from the data directory.
#[derive(Clone)]
pub struct CheckpointStorage {
    disk: disk::Disk,
    objects: Option<Objects>,
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

impl CheckpointStorage {
    pub fn on_disk(jobs_dir: PathBuf) -> CheckpointStorage {
        CheckpointStorage { disk: disk::Disk::new(jobs_dir), objects: None }
    }

    /// Puts new checkpoints in object storage.
    pub fn keep_in(&mut self, objects: Objects) {
        self.objects = Some(objects);
    }

    /// Where new checkpoints go, for the startup log.
    pub fn describe(&self) -> String {
        match &self.objects {
            Some(o) => o.url().to_string(),
            None => "the data directory".into(),
        }
    }

    pub fn begin(&self, header: CheckpointRecord) -> Result<Incoming> {
        let mut seen = std::collections::HashSet::new();
        for f in &header.files {
            safe_relative(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return Err(Error::InvalidArgument(format!("checkpoint file `{}` is listed twice", f.path)));
            }
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let upload = format!("a{}-{}-{n}", header.attempt, std::process::id());
        let sink = match &self.objects {
            Some(objects) => Sink::Object(Box::new(object::sink(objects, &header, &upload))),
            None => Sink::Disk(self.disk.sink(&header, &upload)?),
        };
        Ok(Incoming { header, next_file: 0, current: None, sink })
    }

    /// One file of a committed checkpoint, in pieces.
    pub async fn read(&self, record: &CheckpointRecord, file: &FileRecord) -> Result<FileStream> {
        let path = safe_relative(&file.path)?;
        match (&record.location, &self.objects) {
            (None, _) => self.disk.read(record, &path).await,
            (Some(location), Some(objects)) => object::read(objects, location, &path).await,
            (Some(location), None) => {
                Err(Error::NoObjectStore { job: record.job_id.clone(), step: record.step, location: location.clone() })
            }
        }
    }

    /// Deletes an upload that was verified but not kept (another of the same step was first).
    pub async fn discard(&self, record: &CheckpointRecord) {
        if let (Some(location), Some(objects)) = (&record.location, &self.objects)
            && let Err(e) = object::delete(objects, location).await
        {
            tracing::warn!(%location, error = %e, "could not delete a duplicate checkpoint upload");
        }
    }

    #[cfg(test)]
    fn step_dir(&self, job: &str, step: u64) -> PathBuf {
        self.disk.step_dir(job, step)
    }
}

enum Sink {
    Disk(disk::Sink),
    Object(Box<object::Sink>),
}

impl Sink {
    async fn open(&mut self, path: &Path) -> Result<()> {
        match self {
            Sink::Disk(s) => s.open(path),
            Sink::Object(s) => s.open(path),
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Sink::Disk(s) => s.write(data),
            Sink::Object(s) => s.write(data).await,
        }
    }

    async fn close(&mut self) -> Result<()> {
        match self {
            Sink::Disk(s) => s.close(),
            Sink::Object(s) => s.close().await,
        }
    }

    /// Makes the upload durable in its place; returns its location (for object storage).
    fn commit(self) -> Result<Option<String>> {
        match self {
            Sink::Disk(s) => s.commit().map(|()| None),
            Sink::Object(s) => Ok(Some(s.location())),
        }
    }

    async fn discard(self) {
        match self {
            Sink::Disk(s) => s.discard(),
            Sink::Object(s) => s.discard().await,
        }
    }
}

/// One upload in progress.
pub struct Incoming {
    header: CheckpointRecord,
    next_file: usize,
    /// The file being received: its hash and length so far.
    current: Option<(Sha256, u64)>,
    sink: Sink,
}

impl Incoming {
    /// Takes the next piece of the stream; files arrive whole and in the header's order.
    pub async fn chunk(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<()> {
        loop {
            let expected =
                self.header.files.get(self.next_file).ok_or_else(|| {
                    Error::InvalidArgument(format!("unexpected data for `{path}`: all files received"))
                })?;
            if expected.path == path {
                break;
            }
            // Moving on to another file: the current one must be complete (empty files send no chunk).
            self.finish_file().await?;
        }
        if self.current.is_none() {
            self.sink.open(&safe_relative(path)?).await?;
            self.current = Some((Sha256::new(), 0));
        }
        let (_, written) = self.current.as_ref().expect("opened above");
        if offset != *written {
            return Err(Error::InvalidArgument(format!("`{path}`: chunk at offset {offset}, expected {written}")));
        }
        // Nothing past the announced size reaches the disk: the size limit was checked on it.
        let announced = self.header.files[self.next_file].size;
        if written.saturating_add(data.len() as u64) > announced {
            return Err(Error::InvalidArgument(format!("`{path}`: more data than its announced {announced} bytes")));
        }
        self.sink.write(data).await?;
        let (hash, written) = self.current.as_mut().expect("opened above");
        hash.update(data);
        *written += data.len() as u64;
        Ok(())
    }

    async fn finish_file(&mut self) -> Result<()> {
        let expected = self.header.files[self.next_file].clone();
        if self.current.is_none() {
            // No chunk at all: an empty file.
            self.sink.open(&safe_relative(&expected.path)?).await?;
        }
        let (hash, written) = self.current.take().unwrap_or_else(|| (Sha256::new(), 0));
        self.sink.close().await?;
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

    /// Verifies the last files and puts the checkpoint in place. Returns the record to commit.
    pub async fn finish(mut self) -> Result<CheckpointRecord> {
        let mut verified = Ok(());
        while self.next_file < self.header.files.len() {
            verified = self.finish_file().await;
            if verified.is_err() {
                break;
            }
        }
        if let Err(e) = verified {
            self.sink.discard().await;
            return Err(e);
        }
        let mut record = self.header;
        record.location = self.sink.commit()?;
        record.bytes = record.files.iter().map(|f| f.size).sum();
        record.sha256 = fingerprint(&record.files);
        Ok(record)
    }

    pub async fn abandon(self) {
        self.sink.discard().await;
    }
}

#[cfg(test)]
mod tests;
