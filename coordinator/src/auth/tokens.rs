//! The token registry: the store holds each token's name, role and hash; this keeps them by
//! hash in memory, so checking a request costs a hash and a map lookup, and a revocation (written
//! to the store first) takes effect on the next request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{AgentCertificate, IssuedCertificate, Principal, Role, TokenRecord, check_name, hash_secret, new_secret};
use crate::error::{Error, Result};
use crate::store::StateStore;

pub struct Tokens {
    store: Arc<dyn StateStore>,
    index: RwLock<Index>,
}

/// The store's tokens, by what requests present: a secret's hash, or a client certificate's
/// fingerprint.
#[derive(Default)]
struct Index {
    by_hash: HashMap<String, TokenRecord>,
    /// Fingerprint → the hash of the token it was issued for.
    by_certificate: HashMap<String, String>,
}

impl Index {
    fn put(&mut self, record: TokenRecord) {
        self.remove(&record.name);
        for c in &record.certificates {
            self.by_certificate.insert(c.fingerprint.clone(), record.hash.clone());
        }
        self.by_hash.insert(record.hash.clone(), record);
    }

    fn remove(&mut self, name: &str) {
        let gone: Vec<TokenRecord> = self.by_hash.values().filter(|t| t.name == name).cloned().collect();
        for record in gone {
            for c in &record.certificates {
                self.by_certificate.remove(&c.fingerprint);
            }
            self.by_hash.remove(&record.hash);
        }
    }

    fn by_name(&self, name: &str) -> Option<&TokenRecord> {
        self.by_hash.values().find(|t| t.name == name)
    }
}

impl Tokens {
    pub fn load(store: Arc<dyn StateStore>) -> Result<Tokens> {
        let mut index = Index::default();
        for record in store.tokens()? {
            index.put(record);
        }
        Ok(Tokens { store, index: RwLock::new(index) })
    }

    /// A new token: its record, and the secret, which exists nowhere else after this returns.
    pub fn create(&self, name: &str, role: Role, ttl: Option<Duration>, now_ms: i64) -> Result<(TokenRecord, String)> {
        check_name(name)?;
        if self.list().iter().any(|t| t.name == name) {
            return Err(Error::AlreadyExists(format!("token {name}")));
        }
        let secret = new_secret()?;
        let record = self.install(name, role, &secret, ttl, now_ms)?;
        Ok((record, secret))
    }

    /// Records `secret` as token `name`, replacing a token of that name: for secrets the operator
    /// generated (a Kubernetes Secret) and the admin token of the first start. The certificates
    /// agents got with the same secret are kept; with another secret, they stop working.
    pub fn install(
        &self,
        name: &str,
        role: Role,
        secret: &str,
        ttl: Option<Duration>,
        now_ms: i64,
    ) -> Result<TokenRecord> {
        check_name(name)?;
        let safe = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
        if secret.len() < 16 || secret.len() > 256 || !secret.chars().all(safe) {
            return Err(Error::InvalidArgument(format!(
                "token {name}: a secret is 16 to 256 characters of letters, digits and - . _ ~ + / ="
            )));
        }
        let hash = hash_secret(secret);
        let certificates = {
            let index = self.index.read().expect("tokens lock poisoned");
            index.by_hash.get(&hash).filter(|t| t.name == name && t.role == role).map(|t| t.certificates.clone())
        };
        let record = TokenRecord {
            name: name.to_string(),
            role,
            hash,
            created_at_ms: now_ms,
            expires_at_ms: ttl.map(|t| now_ms.saturating_add(t.as_millis().min(i64::MAX as u128) as i64)),
            certificates: certificates.unwrap_or_default(),
        };
        self.store.put_token(&record)?;
        self.index.write().expect("tokens lock poisoned").put(record.clone());
        Ok(record)
    }

