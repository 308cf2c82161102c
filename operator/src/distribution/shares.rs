//! Demand leases: how a `scope: global` band is divided among the sidecars that run it.
//!
//! Every report interval each sidecar reports the calls that reached its quota (admitted and
//! refused alike): its demand. The hub turns demands into shares in three steps.
//!
//! 1. **Budget.** With one replica the whole band. With several, each replica publishes the
//!    sum of its pods' needs and what its pods hold (peer Leases, [`crate::peers`]); a replica
//!    takes its part, `its need / all needs` ([`part`]), rising above what it holds only into
//!    what the others do not hold now ([`budget`]). A part falls at once but rises only once
//!    it has been at least as high for [`DelayedRise`]'s delay (two peer intervals and a
//!    second), so every other replica has seen the needs behind it and lowered its own first.
//! 2. **Targets** ([`targets`]): each pod needs its demand as a fraction of the band, but at
//!    least the floor (a tenth of the band split evenly among all sidecars, so a quiet pod can
//!    make its first calls; a pod that has not reported yet needs the floor). When the needs
//!    fit in the budget, each pod gets its need scaled up to fill it; when they do not, the
//!    budget is divided max-min fairly (water-filling): small needs are met whole, the
//!    largest share one level.
//! 3. **Grants** ([`grants`]): decreases are sent at once; an increase only takes room nobody
//!    holds. A pod holds the most of the share it last acknowledged, every share sent to it and
//!    not yet acknowledged, and the share of the view being pushed; a sidecar whose stream
//!    ended holds its share for a lease ([`lease`]) and is then reclaimed. So the shares
//!    sidecars run never add up to more than the budget, and an increase waits for the
//!    decreases that make room for it to be acknowledged.
//!
//! A sidecar whose stream ends keeps at most `1 / subscribers` of the band (its share if
//! smaller) until it is connected again: an operator outage never lifts a quota, and
//! sidecars cut off together never exceed the band.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The floor: this part of the band, split evenly among every sidecar of the integration.
pub const FLOOR_PART: f64 = 0.1;

/// The smallest share sent: a sidecar never runs without any (its bands still admit one call
/// per period, see `QuotaShare::scale`).
pub const MIN_FRACTION: f64 = 1e-4;

/// A new target within this much of the share in force (absolute, and relative) is not
/// worth a push.
pub const DEADBAND_ABSOLUTE: f64 = 0.002;
pub const DEADBAND_RELATIVE: f64 = 0.03;

/// How long a sidecar whose stream ended keeps its share reserved: it stops using it (falls to
/// at most `1 / subscribers`) once it has heard nothing for three heartbeats; a second more
/// covers what was still in flight.
pub fn lease(heartbeat: Duration) -> Duration {
    heartbeat.saturating_mul(3) + Duration::from_secs(1)
}

/// The tightest sustained rate of `bands` (requests per second), if any.
pub fn band_rate<'a>(
    bands: impl IntoIterator<Item = &'a tollgate_crds::policy::BandPolicy>,
) -> Option<f64> {
    bands
        .into_iter()
        .filter(|b| b.requests > 0 && !b.per.is_zero())
        .map(|b| b.requests as f64 / b.per.as_secs_f64())
        .min_by(f64::total_cmp)
}

/// What one pod needs, as a fraction of the band: its demand (calls per second reaching the
/// quota) over the band's rate, at least `floor`. Unknown demand needs the floor.
pub fn need(demand: Option<f64>, band_rate: f64, floor: f64) -> f64 {
    let d = demand
        .filter(|d| d.is_finite() && *d > 0.0)
        .map_or(0.0, |d| d / band_rate.max(f64::MIN_POSITIVE));
    d.clamp(floor, 1.0)
}

/// The floor of each pod when `total` sidecars run the band.
pub fn floor(total: usize) -> f64 {
    FLOOR_PART / total.max(1) as f64
}

