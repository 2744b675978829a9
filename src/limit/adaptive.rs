//! The adaptive limit's controller: additive increase, multiplicative decrease, with
//! latency as well as refusals as the signal of overload.
//!
//! Pure logic, fed by [`Slots`](super::Slots) with each attempt's end: what it
//! decides is applied to the semaphore there.

use std::time::Duration;

use super::Signal;

/// The cut on a 429, 503, 504 or timeout, or a round with too many slow answers.
const DECREASE: f64 = 0.9;
/// An answer more than this many times slower than the baseline is slow.
const TOLERANCE: f64 = 2.0;
/// A round with more than one slow answer in this many is overloaded: a few slow
/// answers are the server's usual spread, not our load.
const SLOW_ALLOWED_PER: usize = 10;
/// Growth per good round in slow start.
const SLOW_START_GROWTH: f64 = 1.25;
/// Answers (of good rounds) that make one estimate of the baseline latency.
const BASELINE_SAMPLES: usize = 32;
/// The most answers a round waits for, whatever the limit.
const ROUND_CAP: usize = 256;
/// After this many overloaded rounds in a row that cutting did not cure (or at the
/// floor, where it cannot be cut), the latency is the server's new normal (it got
/// slower for reasons of its own), not our load.
const REBASE_AFTER: u32 = 10;
/// Good rounds waited for before trying again a limit that was too high: at first, and
/// at most, as the wait doubles with each failed try.
const FIRST_PATIENCE: u32 = 4;
const MOST_PATIENCE: u32 = 32;

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
    /// Growing by a quarter each good round, until the first overloaded one.
    slow_start: bool,
    /// The lowest median latency seen, over at least [`BASELINE_SAMPLES`] answers of
    /// good rounds: the server's latency without our load, as near as we can tell. (A
    /// median of a few answers would be as noisy as the answers, and the lowest of many
    /// such would be the fastest answer, not a typical one.)
    baseline: Option<Duration>,
    /// Answers of good rounds, until there are enough for a median.
    pool: Vec<Duration>,
    /// Overloaded rounds in a row, and their answers: if cutting does not cure them,
    /// or the limit is at its floor, after [`REBASE_AFTER`] rounds their median is the
    /// new baseline. (Not sooner: one slow answer at a floor of 1 is a whole round.)
    slow_rounds: u32,
    slow_pool: Vec<Duration>,
    /// The limit before the last round's growth, if the last round grew it: where to
    /// go back to if the growth overloads the server.
    before_growth: Option<f64>,
    /// A limit that overloaded the server the last time it was tried, and how many
    /// good rounds to wait before trying it again (doubling with each failure): a
    /// server that slows down sharply past its capacity makes every try costly.
    ceiling: Option<usize>,
    patience: u32,
    waited: u32,
    /// The round: the attempts whose slots were numbered `first..first + size`, that
    /// is, the first `size` sent after the last decision, however late each answers.
    /// Counting answers instead would let the fast ones of a round fill it before its
    /// slow ones are in.
    first: u64,
    size: usize,
    reported: usize,
    latencies: Vec<Duration>,
    slow: usize,
}

impl Controller {
    pub(crate) fn new(min: usize, max: usize) -> Self {
        Controller {
            min: min as f64,
            max: max as f64,
            limit: min as f64,
            slow_start: true,
            baseline: None,
            pool: Vec::new(),
            slow_rounds: 0,
            slow_pool: Vec::new(),
            before_growth: None,
            ceiling: None,
            patience: 0,
            waited: 0,
            first: 0,
            size: min.clamp(1, ROUND_CAP),
            reported: 0,
            latencies: Vec::new(),
            slow: 0,
        }
    }

    /// The limit in whole requests.
    pub(crate) fn limit(&self) -> usize {
        // Between min and max, both `usize`: the cast is exact.
        self.limit.floor() as usize
    }

