//! The Starlight worker: pulls images through the gateway's delta bundles into a
//! content-addressed store, exports them, and serves them through FUSE while they arrive.
//!
//! - [`store::Store`]: the content-addressed store (contents, image records, resume state).
//! - [`pull::pull`]: one bundle request, verified and written into the store; resumable.
//! - [`export::export`]: an image's root filesystem written into a directory.
//! - [`mount::mount`]: a read-only FUSE mount served from the bundle header on.
//! - [`trace`]: start-up traces recorded by the mount, sent to the gateway.
//! - [`snapshotter`]: the containerd snapshotter; [`containerd`]: containerd's API and the pull
//!   of a Starlight image into containerd.

pub mod client;
pub mod containerd;
pub mod export;
pub mod fs;
pub mod mount;
pub mod pull;
pub mod snapshotter;
pub mod store;
pub mod trace;

#[cfg(test)]
mod testing;

pub use client::{Gateway, GatewayOptions};
pub use mount::{MountOptions, Mounted, mount};
pub use pull::{PullOptions, Report, pull};
pub use store::{Reference, Store};
