//! Several hosts on one machine, for fault tests: each host a network namespace of its own, all
//! joined by a bridge in one more namespace, so a test can cut a host off, partition two hosts,
//! freeze or kill a process and restart it, as a real network and real machines fail.
//!
//! Every process of such a test runs inside the namespaces (`Net::command`), and nothing is
//! addressed from the machine's own namespace: there, the hosts' private addresses would route
//! off the machine. The test's own requests go from a thread that entered a host's namespace
//! (`Net::within`). Dropping the `Net` kills what it started and removes the namespaces.

#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One host: its namespace and its address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

pub struct Net {
    bridge: String,
    pub hosts: Vec<Host>,
    /// Processes started in the hosts, killed on drop.
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> Output {
    let out = Command::new("ip").args(args).output().expect("iproute2's ip is not installed");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

impl Net {
    /// Hosts named `names` on one bridge, at 10.77.0.1, .2, ... in that order. Needs root.
    pub fn new(names: &[&str]) -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("gx{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let bridge = format!("{id}-br");
        let mut net = Net { bridge: bridge.clone(), hosts: Vec::new(), children: Vec::new() };
        ip(&["netns", "add", &bridge]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{id}-{name}");
            let (port, addr) = (format!("p{i}"), format!("10.77.0.{}", i + 1));
            ip(&["netns", "add", &netns]);
            net.hosts.push(Host { name: name.to_string(), netns: netns.clone(), ip: addr.clone() });
            ip(&["-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &bridge]);
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &bridge, "link", "set", &port, "up"]);
            ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &netns, "link", "set", "eth0", "up"]);
            ip(&["-n", &netns, "link", "set", "lo", "up"]);
        }
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// `program` run inside `host` (`ip netns exec` execs it: the child is the program itself).
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host(host).netns]).arg(program);
        command
    }

    /// Starts `command` (from [`Net::command`]) and keeps it, to kill it when the test ends. Its
    /// pid, for [`signal`].
    pub fn spawn(&mut self, mut command: Command) -> u32 {
        let child = command.stdin(Stdio::null()).spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Whether the process started as `pid` has exited (and reaps it).
    pub fn exited(&mut self, pid: u32) -> bool {
        self.children.iter_mut().find(|c| c.id() == pid).is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Kills every process in `host` (kill -9): its agent and the jobs it runs. (The kernel still
    /// closes their connections; cut the host first for a machine that loses power.) Returns how
    /// many it killed.
    pub fn crash(&mut self, host: &str) -> usize {
        let out = ip(&["netns", "pids", &self.host(host).netns]);
        let pids: Vec<u32> =
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect();
        // All frozen first, so that none sees another die (an agent reporting its job's SIGKILL).
        for sig in ["-STOP", "-KILL"] {
            let _ = Command::new("kill").arg(sig).args(pids.iter().map(|p| p.to_string())).status();
        }
        for pid in &pids {
            self.exited(*pid);
        }
        pids.len()
    }

    /// Cuts `host` off from every other: its port on the bridge goes down, as a switch port or
    /// a cable would. Its connections stay open, and silent.
    pub fn cut(&self, host: &str) {
        let port = self.port(host);
        ip(&["-n", &self.bridge, "link", "set", &port, "down"]);
    }

    /// Puts a cut-off host back.
    pub fn heal(&self, host: &str) {
        let port = self.port(host);
        ip(&["-n", &self.bridge, "link", "set", &port, "up"]);
    }

    /// Drops everything between `a` and `b`, both ways, while both still reach the others.
    pub fn partition(&self, a: &str, b: &str) {
        self.nft(
            a,
            &format!(
                "add rule inet chaos input ip saddr {ip} drop\nadd rule inet chaos output ip daddr {ip} drop\n",
                ip = self.host(b).ip
            ),
        );
    }

    /// Ends every partition of `host` (made with [`Net::partition`] from its side).
    pub fn unpartition(&self, host: &str) {
        self.nft(host, "flush table inet chaos\n");
    }

    fn nft(&self, host: &str, rules: &str) {
        let script = format!(
            "add table inet chaos\nadd chain inet chaos input {{ type filter hook input priority 0; }}\nadd chain inet chaos output {{ type filter hook output priority 0; }}\n{rules}"
        );
        let mut nft = self.command(host, "nft");
        let mut child = nft
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (nftables) is not installed");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn port(&self, host: &str) -> String {
        let i = self.hosts.iter().position(|h| h.name == host).unwrap_or_else(|| panic!("no host {host}"));
        format!("p{i}")
    }

    /// Runs `f` on a thread inside `host`'s network namespace: the test's own requests (HTTP to
    /// a coordinator there, say) go from there, never from the machine's namespace.
    pub fn within<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.host(host).netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                // SAFETY: setns on a descriptor we own; it moves this thread only.
                let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns into {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

/// Sends `signal` (`-KILL`, `-STOP`, `-CONT`, `-TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

impl Drop for Net {
    fn drop(&mut self) {
        self.children.retain_mut(|c| c.try_wait().ok().flatten().is_none());
        for child in &mut self.children {
            // A frozen process cannot die of SIGTERM: wake it first.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for child in &mut self.children {
            while std::time::Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for host in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &host.netns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge]).status();
    }
}

/// A gantry fleet on a [`Net`]: the coordinator on one host, agents on others, each a real
/// process in its host's namespace, with TLS and tokens as by default.
pub struct Cluster {
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub coordinator_host: String,
    pub coordinator: Option<u32>,
    pub agents: std::collections::BTreeMap<String, u32>,
    pub agent_timeout: &'static str,
    pub admin_token: String,
    agent_token: String,
}

pub const GRPC_PORT: u16 = 7070;
pub const HTTP_PORT: u16 = 7080;

impl Cluster {
    /// A coordinator on the first of `hosts`, and an agent on each of the others (named for
    /// its host), all connected.
    pub fn start(hosts: &[&str], agent_timeout: &'static str) -> Cluster {
        Cluster::with_agents(hosts, &hosts[1..], agent_timeout)
    }

    /// Hosts `hosts`, the coordinator on the first, agents on `agents` only (more can start
    /// later on the others).
    pub fn with_agents(hosts: &[&str], agents: &[&str], agent_timeout: &'static str) -> Cluster {
        let net = Net::new(hosts);
        let mut cluster = Cluster {
            net,
            dir: super::job_visible_tempdir(),
            coordinator_host: hosts[0].to_string(),
            coordinator: None,
            agents: Default::default(),
            agent_timeout,
            admin_token: String::new(),
            agent_token: super::test_secret(),
        };
        std::fs::write(cluster.dir.path().join("agent-token"), &cluster.agent_token).unwrap();
        cluster.start_coordinator();
        for host in agents {
            cluster.start_agent(host);
        }
        cluster.cli().wait_for_nodes(agents.len(), std::time::Duration::from_secs(30));
        cluster
    }

    pub fn url(&self) -> String {
        format!("https://{}:{GRPC_PORT}", self.net.host(&self.coordinator_host).ip)
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("coordinator/tls/ca.crt")
    }

    pub fn log_path(&self, host: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{host}.log"))
    }

    /// Starts the coordinator, and waits until it serves.
    pub fn start_coordinator(&mut self) {
        let host = self.coordinator_host.clone();
        self.start_coordinator_process();
        let data = self.dir.path().join("coordinator");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::fs::read_to_string(self.log_path(&host)).unwrap_or_default().contains("coordinator listening") {
            assert!(std::time::Instant::now() < deadline, "the coordinator did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.admin_token = std::fs::read_to_string(data.join("admin-token")).unwrap().trim().to_string();
    }

    fn start_coordinator_process(&mut self) {
        let host = self.coordinator_host.clone();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(&host)).unwrap();
        let data = self.dir.path().join("coordinator");
        let mut command = self.net.command(&host, super::GANTRY);
        command
            .args([
                "coordinator",
                "--listen",
                &format!("0.0.0.0:{GRPC_PORT}"),
                "--http",
                &format!("0.0.0.0:{HTTP_PORT}"),
            ])
            .args(["--advertise-host", &self.net.host(&host).ip])
            .args(["--agent-timeout", self.agent_timeout, "--grace-period", "3s"])
            .arg("--data-dir")
            .arg(&data)
            .arg("--agent-token-file")
            .arg(self.dir.path().join("agent-token"))
            .env("GANTRY_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log);
        self.coordinator = Some(self.net.spawn(command));
    }

    /// kill -9 of the coordinator, then a start on the same data directory.
    pub fn restart_coordinator(&mut self, down_for: std::time::Duration) {
        if let Some(pid) = self.coordinator.take() {
            signal(pid, "-KILL");
            while !self.net.exited(pid) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        std::thread::sleep(down_for);
        let log = self.log_path(&self.coordinator_host);
        let starts = || std::fs::read_to_string(&log).unwrap_or_default().matches("coordinator listening").count();
        let before = starts();
        self.start_coordinator_process();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while starts() == before {
            assert!(std::time::Instant::now() < deadline, "the coordinator did not start again");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Starts (or restarts) the agent on `host`.
    pub fn start_agent(&mut self, host: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(host)).unwrap();
        let mut command = self.net.command(host, super::GANTRY);
        command
            .args(["agent", "--coordinator", &self.url(), "--name", host])
            .env("GANTRY_JOIN_TOKEN", &self.agent_token)
            .env("GANTRY_CA", self.ca())
            .env("GANTRY_LOG_FORMAT", "json")
            .arg("--work-dir")
            .arg(self.dir.path().join(host))
            .stdout(Stdio::null())
            .stderr(log);
        let pid = self.net.spawn(command);
        self.agents.insert(host.to_string(), pid);
    }

    /// The CLI, as the admin, from the coordinator's host.
    pub fn cli(&self) -> super::Cli {
        super::Cli {
            url: self.url(),
            dir: self.dir.path().to_path_buf(),
            log: Some(self.log_path(&self.coordinator_host)),
            token: Some(self.admin_token.clone()),
            ca: Some(self.ca()),
            netns: Some(self.net.host(&self.coordinator_host).netns.clone()),
        }
    }

    /// The coordinator's `/metrics`, read from its own host.
    pub fn metrics(&self) -> String {
        let web = super::Web { port: HTTP_PORT, ca: Some(self.ca()) };
        let (code, body) = self
            .net
            .within(&self.coordinator_host, || super::http_get_as(&web, "/metrics", &self.admin_token))
            .unwrap();
        assert_eq!(code, 200, "{body}");
        body
    }

    /// A counter or gauge from `/metrics`: the sample whose name and labels are `series`.
    pub fn metric(&self, series: &str) -> f64 {
        let metrics = self.metrics();
        let prefix = format!("{series} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
            .parse()
            .unwrap()
    }

    /// What the agent on `host` logged about jobs: its own record of when each copy of a rank
    /// started and stopped.
    pub fn agent_events(&self, host: &str) -> Vec<AgentEvent> {
        let log = std::fs::read_to_string(self.log_path(host)).unwrap_or_default();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                let fields = &v["fields"];
                Some(AgentEvent {
                    at_ms: rfc3339_ms(v["timestamp"].as_str()?)?,
                    message: fields["message"].as_str()?.to_string(),
                    job: fields["job"].as_str()?.to_string(),
                    attempt: fields["attempt"].as_u64()? as u32,
                    rank: fields["rank"].as_u64().unwrap_or(0) as u32,
                })
            })
            .collect()
    }
}

/// One line of an agent's log about a rank.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub at_ms: i64,
    pub message: String,
    pub job: String,
    pub attempt: u32,
    pub rank: u32,
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as tracing writes it
/// (`2026-12-06T17:40:00.123456Z`).
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let secs: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + (secs * 1000.0).round() as i64)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for host in self.net.hosts.iter().map(|h| h.name.clone()) {
                let log = std::fs::read_to_string(self.log_path(&host)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {host} (last 40 lines, newest first)\n{}", tail.join("\n"));
            }
        }
    }
}
