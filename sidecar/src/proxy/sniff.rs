//! Request-smuggling guard.
//!
//! hyper accepts a request carrying both `Content-Length` and `Transfer-Encoding` (it drops
//! the length and reads chunks), but such a request is how smuggling attacks start, and the
//! contract is to refuse it with 400 and forward nothing. hyper removes the evidence before the
//! service sees the request, so this wrapper watches the bytes the app sends, follows the
//! HTTP/1.1 framing (heads, fixed-length and chunked bodies), and queues one verdict per request
//! head, in order; the service takes the verdict for each request it handles.
//!
//! It also answers a request head over the size limit itself (400 `bad-request`, with the
//! contract's header and JSON body) and closes the connection; left to hyper, that would be a
//! bare 431 an app could not tell from the partner's.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::answer::{Answer, Reason};

/// What the guard saw in one request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
}

/// Verdicts shared between the connection's reader and its request handler.
#[derive(Debug, Clone, Default)]
pub struct Verdicts(Arc<Mutex<VecDeque<Verdict>>>);

impl Verdicts {
    /// The verdict for the next request (Ok when the guard stopped following the stream).
    pub fn next(&self) -> Verdict {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or(Verdict::Ok)
    }

    /// Drops the verdicts nobody will take (a spliced connection has no request handler).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn push(&self, v: Verdict) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(v);
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    Chunk(Chunk),
    /// CONNECT, upgrades, or a head unparsable: hyper decides from here.
    Off,
    /// A head grew past the limit without ending: nothing more is followed.
    TooLarge,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading the hex size; the value so far.
    Size(u64),
    /// Skipping chunk extensions to the end of the size line.
    Ext(u64),
    /// Expecting LF after the size line's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines; `true` when the current line is empty so far.
    Trailer(bool),
    TrailerLf(bool),
}

/// Sees every complete request head, in order (the transparent listener watches the requests
/// of the connections it splices through one).
pub struct HeadHook(Box<dyn FnMut(&httparse::Request<'_, '_>) + Send>);

impl std::fmt::Debug for HeadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeadHook")
    }
}

/// Follows the framing of a stream of requests.
#[derive(Debug)]
pub struct Framer {
    state: State,
    max_head: usize,
    verdicts: Verdicts,
    hook: Option<HeadHook>,
}

impl Framer {
    pub fn new(max_head: usize, verdicts: Verdicts) -> Self {
        Framer {
            state: State::Head(Vec::new()),
            max_head,
            verdicts,
            hook: None,
        }
    }

