//! HTTPS interception: the app's TLS to a declared partner host (a `CONNECT` tunnel, or a
//! redirected connection whose SNI names the partner) is terminated here with a leaf from the
//! pod's own CA ([`ca::PodCa`]), every request inside runs through the same handler and policy
//! stack as plain HTTP, and the stack originates verified TLS to the partner.
//!
//! Interception applies to an integration whose `upstream.interception` is on (the default for
//! an `https://` url) unless the pod opted out (`--tls-interception off`), or the CA could not be
//! made or the trust files written at start; otherwise the partner's TLS gets the connection-level policies only, as
//! before. Leaves are minted only for names the caller found in the revision in force.

pub(crate) mod ca;
pub(crate) mod p12;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::header::HOST;
use http::uri::Authority;
use http::{Method, Request, Response};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::ca::PodCa;
use crate::answer::{Answer, Reason};
use crate::body::RespBody;
use crate::config::Integration;
use crate::proxy::handler::Proxy;
use crate::proxy::sniff::{SniffIo, Verdict, Verdicts};
use crate::telemetry::metrics::Metrics;

/// Whether this pod intercepts partner TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Intercept partners whose integration has interception on.
    On,
    /// Splice every TLS connection (the pod opted out).
    Off,
}

/// The interception flags.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "interception")]
pub struct Flags {
    /// TLS interception for this pod: `off` splices every partner's TLS (connection-level
    /// policies only), whatever the integrations say.
    #[arg(long, value_enum, default_value = "on")]
    pub tls_interception: Mode,
    /// Writes DIR/ca.crt (the pod CA), DIR/ca-bundle.crt (system roots plus the pod CA) and
    /// DIR/ca-bundle.p12 (the same, as a Java trust store) before the sidecar reports ready, for
    /// apps to trust.
    #[arg(long, value_name = "DIR")]
    pub trust_dir: Option<PathBuf>,
}

/// The pod's interception state, fixed at start.
#[derive(Debug)]
pub struct Interceptor {
    ca: Option<PodCa>,
    /// Why interception is off for this start although the pod asked for it.
    fallback: Option<String>,
}

impl Interceptor {
    /// Interception off: every TLS connection is spliced.
    pub fn disabled() -> Interceptor {
        Interceptor {
            ca: None,
            fallback: None,
        }
    }

    /// Makes the pod CA (unless the pod opted out) and writes the trust directory. Never fails:
    /// a CA that cannot be made, or trust files that cannot be written (apps could not trust
    /// the CA), leave interception off for this start, said in the log, in
    /// `tollgate_tls_interception_fallback` and in `/readyz`.
    pub fn start(flags: &Flags, metrics: &Metrics) -> Interceptor {
        let mut fallback = None;
        let mut ca = match flags.tls_interception {
            Mode::Off => {
                tracing::info!(
                    "TLS interception is off for this pod (--tls-interception off): partner TLS is spliced"
                );
                None
            }
            Mode::On => match PodCa::generate() {
                Ok(ca) => Some(ca),
                Err(e) => {
                    fallback = Some(e.to_string());
                    None
                }
            },
        };
        if let Some(dir) = &flags.trust_dir {
            match write_trust_dir(dir, ca.as_ref()) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), pod_ca = ca.is_some(), "trust files written");
                }
                Err(e) => {
                    let why = format!(
                        "--trust-dir {}: cannot write the trust files: {e}",
                        dir.display()
                    );
                    // Best effort: no app should trust a CA this start does not use.
                    let _ = std::fs::remove_file(dir.join("ca.crt"));
                    if ca.take().is_some() {
                        fallback = Some(why);
                    } else {
                        tracing::error!("{why}");
                    }
                }
            }
        }
        match (&ca, &fallback) {
            (Some(_), _) => tracing::info!(
                ca_lifetime_days = ca::CA_LIFETIME.as_secs() / 86400,
                leaf_lifetime_hours = ca::LEAF_LIFETIME.as_secs() / 3600,
                "pod CA generated (its key stays in memory): partner TLS is intercepted"
            ),
            (None, Some(why)) => tracing::error!(
                reason = %why,
                "TLS interception is off for this start: partner TLS is spliced (connection-level policies only)"
            ),
            (None, None) => {}
        }
        metrics.tls_interception.set(i64::from(ca.is_some()));
        metrics
            .tls_interception_fallback
            .set(i64::from(fallback.is_some()));
        Interceptor { ca, fallback }
    }

    /// The pod CA, when interception is in force.
    pub fn ca(&self) -> Option<&PodCa> {
        self.ca.as_ref()
    }

    /// Whether interception is in force for this start.
    pub fn active(&self) -> bool {
        self.ca.is_some()
    }

    /// Why interception fell back to splicing for this start, when it did.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// The CA to intercept `integration`'s TLS with, when it is to be intercepted.
    pub fn for_integration(&self, integration: &Integration) -> Option<&PodCa> {
        self.ca
            .as_ref()
            .filter(|_| integration.policy.upstream.interception)
    }
}

