//! The Helm chart (`charts/tollgate`) against the real API server: it lints (and its schema
//! refuses bad values), its rendering applies with server-side dry run, it installs and
//! upgrades, its RBAC grants what operator/README.md lists and nothing more, and the operator
//! and a sidecar actually run on that RBAC and the chart's serving certificate.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_e2e::tools::{target_dir, workspace_root};
use tollgate_e2e::{ControlPlane, helm_bin};
use tollgate_testkit::TestCa;

use crate::crd::install_crd;

fn chart() -> PathBuf {
    workspace_root().join("charts/tollgate")
}

fn chart_arg() -> String {
    chart().to_string_lossy().into_owned()
}

/// Runs `helm ARGS` against `cp`; (success, stdout + stderr). Helm prints lint findings on
/// stdout and the verdict on stderr, so a failure's reason needs both.
fn helm_outcome(cp: &ControlPlane, args: &[&str]) -> (bool, String) {
    let out = Command::new(helm_bin())
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(args)
        .output()
        .expect("helm runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `helm template` of the chart with `--set` values, as release `release` in `ns`.
fn template(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> String {
    let chart = chart_arg();
    let mut args = vec!["template", release, &chart, "--namespace", ns];
    for s in sets {
        args.extend(["--set", s]);
    }
    cp.helm(&args)
        .unwrap_or_else(|e| panic!("helm template {sets:?}: {e}"))
}

/// Releases installed by these tests call their injection webhooks only for namespaces with
/// this label set to the release's namespace, so they never touch another test's pods (the
/// labelled-namespace webhook fails closed, and no operator serves most of them).
const RELEASE_LABEL: &str = "e2e.tollgate.dev/chart-release";

/// `--set-json` of the namespaceSelector that confines a release in `ns` to its own test.
fn isolation(ns: &str) -> String {
    format!(r#"webhook.namespaceSelector={{"matchLabels":{{"{RELEASE_LABEL}":"{ns}"}}}}"#)
}

/// `helm install` (no `--wait`: nothing runs pods here) of the chart with `--set` values,
/// confined to this test (see [`isolation`]).
fn install(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> String {
    helm_release(cp, "install", release, ns, sets)
}

/// `helm upgrade` with `--set` values (and the [`isolation`] again: an upgrade starts from the
/// chart's defaults).
fn upgrade(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> String {
    helm_release(cp, "upgrade", release, ns, sets)
}

/// Its output: the release summary and NOTES.txt.
fn helm_release(cp: &ControlPlane, verb: &str, release: &str, ns: &str, sets: &[&str]) -> String {
    let chart = chart_arg();
    let isolation = isolation(ns);
    let mut args = vec![verb, release, &chart, "--namespace", ns];
    args.extend(["--set-json", &isolation]);
    for s in sets {
        args.extend(["--set", s]);
    }
    cp.helm(&args)
        .unwrap_or_else(|e| panic!("helm {verb} {sets:?}: {e}"))
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Value {
    let mut full = vec!["get"];
    full.extend(args);
    full.extend(["-o", "json"]);
    let out = cp
        .kubectl(&full)
        .unwrap_or_else(|e| panic!("kubectl {full:?}: {e}"));
    serde_json::from_str(&out).unwrap()
}

/// `kubectl auth can-i VERB RESOURCE --as SA [-n NS | -A]`: the API server's answer (a
/// SubjectAccessReview under impersonation, with the ServiceAccount's groups).
fn can_i(cp: &ControlPlane, sa: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or("kubectl".into()));
    cmd.arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["auth", "can-i", verb, resource, "--as", sa]);
    match ns {
        Some("*") => cmd.arg("--all-namespaces"),
        Some(ns) => cmd.args(["--namespace", ns]),
        None => &mut cmd,
    };
    let out = cmd.output().expect("kubectl runs");
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// RBAC rules flattened to (apiGroup, resource, verb, resourceName) grants; the name is ""
/// for a rule without resourceNames (any object).
type Grants = BTreeSet<(String, String, String, String)>;

/// A rule set as [`Grants`]; the chart uses no nonResourceURLs.
fn triples(rules: &Value) -> Grants {
    let mut out = BTreeSet::new();
    let s = |x: &Value| x.as_str().unwrap().to_owned();
    for rule in rules.as_array().into_iter().flatten() {
        assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
        let names: Vec<String> = match rule.get("resourceNames") {
            Some(names) => names.as_array().unwrap().iter().map(s).collect(),
            None => vec![String::new()],
        };
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    for n in &names {
                        out.insert((s(g), s(r), s(v), n.clone()));
                    }
                }
            }
        }
    }
    out
}

/// `list` granted on any object.
fn expect(list: &[(&str, &str, &[&str])]) -> Grants {
    expect_named(list, "")
}

/// `list` granted on the object `name` only.
fn expect_named(list: &[(&str, &str, &[&str])], name: &str) -> Grants {
    list.iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string(), name.to_owned()))
        })
        .collect()
}

/// What operator/README.md says it needs where it watches.
const WATCH_RULES: &[(&str, &str, &[&str])] = &[
    (
        "tollgate.dev",
        "partnerintegrations",
        &["get", "list", "watch", "patch"],
    ),
    ("tollgate.dev", "partnerintegrations/status", &["patch"]),
    ("", "secrets", &["get", "list", "watch"]),
    ("", "configmaps", &["list", "watch"]),
    ("", "pods", &["get"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];
const TOKENREVIEW_RULES: &[(&str, &str, &[&str])] =
    &[("authentication.k8s.io", "tokenreviews", &["create"])];
const LEASE_RULES: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "list", "watch", "create", "update", "patch"],
)];

/// What docs/injection.md says the injection webhook adds, for release `release`: cluster-wide
/// (the CA ConfigMap in every namespace, the configuration's caBundle) and in the release
/// namespace (the webhook's Secret).
fn webhook_cluster_rules(release: &str) -> Grants {
    let mut g = expect(&[("", "namespaces", &["list", "watch"])]);
    g.extend(expect_named(
        &[("", "configmaps", &["create", "patch", "list", "watch"])],
        &format!("{release}-tollgate-operator-ca"),
    ));
    g.extend(expect_named(
        &[(
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            &["get", "list", "watch", "patch"],
        )],
        &format!("{release}-tollgate-sidecar-injector"),
    ));
    g
}

fn webhook_secret_rules(release: &str) -> Grants {
    let mut g = expect_named(
        &[("", "secrets", &["get", "list", "watch", "update"])],
        &format!("{release}-tollgate-operator-webhook-tls"),
    );
    g.extend(expect(&[("", "secrets", &["create"])]));
    g
}

/// Every Role/ClusterRole bound to `ns/sa` anywhere, as (binding namespace or "", rules).
fn bound_rules(cp: &ControlPlane, ns: &str, sa: &str) -> Vec<(String, Grants)> {
    let subject_is_sa = |b: &Value| {
        b["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == ns)
    };
    let mut out = Vec::new();
    for b in get_json(cp, &["clusterrolebindings"])["items"]
        .as_array()
        .unwrap()
    {
        if subject_is_sa(b) {
            let role = get_json(cp, &["clusterrole", b["roleRef"]["name"].as_str().unwrap()]);
            out.push((String::new(), triples(&role["rules"])));
        }
    }
    for b in get_json(cp, &["rolebindings", "--all-namespaces"])["items"]
        .as_array()
        .unwrap()
    {
        if subject_is_sa(b) {
            let bns = b["metadata"]["namespace"].as_str().unwrap();
            let kind = b["roleRef"]["kind"].as_str().unwrap().to_lowercase();
            let role = get_json(
                cp,
                &[&kind, b["roleRef"]["name"].as_str().unwrap(), "-n", bns],
            );
            out.push((bns.to_owned(), triples(&role["rules"])));
        }
    }
    out.sort();
    out
}

// === chart files ===

#[test]
fn chart_version_follows_the_workspace() {
    let cargo = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let workspace_version = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("workspace version");
    let chart_yaml = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    let field = |key: &str| {
        chart_yaml
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("Chart.yaml has no {key}"))
    };
    assert_eq!(field("version:"), workspace_version);
    assert_eq!(field("appVersion:"), workspace_version);
    assert_eq!(field("apiVersion:"), "v2");
    assert_eq!(field("kubeVersion:"), ">= 1.30.0-0");
}

