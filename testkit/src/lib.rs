//! Test support shared by the Tollgate test suites (sidecar, operator and end-to-end): one copy
//! of each helper, used as a dev-dependency only.
//!
//! - [`partner`]: a stand-in partner API on loopback that records what it receives and answers
//!   from a script (or echoes the request).
//! - [`http`]: an HTTP/1.1 client as an app uses the sidecar, async and [`blocking`].
//! - [`metrics`]: reads samples from Prometheus text.
//! - [`ca`]: a test CA (rcgen) and the serving certificates it signs.
//! - [`net`]: free loopback ports.
//! - [`jwt`]: JWT-shaped tokens for fake API servers.
//! - [`sidecar`]: the sidecar binary as a child process (its ready line, its log).
//! - [`tcp`]: a raw TCP server for partners that misbehave below HTTP.
//! - [`wait`]: bounded polling (`eventually`), never a fixed sleep.

pub mod blocking;
pub mod ca;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod net;
pub mod oauth;
pub mod partner;
pub mod sidecar;
pub mod tcp;
pub mod wait;

pub use ca::{Leaf, ServingCert, TestCa};
pub use http::{Resp, raw, request};
pub use metrics::metric;
pub use net::free_addr;
pub use oauth::TokenServer;
pub use partner::{Partner, Reply, Seen};
pub use wait::{eventually, eventually_async, eventually_every, until};
