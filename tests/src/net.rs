//! A blocking HTTP/1.1 client over hyper, as an app (or an operator's scraper) uses the
//! sidecar: each call opens a fresh connection, so no pooled connection hides a restart.
//! The calls run on one small tokio runtime shared by the process ([`runtime`]), which also
//! serves the partner ([`crate::partner`]).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long one call may take, connect to last byte, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The runtime behind the blocking calls and the partner servers. Never call into it from a
/// thread that is itself running async code.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-net")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A response as the app saw it.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// `x-tollgate-reason`: set when the sidecar, not the partner, decided.
    pub fn reason(&self) -> Option<&str> {
        self.headers
            .get("x-tollgate-reason")
            .and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {}", self.body))
    }
}

/// Sends one request to `addr` with `target` as the request target: absolute-form for a full
/// URL (what `HTTP_PROXY` clients send a forward proxy), origin-form for a path. The `Host`
/// header is the URL's authority unless `headers` sets one.
pub fn request(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Resp> {
    request_within(addr, method, target, headers, body, DEFAULT_TIMEOUT)
}

/// [`request`] with a time limit of its own.
pub fn request_within(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    timeout: Duration,
) -> anyhow::Result<Resp> {
    let what = format!("{method} {target} via {addr}");
    let uri: http::Uri = target
        .parse()
        .with_context(|| format!("{what}: bad target"))?;
    let mut req = Request::builder().method(method).uri(uri.clone());
    let sets_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
    if let (Some(a), false) = (uri.authority(), sets_host) {
        req = req.header(http::header::HOST, a.as_str());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .with_context(|| format!("{what}: bad request"))?;
    let call = async move {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    runtime()
        .block_on(async { tokio::time::timeout(timeout, call).await })
        .map_err(|_| anyhow!("{what}: no answer within {timeout:?}"))?
        .with_context(|| what.clone())
}

/// `GET path` on a plain-HTTP admin listener.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Resp> {
    request(addr, Method::GET, path, &[("host", &addr.to_string())], "")
}

/// The sum of every sample of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
