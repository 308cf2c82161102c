//! The outbound listener: forward proxy (absolute-form, for `HTTP_PROXY`), origin-form routed by
//! `Host`, and `CONNECT` tunnels.

pub mod handler;
pub mod headers;
pub mod server;
pub mod sniff;
pub mod tunnel;

use std::net::SocketAddr;
use std::time::Duration;

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
