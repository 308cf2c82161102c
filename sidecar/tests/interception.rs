//! Transparent interception for real: iptables rules installed by `setup-iptables` in a
//! network namespace redirect an unconfigured app's outbound TCP to the sidecar, which runs in
//! that namespace as the proxy UID; partners and other servers live in a second namespace
//! across a veth pair (see `support/netns.rs`). Needs root; installs iproute2, iptables, curl
//! and util-linux with apt-get when they are missing.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::net::SocketAddr;

use netns::*;
use support::otlp::Receiver;
use support::{Partner, manifest, metric, tunnels};

const SECRET: &[(&str, &str, &str)] = &[("partner-api", "apiKey", "sk_test_123")];

/// One partner, `partner.test`, reached over plain HTTP by the sidecar (another namespace, not
/// loopback: the credential needs `allowInsecure`); its TLS side is the same host on 443.
fn partner_spec(kill: bool) -> String {
    manifest(
        "partner",
        &format!(
            "upstream: {{url: 'http://partner.test'}}
killSwitch: {{enabled: {kill}, reason: drill}}
retries: {{maxAttempts: 1}}
credentials: {{secretRef: {{name: partner-api, key: apiKey}}, header: Authorization, format: 'Bearer {{value}}', allowInsecure: true}}"
        ),
    )
}

/// The namespaces, the rules, and every server in the partner namespace.
struct World {
    partner: Partner,
    partner_tls: Partner,
    origin: Origin,
    other_tls: Partner,
    _echo: tokio::task::JoinHandle<()>,
    pki: Pki,
    // Last: the namespaces go after the servers in them.
    pair: Pair,
}

impl World {
    async fn new() -> World {
        Self::with_rules(&[
            "--listener-port",
            &TRANSPARENT_PORT.to_string(),
            "--proxy-uid",
            &PROXY_UID.to_string(),
        ])
        .await
    }

    async fn with_rules(setup_args: &[&str]) -> World {
        let pair = pair();
        pair.setup_iptables(setup_args);
        let pki = Pki::new();
        let ns = &pair.partner;
        let partner = Partner::start_on(ns.listen(&format!("{PARTNER_IP}:80")).await, None);
        let partner_tls = Partner::start_on(
            ns.listen(&format!("{PARTNER_IP}:443")).await,
            Some(pki.server("partner.test")),
        );
        let origin = Origin::start(ns.listen(&format!("{OTHER_IP}:80")).await);
        let other_tls = Partner::start_on(
            ns.listen(&format!("{OTHER_IP}:443")).await,
            Some(pki.server("other.test")),
        );
        let echo = echo(ns.listen(&format!("{ECHO_IP}:443")).await);
        World {
            partner,
            partner_tls,
            origin,
            other_tls,
            _echo: echo,
            pki,
            pair,
        }
    }

    async fn sidecar(&self, kill: bool, args: &[&str]) -> NsSidecar {
        NsSidecar::start(&self.pair.app, &partner_spec(kill), SECRET, args).await
    }

    fn ca(&self) -> String {
        self.pki.ca_file.display().to_string()
    }
}

