//! The sidecar injection webhook against the real API server.
//!
//! The real `tollgate-operator` runs with its webhook on 127.0.0.1; the test registers
//! MutatingWebhookConfigurations that call it by URL, shaped as the chart renders them
//! (docs/injection.md), but without a `caBundle`: the operator writes that itself, from the CA
//! it created and keeps in a Secret. Every pod below is created through the API server, so
//! what is asserted is what the API server stored after calling the webhook.
//!
//! The configurations only select namespaces carrying this process's run label (and, for the
//! system-namespace check, kube-system and the operator's namespace by name), so other tests
//! sharing the control plane are not affected.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::ControlPlane;
use tollgate_e2e::tools::target_dir;
use tollgate_testkit::TestCa;

const SIDECAR_IMAGE: &str = "registry.example/tollgate-sidecar:e2e";
const SECRET: &str = "tollgate-webhook-tls";
const CA_CONFIGMAP: &str = "tollgate-operator-ca";
const RUN_LABEL: &str = "e2e.tollgate.dev/webhook-run";
const UNTRUSTED_LABEL: &str = "e2e.tollgate.dev/webhook-untrusted";

/// The operator, its namespaces and the webhook configurations, set up once per test process.
struct Setup {
    cp: &'static ControlPlane,
    /// The operator's namespace (its Secret and Leases; never injected).
    op_ns: String,
    /// The configuration the operator manages (`--webhook-configuration`).
    managed: String,
    /// `https://127.0.0.1:PORT` of the webhook.
    webhook_url: String,
    admin: SocketAddr,
    /// The distribution endpoint's URL and CA, as given to the operator.
    operator_url: String,
    sidecar_ca: String,
    /// The caBundle (base64) the operator first wrote, and whether it put it back after the
    /// test overwrote it.
    ca_bundle: String,
    restored_after_tamper: bool,
    _operator: Operator,
}

/// Set up on first use; a failed setup is remembered, so every test fails at once with it.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();
    match SETUP.get_or_init(|| start().map_err(|e| format!("{e:#}"))) {
        Ok(s) => s,
        Err(e) => panic!("webhook setup failed: {e}"),
    }
}

fn run_id() -> String {
    std::process::id().to_string()
}

