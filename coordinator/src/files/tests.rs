//! Uploads: verified, atomic, and safe from paths that leave the checkpoint.

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

fn on_disk() -> (tempfile::TempDir, FileStorage) {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::on_disk(dir.path().join("jobs"), dir.path().join("datasets"));
    (dir, storage)
}

fn in_memory() -> (tempfile::TempDir, FileStorage, Arc<InMemory>) {
    let (dir, storage) = on_disk();
    let store = Arc::new(InMemory::new());
    let mut storage = storage;
    storage.keep_in(Objects::new(store.clone(), "cluster-a", "memory://cluster-a").unwrap());
    (dir, storage, store)
}

async fn upload(storage: &FileStorage, files: &[(&str, &[u8])]) -> Result<CheckpointRecord> {
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

async fn read_back(storage: &FileStorage, record: &CheckpointRecord, path: &str) -> Vec<u8> {
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
    assert_eq!(std::fs::read_dir(dir.path().join("jobs/1/checkpoints")).unwrap().count(), 0);
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
    let leftovers = std::fs::read_dir(dir.path().join("jobs/1/checkpoints")).unwrap().count();
    assert_eq!(leftovers, 1, "no incoming directory left behind");
}

#[tokio::test]
async fn uploads_of_one_step_to_object_storage_are_apart_and_a_discarded_one_is_deleted() {
    let (_dir, storage, store) = in_memory();
    let first = upload(&storage, &[("a", b"one")]).await.unwrap();
    let second = upload(&storage, &[("a", b"two")]).await.unwrap();
    assert_ne!(first.location, second.location);
    storage.discard(second.location.as_deref()).await;
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
    let later = FileStorage { disk: disk.disk.clone(), ..later };
    assert_eq!(read_back(&later, &old, "a").await, b"old");
}

fn version(files: Vec<FileRecord>) -> DatasetVersion {
    DatasetVersion { sha256: "whatever the sender says".into(), bytes: 0, files, pushed_at_ms: 0, location: None }
}

async fn push(storage: &FileStorage, files: &[(&str, &[u8])]) -> Result<DatasetVersion> {
    let mut up = storage.begin_dataset(version(files.iter().map(|(p, d)| file(p, d)).collect()))?;
    for (path, data) in files {
        up.chunk(path, 0, data).await?;
    }
    up.finish().await
}

#[tokio::test]
async fn a_data_set_version_is_named_by_its_files_and_stored_once_per_name() {
    for (dir, storage, store) in [on_disk_with_no_store(), in_memory_with_store()] {
        let first = push(&storage, &[("train/a.png", b"png"), ("labels.csv", b"x,y")]).await.unwrap();
        assert_eq!(first.sha256, fingerprint(&first.files), "the fingerprint, not what the sender said");
        assert_eq!(first.bytes, 6);
        let again = push(&storage, &[("train/a.png", b"png"), ("labels.csv", b"x,y")]).await.unwrap();
        assert_eq!(again.sha256, first.sha256);
        match store {
            Some(store) => {
                // Two uploads of one version: the caller keeps the first and discards the second.
                assert_ne!(again.location, first.location);
                storage.discard(again.location.as_deref()).await;
                assert_eq!(object_keys(&store).await.len(), 2);
            }
            None => {
                let kept: Vec<_> = std::fs::read_dir(dir.path().join("datasets")).unwrap().collect();
                assert_eq!(kept.len(), 1, "one folder, no upload left behind: {kept:?}");
            }
        }
        let mut pieces = Vec::new();
        for piece in
            storage.read_dataset(&first, &first.files[0]).await.unwrap().try_collect::<Vec<Bytes>>().await.unwrap()
        {
            pieces.extend_from_slice(&piece);
        }
        assert_eq!(pieces, b"png");
        let mut bad = first.clone();
        bad.files[1].sha256 = "0".repeat(64);
        let mut up = storage.begin_dataset(bad).unwrap();
        up.chunk("train/a.png", 0, b"png").await.unwrap();
        up.chunk("labels.csv", 0, b"x,y").await.unwrap();
        assert!(matches!(up.finish().await, Err(Error::DataLoss(_))));
    }
}

fn on_disk_with_no_store() -> (tempfile::TempDir, FileStorage, Option<Arc<InMemory>>) {
    let (dir, storage) = on_disk();
    (dir, storage, None)
}

fn in_memory_with_store() -> (tempfile::TempDir, FileStorage, Option<Arc<InMemory>>) {
    let (dir, storage, store) = in_memory();
    (dir, storage, Some(store))
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
    assert!(safe_relative("a/b.csv").is_ok());
    for bad in ["a/./b", "a//b", "a/", "a.csv 0123\nb.csv", ""] {
        assert!(safe_relative(bad).is_err(), "{bad:?}");
    }
}
