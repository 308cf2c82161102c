//! Real interception for the tests: two network namespaces joined by a veth pair, the sidecar
//! running in the app's namespace as the proxy UID behind the rules `setup-iptables`
//! installed, servers in the partner's namespace, and app processes (curl as a non-proxy UID,
//! or this test process from a thread entered into the namespace).
//!
//! ```text
//!  app namespace                                   partner namespace
//!  curl (uid 1000) ─┐  iptables REDIRECT           10.200.0.2:80   partner (HTTP)
//!  test thread ─────┼─► 127.0.0.1:15001 sidecar    10.200.0.2:443  partner (TLS, test CA)
//!                   │   (uid 1337, exempt) ──veth─► 10.200.0.3:80   other.test (raw HTTP origin)
//!  10.200.0.1/24 ───┘                              10.200.0.3:443  other.test (TLS)
//!                                                  10.200.0.4:443  echo (not HTTP, not TLS)
//! ```
//!
//! Needs root and, on the machine, `ip` (iproute2), the iptables tools, `curl` and `setpriv`
//! (util-linux): missing ones are installed with apt-get once per test process, and a test
//! fails with the reason when that is impossible. Namespace names are unique per process and
//! test; a guard deletes them (and their hosts file) even when the test fails, and namespaces
//! left by a killed run are removed at the next.

// Each test file uses a part of the harness.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tollgate_testkit::TestCa;
use tollgate_testkit::http::send_over;
use tollgate_testkit::sidecar::{self, Logs};
use tollgate_testkit::tcp::TcpServer;
use tollgate_testkit::wait::eventually_async;

pub const APP_IP: &str = "10.200.0.1";
pub const PARTNER_IP: &str = "10.200.0.2";
pub const OTHER_IP: &str = "10.200.0.3";
pub const ECHO_IP: &str = "10.200.0.4";
pub const APP_IP6: &str = "fd00:200::1";
pub const PARTNER_IP6: &str = "fd00:200::2";
pub const ECHO_IP6: &str = "fd00:200::4";
/// The sidecar's transparent listener inside the app namespace.
pub const TRANSPARENT_PORT: u16 = 15001;
pub const PROXY_UID: u32 = 1337;
pub const APP_UID: u32 = 1000;

const PREFIX: &str = "tgi";

// === prerequisites ===

/// Binaries the tests run, and the Debian packages that may hold each, in the order tried.
const TOOLS: &[(&str, &[&str])] = &[
    ("ip", &["iproute2"]),
    ("iptables-restore", &["iptables"]),
    ("curl", &["curl"]),
    ("setpriv", &["util-linux", "setpriv"]),
];

/// Makes sure the machine can run these tests (root, the tools), installing what is missing
/// once per process; panics with the reason otherwise. Never skips.
pub fn prerequisites() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = READY.get_or_init(check_or_install) {
        panic!("interception tests cannot run: {e}");
    }
}

fn check_or_install() -> Result<(), String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(format!(
            "they need root (network namespaces, iptables, setpriv); running as uid {uid}"
        ));
    }
    let missing = |round: usize| -> Vec<&str> {
        TOOLS
            .iter()
            .filter(|(bin, _)| which(bin).is_none())
            .filter_map(|(_, pkgs)| pkgs.get(round).copied())
            .collect()
    };
    let mut updated = false;
    for round in 0..2 {
        let pkgs = missing(round);
        if pkgs.is_empty() {
            continue;
        }
        eprintln!(
            "interception tests: installing missing Debian packages with apt-get: {}",
            pkgs.join(" ")
        );
        let install = || {
            std::process::Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&pkgs)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() && !updated {
            updated = true;
            let _ = std::process::Command::new("apt-get")
                .args(["update", "-q"])
                .status();
            install();
        }
    }
    let still: Vec<&str> = TOOLS
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(bin, _)| *bin)
        .collect();
    if !still.is_empty() {
        return Err(format!(
            "still missing after apt-get install: {} (see TOOLS in tests/support/netns.rs for \
             the packages tried)",
            still.join(", ")
        ));
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Runs a command to completion; panics with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// === namespaces ===

/// A network namespace that is deleted, with its `/etc/netns` files, when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

impl Netns {
    fn create(name: String) -> Netns {
        sh("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `program` inside the namespace (`ip netns exec`, which also puts
    /// `/etc/netns/<ns>/hosts` in place of `/etc/hosts`).
    pub fn exec(&self, program: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs `f` on a fresh thread that has entered this namespace: sockets it creates live
    /// here, and may be used from anywhere afterwards.
    pub async fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter(&self.name, f).await
    }

    /// A listener bound inside this namespace.
    pub async fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let l = self
            .enter(move || {
                let l = std::net::TcpListener::bind(addr)
                    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                l.set_nonblocking(true).unwrap();
                l
            })
            .await;
        TcpListener::from_std(l).unwrap()
    }

    /// A connection made from inside this namespace by this (root, so not exempt) process.
    pub async fn connect(&self, addr: SocketAddr) -> TcpStream {
        connect(&self.name, addr).await
    }
}

/// Runs `f` on a fresh thread (never a pooled one: it stays in the namespace) that has
/// entered namespace `name`.
async fn enter<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns into the test namespace");
        let _ = tx.send(f());
    });
    rx.await.expect("namespace thread panicked")
}

