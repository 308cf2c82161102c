//! Who is on the other end of a stream: a pod, proven by its projected ServiceAccount token.
//!
//! 1. TokenReview (audience `tollgate`) with the operator's own credentials: the token must be
//!    authenticated and issued for that audience.
//! 2. The user must be a ServiceAccount (`system:serviceaccount:<namespace>:<name>`); its
//!    namespace is the only namespace the stream may see.
//! 3. The token must be bound to a pod (`extra["authentication.kubernetes.io/pod-name"]`, set
//!    for projected tokens). A token not bound to a pod (a legacy Secret token, or one from
//!    `kubectl create token` without `--bound-object-kind Pod`) is refused: without a pod
//!    there are no labels to match `workloadSelector`s against, and serving the whole
//!    namespace would hand every workload's credentials to any ServiceAccount in it.
//! 4. The Pod is read from the API: it must exist, carry the uid the token was bound to
//!    (a pod recreated under the same name is a different pod), and not have finished. Its
//!    labels select the integrations.
//!
//! Before any of that, the bearer must look like what the API server issues for projected
//! tokens (a JWT) and its `exp` must lie ahead: junk costs no TokenReview. A token the API
//! server refused is remembered (by its SHA-256, never the token) for `refused_ttl`, and at
//! most `max_reviews` TokenReviews are in flight at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tollgate_crds::distribution::TOKEN_AUDIENCE;

use super::hub::PodIdentity;
use crate::metrics::Metrics;

/// Most refused tokens remembered at once.
const MAX_REMEMBERED: usize = 10_000;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Why a subscription was refused. `Unavailable` is the operator's problem (503, retry);
/// everything else is the client's (401/403).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
    #[error("bearer token is not a JWT")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("too many subscriptions being verified; retry")]
    Busy,
    #[error("pod {pod} already holds {max} streams")]
    TooManyStreams { pod: String, max: usize },
    #[error("token rejected by TokenReview{}", .0.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    Rejected(Option<String>),
    #[error("token was not issued for audience {TOKEN_AUDIENCE:?}")]
    WrongAudience,
    #[error("token does not belong to a ServiceAccount")]
    NotServiceAccount,
    #[error(
        "token is not bound to a pod: mount a projected serviceAccountToken with audience {TOKEN_AUDIENCE:?}"
    )]
    NotBoundToPod,
    #[error("pod {0} not found or not running")]
    PodGone(String),
    #[error("pod {0} was recreated since the token was issued")]
    PodUidMismatch(String),
    #[error("client says it is {claimed}, token says {actual}")]
    IdentityMismatch { claimed: String, actual: String },
    #[error("cannot verify the token now: {0}")]
    Unavailable(#[source] kube::Error),
}

impl AuthError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::Busy => "busy",
            AuthError::TooManyStreams { .. } => "stream_limit",
            AuthError::Rejected(_) => "rejected",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::NotServiceAccount => "not_service_account",
            AuthError::NotBoundToPod => "not_bound_to_pod",
            AuthError::PodGone(_) => "pod_gone",
            AuthError::PodUidMismatch(_) => "pod_uid_mismatch",
            AuthError::IdentityMismatch { .. } => "identity_mismatch",
            AuthError::Unavailable(_) => "unavailable",
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::Unavailable(_) | AuthError::Busy)
    }

    /// The same answer again, for refusals that hold for the token whenever it is shown.
    fn replay(&self) -> Option<AuthError> {
        Some(match self {
            AuthError::Rejected(m) => AuthError::Rejected(m.clone()),
            AuthError::WrongAudience => AuthError::WrongAudience,
            AuthError::NotServiceAccount => AuthError::NotServiceAccount,
            AuthError::NotBoundToPod => AuthError::NotBoundToPod,
            AuthError::PodGone(p) => AuthError::PodGone(p.clone()),
            AuthError::PodUidMismatch(p) => AuthError::PodUidMismatch(p.clone()),
            _ => return None,
        })
    }
}

