//! The operator under hostile or stale clients, every part real: a pod deleted while its
//! sidecar streams loses the stream (and with it later credential rotations).

use std::time::Duration;

use serde_json::json;
use tollgate_e2e::net::metric;
use tollgate_e2e::objects;
use tollgate_e2e::{
    ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig, eventually,
};

use crate::crd::install_crd;

const SETTLE: Duration = Duration::from_secs(20);
const URL: &str = "http://api.partner.test/v1/charges";

/// A namespace with the integration `partner` (credential from the Secret `partner-key`), one
/// pod `pod` with its sidecar, and an operator started with `extra_args`; the sidecar already
/// injects the first key.
fn setup(
    prefix: &str,
    pod: &str,
    extra_args: &[&str],
) -> (&'static ControlPlane, String, Partner, Operator, Sidecar) {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace(prefix).unwrap();
    let partner = Partner::start().unwrap();
    objects::service_account(cp, &ns, "app").unwrap();
    objects::secret(cp, &ns, "partner-key", "apiKey", "sk_first").unwrap();
    let spec = json!({
        "upstream": {"url": partner.url(), "hosts": ["api.partner.test"]},
        "credentials": {
            "secretRef": {"name": "partner-key", "key": "apiKey"},
            "header": "Authorization",
            "format": "{value}",
        },
        "retries": {"maxAttempts": 1},
    });
    objects::apply(cp, &objects::partner_integration(&ns, "partner", spec)).unwrap();
    let uid = objects::pod(cp, &ns, pod, "app", &[("app", "checkout")]).unwrap();
    let token = objects::pod_token(cp, &ns, "app", pod, &uid).unwrap();
    let mut config = OperatorConfig::for_namespace(&format!("{ns}-operator"), &ns);
    config.extra_args = extra_args.iter().map(|s| s.to_string()).collect();
    let operator = Operator::start(cp, config).unwrap();
    let sidecar = Sidecar::start(SidecarConfig {
        name: format!("{ns}-{pod}-sidecar"),
        operator_url: operator.url(),
        operator_ca: operator.cert.ca_file.clone(),
        pod_namespace: ns.clone(),
        pod_name: pod.into(),
        token,
        unknown_hosts: "deny",
        labels: Vec::new(),
    })
    .unwrap();
    eventually("the sidecar to inject the first key", SETTLE, || {
        let echo = sidecar.get(URL)?.json()?;
        let auth = &echo["headers"]["authorization"];
        anyhow::ensure!(auth == "sk_first", "partner got {auth}; {}", sidecar.tail());
        Ok(())
    });
    (cp, ns, partner, operator, sidecar)
}

/// A pod's sidecar holds the integration and its credential; the pod is deleted: within a
/// re-check the operator ends the stream, refuses the reconnect, and a rotated Secret never
/// reaches that sidecar (it keeps enforcing what it had, and gets nothing new).
#[test]
fn deleting_a_pod_ends_its_stream() {
    let (cp, ns, _partner, operator, sidecar) =
        setup("hostile-delete", "doomed", &["--stream-recheck", "1s"]);
    cp.kubectl(["-n", &ns, "delete", "pod", "doomed", "--wait=false"])
        .unwrap();
    eventually("the operator to end the stream", SETTLE, || {
        let m = operator.metrics()?;
        let ended = metric(&m, "tollgate_operator_streams_ended_total", &[]);
        let open = metric(&m, "tollgate_operator_connected_sidecars", &[]);
        anyhow::ensure!(ended >= 1.0 && open == 0.0, "ended {ended}, open {open}");
        Ok(())
    });
    eprintln!(
        "pod deleted: stream ended ({})",
        operator
            .metrics()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("tollgate_operator_streams_ended_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // A rotation after the deletion does not reach it.
    objects::secret(cp, &ns, "partner-key", "apiKey", "sk_rotated").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let echo = sidecar.get(URL).unwrap().json().unwrap();
        assert_eq!(
            echo["headers"]["authorization"],
            "sk_first",
            "{}",
            sidecar.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = operator.metrics().unwrap();
    assert_eq!(metric(&m, "tollgate_operator_connected_sidecars", &[]), 0.0);
}
