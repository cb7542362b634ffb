//! The service agents use: register, one long-lived session, log and checkpoint uploads.

use std::sync::Arc;

use gantry_proto::{PROTOCOL_VERSION, v1};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::{BoxStream, checkpoint_from_proto};
use crate::control::Coordinator;
use crate::stale::StaleKind;

pub struct AgentService {
    pub coordinator: Arc<Coordinator>,
}

/// Messages queued for one agent before the session is considered stuck.
const SESSION_BUFFER: usize = 1024;

#[tonic::async_trait]
impl v1::agents_server::Agents for AgentService {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let seen = req.remote_addr().map(|a| a.ip().to_string()).unwrap_or_else(|| "127.0.0.1".into());
        let certificate = crate::auth::grpc::agent_certificate(&req);
        let req = req.into_inner();
        bound_to(certificate.as_ref(), &req.name)?;
        let addr = if req.advertise_addr.is_empty() { seen } else { req.advertise_addr.clone() };
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(crate::Error::ProtocolMismatch { agent: req.protocol_version, ours: PROTOCOL_VERSION }.into());
        }
        crate::limits::check_node_name(&req.name)?;
        let inventory = req.inventory.ok_or_else(|| Status::invalid_argument("inventory: missing"))?;
        self.coordinator.register_agent(&req.name, inventory, addr)?;
        let settings = &self.coordinator.settings;
        let fencing = settings.fencing();
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        Ok(Response::new(v1::RegisterResponse {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval_ms: ms(settings.heartbeat_interval),
            fence_after_ms: ms(fencing.after),
            fence_grace_ms: ms(fencing.grace),
            agent_timeout_ms: ms(settings.agent_timeout),
        }))
    }

    type SessionStream = BoxStream<v1::CoordinatorMessage>;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let who = crate::auth::grpc::caller(&req)?;
        let certificate = crate::auth::grpc::agent_certificate(&req);
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("session closed before the first heartbeat"))?;
        let name = first.name.clone();
        bound_to(certificate.as_ref(), &name)?;
        let Some(v1::agent_message::Msg::Heartbeat(hb)) = first.msg else {
            return Err(Status::invalid_argument("a session must open with a heartbeat listing the agent's jobs"));
        };
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = self.coordinator.attach_session(&name, hb, tx)?;
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(msg) => msg,
                    Err(e) => {
                        warn!(agent = %name, error = %e, "agent session broke");
                        break;
                    }
                };
                // A revoked agent token ends the session it opened, not only the next one.
                let now = coordinator.now_ms();
                if !coordinator.tokens.still_valid(&who, certificate.as_ref(), coordinator.settings.auth, now) {
                    warn!(agent = %name, token = %who.name, "the agent's token or certificate was revoked or expired: closing its session");
                    break;
                }
                if let Err(e) = dispatch(&coordinator, &name, msg) {
                    warn!(agent = %name, error = %e, "could not record an agent message");
                }
            }
            coordinator.detach_session(&name, session);
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(out)))
    }

    async fn upload_logs(&self, req: Request<v1::LogBatch>) -> Result<Response<v1::LogAck>, Status> {
        let b = req.into_inner();
        crate::limits::log_lines(&b.lines)?;
        self.coordinator.take_output(&b.job_id, b.attempt, Some(b.rank), StaleKind::Logs)?;
        self.coordinator.logs.restore(&b.job_id).await?;
        let next_seq = self.coordinator.logs.append(&b.job_id, b.attempt, b.rank, b.first_seq, &b.lines)?;
        Ok(Response::new(v1::LogAck { next_seq }))
    }

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<v1::CheckpointUpload>>,
    ) -> Result<Response<v1::CheckpointAck>, Status> {
        Ok(Response::new(receive_checkpoint(&self.coordinator, req.into_inner()).await?))
    }

    type DownloadCheckpointStream = BoxStream<v1::CheckpointData>;

    async fn download_checkpoint(
        &self,
        req: Request<v1::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        Ok(Response::new(super::download(&self.coordinator, req.into_inner())?))
    }

    type DownloadDatasetStream = BoxStream<v1::DatasetData>;

    async fn download_dataset(
        &self,
        req: Request<v1::DownloadDatasetRequest>,
    ) -> Result<Response<Self::DownloadDatasetStream>, Status> {
        let req = req.into_inner();
        let record = self.coordinator.find_dataset_version(&req.sha256, &req.name)?;
        let header = super::datasets::version_to_proto(&record, 0);
        Ok(Response::new(Box::pin(super::stream_dataset(self.coordinator.files.clone(), record.version, header))))
    }
}

/// One message of an agent's session, after the first heartbeat.
pub(crate) fn dispatch(coordinator: &Coordinator, agent: &str, msg: v1::AgentMessage) -> crate::Result<()> {
    match msg.msg {
        Some(v1::agent_message::Msg::Heartbeat(hb)) => coordinator.heartbeat(agent, hb),
        Some(v1::agent_message::Msg::Job(report)) => coordinator.job_report(agent, report),
        None => Ok(()),
    }
}

/// A checkpoint upload: its header, then its files' chunks, verified before it is recorded.
pub(crate) async fn receive_checkpoint(
    coordinator: &Coordinator,
    mut stream: impl Stream<Item = Result<v1::CheckpointUpload, Status>> + Unpin,
) -> Result<v1::CheckpointAck, Status> {
    let header = match stream.next().await.transpose()? {
        Some(v1::CheckpointUpload { part: Some(v1::checkpoint_upload::Part::Header(h)) }) => h,
        _ => return Err(Status::invalid_argument("a checkpoint upload must start with its header")),
    };
    coordinator.take_output(&header.job_id, header.attempt, None, StaleKind::Checkpoint)?;
    let (bytes, longest) = super::listed(&header.files);
    let limits = &coordinator.settings.limits;
    crate::limits::files(limits, "checkpoint", header.files.len(), bytes.max(header.bytes), longest)?;
    let incoming = coordinator.files.begin(checkpoint_from_proto(header))?;
    let chunk_of = |part: v1::CheckpointUpload| match part.part {
        Some(v1::checkpoint_upload::Part::Chunk(c)) => Some(c),
        _ => None,
    };
    let uploaded = super::receive_upload(incoming, stream, chunk_of, "checkpoint upload").await?;
    let committed = coordinator.commit_checkpoint(uploaded.clone());
    // Not recorded, or the same step was recorded first from another upload: this one's
    // files are not referenced by any record.
    if committed.as_ref().map_or(true, |c| c.location != uploaded.location) {
        coordinator.files.discard(uploaded.location.as_deref()).await;
    }
    let record = committed?;
    Ok(v1::CheckpointAck { step: record.step, sha256: record.sha256 })
}

/// An agent with a certificate acts as the node the certificate is for, and no other.
fn bound_to(certificate: Option<&crate::auth::AgentCertificate>, name: &str) -> Result<(), Status> {
    match certificate {
        Some(c) if c.node != name => Err(crate::Error::PermissionDenied(format!(
            "this agent's certificate is for node {}, not {name}: join again with an agent token to act as {name}",
            c.node
        ))
        .into()),
        _ => Ok(()),
    }
}
