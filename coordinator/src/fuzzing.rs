//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`): what the agents'
//! service does with an agent's messages and uploads, without gRPC around it, so libFuzzer can
//! reach it directly. Not part of the coordinator's API.

use gantry_proto::v1;
use tonic::Status;

use crate::control::Coordinator;

/// One message of an agent's session, as the session loop handles it.
pub fn session_message(coordinator: &Coordinator, agent: &str, msg: v1::AgentMessage) -> crate::Result<()> {
    crate::service::agent::dispatch(coordinator, agent, msg)
}

/// A whole checkpoint upload, as the agents' service receives it.
pub async fn upload_checkpoint(
    coordinator: &Coordinator,
    parts: Vec<v1::CheckpointUpload>,
) -> Result<v1::CheckpointAck, Status> {
    crate::service::agent::receive_checkpoint(coordinator, tokio_stream::iter(parts.into_iter().map(Ok))).await
}
