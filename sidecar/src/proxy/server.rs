//! Accept loop: connection limit, request-head limits and timeout, graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::ProxyOptions;
use super::handler::Proxy;
use super::sniff::{SniffIo, Verdicts};
use crate::telemetry::metrics::Metrics;

/// Serves the outbound listener until `shutdown` resolves, then drains open connections for at
/// most `drain`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let builder = http_builder(&proxy.options);
    let limit = proxy.options.max_connections;
    let metrics = proxy.metrics.clone();
    accept_loop(
        listener,
        metrics,
        limit,
        shutdown,
        drain,
        move |stream, peer, drain_rx| {
            let _ = stream.set_nodelay(true);
            let conn = serve_connection(stream, proxy.clone(), &builder, drain_rx, Some(peer.ip()));
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
        },
    )
    .await;
}

/// Accepts connections until `shutdown` resolves and runs `handle` on each, at most
/// `max_connections` at once (more are closed at accept and counted, and so are those that
/// come while the process is out of file descriptors); then stops accepting,
/// tells every connection to finish through the `drain` receiver it was given, and waits for
/// them at most `drain`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    // Flipped to true once: every connection then finishes its request in flight and closes.
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut spare = SpareFd::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if out_of_fds(&e) => {
                    if !spare.refuse_one(&listener, &metrics).await {
                        // Nothing to give up: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.rejected_connections.inc();
            tracing::warn!(%peer, limit = max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let conn = handle(stream, peer, drain_rx.clone());
        let metrics = metrics.clone();
        metrics.open_connections.inc();
        tokio::spawn(async move {
            conn.await;
            metrics.open_connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("draining open connections");
    let _ = drain_tx.send(true);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}

/// `EMFILE` and `ENFILE` (Linux): the process or the system is out of file descriptors.
fn out_of_fds(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// One file descriptor held in reserve. Out of descriptors, a connection the kernel completed
/// would wait in the listen backlog, the app hanging on it; instead the spare is given up to
/// accept that connection and close it at once (counted in `tollgate_rejected_connections`,
/// logged at most once a second), then taken back.
struct SpareFd {
    fd: Option<std::fs::File>,
    refused: u64,
    logged: Option<tokio::time::Instant>,
}

impl SpareFd {
    fn new() -> SpareFd {
        SpareFd {
            fd: std::fs::File::open("/dev/null").ok(),
            refused: 0,
            logged: None,
        }
    }

    /// Accepts and closes one waiting connection with the spare descriptor; false when there
    /// was no spare (still out of descriptors) or no connection to take.
    async fn refuse_one(&mut self, listener: &TcpListener, metrics: &Metrics) -> bool {
        if self.fd.take().is_none() {
            self.fd = std::fs::File::open("/dev/null").ok();
            return false;
        }
        let taken = tokio::time::timeout(Duration::from_millis(10), listener.accept()).await;
        let refused = matches!(taken, Ok(Ok(_)));
        // The accepted stream is dropped here: closed before a byte is read.
        drop(taken);
        self.fd = std::fs::File::open("/dev/null").ok();
        if refused {
            metrics.rejected_connections.inc();
            self.refused += 1;
            let now = tokio::time::Instant::now();
            if self
                .logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                tracing::warn!(
                    refused = self.refused,
                    "out of file descriptors: closing new connections until some are free"
                );
                self.logged = Some(now);
                self.refused = 0;
            }
        }
        refused
    }
}

/// The HTTP/1.1 server settings of every app connection: head size limit and read timeout,
/// keep-alive.
pub fn http_builder(options: &ProxyOptions) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // Room past the limit: the smuggling guard sees a head outgrow it first and answers
        // with the contract's 400 (hyper would answer a bare 431).
        .max_buf_size(options.max_header_bytes.max(8192) + 4096)
        .keep_alive(true);
    builder
}

/// Serves one app connection: every request through [`Proxy::handle`], behind the smuggling
/// guard. Once `drain` turns true, the next response (the one in flight, or the answer to the
/// next request on an idle keep-alive connection) carries `Connection: close` and the
/// connection closes after it. An idle connection is never closed under the app's feet while
/// it may be sending its next request: the accept loop's drain deadline ends the ones that
/// stay silent.
pub fn serve_connection<I>(
    io: I,
    proxy: Arc<Proxy>,
    builder: &http1::Builder,
    drain: watch::Receiver<bool>,
    client: Option<std::net::IpAddr>,
) -> impl Future<Output = Result<(), hyper::Error>> + Send + use<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let verdicts = Verdicts::default();
    let io = TokioIo::new(SniffIo::new(
        io,
        proxy.options.max_header_bytes,
        verdicts.clone(),
    ));
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        let verdict = verdicts.next();
        if let Some(ip) = client {
            req.extensions_mut().insert(super::ClientAddr(ip));
        }
        let p = proxy.clone();
        let drain = drain.clone();
        // A CONNECT answer opens a tunnel: it must not announce a close.
        let tunnel = req.method() == http::Method::CONNECT;
        async move {
            let mut resp = p.handle(req, verdict).await;
            if *drain.borrow() && !tunnel {
                // hyper closes the connection once this response is written.
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    builder.serve_connection(io, service).with_upgrades()
}
