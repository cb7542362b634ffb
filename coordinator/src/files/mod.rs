//! Checkpoints and pushed data sets: sets of files verified as they arrive, kept in the data
//! directory or in object storage, and streamed back for resumes, downloads and agents' caches.
//!
//! Every file is hashed as it arrives; only when each is there with the size and sha256 the
//! sender announced is the upload committed, so a half-received checkpoint or data set is never
//! listed.

mod disk;
mod object;

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::objects::Objects;
use crate::records::{CheckpointRecord, DatasetVersion, FileRecord};

/// Downloads are sent in pieces of at most this size.
pub const CHUNK: usize = 1 << 20;

pub type FileStream = BoxStream<'static, Result<Bytes>>;

/// Where checkpoints and data sets are kept. New ones go to object storage when it is
/// configured; records without a `location` (written before it was) are still read from the
/// data directory.
#[derive(Clone)]
pub struct FileStorage {
    disk: disk::Disk,
    objects: Option<Objects>,
}

/// What an upload's header is: the files it announces, and the record it becomes once they all
/// arrived intact.
pub trait Manifest {
    fn files(&self) -> &[FileRecord];
    /// The record as received, its files at `location` in object storage (none: on disk).
    fn received(self, location: Option<String>) -> Self;
}

impl Manifest for CheckpointRecord {
    fn files(&self) -> &[FileRecord] {
        &self.files
    }

    fn received(self, location: Option<String>) -> Self {
        let (bytes, sha256) = totals(&self.files);
        CheckpointRecord { location, bytes, sha256, ..self }
    }
}

impl Manifest for DatasetVersion {
    fn files(&self) -> &[FileRecord] {
        &self.files
    }

    fn received(self, location: Option<String>) -> Self {
        let (bytes, sha256) = totals(&self.files);
        DatasetVersion { location, bytes, sha256, ..self }
    }
}

/// What received files add up to: their bytes and their fingerprint.
fn totals(files: &[FileRecord]) -> (u64, String) {
    (files.iter().map(|f| f.size).sum(), fingerprint(files))
}

/// Where one set of files belongs.
#[derive(Clone, Copy)]
enum Place<'a> {
    Checkpoint {
        job: &'a str,
        step: u64,
    },
    /// Data set versions are named by their fingerprint: the same bytes pushed twice are one.
    Dataset {
        sha256: &'a str,
    },
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
    // Checked on the text, not only on `components` (which reads `a/./b` and `a//b` as `a/b`):
    // the path is part of a version's fingerprint, so it must have exactly one spelling, and no
    // line break can make two listings hash alike.
    let plain = path.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if !ok || !plain || path.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "file path `{}` must be relative, without `.`, `..`, empty parts or control characters",
            path.escape_debug()
        )));
    }
    Ok(p.to_path_buf())
}

impl FileStorage {
    pub fn on_disk(jobs_dir: PathBuf, datasets_dir: PathBuf) -> FileStorage {
        FileStorage { disk: disk::Disk::new(jobs_dir, datasets_dir), objects: None }
    }

    /// Puts new checkpoints and data sets in object storage.
    pub fn keep_in(&mut self, objects: Objects) {
        self.objects = Some(objects);
    }

    /// The object store, when there is one.
    pub fn objects(&self) -> Option<&Objects> {
        self.objects.as_ref()
    }

    /// Where new checkpoints go, for the startup log.
    pub fn describe(&self) -> String {
        match &self.objects {
            Some(o) => o.url().to_string(),
            None => "the data directory".into(),
        }
    }

    pub fn begin(&self, header: CheckpointRecord) -> Result<Incoming<CheckpointRecord>> {
        let upload = format!("a{}-{}", header.attempt, upload_id()?);
        let place = Place::Checkpoint { job: &header.job_id, step: header.step };
        let sink = self.sink(place, &header.files, &upload)?;
        Ok(Incoming { header, next_file: 0, current: None, sink })
    }

    /// A data set version's upload.
    pub fn begin_dataset(&self, mut header: DatasetVersion) -> Result<Incoming<DatasetVersion>> {
        // Named by what it announces, never by what the sender says it is.
        header.sha256 = fingerprint(&header.files);
        let sink = self.sink(Place::Dataset { sha256: &header.sha256 }, &header.files, &upload_id()?)?;
        Ok(Incoming { header, next_file: 0, current: None, sink })
    }

    fn sink(&self, place: Place, files: &[FileRecord], upload: &str) -> Result<Sink> {
        let mut seen = std::collections::HashSet::new();
        for f in files {
            safe_relative(&f.path)?;
            if !seen.insert(f.path.as_str()) {
                return Err(Error::InvalidArgument(format!("file `{}` is listed twice", f.path)));
            }
        }
        Ok(match &self.objects {
            Some(objects) => Sink::Object(Box::new(object::sink(objects, place, upload))),
            None => Sink::Disk(self.disk.sink(place, upload)?),
        })
    }

