//! Conformance and end-to-end suites for Starlight, and the harness they share.
//!
//! # Layout
//! - [`servers`]: real servers on loopback for tests ([`servers::Redis`], [`servers::RedisCluster`],
//!   [`servers::S3Server`], [`servers::Registry`]), each on an ephemeral port and stopped when its
//!   guard drops. A missing server binary fails the test with the command that installs it.
//! - [`oci`]: the OCI distribution-spec conformance workflows ([`oci::run`] → [`oci::Report`]).

pub mod fstree;
pub mod oci;
pub mod servers;