/// Divides `budget` by `needs`: scaled up to fill it when they fit, max-min fair when not.
pub fn targets(budget: f64, needs: &[f64]) -> Vec<f64> {
    let budget = budget.clamp(0.0, 1.0);
    let sum: f64 = needs.iter().sum();
    if needs.is_empty() {
        return Vec::new();
    }
    if sum <= budget {
        let scale = if sum > 0.0 { budget / sum } else { 0.0 };
        return needs
            .iter()
            .map(|n| {
                if sum > 0.0 {
                    n * scale
                } else {
                    budget / needs.len() as f64
                }
            })
            .collect();
    }
    // Water-filling: the smallest needs first; each gets its need if it fits under an even
    // split of what is left, and the rest share that level.
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by(|a, b| needs[*a].total_cmp(&needs[*b]));
    let mut out = vec![0.0; needs.len()];
    let mut left = budget;
    for (k, &i) in order.iter().enumerate() {
        let even = left / (needs.len() - k) as f64;
        if needs[i] <= even {
            out[i] = needs[i];
            left -= needs[i];
        } else {
            for &j in &order[k..] {
                out[j] = even;
            }
            break;
        }
    }
    out
}

/// One pod, as [`grants`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pod {
    /// What [`targets`] gives it.
    pub target: f64,
    /// The share it was last given (in the view being pushed), if any.
    pub current: Option<f64>,
    /// The most it may be running: see the module docs.
    pub held: f64,
    /// What it may be given again without taking room: the shares this replica sent it (an
    /// assumption about a sidecar that just connected counts in `held`, not here).
    pub entitled: f64,
}

/// The shares to send: each target, unless within the deadband of the share in force; a
/// decrease at once, an increase only into room that neither the other pods (`pods[].held`)
/// nor `held_elsewhere` (sidecars whose streams ended, still within their lease) hold. When
/// the room does not cover every increase, each gets the same part of what it asked for.
///
/// The result never adds up to more than `max(budget - held_elsewhere, sum of held)`: more
/// than the budget only while decreases already sent are not yet acknowledged.
pub fn grants(budget: f64, held_elsewhere: f64, pods: &[Pod]) -> Vec<f64> {
    let available = (budget - held_elsewhere).max(0.0);
    let settle = |p: &Pod| match p.current {
        Some(c)
            if (p.target - c).abs() < DEADBAND_ABSOLUTE.max(DEADBAND_RELATIVE * c)
                && p.target > 0.0 =>
        {
            c
        }
        _ => p.target,
    };
    let mut wanted: Vec<f64> = pods.iter().map(settle).collect();
    // The deadband never keeps the sum over the budget.
    if wanted.iter().sum::<f64>() > available {
        wanted = pods.iter().map(|p| p.target).collect();
    }
    let held: f64 = pods.iter().map(|p| p.held).sum();
    let room = (available - held).max(0.0);
    let asked: f64 = pods
        .iter()
        .zip(&wanted)
        .map(|(p, w)| (w - p.entitled).max(0.0))
        .sum();
    let part = if asked > room { room / asked } else { 1.0 };
    pods.iter()
        .zip(&wanted)
        .map(|(p, &w)| {
            let e = p.entitled.min(p.held);
            let g = if w <= e { w } else { e + (w - e) * part };
            g.clamp(MIN_FRACTION, 1.0)
        })
        .collect()
}

/// This replica's part of the band by need: its pods' needs over everyone's (the whole band
/// when no other replica needs or holds any). The hub delays its rises ([`DelayedRise`]).
pub fn part(own_need: f64, others_need: f64, others_held: f64) -> f64 {
    let others_need = finite(others_need);
    let own_need = finite(own_need);
    if others_need <= 0.0 && finite(others_held) <= 0.0 {
        return 1.0;
    }
    let total = own_need + others_need;
    let proportional = if total > 0.0 { own_need / total } else { 0.0 };
    proportional.clamp(0.0, 1.0)
}

