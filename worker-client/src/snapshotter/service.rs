//! containerd's Snapshots gRPC service over [`Snapshotter`], served on a unix socket.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Info, MountSpec, SnapError, Snapshotter};
use crate::containerd::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use crate::containerd::api::snapshots::{self as api};
use crate::containerd::api::types::Mount;

impl From<SnapError> for Status {
    fn from(e: SnapError) -> Status {
        match e {
            SnapError::NotFound(m) => Status::not_found(m),
            SnapError::AlreadyExists(m) => Status::already_exists(m),
            SnapError::FailedPrecondition(m) => Status::failed_precondition(m),
            SnapError::InvalidArgument(m) => Status::invalid_argument(m),
            SnapError::Internal(m) => Status::internal(m),
        }
    }
}

fn timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (nanos / 1_000_000_000) as i64, nanos: (nanos % 1_000_000_000) as i32 }
}

fn info(i: Info) -> api::Info {
    api::Info {
        name: i.name,
        parent: i.record.parent,
        kind: i.record.kind.proto(),
        created_at: Some(timestamp(i.record.created)),
        updated_at: Some(timestamp(i.record.updated)),
        labels: i.record.labels.into_iter().collect(),
    }
}

fn mounts(m: Vec<MountSpec>) -> Vec<Mount> {
    m.into_iter()
        .map(|m| Mount { r#type: m.kind, source: m.source, target: String::new(), options: m.options })
        .collect()
}

fn labels(l: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

/// The gRPC face of a [`Snapshotter`]. Each call runs on a blocking thread: a prepare of a
/// Starlight image waits for its metadata to arrive.
#[derive(Clone, Debug)]
pub struct Service(pub Arc<Snapshotter>);

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        key: String,
        f: impl FnOnce(&Snapshotter) -> Result<T, SnapError> + Send + 'static,
    ) -> Result<T, Status> {
        let sn = self.0.clone();
        let res = tokio::task::spawn_blocking(move || f(&sn))
            .await
            .map_err(|e| Status::internal(format!("{what} {key}: {e}")))?;
        match &res {
            Err(SnapError::NotFound(_) | SnapError::AlreadyExists(_)) | Ok(_) => {
                tracing::debug!(what, key, ok = res.is_ok(), "snapshot call")
            }
            Err(e) => tracing::warn!(what, key, error = %e, "snapshot call failed"),
        }
        res.map_err(Status::from)
    }
}

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        r: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self
            .run("prepare", r.key.clone(), move |s| s.create(&r.key, &r.parent, labels(r.labels), false))
            .await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts: mounts(m) }))
    }

    async fn view(
        &self,
        r: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = r.into_inner();
        let m = self
            .run("view", r.key.clone(), move |s| s.create(&r.key, &r.parent, labels(r.labels), true))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts: mounts(m) }))
    }

    async fn mounts(&self, r: Request<api::MountsRequest>) -> Result<Response<api::MountsResponse>, Status> {
        let r = r.into_inner();
        let m = self.run("mounts", r.key.clone(), move |s| s.mounts(&r.key)).await?;
        Ok(Response::new(api::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<api::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run("commit", r.key.clone(), move |s| s.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<api::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = r.into_inner();
        self.run("remove", r.key.clone(), move |s| s.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        r: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = self.run("stat", r.key.clone(), move |s| s.stat(&r.key)).await?;
        Ok(Response::new(api::StatSnapshotResponse { info: Some(info(i)) }))
    }

    async fn update(
        &self,
        r: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = r.into_inner();
        let i = r.info.ok_or_else(|| Status::invalid_argument("update without a snapshot"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = i.name.clone();
        let out = self.run("update", key.clone(), move |s| s.update(&key, labels(i.labels), &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse { info: Some(info(out)) }))
    }

    type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        r: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = r.into_inner();
        let all = self.run("list", String::new(), move |s| s.list(&r.filters)).await?;
        let batches: Vec<_> = all
            .chunks(100)
            .map(|c| Ok(api::ListSnapshotsResponse { info: c.iter().cloned().map(info).collect() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(&self, r: Request<api::UsageRequest>) -> Result<Response<api::UsageResponse>, Status> {
        let r = r.into_inner();
        let (size, inodes) = self.run("usage", r.key.clone(), move |s| s.usage(&r.key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _r: Request<api::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", String::new(), |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serves `sn` on unix socket `socket` (replacing a stale socket file) until `shutdown` resolves.
pub async fn serve(
    sn: Arc<Snapshotter>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing the old socket {}: {e}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| format!("listening on {}: {e}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "snapshotter serving");
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(sn)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| format!("serving on {}: {}", socket.display(), crate::containerd::chain(&e)))
}
