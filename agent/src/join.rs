//! The agent's TLS identity. A coordinator with auth opens its agents' service to client
//! certificates only: on its first start an agent makes a key pair, sends the public key with its
//! agent token (`--join-token`) to the coordinator's `Join`, and keeps the certificate it gets
//! under `WORK_DIR/tls/`. Later starts use that certificate and need no token; the private key
//! never leaves the machine.

use std::path::Path;
use std::time::Duration;

use gantry_proto::v1::join_client::JoinClient;
use gantry_proto::{Bearer, ClientTls};
use serde_json::json;
use tracing::{info, warn};

use crate::Config;
use crate::error::{Error, Result};

const KEY: &str = "agent.key";
const CERT: &str = "agent.crt";
/// Which node the certificate is for: an agent renamed joins again.
const ISSUED: &str = "agent.json";

/// What the agent trusts and shows: plaintext URLs need neither; `https://` ones need the CA,
/// and with auth a certificate, joining first if this work directory holds none for this name.
pub async fn client_tls(config: &Config) -> Result<ClientTls> {
    let urls: Vec<&str> = config.coordinator.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    if !urls.iter().any(|u| u.starts_with("https://")) {
        return Ok(ClientTls { ca_pem: config.ca_pem.clone(), identity: None });
    }
    let ca_pem = config.ca_pem.clone().ok_or_else(|| {
        Error::Fatal(format!(
            "{} serves TLS: give the agent its CA certificate with --ca FILE (the coordinator's DATA_DIR/tls/ca.crt)",
            config.coordinator
        ))
    })?;
    if let Some(identity) = stored(&config.work_dir.join("tls"), &config.name)? {
        return Ok(ClientTls { ca_pem: Some(ca_pem), identity: Some(identity) });
    }
    join(config, urls, ca_pem).await
}

/// Joins again, for a new certificate: the coordinator refused the one kept (it expired, or the
/// token it was issued for was replaced).
pub async fn join_again(config: &Config) -> Result<ClientTls> {
    let urls: Vec<&str> = config.coordinator.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
    let ca_pem = config.ca_pem.clone().ok_or_else(|| Error::Fatal("no --ca".into()))?;
    join(config, urls, ca_pem).await
}

async fn join(config: &Config, urls: Vec<&str>, ca_pem: String) -> Result<ClientTls> {
    let dir = config.work_dir.join("tls");
    let token = config.token.as_deref().ok_or_else(|| {
        Error::Fatal(format!(
            "this agent has no certificate for node {} yet: start it once with --join-token (an agent token) to join",
            config.name
        ))
    })?;
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Fatal(format!("making the agent's key: {e}")))?;
    let server_only = ClientTls { ca_pem: Some(ca_pem.clone()), identity: None };
    let bearer = Bearer::new(Some(token)).map_err(|e| Error::Fatal(format!("--join-token: {}", e.reason)))?;
    let request =
        gantry_proto::v1::JoinRequest { name: config.name.clone(), public_key: key.public_key_raw().to_vec() };
    let mut backoff = Duration::from_millis(200);
    // The coordinator may not be up yet: try every URL until one answers.
    let certificate_pem = 'join: loop {
        for url in &urls {
            let endpoint = gantry_proto::endpoint(url, &server_only)
                .map_err(|e| Error::Fatal(e.to_string()))?
                .connect_timeout(Duration::from_secs(3));
            let channel = match endpoint.connect().await {
                Ok(channel) => channel,
                Err(e) => {
                    warn!(coordinator = %url, error = %Error::Transport(e), "cannot reach the coordinator to join; retrying");
                    continue;
                }
            };
            match JoinClient::with_interceptor(channel, bearer.clone()).join(request.clone()).await {
                Ok(reply) => break 'join reply.into_inner().certificate_pem,
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::InvalidArgument
                    ) =>
                {
                    return Err(Error::Fatal(format!(
                        "the coordinator refused to let this agent join: {}",
                        s.message()
                    )));
                }
                Err(s) => warn!(coordinator = %url, error = %s.message(), "joining failed; retrying"),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    };
    let key_pem = key.serialize_pem();
    keep(&dir, &config.name, &certificate_pem, &key_pem)?;
    info!(name = %config.name, dir = %dir.display(), "joined: this agent's certificate is kept for later starts");
    Ok(ClientTls { ca_pem: Some(ca_pem), identity: Some((certificate_pem, key_pem)) })
}

/// The certificate and key kept for `node`, if any.
fn stored(dir: &Path, node: &str) -> Result<Option<(String, String)>> {
    let issued = match std::fs::read(dir.join(ISSUED)) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", dir.join(ISSUED).display()))(e)),
    };
    if issued["node"].as_str() != Some(node) {
        return Ok(None);
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(Error::io(format!("reading {}", path.display())))
    };
    Ok(Some((read(CERT)?, read(KEY)?)))
}

/// Writes the key first and the record last: a crash in between leaves no record, and the next
/// start joins again.
fn keep(dir: &Path, node: &str, cert_pem: &str, key_pem: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("creating {}", dir.display())))?;
    let _ = std::fs::remove_file(dir.join(ISSUED));
    for (name, text) in [(KEY, key_pem), (CERT, cert_pem), (ISSUED, &json!({ "node": node }).to_string())] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(Error::io(format!("creating {}", path.display())))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(Error::io(format!("writing {}", path.display())))?;
        file.sync_all().map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(())
}
