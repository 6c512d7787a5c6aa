//! What every workflow shares: the [`Recorder`] that names, gates and records each test, and
//! [`Env`], the client, config and fixtures with the requests the workflows repeat.

use std::future::Future;

use reqwest::Method;

use super::check::{Check, Failure, fail};
use super::client::{Client, Resp};
use super::fixtures::{Blob, Fixtures};
use super::{OciConfig, Outcome, TestResult};

/// Records the tests of one workflow, named `Workflow/Context/Title`.
#[derive(Debug)]
pub(crate) struct Recorder {
    workflow: &'static str,
    enabled: bool,
    pub(crate) results: Vec<TestResult>,
}

impl Recorder {
    pub(crate) fn new(workflow: &'static str, enabled: bool) -> Recorder {
        Recorder { workflow, enabled, results: Vec::new() }
    }

    pub(crate) fn spec(&mut self, context: &str, title: &str) -> Spec<'_> {
        let skip = (!self.enabled).then(|| format!("the {} workflow is not enabled", self.workflow));
        Spec { name: format!("{}/{context}/{title}", self.workflow), skip, rec: self }
    }
}

/// One test about to run, unless a gate skips it.
#[derive(Debug)]
pub(crate) struct Spec<'r> {
    rec: &'r mut Recorder,
    name: String,
    skip: Option<String>,
}

impl Spec<'_> {
    /// Skips the test with `why` unless `cond` holds (the official suite's `RunOnlyIf`).
    pub(crate) fn only_if(mut self, cond: bool, why: &str) -> Self {
        if self.skip.is_none() && !cond {
            self.skip = Some(why.to_string());
        }
        self
    }

    /// Runs `test` unless skipped; the future is not polled when the test is skipped.
    pub(crate) async fn run(self, test: impl Future<Output = Check>) {
        self.run_noting(async { test.await.map(|()| None) }).await
    }

    /// Like [`Spec::run`], for tests that pass with a warning (the official suite's `Warn`).
    pub(crate) async fn run_noting(self, test: impl Future<Output = Result<Option<String>, Failure>>) {
        let (outcome, warning) = match self.skip {
            Some(why) => (Outcome::Skip(why), None),
            None => match test.await {
                Ok(warning) => (Outcome::Pass, warning),
                Err(Failure(why)) => (Outcome::Fail(why), None),
            },
        };
        self.rec.results.push(TestResult { name: self.name, outcome, warning });
    }
}

/// A failure for a test whose input an earlier test should have produced.
pub(crate) fn missing(what: &str) -> Failure {
    Failure(format!("{what} is missing: an earlier test did not produce it"))
}

pub(crate) fn uploads(ns: &str) -> String {
    format!("/v2/{ns}/blobs/uploads/")
}

pub(crate) fn blob(ns: &str, digest: &str) -> String {
    format!("/v2/{ns}/blobs/{digest}")
}

pub(crate) fn manifest(ns: &str, reference: &str) -> String {
    format!("/v2/{ns}/manifests/{reference}")
}

pub(crate) fn tags(ns: &str) -> String {
    format!("/v2/{ns}/tags/list")
}

pub(crate) fn referrers(ns: &str, digest: &str) -> String {
    format!("/v2/{ns}/referrers/{digest}")
}

/// The client, config and fixtures of one run.
#[derive(Debug)]
pub(crate) struct Env<'a> {
    pub(crate) client: &'a Client,
    pub(crate) config: &'a OciConfig,
    pub(crate) fx: &'a Fixtures,
}

impl Env<'_> {
    pub(crate) fn ns(&self) -> &str {
        &self.config.namespace
    }

    pub(crate) async fn send(&self, method: Method, path: &str) -> Result<Resp, Failure> {
        Ok(self.client.send(self.client.req(method, path)).await?)
    }

    /// A monolithic upload: POST a session, then PUT the bytes to its `Location` with the digest.
    /// Returns the PUT's response; the POST must hand out a `Location`.
    pub(crate) async fn push_blob(&self, blob: &Blob) -> Result<Resp, Failure> {
        let post = self.send(Method::POST, &uploads(self.ns())).await?;
        let location = post.location().ok_or_else(|| fail(&post, "a Location for the upload session"))?;
        let put = self
            .client
            .req_url(Method::PUT, location)
            .query("digest", &blob.digest)
            .header("Content-Type", "application/octet-stream")
            .body(blob.content.clone());
        Ok(self.client.send(put).await?)
    }

    pub(crate) async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        m: &Blob,
    ) -> Result<Resp, Failure> {
        let req = self
            .client
            .req(Method::PUT, &manifest(self.ns(), reference))
            .header("Content-Type", media_type.to_string())
            .body(m.content.clone());
        Ok(self.client.send(req).await?)
    }

    /// GET or HEAD of a manifest with the OCI manifest type in `Accept`.
    pub(crate) async fn fetch_manifest(&self, method: Method, reference: &str) -> Result<Resp, Failure> {
        let req = self
            .client
            .req(method, &manifest(self.ns(), reference))
            .header("Accept", super::fixtures::MANIFEST_TYPE);
        Ok(self.client.send(req).await?)
    }

    pub(crate) async fn delete_manifest(&self, reference: &str) -> Result<Resp, Failure> {
        self.send(Method::DELETE, &manifest(self.ns(), reference)).await
    }

    pub(crate) async fn delete_blob(&self, digest: &str) -> Result<Resp, Failure> {
        self.send(Method::DELETE, &blob(self.ns(), digest)).await
    }
}

/// Teardown deletes accept 2xx, 405 (deletion disabled) and whatever else `also` allows.
pub(crate) fn deleted(resp: &Resp, also: &[u16]) -> Check {
    let extra: Vec<u16> = [405].iter().chain(also).copied().collect();
    super::check::status_2xx_or(resp, &extra)
}
