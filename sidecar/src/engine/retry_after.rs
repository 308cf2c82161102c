//! `Retry-After` (RFC 9110, section 10.2.3): delay-seconds or an HTTP-date.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;

/// The longest wait a `Retry-After` can ask for (one day); longer requests are clamped to it.
/// A partner's value is added to clock readings, so it must stay far from what a clock can hold;
/// a wait this long already outlasts any call's total deadline, so the retry is simply skipped.
pub const MAX: Duration = Duration::from_secs(24 * 3600);

/// How long a `Retry-After` value asks to wait, relative to `now`, at most [`MAX`].
///
/// Accepts delay-seconds (`120`; any number of digits, clamped to [`MAX`]) and an HTTP-date in
/// any of the three forms HTTP allows (IMF-fixdate, and the obsolete RFC 850 and asctime forms).
/// A date at or before `now` gives zero. Anything else, including negative or fractional
/// numbers, gives `None`. Surrounding whitespace is ignored.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // All digits: only overflow can fail, and an overflow is longer than MAX anyway.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO).min(MAX))
}

/// The `Retry-After` of a response, if it has one that parses (the first one, if repeated).
pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse(value, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn delay_seconds() {
        assert_eq!(parse("120", now()), Some(Duration::from_secs(120)));
        assert_eq!(parse("0", now()), Some(Duration::ZERO));
        assert_eq!(parse(" 5\t", now()), Some(Duration::from_secs(5)));
        assert_eq!(parse("99999999999999999999999", now()), Some(MAX));
        assert_eq!(parse("86401", now()), Some(MAX));
        assert_eq!(parse("Fri, 31 Dec 9999 23:59:59 GMT", now()), Some(MAX));
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let in_30s = Some(Duration::from_secs(30));
        assert_eq!(parse("Sun, 06 Nov 1994 08:50:07 GMT", now()), in_30s);
        assert_eq!(parse("Sunday, 06-Nov-94 08:50:07 GMT", now()), in_30s);
        assert_eq!(parse("Sun Nov  6 08:50:07 1994", now()), in_30s);
        // Relative to a `now` with a fraction of a second.
        assert_eq!(
            parse(
                "Sun, 06 Nov 1994 08:50:07 GMT",
                now() + Duration::from_millis(250)
            ),
            Some(Duration::from_millis(29_750))
        );
    }

    #[test]
    fn past_or_present_dates_mean_no_wait() {
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", now()),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse("Thu, 01 Jan 1970 00:00:00 GMT", now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_none() {
        for bad in [
            "",
            " ",
            "soon",
            "-1",
            "1.5",
            "+5",
            "5s",
            "0x10",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            // Wrong weekday for the date.
            "Mon, 06 Nov 1994 08:50:07 GMT",
            "Sun, 06 Nov 1994 08:50:07 UTC",
            "2024-06-20T10:00:00Z",
        ] {
            assert_eq!(parse(bad, now()), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a partner sends, the answer is a wait of at most MAX, or none.
        #[test]
        fn any_value_parses_to_a_bounded_wait_or_none(value in "\\PC{0,40}", digits in "[0-9]{1,60}") {
            for v in [value.as_str(), digits.as_str()] {
                if let Some(d) = parse(v, now()) {
                    proptest::prop_assert!(d <= MAX);
                }
            }
            proptest::prop_assert!(parse(&digits, now()).is_some());
        }
    }

    #[test]
    fn from_headers_reads_retry_after() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_headers(&headers, now()), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(from_headers(&headers, now()), Some(Duration::from_secs(7)));
        headers.insert(RETRY_AFTER, HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(from_headers(&headers, now()), None);
    }
}
