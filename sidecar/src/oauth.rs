//! OAuth 2.0 client credentials (RFC 6749 section 4.4): one token manager per integration.
//!
//! The manager fetches an access token from the token endpoint, caches it and refreshes it
//! before it expires (`refreshBefore`, by default 5 minutes or 10% of its lifetime, whichever is
//! shorter). A call finds the token in the cache; a call that finds it due for refresh starts one
//! refresh in the background and goes with the cached token. A call that finds no valid token
//! waits for the one fetch in flight (single flight: however many calls wait, the endpoint is
//! asked once) up to the call's deadline.
//!
//! The token endpoint has a small policy stack of its own: each attempt has a timeout, a fetch
//! retries connect errors, resets, timeouts, 429 and 5xx with exponential backoff and jitter,
//! and a breaker stops asking an endpoint that keeps failing (calls then fail at once).
//!
//! A refresh that fails leaves the old token in use until it expires (see [`expiry_skew`]); after that calls are
//! answered `credential-unavailable` (503) and nothing is sent unauthenticated. Every failed
//! fetch counts in `tollgate_credential_refresh_failures_total` and is logged with why (never a
//! token or secret). The endpoint's answers are hostile: the body is bounded, every field is
//! checked and a bad one is named.
//!
//! Tokens live in memory only, in header values marked sensitive; `Debug` redacts them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tollgate_crds::policy::{BreakerPolicy, CredentialPolicy, OAuth2Policy, refresh_margin};
use tollgate_crds::v1alpha1::OAuth2AuthMethod;

use crate::body::ReqBody;
use crate::client::HttpClient;
use crate::engine::backoff::Backoff;
use crate::engine::breaker::{Breaker, BreakerState, CallOutcome};
use crate::telemetry::metrics::{IntegrationLabels, Metrics};

/// Largest token endpoint answer read.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest access token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// How long before the endpoint's expiry a token stops being sent: a tenth of its lifetime, at
/// most 5 seconds.
fn expiry_skew(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(5))
}

/// Lifetime assumed when the endpoint gives no `expires_in` (RFC 6749 makes it optional).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Longest lifetime believed.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// One attempt at the token endpoint.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per fetch.
pub const MAX_ATTEMPTS: u32 = 3;

/// The breaker of a token endpoint: three failed fetches in a row open it for five seconds.
fn breaker_policy() -> BreakerPolicy {
    BreakerPolicy {
        window: Duration::from_secs(30),
        minimum_requests: 20,
        failure_rate_percent: 100,
        consecutive_failures: 3,
        slow_call_duration: None,
        open_duration: Duration::from_secs(5),
        half_open_probes: 1,
    }
}

/// A token as the partner receives it: the rendered header value (sensitive).
#[derive(Clone)]
pub struct Token {
    pub value: HeaderValue,
    pub expires_at: Instant,
    refresh_at: Instant,
    /// Counts fetched tokens: tells a token from its successor.
    pub serial: u64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// What the manager was built from: a change of any of these makes a new manager.
#[derive(Clone, PartialEq)]
pub struct Key {
    oauth2: OAuth2Policy,
    prefix: String,
    suffix: String,
    client_id: String,
    client_secret: String,
}

struct State {
    token: Option<Token>,
    fetching: bool,
    /// Why the last fetch failed, if it did.
    last_error: Option<String>,
    serial: u64,
}

pub struct TokenManager {
    key: Key,
    label: Arc<str>,
    client: HttpClient,
    metrics: Arc<Metrics>,
    breaker: Arc<Breaker>,
    state: Mutex<State>,
    /// Bumped when a fetch ends, successful or not.
    done: watch::Sender<u64>,
    /// Token fetches that failed (after their retries), for status reports.
    pub failures: AtomicU64,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("integration", &self.label)
            .field("token_url", &self.key.oauth2.token_url)
            .finish_non_exhaustive()
    }
}

