//! Real pods on a real node (see `tollgate_e2e::node`): the chart installed with helm, its
//! operator running as pods from the images `images/build.py` built from the binaries under
//! test; a namespace labelled for injection; app pods (curl) injected in iptables and in
//! proxy-env mode, whose HTTP and HTTPS calls to stand-in partners on the node are governed:
//! the credential is injected, the quota answers 429, and a kill switch flipped with
//! `kubectl patch` is enforced inside the pods.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::node::{CURL_IMAGE, NODE_IP, Node};
use tollgate_e2e::objects::{get_json, partner_integration};
use tollgate_e2e::tools::workspace_root;
use tollgate_e2e::{ControlPlane, Partner, eventually};
use tollgate_testkit::TestCa;

const NS: &str = "shop";
const RELEASE_NS: &str = "tollgate-system";
const SECRET_VALUE: &str = "sk-e2e-0f9a";
const PLAIN_HOST: &str = "plain.partner.test";
const SECURE_HOST: &str = "secure.partner.test";

fn partner_on_node(rt: &tokio::runtime::Runtime, tls: Option<&TestCa>) -> Partner {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((NODE_IP, 0)))
        .expect("bind on the node's address");
    let _in_rt = rt.enter();
    let tls = tls.map(|ca| ca.issue(&[SECURE_HOST]).server_config());
    Partner::start_on(listener, tls)
}

/// An app pod (curl, kept up by `sleep infinity`) in `NS`, opted in by its namespace.
fn app_pod(cp: &ControlPlane, name: &str, interception: &str) -> anyhow::Result<()> {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "annotations": {"tollgate.dev/interception": interception},
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": CURL_IMAGE,
                "imagePullPolicy": "Never",
            }],
        },
    });
    cp.kubectl_with_stdin(["apply", "-f", "-"], &pod.to_string())?;
    let started = Instant::now();
    // Ready, or a container that failed (an init container that cannot install its rules
    // fails the pod at once, not after a timeout).
    let outcome = eventually(
        &format!("pod {name} Ready or failed"),
        Duration::from_secs(180),
        || {
            let pod = get_json(cp, NS, "pod", name)?;
            let status = &pod["status"];
            let ready = status["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                return Ok(Ok(()));
            }
            for c in ["initContainerStatuses", "containerStatuses"]
                .iter()
                .filter_map(|k| status[k].as_array())
                .flatten()
            {
                for state in [&c["state"]["terminated"], &c["lastState"]["terminated"]] {
                    if state["exitCode"].as_i64().is_some_and(|code| code != 0) {
                        let container = c["name"].as_str().unwrap_or_default().to_owned();
                        return Ok(Err((container, state.to_string())));
                    }
                }
            }
            anyhow::bail!("not yet: {}", status["phase"])
        },
    );
    if let Err((container, state)) = outcome {
        let logs = cp
            .kubectl(["logs", "--namespace", NS, name, "-c", &container])
            .unwrap_or_else(|e| format!("{e:#}"));
        anyhow::bail!("pod {name}: container {container} failed: {state}; its log:\n{logs}");
    }
    eprintln!(
        "pods: {name} ({interception}) Ready in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

/// What curl in the app container printed: the status code and the response headers.
struct Call {
    status: u16,
    headers: String,
}

impl Call {
    fn reason(&self) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("x-tollgate-reason")
                .then(|| value.trim())
        })
    }
}

