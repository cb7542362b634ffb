//! Pushed data sets: recording a verified version under its name, finding a version for an
//! agent's cache, and pinning a job's `dataset://` references to the versions they mean.

use gantry_core::JobSpec;
use gantry_core::spec::PushedPath;
use tracing::{info, warn};

use super::Coordinator;
use crate::error::{Error, Result};
use crate::records::{DatasetRecord, DatasetVersion};

/// How many files an error lists when a path is not in a data set.
const LISTED: usize = 5;

impl Coordinator {
    /// The versions of `name`, the newest last (none: never pushed).
    pub fn dataset_versions(&self, name: &str) -> Result<Vec<DatasetRecord>> {
        self.store.dataset_versions(name)
    }

    /// Each data set's newest version, by name, with how many versions it has.
    pub fn datasets(&self) -> Result<Vec<(DatasetRecord, u32)>> {
        let mut by_name: std::collections::BTreeMap<String, (DatasetRecord, u32)> = Default::default();
        for record in self.store.datasets()?.into_iter().filter(|d| !d.is_s3_read()) {
            match by_name.get_mut(&record.name) {
                Some((newest, count)) => {
                    *count += 1;
                    if record.version.pushed_at_ms > newest.version.pushed_at_ms {
                        *newest = record;
                    }
                }
                None => {
                    by_name.insert(record.name.clone(), (record, 1));
                }
            }
        }
        Ok(by_name.into_values().collect())
    }

    /// Makes a verified upload the newest version of `name` (owned by `owner`). The same bytes
    /// pushed before (under any name) keep their first files: the returned record points at
    /// them, and the caller deletes the upload when its location differs.
    pub fn commit_dataset(&self, name: &str, owner: &str, uploaded: DatasetVersion) -> Result<DatasetRecord> {
        let _changing = self.datasets_changing();
        let all = self.store.datasets()?;
        let stored = all.iter().find(|d| d.version.sha256 == uploaded.sha256 && !d.is_s3_read());
        let mut version = match stored {
            Some(d) => DatasetVersion { location: d.version.location.clone(), ..uploaded },
            None => uploaded,
        };
        let mut versions: Vec<&DatasetRecord> = all.iter().filter(|d| d.name == name).collect();
        versions.sort_by_key(|d| d.version.pushed_at_ms);
        // Checked when the push began, and again now, atomically: another user's first push of
        // the name may have claimed it while this one was uploading. A name pushed before
        // claims were kept is its first pusher's.
        let first = versions.first().map_or(owner, |d| d.owner.as_str());
        let holder = self.store.claim_dataset(name, first)?;
        if holder != owner {
            return Err(Error::PermissionDenied(format!(
                "data set `{name}` was pushed by {holder} while this push was uploading: it is theirs"
            )));
        }
        if let Some(newest) = versions.last()
            && newest.version.sha256 == version.sha256
        {
            // Pushed again unchanged: nothing new to record.
            return Ok((*newest).clone());
        }
        version.pushed_at_ms = self.now_ms();
        let record = DatasetRecord { name: name.to_string(), owner: owner.to_string(), version };
        self.store.put_dataset(&record)?;
        info!(dataset = name, sha256 = %record.version.sha256, bytes = record.version.bytes, "data set version pushed");
        Ok(record)
    }

