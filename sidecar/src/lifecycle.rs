//! Partner lifecycle signals: RFC 9745 `Deprecation`, RFC 8594 `Sunset`, and the `Link`
//! relations `deprecation` and `sunset`, read from partners' responses.
//!
//! The headers come from outside: every parser is bounded (an oversized value is ignored, not
//! truncated), allocates only the one link it keeps, and never panics. Forms accepted:
//!
//! - `Deprecation: @1688169599` (RFC 9745, a structured-field date), `Deprecation: ?1` and
//!   `Deprecation: true` (earlier drafts, no date), `Deprecation: <HTTP-date>` (earlier drafts);
//! - `Sunset: <HTTP-date>`;
//! - `Link: <https://...>; rel="deprecation"` (or `rel="sunset"`, or a space-separated list).

use std::sync::RwLock;
use std::time::UNIX_EPOCH;

use http::HeaderMap;
use tollgate_crds::distribution::{MAX_LIFECYCLE_ROUTES, MAX_LIFECYCLE_TEXT_BYTES, RouteLifecycle};

use crate::telemetry::metrics::{Metrics, RouteLabels};

/// Longest `Deprecation` or `Sunset` value read.
pub const MAX_VALUE_BYTES: usize = 256;
/// Longest `Link` value read.
pub const MAX_LINK_HEADER_BYTES: usize = 8 * 1024;
/// Most link-values of one `Link` header looked at.
const MAX_LINK_VALUES: usize = 32;
/// Digits of a structured-field integer (RFC 8941).
const MAX_SF_DIGITS: usize = 15;

/// A `Deprecation` header's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deprecation {
    /// Deprecated, no date given.
    Yes,
    /// Deprecated from this moment (Unix seconds; may lie in the future).
    At(i64),
}

/// Reads a `Deprecation` value; `None` when it is none of the accepted forms.
pub fn parse_deprecation(v: &[u8]) -> Option<Deprecation> {
    let v = trim(bounded(v, MAX_VALUE_BYTES)?);
    match v {
        b"?1" | b"true" | b"TRUE" | b"True" => return Some(Deprecation::Yes),
        _ => {}
    }
    if let Some(rest) = v.strip_prefix(b"@") {
        return sf_integer(rest).map(Deprecation::At);
    }
    http_date(v).map(Deprecation::At)
}

/// Reads a `Sunset` value (an HTTP-date) as Unix seconds.
pub fn parse_sunset(v: &[u8]) -> Option<i64> {
    http_date(trim(bounded(v, MAX_VALUE_BYTES)?))
}

/// The targets of the `deprecation` and `sunset` relations of a `Link` value, first of each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links {
    pub deprecation: Option<String>,
    pub sunset: Option<String>,
}

/// Reads a `Link` value (RFC 8288). Targets longer than [`MAX_LIFECYCLE_TEXT_BYTES`] or with
/// other than visible ASCII are skipped.
pub fn parse_link(v: &[u8]) -> Links {
    let mut out = Links::default();
    let Some(v) = bounded(v, MAX_LINK_HEADER_BYTES) else {
        return out;
    };
    let mut rest = v;
    for _ in 0..MAX_LINK_VALUES {
        rest = trim_start(rest);
        while let Some(r) = rest.strip_prefix(b",") {
            rest = trim_start(r);
        }
        let Some(r) = rest.strip_prefix(b"<") else {
            break;
        };
        let Some(end) = r.iter().position(|b| *b == b'>') else {
            break;
        };
        let target = &r[..end];
        rest = &r[end + 1..];
        // Parameters up to the next comma outside quotes.
        let mut in_quotes = false;
        let params_end = rest
            .iter()
            .position(|b| {
                if *b == b'"' {
                    in_quotes = !in_quotes;
                }
                *b == b',' && !in_quotes
            })
            .unwrap_or(rest.len());
        let params = &rest[..params_end];
        rest = &rest[params_end..];
        let (dep, sun) = relations(params);
        if !(dep || sun) {
            continue;
        }
        let Some(target) = link_target(target) else {
            continue;
        };
        if dep && out.deprecation.is_none() {
            out.deprecation = Some(target.clone());
        }
        if sun && out.sunset.is_none() {
            out.sunset = Some(target);
        }
        if out.deprecation.is_some() && out.sunset.is_some() {
            break;
        }
    }
    out
}

