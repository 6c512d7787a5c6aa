//! The suite's typed configuration: what the official suite reads from `OCI_*` variables.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What to test and how. Field docs name the official suite's variable for each setting.
#[derive(Debug, Clone)]
pub struct OciConfig {
    /// Registry root, e.g. `http://127.0.0.1:5000` (`OCI_ROOT_URL`). A path prefix is kept.
    pub url: String,
    /// Repository the workflows use (`OCI_NAMESPACE`).
    pub namespace: String,
    /// Second repository, the target of cross-repository mounts (`OCI_CROSSMOUNT_NAMESPACE`).
    pub crossmount_namespace: String,
    /// Credentials for basic auth or the token service (`OCI_USERNAME`, `OCI_PASSWORD`).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Scope asked of the token service instead of the challenge's (`OCI_AUTH_SCOPE`).
    pub auth_scope: Option<String>,
    /// Enabled workflows (`OCI_TEST_PULL`, `OCI_TEST_PUSH`, `OCI_TEST_CONTENT_DISCOVERY`,
    /// `OCI_TEST_CONTENT_MANAGEMENT`); disabled ones are reported as skipped.
    pub workflows: Workflows,
    /// Teardowns delete manifests before blobs (`OCI_DELETE_MANIFEST_BEFORE_BLOBS`, default true).
    pub delete_manifest_before_blobs: bool,
    /// Expected answer to a mount without `from` (`OCI_AUTOMATIC_CROSSMOUNT`); `None` skips it.
    pub automatic_crossmount: Option<bool>,
    /// Pull content already in the registry instead of pushing it first (`OCI_TAG_NAME`,
    /// `OCI_MANIFEST_DIGEST`, `OCI_BLOB_DIGEST`).
    pub existing_pull_content: Option<ExistingPullContent>,
    /// Tags already in the namespace; skips the discovery setup (`OCI_TAG_LIST`).
    pub existing_tags: Option<Vec<String>>,
    /// Also check that bytes read back match what was pushed (beyond the official suite).
    pub verify_content: bool,
    /// Limit for each HTTP exchange, redirects and auth round trips included.
    pub timeout: Duration,
    /// Seed of the generated content; `None` seeds from the clock so each run pushes new digests.
    pub seed: Option<u64>,
}

impl Default for OciConfig {
    fn default() -> Self {
        OciConfig {
            url: "http://127.0.0.1:5000".into(),
            namespace: "oci-conformance/main".into(),
            crossmount_namespace: "oci-conformance/crossmount".into(),
            username: None,
            password: None,
            auth_scope: None,
            workflows: Workflows::all(),
            delete_manifest_before_blobs: true,
            automatic_crossmount: None,
            existing_pull_content: None,
            existing_tags: None,
            verify_content: true,
            timeout: Duration::from_secs(30),
            seed: None,
        }
    }
}

/// Content the pull workflow reads instead of pushing its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingPullContent {
    pub tag: String,
    pub manifest_digest: String,
    pub blob_digest: String,
}

/// The four workflows; parses from a comma list such as `pull,push,discovery,management`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workflows {
    pub pull: bool,
    pub push: bool,
    pub discovery: bool,
    pub management: bool,
}

impl Workflows {
    pub fn all() -> Self {
        Workflows { pull: true, push: true, discovery: true, management: true }
    }

    pub fn none() -> Self {
        Workflows { pull: false, push: false, discovery: false, management: false }
    }
}

/// A workflow name that is none of `pull`, `push`, `discovery`, `management`, `all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWorkflow(pub String);

impl fmt::Display for UnknownWorkflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown workflow `{}` (expected pull, push, discovery, management or all)", self.0)
    }
}

impl std::error::Error for UnknownWorkflow {}

impl FromStr for Workflows {
    type Err = UnknownWorkflow;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut w = Workflows::none();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "pull" => w.pull = true,
                "push" => w.push = true,
                "discovery" | "content-discovery" => w.discovery = true,
                "management" | "content-management" => w.management = true,
                "all" => w = Workflows::all(),
                _ => return Err(UnknownWorkflow(name.into())),
            }
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_parse_from_comma_lists() {
        let w: Workflows = "pull, discovery".parse().unwrap();
        assert_eq!(w, Workflows { pull: true, push: false, discovery: true, management: false });
        assert_eq!("all".parse::<Workflows>().unwrap(), Workflows::all());
        assert_eq!("".parse::<Workflows>().unwrap(), Workflows::none());
        assert_eq!("pull,fetch".parse::<Workflows>(), Err(UnknownWorkflow("fetch".into())));
    }
}
