//! JWT-shaped tokens: three base64url parts, never signed. Enough for a fake API server that
//! knows its tokens by heart, or for junk that must look like a JWT to pass a shape check.

use std::time::{SystemTime, UNIX_EPOCH};

/// base64url without padding.
pub fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A JWT-shaped token for `subject` (audience `tollgate`), expiring at `exp`.
pub fn jwt(subject: &str, exp: SystemTime) -> String {
    let exp = exp.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let header = b64url(br#"{"alg":"RS256","kid":"fake"}"#);
    let claims = b64url(
        serde_json::json!({"iss": "https://fake", "sub": subject, "aud": ["tollgate"], "exp": exp})
            .to_string()
            .as_bytes(),
    );
    format!("{header}.{claims}.{}", b64url(subject.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::b64url;

    #[test]
    fn base64url_without_padding() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }
}
