//! The real `tollgate-operator` binary as a child process, against a [`ControlPlane`]: its own
//! serving certificate for 127.0.0.1 (the test kit's CA), fixed ports so a restart comes back where the
//! sidecars look for it, and the control plane's admin kubeconfig.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::ControlPlane;
use crate::bins::operator_bin;
use crate::net;
use crate::process::{Process, Spec};
use crate::tools::target_dir;
use tollgate_testkit::{ServingCert, TestCa, free_addr};

/// How long the operator may take to report ready (kube client, CRD check, listeners).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How to run an operator.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Names it in logs, its log file and its Lease identity.
    pub name: String,
    /// `--namespace` flags: the namespaces it watches (empty: all).
    pub namespaces: Vec<String>,
    /// Where its leader and peer Leases live (leader election stays on, as in production).
    pub lease_namespace: String,
    /// Appended to the defaults below (a later flag wins).
    pub extra_args: Vec<String>,
}

impl OperatorConfig {
    /// Watches `namespace` only and keeps its Leases there.
    pub fn for_namespace(name: &str, namespace: &str) -> OperatorConfig {
        OperatorConfig {
            name: name.to_string(),
            namespaces: vec![namespace.to_string()],
            lease_namespace: namespace.to_string(),
            extra_args: Vec::new(),
        }
    }
}

/// A running (or killed, until restarted) operator process.
pub struct Operator {
    name: String,
    spec: Spec,
    process: Option<Process>,
    log_path: PathBuf,
    /// The distribution endpoint (see [`Operator::url`]); kept across restarts.
    pub listen: SocketAddr,
    /// The plain-HTTP admin listener (`/metrics`, `/readyz`).
    pub admin: SocketAddr,
    pub cert: ServingCert,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Starts the operator and waits until it reports ready.
    ///
    /// Timings are shortened so a test sees status and reports within a second or two:
    /// status every 1s, reports every 1s, Lease renewal every 2s.
    pub fn start(cp: &ControlPlane, config: OperatorConfig) -> anyhow::Result<Operator> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-operator-")
            .tempdir()?;
        let cert = TestCa::named("tollgate e2e CA")
            .write_serving_cert(dir.path(), &["localhost", "127.0.0.1"])?;
        let mut spec = Spec::new(operator_bin());
        spec.arg("--tls-cert")
            .arg(&cert.cert_file)
            .arg("--tls-key")
            .arg(&cert.key_file)
            .args(["--leader-election", "true"])
            .args(["--lease-namespace", &config.lease_namespace])
            .args(["--identity", &config.name])
            .args(["--lease-renew", "2s", "--peer-interval", "2s"])
            .args(["--status-interval", "1s", "--report-interval", "1s"])
            .args(["--heartbeat", "5s"]);
        for ns in &config.namespaces {
            spec.args(["--namespace", ns]);
        }
        spec.args(&config.extra_args)
            .env("KUBECONFIG", cp.kubeconfig())
            .env(
                "RUST_LOG",
                "info,kube=warn,tollgate_operator::distribution::hub=debug",
            )
            .env("NO_COLOR", "1");
        let log_path = target_dir()
            .join("e2e-logs")
            .join(format!("{}.log", config.name));
        let _ = std::fs::remove_file(&log_path);
        let mut op = Operator {
            name: config.name,
            spec,
            process: None,
            log_path,
            listen: free_addr(),
            admin: free_addr(),
            cert,
            _dir: dir,
        };
        // A port found free may be taken before the operator binds it (any connect() on the
        // machine draws from the same range): then try others.
        for attempt in 1.. {
            match op.launch() {
                Err(e) if attempt < 5 && in_use(&e) => {
                    (op.listen, op.admin) = (free_addr(), free_addr());
                }
                other => return other.map(|()| op),
            }
        }
        unreachable!("the loop returns")
    }

    /// `https://127.0.0.1:PORT`: what sidecars subscribe to.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let mut spec = self.spec.clone();
        spec.args(["--listen", &self.listen.to_string()])
            .args(["--admin", &self.admin.to_string()]);
        let mut process = Process::spawn(&self.name, &spec, &self.log_path)?;
        let start = Instant::now();
        loop {
            if let Some(status) = process.exited() {
                std::thread::sleep(Duration::from_millis(100));
                bail!("{} exited ({status}); {}", self.name, process.tail());
            }
            if let Ok(r) = net::get(self.admin, "/readyz")
                && r.status == 200
            {
                break;
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} not ready within {READY_TIMEOUT:?}; {}",
                    self.name,
                    process.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
        Ok(())
    }

    /// SIGKILL: the process dies with every stream open, as in a node failure.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again with the same flags, certificate and ports (waiting, if need be, for
    /// a connection that happened to take one of them to go away).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let start = Instant::now();
        loop {
            match self.launch() {
                Err(e) if in_use(&e) && start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// Its `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let r = net::get(self.admin, "/metrics").context("operator /metrics")?;
        Ok(r.body)
    }

    /// The end of its log, for failure messages.
    pub fn tail(&self) -> String {
        match &self.process {
            Some(p) => p.tail(),
            None => format!(
                "{} is not running (log: {})",
                self.name,
                self.log_path.display()
            ),
        }
    }
}

/// Whether the operator exited because a port was taken.
fn in_use(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Address already in use")
}
