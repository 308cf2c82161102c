//! Stale-if-error cache: the last good response to a GET, served when the partner fails.
//!
//! It follows HTTP caching (RFC 9111) where that decides who may see a stored response:
//!
//! - nothing is stored for a request with `Cache-Control: no-store`, nor from a response with
//!   `Cache-Control` `no-store`, `private`, `no-cache`, `must-revalidate` or `proxy-revalidate`
//!   (the last three forbid serving it stale), nor with `Vary: *`;
//! - the key is the path and query plus a keyed fingerprint of the request's credentials
//!   (`Authorization`, `Proxy-Authorization`, `Cookie`): a response is served only to a request
//!   carrying the same credentials, never across users;
//! - a response with `Vary` is served only to a request whose varying headers have the values
//!   of the request that fetched it;
//! - `Set-Cookie` is never stored, so never replayed.
//!
//! Neither the credentials nor the varying values are kept: only 128-bit keyed fingerprints.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// A stored response. The cache hands it out behind an `Arc`, so serving it copies nothing.
#[derive(Debug, Clone)]
pub(crate) struct CachedResponse {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// When the partner sent it; its age is measured from here.
    pub(crate) stored_at: Instant,
    /// The request headers the response varies on, and a fingerprint of their values then.
    pub(crate) vary: Vary,
}

/// Which request headers a stored response was selected by (its `Vary`), and a keyed
/// fingerprint of the values they had.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Vary {
    names: Vec<HeaderName>,
    fingerprint: u128,
}

/// Request headers that carry who is asking.
const CREDENTIAL_HEADERS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
];

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// The request or the response says `no-store`, or the response is `private`.
    Forbidden(&'static str),
    /// `Vary: *`: no later request can be known to match.
    VaryStar,
    /// Larger than the cache's bound.
    TooLarge,
}

/// Whether `headers` carry a `Cache-Control` directive named `name` (case-insensitive,
/// with or without an argument).
fn has_directive(headers: &HeaderMap, name: &str) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            d.split('=')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(name))
        })
}

/// The request-side and response-side reasons not to store, in RFC 9111 terms.
pub(crate) fn storable(request: &HeaderMap, response: &HeaderMap) -> Result<(), NotStored> {
    if has_directive(request, "no-store") {
        return Err(NotStored::Forbidden("request Cache-Control: no-store"));
    }
    for d in [
        "no-store",
        "private",
        "no-cache",
        "must-revalidate",
        "proxy-revalidate",
    ] {
        if has_directive(response, d) {
            return Err(NotStored::Forbidden(d));
        }
    }
    Ok(())
}

/// The header names a response's `Vary` lists; `None` for `Vary: *`.
fn vary_names(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in response.get_all(header::VARY) {
        // A value that is not text cannot be matched later: treat it as `*`.
        let v = v.to_str().ok()?;
        for n in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if n == "*" {
                return None;
            }
            let n = HeaderName::from_bytes(n.as_bytes()).ok()?;
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Some(names)
}

impl CachedResponse {
    /// The bytes this response counts for against the cache's bound: body, header names and
    /// values, and the names it varies on. (Allocation overhead is not counted; size the bound
    /// with some room.)
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        let vary: usize = self.vary.names.iter().map(|n| n.as_str().len()).sum();
        self.body.len() + headers + vary
    }
}

/// A hit: the response and how old it is.
#[derive(Debug, Clone)]
pub(crate) struct Stale {
    pub(crate) response: Arc<CachedResponse>,
    pub(crate) age: Duration,
}

/// A least-recently-used cache of responses, bounded in entries and in bytes.
///
/// Invariants: at most `max_entries` entries, and the sizes of the entries (key length plus
/// [`CachedResponse::size`]) add up to at most `max_bytes`; an entry larger than `max_bytes`
/// alone is never stored. When a new entry needs room, the least recently stored or served
/// entries go first. `Send + Sync`; share it behind an `Arc`.
#[derive(Debug)]
pub struct StaleCache {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Lru>,
    /// Two independently keyed hashers: a 128-bit fingerprint no one outside can predict.
    keys: (RandomState, RandomState),
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<Arc<str>, Entry>,
    /// Recency: the tick of each entry's last use, oldest first.
    order: BTreeMap<u64, Arc<str>>,
    tick: u64,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    response: Arc<CachedResponse>,
    size: usize,
    tick: u64,
}