/// Why a call has no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl TokenManager {
    /// The key of a manager for `policy` with these client credentials; `None` without
    /// `oauth2`.
    pub fn key(policy: &CredentialPolicy, client_id: &str, client_secret: &str) -> Option<Key> {
        Some(Key {
            oauth2: policy.oauth2.clone()?,
            prefix: policy.prefix.clone(),
            suffix: policy.suffix.clone(),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
        })
    }

    pub fn new(key: Key, label: Arc<str>, client: HttpClient, metrics: Arc<Metrics>) -> Self {
        TokenManager {
            key,
            label,
            client,
            metrics,
            breaker: Arc::new(Breaker::new(breaker_policy())),
            state: Mutex::new(State {
                token: None,
                fetching: false,
                last_error: None,
                serial: 0,
            }),
            done: watch::Sender::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Whether this manager was built from `key` (then it carries over to a new revision).
    pub fn is_for(&self, key: &Key) -> bool {
        &self.key == key
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A valid token, waiting for a fetch until `deadline` if there is none.
    pub async fn token(self: &Arc<Self>, deadline: Instant) -> Result<Token, Unavailable> {
        let mut waited = false;
        loop {
            let mut done = self.done.subscribe();
            {
                let mut s = self.lock();
                let now = Instant::now();
                if let Some(t) = s.token.clone().filter(|t| now < t.expires_at) {
                    // While the endpoint's breaker is open the old token serves; no refresh.
                    if now >= t.refresh_at && !s.fetching && !self.endpoint_open(now) {
                        s.fetching = true;
                        tokio::spawn(self.clone().fetch());
                    }
                    return Ok(t);
                }
                if waited && let Some(why) = &s.last_error {
                    // The fetch this call waited for failed.
                    return Err(Unavailable(why.clone()));
                }
                // Not waited yet, or the token fetched meanwhile was already refused (401):
                // wait for a (new) fetch, unless the endpoint's breaker is open.
                if !s.fetching && self.endpoint_open(now) {
                    let why = s
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "token endpoint: failing".to_string());
                    return Err(Unavailable(format!(
                        "{why}; it failed repeatedly and is not asked again for a few seconds"
                    )));
                }
                if !s.fetching {
                    s.fetching = true;
                    tokio::spawn(self.clone().fetch());
                }
                done.mark_unchanged();
            }
            if tokio::time::timeout_at(deadline, done.changed())
                .await
                .is_err()
            {
                return Err(Unavailable(
                    "no access token from the token endpoint within the call's deadline".into(),
                ));
            }
            waited = true;
        }
    }

    /// Whether the token endpoint's breaker is open (calls fail fast, nothing is fetched).
    fn endpoint_open(&self, now: Instant) -> bool {
        self.breaker.state(now) == BreakerState::Open
    }

    /// The partner refused `used` (401): forget it unless a newer one already replaced it, so
    /// the next [`TokenManager::token`] fetches one.
    pub fn reject(&self, used: &Token) {
        let mut s = self.lock();
        if s.token.as_ref().is_some_and(|t| t.serial == used.serial) {
            s.token = None;
        }
    }

    /// One fetch, with its retries, then the waiting calls are woken.
    async fn fetch(self: Arc<Self>) {
        // The endpoint counts the lifetime from when it issued the token, which is after this.
        let fetch_started = Instant::now();
        let result = match self.breaker.try_acquire(fetch_started) {
            // Not asked: nothing failed anew (the last error stands).
            Err(_) => {
                let mut s = self.lock();
                s.fetching = false;
                drop(s);
                self.done.send_modify(|v| *v = v.wrapping_add(1));
                return;
            }
            Ok(permit) => {
                let started = Instant::now();
                let r = self.attempts().await;
                let outcome = if r.is_ok() {
                    CallOutcome::Success
                } else {
                    CallOutcome::Failure
                };
                permit.record(outcome, started.elapsed(), Instant::now());
                r
            }
        };
        let mut s = self.lock();
        match result {
            Ok((value, lifetime)) => {
                s.serial += 1;
                let margin = refresh_margin(self.key.oauth2.refresh_before, lifetime);
                // Counted from before the request, less a skew for calls still in flight when
                // it ends: a call never reaches the partner with a token already expired there.
                let usable = lifetime.saturating_sub(expiry_skew(lifetime));
                s.token = Some(Token {
                    value,
                    expires_at: fetch_started + usable,
                    refresh_at: fetch_started + usable.saturating_sub(margin),
                    serial: s.serial,
                });
                s.last_error = None;
                tracing::debug!(integration = %self.label, lifetime_secs = lifetime.as_secs(), "access token fetched");
            }
            Err(why) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .credential_refresh_failures
                    .get_or_create(&IntegrationLabels {
                        integration: self.label.to_string(),
                    })
                    .inc();
                let kept = s
                    .token
                    .as_ref()
                    .filter(|t| Instant::now() < t.expires_at)
                    .is_some();
                tracing::warn!(integration = %self.label, error = %why, old_token_still_valid = kept, "credential refresh failed");
                s.last_error = Some(format!("token endpoint: {why}"));
            }
        }
        s.fetching = false;
        let n = s.serial;
        drop(s);
        self.done.send_modify(|v| *v = v.wrapping_add(1).max(n));
    }

    /// Up to [`MAX_ATTEMPTS`] attempts; the last error if none succeeds.
    async fn attempts(&self) -> Result<(HeaderValue, Duration), String> {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut n = 0;
        loop {
            n += 1;
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.attempt()).await {
                Ok(Ok(token)) => return Ok(token),
                Ok(Err((why, retriable))) if retriable && n < MAX_ATTEMPTS => {
                    tracing::debug!(integration = %self.label, error = %why, attempt = n, "token endpoint attempt failed; retrying");
                }
                Ok(Err((why, _))) => return Err(why),
                Err(_) if n < MAX_ATTEMPTS => {}
                Err(_) => {
                    return Err(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs()));
                }
            }
            let delay = backoff.delay(n, &mut rand::rng());
            tokio::time::sleep(delay).await;
        }
    }

    /// One request to the token endpoint. `Err((why, retriable))`.
    async fn attempt(&self) -> Result<(HeaderValue, Duration), (String, bool)> {
        let req = self.token_request()?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| (crate::layers::send::error_chain(&e), true))?;
        self.token_from(resp).await
    }

    /// The grant request (RFC 6749 section 4.4.2).
    fn token_request(&self) -> Result<Request<ReqBody>, (String, bool)> {
        let o = &self.key.oauth2;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !o.scopes.is_empty() {
            form.append_pair("scope", &o.scopes.join(" "));
        }
        if let Some(a) = &o.audience {
            form.append_pair("audience", a);
        }
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(&o.token_url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        match o.auth_method {
            OAuth2AuthMethod::Basic => {
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!(
                    "{}:{}",
                    enc(&self.key.client_id),
                    enc(&self.key.client_secret)
                );
                let mut v = HeaderValue::from_str(&format!(
                    "Basic {}",
                    crate::encoding::base64(pair.as_bytes())
                ))
                .map_err(|_| ("client credentials are not header-safe".to_string(), false))?;
                v.set_sensitive(true);
                req = req.header(header::AUTHORIZATION, v);
            }
            OAuth2AuthMethod::Body => {
                form.append_pair("client_id", &self.key.client_id);
                form.append_pair("client_secret", &self.key.client_secret);
            }
        }
        let body = Bytes::from(form.finish());
        let mut req = req
            .header(header::CONTENT_LENGTH, body.len())
            .body(ReqBody::Full(body))
            .map_err(|e| (format!("tokenUrl: {e}"), false))?;
        if let Some(host) = req.uri().authority().map(|a| a.as_str().to_string())
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            req.headers_mut().insert(header::HOST, v);
        }
        Ok(req)
    }

    /// The token in a token endpoint's answer, checked and rendered.
    async fn token_from(
        &self,
        resp: http::Response<crate::pool::PoolBody>,
    ) -> Result<(HeaderValue, Duration), (String, bool)> {
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE_BYTES);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| {
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                if too_big {
                    (
                        format!("answer larger than {MAX_TOKEN_RESPONSE_BYTES} bytes"),
                        false,
                    )
                } else {
                    (format!("answer body broke off: {e}"), true)
                }
            })?
            .to_bytes();
        if !status.is_success() {
            let retriable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            let code = error_code(&bytes)
                .map(|c| format!(" (error {c:?})"))
                .unwrap_or_default();
            return Err((format!("answered {}{code}", status.as_u16()), retriable));
        }
        let parsed = parse_token_response(&bytes).map_err(|e| (e, false))?;
        let key = &self.key;
        let mut value = HeaderValue::from_str(&format!(
            "{}{}{}",
            key.prefix, parsed.access_token, key.suffix
        ))
        .map_err(|_| ("access_token: not a valid header value".to_string(), false))?;
        value.set_sensitive(true);
        Ok((value, parsed.lifetime))
    }
}

