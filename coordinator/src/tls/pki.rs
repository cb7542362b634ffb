//! The coordinator's certificate authority. Made at the first start under `DATA_DIR/tls/` (or
//! given by the operator, from a Kubernetes Secret say), it signs the coordinator's server
//! certificate and each agent's client certificate when the agent joins.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber, SignatureAlgorithm,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::auth::tokens::write_private;
use crate::error::{Error, Result};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
/// What the server certificate was made for, to know when to make it again.
const SERVER_ISSUED: &str = "server.json";

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// A server certificate closer than this to its end is made again at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// How long an agent's certificate lasts; the agent joins again (with a token) after that.
pub const AGENT_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// Clocks of agents and coordinator may disagree a little.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// A CA that can sign.
pub struct Authority {
    /// Its certificate, PEM: what clients are given as `--ca`.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    /// `DIR/ca.crt` and `DIR/ca.key`, made when absent. Returns whether they were made.
    pub fn open_or_create(dir: &Path, now_s: i64) -> Result<(Authority, bool)> {
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cert.exists() || key.exists() {
            return Ok((Authority::from_files(&cert, &key)?, false));
        }
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let key_pair = KeyPair::generate().map_err(Error::tls("making the CA key"))?;
        let mut params = CertificateParams::default();
        // A name of its own per CA, so two gantry clusters' CAs are told apart.
        let id = &fingerprint(key_pair.public_key_raw())[..12];
        params.distinguished_name = name(&format!("gantry CA {id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, now_s, CA_LIFETIME)?;
        let cert_pem = params.self_signed(&key_pair).map_err(Error::tls("making the CA certificate"))?.pem();
        write_private(&key, &key_pair.serialize_pem())?;
        std::fs::write(&cert, &cert_pem).map_err(Error::io(format!("writing {}", cert.display())))?;
        Ok((Authority { cert_pem, issuer: Issuer::new(params, key_pair) }, true))
    }

    /// A CA from its certificate and key files (PEM).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Authority> {
        let read =
            |path: &Path| std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())));
        let cert_pem = read(cert)?;
        let key_pair = key_pair(&read(key)?).map_err(Error::tls(format!("reading {}", key.display())))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(Error::tls(format!("reading the CA certificate {}", cert.display())))?;
        Ok(Authority { cert_pem, issuer })
    }

    /// The server certificate for `names` (DNS names and IP addresses) in `dir`, made again when
    /// the names or the CA changed or its end is near. Returns the certificate and key, PEM.
    pub fn server_identity(&self, dir: &Path, names: &[String], now_s: i64) -> Result<(String, String)> {
        let (cert, key, issued) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY), dir.join(SERVER_ISSUED));
        let want = ServerIssued { names: names.to_vec(), ca: fingerprint(self.cert_pem.as_bytes()), not_after: 0 };
        let kept = std::fs::read(&issued).ok().and_then(|b| serde_json::from_slice::<ServerIssued>(&b).ok());
        if let Some(kept) = kept
            && kept.names == want.names
            && kept.ca == want.ca
            && kept.not_after > now_s + RENEW_BEFORE.as_secs() as i64
            && let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read_to_string(&cert), std::fs::read_to_string(&key))
        {
            return Ok((cert_pem, key_pem));
        }
        let key_pair = KeyPair::generate().map_err(Error::tls("making the server key"))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(Error::tls("the server certificate's names"))?;
        params.distinguished_name = name("gantry coordinator");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let not_after = set_validity(&mut params, now_s, SERVER_LIFETIME)?;
        let cert_pem =
            params.signed_by(&key_pair, &self.issuer).map_err(Error::tls("signing the server certificate"))?.pem();
        let key_pem = key_pair.serialize_pem();
        write_private(&key, &key_pem)?;
        std::fs::write(&cert, &cert_pem).map_err(Error::io(format!("writing {}", cert.display())))?;
        let record = serde_json::to_vec(&ServerIssued { not_after, ..want })?;
        std::fs::write(&issued, record).map_err(Error::io(format!("writing {}", issued.display())))?;
        Ok((cert_pem, key_pem))
    }

    /// A client certificate for agent `node`, for the P-256 public key it sent (its private key
    /// never leaves the agent). Returns the certificate, PEM, and its fingerprint.
    pub fn issue_agent(&self, node: &str, public_key: &[u8], now_s: i64) -> Result<(String, String)> {
        let key = AgentKey::parse(public_key)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(node);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, now_s, AGENT_LIFETIME)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(Error::tls("signing the agent's certificate"))?;
        Ok((cert.pem(), fingerprint(cert.der())))
    }
}

