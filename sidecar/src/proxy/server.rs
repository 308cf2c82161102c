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
            let conn = serve_connection(stream, proxy.clone(), &builder, drain_rx);
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
/// `max_connections` at once (more are closed at accept and counted); then stops accepting,
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
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
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
/// guard. Once `drain` turns true the request in flight finishes and the connection closes.
pub fn serve_connection<I>(
    io: I,
    proxy: Arc<Proxy>,
    builder: &http1::Builder,
    mut drain: watch::Receiver<bool>,
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
    let service = service_fn(move |req| {
        let verdict = verdicts.next();
        let p = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(p.handle(req, verdict).await) }
    });
    let conn = builder.serve_connection(io, service).with_upgrades();
    async move {
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }
}