async fn set_kill_switch(sidecar: &NsSidecar, on: bool) {
    sidecar.write_config(&partner_spec(on));
    sidecar
        .wait_config("the kill switch flip", |c| {
            c["integrations"][0]["defaultRoute"]["killSwitch"]["enabled"] == on
        })
        .await;
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

fn intercepted(m: &str, protocol: &str, outcome: &str) -> f64 {
    metric(
        m,
        "tollgate_intercepted_connections_total",
        &[("protocol", protocol), ("outcome", outcome)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_partner_calls_meet_the_policy_and_the_sidecars_own_calls_are_not_redirected() {
    let w = World::new().await;
    let sidecar = w.sidecar(true, &[]).await;

    let r = curl(&w.pair.app, &["http://partner.test/v1/charges"]).await;
    assert_eq!(r.status, 503, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(
        r.header("x-tollgate-reason").as_deref(),
        Some("kill-switch")
    );
    assert!(r.body.contains(r#""integration":"test/partner""#), "{r:?}");
    assert_eq!(w.partner.count(), 0, "the kill switch lets nothing through");

    set_kill_switch(&sidecar, false).await;
    let r = curl(
        &w.pair.app,
        &["-H", "x-app: 1", "http://partner.test/v1/charges?id=7"],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(r.body, "ok");
    let seen = w.partner.seen();
    assert_eq!(
        seen.len(),
        1,
        "exactly one request: the sidecar's own call went straight to the partner"
    );
    assert_eq!(seen[0].path, "/v1/charges?id=7");
    assert_eq!(seen[0].headers["x-app"], "1");
    assert_eq!(
        seen[0].headers["authorization"], "Bearer sk_test_123",
        "the credential the app never had: the call went through the sidecar"
    );

    let m = sidecar.metrics().await;
    assert_eq!(intercepted(&m, "http", "proxy"), 2.0, "{m}");
    assert_eq!(
        metric(&m, "tollgate_intercepted_connections_total", &[]),
        2.0,
        "only the app's two connections were redirected, never the sidecar's own\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "tollgate_requests_total",
            &[("integration", "test/partner"), ("outcome", "success")]
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_partner_is_refused_at_connect_by_the_kill_switch_and_spliced_when_off() {
    let w = World::new().await;
    let sidecar = w.sidecar(true, &[]).await;
    let ca = w.ca();

    let r = curl(
        &w.pair.app,
        &["--cacert", &ca, "https://partner.test/v1/charges"],
    )
    .await;
    assert_ne!(r.exit, 0, "{r:?}");
    assert!(
        r.stderr.to_ascii_lowercase().contains("access denied"),
        "the client is told why (TLS alert access_denied): {r:?}"
    );
    assert_eq!(w.partner_tls.count(), 0);
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "kill-switch"), 1.0, "{m}");

    set_kill_switch(&sidecar, false).await;
    let r = curl(
        &w.pair.app,
        &["--cacert", &ca, "https://partner.test/v1/charges"],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(r.body, "ok");
    let seen = w.partner_tls.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].headers.contains_key("authorization"),
        "TLS is not terminated: the app verified the partner's own certificate and the sidecar \
         could not add a header"
    );
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "established"), 1.0, "{m}");
    assert_eq!(intercepted(&m, "tls", "tunnel"), 2.0, "{m}");
}

/// The other L4 policies on a partner's TLS: a partner that does not answer the SYN is given
/// up after the integration's connect timeout, and past `--max-tunnels` a connection is closed
/// at once; each is counted, and each connection is a `tollgate.tunnel` span at a real OTLP
/// receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_partner_meets_the_connect_timeout_and_the_tunnel_limit() {
    let w = World::new().await;
    let spec = manifest(
        "partner",
        "upstream: {url: 'http://partner.test', connectTimeout: 300ms}\nretries: {maxAttempts: 1}",
    );
    // The receiver listens in the app's namespace, where the sidecar runs.
    let receiver = Receiver::start_on(w.pair.app.listen("127.0.0.1:0").await);
    let endpoint = receiver.endpoint();
    let sidecar = NsSidecar::start_with_env(
        &w.pair.app,
        &spec,
        SECRET,
        &["--max-tunnels", "1"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let ca = w.ca();
    // The partner drops every SYN to 443: the sidecar stops waiting after 300 ms.
    let drop_syn = ["INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP"];
    let add: Vec<&str> = ["-A"].iter().chain(&drop_syn).copied().collect();
    let out = w.pair.partner.exec("iptables", &add);
    assert!(out.status.success(), "{out:?}");
    // curl would give up after 2 s (exit 28); the sidecar's 300 ms, not its 3 s default,
    // closes the connection first.
    let r = curl(
        &w.pair.app,
        &[
            "--max-time",
            "2",
            "--cacert",
            &ca,
            "https://partner.test/v1/charges",
        ],
    )
    .await;
    assert!(r.exit != 0 && r.exit != 28, "{r:?}");
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "timeout"), 1.0, "{m}\n{}", sidecar.log_text());
    let del: Vec<&str> = ["-D"].iter().chain(&drop_syn).copied().collect();
    let out = w.pair.partner.exec("iptables", &del);
    assert!(out.status.success(), "{out:?}");

    // One tunnel held open (a full TLS handshake with the partner through it) ...
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&w.pki.ca_file).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = w.pair.app.connect(addr(PARTNER_IP, 443)).await;
    let _held = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client))
        .connect(
            rustls::pki_types::ServerName::try_from("partner.test").unwrap(),
            tcp,
        )
        .await
        .expect("the TLS handshake with the partner through the tunnel");
    // ... so the next one is over the limit and closed.
    let r = curl(
        &w.pair.app,
        &["--cacert", &ca, "https://partner.test/v1/charges"],
    )
    .await;
    assert_ne!(r.exit, 0, "{r:?}");
    let m = sidecar.metrics().await;
    assert_eq!(tunnels(&m, "established"), 1.0, "{m}");
    assert_eq!(tunnels(&m, "limited"), 1.0, "{m}");
    assert_eq!(
        w.partner_tls.count(),
        0,
        "no request went through either tunnel"
    );

    // A span per connection, closed with it.
    drop(_held);
    let spans = receiver.wait_for("tollgate.tunnel", 3).await;
    let mut reasons: Vec<&str> = spans
        .iter()
        .map(|s| {
            assert_eq!(
                s.attributes["tollgate.interception"], "transparent",
                "{s:?}"
            );
            assert_eq!(
                s.attributes["tollgate.integration"], "test/partner",
                "{s:?}"
            );
            assert_eq!(s.attributes["server.address"], "partner.test", "{s:?}");
            s.attributes
                .get("tollgate.reason")
                .map_or("", String::as_str)
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["", "rate-limited", "timeout"], "{spans:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_traffic_reaches_its_original_destination_untouched() {
    let w = World::new().await;
    // The partner's kill switch is on: nothing else may notice.
    let sidecar = w.sidecar(true, &[]).await;

    // Plain HTTP to another host, byte for byte, both ways, on a kept-alive connection: odd
    // header case and spacing, hop-by-hop headers a proxy would drop.
    let mut app = w.pair.app.connect(addr(OTHER_IP, 80)).await;
    let request: &[u8] = b"GET /raw?q=1 HTTP/1.1\r\nHost: other.test\r\nX-MiXeD-Case:  spaced \r\nConnection: X-Hop\r\nX-Hop: 1\r\n\r\n";
    for _ in 0..2 {
        let got = exchange(&mut app, request, Origin::RESPONSE.len()).await;
        assert_eq!(got, Origin::RESPONSE, "{}", String::from_utf8_lossy(&got));
    }
    assert_eq!(
        w.origin.conns.lock().unwrap()[0],
        [request, request].concat()
    );

    let r = curl(&w.pair.app, &["http://other.test/curl"]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "origin"), "{r:?}");
    assert_eq!(r.header("x-origin").as_deref(), Some("raw"));

    // TLS to another host: the app sees that host's own certificate.
    let r = curl(
        &w.pair.app,
        &["--cacert", &w.ca(), "https://other.test/tls"],
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok"), "{r:?}");
    assert_eq!(w.other_tls.count(), 1);

    // Neither HTTP nor TLS.
    let mut app = w.pair.app.connect(addr(ECHO_IP, 443)).await;
    let opaque: &[u8] = b"\x00\x01tollgate\xff\xfe opaque \r\n\r\n";
    assert_eq!(exchange(&mut app, opaque, opaque.len()).await, opaque);

    assert_eq!(w.partner.count() + w.partner_tls.count(), 0);
    let m = sidecar.metrics().await;
    assert_eq!(intercepted(&m, "http", "splice"), 2.0, "{m}");
    assert_eq!(intercepted(&m, "tls", "splice"), 1.0, "{m}");
    assert_eq!(intercepted(&m, "opaque", "splice"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_request_on_a_spliced_connection_is_never_sent() {
    let w = World::new().await;
    let sidecar = w.sidecar(false, &[]).await;

    let mut app = w.pair.app.connect(addr(OTHER_IP, 80)).await;
    let got = exchange(
        &mut app,
        b"GET /1 HTTP/1.1\r\nHost: other.test\r\n\r\n",
        Origin::RESPONSE.len(),
    )
    .await;
    assert_eq!(got, Origin::RESPONSE);
    // The same connection now names the partner: it is closed, nothing is forwarded.
    let got = exchange(
        &mut app,
        b"GET /2 HTTP/1.1\r\nHost: partner.test\r\n\r\n",
        1,
    )
    .await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(w.origin.heads.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(w.partner.count(), 0);

    // On a fresh connection the partner's Host is served by the policy stack, whatever
    // address the app dialled.
    let mut app = w.pair.app.connect(addr(OTHER_IP, 80)).await;
    let got = exchange(
        &mut app,
        b"GET /3 HTTP/1.1\r\nHost: partner.test\r\nConnection: close\r\n\r\n",
        usize::MAX,
    )
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let seen = w.partner.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/3");
    assert_eq!(seen[0].headers["authorization"], "Bearer sk_test_123");
    let m = sidecar.metrics().await;
    assert_eq!(intercepted(&m, "http", "splice"), 1.0, "{m}");
    assert_eq!(intercepted(&m, "http", "proxy"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_unknown_hosts_deny_only_partner_traffic_gets_through() {
    let w = World::new().await;
    let sidecar = w.sidecar(false, &["--unknown-hosts", "deny"]).await;

    let r = curl(&w.pair.app, &["http://other.test/x"]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-tollgate-reason").as_deref(),
        Some("unknown-host")
    );
    let r = curl(&w.pair.app, &["--cacert", &w.ca(), "https://other.test/x"]).await;
    assert!(
        r.exit != 0 && r.stderr.to_ascii_lowercase().contains("access denied"),
        "{r:?}"
    );
    let mut app = w.pair.app.connect(addr(ECHO_IP, 443)).await;
    assert!(
        exchange(&mut app, b"\x00opaque", usize::MAX)
            .await
            .is_empty()
    );
    assert!(w.origin.conns.lock().unwrap().is_empty());
    assert_eq!(w.other_tls.count(), 0);

    let r = curl(&w.pair.app, &["http://partner.test/v1/ok"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = sidecar.metrics().await;
    for protocol in ["http", "tls", "opaque"] {
        assert_eq!(intercepted(&m, protocol, "denied"), 1.0, "{protocol}\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_not_redirected_or_silent_are_closed() {
    let w = World::new().await;
    let sidecar = w.sidecar(false, &["--header-read-timeout", "300ms"]).await;
    // Dialled directly: there is no original destination to go to.
    let mut direct = w
        .pair
        .app
        .connect(addr("127.0.0.1", TRANSPARENT_PORT))
        .await;
    assert!(
        exchange(
            &mut direct,
            b"GET / HTTP/1.1\r\nHost: partner.test\r\n\r\n",
            usize::MAX
        )
        .await
        .is_empty()
    );
    // Redirected but silent past the head timeout: closed, never spliced.
    let mut silent = w.pair.app.connect(addr(OTHER_IP, 80)).await;
    assert!(exchange(&mut silent, b"", usize::MAX).await.is_empty());
    assert!(w.origin.conns.lock().unwrap().is_empty());
    assert_eq!(w.partner.count(), 0);
    let m = sidecar.metrics().await;
    assert_eq!(intercepted(&m, "none", "closed"), 2.0, "{m}");
}

/// The control for the exemption: the same setup with the rules exempting another UID makes
/// the sidecar's partner call come back to itself, and the partner never hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_uid_exemption_the_sidecar_would_call_itself() {
    let w = World::with_rules(&[
        "--listener-port",
        &TRANSPARENT_PORT.to_string(),
        "--proxy-uid",
        "4242",
    ])
    .await;
    let sidecar = w.sidecar(false, &["--max-connections", "8"]).await;
    let r = curl(&w.pair.app, &["http://partner.test/v1/charges"]).await;
    assert_eq!(r.status, 502, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    assert_eq!(w.partner.count(), 0);
    let m = sidecar.metrics().await;
    assert_eq!(
        intercepted(&m, "http", "proxy"),
        8.0,
        "the call looped through every connection slot\n{m}"
    );
    assert!(
        metric(&m, "tollgate_rejected_connections_total", &[]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_is_intercepted_too_with_ipv6_rules_and_listener() {
    let w = World::with_rules(&[
        "--listener-port",
        &TRANSPARENT_PORT.to_string(),
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--ipv6",
    ])
    .await;
    w.pair.add_ipv6();
    let _echo6 = echo(w.pair.partner.listen(&format!("[{ECHO_IP6}]:443")).await);
    let sidecar = w
        .sidecar(
            false,
            &["--transparent", &format!("[::1]:{TRANSPARENT_PORT}")],
        )
        .await;

    // Dialled by IPv6 address, named by Host: the policy stack serves it.
    let r = curl(
        &w.pair.app,
        &[
            "-g",
            "-H",
            "Host: partner.test",
            &format!("http://[{PARTNER_IP6}]/v1/six"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}\nsidecar log:\n{}", sidecar.log_text());
    let seen = w.partner.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], "Bearer sk_test_123");

    // Other traffic goes to its original IPv6 destination.
    let mut app = w
        .pair
        .app
        .connect(format!("[{ECHO_IP6}]:443").parse().unwrap())
        .await;
    let opaque: &[u8] = b"\x00six\xff";
    assert_eq!(exchange(&mut app, opaque, opaque.len()).await, opaque);

    let m = sidecar.metrics().await;
    assert_eq!(intercepted(&m, "http", "proxy"), 1.0, "{m}");
    assert_eq!(intercepted(&m, "opaque", "splice"), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_iptables_is_idempotent_and_names_a_missing_binary() {
    let pair = pair();
    let args = [
        "--listener-port",
        "15001",
        "--proxy-uid",
        "1337",
        "--exclude-cidrs",
        "10.96.0.0/12",
    ];
    let first = pair.setup_iptables(&args);
    let second = pair.setup_iptables(&args);
    assert_eq!(first, second);
    // "IPv4 rules installed with /usr/sbin/iptables-nft (nft):"
    let bin = first
        .split_whitespace()
        .find(|w| w.contains("iptables-"))
        .unwrap_or_else(|| panic!("{first}"));
    let out = pair.app.exec(bin, &["-t", "nat", "-S"]);
    let rules = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A ")).collect();
    assert_eq!(
        lines,
        [
            "-A OUTPUT -p tcp -j TOLLGATE_OUTPUT",
            "-A TOLLGATE_OUTPUT -o lo -j RETURN",
            "-A TOLLGATE_OUTPUT -d 127.0.0.0/8 -j RETURN",
            "-A TOLLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A TOLLGATE_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A TOLLGATE_OUTPUT -p tcp -m multiport --dports 80,443 -j TOLLGATE_REDIRECT",
            "-A TOLLGATE_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ],
        "{rules}"
    );

    let out = pair.app.exec(
        "env",
        &[
            "PATH=/nonexistent",
            env!("CARGO_BIN_EXE_tollgate-sidecar"),
            "setup-iptables",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("iptables-restore") && stderr.contains("`iptables` package"),
        "{stderr}"
    );
}