fn start() -> anyhow::Result<Setup> {
    let cp = ControlPlane::shared();
    crate::crd::install_crd(cp);
    let op_ns = cp.create_namespace("webhook-op")?;
    service_account(cp, &op_ns)?;
    service_account(cp, "kube-system")?;

    let dir = std::env::temp_dir().join(format!("tollgate-webhook-e2e-{}", run_id()));
    std::fs::create_dir_all(&dir)?;
    let (ca_file, cert_file, key_file) = distribution_cert(&dir)?;
    let listen = free_port()?;
    let admin = free_port()?;
    let webhook_addr = free_port()?;
    let managed = format!("tollgate-e2e-injector-{}", run_id());
    let operator_url = format!("https://{listen}");
    let args: Vec<String> = [
        "--listen",
        &listen.to_string(),
        "--admin",
        &admin.to_string(),
        "--tls-cert",
        cert_file.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
        "--namespace",
        &op_ns,
        "--lease-namespace",
        &op_ns,
        "--identity",
        "webhook-e2e",
        "--lease-renew",
        "2s",
        "--webhook-listen",
        &webhook_addr.to_string(),
        "--webhook-host",
        "127.0.0.1",
        "--webhook-configuration",
        &managed,
        "--webhook-secret",
        SECRET,
        "--sidecar-image",
        SIDECAR_IMAGE,
        "--sidecar-operator-url",
        &operator_url,
        "--sidecar-ca-file",
        ca_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    let operator = Operator::start(cp, &args)?;
    eventually("the operator is ready", Duration::from_secs(60), || {
        operator.check_alive()?;
        let r = http_get(admin, "/readyz")?;
        anyhow::ensure!(r.starts_with("HTTP/1.1 200"), "{r}");
        Ok(())
    })?;

    let webhook_url = format!("https://{webhook_addr}");
    cp.kubectl_with_stdin(
        ["apply", "-f", "-"],
        &managed_configuration(&managed, &webhook_url, &op_ns).to_string(),
    )?;

    // The leader creates its CA and certificate and writes the caBundle.
    let ca_bundle = eventually(
        "the operator writes the caBundle",
        Duration::from_secs(60),
        || {
            operator.check_alive()?;
            let bundles = ca_bundles(cp, &managed)?;
            anyhow::ensure!(
                bundles.len() == 2 && bundles.iter().all(|b| !b.is_empty() && *b == bundles[0]),
                "caBundles: {bundles:?}"
            );
            Ok(bundles[0].clone())
        },
    )?;

    let s = Setup {
        cp,
        op_ns,
        managed,
        webhook_url,
        admin,
        operator_url,
        sidecar_ca: std::fs::read_to_string(&ca_file)?,
        ca_bundle,
        restored_after_tamper: false,
        _operator: operator,
    };
    s.wait_until_injecting()?;

    // Overwrite one caBundle with a CA that did not sign the webhook: the leader puts its
    // own back.
    let foreign = foreign_ca(cp)?;
    cp.kubectl([
        "patch",
        "mutatingwebhookconfiguration",
        &s.managed,
        "--type=json",
        "-p",
        &json!([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": foreign}])
            .to_string(),
    ])?;
    let restored = eventually(
        "the operator restores the caBundle",
        Duration::from_secs(30),
        || {
            let bundles = ca_bundles(cp, &s.managed)?;
            anyhow::ensure!(bundles.iter().all(|b| *b == s.ca_bundle), "{bundles:?}");
            Ok(())
        },
    )
    .is_ok();
    s.wait_until_injecting()?;

    // A configuration without the system-namespace exclusion, for the handler's own check.
    cp.kubectl_with_stdin(
        ["apply", "-f", "-"],
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": format!("tollgate-e2e-unguarded-{}", run_id())},
            "webhooks": [webhook(
                "unguarded.e2e.tollgate.dev",
                &format!("{}/inject/namespace", s.webhook_url),
                "Fail",
                json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                                             "values": ["kube-system", s.op_ns]}]}),
                Some(&s.ca_bundle),
            )]
        })
        .to_string(),
    )?;
    Ok(Setup {
        restored_after_tamper: restored,
        ..s
    })
}

impl Setup {
    /// Waits until a dry-run pod in an opted-in namespace comes back injected: the API server
    /// has the current caBundle.
    fn wait_until_injecting(&self) -> anyhow::Result<()> {
        let ns = self.namespace(true)?;
        eventually(
            "the API server calls the webhook",
            Duration::from_secs(30),
            || {
                let out = self.cp.kubectl_with_stdin(
                    ["create", "--dry-run=server", "-o", "json", "-f", "-"],
                    &app_pod(&ns, "probe", json!({})).to_string(),
                )?;
                let pod: Value = serde_json::from_str(&out)?;
                anyhow::ensure!(
                    init_container(&pod, "tollgate-sidecar").is_some(),
                    "not injected yet"
                );
                Ok(())
            },
        )
    }

    /// A fresh namespace with the run label, and `tollgate.dev/inject=enabled` if `enabled`.
    fn namespace(&self, enabled: bool) -> anyhow::Result<String> {
        let mut labels = json!({ RUN_LABEL: run_id() });
        if enabled {
            labels["tollgate.dev/inject"] = json!("enabled");
        }
        self.namespace_with(labels)
    }

