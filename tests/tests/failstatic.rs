//! The control plane's least authority and fail-static behaviour, on the real API server with
//! the real operator and sidecar processes and a partner on loopback:
//!
//! - a Secret is a credential only when it opted in (label `tollgate.dev/credential: "true"`);
//! - an operator that restarts never hands sidecars an empty or partial catalog, and keeps a
//!   credential it cannot read at the moment;
//! - two integrations claiming one host: the newer is refused, the older keeps working.
//!
//! Every wait is a poll with a deadline; nothing sleeps for timing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tollgate_e2e::net::{Resp, metric};
use tollgate_e2e::objects;
use tollgate_e2e::{
    ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig, eventually,
};

use crate::crd::install_crd;

const HOST: &str = "api.partner.test";
const KEY: &str = "sk_test_failstatic";
/// Longest time any change may take to show.
const SETTLE: Duration = Duration::from_secs(30);

fn url(path: &str) -> String {
    format!("http://{HOST}{path}")
}

/// A namespace, its partner server, pods and an operator; sidecars are added per test.
struct Setup {
    cp: &'static ControlPlane,
    ns: String,
    partner: Partner,
    operator: Operator,
    pods: Vec<(String, String)>,
}

impl Setup {
    /// `objects` are applied before the operator starts; `pods` pods labelled `app=checkout`.
    fn start(prefix: &str, pods: usize, objects: impl Fn(&str, &Partner) -> Vec<String>) -> Setup {
        let cp = ControlPlane::shared();
        install_crd(cp);
        let ns = cp.create_namespace(prefix).unwrap();
        let partner = Partner::echo().unwrap();
        objects::service_account(cp, &ns, "app").unwrap();
        for manifest in objects(&ns, &partner) {
            objects::apply(cp, &manifest).unwrap();
        }
        let pods = (0..pods)
            .map(|i| {
                let name = format!("checkout-{i}");
                let uid = objects::pod(cp, &ns, &name, "app", &[("app", "checkout")]).unwrap();
                let token = objects::pod_token(cp, &ns, "app", &name, &uid).unwrap();
                (name, token)
            })
            .collect();
        let operator = Operator::start(
            cp,
            OperatorConfig::for_namespace(&format!("{ns}-operator"), &ns),
        )
        .unwrap();
        Setup {
            cp,
            ns,
            partner,
            operator,
            pods,
        }
    }

    fn sidecar(&self, i: usize) -> Sidecar {
        let (pod, token) = &self.pods[i];
        Sidecar::start(SidecarConfig {
            name: format!("{}-{pod}-sidecar", self.ns),
            operator_url: self.operator.url(),
            operator_ca: self.operator.cert.ca_file.clone(),
            pod_namespace: self.ns.clone(),
            pod_name: pod.clone(),
            token: token.clone(),
            unknown_hosts: "deny",
            labels: Vec::new(),
        })
        .unwrap()
    }

    fn pi(&self, name: &str) -> Value {
        objects::get_json(self.cp, &self.ns, "pi", name).unwrap()
    }
}

fn spec(partner: &Partner, extra: Value) -> Value {
    let mut s = json!({
        "workloadSelector": {"matchLabels": {"app": "checkout"}},
        "upstream": {"url": partner.url(), "hosts": [HOST], "connectTimeout": "1s"},
        "retries": {"maxAttempts": 1},
    });
    if let (Some(s), Some(extra)) = (s.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    s
}

fn credentials(secret: &str) -> Value {
    json!({"credentials": {
        "secretRef": {"name": secret, "key": "apiKey"},
        "header": "Authorization",
        "format": "Bearer {value}",
    }})
}

/// The operator's `tollgate_operator_connected_sidecars`, read from its admin listener.
fn connected_sidecars(admin: SocketAddr) -> anyhow::Result<f64> {
    Ok(metric(
        &tollgate_e2e::net::get(admin, "/metrics")?.body,
        "tollgate_operator_connected_sidecars",
        &[],
    ))
}

fn condition<'a>(pi: &'a Value, type_: &str) -> Option<&'a Value> {
    pi["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn holds(s: &Sidecar, want: &[String]) {
    eventually(&format!("{} to hold {want:?}", s.name()), SETTLE, || {
        let mut held = s.integrations()?;
        held.sort();
        anyhow::ensure!(held == want, "holds {held:?}; {}", s.tail());
        Ok(())
    });
}

