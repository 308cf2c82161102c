//! The policy pipeline: one tower layer per policy, in the order a request meets them.
//!
//! ```text
//! observe -> fallback -> kill switch -> version gate -> rate limit -> adaptive -> concurrency
//!         -> circuit breaker -> contract -> retry -> credentials -> attempt timeout -> send
//! ```
//!
//! Layers are static; the policy for a request travels with it as a [`Call`] in the request's
//! extensions (the integration and route it matched, in the revision it started under, and its
//! total deadline). A layer reads its policy from [`Call::route_policy`] and its route's state
//! (quota, breaker, retry budget, metrics) from [`Call::route_state`]. Every layer's error is a
//! [`CallError`]; `observe` turns what remains into the sidecar's answer (api.md section 3).
//!
//! Kill switch, version gate and rate limit decide before the call and share one shape, a
//! [`gate::Gate`]; the others wrap the call (they see its result). Credentials wrap each
//! attempt: a 401 may be answered by one more send with another key, under its own attempt
//! timeout.

pub(crate) mod adaptive;
pub(crate) mod circuit_breaker;
pub(crate) mod concurrency;
pub(crate) mod contract;
pub(crate) mod credentials;
pub(crate) mod fallback;
pub(crate) mod gate;
pub(crate) mod kill_switch;
pub(crate) mod observe;
pub(crate) mod rate_limit;
pub(crate) mod retry;
pub(crate) mod send;
pub(crate) mod timeout;
pub(crate) mod version_gate;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use http::{Request, Response};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::answer::{Answer, Reason};
use crate::body::{ReqBody, RespBody};
use crate::client::TransportFailure;
use crate::config::Integration;
use crate::telemetry::metrics::{Metrics, RouteMetrics};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One call to a partner as it travels the stack.
#[derive(Debug)]
pub struct Call {
    pub integration: Arc<Integration>,
    /// Index of the matched route ([`crate::config::routes_in_order`]).
    pub route: usize,
    /// When the whole call (queueing, attempts, backoff) must be over: `timeouts.total`.
    pub deadline: Instant,
    pub started: Instant,
    /// Attempts sent to the partner so far.
    pub attempts: AtomicU32,
    /// The address of the app's connection, when a listener knows it.
    pub client: Option<std::net::IpAddr>,
}

impl Call {
    pub fn route_policy(&self) -> &tollgate_crds::policy::RoutePolicy {
        self.integration.route(self.route)
    }

    /// The matched route's state (quota, breaker, budget, metrics) in the call's revision.
    pub fn route_state(&self) -> &crate::state::RouteState {
        self.integration.state.route(self.route)
    }

    pub fn route_name(&self) -> &str {
        &self.route_policy().name
    }

    /// The matched route's metric handles, made on its first call in this revision.
    pub fn metrics(&self, metrics: &Metrics) -> &RouteMetrics {
        self.route_state()
            .metrics
            .get_or_init(|| RouteMetrics::new(metrics, &self.integration.label, self.route_name()))
    }

    /// An answer attributed to this call's integration and route.
    pub fn answer(&self, reason: Reason, message: impl Into<String>) -> Answer {
        Answer::new(reason, message).at(&self.integration.label, self.route_name())
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    pub fn from_request<B>(req: &Request<B>) -> Arc<Call> {
        req.extensions()
            .get::<Arc<Call>>()
            .cloned()
            .expect("the proxy attaches a Call to every request entering the stack")
    }
}

/// Why a call did not produce a partner response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The sidecar decided (kill switch, limits, breaker, ...).
    #[error(transparent)]
    Answer(#[from] Answer),
    /// The attempt could not reach the partner or the connection broke.
    #[error("{kind:?}: {message}")]
    Transport {
        kind: TransportFailure,
        message: String,
    },
    /// The attempt's deadline passed.
    #[error("attempt timed out")]
    AttemptTimeout,
}

impl CallError {
    /// The answer the app gets for this error.
    pub fn into_answer(self, call: &Call) -> Answer {
        match self {
            CallError::Answer(a) => a,
            CallError::Transport { message, .. } => call.answer(
                Reason::UpstreamUnreachable,
                format!(
                    "partner unreachable after {} attempt(s): {message}",
                    call.attempts().max(1)
                ),
            ),
            CallError::AttemptTimeout => {
                let r = call.route_policy();
                call.answer(
                    Reason::Timeout,
                    format!(
                        "no response within the deadline (timeouts.request {}, timeouts.total {})",
                        tollgate_crds::duration::format(r.timeouts.request),
                        tollgate_crds::duration::format(r.timeouts.total)
                    ),
                )
            }
        }
    }

    /// Whether the partner is to blame (a breaker failure), as opposed to the sidecar's own
    /// decisions.
    pub fn is_partner_failure(&self) -> bool {
        !matches!(self, CallError::Answer(_))
    }
}

pub type CallResult = Result<Response<RespBody>, CallError>;

/// The whole pipeline as one cloneable service.
pub type Stack =
    BoxCloneSyncService<Request<ReqBody>, Response<RespBody>, std::convert::Infallible>;

/// Shared things the layers need.
#[derive(Clone)]
pub struct StackContext {
    pub metrics: Arc<Metrics>,
}

/// Builds the pipeline. The order here is the order of the module docs above.
pub fn stack(ctx: StackContext) -> Stack {
    let svc = ServiceBuilder::new()
        .layer(observe::layer(ctx.metrics.clone()))
        .layer(fallback::layer())
        .layer(kill_switch::layer())
        .layer(version_gate::layer())
        .layer(rate_limit::layer(ctx.metrics.clone()))
        .layer(adaptive::layer(ctx.metrics.clone()))
        .layer(concurrency::layer(ctx.metrics.clone()))
        .layer(circuit_breaker::layer())
        .layer(contract::layer(ctx.metrics.clone()))
        .layer(retry::layer(ctx.metrics.clone()))
        .layer(credentials::layer(ctx.metrics.clone()))
        .layer(timeout::layer())
        .service(send::SendAttempt);
    BoxCloneSyncService::new(svc)
}