    /// Deletes data set `name`'s versions (`version`: the one whose sha256 starts so; none:
    /// every one), then their files where no other record lists the same. Refused while a job
    /// that has not ended is pinned to one of them: it has yet to read it, or is reading it.
    pub async fn delete_dataset(&self, name: &str, version: Option<&str>) -> Result<Vec<DatasetRecord>> {
        // A pushed name only: S3 reads are named by their URL, and their files are the bucket
        // owner's objects, never gantry's to delete.
        gantry_core::spec::check_dataset_name(name).map_err(Error::InvalidArgument)?;
        let versions = self.store.dataset_versions(name)?;
        if versions.is_empty() {
            return Err(Error::DatasetNotFound(name.to_string()));
        }
        let doomed: Vec<DatasetRecord> = match version {
            None => versions,
            Some("") => {
                return Err(Error::InvalidArgument("an empty version: give NAME alone for every version".into()));
            }
            Some(v) => {
                let matching: Vec<DatasetRecord> =
                    versions.into_iter().filter(|d| d.version.sha256.starts_with(v)).collect();
                match matching.len() {
                    0 => return Err(Error::DatasetVersionNotFound(format!("{name}@{v}"))),
                    1 => matching,
                    n => {
                        return Err(Error::InvalidArgument(format!(
                            "`{v}` starts {n} versions of data set `{name}`: give more of its sha256"
                        )));
                    }
                }
            }
        };
        let changing = self.datasets_changing();
        for job in self.store.jobs()?.into_iter().filter(|j| !j.state.is_terminal()) {
            let mut spec = job.spec.clone();
            for (_, path) in spec.fetched_paths_mut() {
                if let Some(Ok(r)) = PushedPath::parse(path)
                    && r.name == name
                    && let Some(d) = doomed.iter().find(|d| r.version.as_ref() == Some(&d.version.sha256))
                {
                    return Err(Error::InUse(format!(
                        "data set {name}@{} is what job {} ({}) reads: cancel the job or let it end first",
                        &d.version.sha256[..12],
                        job.id,
                        crate::service::state_name(job.state)
                    )));
                }
            }
        }
        for d in &doomed {
            self.store.delete_dataset(name, &d.version.sha256)?;
            info!(dataset = name, sha256 = %d.version.sha256, "data set version deleted");
        }
        let kept = self.store.datasets()?;
        if !kept.iter().any(|k| k.name == name) {
            self.store.release_dataset(name)?;
        }
        drop(changing);
        for d in &doomed {
            // The same bytes pushed under another name share these files.
            let shared =
                kept.iter().any(|k| k.version.sha256 == d.version.sha256 && k.version.location == d.version.location);
            if !shared && let Err(e) = self.files.delete_dataset(&d.version).await {
                // The record is gone, so nothing reads them: only space is lost.
                warn!(dataset = name, sha256 = %d.version.sha256, error = %e, "could not delete a deleted version's files");
            }
        }
        Ok(doomed)
    }