    fn namespace_with(&self, labels: Value) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!(
            "webhook-{}-{}",
            run_id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.cp.kubectl_with_stdin(
            ["apply", "-f", "-"],
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}})
            .to_string(),
        )?;
        service_account(self.cp, &name)?;
        Ok(name)
    }

    /// Creates the pod through the API server and returns it as stored.
    fn create(&self, pod: &Value) -> anyhow::Result<Value> {
        let out = self
            .cp
            .kubectl_with_stdin(["create", "-o", "json", "-f", "-"], &pod.to_string())?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `tollgate_operator_webhook_admissions_total{outcome, reason}` now.
    fn admissions(&self, outcome: &str, reason: &str) -> f64 {
        let line = format!(
            "tollgate_operator_webhook_admissions_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} "
        );
        http_get(self.admin, "/metrics")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix(&line).and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0.0)
    }
}

// === The configurations ===

fn webhook(name: &str, url: &str, failure: &str, ns_selector: Value, ca: Option<&str>) -> Value {
    let mut client = json!({ "url": url });
    if let Some(ca) = ca {
        client["caBundle"] = json!(ca);
    }
    json!({
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": failure,
        "timeoutSeconds": 5,
        "reinvocationPolicy": "Never",
        "matchPolicy": "Equivalent",
        "clientConfig": client,
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "namespaceSelector": ns_selector,
    })
}

/// As the chart renders it (docs/injection.md), by URL, restricted to this run's namespaces.
fn managed_configuration(name: &str, url: &str, op_ns: &str) -> Value {
    let excluded = json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                          "values": ["kube-system", "kube-public", "kube-node-lease", op_ns]});
    let run = json!({"key": RUN_LABEL, "operator": "In", "values": [run_id()]});
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            webhook(
                "namespace.inject.tollgate.dev",
                &format!("{url}/inject/namespace"),
                "Fail",
                json!({"matchExpressions": [
                    {"key": "tollgate.dev/inject", "operator": "In", "values": ["enabled"]},
                    excluded, run]}),
                None,
            ),
            webhook(
                "pod.inject.tollgate.dev",
                &format!("{url}/inject/pod"),
                "Ignore",
                json!({"matchExpressions": [
                    {"key": "tollgate.dev/inject", "operator": "NotIn", "values": ["enabled"]},
                    excluded, run]}),
                None,
            ),
        ]
    })
}

fn ca_bundles(cp: &ControlPlane, name: &str) -> anyhow::Result<Vec<String>> {
    let out = cp.kubectl(["get", "mutatingwebhookconfiguration", name, "-o", "json"])?;
    let cfg: Value = serde_json::from_str(&out)?;
    Ok(cfg["webhooks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            w["clientConfig"]["caBundle"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect())
}

/// A CA that did not sign the webhook's certificate: the control plane's own (base64 PEM).
fn foreign_ca(cp: &ControlPlane) -> anyhow::Result<String> {
    let out = cp.kubectl([
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ])?;
    anyhow::ensure!(!out.trim().is_empty(), "no CA in the kubeconfig");
    Ok(out.trim().to_string())
}

// === Pods ===

fn app_pod(ns: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                     "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
                                 "env": [{"name": "LOG_LEVEL", "value": "info"}]}]}
    })
}

