//! The Push workflow (`02_push_test.go`): streamed (PATCH without `Content-Range`), monolithic
//! (POST with digest; POST then PUT) and chunked uploads (with out-of-order and retried chunks
//! answered by 416), cross-repository mounts, manifest uploads, and the teardown.

use reqwest::{Method, Url};

use super::check::{Check, Failure, body_is, fail, has_location, header_eq, status, status_in};
use super::client::Resp;
use super::fixtures::{Blob, Chunked, EMPTY_LAYER_TAG, MANIFEST_TYPE, NONEXISTENT_MANIFEST};
use super::suite::{Env, Recorder, blob, deleted, missing, uploads};

const STREAMED: &str = "Blob Upload Streamed";
const MONOLITHIC: &str = "Blob Upload Monolithic";
const CHUNKED: &str = "Blob Upload Chunked";
const MOUNT: &str = "Cross-Repository Blob Mount";
const MANIFESTS: &str = "Manifest Upload";
const TEARDOWN: &str = "Teardown";
const OCTET: &str = "application/octet-stream";

pub(crate) async fn run(env: &Env<'_>, rec: &mut Recorder) {
    streamed(env, rec).await;
    monolithic(env, rec).await;
    chunked(env, rec).await;
    mount(env, rec).await;
    let empty_pushed = manifests(env, rec).await;
    teardown(env, rec, empty_pushed).await;
}

/// The `Location` of a response, which must have one.
fn location(resp: &Resp) -> Result<Url, Failure> {
    resp.location().ok_or_else(|| fail(resp, "a Location header"))
}

/// The `Location` of an earlier test's response, which must exist.
fn location_of(resp: Option<&Resp>, what: &str) -> Result<Url, Failure> {
    location(resp.ok_or_else(|| missing(what))?)
}

/// POSTs a new upload session, which must come with a `Location`.
async fn post_session(env: &Env<'_>, ns: &str) -> Result<(Resp, Url), Failure> {
    let post = env.send(Method::POST, &uploads(ns)).await?;
    let loc = location(&post)?;
    Ok((post, loc))
}

async fn streamed(env: &Env<'_>, rec: &mut Recorder) {
    let (c, fx) = (env.client, env.fx);
    let mut patched = None;
    rec.spec(STREAMED, "PATCH request with blob in body should yield 202 response")
        .run(async {
            let (_, loc) = post_session(env, env.ns()).await?;
            let resp = c
                .send(
                    c.req_url(Method::PATCH, loc)
                        .header("Content-Type", OCTET)
                        .body(fx.blob_a.content.clone()),
                )
                .await?;
            status(&resp, 202)?;
            patched = Some(resp);
            Ok(())
        })
        .await;
    rec.spec(STREAMED, "PUT request to session URL with digest should yield 201 response")
        .run(async {
            let loc = location_of(patched.as_ref(), "the PATCH response")?;
            let put =
                c.req_url(Method::PUT, loc).query("digest", &fx.blob_a.digest).header("Content-Type", OCTET);
            let resp = c.send(put).await?;
            status(&resp, 201)?;
            has_location(&resp)
        })
        .await;
}

async fn monolithic(env: &Env<'_>, rec: &mut Recorder) {
    let (c, fx, ns) = (env.client, env.fx, env.ns());
    let config = &fx.configs[1];
    let verify = env.config.verify_content;
    rec.spec(MONOLITHIC, "GET nonexistent blob should result in 404 response")
        .run(async { status(&env.send(Method::GET, &blob(ns, &fx.dummy_digest)).await?, 404) })
        .await;
    let mut post_status = None;
    rec.spec(MONOLITHIC, "POST request with digest and blob should yield a 201 or 202")
        .run(async {
            let post = c.req(Method::POST, &uploads(ns)).query("digest", &config.digest);
            let resp = c.send(post.header("Content-Type", OCTET).body(config.content.clone())).await?;
            has_location(&resp)?;
            status_in(&resp, &[201, 202])?;
            post_status = Some(resp.code());
            Ok(())
        })
        .await;
    rec.spec(
        MONOLITHIC,
        "GET request to blob URL from prior request should yield 200 or 404 based on response code",
    )
    .run(async {
        let prior = post_status.ok_or_else(|| missing("the status of the POST with digest"))?;
        let resp = env.send(Method::GET, &blob(ns, &config.digest)).await?;
        // 202 means the registry opened a session instead of storing the blob.
        if prior == 202 {
            return status(&resp, 404);
        }
        status(&resp, 200)?;
        body_is(&resp, &config.content, &config.digest, verify)
    })
    .await;
    let mut session = None;
    rec.spec(MONOLITHIC, "POST request should yield a session ID")
        .run(async {
            let resp = env.send(Method::POST, &uploads(ns)).await?;
            status(&resp, 202)?;
            session = Some(resp);
            Ok(())
        })
        .await;
    rec.spec(MONOLITHIC, "PUT upload of a blob should yield a 201 Response")
        .run(async {
            let loc = location_of(session.as_ref(), "the upload session")?;
            let put =
                c.req_url(Method::PUT, loc).query("digest", &config.digest).header("Content-Type", OCTET);
            let resp = c.send(put.body(config.content.clone())).await?;
            has_location(&resp)?;
            status(&resp, 201)
        })
        .await;
    read_back(env, rec, "GET request to existing blob should yield 200 response", config).await;
    rec.spec(MONOLITHIC, "PUT upload of a layer blob should yield a 201 Response")
        .run(async {
            let resp = env.push_blob(&fx.layer).await?;
            has_location(&resp)?;
            status(&resp, 201)
        })
        .await;
    read_back(env, rec, "GET request to existing layer should yield 200 response", &fx.layer).await;
}

