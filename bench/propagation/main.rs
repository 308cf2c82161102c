//! Kill-switch propagation through the real API server: patch -> both sidecars enforcing.
//!
//! Starts its own control plane (etcd + kube-apiserver), applies the CRD, starts the real
//! `tollgate-operator` and two `tollgate-sidecar` processes in cluster mode (pod-bound tokens
//! from the TokenRequest API), and a partner on loopback. Then flips the kill switch N times
//! with a JSON merge PATCH to the API server and, for each flip, measures from the moment the
//! PATCH is sent to the moment each sidecar answers an app request under the new state
//! (`503 kill-switch` when on, the partner's `200` when off), polling each sidecar every
//! `--poll-ms`. A flip counts when both sidecars enforce it. Prints p50/p99 and writes them
//! as JSON.
//!
//! The PATCH goes through `kubectl proxy` on loopback (plain HTTP, one extra local hop), so
//! the clock starts when the request leaves, not when a kubectl process starts.
//!
//! `cargo run -p tollgate-e2e --example propagation [--release] -- [--flips 20]
//!  [--poll-ms 2] [--out bench/results/propagation.json]`; see bench/propagation/run.sh.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use http::Method;
use serde_json::json;
use tollgate_e2e::net::{self, Resp};
use tollgate_e2e::tools::{target_dir, workspace_root};
use tollgate_e2e::{
    ControlPlane, Operator, OperatorConfig, Partner, Sidecar, SidecarConfig, eventually, objects,
};

const HOST: &str = "http://api.partner.test/v1/ping";

struct Args {
    flips: usize,
    poll: Duration,
    out: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        flips: 20,
        poll: Duration::from_millis(2),
        out: workspace_root().join("bench/results/propagation.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--flips" => a.flips = value()?.parse()?,
            "--poll-ms" => a.poll = Duration::from_millis(value()?.parse()?),
            "--out" => a.out = value()?.into(),
            // cargo bench-style flags that mean nothing here.
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--flips N, --poll-ms N, --out PATH)"),
        }
    }
    Ok(a)
}

/// `kubectl proxy` on a loopback port, stopped on drop.
struct KubeProxy {
    child: Child,
    addr: std::net::SocketAddr,
}