fn init_container<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["spec"]["initContainers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn volume<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

/// Nothing of Tollgate's in the stored pod.
fn assert_untouched(pod: &Value, what: &str) {
    let text = pod["spec"].to_string();
    assert!(
        !text.contains("tollgate"),
        "{what}: the spec mentions tollgate:\n{pod:#}"
    );
    assert!(
        pod["metadata"]["annotations"]["tollgate.dev/injected"].is_null(),
        "{what}: marked injected:\n{pod:#}"
    );
    assert!(
        env(&pod["spec"]["containers"][0], "HTTP_PROXY").is_none(),
        "{what}: HTTP_PROXY set"
    );
}

// === Tests ===

#[test]
fn the_api_server_trusts_the_webhook_through_the_ca_bundle_the_operator_wrote() {
    let s = setup();
    // The caBundle is the CA in the operator's Secret (both base64 of the same PEM).
    let secret: Value = serde_json::from_str(
        &s.cp
            .kubectl(["get", "secret", SECRET, "-n", &s.op_ns, "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["data"]["ca.crt"].as_str(),
        Some(s.ca_bundle.as_str()),
        "the caBundle is not the operator's CA"
    );
    for key in ["ca.key", "tls.crt", "tls.key"] {
        assert!(
            secret["data"][key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}"
        );
    }
    assert!(
        s.restored_after_tamper,
        "the operator did not put its caBundle back"
    );

    // The API server does verify: the same webhook behind another CA is refused (Fail).
    let ns = s
        .namespace_with(json!({ UNTRUSTED_LABEL: run_id() }))
        .unwrap();
    s.cp.kubectl_with_stdin(
        ["apply", "-f", "-"],
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": format!("tollgate-e2e-untrusted-{}", run_id())},
            "webhooks": [webhook(
                "untrusted.e2e.tollgate.dev",
                &format!("{}/inject/namespace", s.webhook_url),
                "Fail",
                json!({"matchLabels": { UNTRUSTED_LABEL: run_id() }}),
                Some(&foreign_ca(s.cp).unwrap()),
            )]
        })
        .to_string(),
    )
    .unwrap();
    let mut attempt = 0;
    let err = eventually("the foreign CA is refused", Duration::from_secs(30), || {
        // Until the API server has the new configuration, pods pass without it.
        attempt += 1;
        match s.create(&app_pod(&ns, &format!("untrusted-{attempt}"), json!({}))) {
            Ok(p) => anyhow::bail!("created:\n{p:#}"),
            Err(e) if e.to_string().contains("x509") || e.to_string().contains("certificate") => {
                Ok(e.to_string())
            }
            Err(e) => Err(e),
        }
    })
    .unwrap();
    assert!(
        err.contains("x509") || err.contains("certificate"),
        "not a certificate error: {err}"
    );
}

#[test]
fn a_pod_in_a_labelled_namespace_gets_the_native_sidecar_and_the_iptables_init_container() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let pod = s.create(&app_pod(&ns, "checkout", json!({}))).unwrap();

    assert_eq!(
        pod["metadata"]["annotations"]["tollgate.dev/injected"],
        "iptables"
    );
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tollgate-init", "tollgate-sidecar"], "{pod:#}");

    // The rules: root, NET_ADMIN (and NET_RAW), nothing else; the operator exempted.
    let init = &inits[0];
    assert_eq!(init["image"], SIDECAR_IMAGE);
    assert_eq!(init["command"], json!(["tollgate-sidecar"]));
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "setup-iptables");
    for a in [
        "--proxy-uid=1337",
        "--listener-port=15001",
        "--ports=80,443",
        "--exclude-cidrs=127.0.0.1/32",
    ] {
        assert!(args.contains(&a), "{a} not in {args:?}");
    }
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(init["restartPolicy"].is_null());

    // The sidecar: native, UID 1337, read-only root, no capabilities, resources.
    let side = &inits[1];
    assert_eq!(side["restartPolicy"], "Always");
    assert_eq!(side["image"], SIDECAR_IMAGE);
    let sc = &side["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert!(sc["capabilities"]["add"].is_null());
    assert_eq!(
        side["resources"]["requests"],
        json!({"cpu": "20m", "memory": "32Mi"})
    );
    let args: Vec<&str> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let operator = format!("--operator={}", s.operator_url);
    for a in [
        operator.as_str(),
        "--transparent=127.0.0.1:15001",
        "--token-file=/var/run/secrets/tollgate/token",
        "--operator-ca=/var/run/secrets/tollgate/ca.crt",
        "--state-file=/var/lib/tollgate/snapshot.json",
    ] {
        assert!(args.contains(&a), "{a} not in {args:?}");
    }
    assert_eq!(
        env(side, "POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(side, "POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    let mounts = side["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "tollgate-identity"
        && m["mountPath"] == "/var/run/secrets/tollgate"
        && m["readOnly"] == true));
    assert!(
        mounts
            .iter()
            .any(|m| m["name"] == "tollgate-state" && m["mountPath"] == "/var/lib/tollgate")
    );

    // Its identity: the projected token for audience tollgate, and the operator's CA.
    let sources = &volume(&pod, "tollgate-identity").unwrap()["projected"]["sources"];
    let token = sources
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("serviceAccountToken"))
        .unwrap();
    assert_eq!(token["audience"], "tollgate");
    assert_eq!(token["path"], "token");
    let ca = sources
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("configMap"))
        .unwrap();
    assert_eq!(ca["name"], CA_CONFIGMAP);
    assert!(volume(&pod, "tollgate-state").unwrap()["emptyDir"].is_object());

    // The app container keeps its own environment and gets no proxy variables in this mode.
    let app = &pod["spec"]["containers"][0];
    assert_eq!(env(app, "LOG_LEVEL").unwrap()["value"], "info");
    assert!(env(app, "HTTP_PROXY").is_none());

    // It trusts the pod CA the sidecar writes for intercepted HTTPS.
    assert!(
        args.contains(&"--trust-dir=/var/run/tollgate/trust"),
        "{args:?}"
    );
    assert_eq!(
        env(app, "SSL_CERT_FILE").unwrap()["value"],
        "/var/run/tollgate/trust/ca-bundle.crt"
    );
    assert_eq!(
        env(app, "NODE_EXTRA_CA_CERTS").unwrap()["value"],
        "/var/run/tollgate/trust/ca.crt"
    );
    assert_eq!(
        env(app, "JAVA_TOOL_OPTIONS").unwrap()["value"],
        "-Djavax.net.ssl.trustStore=/var/run/tollgate/trust/ca-bundle.p12 -Djavax.net.ssl.trustStoreType=PKCS12"
    );
    assert!(
        app["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "tollgate-trust"
                && m["mountPath"] == "/var/run/tollgate/trust"
                && m["readOnly"] == true),
        "{app:#}"
    );
    assert_eq!(
        volume(&pod, "tollgate-trust").unwrap()["emptyDir"]["medium"],
        "Memory"
    );
}

