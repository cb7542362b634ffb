//! `s3://BUCKET/KEY` paths in specs: read once when the job is accepted, from the bucket the
//! coordinator keeps its checkpoints in, and pinned to their content (`s3://BUCKET/KEY@SHA256`)
//! as a data set version whose files stay where they are. Agents fetch it by that fingerprint
//! like a pushed version (`download_dataset`); an object changed since is refused there by the
//! agent's check of every file's sha256, never trained on.

use futures::TryStreamExt;
use gantry_core::JobSpec;
use gantry_core::spec::S3Path;
use object_store::ObjectMeta;
use object_store::path::Path as Key;
use sha2::{Digest, Sha256};
use tracing::info;

use super::Coordinator;
use crate::error::{Error, Result};
use crate::files::fingerprint;
use crate::objects::Objects;
use crate::records::{DatasetRecord, DatasetVersion, FileRecord};

impl Coordinator {
    /// Pins every `s3://` path of `spec` to the content it has now, recorded as read by `owner`.
    /// A path already pinned keeps its pin when that version was read before.
    pub async fn pin_s3_paths(&self, spec: &mut JobSpec, owner: &str) -> Result<()> {
        for (field, path) in spec.fetched_paths_mut() {
            let Some(parsed) = S3Path::parse(path) else { continue };
            let refuse = |why: String| Error::InvalidArgument(format!("{field}: {why}"));
            let r = parsed.map_err(&refuse)?;
            let url = r.url();
            if let Some(pin) = &r.version
                && self.store.dataset_versions(&url)?.iter().any(|d| &d.version.sha256 == pin)
            {
                continue;
            }
            let objects = self.files.objects().ok_or_else(|| {
                refuse(format!(
                    "`{url}`: this coordinator keeps no object store, and reads s3:// paths through it \
                     (start it with --object-store s3://BUCKET/PREFIX, or push the data with `gantry dataset push`)"
                ))
            })?;
            let version = read_version(objects, &r, &self.settings.limits).await.map_err(|e| match e {
                Error::InvalidArgument(why) => refuse(why),
                e => e,
            })?;
            if let Some(pin) = &r.version
                && pin != &version.sha256
            {
                return Err(refuse(format!(
                    "`{url}` changed since it was pinned to {pin}: it now holds {}",
                    version.sha256
                )));
            }
            let sha256 = version.sha256.clone();
            if !self.store.dataset_versions(&url)?.iter().any(|d| d.version.sha256 == sha256) {
                info!(%url, %sha256, bytes = version.bytes, files = version.files.len(), "s3 path read for a job");
                let version = DatasetVersion { pushed_at_ms: self.now_ms(), ..version };
                self.store.put_dataset(&DatasetRecord { name: url, owner: owner.to_string(), version })?;
            }
            *path = r.pinned(&sha256).to_string();
        }
        Ok(())
    }
}

