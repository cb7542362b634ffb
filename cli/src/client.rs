//! Reaching the coordinator, and turning what goes wrong into one line a person can act on.

use std::time::Duration;

use gantry_proto::v1::gantry_client::GantryClient;
use tonic::transport::{Channel, Endpoint};

/// `urls`: one coordinator URL, or several separated by commas (a highly available control
/// plane, where only the leader listens): the first that answers is used.
pub async fn connect(urls: &str) -> anyhow::Result<GantryClient<Channel>> {
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| anyhow::anyhow!("`{url}` is not a coordinator URL (expected e.g. http://127.0.0.1:7070)"))?
            .connect_timeout(Duration::from_secs(5));
        if let Ok(channel) = endpoint.connect().await {
            return Ok(GantryClient::new(channel).max_decoding_message_size(64 << 20));
        }
    }
    anyhow::bail!("cannot reach the coordinator at {urls}: is it running? (set --coordinator or GANTRY_COORDINATOR)")
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
