//! Partner lifecycle signals: the partner's `Deprecation` and `Sunset` headers show on
//! /metrics per integration and route; hostile values show nothing and break nothing.

mod support;

use support::*;

fn reply(headers: &[(&str, &str)]) -> Reply {
    Reply::with(200, headers, "ok")
}

#[tokio::test]
async fn deprecation_and_sunset_show_per_route_on_metrics() {
    let partner = Partner::start().await;
    let spec = manifest(
        "payments",
        &format!(
            "upstream: {{url: '{}'}}\nroutes:\n- name: tracking\n  match: {{pathPrefix: /v1/tracking}}\n- name: charges\n  match: {{pathPrefix: /v1/charges}}",
            partner.url()
        ),
    );
    let sidecar = Sidecar::start(&spec).await;
    let labels = |route| [("integration", "test/payments"), ("route", route)];

    // Nothing announced yet: no lifecycle series at all.
    assert_eq!(sidecar.status_of(&partner, "/v1/tracking/1").await, 200);
    let m = sidecar.metrics().await;
    assert!(!m.contains("tollgate_partner_deprecated{"), "{m}");
    assert!(
        !m.contains("tollgate_partner_sunset_timestamp_seconds{"),
        "{m}"
    );

    // RFC 9745 date, RFC 8594 Sunset and the links; the app gets the headers unchanged.
    partner.queue([reply(&[
        ("Deprecation", "@1688169599"),
        ("Sunset", "Sat, 31 Dec 2050 23:59:59 GMT"),
        (
            "Link",
            "<https://partner.example/deprecation>; rel=\"deprecation\"; type=\"text/html\"",
        ),
    ])]);
    let resp = sidecar
        .get(&format!("{}/v1/tracking/2", partner.url()))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("deprecation"), Some("@1688169599"));
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_partner_deprecated", &labels("tracking")),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_partner_deprecation_timestamp_seconds",
            &labels("tracking")
        ),
        1_688_169_599.0
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_partner_sunset_timestamp_seconds",
            &labels("tracking")
        ),
        2_556_143_999.0
    );
    // Only the route that was answered so.
    assert_eq!(
        metric(&m, "tollgate_partner_deprecated", &labels("charges")),
        0.0
    );

    // A response without the headers changes nothing: the announcement stays.
    sidecar
        .get(&format!("{}/v1/tracking/3", partner.url()))
        .await;
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_partner_deprecated", &labels("tracking")),
        1.0
    );

    // The older `true` form: deprecated, no date; hostile Sunset values are ignored.
    partner.queue([reply(&[
        ("Deprecation", "true"),
        ("Sunset", "next tuesday, probably"),
    ])]);
    sidecar.get(&format!("{}/v1/charges", partner.url())).await;
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_partner_deprecated", &labels("charges")),
        1.0
    );
    assert!(
        !m.lines().any(
            |l| l.starts_with("tollgate_partner_deprecation_timestamp_seconds{")
                && l.contains("route=\"charges\"")
        ),
        "{m}"
    );
    assert!(
        !m.lines().any(
            |l| l.starts_with("tollgate_partner_sunset_timestamp_seconds{")
                && l.contains("route=\"charges\"")
        ),
        "{m}"
    );
}

#[tokio::test]
async fn hostile_lifecycle_headers_show_nothing() {
    let partner = Partner::start().await;
    let spec = manifest(
        "payments",
        &format!("upstream: {{url: '{}'}}", partner.url()),
    );
    let sidecar = Sidecar::start(&spec).await;
    let long = format!("@{}", "9".repeat(4000));
    let link = format!("<{}>; rel=deprecation", "a".repeat(6000));
    partner.queue([reply(&[
        ("Deprecation", &long),
        ("Sunset", "Sat, 31 Dec 99999 23:59:59 GMT"),
        ("Link", &link),
    ])]);
    assert_eq!(sidecar.status_of(&partner, "/x").await, 200);
    partner.queue([reply(&[
        ("Deprecation", "@99999999999999999999"),
        ("Sunset", ""),
    ])]);
    assert_eq!(sidecar.status_of(&partner, "/y").await, 200);
    let m = sidecar.metrics().await;
    assert!(!m.contains("tollgate_partner_deprecated{"), "{m}");
    assert!(
        !m.contains("tollgate_partner_sunset_timestamp_seconds{"),
        "{m}"
    );
    // Still serving.
    assert_eq!(sidecar.status_of(&partner, "/z").await, 200);
}
