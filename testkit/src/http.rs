//! An HTTP/1.1 client as an app (or a scraper) uses the sidecar: every call opens a fresh
//! connection, so no pooled connection hides a restart. [`crate::blocking`] has the same calls
//! for tests without a runtime of their own.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
        self.header("x-tollgate-reason")
    }

    /// A header's value, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        self.try_json().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The body as JSON, or an error quoting it.
    pub fn try_json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("body is not JSON: {}", self.body))
    }
}

/// Sends one request to `addr` with `target` as the request target (absolute-form for a full
/// URL, as `HTTP_PROXY` clients send a forward proxy; origin-form for a path) on a fresh
/// connection. The `Host` header is the URL's authority unless `headers` sets one. Panics when
/// the exchange fails; [`send`] returns the error instead.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let what = format!("{method} {target} via {addr}");
    send(addr, method, target, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// [`request`], returning what went wrong (connect, request, response) as an error.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Resp> {
    let uri: http::Uri = target.parse().context("bad target")?;
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
        .context("bad request")?;
    let stream = TcpStream::connect(addr).await.context("connect")?;
    send_over(stream, req).await
}

/// Sends `req` on `stream`, a connection the caller made (from a chosen source address, or
/// inside a network namespace), and reads the whole response.
pub async fn send_over(stream: TcpStream, req: Request<Full<Bytes>>) -> anyhow::Result<Resp> {
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET path` (origin-form, `Host: addr`) on a plain-HTTP listener such as an admin one.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, Method::GET, path, &[("host", &addr.to_string())], "").await
}

/// Writes raw bytes to `addr` and reads until the peer closes or `within` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
