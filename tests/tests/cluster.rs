//! Tollgate in a cluster, every part real: the `tollgate-operator` process against the real
//! API server, two `tollgate-sidecar` processes in cluster mode, one per Pod, authenticating
//! with pod-bound ServiceAccount tokens from the TokenRequest API (verified by the operator
//! with TokenReview), and a partner HTTP server on loopback. Each test has a namespace, an
//! operator (watching that namespace, its Leases there) and sidecars of its own.
//!
//! Pods stay Pending (no kubelet runs) but exist with their labels and uid, which is all the
//! operator reads. Every wait is a poll with a deadline ([`eventually`]); nothing sleeps for
//! timing.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};
use tollgate_e2e::net::{Resp, metric};
use tollgate_e2e::objects::{self, AUDIENCE};
use tollgate_e2e::{
    ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig, eventually,
    eventually_every,
};
use tollgate_testkit::Reply;

use crate::crd::install_crd;

/// The partner as the app addresses it; the sidecar sends it to the partner server's real
/// address (`spec.upstream.url`).
const PARTNER_HOST: &str = "api.partner.test";
/// The credential the sidecars inject, from the Secret.
const FIRST_KEY: &str = "sk_test_first";
/// Longest time any change may take to show where no tighter bound is the point.
const SETTLE: Duration = Duration::from_secs(20);
/// A kill switch must be enforced by every sidecar within this.
const KILL_SWITCH_BOUND: Duration = Duration::from_secs(1);

/// Held around the parts that measure time or rate, so the other tests' bursts of process
/// starts and traffic on this small machine do not skew them.
static MEASURING: Mutex<()> = Mutex::new(());

fn measuring() -> std::sync::MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(|e| e.into_inner())
}

fn url(path: &str) -> String {
    format!("http://{PARTNER_HOST}{path}")
}

/// The policy under test: pods labelled `app=checkout` get it; a pinned version header; the
/// partner's key injected from the Secret `partner-key`; no retries, so counts are exact.
fn base_spec(partner: &Partner) -> Value {
    json!({
        "workloadSelector": {"matchLabels": {"app": "checkout"}},
        "upstream": {"url": partner.url(), "hosts": [PARTNER_HOST], "connectTimeout": "1s"},
        "versioning": {"pinHeaders": {"X-Api-Version": "2024-06-20"}},
        "credentials": {
            "secretRef": {"name": "partner-key", "key": "apiKey"},
            "header": "Authorization",
            "format": "Bearer {value}",
        },
        "retries": {"maxAttempts": 1},
    })
}

/// One pod: its name, uid and a projected-style token for it.
struct Pod {
    name: String,
    uid: String,
    token: String,
}

fn make_pod(cp: &ControlPlane, ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
    let uid = objects::pod(cp, ns, name, "app", labels).unwrap();
    let token = objects::pod_token(cp, ns, "app", name, &uid).unwrap();
    Pod {
        name: name.to_string(),
        uid,
        token,
    }
}

/// A namespace with the PartnerIntegration `partner`, its Secret, two `app=checkout` pods,
/// an operator, a sidecar per pod and the partner server.
struct Cluster {
    cp: &'static ControlPlane,
    ns: String,
    partner: Partner,
    operator: Operator,
    a: Sidecar,
    b: Sidecar,
}

impl Cluster {
    fn start(prefix: &str, spec: impl Fn(&Partner) -> Value) -> Cluster {
        Cluster::start_watching(prefix, spec, &[])
    }

    /// Like [`Cluster::start`], the operator also watching `other_namespaces`.
    fn start_watching(
        prefix: &str,
        spec: impl Fn(&Partner) -> Value,
        other_namespaces: &[&str],
    ) -> Cluster {
        let cp = ControlPlane::shared();
        install_crd(cp);
        let ns = cp.create_namespace(prefix).unwrap();
        let partner = Partner::echo().unwrap();
        objects::service_account(cp, &ns, "app").unwrap();
        objects::secret(cp, &ns, "partner-key", "apiKey", FIRST_KEY).unwrap();
        objects::apply(
            cp,
            &objects::partner_integration(&ns, "partner", spec(&partner)),
        )
        .unwrap();
        let pods = ["checkout-a", "checkout-b"]
            .map(|name| make_pod(cp, &ns, name, &[("app", "checkout")]));

        let mut config = OperatorConfig::for_namespace(&format!("{ns}-operator"), &ns);
        config
            .namespaces
            .extend(other_namespaces.iter().map(|s| s.to_string()));
        let operator = Operator::start(cp, config).unwrap();
        let [a, b] = pods.map(|pod| {
            let name = format!("{ns}-{}-sidecar", pod.name);
            start_sidecar(&operator, name, &ns, &pod.name, &pod.token)
        });
        let cluster = Cluster {
            cp,
            ns,
            partner,
            operator,
            a,
            b,
        };
        let want = vec![cluster.key()];
        for s in cluster.sidecars() {
            eventually(&format!("{} to hold {want:?}", s.name()), SETTLE, || {
                let held = s.integrations()?;
                anyhow::ensure!(held == want, "holds {held:?}; {}", s.tail());
                Ok(())
            });
        }
        cluster
    }

    fn sidecars(&self) -> [&Sidecar; 2] {
        [&self.a, &self.b]
    }

    /// `namespace/partner`, as sidecars and error bodies name it.
    fn key(&self) -> String {
        format!("{}/partner", self.ns)
    }

    fn patch(&self, patch: Value) {
        objects::patch_pi(self.cp, &self.ns, "partner", &patch).unwrap();
    }

    fn pi(&self) -> Value {
        objects::get_json(self.cp, &self.ns, "pi", "partner").unwrap()
    }

    /// Logs of every process, for a failure message.
    fn logs(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.operator.tail(),
            self.a.tail(),
            self.b.tail()
        )
    }

    /// The condition `type_` of the PartnerIntegration once `ok` holds for it.
    fn wait_condition(&self, type_: &str, ok: impl Fn(&Value) -> bool) -> Value {
        eventually(&format!("condition {type_}"), SETTLE, || {
            let pi = self.pi();
            let cond = condition(&pi, type_).cloned();
            anyhow::ensure!(cond.as_ref().is_some_and(&ok), "{pi}\n{}", self.logs());
            Ok(cond.unwrap_or_default())
        })
    }

    /// The events of the namespace with `reason`.
    fn events(&self, reason: &str) -> anyhow::Result<Vec<Value>> {
        let out = self
            .cp
            .kubectl(["get", "events.events.k8s.io", "-n", &self.ns, "-o", "json"])?;
        let all: Value = serde_json::from_str(&out)?;
        Ok(all["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == reason)
            .cloned()
            .collect())
    }

    /// The events with `reason`, once there is one.
    fn wait_events(&self, reason: &str) -> Vec<Value> {
        eventually(&format!("a {reason} event"), SETTLE, || {
            let e = self.events(reason)?;
            anyhow::ensure!(!e.is_empty(), "no event yet\n{}", self.logs());
            Ok(e)
        })
    }

    /// More reconciles (a kill switch flip, with its own event) bring no second event with
    /// `reason`.
    fn still_one_event_after_a_reconcile(&self, reason: &str) {
        self.patch(json!({"spec": {"killSwitch": {"enabled": true, "reason": "drill"}}}));
        self.wait_events("KillSwitchEnabled");
        let events = self.events(reason).unwrap();
        assert_eq!(events.len(), 1, "{events:#?}");
        assert!(
            events[0]["series"]["count"].as_u64().unwrap_or(1) <= 1,
            "{events:#?}"
        );
    }

    /// `kubectl get pi` and a reader of its first row's columns by name ("" for one it lacks).
    fn get_pi(&self) -> anyhow::Result<(String, impl Fn(&str) -> String + use<>)> {
        let out = self.cp.kubectl(["-n", &self.ns, "get", "pi"])?;
        let mut lines = out.lines();
        let header: Vec<String> = split(lines.next());
        let values: Vec<String> = split(lines.next());
        let col = move |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .and_then(|i| values.get(i).cloned())
                .unwrap_or_default()
        };
        Ok((out, col))
    }
}

