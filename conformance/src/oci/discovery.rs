//! The Content Discovery workflow (`03_discovery_test.go`): tag listing (order, `n`, `last`) and
//! the referrers API (all referrers, the `artifactType` filter, a subject never pushed).

use std::collections::HashMap;

use reqwest::Method;
use serde::Deserialize;

use super::check::{Check, Failure, ensure, fail, header_eq, header_eq_if_present, json, status, status_2xx};
use super::client::Resp;
use super::fixtures::{
    ANNOTATION_KEY, ARTIFACT_TYPE_A, Blob, EMPTY_JSON_DIGEST, INDEX_TYPE, MANIFEST_TYPE, TEST_TAG,
};
use super::suite::{Env, Recorder, deleted, referrers, tags};

const SETUP: &str = "Setup";
const TAGS: &str = "Test content discovery endpoints (listing tags)";
const REFS: &str = "Test content discovery endpoints (listing references)";
const TEARDOWN: &str = "Teardown";

pub(crate) async fn run(env: &Env<'_>, rec: &mut Recorder) {
    let setup = env.config.existing_tags.is_none();
    setup_tests(env, rec, setup).await;
    tag_tests(env, rec).await;
    referrer_tests(env, rec).await;
    teardown(env, rec, setup).await;
}

/// The tags of a tag list body; like the official suite, anything unreadable is no tags.
fn tag_list(resp: &Resp) -> Vec<String> {
    #[derive(Deserialize)]
    struct TagList {
        tags: Option<Vec<String>>,
    }
    serde_json::from_slice::<TagList>(&resp.body).ok().and_then(|t| t.tags).unwrap_or_default()
}

async fn setup_tests(env: &Env<'_>, rec: &mut Recorder, setup: bool) {
    let fx = env.fx;
    let off = "the discovery setup is off: existing tags were configured";
    rec.spec(SETUP, "Populate registry with test blob")
        .only_if(setup, off)
        .run(async { status_2xx(&env.push_blob(&fx.configs[2]).await?) })
        .await;
    rec.spec(SETUP, "Populate registry with test layer")
        .only_if(setup, off)
        .run(async { status_2xx(&env.push_blob(&fx.layer).await?) })
        .await;
    rec.spec(SETUP, "Populate registry with test tags")
        .only_if(setup, off)
        .run(async {
            for i in 0..4 {
                for tag in [format!("test{i}"), format!("TEST{i}")] {
                    status_2xx(&env.put_manifest(&tag, MANIFEST_TYPE, &fx.manifests[2]).await?)?;
                }
            }
            Ok(())
        })
        .await;
    rec.spec(SETUP, "Populate registry with test tags (no push)")
        .only_if(!setup, "the discovery setup pushed its own tags")
        .run(async { Ok(()) })
        .await;
    rec.spec(SETUP, "References setup").only_if(setup, off).run(references_setup(env)).await;
}

/// Pushes a referrer, which must be accepted with `OCI-Subject` naming its subject.
async fn put_referrer(env: &Env<'_>, m: &Blob, media_type: &str, subject: &Blob) -> Check {
    let resp = env.put_manifest(&m.digest, media_type, m).await?;
    status_2xx(&resp)?;
    header_eq(&resp, "OCI-Subject", &subject.digest)
}

async fn references_setup(env: &Env<'_>) -> Check {
    let (fx, refs) = (env.fx, &env.fx.refs);
    let subject = &fx.manifests[4];
    ensure(refs.empty_json.digest == EMPTY_JSON_DIGEST, || "the digest of {} is wrong".into())?;
    status_2xx(&env.push_blob(&refs.empty_json).await?)?;
    // Referrers A and the index go in before their subject, referrers B after it.
    status_2xx(&env.push_blob(&refs.blob_a).await?)?;
    put_referrer(env, &refs.a_config, MANIFEST_TYPE, subject).await?;
    put_referrer(env, &refs.a_layer, MANIFEST_TYPE, subject).await?;
    put_referrer(env, &refs.index, INDEX_TYPE, subject).await?;
    status_2xx(&env.push_blob(&fx.configs[4]).await?)?;
    status_2xx(&env.push_blob(&fx.layer).await?)?;
    status_2xx(&env.put_manifest(TEST_TAG, MANIFEST_TYPE, subject).await?)?;
    status_2xx(&env.push_blob(&refs.blob_b).await?)?;
    put_referrer(env, &refs.b_config, MANIFEST_TYPE, subject).await?;
    put_referrer(env, &refs.b_layer, MANIFEST_TYPE, subject).await?;
    put_referrer(env, &refs.c_layer, MANIFEST_TYPE, &fx.manifests[3]).await
}

