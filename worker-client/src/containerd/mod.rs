//! containerd's gRPC API, generated at build time from the `.proto` files vendored under `proto/`
//! (containerd's own, Apache-2.0), and the connection to its unix socket.
//!
//! - [`api`]: the generated messages, the Snapshots server the snapshotter implements and the
//!   clients `starlight-pull --containerd` uses (content, images, leases, snapshots).
//! - [`Client`]: one connection to containerd, in one namespace.
//! - [`pull`]: puts a Starlight image into containerd without unpacking layers.

pub mod pull;

use std::path::Path;

use tonic::transport::{Channel, Endpoint};

/// The generated code, in modules named after the proto packages.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
        }
    }
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::services::{content::v1 as content, images::v1 as images, leases::v1 as leases};
    pub use containerd::types;
}

/// A gRPC channel over a unix socket (containerd's, or a snapshotter's).
pub async fn connect(socket: &Path) -> Result<Channel, String> {
    let path = socket.to_path_buf();
    let shown = socket.display().to_string();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| format!("connecting to {shown}: {}", chain(&e)))
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        cur = c.source();
    }
    s
}

/// A request in containerd namespace `ns`, within lease `lease` when given.
pub fn request<T>(ns: &str, lease: Option<&str>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    // Namespaces and lease ids are checked by containerd; a value that is not a header value
    // is refused here first.
    if let Ok(v) = ns.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    if let Some(l) = lease.and_then(|l| l.parse().ok()) {
        r.metadata_mut().insert("containerd-lease", l);
    }
    r
}
