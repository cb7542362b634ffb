//! `gantry dataset push` and `list`: a data set's upload, verified before it becomes the name's
//! newest version, and the records as the wire carries them.

use gantry_proto::v1;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::auth::{Action, Principal, audit, authorize};
use crate::control::Coordinator;
use crate::records::{DatasetRecord, DatasetVersion};

/// A version as the wire carries it; `versions`: how many the name has.
pub(crate) fn version_to_proto(record: &DatasetRecord, versions: u32) -> v1::Dataset {
    let v = &record.version;
    v1::Dataset {
        name: record.name.clone(),
        sha256: v.sha256.clone(),
        bytes: v.bytes,
        files: v.files.iter().map(super::file_to_proto).collect(),
        pushed_at_ms: v.pushed_at_ms,
        owner: record.owner.clone(),
        versions,
    }
}

/// A push: its header, then its files' chunks, verified before it is recorded.
pub(crate) async fn receive(
    coordinator: &Coordinator,
    who: &Principal,
    mut stream: impl Stream<Item = Result<v1::DatasetData, Status>> + Unpin,
) -> Result<v1::Dataset, Status> {
    use v1::dataset_data::Part;
    let header = match stream.next().await.transpose()? {
        Some(v1::DatasetData { part: Some(Part::Header(h)) }) => h,
        _ => return Err(Status::invalid_argument("a data set push must start with its header")),
    };
    gantry_core::spec::check_dataset_name(&header.name).map_err(crate::Error::InvalidArgument)?;
    let owner = match coordinator.dataset_versions(&header.name)?.first() {
        Some(record) => record.owner.clone(),
        None => who.name.clone(),
    };
    authorize(who, Action::PushDataset { owner: &owner })?;
    if header.files.is_empty() {
        return Err(crate::Error::InvalidArgument("a data set needs at least one file".into()).into());
    }
    let (bytes, longest) = super::listed(&header.files);
    crate::limits::files(&coordinator.settings.limits, "data set", header.files.len(), bytes, longest)?;
    crate::limits::dataset_listing(header.files.iter().map(|f| f.path.len() + 100).sum())?;
    let files = header.files.into_iter().map(super::file_from_proto).collect();
    let announced = DatasetVersion { sha256: String::new(), bytes, files, pushed_at_ms: 0, location: None };
    let incoming = coordinator.files.begin_dataset(announced)?;
    let chunk_of = |part: v1::DatasetData| match part.part {
        Some(Part::Chunk(c)) => Some(c),
        _ => None,
    };
    let uploaded = super::receive_upload(incoming, stream, chunk_of, "data set push").await?;
    let committed = coordinator.commit_dataset(&header.name, &owner, uploaded.clone());
    // Not recorded, or the same bytes were stored before: this upload's files are not referenced.
    if committed.as_ref().map_or(true, |c| c.version.location != uploaded.location) {
        coordinator.files.discard(uploaded.location.as_deref()).await;
    }
    let record = committed?;
    audit(who, "push data set", &format!("{}@{}", header.name, record.version.sha256));
    let versions = coordinator.dataset_versions(&header.name)?.len() as u32;
    Ok(version_to_proto(&record, versions))
}