fn split(line: Option<&str>) -> Vec<String> {
    line.unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A sidecar named `name` (in messages and its log file) that subscribes to `operator` as
/// the pod `claimed_ns/claimed_pod` with `token`.
fn start_sidecar(
    operator: &Operator,
    name: String,
    claimed_ns: &str,
    claimed_pod: &str,
    token: &str,
) -> Sidecar {
    Sidecar::start(SidecarConfig {
        name,
        operator_url: operator.url(),
        operator_ca: operator.cert.ca_file.clone(),
        pod_namespace: claimed_ns.to_string(),
        pod_name: claimed_pod.to_string(),
        token: token.to_string(),
        unknown_hosts: "deny",
        labels: Vec::new(),
    })
    .unwrap()
}

/// Ok when the sidecar itself answered with `reason` and `status`, naming the integration.
fn expect_decision(r: &Resp, status: u16, reason: &str, integration: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        r.status == status && r.reason() == Some(reason),
        "got {} {:?}: {}",
        r.status,
        r.reason(),
        r.body
    );
    let body = r.try_json()?;
    anyhow::ensure!(
        body["error"]["reason"] == reason && body["error"]["integration"] == integration,
        "body {body}"
    );
    Ok(())
}

/// Ok when the partner answered 200 (the echo of what it received).
fn expect_partner_ok(r: &Resp) -> anyhow::Result<Value> {
    anyhow::ensure!(
        r.status == 200 && r.reason().is_none(),
        "got {} {:?}: {}",
        r.status,
        r.reason(),
        r.body
    );
    r.try_json()
}

/// The condition `type_` of a PartnerIntegration's status, if present.
fn condition<'a>(pi: &'a Value, type_: &str) -> Option<&'a Value> {
    pi["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

// === 1. traffic under the policy ===

#[test]
fn traffic_flows_through_both_sidecars_under_the_policy() {
    let c = Cluster::start("traffic", base_spec);

    for (i, s) in c.sidecars().into_iter().enumerate() {
        // The app sends a made-up key: the sidecar must replace it with the Secret's.
        let r = s
            .send(
                Method::GET,
                &url(&format!("/v1/charges?n={i}")),
                &[("authorization", "Bearer made-up-by-the-app")],
            )
            .unwrap();
        let echo = expect_partner_ok(&r).unwrap_or_else(|e| panic!("{}: {e:#}", s.name()));
        assert_eq!(echo["path"], format!("/v1/charges?n={i}"));
        assert_eq!(echo["headers"]["x-api-version"], "2024-06-20", "{echo}");
        assert_eq!(
            echo["headers"]["authorization"],
            format!("Bearer {FIRST_KEY}"),
            "{echo}"
        );
        // /config says a credential is loaded, never what it is.
        let config = s.config().unwrap();
        assert_eq!(
            config["integrations"][0]["credentials"]["loaded"], true,
            "{config}"
        );
        assert!(!config.to_string().contains(FIRST_KEY), "{config}");
        // The persisted revision holds the credential, so it is the pod's alone.
        // It is written in the background after the revision is applied.
        let mode = eventually("the persisted revision to be written", SETTLE, || {
            Ok(std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(s.state_file())?.permissions(),
            ))
        });
        assert_eq!(mode & 0o777, 0o600, "{}", s.state_file().display());
    }
    assert_eq!(c.partner.count(), 2);

    // The operator counts both sidecars as subscribed and running the revision in force.
    eventually("status.sidecars to count both sidecars", SETTLE, || {
        let pi = c.pi();
        let s = &pi["status"]["sidecars"];
        anyhow::ensure!(
            s["desired"] == 2 && s["upToDate"] == 2,
            "status {}",
            pi["status"]
        );
        Ok(())
    });
}

// === 2. the kill switch ===

#[test]
fn kill_switch_reaches_both_sidecars_within_a_second_and_lifts() {
    let c = Cluster::start("killswitch", base_spec);
    for s in c.sidecars() {
        expect_partner_ok(&s.get(&url("/v1/charges")).unwrap()).unwrap();
    }
    let key = c.key();
    let _quiet = measuring();

    let start = Instant::now();
    c.patch(json!({"spec": {"killSwitch": {"enabled": true, "reason": "INC-123 e2e"}}}));
    let committed = Instant::now();
    eventually_every(
        "both sidecars to answer kill-switch",
        KILL_SWITCH_BOUND,
        Duration::from_millis(5),
        || {
            for s in c.sidecars() {
                let r = s.get(&url("/v1/charges"))?;
                expect_decision(&r, 503, "kill-switch", &key)
                    .map_err(|e| e.context(s.name().to_string()))?;
            }
            Ok(())
        },
    );
    eprintln!(
        "kill switch on: enforced by both sidecars {:?} after kubectl patch returned ({:?} after it started)",
        committed.elapsed(),
        start.elapsed()
    );

    // Nothing reaches the partner while it is on.
    let before = c.partner.count();
    for s in c.sidecars() {
        for _ in 0..5 {
            let r = s.send(Method::POST, &url("/v1/charges"), &[]).unwrap();
            expect_decision(&r, 503, "kill-switch", &key).unwrap();
        }
    }
    assert_eq!(c.partner.count(), before, "requests reached the partner");

    let start = Instant::now();
    c.patch(json!({"spec": {"killSwitch": {"enabled": false}}}));
    let committed = Instant::now();
    eventually_every(
        "traffic to flow through both sidecars again",
        KILL_SWITCH_BOUND,
        Duration::from_millis(5),
        || {
            for s in c.sidecars() {
                expect_partner_ok(&s.get(&url("/v1/charges"))?)
                    .map_err(|e| e.context(s.name().to_string()))?;
            }
            Ok(())
        },
    );
    eprintln!(
        "kill switch off: both sidecars pass traffic {:?} after kubectl patch returned ({:?} after it started)",
        committed.elapsed(),
        start.elapsed()
    );
}

// === 3. edits, Secret rotation, deletion ===