/// A private key from PEM. ring reads PKCS#8 only; Helm's `genCA` (the chart's CA) writes RSA keys
/// as PKCS#1, which is wrapped in PKCS#8 here.
fn key_pair(pem: &str) -> std::result::Result<KeyPair, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    match PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM private key ({e})"))? {
        PrivateKeyDer::Pkcs8(key) => KeyPair::try_from(key.secret_pkcs8_der()).map_err(|e| e.to_string()),
        PrivateKeyDer::Pkcs1(key) => {
            let pkcs8 = PrivatePkcs8KeyDer::from(rsa_pkcs8(key.secret_pkcs1_der()));
            KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256).map_err(|e| e.to_string())
        }
        _ => Err("an EC key in SEC1 form: convert it with `openssl pkcs8 -topk8 -nocrypt`".into()),
    }
}

/// PKCS#8's PrivateKeyInfo around a PKCS#1 RSA key: version 0, rsaEncryption with NULL
/// parameters, the key as an OCTET STRING.
fn rsa_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u8; 15] =
        [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00];
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(RSA_ENCRYPTION);
    body.extend(der(0x04, pkcs1));
    der(0x30, &body)
}

/// One DER element: tag, definite length, content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend(&bytes[skip..]);
    }
    out.extend(content);
    out
}

/// sha256, hex: how certificates are named in the store.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

#[derive(Serialize, Deserialize)]
struct ServerIssued {
    names: Vec<String>,
    /// Fingerprint of the CA certificate that signed it.
    ca: String,
    /// Unix seconds.
    not_after: i64,
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "gantry");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A fresh serial number, valid from an hour ago (clock skew) for `lifetime`; returns the end, in
/// unix seconds.
fn set_validity(params: &mut CertificateParams, now_s: i64, lifetime: Duration) -> Result<i64> {
    let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).map_err(Error::tls("a certificate's validity"));
    let end = now_s + lifetime.as_secs() as i64;
    // Unpredictable and unique (rcgen would derive it from the key: the same for every
    // certificate of one key).
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).map_err(Error::tls("a certificate's serial number"))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = at(now_s - CLOCK_SKEW.as_secs() as i64)?;
    params.not_after = at(end)?;
    Ok(end)
}

/// An agent's public key as it sent it: an uncompressed P-256 point.
struct AgentKey(Vec<u8>);

impl AgentKey {
    fn parse(raw: &[u8]) -> Result<AgentKey> {
        if raw.len() != 65 || raw[0] != 0x04 {
            return Err(Error::InvalidArgument(
                "public_key: expected an uncompressed P-256 public key (65 bytes starting 0x04)".into(),
            ));
        }
        Ok(AgentKey(raw.to_vec()))
    }
}

impl PublicKeyData for AgentKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000;

    #[test]
    fn the_ca_is_made_once_and_kept_across_restarts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (first, made) = Authority::open_or_create(dir.path(), NOW).unwrap();
        assert!(made);
        let mode = std::fs::metadata(dir.path().join(CA_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the CA key is its owner's only");
        let (again, made) = Authority::open_or_create(dir.path(), NOW + 10).unwrap();
        assert!(!made);
        assert_eq!(first.cert_pem, again.cert_pem);
    }

    #[test]
    fn the_server_certificate_is_kept_until_its_names_or_its_end_change() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Authority::open_or_create(dir.path(), NOW).unwrap();
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (cert, key) = ca.server_identity(dir.path(), &names, NOW).unwrap();
        assert_eq!(ca.server_identity(dir.path(), &names, NOW + 86_400).unwrap(), (cert.clone(), key.clone()));
        let more = vec!["127.0.0.1".to_string(), "gantry.example".to_string()];
        assert_ne!(ca.server_identity(dir.path(), &more, NOW).unwrap().0, cert, "new names, new certificate");
        let near_end = NOW + (SERVER_LIFETIME - RENEW_BEFORE).as_secs() as i64 + 1;
        let renewed = ca.server_identity(dir.path(), &more, near_end).unwrap().0;
        assert_ne!(ca.server_identity(dir.path(), &more, NOW).unwrap().0, cert);
        assert_eq!(ca.server_identity(dir.path(), &more, near_end).unwrap().0, renewed);
    }

    #[test]
    fn der_lengths_are_short_or_long_form() {
        assert_eq!(der(0x04, &[7; 3]), [0x04, 3, 7, 7, 7]);
        assert_eq!(&der(0x04, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(&der(0x30, &[0; 1190])[..4], [0x30, 0x82, 0x04, 0xa6]);
    }

    #[test]
    fn an_agent_certificate_is_for_its_own_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = Authority::open_or_create(dir.path(), NOW).unwrap();
        let agent_key = KeyPair::generate().unwrap();
        let (pem, fp) = ca.issue_agent("node-a", agent_key.public_key_raw(), NOW).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(fp.len(), 64);
        let (_, other) = ca.issue_agent("node-a", agent_key.public_key_raw(), NOW).unwrap();
        assert_ne!(fp, other, "each certificate has its own serial, so its own fingerprint");
        for bad in [&[4u8; 10][..], &[3u8; 65][..], &[][..]] {
            assert_eq!(ca.issue_agent("node-a", bad, NOW).unwrap_err().code(), crate::Code::InvalidArgument);
        }
    }
}