/// A token endpoint's successful answer, checked.
#[derive(PartialEq, Eq)]
pub struct TokenResponse {
    pub access_token: String,
    pub lifetime: Duration,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Parses a token endpoint's JSON answer (RFC 6749 section 5.1). The error names the field at
/// fault and never echoes a token.
pub fn parse_token_response(body: &[u8]) -> Result<TokenResponse, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| "answer is not a JSON object".to_string())?;
    let access_token = match obj.get("access_token") {
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
        Some(serde_json::Value::String(_)) => return Err("access_token: empty".into()),
        Some(_) => return Err("access_token: not a string".into()),
        None => return Err("access_token: missing".into()),
    };
    if access_token.len() > MAX_TOKEN_BYTES {
        return Err(format!("access_token: longer than {MAX_TOKEN_BYTES} bytes"));
    }
    if !access_token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("access_token: characters a header value cannot carry".into());
    }
    match obj.get("token_type") {
        None => {}
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(serde_json::Value::String(t)) => {
            let shown: String = t.chars().take(32).filter(|c| !c.is_control()).collect();
            return Err(format!("token_type: {shown:?} is not Bearer"));
        }
        Some(_) => return Err("token_type: not a string".into()),
    }
    let lifetime = match obj.get("expires_in") {
        None | Some(serde_json::Value::Null) => DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => seconds(n.as_f64())?,
        // Some endpoints send the number as a string.
        Some(serde_json::Value::String(s)) => seconds(s.trim().parse::<f64>().ok())?,
        Some(_) => return Err("expires_in: not a number".into()),
    };
    Ok(TokenResponse {
        access_token,
        lifetime,
    })
}