// === impl StaleCache ===

impl StaleCache {
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            inner: Mutex::new(Lru::default()),
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    /// A keyed 128-bit fingerprint of the values of `names` in `headers` (absent and empty
    /// differ; every occurrence counts, in order).
    fn fingerprint(&self, names: &[HeaderName], headers: &HeaderMap) -> u128 {
        let mut a = self.keys.0.build_hasher();
        let mut b = self.keys.1.build_hasher();
        for n in names {
            for h in [&mut a, &mut b] {
                h.write(n.as_str().as_bytes());
                h.write_u8(0);
            }
            for v in headers.get_all(n) {
                for h in [&mut a, &mut b] {
                    h.write_u8(1);
                    h.write(v.as_bytes());
                    h.write_u8(0);
                }
            }
        }
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }

    /// The key a GET is stored and looked up under: its path and query and who asks (a
    /// fingerprint of its credentials, none when it carries none).
    pub(crate) fn key(&self, path_and_query: &str, request: &HeaderMap) -> String {
        let anonymous = CREDENTIAL_HEADERS.iter().all(|n| !request.contains_key(n));
        if anonymous {
            format!("{path_and_query} anonymous")
        } else {
            let f = self.fingerprint(&CREDENTIAL_HEADERS, request);
            format!("{path_and_query} {f:032x}")
        }
    }

    /// Stores a good response to `request` under `key` when HTTP caching allows, without its
    /// `Set-Cookie`. A response that may not be stored also drops what was stored under `key`:
    /// the partner no longer wants it kept.
    pub(crate) fn store(
        &self,
        key: &str,
        request: &HeaderMap,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        now: Instant,
    ) -> Result<(), NotStored> {
        let verdict = storable(request, headers).and_then(|()| {
            let names = vary_names(headers).ok_or(NotStored::VaryStar)?;
            let fingerprint = self.fingerprint(&names, request);
            Ok(Vary { names, fingerprint })
        });
        let vary = match verdict {
            Ok(v) => v,
            Err(e) => {
                self.lock().remove(key);
                return Err(e);
            }
        };
        let mut headers = headers.clone();
        headers.remove(header::SET_COOKIE);
        let response = CachedResponse {
            status,
            headers,
            body,
            stored_at: now,
            vary,
        };
        if self.insert(key, response) {
            Ok(())
        } else {
            Err(NotStored::TooLarge)
        }
    }

    /// The response stored under `key` for a request like `request` (same varying header
    /// values), at most `max_age` old at `now`.
    pub(crate) fn lookup(
        &self,
        key: &str,
        request: &HeaderMap,
        max_age: Duration,
        now: Instant,
    ) -> Option<Stale> {
        let hit = self.get(key, max_age, now)?;
        let vary = &hit.response.vary;
        (self.fingerprint(&vary.names, request) == vary.fingerprint).then_some(hit)
    }

    /// Stores `response` under `key`, replacing what was there. Returns whether it was stored:
    /// a response too large for the cache is not, and then the older response under `key` is
    /// dropped too (it is no longer the last good one).
    pub(crate) fn insert(&self, key: &str, response: CachedResponse) -> bool {
        let size = key.len() + response.size();
        let fits = size <= self.max_bytes && self.max_entries > 0;
        // Built outside the lock.
        let response = fits.then(|| Arc::new(response));
        let mut lru = self.lock();
        let Some(response) = response else {
            lru.remove(key);
            return false;
        };
        if let Some(old) = lru.remove(key) {
            // Reuse the key's allocation.
            lru.push(old.0, response, size);
        } else {
            lru.push(Arc::from(key), response, size);
        }
        while lru.entries.len() > self.max_entries || lru.bytes > self.max_bytes {
            lru.pop_oldest();
        }
        true
    }

