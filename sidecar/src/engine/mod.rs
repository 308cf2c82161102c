//! Policy state machines, free of I/O and tested on a paused clock.
//!
//! Every time here is a `tokio::time::Instant` passed in by the caller (wall-clock time only
//! for `Retry-After` dates), so behaviour is deterministic under `tokio::time::pause`. Shared
//! state sits in small `Send + Sync` structs meant to live behind an `Arc`, with short critical
//! sections and no await under a lock.

pub(crate) mod aimd;
pub(crate) mod backoff;
pub(crate) mod breaker;
pub(crate) mod budget;
pub(crate) mod concurrency;
pub(crate) mod limiter;
pub mod retry_after;
pub(crate) mod stale_cache;
mod window;
