//! Checkpoints between a job and the coordinator: upload every committed `step-<N>` directory the
//! job writes, and download the checkpoint a job resumes from.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gantry_proto::v1;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::coordinators::Coordinators;
use crate::error::{Error, Result};

const CHUNK: usize = 1 << 20;

/// The committed checkpoints in `dir`: directories named `step-<N>`, by step.
pub fn committed_steps(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let step = e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    steps
}

/// Every regular file under `dir`, relative and '/'-separated, with size and sha256, and what was
/// left out: a checkpoint carries regular files only, so a symlink (to a file outside the job's
/// directory, say), a device, a pipe or a socket is named here and never read.
pub fn describe_files(dir: &Path) -> Result<Described> {
    let mut out = Described::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(Error::io(format!("listing {}", d.display())))? {
            let entry = entry.map_err(Error::io("listing a checkpoint"))?;
            let path = entry.path();
            // The entry itself, not what a symlink points at.
            let kind = entry.file_type().map_err(Error::io("reading a checkpoint entry"))?;
            let rel = path.strip_prefix(dir).expect("under dir").to_string_lossy().replace('\\', "/");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let (size, sha256) = hash_file(&path)?;
                out.files.push(v1::FileDigest { path: rel, size, sha256 });
            } else {
                out.refused.push((rel, refusal(kind)));
            }
        }
    }
    out.files.sort_by(|a, b| a.path.cmp(&b.path));
    out.refused.sort();
    Ok(out)
}

