//! `dataset push`, `list` and `delete`: data sets kept by the coordinator, for jobs to name as
//! `dataset://NAME/PATH` and agents to cache.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use gantry_proto::v1;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::{self, Target, connect};
use crate::output::{FileView, bytes, outln, print_json, print_table, timestamp};

/// Pieces a push is sent in.
const CHUNK: usize = 1 << 20;

#[derive(Serialize)]
pub struct DatasetView {
    pub name: String,
    /// The version: sha256 over its files' paths and digests.
    pub sha256: String,
    pub bytes: u64,
    pub versions: u32,
    pub owner: String,
    pub pushed_at_ms: i64,
    pub files: Vec<FileView>,
}

impl From<&v1::Dataset> for DatasetView {
    fn from(d: &v1::Dataset) -> Self {
        DatasetView {
            name: d.name.clone(),
            sha256: d.sha256.clone(),
            bytes: d.bytes,
            versions: d.versions,
            owner: d.owner.clone(),
            pushed_at_ms: d.pushed_at_ms,
            files: d
                .files
                .iter()
                .map(|f| FileView { path: f.path.clone(), size: f.size, sha256: f.sha256.clone() })
                .collect(),
        }
    }
}

/// What `path` holds, as the push announces it: a file is one entry named by its file name; a
/// folder every regular file under it, relative.
fn describe(path: &Path) -> anyhow::Result<(PathBuf, Vec<v1::FileDigest>)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        let name = path.file_name().context("a file without a name")?.to_string_lossy().to_string();
        let (size, sha256) = hash(path)?;
        return Ok((
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            vec![v1::FileDigest { path: name, size, sha256 }],
        ));
    }
    let described = gantry_agent::describe_files(path, path)?;
    if let Some((rel, what)) = described.refused.first() {
        bail!("{}: `{rel}` is {what}; a data set holds regular files only", path.display());
    }
    if described.files.is_empty() {
        bail!("{}: no files to push", path.display());
    }
    Ok((path.to_path_buf(), described.files))
}

fn hash(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut h, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; CHUNK]);
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok((size, hex::encode(h.finalize())));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

pub async fn push(url: &Target, name: &str, path: &Path, json: bool) -> anyhow::Result<()> {
    gantry_core::spec::check_dataset_name(name).map_err(anyhow::Error::msg)?;
    let (base, files) = describe(path)?;
    let header = v1::Dataset { name: name.to_string(), files: files.clone(), ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // Read on a thread of its own, a piece at a time: a data set need not fit in memory.
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use v1::dataset_data::Part;
        if tx.blocking_send(v1::DatasetData { part: Some(Part::Header(header)) }).is_err() {
            return Ok(());
        }
        for file in &files {
            let full = base.join(&file.path);
            let mut f = std::fs::File::open(&full).with_context(|| format!("cannot read {}", full.display()))?;
            let mut offset = 0u64;
            loop {
                let mut data = vec![0u8; CHUNK];
                let n = f.read(&mut data).with_context(|| format!("cannot read {}", full.display()))?;
                if n == 0 {
                    break;
                }
                data.truncate(n);
                let chunk = v1::FileChunk { path: file.path.clone(), offset, data };
                offset += n as u64;
                if tx.blocking_send(v1::DatasetData { part: Some(Part::Chunk(chunk)) }).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    });
    let mut c = connect(url).await?;
    let pushed = c.push_dataset(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader.await??;
    let pushed = pushed.map_err(client::status)?.into_inner();
    let view = DatasetView::from(&pushed);
    if json {
        return print_json(&view);
    }
    let files = count_files(view.files.len());
    outln!(
        "pushed {name}@{}: {files}, {} (version {} of {name})",
        &view.sha256[..12],
        bytes(view.bytes),
        view.versions
    )?;
    let example = match view.files.as_slice() {
        [one] => format!("dataset://{name}/{}", one.path),
        _ => format!("dataset://{name}/PATH"),
    };
    outln!("jobs name it as {example}")?;
    Ok(())
}

pub async fn list(url: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let list = c.list_datasets(v1::ListDatasetsRequest {}).await.map_err(client::status)?.into_inner();
    let views: Vec<DatasetView> = list.datasets.iter().map(DatasetView::from).collect();
    if json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.sha256[..12.min(d.sha256.len())].to_string(),
                d.files.len().to_string(),
                bytes(d.bytes),
                d.versions.to_string(),
                d.owner.clone(),
                timestamp(d.pushed_at_ms),
            ]
        })
        .collect();
    print_table(&["NAME", "VERSION", "FILES", "SIZE", "VERSIONS", "OWNER", "PUSHED"], &rows)?;
    Ok(())
}

/// `gantry dataset delete NAME[@VERSION]`: one version (its sha256, or the start of it that
/// `dataset list` shows) or every version, with their files.
pub async fn delete(url: &Target, reference: &str, json: bool) -> anyhow::Result<()> {
    let (name, version) = match reference.split_once('@') {
        Some((_, "")) => bail!("`{reference}` names no version: give NAME alone to delete every version"),
        Some((name, version)) => (name, Some(version.to_string())),
        None => (reference, None),
    };
    gantry_core::spec::check_dataset_name(name).map_err(anyhow::Error::msg)?;
    let mut c = connect(url).await?;
    let req = v1::DeleteDatasetRequest { name: name.to_string(), version };
    let deleted = c.delete_dataset(req).await.map_err(client::status)?.into_inner().deleted;
    let views: Vec<DatasetView> = deleted.iter().map(DatasetView::from).collect();
    if json {
        return print_json(&views);
    }
    for d in &views {
        let short = &d.sha256[..12.min(d.sha256.len())];
        outln!("deleted {}@{short}: {}, {}", d.name, count_files(d.files.len()), bytes(d.bytes))?;
    }
    Ok(())
}

fn count_files(n: usize) -> String {
    if n == 1 { "1 file".to_string() } else { format!("{n} files") }
}
