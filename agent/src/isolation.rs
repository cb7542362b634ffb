//! What keeps a job to its rights on the agent's machine. An agent running as root runs jobs as
//! an unprivileged user (`--job-user`, `nobody` by default), never as root; and each job runs in
//! its own cgroup with its spec's `cpus` and `memory_gb` as limits, so a job the kernel killed
//! for memory can be reported as that rather than as a bare signal.
//!
//! cgroup v2 where it is mounted (a `jobs/` subtree under the agent's own cgroup, the agent
//! itself moved to a leaf beside it, as v2's no-internal-processes rule requires), v1 otherwise
//! (the `memory` and `cpu` hierarchies). Without either, or without the right to write there,
//! jobs run without limits and the agent says so once at start.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::error::{Error, Result};

/// The scheduler's period for CPU quotas: a job with `cpus: 2` may run 200 ms every 100 ms.
const CPU_PERIOD_US: u64 = 100_000;
/// "No limit" in cgroup v1's memory files.
const MAX_V1: &str = "-1";

#[derive(Debug, Clone)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Refuses a work directory the job user cannot reach: a directory above it (root's home, say)
/// that the user may not pass through would fail every job at its first file.
pub fn check_reachable(work_dir: &Path, user: &JobUser) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let full = std::fs::canonicalize(work_dir).map_err(Error::io(format!("resolving {}", work_dir.display())))?;
    for dir in full.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
        let mode = meta.mode();
        let passes = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !passes {
            return Err(Error::Fatal(format!(
                "jobs run as {} and cannot reach {}: {} (mode {:o}) does not let them pass; choose a work \
                 directory outside it (--work-dir, or --data-dir for gantry dev), such as /var/lib/gantry",
                user.name,
                work_dir.display(),
                dir.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Hierarchy {
    /// cgroup v1: the directories under which job cgroups are made, per controller.
    V1 { memory: PathBuf, cpu: Option<PathBuf> },
    /// cgroup v2: the directory under which job cgroups are made.
    V2 { jobs: PathBuf },
}

/// Decided once at the agent's start.
#[derive(Debug, Clone, Default)]
pub struct Isolation {
    pub user: Option<JobUser>,
    cgroups: Option<Hierarchy>,
}

/// A job's cgroup, made before it starts and removed after it ends.
#[derive(Debug)]
pub struct JobCgroup {
    /// The `cgroup.procs` files the job's first process writes itself into.
    procs: Vec<CString>,
    dirs: Vec<PathBuf>,
    /// `memory.events` (v2) or `memory.oom_control` (v1): both count `oom_kill`s.
    oom_counter: PathBuf,
    memory_gb: f64,
}

impl Isolation {
    /// Isolation as this process may give it: a job user only when running as root, cgroups
    /// where they are mounted and writable.
    /// `agent_key` tells this agent's job cgroups from those of other agents on the machine (and
    /// of other test fleets, whose job ids repeat).
    pub fn detect(job_user: &str, agent_key: &str) -> Result<Isolation> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let user = if root { Some(lookup_user(job_user)?) } else { None };
        if user.as_ref().is_some_and(|u| u.uid == 0) {
            return Err(Error::Fatal(format!("--job-user {job_user} is root: jobs never run as root")));
        }
        let cgroups = match detect_hierarchy(agent_key) {
            Ok(h) => Some(h),
            Err(why) => {
                warn!(%why, "jobs run without cgroup limits");
                None
            }
        };
        let isolation = Isolation { user, cgroups };
        info!(isolation = %isolation.describe(), "job isolation");
        Ok(isolation)
    }

    pub fn describe(&self) -> String {
        let user = match &self.user {
            Some(u) => format!("jobs run as {} (uid {})", u.name, u.uid),
            None => "jobs run as the agent's user (the agent is not root)".into(),
        };
        let cgroups = match &self.cgroups {
            Some(Hierarchy::V1 { .. }) => "in their own cgroup (v1) with cpus and memory_gb as limits",
            Some(Hierarchy::V2 { .. }) => "in their own cgroup (v2) with cpus and memory_gb as limits",
            None => "without cgroup limits",
        };
        format!("{user}, {cgroups}")
    }

    /// Gives `dir` (and what is in it) to the job user, so the job can write its checkpoints.
    pub fn hand_over(&self, dir: &Path) -> Result<()> {
        let Some(user) = &self.user else { return Ok(()) };
        chown_tree(dir, user.uid, user.gid)
    }

    /// Makes `dir`, shared by this agent's jobs, and gives the directory itself (not what is
    /// in it, which jobs wrote as the job user) to the job user.
    pub fn shared_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let Some(user) = &self.user else { return Ok(()) };
        std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))
            .map_err(Error::io(format!("chown {}", dir.display())))
    }

    /// Makes the cgroup of job rank `name` with the spec's limits. `None` without cgroups.
    pub fn cgroup(&self, name: &str, cpus: f64, memory_gb: f64) -> Result<Option<JobCgroup>> {
        let Some(hierarchy) = &self.cgroups else { return Ok(None) };
        // `memory_gb: 0` and `cpus: 0` ask for no share, so they set no limit (a limit of 0
        // would kill the job at once); the kernel refuses quotas under 1 ms.
        let memory_bytes = (memory_gb > 0.0).then(|| ((memory_gb * (1u64 << 30) as f64) as u64).to_string());
        let memory_bytes = memory_bytes.as_deref().unwrap_or(MAX_V1);
        let quota_us = if cpus > 0.0 { ((cpus * CPU_PERIOD_US as f64).ceil() as u64).max(1_000) } else { 0 };
        let mut group = match hierarchy {
            Hierarchy::V1 { memory, cpu } => {
                let mem_dir = make_dir(&memory.join(name))?;
                write(&mem_dir.join("memory.limit_in_bytes"), memory_bytes)?;
                // Without swap accounting the file is absent; with it, swap counts too.
                let memsw = mem_dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, memory_bytes)?;
                }
                let mut group = JobCgroup {
                    procs: vec![procs_path(&mem_dir)?],
                    oom_counter: mem_dir.join("memory.oom_control"),
                    dirs: vec![mem_dir],
                    memory_gb,
                };
                if let Some(cpu) = cpu {
                    let cpu_dir = make_dir(&cpu.join(name))?;
                    group.dirs.push(cpu_dir.clone());
                    write(&cpu_dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    if quota_us > 0 {
                        write(&cpu_dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                    }
                    group.procs.push(procs_path(&cpu_dir)?);
                }
                group
            }
            Hierarchy::V2 { jobs } => {
                let dir = make_dir(&jobs.join(name))?;
                let max = if memory_bytes == MAX_V1 { "max" } else { memory_bytes };
                write(&dir.join("memory.max"), max)?;
                let _ = write(&dir.join("memory.swap.max"), "0");
                if quota_us > 0 {
                    write(&dir.join("cpu.max"), &format!("{quota_us} {CPU_PERIOD_US}"))?;
                }
                JobCgroup {
                    procs: vec![procs_path(&dir)?],
                    oom_counter: dir.join("memory.events"),
                    dirs: vec![dir],
                    memory_gb,
                }
            }
        };
        group.dirs.dedup();
        Ok(Some(group))
    }
}

