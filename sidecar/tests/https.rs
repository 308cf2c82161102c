//! HTTPS interception for real: an app that knows only `SSL_CERT_FILE` (curl, Python's
//! urllib) calls `https://partner.test` from a network namespace whose iptables rules redirect
//! it to the sidecar, or through `CONNECT` with `HTTPS_PROXY`; the sidecar terminates TLS with a
//! leaf from its own CA, applies every policy, and calls the partner (a TLS server with a test
//! CA the sidecar trusts through `--ca-bundle`). Needs root (see `support/netns.rs`).

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::path::{Path, PathBuf};

use netns::*;
use support::{Partner, Reply, manifest, metric, tunnels};

const SECRET: &[(&str, &str, &str)] = &[("partner-api", "apiKey", "sk_test_123")];
/// Where the partner with a certificate nobody trusts listens (echo.test's address).
const UNTRUSTED_PORT: u16 = 8443;
/// The quota per minute.
const QUOTA: u32 = 4;

/// `partner.test` over https, with a credential, a pinned header, one retry on 503 and a
/// quota of [`QUOTA`] attempts a minute; `echo.test` is a partner whose certificate fails
/// verification.
fn spec(kill: bool) -> String {
    let partner = manifest(
        "partner",
        &format!(
            "upstream: {{url: 'https://partner.test'}}
killSwitch: {{enabled: {kill}, reason: drill}}
retries: {{maxAttempts: 2, backoff: {{base: 1ms, max: 2ms}}, retryOn: ['503'], budget: {{percent: 100, minPerSecond: 100}}}}
rateLimit: {{scope: perPod, limits: [{{name: minute, requests: {QUOTA}, per: 1m}}]}}
versioning: {{pinHeaders: {{X-Api-Version: '2024-06-20'}}}}
credentials: {{secretRef: {{name: partner-api, key: apiKey}}, header: Authorization, format: 'Bearer {{value}}'}}"
        ),
    );
    let untrusted = manifest(
        "untrusted",
        &format!(
            "upstream: {{url: 'https://echo.test:{UNTRUSTED_PORT}', hosts: [echo.test], connectTimeout: 2s}}"
        ),
    );
    format!("{partner}---\n{untrusted}")
}

struct World {
    partner: Partner,
    other: Partner,
    _untrusted: Partner,
    pki: Pki,
    trust: tempfile::TempDir,
    pair: Pair,
}

impl World {
    async fn new() -> World {
        let pair = pair();
        pair.setup_iptables(&[
            "--listener-port",
            &TRANSPARENT_PORT.to_string(),
            "--proxy-uid",
            &PROXY_UID.to_string(),
        ]);
        let pki = Pki::new();
        let ns = &pair.partner;
        let partner = Partner::start_on(
            ns.listen(&format!("{PARTNER_IP}:443")).await,
            Some(pki.server("partner.test")),
        );
        let other = Partner::start_on(
            ns.listen(&format!("{OTHER_IP}:443")).await,
            Some(pki.server("other.test")),
        );
        // Signed by a CA the sidecar does not trust.
        let untrusted = Partner::start_on(
            ns.listen(&format!("{ECHO_IP}:{UNTRUSTED_PORT}")).await,
            Some(Pki::new().server("echo.test")),
        );
        // Writable by the proxy UID, readable by the app.
        let trust = tempfile::tempdir().unwrap();
        sh(
            "chown",
            &[&PROXY_UID.to_string(), trust.path().to_str().unwrap()],
        );
        sh("chmod", &["0755", trust.path().to_str().unwrap()]);
        World {
            partner,
            other,
            _untrusted: untrusted,
            pki,
            trust,
            pair,
        }
    }

