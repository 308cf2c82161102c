//! The upstream client: a small HTTP/1.1 connection pool on hyper's `client::conn::http1`,
//! over plain TCP or rustls.
//!
//! Connections are keyed by (scheme, host, port). A call takes the most recently used idle
//! connection that is still usable, else dials one; the connect deadline covers DNS, TCP and
//! the TLS handshake together. A connection goes back to the pool only once its response body
//! was read to the end and hyper still reports it usable. At most `max_per_host` connections
//! (in use and idle) are open per key: beyond it a call waits for one to come back or close,
//! within its own deadline. An idle connection closes after `idle_timeout`, and with a `ttl` a
//! connection older than it is not reused; a reaper task closes such connections while idle.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::body::{BoxError, ReqBody};
use crate::client::ConnectTimeout;

/// Pool settings shared by every integration's client.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// An idle connection is closed after this long.
    pub idle_timeout: Duration,
    /// Idle connections kept per (scheme, host, port).
    pub max_idle_per_host: usize,
    /// Connections open per (scheme, host, port), in use and idle; at least 1.
    pub max_per_host: usize,
    /// A connection older than this is not reused.
    pub ttl: Option<Duration>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            idle_timeout: Duration::from_secs(90),
            max_idle_per_host: 64,
            max_per_host: 1024,
            ttl: None,
        }
    }
}

/// Why a call through the pool failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made: DNS, TCP, TLS or the connect deadline.
    #[error("connect error")]
    Connect(#[source] BoxError),
    /// The request has no `http` or `https` URL with a host.
    #[error("request URL {0:?} has no http(s) scheme and host")]
    Target(String),
    /// The connection failed while the request was sent or the response head read.
    #[error("request failed")]
    Send(#[source] hyper::Error),
}

impl Error {
    /// Whether no connection could be made (as opposed to one that broke).
    pub(crate) fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    https: bool,
    host: Box<str>,
    port: u16,
}

impl Key {
    /// The scheme (`true`: https), host and port `uri` goes to.
    fn parts(uri: &Uri) -> Result<(bool, &str, u16), Error> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(Error::Target(uri.to_string())),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| Error::Target(uri.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok((
            https,
            host,
            uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
        ))
    }

    fn new(https: bool, host: &str, port: u16) -> Key {
        Key {
            https,
            host: host.to_ascii_lowercase().into_boxed_str(),
            port,
        }
    }

    #[cfg(test)]
    fn from_uri(uri: &Uri) -> Result<Key, Error> {
        let (https, host, port) = Key::parts(uri)?;
        Ok(Key::new(https, host, port))
    }

    /// Whether this is the key of `https`, `host` (in any case) and `port`.
    fn names(&self, https: bool, host: &str, port: u16) -> bool {
        self.https == https && self.port == port && self.host.eq_ignore_ascii_case(host)
    }
}

/// One integration's (or the pass-through's) connections; clones share them.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("options", &self.inner.opts)
            .field("connect_timeout", &self.inner.connect_timeout)
            .finish_non_exhaustive()
    }
}

struct Inner {
    tls: TlsConnector,
    connect_timeout: Duration,
    opts: PoolOptions,
    hosts: Mutex<HashMap<Key, Arc<Host>>>,
    reaper: AtomicBool,
}

impl Drop for Inner {
    /// Idle connections refer to their host: closing them here breaks that cycle.
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *lock(&self.hosts));
        for host in hosts.values() {
            let idle = std::mem::take(&mut *lock(&host.idle));
            drop(idle);
        }
    }
}

struct Host {
    key: Key,
    idle: Mutex<VecDeque<Idle>>,
    /// Connections open, in use and idle.
    open: AtomicUsize,
    /// Signalled when a connection comes back or closes.
    freed: Notify,
    pool: Weak<Inner>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An open connection and its place in its host's count.
struct Conn {
    sender: SendRequest<ReqBody>,
    created: Instant,
    _slot: Slot,
}

/// One of a host's `max_per_host` places; freed on drop.
struct Slot {
    host: Arc<Host>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.host.open.fetch_sub(1, Ordering::AcqRel);
        self.host.freed.notify_one();
    }
}

