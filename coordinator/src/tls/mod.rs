//! TLS on every listener: where the coordinator's certificates come from ([`pki`] makes them by
//! default), gRPC's TLS settings (agents may present a client certificate), and the HTTPS
//! listener of the web page and `/metrics` ([`listener`]).

mod listener;
pub mod pki;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
pub use listener::TlsListener;
pub use pki::Authority;

/// Where the coordinator's certificates come from.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// `DATA_DIR/tls`: the CA and the server certificate gantry makes and keeps.
    pub dir: PathBuf,
    /// The names (DNS names, IP addresses) clients reach the coordinator by: its server
    /// certificate is made for these.
    pub names: Vec<String>,
    /// The operator's server certificate and key (`--tls-cert`, `--tls-key`), PEM.
    pub server: Option<(PathBuf, PathBuf)>,
    /// The operator's CA certificate and key (`--ca-cert`, `--ca-key`) to sign with, instead of
    /// `DIR/ca.crt` and `DIR/ca.key`: every coordinator of an HA control plane shares one.
    pub ca: Option<(PathBuf, PathBuf)>,
}

/// What a coordinator serves with.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// Signs agents' client certificates; agents' certificates are checked against it.
    pub authority: Arc<Authority>,
}

impl ServerTls {
    /// Loads the certificates, making the CA and the server certificate on a first start.
    pub fn load(options: &TlsOptions, now_s: i64) -> Result<ServerTls> {
        let authority = match &options.ca {
            Some((cert, key)) => Authority::from_files(cert, key)?,
            None => {
                let (authority, made) = Authority::open_or_create(&options.dir, now_s)?;
                if made {
                    tracing::info!(
                        ca = %options.dir.join(pki::CA_CERT).display(),
                        "first start: made a certificate authority; clients trust the coordinator with --ca pointing at this file"
                    );
                }
                authority
            }
        };
        let (cert_pem, key_pem) = match &options.server {
            Some((cert, key)) => (read(cert)?, read(key)?),
            None => {
                std::fs::create_dir_all(&options.dir)
                    .map_err(Error::io(format!("creating {}", options.dir.display())))?;
                authority.server_identity(&options.dir, &options.names, now_s)?
            }
        };
        Ok(ServerTls { cert_pem, key_pem, authority: Arc::new(authority) })
    }

    /// gRPC: the server certificate; a client certificate is optional (people's CLIs have
    /// none) and, when given, must chain to the CA.
    pub fn grpc(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.authority.cert_pem))
            .client_auth_optional(true)
    }

    /// HTTP/1.1 over TLS, no client certificates (the web side takes tokens).
    pub fn http(&self) -> Result<tokio_rustls::TlsAcceptor> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::tls("reading the server certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(Error::tls("reading the server key"))?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(Error::tls("the HTTPS protocol versions"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(Error::tls("the HTTPS certificate"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))
}
