//! Files in object storage: checkpoints in `PREFIX/jobs/<id>/checkpoints/step-<N>/<upload>/...`,
//! data set versions in `PREFIX/datasets/<sha256>/<upload>/...`.
//!
//! Objects cannot be renamed, so each upload writes under its own name and the committed record
//! says which (its `location`): the record is the commit. An upload that fails, or loses to an
//! earlier one of the same step or version, is deleted.

use std::path::{Component, Path};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path as Key;
use tokio::io::AsyncWriteExt;

use super::{FileStream, Place};
use crate::error::{Error, Result};
use crate::objects::{Objects, parse};

/// Files up to this size are one PUT; larger ones a multipart upload of parts this size (S3
/// wants every part but the last to be at least 5 MiB).
const PART: usize = 8 << 20;

pub struct Sink {
    store: Arc<dyn ObjectStore>,
    base: Key,
    writer: Option<BufWriter>,
    /// Every object this upload started, to delete if it is not committed.
    written: Vec<Key>,
}

/// `base` + a relative path already checked by `safe_relative`.
fn key(base: &Key, path: &Path) -> Key {
    path.components().fold(base.clone(), |key, c| match c {
        Component::Normal(part) => key.child(part.to_string_lossy().as_ref()),
        _ => key,
    })
}

pub(super) fn sink(objects: &Objects, place: Place, upload: &str) -> Sink {
    let base = match place {
        Place::Checkpoint { job, step } => objects.job(job).child("checkpoints").child(format!("step-{step}")),
        Place::Dataset { sha256 } => objects.datasets().child(sha256),
    }
    .child(upload);
    Sink { store: objects.store().clone(), base, writer: None, written: Vec::new() }
}

pub async fn read(objects: &Objects, location: &str, path: &Path) -> Result<FileStream> {
    objects.stream(&key(&parse(location)?, path)).await
}

/// Deletes an upload that was not kept.
pub async fn delete(objects: &Objects, location: &str) -> Result<()> {
    objects.delete_all(&parse(location)?).await
}

impl Sink {
    pub fn location(&self) -> String {
        self.base.to_string()
    }

    pub fn open(&mut self, path: &Path) -> Result<()> {
        let key = key(&self.base, path);
        self.written.push(key.clone());
        self.writer = Some(BufWriter::with_capacity(self.store.clone(), key, PART));
        Ok(())
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        let writer = self.writer.as_mut().expect("a file is open");
        if let Err(e) = writer.write_all(data).await {
            return Err(self.failed("writing", e));
        }
        Ok(())
    }

    pub async fn close(&mut self) -> Result<()> {
        let mut writer = self.writer.take().expect("a file is open");
        writer.shutdown().await.map_err(|e| self.failed("completing", e))
    }

    /// An error naming the object the open file goes to.
    fn failed(&self, doing: &str, e: std::io::Error) -> Error {
        let object = self.written.last().map_or_else(String::new, |key| format!(" {key}"));
        Error::Storage { context: format!("{doing}{object}"), source: Box::new(e) }
    }

    pub async fn discard(mut self) {
        if let Some(mut writer) = self.writer.take() {
            let _ = writer.abort().await;
        }
        for key in &self.written {
            if let Err(e) = self.store.delete(key).await {
                tracing::warn!(object = %key, error = %e, "could not delete an abandoned upload");
            }
        }
    }
}
