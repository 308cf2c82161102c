//! The chart's monitoring (docs/operations.md): the PrometheusRule passes `promtool check rules`
//! and the unit tests of `tests/rules/alerts.test.yaml`, which cover every alert; every metric
//! the rules and the Grafana dashboard name is one a running sidecar or operator exports; and
//! the PodMonitor, PrometheusRule and dashboard render, lint and pass a server-side dry run, on
//! and off.
//!
//! The Prometheus Operator's kinds are CRDs the test creates with an open schema (what the
//! Prometheus Operator would install), so the API server accepts the objects; promtool, built
//! from its Go module by `tests/build-tools.sh`, judges the rules themselves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_e2e::net::metric;
use tollgate_e2e::objects;
use tollgate_e2e::tools::{build_tool, workspace_root};
use tollgate_e2e::{ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig};
use tollgate_e2e::{eventually, eventually_every};
use tollgate_testkit::Reply;

use crate::crd::install_crd;

const RUNBOOK: &str = "docs/runbook.md";

fn chart() -> String {
    workspace_root()
        .join("charts/tollgate")
        .to_string_lossy()
        .into_owned()
}

/// promtool, built on first use (a no-op when it is up to date).
fn promtool() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(|| build_tool("promtool").map_err(|e| format!("{e:#}"))) {
        Ok(p) => p,
        Err(e) => panic!("e2e tool promtool is not available: {e}"),
    }
}

/// The Prometheus Operator's kinds the chart renders, with open schemas.
fn monitoring_crds(cp: &ControlPlane) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for (kind, plural) in [
            ("PodMonitor", "podmonitors"),
            ("PrometheusRule", "prometheusrules"),
            ("ServiceMonitor", "servicemonitors"),
        ] {
            let crd = json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
                "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
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
                &format!("crd/{plural}.monitoring.coreos.com"),
            ])
            .unwrap();
        }
    });
}

/// The chart rendered with `sets`, as the API server would store it (server-side dry run).
/// `json_sets` go through `--set-json` (typed as users' values files type them).
fn dry_run(cp: &ControlPlane, ns: &str, sets: &[&str], json_sets: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec!["template", "mon", chart.as_str(), "--namespace", ns];
    for s in sets {
        args.extend(["--set", s]);
    }
    for s in json_sets {
        args.extend(["--set-json", s]);
    }
    let manifests = cp
        .helm(&args)
        .unwrap_or_else(|e| panic!("helm template {sets:?}: {e}"));
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

const ALL_ON: [&str; 3] = [
    "monitoring.podMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
];

/// The PrometheusRule and the dashboard as the chart renders them by default (all on).
fn rendered(cp: &ControlPlane) -> &'static (Value, Value) {
    static RENDERED: OnceLock<(Value, Value)> = OnceLock::new();
    RENDERED.get_or_init(|| {
        monitoring_crds(cp);
        let ns = cp.create_namespace("monitoring-render").unwrap();
        let objects = dry_run(cp, &ns, &ALL_ON, &[]);
        let rule = of_kind(&objects, "PrometheusRule")[0].clone();
        let cm = of_kind(&objects, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == "mon-tollgate-dashboard")
            .expect("the dashboard ConfigMap")
            .clone();
        let dashboard: Value =
            serde_json::from_str(cm["data"]["tollgate.json"].as_str().unwrap()).unwrap();
        (rule, dashboard)
    })
}

/// The alerts of a rendered PrometheusRule.
fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