#[test]
fn limit_edit_secret_rotation_and_deletion_reach_both_sidecars() {
    let c = Cluster::start("edits", |p| {
        let mut spec = base_spec(p);
        spec["rateLimit"] = json!({
            "scope": "perPod",
            "limits": [{"name": "minute", "requests": 1000, "per": "1m"}],
        });
        spec
    });
    let key = c.key();

    // Rotating the Secret: the new key is what both sidecars inject.
    objects::secret(c.cp, &c.ns, "partner-key", "apiKey", "sk_test_rotated").unwrap();
    for s in c.sidecars() {
        eventually(
            &format!("{} to inject the rotated key", s.name()),
            SETTLE,
            || {
                let echo = expect_partner_ok(&s.get(&url("/v1/charges"))?)?;
                let auth = &echo["headers"]["authorization"];
                anyhow::ensure!(auth == "Bearer sk_test_rotated", "partner got {auth}");
                Ok(())
            },
        );
    }

    // Editing a limit: 2 a minute per pod, so each sidecar admits two and refuses the third.
    c.patch(json!({"spec": {"rateLimit": {"limits": [{"name": "minute", "requests": 2, "per": "1m"}]}}}));
    for s in c.sidecars() {
        eventually(
            &format!("{} to run the edited limit", s.name()),
            SETTLE,
            || {
                let config = s.config()?;
                let bands = &config["integrations"][0]["rateLimit"]["bands"];
                anyhow::ensure!(bands[0]["requests"] == 2, "bands {bands}");
                Ok(())
            },
        );
    }
    for s in c.sidecars() {
        for n in 0..2 {
            let r = s.get(&url(&format!("/v1/limited/{n}"))).unwrap();
            expect_partner_ok(&r).unwrap_or_else(|e| panic!("{} call {n}: {e:#}", s.name()));
        }
        let r = s.get(&url("/v1/limited/2")).unwrap();
        expect_decision(&r, 429, "rate-limited", &key)
            .unwrap_or_else(|e| panic!("{}: third call: {e:#}", s.name()));
        assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    }

    // Deleting the integration: both sidecars drop it; its host is unknown to them again.
    c.cp.kubectl(["-n", &c.ns, "delete", "pi", "partner", "--timeout=60s"])
        .unwrap();
    let before = c.partner.count();
    for s in c.sidecars() {
        eventually(
            &format!("{} to drop the integration", s.name()),
            SETTLE,
            || {
                let held = s.integrations()?;
                anyhow::ensure!(held.is_empty(), "still holds {held:?}");
                let r = s.get(&url("/v1/charges"))?;
                anyhow::ensure!(
                    r.status == 403 && r.reason() == Some("unknown-host"),
                    "got {} {:?}",
                    r.status,
                    r.reason()
                );
                Ok(())
            },
        );
    }
    assert_eq!(c.partner.count(), before, "requests reached the partner");
}

// === 4. who gets nothing ===

#[test]
fn sidecars_the_operator_cannot_verify_or_select_get_nothing() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    // Another namespace with an integration of its own and a pod that matches the labels.
    let other = cp.create_namespace("isolation-other").unwrap();
    objects::service_account(cp, &other, "app").unwrap();
    let outsider_pod = make_pod(cp, &other, "checkout-x", &[("app", "checkout")]);

    let c = Cluster::start_watching("isolation", base_spec, &[&other]);
    objects::apply(
        cp,
        &objects::partner_integration(
            &other,
            "other",
            json!({"upstream": {"url": c.partner.url(), "hosts": ["api.other.test"]}}),
        ),
    )
    .unwrap();
    let ns = c.ns.clone();

    // Authenticated, in the other namespace: it gets that namespace's integration only.
    let outsider = start_sidecar(
        &c.operator,
        format!("{ns}-outsider"),
        &other,
        "checkout-x",
        &outsider_pod.token,
    );
    // The other namespace's token, claiming to be one of our pods.
    let impostor = start_sidecar(
        &c.operator,
        format!("{ns}-impostor"),
        &ns,
        "checkout-a",
        &outsider_pod.token,
    );
    // A pod of ours whose token was issued for another audience: TokenReview rejects it.
    let pod_c = make_pod(cp, &ns, "checkout-c", &[("app", "checkout")]);
    let token = objects::token(
        cp,
        &ns,
        "app",
        "not-tollgate",
        Some((&pod_c.name, &pod_c.uid)),
    )
    .unwrap();
    let wrong_audience = start_sidecar(
        &c.operator,
        format!("{ns}-wrong-audience"),
        &ns,
        "checkout-c",
        &token,
    );
    // A valid token for our ServiceAccount, but bound to no pod.
    let token = objects::token(cp, &ns, "app", AUDIENCE, None).unwrap();
    let _ = make_pod(cp, &ns, "checkout-d", &[("app", "checkout")]);
    let unbound = start_sidecar(
        &c.operator,
        format!("{ns}-unbound"),
        &ns,
        "checkout-d",
        &token,
    );
    // A verified pod of ours whose labels the workloadSelector does not match.
    let batch = make_pod(cp, &ns, "batch-1", &[("app", "batch")]);
    let unselected = start_sidecar(
        &c.operator,
        format!("{ns}-unselected"),
        &ns,
        "batch-1",
        &batch.token,
    );

    // Wait until every one of them has been answered by the operator, for the right reason.
    eventually(
        "the operator to refuse each bad subscription",
        SETTLE,
        || {
            let m = c.operator.metrics()?;
            for reason in ["identity_mismatch", "rejected", "not_bound_to_pod"] {
                let n = metric(
                    &m,
                    "tollgate_operator_auth_rejections_total",
                    &[("reason", reason)],
                );
                anyhow::ensure!(n >= 1.0, "no rejection for {reason} yet");
            }
            Ok(())
        },
    );
    eventually(
        "the verified sidecars to load their snapshots",
        SETTLE,
        || {
            let held = outsider.integrations()?;
            anyhow::ensure!(
                held == [format!("{other}/other")],
                "outsider holds {held:?}"
            );
            anyhow::ensure!(
                unselected.readyz()? == 200,
                "unselected has no snapshot yet"
            );
            Ok(())
        },
    );

    let before = c.partner.count();
    for s in [&impostor, &wrong_audience, &unbound] {
        assert_eq!(
            s.integrations().unwrap(),
            Vec::<String>::new(),
            "{}",
            s.name()
        );
        assert_eq!(s.readyz().unwrap(), 503, "{} loaded a revision", s.name());
        assert!(
            s.persisted().unwrap().is_none(),
            "{} persisted a snapshot",
            s.name()
        );
        assert!(
            s.count_log("disconnected from the operator; the snapshot in force stays") >= 1,
            "{}",
            s.tail()
        );
    }
    assert_eq!(unselected.integrations().unwrap(), Vec::<String>::new());
    for s in [&impostor, &wrong_audience, &unbound, &unselected, &outsider] {
        let r = s.get(&url("/v1/charges")).unwrap();
        assert_eq!(
            (r.status, r.reason()),
            (403, Some("unknown-host")),
            "{} reached the partner through {}: {}",
            s.name(),
            c.key(),
            r.body
        );
    }
    assert_eq!(c.partner.count(), before);
    // The outsider does hold its own namespace's integration, without any credential of ours.
    let echo = expect_partner_ok(&outsider.get("http://api.other.test/x").unwrap()).unwrap();
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    // And the pods the policy selects still hold it.
    for s in c.sidecars() {
        assert_eq!(s.integrations().unwrap(), [c.key()], "{}", c.logs());
    }
}

// === 5. the operator goes away and comes back ===