fn partner_ok(r: &Resp) -> anyhow::Result<Value> {
    anyhow::ensure!(
        r.status == 200 && r.reason().is_none(),
        "got {} {:?}: {}",
        r.status,
        r.reason(),
        r.body
    );
    r.try_json()
}

/// Calls every sidecar back to back from its own thread while `during` runs, then until
/// `until` holds; returns every answer each got.
fn calling_while(
    sidecars: &[SocketAddr],
    during: impl FnOnce(),
    until: impl Fn() -> anyhow::Result<()>,
) -> Vec<Vec<Resp>> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let callers: Vec<_> = sidecars
            .iter()
            .map(|&listen| {
                let stop = &stop;
                scope.spawn(move || {
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
                            // A sidecar restarting: nothing listens for a moment.
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                    answers
                })
            })
            .collect();
        during();
        eventually("the end condition", Duration::from_secs(90), &until);
        stop.store(true, Ordering::Relaxed);
        callers.into_iter().map(|c| c.join().unwrap()).collect()
    })
}

// === 1. Secrets opt in ===

#[test]
fn an_unlabelled_secret_is_never_sent_and_the_status_says_how_to_opt_in() {
    let s = Setup::start("optin", 1, |ns, partner| {
        vec![
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "db-password", "namespace": ns},
                "stringData": {"apiKey": KEY},
            })
            .to_string(),
            objects::partner_integration(ns, "partner", spec(partner, credentials("db-password"))),
        ]
    });
    let pi = eventually("status Invalid=True", SETTLE, || {
        let pi = s.pi("partner");
        let c = condition(&pi, "Invalid");
        anyhow::ensure!(
            c.is_some_and(|c| c["status"] == "True"),
            "status {}",
            pi["status"]
        );
        Ok(pi)
    });
    let message = condition(&pi, "Invalid").unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for needle in [
        "spec.credentials.secretRef",
        "db-password",
        "tollgate.dev/credential=true",
        "kubectl label secret",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }

    // Whatever the sidecar holds, the Secret's value never reaches the partner.
    let sidecar = s.sidecar(0);
    eventually("the sidecar to be ready", SETTLE, || {
        anyhow::ensure!(sidecar.readyz()? == 200, "{}", sidecar.tail());
        Ok(())
    });
    for _ in 0..5 {
        let _ = sidecar.get(&url("/v1/charges"));
    }
    let config = sidecar.config().unwrap().to_string();
    assert!(!config.contains(KEY), "/config shows the value: {config}");
    for seen in s.partner.seen() {
        let all = format!("{:?}", seen.headers);
        assert!(!all.contains(KEY), "the partner got the Secret: {all}");
    }

    // Opting in (the fix the message names) makes it a credential.
    s.cp.kubectl([
        "-n",
        &s.ns,
        "label",
        "secret",
        "db-password",
        "tollgate.dev/credential=true",
    ])
    .unwrap();
    eventually("the labelled Secret to be injected", SETTLE, || {
        let echo = partner_ok(&sidecar.get(&url("/v1/charges"))?)?;
        let auth = echo["headers"]["authorization"].as_str().unwrap_or("");
        anyhow::ensure!(auth == format!("Bearer {KEY}"), "partner saw {echo}");
        Ok(())
    });
    let pi = s.pi("partner");
    assert_eq!(
        condition(&pi, "Invalid").map(|c| c["status"].clone()),
        Some(json!("False")),
        "status {}",
        pi["status"]
    );
}

// === 2. restarts never empty a sidecar's catalog ===