    /// Takes in how the attempt that had slot number `ticket` ended after `took`.
    /// `peak` is the most attempts in flight at once during the round, and `issued`
    /// the number the next slot will have. Returns `None` while the round goes on,
    /// and at its end the change of limit it leads to, if any.
    pub(crate) fn observe(
        &mut self,
        ticket: u64,
        took: Duration,
        signal: Signal,
        peak: usize,
        issued: u64,
    ) -> Option<Option<Change>> {
        if ticket < self.first || ticket - self.first >= self.size as u64 {
            return None; // not this round's
        }
        let from = self.limit();
        self.reported += 1;
        match signal {
            Signal::Unknown => {}
            Signal::Overloaded => {
                self.cut(DECREASE);
                return Some(self.next_round(
                    issued,
                    from,
                    "the server is overloaded (429, 503, 504, timeout)",
                ));
            }
            Signal::Answered => {
                self.latencies.push(took);
                if self
                    .baseline
                    .is_some_and(|baseline| took.as_secs_f64() > TOLERANCE * baseline.as_secs_f64())
                {
                    self.slow += 1;
                }
            }
        }
        // Too many slow answers end a round at once: waiting for the rest would only
        // keep the limit too high for longer.
        // At the floor the limit cannot be cut: the whole round is judged, by its
        // median, as to whether the server has got slower on its own.
        let allowed = self.size / SLOW_ALLOWED_PER;
        let at_floor = self.limit <= self.min;
        if self.baseline.is_some() && self.slow > allowed && !at_floor {
            return Some(self.slow_round(issued, from));
        }
        if self.reported < self.size {
            return None;
        }
        if self.latencies.is_empty() {
            return Some(self.next_round(issued, from, "nothing learned"));
        }
        if self.baseline.is_some() && self.slow > allowed {
            // Slow at the floor: not our doing, if it lasts.
            self.slow_rounds += 1;
            self.slow_pool.append(&mut self.latencies);
            if self.slow_rounds >= REBASE_AFTER {
                return Some(self.new_baseline(issued, from));
            }
            return Some(self.next_round(issued, from, "slow at the floor"));
        }
        self.pool.append(&mut self.latencies);
        if self.pool.len() >= BASELINE_SAMPLES {
            let median = median(&mut self.pool);
            self.baseline = Some(
                self.baseline
                    .map_or(median, |baseline| baseline.min(median)),
            );
            self.pool.clear();
        }
        Some(self.good_round(issued, from, peak))
    }

    /// A round with too many slow answers.
    fn slow_round(&mut self, issued: u64, from: usize) -> Option<Change> {
        self.slow_rounds += 1;
        self.slow_pool.append(&mut self.latencies);
        if self.slow_rounds >= REBASE_AFTER {
            // Slow for long whatever we did: not our doing.
            return self.new_baseline(issued, from);
        }
        match self.before_growth {
            // The last growth overloaded the server: back to where it was, and wait
            // longer before trying that again.
            Some(before) => {
                self.slow_start = false;
                self.limit = before.min(self.limit).max(self.min);
                self.patience = (self.patience * 2).clamp(FIRST_PATIENCE, MOST_PATIENCE);
                self.ceiling = Some(from);
                self.waited = 0;
            }
            None => self.cut(DECREASE),
        }
        self.next_round(issued, from, "latency rose with our load")
    }

    /// The server is slow on its own: the median of the slow rounds' answers is its
    /// latency now.
    fn new_baseline(&mut self, issued: u64, from: usize) -> Option<Change> {
        if !self.slow_pool.is_empty() {
            self.baseline = Some(median(&mut self.slow_pool));
        }
        self.pool.clear();
        self.slow_pool.clear();
        self.slow_rounds = 0;
        self.next_round(
            issued,
            from,
            "latency rose, but not with our load: a new baseline",
        )
    }

    /// A round with few enough slow answers: grow the limit if it is in use (by
    /// `peak`) and not held back below a ceiling.
    fn good_round(&mut self, issued: u64, from: usize, peak: usize) -> Option<Change> {
        self.slow_rounds = 0;
        self.slow_pool.clear();
        if self.ceiling.is_some_and(|ceiling| from >= ceiling) {
            // Tried again, and fine now; the next failure waits less long.
            self.ceiling = None;
            self.patience /= 2;
        }
        let below_ceiling = self.ceiling.is_some_and(|ceiling| from + 1 >= ceiling);
        if below_ceiling {
            self.waited += 1;
        }
        if peak < from || self.limit >= self.max || (below_ceiling && self.waited < self.patience) {
            return self.next_round(issued, from, "steady");
        }
        self.waited = 0;
        let before = self.limit;
        let grown = if self.slow_start {
            // At least one more: 1 × 1.25 rounds down to 1.
            (self.limit * SLOW_START_GROWTH).max(self.limit + 1.0)
        } else {
            self.limit + 1.0
        };
        self.limit = grown.min(self.max);
        let change = self.next_round(issued, from, "the server keeps up");
        self.before_growth = Some(before);
        change
    }

