//! Pauses the server asks for: `Retry-After` on a 429 or 503 holds back every request
//! to that origin, not only the id that got it; and, when asked to, rate-limit headers
//! (`RateLimit-Remaining`, `X-RateLimit-Remaining`, ...) spread the last requests of a
//! quota over the time left until it resets, and hold them back once it is spent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use tokio::time::Instant;
use url::Url;

/// When requests to one origin (scheme, host, port) may go. Times are nanoseconds
/// after `epoch`, so that they fit in atomics; 0 means "no limit".
pub(crate) struct Pause {
    epoch: Instant,
    /// Nothing is sent before this.
    until: AtomicU64,
    /// While the quota runs low: the spacing between two sends...
    spacing: AtomicU64,
    /// ...the time the next send is due...
    next: AtomicU64,
    /// ...and when the quota resets and the spacing ends.
    spacing_ends: AtomicU64,
}

/// A reset further ahead than a number of seconds this large is a Unix time (as
/// GitHub's `X-RateLimit-Reset` is), not a number of seconds from now.
const UNIX_TIME_FROM: u64 = 1_000_000_000;

impl Pause {
    fn new(epoch: Instant) -> Self {
        Pause {
            epoch,
            until: AtomicU64::new(0),
            spacing: AtomicU64::new(0),
            next: AtomicU64::new(0),
            spacing_ends: AtomicU64::new(0),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        // Past the epoch by construction; u64 nanoseconds last 584 years.
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or(self.epoch)
    }

    /// Holds back every request until `now + wait`, or longer if already asked.
    pub(crate) fn pause(&self, now: Instant, wait: Duration) {
        let Some(until) = now.checked_add(wait) else {
            return;
        };
        let until = self.nanos(until).max(1);
        if self.until.fetch_max(until, Ordering::AcqRel) < until {
            tracing::debug!(
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "the server asked for a pause: holding back requests to it",
            );
        }
    }

    /// When requests may go again, if they are held back now. (One atomic load when
    /// the server never asked for a pause.)
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        if self.until.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.paused_until_at(Instant::now())
    }

    fn paused_until_at(&self, now: Instant) -> Option<Instant> {
        let until = self.until.load(Ordering::Acquire);
        (until > self.nanos(now)).then(|| self.instant(until))
    }

    /// Takes the next send time while the quota is spread out: the time to wait for,
    /// if not now. (One atomic load when it is not.)
    pub(crate) fn pace(&self) -> Option<Instant> {
        if self.spacing.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.pace_at(Instant::now())
    }

    fn pace_at(&self, now: Instant) -> Option<Instant> {
        let spacing = self.spacing.load(Ordering::Acquire);
        let now = self.nanos(now);
        if spacing == 0 {
            return None;
        }
        if now >= self.spacing_ends.load(Ordering::Acquire) {
            return None;
        }
        let mut due = 0;
        let _ = self
            .next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                due = next.max(now);
                Some(due.saturating_add(spacing))
            });
        (due > now).then(|| self.instant(due))
    }

    /// Reads a response's rate-limit headers: with nothing left, holds requests back
    /// until the reset (at most `longest`); with at most `low` left, spreads them
    /// evenly until the reset; with more, lets them go.
    pub(crate) fn observe_quota(
        &self,
        headers: &HeaderMap,
        now: Instant,
        low: u64,
        longest: Duration,
    ) {
        let Some(quota) = Quota::read(headers, SystemTime::now()) else {
            return;
        };
        let reset = quota.reset.min(longest);
        if quota.remaining == 0 {
            self.pause(now, reset);
        } else if quota.remaining <= low {
            let spacing = reset / u32::try_from(quota.remaining).unwrap_or(u32::MAX);
            let ends = now.checked_add(reset).map_or(u64::MAX, |at| self.nanos(at));
            self.spacing_ends.store(ends, Ordering::Release);
            let spacing = u64::try_from(spacing.as_nanos()).unwrap_or(u64::MAX);
            self.spacing.store(spacing.max(1), Ordering::Release);
        } else {
            self.spacing.store(0, Ordering::Release);
        }
    }
}

/// What a response's rate-limit headers say about the quota.
#[derive(Debug, PartialEq, Eq)]
struct Quota {
    remaining: u64,
    /// Until the quota resets.
    reset: Duration,
}

impl Quota {
    /// Reads, in this order: the IETF draft's `RateLimit` field
    /// (`limit=100, remaining=5, reset=30` or, in later drafts, `"default";r=5;t=30`),
    /// its older `RateLimit-Remaining` / `RateLimit-Reset` pair, and the common
    /// `X-RateLimit-Remaining` / `X-RateLimit-Reset` pair. A reset is in seconds from
    /// now, or a Unix time in seconds when it is that large.
    fn read(headers: &HeaderMap, now: SystemTime) -> Option<Quota> {
        let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
        let number = |value: &str| value.trim().trim_matches('"').parse::<u64>().ok();
        let (remaining, reset) = if let Some(field) = text("ratelimit") {
            let mut remaining = None;
            let mut reset = None;
            for param in field.split([',', ';']) {
                match param.trim().split_once('=') {
                    Some(("remaining" | "r", value)) => remaining = number(value),
                    Some(("reset" | "t", value)) => reset = number(value),
                    _ => {}
                }
            }
            (remaining?, reset?)
        } else if let Some(remaining) = text("ratelimit-remaining") {
            (number(remaining)?, number(text("ratelimit-reset")?)?)
        } else {
            let remaining = text("x-ratelimit-remaining")?;
            (number(remaining)?, number(text("x-ratelimit-reset")?)?)
        };
        let reset = if reset >= UNIX_TIME_FROM {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(reset);
            at.duration_since(now).unwrap_or(Duration::ZERO)
        } else {
            Duration::from_secs(reset)
        };
        Some(Quota { remaining, reset })
    }
}