    /// Also calls `hook` with every complete request head.
    pub fn with_hook(
        mut self,
        hook: impl FnMut(&httparse::Request<'_, '_>) + Send + 'static,
    ) -> Self {
        self.hook = Some(HeadHook(Box::new(hook)));
        self
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off | State::TooLarge => return,
                State::Fixed(n) => {
                    let take = (*n).min(data.len() as u64) as usize;
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::Head(buf) => {
                    // Leading CRLFs between requests are allowed and ignored.
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        // The common case: the whole head came in this read. Parse it where it
                        // lies instead of copying it into the buffer first.
                        if let Some(end) = find_head_end(data) {
                            self.state = self.on_head(&data[..end]);
                            data = &data[end..];
                            continue;
                        }
                    }
                    let before = buf.len();
                    buf.extend_from_slice(data);
                    let search_from = before.saturating_sub(3);
                    match find_head_end(&buf[search_from..]) {
                        Some(end) => {
                            let head_len = search_from + end;
                            let consumed = head_len - before;
                            let head = std::mem::take(buf);
                            data = &data[consumed..];
                            self.state = self.on_head(&head[..head_len]);
                        }
                        None => {
                            if buf.len() > self.max_head {
                                self.state = State::TooLarge;
                            }
                            return;
                        }
                    }
                }
                State::Chunk(c) => {
                    let b = data[0];
                    let mut consumed = 1;
                    let next = match *c {
                        Chunk::Size(v) => match hex(b) {
                            Some(d) => Some(Chunk::Size(v.saturating_mul(16).saturating_add(d))),
                            None if b == b';' || b == b' ' || b == b'\t' => Some(Chunk::Ext(v)),
                            None if b == b'\r' => Some(Chunk::SizeLf(v)),
                            None => None,
                        },
                        Chunk::Ext(v) => Some(if b == b'\r' {
                            Chunk::SizeLf(v)
                        } else {
                            Chunk::Ext(v)
                        }),
                        Chunk::SizeLf(v) if b == b'\n' => Some(if v == 0 {
                            Chunk::Trailer(true)
                        } else {
                            Chunk::Data(v)
                        }),
                        Chunk::Data(n) => {
                            let take = n.min(data.len() as u64);
                            consumed = take as usize;
                            Some(if n == take {
                                Chunk::DataCr
                            } else {
                                Chunk::Data(n - take)
                            })
                        }
                        Chunk::DataCr if b == b'\r' => Some(Chunk::DataLf),
                        Chunk::DataLf if b == b'\n' => Some(Chunk::Size(0)),
                        Chunk::Trailer(empty) => Some(if b == b'\r' {
                            Chunk::TrailerLf(empty)
                        } else {
                            Chunk::Trailer(false)
                        }),
                        Chunk::TrailerLf(empty) if b == b'\n' => {
                            if empty {
                                self.state = State::Head(Vec::new());
                                data = &data[1..];
                                continue;
                            }
                            Some(Chunk::Trailer(true))
                        }
                        _ => None,
                    };
                    data = &data[consumed..];
                    match next {
                        Some(n) => *c = n,
                        // Malformed chunking: hyper will refuse it; stop following.
                        None => self.state = State::Off,
                    }
                }
            }
        }
    }

    /// A request head passed the limit without ending.
    pub fn head_too_large(&self) -> bool {
        matches!(self.state, State::TooLarge)
    }

    /// A complete head: shown to the hook and judged; then, if it is over the limit, nothing
    /// more is followed.
    fn on_head(&mut self, head: &[u8]) -> State {
        let next = self.judge_head(head);
        if head.len() > self.max_head {
            State::TooLarge
        } else {
            next
        }
    }

    fn judge_head(&mut self, head: &[u8]) -> State {
        // Uninitialised slots: zeroing 128 headers (4 KiB) per request showed in the profile.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return State::Off,
        }
        if let Some(hook) = &mut self.hook {
            (hook.0)(&req);
        }
        let mut content_length: Option<u64> = None;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .or(Some(0));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = std::str::from_utf8(h.value)
                    .map(|v| {
                        v.rsplit(',')
                            .next()
                            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
                    })
                    .unwrap_or(false);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let verdict = if te && content_length.is_some() {
            Verdict::LengthAndChunked
        } else {
            Verdict::Ok
        };
        self.verdicts.push(verdict);
        if req.method == Some("CONNECT") || upgrade {
            return State::Off;
        }
        if te {
            if chunked {
                State::Chunk(Chunk::Size(0))
            } else {
                State::Off
            }
        } else {
            match content_length {
                Some(0) | None => State::Head(Vec::new()),
                Some(n) => State::Fixed(n),
            }
        }
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// An app connection whose incoming bytes pass through a [`Framer`].
pub struct SniffIo<T> {
    inner: T,
    framer: Framer,
    /// The answer to a head over the limit, once one was.
    refusal: Option<Refusal>,
}

/// Answering a head over the limit below hyper: write the answer, end our side, then read and
/// drop what the app still sends (closing with unread bytes would reset the connection and
/// could destroy the answer before the app reads it), and only then end the stream for hyper.
struct Refusal {
    answer: Vec<u8>,
    written: usize,
    shut: bool,
    drained: usize,
}

/// How much the app may still send after the answer before the connection is dropped anyway.
const REFUSAL_DRAIN_LIMIT: usize = 1 << 20;

