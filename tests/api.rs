//! The OCI distribution API over real HTTP, against berth and a real S3 server.

mod common;

use common::*;

#[test]
fn base_endpoint_and_banner() {
    let berth = Berth::start("");
    let c = client();
    let r = c.get(berth.url("/v2/")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.text().unwrap(), "{}");
    let banner = c.get(berth.url("/")).send().unwrap().text().unwrap();
    assert!(banner.starts_with("berth registry server "), "{banner}");
}
