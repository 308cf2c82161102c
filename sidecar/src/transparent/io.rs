//! Connection wrappers: replaying the bytes read to classify a connection, and watching the
//! requests of a spliced plaintext connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::proxy::sniff::{Framer, Verdicts};

/// A connection whose first bytes were already read: reads return them first, then the rest
/// of the stream, so whoever reads next sees the connection from its first byte.
#[derive(Debug)]
pub(crate) struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub(crate) fn new(prefix: Vec<u8>, inner: T) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::io::write_through!(Prefixed);

/// The app side of a spliced plaintext HTTP connection. It follows the request framing (the
/// smuggling guard's [`Framer`]) and shows every request head to `is_partner`; the read that
/// completes a head naming a partner fails instead of returning, so that request is never
/// forwarded and the splice ends. The guard stops following where the framer does: after an
/// upgrade or a `CONNECT`, or at a head it cannot parse within the head limit.
pub(crate) struct Watched<T> {
    inner: T,
    framer: Framer,
    verdicts: Verdicts,
    tripped: Arc<AtomicBool>,
}

impl<T> Watched<T> {
    pub(crate) fn new(
        inner: T,
        max_head: usize,
        is_partner: impl Fn(&httparse::Request<'_, '_>) -> bool + Send + 'static,
    ) -> Self {
        let verdicts = Verdicts::default();
        let tripped = Arc::new(AtomicBool::new(false));
        let t = tripped.clone();
        let framer = Framer::new(max_head, verdicts.clone()).with_hook(move |req| {
            if is_partner(req) {
                t.store(true, Ordering::Relaxed);
            }
        });
        Watched {
            inner,
            framer,
            verdicts,
            tripped,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.framer.feed(&buf.filled()[before..]);
            // Nobody handles these requests here; only the hook's view matters.
            this.verdicts.clear();
            if this.tripped.load(Ordering::Relaxed) {
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "a request on a spliced connection names a partner host",
                )));
            }
        }
        r
    }
}

crate::io::write_through!(Watched);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_prefix_is_read_first_then_the_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn a_partner_request_head_ends_the_stream_before_it_is_read() {
        let (mut app, side) = tokio::io::duplex(1024);
        let mut w = Watched::new(side, 1024, |req| {
            super::super::detect::request_host(req).is_some_and(|h| h.host == "partner.test")
        });
        let first = b"POST /a HTTP/1.1\r\nHost: other.test\r\nContent-Length: 30\r\n\r\nHost: partner.test\r\n\r\nxxxxxxxx";
        app.write_all(first).await.unwrap();
        let mut got = vec![0; first.len()];
        w.read_exact(&mut got).await.unwrap();
        assert_eq!(
            &got[..],
            &first[..],
            "a body that looks like a head is a body"
        );
        app.write_all(b"GET /b HTTP/1.1\r\nHost: other.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0; 256];
        let n = w.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /b HTTP/1.1\r\nHost: other.test\r\n\r\n");
        app.write_all(b"GET /c HTTP/1.1\r\nHost: Partner.Test\r\n\r\n")
            .await
            .unwrap();
        let err = w.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }
}