/// Every value the schema knows is documented in the chart README's table.
#[test]
fn every_value_is_in_the_readme() {
    fn leaves(schema: &Value, defs: &Value, path: &str, out: &mut Vec<String>) {
        let resolved = match schema.get("$ref").and_then(Value::as_str) {
            Some(r) => &defs[r.trim_start_matches("#/definitions/")],
            None => schema,
        };
        let resolved = match resolved.get("allOf").and_then(|a| a.get(0)) {
            Some(inner) if inner.get("$ref").is_some() => {
                &defs[inner["$ref"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("#/definitions/")]
            }
            _ => resolved,
        };
        let props = resolved.get("properties").and_then(Value::as_object);
        // Objects whose own keys are values (image, probes); free-form Kubernetes objects
        // (resources, securityContext, affinity) are documented whole.
        let closed = resolved.get("additionalProperties") == Some(&Value::Bool(false));
        match props {
            Some(props) if closed => {
                for (k, v) in props {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    leaves(v, defs, &p, out);
                }
            }
            _ => out.push(path.to_owned()),
        }
    }
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let mut paths = Vec::new();
    leaves(&schema, &schema["definitions"], "", &mut paths);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let missing: Vec<_> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "charts/tollgate/README.md's values table lacks {missing:?}"
    );
    assert!(paths.len() > 60, "{paths:?}");
}

