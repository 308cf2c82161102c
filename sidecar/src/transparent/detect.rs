//! What a redirected connection speaks, from its first bytes: an HTTP/1 request head (and the
//! host it names), a TLS ClientHello (and its server name), or anything else.

use http::Uri;
use http::uri::Authority;

use super::tls::{self, Hello};

/// The verdict on the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum First {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A complete HTTP/1 request head and the host it names, as the forward proxy reads it:
    /// the absolute-form (or CONNECT) authority, else the `Host` header. `None` when it names
    /// none (HTTP/1.0 without `Host`) or names it unreadably.
    Http { host: Option<HostPort> },
    /// The start of an HTTP/1 request whose head does not fit in the head limit (or has more
    /// header lines than are parsed).
    HttpTooLarge,
    /// A TLS ClientHello and its server name; `None` when it names none or cannot be read.
    Tls { sni: Option<String> },
    /// Anything else: neither a request head nor a ClientHello.
    Opaque,
}

/// A lower-case host (IPv6 without brackets) and the port it was written with, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

/// Header lines parsed in a head; more count as a head too large (hyper refuses over 100).
const MAX_HEADERS: usize = 128;

/// Classifies `buf`, the bytes received so far. `max_head` bounds an HTTP head; a TLS hello is
/// bounded by [`tls::PEEK_LIMIT`]. `eof`: no more bytes will come, so an unfinished head or
/// hello is what the connection is.
pub fn detect(buf: &[u8], max_head: usize, eof: bool) -> First {
    if buf.is_empty() {
        return if eof { First::Opaque } else { First::NeedMore };
    }
    if tls::looks_like_tls(buf) {
        return match tls::client_hello(buf) {
            Hello::Complete { sni } => First::Tls { sni },
            Hello::Unreadable => First::Tls { sni: None },
            Hello::Incomplete if eof => First::Opaque,
            Hello::Incomplete => First::NeedMore,
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => First::Http {
            host: request_host(&req),
        },
        Ok(httparse::Status::Partial) if buf.len() >= max_head => First::HttpTooLarge,
        Ok(httparse::Status::Partial) if eof => First::Opaque,
        Ok(httparse::Status::Partial) => First::NeedMore,
        Err(httparse::Error::TooManyHeaders) => First::HttpTooLarge,
        Err(_) => First::Opaque,
    }
}

/// The host a parsed request head names, read as the forward proxy's handler reads it.
pub fn request_host(req: &httparse::Request<'_, '_>) -> Option<HostPort> {
    let from_target = req
        .path
        .and_then(|p| p.parse::<Uri>().ok())
        .and_then(|u| u.authority().cloned());
    let authority = match from_target {
        Some(a) => a,
        None => {
            let value = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))?
                .value;
            std::str::from_utf8(value)
                .ok()?
                .trim()
                .parse::<Authority>()
                .ok()?
        }
    };
    Some(HostPort {
        host: authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
        port: authority.port_u16(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str, port: Option<u16>) -> First {
        First::Http {
            host: Some(HostPort {
                host: h.into(),
                port,
            }),
        }
    }

    #[test]
    fn http_heads_name_their_host() {
        let cases: &[(&[u8], First)] = &[
            (
                b"GET /v1/x HTTP/1.1\r\nHost: Partner.Test\r\n\r\n",
                host("partner.test", None),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nHOST: partner.test:8080\r\n\r\nabc",
                host("partner.test", Some(8080)),
            ),
            (
                b"GET http://abs.test:81/x HTTP/1.1\r\nHost: other.test\r\n\r\n",
                host("abs.test", Some(81)),
            ),
            (
                b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n\r\n",
                host("tunnel.test", Some(443)),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                host("::1", Some(8080)),
            ),
            (b"GET / HTTP/1.0\r\n\r\n", First::Http { host: None }),
            (
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                First::Http { host: None },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                &detect(bytes, 1024, false),
                want,
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn an_unfinished_head_waits_until_the_limit_or_the_end() {
        let head = b"GET / HTTP/1.1\r\nHost: partner.test\r\nX-Long: aaaaaaaa";
        assert_eq!(detect(head, 1024, false), First::NeedMore);
        assert_eq!(detect(head, head.len(), false), First::HttpTooLarge);
        assert_eq!(detect(head, 1024, true), First::Opaque);
        assert_eq!(detect(b"G", 1024, false), First::NeedMore);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(detect(&many, 1 << 20, false), First::HttpTooLarge);
    }

    #[test]
    fn other_protocols_are_opaque() {
        for bytes in [
            &b"SSH-2.0-OpenSSH_9.2p1\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"\x80\x2e\x01\x03\x01",
        ] {
            assert_eq!(detect(bytes, 1024, false), First::Opaque, "{bytes:?}");
        }
        assert_eq!(detect(b"", 1024, false), First::NeedMore);
        assert_eq!(detect(b"", 1024, true), First::Opaque);
    }

    #[test]
    fn tls_hellos_are_told_apart_from_http() {
        assert_eq!(detect(b"\x16\x03\x01\x02", 1024, false), First::NeedMore);
        assert_eq!(detect(b"\x16\x03\x01\x02", 1024, true), First::Opaque);
        assert_eq!(
            detect(b"\x16\x03\x01\x00\x01\x02", 1024, false),
            First::Tls { sni: None }
        );
    }
}
