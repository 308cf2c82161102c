//! The outbound listener: forward proxy (absolute-form, for `HTTP_PROXY`), origin-form routed by
//! `Host`, and `CONNECT` tunnels.
//!
//! # From accept to answer
//!
//! 1. [`server::serve`] runs [`server::accept_loop`]: at most `--max-connections` at once, a
//!    graceful drain at shutdown. The transparent listener ([`crate::transparent::serve`]) and
//!    TLS interception ([`crate::intercept::serve`]) join the same path at step 2.
//! 2. [`server::serve_connection`] serves the connection with hyper's HTTP/1.1 server behind the
//!    smuggling guard ([`sniff::SniffIo`]), which gives one [`sniff::Verdict`] per request head.
//! 3. [`handler::Proxy::handle`] takes each request: refuses a smuggling attempt, finds its
//!    target ([`handler::target`]) and refuses a loop to this listener; a `CONNECT` goes to
//!    [`tunnel::handle`] (interception, or the L4 policy of [`tunnel::admit`] and
//!    [`tunnel::connect`], then a splice); a host no integration claims is passed through or
//!    denied (`--unknown-hosts`).
//! 4. [`handler::Proxy::prepare_call`] makes a partner request ready: the path in normal form,
//!    the route matched, the body buffered up to `--replay-limit`, and a
//!    [`crate::layers::Call`] attached (integration, route, total deadline).
//! 5. The policy stack ([`crate::layers::stack`]) runs it, outermost first: `observe` (span,
//!    metrics, errors into answers), `fallback`, the gates (kill switch, version gate, rate
//!    limit: [`crate::layers::gate`]), `circuit_breaker`, `contract`, `retry`, `timeout`,
//!    `credentials` (a gate too), and `send`, which sends one attempt over the integration's
//!    connection pool ([`crate::pool`]). Each layer reads its route's state from
//!    [`crate::layers::Call::route_state`].
//! 6. The answer streams back to the app through the layers' body wrappers; the call is
//!    recorded (metrics, span, access log, breaker) when its body ends.

pub mod handler;
pub(crate) mod headers;
pub mod server;
pub mod sniff;
pub(crate) mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The address of the app's connection a request came on, attached to the request by the
/// listener (for `rateLimit.partitionByClientAddress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// What to do with a request for a host no integration claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownHosts {
    /// Forward it untouched.
    Pass,
    /// Answer 403 `unknown-host`.
    Deny,
}

/// Limits and behaviour of the outbound listener.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    pub unknown_hosts: UnknownHosts,
    /// Request head (request line and headers) limit; larger heads get 431.
    pub max_header_bytes: usize,
    /// Request bodies up to this size are buffered and may be retried; larger ones stream once.
    pub replay_limit: usize,
    /// Request bodies larger than this are refused with 400 `bad-request`.
    pub max_body_bytes: u64,
    /// A client must send its request head within this time.
    pub header_read_timeout: Duration,
    /// App connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// CONNECT tunnels open at once.
    pub max_tunnels: usize,
    /// Connect deadline for hosts no integration claims.
    pub passthrough_connect_timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 15080)),
            unknown_hosts: UnknownHosts::Pass,
            max_header_bytes: 32 * 1024,
            replay_limit: 64 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_tunnels: 1024,
            passthrough_connect_timeout: Duration::from_secs(10),
        }
    }
}
