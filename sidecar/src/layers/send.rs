//! The innermost service: sends one attempt to the partner over the integration's pool.

use std::task::{Context, Poll};

use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{Request, Response, Uri};
use tower::Service;

use super::{BoxFuture, Call, CallError, CallResult};
use crate::body::{self, ReqBody, RespBody};
use crate::client::classify;
use crate::proxy::headers::strip_hop_by_hop;
use crate::telemetry::spans::AttemptSpan;
use tollgate_crds::policy::{Scheme, UpstreamPolicy};

#[derive(Clone, Copy, Debug)]
pub(crate) struct SendAttempt;

/// `host` or `host:port` (port omitted when it is the scheme's default), IPv6 bracketed.
pub(crate) fn authority(up: &UpstreamPolicy) -> Authority {
    let host = if up.host.contains(':') {
        format!("[{}]", up.host)
    } else {
        up.host.clone()
    };
    let default_port = match up.scheme {
        Scheme::Http => 80,
        Scheme::Https => 443,
    };
    let text = if up.port == default_port {
        host
    } else {
        format!("{host}:{}", up.port)
    };
    text.parse()
        .expect("host and port from a parsed URL form an authority")
}

/// An integration's upstream in the form every attempt needs, parsed once per revision: the
/// per-attempt cost is then a few reference-count bumps instead of formatting and re-parsing the
/// URL and the `Host` value.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: UriScheme,
    authority: Authority,
    base_path: String,
    /// The `Host` header the partner gets.
    pub(crate) host: Option<HeaderValue>,
}

impl Upstream {
    pub(crate) fn new(up: &UpstreamPolicy) -> Self {
        let authority = authority(up);
        Upstream {
            scheme: match up.scheme {
                Scheme::Http => UriScheme::HTTP,
                Scheme::Https => UriScheme::HTTPS,
            },
            host: HeaderValue::from_str(authority.as_str()).ok(),
            authority,
            base_path: up.base_path.clone(),
        }
    }

    /// The partner's URL for a request's path and query (taken, not cloned: a clone would
    /// share its bytes, which costs an allocation).
    pub(crate) fn uri(&self, path_and_query: Option<PathAndQuery>) -> Result<Uri, http::Error> {
        let path = if self.base_path.is_empty() {
            path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/"))
        } else {
            let pq = path_and_query.as_ref().map_or("/", PathAndQuery::as_str);
            PathAndQuery::try_from(format!("{}{}", self.base_path, pq))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
    }
}

impl Service<Request<ReqBody>> for SendAttempt {
    type Response = Response<RespBody>;
    type Error = CallError;
    type Future = BoxFuture<CallResult>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let up = &call.integration.state.upstream;
        let uri = match up.uri(std::mem::take(req.uri_mut()).into_parts().path_and_query) {
            Ok(u) => u,
            Err(e) => {
                let err = CallError::Answer(call.answer(
                    crate::answer::Reason::BadRequest,
                    format!("request path: {e}"),
                ));
                return Box::pin(std::future::ready(Err(err)));
            }
        };
        if let Some(host) = &up.host {
            req.headers_mut().insert(HOST, host.clone());
        }
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        if let Some(span) = req.extensions().get::<AttemptSpan>().cloned() {
            span.inject(req.headers_mut());
        }
        let client = call.integration.state.client.clone();
        Box::pin(async move {
            match client.request(req).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    // The app's connection is HTTP/1.1 whatever the partner spoke.
                    parts.version = http::Version::HTTP_11;
                    Ok(Response::from_parts(parts, body::incoming(body)))
                }
                Err(e) => Err(CallError::Transport {
                    kind: classify(&e),
                    message: error_chain(&e),
                }),
            }
        })
    }
}

/// The error and its causes on one line (hyper's top-level messages alone say little).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
