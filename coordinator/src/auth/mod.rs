//! Who may do what. Every request carries a token; the coordinator keeps only its hash and role
//! ([`tokens::Tokens`]), turns it into a [`Principal`] at the door ([`grpc`], `crate::http`), and
//! asks [`authorize`], a pure function over the principal and the action, before doing anything.
//!
//! Without auth (`gantry dev`, `--insecure` on loopback) every caller is [`Principal::dev`], an
//! admin: one person's machine.

pub mod grpc;
pub mod http;
pub mod tokens;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: others' jobs, draining, tokens.
    Admin,
    /// Submits; sees the queue and the fleet; reads, follows, downloads and cancels its own jobs.
    User,
    /// The queue, the fleet and job states, nothing else.
    Viewer,
    /// An agent: the agents' service only.
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(text: &str) -> Result<Role> {
        match text {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "viewer" => Ok(Role::Viewer),
            "agent" => Ok(Role::Agent),
            _ => Err(Error::InvalidArgument(format!("role `{text}`: expected admin, user, viewer or agent"))),
        }
    }
}

/// The caller of a request, once its token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: jobs record it as their owner.
    pub name: String,
    pub role: Role,
}

/// The owner of jobs submitted without auth.
pub const DEV_OWNER: &str = "dev";

impl Principal {
    /// Every caller when auth is off.
    pub fn dev() -> Principal {
        Principal { name: DEV_OWNER.to_string(), role: Role::Admin }
    }
}

/// What a request wants to do; jobs carry their owner so the rule can compare.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    Submit,
    /// The queue, job states, nodes and GPUs, the web page and `/metrics`.
    SeeFleet,
    /// A job's details, logs and checkpoints.
    ReadJob {
        owner: &'a str,
    },
    CancelJob {
        owner: &'a str,
    },
    /// Drain, undrain and remove.
    ManageNodes,
    ManageTokens,
    /// The agents' service: register, session, uploads.
    ActAsAgent,
    /// Ask a served model for predictions (`/v2/models/...`): what an endpoint is published for.
    Infer,
    /// Push a new version of a data set (`owner`: who pushed its first; the caller, for a new one).
    PushDataset {
        owner: &'a str,
    },
    /// Train on a pushed data set: reading it, as starting from a checkpoint reads a job.
    UseDataset {
        owner: &'a str,
    },
    /// Delete a data set's versions (`owner`: who pushed its first).
    DeleteDataset {
        owner: &'a str,
    },
}

/// The whole policy. Agents are machines, not people: an agent token opens the agents' service
/// and nothing else, and no person's token opens it but an admin's.
pub fn authorize(who: &Principal, action: Action) -> Result<()> {
    let allowed = match (who.role, action) {
        (Role::Admin, _) => true,
        (Role::Agent, action) => matches!(action, Action::ActAsAgent),
        (_, Action::SeeFleet | Action::Infer) => true,
        (Role::User, Action::Submit) => true,
        (
            Role::User,
            Action::ReadJob { owner }
            | Action::CancelJob { owner }
            | Action::PushDataset { owner }
            | Action::UseDataset { owner }
            | Action::DeleteDataset { owner },
        ) => owner == who.name,
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    Err(Error::PermissionDenied(match action {
        Action::ReadJob { .. } | Action::CancelJob { .. } => {
            format!("{} ({}) may not {} another user's job", who.name, who.role.as_str(), action.verb())
        }
        Action::PushDataset { owner } | Action::UseDataset { owner } | Action::DeleteDataset { owner }
            if who.role == Role::User =>
        {
            format!("{} ({}) may not {} {owner}'s data set", who.name, who.role.as_str(), action.verb())
        }
        _ => format!("{} ({}) may not {}", who.name, who.role.as_str(), action.verb()),
    }))
}

impl Action<'_> {
    fn verb(&self) -> &'static str {
        match self {
            Action::Submit => "submit jobs",
            Action::SeeFleet => "see the queue and the fleet",
            Action::ReadJob { .. } => "read",
            Action::CancelJob { .. } => "cancel",
            Action::ManageNodes => "drain, undrain or remove nodes",
            Action::ManageTokens => "manage tokens",
            Action::ActAsAgent => "act as an agent",
            Action::Infer => "query served models",
            Action::PushDataset { .. } => "push",
            Action::UseDataset { .. } => "train on",
            Action::DeleteDataset { .. } => "delete",
        }
    }
}

/// One structured line per mutating request, on its own log target (`gantry::audit`) so it can
/// be filtered, kept or shipped apart: who did what to which job, node or token.
pub fn audit(who: &Principal, action: &str, target: &str) {
    tracing::info!(target: "gantry::audit", user = %who.name, role = who.role.as_str(), action, target, "audit");
}

/// Whether `who` sees a job's `env` values (they may hold secrets).
pub fn sees_env(who: &Principal, owner: &str) -> bool {
    who.role == Role::Admin || (who.role == Role::User && who.name == owner)
}

/// What the store keeps of a token: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// sha256 of the secret, hex. Secrets are 256 random bits, so a fast hash is enough: there
    /// is no dictionary to try.
    pub hash: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    /// The client certificates agents got for this (agent) token: they work as long as the
    /// token does, and no longer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<IssuedCertificate>,
}