#[test]
fn sidecars_keep_enforcing_without_the_operator_and_resync_when_it_returns() {
    let mut c = Cluster::start("failstatic", base_spec);
    let key = c.key();
    c.patch(json!({"spec": {"killSwitch": {"enabled": true, "reason": "INC-9 e2e"}}}));
    for s in c.sidecars() {
        eventually(
            &format!("{} to enforce the kill switch", s.name()),
            SETTLE,
            || expect_decision(&s.get(&url("/v1/charges"))?, 503, "kill-switch", &key),
        );
    }
    eventually("the status to show the kill switch", SETTLE, || {
        let pi = c.pi();
        let k = condition(&pi, "KillSwitchActive");
        anyhow::ensure!(
            k.is_some_and(|k| k["status"] == "True"),
            "status {}",
            pi["status"]
        );
        Ok(())
    });

    c.operator.kill();
    for s in c.sidecars() {
        eventually(
            &format!("{} to notice the operator is gone", s.name()),
            SETTLE,
            || {
                let n = s.count_log("disconnected from the operator; the snapshot in force stays");
                anyhow::ensure!(n >= 1, "{}", s.tail());
                Ok(())
            },
        );
        expect_decision(
            &s.get(&url("/v1/charges")).unwrap(),
            503,
            "kill-switch",
            &key,
        )
        .unwrap_or_else(|e| panic!("{} stopped enforcing: {e:#}", s.name()));
    }
    // A sidecar that restarts while the operator is down enforces what it persisted, from its
    // first request on: an app keeps calling while it restarts, and no call gets through.
    let answers = during_restart(&mut c.b);
    assert!(answers.len() > 10, "only {} calls answered", answers.len());
    for (n, r) in answers.iter().enumerate() {
        expect_decision(r, 503, "kill-switch", &key)
            .unwrap_or_else(|e| panic!("call {n} around the restart: {e:#}\n{}", c.b.tail()));
    }

    // A change made while the operator is down reaches nobody yet.
    c.patch(json!({"spec": {"killSwitch": {"enabled": false}}}));
    let generation = c.pi()["metadata"]["generation"].as_i64().unwrap();
    for s in c.sidecars() {
        expect_decision(
            &s.get(&url("/v1/charges")).unwrap(),
            503,
            "kill-switch",
            &key,
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", s.name()));
    }
    let stale = c.pi();
    assert!(
        stale["status"]["observedGeneration"].as_i64() < Some(generation),
        "status {}",
        stale["status"]
    );

    // Back: both resync (their reconnect backoff grew while it was down) and the status
    // catches up with the spec and with what the sidecars run.
    c.operator.restart().unwrap();
    for s in c.sidecars() {
        eventually(
            &format!("{} to resync after the restart", s.name()),
            Duration::from_secs(60),
            || {
                expect_partner_ok(&s.get(&url("/v1/charges"))?)?;
                Ok(())
            },
        );
    }
    eventually("the status to catch up", SETTLE, || {
        let pi = c.pi();
        let st = &pi["status"];
        anyhow::ensure!(st["observedGeneration"] == generation, "status {st}");
        let k = condition(&pi, "KillSwitchActive");
        anyhow::ensure!(k.is_some_and(|k| k["status"] == "False"), "status {st}");
        anyhow::ensure!(
            st["sidecars"]["desired"] == 2 && st["sidecars"]["upToDate"] == 2,
            "status {st}"
        );
        Ok(())
    });
}

/// Restarts `sidecar` while an app thread calls it back to back (a call refused while nothing
/// listens is retried at once), and returns every answer the app got, from the old process
/// and the new, until 200 ms after the new one reported ready.
fn during_restart(sidecar: &mut Sidecar) -> Vec<Resp> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listen = sidecar.listen;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let app = scope.spawn(|| {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let call = tollgate_e2e::net::request_within(
                    listen,
                    Method::GET,
                    &url("/v1/charges"),
                    &[],
                    "",
                    Duration::from_secs(5),
                );
                match call {
                    Ok(r) => answers.push(r),
                    Err(_) => std::thread::sleep(Duration::from_micros(100)),
                }
            }
            answers
        });
        sidecar.restart().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        app.join().unwrap()
    })
}

// === 6. a global band over two sidecars ===