    /// Deletes token `name`, and with it the certificates agents joined with: from the store
    /// first, so a revocation that returned is durable.
    pub fn revoke(&self, name: &str) -> Result<()> {
        if !self.store.delete_token(name)? {
            return Err(Error::InvalidArgument(format!("no token named {name} (see gantry token list)")));
        }
        self.index.write().expect("tokens lock poisoned").remove(name);
        Ok(())
    }

    /// Records a client certificate issued to `node` for agent token `token`; certificates of
    /// that node issued before, and expired ones, are dropped: a node holds one at a time.
    pub fn add_certificate(&self, token: &str, issued: IssuedCertificate, now_ms: i64) -> Result<()> {
        let mut record = {
            let index = self.index.read().expect("tokens lock poisoned");
            index.by_name(token).cloned().ok_or_else(|| Error::Unauthenticated(format!("token {token} was revoked")))?
        };
        record.certificates.retain(|c| c.node != issued.node && c.expires_at_ms > now_ms);
        record.certificates.push(issued);
        self.store.put_token(&record)?;
        self.index.write().expect("tokens lock poisoned").put(record);
        Ok(())
    }

    /// Drops every certificate issued to `node`; returns how many there were.
    pub fn forget_node(&self, node: &str) -> Result<usize> {
        let holding: Vec<TokenRecord> = {
            let index = self.index.read().expect("tokens lock poisoned");
            index.by_hash.values().filter(|t| t.certificates.iter().any(|c| c.node == node)).cloned().collect()
        };
        let mut forgotten = 0;
        for mut record in holding {
            let before = record.certificates.len();
            record.certificates.retain(|c| c.node != node);
            forgotten += before - record.certificates.len();
            self.store.put_token(&record)?;
            self.index.write().expect("tokens lock poisoned").put(record);
        }
        Ok(forgotten)
    }

