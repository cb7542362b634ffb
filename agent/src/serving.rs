//! A serve replica on this agent: the port it listens on (chosen here, on the address the
//! coordinator reaches the agent at) and whether it answers. The coordinator routes requests
//! only to replicas an agent has seen answer `GET /v2/health/ready`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use gantry_core::spec::ServeSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

/// Where `gantry serve-model` reads its settings.
const ADDR_VAR: &str = "GANTRY_SERVE_ADDR";
const NAME_VAR: &str = "GANTRY_SERVE_NAME";

/// How often the replica is asked whether it answers: often until it does, then less.
const PROBE_STARTING: Duration = Duration::from_millis(100);
const PROBE_READY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The replica's environment: its model's name, batching, and a free port on `host`.
pub fn env(name: &str, serve: &ServeSpec, host: &str) -> Result<Vec<(String, String)>> {
    // A port the kernel picks now; the replica binds it a moment later.
    let probe = std::net::TcpListener::bind((host, 0))
        .map_err(Error::io(format!("could not find a free port on {host} for the replica")))?;
    let addr = probe.local_addr().map_err(Error::io("reading the free port".to_string()))?;
    drop(probe);
    Ok(vec![
        (ADDR_VAR.into(), addr.to_string()),
        (NAME_VAR.into(), name.to_string()),
        ("GANTRY_SERVE_MAX_BATCH_SIZE".into(), serve.max_batch_size.to_string()),
        ("GANTRY_SERVE_MAX_BATCH_DELAY_MS".into(), serve.max_batch_delay_ms.to_string()),
        ("GANTRY_SERVE_MAX_QUEUE".into(), serve.max_queue.to_string()),
    ])
}

/// The address to probe, and the path that answers 200 once this replica's model is ready
/// (naming the model: whatever else took the port in the meantime does not answer it).
pub fn probe_target(env: &[(String, String)]) -> Option<(std::net::SocketAddr, String)> {
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let addr = var(ADDR_VAR)?.parse().ok()?;
    Some((addr, format!("/v2/models/{}/ready", var(NAME_VAR)?.replace(' ', "%20"))))
}

/// Keeps `port` at the replica's port while it answers ready, 0 while not; runs until aborted.
pub async fn probe((addr, path): (std::net::SocketAddr, String), port: Arc<AtomicU32>) {
    loop {
        let ready = tokio::time::timeout(PROBE_TIMEOUT, answers_ready(addr, &path)).await.unwrap_or(false);
        port.store(if ready { u32::from(addr.port()) } else { 0 }, Ordering::Relaxed);
        tokio::time::sleep(if ready { PROBE_READY } else { PROBE_STARTING }).await;
    }
}

async fn answers_ready(addr: std::net::SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.1 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replica_counts_as_ready_only_while_it_answers_200() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let port = Arc::new(AtomicU32::new(0));
        assert!(!answers_ready("127.0.0.1:1".parse().unwrap(), "/").await, "nothing listens there");
        let status = Arc::new(std::sync::Mutex::new("503 Service Unavailable"));
        let answering = status.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let line = format!("HTTP/1.1 {}\r\ncontent-length: 0\r\n\r\n", answering.lock().unwrap());
                let _ = s.write_all(line.as_bytes()).await;
            }
        });
        let probing = tokio::spawn(probe((addr, "/v2/models/m/ready".into()), port.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(port.load(Ordering::Relaxed), 0, "not ready yet");
        *status.lock().unwrap() = "200 OK";
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(port.load(Ordering::Relaxed), u32::from(addr.port()));
        probing.abort();
    }

    #[test]
    fn the_replica_is_told_its_model_batching_and_a_free_port() {
        let serve = ServeSpec { from: "1@5".into(), max_batch_size: 8, max_batch_delay_ms: 3, max_queue: 10 };
        let env = env("api", &serve, "127.0.0.1").unwrap();
        let (addr, path) = probe_target(&env).unwrap();
        assert!(addr.ip().is_loopback() && addr.port() != 0);
        assert_eq!(path, "/v2/models/api/ready");
        assert!(env.contains(&("GANTRY_SERVE_MAX_BATCH_SIZE".into(), "8".into())));
        assert!(env.contains(&("GANTRY_SERVE_NAME".into(), "api".into())));
    }
}