async fn tag_tests(env: &Env<'_>, rec: &mut Recorder) {
    let (c, path) = (env.client, tags(env.ns()));
    let mut num_tags = 4;
    rec.spec(TAGS, "GET request to list tags should yield 200 response and be in sorted order")
        .run(async {
            let resp = env.send(Method::GET, &path).await?;
            status(&resp, 200)?;
            let list = tag_list(&resp);
            num_tags = list.len();
            let mut lexical = list.clone();
            lexical.sort_by_key(|t| t.to_lowercase());
            let mut ascii = list.clone();
            ascii.sort();
            // Lexical (case-insensitive) order is the spec's; plain byte order is tolerated.
            ensure(list == lexical || list == ascii, || fail(&resp, "tags in sorted order").0)
        })
        .await;
    let n = num_tags / 2;
    rec.spec(TAGS, "GET number of tags should be limitable by `n` query parameter")
        .run(async {
            let resp = c.send(c.req(Method::GET, &path).query("n", &n.to_string())).await?;
            status(&resp, 200)?;
            let got = tag_list(&resp).len();
            ensure(got == n, || fail(&resp, format!("{n} tags (got {got})")).0)
        })
        .await;
    rec.spec(TAGS, "GET start of tag is set by `last` query parameter")
        .run(async {
            let resp = c.send(c.req(Method::GET, &path).query("n", &n.to_string())).await?;
            status(&resp, 200)?;
            let list = tag_list(&resp);
            let last =
                n.checked_sub(1).and_then(|i| list.get(i)).ok_or_else(|| fail(&resp, format!("{n} tags")))?;
            let req = c.req(Method::GET, &path).query("n", &n.to_string()).query("last", last);
            let resp = c.send(req).await?;
            status(&resp, 200)?;
            let page = tag_list(&resp);
            ensure(page.len() <= n, || fail(&resp, format!("at most {n} tags")).0)?;
            ensure(!page.contains(last), || fail(&resp, format!("a page after {last:?}, without it")).0)
        })
        .await;
}

#[derive(Debug, Deserialize)]
struct IndexDoc {
    manifests: Option<Vec<Referrer>>,
}

