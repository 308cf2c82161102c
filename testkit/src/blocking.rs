//! The [`crate::http`] client for tests without a runtime of their own (the end-to-end tests):
//! each call runs on one small tokio runtime shared by the process ([`runtime`]), which also
//! serves the partners they start ([`crate::Partner::echo`]).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, anyhow};
use http::Method;

use crate::http::{Resp, send};

/// How long one call may take, connect to last byte, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The runtime behind the blocking calls and the partner servers. Never call into it from a
/// thread that is itself running async code.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testkit-net")
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// [`crate::http::request`], blocking, within [`DEFAULT_TIMEOUT`].
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
    // The timer is made inside the runtime: it needs its clock.
    runtime()
        .block_on(async {
            tokio::time::timeout(timeout, send(addr, method, target, headers, body)).await
        })
        .map_err(|_| anyhow!("{what}: no answer within {timeout:?}"))?
        .with_context(|| what.clone())
}

/// `GET path` (origin-form, `Host: addr`) on a plain-HTTP listener such as an admin one.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Resp> {
    request(addr, Method::GET, path, &[("host", &addr.to_string())], "")
}