    /// One file of a committed checkpoint, in pieces.
    pub async fn read(&self, record: &CheckpointRecord, file: &FileRecord) -> Result<FileStream> {
        let what = || format!("checkpoint step {} of job {}", record.step, record.job_id);
        self.read_at(Place::Checkpoint { job: &record.job_id, step: record.step }, &record.location, file, what).await
    }

    /// One file of a data set version, in pieces.
    pub async fn read_dataset(&self, version: &DatasetVersion, file: &FileRecord) -> Result<FileStream> {
        let what = || format!("data set version {}", version.sha256);
        self.read_at(Place::Dataset { sha256: &version.sha256 }, &version.location, file, what).await
    }

    async fn read_at(
        &self,
        place: Place<'_>,
        location: &Option<String>,
        file: &FileRecord,
        what: impl FnOnce() -> String,
    ) -> Result<FileStream> {
        let path = safe_relative(&file.path)?;
        match (location, &self.objects) {
            (None, _) => self.disk.read(place, &path).await,
            (Some(location), Some(objects)) => object::read(objects, location, &path).await,
            (Some(location), None) => Err(Error::NoObjectStore { what: what(), location: location.clone() }),
        }
    }

    /// Deletes a pushed data set version's files; the caller checked that no record still lists
    /// them. Only ever under gantry's own `PREFIX/datasets/`: an S3 read's location is the bucket
    /// owner's folder.
    pub async fn delete_dataset(&self, version: &DatasetVersion) -> Result<()> {
        match (&version.location, &self.objects) {
            (None, _) => self.disk.remove(Place::Dataset { sha256: &version.sha256 }).await,
            (Some(location), Some(objects)) => {
                // Exactly PREFIX/datasets/<sha256>/<upload>: one upload of this version.
                let key = crate::objects::parse(location)?;
                let parts: Vec<String> = key
                    .prefix_match(&objects.datasets())
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
                    .unwrap_or_default();
                if parts.len() != 2 || parts[0] != version.sha256 {
                    return Err(Error::InvalidArgument(format!(
                        "refusing to delete `{location}`: not a pushed data set's upload"
                    )));
                }
                object::delete(objects, location).await
            }
            (Some(location), None) => Err(Error::NoObjectStore {
                what: format!("data set version {}", version.sha256),
                location: location.clone(),
            }),
        }
    }

    /// Deletes an upload that was verified but not kept (another of the same step was first).
    pub async fn discard(&self, location: Option<&str>) {
        if let (Some(location), Some(objects)) = (location, &self.objects)
            && let Err(e) = object::delete(objects, location).await
        {
            tracing::warn!(%location, error = %e, "could not delete a duplicate upload");
        }
    }

    #[cfg(test)]
    fn step_dir(&self, job: &str, step: u64) -> PathBuf {
        self.disk.dir(Place::Checkpoint { job, step })
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

/// A name no other upload has, in this process or any other coordinator, before or after a
/// restart: ranks may upload the same step at once, and the same data set version may be pushed
/// by several people. An upload only ever writes, and deletes, under its own name.
fn upload_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Io { context: "naming an upload".into(), source: std::io::Error::other(e.to_string()) })?;
    Ok(hex::encode(bytes))
}

/// One upload in progress.
pub struct Incoming<M> {
    header: M,
    next_file: usize,
    /// The file being received: its hash and length so far.
    current: Option<(Sha256, u64)>,
    sink: Sink,
}

impl<M: Manifest> Incoming<M> {
    /// Takes the next piece of the stream; files arrive whole and in the header's order.
    pub async fn chunk(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<()> {
        loop {
            let expected =
                self.header.files().get(self.next_file).ok_or_else(|| {
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
        let announced = self.header.files()[self.next_file].size;
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
        let expected = self.header.files()[self.next_file].clone();
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

    /// Verifies the last files and puts them in place. Returns the record to commit.
    pub async fn finish(mut self) -> Result<M> {
        let mut verified = Ok(());
        while self.next_file < self.header.files().len() {
            verified = self.finish_file().await;
            if verified.is_err() {
                break;
            }
        }
        if let Err(e) = verified {
            self.sink.discard().await;
            return Err(e);
        }
        let location = self.sink.commit()?;
        Ok(self.header.received(location))
    }

    pub async fn abandon(self) {
        self.sink.discard().await;
    }
}

#[cfg(test)]
mod tests;