/// The images' users are the ones the chart and interception count on.
#[test]
fn dockerfiles_build_static_non_root_images_with_the_charts_uids() {
    let values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    // The first `runAsUser:` after a top-level key, in values.yaml's own order.
    let uid_under = |key: &str| -> String {
        let block = values
            .split(&format!("\n{key}:\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("values.yaml has no {key}"));
        block
            .lines()
            .find_map(|l| l.trim().strip_prefix("runAsUser: "))
            .unwrap_or_else(|| panic!("no {key}.runAsUser"))
            .to_owned()
    };
    for (dockerfile, uid, package) in [
        (
            "operator/Dockerfile",
            uid_under("podSecurityContext"),
            "tollgate-operator",
        ),
        (
            "sidecar/Dockerfile",
            uid_under("sidecar"),
            "tollgate-sidecar",
        ),
    ] {
        let text = std::fs::read_to_string(workspace_root().join(dockerfile)).unwrap();
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        assert!(
            last_stage.starts_with("gcr.io/distroless/static"),
            "{dockerfile}: the runtime image is not distroless/static"
        );
        let user = last_stage
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{dockerfile}: no USER in the runtime stage"));
        assert_eq!(user, format!("{uid}:{uid}"), "{dockerfile}");
        assert_ne!(uid, "0");
        assert!(
            text.contains(&format!(
                "cargo build --release --locked -p {package} --bin {package}"
            )),
            "{dockerfile} does not build {package}"
        );
    }
    assert_eq!(uid_under("sidecar"), "1337");
    // setup-iptables drives the iptables tools: its stage has them.
    let sidecar = std::fs::read_to_string(workspace_root().join("sidecar/Dockerfile")).unwrap();
    let init = sidecar
        .split("\nFROM ")
        .find(|stage| {
            stage
                .lines()
                .next()
                .is_some_and(|l| l.ends_with(" AS init"))
        })
        .expect("sidecar/Dockerfile has a stage `init`");
    assert!(init.contains("apk add --no-cache iptables"), "{init}");
    assert!(init.contains(r#"ENTRYPOINT ["/usr/local/bin/tollgate-sidecar", "setup-iptables"]"#));
}

// === lint ===

#[test]
fn helm_lint_passes_and_the_schema_refuses_bad_values() {
    let cp = ControlPlane::shared();
    let chart = chart_arg();
    for strict in [false, true] {
        let mut args = vec!["lint", chart.as_str()];
        if strict {
            args.push("--strict");
        }
        let (ok, out) = helm_outcome(cp, &args);
        assert!(ok, "helm {args:?}:\n{out}");
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
    // The optional parts render and lint too.
    for sets in [
        &["certManager.enabled=true"][..],
        &[
            "certManager.enabled=true",
            "certManager.issuerRef.name=corp-ca",
            "certManager.issuerRef.kind=ClusterIssuer",
        ],
        &["networkPolicy.enabled=true", "serviceMonitor.enabled=true"],
        &["watchNamespaces={payments,logistics}"],
        &["replicaCount=1", "leaderElection.enabled=false"],
        &["tls.create=false", "tls.secretName=my-tls"],
        &["image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"],
        &["webhook.enabled=false"],
        &[
            "sidecar.interceptionDefault=proxy-env",
            "sidecar.interceptPorts={80,443,8080}",
            "sidecar.interceptExcludeCidrs={10.96.0.0/12}",
            "sidecar.extraArgs={--unknown-hosts=deny}",
            "webhook.podFailurePolicy=Fail",
            "webhook.namespaceSelector.matchExpressions[0].key=team",
            "webhook.namespaceSelector.matchExpressions[0].operator=Exists",
        ],
    ] {
        let mut args = vec!["lint", chart.as_str(), "--strict"];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, out) = helm_outcome(cp, &args);
        assert!(ok, "helm {args:?}:\n{out}");
    }

    // values.schema.json: each bad value is refused, naming it.
    for (set, says) in [
        (
            "replicaCount=two",
            "at '/replicaCount': got string, want integer",
        ),
        ("replicaCount=0", "at '/replicaCount'"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
        ("image.tag=not a tag", "at '/image/tag'"),
        ("operator.heartbeat=fast", "at '/operator/heartbeat'"),
        ("operator.logFormat=xml", "at '/operator/logFormat'"),
        (
            "leaderElection.leaseDuration=15",
            "at '/leaderElection/leaseDuration'",
        ),
        ("watchNamespaces={Payments}", "at '/watchNamespaces/0'"),
        ("service.port=70000", "at '/service/port'"),
        (
            "securityContext.readOnlyRootFilesystem=false",
            "at '/securityContext/readOnlyRootFilesystem'",
        ),
        (
            "securityContext.allowPrivilegeEscalation=true",
            "at '/securityContext/allowPrivilegeEscalation'",
        ),
        (
            "podSecurityContext.runAsNonRoot=false",
            "at '/podSecurityContext/runAsNonRoot'",
        ),
        (
            "resources.requests.cpu=lots",
            "at '/resources/requests/cpu'",
        ),
        ("webhook.timeoutSeconds=60", "at '/webhook/timeoutSeconds'"),
        ("webhook.failurePolicy=Maybe", "at '/webhook/failurePolicy'"),
        (
            "webhook.podFailurePolicy=Never",
            "at '/webhook/podFailurePolicy'",
        ),
        ("webhook.certValidity=90d", "at '/webhook/certValidity'"),
        (
            "webhook.namespaceSelector.matchExpressions[0].operator=Like",
            "at '/webhook/namespaceSelector/matchExpressions/0'",
        ),
        (
            "sidecar.interceptionDefault=nat",
            "at '/sidecar/interceptionDefault'",
        ),
        (
            "sidecar.interceptPorts={0}",
            "at '/sidecar/interceptPorts/0'",
        ),
        (
            "sidecar.interceptExcludeCidrs={10.0.0.1}",
            "at '/sidecar/interceptExcludeCidrs/0'",
        ),
        ("sidecar.extraArgs={deny}", "at '/sidecar/extraArgs/0'"),
        ("sidecar.runAsUser=0", "at '/sidecar/runAsUser'"),
        ("replicas=2", "additional properties 'replicas' not allowed"),
        (
            "operator.loglevel=debug",
            "additional properties 'loglevel' not allowed",
        ),
    ] {
        let (ok, out) = helm_outcome(cp, &["lint", &chart, "--set", set]);
        assert!(!ok, "helm lint --set {set} passed:\n{out}");
        assert!(
            out.contains(says),
            "helm lint --set {set}: expected {says:?} in:\n{out}"
        );
    }

    // What the schema cannot say, the templates refuse.
    for (sets, says) in [
        (
            &["leaderElection.enabled=false"][..],
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        (
            &["webhook.port=8443"],
            "webhook.port must differ from ports.sidecars",
        ),
        (
            &["tls.create=false"],
            "tls.create false needs tls.secretName",
        ),
    ] {
        let mut args = vec!["template", "t", chart.as_str()];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, out) = helm_outcome(cp, &args);
        assert!(!ok && out.contains(says), "helm {args:?}:\n{out}");
    }
    let (ok, out) = helm_outcome(cp, &["template", "t", &chart, "--kube-version", "1.29.0"]);
    assert!(
        !ok && out.contains("incompatible with Kubernetes v1.29.0"),
        "kubeVersion >= 1.30 is not enforced:\n{out}"
    );
}

// === the API server accepts what the chart renders ===

#[test]
fn rendered_chart_applies_with_server_side_dry_run() {
    let cp = ControlPlane::shared();
    let ns = cp.create_namespace("chart-dry").unwrap();
    let watched = cp.create_namespace("chart-dry-app").unwrap();
    let watch = format!("watchNamespaces={{{watched}}}");
    let chart = chart_arg();
    for sets in [
        &[][..],
        &[watch.as_str()],
        &[
            "networkPolicy.enabled=true",
            "networkPolicy.adminFrom[0].namespaceSelector.matchLabels.team=observability",
        ],
        &[
            "replicaCount=1",
            "leaderElection.enabled=false",
            "podDisruptionBudget.enabled=false",
            "serviceAccount.create=false",
            "serviceAccount.name=existing",
        ],
        &["webhook.enabled=false"],
    ] {
        // With --include-crds the CRD goes first in the stream, as `helm install` puts it.
        let mut args = vec![
            "template",
            "dry",
            chart.as_str(),
            "--namespace",
            &ns,
            "--include-crds",
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let manifests = cp.helm(&args).unwrap_or_else(|e| panic!("{e}"));
        let out = cp
            .kubectl_with_stdin(["apply", "--dry-run=server", "-f", "-"], &manifests)
            .unwrap_or_else(|e| {
                panic!("the API server refuses the chart rendered with {sets:?}: {e}")
            });
        for kind in [
            "customresourcedefinition",
            "deployment.apps",
            "service/",
            "clusterrole.",
            "secret/",
        ] {
            assert!(out.contains(kind), "{sets:?}: no {kind} in:\n{out}");
        }
        assert!(
            out.lines().all(|l| l.ends_with("(server dry run)")),
            "{out}"
        );
        let webhook = out.contains("mutatingwebhookconfiguration.admissionregistration.k8s.io/");
        assert_eq!(
            webhook,
            !sets.contains(&"webhook.enabled=false"),
            "{sets:?}: the injection webhook's configuration:\n{out}"
        );
    }
    // The optional objects of other operators' APIs render with the fields those APIs expect.
    let cm = template(cp, "dry", &ns, &["certManager.enabled=true"]);
    for needle in [
        "kind: Certificate",
        "kind: Issuer",
        "selfSigned: {}",
        "isCA: true",
        "encoding: PKCS8",
        &format!("- dry-tollgate-operator.{ns}.svc"),
    ] {
        assert!(
            cm.contains(needle),
            "cert-manager rendering lacks {needle:?}"
        );
    }
    assert!(
        !cm.contains("kind: Secret\n"),
        "cert-manager mode must not render the Secret"
    );
    // The webhook's certificate comes from cert-manager too: its own Certificate, mounted, the
    // CA injected by cert-manager, and none of the operator's own-CA machinery or its RBAC.
    for needle in [
        "name: dry-tollgate-operator-webhook\n",
        "secretName: dry-tollgate-operator-webhook-tls",
        &format!("cert-manager.io/inject-ca-from: {ns}/dry-tollgate-operator-webhook"),
        "--webhook-tls-cert=/var/run/tollgate/webhook/tls.crt",
        "--webhook-tls-key=/var/run/tollgate/webhook/tls.key",
        "mountPath: /var/run/tollgate/webhook",
    ] {
        assert!(
            cm.contains(needle),
            "cert-manager rendering lacks {needle:?}"
        );
    }
    for absent in [
        "--webhook-configuration=",
        "--webhook-secret=",
        "mutatingwebhookconfigurations",
        "resourceNames: [\"dry-tollgate-operator-webhook-tls\"]",
        "caBundle",
    ] {
        assert!(
            !cm.contains(absent),
            "cert-manager rendering has {absent:?}"
        );
    }
    let sm = template(cp, "dry", &ns, &["serviceMonitor.enabled=true"]);
    assert!(sm.contains("kind: ServiceMonitor") && sm.contains("port: admin"));
}

// === install ===

#[test]
fn helm_install_creates_the_operator_and_upgrade_keeps_its_certificate() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("chart-install").unwrap();
    let notes = install(cp, "tollgate", &ns, &[]);
    for line in [
        "Injection:       MutatingWebhookConfiguration tollgate-sidecar-injector (default mode iptables)",
        "kubectl label namespace <namespace> tollgate.dev/inject=enabled",
        "iptables mode needs the privileged Pod Security level",
    ] {
        assert!(notes.contains(line), "NOTES.txt lacks {line:?}:\n{notes}");
    }
    let name = "tollgate-operator";

    let releases: Value =
        serde_json::from_str(&cp.helm(["list", "-n", &ns, "-o", "json"]).unwrap()).unwrap();
    assert_eq!(releases[0]["status"], "deployed", "{releases}");

    let deploy = get_json(cp, &["deployment", name, "-n", &ns]);
    let spec = &deploy["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/tollgate-dev/tollgate-operator:0.1.0");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "admin", "scheme": "HTTP"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin", "scheme": "HTTP"})
    );
    let env: Vec<(String, String)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            Some((e["name"].as_str()?.to_owned(), path.to_owned()))
        })
        .collect();
    assert!(
        env.contains(&("POD_NAME".into(), "metadata.name".into())),
        "{env:?}"
    );
    assert!(
        env.contains(&("POD_NAMESPACE".into(), "metadata.namespace".into())),
        "{env:?}"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for arg in [
        "--leader-election=true",
        "--lease-name=tollgate-operator",
        "--tls-cert=/var/run/tollgate/tls/tls.crt",
    ] {
        assert!(args.contains(&arg), "{arg} not in {args:?}");
    }
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "tollgate-operator-tls"
    );

    let svc = get_json(cp, &["service", name, "-n", &ns]);
    let ports: Vec<(&str, i64)> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        ports,
        [("sidecars", 8443), ("admin", 8080), ("webhook", 443)]
    );
    let container_ports: Vec<(&str, i64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        container_ports,
        [("sidecars", 8443), ("admin", 8080), ("webhook", 9443)]
    );
    let pdb = get_json(cp, &["pdb", name, "-n", &ns]);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    get_json(cp, &["serviceaccount", name, "-n", &ns]);
    let items = get_json(
        cp,
        &[
            "networkpolicies",
            "-A",
            "-l",
            "app.kubernetes.io/instance=tollgate",
        ],
    );
    assert_eq!(
        items["items"].as_array().map(Vec::len),
        Some(1),
        "one NetworkPolicy by default"
    );

    // The injection webhook, on by default: two webhooks (docs/injection.md) that call the
    // operator's Service, never the system namespaces or the release's own, and no caBundle
    // (the operator writes it).
    let cfg = get_json(
        cp,
        &["mutatingwebhookconfiguration", "tollgate-sidecar-injector"],
    );
    let webhooks = cfg["webhooks"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str)> = webhooks
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap(),
                w["failurePolicy"].as_str().unwrap(),
                w["clientConfig"]["service"]["path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("namespace.inject.tollgate.dev", "Fail", "/inject/namespace"),
            ("pod.inject.tollgate.dev", "Ignore", "/inject/pod"),
        ]
    );
    for (w, opt_in) in webhooks.iter().zip(["In", "NotIn"]) {
        assert_eq!(
            w["clientConfig"]["service"],
            json!({"name": name, "namespace": ns, "port": 443, "path": w["clientConfig"]["service"]["path"]})
        );
        assert!(w["clientConfig"]["caBundle"].is_null(), "{w}");
        assert_eq!(w["timeoutSeconds"], 5);
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(
            w["rules"],
            json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "scope": "Namespaced"}])
        );
        let exprs = &w["namespaceSelector"]["matchExpressions"];
        assert_eq!(
            exprs[0],
            json!({"key": "tollgate.dev/inject", "operator": opt_in, "values": ["enabled"]})
        );
        assert_eq!(
            exprs[1],
            json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                   "values": ["kube-system", "kube-public", "kube-node-lease", ns]})
        );
    }

    let tls = get_json(cp, &["secret", "tollgate-operator-tls", "-n", &ns]);
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let keys: BTreeSet<&str> = tls["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"]));

    // An upgrade finds the Secret and keeps the pair: sidecars trusting ca.crt keep trusting it.
    upgrade(cp, "tollgate", &ns, &["operator.logLevel=debug"]);
    let after = get_json(cp, &["secret", "tollgate-operator-tls", "-n", &ns]);
    assert_eq!(
        after["data"], tls["data"],
        "helm upgrade replaced the certificate"
    );
    let deploy = get_json(cp, &["deployment", name, "-n", &ns]);
    assert_eq!(deploy["metadata"]["generation"], 2);

    // Uninstall removes what the chart made, cluster-scoped RBAC included, and never the CRD
    // (with it every PartnerIntegration in the cluster).
    cp.helm(["uninstall", "tollgate", "-n", &ns]).unwrap();
    assert!(cp.kubectl(["get", "clusterrole", name]).is_err());
    assert!(
        cp.kubectl([
            "get",
            "mutatingwebhookconfiguration",
            "tollgate-sidecar-injector"
        ])
        .is_err()
    );
    assert!(cp.kubectl(["get", "deployment", name, "-n", &ns]).is_err());
    cp.kubectl(["get", "crd", "partnerintegrations.tollgate.dev"])
        .expect("the CRD outlives the release");
}

