//! The controller's errors. Every variant has a `metric_label()` so errors are counted by reason.

use kube::runtime::finalizer;

/// Why a reconcile failed. All of these are retried with backoff by the error policy; an
/// invalid spec is not an error (it is reported as condition `Invalid`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed (reading the Secret, writing status).
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),

    /// Adding or removing the finalizer, or the apply/cleanup inside it, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    /// The object came without a namespace or name (never from a namespaced watch).
    #[error("PartnerIntegration has no {0}")]
    MissingMetadata(&'static str),

    /// A watch cache has not finished its initial list yet; retried.
    #[error("the cache of {0} has not finished its initial list")]
    CacheNotReady(&'static str),

    /// Serializing the status patch failed.
    #[error("serializing status: {0}")]
    Serialize(#[source] serde_json::Error),
}

impl Error {
    /// Low-cardinality label for `tollgate_operator_reconcile_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(e) => kube_label(e),
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.metric_label()
                }
                finalizer::Error::AddFinalizer(_) | finalizer::Error::RemoveFinalizer(_) => {
                    "finalizer"
                }
                _ => "finalizer",
            },
            Error::MissingMetadata(_) => "missing_metadata",
            Error::CacheNotReady(_) => "cache_not_ready",
            Error::Serialize(_) => "serialize",
        }
    }
}

fn kube_label(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.is_conflict() => "api_conflict",
        kube::Error::Api(s) if s.is_forbidden() => "api_forbidden",
        kube::Error::Api(s) if s.is_not_found() => "api_not_found",
        kube::Error::Api(_) => "api_error",
        _ => "api_unreachable",
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
