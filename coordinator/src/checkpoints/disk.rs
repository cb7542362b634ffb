//! Checkpoints in the data directory: `<data-dir>/jobs/<id>/checkpoints/step-<N>/...`.
//!
//! An upload is written into a private incoming directory and renamed into place once verified;
//! the rename is the commit, so a crash leaves either nothing or a whole checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{CHUNK, FileStream};
use crate::error::{Error, Result};
use crate::records::CheckpointRecord;

#[derive(Clone)]
pub struct Disk {
    root: PathBuf,
}

/// Where one upload's files are written until it is committed.
pub struct Sink {
    dir: PathBuf,
    final_dir: PathBuf,
    file: Option<std::fs::File>,
}

impl Disk {
    pub fn new(jobs_dir: PathBuf) -> Disk {
        Disk { root: jobs_dir }
    }

    pub fn step_dir(&self, job: &str, step: u64) -> PathBuf {
        self.root.join(job).join("checkpoints").join(format!("step-{step}"))
    }

    pub fn sink(&self, header: &CheckpointRecord, upload: &str) -> Result<Sink> {
        // Each upload its own directory: ranks may upload the same step at once.
        let parent = self.root.join(&header.job_id).join("checkpoints");
        let dir = parent.join(format!(".incoming-{}-{upload}", header.step));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io("creating the checkpoint directory"))?;
        Ok(Sink { dir, final_dir: self.step_dir(&header.job_id, header.step), file: None })
    }

    pub async fn read(&self, record: &CheckpointRecord, path: &Path) -> Result<FileStream> {
        use tokio::io::AsyncReadExt;
        let name = path.display().to_string();
        let file = tokio::fs::File::open(self.step_dir(&record.job_id, record.step).join(path))
            .await
            .map_err(Error::io(format!("opening checkpoint file {name}")))?;
        let stream = futures::stream::try_unfold(file, move |mut file| {
            let name = name.clone();
            async move {
                let mut buf = vec![0u8; CHUNK];
                let n = file.read(&mut buf).await.map_err(Error::io(format!("reading checkpoint file {name}")))?;
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
            std::fs::create_dir_all(parent).map_err(Error::io("creating a checkpoint subdirectory"))?;
        }
        self.file = Some(std::fs::File::create(&target).map_err(Error::io("creating a checkpoint file"))?);
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("a file is open");
        file.write_all(data).map_err(Error::io("writing a checkpoint file"))
    }

    pub fn close(&mut self) -> Result<()> {
        let file = self.file.take().expect("a file is open");
        file.sync_all().map_err(Error::io("syncing a checkpoint file"))
    }

    /// Moves the verified upload into place.
    pub fn commit(self) -> Result<()> {
        // Renaming onto a step directory that exists fails (it is never empty): the same step
        // uploaded again (a retry, another rank) leaves the first in place, and the caller keeps
        // the first record.
        match std::fs::rename(&self.dir, &self.final_dir) {
            Ok(()) => {
                if let Some(parent) = self.final_dir.parent() {
                    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(Error::io("syncing checkpoints"))?;
                }
                Ok(())
            }
            Err(_) if self.final_dir.exists() => {
                std::fs::remove_dir_all(&self.dir).map_err(Error::io("removing a duplicate upload"))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.dir);
                Err(Error::io("committing the checkpoint")(e))
            }
        }
    }

    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
