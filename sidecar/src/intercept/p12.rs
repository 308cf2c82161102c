//! A PKCS#12 trust store (RFC 7292) for Java: certificates only, no key, no encryption and no
//! MAC, each certificate carrying the attribute Java's `KeyStore` reads as "trusted for every
//! purpose" (a `trustedCertEntry`). Java 17 loads such a store with no password:
//! `-Djavax.net.ssl.trustStore=FILE -Djavax.net.ssl.trustStoreType=PKCS12`.

/// `data` (PKCS#7).
const DATA: &[u64] = &[1, 2, 840, 113_549, 1, 7, 1];
/// `certBag` (PKCS#12 bag type).
const CERT_BAG: &[u64] = &[1, 2, 840, 113_549, 1, 12, 10, 1, 3];
/// `x509Certificate` (PKCS#9 certificate type).
const X509_CERTIFICATE: &[u64] = &[1, 2, 840, 113_549, 1, 9, 22, 1];
/// `friendlyName` (PKCS#9): the alias Java shows.
const FRIENDLY_NAME: &[u64] = &[1, 2, 840, 113_549, 1, 9, 20];
/// Oracle's trusted-key-usage attribute: without it Java skips a certificate-only entry.
const JAVA_TRUSTED_KEY_USAGE: &[u64] = &[2, 16, 840, 1, 113_894, 746_875, 1, 1];
/// `anyExtendedKeyUsage`: trusted for every purpose.
const ANY_EXTENDED_KEY_USAGE: &[u64] = &[2, 5, 29, 37, 0];

/// The store holding `certs` (DER), each under its alias.
pub(crate) fn trust_store<'a>(certs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let bags: Vec<u8> = certs
        .into_iter()
        .flat_map(|(alias, der)| cert_bag(alias, der))
        .collect();
    let safe_contents = seq(&bags);
    let authenticated_safe = seq(&content_info_data(&safe_contents));
    seq(&[int(3), content_info_data(&authenticated_safe)].concat())
}

fn cert_bag(alias: &str, der: &[u8]) -> Vec<u8> {
    let cert = seq(&[oid(X509_CERTIFICATE), explicit0(&octets(der))].concat());
    let name: Vec<u8> = alias.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let attributes = set(&[
        seq(&[oid(FRIENDLY_NAME), set(&tlv(0x1e, &name))].concat()),
        seq(&[
            oid(JAVA_TRUSTED_KEY_USAGE),
            set(&oid(ANY_EXTENDED_KEY_USAGE)),
        ]
        .concat()),
    ]
    .concat());
    seq(&[oid(CERT_BAG), explicit0(&cert), attributes].concat())
}

fn content_info_data(content: &[u8]) -> Vec<u8> {
    seq(&[oid(DATA), explicit0(&octets(content))].concat())
}

fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

fn seq(v: &[u8]) -> Vec<u8> {
    tlv(0x30, v)
}

fn set(v: &[u8]) -> Vec<u8> {
    tlv(0x31, v)
}

fn octets(v: &[u8]) -> Vec<u8> {
    tlv(0x04, v)
}

fn explicit0(v: &[u8]) -> Vec<u8> {
    tlv(0xa0, v)
}

fn int(v: u8) -> Vec<u8> {
    tlv(0x02, &[v])
}

fn oid(arcs: &[u64]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut push = |mut n: u64| {
        let mut chunk = vec![(n & 0x7f) as u8];
        n >>= 7;
        while n > 0 {
            chunk.push(0x80 | (n & 0x7f) as u8);
            n >>= 7;
        }
        chunk.reverse();
        body.extend_from_slice(&chunk);
    };
    push(arcs[0] * 40 + arcs[1]);
    for &a in &arcs[2..] {
        push(a);
    }
    tlv(0x06, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_identifiers_and_lengths_encode_as_der() {
        // 1.2.840.113549.1.7.1, as every PKCS#7 `data` ContentInfo carries it.
        assert_eq!(
            oid(DATA),
            [
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01
            ]
        );
        assert_eq!(tlv(0x04, &[0; 0x7f])[..2], [0x04, 0x7f]);
        assert_eq!(tlv(0x04, &[0; 0x80])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(tlv(0x04, &[0; 0x1234])[..4], [0x04, 0x82, 0x12, 0x34]);
    }
}