/// `ca.crt` (only with a CA), `ca-bundle.crt` and the same certificates as a Java trust store,
/// `ca-bundle.p12`; each written whole (temporary file and rename), mode 0644. Never a private
/// key.
fn write_trust_dir(dir: &Path, ca: Option<&PodCa>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let native = rustls_native_certs::load_native_certs();
    let mut bundle = ca::pem_certificates(native.certs.iter().map(|c| c.as_ref()));
    let aliases: Vec<String> = (1..=native.certs.len())
        .map(|i| format!("system-root-{i}"))
        .collect();
    let mut entries: Vec<(&str, &[u8])> = aliases
        .iter()
        .map(String::as_str)
        .zip(native.certs.iter().map(|c| c.as_ref()))
        .collect();
    if let Some(ca) = ca {
        write_file(&dir.join("ca.crt"), ca.cert_pem().as_bytes())?;
        bundle.push_str(ca.cert_pem());
        entries.push(("tollgate-pod-ca", ca.cert_der()));
    }
    write_file(&dir.join("ca-bundle.crt"), bundle.as_bytes())?;
    write_file(&dir.join("ca-bundle.p12"), &p12::trust_store(entries))
}

fn write_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Terminates the app's TLS for `host` on `io` and serves the HTTP/1.1 requests inside it
/// through the proxy's handler, until the app closes, the handshake fails or takes longer than
/// `--header-read-timeout`, or `drain` turns true.
pub async fn serve<I>(
    io: I,
    ca: &PodCa,
    host: &str,
    proxy: Arc<Proxy>,
    drain: Option<watch::Receiver<bool>>,
    client: Option<std::net::IpAddr>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = match ca.server_config(host) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no certificate for the partner host; closing");
            return;
        }
    };
    let handshake = TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(proxy.options.header_read_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%host, error = %e, "app TLS handshake failed (does the app trust the pod CA?)");
            return;
        }
        Err(_) => {
            tracing::debug!(%host, "app TLS handshake did not finish in time; closing");
            return;
        }
    };
    let builder = crate::proxy::server::http_builder(&proxy.options);
    if let Err(e) = serve_session(tls, host, proxy, &builder, drain, client).await {
        tracing::debug!(%host, error = %e, "intercepted connection ended with an error");
    }
}

/// Serves one decrypted app connection: each request must name `host` (the server the TLS
/// session is for) in origin form, then goes to [`Proxy::handle`] like any other.
async fn serve_session<I>(
    io: I,
    host: &str,
    proxy: Arc<Proxy>,
    builder: &http1::Builder,
    drain: Option<watch::Receiver<bool>>,
    client: Option<std::net::IpAddr>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let verdicts = Verdicts::default();
    let io = TokioIo::new(SniffIo::new(
        io,
        proxy.options.max_header_bytes,
        verdicts.clone(),
    ));
    let host: Arc<str> = host.into();
    let service = service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let verdict = verdicts.next();
        if let Some(ip) = client {
            req.extensions_mut().insert(crate::proxy::ClientAddr(ip));
        }
        let p = proxy.clone();
        let host = host.clone();
        async move {
            let resp = match misdirected(&req, &host) {
                Some(why) => Answer::new(Reason::BadRequest, why).into_response(),
                None => handle(p, req, verdict).await,
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let Some(mut drain) = drain else {
        return conn.await;
    };
    tokio::select! {
        r = conn.as_mut() => r,
        Ok(()) = async { drain.wait_for(|d| *d).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

type Handled = std::pin::Pin<Box<dyn Future<Output = Response<RespBody>> + Send>>;

/// [`Proxy::handle`] behind a named, boxed future: an intercepted `CONNECT` tunnel serves its
/// requests with the handler that opened it, and the compiler needs this break in the cycle to
/// see that the whole is `Send`.
fn handle(proxy: Arc<Proxy>, req: Request<hyper::body::Incoming>, verdict: Verdict) -> Handled {
    Box::pin(proxy.handle(req, verdict))
}

/// Why a request inside a TLS session for `host` is refused: a tunnel inside the tunnel, an
/// absolute URL, or a `Host` naming another server.
fn misdirected(req: &Request<hyper::body::Incoming>, host: &str) -> Option<String> {
    if req.method() == Method::CONNECT || req.uri().authority().is_some() {
        return Some(format!(
            "inside the TLS session for {host} only origin-form requests are served"
        ));
    }
    let named = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .map(|a| {
            a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase()
        });
    match named {
        Some(h) if h == host => None,
        Some(h) => Some(format!(
            "Host header names {h}, but this TLS session is for {host}"
        )),
        None => Some(format!(
            "no readable Host header (this TLS session is for {host})"
        )),
    }
}