    /// The lock [`Coordinator::dataset_changes`] describes, to change records.
    pub(super) fn datasets_changing(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.dataset_changes.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The same lock, to pin a job to the records as they are.
    pub(super) fn datasets_pinning(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.dataset_changes.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The version with this fingerprint: a pushed copy, which nobody can change, first; then
    /// the objects read under `name` (the reference's S3 URL); then any other read of the same
    /// bytes, which its bucket's owner may have changed since.
    pub fn find_dataset_version(&self, sha256: &str, name: &str) -> Result<DatasetRecord> {
        let found = self
            .store
            .datasets()?
            .into_iter()
            .filter(|d| d.version.sha256 == sha256)
            .min_by_key(|d| (d.is_s3_read(), d.name != name));
        found.ok_or_else(|| Error::DatasetVersionNotFound(sha256.to_string()))
    }

    /// Who owns each data set `spec` names, to check the submitter may read them.
    pub fn dataset_owners(&self, spec: &JobSpec) -> Result<Vec<String>> {
        let mut spec = spec.clone();
        let mut owners = Vec::new();
        for (_, path) in spec.fetched_paths_mut() {
            if let Some(Ok(r)) = PushedPath::parse(path)
                && let Some(first) = self.store.dataset_versions(&r.name)?.first()
            {
                owners.push(first.owner.clone());
            }
        }
        Ok(owners)
    }

    /// Rewrites every `dataset://NAME/PATH` of `spec` as `dataset://NAME@SHA256/PATH`, the
    /// version pushed last, so every attempt reads the same bytes. Refuses names never pushed,
    /// versions not among the name's, and paths that are not in the version.
    pub(super) fn pin_datasets(&self, spec: &mut JobSpec) -> Result<()> {
        for (field, path) in spec.fetched_paths_mut() {
            let Some(parsed) = PushedPath::parse(path) else { continue };
            let r = parsed.map_err(|why| Error::InvalidArgument(format!("{field}: {why}")))?;
            let refuse = |why: String| Error::InvalidArgument(format!("{field}: {why}"));
            let versions = self.store.dataset_versions(&r.name)?;
            if versions.is_empty() {
                return Err(refuse(format!(
                    "no data set `{}` was pushed: push it first with `gantry dataset push {} PATH`",
                    r.name, r.name
                )));
            }
            let version = match &r.version {
                Some(v) => versions.iter().find(|d| &d.version.sha256 == v),
                None => versions.last(),
            }
            .ok_or_else(|| {
                refuse(format!("data set `{}` has no version {}", r.name, r.version.clone().unwrap_or_default()))
            })?;
            check_inside(&version.version, &r.path).map_err(|why| refuse(format!("data set `{}`: {why}", r.name)))?;
            *path = r.pinned(&version.version.sha256).to_string();
        }
        Ok(())
    }
}

/// `path` is "" (the whole version), one of its files, or a folder of them.
fn check_inside(version: &DatasetVersion, path: &str) -> std::result::Result<(), String> {
    let folder = format!("{path}/");
    if path.is_empty() || version.files.iter().any(|f| f.path == path || f.path.starts_with(&folder)) {
        return Ok(());
    }
    let mut names: Vec<&str> = version.files.iter().take(LISTED).map(|f| f.path.as_str()).collect();
    if version.files.len() > LISTED {
        names.push("...");
    }
    Err(format!("no file or folder `{path}` in it (it holds {})", names.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::FileRecord;

    fn version(paths: &[&str]) -> DatasetVersion {
        let files = paths.iter().map(|p| FileRecord { path: p.to_string(), size: 1, sha256: "f".into() }).collect();
        DatasetVersion { sha256: "s".into(), bytes: 0, files, pushed_at_ms: 0, location: None }
    }

    #[test]
    fn of_first_pushes_of_one_name_racing_exactly_one_is_kept_and_a_deleted_name_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(Coordinator::open(dir.path(), crate::control::Settings::default()).unwrap());
        let pushes: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    let v = DatasetVersion { sha256: format!("{i:064}"), ..version(&["a.csv"]) };
                    c.commit_dataset("wine", &format!("user{i}"), v)
                })
            })
            .collect();
        let results: Vec<_> = pushes.into_iter().map(|p| p.join().unwrap()).collect();
        let kept: Vec<&DatasetRecord> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(kept.len(), 1, "{results:?}");
        let versions = c.dataset_versions("wine").unwrap();
        assert_eq!((versions.len(), &versions[0].owner), (1, &kept[0].owner));
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(refused.to_string().contains(&format!("was pushed by {} while this push", kept[0].owner)));
        }
        // Deleted whole, the name is anyone's again.
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(c.delete_dataset("wine", None)).unwrap();
        let v = DatasetVersion { sha256: "b".repeat(64), ..version(&["a.csv"]) };
        assert_eq!(c.commit_dataset("wine", "someone-else", v).unwrap().owner, "someone-else");
    }

    #[test]
    fn a_path_must_be_a_file_or_folder_of_the_version() {
        let v = version(&["train/0/a.png", "train/1/b.png", "test/0/c.png"]);
        assert!(check_inside(&v, "").is_ok());
        assert!(check_inside(&v, "train").is_ok());
        assert!(check_inside(&v, "train/0/a.png").is_ok());
        let e = check_inside(&v, "tra").unwrap_err();
        assert_eq!(e, "no file or folder `tra` in it (it holds train/0/a.png, train/1/b.png, test/0/c.png)");
        let many = version(&["a", "b", "c", "d", "e", "f"]);
        assert!(check_inside(&many, "z").unwrap_err().ends_with("(it holds a, b, c, d, e, ...)"));
    }
}
