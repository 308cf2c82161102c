//! Cluster mode: the sidecar's subscription to the operator.
//!
//! [`ClusterClient::run`] keeps one HTTP/2 connection to the operator's distribution endpoint
//! (protocol in `tollgate_crds::distribution`):
//!
//! - At start it loads the last good snapshot from [`ClusterConfig::state_file`] and hands it
//!   to the apply callback, so the sidecar enforces it before (and without) any operator.
//! - Each connect re-reads the token file (projected tokens rotate) and the CA bundle,
//!   subscribes as the pod, and resumes from the revision it holds.
//! - Every snapshot goes to the apply callback; when it returns `Ok` the snapshot is persisted
//!   (mode 0600: it holds credentials) and acknowledged. A snapshot the callback refuses is
//!   neither persisted nor acknowledged; the previous one stays in force.
//! - Every report interval (set by the operator) the report callback's output is posted on the
//!   same connection.
//! - Any failure, or silence for three heartbeats, ends the connection; it reconnects after a
//!   jittered exponential backoff.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use tollgate_sidecar::cluster::{ClusterClient, ClusterConfig};
//! let config = ClusterConfig::new(
//!     "https://tollgate-operator.tollgate-system.svc:8443".parse().unwrap(),
//!     "/var/run/secrets/tollgate/token",
//!     "/var/run/secrets/tollgate/ca.crt",
//!     "checkout-7f9c", "payments",
//!     "/var/lib/tollgate/snapshot.json",
//! );
//! let client = ClusterClient::new(
//!     config,
//!     Arc::new(|snapshot| { /* swap the revision in */ Ok(()) }),
//!     Arc::new(Vec::new),
//! );
//! tokio::spawn(client.run());
//! # }
//! ```

use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tollgate_crds::distribution::{
    ACK_PATH, Ack, DistributedIntegration, IntegrationReport, PROTOCOL_VERSION, REPORT_PATH,
    Report, SESSION_HEADER, SUBSCRIBE_PATH, Snapshot, StreamMessage,
};
use tollgate_crds::v1alpha1::SecretKeyRef;

/// Applies a snapshot (atomically) to the running sidecar. `Err` refuses it.
pub type ApplyFn = Arc<dyn Fn(&Snapshot) -> Result<(), String> + Send + Sync>;
/// Produces the per-integration report: counts since the previous call.
pub type ReportFn = Arc<dyn Fn() -> Vec<IntegrationReport> + Send + Sync>;