#[test]
fn a_restarting_operator_never_makes_a_sidecar_drop_the_kill_switch() {
    let mut s = Setup::start("restart-kill", 2, |ns, partner| {
        // Several integrations, so a partial catalog would show as well as an empty one.
        let mut out = vec![objects::partner_integration(
            ns,
            "partner",
            spec(
                partner,
                json!({"killSwitch": {"enabled": true, "reason": "INC-7 e2e"}}),
            ),
        )];
        for i in 0..4 {
            let mut other = spec(partner, json!({}));
            other["upstream"]["hosts"] = json!([format!("other-{i}.partner.test")]);
            out.push(objects::partner_integration(
                ns,
                &format!("other-{i}"),
                other,
            ));
        }
        out
    });
    let mut a = s.sidecar(0);
    let mut b = s.sidecar(1);
    let mut want: Vec<String> = (0..4).map(|i| format!("{}/other-{i}", s.ns)).collect();
    want.push(format!("{}/partner", s.ns));
    want.sort();
    holds(&a, &want);
    holds(&b, &want);

    for round in 0..3 {
        let operator = &mut s.operator;
        let admin = operator.admin;
        let answers = calling_while(
            &[a.listen, b.listen],
            || {
                operator.restart().unwrap();
                // A pod restarting right after the operator connects at once.
                b.restart().unwrap();
            },
            || {
                let m = connected_sidecars(admin)?;
                anyhow::ensure!(m >= 2.0, "{m} sidecars connected");
                Ok(())
            },
        );
        for (who, answers) in ["a", "b"].iter().zip(&answers) {
            assert!(
                answers.len() > 10,
                "round {round}: {who} answered only {}",
                answers.len()
            );
            for (n, r) in answers.iter().enumerate() {
                assert!(
                    r.status == 503 && r.reason() == Some("kill-switch"),
                    "round {round}: sidecar {who}, call {n}: {} {:?} {}\n{}\n{}",
                    r.status,
                    r.reason(),
                    r.body,
                    a.tail(),
                    b.tail()
                );
            }
        }
        for sidecar in [&a, &b] {
            let mut held = sidecar.integrations().unwrap();
            held.sort();
            assert_eq!(held, want, "round {round}: {}", sidecar.tail());
            let persisted = sidecar.persisted().unwrap().unwrap();
            assert_eq!(
                persisted["integrations"].as_array().map(Vec::len),
                Some(5),
                "round {round}: {}",
                sidecar.name()
            );
        }
        a.restart().unwrap();
        holds(&a, &want);
    }
    assert_eq!(s.partner.count(), 0, "a call reached the partner");
}

/// What the load generator got for one call: which target, and the answer or the failure.
type Call = (usize, Result<Resp, String>);

/// Calls `targets` in turn through the sidecar at `listen`, `rate` calls a second (each on a
/// fresh connection, at most 256 in flight), until `stop`; `answered` counts calls as they
/// end. A call that does not end within 5 s is a failure.
fn load(
    listen: SocketAddr,
    targets: &[String],
    rate: u32,
    stop: &AtomicBool,
    answered: &Arc<AtomicUsize>,
) -> Vec<Call> {
    tollgate_e2e::net::runtime().block_on(async {
        let permits = Arc::new(tokio::sync::Semaphore::new(256));
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut calls = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let permit = permits.clone().acquire_owned().await.expect("open");
            let target = n % targets.len();
            let url = targets[target].clone();
            let answered = answered.clone();
            calls.push(tokio::spawn(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    tollgate_testkit::http::send(listen, Method::GET, &url, &[], ""),
                )
                .await;
                answered.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                let r = match r {
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(_) => Err("no answer within 5 s".to_string()),
                };
                (target, r)
            }));
            n += 1;
        }
        let mut out = Vec::with_capacity(calls.len());
        for c in calls {
            out.push(c.await.expect("call task"));
        }
        out
    })
}

