//! Accept loop: connection limit, request-head limits and timeout, graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::handler::Proxy;
use super::sniff::{SniffIo, Verdicts};

/// Serves the outbound listener until `shutdown` resolves, then drains open connections for at
/// most `drain`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(proxy.options.max_connections));
    // Flipped to true once: every connection then finishes its request in flight and closes.
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.options.header_read_timeout)
        .max_buf_size(proxy.options.max_header_bytes.max(8192))
        .keep_alive(true);
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
            proxy.metrics.rejected_connections.inc();
            tracing::warn!(%peer, limit = proxy.options.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let verdicts = Verdicts::default();
        let io = TokioIo::new(SniffIo::new(
            stream,
            proxy.options.max_header_bytes,
            verdicts.clone(),
        ));
        let p = proxy.clone();
        let service = service_fn(move |req| {
            let verdict = verdicts.next();
            let p = p.clone();
            async move { Ok::<_, std::convert::Infallible>(p.handle(req, verdict).await) }
        });
        let conn = builder.serve_connection(io, service).with_upgrades();
        let metrics = proxy.metrics.clone();
        metrics.open_connections.inc();
        let mut drain = drain_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            metrics.open_connections.dec();
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("draining open connections");
    let _ = drain_tx.send(true);
    let all = u32::try_from(proxy.options.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain) => tracing::warn!("drain deadline passed; closing remaining connections"),
    }
}