fn promtool_run(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

// === the rules ===

/// `promtool check rules` accepts the rendered rules (and finds no lint), and `promtool test
/// rules` passes tests/rules/alerts.test.yaml, which has a firing case for every alert.
#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let cp = ControlPlane::shared();
    let (rule, _) = rendered(cp);
    let dir = tempfile::Builder::new()
        .prefix("tollgate-rules-")
        .tempdir()
        .unwrap();
    // A rule file is the PrometheusRule's spec; JSON is YAML.
    std::fs::write(dir.path().join("rules.json"), rule["spec"].to_string()).unwrap();
    let tests =
        std::fs::read_to_string(workspace_root().join("tests/rules/alerts.test.yaml")).unwrap();
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests).unwrap();

    let checked = promtool_run(
        dir.path(),
        &["check", "rules", "--lint-fatal", "rules.json"],
    );
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool_run(dir.path(), &["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert: a severity, the two labels that route it, a summary, a runbook section, and
    // a unit test where it fires.
    let runbook = std::fs::read_to_string(workspace_root().join(RUNBOOK)).unwrap();
    let all = alerts(rule);
    assert!(all.len() >= 11, "{all:#?}");
    for a in all {
        let name = a["alert"].as_str().unwrap();
        let labels = &a["labels"];
        assert!(
            ["critical", "warning", "info"].contains(&labels["severity"].as_str().unwrap_or("")),
            "{name}: {labels}"
        );
        let expr = a["expr"].as_str().unwrap();
        // Per-integration alerts take namespace from the integration label; the operator's
        // carry its namespace and integration "*".
        assert!(
            expr.contains(r#""namespace", "$1", "integration""#)
                || (labels["integration"] == "*" && expr.contains("by (namespace")),
            "{name} does not carry integration and namespace: {expr}"
        );
        assert!(
            a["annotations"]["summary"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let url = a["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.rsplit_once('#').map(|(_, a)| a).unwrap_or("");
        assert_eq!(anchor, name.to_lowercase(), "{name}: {url}");
        assert!(
            runbook.contains(&format!("\n## {name}\n")),
            "{RUNBOOK} has no section for {name}"
        );
        let firing_case = format!("alertname: {name}\n        exp_alerts:\n          - ");
        assert!(
            tests.contains(&firing_case),
            "tests/rules/alerts.test.yaml has no case where {name} fires"
        );
    }
}

// === every metric the rules and the dashboard name is exported ===

/// `tollgate_…` names in PromQL (recording rules' `tollgate:…` names are not metrics).
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("tollgate_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
}

/// The label names each `tollgate_…{…}` selector in PromQL matches on, by metric name. The
/// scrape's own labels (`namespace`, `pod`) are left out.
fn selector_labels(expr: &str, out: &mut BTreeSet<(String, String)>) {
    let mut names = BTreeSet::new();
    metric_names(expr, &mut names);
    for name in names {
        let pattern = format!("{name}{{");
        let mut rest = expr;
        while let Some(at) = rest.find(&pattern) {
            let after = &rest[at + pattern.len()..];
            let Some(end) = after.find('}') else { break };
            for matcher in after[..end].split(',') {
                let key = matcher.trim().split(['=', '!']).next().unwrap_or("").trim();
                if !key.is_empty() && !["namespace", "pod"].contains(&key) {
                    out.insert((name.clone(), key.to_string()));
                }
            }
            rest = &after[end..];
        }
    }
}

/// Every PromQL expression of the dashboard (panels, variables, annotations).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// The metric family a sample name belongs to, and the type it must have: counters' samples
/// end in `_total`, histograms' in `_bucket`, `_count` or `_sum`.
fn family(name: &str) -> (&str, &'static str) {
    for (suffix, kind) in [
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_count", "histogram"),
        ("_sum", "histogram"),
    ] {
        if let Some(f) = name.strip_suffix(suffix) {
            return (f, kind);
        }
    }
    (name, "gauge")
}

/// The `(metric, label)` pairs of `wanted` that no sample of the metric in `exposition` carries.
fn missing_labels(exposition: &str, wanted: &BTreeSet<(String, String)>) -> Vec<String> {
    wanted
        .iter()
        .filter(|(name, _)| !FAULT_ONLY.iter().any(|f| f.0 == name))
        .filter(|(name, label)| {
            !exposition.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .and_then(|rest| rest.strip_prefix('{'))
                    .is_some_and(|rest| {
                        rest.starts_with(&format!("{label}=\""))
                            || rest.contains(&format!(",{label}=\""))
                    })
            })
        })
        .map(|(name, label)| format!("{name} has no label {label}"))
        .collect()
}

/// Metrics that appear only with a fault this test does not stage (an API server error during a
/// reconcile, an integration the operator accepts but a sidecar cannot compile, an OAuth2
/// token endpoint that fails): an empty family
/// is not in the exposition, so for these the name must be the one the binary registers.
const FAULT_ONLY: [(&str, &str, &str); 3] = [
    (
        "tollgate_operator_reconcile_errors_total",
        "operator/src/metrics.rs",
        "\"reconcile_errors\"",
    ),
    (
        "tollgate_config_refused",
        "sidecar/src/telemetry/metrics.rs",
        "\"tollgate_config_refused\"",
    ),
    (
        "tollgate_credential_refresh_failures_total",
        "sidecar/src/telemetry/metrics.rs",
        "\"tollgate_credential_refresh_failures\"",
    ),
];

/// What is missing from `exposition` for each of `names`: its family with the type the name
/// implies, and a sample.
fn missing(exposition: &str, names: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter_map(|name| {
            if let Some((_, file, registered)) = FAULT_ONLY.iter().find(|f| f.0 == name) {
                let source = std::fs::read_to_string(workspace_root().join(file)).unwrap();
                return (!source.contains(registered))
                    .then(|| format!("{name} (not registered in {file})"));
            }
            let (fam, kind) = family(name);
            if !exposition.contains(&format!("# TYPE {fam} {kind}\n")) {
                return Some(format!("{name} (no {kind} family {fam})"));
            }
            let sampled = exposition.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            });
            (!sampled).then(|| format!("{name} (no sample)"))
        })
        .collect()
}

const PARTNER_HOST: &str = "api.partner.test";

/// An operator and a sidecar in a namespace of their own run an integration with routes, a
/// quota, retries and an SLA; after calls that succeed, fail, are retried and are refused by the
/// quota, the sidecar's and the operator's `/metrics` together carry every metric the rules and
/// the dashboard query, with the type the query assumes. A renamed metric fails here.
#[test]
fn every_metric_the_rules_and_the_dashboard_query_is_exported() {
    let cp = ControlPlane::shared();
    let (rule, dashboard) = rendered(cp);
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for g in rule["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            metric_names(r["expr"].as_str().unwrap(), &mut names);
            selector_labels(r["expr"].as_str().unwrap(), &mut labels);
        }
    }
    let mut exprs = Vec::new();
    dashboard_exprs(dashboard, &mut exprs);
    assert!(exprs.len() > 10, "{exprs:?}");
    for e in &exprs {
        metric_names(e, &mut names);
        selector_labels(e, &mut labels);
    }
    assert!(names.len() > 10, "{names:?}");
    assert!(
        labels.contains(&("tollgate_requests_total".into(), "result".into())),
        "{labels:?}"
    );

    install_crd(cp);
    let ns = cp.create_namespace("monitoring-metrics").unwrap();
    let partner = Partner::echo().unwrap();
    objects::service_account(cp, &ns, "app").unwrap();
    let spec = json!({
        "upstream": {"url": partner.url(), "hosts": [PARTNER_HOST], "connectTimeout": "1s"},
        "retries": {"maxAttempts": 2, "retryOn": ["500"], "backoff": {"base": "10ms", "max": "20ms"}},
        "rateLimit": {"limits": [{"name": "sustained", "requests": 1000, "per": "1m"}]},
        "concurrency": {"maxInFlight": 50, "onLimit": "queue"},
        "routes": [{
            "name": "scarce",
            "match": {"pathPrefix": "/fail-scarce"},
            "rateLimit": {"limits": [{"name": "tiny", "requests": 1, "per": "1h"}]},
        }],
        "circuitBreaker": {"window": "30s", "minimumRequests": 20, "failureRatePercent": 50},
        "sla": {"availabilityPercent": "99.9"},
        "contract": {"success": {"jsonPath": "$.status", "equals": "ok"}},
    });
    objects::apply(cp, &objects::partner_integration(&ns, "partner", spec)).unwrap();
    let uid = objects::pod(cp, &ns, "checkout", "app", &[("app", "checkout")]).unwrap();
    let token = objects::pod_token(cp, &ns, "app", "checkout", &uid).unwrap();
    let operator =
        Operator::start(cp, OperatorConfig::for_namespace(&format!("{ns}-op"), &ns)).unwrap();
    let sidecar = Sidecar::start(SidecarConfig {
        name: format!("{ns}-sidecar"),
        operator_url: operator.url(),
        operator_ca: operator.cert.ca_file.clone(),
        pod_namespace: ns.clone(),
        pod_name: "checkout".into(),
        token,
        unknown_hosts: "deny",
        labels: vec![("app".into(), "checkout".into())],
    })
    .unwrap();
    // A sidecar whose token the operator refuses.
    let _refused = Sidecar::start(SidecarConfig {
        name: format!("{ns}-refused-sidecar"),
        operator_url: operator.url(),
        operator_ca: operator.cert.ca_file.clone(),
        pod_namespace: ns.clone(),
        pod_name: "checkout".into(),
        token: "not-a-token".into(),
        unknown_hosts: "deny",
        labels: Vec::new(),
    })
    .unwrap();
    let key = format!("{ns}/partner");
    eventually(
        "the sidecar to hold the integration",
        Duration::from_secs(30),
        || {
            let held = sidecar.integrations()?;
            anyhow::ensure!(held == [key.clone()], "holds {held:?}");
            Ok(())
        },
    );

    // A success that announces a deprecation and a sunset (its body, not JSON, breaks the
    // contract); a partner failure, retried; on the scarce route a failure whose retry finds no
    // quota token, then a call the quota refuses; and a subscription refused.
    let url = |path: &str| format!("http://{PARTNER_HOST}{path}");
    // The first answer announces the route's deprecation and sunset.
    partner.queue([Reply::Full {
        status: 200,
        headers: vec![
            ("deprecation".into(), "@1688169599".into()),
            ("sunset".into(), "Sat, 31 Dec 2050 23:59:59 GMT".into()),
        ],
        body: "ok".into(),
    }]);
    assert_eq!(sidecar.get(&url("/ok")).unwrap().status, 200);
    assert_eq!(sidecar.get(&url("/fail")).unwrap().status, 500);
    assert_eq!(sidecar.get(&url("/fail-scarce")).unwrap().status, 500);
    let refused = sidecar.get(&url("/fail-scarce")).unwrap();
    assert_eq!(refused.reason(), Some("rate-limited"), "{}", refused.body);

    eventually_every(
        "every queried metric in the sidecar's and the operator's /metrics",
        Duration::from_secs(30),
        Duration::from_millis(250),
        || {
            let exposition = format!("{}{}", sidecar.metrics()?, operator.metrics()?);
            let mut gaps = missing(&exposition, &names);
            gaps.extend(missing_labels(&exposition, &labels));
            anyhow::ensure!(
                gaps.is_empty(),
                "missing {gaps:#?}\nin:\n{exposition}\n{}\n{}",
                sidecar.tail(),
                operator.tail()
            );
            // The operator's SLA objective is the one the spec states.
            let objective = metric(
                &exposition,
                "tollgate_operator_sla_availability_objective_ratio",
                &[("integration", &key)],
            );
            anyhow::ensure!((objective - 0.999).abs() < 1e-9, "objective {objective}");
            Ok(())
        },
    );
}