/// Two sidecars drive a 10/s global band as fast as they can: together they never admit more
/// than the band (the shares they run add up to at most one), and each gets a fair part of it.
/// Shares follow reported demand, so while only one sidecar has reported, it may hold most of
/// the band for a moment; neither is starved.
#[test]
fn a_global_band_is_divided_between_the_sidecars() {
    const RATE: u64 = 10;
    const DRIVE: Duration = Duration::from_secs(4);
    let c = Cluster::start("globalband", |p| {
        let mut spec = base_spec(p);
        spec["rateLimit"] = json!({
            "scope": "global",
            "onLimit": "reject",
            "limits": [{"name": "second", "requests": RATE, "per": "1s"}],
        });
        spec
    });

    // Each sidecar runs half the band once the operator knows of both.
    for s in c.sidecars() {
        eventually(&format!("{} to run a half share", s.name()), SETTLE, || {
            let snapshot = s.persisted()?.unwrap_or_default();
            let share = &snapshot["integrations"][0]["quotaShare"];
            anyhow::ensure!(share["subscribers"] == 2, "share {share}");
            Ok(())
        });
    }

    // Both sidecars, two app threads each, as fast as they can for DRIVE.
    let _quiet = measuring();
    let start = Instant::now();
    let counts: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = c
            .sidecars()
            .into_iter()
            .flat_map(|s| [s, s])
            .map(|s| {
                let key = c.key();
                scope.spawn(move || {
                    let (mut admitted, mut limited) = (0u64, 0u64);
                    while start.elapsed() < DRIVE {
                        let r = s.get(&url("/v1/quota")).unwrap();
                        if r.status == 200 {
                            admitted += 1;
                        } else {
                            expect_decision(&r, 429, "rate-limited", &key).unwrap();
                            limited += 1;
                        }
                    }
                    (admitted, limited)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let per_sidecar = [counts[0].0 + counts[1].0, counts[2].0 + counts[3].0];
    let admitted: u64 = per_sidecar.iter().sum();
    let limited: u64 = counts.iter().map(|c| c.1).sum();
    eprintln!(
        "global band {RATE}/s over {elapsed:.2}s: admitted {admitted} ({per_sidecar:?} per sidecar), refused {limited}"
    );

    // GCRA is exact within a process, and a share change hands out no tokens. The shares in
    // force add up to at most the band, whose burst (RATE) the two buckets split: together at
    // most RATE + RATE * elapsed, plus one for a call landing on the last instant in each. One
    // undivided band per sidecar would admit about twice that. At least RATE * DRIVE: both
    // stay saturated (they refused calls), so the band is used whole; calls a few ms apart
    // lose at most a slot or two.
    let most = RATE as f64 * (1.0 + elapsed) + 2.0;
    let least = RATE as f64 * DRIVE.as_secs_f64();
    assert!(
        (least..=most).contains(&(admitted as f64)),
        "admitted {admitted}, expected {least}..={most:.0} ({per_sidecar:?} per sidecar)"
    );
    // Equal demand: equal shares once both reported; neither gets less than a quarter.
    for (s, n) in c.sidecars().iter().zip(per_sidecar) {
        assert!(
            n * 4 >= admitted,
            "{} admitted {n} of {admitted} ({per_sidecar:?} per sidecar)",
            s.name()
        );
    }
    assert!(limited > 0, "the drive never hit the limit");
    assert_eq!(c.partner.count() as u64, admitted);
}

// === 6b. demand leases: a global band follows demand ===

/// Calls per second the app of each sidecar makes: one busy pod, two quiet ones.
const DEMAND: [u32; 3] = [90, 5, 5];

/// The share of the band a sidecar runs, as its persisted snapshot says.
fn share_of(s: &Sidecar) -> anyhow::Result<f64> {
    let snapshot = s.persisted()?.unwrap_or_default();
    snapshot["integrations"][0]["quotaShare"]["fraction"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no share in {snapshot}"))
}

/// Three sidecars share a 100/s global band; their apps ask 90/5/5 calls per second for 20 s.
/// The operator divides the band by reported demand: the partner never sees more than 105
/// calls in any second, at least 85/s once the shares settle, and at least 80% of them come
/// from the busy pod (an even split would give it a third). Then a quiet sidecar is killed:
/// its share stays reserved for its lease (three heartbeats and a second: 16 s with this
/// operator's 5 s heartbeat) and then goes to the others. The per-second series is printed.
#[test]
fn a_global_band_follows_demand_and_a_killed_sidecars_share_is_reclaimed() {
    demand_leases("demand", 1, Duration::from_secs(5), Duration::from_secs(18));
}

/// The same across two operator replicas: the busy sidecar on one, the quiet ones on the
/// other. Each replica takes the part of the band its sidecars need (published in its peer
/// Lease every 2 s here); a part rises only after two peer intervals and a second (5 s), so
/// the other has lowered its own first: the shares settle within 10 s. The killed sidecar's
/// share comes back after its lease (16 s), a peer interval (this replica sees the other let
/// go), that delay and a recount: 25 s.
#[test]
fn a_global_band_follows_demand_across_two_operator_replicas() {
    let reclaim = Duration::from_secs(16 + 2 + 5 + 2);
    demand_leases("demand2", 2, Duration::from_secs(10), reclaim);
}

/// The scenario above with `replicas` operators (the busy sidecar subscribes to the first,
/// the quiet ones to the last); totals count from `settled_at`; the killed sidecar's share
/// must come back by `reclaim` (and not before its 16 s lease).
fn demand_leases(prefix: &str, replicas: usize, settled_at: Duration, reclaim: Duration) {
    const BAND: u64 = 100;
    const RUN: Duration = Duration::from_secs(20);
    const LEASE: Duration = Duration::from_secs(16);
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace(prefix).unwrap();
    let partner = Partner::echo().unwrap();
    objects::service_account(cp, &ns, "app").unwrap();
    objects::secret(cp, &ns, "partner-key", "apiKey", FIRST_KEY).unwrap();
    let mut spec = base_spec(&partner);
    spec["rateLimit"] = json!({
        "scope": "global",
        "onLimit": "reject",
        "limits": [{"name": "second", "requests": BAND, "per": "1s"}],
    });
    objects::apply(cp, &objects::partner_integration(&ns, "partner", spec)).unwrap();
    let operators: Vec<Operator> = (0..replicas)
        .map(|i| {
            let config = OperatorConfig::for_namespace(&format!("{ns}-operator-{i}"), &ns);
            Operator::start(cp, config).unwrap()
        })
        .collect();
    let mut sidecars: Vec<Sidecar> = ["busy", "quiet-1", "quiet-2"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pod = make_pod(cp, &ns, name, &[("app", "checkout")]);
            let operator = &operators[if i == 0 { 0 } else { replicas - 1 }];
            start_sidecar(
                operator,
                format!("{ns}-{name}-sidecar"),
                &ns,
                name,
                &pod.token,
            )
        })
        .collect();
    let logs = |sidecars: &[Sidecar]| {
        let mut out: Vec<String> = operators.iter().map(Operator::tail).collect();
        out.extend(sidecars.iter().map(Sidecar::tail));
        out.join("\n")
    };
    for s in &sidecars {
        eventually(
            &format!("{} to count three sidecars", s.name()),
            SETTLE,
            || {
                let snapshot = s.persisted()?.unwrap_or_default();
                let share = &snapshot["integrations"][0]["quotaShare"];
                anyhow::ensure!(share["subscribers"] == 3, "share {share}");
                Ok(())
            },
        );
    }

    let _quiet = measuring();
    let key = format!("{ns}/partner");
    let start = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let killed = std::sync::atomic::AtomicBool::new(false);
    // (seconds since start, partner count) every 50 ms from the start, and each app's admitted
    // calls by second.
    let mut samples: Vec<(f64, usize)> = Vec::new();
    let mut reclaimed_after = None;
    let admitted: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let apps: Vec<_> = sidecars
            .iter()
            .zip(DEMAND)
            .enumerate()
            .map(|(i, (s, rate))| {
                let (key, stop, killed) = (&key, &stop, &killed);
                scope.spawn(move || {
                    let mut by_second = vec![0u64; 64];
                    let every = Duration::from_secs(1) / rate;
                    let mut next = start;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if i == 2 && killed.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        // An open-loop app: calls at its rate, whatever the answers.
                        next += every;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let Ok(r) = s.get(&url("/v1/charge")) else {
                            continue;
                        };
                        if r.status == 200 {
                            let sec = start.elapsed().as_secs() as usize;
                            if let Some(c) = by_second.get_mut(sec) {
                                *c += 1;
                            }
                        } else {
                            expect_decision(&r, 429, "rate-limited", key).unwrap();
                        }
                    }
                    by_second
                })
            })
            .collect();
        // On a fixed schedule, so 20 samples apart is one second.
        for k in 0..=RUN.as_millis() / 50 {
            let due = start + Duration::from_millis(50 * k as u64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            samples.push((start.elapsed().as_secs_f64(), partner.count()));
        }
        // quiet-2 dies mid-run (SIGKILL); busy and quiet-1 go on.
        killed.store(true, std::sync::atomic::Ordering::Relaxed);
        let pid = sidecars[2].pid().expect("quiet-2 runs").to_string();
        let status = std::process::Command::new("kill")
            .args(["-9", &pid])
            .status();
        assert!(
            status.as_ref().is_ok_and(|s| s.success()),
            "kill -9 {pid}: {status:?}"
        );
        let before = share_of(&sidecars[0]).unwrap();
        let killed_at = Instant::now();
        while killed_at.elapsed() < reclaim + Duration::from_secs(6) {
            if share_of(&sidecars[0]).unwrap_or(0.0) > before + 0.02 {
                reclaimed_after = Some(killed_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        apps.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Reaped.
    sidecars[2].kill();

    // The partner per second, and each app's admitted calls per second.
    let at = |t: f64| samples[(t * 20.0).round() as usize].1;
    let secs = RUN.as_secs() as usize;
    eprintln!("second  partner  busy  quiet-1  quiet-2");
    for (sec, ((busy, quiet1), quiet2)) in admitted[0]
        .iter()
        .zip(&admitted[1])
        .zip(&admitted[2])
        .take(secs)
        .enumerate()
    {
        let partner_in = at(sec as f64 + 1.0) - at(sec as f64);
        eprintln!("{sec:>6}  {partner_in:>7}  {busy:>4}  {quiet1:>7}  {quiet2:>7}");
    }
    // Every 1-second window, sliding by the 50 ms samples.
    let worst = samples
        .windows(21)
        .map(|w| w[20].1 - w[0].1)
        .max()
        .unwrap_or(0);
    let settled = settled_at.as_secs() as usize..secs;
    let seconds = settled.len() as f64;
    let total = (at(RUN.as_secs_f64()) - at(settled_at.as_secs_f64())) as f64 / seconds;
    let busy: u64 = admitted[0][settled.clone()].iter().sum();
    let all: u64 = admitted
        .iter()
        .map(|a| a[settled.clone()].iter().sum::<u64>())
        .sum();
    let busy_part = busy as f64 / all.max(1) as f64;
    eprintln!(
        "worst 1-s window {worst}; {total:.1}/s in total after {settled_at:?}; the busy pod {:.0}% of it; share reclaimed {reclaimed_after:?} after the kill",
        busy_part * 100.0
    );
    let most = BAND as f64 * 1.05;
    assert!(
        worst as f64 <= most,
        "the partner saw {worst} calls in one second, more than {most}\n{}",
        logs(&sidecars)
    );
    assert!(
        total >= 85.0,
        "only {total:.1}/s reached the partner\n{}",
        logs(&sidecars)
    );
    assert!(
        busy_part >= 0.8,
        "the busy pod got {:.0}%",
        busy_part * 100.0
    );
    let reclaimed = reclaimed_after.unwrap_or_else(|| {
        panic!(
            "the killed sidecar's share was never reclaimed\n{}",
            logs(&sidecars)
        )
    });
    // Reclaimed when its lease ends, not before, and within a report and a push of it.
    assert!(
        reclaimed >= LEASE - Duration::from_secs(1)
            && reclaimed <= reclaim + Duration::from_secs(2),
        "reclaimed {reclaimed:?} after the kill, lease {LEASE:?}, expected by {reclaim:?}"
    );
    assert!(share_of(&sidecars[0]).unwrap() <= 1.0);
}

// === 7. kubectl get pi ===

#[test]
fn kubectl_get_pi_shows_live_numbers_from_the_sidecars() {
    let c = Cluster::start("columns", base_spec);

    // Per sidecar 12 good calls and 4 partner errors, each taking at least 120 ms.
    std::thread::scope(|scope| {
        for s in c.sidecars() {
            scope.spawn(move || {
                for n in 0..16 {
                    let path = if n % 4 == 3 { "/fail" } else { "/v1/ok" };
                    let r = s.get(&url(&format!("{path}?delay=120"))).unwrap();
                    let want = if n % 4 == 3 { 500 } else { 200 };
                    assert_eq!((r.status, r.reason()), (want, None), "{}", r.body);
                }
            });
        }
    });

    let row = eventually("kubectl get pi to show the traffic", SETTLE, || {
        let (out, col) = c.get_pi()?;
        let rpm: f64 = col("RPM").parse().unwrap_or(0.0);
        let err: f64 = col("ERR%").parse().unwrap_or(-1.0);
        let p95: f64 = col("P95")
            .strip_suffix("ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        anyhow::ensure!(
            col("READY") == "True" && col("KILL") == "false" && col("CIRCUIT") == "closed",
            "{out}"
        );
        // Every call reported: exactly a quarter failed.
        anyhow::ensure!(rpm > 0.0 && err == 25.0, "{out}");
        // A p95 is a latency bucket's upper bound: at least the partner's 120 ms.
        anyhow::ensure!((120.0..5000.0).contains(&p95), "{out}");
        Ok(out)
    });
    eprintln!("{row}");
}

/// A kill switch drill is not the partner failing: `kubectl get pi` shows 0% partner errors
/// and the refused calls apart, and the SLA is not breached by the sidecars' own answers.
#[test]
fn a_kill_switch_drill_shows_refusals_apart_from_partner_errors() {
    let c = Cluster::start("drill", |p| {
        let mut spec = base_spec(p);
        spec["sla"] = json!({"availabilityPercent": "99"});
        spec
    });
    let key = c.key();
    for s in c.sidecars() {
        for _ in 0..4 {
            expect_partner_ok(&s.get(&url("/v1/ok")).unwrap()).unwrap();
        }
    }
    c.patch(json!({"spec": {"killSwitch": {"enabled": true, "reason": "drill"}}}));
    for s in c.sidecars() {
        eventually(
            &format!("{} to answer kill-switch", s.name()),
            SETTLE,
            || expect_decision(&s.get(&url("/v1/ok"))?, 503, "kill-switch", &key),
        );
        for _ in 0..20 {
            expect_decision(&s.get(&url("/v1/ok")).unwrap(), 503, "kill-switch", &key).unwrap();
        }
    }

    let row = eventually("kubectl get pi to show the refusals", SETTLE, || {
        let (out, col) = c.get_pi()?;
        let rpm: i64 = col("RPM").parse().unwrap_or(0);
        let refused: i64 = col("REFUSED").parse().unwrap_or(0);
        anyhow::ensure!(col("KILL") == "true", "{out}");
        // Every call of both sidecars reported (8 reached the partner, at least 42 refused).
        anyhow::ensure!(rpm > 0 && refused > 0 && refused < rpm, "{out}");
        anyhow::ensure!(col("ERR%") == "0", "{out}");
        Ok(out)
    });
    eprintln!("{row}");
    let pi = c.pi();
    let traffic = &pi["status"]["traffic"];
    assert_eq!(traffic["errorRatePercent"].as_f64(), Some(0.0), "{pi}");
    assert!(traffic["refusedPerMinute"].as_i64().unwrap() > 0, "{pi}");
    let sla = pi["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "SLABreached")
        .cloned()
        .unwrap_or_default();
    assert_eq!(sla["status"], "False", "{pi}");
}

/// A relabelled pod's sidecar follows its labels: the kubelet rewrites the downward-API labels
/// file (here the test does, as no kubelet runs), the sidecar subscribes again, and the
/// operator selects integrations by the labels the pod has now.
#[test]
fn a_relabelled_pod_gets_the_integrations_its_new_labels_select() {
    let cp = ControlPlane::shared();
    install_crd(cp);
    let ns = cp.create_namespace("relabel").unwrap();
    objects::service_account(cp, &ns, "app").unwrap();
    for app in ["checkout", "billing"] {
        let spec = json!({
            "workloadSelector": {"matchLabels": {"app": app}},
            "upstream": {"url": "http://127.0.0.1:9", "hosts": [format!("api.{app}.test")]},
        });
        objects::apply(
            cp,
            &objects::partner_integration(&ns, &format!("{app}-partner"), spec),
        )
        .unwrap();
    }
    let pod = make_pod(cp, &ns, "worker", &[("app", "checkout")]);
    let operator = Operator::start(
        cp,
        OperatorConfig::for_namespace(&format!("{ns}-operator"), &ns),
    )
    .unwrap();
    let sidecar = Sidecar::start(SidecarConfig {
        name: format!("{ns}-worker-sidecar"),
        operator_url: operator.url(),
        operator_ca: operator.cert.ca_file.clone(),
        pod_namespace: ns.clone(),
        pod_name: pod.name.clone(),
        token: pod.token.clone(),
        unknown_hosts: "deny",
        labels: vec![("app".into(), "checkout".into())],
    })
    .unwrap();
    let holds = |want: &str| {
        let want = vec![format!("{ns}/{want}")];
        eventually(&format!("the sidecar to hold {want:?}"), SETTLE, || {
            let held = sidecar.integrations()?;
            anyhow::ensure!(held == want, "holds {held:?}; {}", sidecar.tail());
            Ok(())
        });
    };
    holds("checkout-partner");

    cp.kubectl([
        "label",
        "pod",
        "worker",
        "-n",
        &ns,
        "app=billing",
        "--overwrite",
    ])
    .unwrap();
    sidecar.set_labels(&[("app", "billing")]).unwrap();
    holds("billing-partner");
    assert_eq!(
        sidecar.count_log("the pod's labels changed: subscribing again to be selected by them"),
        1,
        "{}",
        sidecar.tail()
    );
}

// === 9. the partner's lifecycle signals ===

/// The partner answers one call with `Deprecation`, `Sunset` and a deprecation link: the
/// sidecar reports it, and the PartnerIntegration shows condition `Deprecated` naming the route,
/// the dates and the link, with one `SunsetAnnounced` event, however many reconciles follow.
#[test]
fn a_partners_deprecation_and_sunset_reach_the_status_and_one_event() {
    let c = Cluster::start("lifecycle", base_spec);
    let link = "https://partner.example/deprecations/v1";
    c.partner.queue([Reply::Full {
        status: 200,
        headers: vec![
            ("deprecation".into(), "@1688169599".into()),
            ("sunset".into(), "Sat, 31 Dec 2050 23:59:59 GMT".into()),
            ("link".into(), format!("<{link}>; rel=\"deprecation\"")),
        ],
        body: "ok".into(),
    }]);
    let r = c.a.get(&url("/v1/tracking")).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("sunset"), Some("Sat, 31 Dec 2050 23:59:59 GMT"));

    let cond = c.wait_condition("Deprecated", |c| c["status"] == "True");
    assert_eq!(cond["reason"], "SunsetAnnounced");
    let msg = cond["message"].as_str().unwrap();
    assert!(
        msg.contains("route default deprecated as of 2023-06-30T23:59:59Z")
            && msg.contains("sunset on 2050-12-31T23:59:59Z")
            && msg.contains(link),
        "{msg}"
    );

    let events = c.wait_events("SunsetAnnounced");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["note"], msg);
    assert_eq!(events[0]["regarding"]["name"], "partner");

    c.still_one_event_after_a_reconcile("SunsetAnnounced");
    assert_eq!(condition(&c.pi(), "Deprecated").unwrap()["status"], "True");
}

/// The partner throttles an adaptive quota (a 429): the sidecar lowers its rate and reports
/// it, and the PartnerIntegration shows `PartnerThrottling` True (reason `RateLowered`, the
/// rate in force in the message); once the partner is quiet the rate climbs back over
/// `recovery` and the condition turns False (`RateAsConfigured`).
#[test]
fn a_throttling_partner_shows_on_the_status_until_the_rate_is_back() {
    let c = Cluster::start("throttled", |p| {
        let mut spec = base_spec(p);
        spec["rateLimit"] = json!({
            "scope": "perPod",
            "limits": [{"name": "second", "requests": 100, "per": "1s"}],
            "adaptive": {"minPercent": 10, "recovery": "2s"},
        });
        spec
    });
    let cond = c.wait_condition("PartnerThrottling", |c| c["status"] == "False");
    c.partner.queue([Reply::Full {
        status: 429,
        headers: vec![("retry-after".into(), "1".into())],
        body: "slow down".into(),
    }]);
    let r = c.a.get(&url("/v1/quota")).unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    let lowered = c.wait_condition("PartnerThrottling", |c| c["status"] == "True");
    assert_eq!(lowered["reason"], "RateLowered");
    let msg = lowered["message"].as_str().unwrap();
    assert!(msg.contains("of the configured rate"), "{msg}");
    let back = c.wait_condition("PartnerThrottling", |c| c["status"] == "False");
    assert_eq!(back["reason"], "RateAsConfigured", "before: {cond}");
}

/// The partner answers a 2xx whose body breaks the route's success rule: the sidecar reports
/// the violation, and the PartnerIntegration shows condition `ContractViolated` (reason
/// `SuccessRuleBroken`, the route and its count in the message) with one event for the change,
/// however many reconciles follow.
#[test]
fn a_contract_violation_reaches_the_status_and_one_event() {
    let c = Cluster::start("contract", |p| {
        let mut spec = base_spec(p);
        spec["contract"] = json!({"success": {"jsonPath": "$.status", "equals": "ok"}});
        spec
    });
    let quiet = c.wait_condition("ContractViolated", |_| true);
    assert_eq!(quiet["status"], "False");
    assert_eq!(quiet["reason"], "ContractKept");

    c.partner.queue([Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"status":"error","detail":"card declined"}"#.into(),
    }]);
    let r = c.a.get(&url("/v1/charges")).unwrap();
    assert_eq!(
        r.status, 200,
        "the app gets the partner's answer: {}",
        r.body
    );
    assert!(r.body.contains("card declined"), "{}", r.body);

    let cond = c.wait_condition("ContractViolated", |c| c["status"] == "True");
    assert_eq!(cond["reason"], "SuccessRuleBroken");
    let msg = cond["message"].as_str().unwrap();
    assert!(msg.contains("route default: 1 success-rule"), "{msg}");

    let events = c.wait_events("SuccessRuleBroken");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["action"], "ContractCheck");
    assert_eq!(events[0]["regarding"]["name"], "partner");

    c.still_one_event_after_a_reconcile("SuccessRuleBroken");
}

/// A route's JSON Schema from a ConfigMap labelled `tollgate.dev/contract-schema=true`: the
/// operator distributes its text, a partner answer that does not match it is counted and shows
/// as `ContractViolated` (reason `SchemaMismatch`), and an edit of the ConfigMap is a new
/// revision that reaches the sidecars.
#[test]
fn a_schema_from_a_labelled_config_map_checks_answers_and_follows_edits() {
    let c = Cluster::start("schema", base_spec);
    let config_map = |schema: &str| {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "orders", "namespace": c.ns,
                         "labels": {"tollgate.dev/contract-schema": "true"}},
            "data": {"order.json": schema},
        })
        .to_string()
    };
    objects::apply(
        c.cp,
        &config_map(r#"{"type": "object", "required": ["id"]}"#),
    )
    .unwrap();
    c.patch(
        json!({"spec": {"contract": {"schema": {"configMapName": "orders", "key": "order.json"}}}}),
    );
    let revision = eventually("the schema in force on both sidecars", SETTLE, || {
        let pi = c.pi();
        anyhow::ensure!(
            condition(&pi, "ContractViolated").is_some()
                && pi["status"]["sidecars"]["upToDate"] == 2,
            "{pi}\n{}",
            c.logs()
        );
        Ok(pi["status"]["configRevision"].as_str().unwrap().to_string())
    });

    c.partner.queue([Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"amount":12}"#.into(),
    }]);
    let r = c.a.get(&url("/v1/orders/1")).unwrap();
    assert_eq!(
        r.status, 200,
        "the app gets the partner's answer: {}",
        r.body
    );
    assert_eq!(r.body, r#"{"amount":12}"#);
    let m = c.a.metrics().unwrap();
    assert_eq!(
        metric(
            &m,
            "tollgate_contract_violations_total",
            &[("kind", "schema")]
        ),
        1.0,
        "{m}"
    );
    let cond = c.wait_condition("ContractViolated", |c| c["status"] == "True");
    assert_eq!(cond["reason"], "SchemaMismatch");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("route default: 1 schema"),
        "{cond}"
    );

    // The ConfigMap is edited: a new revision, on both sidecars.
    objects::apply(c.cp, &config_map(r#"{"type": "object"}"#)).unwrap();
    eventually(
        "the edited schema in force on both sidecars",
        SETTLE,
        || {
            let pi = c.pi();
            anyhow::ensure!(
                pi["status"]["configRevision"] != revision.as_str()
                    && pi["status"]["sidecars"]["upToDate"] == 2,
                "{pi}\n{}",
                c.logs()
            );
            Ok(())
        },
    );
}

/// The start-up check (`credentials.verify`): each sidecar sends it through its policy stack
/// when the credential is applied, and the status shows `CredentialVerified` with an Event; a
/// check the partner fails shows `False` with what came back, and a Warning Event.
#[test]
fn the_start_up_check_reaches_the_status_and_an_event() {
    let c = Cluster::start("verify", |p| {
        let mut spec = base_spec(p);
        spec["credentials"]["verify"] = json!({"path": "/v1/account"});
        spec
    });
    let verified = |status: &'static str| {
        eventually(&format!("CredentialVerified {status}"), SETTLE, || {
            let pi = c.pi();
            let cond = condition(&pi, "CredentialVerified").cloned();
            anyhow::ensure!(
                cond.as_ref().is_some_and(|c| c["status"] == status),
                "{pi}\n{}",
                c.logs()
            );
            Ok(cond.unwrap())
        })
    };
    let cond = verified("True");
    assert_eq!(cond["reason"], "CheckPassed");
    assert_eq!(
        cond["message"], "GET /v1/account: the partner answered 200",
        "{cond}"
    );
    // The check went through the stack: with the Secret's key, the pinned version.
    let checks: Vec<_> = c
        .partner
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v1/account")
        .collect();
    assert_eq!(checks.len(), 2, "one check per sidecar");
    for s in &checks {
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {FIRST_KEY}").as_str())
        );
        assert_eq!(s.header("x-api-version"), Some("2024-06-20"));
    }
    let passed = eventually("a CheckPassed event", SETTLE, || {
        let e = c.events("CheckPassed")?;
        anyhow::ensure!(!e.is_empty(), "no event yet\n{}", c.logs());
        Ok(e)
    });
    assert_eq!(passed[0]["type"], "Normal");
    assert_eq!(passed[0]["regarding"]["name"], "partner");

    // A check the partner fails (the echo partner answers 500 under /fail).
    c.patch(json!({"spec": {"credentials": {"verify": {"path": "/fail/account"}}}}));
    let cond = verified("False");
    assert_eq!(cond["reason"], "CheckFailed");
    assert_eq!(
        cond["message"], "GET /fail/account: the partner answered 500, not 200",
        "{cond}"
    );
    let failed = eventually("a CheckFailed event", SETTLE, || {
        let e = c.events("CheckFailed")?;
        anyhow::ensure!(!e.is_empty(), "no event yet\n{}", c.logs());
        Ok(e)
    });
    assert_eq!(failed[0]["type"], "Warning");
    assert!(!c.logs().contains(FIRST_KEY), "the key in a log");
}