/// A client certificate an agent joined with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// sha256 of the certificate, hex.
    pub fingerprint: String,
    /// The node it is for: its agent may register under this name only.
    pub node: String,
    pub expires_at_ms: i64,
}

/// Who presented a client certificate: put beside the [`Principal`] of an agent's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertificate {
    pub fingerprint: String,
    pub node: String,
}

/// The prefix marks gantry secrets for secret scanners and people.
const SECRET_PREFIX: &str = "gantry_";

/// A new random secret.
pub fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Io {
        context: "reading random bytes for a token".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!("{SECRET_PREFIX}{}", hex::encode(bytes)))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Token names become job owners and appear in logs: a short, safe set of characters.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "token name `{}`: 1 to 64 characters, letters, digits and - _ . @, starting with a letter or digit",
            name.escape_debug()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(name: &str, role: Role) -> Principal {
        Principal { name: name.into(), role }
    }

    #[test]
    fn a_user_reads_and_cancels_its_own_jobs_only() {
        let alice = who("alice", Role::User);
        assert!(authorize(&alice, Action::ReadJob { owner: "alice" }).is_ok());
        assert!(authorize(&alice, Action::CancelJob { owner: "alice" }).is_ok());
        let e = authorize(&alice, Action::ReadJob { owner: "bob" }).unwrap_err();
        assert_eq!(e.code(), crate::Code::PermissionDenied);
        assert!(authorize(&alice, Action::CancelJob { owner: "bob" }).is_err());
        assert!(authorize(&alice, Action::Submit).is_ok());
        assert!(authorize(&alice, Action::SeeFleet).is_ok());
        assert!(authorize(&alice, Action::ManageNodes).is_err());
        assert!(authorize(&alice, Action::ManageTokens).is_err());
        assert!(authorize(&alice, Action::ActAsAgent).is_err());
    }

    #[test]
    fn a_data_set_is_pushed_to_and_trained_on_by_its_owner_and_admins_only() {
        let alice = who("alice", Role::User);
        assert!(authorize(&alice, Action::PushDataset { owner: "alice" }).is_ok());
        assert!(authorize(&alice, Action::UseDataset { owner: "alice" }).is_ok());
        let e = authorize(&alice, Action::PushDataset { owner: "bob" }).unwrap_err();
        assert!(e.to_string().contains("alice (user) may not push bob's data set"), "{e}");
        let e = authorize(&alice, Action::UseDataset { owner: "bob" }).unwrap_err();
        assert!(e.to_string().contains("may not train on bob's data set"), "{e}");
        assert!(authorize(&who("root", Role::Admin), Action::UseDataset { owner: "bob" }).is_ok());
        assert!(authorize(&who("v", Role::Viewer), Action::PushDataset { owner: "v" }).is_err());
        assert!(authorize(&alice, Action::DeleteDataset { owner: "alice" }).is_ok());
        let e = authorize(&alice, Action::DeleteDataset { owner: "bob" }).unwrap_err();
        assert!(e.to_string().contains("alice (user) may not delete bob's data set"), "{e}");
        assert!(authorize(&who("root", Role::Admin), Action::DeleteDataset { owner: "bob" }).is_ok());
        assert!(authorize(&who("v", Role::Viewer), Action::DeleteDataset { owner: "v" }).is_err());
    }

    #[test]
    fn a_viewer_sees_the_fleet_and_queries_models_and_nothing_else() {
        let v = who("v", Role::Viewer);
        assert!(authorize(&v, Action::SeeFleet).is_ok());
        assert!(authorize(&v, Action::Infer).is_ok());
        for action in [
            Action::Submit,
            Action::ReadJob { owner: "v" },
            Action::CancelJob { owner: "v" },
            Action::ManageNodes,
            Action::ManageTokens,
            Action::ActAsAgent,
        ] {
            assert!(authorize(&v, action).is_err(), "{action:?}");
        }
    }

    #[test]
    fn an_agent_token_opens_the_agents_service_only() {
        let a = who("node-1", Role::Agent);
        assert!(authorize(&a, Action::ActAsAgent).is_ok());
        assert!(authorize(&a, Action::SeeFleet).is_err());
        assert!(authorize(&a, Action::Submit).is_err());
        assert!(authorize(&a, Action::Infer).is_err());
    }

    #[test]
    fn an_admin_may_do_everything() {
        let root = who("root", Role::Admin);
        assert!(authorize(&root, Action::ReadJob { owner: "bob" }).is_ok());
        assert!(authorize(&root, Action::ManageTokens).is_ok());
        assert!(authorize(&root, Action::ActAsAgent).is_ok());
    }

    #[test]
    fn env_values_are_for_the_owner_and_admins() {
        assert!(sees_env(&who("alice", Role::User), "alice"));
        assert!(!sees_env(&who("alice", Role::User), "bob"));
        assert!(!sees_env(&who("alice", Role::Viewer), "alice"));
        assert!(sees_env(&who("root", Role::Admin), "bob"));
    }

    #[test]
    fn secrets_are_random_and_only_their_hash_is_kept() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert!(!hash_secret(&a).contains(&a[SECRET_PREFIX.len()..]));
    }

    #[test]
    fn token_names_are_short_and_safe() {
        for good in ["alice", "ci-bot_2", "a@b.org"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
