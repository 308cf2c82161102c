//! Loopback ports.

use std::net::SocketAddr;

/// A loopback address whose port was free a moment ago (another process may take it before
/// the test binds it: retry on "address in use" where that matters).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("a bound listener has an address")
}
