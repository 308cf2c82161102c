//! A TCP server on loopback that speaks whatever the test writes: for partners that misbehave
//! below HTTP (never answer, reset, stall a body, answer garbage), which a real HTTP server
//! cannot be made to do.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// A server that hands each accepted connection to a handler of the test's; stops (and drops
/// every connection) on drop.
pub struct TcpServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpServer {
    /// Listens on 127.0.0.1 and runs `serve(connection)` for each connection accepted.
    pub async fn start<F, Fut>(serve: F) -> TcpServer
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::start_on(listener, serve)
    }

    /// [`TcpServer::start`] on `listener` (bound wherever the test needs). Call it within a
    /// tokio runtime.
    pub fn start_on<F, Fut>(listener: TcpListener, serve: F) -> TcpServer
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so they end with the server.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve(s));
            }
        });
        TcpServer {
            addr,
            accepted,
            task,
        }
    }

    /// `http://ADDR`, for `spec.upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Reads from `s` into `buf` until `buf` holds a complete HTTP head (`\r\n\r\n`); returns the
/// head's length (where a body would start), or `None` when the peer closed first.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn each_connection_gets_the_handler_and_is_counted() {
        let server = TcpServer::start(|mut s| async move {
            let mut buf = Vec::new();
            if let Some(end) = read_head(&mut s, &mut buf).await {
                let _ = s.write_all(format!("head of {end} bytes").as_bytes()).await;
            }
        })
        .await;
        for _ in 0..2 {
            let got = crate::http::raw(
                server.addr,
                b"GET / HTTP/1.1\r\n\r\n",
                std::time::Duration::from_secs(5),
            )
            .await;
            assert_eq!(got, "head of 18 bytes");
        }
        assert_eq!(server.accepted(), 2);
    }
}