/// A poisoned lock only means a thread panicked while holding it: the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// A pool whose TLS connections use `tls` (ALPN set to http/1.1 here) and whose connects
    /// must finish within `connect_timeout`.
    pub(crate) fn new(
        tls: Arc<ClientConfig>,
        connect_timeout: Duration,
        opts: &PoolOptions,
    ) -> Pool {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut opts = opts.clone();
        opts.max_per_host = opts.max_per_host.max(1);
        Pool {
            inner: Arc::new(Inner {
                tls: TlsConnector::from(Arc::new(tls)),
                connect_timeout,
                opts,
                hosts: Mutex::default(),
                reaper: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (an absolute `http`/`https` URL; it goes out in origin-form, headers as
    /// given) and returns the partner's response. Its body hands the connection back to the
    /// pool once read to the end.
    pub(crate) async fn request(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PoolBody>, Error> {
        let (https, host, port) = Key::parts(req.uri())?;
        let host = self.inner.host(https, host, port);
        // The path moves out of the absolute URL (a clone would share its bytes, which costs
        // an allocation).
        let pq = std::mem::take(req.uri_mut())
            .into_parts()
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
        self.start_reaper();
        // A reused connection that turns out closed before the request was written is
        // replaced; the request never reached the partner.
        let mut stale = 0;
        loop {
            let (mut conn, reused) = self.inner.checkout(&host).await?;
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    return Ok(Response::from_parts(parts, PoolBody::new(body, conn)));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused && stale < 8 => {
                        stale += 1;
                        req = r;
                    }
                    _ => return Err(Error::Send(e.into_error())),
                },
            }
        }
    }

    fn start_reaper(&self) {
        if self.inner.reaper.load(Ordering::Relaxed)
            || self.inner.reaper.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.inner.reaper.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let mut period = self.inner.opts.idle_timeout / 2;
        if let Some(ttl) = self.inner.opts.ttl {
            period = period.min(ttl / 2);
        }
        let period = period.clamp(Duration::from_millis(10), Duration::from_secs(30));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.reap(Instant::now());
            }
        });
    }
}

impl Inner {
    fn host(self: &Arc<Self>, https: bool, host: &str, port: u16) -> Arc<Host> {
        let mut hosts = lock(&self.hosts);
        // A pool mostly serves one partner host: a look at a few keys finds it without making
        // (allocating) and hashing one.
        if hosts.len() <= 4
            && let Some(h) = hosts.values().find(|h| h.key.names(https, host, port))
        {
            return h.clone();
        }
        hosts
            .entry(Key::new(https, host, port))
            .or_insert_with_key(|key| {
                Arc::new(Host {
                    key: key.clone(),
                    idle: Mutex::default(),
                    open: AtomicUsize::new(0),
                    freed: Notify::new(),
                    pool: Arc::downgrade(self),
                })
            })
            .clone()
    }

    /// Whether a connection may still be used at `now`.
    fn usable(&self, created: Instant, now: Instant) -> bool {
        self.opts
            .ttl
            .is_none_or(|ttl| now.saturating_duration_since(created) < ttl)
    }

