//! The status a PartnerIntegration should show, and the events its changes deserve: pure
//! functions of what the reconcile found, so they are tested without an API server.

use k8s_openapi::jiff::{Timestamp, Unit};
use tollgate_crds::distribution::{
    BreakerState, ContractViolationCount, CredentialKeys, RouteLifecycle,
};
use tollgate_crds::duration;
use tollgate_crds::v1alpha1::{Condition, PartnerIntegrationStatus, condition, reason};

use crate::catalog::Entry;
use crate::traffic::{Observed, format_latency};

/// Why a spec is refused: a condition reason and a message that names the field (and, where
/// the user can act, the fix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

/// What one reconcile found.
#[derive(Debug)]
pub struct Findings<'a> {
    pub generation: i64,
    /// The spec was refused: it failed the shared compile step, claims a host an older
    /// integration holds, or names a Secret that has not opted in.
    pub invalid: Option<&'a Invalid>,
    /// The referenced Secret or key is missing (message names it).
    pub secret_problem: Option<&'a str>,
    /// What sidecars are given now (the last valid revision when the spec is invalid).
    pub in_force: Option<&'a Entry>,
    /// What the sidecars report about it.
    pub observed: Option<&'a Observed>,
}

/// The whole status this operator owns, with transition times carried over from `previous`
/// for conditions whose status did not change.
pub fn build(
    f: &Findings<'_>,
    previous: Option<&PartnerIntegrationStatus>,
    now: Timestamp,
) -> PartnerIntegrationStatus {
    let mut conditions = Vec::new();
    let revision = f.in_force.map(|e| e.config_revision.clone());
    let keeps = match &revision {
        Some(r) => format!("sidecars keep revision {r}"),
        None => "nothing is distributed".to_string(),
    };

    let ready = if let Some(e) = f.invalid {
        cond(
            condition::READY,
            false,
            e.reason,
            format!("spec is invalid ({}); {keeps}", e.message),
        )
    } else if let Some(p) = f.secret_problem {
        cond(
            condition::READY,
            false,
            reason::SECRET_MISSING,
            format!("{p}; the previous credential stays in force"),
        )
    } else {
        cond(
            condition::READY,
            true,
            reason::COMPILED,
            format!(
                "revision {} compiled and distributed",
                revision.as_deref().unwrap_or("-")
            ),
        )
    };
    conditions.push(ready);

    conditions.push(match f.invalid {
        Some(e) => cond(condition::INVALID, true, e.reason, e.message.clone()),
        None => cond(condition::INVALID, false, reason::VALID, String::new()),
    });

    if let Some(e) = f.in_force {
        let ks = &e.policy.default_route.kill_switch;
        conditions.push(if ks.enabled {
            cond(
                condition::KILL_SWITCH_ACTIVE,
                true,
                reason::KILL_SWITCH_ENABLED,
                ks.reason
                    .clone()
                    .unwrap_or_else(|| "kill switch enabled".into()),
            )
        } else {
            cond(
                condition::KILL_SWITCH_ACTIVE,
                false,
                reason::KILL_SWITCH_DISABLED,
                String::new(),
            )
        });
    }

    let open = f.observed.map_or(0, |o| o.sidecars.breaker_open);
    let reporting = f.observed.map_or(0, |o| o.sidecars.desired);
    conditions.push(if open > 0 {
        cond(
            condition::CIRCUIT_OPEN,
            true,
            reason::BREAKER_OPEN,
            format!("{open} of {reporting} sidecars report the breaker open"),
        )
    } else {
        cond(
            condition::CIRCUIT_OPEN,
            false,
            reason::BREAKER_CLOSED,
            String::new(),
        )
    });

    if let Some(sla) = f.in_force.and_then(|e| e.policy.sla.as_ref()) {
        conditions.push(sla_condition(sla, f.observed));
    }

    if f.in_force.is_some() {
        conditions.push(lifecycle_condition(
            f.observed.map_or(&[], |o| &o.lifecycle),
        ));
    }

    if let Some(e) = f.in_force
        && (e.policy.default_route.contract.is_some()
            || e.policy.routes.iter().any(|r| r.contract.is_some()))
    {
        conditions.push(contract_condition(
            f.observed.map_or(&[], |o| &o.contract_violations),
        ));
    }

    if let Some(e) = f.in_force
        && (e
            .policy
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.adaptive.is_some())
            || e.policy
                .routes
                .iter()
                .any(|r| r.rate_limit.as_ref().is_some_and(|r| r.adaptive.is_some())))
    {
        conditions.push(throttling_condition(
            f.observed.and_then(|o| o.adaptive_percent),
        ));
    }

    if let Some(e) = f.in_force
        && e.policy
            .credentials
            .as_ref()
            .is_some_and(|c| c.secondary_ref.is_some())
    {
        conditions.push(secondary_key_condition(
            f.observed.map(|o| &o.credential_keys),
        ));
    }

    if let Some(e) = f.in_force
        && e.policy
            .credentials
            .as_ref()
            .is_some_and(|c| c.oauth2.is_some())
    {
        let failed = f.observed.map_or(0, |o| o.credential_refresh_failures);
        conditions.push(if failed > 0 {
            cond(
                condition::CREDENTIAL_REFRESH_FAILING,
                true,
                reason::TOKEN_ENDPOINT_FAILING,
                format!(
                    "{failed} OAuth2 token fetches failed in the status window; calls use the \
                     old token until it expires, then are answered credential-unavailable \
                     (the sidecars' logs say why)"
                ),
            )
        } else {
            cond(
                condition::CREDENTIAL_REFRESH_FAILING,
                false,
                reason::TOKENS_REFRESHED,
                String::new(),
            )
        });
    }

    if f.in_force
        .and_then(|e| e.policy.credentials.as_ref())
        .is_some_and(|c| c.verify.is_some())
    {
        conditions.push(match f.observed.and_then(|o| o.credential_check.as_ref()) {
            Some(r) => cond(
                condition::CREDENTIAL_VERIFIED,
                r.ok,
                if r.ok {
                    reason::CHECK_PASSED
                } else {
                    reason::CHECK_FAILED
                },
                r.message.clone(),
            ),
            None => Condition {
                status: "Unknown".to_string(),
                ..cond(
                    condition::CREDENTIAL_VERIFIED,
                    false,
                    reason::NOT_YET_CHECKED,
                    "no sidecar has reported the start-up check yet".to_string(),
                )
            },
        });
    }

    for c in &mut conditions {
        c.observed_generation = Some(f.generation);
        let carried = previous
            .and_then(|p| p.conditions.iter().find(|o| o.r#type == c.r#type))
            .filter(|o| o.status == c.status)
            .and_then(|o| o.last_transition_time.clone());
        c.last_transition_time = Some(carried.unwrap_or_else(|| rfc3339(now)));
    }

    PartnerIntegrationStatus {
        observed_generation: Some(f.generation),
        config_revision: revision,
        conditions,
        circuit: f.in_force.map(|_| {
            f.observed
                .map_or(BreakerState::Closed, |o| o.circuit)
                .as_str()
                .to_string()
        }),
        sidecars: f
            .in_force
            .map(|_| f.observed.map(|o| o.sidecars.clone()).unwrap_or_default()),
        traffic: f.observed.and_then(|o| o.traffic.clone()),
    }
}

fn sla_condition(sla: &tollgate_crds::policy::SlaPolicy, observed: Option<&Observed>) -> Condition {
    let (availability, p95) = match observed {
        Some(o) if o.availability_percent.is_some() => (o.availability_percent, o.latency_p95),
        _ => {
            return cond(
                condition::SLA_BREACHED,
                false,
                reason::NO_TRAFFIC,
                "no calls in the status window".into(),
            );
        }
    };
    let mut misses = Vec::new();
    let mut first_reason = None;
    if let (Some(target), Some(actual)) = (sla.availability_percent, availability)
        && actual < target
    {
        misses.push(format!("availability {actual:.2}% is below {target}%"));
        first_reason.get_or_insert(reason::AVAILABILITY_BELOW_TARGET);
    }
    if let (Some(target), Some(actual)) = (sla.latency_p95, p95)
        && actual > target
    {
        misses.push(format!(
            "p95 latency {} is above {}",
            format_latency(actual),
            duration::format(target)
        ));
        first_reason.get_or_insert(reason::LATENCY_ABOVE_TARGET);
    }
    match first_reason {
        Some(r) => cond(condition::SLA_BREACHED, true, r, misses.join("; ")),
        None => cond(
            condition::SLA_BREACHED,
            false,
            reason::WITHIN_TARGET,
            String::new(),
        ),
    }
}

/// Routes named in a `Deprecated` message; the rest are counted.
const MAX_ROUTES_IN_MESSAGE: usize = 5;

/// `Deprecated`: true while sidecars report that the partner announces a deprecation or a
/// sunset; the message names each route with its dates and link, earliest sunset first.
fn lifecycle_condition(routes: &[RouteLifecycle]) -> Condition {
    let mut announced: Vec<&RouteLifecycle> = routes.iter().filter(|r| !r.is_empty()).collect();
    if announced.is_empty() {
        return cond(
            condition::DEPRECATED,
            false,
            reason::NOT_DEPRECATED,
            String::new(),
        );
    }
    announced.sort_by_key(|r| (r.sunset_timestamp.unwrap_or(i64::MAX), r.route.clone()));
    let date = |t: i64| {
        Timestamp::from_second(t)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    let mut parts: Vec<String> = announced
        .iter()
        .take(MAX_ROUTES_IN_MESSAGE)
        .map(|r| {
            let mut p = format!("route {}", r.route);
            if r.deprecated {
                p.push_str(" deprecated");
                if let Some(t) = r.deprecation_timestamp {
                    p.push_str(&format!(" as of {}", date(t)));
                }
            }
            if let Some(t) = r.sunset_timestamp {
                p.push_str(&format!(
                    "{}sunset on {}",
                    if r.deprecated { ", " } else { " " },
                    date(t)
                ));
            }
            if let Some(l) = &r.link {
                p.push_str(&format!(" (see {l})"));
            }
            p
        })
        .collect();
    if announced.len() > MAX_ROUTES_IN_MESSAGE {
        parts.push(format!(
            "and {} more routes",
            announced.len() - MAX_ROUTES_IN_MESSAGE
        ));
    }
    let sunset = announced.iter().any(|r| r.sunset_timestamp.is_some());
    cond(
        condition::DEPRECATED,
        true,
        if sunset {
            reason::SUNSET_ANNOUNCED
        } else {
            reason::DEPRECATION_ANNOUNCED
        },
        format!("the partner announces: {}", parts.join("; ")),
    )
}

/// `ContractViolated`: true while sidecars report answers that break a route's contract in the
/// status window. The reason is the gravest kind reported (a broken success rule, then a schema
/// mismatch, then unknown enum values); the message names each route (most violations first)
/// with its counts per kind.
fn contract_condition(counts: &[ContractViolationCount]) -> Condition {
    let kinds = [
        ("success-rule", reason::SUCCESS_RULE_BROKEN),
        ("schema", reason::SCHEMA_MISMATCH),
        ("unknown-enum", reason::UNKNOWN_ENUM_VALUES),
    ];
    let Some(gravest) = kinds
        .iter()
        .find(|(k, _)| counts.iter().any(|c| c.kind == *k && c.count > 0))
        .map(|(_, r)| *r)
    else {
        return cond(
            condition::CONTRACT_VIOLATED,
            false,
            reason::CONTRACT_KEPT,
            String::new(),
        );
    };
    let mut routes: Vec<(&str, u64, Vec<String>)> = Vec::new();
    for (kind, _) in kinds {
        for c in counts.iter().filter(|c| c.kind == kind && c.count > 0) {
            let part = format!("{} {kind}", c.count);
            match routes.iter_mut().find(|r| r.0 == c.route) {
                Some(r) => {
                    r.1 = r.1.saturating_add(c.count);
                    r.2.push(part);
                }
                None => routes.push((&c.route, c.count, vec![part])),
            }
        }
    }
    routes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = routes
        .iter()
        .take(MAX_ROUTES_IN_MESSAGE)
        .map(|(route, _, kinds)| format!("route {route}: {}", kinds.join(", ")))
        .collect();
    if routes.len() > MAX_ROUTES_IN_MESSAGE {
        parts.push(format!(
            "and {} more routes",
            routes.len() - MAX_ROUTES_IN_MESSAGE
        ));
    }
    cond(
        condition::CONTRACT_VIOLATED,
        true,
        gravest,
        format!(
            "partner answers break the contract (over the status window): {}",
            parts.join("; ")
        ),
    )
}

/// `PartnerThrottling`: whether the partner's throttling holds an adaptive quota below its
/// configured rate on some fresh sidecar.
fn throttling_condition(percent: Option<f64>) -> Condition {
    match percent {
        Some(p) if p < 99.5 => cond(
            condition::PARTNER_THROTTLING,
            true,
            reason::RATE_LOWERED,
            format!(
                "the partner throttled (429s or rate-limit headers saying nothing remains): the \
                 rate in force is {p:.0}% of the configured rate on the most throttled sidecar, \
                 climbing back while the partner is quiet"
            ),
        ),
        Some(_) => cond(
            condition::PARTNER_THROTTLING,
            false,
            reason::RATE_AS_CONFIGURED,
            "every reporting sidecar runs the configured rate".to_string(),
        ),
        None => cond(
            condition::PARTNER_THROTTLING,
            false,
            reason::NO_TRAFFIC,
            "no sidecar has reported its adaptive quotas yet".to_string(),
        ),
    }
}

/// `SecondaryKeyInUse`: whether calls of the status window needed the secondary key of a
/// rotation window, and when it last served one, so the key can be revoked once it is unused.
fn secondary_key_condition(keys: Option<&CredentialKeys>) -> Condition {
    let keys = keys.cloned().unwrap_or_default();
    let last = match keys.secondary_last_used {
        Some(t) => format!(
            "the secondary key last served a call at {}",
            Timestamp::from_second(t)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| t.to_string())
        ),
        None => "no sidecar reports the secondary key serving a call since it started".into(),
    };
    if keys.secondary > 0 {
        let all = keys.primary.saturating_add(keys.secondary);
        cond(
            condition::SECONDARY_KEY_IN_USE,
            true,
            reason::SECONDARY_KEY_SERVING,
            format!(
                "{} of {all} accepted calls in the status window needed the secondary key (the \
                 partner answered 401 to the primary); {last}",
                keys.secondary
            ),
        )
    } else if keys.primary > 0 {
        cond(
            condition::SECONDARY_KEY_IN_USE,
            false,
            reason::PRIMARY_KEY_SERVING,
            format!(
                "the partner accepted the primary key for all {} calls in the status window; \
                 {last}",
                keys.primary
            ),
        )
    } else {
        cond(
            condition::SECONDARY_KEY_IN_USE,
            false,
            reason::NO_TRAFFIC,
            format!("no accepted calls in the status window; {last}"),
        )
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        r#type: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: Some(reason.to_string()),
        message: (!message.is_empty()).then_some(message),
        last_transition_time: None,
        observed_generation: None,
    }
}

/// RFC 3339 to the second, as Kubernetes writes `metav1.Time`.
pub fn rfc3339(t: Timestamp) -> String {
    t.round(Unit::Second).unwrap_or(t).to_string()
}

/// A condition of a status by type.
pub fn find<'a>(
    status: Option<&'a PartnerIntegrationStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.r#type == type_)
}

