//! A stand-in OAuth 2.0 token endpoint on loopback (RFC 6749 section 4.4, client credentials):
//! a [`Partner`] whose script checks the client's credentials and issues numbered tokens
//! (`tok-1`, `tok-2`, ...) with the lifetime the test sets, so a test can tell which token a
//! partner call carried and whether it was still valid.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::partner::{Partner, Reply, Seen};

struct Shared {
    client_id: String,
    client_secret: String,
    expires_in: AtomicU64,
    up: AtomicBool,
    delay_ms: AtomicU64,
    /// Every token issued, with when it expires.
    issued: Mutex<Vec<(String, Instant)>>,
}

pub struct TokenServer {
    pub partner: Partner,
    shared: Arc<Shared>,
}

impl TokenServer {
    /// Accepts `client_id`/`client_secret` by HTTP Basic or in the form; tokens live 3600 s.
    pub async fn start(client_id: &str, client_secret: &str) -> TokenServer {
        let partner = Partner::start().await;
        let shared = Arc::new(Shared {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            expires_in: AtomicU64::new(3600),
            up: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            issued: Mutex::default(),
        });
        let s = shared.clone();
        partner.script(move |_, seen| {
            let reply = answer(&s, seen);
            match s.delay_ms.load(Ordering::Relaxed) {
                0 => reply,
                ms => Reply::Delay(Duration::from_millis(ms), Box::new(reply)),
            }
        });
        TokenServer { partner, shared }
    }

    /// The token URL (`http://127.0.0.1:PORT/oauth/token`).
    pub fn url(&self) -> String {
        format!("{}/oauth/token", self.partner.url())
    }

    /// Token requests received, answered or not.
    pub fn requests(&self) -> usize {
        self.partner.count()
    }

    /// Tokens issued.
    pub fn issued(&self) -> usize {
        self.shared.issued.lock().unwrap().len()
    }

    /// The `expires_in` of tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.shared.expires_in.store(seconds, Ordering::Relaxed);
    }

    /// Down: every request is answered 503 `temporarily_unavailable`.
    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::Relaxed);
    }

    /// Each answer waits this long.
    pub fn set_delay(&self, d: Duration) {
        self.shared
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether `authorization` is `Bearer <a token issued here and not expired>`.
    pub fn is_valid(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
            return false;
        };
        let now = Instant::now();
        self.shared
            .issued
            .lock()
            .unwrap()
            .iter()
            .any(|(t, until)| t == token && now < *until)
    }

    /// The latest token issued.
    pub fn latest(&self) -> Option<String> {
        self.shared
            .issued
            .lock()
            .unwrap()
            .last()
            .map(|(t, _)| t.clone())
    }
}

fn json(status: u16, body: String) -> Reply {
    Reply::Full {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    }
}

fn answer(s: &Shared, seen: &Seen) -> Reply {
    if !s.up.load(Ordering::Relaxed) {
        return json(503, r#"{"error":"temporarily_unavailable"}"#.into());
    }
    let form = parse_form(&String::from_utf8_lossy(&seen.body));
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if seen.method != http::Method::POST
        || !seen
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
        || field("grant_type") != Some("client_credentials")
    {
        return json(400, r#"{"error":"unsupported_grant_type"}"#.into());
    }
    let basic = format!(
        "Basic {}",
        base64(format!("{}:{}", s.client_id, s.client_secret).as_bytes())
    );
    let by_basic = seen.header("authorization") == Some(basic.as_str());
    let by_body = field("client_id") == Some(s.client_id.as_str())
        && field("client_secret") == Some(s.client_secret.as_str());
    if !by_basic && !by_body {
        return json(401, r#"{"error":"invalid_client"}"#.into());
    }
    let expires_in = s.expires_in.load(Ordering::Relaxed);
    let mut issued = s.issued.lock().unwrap();
    let token = format!("tok-{}", issued.len() + 1);
    issued.push((
        token.clone(),
        Instant::now() + Duration::from_secs(expires_in),
    ));
    json(
        200,
        format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{expires_in}}}"#),
    )
}

/// `application/x-www-form-urlencoded` pairs, decoded.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ABC[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        assert_eq!(
            parse_form("grant_type=client_credentials&scope=a+b%3Ac"),
            [
                ("grant_type".to_string(), "client_credentials".to_string()),
                ("scope".to_string(), "a b:c".to_string())
            ]
        );
        assert_eq!(base64(b"id:secret"), "aWQ6c2VjcmV0");
    }
}
