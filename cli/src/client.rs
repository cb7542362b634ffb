//! Reaching the coordinator, and turning what goes wrong into one line a person can act on.

use std::time::Duration;

use gantry_proto::v1::gantry_client::GantryClient;
use tonic::transport::{Channel, Endpoint};

pub async fn connect(url: &str) -> anyhow::Result<GantryClient<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|_| anyhow::anyhow!("`{url}` is not a coordinator URL (expected e.g. http://127.0.0.1:7070)"))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|_| {
        anyhow::anyhow!(
            "cannot reach the coordinator at {url}: is it running? (set --coordinator or GANTRY_COORDINATOR)"
        )
    })?;
    Ok(GantryClient::new(channel).max_decoding_message_size(64 << 20))
}

/// A gRPC failure as the coordinator worded it.
pub fn status(s: tonic::Status) -> anyhow::Error {
    match s.code() {
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