    fn cut(&mut self, factor: f64) {
        self.slow_start = false;
        self.limit = (self.limit * factor).max(self.min);
    }

    fn next_round(&mut self, issued: u64, from: usize, reason: &'static str) -> Option<Change> {
        self.first = issued;
        self.size = self.limit().clamp(1, ROUND_CAP);
        self.reported = 0;
        self.latencies.clear();
        self.slow = 0;
        self.before_growth = None;
        let to = self.limit();
        (to != from).then_some(Change { from, to, reason })
    }
}

fn median(latencies: &mut [Duration]) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let middle = latencies.len() / 2;
    *latencies.select_nth_unstable(middle).1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds a controller whole rounds, numbering the slots as `Slots` does.
    struct Feed {
        c: Controller,
        issued: u64,
    }

    impl Feed {
        /// A controller that knows the server's latency to be 50 ms.
        fn new(min: usize, max: usize) -> Self {
            let mut c = Controller::new(min, max);
            c.baseline = Some(50 * MS);
            Feed { c, issued: 0 }
        }

        /// A round of answers of `latency` each, with the limit in use; returns the
        /// limit after.
        fn round(&mut self, latency: Duration) -> usize {
            let size = self.c.limit();
            let first = self.issued;
            self.issued += size as u64;
            for ticket in first..self.issued {
                let ended = self
                    .c
                    .observe(ticket, latency, Signal::Answered, size, self.issued);
                if ended.is_some() {
                    break;
                }
            }
            self.c.limit()
        }
    }

    #[test]
    fn slow_start_grows_by_a_quarter_then_backs_off_and_grows_by_one() {
        let mut f = Feed::new(1, 100);
        let grown: Vec<_> = (0..9).map(|_| f.round(50 * MS)).collect();
        assert_eq!(grown, [2, 3, 4, 5, 6, 7, 9, 12, 15]);
        // The first slow answer: back to where it was before it grew.
        assert_eq!(f.round(325 * MS), 12);
        // Still slow: cut by a tenth.
        assert_eq!(f.round(150 * MS), 10);
        // Back to normal: one more per round, no more by a quarter.
        assert_eq!(f.round(50 * MS), 11);
        assert_eq!(f.round(60 * MS), 12);
    }

    #[test]
    fn a_limit_that_overloaded_the_server_is_tried_again_ever_more_rarely() {
        let mut f = Feed::new(10, 100);
        assert_eq!(f.round(50 * MS), 12);
        assert_eq!(f.round(150 * MS), 10, "12 was too many");
        let tries: Vec<_> = (0..5).map(|_| f.round(50 * MS)).collect();
        assert_eq!(tries, [11, 11, 11, 11, 12], "four good rounds at 11 first");
        assert_eq!(f.round(150 * MS), 11, "12 still too many");
        let tries: Vec<_> = (0..8).map(|_| f.round(50 * MS)).collect();
        assert_eq!(tries, [11, 11, 11, 11, 11, 11, 11, 12], "eight now");
        // Fine this time: the ceiling is gone.
        assert_eq!(f.round(50 * MS), 13);
    }

    #[test]
    fn a_round_is_the_next_attempts_sent_however_late_they_answer() {
        let mut c = Controller::new(4, 100);
        c.baseline = Some(50 * MS);
        // Round 1 (slots 0-3) grows the limit to 5.
        for ticket in 0..4 {
            c.observe(ticket, 50 * MS, Signal::Answered, 4, 4);
        }
        assert_eq!(c.limit(), 5);
        // Round 2 is slots 4-8. Slots 4-7 answer at once and later slots keep
        // answering fast, but the round waits for slot 8.
        for ticket in (4..8).chain(9..40) {
            assert_eq!(c.observe(ticket, 50 * MS, Signal::Answered, 5, 40), None);
        }
        assert_eq!(c.limit(), 5);
        c.observe(8, 400 * MS, Signal::Answered, 5, 40);
        assert_eq!(c.limit(), 4, "slot 8 was slow");
    }

    #[test]
    fn refusals_cut_by_a_tenth_once_per_round_and_never_below_min() {
        let mut f = Feed::new(8, 100);
        assert_eq!(f.round(50 * MS), 10);
        f.c.observe(f.issued, MS, Signal::Overloaded, 10, f.issued + 10);
        assert_eq!(f.c.limit(), 9);
        // Another refusal in the same round judges the old limit.
        f.c.observe(f.issued + 1, MS, Signal::Overloaded, 10, f.issued + 10);
        assert_eq!(f.c.limit(), 9);
        for round in 1..20 {
            let ticket = f.issued + 10 * round;
            f.c.observe(ticket, MS, Signal::Overloaded, 10, ticket + 10);
        }
        assert_eq!(f.c.limit(), 8);
    }

    #[test]
    fn cancelled_attempts_end_a_round_without_a_verdict() {
        let mut c = Controller::new(3, 100);
        for ticket in 0..3 {
            c.observe(ticket, Duration::ZERO, Signal::Unknown, 3, 3);
        }
        assert_eq!(c.limit(), 3);
        assert_eq!(c.first, 3, "a new round began");
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let mut c = Controller::new(4, 100);
        c.baseline = Some(50 * MS);
        for ticket in 0..4 {
            c.observe(ticket, 50 * MS, Signal::Answered, 2, 4);
        }
        assert_eq!(c.limit(), 4);
    }

    #[test]
    fn a_server_slow_at_the_floor_becomes_the_new_baseline() {
        let mut f = Feed::new(2, 100);
        f.c.baseline = Some(10 * MS);
        assert_eq!(f.round(10 * MS), 3);
        assert_eq!(f.round(100 * MS), 2, "the growth went too far");
        // Still slow at the floor, round after round: not our load. After ten slow
        // rounds in a row it is the new baseline.
        let mut rounds = 0;
        while f.c.baseline == Some(10 * MS) {
            assert_eq!(f.round(100 * MS), 2);
            rounds += 1;
        }
        assert_eq!((rounds, f.c.baseline), (9, Some(100 * MS)));
        // It may grow again: the fourth good round below the limit that was too many
        // tries that limit again, and then on.
        let rounds: Vec<_> = (0..5).map(|_| f.round(100 * MS)).collect();
        assert_eq!(rounds, [2, 2, 2, 3, 4]);
    }

    #[test]
    fn one_slow_answer_at_a_floor_of_one_is_not_the_new_baseline() {
        let mut f = Feed::new(1, 100);
        f.c.baseline = Some(50 * MS);
        f.c.slow_start = false;
        assert_eq!(f.round(500 * MS), 1);
        assert_eq!(f.c.baseline, Some(50 * MS));
        assert_eq!(f.round(50 * MS), 2, "a good round grows it again");
    }

    #[test]
    fn one_slow_answer_at_the_floor_is_not_the_new_baseline() {
        let mut c = Controller::new(4, 100);
        c.baseline = Some(50 * MS);
        for (ticket, ms) in [50, 50, 50, 500].into_iter().enumerate() {
            c.observe(ticket as u64, ms * MS, Signal::Answered, 4, 4);
        }
        assert_eq!((c.limit(), c.baseline), (4, Some(50 * MS)));
        // Slow rounds at the floor, ten in a row (that one and nine more), are the
        // server's doing.
        for ticket in 4..40 {
            c.observe(ticket, 300 * MS, Signal::Answered, 4, ticket / 4 * 4 + 4);
        }
        assert_eq!((c.limit(), c.baseline), (4, Some(300 * MS)));
    }

    #[test]
    fn it_stops_at_max() {
        let mut f = Feed::new(1, 6);
        for _ in 0..10 {
            f.round(5 * MS);
        }
        assert_eq!(f.c.limit(), 6);
    }
}
