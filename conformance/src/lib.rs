//! Conformance and end-to-end suites for Starlight, and the harness they share.
//!
//! # Layout
//! - [`servers`]: real servers on loopback for tests ([`servers::Redis`], [`servers::RedisCluster`],
//!   [`servers::S3Server`], [`servers::Registry`]), each on an ephemeral port and stopped when its
//!   guard drops. A missing server binary fails the test with the command that installs it.
//!   [`servers::Containerd`] runs a private containerd driven with `ctr`.
//! - [`images`]: real Debian-based test images (debootstrap + apt), built once and cached.
//! - [`layout`]: synthetic images, layer by layer, written as OCI layouts (every OCI edge case).
//! - [`fstree`]: tree snapshots and differences, attribute for attribute.
//! - [`throttle`]: a loopback TCP proxy that slows a link down or cuts it.
//! - [`oci`]: the OCI distribution-spec conformance workflows ([`oci::run`] → [`oci::Report`]).

pub mod fstree;
pub mod images;
pub mod layout;
pub mod oci;
pub mod servers;
pub mod throttle;
