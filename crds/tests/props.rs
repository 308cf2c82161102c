//! Property tests: whatever a spec or a duration holds, compile and parse answer without
//! panicking, and what they accept stays within the bounds the data plane relies on.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate_crds::policy::normalize_path;
use tollgate_crds::{PartnerIntegrationSpec, compile, duration};

/// Strings a hostile or careless spec might hold in any field.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "0",
            "99999999999999999999h",
            "9223372036854775807s",
            "1.999999999999999999999s",
            "8784h",
            "8785h",
            "250ms",
            "api.x",
            "API.x.:8443",
            "a..",
            "[::1]:0",
            "/v0",
            "//a/../b%2e%zz",
            "Bearer {value}",
            "{value}{value}",
            "http://127.0.0.1:1",
            "https://a.example:65535/x/",
            "http://a.example:99999",
            "http://a..",
            "http://ü.example",
        ])
        .prop_map(String::from),
        "[0-9]{1,25}(ns|us|µs|ms|s|m|h)",
        "\\PC{0,24}",
    ]
}

fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(1),
        Just(-1),
        Just(i64::from(i32::MAX)),
        Just(i64::from(i32::MIN)),
        any::<i32>().prop_map(i64::from),
    ]
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop::option::of(s)
}

fn rate_limit() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((text(), int(), text()), 0..3),
        opt(text()),
        opt(prop_oneof![Just("reject"), Just("queue")]),
        opt(prop_oneof![Just("global"), Just("perPod")]),
    )
        .prop_map(|(limits, wait, on, scope)| {
            json!({
                "limits": limits.into_iter().map(|(n, r, p)| json!({"name": n, "requests": r, "per": p})).collect::<Vec<_>>(),
                "maxQueueWait": wait, "onLimit": on, "scope": scope,
            })
        })
}

fn overrides() -> impl Strategy<Value = Value> {
    (
        opt(text()),
        opt(text()),
        opt(int()),
        opt(text()),
        opt(text()),
        prop::collection::vec(text(), 0..3),
        opt(text()),
        any::<bool>(),
    )
        .prop_map(|(req, total, attempts, base, max, retry_on, stale, kill)| {
            json!({
                "timeouts": {"request": req, "total": total},
                "retries": {"maxAttempts": attempts, "backoff": {"base": base, "max": max}, "retryOn": retry_on},
                "fallback": {"staleIfError": stale},
                "killSwitch": {"enabled": kill},
                "circuitBreaker": {"window": req, "openDuration": total, "slowCallDuration": stale, "minimumRequests": attempts},
            })
        })
}

fn spec() -> impl Strategy<Value = Value> {
    (
        (
            text(),
            prop::collection::vec(text(), 0..4),
            opt(text()),
            opt((text(), text(), opt(text()), opt(text()), opt(any::<bool>()))),
        ),
        (
            opt(rate_limit()),
            overrides(),
            prop::collection::vec(text(), 0..3),
            prop::collection::vec(
                (
                    text(),
                    opt(text()),
                    prop::collection::vec(text(), 0..2),
                    overrides(),
                    opt(rate_limit()),
                ),
                0..3,
            ),
        ),
    )
        .prop_map(
            |((url, hosts, connect, creds), (rl, top, denied, routes))| {
                let mut s = json!({
                    "upstream": {"url": url, "hosts": hosts, "connectTimeout": connect},
                    "versioning": {"deniedPathPrefixes": denied},
                    "routes": routes.into_iter().map(|(name, prefix, methods, o, rl)| {
                        let mut r = o;
                        r["name"] = json!(name);
                        r["match"] = json!({"pathPrefix": prefix, "methods": methods});
                        r["rateLimit"] = json!(rl);
                        r
                    }).collect::<Vec<_>>(),
                    "rateLimit": rl,
                });
                for (k, v) in top.as_object().unwrap() {
                    s[k] = v.clone();
                }
                if let Some((name, key, header, format, insecure)) = creds {
                    s["credentials"] = json!({
                        "secretRef": {"name": name, "key": key},
                        "header": header, "format": format, "allowInsecure": insecure,
                    });
                }
                s
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compile_never_panics_and_what_it_accepts_is_bounded(v in spec()) {
        let Ok(s) = serde_json::from_value::<PartnerIntegrationSpec>(strip_nulls(v)) else {
            return Ok(());
        };
        if let Ok(p) = compile("ns", "name", &s) {
            for r in p.routes.iter().chain([&p.default_route]) {
                prop_assert!(r.timeouts.total <= duration::MAX);
                prop_assert!(r.retries.backoff_max <= duration::MAX);
                if let Some(prefix) = &r.path_prefix {
                    prop_assert_eq!(normalize_path(prefix), Ok(prefix.clone()));
                }
            }
            for h in &p.hosts {
                prop_assert!(!h.host.ends_with('.'));
                prop_assert_eq!(h.host.to_ascii_lowercase(), h.host.clone());
            }
            for (i, a) in p.hosts.iter().enumerate() {
                for b in &p.hosts[..i] {
                    prop_assert!(!(a.host == b.host && (a.port.is_none() || b.port.is_none() || a.port == b.port)));
                }
            }
        }
    }

    #[test]
    fn duration_parse_never_panics_and_round_trips(s in "\\PC{0,30}", secs in 0u64..=duration::MAX.as_secs(), nanos in 0u32..1_000_000_000) {
        let _ = duration::parse(&s);
        let d = Duration::new(secs, nanos).min(duration::MAX);
        prop_assert_eq!(duration::parse(&duration::format(d)), Some(d));
    }

    #[test]
    fn duration_parse_of_digits_and_units_never_panics(s in "([0-9]{0,30}(\\.[0-9]{0,30})?(ns|us|µs|ms|s|m|h|x)?){1,4}") {
        let _ = duration::parse(&s);
    }

    #[test]
    fn normalised_paths_are_stable(s in "(/|%2[eEfF]|%[0-9a-fA-F]{2}|\\.|\\.\\.|[a-z]|%)*") {
        if let Ok(n) = normalize_path(&s) {
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains("//"));
            prop_assert!(!n.split('/').any(|seg| seg == "." || seg == ".."));
            prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
        }
    }
}

/// `null` stands for "absent" in the generated specs.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}
