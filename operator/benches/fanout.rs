//! Control-plane scale: one operator's distribution endpoint with many subscribed sidecars.
//!
//! The operator side (the hub, the HTTP/2 + TLS endpoint, TokenReview of pod-bound tokens
//! against an in-process fake API server) runs in this process; the sidecars run in child
//! processes (this same binary, in client mode), each stream the sidecar's own cluster client
//! on a connection of its own, so this process's memory and CPU are the operator's alone.
//!
//! It measures:
//! - kill-switch fan-out: from the catalog update to each sidecar's apply callback, p50/p99/max
//!   over every stream and flip (the clocks are the same machine's wall clock);
//! - operator memory per stream: resident set after all streams subscribed, minus before;
//! - the cost of one pod joining and leaving: operator CPU per join+leave of a batch of extra
//!   pods, with few streams open and with all of them, and with 1 and with M integrations, so
//!   growth with pods x integrations shows as a ratio.
//!
//! The sidecars of one bench share this machine's cores with the operator, which a real
//! cluster does not: the fan-out figures are an upper bound.
//!
//! `cargo bench -p tollgate-operator --bench fanout [-- --streams N --integrations M --flips K
//! --churn C --out FILE]`; defaults 1000, 10, 10, 50, `bench/results/fanout.json`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tollgate_crds::distribution::Snapshot;
use tollgate_operator::catalog::{CatalogHandle, Entry};
use tollgate_operator::distribution::HubSettings;
use tollgate_sidecar::cluster::ClusterClient;

const CLIENT_ENV: &str = "TOLLGATE_FANOUT_CLIENT";
const NS: &str = "payments";
const WAIT: Duration = Duration::from_secs(120);