async fn connect(name: &str, addr: SocketAddr) -> TcpStream {
    let s = enter(name, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nonblocking(true).unwrap();
        s
    })
    .await;
    TcpStream::from_std(s).unwrap()
}

/// The app's namespace and the partner's, joined by a veth pair (see the module docs).
#[derive(Debug)]
pub struct Pair {
    pub app: Netns,
    pub partner: Netns,
}

/// Creates a fresh pair with names unique to this process and call.
pub fn pair() -> Pair {
    prerequisites();
    remove_stale();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let id = format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let app = Netns::create(format!("{id}a"));
    let partner = Netns::create(format!("{id}p"));
    app.ip(&[
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "veth1",
        "netns",
        &partner.name,
    ]);
    app.ip(&["addr", "add", &format!("{APP_IP}/24"), "dev", "veth0"]);
    for ip in [PARTNER_IP, OTHER_IP, ECHO_IP] {
        partner.ip(&["addr", "add", &format!("{ip}/24"), "dev", "veth1"]);
    }
    app.ip(&["link", "set", "veth0", "up"]);
    partner.ip(&["link", "set", "veth1", "up"]);
    let etc = Path::new("/etc/netns").join(&app.name);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("hosts"),
        format!(
            "127.0.0.1 localhost\n{PARTNER_IP} partner.test\n{OTHER_IP} other.test\n{ECHO_IP} echo.test\n"
        ),
    )
    .unwrap();
    Pair { app, partner }
}

/// Deletes namespaces a killed earlier run left behind (their process is gone).
fn remove_stale() {
    let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            drop(Netns {
                name: name.to_string(),
            });
        }
    }
}

