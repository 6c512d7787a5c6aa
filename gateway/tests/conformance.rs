//! The OCI distribution-spec conformance suite against docker-registry directly and through the
//! gateway in front of it: the gateway must pass every test the registry passes on its own.

mod common;

use common::*;
use starlight_conformance::oci::{OciConfig, run};
use starlight_conformance::servers::Registry;

#[tokio::test(flavor = "multi_thread")]
async fn gateway_passes_every_test_the_registry_passes() {
    let reg = Registry::start();
    let gw = Gateway::start(config(&format!("http://{}", reg.addr()))).await;

    let direct = run(&OciConfig { url: format!("http://{}", reg.addr()), ..OciConfig::default() }).await;
    let through = run(&OciConfig { url: gw.url(), ..OciConfig::default() }).await;
    println!("== OCI conformance, docker-registry directly ({})\n{}", reg.addr(), direct.table());
    println!("== OCI conformance, through starlight-gateway ({})\n{}", gw.addr, through.table());

    let direct_passed = direct.passed();
    assert!(direct_passed.len() > 50, "the direct run passed only {} tests", direct_passed.len());
    let through_passed = through.passed();
    let lost: Vec<_> = direct_passed.difference(&through_passed).collect();
    assert!(lost.is_empty(), "tests the registry passes but the gateway fails: {lost:#?}");
    assert_eq!(through.failed(), direct.failed(), "the gateway must fail exactly where the registry does");
    gw.stop().await;
}
