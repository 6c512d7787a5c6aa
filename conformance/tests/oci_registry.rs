//! The OCI conformance suite against Distribution 2.8 (`docker-registry`) on loopback: every test
//! passes except the known gaps listed below, and the basic-auth path works.

use std::collections::BTreeSet;

use starlight_conformance::oci::{self, OciConfig, Outcome, Workflows};
use starlight_conformance::servers::Registry;

/// Tests Distribution 2.8 fails, each with the reason (found by running this suite; the
/// official one sends the same requests). They must all fail, so that a registry upgrade that
/// fixes one shows up here, and nothing else may.
const KNOWN_GAPS: &[&str] = &[
    // 2.8 takes `sha256:totallywrong` for a tag, its filesystem driver rejects the path, and the
    // answer is 500 UNKNOWN instead of 400 or 404.
    "Pull/Error codes/400 response body should contain OCI-conforming JSON message",
    // 2.8 ignores where `Content-Range` starts: the second chunk sent first is stored at offset 0
    // and answered 202 (Range 0-19), not 416.
    "Push/Blob Upload Chunked/Out-of-order blob upload should return 416",
    // 2.8's upload URLs carry a `_state` token that pins the offset. Replaying the session's
    // first URL after a chunk was written is refused as 404 BLOB_UPLOAD_INVALID, both for the
    // retried chunk (416 expected) and for the status GET (204 with the range expected).
    "Push/Blob Upload Chunked/Retry previous blob chunk should return 416",
    "Push/Blob Upload Chunked/Get on stale blob upload should return 204 with a range and location",
    // 2.8 has no tag pagination: `n` and `last` are ignored and every tag comes back.
    "Content Discovery/Test content discovery endpoints (listing tags)/GET number of tags should be limitable by `n` query parameter",
    "Content Discovery/Test content discovery endpoints (listing tags)/GET start of tag is set by `last` query parameter",
    // 2.8 predates the referrers API: it stores manifests with `subject` but never answers with
    // `OCI-Subject`, so the setup stops at the first referrer, as the official suite's does.
    "Content Discovery/Setup/References setup",
    // 2.8 has no `/v2/<name>/referrers/<digest>` route: every referrers request gets 404.
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to nonexistent blob should result in empty 200 response",
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to existing blob should yield 200",
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to existing blob with filter should yield 200",
    "Content Discovery/Test content discovery endpoints (listing references)/GET request to missing manifest should yield 200",
    // 2.8 parses the reference of a manifest DELETE as a digest: deleting a tag is 400
    // DIGEST_INVALID, where the spec wants 202, or 400 UNSUPPORTED / 405 if tags cannot be deleted.
    "Content Management/Manifest delete/DELETE request to manifest tag should return 202, unless tag deletion is disallowed (400/405)",
];

/// Gaps that depend on the filesystem under the registry: 2.8 lists tags in directory order.
/// On ext4 (hashed directories) that is unsorted; filesystems that return creation order happen
/// to yield test0, TEST0, test1, … which is sorted case-insensitively, and the test passes.
const MAY_FAIL: &[&str] = &[
    "Content Discovery/Test content discovery endpoints (listing tags)/GET request to list tags should yield 200 response and be in sorted order",
];

