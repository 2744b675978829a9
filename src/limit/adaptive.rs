//! The adaptive limit's controller: additive increase, multiplicative decrease, with
//! latency as well as refusals as the signal of overload.
//!
//! Pure logic, fed by [`Slots`](super::Slots) with each attempt's end: what it
//! decides is applied to the semaphore there.

use std::time::Duration;

use tokio::time::Instant;

use super::Signal;

/// The cut on a 429, 503, 504 or timeout, and the least cut for high latency.
const DECREASE: f64 = 0.9;
/// The deepest cut for high latency, however high.
const DEEPEST_DECREASE: f64 = 0.5;
/// A round whose median latency is more than this many times the baseline is overloaded.
const TOLERANCE: f64 = 2.0;
/// The most answers a round waits for, whatever the limit.
const ROUND_CAP: usize = 256;
/// After this many overloaded rounds in a row that cutting did not cure, the latency is
/// the server's new normal (it got slower for reasons of its own), not our load.
const REBASE_AFTER: u32 = 10;

/// A change of the limit, for the log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) from: usize,
    pub(crate) to: usize,
    pub(crate) reason: &'static str,
}

pub(crate) struct Controller {
    min: f64,
    max: f64,
    /// The limit before rounding down; it grows and shrinks by fractions.
    limit: f64,
    /// Doubling each good round, until the first sign of overload.
    slow_start: bool,
    /// The lowest median latency of a round seen: the server's latency without our
    /// load, as near as we can tell.
    baseline: Option<Duration>,
    /// Overloaded rounds in a row.
    slow_rounds: u32,
    /// When the current round began: only attempts sent since count in it, so that
    /// every decision judges the limit as it is now.
    opened: Instant,
    latencies: Vec<Duration>,
}

impl Controller {
    pub(crate) fn new(min: usize, max: usize, now: Instant) -> Self {
        Controller {
            min: min as f64,
            max: max as f64,
            limit: min as f64,
            slow_start: true,
            baseline: None,
            slow_rounds: 0,
            opened: now,
            latencies: Vec::new(),
        }
    }

    /// The limit in whole requests.
    pub(crate) fn limit(&self) -> usize {
        // Between min and max, both `usize`: the cast is exact.
        self.limit.floor() as usize
    }

    /// Takes in how an attempt sent at `sent` ended after `took`, while at most `peak`
    /// attempts were in flight since the round began; returns the change of limit it
    /// leads to, if any.
    pub(crate) fn observe(
        &mut self,
        sent: Instant,
        took: Duration,
        signal: Signal,
        peak: usize,
        now: Instant,
    ) -> Option<Change> {
        if sent < self.opened {
            return None; // sent under an earlier limit
        }
        let from = self.limit();
        match signal {
            Signal::Unknown => return None,
            Signal::Overloaded => {
                self.cut(DECREASE);
                return self.next_round(
                    now,
                    from,
                    "the server is overloaded (429, 503, 504, timeout)",
                );
            }
            Signal::Answered => self.latencies.push(took),
        }
        if self.latencies.len() < from.clamp(1, ROUND_CAP) {
            return None;
        }
        let median = median(&mut self.latencies);
        let baseline = match self.baseline {
            Some(baseline) if baseline <= median => baseline,
            _ => *self.baseline.insert(median),
        };
        let ratio = median.as_secs_f64() / baseline.as_secs_f64().max(f64::MIN_POSITIVE);
        let reason = if ratio > TOLERANCE {
            self.slow_rounds += 1;
            if self.limit <= self.min || self.slow_rounds >= REBASE_AFTER {
                // Slow at the floor, or slow for long whatever we did: not our doing.
                self.baseline = Some(median);
                self.slow_rounds = 0;
                "latency rose, but not with our load: a new baseline"
            } else {
                self.cut((TOLERANCE / ratio).clamp(DEEPEST_DECREASE, DECREASE));
                "latency rose with our load"
            }
        } else {
            self.slow_rounds = 0;
            if peak >= from && self.limit < self.max {
                let grown = if self.slow_start {
                    self.limit * 2.0
                } else {
                    self.limit + 1.0
                };
                self.limit = grown.min(self.max);
                "the server keeps up"
            } else {
                "steady"
            }
        };
        self.next_round(now, from, reason)
    }