impl KubeProxy {
    fn start(cp: &ControlPlane) -> anyhow::Result<KubeProxy> {
        let addr = tollgate_testkit::free_addr();
        let child = Command::new(std::env::var_os("KUBECTL").unwrap_or("kubectl".into()))
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(["proxy", "--address", "127.0.0.1"])
            .arg(format!("--port={}", addr.port()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting kubectl proxy")?;
        let proxy = KubeProxy { child, addr };
        eventually("kubectl proxy to serve", Duration::from_secs(20), || {
            let r = net::get(proxy.addr, "/version")?;
            anyhow::ensure!(r.status == 200, "{}", r.status);
            Ok(())
        });
        Ok(proxy)
    }

    fn patch_kill_switch(&self, ns: &str, name: &str, enabled: bool) -> anyhow::Result<()> {
        let path =
            format!("/apis/tollgate.dev/v1alpha1/namespaces/{ns}/partnerintegrations/{name}");
        let body =
            json!({"spec": {"killSwitch": {"enabled": enabled, "reason": "propagation bench"}}});
        let r = net::request(
            self.addr,
            Method::PATCH,
            &path,
            &[
                ("host", &self.addr.to_string()),
                ("content-type", "application/merge-patch+json"),
            ],
            &body.to_string(),
        )?;
        anyhow::ensure!(r.status == 200, "PATCH {path}: {} {}", r.status, r.body);
        Ok(())
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn enforces(r: &Resp, on: bool) -> bool {
    if on {
        r.status == 503 && r.reason() == Some("kill-switch")
    } else {
        r.status == 200 && r.reason().is_none()
    }
}

/// Polls `sidecar` until it enforces `on`; returns when it first did.
fn wait_enforcing(
    sidecar: &Sidecar,
    on: bool,
    poll: Duration,
    limit: Instant,
) -> anyhow::Result<Instant> {
    loop {
        if let Ok(r) = sidecar.get(HOST)
            && enforces(&r, on)
        {
            return Ok(Instant::now());
        }
        if Instant::now() > limit {
            bail!(
                "{} did not enforce kill switch = {on}; {}",
                sidecar.name(),
                sidecar.tail()
            );
        }
        std::thread::sleep(poll);
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let log = target_dir()
        .join("e2e-logs")
        .join("propagation-controlplane.log");
    let cp = ControlPlane::start(&log, &[])?;
    let crd = workspace_root().join("crds/partnerintegrations.tollgate.dev.yaml");
    cp.kubectl([
        "apply",
        "--server-side",
        "-f",
        crd.to_str().context("CRD path")?,
    ])?;
    // `kubectl wait` fails outright, not waits, while the new CRD has no conditions yet.
    eventually("the CRD to be established", Duration::from_secs(60), || {
        cp.kubectl([
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd/partnerintegrations.tollgate.dev",
        ])
    });

    let ns = cp.create_namespace("propagation")?;
    let partner = Partner::echo()?;
    objects::service_account(&cp, &ns, "app")?;
    objects::apply(
        &cp,
        &objects::partner_integration(
            &ns,
            "partner",
            json!({"upstream": {"url": partner.url(), "hosts": ["api.partner.test"]}}),
        ),
    )?;
    let operator = Operator::start(
        &cp,
        OperatorConfig::for_namespace("propagation-operator", &ns),
    )?;
    let mut sidecars = Vec::new();
    for pod in ["app-a", "app-b"] {
        let uid = objects::pod(&cp, &ns, pod, "app", &[("app", "bench")])?;
        let token = objects::pod_token(&cp, &ns, "app", pod, &uid)?;
        sidecars.push(Sidecar::start(SidecarConfig {
            name: format!("propagation-{pod}-sidecar"),
            operator_url: operator.url(),
            operator_ca: operator.cert.ca_file.clone(),
            pod_namespace: ns.clone(),
            pod_name: pod.to_string(),
            token,
            unknown_hosts: "deny",
            labels: vec![("app".into(), "bench".into())],
        })?);
    }
    for s in &sidecars {
        eventually(
            "the sidecars to pass traffic",
            Duration::from_secs(30),
            || {
                let r = s.get(HOST)?;
                anyhow::ensure!(enforces(&r, false), "{} {:?}", r.status, r.reason());
                Ok(())
            },
        );
    }
    let proxy = KubeProxy::start(&cp)?;

    let mut both = Vec::with_capacity(args.flips);
    let mut each = Vec::with_capacity(args.flips * 2);
    let mut api = Vec::with_capacity(args.flips);
    let mut after_api = Vec::with_capacity(args.flips);
    for flip in 0..args.flips {
        let on = flip % 2 == 0;
        let (sent, committed, reached) = std::thread::scope(|scope| {
            let limit = Instant::now() + Duration::from_secs(30);
            let sent = Instant::now();
            let pollers: Vec<_> = sidecars
                .iter()
                .map(|s| scope.spawn(move || wait_enforcing(s, on, args.poll, limit)))
                .collect();
            let patched = proxy.patch_kill_switch(&ns, "partner", on);
            let committed = Instant::now();
            let reached: anyhow::Result<Vec<Instant>> = pollers
                .into_iter()
                .map(|p| p.join().expect("poller panicked"))
                .collect();
            patched.map(|()| (sent, committed, reached))
        })?;
        let reached = reached?;
        let ms = |t: Instant| t.duration_since(sent).as_secs_f64() * 1000.0;
        let last = reached.iter().copied().max().unwrap_or(sent);
        both.push(ms(last));
        each.extend(reached.iter().map(|t| ms(*t)));
        api.push(ms(committed));
        // What follows the API server's answer: watch event, reconcile, push, apply. Can be
        // below zero: the watch event may beat the PATCH response.
        after_api.push(ms(last) - ms(committed));
        eprintln!(
            "flip {:>2} kill switch {:<3}: both enforcing after {:>7.1} ms (API answered the PATCH after {:>6.1} ms)",
            flip + 1,
            if on { "on" } else { "off" },
            ms(last),
            ms(committed)
        );
        // Let acks and reports settle; not measured.
        std::thread::sleep(Duration::from_millis(250));
    }

    let mut sorted = both.clone();
    sorted.sort_by(f64::total_cmp);
    let mut api_sorted = api.clone();
    api_sorted.sort_by(f64::total_cmp);
    let mut after_sorted = after_api.clone();
    after_sorted.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let p50 = percentile(&sorted, 50.0);
    let p99 = percentile(&sorted, 99.0);
    let result = json!({
        "benchmark": "kill-switch propagation: PATCH sent to the API server -> both sidecars enforcing",
        "flips": args.flips,
        "sidecars": sidecars.len(),
        "poll_interval_ms": args.poll.as_millis() as u64,
        "p50_ms": round(p50),
        "p99_ms": round(p99),
        "max_ms": round(*sorted.last().unwrap_or(&0.0)),
        "min_ms": round(*sorted.first().unwrap_or(&0.0)),
        "api_patch_p50_ms": round(percentile(&api_sorted, 50.0)),
        "api_patch_p99_ms": round(percentile(&api_sorted, 99.0)),
        "after_api_answer_p50_ms": round(percentile(&after_sorted, 50.0)),
        "after_api_answer_p99_ms": round(percentile(&after_sorted, 99.0)),
        "samples_ms": both.iter().map(|v| round(*v)).collect::<Vec<_>>(),
        "per_sidecar_samples_ms": each.iter().map(|v| round(*v)).collect::<Vec<_>>(),
        "operator_bin": tollgate_e2e::bins::operator_bin().display().to_string(),
        "sidecar_bin": tollgate_e2e::bins::sidecar_bin().display().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!(
        "kill-switch propagation over {} flips, {} sidecars: p50 {:.1} ms, p99 {:.1} ms (max {:.1} ms)",
        args.flips,
        sidecars.len(),
        p50,
        p99,
        sorted.last().unwrap_or(&0.0),
    );
    println!(
        "  of which the API server's PATCH: p50 {:.1} ms, p99 {:.1} ms; after its answer: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&api_sorted, 50.0),
        percentile(&api_sorted, 99.0),
        percentile(&after_sorted, 50.0),
        percentile(&after_sorted, 99.0),
    );
    println!("wrote {}", args.out.display());
    drop(proxy);
    drop(sidecars);
    drop(operator);
    Ok(())
}