#[derive(Debug, Deserialize)]
struct Referrer {
    digest: String,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

/// A referrers answer: 200, the index media type, and its descriptors.
fn referrers_index(resp: &Resp) -> Result<Vec<Referrer>, Failure> {
    status(resp, 200)?;
    header_eq(resp, "Content-Type", INDEX_TYPE)?;
    Ok(json::<IndexDoc>(resp)?.manifests.unwrap_or_default())
}

/// Exactly `count` referrers, each with its one conformance annotation.
fn annotated(resp: &Resp, list: &[Referrer], count: usize, env: &Env<'_>) -> Check {
    ensure(list.len() == count, || fail(resp, format!("{count} referrers (got {})", list.len())).0)?;
    for r in list {
        let a = r.annotations.clone().unwrap_or_default();
        let want = env.fx.refs.annotations.get(&r.digest);
        let ok = a.len() == 1 && a.get(ANNOTATION_KEY) == want;
        ensure(ok, || fail(resp, format!("{} annotated {ANNOTATION_KEY}={want:?} only", r.digest)).0)?;
    }
    Ok(())
}

async fn referrer_tests(env: &Env<'_>, rec: &mut Recorder) {
    let (c, fx, ns) = (env.client, env.fx, env.ns());
    let subject = &fx.manifests[4].digest;
    rec.spec(REFS, "GET request to nonexistent blob should result in empty 200 response")
        .run(async {
            let resp = env.send(Method::GET, &referrers(ns, &fx.dummy_digest)).await?;
            let list = referrers_index(&resp)?;
            ensure(list.is_empty(), || fail(&resp, "no referrers").0)
        })
        .await;
    rec.spec(REFS, "GET request to existing blob should yield 200")
        .run(async {
            let resp = env.send(Method::GET, &referrers(ns, subject)).await?;
            let list = referrers_index(&resp)?;
            ensure(list.len() < 2 || list[0].digest != list[1].digest, || {
                fail(&resp, "distinct referrers").0
            })?;
            annotated(&resp, &list, 5, env)
        })
        .await;
    rec.spec(REFS, "GET request to existing blob with filter should yield 200")
        .run_noting(async {
            let req = c.req(Method::GET, &referrers(ns, subject)).query("artifactType", ARTIFACT_TYPE_A);
            let resp = c.send(req).await?;
            let list = referrers_index(&resp)?;
            if resp.header("OCI-Filters-Applied").is_some_and(|h| !h.is_empty()) {
                header_eq_if_present(&resp, "OCI-Filters-Applied", "artifactType")?;
                annotated(&resp, &list, 2, env)?;
                return Ok(None);
            }
            annotated(&resp, &list, 5, env)?;
            Ok(Some("filtering by artifact-type is not implemented".into()))
        })
        .await;
    rec.spec(REFS, "GET request to missing manifest should yield 200")
        .run(async {
            let resp = env.send(Method::GET, &referrers(ns, &fx.manifests[3].digest)).await?;
            let list = referrers_index(&resp)?;
            let want = &fx.refs.c_layer.digest;
            let ok = list.len() == 1 && &list[0].digest == want;
            ensure(ok, || fail(&resp, format!("exactly one referrer, {want}")).0)
        })
        .await;
}

async fn teardown(env: &Env<'_>, rec: &mut Recorder, setup: bool) {
    let (fx, refs) = (env.fx, &env.fx.refs);
    let off = "the discovery setup is off: existing tags were configured";
    let before = env.config.delete_manifest_before_blobs;
    let created = [
        &refs.index,
        &fx.manifests[2],
        &fx.manifests[4],
        &refs.a_config,
        &refs.a_layer,
        &refs.b_config,
        &refs.b_layer,
        &refs.c_layer,
    ];
    let delete_all = async |list: &[&Blob]| -> Check {
        for m in list {
            deleted(&env.delete_manifest(&m.digest).await?, &[404])?;
        }
        Ok(())
    };
    let title = "Delete created manifest & associated tags";
    if before {
        rec.spec(TEARDOWN, title).only_if(setup, off).run(delete_all(&created)).await;
    }
    rec.spec(TEARDOWN, "Delete config blob created in tests")
        .only_if(setup, off)
        .run(async { deleted(&env.delete_blob(&fx.configs[2].digest).await?, &[404]) })
        .await;
    rec.spec(TEARDOWN, "Delete layer blob created in setup")
        .only_if(setup, off)
        .run(async { deleted(&env.delete_blob(&fx.layer.digest).await?, &[404]) })
        .await;
    if !before {
        rec.spec(TEARDOWN, title).only_if(setup, off).run(delete_all(&created)).await;
    }
    let referrer_manifests =
        [&refs.index, &refs.a_config, &refs.a_layer, &fx.manifests[4], &refs.b_config, &refs.b_layer];
    rec.spec(TEARDOWN, "References teardown")
        .only_if(setup, off)
        .run(async {
            if before {
                delete_all(&referrer_manifests).await?;
            }
            for b in [&fx.configs[4], &refs.blob_a, &refs.blob_b, &refs.empty_json] {
                deleted(&env.delete_blob(&b.digest).await?, &[404])?;
            }
            if !before {
                delete_all(&referrer_manifests).await?;
            }
            Ok(())
        })
        .await;
}
