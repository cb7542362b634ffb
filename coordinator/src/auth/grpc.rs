//! The gRPC doors: every call's credentials become a [`Principal`] in the request's extensions
//! before a service sees it; a call without valid ones goes no further. People and joining agents
//! show a token (`authorization: Bearer TOKEN`); agents at work show the client certificate they
//! got when they joined (mutual TLS), and nothing else opens the agents' service.

use std::sync::Arc;

use tonic::{Request, Status};

use super::{Action, Principal, authorize};
use crate::control::Coordinator;
use crate::error::Error;

/// Which service a door stands before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// People's service: a token.
    People,
    /// Where agents get their certificate: an agent token.
    Join,
    /// The agents' service: a client certificate from [`Door::Join`].
    Agents,
}

#[derive(Clone)]
pub struct Authenticate {
    pub coordinator: Arc<Coordinator>,
    pub door: Door,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let c = &self.coordinator;
        if !c.settings.auth {
            req.extensions_mut().insert(Principal::dev());
            return Ok(req);
        }
        let now = c.now_ms();
        let who = match self.door {
            Door::People => c.tokens.authenticate(bearer(req.metadata())?, now)?,
            Door::Join => {
                let who = c.tokens.authenticate(bearer(req.metadata())?, now)?;
                authorize(&who, Action::ActAsAgent)?;
                who
            }
            Door::Agents => {
                let leaf = req.peer_certs().and_then(|chain| chain.first().cloned()).ok_or_else(|| {
                    Error::Unauthenticated(
                        "agents need a client certificate: start the agent with --join-token (an agent token) to get one"
                            .into(),
                    )
                })?;
                let (who, certificate) =
                    c.tokens.authenticate_certificate(&crate::tls::pki::fingerprint(&leaf), now)?;
                authorize(&who, Action::ActAsAgent)?;
                req.extensions_mut().insert(certificate);
                who
            }
        };
        req.extensions_mut().insert(who);
        Ok(req)
    }
}

/// The client certificate an agent's request came with (none without auth).
pub fn agent_certificate<T>(req: &Request<T>) -> Option<super::AgentCertificate> {
    req.extensions().get::<super::AgentCertificate>().cloned()
}

fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Error> {
    let missing = || Error::Unauthenticated("no token: pass --token, set GANTRY_TOKEN, or run gantry login".into());
    let header = metadata.get("authorization").ok_or_else(missing)?;
    let text = header.to_str().map_err(|_| missing())?;
    text.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty()).ok_or_else(missing)
}

/// The caller of a request that came through [`Authenticate`].
pub fn caller<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("a request reached a service without passing authentication"))
}

/// The caller, if it may do `action`.
pub fn allowed<T>(req: &Request<T>, action: Action) -> Result<Principal, Status> {
    let who = caller(req)?;
    authorize(&who, action)?;
    Ok(who)
}