/// What one response announces; `None` when it announces nothing.
pub fn announcement(headers: &HeaderMap) -> Option<RouteLifecycle> {
    let deprecation = headers
        .get_all("deprecation")
        .iter()
        .find_map(|v| parse_deprecation(v.as_bytes()));
    let sunset = headers
        .get_all("sunset")
        .iter()
        .find_map(|v| parse_sunset(v.as_bytes()));
    if deprecation.is_none() && sunset.is_none() {
        return None;
    }
    let mut links = Links::default();
    for v in headers
        .get_all(http::header::LINK)
        .iter()
        .take(MAX_LINK_VALUES)
    {
        let l = parse_link(v.as_bytes());
        links.deprecation = links.deprecation.or(l.deprecation);
        links.sunset = links.sunset.or(l.sunset);
    }
    Some(RouteLifecycle {
        route: String::new(),
        deprecated: deprecation.is_some(),
        deprecation_timestamp: match deprecation {
            Some(Deprecation::At(t)) => Some(t),
            _ => None,
        },
        sunset_timestamp: sunset,
        link: links.deprecation.or(links.sunset),
    })
}

fn bounded(v: &[u8], max: usize) -> Option<&[u8]> {
    (v.len() <= max).then_some(v)
}

fn trim_start(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    v
}

fn trim(v: &[u8]) -> &[u8] {
    let mut v = trim_start(v);
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// An RFC 8941 integer: optional `-`, 1 to 15 digits.
fn sf_integer(v: &[u8]) -> Option<i64> {
    let (negative, digits) = match v.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, v),
    };
    if digits.is_empty() || digits.len() > MAX_SF_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if negative { -n } else { n })
}

fn http_date(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let t = httpdate::parse_http_date(s).ok()?;
    i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()
}

/// Whether the parameters name the `deprecation` and `sunset` relations.
fn relations(params: &[u8]) -> (bool, bool) {
    let (mut dep, mut sun) = (false, false);
    for p in params.split(|b| *b == b';') {
        let p = trim(p);
        let Some(eq) = p.iter().position(|b| *b == b'=') else {
            continue;
        };
        if !trim(&p[..eq]).eq_ignore_ascii_case(b"rel") {
            continue;
        }
        let value = trim(&p[eq + 1..]);
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        for rel in value.split(|b| *b == b' ' || *b == b'\t') {
            dep |= rel.eq_ignore_ascii_case(b"deprecation");
            sun |= rel.eq_ignore_ascii_case(b"sunset");
        }
        // Only the first `rel` counts (RFC 8288 section 3.3).
        break;
    }
    (dep, sun)
}

fn link_target(t: &[u8]) -> Option<String> {
    if t.is_empty() || t.len() > MAX_LIFECYCLE_TEXT_BYTES || !t.iter().all(|b| b.is_ascii_graphic())
    {
        return None;
    }
    // Visible ASCII is UTF-8.
    std::str::from_utf8(t).ok().map(str::to_string)
}

// === impl Lifecycle ===

/// What partners announced, per route of one integration, since the sidecar started: kept
/// across revisions, at most [`MAX_LIFECYCLE_ROUTES`] routes. The latest announcement of a
/// route replaces the previous one; a response without one changes nothing.
#[derive(Debug, Default)]
pub struct Lifecycle {
    routes: RwLock<Vec<RouteLifecycle>>,
}

