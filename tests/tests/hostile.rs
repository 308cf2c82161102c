//! The operator under hostile or stale clients, every part real: a pod deleted while its
//! sidecar streams loses the stream (and with it later credential rotations); forged
//! subscribes and slow bodies do not delay a kill switch.

use std::time::Duration;

use serde_json::json;
use tollgate_e2e::net::metric;
use tollgate_e2e::objects;
use tollgate_e2e::{
    ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig, eventually,
    eventually_every,
};
use tollgate_testkit::jwt::b64url;

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
    let partner = Partner::echo().unwrap();
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
        let echo = sidecar.get(URL)?.try_json()?;
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
        let echo = sidecar.get(URL).unwrap().try_json().unwrap();
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

/// A curl config of `n` subscribes, each with a distinct forged JWT (unexpired, unsigned by
/// the API server: each costs the operator a TokenReview unless it is bounded).
/// Each entry names everything it needs: `next` resets per-transfer options.
fn junk_config(operator: &Operator, batch: usize, n: usize) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let header = b64url(br#"{"alg":"RS256","kid":"junk"}"#);
    let mut cfg = String::new();
    for i in 0..n {
        if i > 0 {
            cfg.push_str("next\n");
        }
        let claims = b64url(format!(r#"{{"sub":"junk-{batch}-{i}","exp":{exp}}}"#).as_bytes());
        cfg.push_str(&format!(
            "url = \"{}/v1/subscribe?namespace=x&pod=junk-{i}\"\ncacert = \"{}\"\nmax-time = 20\nheader = \"Authorization: Bearer {header}.{claims}.c2ln\"\noutput = \"/dev/null\"\nwrite-out = \"%{{http_code}}\\n\"\n",
            operator.url(),
            operator.cert.ca_file.display()
        ));
    }
    cfg
}

/// Measures how long a kill-switch flip takes to be enforced by `sidecar`.
fn flip(cp: &ControlPlane, ns: &str, sidecar: &Sidecar, enabled: bool) -> Duration {
    objects::patch_pi(
        cp,
        ns,
        "partner",
        &json!({"spec": {"killSwitch": {"enabled": enabled, "reason": "e2e"}}}),
    )
    .unwrap();
    let start = std::time::Instant::now();
    eventually_every(
        "the sidecar to follow the kill switch",
        Duration::from_secs(30),
        Duration::from_millis(5),
        || {
            let r = sidecar.get(URL)?;
            let killed = r.status == 503 && r.reason() == Some("kill-switch");
            anyhow::ensure!(killed == enabled, "got {} {:?}", r.status, r.reason());
            Ok(())
        },
    );
    start.elapsed()
}

/// 500 forged subscribes per round (distinct JWT-shaped tokens, each a TokenReview at most)
/// and 20 slow-body reports keep coming while the kill switch is flipped: the sidecar follows
/// it within a generous multiple of the unloaded flip measured here, and every junk
/// subscribe is refused.
#[test]
fn junk_subscribes_and_slow_bodies_do_not_delay_the_kill_switch() {
    let (cp, ns, _partner, operator, sidecar) = setup("hostile-load", "checkout-a", &[]);
    let unloaded = [true, false].map(|on| flip(cp, &ns, &sidecar, on));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, vec![b' '; 64 * 1024]).unwrap();
    let slow = std::process::Command::new("curl")
        .args([
            "--parallel",
            "--parallel-max",
            "20",
            "-s",
            "--limit-rate",
            "200",
        ])
        .arg("--cacert")
        .arg(&operator.cert.ca_file)
        .args((0..20).flat_map(|_| {
            [
                "-o".to_string(),
                "/dev/null".to_string(),
                "-H".to_string(),
                "x-tollgate-session: 00000000000000000000000000000000".to_string(),
                "--data-binary".to_string(),
                format!("@{}", body.display()),
                format!("{}/v1/report", operator.url()),
            ]
        }))
        .spawn()
        .unwrap();
    let junk = {
        let stop = stop.clone();
        let url_cfg = dir.path().to_path_buf();
        let configs: Vec<String> = (0..40).map(|b| junk_config(&operator, b, 500)).collect();
        std::thread::spawn(move || {
            let mut codes = std::collections::BTreeMap::<String, usize>::new();
            for (b, cfg) in configs.iter().enumerate() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let path = url_cfg.join(format!("junk-{b}.cfg"));
                std::fs::write(&path, cfg).unwrap();
                let out = std::process::Command::new("curl")
                    .args(["--parallel", "--parallel-max", "100", "-s"])
                    .arg("-K")
                    .arg(&path)
                    .output()
                    .unwrap();
                for code in String::from_utf8_lossy(&out.stdout).lines() {
                    *codes.entry(code.to_string()).or_default() += 1;
                }
            }
            codes
        })
    };
    // The load is on: the operator refuses junk.
    eventually("junk to be refused", Duration::from_secs(30), || {
        let m = operator.metrics()?;
        let refused = metric(&m, "tollgate_operator_auth_rejections_total", &[]);
        anyhow::ensure!(refused >= 100.0, "{refused} refused");
        Ok(())
    });
    let loaded = [true, false].map(|on| flip(cp, &ns, &sidecar, on));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let codes = junk.join().unwrap();
    let mut slow = slow;
    let _ = slow.kill();
    let _ = slow.wait();
    let m = operator.metrics().unwrap();
    eprintln!(
        "kill switch on/off unloaded {:?}/{:?}, under junk load {:?}/{:?}; junk answers {codes:?}; \
         TokenReviews {}, refusals {}",
        unloaded[0],
        unloaded[1],
        loaded[0],
        loaded[1],
        metric(&m, "tollgate_operator_token_reviews_total", &[]),
        metric(&m, "tollgate_operator_auth_rejections_total", &[]),
    );
    let total = codes.values().sum::<usize>();
    assert!(total >= 500, "{codes:?}");
    assert!(
        codes
            .keys()
            .all(|c| c == "401" || c == "403" || c == "503" || c == "000"),
        "a junk subscribe was served: {codes:?}"
    );
    let bound = unloaded.iter().max().unwrap().mul_f64(10.0) + Duration::from_secs(1);
    for d in loaded {
        assert!(
            d <= bound,
            "flip took {d:?} under load; unloaded {unloaded:?}"
        );
    }
}
