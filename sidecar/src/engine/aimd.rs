//! Adaptive quota (`rateLimit.adaptive`): the partner's own throttling lowers the rate this
//! sidecar allows itself, multiplicatively, and it climbs back additively while the partner
//! stays quiet (AIMD, as TCP does with its window).
//!
//! The state is one factor in `[min, 1]` that scales the quota's share: halved on a throttle
//! signal (a 429, or a rate-limit header saying nothing remains), at most once per `cooldown`
//! so one burst of 429s counts once; after `cooldown` without a signal it grows linearly, from
//! `min` back to 1 over `recovery`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How much one throttle signal keeps of the factor.
const DECREASE: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AimdParams {
    /// The lowest factor, in `(0, 1]`.
    pub(crate) min: f64,
    /// From `min` back to 1 while the partner stays quiet.
    pub(crate) recovery: Duration,
    /// Signals within this long of a decrease count as the same episode.
    pub(crate) cooldown: Duration,
}

#[derive(Debug)]
struct State {
    factor: f64,
    /// When the factor last went down, and when it was last brought up to date.
    decreased: Option<Instant>,
    updated: Instant,
}

#[derive(Debug)]
pub(crate) struct Aimd {
    params: AimdParams,
    state: Mutex<State>,
}

impl Aimd {
    pub(crate) fn new(params: AimdParams, now: Instant) -> Self {
        Aimd {
            params: AimdParams {
                min: params.min.clamp(f64::MIN_POSITIVE, 1.0),
                ..params
            },
            state: Mutex::new(State {
                factor: 1.0,
                decreased: None,
                updated: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The factor now (recovery applied up to `now`).
    pub(crate) fn factor(&self, now: Instant) -> f64 {
        let mut s = self.lock();
        self.recover(&mut s, now);
        s.factor
    }

    /// The partner throttled: the new factor if it went down.
    pub(crate) fn throttled(&self, now: Instant) -> Option<f64> {
        let mut s = self.lock();
        if s.decreased
            .is_some_and(|d| now.saturating_duration_since(d) < self.params.cooldown)
        {
            return None;
        }
        self.recover(&mut s, now);
        let next = (s.factor * DECREASE).max(self.params.min);
        s.decreased = Some(now);
        s.updated = now;
        (next < s.factor).then(|| {
            s.factor = next;
            next
        })
    }

    /// Linear growth since the later of the last update and the end of the cooldown.
    fn recover(&self, s: &mut State, now: Instant) {
        if s.factor >= 1.0 {
            s.updated = now;
            return;
        }
        let from = match s.decreased {
            Some(d) => s.updated.max(d + self.params.cooldown),
            None => s.updated,
        };
        if now <= from {
            return;
        }
        let per_sec = (1.0 - self.params.min) / self.params.recovery.as_secs_f64().max(1e-3);
        s.factor = (s.factor + per_sec * (now - from).as_secs_f64()).min(1.0);
        s.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aimd(now: Instant) -> Aimd {
        Aimd::new(
            AimdParams {
                min: 0.1,
                recovery: Duration::from_secs(9),
                cooldown: Duration::from_secs(1),
            },
            now,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_halves_the_factor_once_per_cooldown_down_to_the_floor() {
        let t0 = Instant::now();
        let a = aimd(t0);
        assert_eq!(a.factor(t0), 1.0);
        assert_eq!(a.throttled(t0), Some(0.5));
        // The rest of the same burst of 429s counts once.
        assert_eq!(a.throttled(t0 + Duration::from_millis(500)), None);
        assert_eq!(
            a.factor(t0 + Duration::from_millis(999)),
            0.5,
            "no recovery within the cooldown"
        );
        let mut t = t0;
        for expected in [0.25, 0.125, 0.1, 0.1] {
            t += Duration::from_secs(1);
            // Recovery of the second that passed, then the halving.
            let f = a.throttled(t).unwrap_or_else(|| a.factor(t));
            assert!((f - expected).abs() < 0.06, "{f} vs {expected}");
        }
        assert!(a.factor(t) >= 0.1, "never below the floor");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_partner_gets_the_full_rate_back_over_the_recovery_time() {
        let t0 = Instant::now();
        let a = aimd(t0);
        a.throttled(t0);
        a.throttled(t0 + Duration::from_secs(1));
        a.throttled(t0 + Duration::from_secs(2));
        let low = a.factor(t0 + Duration::from_secs(3));
        assert!(low < 0.2, "{low}");
        // 0.1 per second (0.9 over 9 s), starting a cooldown after the last decrease.
        let f = a.factor(t0 + Duration::from_secs(5));
        assert!((f - (low + 0.2)).abs() < 1e-9, "{f}");
        assert_eq!(
            a.factor(t0 + Duration::from_secs(30)),
            1.0,
            "capped at the full rate"
        );
    }
}
