//! The Pull workflow (`01_pull_test.go`): push config blobs, a layer and two manifests (one
//! tagged, one by digest), read them back with HEAD and GET, check 404s and the OCI error body,
//! then delete everything.

use reqwest::Method;

use super::check::{
    ERROR_CODES, body_is, ensure, fail, first_error_code, header_eq_if_present, status, status_2xx, status_in,
};
use super::fixtures::{MANIFEST_TYPE, NONEXISTENT_MANIFEST, TEST_TAG};
use super::suite::{Env, Recorder, blob, deleted, manifest};

const SETUP: &str = "Setup";
const BLOBS: &str = "Pull blobs";
const MANIFESTS: &str = "Pull manifests";
const TEARDOWN: &str = "Teardown";
const NO_SETUP: &str = "the pull setup is off: existing content was configured";

pub(crate) async fn run(env: &Env<'_>, rec: &mut Recorder) {
    let fx = env.fx;
    let existing = env.config.existing_pull_content.as_ref();
    let setup = existing.is_none();
    // With existing content, its digests stand in for the generated ones (as OCI_*_DIGEST do).
    let config0 = existing.map_or(fx.configs[0].digest.as_str(), |e| e.blob_digest.as_str());
    let manifest0 = existing.map_or(fx.manifests[0].digest.as_str(), |e| e.manifest_digest.as_str());
    let manifest1 = existing.map_or(fx.manifests[1].digest.as_str(), |e| e.manifest_digest.as_str());
    let tag = existing.map_or(TEST_TAG, |e| e.tag.as_str());
    let verify = env.config.verify_content && setup;
    let ns = env.ns();

    for config in &fx.configs[..2] {
        rec.spec(SETUP, "Populate registry with test blob")
            .only_if(setup, NO_SETUP)
            .run(async { status_2xx(&env.push_blob(config).await?) })
            .await;
    }
    rec.spec(SETUP, "Populate registry with test layer")
        .only_if(setup, NO_SETUP)
        .run(async { status_2xx(&env.push_blob(&fx.layer).await?) })
        .await;
    for (reference, m) in [(TEST_TAG, &fx.manifests[0]), (fx.manifests[1].digest.as_str(), &fx.manifests[1])]
    {
        rec.spec(SETUP, "Populate registry with test manifest")
            .only_if(setup, NO_SETUP)
            .run(async { status_2xx(&env.put_manifest(reference, MANIFEST_TYPE, m).await?) })
            .await;
    }
    rec.spec(SETUP, "Get tag name from environment")
        .only_if(!setup, "the pull setup pushed its own tag")
        .run(async { ensure(!tag.is_empty(), || "the configured tag is empty".into()) })
        .await;

    rec.spec(BLOBS, "HEAD request to nonexistent blob should result in 404 response")
        .run(async { status(&env.send(Method::HEAD, &blob(ns, &fx.dummy_digest)).await?, 404) })
        .await;
    rec.spec(BLOBS, "HEAD request to existing blob should yield 200")
        .run(async {
            let resp = env.send(Method::HEAD, &blob(ns, config0)).await?;
            status(&resp, 200)?;
            header_eq_if_present(&resp, "Docker-Content-Digest", config0)
        })
        .await;
    rec.spec(BLOBS, "GET nonexistent blob should result in 404 response")
        .run(async { status(&env.send(Method::GET, &blob(ns, &fx.dummy_digest)).await?, 404) })
        .await;
    rec.spec(BLOBS, "GET request to existing blob URL should yield 200")
        .run(async {
            let resp = env.send(Method::GET, &blob(ns, config0)).await?;
            status(&resp, 200)?;
            body_is(&resp, &fx.configs[0].content, config0, verify)
        })
        .await;

    rec.spec(MANIFESTS, "HEAD request to nonexistent manifest should return 404")
        .run(async { status(&env.fetch_manifest(Method::HEAD, NONEXISTENT_MANIFEST).await?, 404) })
        .await;
    let heads = [
        ("HEAD request to manifest[0] path (digest) should yield 200 response", manifest0, manifest0),
        ("HEAD request to manifest[1] path (digest) should yield 200 response", manifest1, manifest1),
        ("HEAD request to manifest path (tag) should yield 200 response", tag, manifest0),
    ];
    for (title, reference, digest) in heads {
        rec.spec(MANIFESTS, title)
            .run(async {
                ensure(!reference.is_empty(), || "no tag to pull".into())?;
                let resp = env.fetch_manifest(Method::HEAD, reference).await?;
                status(&resp, 200)?;
                header_eq_if_present(&resp, "Docker-Content-Digest", digest)
            })
            .await;
    }
    rec.spec(MANIFESTS, "GET nonexistent manifest should return 404")
        .run(async { status(&env.fetch_manifest(Method::GET, NONEXISTENT_MANIFEST).await?, 404) })
        .await;
    let gets = [
        ("GET request to manifest[0] path (digest) should yield 200 response", manifest0, &fx.manifests[0]),
        ("GET request to manifest[1] path (digest) should yield 200 response", manifest1, &fx.manifests[1]),
        ("GET request to manifest path (tag) should yield 200 response", tag, &fx.manifests[0]),
    ];
    for (title, reference, m) in gets {
        rec.spec(MANIFESTS, title)
            .run(async {
                ensure(!reference.is_empty(), || "no tag to pull".into())?;
                let resp = env.fetch_manifest(Method::GET, reference).await?;
                status(&resp, 200)?;
                body_is(&resp, &m.content, &m.digest, verify)
            })
            .await;
    }

    rec.spec("Error codes", "400 response body should contain OCI-conforming JSON message")
        .run(async {
            // A GET with a body, as the official suite sends it.
            let req = env
                .client
                .req(Method::GET, &manifest(ns, "sha256:totallywrong"))
                .header("Content-Type", MANIFEST_TYPE)
                .body(&b"blablabla"[..]);
            let resp = env.client.send(req).await?;
            status_in(&resp, &[400, 404])?;
            if resp.code() == 400 {
                let code = first_error_code(&resp)?;
                ensure(ERROR_CODES.contains(&code.as_str()), || {
                    fail(&resp, format!("an error code of the spec (got {code:?})")).0
                })?;
            }
            Ok(())
        })
        .await;

    if env.config.delete_manifest_before_blobs {
        delete_manifests(env, rec, setup, [manifest0, manifest1]).await;
    }
    let blobs = [
        ("Delete config[0] blob created in setup", fx.configs[0].digest.as_str()),
        ("Delete config[1] blob created in setup", fx.configs[1].digest.as_str()),
        ("Delete layer blob created in setup", fx.layer.digest.as_str()),
    ];
    for (title, digest) in blobs {
        rec.spec(TEARDOWN, title)
            .only_if(setup, NO_SETUP)
            .run(async { deleted(&env.delete_blob(digest).await?, &[404]) })
            .await;
    }
    if !env.config.delete_manifest_before_blobs {
        delete_manifests(env, rec, setup, [manifest0, manifest1]).await;
    }
}

async fn delete_manifests(env: &Env<'_>, rec: &mut Recorder, setup: bool, digests: [&str; 2]) {
    let titles = ["Delete manifest[0] created in setup", "Delete manifest[1] created in setup"];
    for (title, digest) in titles.into_iter().zip(digests) {
        rec.spec(TEARDOWN, title)
            .only_if(setup, NO_SETUP)
            .run(async { deleted(&env.delete_manifest(digest).await?, &[]) })
            .await;
    }
}
