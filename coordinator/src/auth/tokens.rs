//! The token registry: the store holds each token's name, role and hash; this keeps them by
//! hash in memory, so checking a request costs a hash and a map lookup, and a revocation (written
//! to the store first) takes effect on the next request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::{Principal, Role, TokenRecord, check_name, hash_secret, new_secret};
use crate::error::{Error, Result};
use crate::store::StateStore;

pub struct Tokens {
    store: Arc<dyn StateStore>,
    by_hash: RwLock<HashMap<String, TokenRecord>>,
}

impl Tokens {
    pub fn load(store: Arc<dyn StateStore>) -> Result<Tokens> {
        let by_hash = store.tokens()?.into_iter().map(|t| (t.hash.clone(), t)).collect();
        Ok(Tokens { store, by_hash: RwLock::new(by_hash) })
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
    /// generated (a Kubernetes Secret) and the admin token of the first start.
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
        let record = TokenRecord {
            name: name.to_string(),
            role,
            hash: hash_secret(secret),
            created_at_ms: now_ms,
            expires_at_ms: ttl.map(|t| now_ms.saturating_add(t.as_millis().min(i64::MAX as u128) as i64)),
        };
        self.store.put_token(&record)?;
        let mut by_hash = self.by_hash.write().expect("tokens lock poisoned");
        by_hash.retain(|_, t| t.name != name);
        by_hash.insert(record.hash.clone(), record.clone());
        Ok(record)
    }

    /// Deletes token `name`: from the store first, so a revocation that returned is durable.
    pub fn revoke(&self, name: &str) -> Result<()> {
        if !self.store.delete_token(name)? {
            return Err(Error::InvalidArgument(format!("no token named {name} (see gantry token list)")));
        }
        self.by_hash.write().expect("tokens lock poisoned").retain(|_, t| t.name != name);
        Ok(())
    }

    /// Every token, by name.
    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<_> = self.by_hash.read().expect("tokens lock poisoned").values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether `who` may still act: for a request already in flight (an agent's session, a log
    /// follow), so that a revocation or an expiry ends it too, not only the next request.
    pub fn still_valid(&self, who: &Principal, auth: bool, now_ms: i64) -> bool {
        if !auth {
            return true;
        }
        let by_hash = self.by_hash.read().expect("tokens lock poisoned");
        by_hash
            .values()
            .any(|t| t.name == who.name && t.role == who.role && t.expires_at_ms.is_none_or(|end| now_ms < end))
    }

    /// The caller a secret stands for. The answer never says whether a token of some name
    /// exists: unknown, revoked and expired read the same.
    pub fn authenticate(&self, secret: &str, now_ms: i64) -> Result<Principal> {
        let by_hash = self.by_hash.read().expect("tokens lock poisoned");
        match by_hash.get(&hash_secret(secret)) {
            Some(t) if t.expires_at_ms.is_none_or(|end| now_ms < end) => {
                Ok(Principal { name: t.name.clone(), role: t.role })
            }
            _ => Err(Error::Unauthenticated("the token is not valid (unknown, revoked or expired)".into())),
        }
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
        assert!(tokens.still_valid(&alice, true, 1));
        tokens.revoke("alice").unwrap();
        assert_eq!(tokens.authenticate(&secret, 2).unwrap_err().code(), crate::Code::Unauthenticated);
        assert!(!tokens.still_valid(&alice, true, 2), "a request in flight learns of the revocation");
        assert!(tokens.still_valid(&alice, false, 2), "without auth everyone is valid");
        assert!(tokens.revoke("alice").is_err());
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
