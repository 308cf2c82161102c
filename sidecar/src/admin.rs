//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/startupz`, `/config`.
//!
//! Injected pods bind it on every address so the kubelet and scrapers reach it on the pod IP;
//! `/config` answers loopback peers only, whatever the address.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::body::{self, RespBody};
use crate::config::{Revision, Source, Store};
use crate::telemetry::metrics::Metrics;

/// Admin connections open at once.
const MAX_CONNECTIONS: usize = 64;

pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub startup: StartupGate,
    /// Why TLS interception fell back to splicing for this start, shown by `/readyz`.
    pub tls_fallback: Option<String>,
}

/// What `/startupz` answers. It is `/readyz` (a revision in force), unless the sidecar may
/// fail open: then, from `open_at` on, it reports started without a revision, logged once.
#[derive(Debug)]
pub struct StartupGate {
    open_at: Option<Instant>,
    opened: AtomicBool,
}

impl StartupGate {
    /// Fail closed: started only once a revision is in force.
    pub fn closed() -> StartupGate {
        StartupGate {
            open_at: None,
            opened: AtomicBool::new(false),
        }
    }

    /// Started once a revision is in force or, without one, once `after` has passed.
    pub fn open_after(after: Duration) -> StartupGate {
        StartupGate {
            open_at: Instant::now().checked_add(after),
            opened: AtomicBool::new(false),
        }
    }
}

/// Whether `ip` is this host's loopback (IPv4-mapped IPv6 included).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Serves the admin listener until the process ends.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let admin = admin.clone();
        let local = is_loopback(peer.ip());
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(admin.handle(req, local)) }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, s: impl Into<String>) -> Response<RespBody> {
    let mut r = Response::new(body::full(s.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Admin {
    /// Answers `req` from a peer on loopback (`local`) or elsewhere.
    pub fn handle(&self, req: Request<Incoming>, local: bool) -> Response<RespBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => {
                self.metrics.refresh(&self.store.load());
                let mut r = text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => self.readyz(),
            "/startupz" => self.startupz(),
            "/config" if !local => text(
                StatusCode::FORBIDDEN,
                "/config is served on loopback only\n",
            ),
            "/config" => {
                let v = config_json(&self.store.load());
                let mut r = Response::new(body::full(
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                ));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz, /startupz, /config\n",
            ),
        }
    }

    fn readyz(&self) -> Response<RespBody> {
        let rev = self.store.load();
        let (status, mut body) = if rev.source == Source::Empty {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "no policy revision loaded yet\n".to_string(),
            )
        } else {
            (StatusCode::OK, format!("ok: revision {}\n", rev.id))
        };
        if let Some(why) = &self.tls_fallback {
            body.push_str(&format!(
                "TLS interception off for this start (partner TLS is spliced): {why}\n"
            ));
        }
        text(status, body)
    }

    fn startupz(&self) -> Response<RespBody> {
        let ready = self.readyz();
        if ready.status() == StatusCode::OK {
            return ready;
        }
        match self.startup.open_at {
            Some(at) if Instant::now() >= at => {
                if !self.startup.opened.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "no policy revision within --startup-fail-open-after: reporting started; \
                         the app's calls are not governed until a revision arrives"
                    );
                }
                text(
                    StatusCode::OK,
                    "started without a policy revision (--startup-fail-open-after)\n",
                )
            }
            _ => ready,
        }
    }
}

const REDACTED: &str = "<redacted>";

/// The revision in force as JSON. Credential values never appear (the policy holds only the
/// secret's name); pinned and static headers named in `redactHeaders` show `<redacted>`.
pub fn config_json(rev: &Revision) -> Value {
    let integrations: Vec<Value> = rev
        .integrations
        .iter()
        .map(|i| {
            let mut v = serde_json::to_value(&i.policy).unwrap_or(Value::Null);
            let redact: Vec<String> = i
                .policy
                .redact_headers
                .iter()
                .map(|h| h.as_str().to_string())
                .collect();
            redact_maps(&mut v, &redact);
            if let Some(c) = v.get_mut("credentials").and_then(Value::as_object_mut) {
                // OAuth2: the client credentials are loaded (the token is fetched on demand).
                let loaded = i.credential.is_some() || i.token.is_some();
                c.insert("loaded".into(), Value::Bool(loaded));
                if c.contains_key("secondaryRef") {
                    c.insert(
                        "secondaryLoaded".into(),
                        Value::Bool(i.secondary_credential.is_some()),
                    );
                }
            }
            if let Some(name) = &i.policy.upstream.client_certificate {
                v["upstream"]["clientCertificate"] = json!({
                    "secretName": name,
                    "loaded": i.state.client_identity().is_some(),
                });
            }
            v
        })
        .collect();
    let loaded_at = httpdate::fmt_http_date(rev.loaded_at);
    let source = match &rev.source {
        Source::Empty => json!({"kind": "none"}),
        Source::File(p) => json!({"kind": "file", "path": p}),
        Source::Operator(u) => json!({"kind": "operator", "url": u}),
    };
    let refused: Vec<Value> = rev
        .refused
        .iter()
        .map(|r| {
            json!({
                "integration": r.integration.to_string(),
                "error": r.error,
                "keptPrevious": r.kept_previous,
            })
        })
        .collect();
    json!({"revision": rev.id, "source": source, "loadedAt": loaded_at, "integrations": integrations, "refused": refused})
}

/// Replaces the values of redacted header names in every header map of the policy JSON
/// (`pinHeaders`, fallback `headers`).
fn redact_maps(v: &mut Value, redact: &[String]) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if (k == "pinHeaders" || k == "headers")
                    && let Value::Object(h) = child
                {
                    for (name, value) in h.iter_mut() {
                        if redact.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                            *value = Value::String(REDACTED.into());
                        }
                    }
                    continue;
                }
                redact_maps(child, redact);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| redact_maps(c, redact)),
        _ => {}
    }
}
