//! A real S3-compatible server for tests: moto's (`pip install 'moto[server]'`, which `.ci/run`
//! does) on a free loopback port, with one bucket, killed on drop.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3Server {
    child: Child,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let program = std::env::var("MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = super::free_port();
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {program} ({e}); .ci/run installs it: pip install 'moto[server]'")
            });
        let server = S3Server { child, port, bucket: bucket.to_string() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match server.request("PUT", &format!("/{bucket}")) {
                Ok((200, _)) => return server,
                Ok((code, body)) => panic!("creating bucket {bucket}: HTTP {code}: {body}"),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => panic!("{program} did not answer on port {port}: {e}"),
            }
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a gantry coordinator needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint().as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Every key under `prefix` with its size, from the server's own listing (ListObjectsV2).
    pub fn objects(&self, prefix: &str) -> Vec<(String, u64)> {
        let (code, body) =
            self.request("GET", &format!("/{}?list-type=2&max-keys=1000&prefix={prefix}", self.bucket)).unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("<IsTruncated>true"), "more than 1000 objects under {prefix}");
        body.split("<Contents>")
            .skip(1)
            .map(|entry| {
                let field = |name: &str| {
                    let start = entry.find(&format!("<{name}>")).unwrap() + name.len() + 2;
                    entry[start..start + entry[start..].find('<').unwrap()].to_string()
                };
                (field("Key"), field("Size").parse().unwrap())
            })
            .collect()
    }

    /// One object's bytes.
    pub fn get(&self, key: &str) -> Vec<u8> {
        let (code, body) = self.request_bytes("GET", &format!("/{}/{key}", self.bucket)).unwrap();
        assert_eq!(code, 200, "{key}: {}", String::from_utf8_lossy(&body));
        body
    }

    /// Writes one object, as another S3 client (a user's `aws s3 cp`) would.
    pub fn put(&self, key: &str, data: &[u8]) {
        let (code, body) = self.send("PUT", &format!("/{}/{key}", self.bucket), data).unwrap();
        assert_eq!(code, 200, "{key}: {}", String::from_utf8_lossy(&body));
    }

    fn request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let (code, body) = self.request_bytes(method, path)?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    fn request_bytes(&self, method: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        self.send(method, path, &[])
    }

    /// An HTTP/1.0 request as the test user. moto wants private objects' reads signed, but does
    /// not check the signature.
    fn send(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let auth =
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |p| p + 4);
        let head = String::from_utf8_lossy(&raw[..end]);
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((code, raw[end..].to_vec()))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