/// Skipped by design: the two "no push" setups run only with existing content configured; the
/// mount answers 201, which skips the test for a 202; automatic cross-mounting is only tested
/// when configured either way.
const EXPECTED_SKIPS: &[&str] = &[
    "Pull/Setup/Get tag name from environment",
    "Push/Cross-Repository Blob Mount/Cross-mounting of nonexistent blob should yield session id",
    "Push/Cross-Repository Blob Mount/Cross-mounting without from, and automatic content discovery enabled should return a 201",
    "Push/Cross-Repository Blob Mount/Cross-mounting without from, and automatic content discovery disabled should return a 202",
    "Content Discovery/Setup/Populate registry with test tags (no push)",
];

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Every test passed, is a known gap, or was skipped as expected.
fn assert_only_known_gaps(report: &oci::Report) {
    let (failed, known) = (report.failed(), set(KNOWN_GAPS));
    let unexpected: Vec<_> = failed.difference(&known).filter(|n| !MAY_FAIL.contains(&n.as_str())).collect();
    let fixed: Vec<_> = known.iter().filter(|n| !failed.contains(*n)).collect();
    assert!(unexpected.is_empty(), "unexpected failures (see the table above): {unexpected:#?}");
    assert!(fixed.is_empty(), "known gaps that now pass; update KNOWN_GAPS: {fixed:#?}");
    assert_eq!(report.skipped(), set(EXPECTED_SKIPS), "skips differ from the expected ones");
    let totals = report.totals();
    assert_eq!(totals.passed + totals.failed + totals.skipped, report.results.len());
    assert!(totals.passed >= 60, "only {} tests passed", totals.passed);
    for workflow in ["Pull/", "Push/", "Content Discovery/", "Content Management/"] {
        assert!(report.passed().iter().any(|n| n.starts_with(workflow)), "nothing in {workflow} passed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribution_passes_all_but_the_known_gaps() {
    let registry = Registry::start();
    let config = OciConfig { url: format!("http://{}", registry.addr()), ..OciConfig::default() };
    let report = oci::run(&config).await;
    eprintln!("{}", report.table());
    assert_only_known_gaps(&report);
}

/// `OCI_DELETE_MANIFEST_BEFORE_BLOBS=0` only reorders the teardowns: same names, same results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_deleted_before_manifests_change_only_the_order() {
    let registry = Registry::start();
    let url = format!("http://{}", registry.addr());
    let config = OciConfig { url, delete_manifest_before_blobs: false, ..OciConfig::default() };
    let report = oci::run(&config).await;
    assert_only_known_gaps(&report);
    let names = |r: &oci::Report| r.results.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    let default_order = names(&oci::run(&OciConfig { delete_manifest_before_blobs: true, ..config }).await);
    let reordered = names(&report);
    assert_ne!(reordered, default_order);
    let (mut a, mut b) = (reordered, default_order);
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let teardown: Vec<_> = report.results.iter().filter(|r| r.name.starts_with("Pull/Teardown/")).collect();
    assert_eq!(
        teardown.first().map(|r| r.name.as_str()),
        Some("Pull/Teardown/Delete config[0] blob created in setup")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_is_answered_and_wrong_passwords_fail() {
    let registry = Registry::start_with_htpasswd("conformance", "s3cret");
    let pull_only = Workflows { pull: true, ..Workflows::none() };
    let config = OciConfig {
        url: format!("http://{}", registry.addr()),
        username: Some("conformance".into()),
        password: Some("s3cret".into()),
        workflows: pull_only,
        ..OciConfig::default()
    };
    let report = oci::run(&config).await;
    eprintln!("{}", report.table());
    let pull_gaps: BTreeSet<String> =
        set(KNOWN_GAPS).into_iter().filter(|n| n.starts_with("Pull/")).collect();
    assert_eq!(report.failed(), pull_gaps, "pull with the right password:\n{}", report.table());
    assert!(report.passed().len() >= 15, "too few pull tests passed:\n{}", report.table());

    let wrong = OciConfig { password: Some("wrong".into()), ..config };
    let report = oci::run(&wrong).await;
    let first = &report.results[0];
    assert!(
        matches!(&first.outcome, Outcome::Fail(why) if why.contains("401")),
        "a wrong password should fail the setup with 401, got {first:?}"
    );
}

#[tokio::test]
async fn an_unreachable_registry_fails_every_enabled_test_and_skips_the_rest() {
    let config = OciConfig {
        url: format!("http://127.0.0.1:{}", starlight_conformance::servers::free_port()),
        workflows: Workflows { management: true, ..Workflows::none() },
        timeout: std::time::Duration::from_secs(5),
        ..OciConfig::default()
    };
    let report = oci::run(&config).await;
    for r in &report.results {
        let management = r.name.starts_with("Content Management/");
        match &r.outcome {
            Outcome::Fail(why) => assert!(management && why.contains("request failed"), "{r:?}"),
            Outcome::Skip(why) => assert!(!management && why.contains("not enabled"), "{r:?}"),
            Outcome::Pass => panic!("nothing can pass without a registry: {r:?}"),
        }
    }
    assert!(!report.success());
}
