//! A real Kubernetes control plane (etcd + kube-apiserver, see `tests/controlplane`)
//! run as a child process for the end-to-end tests.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::tools::{controlplane_bin, helm_bin, progress, target_dir};

/// How long to wait for the READY line once the binary is built, unless
/// `$TOLLGATE_CONTROLPLANE_START_TIMEOUT_SECS` says otherwise.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT_ENV: &str = "TOLLGATE_CONTROLPLANE_START_TIMEOUT_SECS";
/// How many lines of the control plane's log an error quotes.
const LOG_TAIL_LINES: usize = 40;

/// A running control plane: one etcd and one kube-apiserver on 127.0.0.1, with an
/// admin kubeconfig (`system:masters`), RBAC authorization, ServiceAccount
/// tokens (audiences include `tollgate`) and the default admission plugins. No
/// controller-manager runs, so nothing creates ServiceAccounts, finishes
/// namespace deletion or runs pods: tests create what they need, in namespaces
/// of their own ([`ControlPlane::create_namespace`]).
///
/// The child's stdin is a pipe held by this process. The control plane shuts
/// down when it reaches EOF, so it stops with the test process however that
/// ends, and removes its temporary directory (kubeconfig, certificates, etcd).
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    kubeconfig: PathBuf,
    server: String,
    log: PathBuf,
}

impl ControlPlane {
    /// The control plane shared by every test in this test binary, started on
    /// first use (building the binary first if needed). Panics if it cannot
    /// start; later calls panic with the same error without retrying.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            let log = target_dir().join("e2e-logs").join("controlplane.log");
            // Aggregator routing: the API server calls a webhook's Service at an endpoint of
            // its EndpointSlices, as there is no kube-proxy to route its cluster IP. Tests
            // that serve a chart's webhook publish the slice themselves.
            ControlPlane::start(&log, &["--enable-aggregator-routing=true"])
                .map_err(|e| format!("{e:#}"))
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("the shared control plane did not start: {e}"),
        }
    }

    /// Starts a control plane of its own (stopped on drop), logging to `log`;
    /// `apiserver_args` are appended to kube-apiserver's flags. Prefer
    /// [`ControlPlane::shared`]: each start costs a few seconds.
    pub fn start(log: &Path, apiserver_args: &[&str]) -> anyhow::Result<ControlPlane> {
        Self::start_with(log, &[], apiserver_args)
    }

    /// As [`ControlPlane::start`], with `controlplane_args` for the harness itself (e.g.
    /// `--node-ip`, for a control plane that pods of a real node reach).
    pub fn start_with(
        log: &Path,
        controlplane_args: &[&str],
        apiserver_args: &[&str],
    ) -> anyhow::Result<ControlPlane> {
        let bin = controlplane_bin();
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The log goes to a file, not a pipe: nothing has to keep reading it,
        // and it survives the test process for post-mortems.
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let start = Instant::now();
        let mut cmd = Command::new(bin);
        // The API server calls webhooks on this machine directly, never through a proxy.
        for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(controlplane_args)
            .arg("--")
            .args(apiserver_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;

        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("READY ") {
                    let _ = tx.send(line);
                }
            }
        });

        let timeout = std::env::var(START_TIMEOUT_ENV)
            .ok()
            .and_then(|secs| secs.parse().ok())
            .map_or(START_TIMEOUT, Duration::from_secs);
        let ready = match rx.recv_timeout(timeout) {
            Ok(line) => line,
            Err(waited) => {
                let why = match waited {
                    mpsc::RecvTimeoutError::Timeout => {
                        let _ = child.kill();
                        format!("no READY line within {timeout:?}")
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        "it closed stdout before printing READY".into()
                    }
                };
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                bail!(
                    "control plane {} did not start: {why} ({status}); last lines of {}:\n{}",
                    bin.display(),
                    log.display(),
                    log_tail(log)
                );
            }
        };
        let field = |key: &str| {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("no {key}= in {ready:?}"))
        };
        let cp = ControlPlane {
            kubeconfig: field("kubeconfig")?.into(),
            server: field("server")?,
            log: log.to_path_buf(),
            child,
        };
        progress(&format!(
            "control plane at {} ready in {:.1?} (log: {})",
            cp.server,
            start.elapsed(),
            cp.log.display()
        ));
        Ok(cp)
    }

    /// The admin kubeconfig (certificates embedded, user in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The control plane's log file (etcd and kube-apiserver).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS` and returns its stdout, or an
    /// error with the command line and its stderr.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_with_stdin(args, "")
    }

    /// Like [`ControlPlane::kubectl`], writing `stdin` to its standard input
    /// (for `apply -f -` and `create -f -`).
    pub fn kubectl_with_stdin<I, S>(&self, args: I, stdin: &str) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(std::env::var_os("KUBECTL").unwrap_or("kubectl".into()));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(cmd, stdin)
    }

    /// Runs `helm ARGS` against this control plane (`--kubeconfig` set) and
    /// returns its stdout, or an error with the command line and its stderr.
    pub fn helm<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(helm_bin());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(cmd, "")
    }

    /// Creates a namespace named `PREFIX-N`, unique in this process, and returns
    /// its name. Namespaces are never deleted: without a controller-manager their
    /// deletion would never finish, and the control plane is discarded anyway.
    pub fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.kubectl(["create", "namespace", &name])?;
        Ok(name)
    }
}

impl Drop for ControlPlane {
    /// Closes stdin, which makes the control plane shut down, and waits for it
    /// (killing it after 15s). The shared instance is never dropped: it stops
    /// when the test process exits and the kernel closes the pipe.
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` with `stdin` as input; stdout on success, else an error that
/// names the command and quotes its stderr.
fn run(mut cmd: Command, stdin: &str) -> anyhow::Result<String> {
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {line}"))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let stdin = stdin.to_owned();
    // Written from a thread so a large input cannot deadlock against a child
    // that fills its stdout pipe before reading all of stdin.
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {line}"))?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "{line} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{line} printed non-UTF-8"))
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(file) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let mut tail = VecDeque::with_capacity(LOG_TAIL_LINES);
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if tail.len() == LOG_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    Vec::from(tail).join("\n")
}