/// The files `r` names now (the object, or every object under it as a folder), each hashed,
/// as a version whose location is where they are.
async fn read_version(objects: &Objects, r: &S3Path, limits: &crate::limits::Limits) -> Result<DatasetVersion> {
    let url = r.url();
    if r.bucket != objects.bucket() {
        return Err(Error::InvalidArgument(format!(
            "`{url}`: s3:// paths are read from the coordinator's own bucket, `{}`, only",
            objects.bucket()
        )));
    }
    let key = crate::objects::parse(&r.key)?;
    if objects.is_own(&key) {
        return Err(Error::InvalidArgument(format!(
            "`{url}` holds gantry's own checkpoints or data sets: no job may read it"
        )));
    }
    let store = objects.store();
    // The object itself, else a folder of them: its files are named relative to the folder.
    let (base, found): (Key, Vec<ObjectMeta>) = match store.head(&key).await {
        Ok(meta) => (parent(&key), vec![meta]),
        Err(object_store::Error::NotFound { .. }) => {
            let found = objects.list(&key).await?;
            (key.clone(), found)
        }
        Err(e) => return Err(crate::objects::error(format!("reading {url}"))(e)),
    };
    if found.is_empty() {
        return Err(Error::InvalidArgument(format!("`{url}`: no such object, nor objects under it")));
    }
    let longest = found.iter().map(|m| m.location.as_ref().len()).max().unwrap_or(0);
    let bytes: u64 = found.iter().map(|m| m.size).sum();
    crate::limits::files(limits, "s3 path", found.len(), bytes, longest)?;
    crate::limits::dataset_listing(found.iter().map(|m| m.location.as_ref().len() + 100).sum())?;
    let mut files = Vec::with_capacity(found.len());
    for meta in found {
        let path: Vec<String> = meta
            .location
            .prefix_match(&base)
            .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
            .unwrap_or_default();
        let path = path.join("/");
        crate::files::safe_relative(&path)?;
        let (sha256, size) = hash(objects, &meta.location).await?;
        files.push(FileRecord { path, size, sha256 });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(DatasetVersion {
        sha256: fingerprint(&files),
        bytes: files.iter().map(|f| f.size).sum(),
        files,
        pushed_at_ms: 0,
        location: Some(base.to_string()),
    })
}

/// The key's folder (the bucket's root for a key at the top).
fn parent(key: &Key) -> Key {
    let parts: Vec<_> = key.parts().collect();
    Key::from_iter(parts[..parts.len().saturating_sub(1)].iter().cloned())
}

/// An object's sha256 and size, read as it streams.
async fn hash(objects: &Objects, key: &Key) -> Result<(String, u64)> {
    let mut stream = objects.stream(key).await?;
    let (mut h, mut size) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.try_next().await? {
        h.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::{ObjectStore, PutPayload};

    use super::*;
    use crate::control::Settings;

    /// A coordinator keeping its files under `gantry/` of bucket `lab`, whose objects are given.
    async fn coordinator(objects: &[(&str, &[u8])]) -> (tempfile::TempDir, Coordinator) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Coordinator::open(dir.path(), Settings::default()).unwrap();
        let store = Arc::new(InMemory::new());
        for (key, data) in objects {
            store.put(&Key::from(*key), PutPayload::from(data.to_vec())).await.unwrap();
        }
        c.files.keep_in(Objects::new(store, "gantry", "memory://lab/gantry").unwrap());
        (dir, c)
    }

    fn spec(path: &str) -> JobSpec {
        let yaml = format!("name: j\ntrain:\n  model: mlp\n  dataset: {{table: '{path}', label: y}}\n");
        JobSpec::from_yaml(&yaml).unwrap()
    }

    fn table(spec: &mut JobSpec) -> String {
        spec.train.as_mut().unwrap().file_paths_mut()[0].1.clone()
    }

    async fn read_back(c: &Coordinator, record: &DatasetRecord, path: &str) -> Vec<u8> {
        let file = record.version.files.iter().find(|f| f.path == path).unwrap();
        let stream = c.files.read_dataset(&record.version, file).await.unwrap();
        let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn an_object_is_pinned_to_its_content_and_read_back_where_it_is() {
        let (_dir, c) = coordinator(&[("data/wine.csv", b"a,y\n1,2\n")]).await;
        let mut s = spec("s3://lab/data/wine.csv");
        c.pin_s3_paths(&mut s, "alice").await.unwrap();
        let pinned = table(&mut s);
        let sha = pinned.strip_prefix("s3://lab/data/wine.csv@").expect(&pinned).to_string();
        let record = c.find_dataset_version(&sha, "s3://lab/data/wine.csv").unwrap();
        assert_eq!((record.name.as_str(), record.owner.as_str()), ("s3://lab/data/wine.csv", "alice"));
        assert_eq!(record.version.location.as_deref(), Some("data"), "read where it is, not copied");
        assert_eq!(record.version.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["wine.csv"]);
        assert_eq!(read_back(&c, &record, "wine.csv").await, b"a,y\n1,2\n");
        // Not a pushed data set: `gantry dataset list` does not show it, and no one deletes it
        // (its files are the bucket owner's objects).
        assert!(c.datasets().unwrap().is_empty());
        let e = c.delete_dataset("s3://lab/data/wine.csv", None).await.unwrap_err().to_string();
        assert!(e.contains("data set name `s3://lab/data/wine.csv`"), "{e}");
        let e = c.files.delete_dataset(&record.version).await.unwrap_err().to_string();
        assert!(e.contains("refusing to delete `data`: not a pushed data set's upload"), "{e}");
        assert_eq!(read_back(&c, &record, "wine.csv").await, b"a,y\n1,2\n");
        // The pinned spec again (a resubmit): kept as it is, read once.
        c.pin_s3_paths(&mut s, "bob").await.unwrap();
        assert_eq!(table(&mut s), pinned);
        assert_eq!(c.store.dataset_versions("s3://lab/data/wine.csv").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_folder_is_every_object_under_it_named_inside_it() {
        let (_dir, c) = coordinator(&[("pics/0/a.png", b"A"), ("pics/1/b.png", b"B"), ("picsx/c.png", b"C")]).await;
        let mut s = spec("s3://lab/pics/");
        c.pin_s3_paths(&mut s, "alice").await.unwrap();
        let pinned = table(&mut s);
        let sha = pinned.strip_prefix("s3://lab/pics@").expect(&pinned);
        let record = c.find_dataset_version(sha, "s3://lab/pics").unwrap();
        assert_eq!(record.version.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["0/a.png", "1/b.png"]);
        assert_eq!(read_back(&c, &record, "1/b.png").await, b"B");
    }

    #[tokio::test]
    async fn weights_and_a_command_jobs_data_are_pinned_too() {
        let (_dir, c) = coordinator(&[("w/model.safetensors", b"weights"), ("data/a.csv", b"x")]).await;
        let yaml = "name: j\ntrain: {model: mlp, init_from: 's3://lab/w/model.safetensors'}\n";
        let mut s = JobSpec::from_yaml(yaml).unwrap();
        c.pin_s3_paths(&mut s, "alice").await.unwrap();
        let from = s.train.as_ref().unwrap().init_from.clone().unwrap();
        assert!(from.starts_with("s3://lab/w/model.safetensors@"), "{from}");
        let yaml = "name: j\ncommand: [\"true\"]\ndata: {A: 's3://lab/data/a.csv', B: 's3://lab/nope'}\n";
        let e = c.pin_s3_paths(&mut JobSpec::from_yaml(yaml).unwrap(), "alice").await.unwrap_err().to_string();
        assert!(e.starts_with("data.B: `s3://lab/nope`: no such object"), "{e}");
        let yaml = "name: j\ncommand: [\"true\"]\ndata: {A: 's3://lab/data/a.csv'}\n";
        let mut s = JobSpec::from_yaml(yaml).unwrap();
        c.pin_s3_paths(&mut s, "alice").await.unwrap();
        assert!(s.data["A"].starts_with("s3://lab/data/a.csv@"), "{:?}", s.data);
    }

    #[tokio::test]
    async fn a_push_of_the_same_bytes_keeps_its_own_copy() {
        let (_dir, c) = coordinator(&[("data/wine.csv", b"abc")]).await;
        c.pin_s3_paths(&mut spec("s3://lab/data/wine.csv"), "alice").await.unwrap();
        let read = c.store.dataset_versions("s3://lab/data/wine.csv").unwrap().remove(0);
        let uploaded = DatasetVersion { location: Some("gantry/datasets/x/y".into()), ..read.version.clone() };
        let pushed = c.commit_dataset("wine", "alice", uploaded).unwrap();
        assert_eq!(pushed.version.location.as_deref(), Some("gantry/datasets/x/y"), "not the bucket owner's object");
        let sha = &read.version.sha256;
        assert_eq!(c.find_dataset_version(sha, "wine").unwrap().name, "wine");
        assert_eq!(c.find_dataset_version(sha, "s3://lab/data/wine.csv").unwrap().name, "wine", "the copy first");
        // Two S3 URLs with the same bytes: each reference's own objects first.
        c.store.put_dataset(&DatasetRecord { name: "s3://lab/b/wine.csv".into(), ..read.clone() }).unwrap();
        c.store.delete_dataset("wine", sha).unwrap();
        assert_eq!(c.find_dataset_version(sha, "s3://lab/b/wine.csv").unwrap().name, "s3://lab/b/wine.csv");
        assert_eq!(c.find_dataset_version(sha, "s3://lab/data/wine.csv").unwrap().name, "s3://lab/data/wine.csv");
    }

    #[tokio::test]
    async fn what_may_not_or_cannot_be_read_is_refused_naming_the_field() {
        let (_dir, c) = coordinator(&[("data/wine.csv", b"abc"), ("gantry/jobs/1/checkpoints/x", b"secret")]).await;
        let refused = async |path: &str| c.pin_s3_paths(&mut spec(path), "alice").await.unwrap_err().to_string();
        let e = refused("s3://other/data/wine.csv").await;
        assert!(e.starts_with("train.dataset.table: ") && e.contains("own bucket, `lab`, only"), "{e}");
        for own in ["s3://lab/gantry/jobs/1", "s3://lab/gantry", "s3://lab/gantry/datasets"] {
            assert!(refused(own).await.contains("holds gantry's own checkpoints"), "{own}");
        }
        assert!(refused("s3://lab/data/nope.csv").await.contains("no such object, nor objects under it"));
        let e = refused(&format!("s3://lab/data/wine.csv@{}", "0".repeat(64))).await;
        assert!(e.contains("changed since it was pinned to 0000"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let plain = Coordinator::open(dir.path(), Settings::default()).unwrap();
        let e = plain.pin_s3_paths(&mut spec("s3://lab/data/wine.csv"), "alice").await.unwrap_err().to_string();
        assert!(e.contains("keeps no object store") && e.contains("--object-store"), "{e}");
    }
}
