//! gantry's gRPC protocol: the generated messages and services, the protocol version, and the
//! conversions between wire messages and the core's domain types. Conversions from the wire are
//! `TryFrom` and refuse a missing field with a clear error rather than guessing.

#[allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

mod convert;

pub use convert::{ConvertError, job_state_name, parse_job_state};

/// Agents and coordinators speak the same protocol only when these match; a mismatch is refused
/// at registration.
pub const PROTOCOL_VERSION: u32 = 1;

/// Adds `authorization: Bearer TOKEN` to every call of a client, when it has a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// `None` sends no header (a coordinator without auth). A token that cannot be a header
    /// value (a control character, say) is an error here rather than a confusing refusal later.
    pub fn new(token: Option<&str>) -> Result<Bearer, ConvertError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| ConvertError { field: "token", reason: "holds characters a token cannot have".into() }),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A client with its token.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// What a client trusts and shows when it reaches a coordinator over TLS.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// The CA certificate (PEM) the coordinator's certificate must chain to: `--ca`.
    pub ca_pem: Option<String>,
    /// A client certificate and its key (PEM): an agent's, after it joined.
    pub identity: Option<(String, String)>,
}

/// An endpoint for one coordinator URL: TLS for `https://`, trusting `tls.ca_pem` only;
/// plaintext for `http://` (`gantry dev`, `--insecure`).
pub fn endpoint(url: &str, tls: &ClientTls) -> Result<tonic::transport::Endpoint, ConvertError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let bad = |reason: String| ConvertError { field: "coordinator", reason };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|_| bad(format!("`{url}` is not a coordinator URL (expected e.g. https://127.0.0.1:7070)")))?;
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("https") => {
            let ca = tls.ca_pem.as_deref().ok_or_else(|| ConvertError {
                field: "ca",
                reason: format!(
                    "{url} serves TLS: trust it with --ca FILE or GANTRY_CA (its DATA_DIR/tls/ca.crt), or gantry login --ca"
                ),
            })?;
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint.tls_config(config).map_err(|e| bad(format!("TLS settings for {url}: {e}")))
        }
        Some("http") => Ok(endpoint),
        _ => Err(bad(format!("`{url}`: a coordinator URL starts with https:// (or http:// without TLS)"))),
    }
}
