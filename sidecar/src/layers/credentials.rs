//! Credentials: the integration's secret, rendered into its header, set over whatever the app
//! sent. The app never holds the key.
//!
//! With a rotation window (`credentials.secondaryRef`) the primary key is sent first; when the
//! partner answers 401 and the request can be sent again (its body was buffered, as for a
//! retry), it is sent once more with the secondary key. A 401 means the partner refused the
//! call before acting on it, so this holds for every method. The second send spends a quota
//! token like any attempt; without one the app gets the partner's 401. Which key the partner
//! accepted is counted in `tollgate_credential_key_total{key}` and reported to the operator.
//!
//! With `credentials.oauth2` the header carries an access token from the integration's
//! [`TokenManager`] (see [`crate::oauth`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::SystemTime;

use http::{HeaderName, Request, StatusCode};
use tokio::time::Instant;
use tower::layer::{LayerFn, layer_fn};
use tower::{Service, ServiceExt};

use super::{BoxFuture, Call, CallError, CallResult, rate_limit, retry};
use crate::answer::Reason;
use crate::body::{ReqBody, RespBody};
use crate::oauth::TokenManager;
use crate::telemetry::metrics::{CredentialKeyLabels, Metrics};
use crate::telemetry::spans::AttemptSpan;

pub(crate) fn layer<S>(metrics: Arc<Metrics>) -> LayerFn<impl Fn(S) -> Credentials<S> + Clone> {
    layer_fn(move |inner| Credentials {
        inner,
        metrics: metrics.clone(),
    })
}

#[derive(Clone, Debug)]
pub(crate) struct Credentials<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Which key of a rotation window a partner answer came for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    Primary,
    Secondary,
}

impl Key {
    fn as_str(self) -> &'static str {
        match self {
            Key::Primary => "primary",
            Key::Secondary => "secondary",
        }
    }
}

/// Counts an answer the partner gave to `key` (a 401 is a refusal, not a service).
fn count(metrics: &Metrics, call: &Call, key: Key, result: &CallResult) {
    let Ok(resp) = result else { return };
    if resp.status() == StatusCode::UNAUTHORIZED {
        return;
    }
    metrics
        .credential_keys
        .get_or_create(&CredentialKeyLabels {
            integration: call.integration.label.to_string(),
            key: key.as_str().to_string(),
        })
        .inc();
    let traffic = &call.integration.state.traffic;
    match key {
        Key::Primary => {
            traffic.primary_served.fetch_add(1, Ordering::Relaxed);
        }
        Key::Secondary => {
            traffic.secondary_served.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            traffic.secondary_last_used.store(now, Ordering::Relaxed);
        }
    }
}

impl<S> Service<Request<ReqBody>> for Credentials<S>
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<CallResult>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let integration = call.integration.clone();
        let Some(policy) = &integration.policy.credentials else {
            return Box::pin(self.inner.call(req));
        };
        // Whatever the app sent under this header never reaches the partner.
        req.headers_mut().remove(&policy.header);
        if policy.oauth2.is_some() {
            let clone = self.inner.clone();
            let inner = std::mem::replace(&mut self.inner, clone);
            let manager = integration.token.clone();
            let header = policy.header.clone();
            return Box::pin(with_token(
                inner,
                req,
                call,
                manager,
                header,
                self.metrics.clone(),
            ));
        }
        let Some(primary) = &integration.credential else {
            return Box::pin(self.inner.call(req));
        };
        req.headers_mut()
            .insert(policy.header.clone(), primary.clone());
        let Some(secondary) = integration.secondary_credential.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let header = policy.header.clone();
        let spare = retry::spare_copy(&req);
        // The service polled ready goes with the call; a clone stays behind for the next
        // `poll_ready` (tower's `Service::call` docs).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let first = inner.call(req).await;
            let refused = matches!(&first, Ok(r) if r.status() == StatusCode::UNAUTHORIZED);
            let Some(mut again) = spare.filter(|_| refused) else {
                count(&metrics, &call, Key::Primary, &first);
                return first;
            };
            if !admit_resend(&call, &metrics, again.headers()).await {
                return first;
            }
            drop(first);
            again.headers_mut().insert(header, secondary);
            let second = send(&mut inner, again).await;
            count(&metrics, &call, Key::Secondary, &second);
            second
        })
    }
}

/// An OAuth2 call: the cached token (or the one fetch in flight), and on a partner 401 one
/// refresh and one more send when the body can be resent. Without a token the call is answered
/// `credential-unavailable` and the partner never sees it.
async fn with_token<S>(
    mut inner: S,
    mut req: Request<ReqBody>,
    call: Arc<Call>,
    manager: Option<Arc<TokenManager>>,
    header: HeaderName,
    metrics: Arc<Metrics>,
) -> CallResult
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
{
    let span = req.extensions().get::<AttemptSpan>().cloned();
    let Some(manager) = manager else {
        return Err(unavailable(
            &call,
            span.as_ref(),
            "the OAuth2 client credentials (credentials.oauth2.clientIdRef, clientSecretRef) are not available",
        ));
    };
    let token = manager
        .token(call.deadline)
        .await
        .map_err(|u| unavailable(&call, span.as_ref(), &u.0))?;
    let spare = retry::spare_copy(&req);
    req.headers_mut()
        .insert(header.clone(), token.value.clone());
    let first = inner.call(req).await;
    let refused = matches!(&first, Ok(r) if r.status() == StatusCode::UNAUTHORIZED);
    if !refused {
        return first;
    }
    // The partner no longer takes this token: one refresh, shared with every call that got
    // the same 401.
    manager.reject(&token);
    let Some(mut again) = spare else {
        return first;
    };
    if !admit_resend(&call, &metrics, again.headers()).await {
        return first;
    }
    let fresh = manager
        .token(call.deadline)
        .await
        .map_err(|u| unavailable(&call, span.as_ref(), &u.0))?;
    drop(first);
    again.headers_mut().insert(header, fresh.value);
    send(&mut inner, again).await
}

/// The `credential-unavailable` answer, with an event on the attempt's span saying why.
fn unavailable(call: &Call, span: Option<&AttemptSpan>, why: &str) -> CallError {
    tracing::info!(integration = %call.integration.label, why, "credential unavailable; the call is not sent");
    if let Some(span) = span {
        span.event("tollgate.credential_unavailable", why);
    }
    CallError::Answer(call.answer(
        Reason::CredentialUnavailable,
        format!("no credential to send, so the call was not sent: {why}"),
    ))
}

/// Sends `req` once the service is ready.
pub(crate) async fn send<S>(inner: &mut S, req: Request<ReqBody>) -> CallResult
where
    S: Service<Request<ReqBody>, Response = http::Response<RespBody>, Error = CallError>,
{
    inner.ready().await?.call(req).await
}

/// Whether a second send of the call may go: it spends a token of the call's quotas like any
/// attempt (waiting for one in queue mode, within the deadline).
pub(crate) async fn admit_resend(
    call: &Call,
    metrics: &Metrics,
    headers: &http::HeaderMap,
) -> bool {
    let now = Instant::now();
    if now >= call.deadline {
        return false;
    }
    match rate_limit::charge(call, headers, metrics, now, std::time::Duration::ZERO) {
        None => true,
        Some(Ok(wait)) => {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            true
        }
        Some(Err(_)) => false,
    }
}
