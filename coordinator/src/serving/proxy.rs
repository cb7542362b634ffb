//! Carries one inference request to a replica over HTTP/1.1 and brings its answer back, on
//! connections kept open per replica: a new TCP connection per request would cost more than
//! the model's forward pass.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Idle connections kept per replica, at most.
const IDLE_PER_REPLICA: usize = 64;

/// Open connections to replicas, by `host:port`.
#[derive(Default)]
pub struct Pool {
    /// A std mutex: taken to pop or push one connection, never across an await.
    idle: Mutex<HashMap<String, Vec<SendRequest<Full<Bytes>>>>>,
}

/// What a replica answered.
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Why a request did not reach a replica, or got no answer.
#[derive(Debug)]
pub enum Failure {
    /// Nothing was sent: another replica may take the request.
    Unreachable(String),
    /// Sent, but the answer broke off.
    Broken(String),
}

impl Pool {
    /// Sends `body` as `method path` to `addr`. A kept connection the replica has closed is
    /// replaced by a new one, once.
    pub async fn send(&self, addr: &str, method: &str, path: &str, body: Bytes) -> Result<Answer, Failure> {
        // A kept connection can have been closed by the replica while idle: on failure, afresh.
        let mut sent = false;
        if let Some(conn) = self.take(addr) {
            match exchange(conn, addr, method, path, body.clone()).await {
                Ok((answer, conn)) => {
                    self.put(addr, conn);
                    return Ok(answer);
                }
                Err(Failure::Broken(_)) => sent = true,
                Err(Failure::Unreachable(_)) => {}
            }
        }
        // Whether the request may have reached the replica is what the caller must know.
        let fresh = async {
            let conn = connect(addr).await?;
            exchange(conn, addr, method, path, body).await
        };
        match fresh.await {
            Ok((answer, conn)) => {
                self.put(addr, conn);
                Ok(answer)
            }
            Err(Failure::Unreachable(e)) if sent => Err(Failure::Broken(e)),
            Err(failure) => Err(failure),
        }
    }

    fn take(&self, addr: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let conns = idle.get_mut(addr)?;
        while let Some(conn) = conns.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, addr: &str, conn: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let conns = idle.entry(addr.to_string()).or_default();
        if conns.len() < IDLE_PER_REPLICA {
            conns.push(conn);
        }
    }

    /// Drops the connections of replicas no longer routed to.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.idle.lock().expect("pool lock poisoned").retain(|addr, _| live(addr));
    }
}

async fn connect(addr: &str) -> Result<SendRequest<Full<Bytes>>, Failure> {
    let stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| Failure::Unreachable(format!("{addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Unreachable(format!("{addr}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn exchange(
    mut conn: SendRequest<Full<Bytes>>,
    addr: &str,
    method: &str,
    path: &str,
    body: Bytes,
) -> Result<(Answer, SendRequest<Full<Bytes>>), Failure> {
    conn.ready().await.map_err(|e| Failure::Unreachable(format!("{addr}: {e}")))?;
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let response = conn.send_request(request).await.map_err(|e| {
        // hyper tells a request that never left apart from one that did.
        if e.is_canceled() || e.is_closed() {
            Failure::Unreachable(format!("{addr}: {e}"))
        } else {
            Failure::Broken(format!("{addr}: {e}"))
        }
    })?;
    let status = response.status().as_u16();
    let content_type =
        response.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = response.into_body().collect().await.map_err(|e| Failure::Broken(format!("{addr}: {e}")))?.to_bytes();
    Ok((Answer { status, content_type, body }, conn))
}