#[test]
fn a_pod_opted_out_of_tls_interception_gets_no_trust_volume_or_variables() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let pod = s
        .create(&app_pod(
            &ns,
            "pinning",
            json!({"tollgate.dev/tls-interception": "disabled"}),
        ))
        .unwrap();

    // Injected all the same: the sidecar governs the pod, told to splice partner TLS.
    assert_eq!(
        pod["metadata"]["annotations"]["tollgate.dev/injected"],
        "iptables"
    );
    let side = init_container(&pod, "tollgate-sidecar").expect("the sidecar is injected");
    let args: Vec<&str> = side["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--tls-interception=off"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--trust-dir")),
        "{args:?}"
    );
    assert!(volume(&pod, "tollgate-trust").is_none(), "{pod:#}");
    let app = &pod["spec"]["containers"][0];
    for name in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "JAVA_TOOL_OPTIONS",
    ] {
        assert!(env(app, name).is_none(), "{name} set: {app:#}");
    }
    assert_eq!(env(app, "LOG_LEVEL").unwrap()["value"], "info");
    assert!(
        !app["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == "tollgate-trust"),
        "{app:#}"
    );
}

#[test]
fn proxy_env_mode_points_the_app_at_the_sidecar() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let mut manifest = app_pod(
        &ns,
        "legacy",
        json!({"tollgate.dev/interception": "proxy-env"}),
    );
    manifest["spec"]["containers"].as_array_mut().unwrap().push(
        json!({"name": "worker", "image": "registry.example/worker:1",
                     "env": [{"name": "NO_PROXY", "value": "internal.example"}]}),
    );
    let pod = s.create(&manifest).unwrap();

    assert_eq!(
        pod["metadata"]["annotations"]["tollgate.dev/injected"],
        "proxy-env"
    );
    assert!(
        init_container(&pod, "tollgate-init").is_none(),
        "no iptables in proxy-env mode"
    );
    let side = init_container(&pod, "tollgate-sidecar").unwrap();
    assert_eq!(side["restartPolicy"], "Always");
    assert!(!side["args"].to_string().contains("--transparent"));
    for c in pod["spec"]["containers"].as_array().unwrap() {
        for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
            assert_eq!(
                env(c, var).map(|e| &e["value"]),
                Some(&json!("http://127.0.0.1:15080")),
                "{var} in {}",
                c["name"]
            );
        }
    }
    let app = &pod["spec"]["containers"][0];
    assert!(
        env(app, "NO_PROXY").unwrap()["value"]
            .as_str()
            .unwrap()
            .contains(".svc")
    );
    // A variable the app sets itself is left alone.
    let worker = &pod["spec"]["containers"][1];
    assert_eq!(
        env(worker, "NO_PROXY").unwrap()["value"],
        "internal.example"
    );
}

