//! The OCI distribution-spec conformance workflows (pull, push, content discovery, content
//! management), written in Rust after the Ginkgo suite of `opencontainers/distribution-spec`
//! (`conformance/0*_test.go` at 13a5d3e, the last Ginkgo revision). Every test keeps the official
//! name as `Workflow/Context/Title`, e.g. `Pull/Setup/Populate registry with test blob`, so
//! results compare by name; like the official suite, a few names occur twice.
//!
//! [`run`] takes an [`OciConfig`] and returns a [`Report`] of [`TestResult`]s. With
//! [`OciConfig::verify_content`] on (the default) the suite also checks the bytes and digests it
//! reads back, which the official suite does not.
//!
//! # Layout
//! - `client`: HTTP client that answers basic/bearer challenges and follows redirects itself;
//!   `auth`: challenge parsing.
//! - `fixtures`: the blobs, configs and manifests each run generates; `check`: assertions whose
//!   failures say what was expected and what came back; `suite`: names, gates and records tests.
//! - `pull`, `push`, `discovery`, `management`: one workflow each; `report`: [`Report`].

mod auth;
mod check;
mod client;
mod config;
mod discovery;
mod fixtures;
mod management;
mod pull;
mod push;
mod report;
mod suite;

pub use config::{ExistingPullContent, OciConfig, Workflows};
pub use report::{Outcome, Report, TestResult};

use client::Client;
use fixtures::Fixtures;
use suite::{Env, Recorder};

/// Runs the enabled workflows in the official order and reports every test, enabled or not.
pub async fn run(config: &OciConfig) -> Report {
    let client = match Client::new(config) {
        Ok(c) => c,
        Err(e) => {
            let outcome = Outcome::Fail(format!("cannot start the HTTP client for {}: {e}", config.url));
            return Report { results: vec![TestResult::new("Setup/HTTP client", outcome)] };
        }
    };
    let seed = config.seed.unwrap_or_else(fixtures::time_seed);
    let fixtures = Fixtures::generate(seed);
    let env = Env { client: &client, config, fx: &fixtures };
    let mut results = Vec::new();

    let mut rec = Recorder::new("Pull", config.workflows.pull);
    pull::run(&env, &mut rec).await;
    results.append(&mut rec.results);

    let mut rec = Recorder::new("Push", config.workflows.push);
    push::run(&env, &mut rec).await;
    results.append(&mut rec.results);

    let mut rec = Recorder::new("Content Discovery", config.workflows.discovery);
    discovery::run(&env, &mut rec).await;
    results.append(&mut rec.results);

    let mut rec = Recorder::new("Content Management", config.workflows.management);
    management::run(&env, &mut rec).await;
    results.append(&mut rec.results);

    Report { results }
}
