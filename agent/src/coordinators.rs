//! The coordinators an agent may talk to. With a highly available control plane there are
//! several, and only the leader serves: followers wait for leadership before they listen. The
//! session loop moves to the next URL whenever a session fails, so it finds the leader by
//! itself; uploads take whichever client is current on each try.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use gantry_proto::v1::agents_client::AgentsClient;
use gantry_proto::{Authed, Bearer, ClientTls};

use crate::error::{Error, Result};

/// A client of the agents' service. It proves who it is with its client certificate (mutual
/// TLS), and sends no token.
pub type Client = AgentsClient<Authed>;

#[derive(Clone)]
pub struct Coordinators {
    inner: Arc<Inner>,
}

struct Inner {
    urls: Vec<String>,
    /// Replaced whole when the agent joins again (a new certificate). A std lock: held only to
    /// clone a client.
    clients: RwLock<Vec<Client>>,
    current: AtomicUsize,
}

impl Coordinators {
    /// `spec`: one URL, or several separated by commas; `tls`: the CA they are trusted by and
    /// the agent's certificate.
    pub fn new(spec: &str, tls: &ClientTls) -> Result<Coordinators> {
        let urls: Vec<String> = spec.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(Error::Fatal("no coordinator URL given".into()));
        }
        let clients = RwLock::new(clients(&urls, tls)?);
        Ok(Coordinators { inner: Arc::new(Inner { urls, clients, current: AtomicUsize::new(0) }) })
    }

    /// From now on, reach the coordinators with `tls` (the agent joined again).
    pub fn use_tls(&self, tls: &ClientTls) -> Result<()> {
        *self.inner.clients.write().expect("clients lock") = clients(&self.inner.urls, tls)?;
        Ok(())
    }

    /// The client of the coordinator currently believed to lead.
    pub fn client(&self) -> Client {
        self.inner.clients.read().expect("clients lock")[self.index()].clone()
    }

    pub fn url(&self) -> &str {
        &self.inner.urls[self.index()]
    }

    /// This machine's IP on the route to the current coordinator: where peers on the same
    /// network reach it. A connected UDP socket asks the kernel for the route; nothing is sent.
    pub fn local_ip(&self) -> Option<String> {
        use std::net::{ToSocketAddrs, UdpSocket};
        let url = self.url();
        let authority = url.split_once("://").map_or(url, |(_, rest)| rest).split('/').next()?;
        let target = authority.to_socket_addrs().ok()?.next()?;
        let socket = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip().to_string())
    }

    /// The current one failed: try the next.
    pub fn next(&self) {
        let n = self.inner.urls.len();
        if n > 1 {
            let _ = self.inner.current.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
        }
    }

    fn index(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.urls.len()
    }
}

fn clients(urls: &[String], tls: &ClientTls) -> Result<Vec<Client>> {
    let mut clients = Vec::new();
    for url in urls {
        let endpoint = gantry_proto::endpoint(url, tls)
            .map_err(|e| Error::Fatal(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = AgentsClient::with_interceptor(endpoint.connect_lazy(), Bearer::default());
        clients.push(client.max_decoding_message_size(16 << 20));
    }
    Ok(clients)
}