    fn cut(&mut self, factor: f64) {
        self.slow_start = false;
        self.limit = (self.limit * factor).max(self.min);
    }

    fn next_round(&mut self, now: Instant, from: usize, reason: &'static str) -> Option<Change> {
        self.opened = now;
        self.latencies.clear();
        let to = self.limit();
        (to != from).then_some(Change { from, to, reason })
    }
}

fn median(latencies: &mut [Duration]) -> Duration {
    let middle = latencies.len() / 2;
    *latencies.select_nth_unstable(middle).1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds a full round of answers of `latency` each, sent after the round began,
    /// with the limit in use; returns the limit after.
    fn round(controller: &mut Controller, clock: &mut Instant, latency: Duration) -> usize {
        *clock += MS;
        let sent = *clock;
        let in_use = controller.limit();
        for _ in 0..in_use {
            controller.observe(sent, latency, Signal::Answered, in_use, sent);
        }
        controller.limit()
    }

    #[test]
    fn slow_start_doubles_then_latency_cuts_and_growth_is_additive() {
        let mut clock = Instant::now();
        let mut c = Controller::new(1, 100, clock);
        let grown: Vec<_> = (0..5).map(|_| round(&mut c, &mut clock, 50 * MS)).collect();
        assert_eq!(grown, [2, 4, 8, 16, 32]);
        // Latency 6.5 times the baseline: the deepest cut, by half.
        assert_eq!(round(&mut c, &mut clock, 325 * MS), 16);
        // Latency 3 times: cut by 2/3.
        assert_eq!(round(&mut c, &mut clock, 150 * MS), 10);
        // Back to normal: one more per round, no more doubling.
        assert_eq!(round(&mut c, &mut clock, 50 * MS), 11);
        assert_eq!(round(&mut c, &mut clock, 60 * MS), 12);
    }

    #[test]
    fn refusals_cut_by_a_tenth_once_per_round_and_never_below_min() {
        let mut clock = Instant::now();
        let mut c = Controller::new(5, 100, clock);
        assert_eq!(round(&mut c, &mut clock, 50 * MS), 10);
        let before = clock;
        clock += MS;
        c.observe(clock, MS, Signal::Overloaded, 10, clock);
        assert_eq!(c.limit(), 9);
        // A second refusal of a request sent before the cut judges the old limit.
        c.observe(before, MS, Signal::Overloaded, 10, clock + MS);
        assert_eq!(c.limit(), 9);
        for _ in 0..20 {
            clock += MS;
            c.observe(clock, MS, Signal::Overloaded, 10, clock);
        }
        assert_eq!(c.limit(), 5);
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let mut clock = Instant::now();
        let mut c = Controller::new(4, 100, clock);
        clock += MS;
        for _ in 0..4 {
            c.observe(clock, 50 * MS, Signal::Answered, 2, clock);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn a_server_slow_at_the_floor_becomes_the_new_baseline() {
        let mut clock = Instant::now();
        let mut c = Controller::new(2, 100, clock);
        assert_eq!(round(&mut c, &mut clock, 10 * MS), 4);
        assert_eq!(round(&mut c, &mut clock, 100 * MS), 2);
        // Still slow at the floor: not our load. It may grow again.
        assert_eq!(round(&mut c, &mut clock, 100 * MS), 2);
        assert_eq!(round(&mut c, &mut clock, 100 * MS), 3);
    }

    #[test]
    fn it_stops_at_max() {
        let mut clock = Instant::now();
        let mut c = Controller::new(1, 6, clock);
        for _ in 0..10 {
            round(&mut c, &mut clock, 5 * MS);
        }
        assert_eq!(c.limit(), 6);
    }
}