#[test]
fn unlabelled_namespaces_opted_out_pods_and_system_namespaces_are_untouched() {
    let s = setup();
    let plain = s.namespace(false).unwrap();
    let pod = s.create(&app_pod(&plain, "plain", json!({}))).unwrap();
    assert_untouched(&pod, "unlabelled namespace");

    // The annotation alone opts a pod in, in any namespace.
    let pod = s
        .create(&app_pod(
            &plain,
            "annotated",
            json!({"tollgate.dev/inject": "true"}),
        ))
        .unwrap();
    assert!(
        init_container(&pod, "tollgate-sidecar").is_some(),
        "{pod:#}"
    );

    let labelled = s.namespace(true).unwrap();
    let pod = s
        .create(&app_pod(
            &labelled,
            "opted-out",
            json!({"tollgate.dev/inject": "false"}),
        ))
        .unwrap();
    assert_untouched(&pod, "opted-out pod");

    // kube-system and the operator's own namespace reach the webhook through a configuration
    // that does not exclude them (failurePolicy Fail: the call must succeed); the handler
    // refuses to inject there even when asked to.
    let excluded_before = s.admissions("skipped", "excluded-namespace");
    for ns in ["kube-system", s.op_ns.as_str()] {
        let name = format!("tollgate-e2e-{}-{}", run_id(), ns.len());
        let pod = s
            .create(&app_pod(ns, &name, json!({"tollgate.dev/inject": "true"})))
            .unwrap();
        assert_untouched(&pod, ns);
        let _ =
            s.cp.kubectl(["delete", "pod", &name, "-n", ns, "--wait=false"]);
    }
    assert!(
        s.admissions("skipped", "excluded-namespace") >= excluded_before + 2.0,
        "the webhook was not consulted for the system namespaces"
    );
}

#[test]
fn re_submitting_an_injected_pod_changes_nothing() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    // No ServiceAccount token mount: that plugin would add one to the copied sidecar, which
    // is the API server's doing, not the webhook's.
    let mut manifest = app_pod(&ns, "original", json!({}));
    manifest["spec"]["automountServiceAccountToken"] = json!(false);
    let original = s.create(&manifest).unwrap();
    assert!(init_container(&original, "tollgate-sidecar").is_some());

    let copy = |name: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "labels": original["metadata"]["labels"],
                         "annotations": original["metadata"]["annotations"]},
            "spec": original["spec"],
        })
    };
    let already = s.admissions("skipped", "already-injected");
    let dry =
        s.cp.kubectl_with_stdin(
            ["create", "--dry-run=server", "-o", "json", "-f", "-"],
            &copy("dry-copy").to_string(),
        )
        .unwrap();
    let dry: Value = serde_json::from_str(&dry).unwrap();
    let again = s.create(&copy("copy")).unwrap();
    for (what, p) in [("dry-run", &dry), ("copy", &again)] {
        assert_eq!(p["spec"], original["spec"], "{what}: the spec changed");
        assert_eq!(
            p["metadata"]["annotations"], original["metadata"]["annotations"],
            "{what}: the annotations changed"
        );
    }
    assert!(
        s.admissions("skipped", "already-injected") >= already + 2.0,
        "the webhook did not see the re-submissions"
    );
}

