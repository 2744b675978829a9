//! Pauses the server asks for: `Retry-After` on a 429 or 503 holds back every request
//! to that origin, not only the id that got it; and, when asked to, rate-limit headers
//! (`RateLimit-Remaining`, `X-RateLimit-Remaining`, ...) spread the last requests of a
//! quota over the time left until it resets, and hold them back once it is spent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use tokio::time::Instant;

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
    /// What the rate-limit headers have said of the current quota window.
    window: Mutex<Option<Window>>,
}

/// When the current quota window ends, as narrowed down by the answers so far. A
/// reset is given in whole seconds, rounded up: one answer puts the end within a
/// second, and answers at other moments of the same window narrow it down further.
/// Without that, each window would be taken to last up to a second longer than it
/// does, which for a quota per second halves the rate.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// The window ends after this...
    after: Instant,
    /// ...and by this.
    by: Instant,
}

/// About thirty years from now, or as far as an `Instant` goes.
fn far_future() -> Instant {
    let now = Instant::now();
    (0..=30)
        .rev()
        .find_map(|years| now.checked_add(Duration::from_secs(years * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// When an attempt may be sent, as the quota is spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    Now,
    /// At this time, which is its own.
    At(Instant),
    /// Not before the reset; then ask again, as the answers from the next window will
    /// say how it goes.
    AfterReset(Instant),
}

/// A reset further ahead than a number of seconds this large is a Unix time (as
/// GitHub's `X-RateLimit-Reset` is), not a number of seconds from now.
const UNIX_TIME_FROM: u64 = 1_000_000_000;

impl Pause {
    pub(crate) fn new(epoch: Instant) -> Self {
        Pause {
            epoch,
            until: AtomicU64::new(0),
            spacing: AtomicU64::new(0),
            next: AtomicU64::new(0),
            spacing_ends: AtomicU64::new(0),
            window: Mutex::new(None),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        // Past the epoch by construction; u64 nanoseconds last 584 years.
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        // Past what an Instant holds: as far ahead as it goes, never the past (which
        // would make a wait return at once, over and over).
        self.epoch
            .checked_add(Duration::from_nanos(nanos))
            .unwrap_or_else(far_future)
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

    /// Whether requests are held back now.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused_until().is_some()
    }

    /// Whether there is nothing to remember: no pause, no quota being spread out.
    pub(crate) fn is_quiet(&self) -> bool {
        let now = self.nanos(Instant::now());
        let pacing = self.spacing.load(Ordering::Acquire) != 0
            && now < self.spacing_ends.load(Ordering::Acquire);
        !pacing && self.until.load(Ordering::Acquire) <= now
    }

    fn paused_until_at(&self, now: Instant) -> Option<Instant> {
        let until = self.until.load(Ordering::Acquire);
        (until > self.nanos(now)).then(|| self.instant(until))
    }

    /// Takes the next send time while the quota is spread out. (One atomic load when
    /// it is not.)
    pub(crate) fn pace(&self) -> Turn {
        if self.spacing.load(Ordering::Acquire) == 0 {
            return Turn::Now;
        }
        self.pace_at(Instant::now())
    }

    fn pace_at(&self, now: Instant) -> Turn {
        let spacing = self.spacing.load(Ordering::Acquire);
        let now = self.nanos(now);
        let ends = self.spacing_ends.load(Ordering::Acquire);
        if spacing == 0 || now >= ends {
            return Turn::Now;
        }
        let mut due = 0;
        let taken = self
            .next
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
                due = next.max(now);
                // No turn past the reset: the next window has a fresh quota.
                (due < ends).then(|| due.saturating_add(spacing))
            });
        match taken {
            Ok(_) if due > now => Turn::At(self.instant(due)),
            Ok(_) => Turn::Now,
            Err(_) => Turn::AfterReset(self.instant(ends)),
        }
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
        let reset = self
            .window_end(now, quota.reset.min(longest))
            .saturating_duration_since(now);
        if quota.remaining == 0 {
            // None left and a reset of 0 (a server that rounds down, or a clock ahead
            // of the server's): a second, rather than asking again at once. (Only then:
            // a window narrowed down to end in less than a second does.)
            let reset = if quota.reset.is_zero() {
                Duration::from_secs(1).min(longest)
            } else {
                reset
            };
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

impl Pause {
    /// The latest the current quota window can end, given that an answer at `now`
    /// said it resets in `reset` (rounded up to whole seconds).
    fn window_end(&self, now: Instant, reset: Duration) -> Instant {
        let Some(by) = now.checked_add(reset) else {
            return now;
        };
        let after = now.max(by.checked_sub(Duration::from_secs(1)).unwrap_or(now));
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let narrowed = match *window {
            // The same window if the two ranges meet: narrow it down.
            Some(known) if known.after <= by && after <= known.by && known.by > now => Window {
                after: known.after.max(after),
                by: known.by.min(by),
            },
            // A new window (or the first answer).
            _ => Window { after, by },
        };
        *window = Some(narrowed);
        narrowed.by
    }
}

/// What a response's rate-limit headers say about the quota.
#[derive(Debug, PartialEq, Eq)]
struct Quota {
    remaining: u64,
    /// Until the quota resets.
    reset: Duration,
}

/// The `RateLimit` field: `limit=100, remaining=5, reset=30` (one policy, draft 7) or
/// `"burst";r=0;t=1, "day";r=900;t=3600` (a list of policies, later drafts), of which
/// the most pressing counts: one with nothing left (the longest wait), else the one
/// that leaves the longest time per remaining request.
fn rate_limit_field(field: &str) -> Option<(u64, u64)> {
    let number = |value: &str| value.trim().trim_matches('"').parse::<u64>().ok();
    let mut policies: Vec<(Option<u64>, Option<u64>)> = Vec::new();
    let mut bare = (None, None);
    for item in field.split(',') {
        let item = item.trim();
        let parts: Vec<&str> = item.split(';').collect();
        // A named policy (`"day";r=…;t=…`) has its name first; a part with `=` is a
        // parameter, of a named policy or of the one draft-7 policy.
        let named = parts.first().is_some_and(|first| !first.contains('='));
        let found = if named {
            policies.push((None, None));
            let last = policies.len() - 1;
            &mut policies[last]
        } else {
            &mut bare
        };
        for pair in parts.iter().skip(usize::from(named)) {
            match pair.trim().split_once('=') {
                Some(("remaining" | "r", value)) => found.0 = number(value),
                Some(("reset" | "t", value)) => found.1 = number(value),
                _ => {}
            }
        }
    }
    policies.push(bare);
    let pressing = |&(remaining, reset): &(u64, u64)| {
        // Seconds per remaining request, in thousandths; nothing left beats all.
        let per_request = reset.saturating_mul(1000) / remaining.max(1);
        (remaining == 0, per_request, reset)
    };
    policies
        .into_iter()
        .filter_map(|(remaining, reset)| Some((remaining?, reset?)))
        .max_by_key(pressing)
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
            rate_limit_field(field)?
        } else if let Some(remaining) = text("ratelimit-remaining") {
            (number(remaining)?, number(text("ratelimit-reset")?)?)
        } else {
            let remaining = text("x-ratelimit-remaining")?;
            (number(remaining)?, number(text("x-ratelimit-reset")?)?)
        };
        let reset = if reset >= UNIX_TIME_FROM {
            // Past what a SystemTime holds is "not for a long time": capped by the caller.
            match SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset)) {
                Some(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
                None => Duration::MAX,
            }
        } else {
            Duration::from_secs(reset)
        };
        Some(Quota { remaining, reset })
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
        let policies = [("ratelimit", "\"burst\";r=0;t=1, \"day\";r=900;t=3600")];
        assert_eq!(quota(&policies), secs(0, 1), "nothing left");
        let policies = [("ratelimit", "\"second\";r=10;t=1, \"hour\";r=50;t=3600")];
        assert_eq!(
            quota(&policies),
            secs(50, 3600),
            "72 s a request beats 0.1 s"
        );
        let semicolons = [("ratelimit", "remaining=5;reset=30;limit=100")];
        assert_eq!(quota(&semicolons), secs(5, 30));
        let huge = [
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "18446744073709551615"),
        ];
        assert_eq!(quota(&huge).unwrap().reset, Duration::MAX);
        // Nothing left until the end of time: a pause as long as allowed.
        let now = Instant::now();
        let pause = Pause::new(now);
        let mut headers = HeaderMap::new();
        for (name, value) in huge {
            headers.insert(name, HeaderValue::from_static(value));
        }
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        assert_eq!(
            pause.paused_until_at(now).unwrap() - now,
            Duration::from_secs(60)
        );
        // Nothing left half a second before a narrowed-down reset: half a second.
        let pause = Pause::new(now);
        let mut pair = HeaderMap::new();
        pair.insert("ratelimit-remaining", HeaderValue::from_static("3"));
        pair.insert("ratelimit-reset", HeaderValue::from_static("2"));
        pause.observe_quota(&pair, now, 0, Duration::from_secs(60));
        pair.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        pair.insert("ratelimit-reset", HeaderValue::from_static("1"));
        let later = now + Duration::from_millis(1500);
        pause.observe_quota(&pair, later, 0, Duration::from_secs(60));
        assert_eq!(
            pause.paused_until_at(later).unwrap() - later,
            Duration::from_millis(500)
        );
        // Nothing left and a reset of 0: a second.
        let pause = Pause::new(now);
        headers.insert("x-ratelimit-reset", HeaderValue::from_static("0"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        assert_eq!(
            pause.paused_until_at(now).unwrap() - now,
            Duration::from_secs(1)
        );
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
    fn answers_in_one_window_narrow_down_when_it_ends() {
        let start = Instant::now();
        let pause = Pause::new(start);
        let ms = |n| Duration::from_millis(n);
        // The window ends at start + 1.3 s. At 0.1 s the reset says 2 (1.2 s, rounded
        // up), at 0.4 s it says 1 (0.9 s): it ends by 1.4 s.
        assert_eq!(
            pause.window_end(start + ms(100), Duration::from_secs(2)),
            start + ms(2100)
        );
        assert_eq!(
            pause.window_end(start + ms(400), Duration::from_secs(1)),
            start + ms(1400)
        );
        // An answer of the next window (from 1.35 s, reset 2: ends by 3.35 s) starts anew.
        assert_eq!(
            pause.window_end(start + ms(1350), Duration::from_secs(2)),
            start + ms(3350)
        );
    }

    #[test]
    fn a_low_quota_spreads_sends_until_the_reset() {
        let now = Instant::now();
        let pause = Pause::new(now);
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-remaining", HeaderValue::from_static("4"));
        headers.insert("ratelimit-reset", HeaderValue::from_static("2"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        let due: Vec<_> = (0..4).map(|_| pause.pace_at(now)).collect();
        let at = |n| Turn::At(now + Duration::from_millis(n));
        assert_eq!(due, [Turn::Now, at(500), at(1000), at(1500)]);
        // Turns would now fall after the reset: wait for it, then ask again.
        let reset = now + Duration::from_secs(2);
        assert_eq!(pause.pace_at(now), Turn::AfterReset(reset));
        // Past the reset, no more spacing.
        assert_eq!(pause.pace_at(reset), Turn::Now);
        // Plenty left: no spacing.
        headers.insert("ratelimit-remaining", HeaderValue::from_static("50"));
        pause.observe_quota(&headers, now, 10, Duration::from_secs(60));
        assert_eq!(pause.pace_at(now), Turn::Now);
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