impl JobCgroup {
    /// Whether the kernel killed a process of this job for memory.
    pub fn oom_killed(&self) -> bool {
        std::fs::read_to_string(&self.oom_counter).is_ok_and(|text| oom_kills(&text) > 0)
    }

    /// The reason a job killed for memory ends with.
    pub fn oom_reason(&self) -> String {
        oom_reason(self.memory_gb)
    }

    /// SIGKILLs every process in the job's cgroup, those that left its process group too.
    /// v2's `cgroup.kill` does it atomically; v1 has no such file, so its members are read and
    /// signalled one by one (a pid that exits in between and is reused at once could be hit:
    /// freezing the cgroup first would close that, and is not done yet).
    pub fn kill_all(&self) {
        let Some(dir) = self.dirs.first() else { return };
        if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) has no memory effects. The pid is a member of the job's cgroup,
            // which holds only the job's processes, read just now.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Kills whatever of the job is left and removes the cgroup.
    pub fn remove(mut self) {
        for _ in 0..50 {
            self.kill_all();
            self.dirs.retain(|dir| std::fs::remove_dir(dir).is_err() && dir.exists());
            if self.dirs.is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        warn!(cgroups = ?self.dirs, "a job's cgroup could not be removed");
    }
}

impl JobCgroup {
    /// The files [`enter`] writes to: made before the fork, as nothing may allocate after it.
    pub fn procs(&self) -> Vec<CString> {
        self.procs.clone()
    }
}

/// What the job's first process does between fork and exec, in this order: join its cgroup
/// (as root, so it may), then drop to the job user for good. Only async-signal-safe calls.
pub fn enter(procs: &[CString], user: Option<&JobUser>) -> std::io::Result<()> {
    for procs in procs {
        // SAFETY: open/write/close on a NUL-terminated path made before the fork.
        unsafe {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    if let Some(u) = user {
        // SAFETY: plain syscalls; groups first, then gid, then uid, so none can be regained.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(u.gid) != 0 || libc::setuid(u.uid) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The `oom_kill` count in `memory.events` or `memory.oom_control`.
fn oom_kills(text: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
}

fn lookup_user(name: &str) -> Result<JobUser> {
    let c_name = CString::new(name).map_err(|_| Error::Fatal(format!("--job-user `{name}`: not a user name")))?;
    // SAFETY: getpwnam returns a pointer to static storage or null; read before any other call.
    let pw = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if pw.is_null() {
        return Err(Error::Fatal(format!("--job-user {name}: no such user on this machine")));
    }
    // SAFETY: non-null, as checked.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(JobUser { name: name.to_string(), uid, gid })
}

/// This process's cgroup path for `controller` ("" for v2's unified line).
fn own_cgroup(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

fn detect_hierarchy(agent_key: &str) -> std::result::Result<Hierarchy, String> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        let own = own_cgroup("").ok_or("no cgroup v2 line in /proc/self/cgroup")?;
        return v2_subtree(&root.join(own.trim_start_matches('/')), agent_key);
    }
    let memory_mount = root.join("memory");
    if !memory_mount.join("memory.limit_in_bytes").exists() {
        return Err("no cgroup v2 and no cgroup v1 memory controller mounted".into());
    }
    let under = |mount: &Path, controller: &str| -> std::result::Result<PathBuf, String> {
        let own = own_cgroup(controller).unwrap_or_else(|| "/".into());
        let dir = mount.join(own.trim_start_matches('/')).join("gantry").join(agent_key);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    };
    let memory = under(&memory_mount, "memory")?;
    let cpu_mount = root.join("cpu");
    let cpu = cpu_mount.join("cpu.cfs_quota_us").exists().then(|| under(&cpu_mount, "cpu")).transpose()?;
    Ok(Hierarchy::V1 { memory, cpu })
}

/// v2: processes live only in leaves once controllers are handed down, so the agent moves
/// itself to `own/agent` and jobs go under `own/jobs`, both with memory and cpu enabled.
fn v2_subtree(own: &Path, agent_key: &str) -> std::result::Result<Hierarchy, String> {
    let fail = |what: &str, e: std::io::Error| format!("cgroup v2: {what}: {e}");
    let agent = own.join("agent");
    let jobs = own.join("jobs");
    let ours = jobs.join(agent_key);
    for dir in [&agent, &ours] {
        std::fs::create_dir_all(dir).map_err(|e| fail(&format!("creating {}", dir.display()), e))?;
    }
    // Every process of the agent's cgroup (its own threads' process, and any helper).
    let pids = std::fs::read_to_string(own.join("cgroup.procs")).map_err(|e| fail("reading cgroup.procs", e))?;
    for pid in pids.lines().filter(|l| !l.trim().is_empty()) {
        std::fs::write(agent.join("cgroup.procs"), pid.trim()).map_err(|e| fail("moving the agent to a leaf", e))?;
    }
    for dir in [own, jobs.as_path(), ours.as_path()] {
        std::fs::write(dir.join("cgroup.subtree_control"), "+memory +cpu")
            .map_err(|e| fail(&format!("enabling memory and cpu in {}", dir.display()), e))?;
    }
    Ok(Hierarchy::V2 { jobs: ours })
}

fn make_dir(dir: &Path) -> Result<PathBuf> {
    // A leftover of an agent that died mid-job: empty it first.
    if dir.exists() {
        let _ = std::fs::remove_dir(dir);
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating cgroup {}", dir.display())))?;
    Ok(dir.to_path_buf())
}

fn write(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, value).map_err(Error::io(format!("writing {value} to {}", file.display())))
}

fn procs_path(dir: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|_| Error::Fatal(format!("cgroup path {} holds a NUL", dir.display())))
}

/// Gives a tree the agent made (root's until now) to the job user, deepest first: a directory is
/// handed over only once everything in it has been, so no job (all share the job user) can put a
/// symlink into a part still being walked.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(Error::io(format!("reading {}", path.display())))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(Error::io(format!("reading {}", path.display())))? {
            let entry = entry.map_err(Error::io(format!("reading {}", path.display())))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    // lchown: a symlink is given away itself, never what it points to.
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(Error::io(format!("chown {}", path.display())))
}

/// Why a job the kernel killed for memory ended: the words every rank of it reports, process or
/// container.
pub fn oom_reason(memory_gb: f64) -> String {
    format!("out of memory (memory_gb: {memory_gb})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_v1_and_v2_counters() {
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"), 2);
        assert_eq!(oom_kills("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n"), 1);
        assert_eq!(oom_kills("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    #[test]
    fn root_is_never_a_job_user_and_an_unknown_user_is_named() {
        assert_eq!(lookup_user("root").unwrap().uid, 0);
        let e = lookup_user("no-such-user-gantry").unwrap_err().to_string();
        assert!(e.contains("no-such-user-gantry"), "{e}");
    }

    #[test]
    fn a_work_directory_behind_a_closed_one_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("home");
        let work = closed.join("agent");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A user that owns nothing here, as the job user owns nothing of the agent's.
        let nobody = JobUser { name: "nobody".into(), uid: 65534, gid: 65534 };
        let e = check_reachable(&work, &nobody).unwrap_err().to_string();
        assert!(e.contains(&format!("{} (mode 700) does not let them pass", closed.display())), "{e}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        // Open above the temporary directory too, or the test itself runs in a closed home.
        if dir
            .path()
            .ancestors()
            .skip(1)
            .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        {
            assert!(check_reachable(&work, &nobody).is_ok());
        }
    }
}