/// The pauses of every origin a `FanOut` sends to: the detail endpoint's, kept at
/// hand, and a few others (list pages may be served elsewhere).
pub(crate) struct Pauses {
    epoch: Instant,
    detail: Pause,
    detail_origin: url::Origin,
    others: Mutex<Vec<(url::Origin, Arc<Pause>)>>,
}

/// The most other origins remembered; past it, the oldest one is forgotten.
const OTHER_ORIGINS: usize = 16;

impl Pauses {
    pub(crate) fn new(detail: &Url) -> Self {
        let epoch = Instant::now();
        Pauses {
            epoch,
            detail: Pause::new(epoch),
            detail_origin: detail.origin(),
            others: Mutex::new(Vec::new()),
        }
    }

    /// The detail endpoint's.
    pub(crate) fn detail(&self) -> &Pause {
        &self.detail
    }

    /// The pause of `url`'s origin.
    pub(crate) fn of(&self, url: &Url) -> Arc<Pause> {
        let origin = url.origin();
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, pause)) = others.iter().find(|(known, _)| *known == origin) {
            return Arc::clone(pause);
        }
        if others.len() >= OTHER_ORIGINS {
            others.remove(0);
        }
        let pause = Arc::new(Pause::new(self.epoch));
        others.push((origin, Arc::clone(&pause)));
        pause
    }

    /// Whether `url` is the detail endpoint's origin.
    pub(crate) fn is_detail(&self, url: &Url) -> bool {
        url.origin() == self.detail_origin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn quota(pairs: &[(&'static str, &'static str)]) -> Option<Quota> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Quota::read(&headers, now)
    }

    fn secs(remaining: u64, reset: u64) -> Option<Quota> {
        Some(Quota {
            remaining,
            reset: Duration::from_secs(reset),
        })
    }

    #[test]
    fn reads_every_form() {
        let draft = [("ratelimit", "limit=100, remaining=5, reset=30")];
        assert_eq!(quota(&draft), secs(5, 30));
        let structured = [("ratelimit", "\"default\";r=7;t=12")];
        assert_eq!(quota(&structured), secs(7, 12));
        let pair = [("ratelimit-remaining", "0"), ("ratelimit-reset", "9")];
        assert_eq!(quota(&pair), secs(0, 9));
        let github = [
            ("x-ratelimit-remaining", "42"),
            ("x-ratelimit-reset", "1700000060"),
        ];
        assert_eq!(quota(&github), secs(42, 60));
        let past = [
            ("x-ratelimit-remaining", "1"),
            ("x-ratelimit-reset", "1600000000"),
        ];
        assert_eq!(quota(&past), secs(1, 0));
    }

    #[test]
    fn ignores_what_it_cannot_read() {
        assert_eq!(quota(&[]), None);
        assert_eq!(quota(&[("ratelimit-remaining", "5")]), None);
        assert_eq!(
            quota(&[("x-ratelimit-remaining", "-1"), ("x-ratelimit-reset", "5")]),
            None
        );
        assert_eq!(quota(&[("ratelimit", "limit=5")]), None);
    }

    #[test]
    fn a_pause_holds_until_its_end_and_only_grows() {
        let now = Instant::now();
        let pause = Pause::new(now);
        assert_eq!(pause.paused_until_at(now), None);
        pause.pause(now, Duration::from_secs(2));
        pause.pause(now, Duration::from_secs(1));
        let until = pause.paused_until_at(now).unwrap();
        assert_eq!(until - now, Duration::from_secs(2));
        assert_eq!(pause.paused_until_at(until), None);
    }

    #[test]
    fn a_low_quota_spreads_sends_until_the_reset() {
        let now = Instant::now();
        let pause = Pause::new(now);
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-remaining", HeaderValue::from_static("4"));
        headers.insert("ratelimit-reset", HeaderValue::from_static("2"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        let due: Vec<_> = (0..4)
            .map(|_| pause.pace_at(now).map(|at| at - now))
            .collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(due, [None, ms(500), ms(1000), ms(1500)]);
        // Past the reset, no more spacing.
        assert_eq!(pause.pace_at(now + Duration::from_secs(2)), None);
        // Plenty left: no spacing.
        headers.insert("ratelimit-remaining", HeaderValue::from_static("50"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        assert_eq!(pause.pace_at(now), None);
        // None left: a pause until the reset, capped.
        headers.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        headers.insert("ratelimit-reset", HeaderValue::from_static("3600"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        assert_eq!(
            pause.paused_until_at(now).unwrap() - now,
            Duration::from_secs(60)
        );
    }
}
