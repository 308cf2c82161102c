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
use tokio::net::TcpStream;
use tracing::Instrument;

use super::UnknownHosts;
use super::handler::{Proxy, Target};
use crate::answer::{Answer, Reason};
use crate::body::{self, RespBody};
use crate::telemetry::metrics::TunnelLabels;

pub async fn handle(
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
        let span = tracing::debug_span!("intercepted tunnel", integration = %i.label, server.address = %host);
        tokio::spawn(
            async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        let interceptor = p.intercept.clone();
                        if let Some(ca) = interceptor.ca() {
                            crate::intercept::serve(TokioIo::new(upgraded), ca, &host, p, None)
                                .await;
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
        Some(i) => {
            let ks = &i.policy.default_route.kill_switch;
            if ks.enabled {
                count(&proxy, &i.label, "kill-switch");
                let msg = match ks.reason.as_deref().filter(|r| !r.is_empty()) {
                    Some(r) => format!("kill switch is on: {r}"),
                    None => "kill switch is on".into(),
                };
                return Answer::new(Reason::KillSwitch, msg)
                    .at(&i.label, "tunnel")
                    .into_response();
            }
            (i.label.to_string(), i.policy.upstream.connect_timeout)
        }
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
    let answer_at = |reason: Reason, msg: String| {
        let a = Answer::new(reason, msg);
        if label.is_empty() {
            a
        } else {
            a.at(&label, "tunnel")
        }
    };
    let Ok(permit) = proxy.tunnels.clone().try_acquire_owned() else {
        count(&proxy, &label, "limited");
        return answer_at(
            Reason::RateLimited,
            format!(
                "{} tunnels already open (--max-tunnels)",
                proxy.options.max_tunnels
            ),
        )
        .retry_after(Duration::from_secs(1))
        .into_response();
    };
    let addr = format!(
        "{}:{port}",
        if target.host.contains(':') {
            format!("[{}]", target.host)
        } else {
            target.host.clone()
        }
    );
    let span = tracing::info_span!(target: crate::trace::TARGET, "tollgate.tunnel", otel.kind = "client", tollgate.integration = %label, server.address = %target.host, server.port = port);
    let upstream = match tokio::time::timeout(connect_timeout, TcpStream::connect(&addr))
        .instrument(span.clone())
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            count(&proxy, &label, "upstream-unreachable");
            return answer_at(Reason::UpstreamUnreachable, format!("{addr}: {e}")).into_response();
        }
        Err(_) => {
            count(&proxy, &label, "timeout");
            return answer_at(
                Reason::Timeout,
                format!(
                    "{addr}: no connection within {}",
                    tollgate_crds::duration::format(connect_timeout)
                ),
            )
            .into_response();
        }
    };
    let _ = upstream.set_nodelay(true);
    count(&proxy, &label, "established");
    tokio::spawn(
        async move {
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
        }
        .instrument(span),
    );
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
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
