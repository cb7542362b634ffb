//! A real etcd server for tests: Debian's `etcd-server` (installed by `.ci/run`) on free
//! loopback ports, in its own directory, killed on drop. Shared by the coordinator's and the
//! CLI's tests.

use std::time::{Duration, Instant};

pub struct EtcdServer {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until it reports itself healthy. A port chosen free
    /// can be taken by another test's process before etcd binds it; then etcd exits, and this
    /// tries again with other ports.
    pub fn start() -> EtcdServer {
        for _ in 0..5 {
            if let Some(server) = EtcdServer::try_start() {
                return server;
            }
        }
        panic!("etcd did not start (is Debian's etcd-server installed? .ci/run installs it)");
    }

    fn try_start() -> Option<EtcdServer> {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd is not installed (.ci/run installs Debian's etcd-server)");
        let mut server = EtcdServer { child, url, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if server.child.try_wait().ok().flatten().is_some() {
                return None; // it could not bind its ports
            }
            if healthy(client) {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// etcd's own health endpoint says so (not merely: something accepts on the port).
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
