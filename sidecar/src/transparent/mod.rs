//! The transparent listener: connections the pod's iptables rules redirect here (see
//! `tollgate-sidecar setup-iptables`), handled by what their first bytes say.
//!
//! - The original destination comes from the connection's NAT record (`SO_ORIGINAL_DST`).
//! - The first bytes are read (at most the head limit, within `--header-read-timeout`) and
//!   replayed to whoever handles the connection next, so nothing is lost or altered.
//! - An HTTP/1 request head naming a partner host: the whole connection is served by the
//!   forward proxy's handler, exactly as on `--listen` (every request through the policy stack,
//!   routed by `Host`).
//! - An HTTP/1 head naming any other host: spliced at L4 to the original destination, byte for
//!   byte; a later request on that connection naming a partner closes it unsent.
//! - A TLS ClientHello whose SNI names a partner with interception on (see [`crate::intercept`]):
//!   TLS is terminated with a leaf for that name from the pod CA and every request inside is
//!   served by the forward proxy's handler, as above.
//! - A TLS ClientHello whose SNI names a partner with interception off: handled at L4 like
//!   `CONNECT` (kill switch, connect timeout, tunnel limit, `tollgate_tunnels_total`, a
//!   `tollgate.tunnel` span), then spliced to the original destination. TLS is not terminated.
//! - Anything else: spliced to the original destination untouched.
//!
//! With `--unknown-hosts deny`, only partner traffic gets through: other HTTP gets 403 from the
//! handler, other TLS an `access_denied` alert, anything else is closed.

pub mod detect;
pub(crate) mod io;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::detect::{First, HostPort};
use self::io::{Prefixed, Watched};
use crate::config::Integration;
use crate::proxy::UnknownHosts;
use crate::proxy::handler::Proxy;
use crate::proxy::server;
use crate::proxy::tunnel::{self, Refusal};
use crate::telemetry::metrics::InterceptLabels;
use crate::telemetry::spans::TunnelSpan;
use opentelemetry::KeyValue;

/// The transparent listener's flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Transparent listener for connections redirected by `setup-iptables` (off unless given;
    /// repeat it for an IPv6 address, e.g. `--transparent [::1]:15001`).
    #[arg(long, value_name = "ADDR")]
    pub transparent: Vec<SocketAddr>,
}

/// The bound transparent listeners, not yet serving.
#[derive(Debug)]
pub struct Listeners(Vec<TcpListener>);

/// The serving transparent listeners.
#[derive(Debug)]
pub struct Running(Vec<JoinHandle<()>>);

impl Listeners {
    /// Binds every `--transparent` address (none: nothing to do).
    pub async fn bind(flags: &Flags) -> anyhow::Result<Listeners> {
        let mut out = Vec::new();
        for addr in &flags.transparent {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--transparent {addr}: {e}"))?;
            out.push(l);
        }
        Ok(Listeners(out))
    }

    /// Serves each listener until its `shutdown` future resolves, then drains for at most
    /// `drain`.
    pub fn spawn<F, S>(self, proxy: Arc<Proxy>, shutdown: S, drain: Duration) -> Running
    where
        S: Fn() -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let tasks = self
            .0
            .into_iter()
            .map(|listener| {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(transparent = %addr, "transparent listener ready");
                }
                tokio::spawn(serve(listener, proxy.clone(), shutdown(), drain))
            })
            .collect();
        Running(tasks)
    }
}

impl Running {
    /// Waits until every listener has drained.
    pub async fn finish(self) {
        for t in self.0 {
            let _ = t.await;
        }
    }
}

/// Serves one transparent listener: at most `--max-connections` connections at once, each
/// handled by [`intercept`].
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "transparent listener has no address");
            return;
        }
    };
    let builder = Arc::new(server::http_builder(&proxy.options));
    let metrics = proxy.metrics.clone();
    let limit = proxy.options.max_connections;
    server::accept_loop(
        listener,
        metrics,
        limit,
        shutdown,
        drain,
        move |stream, peer, drain_rx| {
            intercept(
                proxy.clone(),
                builder.clone(),
                stream,
                peer,
                local,
                drain_rx,
            )
        },
    )
    .await;
}