// === RBAC ===

#[test]
fn cluster_wide_rbac_is_exactly_what_the_operator_needs() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("chart-rbac").unwrap();
    let app = cp.create_namespace("chart-rbac-app").unwrap();
    install(cp, "rbac", &ns, &[]);
    let sa_name = "rbac-tollgate-operator";
    let sa = format!("system:serviceaccount:{ns}:{sa_name}");

    let mut cluster = expect(TOKENREVIEW_RULES);
    cluster.extend(expect(WATCH_RULES));
    cluster.extend(webhook_cluster_rules("rbac"));
    let mut expected = vec![
        (String::new(), cluster),
        (ns.clone(), expect(LEASE_RULES)),
        (ns.clone(), webhook_secret_rules("rbac")),
    ];
    expected.sort();
    assert_eq!(
        bound_rules(cp, &ns, sa_name),
        expected,
        "the ServiceAccount is bound to more or less than operator/README.md and docs/injection.md list"
    );
    let ca_map = "configmaps/rbac-tollgate-operator-ca";
    let injector =
        "mutatingwebhookconfigurations.admissionregistration.k8s.io/rbac-tollgate-sidecar-injector";
    let webhook_secret = "secrets/rbac-tollgate-operator-webhook-tls";

    let pi = "partnerintegrations.tollgate.dev";
    let lease = "leases.coordination.k8s.io";
    let event = "events.events.k8s.io";
    let yes: &[(&str, &str, Option<&str>)] = &[
        ("get", pi, Some(&app)),
        ("list", pi, Some("*")),
        ("watch", pi, Some("*")),
        ("patch", pi, Some(&app)),
        (
            "patch",
            "partnerintegrations.tollgate.dev/status",
            Some(&app),
        ),
        ("get", "secrets", Some(&app)),
        ("list", "secrets", Some("*")),
        ("watch", "secrets", Some("*")),
        ("list", "configmaps", Some("*")),
        ("watch", "configmaps", Some("*")),
        ("get", "pods", Some(&app)),
        ("create", "tokenreviews.authentication.k8s.io", None),
        ("create", event, Some(&app)),
        ("patch", event, Some(&app)),
        ("get", lease, Some(&ns)),
        ("list", lease, Some(&ns)),
        ("watch", lease, Some(&ns)),
        ("create", lease, Some(&ns)),
        ("update", lease, Some(&ns)),
        ("patch", lease, Some(&ns)),
        ("list", "namespaces", None),
        ("watch", "namespaces", None),
        ("create", ca_map, Some(&app)),
        ("patch", ca_map, Some("default")),
        ("get", injector, None),
        ("watch", injector, None),
        ("patch", injector, None),
        ("get", webhook_secret, Some(&ns)),
        ("update", webhook_secret, Some(&ns)),
        ("create", "secrets", Some(&ns)),
    ];
    let no: &[(&str, &str, Option<&str>)] = &[
        ("delete", "pods", Some(&app)),
        ("list", "pods", Some(&app)),
        ("create", "pods", Some(&app)),
        ("create", "pods/exec", Some(&app)),
        ("create", "secrets", Some(&app)),
        ("update", "secrets", Some(&app)),
        ("patch", "secrets", Some(&app)),
        ("delete", "secrets", Some(&app)),
        ("create", pi, Some(&app)),
        ("update", pi, Some(&app)),
        ("delete", pi, Some(&app)),
        (
            "update",
            "partnerintegrations.tollgate.dev/status",
            Some(&app),
        ),
        ("create", lease, Some(&app)),
        ("get", lease, Some("kube-system")),
        ("delete", lease, Some(&ns)),
        ("delete", event, Some(&app)),
        ("create", "events", Some(&app)),
        ("get", "configmaps", Some(&app)),
        ("create", "serviceaccounts/token", Some(&ns)),
        ("impersonate", "serviceaccounts", Some(&app)),
        ("create", "clusterroles.rbac.authorization.k8s.io", None),
        (
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
        ),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            Some(&ns),
        ),
        ("escalate", "roles.rbac.authorization.k8s.io", Some(&ns)),
        (
            "update",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
        ),
        (
            "create",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        ("patch", "configmaps/coredns", Some("kube-system")),
        ("create", "configmaps/app-settings", Some(&app)),
        ("update", ca_map, Some(&app)),
        ("delete", ca_map, Some(&app)),
        ("get", "namespaces", None),
        ("delete", "namespaces", None),
        (
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/another-injector",
            None,
        ),
        (
            "list",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        ("delete", injector, None),
        (
            "patch",
            "validatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
        ),
        ("update", "secrets/another", Some(&ns)),
        ("delete", webhook_secret, Some(&ns)),
        ("*", "*", Some("*")),
    ];
    for &(verb, resource, where_) in yes {
        assert!(
            can_i(cp, &sa, verb, resource, where_),
            "the operator cannot {verb} {resource} in {where_:?}"
        );
    }
    for &(verb, resource, where_) in no {
        assert!(
            !can_i(cp, &sa, verb, resource, where_),
            "the operator may {verb} {resource} in {where_:?}"
        );
    }
}

#[test]
fn watch_namespaces_confine_secrets_to_those_namespaces() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("chart-scoped").unwrap();
    let app = cp.create_namespace("chart-scoped-app").unwrap();
    let other = cp.create_namespace("chart-scoped-other").unwrap();
    install(cp, "scoped", &ns, &[&format!("watchNamespaces={{{app}}}")]);
    let sa_name = "scoped-tollgate-operator";
    let sa = format!("system:serviceaccount:{ns}:{sa_name}");

    let mut cluster = expect(TOKENREVIEW_RULES);
    cluster.extend(webhook_cluster_rules("scoped"));
    let mut expected = vec![
        (String::new(), cluster),
        (app.clone(), expect(WATCH_RULES)),
        (ns.clone(), expect(LEASE_RULES)),
        (ns.clone(), webhook_secret_rules("scoped")),
    ];
    expected.sort();
    assert_eq!(bound_rules(cp, &ns, sa_name), expected);

    for verb in ["get", "list", "watch"] {
        assert!(
            can_i(cp, &sa, verb, "secrets", Some(&app)),
            "{verb} secrets in {app}"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some(&other)),
            "{verb} secrets in {other}"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some(&ns)),
            "{verb} secrets in its own namespace"
        );
        // Bar the one Secret of its webhook's certificate.
        assert!(
            can_i(
                cp,
                &sa,
                verb,
                "secrets/scoped-tollgate-operator-webhook-tls",
                Some(&ns)
            ),
            "{verb} its webhook Secret"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some("kube-system")),
            "{verb} secrets in kube-system"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some("*")),
            "{verb} secrets cluster-wide"
        );
        assert!(!can_i(
            cp,
            &sa,
            verb,
            "partnerintegrations.tollgate.dev",
            Some(&other)
        ));
    }
    assert!(!can_i(cp, &sa, "get", "pods", Some(&other)));
    assert!(can_i(cp, &sa, "get", "pods", Some(&app)));
    assert!(can_i(
        cp,
        &sa,
        "create",
        "tokenreviews.authentication.k8s.io",
        None
    ));

    let deploy = get_json(cp, &["deployment", "scoped-tollgate-operator", "-n", &ns]);
    let args = deploy["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains(&format!("--namespace={app}")), "{args}");
}

// === the operator and a sidecar on the chart's RBAC and certificate ===

/// A child process killed (and reaped) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on 127.0.0.1 now (the OS does not hand it out again at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over plain HTTP/1.0; (status, body), or None when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The operator binary as the chart's Deployment runs it (its arguments, bar the addresses and
/// file paths), authenticated as the chart's ServiceAccount with a real token (no admin
/// rights), serving the chart's certificate. Killed on drop.
struct ChartOperator {
    _process: Running,
    /// Ports of the sidecar channel and the admin listener, on 127.0.0.1.
    listen: u16,
    admin: u16,
    /// The sidecar channel's CA (the chart Secret's ca.crt).
    ca: PathBuf,
    log: PathBuf,
    identity: &'static str,
}

