//! Object storage (S3 and compatibles), where checkpoints and logs go so that every coordinator
//! of an HA control plane reads them: one bucket and prefix, `--object-store s3://BUCKET/PREFIX`,
//! laid out as `PREFIX/jobs/<id>/...` and `PREFIX/datasets/<sha256>/...`.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore, PutPayload};

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    /// The bucket `url` names: the one `s3://` paths in specs may read from.
    bucket: String,
    prefix: Key,
    /// The URL it was opened from, for messages.
    url: String,
}

/// An object store failure, with what was being done.
pub fn error(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> Error {
    let context = context.into();
    move |source| Error::Storage { context, source: Box::new(source) }
}

/// A key as `Key::to_string` wrote it (kept in records).
pub fn parse(location: &str) -> Result<Key> {
    Key::parse(location)
        .map_err(|e| Error::Storage { context: format!("object key `{location}`"), source: Box::new(e) })
}

impl Objects {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Result<Objects> {
        let prefix =
            Key::parse(prefix).map_err(|e| Error::InvalidArgument(format!("object store `{url}`: bad prefix: {e}")))?;
        let bucket = url.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or("")).to_string();
        Ok(Objects { store, bucket, prefix, url: url.to_string() })
    }

    /// Opens `s3://BUCKET[/PREFIX]`, with credentials, region and endpoint from the usual
    /// `AWS_*` environment variables, and checks that the bucket answers.
    pub async fn open(url: &str) -> Result<Objects> {
        let refuse = |why: &str| Error::InvalidArgument(format!("object store `{url}`: {why}"));
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(refuse("expected s3://BUCKET[/PREFIX]"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(refuse("no bucket named"));
        }
        let objects = Objects::new(s3(bucket, url)?, prefix.trim_matches('/'), url)?;
        objects.store.list_with_delimiter(Some(&objects.prefix)).await.map_err(error(format!("cannot list {url}")))?;
        Ok(objects)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Whether `key`, or a folder under it, is gantry's own part of the bucket (its jobs' and
    /// data sets' objects), which no spec may read.
    pub fn is_own(&self, key: &Key) -> bool {
        [self.prefix.child("jobs"), self.datasets()]
            .iter()
            .any(|own| key.prefix_matches(own) || own.prefix_matches(key))
    }

    /// Where a job's objects go.
    pub fn job(&self, job: &str) -> Key {
        self.prefix.child("jobs").child(job)
    }

    /// Where pushed data sets' versions go.
    pub fn datasets(&self) -> Key {
        self.prefix.child("datasets")
    }

    /// Every object under `under`, in no particular order.
    pub async fn list(&self, under: &Key) -> Result<Vec<ObjectMeta>> {
        self.store.list(Some(under)).try_collect().await.map_err(error(format!("listing {under}")))
    }

    pub async fn put(&self, key: &Key, data: Bytes) -> Result<()> {
        self.store.put(key, PutPayload::from(data)).await.map_err(error(format!("writing {key}")))?;
        Ok(())
    }

    pub async fn get(&self, key: &Key) -> Result<Bytes> {
        let got = self.store.get(key).await.map_err(error(format!("reading {key}")))?;
        got.bytes().await.map_err(error(format!("reading {key}")))
    }

    /// An object's bytes as they arrive.
    pub async fn stream(&self, key: &Key) -> Result<BoxStream<'static, Result<Bytes>>> {
        let name = key.to_string();
        let got = self.store.get(key).await.map_err(error(format!("reading {name}")))?;
        Ok(Box::pin(
            got.into_stream()
                .map_err(move |e| Error::Storage { context: format!("reading {name}"), source: Box::new(e) }),
        ))
    }

    /// Deletes every object under `under`.
    pub async fn delete_all(&self, under: &Key) -> Result<()> {
        for meta in self.list(under).await? {
            self.store.delete(&meta.location).await.map_err(error(format!("deleting {}", meta.location)))?;
        }
        Ok(())
    }
}

#[cfg(feature = "s3")]
fn s3(bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build();
    Ok(Arc::new(store.map_err(|e| Error::InvalidArgument(format!("object store `{url}`: {e}")))?))
}

#[cfg(not(feature = "s3"))]
fn s3(_bucket: &str, url: &str) -> Result<Arc<dyn ObjectStore>> {
    Err(Error::InvalidArgument(format!(
        "object store `{url}`: this gantry was built without S3 support; build it with `--features s3`"
    )))
}
