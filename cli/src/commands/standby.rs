//! A follower coordinator's listeners. Until it leads, every connection to its gRPC and HTTP
//! addresses is forwarded, byte for byte, to the leader's (read from etcd's leader key for each
//! connection). So any coordinator's URL serves the CLI, agents, Prometheus and probes, and a
//! follower needs no copy of the state.

use gantry_coordinator::store::leader_of;
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// What a coordinator writes in the leader key: its gRPC and HTTP addresses.
pub fn advertise(grpc: &str, http: &str) -> String {
    format!("{grpc} {http}")
}

#[derive(Clone, Copy)]
pub enum Port {
    Grpc,
    Http,
}

/// Accepts on `listener` forever, forwarding each connection to the leader's `port`.
pub async fn forward(listener: TcpListener, port: Port, endpoints: Vec<String>, prefix: String) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        let (endpoints, prefix) = (endpoints.clone(), prefix.clone());
        tokio::spawn(async move {
            let leader = match leader_of(&endpoints, &prefix).await {
                Ok(Some(leader)) => leader,
                // No leader right now: closing tells the client to try again.
                other => return debug!(?other, "no leader to forward to"),
            };
            let mut parts = leader.split(' ');
            let target = match port {
                Port::Grpc => parts.next(),
                Port::Http => parts.nth(1),
            };
            let Some(target) = target else { return };
            match TcpStream::connect(target).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(e) => debug!(%target, error = %e, "the leader does not answer"),
            }
        });
    }
}