/// `expires_in` as a lifetime: positive, at most [`MAX_LIFETIME`] (longer is cut).
fn seconds(n: Option<f64>) -> Result<Duration, String> {
    match n {
        Some(s) if s.is_finite() && s > 0.0 => {
            Ok(Duration::from_secs_f64(s.min(MAX_LIFETIME.as_secs_f64())))
        }
        _ => Err("expires_in: not a positive number of seconds".into()),
    }
}

/// The `error` code of an error answer (RFC 6749 section 5.2), if it is a short token.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = v.get("error")?.as_str()?;
    (code.len() <= 64 && code.bytes().all(|b| b.is_ascii_graphic())).then(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_are_checked_field_by_field() {
        let ok = parse_token_response(
            br#"{"access_token":"abc","token_type":"bearer","expires_in":120}"#,
        )
        .unwrap();
        assert_eq!(ok.access_token, "abc");
        assert_eq!(ok.lifetime, Duration::from_secs(120));
        let s = parse_token_response(br#"{"access_token":"abc","expires_in":"60"}"#).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(60));
        let none = parse_token_response(br#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(none.lifetime, DEFAULT_LIFETIME);
        let huge = parse_token_response(br#"{"access_token":"abc","expires_in":1e300}"#).unwrap();
        assert_eq!(huge.lifetime, MAX_LIFETIME);
        let err = |b: &[u8]| parse_token_response(b).unwrap_err();
        assert!(err(b"<html>").starts_with("answer is not JSON"));
        assert_eq!(err(b"[1]"), "answer is not a JSON object");
        assert_eq!(err(br#"{"token_type":"bearer"}"#), "access_token: missing");
        assert_eq!(err(br#"{"access_token":7}"#), "access_token: not a string");
        assert_eq!(err(br#"{"access_token":""}"#), "access_token: empty");
        assert!(err(br#"{"access_token":"a\nb"}"#).starts_with("access_token: characters"));
        let long = format!(
            r#"{{"access_token":"{}"}}"#,
            "a".repeat(MAX_TOKEN_BYTES + 1)
        );
        assert!(err(long.as_bytes()).starts_with("access_token: longer"));
        assert_eq!(
            err(br#"{"access_token":"abc","token_type":"mac"}"#),
            "token_type: \"mac\" is not Bearer"
        );
        for bad in ["-1", "0", "\"soon\"", "true"] {
            let body = format!(r#"{{"access_token":"abc","expires_in":{bad}}}"#);
            assert!(
                err(body.as_bytes()).starts_with("expires_in:"),
                "{bad}: {}",
                err(body.as_bytes())
            );
        }
        // The token never shows in Debug.
        assert!(!format!("{ok:?}").contains("abc"));
    }

    #[test]
    fn the_refresh_margin_defaults_to_five_minutes_or_a_tenth() {
        let m = |before: Option<u64>, life: u64| {
            refresh_margin(before.map(Duration::from_secs), Duration::from_secs(life)).as_secs()
        };
        assert_eq!(m(None, 3600), 300);
        assert_eq!(m(None, 600), 60);
        assert_eq!(m(Some(30), 3600), 30);
        // Never the whole lifetime.
        assert_eq!(m(Some(3600), 100), 90);
    }
}
