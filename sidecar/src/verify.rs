//! The start-up check of a credential (`credentials.verify`): when a revision brings an
//! integration a new credential (or a new check), the sidecar sends the check's request
//! through its own policy stack, as an app call would go, and keeps whether the partner
//! answered the expected status. Cluster mode reports the result to the operator, which shows
//! it as condition `CredentialVerified` and an Event; the log says it in both modes.
//!
//! The check runs once per credential and sidecar; it is a call like any other (quotas,
//! breaker and metrics count it). An answer the sidecar gives itself (kill switch, rate
//! limited, `credential-unavailable`, ...) is a failed check naming that reason.

use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use tokio::time::Instant;
use tollgate_crds::distribution::{CredentialCheckResult, MAX_CHECK_MESSAGE_BYTES};
use tower::ServiceExt;

use crate::body::ReqBody;
use crate::config::{Integration, Store};
use crate::layers::{Call, Stack};

/// One integration's check, carried across revisions.
#[derive(Debug, Default)]
pub struct CheckState {
    /// Fingerprint of the credential and check last run (in memory only).
    checked: Mutex<Option<u64>>,
    result: Mutex<Option<CredentialCheckResult>>,
}

impl CheckState {
    /// The latest result, if the check for the credential in force has run.
    pub fn result(&self) -> Option<CredentialCheckResult> {
        self.result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `fingerprint` is new; if so, the previous result is forgotten.
    fn claim(&self, fingerprint: u64) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if *checked == Some(fingerprint) {
            return false;
        }
        *checked = Some(fingerprint);
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = None;
        true
    }

    fn set(&self, r: CredentialCheckResult) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
}

/// What makes a check due again: the check itself and the credential (its values hashed in
/// memory, never kept or shown).
fn fingerprint(i: &Integration) -> Option<u64> {
    let c = i.policy.credentials.as_ref()?;
    let v = c.verify.as_ref()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (v.method.as_str(), &v.path, v.expect_status).hash(&mut h);
    i.credential.as_ref().map(|v| v.as_bytes()).hash(&mut h);
    i.secondary_credential
        .as_ref()
        .map(|v| v.as_bytes())
        .hash(&mut h);
    i.token
        .as_ref()
        .map(|t| Arc::as_ptr(t) as usize)
        .hash(&mut h);
    Some(h.finish())
}

/// Runs the checks that are due whenever a revision is published.
pub async fn run(store: Arc<Store>, stack: Stack) {
    let mut changed = store.subscribe();
    loop {
        let revision = store.load_full();
        for i in &revision.integrations {
            if let Some(fp) = fingerprint(i)
                && i.state.check.claim(fp)
            {
                tokio::spawn(check(i.clone(), stack.clone()));
            }
        }
        drop(revision);
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Sends the check through the stack and keeps the result.
async fn check(integration: Arc<Integration>, stack: Stack) {
    let Some(v) = integration
        .policy
        .credentials
        .as_ref()
        .and_then(|c| c.verify.clone())
    else {
        return;
    };
    let route = integration.route_index(&v.method, &v.path);
    let now = Instant::now();
    let call = Arc::new(Call {
        integration: integration.clone(),
        route,
        deadline: now + integration.route(route).timeouts.total,
        started: now,
        attempts: AtomicU32::new(0),
        client: None,
    });
    let mut req = Request::new(ReqBody::Full(Bytes::new()));
    *req.method_mut() = v.method.clone();
    *req.uri_mut() = match v.path.parse() {
        Ok(u) => u,
        Err(_) => return,
    };
    req.extensions_mut().insert(call);
    let resp = match stack.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    let sidecar_reason = resp
        .headers()
        .get(crate::answer::REASON_HEADER)
        .and_then(|r| r.to_str().ok())
        .map(str::to_string);
    drop(resp);
    let what = format!("{} {}", v.method, v.path);
    let (ok, mut message) = match sidecar_reason {
        Some(reason) => (
            false,
            format!("{what} was answered by the sidecar, not the partner: {reason} ({status})"),
        ),
        None if status == v.expect_status => {
            (true, format!("{what}: the partner answered {status}"))
        }
        None => (
            false,
            format!(
                "{what}: the partner answered {status}, not {}",
                v.expect_status
            ),
        ),
    };
    message.truncate(MAX_CHECK_MESSAGE_BYTES);
    if ok {
        tracing::info!(integration = %integration.label, %message, "credential check passed");
    } else {
        tracing::warn!(integration = %integration.label, %message, "credential check failed");
    }
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    integration
        .state
        .check
        .set(CredentialCheckResult { ok, message, at });
}