impl ChartOperator {
    /// Starts the operator of release `<release>` (the Deployment's name) in `ns`, its
    /// webhook on `webhook`, and waits until it is ready.
    fn start(
        cp: &ControlPlane,
        ns: &str,
        release: &str,
        dir: &Path,
        webhook: std::net::SocketAddr,
    ) -> ChartOperator {
        let deploy = get_json(cp, &["deployment", release, "-n", ns]);
        let container = &deploy["spec"]["template"]["spec"]["containers"][0];
        let (listen, admin) = (free_port(), free_port());
        let secret = format!("{release}-tls");
        let cert = secret_file(cp, ns, &secret, "tls.crt", dir);
        let key = secret_file(cp, ns, &secret, "tls.key", dir);
        let ca = secret_file(cp, ns, &secret, "ca.crt", dir);
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap();
                match a.split_once('=') {
                    Some(("--listen", _)) => format!("--listen=127.0.0.1:{listen}"),
                    Some(("--admin", _)) => format!("--admin=127.0.0.1:{admin}"),
                    Some(("--tls-cert", _)) => format!("--tls-cert={}", cert.display()),
                    Some(("--tls-key", _)) => format!("--tls-key={}", key.display()),
                    Some(("--webhook-listen", _)) => format!("--webhook-listen={webhook}"),
                    Some(("--sidecar-ca-file", _)) => {
                        format!("--sidecar-ca-file={}", ca.display())
                    }
                    // cert-manager's webhook certificate, from its Secret.
                    Some((flag @ ("--webhook-tls-cert" | "--webhook-tls-key"), path)) => {
                        let key = path.rsplit('/').next().unwrap();
                        let dir = dir.join("webhook");
                        std::fs::create_dir_all(&dir).unwrap();
                        let secret = format!("{release}-webhook-tls");
                        let file = secret_file(cp, ns, &secret, key, &dir);
                        format!("{flag}={}", file.display())
                    }
                    _ => a.to_owned(),
                }
            })
            .collect();
        let kubeconfig = dir.join("operator.kubeconfig");
        service_account_kubeconfig(cp, ns, release, &kubeconfig);
        let log = dir.join("operator.log");
        let identity = "chart-operator-0";
        let log_file = File::create(&log).unwrap();
        let process = Running(
            Command::new(tollgate_e2e::bins::operator_bin())
                .args(&args)
                .env("KUBECONFIG", &kubeconfig)
                .env("POD_NAME", identity)
                .env("POD_NAMESPACE", ns)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                // It logs to stdout; both streams go to one file.
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap(),
        );
        let operator = ChartOperator {
            _process: process,
            listen,
            admin,
            ca,
            log,
            identity,
        };
        wait_for("the operator's /readyz", Duration::from_secs(60), || {
            (http_get(admin, "/readyz")?.0 == 200).then_some(())
        });
        operator
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The chart's RBAC was enough for everything the operator did.
    fn assert_never_forbidden(&self) {
        let log = self.log();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "the operator was refused something its chart RBAC should allow:\n{log}"
        );
        assert!(log.contains("tollgate-operator started"), "{log}");
    }
}

/// Writes a kubeconfig that authenticates as `ns/sa` with a token from the TokenRequest API.
fn service_account_kubeconfig(cp: &ControlPlane, ns: &str, sa: &str, path: &Path) {
    let token = cp
        .kubectl(["create", "token", sa, "-n", ns, "--duration", "2h"])
        .unwrap();
    let ca = cp
        .kubectl([
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ])
        .unwrap();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cp", "cluster": {"server": cp.server(), "certificate-authority-data": ca.trim()}}],
        "users": [{"name": sa, "user": {"token": token.trim()}}],
        "contexts": [{"name": sa, "context": {"cluster": "cp", "user": sa}}],
        "current-context": sa,
    });
    std::fs::write(path, config.to_string()).unwrap();
}

fn secret_file(cp: &ControlPlane, ns: &str, name: &str, key: &str, dir: &Path) -> PathBuf {
    let template = format!("go-template={{{{index .data \"{key}\" | base64decode}}}}");
    let pem = cp
        .kubectl(["get", "secret", name, "-n", ns, "-o", &template])
        .unwrap();
    let path = dir.join(key);
    std::fs::write(&path, pem).unwrap();
    path
}

/// `can-i` says what RBAC allows; this shows it is enough. The operator binary runs with the
/// arguments the chart gives its Deployment, authenticated as the chart's ServiceAccount (a
/// real token, no admin rights) and serving the chart's certificate; it elects itself leader,
/// adds its finalizer, reads the Secret, writes status and events, and a sidecar authenticated
/// with a Pod-bound token subscribes over TLS, verifying the chart's CA and Service DNS name.
#[test]
fn the_operator_runs_on_the_charts_rbac_and_certificate() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let sidecar_bin = tollgate_e2e::bins::sidecar_bin();
    let ns = cp.create_namespace("chart-run").unwrap();
    let app = cp.create_namespace("chart-run-app").unwrap();
    install(
        cp,
        "run",
        &ns,
        &[
            &format!("watchNamespaces={{{app}}}"),
            "operator.statusInterval=1s",
            "operator.reportInterval=1s",
            "operator.logFormat=text",
        ],
    );
    let release = "run-tollgate-operator";
    let dir = target_dir().join("e2e-logs").join(format!("chart-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();

    let webhook = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let operator = ChartOperator::start(cp, &ns, release, &dir, webhook);
    let (listen, ca, identity) = (operator.listen, operator.ca.clone(), operator.identity);
    let holder = wait_for("the leader Lease", Duration::from_secs(30), || {
        let lease = cp
            .kubectl([
                "get",
                "lease",
                release,
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .ok()?;
        (!lease.is_empty()).then_some(lease)
    });
    assert_eq!(holder, identity);
    wait_for("the replica's peer Lease", Duration::from_secs(30), || {
        let name = format!("tollgate-peer-{identity}");
        cp.kubectl(["get", "lease", &name, "-n", &ns]).ok()
    });

    // A partner with a credential, in the watched namespace.
    let manifests = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
  {{"apiVersion":"v1","kind":"Secret","metadata":{{"name":"partner-api","namespace":"{app}","labels":{{"tollgate.dev/credential":"true"}}}},"stringData":{{"apiKey":"k-123"}}}},
  {{"apiVersion":"tollgate.dev/v1alpha1","kind":"PartnerIntegration","metadata":{{"name":"partner","namespace":"{app}"}},
    "spec":{{"upstream":{{"url":"http://127.0.0.1:9"}},"credentials":{{"secretRef":{{"name":"partner-api","key":"apiKey"}},"header":"Authorization","format":"Bearer {{value}}"}}}}}},
  {{"apiVersion":"v1","kind":"ServiceAccount","metadata":{{"name":"app","namespace":"{app}"}}}}
]}}"#
    );
    cp.kubectl_with_stdin(["apply", "-f", "-"], &manifests)
        .unwrap();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app-0", "namespace": app, "labels": {"app": "checkout"}},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    });
    cp.kubectl_with_stdin(["apply", "-f", "-"], &pod.to_string())
        .unwrap();

    let ready = |pi: &Value| {
        pi["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    };
    let pi = wait_for(
        "status Ready=True written by the operator",
        Duration::from_secs(30),
        || {
            let pi = get_json(cp, &["pi", "partner", "-n", &app]);
            ready(&pi).then_some(pi)
        },
    );
    assert_eq!(
        pi["metadata"]["finalizers"],
        json!(["tollgate.dev/cleanup"])
    );

    // The sidecar, as an injected one would run: Pod-bound token, the chart's CA, the
    // Service's DNS name checked on the operator's certificate.
    let uid = cp
        .kubectl([
            "get",
            "pod",
            "app-0",
            "-n",
            &app,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .unwrap();
    let token = cp
        .kubectl([
            "create",
            "token",
            "app",
            "-n",
            &app,
            "--audience",
            "tollgate",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "app-0",
            "--bound-object-uid",
            &uid,
        ])
        .unwrap();
    let token_file = dir.join("sidecar.token");
    std::fs::write(&token_file, token.trim()).unwrap();
    let (proxy, sidecar_admin) = (free_port(), free_port());
    let _sidecar = Running(
        Command::new(sidecar_bin)
            .args([
                "--operator".to_owned(),
                format!("https://127.0.0.1:{listen}"),
                "--operator-server-name".to_owned(),
                format!("{release}.{ns}.svc"),
                "--operator-ca".to_owned(),
                ca.display().to_string(),
                "--token-file".to_owned(),
                token_file.display().to_string(),
                "--state-file".to_owned(),
                dir.join("sidecar-state.json").display().to_string(),
                "--listen".to_owned(),
                format!("127.0.0.1:{proxy}"),
                "--admin".to_owned(),
                format!("127.0.0.1:{sidecar_admin}"),
            ])
            .env("POD_NAME", "app-0")
            .env("POD_NAMESPACE", &app)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("sidecar.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let config = wait_for(
        "the sidecar's revision from the operator",
        Duration::from_secs(30),
        || {
            let (status, body) = http_get(sidecar_admin, "/config")?;
            let config: Value = serde_json::from_str(&body).ok()?;
            (status == 200
                && config["integrations"]
                    .as_array()
                    .is_some_and(|i| !i.is_empty()))
            .then_some(config)
        },
    );
    let integration = &config["integrations"][0];
    assert_eq!(integration["credentials"]["loaded"], true, "{config}");
    wait_for(
        "status.sidecars.desired = 1",
        Duration::from_secs(30),
        || {
            (get_json(cp, &["pi", "partner", "-n", &app])["status"]["sidecars"]["desired"] == 1)
                .then_some(())
        },
    );

    // Events through events.k8s.io.
    cp.kubectl([
        "patch",
        "pi",
        "partner",
        "-n",
        &app,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"killSwitch":{"enabled":true,"reason":"chart test"}}}"#,
    ])
    .unwrap();
    wait_for("a KillSwitchEnabled event", Duration::from_secs(30), || {
        let events = get_json(cp, &["events.events.k8s.io", "-n", &app]);
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "KillSwitchEnabled")
            .then_some(())
    });

    operator.assert_never_forbidden();
}

// === the injection webhook, as the chart wires it ===

/// This machine's first global IPv4 address. The API server reaches a webhook Service at an
/// endpoint of its EndpointSlices (aggregator routing), and a slice may not hold a loopback
/// address.
fn host_address() -> std::net::Ipv4Addr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("`ip` (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no global IPv4 address on this machine (`ip -4 addr`):\n{text}"))
}

