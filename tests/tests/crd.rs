//! The generated CRD against a real API server: it is accepted as a structural schema, its
//! CEL rules and validations refuse bad specs with the field named, and every example applies.

use std::path::Path;
use std::sync::OnceLock;

use tollgate_e2e::ControlPlane;

/// Applies the committed CRD once per test process and waits until it is established.
pub fn install_crd(cp: &ControlPlane) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../crds/partnerintegrations.tollgate.dev.yaml");
        cp.kubectl(["apply", "--server-side", "-f", crd.to_str().unwrap()])
            .expect("the API server accepts the generated CRD");
        // `kubectl wait` fails at once, rather than waits, while a new CRD has no conditions.
        tollgate_e2e::eventually(
            "the CRD to become established",
            std::time::Duration::from_secs(60),
            || {
                cp.kubectl([
                    "wait",
                    "--for=condition=Established",
                    "--timeout=10s",
                    "crd/partnerintegrations.tollgate.dev",
                ])
            },
        );
    });
}

fn pi(ns: &str, name: &str, spec: &str) -> String {
    let mut out = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: PartnerIntegration\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n"
    );
    for line in spec.trim_matches('\n').lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn refused(cp: &ControlPlane, ns: &str, spec: &str) -> String {
    match cp.kubectl_with_stdin(["apply", "-f", "-"], &pi(ns, "bad", spec)) {
        Ok(out) => panic!("the API server accepted a bad spec:\n{spec}\n{out}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_api_server_refuses_bad_specs_naming_the_field() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("crd").unwrap();
    let cases = [
        // CEL rules.
        (
            "upstream: {url: 'ftp://files.example'}",
            "spec.upstream.url",
            "scheme must be http or https",
        ),
        (
            "upstream: {url: 'https://a.example'}\nretries: {backoff: {base: 5s, max: 1s}}",
            "spec.retries.backoff",
            "base must not exceed",
        ),
        (
            "upstream: {url: 'https://a.example'}\ntimeouts: {request: 1m, total: 30s}",
            "spec.timeouts",
            "request must not exceed",
        ),
        (
            "upstream: {url: 'https://a.example'}\nretries: {retryOn: ['404']}",
            "spec.retries.retryOn",
            "allowed are",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncredentials: {secretRef: {name: s, key: k}, format: 'Bearer'}",
            "spec.credentials.format",
            "must contain {value}",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncredentials: {secretRef: {name: s, key: k}, oauth2: {tokenUrl: 'https://l.example/t', clientIdRef: {name: o, key: id}, clientSecretRef: {name: o, key: s}}}",
            "spec.credentials",
            "give exactly one of secretRef and oauth2",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncredentials: {header: X-Key}",
            "spec.credentials",
            "give exactly one of secretRef and oauth2",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncredentials: {secretRef: {name: s, key: k}, verify: {path: /v1/account, expectStatus: 42}}",
            "spec.credentials.verify.expectStatus",
            "greater than or equal to 100",
        ),
        // Schema: patterns, ranges, required, list-map keys.
        (
            "upstream: {url: 'https://a.example'}\nrateLimit: {partitionBy: X-Region, partitionAlsoBy: [A, B, C, D], limits: [{name: a, requests: 1, per: 1s}]}",
            "spec.rateLimit.partitionAlsoBy",
            "must have at most 3 items",
        ),
        (
            "upstream: {url: 'https://a.example'}\nrateLimit: {partitionBy: X-Region, partitionAlsoBy: [X-Tenant, X-Tenant], limits: [{name: a, requests: 1, per: 1s}]}",
            "spec.rateLimit.partitionAlsoBy[1]",
            "Duplicate value",
        ),
        (
            "upstream: {url: 'https://a.example'}\ntimeouts: {request: -5s}",
            "spec.timeouts.request",
            "should match",
        ),
        (
            "upstream: {url: 'https://a.example'}\nretries: {budget: {percent: 150}}",
            "spec.retries.budget.percent",
            "less than or equal to 100",
        ),
        (
            "upstream: {url: 'https://a.example'}\nrateLimit: {limits: []}",
            "spec.rateLimit.limits",
            "should have at least 1 items",
        ),
        (
            "upstream: {url: 'https://a.example'}\nrateLimit: {limits: [{name: a, requests: 0, per: 1s}]}",
            "spec.rateLimit.limits[0].requests",
            "greater than or equal to 1",
        ),
        (
            "upstream: {url: 'https://a.example'}\nroutes: [{name: a, match: {pathPrefix: /a}}, {name: a, match: {pathPrefix: /b}}]",
            "spec.routes[1]",
            "Duplicate value",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncircuitBreaker: {failureRatePercent: 0}",
            "spec.circuitBreaker.failureRatePercent",
            "greater than or equal to 1",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncontract: {success: {jsonPath: $.status, equals: ok}, maxBodyBytes: 0}",
            "spec.contract.maxBodyBytes",
            "greater than or equal to 1",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncontract: {maxBodyBytes: 10}",
            "spec.contract",
            "contract: give success, schema or enums",
        ),
        (
            "upstream: {url: 'https://a.example'}\ncontract: {schema: {configMapName: orders}}",
            "spec.contract.schema",
            "contract.schema: give configMapName and key, or inline",
        ),
        ("timeouts: {request: 1s}", "spec.upstream", "Required value"),
    ];
    for (spec, field, message) in cases {
        let err = refused(cp, &ns, spec);
        assert!(
            err.contains(field) && err.contains(message),
            "spec:\n{spec}\nexpected {field} / {message:?} in:\n{err}"
        );
    }
}

#[test]
fn every_example_applies_and_reads_back_with_its_columns() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        // Apply each example into a fresh namespace of its own.
        let ns = cp.create_namespace("example").unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("namespace:") {
                    format!("  namespace: {ns}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        cp.kubectl_with_stdin(["apply", "-f", "-"], &text)
            .unwrap_or_else(|e| panic!("{} is refused: {e}", path.display()));
        let out = cp.kubectl(["get", "pi", "-n", &ns]).unwrap();
        let header = out.lines().next().unwrap_or_default();
        for column in [
            "NAME", "READY", "KILL", "CIRCUIT", "RPM", "ERR%", "REFUSED", "P95", "AGE",
        ] {
            assert!(
                header.contains(column),
                "`kubectl get pi` lacks {column}: {header}"
            );
        }
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    assert!(names.len() >= 4, "{names:?}");
}
