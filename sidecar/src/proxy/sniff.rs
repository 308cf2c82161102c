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

/// Verdicts waiting for their request at most. hyper reads at most its buffer ahead of the
/// request it serves, and a head is at least 16 bytes, so a connection that hyper still serves
/// never has this many.
pub const MAX_PENDING_VERDICTS: usize = 16 * 1024;

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

    /// Queues `v`; false (and nothing queued) when [`MAX_PENDING_VERDICTS`] are waiting.
    fn push(&self, v: Verdict) -> bool {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_PENDING_VERDICTS {
            return false;
        }
        q.push_back(v);
        true
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Fixed(u64),
    Chunk(Chunk),
    /// CONNECT, an upgrade (unless followed), a head unparsable or a length hyper refuses:
    /// hyper decides from here.
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
    /// Whether an `Upgrade` request is framed like any other (hyper's view, where the next
    /// request follows unless the answer is 101) rather than ending what is followed.
    follow_upgrades: bool,
}

impl Framer {
    pub fn new(max_head: usize, verdicts: Verdicts) -> Self {
        Framer {
            state: State::Head(Vec::new()),
            max_head,
            verdicts,
            hook: None,
            follow_upgrades: false,
        }
    }

    /// Frames `Upgrade` requests like any other, as hyper's server does until it answers 101
    /// (after which it calls no handler again and the verdicts are never taken).
    pub fn following_upgrades(mut self) -> Self {
        self.follow_upgrades = true;
        self
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
        // A Content-Length hyper refuses (not digits, or two that differ): hyper answers 400
        // and closes; nothing after it is a request.
        let mut bad_length = false;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                match (digits(h.value), content_length) {
                    (Some(n), None) => content_length = Some(n),
                    (Some(n), Some(prev)) if n == prev => {}
                    _ => bad_length = true,
                }
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
        let verdict = if te && (content_length.is_some() || bad_length) {
            Verdict::LengthAndChunked
        } else {
            Verdict::Ok
        };
        if !self.verdicts.push(verdict) {
            // Nobody takes verdicts this far ahead (hyper reads a bounded buffer ahead of the
            // request it serves): the connection was upgraded; stop following it.
            return State::Off;
        }
        if req.method == Some("CONNECT") || (upgrade && !self.follow_upgrades) {
            return State::Off;
        }
        if te {
            if chunked {
                State::Chunk(Chunk::Size(0))
            } else {
                State::Off
            }
        } else if bad_length {
            State::Off
        } else {
            match content_length {
                Some(0) | None => State::Head(Vec::new()),
                Some(n) => State::Fixed(n),
            }
        }
    }
}

