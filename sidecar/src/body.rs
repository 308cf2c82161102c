//! Request and response bodies inside the proxy.
//!
//! A request body small enough to replay is buffered ([`ReqBody::Full`]) so the retry layer can
//! send it again; a larger one streams ([`ReqBody::Stream`]) and is never retried.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the app and the partner see as a response body.
pub(crate) type RespBody = UnsyncBoxBody<Bytes, BoxError>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> RespBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body received from a peer (hyper's, or the upstream pool's).
pub(crate) fn incoming<B>(body: B) -> RespBody
where
    B: Body<Data = Bytes, Error = hyper::Error> + Send + 'static,
{
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

/// A request body on its way to the partner.
#[derive(Debug)]
pub enum ReqBody {
    /// Buffered whole: replayable.
    Full(Bytes),
    /// Streaming, bounded by the body size limit: sent once.
    Stream {
        /// Bytes read before deciding to stream.
        prefix: Option<Bytes>,
        rest: Incoming,
        /// Bytes still allowed.
        remaining: u64,
    },
}

impl ReqBody {
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        ReqBody::Full(Bytes::new())
    }

    /// A copy for another attempt, if the body is replayable.
    pub(crate) fn try_clone(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Full(b) => Some(ReqBody::Full(b.clone())),
            ReqBody::Stream { .. } => None,
        }
    }
}

/// The body exceeded the size limit while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit")]
pub(crate) struct TooLarge;

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Full(b) => {
                if b.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(std::mem::take(b)))))
                }
            }
            ReqBody::Stream {
                prefix,
                rest,
                remaining,
            } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref() {
                            let n = d.len() as u64;
                            if n > *remaining {
                                return Poll::Ready(Some(Err(Box::new(TooLarge))));
                            }
                            *remaining -= n;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full(b) => b.is_empty(),
            ReqBody::Stream { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(b) => SizeHint::with_exact(b.len() as u64),
            ReqBody::Stream { prefix, rest, .. } => {
                let p = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    out.set_upper(u + p);
                }
                out
            }
        }
    }
}

/// Reads a request body: buffered whole when it fits `replay_limit`, else streamed (bounded by
/// `max`). Errors when the body is larger than `max` or the app's stream fails.
pub(crate) async fn prepare(
    mut body: Incoming,
    replay_limit: usize,
    max: u64,
) -> Result<ReqBody, BodyError> {
    let hint = body.size_hint();
    if let Some(exact) = hint.exact() {
        if exact > max {
            return Err(BodyError::TooLarge { limit: max });
        }
        if exact > replay_limit as u64 {
            return Ok(ReqBody::Stream {
                prefix: None,
                rest: body,
                remaining: max,
            });
        }
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() as u64 > max {
                return Err(BodyError::TooLarge { limit: max });
            }
            if buf.len() > replay_limit {
                let prefix = buf.freeze();
                let remaining = max - prefix.len() as u64;
                return Ok(ReqBody::Stream {
                    prefix: Some(prefix),
                    rest: body,
                    remaining,
                });
            }
        }
    }
    Ok(ReqBody::Full(buf.freeze()))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body failed: {0}")]
    Read(hyper::Error),
}

// === response bodies under the call's deadline ===

/// A response body was still streaming when `timeouts.total` passed; it was cut there.
#[derive(Debug, thiserror::Error)]
#[error("response body still streaming at the total deadline (timeouts.total); cut")]
pub(crate) struct BodyTimeout;

/// Whether a response body error is the total deadline cutting it.
pub(crate) fn is_body_timeout(e: &BoxError) -> bool {
    e.is::<BodyTimeout>()
}

/// Cuts `body` at `deadline`: from then on it yields [`BodyTimeout`] and ends. The app's
/// connection then closes (the status line is already sent), which is how the app learns the
/// response is incomplete.
pub(crate) fn with_deadline(body: RespBody, deadline: tokio::time::Instant) -> RespBody {
    if body.is_end_stream() {
        return body;
    }
    Deadline {
        inner: body,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        cut: false,
    }
    .boxed_unsync()
}

struct Deadline {
    inner: RespBody,
    sleep: Pin<Box<tokio::time::Sleep>>,
    cut: bool,
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.cut {
            return Poll::Ready(None);
        }
        // The deadline first: a partner that keeps sending must not outrun it.
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.cut = true;
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// Every byte was delivered, or the app stopped reading (the body was dropped).
    Done,
    /// Cut at the total deadline.
    Timeout,
    /// The partner's stream broke.
    Failed,
}

/// Calls `on_end` once, when `body` ends, fails or is dropped: what happens after the response
/// head (the breaker and the call's metrics) is recorded only then.
pub(crate) fn on_end(body: RespBody, on_end: impl FnOnce(BodyEnd) + Send + 'static) -> RespBody {
    OnEnd {
        inner: body,
        on_end: Some(Box::new(on_end)),
    }
    .boxed_unsync()
}

type EndHook = Box<dyn FnOnce(BodyEnd) + Send>;

struct OnEnd {
    inner: RespBody,
    on_end: Option<EndHook>,
}

impl OnEnd {
    fn fire(&mut self, end: BodyEnd) {
        if let Some(f) = self.on_end.take() {
            f(end);
        }
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        self.fire(BodyEnd::Done);
    }
}

impl Body for OnEnd {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.fire(BodyEnd::Done),
            Poll::Ready(Some(Err(e))) => {
                let end = if is_body_timeout(e) {
                    BodyEnd::Timeout
                } else {
                    BodyEnd::Failed
                };
                self.fire(end);
            }
            Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
