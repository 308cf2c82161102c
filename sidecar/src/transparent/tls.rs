//! The server name (SNI) of a TLS ClientHello, read without terminating TLS, and the one alert
//! the sidecar sends when it refuses a TLS connection.

/// The largest ClientHello whose server name is looked for. Real ones stay under 2 KiB (a few
/// KiB with post-quantum key shares or many resumption tickets); anything larger is unreadable.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// How many bytes may be buffered to read a ClientHello: the message plus the headers of the
/// records it may be split over.
pub const PEEK_LIMIT: usize = MAX_CLIENT_HELLO + 1024;

/// A fatal `access_denied` alert (RFC 8446 section 6), sent in the clear before any handshake:
/// the client reports "alert access denied" instead of an unexplained reset.
pub const ACCESS_DENIED_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;
/// TLSPlaintext.length never exceeds 2^14.
const MAX_RECORD: usize = 1 << 14;

/// What the first bytes of a connection say about a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello so far; more bytes are needed.
    Incomplete,
    /// A whole ClientHello and its host name, when it names one (a client calling an IP
    /// address sends none).
    Complete { sni: Option<String> },
    /// Starts like a TLS handshake but is no ClientHello this reader accepts: malformed, split
    /// into more records than [`PEEK_LIMIT`] allows, or larger than [`MAX_CLIENT_HELLO`].
    Unreadable,
}

/// Whether `buf` can be the start of a TLS handshake record (content type 22, version 3.x).
pub fn looks_like_tls(buf: &[u8]) -> bool {
    buf.first() == Some(&HANDSHAKE) && buf.get(1).is_none_or(|major| *major == 3)
}

/// Reads the ClientHello at the start of `buf`, which may span several handshake records.
pub fn client_hello(buf: &[u8]) -> Hello {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        if handshake.first().is_some_and(|t| *t != CLIENT_HELLO) {
            return Hello::Unreadable;
        }
        if handshake.len() >= 4 {
            let need = 4 + u24(&handshake[1..4]);
            if need > MAX_CLIENT_HELLO {
                return Hello::Unreadable;
            }
            if handshake.len() >= need {
                return match server_name(&handshake[4..need]) {
                    Some(sni) => Hello::Complete { sni },
                    None => Hello::Unreadable,
                };
            }
        }
        if rest.len() < 5 {
            return incomplete(buf);
        }
        if rest[0] != HANDSHAKE || rest[1] != 3 {
            return Hello::Unreadable;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_RECORD {
            return Hello::Unreadable;
        }
        if rest.len() < 5 + len {
            return incomplete(buf);
        }
        handshake.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
}

fn incomplete(buf: &[u8]) -> Hello {
    if buf.len() >= PEEK_LIMIT {
        Hello::Unreadable
    } else {
        Hello::Incomplete
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// The host name in a ClientHello body: `Some(None)` when it has no server_name extension,
/// `None` when the body is malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session = usize::from(r.u8()?);
    r.take(session)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    if r.0.is_empty() {
        // Extensions are optional (pre-TLS 1.2 clients).
        return Some(None);
    }
    let len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take(len)?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Reader(data);
        let len = usize::from(list.u16()?);
        let mut names = Reader(list.take(len)?);
        while !names.0.is_empty() {
            let kind = names.u8()?;
            let len = usize::from(names.u16()?);
            let name = names.take(len)?;
            if kind == HOST_NAME {
                return host_name(name).map(Some);
            }
        }
        return Some(None);
    }
    Some(None)
}

/// A DNS host name as integrations name hosts: ASCII, lower case, no trailing dot.
fn host_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?;
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then(|| name.to_ascii_lowercase())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client connecting to `name`.
    fn real_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-frames the handshake bytes of one record into records of at most `size` bytes.
    fn fragment(record: &[u8], size: usize) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        let mut out = Vec::new();
        for piece in record[5..5 + len].chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = real_hello("API.Partner.test");
        assert!(looks_like_tls(&hello));
        assert_eq!(
            client_hello(&hello),
            Hello::Complete {
                sni: Some("api.partner.test".into())
            }
        );
    }

    #[test]
    fn every_prefix_is_incomplete_never_wrong() {
        let hello = real_hello("partner.test");
        for n in 0..hello.len() {
            assert_eq!(client_hello(&hello[..n]), Hello::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn a_hello_split_over_records_is_reassembled() {
        let whole = real_hello("partner.test");
        let hello = fragment(&whole, 50);
        assert!(
            hello.len() >= whole.len() + 5 * 3,
            "the hello spans several records"
        );
        assert_eq!(
            client_hello(&hello),
            Hello::Complete {
                sni: Some("partner.test".into())
            }
        );
        for n in 0..hello.len() {
            assert_eq!(client_hello(&hello[..n]), Hello::Incomplete, "prefix {n}");
        }
    }

    #[test]
    fn a_client_calling_an_ip_address_sends_no_name() {
        assert_eq!(
            client_hello(&real_hello("10.1.2.3")),
            Hello::Complete { sni: None }
        );
    }

    #[test]
    fn other_bytes_are_not_tls_or_are_unreadable() {
        assert!(!looks_like_tls(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_tls(b"\x16\x09"));
        assert!(looks_like_tls(b"\x16"));
        // An alert record where a handshake should be.
        assert_eq!(
            client_hello(b"\x15\x03\x01\x00\x02\x02\x28"),
            Hello::Unreadable
        );
        // A ServerHello, not a ClientHello.
        assert_eq!(
            client_hello(b"\x16\x03\x03\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00"),
            Hello::Unreadable
        );
        // A ClientHello whose body is cut short of what its length says.
        assert_eq!(
            client_hello(b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03"),
            Hello::Unreadable
        );
    }

    #[test]
    fn hellos_over_the_limit_are_unreadable_without_buffering_them() {
        // A declared length beyond the limit is refused from the first record header on.
        let mut big = vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01];
        big.extend_from_slice(&((MAX_CLIENT_HELLO as u32).to_be_bytes()[1..]));
        assert_eq!(client_hello(&big), Hello::Unreadable);
        // A hello of an allowed size sent in one-byte records: the record headers make the
        // bytes to buffer outgrow the peek limit, which ends the wait.
        let mut endless = Vec::new();
        for b in [0x01, 0x00, 0x3f, 0x00]
            .into_iter()
            .chain(std::iter::repeat(0))
        {
            if endless.len() >= PEEK_LIMIT {
                break;
            }
            endless.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, b]);
        }
        assert_eq!(client_hello(&endless[..6 * 100]), Hello::Incomplete);
        assert_eq!(client_hello(&endless), Hello::Unreadable);
    }
}
