//! The one place that builds what the sidecar answers when it, not the partner, decides
//! (api.md section 3): status, `x-tollgate-reason`, `Retry-After` and the JSON error body.

use std::fmt;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::body::{self, RespBody};

/// Header naming why the sidecar answered.
pub(crate) const REASON_HEADER: &str = "x-tollgate-reason";
/// Header marking a response served from fallback: `static` or `stale`.
pub(crate) const FALLBACK_HEADER: &str = "x-tollgate-fallback";

/// Why the sidecar answered instead of the partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    KillSwitch,
    RateLimited,
    /// Every place of a concurrency cap is taken (and the line, if any, is full or timed out).
    ConcurrencyLimited,
    CircuitOpen,
    Timeout,
    DeprecatedVersion,
    UpstreamUnreachable,
    BadRequest,
    /// `--unknown-hosts deny` and the host matches no integration.
    UnknownHost,
    /// The credential could not be obtained (an OAuth2 token endpoint down after the old
    /// token expired): nothing is sent unauthenticated.
    CredentialUnavailable,
}

impl Reason {
    /// The sidecar answered in the partner's stead without calling it (kill switch, circuit
    /// open, deprecated version, bad request, unknown host). Rate limiting is counted apart.
    /// Timeouts and an unreachable partner are the partner's failures, not refusals.
    pub(crate) fn is_refusal(self) -> bool {
        matches!(
            self,
            Reason::KillSwitch
                | Reason::CircuitOpen
                | Reason::DeprecatedVersion
                | Reason::BadRequest
                | Reason::UnknownHost
                | Reason::CredentialUnavailable
        )
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::KillSwitch => "kill-switch",
            Reason::RateLimited => "rate-limited",
            Reason::ConcurrencyLimited => "concurrency-limited",
            Reason::CircuitOpen => "circuit-open",
            Reason::Timeout => "timeout",
            Reason::DeprecatedVersion => "deprecated-version",
            Reason::UpstreamUnreachable => "upstream-unreachable",
            Reason::BadRequest => "bad-request",
            Reason::UnknownHost => "unknown-host",
            Reason::CredentialUnavailable => "credential-unavailable",
        }
    }

    pub(crate) fn status(self) -> StatusCode {
        match self {
            Reason::KillSwitch | Reason::CircuitOpen | Reason::CredentialUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Reason::RateLimited | Reason::ConcurrencyLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::DeprecatedVersion => StatusCode::GONE,
            Reason::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Reason::BadRequest => StatusCode::BAD_REQUEST,
            Reason::UnknownHost => StatusCode::FORBIDDEN,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decision by the sidecar, with what the app needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Answer {
    pub(crate) reason: Reason,
    /// `namespace/name`, when the request matched an integration.
    pub(crate) integration: Option<String>,
    pub(crate) route: Option<String>,
    pub(crate) message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    pub(crate) retry_after: Option<Duration>,
}

impl Answer {
    pub(crate) fn new(reason: Reason, message: impl Into<String>) -> Self {
        Answer {
            reason,
            integration: None,
            route: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn at(mut self, integration: impl fmt::Display, route: &str) -> Self {
        self.integration = Some(integration.to_string());
        self.route = Some(route.to_string());
        self
    }

    pub(crate) fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub(crate) fn into_response(self) -> Response<RespBody> {
        let mut resp = Response::new(body::full(self.json()));
        *resp.status_mut() = self.reason.status();
        let h = resp.headers_mut();
        h.insert(
            REASON_HEADER,
            HeaderValue::from_static(self.reason.as_str()),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(d) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(d)));
        }
        resp
    }

    /// The same answer as raw HTTP/1.1 bytes, closing the connection: for where the sidecar
    /// must answer below hyper (a request head over the limit, which hyper would otherwise
    /// answer itself, without the contract's header and body).
    pub(crate) fn to_http1_closing(&self) -> Vec<u8> {
        let status = self.reason.status();
        let json = self.json();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n{REASON_HEADER}: {}\r\ncontent-type: application/json\r\n\
             cache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            self.reason.as_str(),
            json.len()
        )
        .into_bytes();
        out.extend_from_slice(&json);
        out
    }

    fn json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            reason: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            integration: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            route: Option<&'a str>,
            message: &'a str,
        }
        serde_json::to_vec(&Body {
            error: Inner {
                reason: self.reason.as_str(),
                integration: self.integration.as_deref(),
                route: self.route.as_deref(),
                message: &self.message,
            },
        })
        .unwrap_or_default()
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1 (0 would invite a hot loop).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn every_reason_has_the_contract_status_header_and_body() {
        let expected = [
            (Reason::KillSwitch, 503),
            (Reason::RateLimited, 429),
            (Reason::CircuitOpen, 503),
            (Reason::Timeout, 504),
            (Reason::DeprecatedVersion, 410),
            (Reason::UpstreamUnreachable, 502),
            (Reason::BadRequest, 400),
            (Reason::UnknownHost, 403),
        ];
        for (reason, status) in expected {
            let resp = Answer::new(reason, "why")
                .at("payments/stripe", "charges")
                .into_response();
            assert_eq!(resp.status().as_u16(), status, "{reason}");
            assert_eq!(resp.headers()[REASON_HEADER], reason.as_str());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["reason"], reason.as_str());
            assert_eq!(v["error"]["integration"], "payments/stripe");
            assert_eq!(v["error"]["route"], "charges");
            assert_eq!(v["error"]["message"], "why");
        }
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(15)), 15);
        let resp = Answer::new(Reason::RateLimited, "x")
            .retry_after(Duration::from_millis(2500))
            .into_response();
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
    }
}