#[test]
fn an_operator_killed_under_load_loses_no_call_and_keeps_every_policy() {
    const OPEN: &str = "open.partner.test";
    let mut s = Setup::start("restart-load", 1, |ns, partner| {
        let mut open = spec(partner, json!({}));
        open["upstream"]["hosts"] = json!([OPEN]);
        vec![
            objects::partner_integration(
                ns,
                "partner",
                spec(
                    partner,
                    json!({"killSwitch": {"enabled": true, "reason": "INC-9 load"}}),
                ),
            ),
            objects::partner_integration(ns, "open", open),
        ]
    });
    let a = s.sidecar(0);
    let want = vec![format!("{}/open", s.ns), format!("{}/partner", s.ns)];
    holds(&a, &want);
    let targets = [url("/v1/killed"), format!("http://{OPEN}/v1/open")];

    let stop = AtomicBool::new(false);
    let answered = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let calls = std::thread::scope(|scope| {
        let generator = scope.spawn(|| load(a.listen, &targets, 1000, &stop, &answered));
        let at_least = |n: usize, what: &str| {
            eventually(what, Duration::from_secs(120), || {
                let got = answered.load(Ordering::Relaxed);
                anyhow::ensure!(got >= n, "{got} calls answered");
                Ok(())
            })
        };
        at_least(1000, "load to run");
        s.operator.kill();
        let down = answered.load(Ordering::Relaxed);
        at_least(down + 2000, "calls while the operator is down");
        s.operator.restart().unwrap();
        let admin = s.operator.admin;
        eventually("the sidecar to reconnect", SETTLE, || {
            let m = connected_sidecars(admin)?;
            anyhow::ensure!(m >= 1.0, "{m} sidecars connected");
            Ok(())
        });
        let back = answered.load(Ordering::Relaxed);
        at_least(back + 2000, "calls after the operator is back");
        stop.store(true, Ordering::Relaxed);
        generator.join().unwrap()
    });
    let rate = calls.len() as f64 / started.elapsed().as_secs_f64();
    eprintln!("{} calls, {rate:.0} calls/s", calls.len());
    for (n, (target, r)) in calls.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("call {n} failed: {e}\n{}", a.tail()));
        if *target == 0 {
            assert!(
                r.status == 503 && r.reason() == Some("kill-switch"),
                "call {n} to the killed partner: {} {:?} {}",
                r.status,
                r.reason(),
                r.body
            );
        } else {
            partner_ok(r).unwrap_or_else(|e| panic!("call {n} to the open partner: {e:#}"));
        }
    }
    let seen = s.partner.seen();
    assert!(
        seen.iter().all(|c| c.path == "/v1/open"),
        "a killed call got through"
    );
    assert_eq!(
        seen.len(),
        calls.len() / 2,
        "every open call reached the partner once"
    );
}

#[test]
fn a_restarted_operator_keeps_a_credential_it_cannot_read() {
    let mut s = Setup::start("restart-secret", 1, |ns, partner| {
        vec![
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "partner-key", "namespace": ns,
                             "labels": {"tollgate.dev/credential": "true"}},
                "stringData": {"apiKey": KEY},
            })
            .to_string(),
            objects::partner_integration(ns, "partner", spec(partner, credentials("partner-key"))),
        ]
    });
    let sidecar = s.sidecar(0);
    let injected = |r: &Resp| -> anyhow::Result<()> {
        let echo = partner_ok(r)?;
        let auth = echo["headers"]["authorization"].as_str().unwrap_or("");
        anyhow::ensure!(auth == format!("Bearer {KEY}"), "partner saw {echo}");
        Ok(())
    };
    eventually("the credential to be injected", SETTLE, || {
        injected(&sidecar.get(&url("/v1/charges"))?)
    });

    // While the operator is down the Secret goes away (a rotation by delete and create, or a
    // label taken off by mistake); the operator comes back without it.
    s.operator.kill();
    s.cp.kubectl(["-n", &s.ns, "delete", "secret", "partner-key"])
        .unwrap();
    let operator = &mut s.operator;
    let admin = operator.admin;
    let cp = s.cp;
    let ns = s.ns.clone();
    let answers = calling_while(
        &[sidecar.listen],
        || operator.restart().unwrap(),
        || {
            let pi = objects::get_json(cp, &ns, "pi", "partner")?;
            let ready = condition(&pi, "Ready");
            anyhow::ensure!(
                ready.is_some_and(|c| c["status"] == "False"
                    && c["message"].as_str().unwrap_or("").contains("partner-key")),
                "status {}",
                pi["status"]
            );
            let m = connected_sidecars(admin)?;
            anyhow::ensure!(m >= 1.0, "{m} sidecars connected");
            Ok(())
        },
    );
    assert!(answers[0].len() > 10, "only {} answers", answers[0].len());
    for (n, r) in answers[0].iter().enumerate() {
        injected(r).unwrap_or_else(|e| panic!("call {n}: {e:#}\n{}", sidecar.tail()));
    }
    // Still after the operator settled, and in what the sidecar persisted.
    injected(&sidecar.get(&url("/v1/charges")).unwrap()).unwrap();
    let persisted = sidecar.persisted().unwrap().unwrap();
    assert_eq!(
        persisted["integrations"][0]["credential"],
        json!(KEY),
        "persisted {}",
        persisted["integrations"][0]["name"]
    );
}