/// A namespace for pods: with the `default` ServiceAccount (no controller-manager makes it) and
/// `labels`, which select it for the webhooks of the release in `release_ns`.
fn pod_namespace(cp: &ControlPlane, prefix: &str, labels: &[String]) -> String {
    let ns = cp.create_namespace(prefix).unwrap();
    cp.kubectl(["create", "serviceaccount", "default", "-n", &ns])
        .unwrap();
    let mut args = vec!["label".to_owned(), "namespace".to_owned(), ns.clone()];
    args.extend(labels.iter().cloned());
    cp.kubectl(&args).unwrap();
    ns
}

/// An address on this machine for the operator's webhook, published as the endpoint of the
/// Service `service` in `ns` (no kubelet runs the Deployment's pods, so no controller fills
/// the slice).
fn webhook_endpoint(cp: &ControlPlane, ns: &str, service: &str) -> std::net::SocketAddr {
    let host = host_address();
    let port = TcpListener::bind((host, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cp.kubectl_with_stdin(
        ["apply", "-f", "-"],
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-e2e"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [host.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "webhook", "port": port, "protocol": "TCP"}],
        })
        .to_string(),
    )
    .unwrap();
    (host, port).into()
}

/// `kubectl create -o json` of `object`: what the API server stored, after admission.
fn create(cp: &ControlPlane, object: &Value) -> anyhow::Result<Value> {
    let out = cp.kubectl_with_stdin(["create", "-o", "json", "-f", "-"], &object.to_string())?;
    Ok(serde_json::from_str(&out)?)
}

fn pod(ns: &str, name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    })
}

/// Creates pods `<prefix>-1`, `<prefix>-2`, … until one is stored with the
/// `tollgate.dev/injected` annotation: the API server picks up a namespace's labels and the
/// configuration's caBundle from its informers, a moment after they change.
fn create_until_injected(cp: &ControlPlane, ns: &str, prefix: &str, annotations: Value) -> Value {
    let mut attempt = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        attempt += 1;
        let stored = create(
            cp,
            &pod(ns, &format!("{prefix}-{attempt}"), annotations.clone()),
        );
        let last = match stored {
            Ok(p) if !p["metadata"]["annotations"]["tollgate.dev/injected"].is_null() => {
                return p;
            }
            Ok(p) => format!("created uninjected:\n{p:#}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            Instant::now() < deadline,
            "no pod in {ns} injected after 60s; the last attempt: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {list:#}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

/// The chart's webhook end to end: the operator, run with the Deployment's arguments on the
/// chart's RBAC, serves the webhook behind the chart's Service, writes its CA into the chart's
/// MutatingWebhookConfiguration and publishes the sidecar channel's CA; the API server calls it
/// through the Service and trusts it through that caBundle; pods get the sidecar the chart's
/// values describe; and `helm upgrade` leaves the caBundle the operator wrote.
#[test]
fn the_charts_webhook_injects_pods_through_its_service() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("chart-inject").unwrap();
    // An empty watched namespace: this operator must not reconcile other tests' integrations.
    let watched = cp.create_namespace("chart-inject-pis").unwrap();
    let sets = [
        format!("watchNamespaces={{{watched}}}"),
        "operator.logFormat=text".to_owned(),
        "sidecar.image.tag=e2e".to_owned(),
        "sidecar.initImage.tag=e2e-init".to_owned(),
        "sidecar.interceptPorts={80,443,8080}".to_owned(),
        "sidecar.interceptExcludeCidrs={10.96.0.0/12}".to_owned(),
        "sidecar.extraArgs={--unknown-hosts=deny}".to_owned(),
        "sidecar.startup.timeout=45s".to_owned(),
        "sidecar.telemetry.otlpEndpoint=http://otel-collector.observability.svc:4318".to_owned(),
        "sidecar.telemetry.sampler=parentbased_traceidratio".to_owned(),
        "sidecar.telemetry.samplerArg=0.25".to_owned(),
        r"sidecar.telemetry.resourceAttributes.deployment\.environment=e2e".to_owned(),
        "monitoring.scrapeAnnotations=true".to_owned(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    install(cp, "inj", &ns, &sets);
    let release = "inj-tollgate-operator";
    let injector = "inj-tollgate-sidecar-injector";
    let dir = target_dir().join("e2e-logs").join(format!("chart-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();

    let webhook = webhook_endpoint(cp, &ns, release);
    let operator = ChartOperator::start(cp, &ns, release, &dir, webhook);

    // The leader's CA, in the chart's configuration, for both webhooks.
    let bundle = wait_for(
        "the operator's caBundle in the chart's configuration",
        Duration::from_secs(60),
        || {
            let cfg = get_json(cp, &["mutatingwebhookconfiguration", injector]);
            let bundles: Vec<&str> = cfg["webhooks"]
                .as_array()?
                .iter()
                .map(|w| w["clientConfig"]["caBundle"].as_str().unwrap_or(""))
                .collect();
            (bundles.len() == 2 && !bundles[0].is_empty() && bundles[0] == bundles[1])
                .then(|| bundles[0].to_owned())
        },
    );
    let secret = get_json(
        cp,
        &["secret", &format!("{release}-webhook-tls"), "-n", &ns],
    );
    assert_eq!(
        secret["data"]["ca.crt"], bundle,
        "caBundle is not the operator's CA"
    );

    // A namespace labelled for injection (the chart's namespace.inject webhook, Fail).
    let selected = format!("{RELEASE_LABEL}={ns}");
    let labelled = pod_namespace(
        cp,
        "chart-inject-app",
        &["tollgate.dev/inject=enabled".to_owned(), selected.clone()],
    );
    let injected = create_until_injected(cp, &labelled, "checkout", json!({}));
    assert_eq!(
        injected["metadata"]["annotations"]["tollgate.dev/injected"], "iptables",
        "{injected:#}"
    );
    let inits = &injected["spec"]["initContainers"];
    let names: Vec<&str> = inits
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tollgate-init", "tollgate-sidecar"]);
    // What the chart's values said.
    let init = named(inits, "tollgate-init");
    assert_eq!(
        init["image"],
        "ghcr.io/tollgate-dev/tollgate-sidecar-init:e2e-init"
    );
    assert_eq!(init["imagePullPolicy"], "IfNotPresent");
    assert_eq!(
        init["resources"],
        json!({"limits": {"memory": "64Mi"}, "requests": {"cpu": "10m", "memory": "16Mi"}})
    );
    let init_args = strings(&init["args"]);
    assert!(init_args.contains(&"--ports=80,443,8080"), "{init_args:?}");
    assert!(init_args.contains(&"--proxy-uid=1337"), "{init_args:?}");
    assert!(
        init_args
            .iter()
            .any(|a| a.starts_with("--exclude-cidrs=") && a.contains("10.96.0.0/12")),
        "{init_args:?}"
    );
    let sidecar = named(inits, "tollgate-sidecar");
    assert_eq!(
        sidecar["image"],
        "ghcr.io/tollgate-dev/tollgate-sidecar:e2e"
    );
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        sidecar["resources"],
        json!({"limits": {"memory": "128Mi"}, "requests": {"cpu": "20m", "memory": "32Mi"}})
    );
    // The app waits for a revision in force, at most sidecar.startup.timeout, failing closed.
    assert_eq!(
        sidecar["startupProbe"],
        json!({"httpGet": {"path": "/readyz", "port": 15090, "scheme": "HTTP"},
               "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 45,
               "successThreshold": 1})
    );
    let args = strings(&sidecar["args"]);
    let operator_url = format!("--operator=https://{release}.{ns}.svc.cluster.local.:8443");
    for a in [operator_url.as_str(), "--unknown-hosts=deny"] {
        assert!(args.contains(&a), "{a} not in {args:?}");
    }
    // Its traces go where sidecar.telemetry says, the resource naming the pod (the kubelet
    // expands $(POD_NAME) from the variable before it).
    let env = &sidecar["env"];
    let names: Vec<&str> = env
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().position(|n| *n == "POD_NAME")
            < names.iter().position(|n| *n == "OTEL_RESOURCE_ATTRIBUTES"),
        "{names:?}"
    );
    for (name, value) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://otel-collector.observability.svc:4318",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ("OTEL_SERVICE_NAME", "tollgate-sidecar"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),deployment.environment=e2e",
        ),
    ] {
        assert_eq!(named(env, name)["value"], value, "{name}");
    }
    // monitoring.scrapeAnnotations: annotation-driven scrapers find the sidecar's /metrics.
    let annotations = &injected["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true", "{annotations}");
    assert_eq!(annotations["prometheus.io/port"], "15090", "{annotations}");
    assert_eq!(
        annotations["prometheus.io/path"], "/metrics",
        "{annotations}"
    );
    let identity = named(&injected["spec"]["volumes"], "tollgate-identity");
    let sources = identity["projected"]["sources"].to_string();
    assert!(
        sources.contains(r#""name":"inj-tollgate-operator-ca""#)
            && sources.contains(r#""audience":"tollgate""#)
            && sources.contains(r#""expirationSeconds":3600"#),
        "{sources}"
    );

    // The sidecars' CA, published where that volume reads it: the chart's ca.crt.
    let want_ca = std::fs::read_to_string(&operator.ca).unwrap();
    wait_for(
        "the CA ConfigMap in the labelled namespace",
        Duration::from_secs(30),
        || {
            let cm = cp
                .kubectl([
                    "get",
                    "configmap",
                    "inj-tollgate-operator-ca",
                    "-n",
                    &labelled,
                    "-o",
                    "json",
                ])
                .ok()?;
            let cm: Value = serde_json::from_str(&cm).ok()?;
            (cm["data"]["ca.crt"].as_str()? == want_ca).then_some(())
        },
    );

    // Another namespace (the chart's pod.inject webhook, Ignore): only an annotated pod.
    let other = pod_namespace(cp, "chart-inject-other", &[selected]);
    let annotated = create_until_injected(
        cp,
        &other,
        "annotated",
        json!({"tollgate.dev/inject": "true", "tollgate.dev/interception": "proxy-env",
               "prometheus.io/port": "9100"}),
    );
    assert_eq!(
        annotated["metadata"]["annotations"]["tollgate.dev/injected"],
        "proxy-env"
    );
    // A scrape annotation the pod sets itself is its own.
    assert_eq!(
        annotated["metadata"]["annotations"]["prometheus.io/port"],
        "9100"
    );
    assert_eq!(
        annotated["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let app = named(&annotated["spec"]["containers"], "app");
    assert_eq!(
        named(&app["env"], "HTTP_PROXY")["value"],
        "http://127.0.0.1:15080"
    );
    let plain = create(cp, &pod(&other, "plain", json!({}))).unwrap();
    assert!(
        plain["spec"]["initContainers"].is_null()
            && plain["metadata"]["annotations"]["tollgate.dev/injected"].is_null(),
        "a pod that did not opt in was injected:\n{plain:#}"
    );
    // Both went through this operator's webhook.
    let (_, metrics) = http_get(operator.admin, "/metrics").unwrap();
    for (outcome, reason) in [("injected", "iptables"), ("injected", "proxy-env")] {
        let line = format!(
            "tollgate_operator_webhook_admissions_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} "
        );
        let count: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "no {line} in:\n{metrics}");
    }
    operator.assert_never_forbidden();

    // Helm's three-way merge leaves the caBundle the operator wrote (the operator is stopped,
    // so nothing could put it back).
    drop(operator);
    let mut upgraded = sets.clone();
    upgraded.push("operator.logLevel=debug");
    upgrade(cp, "inj", &ns, &upgraded);
    let cfg = get_json(cp, &["mutatingwebhookconfiguration", injector]);
    for w in cfg["webhooks"].as_array().unwrap() {
        assert_eq!(
            w["clientConfig"]["caBundle"], bundle,
            "helm upgrade reset it: {w}"
        );
    }
    cp.helm(["uninstall", "inj", "-n", &ns]).unwrap();
    assert!(
        cp.kubectl(["get", "mutatingwebhookconfiguration", injector])
            .is_err()
    );
}

/// cert-manager's part, played by the test: the two kinds the chart renders, as CRDs whose
/// schema is left open, so a release with `certManager.enabled` installs.
fn cert_manager_crds(cp: &ControlPlane) {
    for (kind, plural) in [("Certificate", "certificates"), ("Issuer", "issuers")] {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.cert-manager.io")},
            "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                     "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                     "versions": [{"name": "v1", "served": true, "storage": true,
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                              "x-kubernetes-preserve-unknown-fields": true}}}]}
        });
        cp.kubectl_with_stdin(["apply", "-f", "-"], &crd.to_string())
            .unwrap();
        cp.kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            &format!("crd/{plural}.cert-manager.io"),
        ])
        .unwrap();
    }
}