/// `curl URL` run inside the app container of `pod` with `kubectl exec`.
fn curl(cp: &ControlPlane, pod: &str, url: &str) -> anyhow::Result<Call> {
    let out = cp.kubectl([
        "exec",
        "--namespace",
        NS,
        pod,
        "-c",
        "app",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Authorization: Bearer the-apps-own",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ])?;
    let (headers, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    Ok(Call {
        status: status.trim().parse()?,
        headers: headers.to_string(),
    })
}

fn last_authorization(partner: &Partner) -> Option<String> {
    partner
        .seen()
        .last()
        .and_then(|s| s.header("authorization").map(str::to_owned))
}

/// The calls every injected pod must see governed, whatever its interception mode.
fn governed_calls(cp: &ControlPlane, pod: &str, plain: &Partner, secure: &Partner) {
    let plain_url = format!("http://{PLAIN_HOST}:{}/v1/charges", plain.addr.port());
    let secure_url = format!("https://{SECURE_HOST}:{}/v1/accounts", secure.addr.port());

    // HTTP: the credential replaces the app's own.
    let before = plain.count();
    let call = curl(cp, pod, &plain_url).unwrap();
    assert_eq!(call.status, 200, "{pod}: {}", call.headers);
    assert_eq!(plain.count(), before + 1, "{pod}: the partner saw the call");
    assert_eq!(
        last_authorization(plain).as_deref(),
        Some(&*format!("Bearer {SECRET_VALUE}")),
        "{pod}: the credential is injected over the app's"
    );

    // HTTPS: the app trusts the pod CA (CURL_CA_BUNDLE, injected); the sidecar terminates
    // its TLS and governs the call like any other.
    let before = secure.count();
    let call = curl(cp, pod, &secure_url).unwrap();
    assert_eq!(call.status, 200, "{pod}: {}", call.headers);
    assert_eq!(secure.count(), before + 1);
    assert_eq!(
        last_authorization(secure).as_deref(),
        Some(&*format!("Bearer {SECRET_VALUE}")),
        "{pod}: the credential is injected into the intercepted HTTPS call"
    );

    // The quota: 3 calls per hour for each pod; the fourth is refused by the sidecar.
    let before = plain.count();
    for _ in 0..2 {
        assert_eq!(curl(cp, pod, &plain_url).unwrap().status, 200);
    }
    let refused = curl(cp, pod, &plain_url).unwrap();
    assert_eq!(refused.status, 429, "{pod}: {}", refused.headers);
    assert_eq!(
        refused.reason(),
        Some("rate-limited"),
        "{}",
        refused.headers
    );
    assert_eq!(
        plain.count(),
        before + 2,
        "{pod}: the refused call never reached the partner"
    );
}

#[test]
fn injected_pods_on_a_real_node_are_governed() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut node = Node::start()?;
    node.add_hosts(&[(PLAIN_HOST, NODE_IP), (SECURE_HOST, NODE_IP)])?;
    let cp = node.cp();

    let rt = tollgate_e2e::net::runtime();
    let ca = TestCa::named("partner test CA");
    let plain = partner_on_node(rt, None);
    let secure = partner_on_node(rt, Some(&ca));

    // The chart, as a user installs it: its default images, which the node has loaded.
    let chart = workspace_root().join("charts/tollgate");
    let ports = json!([80, 443, plain.addr.port(), secure.addr.port()]).to_string();
    let install = Instant::now();
    cp.helm([
        "install",
        "tollgate",
        &chart.display().to_string(),
        "--namespace",
        RELEASE_NS,
        "--create-namespace",
        "--set-json",
        &format!("sidecar.interceptPorts={ports}"),
        "--wait",
        "--timeout",
        "5m",
    ])
    .map_err(|e| {
        let pods = cp
            .kubectl(["describe", "pods", "--namespace", RELEASE_NS])
            .unwrap_or_default();
        e.context(format!("helm install:\n{pods}"))
    })?;
    let operators: Value = serde_json::from_str(&cp.kubectl([
        "get",
        "pods",
        "--namespace",
        RELEASE_NS,
        "-o",
        "json",
    ])?)?;
    let running: Vec<&str> = operators["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|p| p["status"]["phase"] == "Running")
                .filter_map(|p| p["spec"]["containers"][0]["image"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !running.is_empty()
            && running
                .iter()
                .all(|i| *i == "ghcr.io/tollgate-dev/tollgate-operator:0.1.0"),
        "operator pods run the chart's default image: {running:?}"
    );
    eprintln!(
        "pods: chart installed, {} operator pods running, in {:.1?}",
        running.len(),
        install.elapsed()
    );

    cp.kubectl(["create", "namespace", NS])?;
    cp.kubectl(["label", "namespace", NS, "tollgate.dev/inject=enabled"])?;
    cp.kubectl([
        "create",
        "secret",
        "generic",
        "partner-key",
        "--namespace",
        NS,
        &format!("--from-literal=token={SECRET_VALUE}"),
    ])?;
    cp.kubectl([
        "label",
        "secret",
        "partner-key",
        "--namespace",
        NS,
        "tollgate.dev/credential=true",
    ])?;
    let credentials = json!({
        "secretRef": {"name": "partner-key", "key": "token"},
        "format": "Bearer {value}",
    });
    let mut plain_credentials = credentials.clone();
    plain_credentials["allowInsecure"] = json!(true);
    for (name, spec) in [
        (
            "plain",
            json!({
                "upstream": {"url": format!("http://{PLAIN_HOST}:{}", plain.addr.port())},
                "credentials": plain_credentials,
                "rateLimit": {"scope": "perPod", "limits": [{"name": "hour", "requests": 3, "per": "1h"}]},
            }),
        ),
        (
            "secure",
            json!({
                "upstream": {
                    "url": format!("https://{SECURE_HOST}:{}", secure.addr.port()),
                    "caBundle": ca.ca_pem,
                },
                "credentials": credentials,
            }),
        ),
    ] {
        cp.kubectl_with_stdin(["apply", "-f", "-"], &partner_integration(NS, name, spec))?;
    }

    app_pod(cp, "app-iptables", "iptables")?;
    app_pod(cp, "app-proxy-env", "proxy-env")?;
    let pod = get_json(cp, NS, "pod", "app-iptables")?;
    assert_eq!(
        pod["metadata"]["annotations"]["tollgate.dev/injected"], "iptables",
        "the pod is injected: {}",
        pod["metadata"]
    );
    let inits: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(inits, ["tollgate-init", "tollgate-sidecar"], "{pod}");

    for pod in ["app-iptables", "app-proxy-env"] {
        governed_calls(cp, pod, &plain, &secure);
        eprintln!("pods: {pod}: credential, HTTPS interception and quota governed");
    }

    // One line stops the partner; every pod enforces it.
    let flipped = Instant::now();
    cp.kubectl([
        "patch",
        "pi",
        "secure",
        "--namespace",
        NS,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"killSwitch":{"enabled":true}}}"#,
    ])?;
    let secure_url = format!("https://{SECURE_HOST}:{}/v1/accounts", secure.addr.port());
    for pod in ["app-iptables", "app-proxy-env"] {
        let call = eventually(
            &format!("{pod} answers 503 kill-switch"),
            Duration::from_secs(15),
            || {
                let call = curl(cp, pod, &secure_url)?;
                anyhow::ensure!(call.status == 503, "still {}", call.status);
                Ok(call)
            },
        );
        assert_eq!(call.reason(), Some("kill-switch"), "{}", call.headers);
        eprintln!(
            "pods: {pod}: kill switch enforced {:.1?} after kubectl patch",
            flipped.elapsed()
        );
    }
    let before = secure.count();
    assert_eq!(curl(cp, "app-iptables", &secure_url)?.status, 503);
    assert_eq!(
        secure.count(),
        before,
        "a killed call never reaches the partner"
    );

    let status: Value = get_json(cp, NS, "pi", "secure")?;
    eprintln!(
        "pods: done in {:.1?}; secure's status: {}",
        started.elapsed(),
        status["status"]
    );
    Ok(())
}