/// This replica's budget: its `part`, but above what it holds (`own_held`) only into what the
/// other replicas do not hold now. When replicas hold more than the band together (each took
/// it all before it saw the others), each falls to its part, and the parts together fit.
pub fn budget(part: f64, own_held: f64, others_held: f64) -> f64 {
    let others_held = finite(others_held).min(1.0);
    let room = finite(own_held).max(1.0 - others_held);
    finite(part).min(room).clamp(0.0, 1.0)
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

/// A value that falls at once and rises only after `delay` at the higher level: the minimum
/// of what was offered over the last `delay`.
#[derive(Clone, Debug)]
pub struct DelayedRise {
    delay: Duration,
    /// (when, value), the values increasing from front to back.
    offers: VecDeque<(Instant, f64)>,
}

impl DelayedRise {
    pub fn new(delay: Duration) -> Self {
        Self {
            delay,
            offers: VecDeque::new(),
        }
    }

    /// Offers `value` at `now`; returns the value in force.
    pub fn offer(&mut self, value: f64, now: Instant) -> f64 {
        // Each entry says since when every offer has been at least its value. Entries above
        // this offer end here; the offers they covered were above it too, so this one holds
        // since the earliest of them (noise just under a level does not restart its wait).
        let mut since = now;
        while let Some(&(at, v)) = self.offers.back()
            && v > value
        {
            since = at;
            self.offers.pop_back();
        }
        if self.offers.back().is_none_or(|(_, v)| *v < value) {
            self.offers.push_back((since, value));
        }
        // Drop offers older than the delay, but keep the newest of them: it was in force for
        // the whole window.
        while self.offers.len() > 1
            && self
                .offers
                .get(1)
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.delay)
        {
            self.offers.pop_front();
        }
        self.offers.front().map_or(value, |(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn demand_90_5_5_gets_90_5_5() {
        let f = floor(3);
        let needs: Vec<f64> = [90.0, 5.0, 5.0]
            .iter()
            .map(|d| need(Some(*d), 100.0, f))
            .collect();
        let t = targets(1.0, &needs);
        assert!(
            close(t[0], 0.9) && close(t[1], 0.05) && close(t[2], 0.05),
            "{t:?}"
        );
    }

    #[test]
    fn needs_that_fit_are_scaled_up_and_unknown_or_quiet_pods_get_the_floor() {
        // Quiet and unknown: the floor, scaled up with the rest.
        let f = floor(4);
        let needs = [
            need(Some(30.0), 100.0, f),
            need(None, 100.0, f),
            need(Some(0.0), 100.0, f),
        ];
        assert!(close(needs[1], 0.025) && close(needs[2], 0.025));
        let t = targets(1.0, &needs);
        assert!(close(t.iter().sum::<f64>(), 1.0));
        assert!(
            close(t[1], t[2]) && t[0] / t[1] > 11.9 && t[0] / t[1] < 12.1,
            "{t:?}"
        );
        // Nobody has reported: an even split.
        let t = targets(1.0, &[f, f, f, f]);
        assert!(t.iter().all(|x| close(*x, 0.25)), "{t:?}");
    }

    #[test]
    fn needs_over_the_budget_are_divided_max_min_fairly() {
        // 200/s, 5/s, 5/s on a 100/s band: the small needs whole, the rest to the large one.
        let t = targets(1.0, &[2.0_f64.min(1.0), 0.05, 0.05]);
        assert!(
            close(t[0], 0.9) && close(t[1], 0.05) && close(t[2], 0.05),
            "{t:?}"
        );
        // Two large needs share one level.
        let t = targets(0.6, &[0.5, 0.1, 0.7]);
        assert!(
            close(t[1], 0.1) && close(t[0], 0.25) && close(t[2], 0.25),
            "{t:?}"
        );
        assert!(targets(1.0, &[]).is_empty());
    }

    #[test]
    fn increases_wait_for_the_decreases_that_make_room() {
        // A pod at 1/3 wants 0.9; two at 1/3 want 0.05: they drop at once, it rises only into
        // room nobody holds, which is none until they acknowledge.
        let third = 1.0 / 3.0;
        let pods = [
            Pod {
                target: 0.9,
                current: Some(third),
                held: third,
                entitled: third,
            },
            Pod {
                target: 0.05,
                current: Some(third),
                held: third,
                entitled: third,
            },
            Pod {
                target: 0.05,
                current: Some(third),
                held: third,
                entitled: third,
            },
        ];
        let g = grants(1.0, 0.0, &pods);
        assert!(
            close(g[0], third) && close(g[1], 0.05) && close(g[2], 0.05),
            "{g:?}"
        );
        // Acknowledged: they hold 0.05 each; the busy pod gets its 0.9.
        let pods = [
            Pod {
                target: 0.9,
                current: Some(third),
                held: third,
                entitled: third,
            },
            Pod {
                target: 0.05,
                current: Some(0.05),
                held: 0.05,
                entitled: 0.05,
            },
            Pod {
                target: 0.05,
                current: Some(0.05),
                held: 0.05,
                entitled: 0.05,
            },
        ];
        let g = grants(1.0, 0.0, &pods);
        assert!(close(g[0], 0.9), "{g:?}");
        assert!(g.iter().sum::<f64>() <= 1.0 + 1e-9);
    }

    /// A sidecar that just connected may be running up to what is assumed of it, but it only
    /// gets more than nothing once there is room besides that assumption.
    #[test]
    fn a_new_sidecar_waits_for_room_beyond_what_it_may_hold() {
        let pods = [
            Pod {
                target: 0.5,
                current: Some(1.0),
                held: 1.0,
                entitled: 1.0,
            },
            Pod {
                target: 0.5,
                current: None,
                held: 0.5,
                entitled: 0.0,
            },
        ];
        let g = grants(1.0, 0.0, &pods);
        assert!(close(g[0], 0.5) && close(g[1], MIN_FRACTION), "{g:?}");
        // The first acknowledged its decrease, the new one its first snapshot.
        let pods = [
            Pod {
                target: 0.5,
                current: Some(0.5),
                held: 0.5,
                entitled: 0.5,
            },
            Pod {
                target: 0.5,
                current: Some(MIN_FRACTION),
                held: MIN_FRACTION,
                entitled: MIN_FRACTION,
            },
        ];
        let g = grants(1.0, 0.0, &pods);
        assert!(close(g[1], 0.5), "{g:?}");
    }

    #[test]
    fn a_departed_sidecars_lease_is_not_handed_out() {
        let pods = [Pod {
            target: 1.0,
            current: Some(0.5),
            held: 0.5,
            entitled: 0.5,
        }];
        assert!(close(grants(1.0, 0.5, &pods)[0], 0.5));
        assert!(close(grants(1.0, 0.0, &pods)[0], 1.0));
    }

    #[test]
    fn small_moves_are_not_pushed_but_never_over_the_budget() {
        let pods = [
            Pod {
                target: 0.61,
                current: Some(0.6),
                held: 0.6,
                entitled: 0.6,
            },
            Pod {
                target: 0.39,
                current: Some(0.4),
                held: 0.4,
                entitled: 0.4,
            },
        ];
        let g = grants(1.0, 0.0, &pods);
        assert!(close(g[0], 0.6) && close(g[1], 0.4), "{g:?}");
        // The budget fell under what the deadband would keep: the targets are sent.
        let pods = [
            Pod {
                target: 0.59,
                current: Some(0.6),
                held: 0.6,
                entitled: 0.6,
            },
            Pod {
                target: 0.39,
                current: Some(0.4),
                held: 0.4,
                entitled: 0.4,
            },
        ];
        let g = grants(0.98, 0.0, &pods);
        assert!(close(g[0], 0.59) && close(g[1], 0.39), "{g:?}");
    }

    /// Property: whatever the targets and holdings, what is sent never exceeds the larger of
    /// the budget left and what is already held.
    #[test]
    fn grants_never_exceed_the_budget_or_what_is_held() {
        use proptest::prelude::*;
        proptest!(|(raw in proptest::collection::vec((0.0f64..1.0, 0.0f64..0.5, proptest::option::of(0.0f64..0.5), 0.0f64..1.0), 1..12), budget in 0.0f64..1.0, elsewhere in 0.0f64..0.5)| {
            let needs: Vec<f64> = raw.iter().map(|r| r.0).collect();
            let t = targets((budget - elsewhere).max(0.0), &needs);
            let pods: Vec<Pod> = raw.iter().zip(&t).map(|(r, t)| Pod { target: *t, current: r.2, held: r.1, entitled: r.1 * r.3 }).collect();
            let g = grants(budget, elsewhere, &pods);
            let held: f64 = pods.iter().map(|p| p.held).sum();
            let sum: f64 = g.iter().sum();
            let bound = (budget - elsewhere).max(0.0).max(held) + MIN_FRACTION * g.len() as f64;
            prop_assert!(sum <= bound + 1e-9, "sum {} bound {}", sum, bound);
        });
    }

    #[test]
    fn budgets_follow_need_and_leave_what_others_hold() {
        assert_eq!(part(0.5, 0.0, 0.0), 1.0);
        assert!(close(part(0.9, 0.1, 0.1), 0.9));
        assert_eq!(part(f64::NAN, 1.0, 0.0), 0.0);
        assert!(close(budget(0.9, 0.1, 0.1), 0.9));
        // Another replica still holds 0.5: this one rises from 0.1 only to 0.5, and waits for
        // it to let go of the rest.
        assert!(close(budget(0.9, 0.1, 0.5), 0.5));
        // Both took the whole band before they saw each other: each falls to its part, never
        // to nothing.
        assert!(close(budget(part(0.9, 0.1, 1.0), 1.0, 1.0), 0.9));
        assert!(close(budget(part(0.1, 0.9, 1.0), 1.0, 1.0), 0.1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_falls_at_once_and_rises_after_the_delay() {
        let mut b = DelayedRise::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(b.offer(0.5, t0), 0.5);
        assert_eq!(b.offer(0.2, t0 + Duration::from_secs(1)), 0.2);
        assert_eq!(b.offer(0.9, t0 + Duration::from_secs(2)), 0.2);
        assert_eq!(b.offer(0.9, t0 + Duration::from_secs(5)), 0.2);
        // 0.9 has been offered for 5 s: it is in force.
        assert_eq!(b.offer(0.9, t0 + Duration::from_secs(7)), 0.9);
        assert_eq!(b.offer(0.1, t0 + Duration::from_secs(8)), 0.1);

        // Noise just under a level offered since 10 s does not restart its wait.
        let mut b = DelayedRise::new(Duration::from_secs(5));
        assert_eq!(b.offer(0.5, t0), 0.5);
        assert_eq!(b.offer(0.947, t0 + Duration::from_secs(10)), 0.5);
        assert_eq!(b.offer(0.946, t0 + Duration::from_secs(12)), 0.5);
        assert_eq!(b.offer(0.9465, t0 + Duration::from_secs(14)), 0.5);
        assert_eq!(b.offer(0.947, t0 + Duration::from_secs(15)), 0.946);
    }

    #[test]
    fn the_lease_is_three_heartbeats_and_a_second() {
        assert_eq!(lease(Duration::from_secs(5)), Duration::from_secs(16));
        let bands = [
            tollgate_crds::policy::BandPolicy {
                name: "s".into(),
                requests: 100,
                per: Duration::from_secs(1),
            },
            tollgate_crds::policy::BandPolicy {
                name: "m".into(),
                requests: 3000,
                per: Duration::from_secs(60),
            },
        ];
        assert_eq!(band_rate(&bands), Some(50.0));
    }
}
