//! `checkpoints` and `checkpoint download`.

use std::io::Write;
use std::path::{Component, Path};

use anyhow::{Context, bail};
use gantry_proto::v1;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::client::{self, Target, connect};
use crate::output::{CheckpointView, bytes, outln, print_json, print_table};

pub async fn list(url: &Target, id: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let list = c
        .list_checkpoints(v1::ListCheckpointsRequest { job_id: id.to_string() })
        .await
        .map_err(client::status)?
        .into_inner();
    let views: Vec<CheckpointView> = list.checkpoints.iter().map(CheckpointView::from).collect();
    if json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|c| {
            vec![c.step.to_string(), bytes(c.bytes), c.files.len().to_string(), c.attempt.to_string(), c.sha256.clone()]
        })
        .collect();
    print_table(&["STEP", "SIZE", "FILES", "ATTEMPT", "SHA256"], &rows)?;
    Ok(())
}

pub async fn download(url: &Target, id: &str, step: Option<u64>, out: &Path, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let mut stream = c
        .download_checkpoint(v1::DownloadCheckpointRequest { job_id: id.to_string(), step })
        .await
        .map_err(client::status)?
        .into_inner();
    let header = match stream.next().await {
        Some(Ok(v1::CheckpointData { part: Some(v1::checkpoint_data::Part::Header(h)) })) => h,
        Some(Err(s)) => return Err(client::status(s)),
        _ => bail!("the coordinator sent no checkpoint description"),
    };
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut current: Option<(String, std::fs::File, Sha256, u64)> = None;
    let mut done = Vec::new();
    while let Some(part) = stream.next().await {
        let part = part.map_err(client::status)?;
        let Some(v1::checkpoint_data::Part::Chunk(chunk)) = part.part else { bail!("unexpected data in the download") };
        if current.as_ref().is_none_or(|(p, ..)| *p != chunk.path) {
            if let Some(file) = current.take() {
                done.push(finish(file)?);
            }
            let rel = Path::new(&chunk.path);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                bail!("refusing file `{}` outside the output directory", chunk.path);
            }
            let target = out.join(rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let f = std::fs::File::create(&target).with_context(|| format!("cannot write {}", target.display()))?;
            current = Some((chunk.path.clone(), f, Sha256::new(), 0));
        }
        let (_, f, h, n) = current.as_mut().expect("opened above");
        f.write_all(&chunk.data)?;
        h.update(&chunk.data);
        *n += chunk.data.len() as u64;
    }
    if let Some(file) = current.take() {
        done.push(finish(file)?);
    }
    // Every file listed must have arrived with the listed size and sha256 (empty files send no chunk).
    for f in &header.files {
        let got = match done.iter().find(|(p, ..)| *p == f.path) {
            Some((_, size, sha)) => (*size, sha.clone()),
            None if f.size == 0 => {
                std::fs::File::create(out.join(&f.path))?;
                (0, hex::encode(Sha256::digest(b"")))
            }
            None => bail!("`{}` did not arrive", f.path),
        };
        if got != (f.size, f.sha256.clone()) {
            bail!("`{}` arrived corrupted: sha256 {} instead of {}", f.path, got.1, f.sha256);
        }
    }
    if json {
        return print_json(&CheckpointView::from(&header));
    }
    outln!(
        "downloaded checkpoint step {} of job {id} ({}, {} files, sha256 verified) to {}",
        header.step,
        bytes(header.bytes),
        header.files.len(),
        out.display()
    )?;
    Ok(())
}

fn finish((path, f, h, n): (String, std::fs::File, Sha256, u64)) -> anyhow::Result<(String, u64, String)> {
    f.sync_all()?;
    Ok((path, n, hex::encode(h.finalize())))
}