    async fn sidecar(&self, extra: &[&str]) -> NsSidecar {
        let mut args = vec![
            "--ca-bundle",
            self.pki.ca_file.to_str().unwrap(),
            "--trust-dir",
            self.trust.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        NsSidecar::start(&self.pair.app, &spec(false), SECRET, &args).await
    }

    /// What the app is given: the bundle of system roots and the pod CA.
    fn bundle(&self) -> String {
        self.trust
            .path()
            .join("ca-bundle.crt")
            .display()
            .to_string()
    }
}

/// Python's standard library client, as an app would use it: status line, then the body.
async fn python_get(ns: &Netns, env: &[(&str, &str)], url: &str) -> (u16, String, String) {
    const CODE: &str = "
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=15)
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
";
    let out = app_run(ns, env, "/usr/bin/python3", &["-c", CODE, url]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    (
        code.trim().parse().unwrap_or(0),
        body.trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn set_kill_switch(sidecar: &NsSidecar, on: bool) {
    sidecar.write_config(&spec(on));
    sidecar
        .wait_config("the kill switch flip", |c| {
            c["integrations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["defaultRoute"]["killSwitch"]["enabled"] == on)
        })
        .await;
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Every policy, for an app that only trusts what `SSL_CERT_FILE` names; `env` says how the
/// app reaches the partner (nothing: redirected by iptables; `HTTPS_PROXY`: `CONNECT`).
/// The app's connections (one per call).
async fn every_policy_applies_inside_the_apps_tls(
    w: &World,
    sidecar: &NsSidecar,
    env: &[(&str, &str)],
) -> usize {
    let bundle = w.bundle();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("SSL_CERT_FILE", &bundle));
    let app = &w.pair.app;
    let log = || sidecar.log_text();

    // Python's urllib, then curl: the partner gets the credential and the pinned header.
    let (status, body, stderr) = python_get(app, &env, "https://partner.test/v1/charges").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "python: {stderr}\nsidecar log:\n{}",
        log()
    );
    let r = curl_env(app, &env, &["https://partner.test/v1/charges?id=7"]).await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", log());
    assert_eq!(r.body, "ok");
    let seen = w.partner.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].path, "/v1/charges?id=7");
    for s in &seen {
        assert_eq!(
            s.headers["authorization"], "Bearer sk_test_123",
            "injected credential"
        );
        assert_eq!(s.headers["x-api-version"], "2024-06-20", "pinned header");
    }

    // A 503 from the partner is retried.
    w.partner.queue([Reply::Status(503)]);
    let r = curl_env(app, &env, &["https://partner.test/v1/charges"]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "ok"),
        "{r:?}\nsidecar log:\n{}",
        log()
    );
    assert_eq!(w.partner.count(), 4, "one call, two attempts");

    // The quota runs out within a few calls: then 429 with the contract's JSON, inside TLS.
    let mut calls = 3;
    let limited = loop {
        let before = w.partner.count();
        let r = curl_env(app, &env, &["https://partner.test/v1/charges"]).await;
        calls += 1;
        assert_eq!(r.exit, 0, "an HTTP answer, not a TLS failure: {r:?}");
        if r.status == 429 {
            assert_eq!(w.partner.count(), before, "nothing sent");
            break r;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(calls <= QUOTA as usize + 3, "the quota never ran out");
    };
    assert_eq!(
        limited.header("x-tollgate-reason").as_deref(),
        Some("rate-limited")
    );
    assert!(limited.header("retry-after").is_some(), "{limited:?}");
    let body = json(&limited.body);
    assert_eq!(body["error"]["reason"], "rate-limited");
    assert_eq!(body["error"]["integration"], "test/partner");
    let sent = w.partner.count();

    // The kill switch: 503 with the contract's JSON, inside TLS, to both clients.
    set_kill_switch(sidecar, true).await;
    let r = curl_env(app, &env, &["https://partner.test/v1/charges"]).await;
    assert_eq!(r.exit, 0, "an HTTP answer, not a TLS alert: {r:?}");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.header("x-tollgate-reason").as_deref(),
        Some("kill-switch")
    );
    let body = json(&r.body);
    assert_eq!(body["error"]["reason"], "kill-switch");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("drill"),
        "{body}"
    );
    let (status, body, stderr) = python_get(app, &env, "https://partner.test/v1/charges").await;
    assert_eq!(status, 503, "python: {body} {stderr}");
    assert_eq!(json(&body)["error"]["reason"], "kill-switch");
    assert_eq!(
        w.partner.count(),
        sent,
        "the kill switch lets nothing through"
    );
    calls + 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_https_to_a_partner_meets_every_policy() {
    let w = World::new().await;
    let sidecar = w.sidecar(&[]).await;
    let calls = every_policy_applies_inside_the_apps_tls(&w, &sidecar, &[]).await;
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_tls_interception_active", &[]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_intercepted_connections_total",
            &[("protocol", "tls"), ("outcome", "intercept")]
        ),
        calls as f64,
        "every app connection was intercepted\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_connect_meets_every_policy() {
    let w = World::new().await;
    let sidecar = w.sidecar(&[]).await;
    let proxy = format!("http://{}", sidecar.listen);
    let calls = every_policy_applies_inside_the_apps_tls(
        &w,
        &sidecar,
        &[("HTTPS_PROXY", &proxy), ("https_proxy", &proxy)],
    )
    .await;
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "intercepted"), calls as f64, "{m}");
    assert_eq!(
        metric(&m, "tollgate_intercepted_connections_total", &[]),
        0.0,
        "nothing went through the transparent listener\n{m}"
    );
}