async fn read_back(env: &Env<'_>, rec: &mut Recorder, title: &str, b: &Blob) {
    rec.spec(MONOLITHIC, title)
        .run(async {
            let resp = env.send(Method::GET, &blob(env.ns(), &b.digest)).await?;
            status(&resp, 200)?;
            body_is(&resp, &b.content, &b.digest, env.config.verify_content)
        })
        .await;
}

async fn chunked(env: &Env<'_>, rec: &mut Recorder) {
    let (c, ns) = (env.client, env.ns());
    let mut chunks = env.fx.chunked.clone();
    let patch = |url, data: &bytes::Bytes, range: String| {
        c.req_url(Method::PATCH, url)
            .header("Content-Type", OCTET)
            .header("Content-Range", range)
            .body(data.clone())
    };
    rec.spec(CHUNKED, "Out-of-order blob upload should return 416")
        .run(async {
            let (post, loc) = post_session(env, ns).await?;
            // A registry may ask for bigger chunks: then the blob grows so that chunks still fit.
            if let Some(min) = post.header("OCI-Chunk-Min-Length") {
                let min: usize = min.parse().map_err(|_| fail(&post, "a number in OCI-Chunk-Min-Length"))?;
                if min > chunks.first.len() {
                    chunks = Chunked::new(min * 2 - 2, env.fx.seed.wrapping_add(2));
                }
            }
            status(&c.send(patch(loc, &chunks.second, chunks.second_range())).await?, 416)
        })
        .await;
    let (mut first_post, mut last) = (None, None);
    rec.spec(CHUNKED, "PATCH request with first chunk should return 202")
        .run(async {
            let (post, loc) = post_session(env, ns).await?;
            first_post = Some(post);
            let resp = c.send(patch(loc, &chunks.first, chunks.first_range())).await?;
            status(&resp, 202)?;
            header_eq(&resp, "Range", &chunks.first_range())?;
            last = Some(resp);
            Ok(())
        })
        .await;
    rec.spec(CHUNKED, "Retry previous blob chunk should return 416")
        .run(async {
            let loc = location_of(first_post.as_ref(), "the first chunk's upload session")?;
            status(&c.send(patch(loc, &chunks.first, chunks.first_range())).await?, 416)
        })
        .await;
    rec.spec(CHUNKED, "Get on stale blob upload should return 204 with a range and location")
        .run(async {
            let loc = location_of(first_post.as_ref(), "the first chunk's upload session")?;
            let resp = c.send(c.req_url(Method::GET, loc)).await?;
            status(&resp, 204)?;
            has_location(&resp)?;
            header_eq(&resp, "Range", &chunks.first_range())?;
            last = Some(resp);
            Ok(())
        })
        .await;
    rec.spec(CHUNKED, "PATCH request with second chunk should return 202")
        .run(async {
            let loc = location_of(last.as_ref(), "the upload status")?;
            let resp = c.send(patch(loc, &chunks.second, chunks.second_range())).await?;
            status(&resp, 202)?;
            header_eq(&resp, "Range", &format!("0-{}", chunks.blob.len().saturating_sub(1)))?;
            has_location(&resp)?;
            last = Some(resp);
            Ok(())
        })
        .await;
    rec.spec(CHUNKED, "PUT request with digest should return 201")
        .run(async {
            let loc = location_of(last.as_ref(), "the second chunk's response")?;
            let put = c
                .req_url(Method::PUT, loc)
                .query("digest", &chunks.blob.digest)
                .header("Content-Type", OCTET);
            let resp = c.send(put).await?;
            status(&resp, 201)?;
            has_location(&resp)
        })
        .await;
}

