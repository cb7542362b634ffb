//! Where an agent exchanges its agent token for a client certificate, once: the agents' service
//! takes nothing else from then on.

use std::sync::Arc;

use gantry_proto::v1;
use tonic::{Request, Response, Status};

use crate::auth::IssuedCertificate;
use crate::control::Coordinator;
use crate::tls::{Authority, pki};

pub struct JoinService {
    pub coordinator: Arc<Coordinator>,
    /// `None` when the coordinator serves without TLS, where agents need no certificate.
    pub authority: Option<Arc<Authority>>,
}

#[tonic::async_trait]
impl v1::join_server::Join for JoinService {
    async fn join(&self, req: Request<v1::JoinRequest>) -> Result<Response<v1::JoinResponse>, Status> {
        let who = crate::auth::grpc::caller(&req)?;
        let authority = self.authority.as_ref().ok_or_else(|| {
            Status::failed_precondition("this coordinator serves without TLS: agents need no certificate")
        })?;
        let req = req.into_inner();
        crate::limits::check_node_name(&req.name)?;
        let now_ms = self.coordinator.now_ms();
        let (certificate_pem, fingerprint) = authority.issue_agent(&req.name, &req.public_key, now_ms / 1000)?;
        let expires_at_ms = now_ms + pki::AGENT_LIFETIME.as_millis() as i64;
        let issued = IssuedCertificate { fingerprint: fingerprint.clone(), node: req.name.clone(), expires_at_ms };
        self.coordinator.tokens.add_certificate(&who.name, issued, now_ms)?;
        crate::auth::audit(&who, "join", &format!("node {} certificate {}", req.name, &fingerprint[..16]));
        Ok(Response::new(v1::JoinResponse { certificate_pem }))
    }
}