#[test]
fn an_unknown_interception_mode_is_refused_naming_the_annotation() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let err = s
        .create(&app_pod(
            &ns,
            "bad",
            json!({"tollgate.dev/interception": "ebpf"}),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tollgate.dev/interception") && err.contains("ebpf"),
        "{err}"
    );
}

#[test]
fn the_operator_publishes_its_ca_where_injected_pods_mount_it() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let ca = eventually("the CA ConfigMap appears", Duration::from_secs(30), || {
        let out =
            s.cp.kubectl(["get", "configmap", CA_CONFIGMAP, "-n", &ns, "-o", "json"])?;
        let cm: Value = serde_json::from_str(&out)?;
        Ok(cm["data"]["ca.crt"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    })
    .unwrap();
    assert_eq!(ca, s.sidecar_ca);
    // Not in the excluded namespaces.
    assert!(
        s.cp.kubectl(["get", "configmap", CA_CONFIGMAP, "-n", "kube-system"])
            .is_err()
    );
}

// === Process and helpers ===

/// The operator binary: `$TOLLGATE_OPERATOR_BIN`, else built with cargo into the target
/// directory and profile of this test.
/// The operator under a small shell that kills it when this process's end of its stdin pipe
/// closes, so it never outlives the tests (the handle lives in a static).
struct Operator {
    child: std::sync::Mutex<Child>,
    log: PathBuf,
}

impl Operator {
    fn start(cp: &ControlPlane, args: &[String]) -> anyhow::Result<Operator> {
        let bin = tollgate_e2e::bins::operator_bin();
        let log = target_dir().join("e2e-logs").join("webhook-operator.log");
        std::fs::create_dir_all(log.parent().unwrap())?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#""$@" </dev/null & op=$!; read -r _; kill "$op"; wait "$op""#)
            .arg("tollgate-operator")
            .arg(bin)
            .args(args)
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Operator {
            child: std::sync::Mutex::new(child),
            log,
        })
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut child = self.child.lock().unwrap();
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "the operator exited ({status}); {}:\n{log}",
                self.log.display()
            );
        }
        // The wrapper outlives a crashed operator; its log says so.
        anyhow::ensure!(
            !log.contains("Error:") && !log.contains("panicked"),
            "the operator failed; {}:\n{log}",
            self.log.display()
        );
        Ok(())
    }
}

/// The distribution endpoint's CA and serving pair, for `--tls-cert`/`--sidecar-ca-file`.
fn distribution_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let c =
        TestCa::named("tollgate e2e distribution CA").write_serving_cert(dir, &["127.0.0.1"])?;
    Ok((c.ca_file, c.cert_file, c.key_file))
}

/// A `default` ServiceAccount (no controller-manager creates it; the API server's
/// ServiceAccount admission needs it for every pod).
fn service_account(cp: &ControlPlane, ns: &str) -> anyhow::Result<()> {
    cp.kubectl_with_stdin(
        ["apply", "-f", "-"],
        &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "default", "namespace": ns}})
        .to_string(),
    )?;
    Ok(())
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    BufReader::new(s).read_to_string(&mut out)?;
    Ok(out)
}

/// Retries `f` every 250ms until it succeeds or `timeout` passes (then its last error).
fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("{what}: not within {timeout:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

// === Fail-closed start, isolation, trust plumbing ===

#[test]
fn the_app_waits_for_a_revision_in_force_within_a_bound_on_a_memory_backed_volume() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let pod = s.create(&app_pod(&ns, "gated", json!({}))).unwrap();
    let sidecar = init_container(&pod, "tollgate-sidecar").expect("injected");
    // The native sidecar's startup probe gates the app's containers: it asks readiness (a
    // revision in force), every second, and fails the sidecar after the bound (fail closed).
    assert_eq!(
        sidecar["startupProbe"],
        json!({"httpGet": {"path": "/readyz", "port": 15090, "scheme": "HTTP"},
               "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 60,
               "successThreshold": 1}),
        "{pod:#}"
    );
    assert!(
        !sidecar["args"]
            .to_string()
            .contains("--startup-fail-open-after"),
        "{sidecar:#}"
    );
    // The last good revision holds credentials: memory, never the node's disk.
    assert_eq!(
        volume(&pod, "tollgate-state").unwrap()["emptyDir"],
        json!({"medium": "Memory", "sizeLimit": "16Mi"})
    );
}