    /// The response under `key` if it is at most `max_age` old at `now`; a hit counts as a use.
    /// (No `Vary` check: see [`StaleCache::lookup`].)
    pub(crate) fn get(&self, key: &str, max_age: Duration, now: Instant) -> Option<Stale> {
        let mut lru = self.lock();
        let lru = &mut *lru;
        let entry = lru.entries.get_mut(key)?;
        let age = now.saturating_duration_since(entry.response.stored_at);
        if age > max_age {
            return None;
        }
        lru.tick += 1;
        let k = lru.order.remove(&entry.tick)?;
        entry.tick = lru.tick;
        lru.order.insert(entry.tick, k);
        Some(Stale {
            response: Arc::clone(&entry.response),
            age,
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(test)]
    /// The bytes counted against the bound.
    pub(crate) fn total_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // Every mutation keeps the map, the order and the byte count in step before it can
        // panic (only allocation can), so a poisoned cache is still consistent enough to use.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Lru ===

impl Lru {
    fn push(&mut self, key: Arc<str>, response: Arc<CachedResponse>, size: usize) {
        self.tick += 1;
        self.bytes += size;
        self.order.insert(self.tick, Arc::clone(&key));
        self.entries.insert(
            key,
            Entry {
                response,
                size,
                tick: self.tick,
            },
        );
    }

    /// Removes `key`, returning its key allocation and entry.
    fn remove(&mut self, key: &str) -> Option<(Arc<str>, Entry)> {
        let (k, entry) = self.entries.remove_entry(key)?;
        self.order.remove(&entry.tick);
        self.bytes -= entry.size;
        Some((k, entry))
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_first()
            && let Some(entry) = self.entries.remove(&key)
        {
            self.bytes -= entry.size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::CONTENT_TYPE;
    use tokio::time::advance;

    const MINUTE: Duration = Duration::from_secs(60);

    fn response(body: impl Into<Bytes>) -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: body.into(),
            stored_at: Instant::now(),
            vary: Vary::default(),
        }
    }

    fn body(c: &StaleCache, key: &str) -> Option<Bytes> {
        c.get(key, MINUTE, Instant::now())
            .map(|s| s.response.body.clone())
    }

    #[tokio::test(start_paused = true)]
    async fn served_with_its_age_up_to_max_age_only() {
        let c = StaleCache::new(10, 10_000);
        assert!(c.insert("GET /v1/rates", response("rates")));
        advance(Duration::from_secs(45)).await;
        let hit = c.get("GET /v1/rates", MINUTE, Instant::now()).unwrap();
        assert_eq!(hit.age, Duration::from_secs(45));
        assert_eq!(hit.response.status, StatusCode::OK);
        assert_eq!(hit.response.body, "rates");
        assert_eq!(hit.response.headers[CONTENT_TYPE], "text/plain");
        advance(Duration::from_secs(15)).await;
        assert_eq!(
            c.get("GET /v1/rates", MINUTE, Instant::now()).unwrap().age,
            MINUTE
        );
        advance(Duration::from_millis(1)).await;
        assert!(c.get("GET /v1/rates", MINUTE, Instant::now()).is_none());
        // A more lenient caller may still have it.
        assert!(c.get("GET /v1/rates", 2 * MINUTE, Instant::now()).is_some());
        assert!(c.get("GET /other", MINUTE, Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn entry_bound_evicts_the_least_recently_used() {
        let c = StaleCache::new(2, 10_000);
        c.insert("a", response("A"));
        c.insert("b", response("B"));
        // Reading "a" makes "b" the least recently used.
        assert!(body(&c, "a").is_some());
        c.insert("c", response("C"));
        assert_eq!(c.len(), 2);
        assert_eq!(body(&c, "b"), None);
        assert_eq!(body(&c, "a").unwrap(), "A");
        assert_eq!(body(&c, "c").unwrap(), "C");
    }

    #[tokio::test(start_paused = true)]
    async fn byte_bound_evicts_until_it_fits() {
        // Each entry: 1 key byte + 10 body bytes + "content-type" + "text/plain" = 33 bytes.
        assert_eq!(response("0123456789").size() + 1, 33);
        let c = StaleCache::new(100, 100);
        for key in ["a", "b", "c"] {
            assert!(c.insert(key, response("0123456789")));
        }
        assert_eq!(c.total_bytes(), 99);
        c.insert("d", response("0123456789"));
        assert_eq!(c.total_bytes(), 99);
        assert_eq!(body(&c, "a"), None);
        // One large entry pushes out as many as it needs.
        c.insert("e", response("0123456789012345678901234567890123456789"));
        assert_eq!(c.len(), 2);
        assert!(c.total_bytes() <= 100);
        assert!(body(&c, "b").is_none() && body(&c, "c").is_none());
        assert!(body(&c, "d").is_some() && body(&c, "e").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_larger_than_the_bound_is_not_stored() {
        let c = StaleCache::new(100, 40);
        assert!(c.insert("k", response("small")));
        assert!(!c.insert("k", response("x".repeat(41))));
        // Nothing else was evicted to make room, and the superseded entry is gone.
        assert!(c.insert("j", response("j")));
        assert_eq!(body(&c, "k"), None);
        assert_eq!(body(&c, "j").unwrap(), "j");
        assert_eq!(c.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn replacing_a_key_keeps_one_entry_and_the_newest_response() {
        let c = StaleCache::new(10, 1000);
        c.insert("k", response("old"));
        advance(Duration::from_secs(10)).await;
        c.insert("k", response("newer"));
        assert_eq!(c.len(), 1);
        assert_eq!(c.total_bytes(), 1 + response("newer").size());
        let hit = c.get("k", MINUTE, Instant::now()).unwrap();
        assert_eq!(
            (hit.response.body.clone(), hit.age),
            ("newer".into(), Duration::ZERO)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_bounds_store_nothing() {
        for c in [StaleCache::new(0, 1000), StaleCache::new(10, 0)] {
            assert!(!c.insert("k", response("v")));
            assert!(c.is_empty());
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn stored(c: &StaleCache, req: &HeaderMap, resp: &HeaderMap) -> Result<(), NotStored> {
        let key = c.key("/v1/x", req);
        c.store(
            &key,
            req,
            StatusCode::OK,
            resp,
            "body".into(),
            Instant::now(),
        )
    }

    fn served(c: &StaleCache, req: &HeaderMap) -> Option<Stale> {
        c.lookup(&c.key("/v1/x", req), req, MINUTE, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_partition_the_cache_and_set_cookie_is_dropped() {
        let c = StaleCache::new(10, 10_000);
        let alice = headers(&[("authorization", "Bearer alice")]);
        stored(&c, &alice, &headers(&[("set-cookie", "s=1"), ("x-a", "1")])).unwrap();
        let hit = served(&c, &alice).unwrap();
        assert!(!hit.response.headers.contains_key(header::SET_COOKIE));
        assert_eq!(hit.response.headers["x-a"], "1");
        for other in [
            headers(&[]),
            headers(&[("authorization", "Bearer bob")]),
            headers(&[("authorization", "Bearer alice"), ("cookie", "a=1")]),
            headers(&[("proxy-authorization", "Bearer alice")]),
        ] {
            assert!(served(&c, &other).is_none(), "{other:?}");
        }
        // Keys hold no credential.
        assert!(!c.key("/v1/x", &alice).contains("alice"));
    }

    #[tokio::test(start_paused = true)]
    async fn cache_control_and_vary_star_forbid_storing_and_drop_the_old_copy() {
        let c = StaleCache::new(10, 10_000);
        let anon = headers(&[]);
        stored(&c, &anon, &headers(&[])).unwrap();
        for cc in [
            "no-store",
            "Private",
            "private=\"set-cookie\"",
            "no-cache",
            "max-age=0, must-revalidate",
            "proxy-revalidate",
        ] {
            assert!(
                matches!(
                    stored(&c, &anon, &headers(&[("cache-control", cc)])),
                    Err(NotStored::Forbidden(_))
                ),
                "{cc}"
            );
            assert!(served(&c, &anon).is_none(), "{cc}");
        }
        assert_eq!(
            stored(&c, &anon, &headers(&[("vary", "accept, *")])),
            Err(NotStored::VaryStar)
        );
        let no_store = headers(&[("cache-control", "no-store")]);
        assert!(stored(&c, &no_store, &headers(&[])).is_err());
        stored(
            &c,
            &anon,
            &headers(&[("cache-control", "public, max-age=60")]),
        )
        .unwrap();
        assert!(served(&c, &anon).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_varying_response_matches_only_the_same_values() {
        let c = StaleCache::new(10, 10_000);
        let fr = headers(&[("accept-language", "fr"), ("accept", "text/html")]);
        stored(
            &c,
            &fr,
            &headers(&[("vary", "Accept-Language"), ("vary", "accept")]),
        )
        .unwrap();
        assert!(served(&c, &fr).is_some());
        for other in [
            headers(&[("accept-language", "de"), ("accept", "text/html")]),
            headers(&[("accept-language", "fr")]),
            headers(&[("accept", "text/html")]),
        ] {
            assert!(served(&c, &other).is_none(), "{other:?}");
        }
    }
}