/// What cert-manager would do for the release in `ns`: issue every non-CA Certificate into its
/// Secret (tls.crt, tls.key, ca.crt; signed by one CA, for the Certificate's dnsNames), then, as
/// its CA injector, copy the CA named by each MutatingWebhookConfiguration's
/// `cert-manager.io/inject-ca-from` into its caBundle. Returns that caBundle.
fn issue_like_cert_manager(cp: &ControlPlane, ns: &str, configuration: &str) -> String {
    let ca = TestCa::named("e2e cert-manager CA");
    let certificates = get_json(cp, &["certificates.cert-manager.io", "-n", ns]);
    let mut issued = 0;
    for c in certificates["items"].as_array().unwrap() {
        if c["spec"]["isCA"] == true {
            continue;
        }
        let names: Vec<&str> = c["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        let leaf = ca.issue(&names);
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": c["spec"]["secretName"], "namespace": ns},
            "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.ca_pem},
        });
        cp.kubectl_with_stdin(["apply", "-f", "-"], &secret.to_string())
            .unwrap();
        issued += 1;
    }
    assert_eq!(issued, 2, "the channel's and the webhook's certificates");

    let cfg = get_json(cp, &["mutatingwebhookconfiguration", configuration]);
    let from = cfg["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .expect("the configuration names its Certificate for cert-manager's CA injector");
    let (cert_ns, cert_name) = from.split_once('/').unwrap();
    let certificate = get_json(
        cp,
        &["certificates.cert-manager.io", cert_name, "-n", cert_ns],
    );
    let secret_name = certificate["spec"]["secretName"].as_str().unwrap();
    let secret = get_json(cp, &["secret", secret_name, "-n", cert_ns]);
    let bundle = secret["data"]["ca.crt"].as_str().unwrap().to_owned();
    let ops: Vec<Value> = (0..cfg["webhooks"].as_array().unwrap().len())
        .map(|i| json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle}))
        .collect();
    cp.kubectl([
        "patch",
        "mutatingwebhookconfiguration",
        configuration,
        "--type",
        "json",
        "-p",
        &Value::from(ops).to_string(),
    ])
    .unwrap();
    bundle
}