#[test]
fn pods_that_would_defeat_the_sidecars_isolation_are_refused_saying_why() {
    let s = setup();
    let enabled = s.namespace(true).unwrap();
    let plain = s.namespace(false).unwrap();
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "same-uid",
            |p| p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337}),
            "container \"app\" runs as UID 1337, the sidecar's",
        ),
        (
            "shared-pid",
            |p| p["spec"]["shareProcessNamespace"] = json!(true),
            "spec.shareProcessNamespace is true",
        ),
        (
            "mounts-state",
            |p| {
                p["spec"]["containers"][0]["volumeMounts"] =
                    json!([{"name": "tollgate-state", "mountPath": "/steal"}]);
                p["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
            },
            "container \"app\" mounts volume \"tollgate-state\"",
        ),
        (
            "own-volume",
            |p| p["spec"]["volumes"] = json!([{"name": "tollgate-identity", "emptyDir": {}}]),
            "volume \"tollgate-identity\" is reserved for the injected sidecar",
        ),
        (
            "named-like-us",
            |p| {
                p["spec"]["initContainers"] =
                    json!([{"name": "tollgate-sidecar", "image": "registry.example/fake:1"}])
            },
            "container name \"tollgate-sidecar\" is reserved for the injected sidecar",
        ),
    ];
    for (name, edit, message) in cases {
        // Opted in by the namespace, and by the pod's own annotation elsewhere.
        for (ns, annotations) in [
            (&enabled, json!({})),
            (&plain, json!({"tollgate.dev/inject": "true"})),
        ] {
            let mut pod = app_pod(ns, name, annotations);
            edit(&mut pod);
            let err = s.create(&pod).unwrap_err().to_string();
            assert!(
                err.contains("denied the request") && err.contains(message),
                "{name} in {ns}: {err}"
            );
        }
    }
    // Opted out, the same pod is the user's business.
    let mut pod = app_pod(
        &enabled,
        "opted-out",
        json!({"tollgate.dev/inject": "false"}),
    );
    pod["spec"]["shareProcessNamespace"] = json!(true);
    assert_untouched(&s.create(&pod).unwrap(), "opted out");
}

#[test]
fn an_edited_or_deleted_ca_configmap_is_repaired_within_seconds() {
    let s = setup();
    let ns = s.namespace(true).unwrap();
    let ca = || -> anyhow::Result<String> {
        let out =
            s.cp.kubectl(["get", "configmap", CA_CONFIGMAP, "-n", &ns, "-o", "json"])?;
        let cm: Value = serde_json::from_str(&out)?;
        Ok(cm["data"]["ca.crt"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let published = |what: &str| {
        eventually(what, Duration::from_secs(15), || {
            let now = ca()?;
            anyhow::ensure!(now == s.sidecar_ca, "ca.crt is {now:?}");
            Ok(())
        })
        .unwrap()
    };
    published("the CA ConfigMap appears");

    // A namespace editor swaps in a CA of their own.
    let forged = foreign_ca(s.cp).unwrap();
    s.cp.kubectl([
        "patch",
        "configmap",
        CA_CONFIGMAP,
        "-n",
        &ns,
        "--type=merge",
        "-p",
        &json!({"data": {"ca.crt": forged}}).to_string(),
    ])
    .unwrap();
    published("the edited CA ConfigMap is repaired");

    s.cp.kubectl(["delete", "configmap", CA_CONFIGMAP, "-n", &ns])
        .unwrap();
    published("the deleted CA ConfigMap is recreated");
}