/// An event the change from `old` to `new` deserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// The `&'static` reason constant an Invalid condition carries.
fn invalid_reason(r: Option<&str>) -> &'static str {
    [
        reason::HOST_CONFLICT,
        reason::SECRET_NOT_OPTED_IN,
        reason::CREDENTIAL_HOST_NOT_ALLOWED,
        reason::SCHEMA_UNAVAILABLE,
    ]
    .into_iter()
    .find(|c| Some(*c) == r)
    .unwrap_or(reason::INVALID_SPEC)
}

/// The `&'static` reason constant a true `ContractViolated` condition carries.
fn contract_reason(r: Option<&str>) -> &'static str {
    [reason::SCHEMA_MISMATCH, reason::UNKNOWN_ENUM_VALUES]
        .into_iter()
        .find(|c| Some(*c) == r)
        .unwrap_or(reason::SUCCESS_RULE_BROKEN)
}

/// Events for: the kill switch flipping, the spec becoming invalid (or invalid differently),
/// a Secret going missing, the partner announcing (or no longer announcing) a deprecation or
/// sunset, answers that start (or stop) breaking the contract. Nothing for a status that merely stays as it was.
pub fn notices(
    old: Option<&PartnerIntegrationStatus>,
    new: &PartnerIntegrationStatus,
) -> Vec<Notice> {
    let mut out = Vec::new();
    let status = |s: Option<&PartnerIntegrationStatus>, t| find(s, t).map(|c| c.status.clone());

    let ks_old = status(old, condition::KILL_SWITCH_ACTIVE);
    if let Some(ks) = find(Some(new), condition::KILL_SWITCH_ACTIVE)
        && ks_old.as_deref() != Some(ks.status.as_str())
        && (ks_old.is_some() || ks.status == "True")
    {
        let on = ks.status == "True";
        out.push(Notice {
            warning: on,
            reason: if on {
                reason::KILL_SWITCH_ENABLED
            } else {
                reason::KILL_SWITCH_DISABLED
            },
            action: "KillSwitch",
            note: if on {
                format!(
                    "kill switch on: {}",
                    ks.message.as_deref().unwrap_or("no reason given")
                )
            } else {
                "kill switch off: traffic flows again".to_string()
            },
        });
    }

    if let Some(inv) = find(Some(new), condition::INVALID)
        && inv.status == "True"
    {
        let before = find(old, condition::INVALID);
        let same = before.is_some_and(|b| b.status == "True" && b.message == inv.message);
        if !same {
            out.push(Notice {
                warning: true,
                reason: invalid_reason(inv.reason.as_deref()),
                action: "Validate",
                note: inv.message.clone().unwrap_or_default(),
            });
        }
    }

    if let Some(dep) = find(Some(new), condition::DEPRECATED) {
        let before = find(old, condition::DEPRECATED);
        let was = before.is_some_and(|b| b.status == "True");
        if dep.status == "True"
            && before.is_none_or(|b| b.status != "True" || b.message != dep.message)
        {
            out.push(Notice {
                warning: true,
                reason: if dep.reason.as_deref() == Some(reason::SUNSET_ANNOUNCED) {
                    reason::SUNSET_ANNOUNCED
                } else {
                    reason::DEPRECATION_ANNOUNCED
                },
                action: "PartnerLifecycle",
                note: dep.message.clone().unwrap_or_default(),
            });
        } else if dep.status != "True" && was {
            out.push(Notice {
                warning: false,
                reason: reason::NOT_DEPRECATED,
                action: "PartnerLifecycle",
                note: "no sidecar reports a Deprecation or Sunset from the partner any more"
                    .to_string(),
            });
        }
    }

    // One event when violations start or change kind, one when they stop: not one per count.
    if let Some(c) = find(Some(new), condition::CONTRACT_VIOLATED) {
        let before = find(old, condition::CONTRACT_VIOLATED);
        let was = before.is_some_and(|b| b.status == "True");
        if c.status == "True" && before.is_none_or(|b| b.status != "True" || b.reason != c.reason) {
            out.push(Notice {
                warning: true,
                reason: contract_reason(c.reason.as_deref()),
                action: "ContractCheck",
                note: c.message.clone().unwrap_or_default(),
            });
        } else if c.status != "True" && was {
            out.push(Notice {
                warning: false,
                reason: reason::CONTRACT_KEPT,
                action: "ContractCheck",
                note: "no sidecar reports answers that break the contract any more".to_string(),
            });
        }
    }

    // One event per result of the start-up check: when it passes or fails anew.
    if let Some(c) = find(Some(new), condition::CREDENTIAL_VERIFIED)
        && c.status != "Unknown"
    {
        let before = find(old, condition::CREDENTIAL_VERIFIED);
        if before.is_none_or(|b| b.status != c.status || b.message != c.message) {
            let passed = c.status == "True";
            out.push(Notice {
                warning: !passed,
                reason: if passed {
                    reason::CHECK_PASSED
                } else {
                    reason::CHECK_FAILED
                },
                action: "VerifyCredential",
                note: c.message.clone().unwrap_or_default(),
            });
        }
    }

    if let Some(ready) = find(Some(new), condition::READY)
        && ready.reason.as_deref() == Some(reason::SECRET_MISSING)
    {
        let before = find(old, condition::READY);
        if before.is_none_or(|b| b.message != ready.message) {
            out.push(Notice {
                warning: true,
                reason: reason::SECRET_MISSING,
                action: "ResolveCredential",
                note: ready.message.clone().unwrap_or_default(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_crds::PartnerIntegrationSpec;
    use tollgate_crds::v1alpha1::{KillSwitch, SidecarSummary, Sla, TrafficSummary};

    fn entry(kill: bool, sla: bool) -> Entry {
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = "https://api.example.com".into();
        s.kill_switch = Some(KillSwitch {
            enabled: kill,
            reason: Some("INC-1".into()),
        });
        if sla {
            s.sla = Some(Sla {
                availability_percent: Some("99".into()),
                latency_p95: Some("500ms".into()),
            });
        }
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        Entry::new(2, s, p, None)
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// The status of `e` (generation 2, valid, its Secret read) with what sidecars reported.
    fn status_for(e: &Entry, observed: Option<&Observed>) -> PartnerIntegrationStatus {
        let f = Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(e),
            observed,
        };
        build(&f, None, t("2026-06-01T00:00:00Z"))
    }

    /// An adaptive quota: the lowest rate fresh sidecars report in force shows on the status;
    /// a report claiming an impossible percentage is refused, naming the field.
    #[tokio::test]
    async fn partner_throttling_shows_the_lowest_rate_in_force() {
        use crate::traffic::TrafficStore;
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = "https://api.example.com".into();
        s.rate_limit = serde_json::from_value(serde_json::json!({
            "scope": "perPod",
            "limits": [{"name": "s", "requests": 100, "per": "1s"}],
            "adaptive": {"minPercent": 10},
        }))
        .unwrap();
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        let e = Entry::new(2, s, p, None);
        let store = TrafficStore::new(
            std::time::Duration::from_secs(300),
            std::time::Duration::from_secs(30),
        );
        let report = |percent: f64| {
            serde_json::from_value::<tollgate_crds::distribution::IntegrationReport>(
                serde_json::json!({
                    "namespace": "ns", "name": "a", "configRevision": e.config_revision,
                    "intervalMillis": 5000, "requests": 10, "errors": 0,
                    "rateLimited": 0, "breaker": "closed", "adaptivePercent": percent,
                }),
            )
            .unwrap()
        };
        let key = ("ns".to_string(), "a".to_string());
        let pods = ["ns/p1".to_string(), "ns/p2".to_string()];
        let condition_at = |percents: [f64; 2], now: tokio::time::Instant| {
            for (pod, p) in pods.iter().zip(percents) {
                store.record(pod, &report(p), now).unwrap();
            }
            let observed = store.observe(&key, &pods, &e.config_revision, now);
            let status = status_for(&e, Some(&observed));
            find(Some(&status), condition::PARTNER_THROTTLING)
                .unwrap()
                .clone()
        };
        let now = tokio::time::Instant::now();
        let c = condition_at([100.0, 37.4], now);
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some(reason::RATE_LOWERED));
        assert!(
            c.message
                .as_deref()
                .unwrap()
                .contains("37% of the configured rate"),
            "{c:?}"
        );
        let c = condition_at([100.0, 100.0], now + std::time::Duration::from_secs(5));
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some(reason::RATE_AS_CONFIGURED))
        );
        let bad = store.record(&pods[0], &report(250.0), now).unwrap_err();
        assert!(bad.to_string().starts_with("adaptivePercent:"), "{bad}");
        // Without an adaptive quota there is no such condition.
        let plain = entry(false, false);
        let status = status_for(&plain, None);
        assert!(find(Some(&status), condition::PARTNER_THROTTLING).is_none());
    }

    /// A rotation window: what sidecars report about the keys shows on the status.
    #[tokio::test]
    async fn the_secondary_key_in_use_shows_with_when_it_was_last_used() {
        use crate::traffic::TrafficStore;
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = "https://api.example.com".into();
        s.credentials = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "api", "key": "new"},
            "secondaryRef": {"name": "api", "key": "old"},
        }))
        .unwrap();
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        let e = Entry::new(2, s, p, None);
        let store = TrafficStore::new(
            std::time::Duration::from_secs(300),
            std::time::Duration::from_secs(30),
        );
        let report = |primary: u64, secondary: u64, last: Option<i64>| {
            serde_json::from_value::<tollgate_crds::distribution::IntegrationReport>(
                serde_json::json!({
                    "namespace": "ns", "name": "a", "configRevision": e.config_revision,
                    "intervalMillis": 5000, "requests": primary + secondary, "errors": 0,
                    "rateLimited": 0, "breaker": "closed",
                    "credentialKeys": {"primary": primary, "secondary": secondary,
                                       "secondaryLastUsed": last},
                }),
            )
            .unwrap()
        };
        let key = ("ns".to_string(), "a".to_string());
        let pods = ["ns/p1".to_string(), "ns/p2".to_string()];
        let now = tokio::time::Instant::now();
        store
            .record(&pods[0], &report(3, 2, Some(1_780_000_000)), now)
            .unwrap();
        store
            .record(&pods[1], &report(4, 1, Some(1_780_000_100)), now)
            .unwrap();
        let observed = store.observe(&key, &pods, &e.config_revision, now);
        let status = status_for(&e, Some(&observed));
        let c = find(Some(&status), condition::SECONDARY_KEY_IN_USE).unwrap();
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some(reason::SECONDARY_KEY_SERVING));
        let m = c.message.as_deref().unwrap();
        assert!(m.contains("3 of 10 accepted calls"), "{m}");
        assert!(
            m.contains("last served a call at 2026-05-28T20:28:20Z"),
            "{m}"
        );

        // Later, every call goes with the primary: the secondary can be revoked.
        let later = now + std::time::Duration::from_secs(400);
        store
            .record(&pods[0], &report(6, 0, Some(1_780_000_000)), later)
            .unwrap();
        let observed = store.observe(&key, &pods, &e.config_revision, later);
        let f = Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: Some(&observed),
        };
        let status = build(&f, Some(&status), t("2026-06-01T00:07:00Z"));
        let c = find(Some(&status), condition::SECONDARY_KEY_IN_USE).unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some(reason::PRIMARY_KEY_SERVING));
        let m = c.message.as_deref().unwrap();
        assert!(m.contains("primary key for all 6 calls"), "{m}");
        assert!(
            m.contains("last served a call at 2026-05-28T20:26:40Z"),
            "{m}"
        );

        // Without a secondaryRef there is no such condition.
        let plain = entry(false, false);
        let f = Findings {
            in_force: Some(&plain),
            ..f
        };
        assert!(
            find(
                Some(&build(&f, None, t("2026-06-01T00:00:00Z"))),
                condition::SECONDARY_KEY_IN_USE
            )
            .is_none()
        );
    }

    /// OAuth2: failed token fetches reported by sidecars show on the status.
    #[tokio::test]
    async fn failed_token_fetches_show_as_credential_refresh_failing() {
        use crate::traffic::TrafficStore;
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = "https://api.example.com".into();
        s.credentials = serde_json::from_value(serde_json::json!({
            "format": "Bearer {value}",
            "oauth2": {
                "tokenUrl": "https://login.example.com/oauth/token",
                "clientIdRef": {"name": "oauth", "key": "id"},
                "clientSecretRef": {"name": "oauth", "key": "secret"},
            },
        }))
        .unwrap();
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        let e = Entry::new(2, s, p, None);
        let store = TrafficStore::new(
            std::time::Duration::from_secs(300),
            std::time::Duration::from_secs(30),
        );
        let key = ("ns".to_string(), "a".to_string());
        let pods = ["ns/p1".to_string()];
        let report = serde_json::from_value::<tollgate_crds::distribution::IntegrationReport>(
            serde_json::json!({
                "namespace": "ns", "name": "a", "configRevision": e.config_revision,
                "intervalMillis": 5000, "requests": 4, "errors": 0, "rateLimited": 0,
                "refused": 4, "breaker": "closed", "credentialRefreshFailures": 3,
            }),
        )
        .unwrap();
        let now = tokio::time::Instant::now();
        let observed = store.observe(&key, &pods, &e.config_revision, now);
        let f = Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: Some(&observed),
        };
        let calm = build(&f, None, t("2026-06-01T00:00:00Z"));
        let c = find(Some(&calm), condition::CREDENTIAL_REFRESH_FAILING).unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some(reason::TOKENS_REFRESHED));
        store.record(&pods[0], &report, now).unwrap();
        let observed = store.observe(&key, &pods, &e.config_revision, now);
        let f = Findings {
            observed: Some(&observed),
            ..f
        };
        let failing = build(&f, Some(&calm), t("2026-06-01T00:00:10Z"));
        let c = find(Some(&failing), condition::CREDENTIAL_REFRESH_FAILING).unwrap();
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some(reason::TOKEN_ENDPOINT_FAILING));
        assert!(
            c.message
                .as_deref()
                .unwrap()
                .starts_with("3 OAuth2 token fetches failed")
        );
    }

    /// The start-up check: Unknown until a sidecar reports, a failure wins over passes, and one
    /// event per new result.
    #[test]
    fn the_start_up_check_shows_as_credential_verified_with_one_event_per_result() {
        use tollgate_crds::distribution::CredentialCheckResult;
        let mut s = PartnerIntegrationSpec::default();
        s.upstream.url = "https://api.example.com".into();
        s.credentials = serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "api", "key": "k"},
            "verify": {"path": "/v1/account"},
        }))
        .unwrap();
        let p = tollgate_crds::compile("ns", "a", &s).unwrap();
        let e = Entry::new(2, s, p, None);
        let result = |ok: bool, message: &str, at: i64| CredentialCheckResult {
            ok,
            message: message.into(),
            at,
        };
        let observed = |check: Option<CredentialCheckResult>| Observed {
            credential_check: check,
            ..Observed::default()
        };
        let status = |o: &Observed, prev: Option<&PartnerIntegrationStatus>| {
            let f = Findings {
                generation: 2,
                invalid: None,
                secret_problem: None,
                in_force: Some(&e),
                observed: Some(o),
            };
            build(&f, prev, t("2026-06-01T00:00:00Z"))
        };
        let pending = status(&observed(None), None);
        let c = find(Some(&pending), condition::CREDENTIAL_VERIFIED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("Unknown", Some(reason::NOT_YET_CHECKED))
        );
        assert!(notices(None, &pending).is_empty());

        // Two sidecars: one passed, one failed: the failure shows.
        let mut merged = None;
        crate::traffic::merge_check(
            &mut merged,
            Some(&result(
                true,
                "GET /v1/account: the partner answered 200",
                20,
            )),
        );
        crate::traffic::merge_check(
            &mut merged,
            Some(&result(
                false,
                "GET /v1/account: the partner answered 401, not 200",
                10,
            )),
        );
        crate::traffic::merge_check(&mut merged, Some(&result(true, "later pass", 30)));
        let failed = status(&observed(merged), Some(&pending));
        let c = find(Some(&failed), condition::CREDENTIAL_VERIFIED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some(reason::CHECK_FAILED))
        );
        assert!(c.message.as_deref().unwrap().contains("401, not 200"));
        let n = notices(Some(&pending), &failed);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning);
        assert_eq!(n[0].reason, reason::CHECK_FAILED);
        assert!(
            notices(Some(&failed), &failed).is_empty(),
            "no event while unchanged"
        );

        let passed = status(
            &observed(Some(result(
                true,
                "GET /v1/account: the partner answered 200",
                40,
            ))),
            Some(&failed),
        );
        let n = notices(Some(&failed), &passed);
        assert_eq!(n.len(), 1);
        assert!(!n[0].warning);
        assert_eq!(n[0].reason, reason::CHECK_PASSED);
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let e = entry(false, false);
        let f = Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: None,
        };
        let first = build(&f, None, t("2026-01-01T00:00:00Z"));
        let again = build(&f, Some(&first), t("2026-01-01T00:05:00Z"));
        assert_eq!(first, again);
        let ready = find(Some(&again), condition::READY).unwrap();
        assert_eq!(
            ready.last_transition_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert!(notices(None, &first).is_empty());
    }

    #[test]
    fn kill_switch_flip_is_noticed_once() {
        let off = entry(false, false);
        let on = entry(true, false);
        let f = |e| Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(e),
            observed: None,
        };
        let now = t("2026-01-01T00:00:00Z");
        let s_off = build(&f(&off), None, now);
        let s_on = build(&f(&on), Some(&s_off), now);
        let n = notices(Some(&s_off), &s_on);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason, reason::KILL_SWITCH_ENABLED);
        assert!(n[0].note.contains("INC-1"));
        assert!(notices(Some(&s_on), &s_on).is_empty());
        let back = build(&f(&off), Some(&s_on), now);
        assert_eq!(
            notices(Some(&s_on), &back)[0].reason,
            reason::KILL_SWITCH_DISABLED
        );
    }

    #[test]
    fn sla_breach_names_the_miss() {
        let e = entry(false, true);
        let o = Observed {
            sidecars: SidecarSummary {
                desired: 2,
                up_to_date: 2,
                breaker_open: 1,
            },
            traffic: Some(TrafficSummary::default()),
            circuit: BreakerState::Open,
            availability_percent: Some(97.5),
            latency_p95: Some(std::time::Duration::from_millis(900)),
            lifecycle: Vec::new(),
            contract_violations: Vec::new(),
            credential_keys: CredentialKeys::default(),
            credential_refresh_failures: 0,
            credential_check: None,
            adaptive_percent: None,
        };
        let f = Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: Some(&o),
        };
        let s = build(&f, None, t("2026-01-01T00:00:00Z"));
        let sla = find(Some(&s), condition::SLA_BREACHED).unwrap();
        assert_eq!(sla.status, "True");
        assert_eq!(
            sla.reason.as_deref(),
            Some(reason::AVAILABILITY_BELOW_TARGET)
        );
        let msg = sla.message.as_deref().unwrap();
        assert!(msg.contains("97.50%") && msg.contains("900ms"), "{msg}");
        assert_eq!(
            find(Some(&s), condition::CIRCUIT_OPEN).unwrap().status,
            "True"
        );
        assert_eq!(s.circuit.as_deref(), Some("open"));
    }

    #[test]
    fn partner_lifecycle_shows_as_deprecated_condition_and_one_event_per_change() {
        let e = entry(false, false);
        let observed = |lifecycle: Vec<RouteLifecycle>| Observed {
            lifecycle,
            ..Observed::default()
        };
        let f = |o| Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: Some(o),
        };
        let now = t("2026-01-01T00:00:00Z");
        let quiet = observed(Vec::new());
        let s0 = build(&f(&quiet), None, now);
        let c = find(Some(&s0), condition::DEPRECATED).unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason.as_deref(), Some(reason::NOT_DEPRECATED));
        assert!(notices(None, &s0).is_empty());

        let deprecated = observed(vec![RouteLifecycle {
            route: "tracking".into(),
            deprecated: true,
            deprecation_timestamp: Some(1_688_169_599),
            sunset_timestamp: None,
            link: Some("https://partner.example/deprecation".into()),
        }]);
        let s1 = build(&f(&deprecated), Some(&s0), now);
        let c = find(Some(&s1), condition::DEPRECATED).unwrap();
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some(reason::DEPRECATION_ANNOUNCED));
        let msg = c.message.as_deref().unwrap();
        assert!(
            msg.contains("route tracking deprecated as of 2023-06-30T23:59:59Z")
                && msg.contains("https://partner.example/deprecation"),
            "{msg}"
        );
        let n = notices(Some(&s0), &s1);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning);
        assert_eq!(n[0].reason, reason::DEPRECATION_ANNOUNCED);
        assert_eq!(n[0].note, msg);
        // The same announcement again: no event.
        let again = build(&f(&deprecated), Some(&s1), now);
        assert!(notices(Some(&s1), &again).is_empty());

        // A sunset date is a change: the reason says so and one more event names the date.
        let mut sunset = deprecated.clone();
        sunset.lifecycle[0].sunset_timestamp = Some(2_556_143_999);
        let s2 = build(&f(&sunset), Some(&s1), now);
        let c = find(Some(&s2), condition::DEPRECATED).unwrap();
        assert_eq!(c.reason.as_deref(), Some(reason::SUNSET_ANNOUNCED));
        assert!(
            c.message
                .as_deref()
                .unwrap()
                .contains("sunset on 2050-12-31T23:59:59Z"),
            "{c:?}"
        );
        // Still True: the transition time stays.
        assert_eq!(
            c.last_transition_time,
            find(Some(&s1), condition::DEPRECATED)
                .unwrap()
                .last_transition_time
        );
        let n = notices(Some(&s1), &s2);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason, reason::SUNSET_ANNOUNCED);

        // No longer announced: back to False, one Normal event.
        let s3 = build(&f(&quiet), Some(&s2), now);
        assert_eq!(
            find(Some(&s3), condition::DEPRECATED).unwrap().status,
            "False"
        );
        let n = notices(Some(&s2), &s3);
        assert_eq!(n.len(), 1);
        assert!(!n[0].warning);
    }

    #[test]
    fn contract_violations_show_as_a_condition_and_one_event_per_change() {
        let mut spec = PartnerIntegrationSpec::default();
        spec.upstream.url = "https://api.example.com".into();
        spec.contract = Some(tollgate_crds::v1alpha1::Contract {
            success: Some(tollgate_crds::v1alpha1::SuccessRule {
                json_path: "$.status".into(),
                equals: "ok".into(),
            }),
            ..Default::default()
        });
        let policy = tollgate_crds::compile("ns", "a", &spec).unwrap();
        let e = Entry::new(2, spec, policy, None);
        let count = |route: &str, kind: &str, count| ContractViolationCount {
            route: route.into(),
            kind: kind.into(),
            count,
        };
        let observed = |contract_violations| Observed {
            contract_violations,
            ..Observed::default()
        };
        let f = |o| Findings {
            generation: 2,
            invalid: None,
            secret_problem: None,
            in_force: Some(&e),
            observed: Some(o),
        };
        let now = t("2026-01-01T00:00:00Z");
        let quiet = observed(Vec::new());
        let s0 = build(&f(&quiet), None, now);
        let c = find(Some(&s0), condition::CONTRACT_VIOLATED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("False", Some(reason::CONTRACT_KEPT))
        );
        assert!(notices(None, &s0).is_empty());
        // Without a contract, no condition at all.
        let plain = entry(false, false);
        let none = build(
            &Findings {
                in_force: Some(&plain),
                ..f(&quiet)
            },
            None,
            now,
        );
        assert!(find(Some(&none), condition::CONTRACT_VIOLATED).is_none());

        let enums = observed(vec![count("charges", "unknown-enum", 3)]);
        let s1 = build(&f(&enums), Some(&s0), now);
        let c = find(Some(&s1), condition::CONTRACT_VIOLATED).unwrap();
        assert_eq!(c.status, "True");
        assert_eq!(c.reason.as_deref(), Some(reason::UNKNOWN_ENUM_VALUES));
        let n = notices(Some(&s0), &s1);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning);
        assert_eq!(n[0].reason, reason::UNKNOWN_ENUM_VALUES);
        assert!(n[0].note.contains("route charges: 3 unknown-enum"), "{n:?}");

        // More of the same kind: the message follows the counts, no new event.
        let more = observed(vec![count("charges", "unknown-enum", 9)]);
        let s2 = build(&f(&more), Some(&s1), now);
        assert!(notices(Some(&s1), &s2).is_empty());

        // A broken success rule is graver: the reason changes, one event, routes by count.
        let broken = observed(vec![
            count("charges", "success-rule", 2),
            count("charges", "unknown-enum", 9),
            count("refunds", "success-rule", 40),
        ]);
        let s3 = build(&f(&broken), Some(&s2), now);
        let c = find(Some(&s3), condition::CONTRACT_VIOLATED).unwrap();
        assert_eq!(c.reason.as_deref(), Some(reason::SUCCESS_RULE_BROKEN));
        assert_eq!(
            c.message.as_deref(),
            Some(
                "partner answers break the contract (over the status window): route refunds: 40 success-rule; route charges: 2 success-rule, 9 unknown-enum"
            )
        );
        let n = notices(Some(&s2), &s3);
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].reason, reason::SUCCESS_RULE_BROKEN);

        // None any more: False, one Normal event.
        let s4 = build(&f(&quiet), Some(&s3), now);
        let n = notices(Some(&s3), &s4);
        assert_eq!(n.len(), 1);
        assert!(!n[0].warning);
        assert_eq!(n[0].reason, reason::CONTRACT_KEPT);
        assert!(notices(Some(&s4), &s4).is_empty());
    }

    #[test]
    fn deprecated_message_is_bounded() {
        let many: Vec<RouteLifecycle> = (0..64)
            .map(|i| RouteLifecycle {
                route: format!("r{i}"),
                deprecated: true,
                link: Some(format!("https://e.com/{}", "x".repeat(400))),
                ..RouteLifecycle::default()
            })
            .collect();
        let c = lifecycle_condition(&many);
        let msg = c.message.unwrap();
        assert!(msg.len() < 3_000, "{}", msg.len());
        assert!(msg.ends_with("and 59 more routes"), "{msg}");
    }
}
