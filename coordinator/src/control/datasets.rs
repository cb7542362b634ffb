//! Pushed data sets: recording a verified version under its name, finding a version for an
//! agent's cache, and pinning a job's `dataset://` references to the versions they mean.

use gantry_core::JobSpec;
use gantry_core::spec::PushedPath;
use tracing::info;

use super::Coordinator;
use crate::error::{Error, Result};
use crate::records::{DatasetRecord, DatasetVersion};

/// How many files an error lists when a path is not in a data set.
const LISTED: usize = 5;

impl Coordinator {
    /// The name's record, if it was ever pushed.
    pub fn dataset(&self, name: &str) -> Result<Option<DatasetRecord>> {
        self.store.dataset(name)
    }

    pub fn datasets(&self) -> Result<Vec<DatasetRecord>> {
        let mut all = self.store.datasets()?;
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Makes a verified upload the newest version of `name`. The same bytes pushed before (under
    /// any name) keep their first files: the returned version points at them, and the caller
    /// deletes the upload when its location differs.
    pub fn commit_dataset(&self, name: &str, owner: &str, uploaded: DatasetVersion) -> Result<DatasetVersion> {
        let all = self.store.datasets()?;
        let stored = all.iter().flat_map(|d| &d.versions).find(|v| v.sha256 == uploaded.sha256);
        let mut version = match stored {
            Some(v) => DatasetVersion { location: v.location.clone(), ..uploaded },
            None => uploaded,
        };
        version.pushed_at_ms = self.now_ms();
        let mut record = all.into_iter().find(|d| d.name == name).unwrap_or_else(|| DatasetRecord {
            name: name.to_string(),
            owner: owner.to_string(),
            versions: Vec::new(),
        });
        if record.latest().is_some_and(|v| v.sha256 == version.sha256) {
            // Pushed again unchanged: nothing new to record.
            return Ok(record.latest().cloned().expect("checked above"));
        }
        record.versions.push(version.clone());
        self.store.put_dataset(&record)?;
        info!(dataset = name, sha256 = %version.sha256, bytes = version.bytes, "data set version pushed");
        Ok(version)
    }

    /// The version with this fingerprint, and the record it is under.
    pub fn find_dataset_version(&self, sha256: &str) -> Result<(DatasetRecord, DatasetVersion)> {
        for record in self.store.datasets()? {
            if let Some(v) = record.versions.iter().find(|v| v.sha256 == sha256).cloned() {
                return Ok((record, v));
            }
        }
        Err(Error::DatasetVersionNotFound(sha256.to_string()))
    }

    /// The records of the data sets `spec` names, to check the submitter may read them.
    pub fn datasets_named(&self, spec: &JobSpec) -> Result<Vec<DatasetRecord>> {
        let mut spec = spec.clone();
        let Some(train) = spec.train.as_mut() else { return Ok(Vec::new()) };
        let mut found = Vec::new();
        for (_, path) in train.file_paths_mut() {
            if let Some(Ok(r)) = PushedPath::parse(path)
                && let Some(record) = self.store.dataset(&r.name)?
            {
                found.push(record);
            }
        }
        Ok(found)
    }

    /// Rewrites every `dataset://NAME/PATH` of `spec` as `dataset://NAME@SHA256/PATH`, the
    /// version pushed last, so every attempt reads the same bytes. Refuses names never pushed,
    /// versions not among the name's, and paths that are not in the version.
    pub(super) fn pin_datasets(&self, spec: &mut JobSpec) -> Result<()> {
        let Some(train) = spec.train.as_mut() else { return Ok(()) };
        for (field, path) in train.file_paths_mut() {
            let Some(parsed) = PushedPath::parse(path) else { continue };
            let r = parsed.map_err(|why| Error::InvalidArgument(format!("{field}: {why}")))?;
            let refuse = |why: String| Error::InvalidArgument(format!("{field}: {why}"));
            let record = self.store.dataset(&r.name)?.ok_or_else(|| {
                refuse(format!(
                    "no data set `{}` was pushed: push it first with `gantry dataset push {} PATH`",
                    r.name, r.name
                ))
            })?;
            let version = match &r.version {
                Some(v) => record.versions.iter().find(|x| &x.sha256 == v),
                None => record.latest(),
            }
            .ok_or_else(|| {
                refuse(format!("data set `{}` has no version {}", r.name, r.version.clone().unwrap_or_default()))
            })?;
            check_inside(version, &r.path).map_err(|why| refuse(format!("data set `{}`: {why}", r.name)))?;
            *path = r.pinned(&version.sha256).to_string();
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