/// What the transparent listener did with a connection, for `tollgate_intercepted_connections_total`.
#[derive(Debug, Clone, Copy)]
enum Handling {
    /// Served by the forward proxy's handler.
    Proxy,
    /// A partner's TLS, at L4.
    Tunnel,
    /// A partner's TLS, terminated with a leaf from the pod CA and served like HTTP.
    Intercept,
    Splice,
    Denied,
    Closed,
}

impl Handling {
    fn as_str(self) -> &'static str {
        match self {
            Handling::Proxy => "proxy",
            Handling::Tunnel => "tunnel",
            Handling::Intercept => "intercept",
            Handling::Splice => "splice",
            Handling::Denied => "denied",
            Handling::Closed => "closed",
        }
    }
}

fn count(proxy: &Proxy, protocol: &str, outcome: Handling) {
    proxy
        .metrics
        .intercepted
        .get_or_create(&InterceptLabels {
            protocol: protocol.to_string(),
            outcome: outcome.as_str().to_string(),
        })
        .inc();
}

/// The destination the app dialled, before the redirect.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| std::io::Error::other("the original destination is not an IP address"))
}

/// Handles one redirected connection from accept to close.
async fn intercept(
    proxy: Arc<Proxy>,
    builder: Arc<http1::Builder>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let orig = match original_dst(&stream) {
        Ok(o) if o != local => o,
        Ok(_) | Err(_) => {
            // Dialled directly, not redirected: there is nowhere to send it (and dialling our
            // own address would loop).
            count(&proxy, "none", Handling::Closed);
            tracing::warn!(%peer, "connection to the transparent listener was not redirected; closing");
            return;
        }
    };
    let max_head = proxy.options.max_header_bytes.max(8192);
    let limit = max_head.max(tls::PEEK_LIMIT);
    let (first, buf) = match tokio::time::timeout(
        proxy.options.header_read_timeout,
        peek(&mut stream, max_head, limit),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            count(&proxy, "none", Handling::Closed);
            tracing::debug!(%peer, %orig, error = %e, "redirected connection failed before it could be classified");
            return;
        }
        Err(_) => {
            count(&proxy, "none", Handling::Closed);
            tracing::debug!(%peer, %orig, "redirected connection sent no request head or ClientHello in time; closing");
            return;
        }
    };
    let deny = proxy.options.unknown_hosts == UnknownHosts::Deny;
    let app = Prefixed::new(buf, stream);
    match first {
        First::Http { host } => {
            let partner = host.as_ref().is_some_and(|h| is_partner(&proxy, h));
            if partner || deny {
                count(
                    &proxy,
                    "http",
                    if partner {
                        Handling::Proxy
                    } else {
                        Handling::Denied
                    },
                );
                serve_http(app, proxy, &builder, drain, peer).await;
            } else {
                count(&proxy, "http", Handling::Splice);
                let watched = {
                    let p = proxy.clone();
                    Watched::new(app, max_head, move |req| {
                        detect::request_host(req).is_some_and(|h| is_partner(&p, &h))
                    })
                };
                splice(watched, orig, proxy.options.passthrough_connect_timeout).await;
            }
        }
        First::HttpTooLarge => {
            // Its host cannot be read: the handler refuses it (431), as on --listen.
            count(&proxy, "http", Handling::Proxy);
            serve_http(app, proxy, &builder, drain, peer).await;
        }
        First::Tls { sni } => {
            let integration = sni
                .as_deref()
                .and_then(|name| proxy.store.load().find(name, Some(orig.port())).cloned());
            let host = sni.clone().unwrap_or_default();
            match integration {
                Some(i) if proxy.intercept.for_integration(&i).is_some() => {
                    count(&proxy, "tls", Handling::Intercept);
                    let interceptor = proxy.intercept.clone();
                    if let Some(ca) = interceptor.for_integration(&i) {
                        let client = Some(peer.ip());
                        crate::intercept::serve(app, ca, &host, proxy, Some(drain), client).await;
                    }
                }
                Some(i) => {
                    count(&proxy, "tls", Handling::Tunnel);
                    partner_tls(&proxy, i, app, orig, host).await;
                }
                None if deny => {
                    count(&proxy, "tls", Handling::Denied);
                    refuse_tls(app).await;
                }
                None => {
                    count(&proxy, "tls", Handling::Splice);
                    splice(app, orig, proxy.options.passthrough_connect_timeout).await;
                }
            }
        }
        // `peek` returns NeedMore never: it decides at the end of the stream or the limit.
        First::Opaque | First::NeedMore if deny => count(&proxy, "opaque", Handling::Denied),
        First::Opaque | First::NeedMore => {
            count(&proxy, "opaque", Handling::Splice);
            splice(app, orig, proxy.options.passthrough_connect_timeout).await;
        }
    }
}