    /// Every token, by name.
    pub fn list(&self) -> Vec<TokenRecord> {
        let index = self.index.read().expect("tokens lock poisoned");
        let mut all: Vec<_> = index.by_hash.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether `who` may still act: for a request already in flight (an agent's session, a log
    /// follow), so that a revocation or an expiry ends it too, not only the next request. An
    /// agent's certificate must still be on record as well.
    pub fn still_valid(
        &self,
        who: &Principal,
        certificate: Option<&AgentCertificate>,
        auth: bool,
        now_ms: i64,
    ) -> bool {
        if !auth {
            return true;
        }
        let index = self.index.read().expect("tokens lock poisoned");
        let Some(token) = index.by_name(&who.name) else { return false };
        let live = token.role == who.role && token.expires_at_ms.is_none_or(|end| now_ms < end);
        live && certificate.is_none_or(|c| {
            token.certificates.iter().any(|held| held.fingerprint == c.fingerprint && now_ms < held.expires_at_ms)
        })
    }

    /// The caller a secret stands for. The answer never says whether a token of some name
    /// exists: unknown, revoked and expired read the same.
    pub fn authenticate(&self, secret: &str, now_ms: i64) -> Result<Principal> {
        let index = self.index.read().expect("tokens lock poisoned");
        match index.by_hash.get(&hash_secret(secret)) {
            Some(t) if t.expires_at_ms.is_none_or(|end| now_ms < end) => {
                Ok(Principal { name: t.name.clone(), role: t.role })
            }
            _ => Err(Error::Unauthenticated("the token is not valid (unknown, revoked or expired)".into())),
        }
    }

    /// The agent a client certificate (by its fingerprint) stands for: valid while its token
    /// is and it is on record.
    pub fn authenticate_certificate(&self, fingerprint: &str, now_ms: i64) -> Result<(Principal, AgentCertificate)> {
        let refused = || {
            Error::Unauthenticated(
                "this agent certificate is not valid (its token was revoked, its node removed, or it expired): join again with an agent token".into(),
            )
        };
        let index = self.index.read().expect("tokens lock poisoned");
        let token =
            index.by_certificate.get(fingerprint).and_then(|hash| index.by_hash.get(hash)).ok_or_else(refused)?;
        let held = token.certificates.iter().find(|c| c.fingerprint == fingerprint).ok_or_else(refused)?;
        if token.expires_at_ms.is_some_and(|end| now_ms >= end) || now_ms >= held.expires_at_ms {
            return Err(refused());
        }
        Ok((
            Principal { name: token.name.clone(), role: token.role },
            AgentCertificate { fingerprint: held.fingerprint.clone(), node: held.node.clone() },
        ))
    }
}

/// A token whose secret the operator made (a Kubernetes Secret), installed at every start.
#[derive(Debug, Clone)]
pub struct SeedToken {
    pub name: String,
    pub role: Role,
    pub secret: String,
}

/// The file the first start writes the admin token to.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Installs the operator's tokens, and on a first start with no admin token, makes one and
/// writes it to `DATA_DIR/admin-token`, readable by its owner only. Returns that file's path
/// when it was written.
pub fn first_start(
    tokens: &Tokens,
    seeds: &[SeedToken],
    data_dir: &std::path::Path,
    now_ms: i64,
) -> Result<Option<std::path::PathBuf>> {
    for seed in seeds {
        tokens.install(&seed.name, seed.role, &seed.secret, None, now_ms)?;
    }
    if tokens.list().iter().any(|t| t.role == Role::Admin) {
        return Ok(None);
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let secret = new_secret()?;
    write_private(&path, &format!("{secret}\n"))?;
    tokens.install("admin", Role::Admin, &secret, None, now_ms)?;
    Ok(Some(path))
}

/// Writes a file only its owner can read, replacing one that was there.
pub fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(text.as_bytes()).map_err(Error::io(format!("writing {}", path.display())))?;
    file.sync_all().map_err(Error::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn tokens() -> (tempfile::TempDir, Tokens) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        (dir, Tokens::load(store).unwrap())
    }

    #[test]
    fn a_created_token_authenticates_as_its_name_and_role_until_revoked() {
        let (_dir, tokens) = tokens();
        let (record, secret) = tokens.create("alice", Role::User, None, 0).unwrap();
        assert_eq!(record.role, Role::User);
        assert_eq!(tokens.authenticate(&secret, 1).unwrap(), Principal { name: "alice".into(), role: Role::User });
        let alice = tokens.authenticate(&secret, 1).unwrap();
        assert!(tokens.still_valid(&alice, None, true, 1));
        tokens.revoke("alice").unwrap();
        assert_eq!(tokens.authenticate(&secret, 2).unwrap_err().code(), crate::Code::Unauthenticated);
        assert!(!tokens.still_valid(&alice, None, true, 2), "a request in flight learns of the revocation");
        assert!(tokens.still_valid(&alice, None, false, 2), "without auth everyone is valid");
        assert!(tokens.revoke("alice").is_err());
    }

    #[test]
    fn an_agent_certificate_works_while_its_token_does_and_binds_its_node() {
        let (_dir, tokens) = tokens();
        let (_, secret) = tokens.create("agents", Role::Agent, None, 0).unwrap();
        let issued = |fp: &str, node: &str| IssuedCertificate {
            fingerprint: fp.into(),
            node: node.into(),
            expires_at_ms: 1_000,
        };
        tokens.add_certificate("agents", issued("f1", "node-a"), 0).unwrap();
        tokens.add_certificate("agents", issued("f2", "node-b"), 0).unwrap();
        let (who, cert) = tokens.authenticate_certificate("f1", 1).unwrap();
        assert_eq!((who.name.as_str(), who.role, cert.node.as_str()), ("agents", Role::Agent, "node-a"));
        assert!(tokens.still_valid(&who, Some(&cert), true, 1));
        assert!(tokens.authenticate_certificate("nope", 1).is_err());
        assert!(tokens.authenticate_certificate("f1", 1_000).is_err(), "expired");
        // Joining again replaces the node's certificate.
        tokens.add_certificate("agents", issued("f3", "node-a"), 0).unwrap();
        assert!(tokens.authenticate_certificate("f1", 1).is_err());
        assert!(!tokens.still_valid(&who, Some(&cert), true, 1), "a session on the old certificate ends");
        // Removing a node ends its certificate only.
        tokens.add_certificate("agents", issued("f9", "node-c"), 0).unwrap();
        assert_eq!(tokens.forget_node("node-c").unwrap(), 1);
        assert!(tokens.authenticate_certificate("f9", 1).is_err());
        assert!(tokens.authenticate_certificate("f3", 1).is_ok());
        assert_eq!(tokens.forget_node("node-c").unwrap(), 0);
        // Reinstalling the same secret (an operator's token, at every start) keeps them.
        tokens.install("agents", Role::Agent, &secret, None, 5).unwrap();
        assert!(tokens.authenticate_certificate("f3", 6).is_ok());
        tokens.revoke("agents").unwrap();
        for fp in ["f2", "f3"] {
            assert_eq!(tokens.authenticate_certificate(fp, 7).unwrap_err().code(), crate::Code::Unauthenticated);
        }
        assert!(tokens.add_certificate("agents", issued("f4", "node-c"), 8).is_err());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let (_dir, tokens) = tokens();
        let (_, secret) = tokens.create("ci", Role::User, Some(Duration::from_secs(60)), 1_000).unwrap();
        assert!(tokens.authenticate(&secret, 60_999).is_ok());
        assert!(tokens.authenticate(&secret, 61_000).is_err());
    }

    #[test]
    fn names_are_unique_and_the_store_keeps_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn StateStore> = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let tokens = Tokens::load(store.clone()).unwrap();
        let (_, secret) = tokens.create("alice", Role::User, None, 0).unwrap();
        assert_eq!(tokens.create("alice", Role::Admin, None, 0).unwrap_err().code(), crate::Code::Conflict);
        let stored = serde_json::to_string(&store.tokens().unwrap()).unwrap();
        assert!(!stored.contains(&secret), "{stored}");
        // A fresh registry over the same store (a restart) knows the token.
        assert!(Tokens::load(store).unwrap().authenticate(&secret, 0).is_ok());
    }

    #[test]
    fn the_first_start_writes_an_admin_token_only_its_owner_reads_and_a_restart_keeps_it() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, tokens) = tokens();
        let path = first_start(&tokens, &[], dir.path(), 0).unwrap().expect("a first start writes the admin token");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(tokens.authenticate(secret.trim(), 0).unwrap().role, Role::Admin);
        assert_eq!(first_start(&tokens, &[], dir.path(), 1).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), secret);
    }

    #[test]
    fn operator_tokens_are_installed_and_an_operator_admin_means_no_generated_one() {
        let (dir, tokens) = tokens();
        let seeds = [
            SeedToken { name: "admin".into(), role: Role::Admin, secret: "from-a-kubernetes-secret".into() },
            SeedToken { name: "agents".into(), role: Role::Agent, secret: "agents-join-secret-xyz".into() },
        ];
        assert_eq!(first_start(&tokens, &seeds, dir.path(), 0).unwrap(), None);
        assert!(!dir.path().join(ADMIN_TOKEN_FILE).exists());
        assert_eq!(tokens.authenticate("agents-join-secret-xyz", 0).unwrap().role, Role::Agent);
    }

    #[test]
    fn installing_a_secret_replaces_the_token_of_that_name() {
        let (_dir, tokens) = tokens();
        let old = "an-operator-secret-1";
        tokens.install("agents", Role::Agent, old, None, 0).unwrap();
        tokens.install("agents", Role::Agent, "an-operator-secret-2", None, 0).unwrap();
        assert!(tokens.authenticate(old, 0).is_err());
        assert!(tokens.authenticate("an-operator-secret-2", 0).is_ok());
        assert!(tokens.install("short", Role::User, "tiny", None, 0).is_err());
        assert!(tokens.install("odd", Role::User, "sixteen-chars-and; Path=/", None, 0).is_err());
    }
}
