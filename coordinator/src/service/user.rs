//! The service people and scripts use (through the CLI).

use std::sync::Arc;
use std::time::Duration;

use gantry_core::JobSpec;
use gantry_proto::v1;
use tokio::sync::mpsc;

use tonic::{Request, Response, Status};

use super::{BoxStream, checkpoint_to_proto, job_to_proto};
use crate::auth::grpc::{allowed, caller};
use crate::auth::{Action, Principal, Role, TokenRecord, audit, authorize};
use crate::control::{Coordinator, NodeUsage, NodeView};
use crate::logs::LogCursor;

pub struct UserService {
    pub coordinator: Arc<Coordinator>,
}

impl UserService {
    /// Job `id`, if the caller may do `action` to it.
    fn job_for(
        &self,
        who: &Principal,
        id: &str,
        action: fn(&str) -> Action<'_>,
    ) -> Result<crate::records::JobRecord, Status> {
        let job = self.coordinator.store.job(id)?;
        authorize(who, action(&job.owner))?;
        Ok(job)
    }
}

fn read(owner: &str) -> Action<'_> {
    Action::ReadJob { owner }
}

fn cancel(owner: &str) -> Action<'_> {
    Action::CancelJob { owner }
}

const LOG_BATCH: usize = 1000;

#[tonic::async_trait]
impl v1::gantry_server::Gantry for UserService {
    async fn submit(&self, req: Request<v1::SubmitRequest>) -> Result<Response<v1::SubmitResponse>, Status> {
        let who = allowed(&req, Action::Submit)?;
        let wire = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let spec =
            JobSpec::try_from(wire).map_err(|e| crate::Error::InvalidArgument(format!("invalid job spec: {e}")))?;
        // Starting from a checkpoint is reading it: only from jobs the caller may read.
        if let Some((field, from)) = spec.starts_from()
            && let Ok((job, _)) = gantry_core::spec::parse_checkpoint_ref(from)
            && let Ok(source) = self.coordinator.store.job(&job)
        {
            authorize(&who, read(&source.owner))
                .map_err(|e| crate::Error::PermissionDenied(format!("{field}: {e}")))?;
        }
        // Training on a pushed data set is reading it: only those the caller may read.
        for owner in self.coordinator.dataset_owners(&spec)? {
            authorize(&who, Action::UseDataset { owner: &owner })?;
        }
        // Its s3:// paths read and pinned now, while the caller waits: a path it may not read
        // is refused here, not found failing on an agent later.
        // A spec that will be refused reads nothing.
        spec.validate().map_err(crate::Error::InvalidSpec)?;
        let mut spec = spec;
        self.coordinator.pin_s3_paths(&mut spec, &who.name).await?;
        // On a blocking thread: the store waits for its group commit, and concurrent submits
        // must be able to wait together to share it.
        let coordinator = self.coordinator.clone();
        let owner = who.name.clone();
        let job = tokio::task::spawn_blocking(move || coordinator.submit(spec, &owner))
            .await
            .map_err(|e| Status::internal(format!("submit: {e}")))??;
        audit(&who, "submit", &job.id);
        Ok(Response::new(v1::SubmitResponse { job_id: job.id }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().job_id;
        let job = self.job_for(&who, &id, read)?;
        let metrics = self.coordinator.metrics.latest(&id);
        let mut out = job_to_proto(&job, self.coordinator.waiting(&id), metrics, &who);
        if job.is_serving() {
            out.replicas = self.coordinator.replicas(&job)?;
        }
        Ok(Response::new(out))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let who = allowed(&req, Action::SeeFleet)?;
        let jobs = self.coordinator.listed_jobs()?;
        let jobs = jobs.into_iter().map(|(j, waiting)| job_to_proto(&j, waiting, Vec::new(), &who)).collect();
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::Job>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().job_id;
        self.job_for(&who, &id, cancel)?;
        let coordinator = self.coordinator.clone();
        let job = tokio::task::spawn_blocking(move || coordinator.cancel(&id))
            .await
            .map_err(|e| Status::internal(format!("cancel: {e}")))??;
        audit(&who, "cancel", &job.id);
        Ok(Response::new(job_to_proto(&job, None, Vec::new(), &who)))
    }

    type LogsStream = BoxStream<v1::LogLines>;

    async fn logs(&self, req: Request<v1::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        self.job_for(&who, &req.job_id, read)?;
        self.coordinator.logs.restore(&req.job_id).await?;
        let coordinator = self.coordinator.clone();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut cursor = LogCursor::default();
            let mut log_changes = coordinator.logs.subscribe();
            let mut job_changes = coordinator.subscribe_jobs();
            loop {
                // Read the state before the logs: once a job has ended its logs are complete
                // (agents upload all output before reporting the exit).
                let ended = match coordinator.store.job(&req.job_id) {
                    Ok(job) => job.state.is_terminal(),
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let lines = match coordinator.logs.read_new(&req.job_id, &mut cursor) {
                    Ok(lines) => lines,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                for batch in lines.chunks(LOG_BATCH) {
                    let lines = batch
                        .iter()
                        .map(|l| v1::LogLine { attempt: l.attempt, rank: l.rank, text: l.text.clone() })
                        .collect();
                    if tx.send(Ok(v1::LogLines { lines })).await.is_err() {
                        return;
                    }
                }
                if !req.follow || ended {
                    return;
                }
                if !coordinator.tokens.still_valid(&who, None, coordinator.settings.auth, coordinator.now_ms()) {
                    let _ = tx.send(Err(Status::unauthenticated("the token was revoked or expired"))).await;
                    return;
                }
                tokio::select! {
                    _ = log_changes.changed() => {}
                    _ = job_changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_checkpoints(
        &self,
        req: Request<v1::ListCheckpointsRequest>,
    ) -> Result<Response<v1::ListCheckpointsResponse>, Status> {
        let who = caller(&req)?;
        let id = req.into_inner().job_id;
        self.job_for(&who, &id, read)?;
        let checkpoints = self.coordinator.store.checkpoints(&id)?.iter().map(checkpoint_to_proto).collect();
        Ok(Response::new(v1::ListCheckpointsResponse { checkpoints }))
    }

    type DownloadCheckpointStream = BoxStream<v1::CheckpointData>;

    async fn download_checkpoint(
        &self,
        req: Request<v1::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        self.job_for(&who, &req.job_id, read)?;
        Ok(Response::new(super::download(&self.coordinator, req)?))
    }

    async fn list_nodes(&self, req: Request<v1::ListNodesRequest>) -> Result<Response<v1::ListNodesResponse>, Status> {
        allowed(&req, Action::SeeFleet)?;
        let usage = self.coordinator.usage_by_node()?;
        let nodes = self.coordinator.nodes().into_iter().map(|n| node_to_proto(&self.coordinator, &usage, n)).collect();
        Ok(Response::new(v1::ListNodesResponse { nodes }))
    }

    async fn drain_node(&self, req: Request<v1::DrainNodeRequest>) -> Result<Response<v1::Node>, Status> {
        let who = allowed(&req, Action::ManageNodes)?;
        let req = req.into_inner();
        self.coordinator.drain(&req.node, req.drain)?;
        audit(&who, if req.drain { "drain" } else { "undrain" }, &req.node);
        let usage = self.coordinator.usage_by_node()?;
        let node = self
            .coordinator
            .nodes()
            .into_iter()
            .find(|n| n.name == req.node)
            .ok_or_else(|| crate::Error::NodeNotFound(req.node.clone()))?;
        Ok(Response::new(node_to_proto(&self.coordinator, &usage, node)))
    }

    async fn remove_node(
        &self,
        req: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        let who = allowed(&req, Action::ManageNodes)?;
        let node = req.into_inner().node;
        let certificates = self.coordinator.remove_node(&node)?;
        audit(&who, "remove node", &node);
        Ok(Response::new(v1::RemoveNodeResponse { certificates: certificates as u32 }))
    }

    async fn list_gpus(&self, req: Request<v1::ListGpusRequest>) -> Result<Response<v1::ListGpusResponse>, Status> {
        allowed(&req, Action::SeeFleet)?;
        let gpus = self
            .coordinator
            .gpus()?
            .into_iter()
            .map(|(node, info, job)| v1::Gpu { node, job_id: job.unwrap_or_default(), info: Some(info) })
            .collect();
        Ok(Response::new(v1::ListGpusResponse { gpus }))
    }

    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = allowed(&req, Action::ManageTokens)?;
        let req = req.into_inner();
        let role = role_from_proto(req.role())?;
        let ttl = req.ttl_seconds.map(Duration::from_secs);
        let (record, secret) = self.coordinator.tokens.create(&req.name, role, ttl, self.coordinator.now_ms())?;
        audit(&who, "token create", &record.name);
        Ok(Response::new(v1::CreateTokenResponse { token: Some(token_to_proto(&record)), secret }))
    }

    async fn list_tokens(
        &self,
        req: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        allowed(&req, Action::ManageTokens)?;
        let tokens = self.coordinator.tokens.list().iter().map(token_to_proto).collect();
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let who = allowed(&req, Action::ManageTokens)?;
        let name = req.into_inner().name;
        self.coordinator.tokens.revoke(&name)?;
        audit(&who, "token revoke", &name);
        Ok(Response::new(v1::RevokeTokenResponse {}))
    }

    async fn list_endpoints(
        &self,
        req: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsResponse>, Status> {
        allowed(&req, Action::Infer)?;
        Ok(Response::new(v1::ListEndpointsResponse { endpoints: self.coordinator.endpoints()? }))
    }

    async fn push_dataset(
        &self,
        req: Request<tonic::Streaming<v1::DatasetData>>,
    ) -> Result<Response<v1::Dataset>, Status> {
        let who = allowed(&req, Action::Submit)?;
        Ok(Response::new(super::datasets::receive(&self.coordinator, &who, req.into_inner()).await?))
    }

    async fn list_datasets(
        &self,
        req: Request<v1::ListDatasetsRequest>,
    ) -> Result<Response<v1::ListDatasetsResponse>, Status> {
        allowed(&req, Action::SeeFleet)?;
        let datasets = self.coordinator.datasets()?;
        let newest = datasets.iter().map(|(d, versions)| super::datasets::version_to_proto(d, *versions));
        Ok(Response::new(v1::ListDatasetsResponse { datasets: newest.collect() }))
    }

    async fn delete_dataset(
        &self,
        req: Request<v1::DeleteDatasetRequest>,
    ) -> Result<Response<v1::DeleteDatasetResponse>, Status> {
        let who = allowed(&req, Action::Submit)?;
        let req = req.into_inner();
        gantry_core::spec::check_dataset_name(&req.name).map_err(crate::Error::InvalidArgument)?;
        let first = self.coordinator.dataset_versions(&req.name)?.into_iter().next();
        let owner = first.map(|d| d.owner).ok_or_else(|| crate::Error::DatasetNotFound(req.name.clone()))?;
        authorize(&who, Action::DeleteDataset { owner: &owner })?;
        let deleted = self.coordinator.delete_dataset(&req.name, req.version.as_deref()).await?;
        for d in &deleted {
            audit(&who, "delete data set", &format!("{}@{}", d.name, d.version.sha256));
        }
        let deleted = deleted.iter().map(|d| super::datasets::version_to_proto(d, 0)).collect();
        Ok(Response::new(v1::DeleteDatasetResponse { deleted }))
    }

    async fn who_am_i(&self, req: Request<v1::WhoAmIRequest>) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(v1::WhoAmIResponse {
            name: who.name,
            role: role_to_proto(who.role) as i32,
            auth: self.coordinator.settings.auth,
        }))
    }
}

fn role_from_proto(role: v1::Role) -> Result<Role, Status> {
    match role {
        v1::Role::Admin => Ok(Role::Admin),
        v1::Role::User => Ok(Role::User),
        v1::Role::Viewer => Ok(Role::Viewer),
        v1::Role::Agent => Ok(Role::Agent),
        v1::Role::Unspecified => Err(Status::invalid_argument("role: expected admin, user, viewer or agent")),
    }
}

fn role_to_proto(role: Role) -> v1::Role {
    match role {
        Role::Admin => v1::Role::Admin,
        Role::User => v1::Role::User,
        Role::Viewer => v1::Role::Viewer,
        Role::Agent => v1::Role::Agent,
    }
}

fn token_to_proto(t: &TokenRecord) -> v1::Token {
    v1::Token {
        name: t.name.clone(),
        role: role_to_proto(t.role) as i32,
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms,
    }
}

fn node_to_proto(
    coordinator: &Coordinator,
    usage: &std::collections::HashMap<String, NodeUsage>,
    NodeView { name, connected, inventory, last_seen_ms }: NodeView,
) -> v1::Node {
    let NodeUsage { jobs, cpus_used, memory_used_bytes } = usage.get(&name).cloned().unwrap_or_default();
    v1::Node {
        drained: coordinator.drained(&name),
        name,
        connected,
        inventory: Some(inventory),
        last_seen_ms,
        jobs,
        cpus_used,
        memory_used_bytes,
    }
}