impl Pair {
    /// Runs `tollgate-sidecar setup-iptables ARGS` in the app namespace, as the init
    /// container would; its stdout.
    pub fn setup_iptables(&self, args: &[&str]) -> String {
        let mut all = vec!["setup-iptables"];
        all.extend_from_slice(args);
        let out = self.app.exec(env!("CARGO_BIN_EXE_tollgate-sidecar"), &all);
        assert!(
            out.status.success(),
            "setup-iptables failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Adds IPv6 addresses to the veth pair (without duplicate address detection, so they
    /// work at once).
    pub fn add_ipv6(&self) {
        self.app.ip(&[
            "addr",
            "add",
            &format!("{APP_IP6}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        for ip in [PARTNER_IP6, ECHO_IP6] {
            self.partner
                .ip(&["addr", "add", &format!("{ip}/64"), "dev", "veth1", "nodad"]);
        }
    }
}

// === certificates ===

/// A CA and server certificates for test host names; the CA file is readable by any UID.
pub struct Pki {
    ca: TestCa,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = TestCa::named("tollgate interception test CA");
        let dir = world_readable_tempdir();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.ca_pem).unwrap();
        std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        Pki {
            ca,
            ca_file,
            _dir: dir,
        }
    }

    /// A rustls server config with a certificate for `name`.
    pub fn server(&self, name: &str) -> Arc<rustls::ServerConfig> {
        self.ca.issue(&[name]).server_config()
    }
}

fn world_readable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// === servers that are not partners ===

/// A plain HTTP origin that keeps the exact bytes of every connection and answers each
/// request head (bodies are not expected) with [`Origin::RESPONSE`].
pub struct Origin {
    pub conns: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Complete request heads received, over all connections.
    pub heads: Arc<AtomicUsize>,
    _server: TcpServer,
}

impl Origin {
    pub const RESPONSE: &'static [u8] =
        b"HTTP/1.1 200 OK\r\nX-Origin: raw\r\nContent-Length: 6\r\n\r\norigin";

    pub fn start(listener: TcpListener) -> Origin {
        let conns: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let heads = Arc::new(AtomicUsize::new(0));
        let (c, h) = (conns.clone(), heads.clone());
        let server = TcpServer::start_on(listener, move |mut s| {
            let (c, h) = (c.clone(), h.clone());
            async move {
                let index = {
                    let mut v = c.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    c.lock().unwrap()[index].extend_from_slice(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(Self::RESPONSE).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Origin {
            conns,
            heads,
            _server: server,
        }
    }
}

/// Echoes every byte back (a protocol that is neither HTTP nor TLS).
pub fn echo(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

// === the sidecar in the app namespace ===

/// The sidecar binary running in the app namespace as [`PROXY_UID`], with its transparent
/// listener on [`TRANSPARENT_PORT`]. Its admin listener is reached from inside the namespace.
pub struct NsSidecar {
    child: Child,
    ns: String,
    pub admin: SocketAddr,
    /// The outbound listener (forward proxy, `CONNECT`), in the app namespace.
    pub listen: SocketAddr,
    pub logs: Logs,
    dir: tempfile::TempDir,
}

impl Drop for NsSidecar {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl NsSidecar {
    /// Starts it with `config` (a YAML stream), `secrets` (name, key, value) and extra flags.
    pub async fn start(
        app: &Netns,
        config: &str,
        secrets: &[(&str, &str, &str)],
        args: &[&str],
    ) -> NsSidecar {
        Self::start_with_env(app, config, secrets, args, &[]).await
    }

    /// [`NsSidecar::start`] with environment variables (`OTEL_*`, say).
    pub async fn start_with_env(
        app: &Netns,
        config: &str,
        secrets: &[(&str, &str, &str)],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> NsSidecar {
        let dir = world_readable_tempdir();
        // The proxy UID cannot reach the build directory (often under /root): run a copy.
        let bin = dir.path().join("tollgate-sidecar");
        let built = env!("CARGO_BIN_EXE_tollgate-sidecar");
        if std::fs::hard_link(built, &bin).is_err() {
            std::fs::copy(built, &bin).unwrap();
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let secrets_dir = dir.path().join("secrets");
        for (name, key, value) in secrets {
            let d = secrets_dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(key), value).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::create_dir_all(&secrets_dir).unwrap();
        std::fs::set_permissions(&secrets_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        write_config(dir.path(), config);
        let uid = PROXY_UID.to_string();
        let transparent = format!("127.0.0.1:{TRANSPARENT_PORT}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &app.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args(["--clear-groups", "--"])
            .arg(&bin)
            .arg("--config")
            .arg(dir.path().join("integrations.yaml"))
            .arg("--secrets-dir")
            .arg(&secrets_dir)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--transparent", &transparent])
            .args(["--log-format", "json", "--reload-interval", "50ms"])
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,tollgate_sidecar=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let sidecar::Started {
            child,
            listen,
            admin,
            logs,
        } = sidecar::start(&mut cmd, Duration::from_secs(30)).await;
        NsSidecar {
            child,
            ns: app.name.clone(),
            admin,
            listen,
            logs,
            dir,
        }
    }

    /// The directory holding its binary, config and secrets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_text(&self) -> String {
        self.logs.text()
    }

    /// Replaces the config file atomically (the sidecar reloads it).
    pub fn write_config(&self, yaml: &str) {
        write_config(self.dir.path(), yaml);
    }

    async fn admin_get(&self, path: &str) -> String {
        let stream = connect(&self.ns, self.admin).await;
        let req = Request::get(path)
            .header("host", self.admin.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        send_over(stream, req).await.unwrap().body
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await
    }

    /// Polls `/config` until `pred` holds; panics with the log after 10 s.
    pub async fn wait_config(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        eventually_async(what, Duration::from_secs(10), async || {
            let c: serde_json::Value =
                serde_json::from_str(&self.admin_get("/config").await).unwrap();
            anyhow::ensure!(pred(&c), "config: {c}\nlog:\n{}", self.log_text());
            Ok(())
        })
        .await
    }
}

fn write_config(dir: &Path, yaml: &str) {
    let tmp = dir.join(".integrations.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::rename(&tmp, dir.join("integrations.yaml")).unwrap();
}

// === the app ===

/// What curl reported.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (0: a response came back; 35: TLS handshake failed; ...).
    pub exit: i32,
    pub status: u16,
    /// Response head, lower-cased header names.
    pub head: String,
    pub body: String,
    pub stderr: String,
}

impl Curl {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Runs curl in `ns` as [`APP_UID`] (neither root nor the proxy), with no proxy settings:
/// an app that knows nothing of the sidecar. Names resolve through the namespace's hosts file.
pub async fn curl(ns: &Netns, args: &[&str]) -> Curl {
    let uid = APP_UID.to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args([
            "--clear-groups",
            "--",
            "curl",
            "-sS",
            "-i",
            "--noproxy",
            "*",
        ])
        .args(["--max-time", "15", "-w", "\n%{http_code}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `program` in `ns` as [`APP_UID`] with only `env` added to a proxy-free environment
/// (an app configured by environment variables alone); its output.
pub async fn app_run(
    ns: &Netns,
    env: &[(&str, &str)],
    program: &str,
    args: &[&str],
) -> std::process::Output {
    let uid = APP_UID.to_string();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--", program])
        .args(args);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// curl in `ns` as [`APP_UID`], configured by `env` only (no `--noproxy`, so `HTTPS_PROXY`
/// applies when given).
pub async fn curl_env(ns: &Netns, env: &[(&str, &str)], args: &[&str]) -> Curl {
    let mut all = vec!["-sS", "-i", "--max-time", "15", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = app_run(ns, env, "curl", &all).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    // With a proxy, curl prints the CONNECT response head first.
    let mut rest = rest;
    while let Some((_, next)) = rest.split_once("\r\n\r\n")
        && next.starts_with("HTTP/")
    {
        rest = next;
    }
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: code.trim().parse().unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends `bytes` on `stream`, then reads until `want` bytes came back or the peer closed.
pub async fn exchange(stream: &mut TcpStream, bytes: &[u8], want: usize) -> Vec<u8> {
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no answer within 10 s; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    out
}
