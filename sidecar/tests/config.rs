//! Standalone config: reloads are whole and atomic; a file that does not parse keeps the
//! previous revision, an invalid integration keeps its previous version.

mod support;

use support::*;

#[tokio::test]
async fn an_edit_applies_without_restart() {
    let partner = Partner::start().await;
    let v1 = manifest(
        "partner",
        &format!("upstream: {{url: '{}'}}", partner.url()),
    );
    let sidecar = Sidecar::start(&v1).await;
    let first = sidecar.config().await["revision"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/v1/x", partner.url());
    assert_eq!(sidecar.get(&url).await.status, 200);

    let v2 = manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nrateLimit: {{limits: [{{name: tight, requests: 1, per: 1m}}]}}",
            partner.url()
        ),
    );
    sidecar.write_config(&v2);
    let c = sidecar
        .wait_config("the new revision", |c| c["revision"] != first.as_str())
        .await;
    assert_eq!(
        c["integrations"][0]["rateLimit"]["bands"][0]["name"],
        "tight"
    );
    assert_eq!(sidecar.get(&url).await.status, 200);
    assert_eq!(sidecar.get(&url).await.status, 429);
    let m = sidecar.metrics().await;
    let rev = c["revision"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "tollgate_config_revision_info{{revision=\"{rev}\",source=\"file\"}} 1"
        )),
        "{m}"
    );
}

async fn bad_edit_keeps_previous(bad: &str, expect_in_log: &str, unparsable: bool) {
    let partner = Partner::start().await;
    let good = manifest(
        "partner",
        &format!(
            "upstream: {{url: '{}'}}\nversioning: {{pinHeaders: {{X-Version: '1'}}}}",
            partner.url()
        ),
    );
    let sidecar = Sidecar::start(&good).await;
    let before = sidecar.config().await["revision"]
        .as_str()
        .unwrap()
        .to_string();
    sidecar.write_config(bad);
    sidecar
        .wait_metrics("the rejected edit counted", |m| {
            metric(m, "tollgate_config_errors_total", &[]) == 1.0
        })
        .await;
    let config = sidecar.config().await;
    if unparsable {
        assert_eq!(
            config["revision"],
            before.as_str(),
            "the previous revision stays in force"
        );
    } else {
        assert_eq!(
            config["refused"][0]["integration"], "test/partner",
            "{config}"
        );
        assert_eq!(config["refused"][0]["keptPrevious"], true, "{config}");
    }
    let resp = sidecar.get(&format!("{}/v1/x", partner.url())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        partner.seen()[0].headers["x-version"],
        "1",
        "still enforcing the previous revision"
    );
    let log = sidecar.log_text();
    assert!(
        log.contains(expect_in_log),
        "log should name {expect_in_log:?}:\n{log}"
    );
}

#[tokio::test]
async fn unparsable_yaml_keeps_the_previous_revision() {
    bad_edit_keeps_previous(
        "apiVersion: tollgate.dev/v1alpha1\nkind: PartnerIntegration\nmetadata: {name: [\n",
        "document 1",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_invalid_spec_keeps_the_previous_revision_and_names_the_field() {
    let bad = manifest(
        "partner",
        "upstream: {url: 'http://127.0.0.1:1'}\nretries: {backoff: {base: -5s}}",
    );
    bad_edit_keeps_previous(&bad, "spec.retries.backoff.base", false).await;
}

/// A schema that does not compile, and (standalone, where no ConfigMap is read) a schema from a
/// ConfigMap: the edit is refused naming the field, the previous revision stays.
#[tokio::test]
async fn a_schema_that_does_not_compile_keeps_the_previous_revision_and_names_the_field() {
    let bad = manifest(
        "partner",
        "upstream: {url: 'http://127.0.0.1:1'}\ncontract: {schema: {inline: '{\"type\": 12}'}}",
    );
    bad_edit_keeps_previous(&bad, "spec.contract.schema.inline", false).await;
    let from_map = manifest(
        "partner",
        "upstream: {url: 'http://127.0.0.1:1'}\ncontract: {schema: {configMapName: orders, key: order.json}}",
    );
    bad_edit_keeps_previous(&from_map, "spec.contract.schema.configMapName", false).await;
}

#[tokio::test]
async fn the_first_config_must_be_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, manifest("p", "upstream: {url: 'ftp://x'}")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.upstream.url"), "{err}");
}

#[tokio::test]
async fn a_labels_file_that_does_not_read_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("labels");
    // A sidecar that accepted the flag would run on: give it a bound and kill it after.
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--operator", "https://127.0.0.1:1"])
        .args(["--pod-name", "app-0", "--pod-namespace", "payments"])
        .arg("--state-file")
        .arg(dir.path().join("snapshot.json"))
        .arg("--labels-file")
        .arg(&missing)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the sidecar exits at once")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--labels-file") && err.contains(&missing.display().to_string()),
        "{err}"
    );
}
