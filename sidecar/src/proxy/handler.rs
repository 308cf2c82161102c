//! Turns an app request into a call through the policy stack, a pass-through, or a tunnel.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceExt;

use super::headers::strip_hop_by_hop;
use super::sniff::Verdict;
use super::{ProxyOptions, UnknownHosts};
use crate::answer::{Answer, Reason};
use crate::body::{self, BodyError, RespBody};
use crate::client::HttpClient;
use crate::config::Store;
use crate::layers::{Call, Stack};
use crate::telemetry::metrics::Metrics;
use tollgate_crds::policy::{DEFAULT_ROUTE, normalize_path};

/// Everything a request handler needs; shared by all connections.
pub struct Proxy {
    pub store: Arc<Store>,
    pub stack: Stack,
    pub options: ProxyOptions,
    /// For hosts no integration claims.
    pub passthrough: HttpClient,
    pub metrics: Arc<Metrics>,
    pub tunnels: Arc<Semaphore>,
    /// TLS interception of partner hosts (`CONNECT` and transparent).
    pub intercept: Arc<crate::intercept::Interceptor>,
}

/// Where a request is going, from its absolute-form target or its `Host` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: Option<u16>,
    pub https: bool,
}

impl Target {
    fn from_authority(a: &Authority, https: bool) -> Target {
        Target {
            host: a
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
            port: a.port_u16(),
            https,
        }
    }
}

impl Target {
    /// The port the request goes to, the scheme's default when none is given.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(if self.https { 443 } else { 80 })
    }
}

