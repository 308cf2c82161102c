//! `CONNECT host:port` tunnels. To a partner host with interception on, the tunnel is answered
//! by the sidecar itself: TLS terminated with a leaf from the pod CA and every request inside
//! served like plain HTTP (see [`crate::intercept`]), so every policy answers inside the app's
//! TLS session. Otherwise L4 only: for a partner host the kill switch, the connect deadline and
//! the tunnel limit apply; the bytes inside are not read.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::UnknownHosts;
use super::handler::{Proxy, Target};
use crate::answer::{Answer, Reason};
use crate::body::{self, RespBody};
use crate::config::Integration;
use crate::telemetry::metrics::TunnelLabels;
use crate::telemetry::spans::TunnelSpan;
use opentelemetry::KeyValue;

pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    target: Target,
) -> Response<RespBody> {
    let Some(port) = target.port else {
        return Answer::new(Reason::BadRequest, "CONNECT needs host:port").into_response();
    };
    let revision = proxy.store.load_full();
    let integration = revision.find(&target.host, Some(port)).cloned();
    drop(revision);
    if let Some(i) = &integration
        && proxy.intercept.for_integration(i).is_some()
    {
        count(&proxy, &i.label, "intercepted");
        let host = target.host.clone();
        let p = proxy.clone();
        let client = req.extensions().get::<super::ClientAddr>().map(|c| c.0);
        let span = tracing::debug_span!("intercepted tunnel", integration = %i.label, server.address = %host);
        tokio::spawn(
            async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let interceptor = p.intercept.clone();
                        if let Some(ca) = interceptor.ca() {
                            let io = TokioIo::new(upgraded);
                            crate::intercept::serve(io, ca, &host, p, None, client).await;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            }
            .instrument(span),
        );
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::OK;
        return resp;
    }
    let (label, connect_timeout) = match &integration {
        Some(i) => (i.label.to_string(), i.policy.upstream.connect_timeout),
        None if proxy.options.unknown_hosts == UnknownHosts::Deny => {
            return Answer::new(
                Reason::UnknownHost,
                format!(
                    "{} is not a partner host and --unknown-hosts is deny",
                    target.host
                ),
            )
            .into_response();
        }
        None => ("".to_string(), proxy.options.passthrough_connect_timeout),
    };
    let answer = |refusal: Refusal, addr: &str| {
        let a = refusal.answer(addr, proxy.options.max_tunnels);
        if label.is_empty() {
            a
        } else {
            a.at(&label, "tunnel")
        }
    };
    let permit = match admit(&proxy, integration.as_deref(), &label) {
        Ok(p) => p,
        Err(refusal) => return answer(refusal, &target.host).into_response(),
    };
    let addr = format!(
        "{}:{port}",
        if target.host.contains(':') {
            format!("[{}]", target.host)
        } else {
            target.host.clone()
        }
    );
    let span = TunnelSpan::start(|| {
        vec![
            KeyValue::new("tollgate.integration", label.clone()),
            KeyValue::new("server.address", target.host.clone()),
            KeyValue::new("server.port", i64::from(port)),
        ]
    });
    let upstream = match connect(&proxy, &label, addr.as_str(), connect_timeout).await {
        Ok(s) => s,
        Err(refusal) => return answer(refusal, &addr).into_response(),
    };
    tokio::spawn(async move {
        // The span ends with the tunnel.
        let _span = span;
        let _permit = permit;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut app = TokioIo::new(upgraded);
                let mut upstream = upstream;
                if let Err(e) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
                    tracing::debug!(error = %e, "tunnel closed with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// Why an opaque tunnel was not opened.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The integration's kill switch is on; what the app is told.
    KillSwitch(String),
    /// `--max-tunnels` are open.
    Limited,
    Unreachable(std::io::Error),
    /// No connection within the connect deadline.
    Timeout(Duration),
}

impl Refusal {
    /// The sidecar's reason for it (`tollgate.reason` on the tunnel's span).
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Refusal::KillSwitch(_) => Reason::KillSwitch,
            Refusal::Limited => Reason::RateLimited,
            Refusal::Unreachable(_) => Reason::UpstreamUnreachable,
            Refusal::Timeout(_) => Reason::Timeout,
        }
    }

    /// The `outcome` label of `tollgate_tunnels_total`.
    fn outcome(&self) -> &'static str {
        match self {
            Refusal::Limited => "limited",
            other => other.reason().as_str(),
        }
    }

    /// The answer to a `CONNECT` refused for this reason; `addr`: where the tunnel was going.
    fn answer(self, addr: &str, max_tunnels: usize) -> Answer {
        match self {
            Refusal::KillSwitch(message) => Answer::new(Reason::KillSwitch, message),
            Refusal::Limited => Answer::new(
                Reason::RateLimited,
                format!("{max_tunnels} tunnels already open (--max-tunnels)"),
            )
            .retry_after(Duration::from_secs(1)),
            Refusal::Unreachable(e) => {
                Answer::new(Reason::UpstreamUnreachable, format!("{addr}: {e}"))
            }
            Refusal::Timeout(d) => Answer::new(
                Reason::Timeout,
                format!(
                    "{addr}: no connection within {}",
                    tollgate_crds::duration::format(d)
                ),
            ),
        }
    }
}

/// The first half of the L4 policy of an opaque tunnel, `CONNECT` or a partner's TLS on the
/// transparent listener: the integration's kill switch (none for a host no integration claims),
/// then the tunnel limit. `Ok`: the tunnel's slot, held while it is open. A refusal is counted
/// in `tollgate_tunnels_total` under `label`.
pub(crate) fn admit(
    proxy: &Proxy,
    integration: Option<&Integration>,
    label: &str,
) -> Result<OwnedSemaphorePermit, Refusal> {
    let refusal = match integration
        .and_then(|i| crate::layers::kill_switch::refusal(&i.policy.default_route.kill_switch))
    {
        Some(message) => Refusal::KillSwitch(message),
        None => match proxy.tunnels.clone().try_acquire_owned() {
            Ok(permit) => return Ok(permit),
            Err(_) => Refusal::Limited,
        },
    };
    count(proxy, label, refusal.outcome());
    Err(refusal)
}

/// The second half: connects to the tunnel's far end within `connect_timeout`, counting
/// `established` or why not.
pub(crate) async fn connect(
    proxy: &Proxy,
    label: &str,
    addr: impl ToSocketAddrs,
    connect_timeout: Duration,
) -> Result<TcpStream, Refusal> {
    let refusal = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            count(proxy, label, "established");
            return Ok(s);
        }
        Ok(Err(e)) => Refusal::Unreachable(e),
        Err(_) => Refusal::Timeout(connect_timeout),
    };
    count(proxy, label, refusal.outcome());
    Err(refusal)
}

fn count(proxy: &Proxy, integration: &str, outcome: &str) {
    proxy
        .metrics
        .tunnels
        .get_or_create(&TunnelLabels {
            integration: integration.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}