/// OAuth2 client credentials in cluster mode: the operator reads the client id and secret from
/// their opted-in Secrets and distributes them; each sidecar fetches its own token from the
/// token endpoint, sends it to the partner, and the status shows the start-up check passed and
/// `CredentialRefreshFailing` False. The token and the client secret appear in no log.
#[test]
fn oauth2_tokens_are_fetched_by_the_sidecars_from_distributed_client_credentials() {
    let tokens = std::sync::Arc::new(
        tollgate_e2e::net::runtime()
            .block_on(tollgate_testkit::TokenServer::start("app", "s3cret-e2e")),
    );
    let token_url = tokens.url();
    let c = Cluster::start("oauth2", |p| {
        let mut spec = base_spec(p);
        spec["credentials"] = json!({
            "format": "Bearer {value}",
            "oauth2": {
                "tokenUrl": token_url,
                "clientIdRef": {"name": "oauth-id", "key": "id"},
                "clientSecretRef": {"name": "oauth-secret", "key": "secret"},
                "scopes": ["shipments.read"],
            },
            "verify": {"path": "/v1/account"},
        });
        spec
    });
    objects::secret(c.cp, &c.ns, "oauth-id", "id", "app").unwrap();
    objects::secret(c.cp, &c.ns, "oauth-secret", "secret", "s3cret-e2e").unwrap();

    let pi = eventually("CredentialVerified True", SETTLE, || {
        let pi = c.pi();
        anyhow::ensure!(
            condition(&pi, "CredentialVerified").is_some_and(|c| c["status"] == "True"),
            "{pi}\n{}",
            c.logs()
        );
        Ok(pi)
    });
    assert_eq!(
        condition(&pi, "CredentialRefreshFailing").unwrap()["status"],
        "False",
        "{pi}"
    );
    for s in c.sidecars() {
        let r = s.get(&url("/v1/charges")).unwrap();
        let echo = expect_partner_ok(&r).unwrap();
        let auth = echo["headers"]["authorization"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(tokens.is_valid(Some(&auth)), "{auth}");
    }
    assert_eq!(tokens.issued(), 2, "one token per sidecar");
    let logs = c.logs();
    assert!(!logs.contains("s3cret-e2e"), "the client secret in a log");
    assert!(
        !logs.contains("tok-1") && !logs.contains("tok-2"),
        "a token in a log"
    );
}

/// A rotation window: the partner accepts only the key named by `secondaryRef`. Calls succeed
/// through both sidecars (each sent once more with the secondary after the primary's 401), and
/// the status shows `SecondaryKeyInUse` True with how many calls needed it.
#[test]
fn a_partner_that_takes_only_the_secondary_key_shows_it_in_use() {
    const SECOND_KEY: &str = "sk_test_second";
    let c = Cluster::start("rotation", |p| {
        let mut spec = base_spec(p);
        spec["credentials"]["secondaryRef"] = json!({"name": "partner-key-old", "key": "apiKey"});
        spec
    });
    objects::secret(c.cp, &c.ns, "partner-key-old", "apiKey", SECOND_KEY).unwrap();
    c.partner.script(|_, seen| {
        if seen.header("authorization") == Some("Bearer sk_test_second") {
            Reply::Echo
        } else {
            Reply::Status(401)
        }
    });
    // Once the sidecars hold the secondary, every call is served by it.
    eventually("calls served with the secondary", SETTLE, || {
        for s in c.sidecars() {
            expect_partner_ok(&s.get(&url("/v1/charges"))?)?;
        }
        Ok(())
    });
    let cond = eventually("SecondaryKeyInUse True", SETTLE, || {
        let pi = c.pi();
        let cond = condition(&pi, "SecondaryKeyInUse").cloned();
        anyhow::ensure!(
            cond.as_ref().is_some_and(|c| c["status"] == "True"),
            "{pi}\n{}",
            c.logs()
        );
        Ok(cond.unwrap())
    });
    assert_eq!(cond["reason"], "SecondaryKeyServing");
    let msg = cond["message"].as_str().unwrap();
    assert!(
        msg.contains("accepted calls in the status window needed the secondary key")
            && msg.contains("last served a call at"),
        "{msg}"
    );
    for s in c.sidecars() {
        let m = s.metrics().unwrap();
        assert!(
            metric(
                &m,
                "tollgate_credential_key_total",
                &[("integration", &c.key()), ("key", "secondary")]
            ) >= 1.0,
            "{m}"
        );
    }
    assert!(!c.logs().contains(SECOND_KEY), "the key in a log");
}