/// The `exp` of a JWT-shaped token, unix seconds (`None`: no `exp` claim). Err: not a JWT.
/// Nothing is verified here; the TokenReview does that.
pub fn token_expiry(token: &str) -> Result<Option<u64>, AuthError> {
    let mut parts = token.split('.');
    let (Some(_), Some(claims), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let json = b64url_decode(claims).ok_or(AuthError::Malformed)?;
    let c: Claims = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    Ok(c.exp)
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Tokens the API server refused, by SHA-256, until a deadline; bounded.
#[derive(Default)]
struct Refused(HashMap<[u8; 32], (AuthError, Instant)>);

impl Refused {
    fn get(&mut self, k: &[u8; 32], now: Instant) -> Option<AuthError> {
        match self.0.get(k) {
            Some((e, until)) if *until > now => e.replay(),
            Some(_) => {
                self.0.remove(k);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, k: [u8; 32], e: AuthError, until: Instant, now: Instant) {
        if self.0.len() >= MAX_REMEMBERED {
            self.0.retain(|_, (_, u)| *u > now);
        }
        if self.0.len() >= MAX_REMEMBERED {
            // Still full of live entries: start over rather than grow.
            self.0.clear();
        }
        self.0.insert(k, (e, until));
    }
}

/// Verifies tokens with the operator's kube client.
#[derive(Clone)]
pub struct Authenticator {
    client: kube::Client,
    refused: Arc<Mutex<Refused>>,
    refused_ttl: Duration,
    reviews: Arc<Semaphore>,
}

impl Authenticator {
    pub fn new(client: kube::Client) -> Self {
        Self::with_limits(client, Duration::from_secs(30), 32)
    }

    /// Remembers refused tokens for `refused_ttl`; at most `max_reviews` TokenReviews at once.
    pub fn with_limits(client: kube::Client, refused_ttl: Duration, max_reviews: usize) -> Self {
        Self {
            client,
            refused: Arc::default(),
            refused_ttl,
            reviews: Arc::new(Semaphore::new(max_reviews.max(1))),
        }
    }

    /// A new subscriber: local checks, then the cache of refusals, then (waiting at most
    /// `wait` for a turn) the TokenReview and the Pod.
    pub async fn admit(
        &self,
        token: &str,
        metrics: &Metrics,
        wait: Duration,
    ) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if let Some(exp) = token_expiry(token)?
            && exp <= unix_now()
        {
            return Err(AuthError::Expired);
        }
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let lock = || self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = lock().get(&key, Instant::now()) {
            metrics.token_review_cache_hits.inc();
            return Err(e);
        }
        let _turn = tokio::time::timeout(wait, self.reviews.acquire())
            .await
            .map_err(|_| AuthError::Busy)?
            .map_err(|_| AuthError::Busy)?;
        metrics.token_reviews.inc();
        let result = self.authenticate(token).await;
        if let Err(e) = &result
            && let Some(again) = e.replay()
        {
            let now = Instant::now();
            lock().insert(key, again, now + self.refused_ttl, now);
        }
        result
    }

    /// TokenReview and Pod, every time (also how an open stream is re-checked).
    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        let token_expiry = token_expiry(token)
            .ok()
            .flatten()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let status = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Unavailable)?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(status.error));
        }
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE))
        {
            return Err(AuthError::WrongAudience);
        }
        let user = status.user.unwrap_or_default();
        let namespace = user
            .username
            .as_deref()
            .and_then(|u| u.strip_prefix(SA_PREFIX))
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns.to_string())
            .ok_or(AuthError::NotServiceAccount)?;
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod_name = first(POD_NAME).ok_or(AuthError::NotBoundToPod)?;
        let pod_uid = first(POD_UID);

        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let who = format!("{namespace}/{pod_name}");
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(AuthError::Unavailable)?
            .ok_or_else(|| AuthError::PodGone(who.clone()))?;
        if let (Some(want), Some(have)) = (&pod_uid, &pod.metadata.uid)
            && want != have
        {
            return Err(AuthError::PodUidMismatch(who));
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        // A terminating pod still serves during its grace period; a finished one does not.
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return Err(AuthError::PodGone(who));
        }
        Ok(PodIdentity {
            namespace,
            name: pod_name,
            uid: pod.metadata.uid.clone(),
            labels: pod.metadata.labels.unwrap_or_else(BTreeMap::new),
            token_expiry,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_tokens_pass_and_their_exp_is_read() {
        // {"exp":1700000000}
        let t = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDB9.c2ln";
        assert_eq!(token_expiry(t).unwrap(), Some(1_700_000_000));
        for junk in ["", "abc", "a.b", "a.b.c.d", "a.!!.c", "a.bm90IGpzb24.c"] {
            assert!(
                matches!(token_expiry(junk), Err(AuthError::Malformed)),
                "{junk}"
            );
        }
    }
}