/// With `certManager.enabled` the operator serves the webhook certificate cert-manager issued,
/// read from the mounted Secret, on the narrower RBAC (no webhook Secret, no configuration
/// rights): the API server trusts it through the caBundle cert-manager's injector wrote, pods
/// are injected, and the operator neither writes a CA of its own nor touches the caBundle.
#[test]
fn with_cert_manager_the_webhook_serves_its_certificate_on_narrower_rbac() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    cert_manager_crds(cp);
    let ns = cp.create_namespace("chart-cm").unwrap();
    let watched = cp.create_namespace("chart-cm-pis").unwrap();
    install(
        cp,
        "cm",
        &ns,
        &[
            "certManager.enabled=true",
            &format!("watchNamespaces={{{watched}}}"),
            "operator.logFormat=text",
        ],
    );
    let release = "cm-tollgate-operator";
    let injector = "cm-tollgate-sidecar-injector";

    let mut cluster = expect(TOKENREVIEW_RULES);
    cluster.extend(
        webhook_cluster_rules("cm")
            .into_iter()
            .filter(|(_, resource, _, _)| resource != "mutatingwebhookconfigurations"),
    );
    let mut expected = vec![
        (String::new(), cluster),
        (watched.clone(), expect(WATCH_RULES)),
        (ns.clone(), expect(LEASE_RULES)),
    ];
    expected.sort();
    assert_eq!(
        bound_rules(cp, &ns, release),
        expected,
        "cert-manager mode needs no webhook Secret or configuration rights"
    );

    let bundle = issue_like_cert_manager(cp, &ns, injector);
    let dir = target_dir().join("e2e-logs").join(format!("chart-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    let webhook = webhook_endpoint(cp, &ns, release);
    let operator = ChartOperator::start(cp, &ns, release, &dir, webhook);

    let labelled = pod_namespace(
        cp,
        "chart-cm-app",
        &[
            "tollgate.dev/inject=enabled".to_owned(),
            format!("{RELEASE_LABEL}={ns}"),
        ],
    );
    let injected = create_until_injected(cp, &labelled, "checkout", json!({}));
    assert_eq!(
        injected["metadata"]["annotations"]["tollgate.dev/injected"],
        "iptables"
    );
    let sidecar = named(&injected["spec"]["initContainers"], "tollgate-sidecar");
    let operator_url = format!("--operator=https://{release}.{ns}.svc.cluster.local.:8443");
    assert!(
        strings(&sidecar["args"]).contains(&operator_url.as_str()),
        "{sidecar:#}"
    );

    // cert-manager's caBundle and Secret, untouched: the operator keeps no CA of its own.
    let cfg = get_json(cp, &["mutatingwebhookconfiguration", injector]);
    for w in cfg["webhooks"].as_array().unwrap() {
        assert_eq!(w["clientConfig"]["caBundle"], bundle.as_str(), "{w}");
    }
    let secret = get_json(
        cp,
        &["secret", &format!("{release}-webhook-tls"), "-n", &ns],
    );
    let keys: BTreeSet<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"]));
    operator.assert_never_forbidden();
    drop(operator);
    cp.helm(["uninstall", "cm", "-n", &ns]).unwrap();
}

/// The chart rendered with `sets`, as the API server stores it (server-side dry run).
fn dry_run_objects(cp: &ControlPlane, release: &str, ns: &str, sets: &[&str]) -> Vec<Value> {
    let manifests = template(cp, release, ns, sets);
    let out = cp
        .kubectl_with_stdin(
            ["apply", "--dry-run=server", "-o", "json", "-f", "-"],
            &manifests,
        )
        .unwrap_or_else(|e| panic!("the API server refuses the chart with {sets:?}: {e}"));
    let v: Value = serde_json::from_str(&out).unwrap();
    match v["items"].as_array() {
        Some(items) => items.clone(),
        None => vec![v],
    }
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// The operator's ports a NetworkPolicy's ingress admits, with whom it admits there.
fn admitted(policy: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for rule in policy["spec"]["ingress"].as_array().unwrap() {
        for port in rule["ports"].as_array().unwrap() {
            out.push((
                port["port"].as_str().unwrap().to_owned(),
                rule.get("from").cloned().unwrap_or(Value::Null),
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// By default a NetworkPolicy lets the operator's pods be reached only where they must: the
/// sidecar channel from pods (any namespace may run injected pods), the webhook from the API
/// server (whose address the chart cannot know), and the admin port from no one.
#[test]
fn the_network_policy_is_on_by_default_and_admits_only_what_must_reach_the_operator() {
    let cp = ControlPlane::shared();
    let ns = cp.create_namespace("chart-netpol").unwrap();
    let objects = dry_run_objects(cp, "np", &ns, &[]);
    let policies = of_kind(&objects, "NetworkPolicy");
    assert_eq!(policies.len(), 1, "one NetworkPolicy by default");
    let policy = policies[0];
    assert_eq!(policy["metadata"]["name"], "np-tollgate-operator");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    // It selects exactly the operator's pods.
    let deployment = of_kind(&objects, "Deployment")[0];
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        admitted(policy),
        [
            ("sidecars".to_owned(), json!([{"namespaceSelector": {}}])),
            ("webhook".to_owned(), Value::Null),
        ]
    );
    // Every port it names is one of the operator container's.
    let ports: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        ports.contains(&"sidecars") && ports.contains(&"webhook"),
        "{ports:?}"
    );

    // Scrapers are let in by name; without the webhook its port is closed too.
    let objects = dry_run_objects(
        cp,
        "np",
        &ns,
        &[
            "networkPolicy.adminFrom[0].namespaceSelector.matchLabels.team=observability",
            "webhook.enabled=false",
        ],
    );
    assert_eq!(
        admitted(of_kind(&objects, "NetworkPolicy")[0]),
        [
            (
                "admin".to_owned(),
                json!([{"namespaceSelector": {"matchLabels": {"team": "observability"}}}])
            ),
            ("sidecars".to_owned(), json!([{"namespaceSelector": {}}])),
        ]
    );
    let objects = dry_run_objects(cp, "np", &ns, &["networkPolicy.enabled=false"]);
    assert!(of_kind(&objects, "NetworkPolicy").is_empty());
}

/// The injected sidecar's startup gate and the operator's address, as the chart passes them.
#[test]
fn the_startup_gate_is_set_from_values_and_sidecars_reach_the_operator_by_its_full_name() {
    let cp = ControlPlane::shared();
    let ns = cp.create_namespace("chart-startup").unwrap();
    let args = |sets: &[&str]| -> Vec<String> {
        let objects = dry_run_objects(cp, "gate", &ns, sets);
        let deployment = of_kind(&objects, "Deployment")[0];
        deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let defaults = args(&[]);
    for want in [
        "--sidecar-startup-timeout=60s".to_owned(),
        "--sidecar-startup-on-timeout=fail".to_owned(),
        // Fully qualified with a trailing dot: never resolved through the pod's search path.
        format!(
            "--sidecar-operator-url=https://gate-tollgate-operator.{ns}.svc.cluster.local.:8443"
        ),
    ] {
        assert!(defaults.contains(&want), "{want} not in {defaults:?}");
    }
    let set = args(&[
        "sidecar.startup.timeout=2m",
        "sidecar.startup.onTimeout=open",
        "clusterDomain=corp.example",
    ]);
    for want in [
        "--sidecar-startup-timeout=2m".to_owned(),
        "--sidecar-startup-on-timeout=open".to_owned(),
        format!(
            "--sidecar-operator-url=https://gate-tollgate-operator.{ns}.svc.corp.example.:8443"
        ),
    ] {
        assert!(set.contains(&want), "{want} not in {set:?}");
    }
    // The schema refuses what the operator would.
    let chart = chart_arg();
    for bad in [
        "sidecar.startup.onTimeout=maybe",
        "sidecar.startup.timeout=soon",
    ] {
        let (ok, out) = helm_outcome(cp, &["template", "gate", &chart, "--set", bad]);
        assert!(!ok && out.contains("startup"), "{bad}: {out}");
    }
}

// === credential Secrets: read only, where watched ===

/// The operator's Secret access on the chart's RBAC: it lists and watches credential Secrets
/// (label `tollgate.dev/credential=true`) in the watched namespaces, exactly as it does at run
/// time (a label-selected list as its ServiceAccount), and can write none there nor read any
/// elsewhere.
#[test]
fn the_operator_may_only_read_secrets_and_only_where_it_watches() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("chart-creds").unwrap();
    let app = cp.create_namespace("chart-creds-app").unwrap();
    let other = cp.create_namespace("chart-creds-other").unwrap();
    install(cp, "creds", &ns, &[&format!("watchNamespaces={{{app}}}")]);
    let sa = format!("system:serviceaccount:{ns}:creds-tollgate-operator");

    for verb in ["list", "watch"] {
        assert!(
            can_i(cp, &sa, verb, "secrets", Some(&app)),
            "{verb} in {app}"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some(&other)),
            "{verb} in {other}"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some("*")),
            "{verb} cluster-wide"
        );
    }
    for verb in ["create", "update", "patch", "delete", "deletecollection"] {
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some(&app)),
            "{verb} in {app}"
        );
        assert!(
            !can_i(cp, &sa, verb, "secrets", Some(&other)),
            "{verb} in {other}"
        );
    }
    assert!(!can_i(cp, &sa, "get", "secrets/anything", Some(&other)));

    // What the operator does, as its ServiceAccount: the label-selected list.
    let list = |namespace: &str| {
        cp.kubectl([
            "get",
            "secrets",
            "-n",
            namespace,
            "-l",
            "tollgate.dev/credential=true",
            "--as",
            &sa,
            "-o",
            "name",
        ])
    };
    list(&app).expect("the credential list in a watched namespace");
    let refused = list(&other).expect_err("no list outside the watched namespaces");
    assert!(format!("{refused:#}").contains("forbidden"), "{refused:#}");
}