// === 3. host conflicts ===

#[test]
fn of_two_integrations_claiming_one_host_the_newer_is_refused_and_the_older_works() {
    let s = Setup::start("conflict", 1, |ns, partner| {
        vec![objects::partner_integration(
            ns,
            "first",
            spec(
                partner,
                json!({"versioning": {"pinHeaders": {"X-Which": "first"}}}),
            ),
        )]
    });
    let sidecar = s.sidecar(0);
    let first = format!("{}/first", s.ns);
    holds(&sidecar, std::slice::from_ref(&first));

    // Created later (and named later, should both land in one second).
    objects::apply(
        s.cp,
        &objects::partner_integration(
            &s.ns,
            "second",
            spec(
                &s.partner,
                json!({"versioning": {"pinHeaders": {"X-Which": "second"}}}),
            ),
        ),
    )
    .unwrap();
    let pi = eventually("the newer to be Invalid", SETTLE, || {
        let pi = s.pi("second");
        let c = condition(&pi, "Invalid");
        anyhow::ensure!(
            c.is_some_and(|c| c["status"] == "True"),
            "status {}",
            pi["status"]
        );
        Ok(pi)
    });
    let message = condition(&pi, "Invalid").unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("spec.upstream.hosts"), "{message}");
    assert!(message.contains(HOST), "{message}");
    assert!(message.contains("first"), "names the older: {message}");
    let older = s.pi("first");
    assert_eq!(
        condition(&older, "Invalid").map(|c| c["status"].clone()),
        Some(json!("False")),
        "{}",
        older["status"]
    );

    // The older keeps working, and a change to it still reaches the sidecar.
    let echo = partner_ok(&sidecar.get(&url("/v1/charges")).unwrap()).unwrap();
    assert_eq!(echo["headers"]["x-which"], "first", "{echo}");
    objects::patch_pi(
        s.cp,
        &s.ns,
        "first",
        &json!({"spec": {"versioning": {"pinHeaders": {"X-Which": "first-edited"}}}}),
    )
    .unwrap();
    eventually("the edit of the older to reach the sidecar", SETTLE, || {
        let echo = partner_ok(&sidecar.get(&url("/v1/charges"))?)?;
        anyhow::ensure!(echo["headers"]["x-which"] == "first-edited", "{echo}");
        Ok(())
    });
    assert_eq!(sidecar.integrations().unwrap(), vec![first]);

    // The older goes away: the newer takes the host over.
    s.cp.kubectl(["-n", &s.ns, "delete", "pi", "first", "--wait=false"])
        .unwrap();
    eventually("the newer to take the host over", SETTLE, || {
        let echo = partner_ok(&sidecar.get(&url("/v1/charges"))?)?;
        anyhow::ensure!(echo["headers"]["x-which"] == "second", "{echo}");
        let pi = s.pi("second");
        let c = condition(&pi, "Invalid");
        anyhow::ensure!(
            c.is_some_and(|c| c["status"] == "False"),
            "{}",
            pi["status"]
        );
        Ok(())
    });
}