impl Lifecycle {
    /// Reads a partner's response to a call on `route`, and sets the route's gauges when the
    /// announcement changed.
    pub fn observe(&self, metrics: &Metrics, integration: &str, route: &str, headers: &HeaderMap) {
        if !headers.contains_key("deprecation") && !headers.contains_key("sunset") {
            return;
        }
        let Some(mut a) = announcement(headers) else {
            return;
        };
        a.route = route.chars().take(MAX_LIFECYCLE_TEXT_BYTES / 4).collect();
        let known = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&a);
        if known {
            return;
        }
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        match routes.iter().position(|r| r.route == a.route) {
            Some(k) => routes[k] = a.clone(),
            None if routes.len() < MAX_LIFECYCLE_ROUTES => routes.push(a.clone()),
            None => return,
        }
        drop(routes);
        let labels = RouteLabels {
            integration: integration.to_string(),
            route: a.route.clone(),
        };
        metrics
            .partner_deprecated
            .get_or_create(&labels)
            .set(i64::from(a.deprecated));
        match a.deprecation_timestamp {
            Some(t) => {
                metrics.partner_deprecation.get_or_create(&labels).set(t);
            }
            None => {
                metrics.partner_deprecation.remove(&labels);
            }
        }
        match a.sunset_timestamp {
            Some(t) => {
                metrics.partner_sunset.get_or_create(&labels).set(t);
            }
            None => {
                metrics.partner_sunset.remove(&labels);
            }
        }
        tracing::warn!(
            integration,
            route = %a.route,
            deprecated = a.deprecated,
            deprecation = a.deprecation_timestamp,
            sunset = a.sunset_timestamp,
            link = a.link.as_deref().unwrap_or(""),
            "the partner announces the route's deprecation or sunset"
        );
    }

    /// Every route's latest announcement.
    pub fn routes(&self) -> Vec<RouteLifecycle> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn deprecation_forms() {
        assert_eq!(
            parse_deprecation(b"@1688169599"),
            Some(Deprecation::At(1_688_169_599))
        );
        assert_eq!(parse_deprecation(b" @-5 "), Some(Deprecation::At(-5)));
        assert_eq!(parse_deprecation(b"?1"), Some(Deprecation::Yes));
        assert_eq!(parse_deprecation(b"true"), Some(Deprecation::Yes));
        assert_eq!(
            parse_deprecation(b"Sun, 11 Nov 2018 23:59:59 GMT"),
            Some(Deprecation::At(1_541_980_799))
        );
        for bad in [
            &b"@"[..],
            b"@1.5",
            b"@9999999999999999",
            b"?0",
            b"false",
            b"soon",
            b"",
        ] {
            assert_eq!(parse_deprecation(bad), None, "{bad:?}");
        }
        assert_eq!(parse_deprecation(&[b'1'; 300]), None);
    }

    #[test]
    fn sunset_is_an_http_date() {
        assert_eq!(
            parse_sunset(b"Sat, 31 Dec 2050 23:59:59 GMT"),
            Some(2_556_143_999)
        );
        assert_eq!(parse_sunset(b"@2556143999"), None);
        assert_eq!(parse_sunset(b"tomorrow"), None);
    }

    #[test]
    fn link_relations() {
        let l = parse_link(
            br#"<https://api.example.com/v2?page=2>; rel="next", <https://example.com/deprecation>; rel="deprecation"; type="text/html", <https://example.com/sunset>; rel=sunset"#,
        );
        assert_eq!(
            l.deprecation.as_deref(),
            Some("https://example.com/deprecation")
        );
        assert_eq!(l.sunset.as_deref(), Some("https://example.com/sunset"));
        let l = parse_link(br#"<https://e.com/a>; title="a, b"; rel="alternate deprecation""#);
        assert_eq!(l.deprecation.as_deref(), Some("https://e.com/a"));
        assert_eq!(
            parse_link(b"<https://e.com/a b>; rel=deprecation"),
            Links::default()
        );
        assert_eq!(
            parse_link(b"<unterminated; rel=deprecation"),
            Links::default()
        );
    }

    #[test]
    fn a_response_without_deprecation_or_sunset_announces_nothing() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            "<https://e.com/d>; rel=deprecation".parse().unwrap(),
        );
        assert_eq!(announcement(&h), None);
        h.insert("deprecation", "@1688169599".parse().unwrap());
        h.insert("sunset", "Sat, 31 Dec 2050 23:59:59 GMT".parse().unwrap());
        let a = announcement(&h).unwrap();
        assert!(a.deprecated);
        assert_eq!(a.deprecation_timestamp, Some(1_688_169_599));
        assert_eq!(a.sunset_timestamp, Some(2_556_143_999));
        assert_eq!(a.link.as_deref(), Some("https://e.com/d"));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_deprecation(&v);
            let _ = parse_sunset(&v);
            let l = parse_link(&v);
            for t in [l.deprecation, l.sunset].into_iter().flatten() {
                prop_assert!(t.len() <= MAX_LIFECYCLE_TEXT_BYTES);
            }
        }

        #[test]
        fn every_sf_date_reads_back(t in -999_999_999_999_999i64..=999_999_999_999_999) {
            prop_assert_eq!(parse_deprecation(format!("@{t}").as_bytes()), Some(Deprecation::At(t)));
        }
    }
}
