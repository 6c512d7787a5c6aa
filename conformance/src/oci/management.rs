//! The Content Management workflow (`04_management_test.go`): delete a tag, the manifest by
//! digest and its blobs, and see the tag list and GETs reflect it.

use reqwest::Method;

use super::check::{ensure, fail, first_error_code, json, status, status_2xx, status_in};
use super::fixtures::{MANIFEST_TYPE, TEST_TAG};
use super::suite::{Env, Recorder, blob, manifest, tags};

const SETUP: &str = "Setup";
const MANIFEST_DELETE: &str = "Manifest delete";
const BLOB_DELETE: &str = "Blob delete";

#[derive(serde::Deserialize)]
struct TagList {
    tags: Option<Vec<String>>,
}

pub(crate) async fn run(env: &Env<'_>, rec: &mut Recorder) {
    let (fx, ns) = (env.fx, env.ns());
    let (config, m) = (&fx.configs[3], &fx.manifests[3]);
    rec.spec(SETUP, "Populate registry with test config blob")
        .run(async { status_2xx(&env.push_blob(config).await?) })
        .await;
    rec.spec(SETUP, "Populate registry with test layer")
        .run(async { status_2xx(&env.push_blob(&fx.layer).await?) })
        .await;
    rec.spec(SETUP, "Populate registry with test tag")
        .run(async { status_2xx(&env.put_manifest(TEST_TAG, MANIFEST_TYPE, m).await?) })
        .await;
    let mut num_tags = 0;
    rec.spec(SETUP, "Check how many tags there are before anything gets deleted")
        .run(async {
            let resp = env.send(Method::GET, &tags(ns)).await?;
            status(&resp, 200)?;
            num_tags = json::<TagList>(&resp)?.tags.map_or(0, |t| t.len());
            Ok(())
        })
        .await;

    rec.spec(
        MANIFEST_DELETE,
        "DELETE request to manifest tag should return 202, unless tag deletion is disallowed (400/405)",
    )
    .run(async {
        let resp = env.send(Method::DELETE, &manifest(ns, TEST_TAG)).await?;
        status_in(&resp, &[400, 202, 405])?;
        if resp.code() == 400 {
            let code = first_error_code(&resp)?;
            ensure(code == "UNSUPPORTED", || {
                fail(&resp, format!("error code UNSUPPORTED (got {code:?})")).0
            })?;
        }
        Ok(())
    })
    .await;
    rec.spec(
        MANIFEST_DELETE,
        "DELETE request to manifest (digest) should yield 202 response unless already deleted",
    )
    .run(async { status_in(&env.delete_manifest(&m.digest).await?, &[202, 404]) })
    .await;
    rec.spec(
        MANIFEST_DELETE,
        "GET request to deleted manifest URL should yield 404 response, unless delete is disallowed",
    )
    .run(async { status_in(&env.fetch_manifest(Method::GET, &m.digest).await?, &[404, 200]) })
    .await;
    rec.spec(MANIFEST_DELETE, "GET request to tags list should reflect manifest deletion")
        .run(async {
            let resp = env.send(Method::GET, &tags(ns)).await?;
            status_in(&resp, &[404, 200])?;
            let want = num_tags.saturating_sub(1);
            let got = match resp.code() {
                200 => json::<TagList>(&resp)?.tags.map_or(0, |t| t.len()),
                _ => 0,
            };
            ensure(got == want, || fail(&resp, format!("{want} tags, one fewer than before (got {got})")).0)
        })
        .await;

    let mut blob_delete_allowed = true;
    rec.spec(BLOB_DELETE, "DELETE request to blob URL should yield 202 response")
        .run(async {
            status_in(&env.delete_blob(&config.digest).await?, &[202, 404, 405])?;
            let resp = env.delete_blob(&fx.layer.digest).await?;
            status_in(&resp, &[202, 404, 405])?;
            blob_delete_allowed = resp.code() != 405;
            Ok(())
        })
        .await;
    rec.spec(BLOB_DELETE, "GET request to deleted blob URL should yield 404 response")
        .only_if(blob_delete_allowed, "the registry does not allow blob deletion (405)")
        .run(async { status(&env.send(Method::GET, &blob(ns, &config.digest)).await?, 404) })
        .await;
}