    /// An idle, ready connection (`true`), else a new one (`false`); waits while the host has
    /// `max_per_host` connections in use.
    async fn checkout(&self, host: &Arc<Host>) -> Result<(Conn, bool), Error> {
        loop {
            let freed = host.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(mut conn) = self.take_idle(host) {
                if conn.sender.is_ready() {
                    return Ok((conn, true));
                }
                // hyper may still be finishing the previous exchange (or the request body of
                // one the partner answered early): bounded, then the connection is dropped.
                match tokio::time::timeout(self.connect_timeout, conn.sender.ready()).await {
                    Ok(Ok(())) => return Ok((conn, true)),
                    _ => continue,
                }
            }
            let open = host
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.opts.max_per_host).then_some(n + 1)
                });
            if open.is_ok() {
                let slot = Slot { host: host.clone() };
                return self.dial(&host.key, slot).await.map(|c| (c, false));
            }
            freed.await;
        }
    }

    /// The most recently used idle connection still usable; stale ones on the way are closed.
    fn take_idle(&self, host: &Host) -> Option<Conn> {
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut idle = lock(&host.idle);
            loop {
                let Some(i) = idle.pop_back() else { break None };
                if now.saturating_duration_since(i.since) < self.opts.idle_timeout
                    && self.usable(i.conn.created, now)
                    && !i.conn.sender.is_closed()
                {
                    break Some(i.conn);
                }
                stale.push(i);
            }
        };
        drop(stale);
        found
    }

    /// Hands a connection whose response was read to the end back to its host.
    fn put(&self, conn: Conn) {
        let now = Instant::now();
        if conn.sender.is_closed()
            || !self.usable(conn.created, now)
            || self.opts.max_idle_per_host == 0
            || self.opts.idle_timeout.is_zero()
        {
            return;
        }
        let host = conn._slot.host.clone();
        let evicted = {
            let mut idle = lock(&host.idle);
            let evicted = if idle.len() >= self.opts.max_idle_per_host {
                idle.pop_front()
            } else {
                None
            };
            idle.push_back(Idle { conn, since: now });
            evicted
        };
        drop(evicted);
        host.freed.notify_one();
    }

    /// Closes idle connections past their idle timeout or age, and forgets hosts with no
    /// connection and no caller.
    fn reap(&self, now: Instant) {
        let mut closed = Vec::new();
        let mut hosts = lock(&self.hosts);
        hosts.retain(|_, host| {
            let mut idle = lock(&host.idle);
            let mut i = 0;
            while i < idle.len() {
                let e = &idle[i];
                if now.saturating_duration_since(e.since) >= self.opts.idle_timeout
                    || !self.usable(e.conn.created, now)
                    || e.conn.sender.is_closed()
                {
                    closed.extend(idle.remove(i));
                } else {
                    i += 1;
                }
            }
            // Only the map holds it, and nothing is open: no caller can be using it.
            !(idle.is_empty()
                && Arc::strong_count(host) == 1
                && host.open.load(Ordering::Acquire) == 0)
        });
        drop(hosts);
        drop(closed);
    }

    /// DNS, TCP and TLS under one deadline, then the HTTP/1.1 handshake.
    async fn dial(&self, key: &Key, slot: Slot) -> Result<Conn, Error> {
        let timeout = self.connect_timeout;
        let sender = match tokio::time::timeout(timeout, self.connect(key)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Error::Connect(e)),
            Err(_) => return Err(Error::Connect(Box::new(ConnectTimeout(timeout)))),
        };
        Ok(Conn {
            sender,
            created: Instant::now(),
            _slot: slot,
        })
    }

    async fn connect(&self, key: &Key) -> Result<SendRequest<ReqBody>, BoxError> {
        let tcp = tcp_connect(&key.host, key.port, self.connect_timeout).await?;
        let _ = tcp.set_nodelay(true);
        if key.https {
            let name = ServerName::try_from(key.host.to_string())?;
            let tls = self.tls.connect(name, tcp).await?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
    }
}

/// Tries each address of `host` in turn; with several, each but the last gets its share of
/// `budget`, so one unreachable address (an IPv6 route that drops packets) cannot use up the
/// whole connect deadline.
async fn tcp_connect(host: &str, port: u16, budget: Duration) -> Result<TcpStream, BoxError> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await?
            .take(8)
            .collect(),
    };
    let n = addrs.len();
    let share = budget / u32::try_from(n.max(1)).unwrap_or(1);
    let mut last = None;
    for (i, addr) in addrs.into_iter().enumerate() {
        let attempt = TcpStream::connect(addr);
        let result = if i + 1 < n {
            match tokio::time::timeout(share, attempt).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr}: no answer within {share:?}"),
                )),
            }
        } else {
            attempt.await
        };
        match result {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => Box::new(e),
        None => format!("{host}: no address").into(),
    })
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<ReqBody>, BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new().handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "partner connection ended");
        }
    });
    Ok(sender)
}

/// A partner's response body; once read to the end it returns its connection to the pool.
pub(crate) struct PoolBody {
    inner: Incoming,
    conn: Option<Conn>,
}

impl PoolBody {
    fn new(inner: Incoming, conn: Conn) -> PoolBody {
        let mut body = PoolBody {
            inner,
            conn: Some(conn),
        };
        // No body at all (HEAD, 204, 304, `Content-Length: 0`): nobody may ever poll it.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Some(pool) = conn._slot.host.pool.upgrade()
        {
            pool.put(conn);
        }
    }
}

impl Body for PoolBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_scheme_host_and_port() {
        let k = |u: &str| Key::from_uri(&u.parse().unwrap());
        let a = k("https://API.example.com/v1").unwrap();
        assert_eq!(
            a,
            Key {
                https: true,
                host: "api.example.com".into(),
                port: 443
            }
        );
        assert_eq!(k("http://example.com").unwrap().port, 80);
        assert_eq!(&*k("http://[::1]:8080/").unwrap().host, "::1");
        assert!(k("/relative").is_err());
        assert!(k("ftp://example.com/").is_err());
    }
}
