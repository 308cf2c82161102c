//! Real parts for the sidecar's integration tests: a partner HTTP(S) server on loopback, the
//! sidecar binary as a child process, and a client that speaks to it as an app would.
#![allow(dead_code)]

pub mod otlp;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

// === partner ===

/// A request the partner received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the partner does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait, then reply.
    Delay(Duration, Box<Reply>),
    /// Close the connection without answering.
    Reset,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into(),
        }
    }
}

type Script = Box<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// A partner API on loopback that records every request and answers from a script.
pub struct Partner {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Partner {
    /// Plain HTTP; answers 200 "ok" until told otherwise.
    pub async fn start() -> Partner {
        Self::start_inner(None).await
    }

    /// HTTPS with a certificate for `localhost` and 127.0.0.1 signed by `ca`.
    pub async fn start_tls(ca: &TestCa) -> Partner {
        Self::start_inner(Some(ca.server_config())).await
    }

    async fn start_inner(tls: Option<Arc<rustls::ServerConfig>>) -> Partner {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), tls)
    }

    /// Serves on `listener` (bound wherever the test needs, e.g. in a network namespace), over
    /// TLS when `tls` is given.
    pub fn start_on(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Partner {
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(|_, _| Reply::ok("ok"))));
        let queue: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let (s, sc, q) = (seen.clone(), script.clone(), queue.clone());
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, sc, q, acceptor) = (s.clone(), sc.clone(), q.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, sc, q) = (s.clone(), sc.clone(), q.clone());
                        async move { handle(req, s, sc, q).await }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Partner {
            addr,
            seen,
            script,
            queue,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers with `f(index, request)` from now on (index counts every request received).
    pub fn script(&self, f: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Box::new(f);
    }

    /// The next requests get these replies, in order, before the script applies again.
    pub fn queue(&self, replies: impl IntoIterator<Item = Reply>) {
        self.queue.lock().unwrap().extend(replies);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let s = Seen {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let index = {
        let mut v = seen.lock().unwrap();
        v.push(s.clone());
        v.len() - 1
    };
    let queued = queue.lock().unwrap().pop_front();
    let mut reply = match queued {
        Some(r) => r,
        None => (script.lock().unwrap())(index, &s),
    };
    loop {
        match reply {
            Reply::Delay(d, next) => {
                tokio::time::sleep(d).await;
                reply = *next;
            }
            Reply::Reset => return Err(std::io::Error::other("reset by test partner")),
            Reply::Status(code) => {
                let mut r = Response::new(Full::new(Bytes::from(format!("partner says {code}"))));
                *r.status_mut() = StatusCode::from_u16(code).unwrap();
                return Ok(r);
            }
            Reply::Full {
                status,
                headers,
                body,
            } => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                for (k, v) in headers {
                    r.headers_mut().insert(
                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        v.parse().unwrap(),
                    );
                }
                return Ok(r);
            }
        }
    }
}

// === a test CA ===

pub struct TestCa {
    pub ca_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tollgate test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.signed_by(&key, &issuer).unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .unwrap();
        Arc::new(cfg)
    }
}

// === the sidecar process ===

pub struct Sidecar {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub logs: Arc<Mutex<Vec<String>>>,
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the sidecar binary starts");
        let stderr = child.stderr.take().unwrap();
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(SocketAddr, SocketAddr)>();
        let l = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["fields"]["message"] == "tollgate-sidecar ready"
                {
                    let listen = v["fields"]["listen"].as_str().unwrap().parse().unwrap();
                    let admin = v["fields"]["admin"].as_str().unwrap().parse().unwrap();
                    let _ = tx.send((listen, admin));
                }
                l.lock().unwrap().push(line);
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
        let (listen, admin) = match ready {
            Ok(Some(addrs)) => addrs,
            _ => panic!(
                "sidecar did not become ready; its log:\n{}",
                logs.lock().unwrap().join("\n")
            ),
        };
        Sidecar {
            child,
            listen,
            admin,
            dir,
            config_path,
            logs,
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

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub async fn admin_get(&self, path: &str) -> Resp {
        request(
            self.admin,
            Method::GET,
            &format!("http://{}{path}", self.admin),
            &[],
            "",
        )
        .await
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.config().await;
            if pred(&c) {
                return c;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; config: {c}\nlog:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the metrics until `pred` holds.
    pub async fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics().await;
            if pred(&m) {
                return m;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; metrics:\n{m}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

// === the app side ===

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get("x-tollgate-reason")
            .and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends one request to `proxy` with `url` as the request target (absolute-form for a full URL,
/// origin-form for a path) on a fresh connection.
pub async fn request(
    proxy: SocketAddr,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let mut req = Request::builder().method(method).uri(uri.clone());
    if let Some(a) = uri.authority() {
        req = req.header("host", a.as_str());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Writes raw bytes to `addr` and reads until the peer closes or `within` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
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

/// Value of a metric line with these labels (all must appear), or 0.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
