//! Files in the data directory: checkpoints in `<data-dir>/jobs/<id>/checkpoints/step-<N>/...`,
//! data set versions in `<data-dir>/datasets/<sha256>/...`.
//!
//! An upload is written into a private incoming directory and renamed into place once verified;
//! the rename is the commit, so a crash leaves either nothing or a whole checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{CHUNK, FileStream, Place};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Disk {
    jobs: PathBuf,
    datasets: PathBuf,
}

/// Where one upload's files are written until it is committed.
pub struct Sink {
    dir: PathBuf,
    final_dir: PathBuf,
    file: Option<std::fs::File>,
}

impl Disk {
    pub fn new(jobs: PathBuf, datasets: PathBuf) -> Disk {
        Disk { jobs, datasets }
    }

    pub(super) fn dir(&self, place: Place) -> PathBuf {
        match place {
            Place::Checkpoint { job, step } => self.jobs.join(job).join("checkpoints").join(format!("step-{step}")),
            Place::Dataset { sha256 } => self.datasets.join(sha256),
        }
    }

    pub(super) fn sink(&self, place: Place<'_>, upload: &str) -> Result<Sink> {
        let final_dir = self.dir(place);
        let parent = final_dir.parent().expect("a place is never the root");
        let name = final_dir.file_name().expect("a place has a name").to_string_lossy();
        // Each upload its own directory: ranks may upload the same step at once.
        let dir = parent.join(format!(".incoming-{name}-{upload}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io("creating an upload's directory"))?;
        Ok(Sink { dir, final_dir, file: None })
    }

    /// Removes a place's files, if there are any.
    pub(super) async fn remove(&self, place: Place<'_>) -> Result<()> {
        let dir = self.dir(place);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Io { context: format!("removing {}", dir.display()), source: e })
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn read(&self, place: Place<'_>, path: &Path) -> Result<FileStream> {
        use tokio::io::AsyncReadExt;
        let name = path.display().to_string();
        let file = tokio::fs::File::open(self.dir(place).join(path))
            .await
            .map_err(Error::io(format!("opening stored file {name}")))?;
        let stream = futures::stream::try_unfold(file, move |mut file| {
            let name = name.clone();
            async move {
                let mut buf = vec![0u8; CHUNK];
                let n = file.read(&mut buf).await.map_err(Error::io(format!("reading stored file {name}")))?;
                buf.truncate(n);
                Ok((n > 0).then(|| (Bytes::from(buf), file)))
            }
        });
        Ok(Box::pin(stream))
    }
}

impl Sink {
    pub fn open(&mut self, path: &Path) -> Result<()> {
        let target = self.dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("creating an upload's subdirectory"))?;
        }
        self.file = Some(std::fs::File::create(&target).map_err(Error::io("creating an uploaded file"))?);
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("a file is open");
        file.write_all(data).map_err(Error::io("writing an uploaded file"))
    }

    pub fn close(&mut self) -> Result<()> {
        let file = self.file.take().expect("a file is open");
        file.sync_all().map_err(Error::io("syncing an uploaded file"))
    }

    /// Moves the verified upload into place.
    pub fn commit(self) -> Result<()> {
        // Renaming onto a directory that exists fails (it is never empty): the same step
        // uploaded again (a retry, another rank), or the same data set version pushed again,
        // leaves the first in place, and the caller keeps the first record.
        match std::fs::rename(&self.dir, &self.final_dir) {
            Ok(()) => {
                if let Some(parent) = self.final_dir.parent() {
                    std::fs::File::open(parent)
                        .and_then(|d| d.sync_all())
                        .map_err(Error::io("syncing the upload's directory"))?;
                }
                Ok(())
            }
            Err(_) if self.final_dir.exists() => {
                std::fs::remove_dir_all(&self.dir).map_err(Error::io("removing a duplicate upload"))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.dir);
                Err(Error::io("committing the upload")(e))
            }
        }
    }

    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