/// A Content-Length value as hyper reads it: ASCII digits only, no sign, no overflow.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// Where the head in `buf` ends: after its first empty line, with the line endings the parser
/// accepts (CRLF or a bare LF, mixed as they come). The request line is never empty: leading
/// empty lines are skipped before.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let lf = from + i;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => from = lf + 1,
        }
    }
    None
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
            framer: Framer::new(max_head, verdicts).following_upgrades(),
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

    #[test]
    fn bare_lf_heads_are_framed_like_crlf_heads() {
        use Verdict::*;
        // PIPELINE with bare-LF heads (chunked framing stays CRLF, as hyper's decoder requires).
        let lf: &[u8] = b"POST /a HTTP/1.1\nHost: x\nContent-Length: 5\n\nhello\
GET /b HTTP/1.1\nHost: x\n\n\
POST /c HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\r\n5;ext=1\r\nGET /\r\n0\r\nX-Trailer: 1\r\n\r\n\
POST /d HTTP/1.1\nHost: x\r\nContent-Length: 3\nTransfer-Encoding: chunked\n\n3\r\nabc\r\n0\r\n\r\n\
GET /e HTTP/1.1\nHost: x\n\n";
        for split in [1, 2, 3, 7, 16, 1000] {
            assert_eq!(
                verdicts_of(lf, split),
                vec![Ok, Ok, Ok, LengthAndChunked, Ok],
                "split {split}"
            );
        }
    }

    #[test]
    fn head_ends_where_the_parser_sees_an_empty_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\n\r\n"), Some(23));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r"), None);
    }

    #[test]
    fn content_lengths_are_read_as_hyper_reads_them() {
        assert_eq!(digits(b"42"), Some(42));
        for bad in [
            &b""[..],
            b"+4",
            b"-1",
            b"4, 4",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(digits(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // Refused by hyper (and the connection closed): its body is not a request.
        let s = b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts_of(s, 3), vec![Verdict::Ok]);
        let s = b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde";
        assert_eq!(verdicts_of(s, 3), vec![Verdict::Ok]);
        // The same length twice is one length.
        let s = b"POST / HTTP/1.1\r\nContent-Length: 4\r\ncontent-length: 4\r\n\r\nabcdGET / HTTP/1.1\r\n\r\n";
        assert_eq!(verdicts_of(s, 3), vec![Verdict::Ok, Verdict::Ok]);
        // An invalid length beside Transfer-Encoding is still both.
        let s = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n";
        assert_eq!(verdicts_of(s, 3), vec![Verdict::LengthAndChunked]);
    }

    #[test]
    fn an_upgrade_request_is_framed_like_any_other_on_the_listener() {
        let s = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let v = Verdicts::default();
        let mut f = Framer::new(1024, v.clone()).following_upgrades();
        f.feed(s);
        assert_eq!(
            (v.next(), v.next()),
            (Verdict::Ok, Verdict::LengthAndChunked)
        );
    }

    #[test]
    fn verdicts_nobody_takes_are_bounded() {
        let v = Verdicts::default();
        let mut f = Framer::new(1024, v.clone());
        let head = b"GET / HTTP/1.1\n\n";
        for _ in 0..MAX_PENDING_VERDICTS + 100 {
            f.feed(head);
        }
        assert_eq!(v.0.lock().unwrap().len(), MAX_PENDING_VERDICTS);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const NAMES: &[&str] = &[
            "Content-Length",
            "content-length",
            "Transfer-Encoding",
            "transfer-encoding",
            "Host",
            "Upgrade",
            "X-Other",
        ];
        const VALUES: &[&str] = &["4", "0", "chunked", "gzip, chunked", "x", "4, 4", "+4", ""];

        fn header() -> impl Strategy<Value = (usize, usize, bool)> {
            (0..NAMES.len(), 0..VALUES.len(), any::<bool>())
        }

        /// A request whose head has `headers` with the given line endings (`true`: bare LF),
        /// then the same body and a second request whatever the endings.
        fn stream(headers: &[(usize, usize, bool)], lf_start: bool, lf_end: bool) -> Vec<u8> {
            let eol = |lf: bool| if lf { "\n" } else { "\r\n" };
            let mut s = format!("POST /a HTTP/1.1{}", eol(lf_start));
            for (n, v, lf) in headers {
                s.push_str(&format!("{}: {}{}", NAMES[*n], VALUES[*v], eol(*lf)));
            }
            s.push_str(eol(lf_end));
            s.push_str("0\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
            s.into_bytes()
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..2048),
                split in 1usize..64,
                max_head in 0usize..512,
            ) {
                let v = Verdicts::default();
                let mut f = Framer::new(max_head, v.clone()).following_upgrades();
                for piece in bytes.chunks(split) {
                    f.feed(piece);
                }
                while v.0.lock().unwrap().pop_front().is_some() {}
            }

            #[test]
            fn arbitrary_heads_never_panic(
                headers in proptest::collection::vec(header(), 0..12),
                junk in proptest::collection::vec(any::<u8>(), 0..64),
                split in 1usize..32,
            ) {
                let mut s = stream(&headers, false, false);
                s.splice(10..10, junk);
                verdicts_of(&s, split);
            }

            #[test]
            fn crlf_and_bare_lf_heads_are_classified_alike(
                headers in proptest::collection::vec(header(), 0..8),
                lf_start in any::<bool>(),
                lf_end in any::<bool>(),
                split in 1usize..32,
            ) {
                let crlf: Vec<_> = headers.iter().map(|(n, v, _)| (*n, *v, false)).collect();
                let expected = verdicts_of(&stream(&crlf, false, false), 1000);
                let mixed = verdicts_of(&stream(&headers, lf_start, lf_end), split);
                prop_assert_eq!(&mixed, &expected);
                // And the first verdict is the guard's rule: a length beside a transfer coding.
                let has = |name: &str| headers.iter().any(|(n, _, _)| NAMES[*n].eq_ignore_ascii_case(name));
                let both = has("content-length") && has("transfer-encoding");
                prop_assert_eq!(
                    expected.first() == Some(&Verdict::LengthAndChunked),
                    both
                );
            }
        }
    }
}