fn is_partner(proxy: &Proxy, h: &HostPort) -> bool {
    proxy.store.load().find(&h.host, h.port).is_some()
}

/// Reads the first bytes until they tell what the connection is, keeping at most `limit`.
async fn peek(
    stream: &mut TcpStream,
    max_head: usize,
    limit: usize,
) -> std::io::Result<(First, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let want = chunk.len().min(limit - buf.len());
        let n = stream.read(&mut chunk[..want]).await?;
        buf.extend_from_slice(&chunk[..n]);
        let eof = n == 0 || buf.len() >= limit;
        match detect::detect(&buf, max_head, eof) {
            First::NeedMore => continue,
            first => return Ok((first, buf)),
        }
    }
}

async fn serve_http(
    app: Prefixed<TcpStream>,
    proxy: Arc<Proxy>,
    builder: &http1::Builder,
    drain: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    if let Err(e) = server::serve_connection(app, proxy, builder, drain, Some(peer.ip())).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Splices `app` to `orig`, untouched, until either side closes.
async fn splice<A>(mut app: A, orig: SocketAddr, connect_timeout: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(orig)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%orig, error = %e, "original destination unreachable");
            return;
        }
        Err(_) => {
            tracing::debug!(%orig, "original destination: connect timeout");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
        tracing::debug!(%orig, error = %e, "splice ended with an error");
    }
}

/// A partner's TLS: the L4 policies of a `CONNECT` tunnel, then a splice to where the app was
/// going.
async fn partner_tls(
    proxy: &Proxy,
    integration: Arc<Integration>,
    app: Prefixed<TcpStream>,
    orig: SocketAddr,
    sni: String,
) {
    let label = integration.label.to_string();
    // Ends when this function returns, with the tunnel.
    let span = TunnelSpan::start(|| {
        vec![
            KeyValue::new("tollgate.integration", label.clone()),
            KeyValue::new("tollgate.interception", "transparent"),
            KeyValue::new("server.address", sni.clone()),
            KeyValue::new("server.port", i64::from(orig.port())),
            KeyValue::new("network.peer.address", orig.ip().to_string()),
        ]
    });
    async {
        let refused = |refusal: &Refusal| {
            span.set("tollgate.reason", refusal.reason().as_str());
        };
        let _permit = match tunnel::admit(proxy, Some(&integration), &label) {
            Ok(p) => p,
            Err(refusal @ Refusal::KillSwitch(_)) => {
                refused(&refusal);
                let ks = &integration.policy.default_route.kill_switch;
                tracing::info!(reason = ks.reason.as_deref().unwrap_or(""), "kill switch is on: TLS connection refused");
                refuse_tls(app).await;
                return;
            }
            Err(refusal) => {
                refused(&refusal);
                tracing::warn!(limit = proxy.options.max_tunnels, "tunnel limit reached (--max-tunnels); closing");
                return;
            }
        };
        let connect_timeout = integration.policy.upstream.connect_timeout;
        let mut upstream = match tunnel::connect(proxy, &label, orig, connect_timeout).await {
            Ok(s) => s,
            Err(refusal) => {
                refused(&refusal);
                match refusal {
                    Refusal::Unreachable(e) => {
                        tracing::info!(error = %e, "partner unreachable; closing");
                    }
                    _ => {
                        tracing::info!(timeout = %tollgate_crds::duration::format(connect_timeout), "no connection to the partner in time; closing");
                    }
                }
                return;
            }
        };
        let mut app = app;
        if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
            tracing::debug!(error = %e, "tunnel closed with an error");
        }
    }
    .await;
}

/// Refuses a TLS connection with an `access_denied` alert, then lets the client read it: the
/// socket is half-closed and the client's remaining bytes are read (bounded) until it closes,
/// so the alert is not lost to a reset.
async fn refuse_tls(mut app: Prefixed<TcpStream>) {
    if app.write_all(&tls::ACCESS_DENIED_ALERT).await.is_err() {
        return;
    }
    let _ = app.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while left > 0 {
            match app.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
