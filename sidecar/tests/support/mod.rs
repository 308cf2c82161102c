//! The sidecar's integration tests: the sidecar binary as a child process, and the shared test
//! kit's partner, client, metric reader and CA, which the tests use through here.
#![allow(dead_code)]

pub mod otlp;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tollgate_testkit::sidecar::{self, Logs};
use tollgate_testkit::wait::eventually_async;

// Each test file uses a part of the kit.
#[allow(unused_imports)]
pub use tollgate_testkit::{Partner, Reply, Resp, TestCa, metric, raw, request};

// === the sidecar process ===

pub struct Sidecar {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub logs: Logs,
    /// Its stdout, line by line (the access log).
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[derive(Default)]
pub struct Options {
    pub secrets: Vec<(String, String, String)>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Sidecar {
    pub async fn start(config: &str) -> Sidecar {
        Self::start_with(config, Options::default()).await
    }

    pub async fn start_with(config: &str, opts: Options) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("integrations.yaml");
        std::fs::write(&config_path, config).unwrap();
        let secrets_dir = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets_dir).unwrap();
        for (name, key, value) in &opts.secrets {
            write_secret(&secrets_dir, name, key, value);
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-sidecar"));
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--secrets-dir")
            .arg(&secrets_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(["--reload-interval", "50ms"])
            .args(&opts.args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let sidecar::Started {
            mut child,
            listen,
            admin,
            logs,
        } = sidecar::start(&mut cmd, Duration::from_secs(30)).await;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout is piped");
        let lines = stdout.clone();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Sidecar {
            child,
            listen,
            admin,
            dir,
            config_path,
            logs,
            stdout,
        }
    }

    pub fn secrets_dir(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }

    /// Replaces the config file atomically, as a ConfigMap update would.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".integrations.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Every line the sidecar printed on stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn log_text(&self) -> String {
        self.logs.text()
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        tollgate_testkit::http::get(self.admin, path).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.body
    }

    pub async fn config(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config").await.body).unwrap()
    }

    /// Polls `/config` until `pred` holds (the sidecar applies file changes within its reload
    /// interval); panics with the log after 10 s.
    pub async fn wait_config(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually_async(what, Duration::from_secs(10), async || {
            let c = self.config().await;
            anyhow::ensure!(pred(&c), "config: {c}\nlog:\n{}", self.log_text());
            Ok(c)
        })
        .await
    }

    /// The status of the app's `GET` of `path` at `partner`, through this sidecar.
    pub async fn status_of(&self, partner: &Partner, path: &str) -> u16 {
        self.get(&format!("{}{path}", partner.url())).await.status
    }

    /// Writes the config `yaml` and waits until its kill switch (the default route's) is `on`.
    pub async fn write_kill_switch(&self, yaml: &str, on: bool) {
        self.write_config(yaml);
        self.wait_config(
            &format!("the kill switch {}", if on { "on" } else { "off" }),
            |c| c["integrations"][0]["defaultRoute"]["killSwitch"]["enabled"] == on,
        )
        .await;
    }

    /// Polls the metrics until `pred` holds.
    pub async fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually_async(what, Duration::from_secs(10), async || {
            let m = self.metrics().await;
            anyhow::ensure!(pred(&m), "metrics:\n{m}");
            Ok(m)
        })
        .await
    }

    /// An app request through the forward proxy (absolute-form, as `HTTP_PROXY` clients send).
    pub async fn get(&self, url: &str) -> Resp {
        request(self.listen, Method::GET, url, &[], "").await
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        request(self.listen, method, url, headers, body).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

pub fn write_secret(dir: &Path, name: &str, key: &str, value: &str) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let tmp = d.join(format!(".{key}.tmp"));
    std::fs::write(&tmp, value).unwrap();
    std::fs::rename(&tmp, d.join(key)).unwrap();
}

/// A PartnerIntegration manifest for `name` whose spec is `spec` (YAML, indented two spaces).
pub fn manifest(name: &str, spec: &str) -> String {
    let mut out = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: PartnerIntegration\nmetadata:\n  name: {name}\n  namespace: test\nspec:\n"
    );
    for line in spec.trim_matches('\n').lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `tollgate_tunnels_total` of the integration `test/partner` with `outcome`, in the metrics
/// text `m`.
pub fn tunnels(m: &str, outcome: &str) -> f64 {
    metric(
        m,
        "tollgate_tunnels_total",
        &[("integration", "test/partner"), ("outcome", outcome)],
    )
}