impl<T> SniffIo<T> {
    pub fn new(inner: T, max_head: usize, verdicts: Verdicts) -> Self {
        SniffIo {
            inner,
            framer: Framer::new(max_head, verdicts),
            refusal: None,
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for SniffIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.framer.feed(new);
                if this.framer.head_too_large() {
                    // hyper never sees the head: it gets our answer's end of stream instead.
                    buf.set_filled(before);
                    let answer = Answer::new(
                        Reason::BadRequest,
                        format!(
                            "request head over {} bytes (--max-header-bytes); nothing was sent to the partner",
                            this.framer.max_head
                        ),
                    );
                    this.refusal = Some(Refusal {
                        answer: answer.to_http1_closing(),
                        written: 0,
                        shut: false,
                        drained: 0,
                    });
                    return this.poll_refusal(cx);
                }
            }
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> SniffIo<T> {
    /// Drives the [`Refusal`]; ready (with nothing read: the end of the stream, after which
    /// hyper closes the connection without answering the head it never got) once it is done.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = &mut self.refusal else {
            return Poll::Ready(Ok(()));
        };
        let mut inner = Pin::new(&mut self.inner);
        while r.written < r.answer.len() {
            match inner.as_mut().poll_write(cx, &r.answer[r.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => r.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !r.shut {
            std::task::ready!(inner.as_mut().poll_shutdown(cx))?;
            r.shut = true;
        }
        let mut scratch = [0u8; 4096];
        while r.drained < REFUSAL_DRAIN_LIMIT {
            let mut sink = ReadBuf::new(&mut scratch);
            std::task::ready!(inner.as_mut().poll_read(cx, &mut sink))?;
            if sink.filled().is_empty() {
                break;
            }
            r.drained += sink.filled().len();
        }
        Poll::Ready(Ok(()))
    }
}

crate::io::write_through!(SniffIo);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_over_the_limit_stops_the_framer_whether_it_ends_or_not() {
        let head = |n: usize| format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(n));
        for split in [1, 100, 100_000] {
            let fits = Verdicts::default();
            let mut f = Framer::new(1024, fits.clone());
            for piece in head(900).as_bytes().chunks(split) {
                f.feed(piece);
            }
            assert!(!f.head_too_large(), "split {split}");
            assert_eq!(fits.next(), Verdict::Ok);

            // Over the limit and complete: nothing more is followed; a head that arrived whole
            // in one read is still shown to the hook first (the splice guard's partner check).
            let seen = Arc::new(Mutex::new(0));
            let s = seen.clone();
            let mut f = Framer::new(1024, Verdicts::default()).with_hook(move |_| {
                *s.lock().unwrap() += 1;
            });
            for piece in head(2000).as_bytes().chunks(split) {
                f.feed(piece);
            }
            assert!(f.head_too_large(), "split {split}");
            if split > 2000 {
                assert_eq!(*seen.lock().unwrap(), 1);
            }

            // Over the limit and not ended.
            let mut f = Framer::new(1024, Verdicts::default());
            for piece in "GET / HTTP/1.1\r\nX: "
                .bytes()
                .chain(std::iter::repeat_n(b'a', 2000))
                .collect::<Vec<u8>>()
                .chunks(split)
            {
                f.feed(piece);
            }
            assert!(f.head_too_large(), "split {split}");
        }
    }

    fn verdicts_of(stream: &[u8], split: usize) -> Vec<Verdict> {
        let v = Verdicts::default();
        let mut f = Framer::new(64 * 1024, v.clone());
        // Feed in pieces of `split` bytes: framing must not depend on read boundaries.
        for piece in stream.chunks(split.max(1)) {
            f.feed(piece);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().unwrap().pop_front() {
            out.push(x);
        }
        out
    }

    const PIPELINE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nGET /\r\n0\r\nX-Trailer: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /e HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn one_verdict_per_request_whatever_the_read_sizes() {
        use Verdict::*;
        for split in [1, 2, 3, 7, 16, 1000] {
            assert_eq!(
                verdicts_of(PIPELINE, split),
                vec![Ok, Ok, Ok, LengthAndChunked, Ok],
                "split {split}"
            );
        }
    }

    #[test]
    fn body_bytes_that_look_like_a_request_are_not_heads() {
        let s = b"POST / HTTP/1.1\r\nContent-Length: 60\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        assert_eq!(verdicts_of(s, 5), vec![Verdict::Ok]);
    }

    #[test]
    fn connect_stops_following() {
        let s = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdicts_of(s, 4), vec![Verdict::Ok]);
    }
}