#[derive(Debug, Default)]
pub struct Described {
    pub files: Vec<v1::FileDigest>,
    /// Entries that are not regular files or directories, and what they are.
    pub refused: Vec<(String, &'static str)>,
}

fn refusal(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_symlink() {
        "a symlink"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else if kind.is_fifo() {
        "a pipe"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens a checkpoint file without following a symlink: one put in a file's place after it was
/// described is refused rather than read.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut f = open_regular(path).map_err(Error::io(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(Error::io(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(h.finalize())))
}

pub struct Uploader {
    pub job_id: String,
    pub attempt: u32,
    pub coordinators: Coordinators,
    pub dir: PathBuf,
    pub done: BTreeSet<u64>,
    /// The job's log: what a checkpoint left out is said there.
    pub log: mpsc::Sender<String>,
}

impl Uploader {
    /// Uploads every committed step not uploaded yet, retrying each until the coordinator has it.
    pub async fn upload_new(&mut self) {
        for (step, path) in committed_steps(&self.dir) {
            if self.done.contains(&step) {
                continue;
            }
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.upload(step, &path).await {
                    Ok(()) => break,
                    Err(e) if !path.exists() => {
                        // The job deleted it (keeping only its latest checkpoints): nothing to send.
                        warn!(job = %self.job_id, step, error = %e, "checkpoint vanished before upload");
                        break;
                    }
                    Err(Error::Rpc(s)) if !crate::logship::retryable(&s) => {
                        warn!(job = %self.job_id, step, error = %s, "coordinator refused the checkpoint");
                        break;
                    }
                    Err(e) => {
                        warn!(job = %self.job_id, step, error = %e, "checkpoint upload failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(3));
                    }
                }
            }
            self.done.insert(step);
        }
    }

    async fn upload(&mut self, step: u64, path: &Path) -> Result<()> {
        let dir = path.to_path_buf();
        let described = tokio::task::spawn_blocking(move || describe_files(&dir))
            .await
            .map_err(|e| Error::Checkpoint(format!("hashing failed: {e}")))??;
        for (rel, what) in &described.refused {
            warn!(job = %self.job_id, step, path = %rel, what, "left out of the checkpoint");
            let line = format!("[gantry] checkpoint step {step}: `{rel}` is {what}, left out (only regular files are kept)");
            let _ = self.log.send(line).await;
        }
        let files = described.files;
        let header = v1::Checkpoint {
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            step,
            bytes: files.iter().map(|f| f.size).sum(),
            sha256: String::new(),
            files: files.clone(),
            committed_at_ms: 0,
        };
        let (tx, rx) = mpsc::channel(4);
        let root = path.to_path_buf();
        let producer = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let part = |p| v1::CheckpointUpload { part: Some(p) };
            if tx.send(part(v1::checkpoint_upload::Part::Header(header))).await.is_err() {
                return Ok(());
            }
            for file in files {
                let opened = open_regular(&root.join(&file.path)).map_err(Error::io("opening for upload"))?;
                let mut f = tokio::fs::File::from_std(opened);
                let mut offset = 0;
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let n = f.read(&mut buf).await.map_err(Error::io("reading for upload"))?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    let chunk = v1::FileChunk { path: file.path.clone(), offset, data: buf };
                    offset += n as u64;
                    if tx.send(part(v1::checkpoint_upload::Part::Chunk(chunk))).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok::<_, Error>(())
        });
        let ack = self.coordinators.client().upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        producer.await.map_err(|e| Error::Checkpoint(format!("reading files failed: {e}")))??;
        let ack = ack?.into_inner();
        info!(job = %self.job_id, step = ack.step, sha256 = %ack.sha256, "checkpoint uploaded");
        Ok(())
    }
}

/// Downloads a checkpoint into `dest` (created, must not exist), verifying every file's sha256.
pub async fn download(client: &mut crate::coordinators::Client, r: &v1::CheckpointRef, dest: &Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let req = v1::DownloadCheckpointRequest { job_id: r.job_id.clone(), step: Some(r.step) };
    let mut stream = client.download_checkpoint(req).await?.into_inner();
    let header = match stream.next().await {
        Some(Ok(v1::CheckpointData { part: Some(v1::checkpoint_data::Part::Header(h)) })) => h,
        Some(Err(e)) => return Err(e.into()),
        _ => return Err(Error::Checkpoint("download did not start with a header".into())),
    };
    tokio::fs::create_dir_all(dest).await.map_err(Error::io("creating the resume directory"))?;
    let mut current: Option<(String, tokio::fs::File)> = None;
    while let Some(part) = stream.next().await {
        let Some(v1::checkpoint_data::Part::Chunk(chunk)) = part?.part else {
            return Err(Error::Checkpoint("unexpected second header".into()));
        };
        if current.as_ref().map(|(p, _)| p != &chunk.path).unwrap_or(true) {
            if !header.files.iter().any(|f| f.path == chunk.path)
                || chunk.path.split('/').any(|c| c == ".." || c.is_empty())
            {
                return Err(Error::Checkpoint(format!("unexpected file `{}` in download", chunk.path)));
            }
            let target = dest.join(&chunk.path);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(Error::io("creating a resume subdirectory"))?;
            }
            let f = tokio::fs::File::create(&target).await.map_err(Error::io("creating a resume file"))?;
            current = Some((chunk.path.clone(), f));
        }
        let (_, f) = current.as_mut().expect("set above");
        f.write_all(&chunk.data).await.map_err(Error::io("writing a resume file"))?;
    }
    if let Some((_, mut f)) = current {
        f.flush().await.map_err(Error::io("writing a resume file"))?;
    }
    let dest = dest.to_path_buf();
    let got = tokio::task::spawn_blocking(move || describe_files(&dest))
        .await
        .map_err(|e| Error::Checkpoint(format!("hashing failed: {e}")))??
        .files;
    let mut want = header.files.clone();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    if got != want {
        return Err(Error::Checkpoint(format!(
            "download of job {} step {} does not match its sha256 listing",
            r.job_id, r.step
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_step_directories_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["step-20", "step-3", ".tmp-step-40", "notes"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("step-99"), b"a file, not a directory").unwrap();
        let steps: Vec<u64> = committed_steps(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [3, 20]);
    }

    #[test]
    fn files_are_described_recursively_with_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/w.bin"), b"abc").unwrap();
        std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
        let files = describe_files(dir.path()).unwrap().files;
        assert_eq!(files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["state.json", "sub/w.bin"]);
        assert_eq!(files[1].sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn a_symlink_to_a_file_outside_is_named_and_never_read() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"the agent's private key").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.bin"), b"weights").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("stolen")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linked-dir")).unwrap();
        let described = describe_files(dir.path()).unwrap();
        let paths: Vec<&str> = described.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["model.bin"]);
        assert_eq!(described.refused, [("linked-dir".to_string(), "a symlink"), ("stolen".to_string(), "a symlink")]);
        // Swapped in after the listing: opening refuses it.
        std::fs::remove_file(dir.path().join("model.bin")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("model.bin")).unwrap();
        assert!(open_regular(&dir.path().join("model.bin")).is_err());
    }
}