/// Integration `partner-{i}`: every one selects the same pods; `partner-0` is flipped.
fn entry(i: usize, generation: i64, kill: bool) -> Entry {
    let spec: tollgate_crds::PartnerIntegrationSpec = serde_json::from_value(json!({
        "workloadSelector": {"matchLabels": {"app": "checkout"}},
        "upstream": {"url": format!("https://api-{i}.partner.example")},
        "killSwitch": {"enabled": kill, "reason": "bench"},
        "rateLimit": {"scope": "global", "limits": [{"name": "s", "requests": 1000, "per": "1s"}]},
    }))
    .expect("spec");
    let policy = tollgate_crds::compile(NS, &format!("partner-{i}"), &spec).expect("compiles");
    Entry::new(generation, spec, policy, None)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// This process's resident set, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// This process's CPU time (user + system).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

// === client mode ===

/// `ADDR|CA|DIR|FIRST|COUNT`: subscribes pods `checkout-FIRST..` with the token files in DIR;
/// prints `snap POD GENERATION UNIX_NANOS` for every snapshot, where GENERATION is
/// `partner-0`'s.
fn client_main(arg: &str) {
    let parts: Vec<&str> = arg.split('|').collect();
    let [addr, ca, dir, first, count] = parts[..] else {
        panic!("{CLIENT_ENV}: ADDR|CA|DIR|FIRST|COUNT");
    };
    let (first, count): (usize, usize) = (first.parse().unwrap(), count.parse().unwrap());
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (tx, rx) = std_mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        for line in rx {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    rt.block_on(async {
        for i in first..first + count {
            let pod = format!("checkout-{i}");
            let config = support::cluster_config(
                addr.parse().expect("a socket address"),
                PathBuf::from(ca),
                dir.join(format!("{pod}.token")),
                NS,
                &pod,
                dir.join(format!("{pod}.json")),
            );
            let tx = tx.clone();
            let client = ClusterClient::new(
                config,
                Arc::new(move |s: &Snapshot| {
                    let generation = s
                        .integrations
                        .iter()
                        .find(|i| i.name == "partner-0")
                        .map_or(0, |i| i.generation);
                    let _ = tx.send(format!("snap {i} {generation} {}", now_nanos()));
                    Ok(())
                }),
                Arc::new(Vec::new),
            );
            tokio::spawn(client.run());
        }
        std::future::pending::<()>().await;
    });
}

// === operator side ===

struct Clients {
    child: Child,
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(pod, generation, unix nanos)` from every client process.
type Events = std_mpsc::Receiver<(usize, i64, u128)>;

fn spawn_clients(
    addr: std::net::SocketAddr,
    ca: &Path,
    dir: &Path,
    first: usize,
    count: usize,
    tx: &std_mpsc::Sender<(usize, i64, u128)>,
) -> Clients {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(
            CLIENT_ENV,
            format!(
                "127.0.0.1:{}|{}|{}|{first}|{count}",
                addr.port(),
                ca.display(),
                dir.display()
            ),
        )
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("client process");
    let out = child.stdout.take().expect("stdout");
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["snap", pod, g, at] = f[..]
                && let (Ok(pod), Ok(g), Ok(at)) = (pod.parse(), g.parse(), at.parse())
            {
                let _ = tx.send((pod, g, at));
            }
        }
    });
    Clients { child }
}

/// Waits until every pod in `pods` applied `generation`; returns when each did.
fn wait_generation(events: &Events, pods: std::ops::Range<usize>, generation: i64) -> Vec<u128> {
    let mut seen = vec![None; pods.len()];
    let mut left = pods.len();
    let deadline = Instant::now() + WAIT;
    while left > 0 {
        let (pod, g, at) = events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{left} pods never applied generation {generation}"));
        if g == generation && pods.contains(&pod) && seen[pod - pods.start].is_none() {
            seen[pod - pods.start] = Some(at);
            left -= 1;
        }
    }
    seen.into_iter().map(Option::unwrap_or_default).collect()
}

/// Operator CPU per pod that joins (subscribes, gets its snapshot) and leaves, over `churn`
/// extra pods starting at `first`.
#[allow(clippy::too_many_arguments)]
fn churn_cost(
    addr: std::net::SocketAddr,
    ca: &Path,
    dir: &Path,
    first: usize,
    churn: usize,
    generation: i64,
    events: &Events,
    tx: &std_mpsc::Sender<(usize, i64, u128)>,
) -> Duration {
    let c0 = cpu();
    let clients = spawn_clients(addr, ca, dir, first, churn, tx);
    wait_generation(events, first..first + churn, generation);
    drop(clients);
    // The operator notices the closed connections and re-divides global quotas: every
    // remaining stream gets its new share.
    settle(events);
    (cpu() - c0) / churn as u32
}

/// Drains snapshots until none came for a second; returns how long after the call the last
/// one was applied.
fn settle(events: &Events) -> Duration {
    let t0 = Instant::now();
    let mut last = Duration::ZERO;
    while events.recv_timeout(Duration::from_secs(1)).is_ok() {
        last = t0.elapsed();
    }
    last
}

fn main() {
    if let Ok(arg) = std::env::var(CLIENT_ENV) {
        client_main(&arg);
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let streams = flag("--streams", 1000);
    let integrations = flag("--integrations", 10).max(1);
    let flips = flag("--flips", 10) as i64;
    let churn = flag("--churn", 50);
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/results/fanout.json").to_string()
        });
    let few = (streams / 10).max(1);

    // Token and revision files on tmpfs, as an injected pod keeps its revision on a
    // memory-backed volume: 1,000 clients persisting each revision to one disk would measure
    // that disk's fsync, not the fan-out.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("tempdir");
    let certs = support::certs(dir.path());
    let api = support::FakeApi::default();
    // Pods and their tokens first: the fake API server's memory is not the operator's.
    let total_pods = streams + 4 * churn;
    for i in 0..total_pods {
        let pod = format!("checkout-{i}");
        let token = api.add_pod(NS, &pod, &[("app", "checkout")]);
        std::fs::write(dir.path().join(format!("{pod}.token")), token).expect("token file");
    }
    let catalog = CatalogHandle::new();
    catalog.upsert(entry(0, 1, false));
    let addr = support::free_addr();
    let _op = support::OperatorProcess::start(
        addr,
        &certs,
        &api,
        catalog.clone(),
        HubSettings::default(),
    );
    let (tx, events) = std_mpsc::channel();
    let ca = certs.ca_file.clone();
    eprintln!("fanout: {streams} streams, {integrations} integrations, {flips} flips");

    // Pod churn with one integration, few streams open.
    let _few = spawn_clients(addr, &ca, dir.path(), 0, few, &tx);
    wait_generation(&events, 0..few, 1);
    let mut next = streams;
    let churn_few_one = churn_cost(addr, &ca, dir.path(), next, churn, 1, &events, &tx);
    next += churn;
    // ... and with every integration.
    for i in 1..integrations {
        catalog.upsert(entry(i, 1, false));
    }
    std::thread::sleep(Duration::from_millis(500));
    let churn_few_all = churn_cost(addr, &ca, dir.path(), next, churn, 1, &events, &tx);
    next += churn;

    // Every stream open.
    let rss_before = rss_kib();
    let t0 = Instant::now();
    let _rest = spawn_clients(addr, &ca, dir.path(), few, streams - few, &tx);
    wait_generation(&events, few..streams, 1);
    let subscribe_all = t0.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib();
    eprintln!(
        "fanout: {streams} streams subscribed in {:.1} s",
        subscribe_all.as_secs_f64()
    );
    let churn_all_all = churn_cost(addr, &ca, dir.path(), next, churn, 1, &events, &tx);
    // One more batch leaving, timed: until every stream has its new share.
    let leaving = spawn_clients(addr, &ca, dir.path(), next + churn, churn, &tx);
    wait_generation(&events, next + churn..next + 2 * churn, 1);
    settle(&events);
    drop(leaving);
    let redivide = settle(&events);

    // Kill-switch flips to every stream.
    let mut samples = Vec::with_capacity(streams * flips as usize);
    let mut per_flip = Vec::new();
    let cpu_flips = cpu();
    for flip in 0..flips {
        let generation = flip + 2;
        std::thread::sleep(Duration::from_millis(200));
        let start = now_nanos();
        catalog.upsert(entry(0, generation, flip % 2 == 0));
        let got = wait_generation(&events, 0..streams, generation);
        let lat: Vec<Duration> = got
            .iter()
            .map(|&at| Duration::from_nanos(at.saturating_sub(start) as u64))
            .collect();
        per_flip.push(lat.iter().max().copied().unwrap_or_default());
        samples.extend(lat);
    }
    let cpu_per_flip = (cpu() - cpu_flips) / flips.max(1) as u32;
    let per_flip_in_order: Vec<f64> = per_flip.iter().map(|d| ms(*d)).collect();
    eprintln!("fanout: the last stream to apply each flip, ms: {per_flip_in_order:?}");
    samples.sort();
    per_flip.sort();

    let per_stream_kib = rss_after.saturating_sub(rss_before) as f64 / (streams - few) as f64;
    let result = json!({
        "streams": streams,
        "integrations": integrations,
        "flips": flips,
        "churn": churn,
        "fanout_ms": {
            "p50": ms(support::percentile(&samples, 0.50)),
            "p99": ms(support::percentile(&samples, 0.99)),
            "max": ms(samples.last().copied().unwrap_or_default()),
            "last_stream_p50": ms(support::percentile(&per_flip, 0.50)),
            "per_flip_last_ms": per_flip_in_order,
        },
        // Includes the 200 ms pause before each flip (an idle operator costs ~nothing).
        "operator_cpu_ms_per_flip": ms(cpu_per_flip),
        "subscribe_all_s": (subscribe_all.as_secs_f64() * 10.0).round() / 10.0,
        "redivide_after_leave_ms": ms(redivide),
        "operator_rss_kib": {"before": rss_before, "after": rss_after},
        "operator_kib_per_stream": (per_stream_kib * 10.0).round() / 10.0,
        "join_leave_cpu_ms": {
            "streams_few_integrations_1": ms(churn_few_one),
            "streams_few_integrations_all": ms(churn_few_all),
            "streams_all_integrations_all": ms(churn_all_all),
            "few": few,
        },
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
    });
    let text = serde_json::to_string_pretty(&result).expect("json");
    println!("{text}");
    if let Some(parent) = Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(&out, format!("{text}\n")).expect("results file");
    eprintln!("fanout: results in {out}");
}