/// Where the operator is and who this pod is.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `https://host:port` of the distribution endpoint.
    pub operator: Uri,
    /// The projected ServiceAccount token (audience `tollgate`); re-read on every connect.
    pub token_file: PathBuf,
    /// PEM bundle that signs the operator's certificate; re-read on every connect.
    pub ca_file: PathBuf,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Where the last good snapshot is kept (mode 0600).
    pub state_file: PathBuf,
    /// TLS name to verify, when it differs from the URL's host.
    pub server_name: Option<String>,
    /// The pod's labels as the kubelet projects them (downward API, `metadata.labels`). When
    /// the file changes the sidecar subscribes again, and the operator selects integrations by
    /// the labels the pod has then.
    pub labels_file: Option<PathBuf>,
    /// How often `labels_file` is compared with what it held at subscription.
    pub labels_check: Duration,
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failure up to `backoff_max`, half of it jittered.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl ClusterConfig {
    /// A configuration with default timings (connect 5s, backoff 250ms to 30s).
    pub fn new(
        operator: Uri,
        token_file: impl Into<PathBuf>,
        ca_file: impl Into<PathBuf>,
        pod_name: impl Into<String>,
        pod_namespace: impl Into<String>,
        state_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            operator,
            token_file: token_file.into(),
            ca_file: ca_file.into(),
            pod_name: pod_name.into(),
            pod_namespace: pod_namespace.into(),
            state_file: state_file.into(),
            server_name: None,
            labels_file: None,
            labels_check: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// The link to the operator as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected yet, or reconnecting.
    Connecting,
    /// Subscribed; `revision` is the snapshot in force.
    Connected { revision: u64 },
    /// The last attempt failed; the persisted snapshot stays in force.
    Disconnected { error: String },
}

/// Why a connection ended or the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a snapshot: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("operator URL {0}: {1}")]
    Url(String, &'static str),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connecting to the operator: {0}")]
    Connect(String),
    #[error("operator refused the subscription ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("stream: {0}")]
    Stream(String),
    #[error("operator speaks protocol {0}, this sidecar {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("the pod's labels changed: subscribing again to be selected by them")]
    LabelsChanged,
}

/// Reads the persisted snapshot; `Ok(None)` when there is none yet.
pub fn load_snapshot(path: &Path) -> Result<Option<Snapshot>, ClusterError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ClusterError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| ClusterError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// Persists `snapshot` atomically (temporary file, then rename) with mode 0600.
pub fn save_snapshot(path: &Path, snapshot: &Snapshot) -> Result<(), ClusterError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let werr = |source| ClusterError::Write {
        path: path.to_path_buf(),
        source,
    };
    let body = serde_json::to_vec(snapshot).map_err(|e| werr(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr)?;
    // The umask may have narrowed the mode further; never widen it past 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(werr)?;
    f.write_all(&body).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

/// The subscription. Build with [`ClusterClient::new`], run with [`ClusterClient::run`].
pub struct ClusterClient {
    config: ClusterConfig,
    apply: ApplyFn,
    report: ReportFn,
    state: watch::Sender<ConnectionState>,
    /// What [`ClusterClient::restore`] applied; `None` until it ran.
    restored: Option<Option<Held>>,
}

/// What the client holds: the revision and digest to resume from, and the snapshot in force
/// (whose credentials a snapshot may tell it to keep).
#[derive(Clone, Debug, Default)]
struct Held {
    revision: u64,
    digest: String,
    snapshot: Option<Arc<Snapshot>>,
    /// Its global-band shares are in force only up to `1 / subscribers` ([`cut_off`]).
    cut_off: bool,
}

/// `s` as a sidecar without a stream runs it: each share of global bands at most
/// `1 / subscribers`. The operator reclaims a share once the stream that carried it has been
/// gone for three heartbeats and a second; until it is connected again a sidecar keeps no more
/// than an even split, so sidecars cut off together never exceed a band, and an operator
/// outage never lifts one. `None` when nothing changes.
pub fn cut_off(s: &Snapshot) -> Option<Snapshot> {
    let mut out = s.clone();
    let mut changed = false;
    for share in out
        .integrations
        .iter_mut()
        .filter_map(|i| i.quota_share.as_mut())
    {
        let even = 1.0 / f64::from(share.subscribers.max(1));
        if share.fraction > even {
            share.fraction = even;
            changed = true;
        }
    }
    changed.then_some(out)
}

/// Gives every integration `s` marks `credential_held` the credential `previous` carries for
/// it, when its `secretRef` and upstream URL are unchanged (an operator replica that restarted
/// while the Secret was unreadable does not know the value; this sidecar does).
pub fn keep_held_credentials(s: &mut Snapshot, previous: Option<&Snapshot>) {
    let Some(previous) = previous else {
        return;
    };
    for i in s.integrations.iter_mut().filter(|i| i.credential_held) {
        let same = |o: &&DistributedIntegration| {
            o.namespace == i.namespace
                && o.name == i.name
                && o.spec.upstream.url == i.spec.upstream.url
                && o.spec.credentials.as_ref().map(|c| &c.secret_ref)
                    == i.spec.credentials.as_ref().map(|c| &c.secret_ref)
        };
        if let Some(value) = previous
            .integrations
            .iter()
            .find(same)
            .and_then(|o| o.credential.clone())
        {
            i.credential = Some(value);
        }
    }
    // The credentials' other keys (secondaryRef, OAuth2 client id and secret): each key the
    // spec still names and the snapshot lacks, from the same integration and upstream URL.
    for i in s
        .integrations
        .iter_mut()
        .filter(|i| i.more_credentials_held)
    {
        let Some(o) = previous.integrations.iter().find(|o| {
            o.namespace == i.namespace
                && o.name == i.name
                && o.spec.upstream.url == i.spec.upstream.url
        }) else {
            continue;
        };
        let named: Vec<SecretKeyRef> = i
            .spec
            .credentials
            .as_ref()
            .map(|c| c.secret_refs().into_iter().cloned().collect())
            .unwrap_or_default();
        for k in &o.more_credentials {
            let still_named = named.iter().any(|r| r.name == k.name && r.key == k.key);
            let lacking = !i
                .more_credentials
                .iter()
                .any(|m| m.name == k.name && m.key == k.key);
            if still_named && lacking {
                i.more_credentials.push(k.clone());
            }
        }
    }
    // The same for a held client certificate: same Secret name and upstream URL.
    for i in s
        .integrations
        .iter_mut()
        .filter(|i| i.client_certificate_held)
    {
        let same = |o: &&DistributedIntegration| {
            o.namespace == i.namespace
                && o.name == i.name
                && o.spec.upstream.url == i.spec.upstream.url
                && o.spec.upstream.client_certificate == i.spec.upstream.client_certificate
        };
        if let Some(value) = previous
            .integrations
            .iter()
            .find(same)
            .and_then(|o| o.client_certificate.clone())
        {
            i.client_certificate = Some(value);
        }
    }
}

impl ClusterClient {
    pub fn new(config: ClusterConfig, apply: ApplyFn, report: ReportFn) -> Self {
        let (state, _) = watch::channel(ConnectionState::Connecting);
        Self {
            config,
            apply,
            report,
            state,
            restored: None,
        }
    }

    /// Follows the link's state (for `/readyz` and logs).
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.subscribe()
    }

    /// Applies the persisted snapshot, if there is one, before returning: call it before the
    /// sidecar serves, so its first request already meets the last good revision (a task
    /// spawned with [`ClusterClient::run`] would race the listener). Returns whether a snapshot
    /// is in force. [`ClusterClient::run`] does it itself when this was not called.
    pub fn restore(&mut self) -> bool {
        let held = self.load_persisted();
        let applied = held.is_some();
        self.restored = Some(held);
        applied
    }

    fn load_persisted(&self) -> Option<Held> {
        match load_snapshot(&self.config.state_file) {
            // Not connected yet: shares of global bands as a sidecar cut off runs them.
            Ok(Some(s)) => match (self.apply)(cut_off(&s).as_ref().unwrap_or(&s)) {
                Ok(()) => {
                    tracing::info!(
                        revision = s.revision,
                        integrations = s.integrations.len(),
                        "enforcing the persisted snapshot"
                    );
                    Some(Held {
                        revision: s.revision,
                        digest: s.digest.clone(),
                        snapshot: Some(Arc::new(s)),
                        cut_off: true,
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "persisted snapshot refused");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the state file");
                None
            }
        }
    }

    /// Applies the persisted snapshot (unless [`ClusterClient::restore`] did), then subscribes
    /// and reconnects forever. Stop it by aborting its task.
    pub async fn run(mut self) {
        let mut held = match self.restored.take() {
            Some(held) => held,
            None => self.load_persisted(),
        };
        let mut failures: u32 = 0;
        loop {
            self.state.send_replace(ConnectionState::Connecting);
            let mut subscribed = false;
            let result = self.connect_once(&mut held, &mut subscribed).await;
            if subscribed {
                failures = 0;
            }
            if let Err(e @ ClusterError::LabelsChanged) = &result {
                // Not a failure: the snapshot in force stays until the new one arrives.
                tracing::info!("{e}");
                continue;
            }
            let error = match result {
                Ok(()) => "operator closed the stream".to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(%error, "disconnected from the operator; the snapshot in force stays");
            self.cut_off(&mut held);
            self.state
                .send_replace(ConnectionState::Disconnected { error });
            failures = failures.saturating_add(1);
            tokio::time::sleep(self.backoff(failures)).await;
        }
    }

    /// Without a stream: the held snapshot's global-band shares at most an even split.
    fn cut_off(&self, held: &mut Option<Held>) {
        let Some(h) = held.as_mut().filter(|h| !h.cut_off) else {
            return;
        };
        h.cut_off = true;
        let Some(lowered) = h.snapshot.as_deref().and_then(cut_off) else {
            return;
        };
        match (self.apply)(&lowered) {
            Ok(()) => tracing::info!(
                "shares of global rate limits lowered to an even split until the operator is back"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot lower the shares of global rate limits"),
        }
    }

    /// Connected again and told the held snapshot is current: its shares are in force again.
    fn restore_shares(&self, held: &mut Option<Held>) {
        let Some(h) = held.as_mut().filter(|h| h.cut_off) else {
            return;
        };
        h.cut_off = false;
        if let Some(s) = h.snapshot.as_deref().filter(|s| cut_off(s).is_some())
            && let Err(e) = (self.apply)(s)
        {
            tracing::warn!(error = %e, "cannot restore the shares of global rate limits");
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .config
            .backoff_base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.config.backoff_max);
        exp / 2 + exp.mul_f64(rand::random::<f64>() / 2.0)
    }

    fn tls(&self) -> Result<TlsConnector, ClusterError> {
        let pem = std::fs::read(&self.config.ca_file).map_err(|source| ClusterError::Read {
            path: self.config.ca_file.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut BufReader::new(&pem[..])) {
            let cert = cert.map_err(|e| ClusterError::Tls(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ClusterError::Tls(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ClusterError::Tls(format!(
                "{}: no certificate",
                self.config.ca_file.display()
            )));
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsConnector::from(Arc::new(cfg)))
    }

    async fn connect_once(
        &self,
        held: &mut Option<Held>,
        subscribed: &mut bool,
    ) -> Result<(), ClusterError> {
        let c = &self.config;
        let url = c.operator.to_string();
        let host = c
            .operator
            .host()
            .ok_or(ClusterError::Url(url.clone(), "no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = c.operator.port_u16().unwrap_or(443);
        let token_raw =
            std::fs::read_to_string(&c.token_file).map_err(|source| ClusterError::Read {
                path: c.token_file.clone(),
                source,
            })?;
        let token = token_raw.trim().to_string();
        // The labels the operator will see when it reads the pod (the kubelet updates the file
        // after the API server has the change).
        let labels_at_subscribe = c.labels_file.as_deref().map(read_labels);
        let mut labels_check = tokio::time::interval(c.labels_check);
        labels_check.reset();
        let connector = self.tls()?;
        let name = ServerName::try_from(c.server_name.clone().unwrap_or_else(|| host.clone()))
            .map_err(|_| ClusterError::Url(url.clone(), "host is not a valid TLS name"))?;

        let tcp =
            tokio::time::timeout(c.connect_timeout, TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| ClusterError::Connect("timed out".into()))?
                .map_err(|e| ClusterError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(c.connect_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| ClusterError::Tls("handshake timed out".into()))?
            .map_err(|e| ClusterError::Tls(e.to_string()))?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake::<_, Full<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));

        let base = format!(
            "{}://{}",
            c.operator.scheme_str().unwrap_or("https"),
            c.operator
                .authority()
                .map(|a| a.as_str())
                .unwrap_or(host.as_str())
        );
        let mut query = format!(
            "{SUBSCRIBE_PATH}?namespace={}&pod={}",
            c.pod_namespace, c.pod_name
        );
        if let Some(h) = held.as_ref() {
            query.push_str(&format!("&revision={}&digest={}", h.revision, h.digest));
        }
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{base}{query}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClusterError::Stream(e.to_string()))?;
        let mut sender_get = sender.clone();
        let resp = sender_get
            .send_request(req)
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(ClusterError::Refused {
                status,
                message: body,
            });
        }

        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let mut session: Option<String> = None;
        let mut idle = Duration::from_secs(45);
        let mut report_every = tokio::time::interval(Duration::from_secs(5));
        report_every.reset();
        loop {
            tokio::select! {
                frame = tokio::time::timeout(idle, body.frame()) => {
                    let frame = match frame {
                        Err(_) => return Err(ClusterError::Stream("no heartbeat from the operator".into())),
                        Ok(None) => return Ok(()),
                        Ok(Some(Err(e))) => return Err(ClusterError::Stream(e.to_string())),
                        Ok(Some(Ok(f))) => f,
                    };
                    let Ok(data) = frame.into_data() else { continue };
                    buf.extend_from_slice(&data);
                    if buf.len() > 64 * 1024 * 1024 {
                        return Err(ClusterError::Stream("line longer than 64 MiB".into()));
                    }
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        let line = &line[..line.len() - 1];
                        if line.is_empty() {
                            continue;
                        }
                        let msg: StreamMessage = serde_json::from_slice(line)
                            .map_err(|e| ClusterError::Stream(format!("bad message: {e}")))?;
                        match msg {
                            StreamMessage::Hello(h) => {
                                if h.protocol != PROTOCOL_VERSION {
                                    return Err(ClusterError::Protocol(h.protocol));
                                }
                                idle = Duration::from_secs(u64::from(h.heartbeat_seconds.max(1)) * 3);
                                report_every = tokio::time::interval(Duration::from_secs(u64::from(h.report_interval_seconds.max(1))));
                                report_every.reset();
                                session = Some(h.session);
                                *subscribed = true;
                                tracing::info!(operator = %c.operator, "subscribed to the operator");
                            }
                            StreamMessage::Snapshot(s) => {
                                if s.protocol != PROTOCOL_VERSION {
                                    return Err(ClusterError::Protocol(s.protocol));
                                }
                                self.on_snapshot(s, held, &sender, &base, session.as_deref()).await;
                            }
                            StreamMessage::Unchanged { revision, .. } => {
                                tracing::info!(revision, "resumed: the snapshot in force is current");
                                self.restore_shares(held);
                                self.state.send_replace(ConnectionState::Connected { revision });
                            }
                            StreamMessage::Heartbeat => {}
                        }
                    }
                }
                _ = labels_check.tick(), if labels_at_subscribe.is_some() => {
                    let now = c.labels_file.as_deref().map(read_labels);
                    if now != labels_at_subscribe {
                        return Err(ClusterError::LabelsChanged);
                    }
                }
                _ = report_every.tick(), if session.is_some() => {
                    let report = Report {
                        revision: held.as_ref().map_or(0, |h| h.revision),
                        integrations: (self.report)(),
                    };
                    if let Some(sess) = session.clone() {
                        post(sender.clone(), format!("{base}{REPORT_PATH}"), sess, &report);
                    }
                }
            }
            if conn.0.is_finished() {
                return Err(ClusterError::Stream("connection closed".into()));
            }
        }
    }

    async fn on_snapshot(
        &self,
        s: Snapshot,
        held: &mut Option<Held>,
        sender: &http2::SendRequest<Full<Bytes>>,
        base: &str,
        session: Option<&str>,
    ) {
        let revision = s.revision;
        let mut s = s;
        keep_held_credentials(&mut s, held.as_ref().and_then(|h| h.snapshot.as_deref()));
        if let Err(e) = (self.apply)(&s) {
            tracing::warn!(revision, error = %e, "snapshot refused; the previous one stays in force");
            return;
        }
        let s = Arc::new(s);
        *held = Some(Held {
            revision,
            digest: s.digest.clone(),
            snapshot: Some(s.clone()),
            cut_off: false,
        });
        self.state
            .send_replace(ConnectionState::Connected { revision });
        tracing::info!(
            revision,
            integrations = s.integrations.len(),
            "snapshot applied"
        );
        if let Some(sess) = session {
            post(
                sender.clone(),
                format!("{base}{ACK_PATH}"),
                sess.to_string(),
                &Ack { revision },
            );
        }
        let path = self.config.state_file.clone();
        let saved = tokio::task::spawn_blocking(move || save_snapshot(&path, &s)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not persist the snapshot"),
            Err(e) => tracing::warn!(error = %e, "could not persist the snapshot"),
        }
    }
}

/// Fire-and-forget POST on the stream's connection; failures are logged only (the next
/// report or reconnect makes up for them).
/// The labels file's content; a file that cannot be read reads as empty (it is compared, not
/// parsed: any change means subscribing again).
fn read_labels(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn post<T: serde::Serialize>(
    mut sender: http2::SendRequest<Full<Bytes>>,
    uri: String,
    session: String,
    body: &T,
) {
    let body = match serde_json::to_vec(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "cannot serialize");
            return;
        }
    };
    tokio::spawn(async move {
        let req = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(SESSION_HEADER, session)
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        match sender.send_request(req).await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::debug!(%uri, status = %r.status(), "operator refused a post"),
            Err(e) => tracing::debug!(%uri, error = %e, "post failed"),
        }
    });
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tollgate_crds::distribution::SecretValue;

    fn with_credential(url: &str, secret: &str, value: Option<&str>) -> DistributedIntegration {
        let spec = serde_json::from_value(serde_json::json!({
            "upstream": {"url": url},
            "credentials": {"secretRef": {"name": secret, "key": "apiKey"}},
        }))
        .unwrap();
        DistributedIntegration {
            namespace: "payments".into(),
            name: "stripe".into(),
            generation: 2,
            config_revision: "2-abc".into(),
            spec,
            credential: value.map(SecretValue::new),
            credential_held: value.is_none(),
            client_certificate: None,
            client_certificate_held: false,
            more_credentials: Vec::new(),
            more_credentials_held: false,
            quota_share: None,
        }
    }

    #[test]
    fn a_held_credential_is_kept_only_for_the_same_secret_and_upstream() {
        let mut before = Snapshot::empty();
        before.integrations.push(with_credential(
            "https://api.stripe.com",
            "stripe-api",
            Some("sk_live"),
        ));
        let kept = |url: &str, secret: &str| {
            let mut s = Snapshot::empty();
            s.integrations.push(with_credential(url, secret, None));
            keep_held_credentials(&mut s, Some(&before));
            s.integrations[0]
                .credential
                .as_ref()
                .map(|v| v.expose().to_string())
        };
        assert_eq!(
            kept("https://api.stripe.com", "stripe-api"),
            Some("sk_live".into())
        );
        assert_eq!(kept("https://collector.example", "stripe-api"), None);
        assert_eq!(kept("https://api.stripe.com", "db-password"), None);
        // Without a snapshot in force there is nothing to keep.
        let mut s = Snapshot::empty();
        s.integrations.push(with_credential(
            "https://api.stripe.com",
            "stripe-api",
            None,
        ));
        keep_held_credentials(&mut s, None);
        assert!(s.integrations[0].credential.is_none());
    }

    #[test]
    fn held_oauth2_client_credentials_are_kept_for_keys_the_spec_still_names() {
        use tollgate_crds::distribution::KeyedSecret;
        let oauth = |url: &str, id_key: &str, values: &[(&str, &str)], held: bool| {
            let mut i = with_credential(url, "unused", None);
            i.credential_held = false;
            i.spec.credentials = serde_json::from_value(serde_json::json!({
                "oauth2": {
                    "tokenUrl": "https://login.example/token",
                    "clientIdRef": {"name": "oauth", "key": id_key},
                    "clientSecretRef": {"name": "oauth", "key": "secret"},
                },
            }))
            .unwrap();
            i.more_credentials = values
                .iter()
                .map(|(k, v)| KeyedSecret {
                    name: "oauth".into(),
                    key: k.to_string(),
                    value: SecretValue::new(*v),
                })
                .collect();
            i.more_credentials_held = held;
            i
        };
        let mut before = Snapshot::empty();
        before.integrations.push(oauth(
            "https://api.stripe.com",
            "id",
            &[("id", "app"), ("secret", "s3cret")],
            false,
        ));
        let kept = |url: &str, id_key: &str, held: bool| {
            let mut s = Snapshot::empty();
            s.integrations
                .push(oauth(url, id_key, &[("secret", "fresh")], held));
            keep_held_credentials(&mut s, Some(&before));
            let mut v: Vec<String> = s.integrations[0]
                .more_credentials
                .iter()
                .map(|k| format!("{}={}", k.key, k.value.expose()))
                .collect();
            v.sort();
            v
        };
        // The operator never read the client id: the sidecar keeps the one it holds; the
        // secret it did read is the new one.
        assert_eq!(
            kept("https://api.stripe.com", "id", true),
            ["id=app", "secret=fresh"]
        );
        assert_eq!(
            kept("https://api.stripe.com", "id", false),
            ["secret=fresh"]
        );
        assert_eq!(
            kept("https://collector.example", "id", true),
            ["secret=fresh"]
        );
        assert_eq!(
            kept("https://api.stripe.com", "id2", true),
            ["secret=fresh"]
        );
    }

    #[test]
    fn a_sidecar_cut_off_runs_at_most_an_even_split_of_a_global_band() {
        let spec: tollgate_crds::PartnerIntegrationSpec =
            serde_json::from_value(serde_json::json!({"upstream": {"url": "http://p.internal"}}))
                .unwrap();
        let integration = |fraction: f64, subscribers: u32| DistributedIntegration {
            namespace: "ns".into(),
            name: format!("p{subscribers}"),
            generation: 1,
            config_revision: "1-x".into(),
            spec: spec.clone(),
            credential: None,
            credential_held: false,
            client_certificate: None,
            client_certificate_held: false,
            more_credentials: Vec::new(),
            more_credentials_held: false,
            quota_share: Some(tollgate_crds::distribution::QuotaShare {
                fraction,
                subscribers,
            }),
        };
        let mut s = Snapshot::empty();
        s.integrations = vec![
            integration(0.9, 3),
            integration(0.05, 3),
            integration(1.0, 1),
        ];
        let cut = cut_off(&s).expect("the busy share is lowered");
        let fractions: Vec<f64> = cut
            .integrations
            .iter()
            .map(|i| i.quota_share.as_ref().unwrap().fraction)
            .collect();
        assert_eq!(fractions, [1.0 / 3.0, 0.05, 1.0]);
        // Nothing above an even split: nothing to lower.
        s.integrations.remove(0);
        assert!(cut_off(&s).is_none());
    }

    #[test]
    fn snapshot_persists_with_mode_0600_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.json");
        assert!(load_snapshot(&path).unwrap().is_none());
        let mut s = Snapshot::empty();
        s.revision = 3;
        s.integrations.push(DistributedIntegration {
            namespace: "payments".into(),
            name: "stripe".into(),
            generation: 1,
            config_revision: "1-abc".into(),
            spec: Default::default(),
            credential: Some(SecretValue::new("sk_live")),
            credential_held: false,
            client_certificate: None,
            client_certificate_held: false,
            more_credentials: Vec::new(),
            more_credentials_held: false,
            quota_share: None,
        });
        save_snapshot(&path, &s).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_snapshot(&path).unwrap(), Some(s));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            load_snapshot(&path),
            Err(ClusterError::Corrupt { .. })
        ));
    }

    #[test]
    fn restore_applies_the_persisted_snapshot_before_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.json");
        let mut s = Snapshot::empty();
        s.revision = 7;
        save_snapshot(&path, &s).unwrap();
        let applied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = applied.clone();
        let mut c = ClusterClient::new(
            ClusterConfig::new(
                "https://op:8443".parse().unwrap(),
                "/t",
                "/c",
                "p",
                "ns",
                &path,
            ),
            Arc::new(move |s| {
                seen.lock().unwrap().push(s.revision);
                Ok(())
            }),
            Arc::new(Vec::new),
        );
        assert!(c.restore());
        assert_eq!(
            *applied.lock().unwrap(),
            [7],
            "applied at once, not in run()"
        );
        assert_eq!(
            c.restored
                .as_ref()
                .and_then(|h| h.as_ref())
                .map(|h| h.revision),
            Some(7),
            "run() resumes from it without applying it again"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = ClusterClient::new(
            ClusterConfig::new(
                "https://op:8443".parse().unwrap(),
                "/t",
                "/c",
                "p",
                "ns",
                "/s",
            ),
            Arc::new(|_| Ok(())),
            Arc::new(Vec::new),
        );
        for n in 1..20 {
            let d = c.backoff(n);
            assert!(d <= Duration::from_secs(30), "{d:?}");
            assert!(d >= Duration::from_millis(125), "{d:?}");
        }
        assert!(c.backoff(10) >= Duration::from_secs(15));
    }
}
