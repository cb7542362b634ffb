//! A gantry fleet of real processes on free loopback ports: `gantry coordinator`, `gantry agent`
//! and the CLI, as a user would run them.

#![allow(dead_code)]

pub mod chaos;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const GANTRY: &str = env!("CARGO_BIN_EXE_gantry");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub grpc: u16,
    pub http: u16,
    pub coordinator: Option<Child>,
    pub agents: Vec<Child>,
    pub grace: &'static str,
    /// How long the coordinator waits for a silent agent; agents stop their jobs 30% sooner.
    pub agent_timeout: &'static str,
    /// The admin token the coordinator wrote at its first start (DATA_DIR/admin-token).
    pub admin_token: String,
    /// The agents' join token, given to the coordinator with --agent-token-file.
    pub agent_token: String,
    /// `--object-store URL` and the environment that reaches it, when the coordinator has one.
    pub object_store: Option<(String, Vec<(String, String)>)>,
}

/// A random secret for tests, from the kernel.
pub fn test_secret() -> String {
    let mut bytes = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Fleet {
    /// A coordinator and one agent, with short timeouts so tests run fast.
    pub fn start() -> Fleet {
        Fleet::with_grace("3s")
    }

    /// The same, with `grace` between SIGTERM and SIGKILL for cancelled and preempted jobs.
    pub fn with_grace(grace: &'static str) -> Fleet {
        Fleet::with_timeouts(grace, "5s")
    }

    /// The same, with a coordinator that declares a silent agent lost after `agent_timeout`.
    pub fn with_timeouts(grace: &'static str, agent_timeout: &'static str) -> Fleet {
        Fleet::build(grace, agent_timeout, None)
    }

    /// A coordinator that keeps its checkpoints in object storage (`--object-store URL`, reached
    /// with `env`), and one agent.
    pub fn with_object_store(url: &str, env: Vec<(String, String)>) -> Fleet {
        Fleet::build("3s", "5s", Some((url.to_string(), env)))
    }

    fn build(
        grace: &'static str,
        agent_timeout: &'static str,
        object_store: Option<(String, Vec<(String, String)>)>,
    ) -> Fleet {
        let mut fleet = Fleet {
            dir: job_visible_tempdir(),
            grpc: 0,
            http: 0,
            coordinator: None,
            agents: Vec::new(),
            grace,
            agent_timeout,
            admin_token: String::new(),
            agent_token: test_secret(),
            object_store,
        };
        std::fs::write(fleet.dir.path().join("agent-token"), &fleet.agent_token).unwrap();
        fleet.start_coordinator();
        fleet.start_agent("node-a");
        fleet.wait_for_nodes(1);
        fleet
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc)
    }

    /// The CA the coordinator made at its first start: what its clients trust.
    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.crt")
    }

    /// What a client trusts the coordinator by, with no certificate of its own.
    pub fn client_tls(&self) -> gantry_proto::ClientTls {
        gantry_proto::ClientTls { ca_pem: Some(std::fs::read_to_string(self.ca()).unwrap()), identity: None }
    }

    /// Joins as agent `name` with the fleet's agent token, as `gantry agent` does: the TLS of a
    /// client of the agents' service, with that node's certificate.
    pub async fn join_as(&self, name: &str) -> gantry_proto::ClientTls {
        use gantry_proto::v1;
        let key = rcgen::KeyPair::generate().unwrap();
        let channel = gantry_proto::endpoint(&self.url(), &self.client_tls()).unwrap().connect().await.unwrap();
        let bearer = gantry_proto::Bearer::new(Some(&self.agent_token)).unwrap();
        let mut client = v1::join_client::JoinClient::with_interceptor(channel, bearer);
        let request = v1::JoinRequest { name: name.to_string(), public_key: key.public_key_raw().to_vec() };
        let certificate = client.join(request).await.unwrap().into_inner().certificate_pem;
        gantry_proto::ClientTls { identity: Some((certificate, key.serialize_pem())), ..self.client_tls() }
    }

    /// The coordinator's HTTPS side.
    pub fn web(&self) -> Web {
        Web { port: self.http, ca: Some(self.ca()) }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    pub fn work_dir(&self, agent: &str) -> PathBuf {
        self.dir.path().join(agent)
    }

    /// Starts the coordinator. The first time it binds port 0 itself, so no other process can
    /// take its ports between a probe and the bind, and the ports are read from its log; a
    /// restart listens on the same ports again, where its agents look for it.
    pub fn start_coordinator(&mut self) {
        let log_path = self.dir.path().join("coordinator.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(GANTRY);
        command
            .args(["coordinator", "--listen", &format!("127.0.0.1:{}", self.grpc)])
            .args(["--http", &format!("127.0.0.1:{}", self.http)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--agent-timeout", self.agent_timeout, "--grace-period", self.grace])
            .arg("--agent-token-file")
            .arg(self.dir.path().join("agent-token"))
            .env("GANTRY_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((url, env)) = &self.object_store {
            command.args(["--object-store", url]).envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = command.spawn().unwrap();
        self.coordinator = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((grpc, http)) = listening_on(&self.coordinator_log()) {
                (self.grpc, self.http) = (grpc, http);
                break;
            }
            assert!(Instant::now() < deadline, "coordinator did not start: {}", self.coordinator_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Written before the coordinator listens.
        self.admin_token = std::fs::read_to_string(self.data_dir().join("admin-token")).unwrap().trim().to_string();
    }

    pub fn start_agent(&mut self, name: &str) {
        self.start_agent_with(name, &[]);
    }

    pub fn start_agent_with(&mut self, name: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(GANTRY)
            .args(["agent", "--coordinator", &self.url(), "--name", name])
            .env("GANTRY_JOIN_TOKEN", &self.agent_token)
            .env("GANTRY_CA", self.ca())
            .args(extra)
            .arg("--work-dir")
            .arg(self.work_dir(name))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(child);
    }

    /// `kill -9` of the coordinator.
    pub fn kill_coordinator(&mut self) {
        let mut child = self.coordinator.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// The CLI pointed at this fleet, as its admin; failures show the coordinator's log.
    pub fn cli(&self) -> Cli {
        self.cli_as(Some(&self.admin_token))
    }

    /// The CLI with `token` (or none).
    pub fn cli_as(&self, token: Option<&str>) -> Cli {
        Cli {
            url: self.url(),
            dir: self.dir.path().to_path_buf(),
            log: Some(self.dir.path().join("coordinator.log")),
            token: token.map(str::to_string),
            ca: Some(self.ca()),
            netns: None,
        }
    }

    /// A login link to the web page at `path` (`/?job=5`): the login form reads the token from
    /// the fragment (which never reaches a server), signs in, and goes on to `path`.
    pub fn web_url(&self, path: &str) -> String {
        let next = path.replace('%', "%25").replace('?', "%3F").replace('=', "%3D").replace('&', "%26");
        format!("https://127.0.0.1:{}/login#token={}&next={next}", self.http, self.admin_token)
    }

    /// A new token with `role`, made by the admin: its secret.
    pub fn token(&self, name: &str, role: &str) -> String {
        self.ok(&["token", "create", name, "--role", role]).trim().to_string()
    }

    pub fn gantry(&self, args: &[&str]) -> Output {
        self.cli().gantry(args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.cli().ok(args)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli().json(args)
    }

    pub fn submit(&self, spec: &str) -> String {
        self.cli().submit(spec)
    }

    pub fn submit_file(&self, file: &Path) -> String {
        self.cli().submit_file(file)
    }

    pub fn state(&self, id: &str) -> String {
        self.cli().state(id)
    }

    pub fn wait_state(&self, id: &str, want: &[&str], timeout: Duration) -> String {
        self.cli().wait_state(id, want, timeout)
    }

    pub fn wait_for_nodes(&self, n: usize) {
        self.cli().wait_for_nodes(n, Duration::from_secs(20))
    }
}

/// The ports of the coordinator's "coordinator listening" log line (JSON logs).
fn listening_on(log: &str) -> Option<(u16, u16)> {
    log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|line| {
        let fields = &line["fields"];
        (fields["message"] == "coordinator listening").then_some(())?;
        let port = |name: &str| fields[name].as_str()?.rsplit(':').next()?.parse().ok();
        Some((port("grpc")?, port("http")?))
    })
}

/// The `gantry` CLI against a coordinator URL (or several, comma-separated).
pub struct Cli {
    pub url: String,
    /// Where spec files are written.
    pub dir: PathBuf,
    /// A log worth showing when a command fails.
    pub log: Option<PathBuf>,
    /// Sent as GANTRY_TOKEN.
    pub token: Option<String>,
    /// Sent as GANTRY_CA.
    pub ca: Option<PathBuf>,
    /// The network namespace it runs in (a host of `chaos::Net`); none: this machine's.
    pub netns: Option<String>,
}

impl Cli {
    /// Runs the CLI with this URL and token only: no login file of whoever runs the tests.
    pub fn gantry(&self, args: &[&str]) -> Output {
        let mut command = match &self.netns {
            None => Command::new(GANTRY),
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, GANTRY]);
                c
            }
        };
        command.args(args).env("GANTRY_COORDINATOR", &self.url).env("XDG_CONFIG_HOME", self.dir.join("config"));
        match &self.token {
            Some(token) => command.env("GANTRY_TOKEN", token),
            None => command.env_remove("GANTRY_TOKEN"),
        };
        match &self.ca {
            Some(ca) => command.env("GANTRY_CA", ca),
            None => command.env_remove("GANTRY_CA"),
        };
        command.output().unwrap()
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.gantry(args);
        let log = self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
        assert!(out.status.success(), "gantry {args:?} failed: {}\nlog:\n{log}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    pub fn submit(&self, spec: &str) -> String {
        let file = self.dir.join(format!("spec-{}.yaml", free_port()));
        std::fs::write(&file, spec).unwrap();
        self.submit_file(&file)
    }

    /// Submits `spec`: the new job's id, or the CLI's error line.
    pub fn try_submit(&self, spec: &str) -> Result<String, String> {
        let file = self.dir.join(format!("spec-{}.yaml", free_port()));
        std::fs::write(&file, spec).unwrap();
        let out = self.gantry(&["submit", file.to_str().unwrap()]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn submit_file(&self, file: &Path) -> String {
        let out = self.ok(&["submit", file.to_str().unwrap()]);
        let id = out.trim().to_string();
        assert!(!id.is_empty() && !id.contains(char::is_whitespace), "submit printed {out:?}");
        id
    }

    pub fn state(&self, id: &str) -> String {
        self.json(&["job", id])["state"].as_str().unwrap().to_string()
    }

    pub fn wait_state(&self, id: &str, want: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id);
            if want.contains(&state.as_str()) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} is {state}, waited for {want:?}\n{}",
                String::from_utf8_lossy(&self.gantry(&["job", id]).stdout)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_for_nodes(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // A coordinator that is still starting answers with an error: wait for it too.
            let out = self.gantry(&["nodes", "-o", "json"]);
            let ready = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|nodes| nodes.as_array().map(|a| a.iter().filter(|n| n["connected"] == true).count()))
                .unwrap_or(0);
            if ready >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {ready} of {n} agents connected");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in self.agents.iter_mut().chain(self.coordinator.as_mut()) {
            // SIGTERM so the agent stops its jobs; then make sure.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for child in self.agents.iter_mut().chain(self.coordinator.as_mut()) {
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Live (non-zombie) processes in a process group, from /proc.
pub fn processes_in_group(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // Fields after the command name (which is in parentheses and may hold spaces).
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2].parse::<i32>() == Ok(pgid) {
            out.push(pid);
        }
    }
    out
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A private copy of the fake NVML library (built once per test process, in its own target
/// directory so it never waits on the build lock of the `cargo test` that runs us), with
/// `devices` as its devices.json. Returns the library's path.
pub fn fake_nvml(dir: &Path, devices: &serde_json::Value) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let target = repo_root().join("target/fake-nvml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "gantry-fake-nvml", "--target-dir"])
            .arg(&target)
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "building the fake NVML library failed");
        target.join("debug/libgantry_fake_nvml.so")
    });
    std::fs::create_dir_all(dir).unwrap();
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(built, &lib).unwrap();
    set_devices(dir, devices);
    lib
}

/// Rewrites the fake library's devices.json (atomically: the agent may be reading it).
pub fn set_devices(dir: &Path, devices: &serde_json::Value) {
    let tmp = dir.join("devices.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(devices).unwrap()).unwrap();
    std::fs::rename(tmp, dir.join("devices.json")).unwrap();
}

/// A CA as an operator makes one with openssl, `DIR/ca.crt` and `DIR/ca.key`: coordinators are
/// given it to sign with (`--ca-cert`, `--ca-key`), and clients trust it. Returns the certificate.
pub fn operator_ca(dir: &Path) -> PathBuf {
    let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
        .args(["-subj", "/CN=test operator CA", "-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is not installed");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    cert
}

/// An HTTP server on loopback: HTTPS trusting `ca` (a coordinator), or plaintext without one
/// (Prometheus's own API).
#[derive(Debug, Clone)]
pub struct Web {
    pub port: u16,
    pub ca: Option<PathBuf>,
}

impl Web {
    pub fn plain(port: u16) -> Web {
        Web { port, ca: None }
    }
}

/// A GET; returns the status line's code and the body.
pub fn http_get(web: &Web, path: &str) -> std::io::Result<(u16, String)> {
    http_request(web, "GET", path, &[], "")
}

/// A GET with `Authorization: Bearer TOKEN`.
pub fn http_get_as(web: &Web, path: &str, token: &str) -> std::io::Result<(u16, String)> {
    http_request(web, "GET", path, &[&format!("Authorization: Bearer {token}")], "")
}

/// An HTTP/1.0 request with extra header lines (a Host line replaces the default); the status
/// code, and the headers and body as one text.
pub fn http_request(
    web: &Web,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let (code, _head, body) = http_exchange(web, method, path, headers, body)?;
    Ok((code, body))
}

/// As [`http_request`], with the response's header block apart.
pub fn http_exchange(
    web: &Web,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let socket = std::net::TcpStream::connect(("127.0.0.1", web.port))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        head += "Host: 127.0.0.1\r\n";
    }
    for h in headers {
        head += &format!("{h}\r\n");
    }
    if !body.is_empty() {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    let request = format!("{head}\r\n{body}");
    let mut bytes = Vec::new();
    match &web.ca {
        None => {
            let mut s = socket;
            s.write_all(request.as_bytes())?;
            s.read_to_end(&mut bytes)?;
        }
        Some(ca) => {
            let mut s = rustls::StreamOwned::new(tls_client(ca)?, socket);
            s.write_all(request.as_bytes())?;
            match s.read_to_end(&mut bytes) {
                // A server that closes without TLS's close_notify, after a whole response.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !bytes.is_empty() => {}
                r => {
                    r?;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((code, head.to_string(), body.to_string()))
}

/// A TLS client for 127.0.0.1 that trusts `ca` only.
fn tls_client(ca: &Path) -> std::io::Result<rustls::ClientConnection> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(std::io::Error::other)
}

/// A real Prometheus server (Debian's package) scraping `target_port` every second.
pub struct Prometheus {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` over HTTPS with `token` as its bearer token, as the Helm chart
    /// configures it.
    pub fn start(target: &Web, token: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: gantry\n    scheme: https\n    tls_config: {{ca_file: '{}'}}\n    authorization: {{type: Bearer, credentials: '{token}'}}\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
                target.ca.as_ref().expect("the coordinator's CA").display(),
                target.port
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the prometheus server is not installed (.ci/run installs Debian's package)");
        Prometheus { port, child, _dir: dir }
    }

    /// An instant query's result vector.
    pub fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", promql.replace(' ', "%20"));
        match http_get(&Web::plain(self.port), &path) {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                v["data"]["result"].as_array().cloned().unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs headless Chromium against `url`, letting the page's scripts run for a few seconds.
pub fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--virtual-time-budget=5000",
            // The coordinator's certificate is from its own CA, which this throwaway profile
            // does not hold (the tests' HTTPS client checks it: `http_exchange`).
            "--ignore-certificate-errors",
            "--window-size=1400,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium is not installed (.ci/run installs Debian's package)")
}

/// A temporary directory jobs can pass through: tests run as root, so agents run their jobs as
/// `nobody`, who must reach the agent's work directory and the scripts tests write here.
pub fn job_visible_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A directory of the test's that jobs (run as `nobody`) may write to.
pub fn job_writable_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
}