/// curl's verbose output says which certificate the server presented.
fn issuer(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("*  issuer:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_https_hosts_are_spliced_with_their_own_certificate() {
    let w = World::new().await;
    let sidecar = w.sidecar(&[]).await;
    let ca = w.pki.ca_file.display().to_string();
    let proxy = format!("http://{}", sidecar.listen);
    for env in [vec![], vec![("HTTPS_PROXY", proxy.as_str())]] {
        let r = curl_env(
            &w.pair.app,
            &env,
            &["-v", "--cacert", &ca, "https://other.test/x"],
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
        assert_eq!(
            issuer(&r.stderr),
            "CN=tollgate interception test CA",
            "other.test's own certificate: {}",
            r.stderr
        );
    }
    let seen = w.other.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.headers.get("authorization").is_none()),
        "untouched: no credential, no pinned header: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.headers.get("x-api-version").is_none())
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tollgate_intercepted_connections_total",
            &[("protocol", "tls"), ("outcome", "splice")]
        ),
        1.0,
        "{m}"
    );
}

/// What `openssl s_client` got from the transparent listener for `name`.
async fn s_client(w: &World, ip: &str, name: &str) -> String {
    let connect = format!("{ip}:443");
    let out = app_run(
        &w.pair.app,
        &[],
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect,
            "-servername",
            name,
            "-showcerts",
        ],
    )
    .await;
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_name_never_gets_a_certificate_from_the_pod_ca() {
    let w = World::new().await;
    let sidecar = w.sidecar(&[]).await;
    let pod_ca = std::fs::read_to_string(w.trust.path().join("ca.crt")).unwrap();
    assert!(pod_ca.contains("BEGIN CERTIFICATE"));
    let bundle = std::fs::read_to_string(w.bundle()).unwrap();
    assert!(bundle.ends_with(&pod_ca), "the bundle ends with the pod CA");
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 1,
        "and holds the system roots"
    );

    // A declared name does get one (the check below can fail).
    let declared = s_client(&w, PARTNER_IP, "partner.test").await;
    assert!(declared.contains("tollgate pod CA"), "{declared}");
    for (ip, name) in [
        (PARTNER_IP, "undeclared.test"),
        (OTHER_IP, "other.test"),
        (PARTNER_IP, "partner.test.evil"),
    ] {
        let out = s_client(&w, ip, name).await;
        assert!(!out.contains("tollgate pod CA"), "{name} at {ip}:\n{out}");
        assert!(
            out.contains("tollgate interception test CA"),
            "spliced to the server itself: {out}"
        );
    }
    drop(sidecar);
    let deny = w.sidecar(&["--unknown-hosts", "deny"]).await;
    let out = s_client(&w, PARTNER_IP, "undeclared.test").await;
    assert!(
        !out.contains("BEGIN CERTIFICATE"),
        "refused, no certificate at all: {out}"
    );

    // No private key on disk: not in the trust directory, not beside the config.
    for dir in [w.trust.path(), deny.dir()] {
        // The sidecar's binary (a copy beside the config) names key formats in its code.
        for f in files(dir)
            .into_iter()
            .filter(|f| !f.ends_with("tollgate-sidecar"))
        {
            let bytes = std::fs::read(&f).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("PRIVATE KEY"),
                "{} holds a private key",
                f.display()
            );
        }
    }
    let log = deny.log_text();
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("BEGIN"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_certificate_that_fails_verification_is_a_502_naming_the_reason() {
    let w = World::new().await;
    let sidecar = w.sidecar(&[]).await;
    let bundle = w.bundle();
    let proxy = format!("http://{}", sidecar.listen);
    for env in [
        vec![("SSL_CERT_FILE", bundle.as_str())],
        vec![
            ("SSL_CERT_FILE", bundle.as_str()),
            ("HTTPS_PROXY", proxy.as_str()),
        ],
    ] {
        let r = curl_env(&w.pair.app, &env, &["https://echo.test/v1/x"]).await;
        assert_eq!(r.status, 502, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
        let body = json(&r.body);
        assert_eq!(body["error"]["reason"], "upstream-unreachable");
        assert_eq!(body["error"]["integration"], "test/untrusted");
        let msg = body["error"]["message"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase();
        // Signed by another CA of the same name: the signature does not verify.
        assert!(
            msg.contains("invalid peer certificate: badsignature"),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_opts_out_gets_partner_tls_spliced() {
    let w = World::new().await;
    let sidecar = w.sidecar(&["--tls-interception", "off"]).await;
    let ca = w.pki.ca_file.display().to_string();
    let r = curl_env(
        &w.pair.app,
        &[],
        &["-v", "--cacert", &ca, "https://partner.test/v1/x"],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(issuer(&r.stderr), "CN=tollgate interception test CA");
    let seen = w.partner.seen();
    assert!(
        seen[0].headers.get("authorization").is_none(),
        "spliced: the sidecar could not add the credential"
    );
    assert!(!w.trust.path().join("ca.crt").exists(), "no pod CA");
    assert!(
        w.trust.path().join("ca-bundle.crt").exists(),
        "the system roots still"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_tls_interception_active", &[]),
        0.0,
        "{m}"
    );
    assert_eq!(tunnels(&m, "established"), 1.0, "{m}");
}

// === a start whose pod CA cannot be trusted falls back to splicing ===

/// curl as an app behind `HTTPS_PROXY` on loopback: `CONNECT` through the sidecar, trusting
/// only `cacert`. Returns the status (0 when the call failed), the body and curl's `-v` log.
async fn curl_through_connect(
    sidecar: &support::Sidecar,
    cacert: &Path,
    url: &str,
) -> (u16, String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-v", "--max-time", "10", "--proxy"])
        .arg(format!("http://{}", sidecar.listen))
        .arg("--cacert")
        .arg(cacert)
        .args(["-w", "\n%{http_code}", url])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (
        code.trim().parse().unwrap_or(0),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_trust_dir_falls_back_to_splicing_and_says_so() {
    let ca = support::TestCa::new();
    let partner = Partner::start_tls(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("partner-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    // Under a regular file no directory can be made, whoever runs the sidecar (root included).
    let not_a_dir = dir.path().join("not-a-dir");
    std::fs::write(&not_a_dir, "").unwrap();
    let trust = not_a_dir.join("trust");
    let https = format!("https://{}", partner.addr);
    let config = manifest("partner", &format!("upstream: {{url: '{https}'}}"));
    let sidecar = support::Sidecar::start_with(
        &config,
        support::Options {
            args: trust_args(&ca_file, &trust),
            ..Default::default()
        },
    )
    .await;

    let log = sidecar.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("TLS interception is off for this start"))
        .unwrap_or_else(|| panic!("no fallback line in the log:\n{log}"));
    assert!(
        line.contains("--trust-dir") && line.contains("Not a directory"),
        "{line}"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_tls_interception_fallback", &[]),
        1.0,
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.trim() == "tollgate_tls_interception_active 0"),
        "{m}"
    );
    let ready = sidecar.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready
            .body
            .contains("TLS interception off for this start (partner TLS is spliced): --trust-dir"),
        "{}",
        ready.body
    );

    // The app's HTTPS to the partner still works, spliced: it meets the partner's own
    // certificate, and the sidecar could not have seen the request.
    let (code, body, stderr) =
        curl_through_connect(&sidecar, &ca_file, &format!("{https}/v1/x")).await;
    assert_eq!(code, 200, "{stderr}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(body, "ok");
    assert!(
        stderr.contains("issuer: CN=tollgate test CA"),
        "the partner's own certificate: {stderr}"
    );
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "established"), 1.0, "{m}");
    assert_eq!(partner.count(), 1);
}

// === a partner's own CA in the spec ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_ca_bundle_is_trusted_for_that_integration_only() {
    let ca = support::TestCa::new();
    let partner = Partner::start_tls(&ca).await;
    let https = format!("https://{}", partner.addr);
    let indented: String = ca.ca_pem.lines().map(|l| format!("    {l}\n")).collect();
    // Two integrations for the same partner; only the first carries the partner's CA.
    let config = format!(
        "{}---\n{}",
        manifest(
            "trusting",
            &format!(
                "upstream:\n  url: '{https}'\n  hosts: [trusting.test]\n  caBundle: |\n{indented}"
            ),
        ),
        manifest(
            "plain",
            &format!("upstream: {{url: '{https}', hosts: [plain.test]}}"),
        ),
    );
    let sidecar = support::Sidecar::start(&config).await;

    let r = sidecar.get("http://trusting.test/v1/x").await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(r.body, "ok");
    assert_eq!(partner.count(), 1);

    let r = sidecar.get("http://plain.test/v1/x").await;
    assert_eq!(r.status, 502, "{r:?}");
    let body = json(&r.body);
    assert_eq!(body["error"]["reason"], "upstream-unreachable");
    assert_eq!(body["error"]["integration"], "test/plain");
    let msg = body["error"]["message"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(msg.contains("unknownissuer"), "{msg}");
    assert_eq!(partner.count(), 1, "the untrusted partner got nothing");
}

// === Java trusts the pod CA through the PKCS#12 trust store ===

/// A Java HTTPS client as an app would write it (`HttpsURLConnection`, `HTTPS_PROXY`-style
/// proxy properties), run from source; prints the status, then the body.
const JAVA_CLIENT: &str = r#"
public class Client {
    public static void main(String[] args) throws Exception {
        var c = (javax.net.ssl.HttpsURLConnection) new java.net.URL(args[0]).openConnection();
        System.out.println(c.getResponseCode());
        System.out.println(new String(c.getInputStream().readAllBytes()));
    }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_app_trusts_the_pod_ca_through_the_pkcs12_trust_store() {
    let ca = support::TestCa::new();
    let partner = Partner::start_tls(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("partner-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let trust = dir.path().join("trust");
    let config = manifest(
        "partner",
        &format!(
            "upstream: {{url: 'https://{}', hosts: [java.test]}}
credentials: {{secretRef: {{name: partner-api, key: apiKey}}, header: Authorization, format: 'Bearer {{value}}'}}",
            partner.addr
        ),
    );
    let sidecar = support::Sidecar::start_with(
        &config,
        support::Options {
            secrets: SECRET
                .iter()
                .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
                .collect(),
            args: trust_args(&ca_file, &trust),
            ..Default::default()
        },
    )
    .await;
    let store = trust.join("ca-bundle.p12");
    let source = dir.path().join("Client.java");
    std::fs::write(&source, JAVA_CLIENT).unwrap();
    // What the injector sets: the trust store through JAVA_TOOL_OPTIONS, no password.
    let options = format!(
        "-Djavax.net.ssl.trustStore={} -Djavax.net.ssl.trustStoreType=PKCS12",
        store.display()
    );
    let out = tokio::process::Command::new("java")
        .arg(format!("-Dhttps.proxyHost={}", sidecar.listen.ip()))
        .arg(format!("-Dhttps.proxyPort={}", sidecar.listen.port()))
        .arg(&source)
        .arg("https://java.test/v1/x")
        .env("JAVA_TOOL_OPTIONS", &options)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("java runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stdout.lines().next(),
        Some("200"),
        "stdout: {stdout}\nstderr: {stderr}\nsidecar log:\n{}",
        sidecar.log_text()
    );
    assert_eq!(stdout.lines().nth(1), Some("ok"));
    let seen = partner.seen();
    assert_eq!(
        seen[0].headers.get("authorization").unwrap(),
        "Bearer sk_test_123",
        "intercepted: the sidecar added the credential inside the app's TLS"
    );

    // keytool sees trusted certificates only: the pod CA among the system roots, no key entry.
    let list = std::process::Command::new("keytool")
        .args([
            "-list",
            "-storetype",
            "PKCS12",
            "-storepass",
            "unused",
            "-keystore",
        ])
        .arg(&store)
        .output()
        .expect("keytool runs");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("tollgate-pod-ca,") && l.contains("trustedCertEntry")),
        "{list}"
    );
    assert!(!list.contains("PrivateKeyEntry"), "{list}");
}

/// The sidecar's arguments to trust the partner's CA (`ca_file`) and write the pod's trust
/// files under `trust`.
fn trust_args(ca_file: &Path, trust: &Path) -> Vec<String> {
    vec![
        "--ca-bundle".into(),
        ca_file.display().to_string(),
        "--trust-dir".into(),
        trust.display().to_string(),
    ]
}