// === the chart ===

/// The PodMonitor, PrometheusRule and dashboard ConfigMap render only when switched on, lint
/// strictly, and the API server accepts them; the PodMonitor finds injected sidecars by their
/// admin port's name, and the dashboard carries Grafana's discovery label.
#[test]
fn monitoring_objects_render_and_dry_run_on_and_off() {
    let cp = ControlPlane::shared();
    monitoring_crds(cp);
    let ns = cp.create_namespace("monitoring-chart").unwrap();
    let chart = chart();

    let mut lint = vec!["lint", chart.as_str(), "--strict"];
    for s in ALL_ON {
        lint.extend(["--set", s]);
    }
    lint.extend(["--set", "monitoring.scrapeAnnotations=true"]);
    lint.extend([
        "--set",
        "sidecar.telemetry.otlpEndpoint=http://collector:4317",
    ]);
    lint.extend(["--set", "sidecar.telemetry.otlpProtocol=grpc"]);
    cp.helm(&lint).unwrap_or_else(|e| panic!("{e}"));

    // The schema refuses nonsense, naming the value.
    for (set, says) in [
        (
            "monitoring.prometheusRule.errorRate.threshold=2",
            "at '/monitoring/prometheusRule/errorRate/threshold'",
        ),
        (
            "monitoring.prometheusRule.killSwitch.for=1 hour",
            "at '/monitoring/prometheusRule/killSwitch/for'",
        ),
        (
            "monitoring.prometheusRule.vendorLifecycle.sunsetWithinDays=0",
            "at '/monitoring/prometheusRule/vendorLifecycle/sunsetWithinDays'",
        ),
        (
            "sidecar.telemetry.otlpProtocol=thrift",
            "at '/sidecar/telemetry/otlpProtocol'",
        ),
        (
            "sidecar.telemetry.otlpEndpoint=collector:4317",
            "at '/sidecar/telemetry/otlpEndpoint'",
        ),
        (
            "sidecar.telemetry.resourceAttributes.team=a=b",
            "at '/sidecar/telemetry/resourceAttributes/team'",
        ),
    ] {
        let err = cp
            .helm(["template", "t", chart.as_str(), "--set", set])
            .expect_err(set);
        assert!(format!("{err:#}").contains(says), "{set}: {err:#}");
    }

    let off = dry_run(cp, &ns, &[], &[]);
    for kind in ["PodMonitor", "PrometheusRule"] {
        assert!(of_kind(&off, kind).is_empty(), "{kind} rendered by default");
    }
    assert!(
        of_kind(&off, "ConfigMap")
            .iter()
            .all(|c| c["metadata"]["name"] != "mon-tollgate-dashboard"),
        "the dashboard rendered by default"
    );

    let on = dry_run(
        cp,
        &ns,
        &[
            ALL_ON[0],
            ALL_ON[1],
            ALL_ON[2],
            "monitoring.podMonitor.labels.release=prometheus",
            "monitoring.prometheusRule.labels.release=prometheus",
            // What `--set` gives: a string.
            "monitoring.prometheusRule.errorRate.threshold=0.1",
            "monitoring.prometheusRule.killSwitch.for=30m",
        ],
        &["monitoring.prometheusRule.quota.threshold=0.3"],
    );
    let pm = of_kind(&on, "PodMonitor")[0];
    assert_eq!(pm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "tollgate-admin", "{pm}");
    assert_eq!(endpoint["path"], "/metrics", "{pm}");

    let rule = of_kind(&on, "PrometheusRule")[0];
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let rules = alerts(rule);
    let named = |n: &str| *rules.iter().find(|r| r["alert"] == n).unwrap();
    assert!(
        named("TollgatePartnerErrorRateHigh")["expr"]
            .as_str()
            .unwrap()
            .contains("> 0.1,"),
        "errorRate.threshold is not applied"
    );
    assert_eq!(named("TollgateKillSwitchOn")["for"], "30m");
    assert!(
        named("TollgateQuotaNearLimit")["expr"]
            .as_str()
            .unwrap()
            .contains("> 0.3,"),
        "quota.threshold is not applied"
    );

    let cm = of_kind(&on, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "mon-tollgate-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(cm["data"]["tollgate.json"].as_str().unwrap()).unwrap();
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Calls per second",
        "Partner error rate",
        "Latency p50 / p95 / p99",
        "429s: the partner's vs the quota's",
        "Circuit breaker",
        "Kill switch",
        "Retries and the retry budget",
        "Fallbacks served",
        "Contract violations",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
    let annotations = dashboard["annotations"]["list"].to_string();
    assert!(
        annotations.contains("tollgate_config_revision_info"),
        "revision changes are not annotated: {annotations}"
    );

    // Without the SLA part, no burn-rate alert and no recording rule it needs.
    let no_sla = dry_run(
        cp,
        &ns,
        &[ALL_ON[1], "monitoring.prometheusRule.sla.enabled=false"],
        &[],
    );
    let rule = of_kind(&no_sla, "PrometheusRule")[0].to_string();
    assert!(
        !rule.contains("TollgateSLABudgetBurn") && !rule.contains("sla_error_budget"),
        "{rule}"
    );
}
