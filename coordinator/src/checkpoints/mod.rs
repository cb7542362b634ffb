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
mod tests {
    use std::sync::Arc;

    use futures::TryStreamExt;
    use object_store::ObjectStore;
    use object_store::memory::InMemory;

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
            location: None,
        }
    }

    fn on_disk() -> (tempfile::TempDir, CheckpointStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = CheckpointStorage::on_disk(dir.path().to_path_buf());
        (dir, storage)
    }

    fn in_memory() -> (tempfile::TempDir, CheckpointStorage, Arc<InMemory>) {
        let (dir, storage) = on_disk();
        let store = Arc::new(InMemory::new());
        let mut storage = storage;
        storage.keep_in(Objects::new(store.clone(), "cluster-a", "memory://cluster-a").unwrap());
        (dir, storage, store)
    }

    async fn upload(storage: &CheckpointStorage, files: &[(&str, &[u8])]) -> Result<CheckpointRecord> {
        let mut up = storage.begin(header(files.iter().map(|(p, d)| file(p, d)).collect()))?;
        for (path, data) in files {
            // In two pieces, as a stream would bring them.
            let half = data.len() / 2;
            if !data.is_empty() {
                up.chunk(path, 0, &data[..half]).await?;
                up.chunk(path, half as u64, &data[half..]).await?;
            }
        }
        up.finish().await
    }

    async fn read_back(storage: &CheckpointStorage, record: &CheckpointRecord, path: &str) -> Vec<u8> {
        let file = record.files.iter().find(|f| f.path == path).unwrap();
        let pieces: Vec<Bytes> = storage.read(record, file).await.unwrap().try_collect().await.unwrap();
        pieces.concat()
    }

    async fn object_keys(store: &InMemory) -> Vec<String> {
        let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
        metas.into_iter().map(|m| m.location.to_string()).collect()
    }

    #[tokio::test]
    async fn a_verified_upload_lands_in_its_step_directory() {
        let (_dir, storage) = on_disk();
        let record = upload(&storage, &[("a.bin", b"hello"), ("empty", b""), ("sub/b", b"xy")]).await.unwrap();
        assert_eq!(record.bytes, 7);
        assert_eq!(record.location, None);
        let step = storage.step_dir("1", 10);
        assert_eq!(std::fs::read(step.join("a.bin")).unwrap(), b"hello");
        assert_eq!(std::fs::read(step.join("sub/b")).unwrap(), b"xy");
        assert!(step.join("empty").exists());
        assert_eq!(read_back(&storage, &record, "sub/b").await, b"xy");
    }

    #[tokio::test]
    async fn with_object_storage_an_upload_lands_there_and_reads_back_whole() {
        let (dir, storage, store) = in_memory();
        // Above the part size, so the file goes up as a multipart upload.
        let big: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
        let record = upload(&storage, &[("model.bin", &big), ("empty", b""), ("sub/b", b"xy")]).await.unwrap();
        let location = record.location.clone().expect("an object location");
        assert!(location.starts_with("cluster-a/jobs/1/checkpoints/step-10/"), "{location}");
        let mut keys = object_keys(&store).await;
        keys.sort();
        let want: Vec<String> = ["empty", "model.bin", "sub/b"].iter().map(|f| format!("{location}/{f}")).collect();
        assert_eq!(keys, want);
        assert_eq!(read_back(&storage, &record, "model.bin").await, big);
        assert_eq!(read_back(&storage, &record, "empty").await, b"");
        assert!(!dir.path().join("1").exists(), "nothing written to the data directory");
    }

    #[tokio::test]
    async fn a_corrupted_upload_is_refused_and_not_kept() {
        let (dir, disk) = on_disk();
        let (_dir2, objects, store) = in_memory();
        for storage in [&disk, &objects] {
            // The last file is checked when the stream ends,
            let mut up = storage.begin(header(vec![file("a", b"ok"), file("b.bin", b"hello")])).unwrap();
            up.chunk("a", 0, b"ok").await.unwrap();
            up.chunk("b.bin", 0, b"jello").await.unwrap();
            assert!(matches!(up.finish().await, Err(Error::DataLoss(_))));
            // any other when the next one starts (and the service abandons the upload).
            let mut up = storage.begin(header(vec![file("a.bin", b"hello"), file("b", b"ok")])).unwrap();
            up.chunk("a.bin", 0, b"jello").await.unwrap();
            assert!(matches!(up.chunk("b", 0, b"ok").await, Err(Error::DataLoss(_))));
            up.abandon().await;
        }
        assert!(!disk.step_dir("1", 10).exists());
        assert_eq!(std::fs::read_dir(dir.path().join("1/checkpoints")).unwrap().count(), 0);
        assert!(object_keys(&store).await.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_upload_leaves_nothing() {
        let (_dir, storage, store) = in_memory();
        let mut up = storage.begin(header(vec![file("a", b"abc"), file("b", b"de")])).unwrap();
        up.chunk("a", 0, b"abc").await.unwrap();
        up.chunk("b", 0, b"d").await.unwrap();
        up.abandon().await;
        assert!(object_keys(&store).await.is_empty());
    }

    #[tokio::test]
    async fn a_second_upload_of_a_step_keeps_the_first_on_disk() {
        let (dir, storage) = on_disk();
        let mut first = storage.begin(header(vec![file("a", b"one")])).unwrap();
        let mut second = storage.begin(header(vec![file("a", b"two")])).unwrap();
        first.chunk("a", 0, b"one").await.unwrap();
        second.chunk("a", 0, b"two").await.unwrap();
        first.finish().await.unwrap();
        second.finish().await.unwrap();
        assert_eq!(std::fs::read(storage.step_dir("1", 10).join("a")).unwrap(), b"one");
        let leftovers = std::fs::read_dir(dir.path().join("1/checkpoints")).unwrap().count();
        assert_eq!(leftovers, 1, "no incoming directory left behind");
    }

    #[tokio::test]
    async fn uploads_of_one_step_to_object_storage_are_apart_and_a_discarded_one_is_deleted() {
        let (_dir, storage, store) = in_memory();
        let first = upload(&storage, &[("a", b"one")]).await.unwrap();
        let second = upload(&storage, &[("a", b"two")]).await.unwrap();
        assert_ne!(first.location, second.location);
        storage.discard(&second).await;
        assert_eq!(object_keys(&store).await, vec![format!("{}/a", first.location.clone().unwrap())]);
        assert_eq!(read_back(&storage, &first, "a").await, b"one");
    }

    #[tokio::test]
    async fn a_checkpoint_in_object_storage_is_not_read_from_disk() {
        let (_dir, objects, _store) = in_memory();
        let record = upload(&objects, &[("a", b"one")]).await.unwrap();
        let (_dir2, disk) = on_disk();
        let Err(e) = disk.read(&record, &record.files[0]).await else { panic!("read without object storage") };
        assert!(e.to_string().contains("--object-store"), "{e}");
        // And the other way round: a record written before object storage was configured.
        let (_dir3, disk) = on_disk();
        let old = upload(&disk, &[("a", b"old")]).await.unwrap();
        let (_dir4, later, _) = in_memory();
        let later = CheckpointStorage { disk: disk.disk.clone(), ..later };
        assert_eq!(read_back(&later, &old, "a").await, b"old");
    }

    #[test]
    fn a_file_listed_twice_is_refused() {
        let (_dir, storage) = on_disk();
        assert!(storage.begin(header(vec![file("a", b"x"), file("a", b"x")])).is_err());
    }

    #[test]
    fn paths_outside_the_checkpoint_are_refused() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/./b").is_ok());
    }
}