async fn mount(env: &Env<'_>, rec: &mut Recorder) {
    let (c, fx) = (env.client, env.fx);
    let target = env.config.crossmount_namespace.as_str();
    let mount_req = |digest: &str, from: Option<&str>| {
        let req = c.req(Method::POST, &uploads(target)).query("mount", digest);
        match from {
            Some(from) => req.query("from", from),
            None => req,
        }
    };
    rec.spec(MOUNT, "Cross-mounting of a blob without the from argument should yield session id")
        .run(async {
            let resp = c.send(mount_req(&fx.dummy_digest, None)).await?;
            status(&resp, 202)?;
            has_location(&resp)
        })
        .await;
    let mut mounted = None;
    rec.spec(MOUNT, "POST request to mount another repository's blob should return 201 or 202")
        .run(async {
            let resp = c.send(mount_req(&fx.blob_a.digest, Some(env.ns()))).await?;
            status_in(&resp, &[201, 202])?;
            mounted = Some(resp);
            Ok(())
        })
        .await;
    let answered = |code| mounted.as_ref().is_none_or(|r: &Resp| r.code() == code);
    rec.spec(MOUNT, "GET request to test digest within cross-mount namespace should return 200")
        .only_if(answered(201), "the mount answered 202, not 201")
        .run(async {
            let m = mounted.as_ref().ok_or_else(|| missing("the mount response"))?;
            let (loc, want) = (location(m)?, c.full_path(&blob(target, &fx.blob_a.digest)));
            if loc.path() != want {
                return Err(fail(m, format!("Location path {want}")));
            }
            let resp = c.send(c.req_url(Method::GET, loc)).await?;
            status(&resp, 200)?;
            body_is(&resp, &fx.blob_a.content, &fx.blob_a.digest, env.config.verify_content)
        })
        .await;
    rec.spec(MOUNT, "Cross-mounting of nonexistent blob should yield session id")
        .only_if(answered(202), "the mount answered 201, not 202")
        .run(async {
            let m = mounted.as_ref().ok_or_else(|| missing("the mount response"))?;
            let (loc, want) = (location(m)?, c.full_path(&uploads(target)));
            if !loc.path().starts_with(&want) {
                return Err(fail(m, format!("a Location under {want}")));
            }
            Ok(())
        })
        .await;
    let auto = env.config.automatic_crossmount;
    let mounted_201 = mounted.as_ref().is_some_and(|r| r.code() == 201);
    let cases = [
        (
            "Cross-mounting without from, and automatic content discovery enabled should return a 201",
            true,
            201,
        ),
        (
            "Cross-mounting without from, and automatic content discovery disabled should return a 202",
            false,
            202,
        ),
    ];
    for (title, enabled, want) in cases {
        rec.spec(MOUNT, title)
            .only_if(auto.is_some(), "automatic cross-mounting is not configured (OCI_AUTOMATIC_CROSSMOUNT)")
            .only_if(mounted_201, "the mount with from did not answer 201")
            .only_if(auto == Some(enabled), "automatic cross-mounting is configured the other way")
            .run(async { status(&c.send(mount_req(&fx.blob_a.digest, None)).await?, want) })
            .await;
    }
}

/// Returns whether the manifest without layers was accepted (and so needs deleting).
async fn manifests(env: &Env<'_>, rec: &mut Recorder) -> bool {
    let fx = env.fx;
    rec.spec(MANIFESTS, "GET nonexistent manifest should return 404")
        .run(async { status(&env.fetch_manifest(Method::GET, NONEXISTENT_MANIFEST).await?, 404) })
        .await;
    rec.spec(MANIFESTS, "PUT should accept a manifest upload")
        .run(async {
            for i in 0..4 {
                let resp = env.put_manifest(&format!("test{i}"), MANIFEST_TYPE, &fx.manifests[1]).await?;
                has_location(&resp)?;
                status(&resp, 201)?;
            }
            Ok(())
        })
        .await;
    let mut empty_pushed = false;
    rec.spec(MANIFESTS, "Registry should accept a manifest upload with no layers")
        .run_noting(async {
            let resp = env.put_manifest(EMPTY_LAYER_TAG, MANIFEST_TYPE, &fx.empty_layer_manifest).await?;
            if resp.code() != 201 {
                return Ok(Some(format!(
                    "image manifest with no layers is not supported (got {})",
                    resp.status
                )));
            }
            has_location(&resp)?;
            empty_pushed = true;
            Ok(None)
        })
        .await;
    rec.spec(MANIFESTS, "GET request to manifest URL (digest) should yield 200 response")
        .run(async {
            let m = &fx.manifests[1];
            let resp = env.fetch_manifest(Method::GET, &m.digest).await?;
            status(&resp, 200)?;
            body_is(&resp, &m.content, &m.digest, env.config.verify_content)
        })
        .await;
    empty_pushed
}

async fn teardown(env: &Env<'_>, rec: &mut Recorder, empty_pushed: bool) {
    let fx = env.fx;
    let delete_manifests = async || -> Check {
        deleted(&env.delete_manifest(&fx.manifests[1].digest).await?, &[])?;
        if empty_pushed {
            deleted(&env.delete_manifest(&fx.empty_layer_manifest.digest).await?, &[])?;
        }
        Ok(())
    };
    let before = env.config.delete_manifest_before_blobs;
    if before {
        rec.spec(TEARDOWN, "Delete manifest created in tests").run(delete_manifests()).await;
    }
    rec.spec(TEARDOWN, "Delete config blob created in tests")
        .run(async { deleted(&env.delete_blob(&fx.configs[1].digest).await?, &[404]) })
        .await;
    rec.spec(TEARDOWN, "Delete layer blob created in setup")
        .run(async { deleted(&env.delete_blob(&fx.layer.digest).await?, &[404]) })
        .await;
    if !before {
        rec.spec(TEARDOWN, "Delete manifest created in tests").run(delete_manifests()).await;
    }
}
