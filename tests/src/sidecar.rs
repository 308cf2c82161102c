//! The real `tollgate-sidecar` binary in cluster mode, as a child process: one per "pod", with
//! that pod's token file and a state file of its own, speaking to an operator over TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use http::Method;
use serde_json::Value;
use tollgate_testkit::sidecar::ready_addrs;

use crate::bins::sidecar_bin;
use crate::net::{self, Resp};
use crate::process::{Process, Spec};
use crate::tools::target_dir;

/// How long a sidecar may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Who the sidecar is and whom it asks.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// Names it in messages and its log file (unique per test run).
    pub name: String,
    /// `--operator`.
    pub operator_url: String,
    /// `--operator-ca`.
    pub operator_ca: PathBuf,
    /// `--pod-namespace` and `--pod-name`: who it says it is.
    pub pod_namespace: String,
    pub pod_name: String,
    /// Written to its `--token-file`.
    pub token: String,
    /// `--unknown-hosts`: `deny` makes "holds no policy for this host" visible as a 403.
    pub unknown_hosts: &'static str,
    /// The pod's labels, written to its `--labels-file` as the kubelet's downward API would.
    pub labels: Vec<(String, String)>,
}

/// A running (or stopped, until restarted) sidecar.
pub struct Sidecar {
    name: String,
    spec: Spec,
    process: Option<Process>,
    log_path: PathBuf,
    /// The outbound proxy listener.
    pub listen: SocketAddr,
    /// The admin listener (`/config`, `/metrics`, `/readyz`).
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts it on free loopback ports and waits for its ready line.
    pub fn start(config: SidecarConfig) -> anyhow::Result<Sidecar> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-sidecar-")
            .tempdir()?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &config.token)?;
        let labels_file = dir.path().join("labels");
        std::fs::write(&labels_file, downward_api_labels(&config.labels))?;
        let mut spec = Spec::new(sidecar_bin());
        spec.arg("--operator")
            .arg(&config.operator_url)
            .arg("--operator-ca")
            .arg(&config.operator_ca)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--labels-file")
            .arg(&labels_file)
            .args(["--pod-namespace", &config.pod_namespace])
            .args(["--pod-name", &config.pod_name])
            .arg("--state-file")
            .arg(dir.path().join("snapshot.json"))
            .args(["--unknown-hosts", config.unknown_hosts])
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .env("OTEL_SDK_DISABLED", "true");
        let log_path = target_dir()
            .join("e2e-logs")
            .join(format!("{}.log", config.name));
        let _ = std::fs::remove_file(&log_path);
        let mut sidecar = Sidecar {
            name: config.name,
            spec,
            process: None,
            log_path,
            listen: ([127, 0, 0, 1], 0).into(),
            admin: ([127, 0, 0, 1], 0).into(),
            dir,
        };
        sidecar.launch()?;
        Ok(sidecar)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let mut spec = self.spec.clone();
        spec.args(["--listen", &self.listen.to_string()])
            .args(["--admin", &self.admin.to_string()]);
        let mut process = Process::spawn(&self.name, &spec, &self.log_path)?;
        let (listen, admin) = process.wait_for_line(READY_TIMEOUT, ready_addrs)?;
        // A restart binds the same ports again.
        (self.listen, self.admin) = (listen, admin);
        self.process = Some(process);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// SIGKILL.
    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts it again with the same flags, ports and state file (waiting, if need be, for a
    /// connection that happened to take one of its ports to go away).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let start = std::time::Instant::now();
        loop {
            match self.launch() {
                Err(e)
                    if format!("{e:#}").contains("Address already in use")
                        && start.elapsed() < Duration::from_secs(30) =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    /// Rewrites its labels file, as the kubelet does when the pod's labels change.
    pub fn set_labels(&self, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        std::fs::write(self.dir.path().join("labels"), downward_api_labels(&labels))?;
        Ok(())
    }

    /// Where it persists the last good snapshot.
    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("snapshot.json")
    }

    /// The persisted snapshot, if any.
    pub fn persisted(&self) -> anyhow::Result<Option<Value>> {
        read_json(&self.state_file())
    }

    /// An app request through the forward proxy (absolute-form `url`).
    pub fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Resp> {
        net::request(self.listen, method, url, headers, "")
    }

    /// `GET url` through the forward proxy.
    pub fn get(&self, url: &str) -> anyhow::Result<Resp> {
        self.send(Method::GET, url, &[])
    }

    /// `/config`: the revision in force.
    pub fn config(&self) -> anyhow::Result<Value> {
        let r = net::get(self.admin, "/config")?;
        r.try_json()
    }

    /// The `namespace/name` of every integration in force.
    pub fn integrations(&self) -> anyhow::Result<Vec<String>> {
        let c = self.config()?;
        let list = c["integrations"]
            .as_array()
            .ok_or_else(|| anyhow!("{}: /config has no integrations list: {c}", self.name))?;
        Ok(list
            .iter()
            .map(|i| {
                format!(
                    "{}/{}",
                    i["id"]["namespace"].as_str().unwrap_or("?"),
                    i["id"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect())
    }

    /// `/readyz` status: 200 once a revision is loaded.
    pub fn readyz(&self) -> anyhow::Result<u16> {
        Ok(net::get(self.admin, "/readyz")?.status)
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(net::get(self.admin, "/metrics")?.body)
    }

    /// How many log lines carry this message.
    pub fn count_log(&self, message: &str) -> usize {
        let needle = format!("\"message\":\"{message}\"");
        self.process
            .as_ref()
            .map_or(0, |p| p.count_lines(|l| l.contains(&needle)))
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

fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("{}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `metadata.labels` as the downward API writes it: `key="value"` lines, sorted by key.
fn downward_api_labels(labels: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = labels.iter().collect();
    sorted.sort();
    sorted.iter().map(|(k, v)| format!("{k}={v:?}\n")).collect()
}
