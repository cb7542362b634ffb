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
///
/// The job owns `dir` and may change it while the agent (root) reads it, so nothing is reached
/// through a path the job could redirect: every directory and file is opened one component at a
/// time below `trusted` (a directory the job cannot replace), refusing symlinks on the way.
pub fn describe_files(trusted: &Path, dir: &Path) -> Result<Described> {
    let mut out = Described::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let handle = open_below(trusted, &d, true).map_err(Error::io(format!("opening {}", d.display())))?;
        for entry in std::fs::read_dir(fd_path(&handle)).map_err(Error::io(format!("listing {}", d.display())))? {
            let entry = entry.map_err(Error::io("listing a checkpoint"))?;
            let path = d.join(entry.file_name());
            // The entry itself, not what a symlink points at.
            let kind = entry.file_type().map_err(Error::io("reading a checkpoint entry"))?;
            let rel = path.strip_prefix(dir).expect("under dir").to_string_lossy().replace('\\', "/");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                match hash_file(trusted, &path) {
                    Ok((size, sha256)) => out.files.push(v1::FileDigest { path: rel, size, sha256 }),
                    // Swapped for something else since the listing.
                    Err(_) if open_below(trusted, &path, false).is_err() => {
                        out.refused.push((rel, "not a regular file"))
                    }
                    Err(e) => return Err(e),
                }
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

/// Opens `path`, which lies below `trusted`, one component at a time with `O_NOFOLLOW`: a
/// symlink anywhere below `trusted` (put in a directory's or a file's place after it was listed)
/// is refused rather than followed. A file must be a regular file (a pipe would block the agent).
pub(crate) fn open_below(trusted: &Path, path: &Path, directory: bool) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let rel = path.strip_prefix(trusted).map_err(|_| std::io::Error::other("outside the job's directory"))?;
    let mut current = std::fs::File::open(trusted)?;
    let names: Vec<_> = rel.components().collect();
    for (i, component) in names.iter().enumerate() {
        let std::path::Component::Normal(name) = component else {
            return Err(std::io::Error::other("not a plain relative path"));
        };
        let last = i + 1 == names.len();
        let mut flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        flags |= if last && !directory { libc::O_NONBLOCK } else { libc::O_DIRECTORY };
        let name = std::ffi::CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: openat on a directory descriptor we own and a NUL-terminated name.
        let fd = unsafe { libc::openat(current.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor openat just returned, owned by nothing else.
        current = unsafe { std::fs::File::from_raw_fd(fd) };
    }
    if !directory && !current.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(current)
}

/// The path of an open descriptor: a directory listed through it is the one opened, whatever
/// its path names now.
fn fd_path(file: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn hash_file(trusted: &Path, path: &Path) -> Result<(u64, String)> {
    let mut f = open_below(trusted, path, false).map_err(Error::io(format!("opening {}", path.display())))?;
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
    /// A directory above `dir` the job cannot replace (its attempt directory's parent belongs to
    /// the agent): checkpoint files are opened below it without following symlinks.
    pub trusted: PathBuf,
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
        let (trusted, dir) = (self.trusted.clone(), path.to_path_buf());
        let described = tokio::task::spawn_blocking(move || describe_files(&trusted, &dir))
            .await
            .map_err(|e| Error::Checkpoint(format!("hashing failed: {e}")))??;
        for (rel, what) in &described.refused {
            warn!(job = %self.job_id, step, path = %rel, what, "left out of the checkpoint");
            let line =
                format!("[gantry] checkpoint step {step}: `{rel}` is {what}, left out (only regular files are kept)");
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
        let (trusted, root) = (self.trusted.clone(), path.to_path_buf());
        let producer = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let part = |p| v1::CheckpointUpload { part: Some(p) };
            if tx.send(part(v1::checkpoint_upload::Part::Header(header))).await.is_err() {
                return Ok(());
            }
            for file in files {
                let opened =
                    open_below(&trusted, &root.join(&file.path), false).map_err(Error::io("opening for upload"))?;
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
    use v1::checkpoint_data::Part;
    let req = v1::DownloadCheckpointRequest { job_id: r.job_id.clone(), step: Some(r.step) };
    let mut stream = client.download_checkpoint(req).await?.into_inner();
    let header = match stream.next().await {
        Some(Ok(v1::CheckpointData { part: Some(Part::Header(h)) })) => h,
        Some(Err(e)) => return Err(e.into()),
        _ => return Err(Error::Checkpoint("download did not start with a header".into())),
    };
    let chunks = stream.map(|part| match part?.part {
        Some(Part::Chunk(chunk)) => Ok(chunk),
        _ => Err(Error::Checkpoint("unexpected second header".into())),
    });
    receive_files(dest, &header.files, chunks).await.map_err(|e| match e {
        Error::Mismatch => {
            Error::Checkpoint(format!("download of job {} step {} does not match its sha256 listing", r.job_id, r.step))
        }
        e => e,
    })
}

/// A relative, '/'-separated path of plain names: no `..`, `.`, empty parts or control
/// characters.
fn inside(path: &str) -> bool {
    !path.is_empty()
        && !path.chars().any(char::is_control)
        && path.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
}

/// Writes a download's chunks (each file's in order, files one after another) under `dest`,
/// created, then checks that exactly `files` are there with their sizes and sha256.
pub async fn receive_files(
    dest: &Path,
    files: &[v1::FileDigest],
    mut chunks: impl tokio_stream::Stream<Item = Result<v1::FileChunk>> + Unpin,
) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    // Every listed path is checked before anything is written: nothing lands outside `dest`.
    let mut seen = BTreeSet::new();
    for f in files {
        if !inside(&f.path) || !seen.insert(f.path.as_str()) {
            return Err(Error::Checkpoint(format!("refusing listed file `{}`", f.path.escape_debug())));
        }
    }
    tokio::fs::create_dir_all(dest).await.map_err(Error::io(format!("creating {}", dest.display())))?;
    let mut current: Option<(String, tokio::fs::File)> = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        if current.as_ref().map(|(p, _)| p != &chunk.path).unwrap_or(true) {
            if !seen.contains(chunk.path.as_str()) {
                return Err(Error::Checkpoint(format!("unexpected file `{}` in download", chunk.path.escape_debug())));
            }
            let target = dest.join(&chunk.path);
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(Error::io("creating a download's subdirectory"))?;
            }
            let f = tokio::fs::File::create(&target).await.map_err(Error::io("creating a downloaded file"))?;
            current = Some((chunk.path.clone(), f));
        }
        let (_, f) = current.as_mut().expect("set above");
        f.write_all(&chunk.data).await.map_err(Error::io("writing a downloaded file"))?;
    }
    if let Some((_, mut f)) = current {
        f.flush().await.map_err(Error::io("writing a downloaded file"))?;
    }
    // Empty files send no chunk.
    for f in files.iter().filter(|f| f.size == 0) {
        let target = dest.join(&f.path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(Error::io("creating a download's subdirectory"))?;
        }
        tokio::fs::File::create(&target).await.map_err(Error::io("creating a downloaded file"))?;
    }
    let dest = dest.to_path_buf();
    // Written by the agent before the job starts: `dest` itself is trusted.
    let got = tokio::task::spawn_blocking(move || describe_files(&dest, &dest))
        .await
        .map_err(|e| Error::Checkpoint(format!("hashing failed: {e}")))??
        .files;
    let mut want = files.to_vec();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    if got != want {
        return Err(Error::Mismatch);
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
        let files = describe_files(dir.path(), dir.path()).unwrap().files;
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
        let described = describe_files(dir.path(), dir.path()).unwrap();
        let paths: Vec<&str> = described.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["model.bin"]);
        assert_eq!(described.refused, [("linked-dir".to_string(), "a symlink"), ("stolen".to_string(), "a symlink")]);
        // Swapped in after the listing: opening refuses it.
        std::fs::remove_file(dir.path().join("model.bin")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("model.bin")).unwrap();
        assert!(open_below(dir.path(), &dir.path().join("model.bin"), false).is_err());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("shadow"), b"root's secrets").unwrap();
        let job = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(job.path().join("checkpoints/step-1")).unwrap();
        // The job replaces its checkpoints directory (which it owns) with a link elsewhere.
        std::fs::remove_dir_all(job.path().join("checkpoints")).unwrap();
        std::os::unix::fs::symlink(outside.path(), job.path().join("checkpoints")).unwrap();
        let file = job.path().join("checkpoints/shadow");
        assert!(std::fs::read(&file).is_ok(), "a path-following read would get it");
        assert!(open_below(job.path(), &file, false).is_err());
        assert!(describe_files(job.path(), &job.path().join("checkpoints")).is_err());
        // A pipe in a file's place is refused without blocking.
        let pipe = job.path().join("pipe");
        let c = std::ffi::CString::new(pipe.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(open_below(job.path(), &pipe, false).is_err());
    }

    #[tokio::test]
    async fn a_download_listing_a_path_outside_its_directory_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("in");
        for bad in ["../outside", "a/../../outside", "/etc/x", "a//b", "./a", "a\nb", ""] {
            let files = [v1::FileDigest { path: bad.into(), size: 0, sha256: String::new() }];
            let got = receive_files(&dest, &files, tokio_stream::empty()).await;
            assert!(got.is_err(), "{bad:?} accepted");
        }
        assert!(!dir.path().join("outside").exists() && !dest.exists());
        let twice = [
            v1::FileDigest { path: "a".into(), size: 0, sha256: String::new() },
            v1::FileDigest { path: "a".into(), size: 0, sha256: String::new() },
        ];
        assert!(receive_files(&dest, &twice, tokio_stream::empty()).await.is_err());
    }
}
