//! The gRPC door: every call's `authorization: Bearer TOKEN` becomes a [`Principal`] in the
//! request's extensions before a service sees it; a call without a valid token goes no further.

use std::sync::Arc;

use tonic::{Request, Status};

use super::{Action, Principal, authorize};
use crate::control::Coordinator;
use crate::error::Error;

#[derive(Clone)]
pub struct Authenticate {
    pub coordinator: Arc<Coordinator>,
    /// For the agents' service: only callers that may act as an agent pass.
    pub agents_only: bool,
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let who = if self.coordinator.settings.auth {
            let secret = bearer(req.metadata())?;
            self.coordinator.tokens.authenticate(secret, self.coordinator.now_ms())?
        } else {
            Principal::dev()
        };
        if self.agents_only {
            authorize(&who, Action::ActAsAgent)?;
        }
        req.extensions_mut().insert(who);
        Ok(req)
    }
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
