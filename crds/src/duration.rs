//! Durations in the Kubernetes/Go form (`250ms`, `3s`, `1m30s`, `1h`).

use std::time::Duration;

/// The longest duration a spec may give (366 days). Longer values are refused at compile time:
/// every duration ends up added to a clock reading, and a clock cannot count that far.
pub const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses a command-line flag's duration, for clap's `value_parser` in both binaries; the
/// error says what a duration looks like.
pub fn flag(s: &str) -> Result<Duration, String> {
    parse(s).ok_or_else(|| format!("{s:?} is not a duration (e.g. 500ms, 15s, 1m, 1h)"))
}

/// Parses a non-negative Go duration. `0` alone is allowed, as in Go.
///
/// Returns `None` for anything else (signs, missing units, unknown units, overflow), so the
/// caller can name the field in its error.
pub fn parse(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let bytes = s.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_digit() {
        return None;
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if int_end == 0 {
            return None;
        }
        let int_part: u128 = rest[..int_end].parse().ok()?;
        rest = &rest[int_end..];
        let mut frac_num: u128 = 0;
        let mut frac_den: u128 = 1;
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_end = after_dot
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after_dot.len());
            if frac_end == 0 {
                return None;
            }
            // Nanosecond precision is all that can matter; ignore digits beyond 18.
            for d in after_dot[..frac_end].bytes().take(18) {
                frac_num = frac_num * 10 + u128::from(d - b'0');
                frac_den *= 10;
            }
            rest = &after_dot[frac_end..];
        }
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit: u128 = match &rest[..unit_end] {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total = total
            .checked_add(int_part.checked_mul(nanos_per_unit)?)?
            .checked_add(frac_num * nanos_per_unit / frac_den)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way Go prints it (`1m30s`, `250ms`, `1.5s`, `0s`).
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}us", trim(nanos, 1_000));
    }
    if nanos < 1_000_000_000 {
        return format!("{}ms", trim(nanos, 1_000_000));
    }
    let mut out = String::new();
    let total_secs = d.as_secs();
    let hours = total_secs / 3600;
    let minutes = (total_secs % 3600) / 60;
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    let sub_minute = nanos % 60_000_000_000;
    out.push_str(&format!("{}s", trim(sub_minute, 1_000_000_000)));
    out
}

/// `value / unit` with the fractional part written only as far as needed.
fn trim(value: u128, unit: u128) -> String {
    let whole = value / unit;
    let frac = value % unit;
    if frac == 0 {
        return whole.to_string();
    }
    let width = unit.ilog10() as usize;
    let digits = format!("{frac:0width$}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// serde helpers for `Duration` fields written in Go form.
pub mod serde_go {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub mod option {
        use std::time::Duration;

        use serde::Serializer;

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&super::super::format(*d)),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_that_is_no_duration_is_refused_with_its_value() {
        assert_eq!(flag("90s"), Ok(Duration::from_secs(90)));
        let e = flag("5").unwrap_err();
        assert!(e.contains("\"5\" is not a duration"), "{e}");
        assert!(flag("-1s").is_err());
    }

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("100us", Duration::from_micros(100)),
            ("100µs", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            ("2h45m0.5s", Duration::from_millis(9_900_500)),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s), Some(want), "{s}");
        }
    }

    #[test]
    fn rejects_what_go_or_kubernetes_would_not_take_or_we_forbid() {
        for s in [
            "", "-5s", "+5s", "5", "s", "5 s", "5sec", "1.s", ".5s", "5d", "abc", "1m-3s",
        ] {
            assert_eq!(parse(s), None, "{s:?} must be rejected");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_micros(15), "15us"),
        ];
        for (d, want) in cases {
            assert_eq!(format(d), want);
            assert_eq!(parse(want), Some(d), "round trip of {want}");
        }
    }
}
