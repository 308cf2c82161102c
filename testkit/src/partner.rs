//! A stand-in partner API on loopback: a real hyper HTTP/1.1 server (plain or TLS) that
//! records every request and answers from a script, so a test sees exactly what the sidecar
//! sent on the app's behalf and decides what the partner says back.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::ca::TestCa;

/// A request the partner received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// A header's value, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the partner does with a request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with the body `partner says <code>`.
    Status(u16),
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Wait, then reply.
    Delay(Duration, Box<Reply>),
    /// Close the connection without answering.
    Reset,
    /// `200` with what it received as JSON, `{"method","path","headers":{name: value}}`
    /// (lower-case names); `500` for a path starting with `/fail`; after `MS` milliseconds for
    /// a query `delay=MS`.
    Echo,
}

impl Reply {
    /// `status` with these headers and `body`.
    pub fn with(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
        Reply::Full {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        }
    }

    /// `200` with `body` as `text/plain`.
    pub fn ok(body: &str) -> Reply {
        Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: body.into(),
        }
    }
}

type Script = Box<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// The running partner; stops on drop.
pub struct Partner {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
    conns: Arc<Conns>,
    task: tokio::task::JoinHandle<()>,
}

/// The partner's connections: how many it accepted, how many are open, the most open at once,
/// and a signal that closes every open one.
#[derive(Debug)]
struct Conns {
    accepted: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    close: tokio::sync::watch::Sender<u64>,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            accepted: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            close: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// Counts one open connection until dropped.
struct OpenGuard(Arc<Conns>);

impl OpenGuard {
    fn new(conns: Arc<Conns>) -> OpenGuard {
        conns.accepted.fetch_add(1, Ordering::SeqCst);
        let open = conns.open.fetch_add(1, Ordering::SeqCst) + 1;
        conns.max_open.fetch_max(open, Ordering::SeqCst);
        OpenGuard(conns)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A poisoned lock only means another test thread panicked: the data is still what it was.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Partner {
    /// Plain HTTP on 127.0.0.1; answers `200 ok` until told otherwise.
    pub async fn start() -> Partner {
        Self::start_on(Self::loopback().await, None)
    }

    /// HTTPS with a certificate for `localhost` and 127.0.0.1 signed by `ca`.
    pub async fn start_tls(ca: &TestCa) -> Partner {
        Self::start_on(Self::loopback().await, Some(ca.server_config()))
    }

    /// Plain HTTP on 127.0.0.1 answering [`Reply::Echo`], served by
    /// [`crate::blocking::runtime`]: for tests without a runtime of their own.
    pub fn echo() -> anyhow::Result<Partner> {
        let rt = crate::blocking::runtime();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let _in_rt = rt.enter();
        let partner = Self::start_on(listener, None);
        partner.script(|_, _| Reply::Echo);
        Ok(partner)
    }

    async fn loopback() -> TcpListener {
        TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0")
    }

    /// Serves on `listener` (bound wherever the test needs, e.g. in a network namespace), over
    /// TLS when `tls` is given. Call it within a tokio runtime.
    pub fn start_on(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> Partner {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Box::new(|_, _| Reply::ok("ok"))));
        let queue: Arc<Mutex<VecDeque<Reply>>> = Arc::default();
        let conns: Arc<Conns> = Arc::default();
        let (s, sc, q, c) = (seen.clone(), script.clone(), queue.clone(), conns.clone());
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, sc, q, acceptor) = (s.clone(), sc.clone(), q.clone(), acceptor.clone());
                let guard = OpenGuard::new(c.clone());
                let mut close = c.close.subscribe();
                tokio::spawn(async move {
                    let _guard = guard;
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, sc, q) = (s.clone(), sc.clone(), q.clone());
                        async move { handle(req, s, sc, q).await }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    let serve = async {
                        match acceptor {
                            Some(a) => {
                                if let Ok(tls) = a.accept(stream).await {
                                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                                }
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    };
                    // Dropping the connection closes it.
                    tokio::select! {
                        () = serve => {}
                        _ = close.changed() => {}
                    }
                });
            }
        });
        Partner {
            addr,
            seen,
            script,
            queue,
            conns,
            task,
        }
    }

    /// `http://ADDR`, for `spec.upstream.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers with `f(index, request)` from now on (index counts every request received).
    pub fn script(&self, f: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) {
        *lock(&self.script) = Box::new(f);
    }

    /// The next requests get these replies, in order, before the script applies again.
    pub fn queue(&self, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.queue).extend(replies);
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// How many requests it received.
    pub fn count(&self) -> usize {
        lock(&self.seen).len()
    }

    /// How many connections it accepted.
    pub fn accepted(&self) -> usize {
        self.conns.accepted.load(Ordering::SeqCst)
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.conns.open.load(Ordering::SeqCst)
    }

    /// The most connections that were open at once.
    pub fn max_open_connections(&self) -> usize {
        self.conns.max_open.load(Ordering::SeqCst)
    }

    /// Closes every connection open now (as a partner's own idle timeout or a restart would),
    /// whether idle or in the middle of a request.
    pub fn close_connections(&self) {
        self.conns.close.send_modify(|n| *n += 1);
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        lock(&self.seen).clear();
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    queue: Arc<Mutex<VecDeque<Reply>>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let s = Seen {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        headers: parts.headers,
        body,
    };
    let index = {
        let mut v = lock(&seen);
        v.push(s.clone());
        v.len() - 1
    };
    let queued = lock(&queue).pop_front();
    let mut reply = match queued {
        Some(r) => r,
        None => (lock(&script))(index, &s),
    };
    loop {
        match reply {
            Reply::Delay(d, next) => {
                tokio::time::sleep(d).await;
                reply = *next;
            }
            Reply::Reset => return Err(std::io::Error::other("reset by test partner")),
            Reply::Status(code) => {
                let mut r = Response::new(Full::new(Bytes::from(format!("partner says {code}"))));
                *r.status_mut() = status(code);
                return Ok(r);
            }
            Reply::Full {
                status: code,
                headers,
                body,
            } => {
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status(code);
                for (k, v) in headers {
                    r.headers_mut().insert(
                        http::HeaderName::from_bytes(k.as_bytes()).expect("a valid header name"),
                        v.parse().expect("a valid header value"),
                    );
                }
                return Ok(r);
            }
            Reply::Echo => return Ok(echo(&s).await),
        }
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or_else(|_| panic!("{code} is no HTTP status"))
}

async fn echo(s: &Seen) -> Response<Full<Bytes>> {
    let (path, query) = s.path.split_once('?').unwrap_or((&s.path, ""));
    let delay = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("delay="))
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: BTreeMap<&str, &str> = s
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let body = serde_json::json!({"method": s.method.as_str(), "path": s.path, "headers": headers});
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if path.starts_with("/fail") {
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocking;

    #[test]
    fn the_echo_partner_records_and_echoes_what_it_got() {
        let partner = Partner::echo().unwrap();
        let r = blocking::request(
            partner.addr,
            Method::POST,
            &format!("{}/v1/things?x=1", partner.url()),
            &[("x-test", "yes")],
            "payload",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        let echo = r.try_json().unwrap();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/v1/things?x=1");
        assert_eq!(echo["headers"]["x-test"], "yes");
        let seen = partner.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("x-test"), Some("yes"));
        assert_eq!(&seen[0].body[..], b"payload");

        let fail = blocking::get(partner.addr, "/fail/now").unwrap();
        assert_eq!(fail.status, 500);
        assert_eq!(partner.count(), 2);
    }

    #[tokio::test]
    async fn queued_replies_come_before_the_script() {
        let partner = Partner::start().await;
        partner.script(|i, _| Reply::Status(200 + i as u16));
        partner.queue([Reply::Status(503)]);
        let url = format!("{}/x", partner.url());
        let first = crate::http::request(partner.addr, Method::GET, &url, &[], "").await;
        let second = crate::http::request(partner.addr, Method::GET, &url, &[], "").await;
        assert_eq!((first.status, second.status), (503, 201));
        assert_eq!(second.body, "partner says 201");
    }

    #[tokio::test]
    async fn it_counts_and_closes_its_connections() {
        let partner = Partner::start().await;
        let stream = tokio::net::TcpStream::connect(partner.addr).await.unwrap();
        let uri = format!("{}/x", partner.url());
        let req = || {
            Request::get(uri.as_str())
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        for _ in 0..3 {
            let r = sender.send_request(req()).await.unwrap();
            r.into_body().collect().await.unwrap();
        }
        crate::http::request(partner.addr, Method::GET, &uri, &[], "").await;
        assert_eq!(partner.accepted(), 2);
        assert_eq!(partner.max_open_connections(), 2);
        crate::wait::until(
            "only the kept-alive one open",
            Duration::from_secs(5),
            || partner.open_connections() == 1,
        )
        .await;
        partner.close_connections();
        let _ = conn.await;
        crate::wait::until("no open connection", Duration::from_secs(5), || {
            partner.open_connections() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_tls_partner_presents_a_leaf_of_its_ca() {
        let ca = TestCa::new();
        let partner = Partner::start_tls(&ca).await;
        let tcp = tokio::net::TcpStream::connect(partner.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(ca.client_config())
            .connect(name, tcp)
            .await;
        assert!(tls.is_ok(), "{:?}", tls.err());
        let other = TestCa::new();
        let tcp = tokio::net::TcpStream::connect(partner.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let refused = tokio_rustls::TlsConnector::from(other.client_config())
            .connect(name, tcp)
            .await;
        assert!(refused.is_err(), "a leaf of another CA is not trusted");
    }
}
