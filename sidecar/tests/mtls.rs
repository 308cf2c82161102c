//! Mutual TLS: a partner that asks for a client certificate gets the one the integration names
//! (`upstream.clientCertificate`, a `kubernetes.io/tls` Secret laid out as `tls.crt` and
//! `tls.key`), whether the app calls `http://` or its own `https://` through `CONNECT`; the app
//! never holds the key, and `/config` and the log never show it.

mod support;

use std::time::Duration;

use support::{Options, Partner, Sidecar, TestCa, manifest, write_secret};
use tokio::net::TcpListener;
use tollgate_testkit::wait::eventually_async;

const SECRET: &str = "partner-mtls";

/// `mtls` presents the certificate of [`SECRET`]; `plain` calls the same partner (as
/// `127.0.0.1`) without one.
fn spec(port: u16) -> String {
    let mtls = manifest(
        "mtls",
        &format!(
            "upstream: {{url: 'https://localhost:{port}', clientCertificate: {{secretName: {SECRET}}}}}
retries: {{maxAttempts: 1}}"
        ),
    );
    let plain = manifest(
        "plain",
        &format!(
            "upstream: {{url: 'https://127.0.0.1:{port}', interception: false}}
retries: {{maxAttempts: 1}}"
        ),
    );
    format!("{mtls}---\n{plain}")
}

struct World {
    partner: Partner,
    port: u16,
    /// Signs the client certificates the partner accepts.
    clients: TestCa,
    _server_ca: tempfile::NamedTempFile,
    /// The sidecar's `--trust-dir`.
    trust: tempfile::TempDir,
    sidecar: Sidecar,
}

impl World {
    /// The sidecar starts with a client certificate signed by `signer`.
    async fn new(signer: Option<&TestCa>) -> World {
        let server = TestCa::new();
        let clients = TestCa::named("partner client CA");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let partner = Partner::start_on(listener, Some(server.mtls_server_config(&clients)));
        let server_ca = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(server_ca.path(), &server.ca_pem).unwrap();
        let leaf = signer.unwrap_or(&clients).issue(&["tollgate-client"]);
        let trust = tempfile::tempdir().unwrap();
        let sidecar = Sidecar::start_with(
            &spec(port),
            Options {
                secrets: vec![
                    (SECRET.into(), "tls.crt".into(), leaf.cert_pem.clone()),
                    (SECRET.into(), "tls.key".into(), leaf.key_pem.clone()),
                ],
                args: vec![
                    "--ca-bundle".into(),
                    server_ca.path().display().to_string(),
                    "--trust-dir".into(),
                    trust.path().display().to_string(),
                ],
                ..Options::default()
            },
        )
        .await;
        World {
            partner,
            port,
            clients,
            _server_ca: server_ca,
            trust,
            sidecar,
        }
    }

    /// Replaces the Secret's files, as the kubelet does when a Secret volume changes.
    fn rotate(&self, signer: &TestCa) -> String {
        let leaf = signer.issue(&["tollgate-client"]);
        let dir = self.sidecar.secrets_dir();
        write_secret(&dir, SECRET, "tls.key", &leaf.key_pem);
        write_secret(&dir, SECRET, "tls.crt", &leaf.cert_pem);
        leaf.key_pem
    }
}

/// The body of a PEM key, which must appear nowhere but in the Secret's file.
fn key_body(key_pem: &str) -> String {
    key_pem.lines().nth(1).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_presents_the_integrations_client_certificate_and_never_shows_the_key() {
    let w = World::new(None).await;

    let ok = w
        .sidecar
        .get(&format!("http://localhost:{}/charges", w.port))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(w.partner.count(), 1);

    // The same partner, from an integration without a certificate: the handshake fails.
    let refused = w
        .sidecar
        .get(&format!("http://127.0.0.1:{}/charges", w.port))
        .await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert_eq!(
        refused.headers.get("x-tollgate-reason").unwrap(),
        "upstream-unreachable"
    );
    assert_eq!(w.partner.count(), 1);

    let config = w.sidecar.config().await;
    let mtls = config["integrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"]["name"] == "mtls" || i["name"] == "mtls")
        .unwrap_or_else(|| panic!("{config}"));
    assert_eq!(
        mtls["upstream"]["clientCertificate"],
        serde_json::json!({"secretName": SECRET, "loaded": true})
    );
    let key =
        std::fs::read_to_string(w.sidecar.secrets_dir().join(SECRET).join("tls.key")).unwrap();
    assert!(!config.to_string().contains(&key_body(&key)));
    assert!(!w.sidecar.log_text().contains(&key_body(&key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_calling_https_through_connect_needs_no_certificate_of_its_own() {
    let w = World::new(None).await;
    // What the app is given: the system's roots and the pod CA.
    let bundle = w.trust.path().join("ca-bundle.crt");
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--proxy", &format!("http://{}", w.sidecar.listen)])
        .arg("--cacert")
        .arg(&bundle)
        .arg(format!("https://localhost:{}/charges", w.port))
        .output()
        .await
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(w.partner.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_presented_without_a_restart() {
    // Signed by a CA the partner does not accept: refused at the handshake.
    let stranger = TestCa::named("someone else");
    let w = World::new(Some(&stranger)).await;
    let url = format!("http://localhost:{}/charges", w.port);
    assert_eq!(w.sidecar.get(&url).await.status, 502);
    assert_eq!(w.partner.count(), 0);

    let key = w.rotate(&w.clients);
    eventually_async(
        "the rotated certificate is presented",
        Duration::from_secs(10),
        async || match w.sidecar.get(&url).await.status {
            200 => Ok(()),
            other => anyhow::bail!("{other}"),
        },
    )
    .await;
    assert!(!w.sidecar.log_text().contains(&key_body(&key)));
}
