//! The gateway's middleware, one concern per module, each an `XLayer` + `X<S>` pair.

pub mod access_log;
pub mod classify;
pub mod limit;
pub mod metrics;
pub mod oci_errors;

pub use access_log::AccessLogLayer;
pub use classify::ClassifyLayer;
pub use limit::LimitLayer;
pub use metrics::{Metrics, MetricsLayer};
pub use oci_errors::OciErrorLayer;
