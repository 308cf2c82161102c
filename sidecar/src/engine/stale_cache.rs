//! Stale-if-error cache: the last good response to a GET, served when the partner fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// A stored response. The cache hands it out behind an `Arc`, so serving it copies nothing.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the partner sent it; its age is measured from here.
    pub stored_at: Instant,
}

impl CachedResponse {
    /// The bytes this response counts for against the cache's bound: body, header names and
    /// values. (Allocation overhead is not counted; size the bound with some room.)
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        self.body.len() + headers
    }
}

/// A hit: the response and how old it is.
#[derive(Debug, Clone)]
pub struct Stale {
    pub response: Arc<CachedResponse>,
    pub age: Duration,
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
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            inner: Mutex::new(Lru::default()),
        }
    }

    /// Stores `response` under `key`, replacing what was there. Returns whether it was stored:
    /// a response too large for the cache is not, and then the older response under `key` is
    /// dropped too (it is no longer the last good one).
    pub fn insert(&self, key: &str, response: CachedResponse) -> bool {
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
    pub fn get(&self, key: &str, max_age: Duration, now: Instant) -> Option<Stale> {
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

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes counted against the bound.
    pub fn total_bytes(&self) -> usize {
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
}
