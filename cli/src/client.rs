//! Reaching the coordinator, with whose token, and turning what goes wrong into one line a person
//! can act on.

use std::path::PathBuf;
use std::time::Duration;

use gantry_proto::v1::gantry_client::GantryClient;
use gantry_proto::{Authed, Bearer, ClientTls};
use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Which coordinator a client command talks to, and the token it sends.
#[derive(Debug, Clone)]
pub struct Target {
    /// One URL, or several separated by commas (a highly available control plane).
    pub urls: String,
    pub token: Option<String>,
    /// The CA certificate (PEM) an `https://` coordinator's certificate must chain to.
    pub ca_pem: Option<String>,
}

/// What `gantry login` keeps: a coordinator, the token for it, and the CA it is trusted by.
#[derive(Debug, Serialize, Deserialize)]
pub struct Login {
    pub coordinator: String,
    pub token: String,
    /// PEM, kept in the file itself: the login works wherever the CA file was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// A CA certificate file's text (`--ca`, `GANTRY_CA`).
pub fn read_ca(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--ca {}: {e}", path.display()))?;
    anyhow::ensure!(
        text.contains("-----BEGIN CERTIFICATE-----"),
        "--ca {}: not a PEM certificate (expected the coordinator's DATA_DIR/tls/ca.crt)",
        path.display()
    );
    Ok(text)
}

/// `~/.config/gantry/login.json` (or under `$XDG_CONFIG_HOME`).
pub fn login_file() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("gantry").join("login.json"))
}

impl Target {
    /// `--coordinator`/`GANTRY_COORDINATOR` first, then the login file's, then the default; the
    /// token from `--token`/`GANTRY_TOKEN` and the CA from `--ca`/`GANTRY_CA`, else the login
    /// file's, but only for the coordinator they were given for: a token is never sent to
    /// another coordinator.
    pub fn resolve(url: Option<String>, token: Option<String>, ca: Option<&std::path::Path>) -> anyhow::Result<Target> {
        let login = match login_file() {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                Some(serde_json::from_str::<Login>(&text).map_err(|e| {
                    anyhow::anyhow!("{} is not a gantry login file ({e}): run gantry login again", path.display())
                })?)
            }
            _ => None,
        };
        let urls = url.or_else(|| login.as_ref().map(|l| l.coordinator.clone())).unwrap_or(DEFAULT_URL.into());
        let login = login.filter(|l| l.coordinator == urls);
        let ca_pem = match ca {
            Some(path) => Some(read_ca(path)?),
            None => login.as_ref().and_then(|l| l.ca.clone()),
        };
        let token = token.or_else(|| login.map(|l| l.token));
        Ok(Target { urls, token, ca_pem })
    }
}

/// The first coordinator of `target` that answers.
pub async fn connect(target: &Target) -> anyhow::Result<GantryClient<Authed>> {
    let bearer = Bearer::new(target.token.as_deref()).map_err(|e| anyhow::anyhow!("--token: {}", e.reason))?;
    let urls = &target.urls;
    let tls = ClientTls { ca_pem: target.ca_pem.clone(), identity: None };
    let mut last = String::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let endpoint = gantry_proto::endpoint(url, &tls)?.connect_timeout(Duration::from_secs(5));
        match endpoint.connect().await {
            Ok(channel) => {
                return Ok(GantryClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20));
            }
            Err(e) => last = one_line(&anyhow::Error::new(e)),
        }
    }
    anyhow::bail!(
        "cannot reach the coordinator at {urls} ({last}): is it running, and is the URL https:// (http:// only for gantry dev and --insecure)? (set --coordinator or GANTRY_COORDINATOR)"
    )
}

/// A gRPC failure as the coordinator worded it.
pub fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        // A deposed leader says so; the next command finds the new one.
        tonic::Code::Unavailable if s.message().starts_with("not the leader") => anyhow::anyhow!("{}", s.message()),
        tonic::Code::Unavailable => anyhow::anyhow!("the coordinator became unreachable: {}", s.message()),
        _ => anyhow::anyhow!("{}", s.message()),
    }
}

/// The error and its causes on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
