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

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tollgate_crds::distribution::TOKEN_AUDIENCE;

use super::hub::PodIdentity;

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Why a subscription was refused. `Unavailable` is the operator's problem (503, retry);
/// everything else is the client's (401/403).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
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
        matches!(self, AuthError::Unavailable(_))
    }
}

/// Verifies tokens with the operator's kube client.
#[derive(Clone)]
pub struct Authenticator {
    client: kube::Client,
}

impl Authenticator {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    pub async fn authenticate(&self, token: &str) -> Result<PodIdentity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
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
        })
    }
}