/// Whether `ip` is an address of this machine: loopback, unspecified (which reaches this
/// machine), or one a socket can be bound to.
fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The request's target, or why it has none.
pub fn target(req: &Request<Incoming>) -> Result<Target, String> {
    if let Some(a) = req.uri().authority() {
        if req.method() != Method::CONNECT
            && req
                .uri()
                .scheme_str()
                .is_some_and(|s| s != "http" && s != "https")
        {
            return Err(format!(
                "scheme {:?} is not proxied",
                req.uri().scheme_str().unwrap_or_default()
            ));
        }
        return Ok(Target::from_authority(
            a,
            req.uri().scheme_str() == Some("https"),
        ));
    }
    let host = req
        .headers()
        .get(HOST)
        .ok_or("no Host header and no absolute URL")?;
    let host = host.to_str().map_err(|_| "Host header is not ASCII")?;
    let a: Authority = host
        .parse()
        .map_err(|_| format!("Host header {host:?} is not a host"))?;
    Ok(Target::from_authority(&a, false))
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        verdict: Verdict,
    ) -> Response<RespBody> {
        if verdict == Verdict::LengthAndChunked {
            return Answer::new(
                Reason::BadRequest,
                "request has both Content-Length and Transfer-Encoding; refused (request smuggling guard)",
            )
            .into_response();
        }
        let target = match target(&req) {
            Ok(t) => t,
            Err(e) => return Answer::new(Reason::BadRequest, e).into_response(),
        };
        if self.is_self(&target).await {
            return Answer::new(
                Reason::BadRequest,
                format!(
                    "request loop: {}:{} is this sidecar's own listener (port {}); refused",
                    target.host,
                    target.effective_port(),
                    self.options.listen.port()
                ),
            )
            .into_response();
        }
        if req.method() == Method::CONNECT {
            return super::tunnel::handle(self, req, target).await;
        }
        let revision = self.store.load_full();
        let Some(integration) = revision.find(&target.host, target.port).cloned() else {
            return match self.options.unknown_hosts {
                UnknownHosts::Deny => Answer::new(
                    Reason::UnknownHost,
                    format!(
                        "{} is not a partner host and --unknown-hosts is deny",
                        target.host
                    ),
                )
                .into_response(),
                UnknownHosts::Pass => self.passthrough(req, target).await,
            };
        };
        drop(revision);
        match self.prepare_call(integration, req).await {
            Ok(req) => match self.stack.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            Err(answer) => answer.into_response(),
        }
    }

    /// A request to a partner made ready for the policy stack: its path in normal form (and in
    /// origin form, the `send` layer builds the partner's URL), its route matched, its body
    /// buffered up to `--replay-limit`, hop-by-hop headers gone, and its [`Call`] attached.
    async fn prepare_call(
        &self,
        integration: Arc<crate::config::Integration>,
        req: Request<Incoming>,
    ) -> Result<Request<body::ReqBody>, Answer> {
        let (mut parts, incoming) = req.into_parts();
        let started = Instant::now();
        let bad_path = |e: &dyn std::fmt::Display| {
            Answer::new(Reason::BadRequest, format!("request path: {e}"))
                .at(&integration.label, DEFAULT_ROUTE)
        };
        // Policy matches the normal form of the path, and the partner receives that same form:
        // a spelling that matched nothing here (`//v0`, `/v1/../v0`) cannot mean more there.
        let path = normalize_path(parts.uri.path()).map_err(|e| bad_path(&e))?;
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let pq = PathAndQuery::try_from(pq).map_err(|e| bad_path(&e))?;
        let route = integration.route_index(&parts.method, pq.path());
        let route_policy = integration.route(route);
        let body = body::prepare(
            incoming,
            self.options.replay_limit,
            self.options.max_body_bytes,
        )
        .await
        .map_err(|e: BodyError| {
            Answer::new(Reason::BadRequest, e.to_string())
                .at(&integration.label, &route_policy.name)
        })?;
        parts.uri = Uri::from(pq);
        strip_hop_by_hop(&mut parts.headers);
        let deadline = started + route_policy.timeouts.total;
        let client = parts.extensions.get::<super::ClientAddr>().map(|c| c.0);
        let call = Arc::new(Call {
            integration,
            route,
            deadline,
            started,
            attempts: AtomicU32::new(0),
            client,
        });
        parts.extensions.insert(call);
        Ok(Request::from_parts(parts, body))
    }

    /// Whether `t` is this sidecar's listener, whatever address names it: the listener's port
    /// on a loopback or unspecified address, on any address of this machine (the pod IP), or on
    /// a name for one of those. Sending it on would loop until the connection slots ran out.
    async fn is_self(&self, t: &Target) -> bool {
        let port = t.effective_port();
        if port != self.options.listen.port() {
            return false;
        }
        let host = t.host.trim_end_matches('.').to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return is_local(ip);
        }
        // A name on the listener's port: where it resolves decides. Bounded, and only paid by
        // requests to this one port.
        match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(mut addrs)) => addrs.any(|a| is_local(a.ip())),
            _ => false,
        }
    }

    async fn passthrough(&self, req: Request<Incoming>, target: Target) -> Response<RespBody> {
        let (mut parts, incoming) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let scheme = if target.https { "https" } else { "http" };
        let authority = match (
            parts.uri.authority(),
            parts.headers.get(HOST).and_then(|h| h.to_str().ok()),
        ) {
            (Some(a), _) => a.to_string(),
            (None, Some(h)) => h.to_string(),
            (None, None) => {
                return Answer::new(Reason::BadRequest, "no Host header").into_response();
            }
        };
        let pq = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        parts.uri = match format!("{scheme}://{authority}{pq}").parse() {
            Ok(u) => u,
            Err(e) => {
                return Answer::new(Reason::BadRequest, format!("request target: {e}"))
                    .into_response();
            }
        };
        let body = match body::prepare(incoming, 0, self.options.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => return Answer::new(Reason::BadRequest, e.to_string()).into_response(),
        };
        match self
            .passthrough
            .request(Request::from_parts(parts, body))
            .await
        {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.version = http::Version::HTTP_11;
                Response::from_parts(parts, body::incoming(body))
            }
            Err(e) => Answer::new(
                Reason::UpstreamUnreachable,
                format!("{authority}: {}", crate::layers::send::error_chain(&e)),
            )
            .into_response(),
        }
    }
}
