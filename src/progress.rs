//! `Progress`: where a batch is, readable from another task while it runs.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::retry::Scope;
use crate::stats::{Recorded, RunStats};

/// How far back [`Snapshot::rate`] looks, about.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// The most snapshots kept for the rate: one per [`RATE_WINDOW`] / this at most.
const RATE_SAMPLES: u32 = 50;
/// A rate over less time than this says little: the average since the start instead.
const RATE_SHORTEST: Duration = Duration::from_millis(100);

/// The counts one batch keeps as it runs. Each is updated with one atomic operation
/// where the event happens; what only `RunStats` reports (latencies, causes) is
/// recorded under a lock that no two requests contend for.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    started: OnceLock<Instant>,
    /// When the last outcome was handed out.
    ended: OnceLock<Instant>,
    /// Shared with a list's pages when they say how many ids there are.
    total: Arc<OnceLock<u64>>,
    admitted: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    in_flight: AtomicU64,
    waiting_for_token: AtomicU64,
    held_back: AtomicU64,
    /// What `RunStats` reports beyond the counts. Locked once per attempt, and per
    /// failure: one batch's requests are polled by one thread at a time, so no two of
    /// them contend for it. `None` in a list page's counts, which nobody reads.
    recorded: Option<Mutex<Recorded>>,
}

impl Counters {
    /// The batch's first poll: the clock starts.
    pub(crate) fn start(&self) {
        self.started.get_or_init(Instant::now);
    }

    /// The batch's last outcome has been handed out: the clock stops.
    pub(crate) fn end(&self) {
        self.ended.get_or_init(Instant::now);
    }

    /// How many ids the batch has, when its input says so exactly.
    pub(crate) fn set_total(&self, total: u64) {
        let _ = self.total.set(total);
    }

    pub(crate) fn total(&self) -> Option<u64> {
        self.total.get().copied()
    }

    /// A batch's counts (the default, a list page's, records nothing for `RunStats`),
    /// whose total is whatever `total` is set to, by whoever learns it.
    pub(crate) fn with_total(total: Arc<OnceLock<u64>>) -> Self {
        Counters {
            total,
            recorded: Some(Mutex::default()),
            ..Counters::default()
        }
    }

    pub(crate) fn admitted(&self) {
        self.admitted.fetch_add(1, Relaxed);
    }

    pub(crate) fn finished<T>(&self, result: &Result<T, Error>) {
        match result {
            // Release, and Acquire where they are read: a reader that sees an outcome
            // also sees its id's admission, so done() never exceeds admitted.
            Ok(_) => {
                self.succeeded.fetch_add(1, Release);
            }
            Err(err) => {
                self.failed.fetch_add(1, Release);
                if let Some(mut recorded) = self.recorded() {
                    recorded.failed(err);
                }
            }
        }
    }

    /// An attempt failed with `err`, and the id will try again.
    pub(crate) fn retried(&self, err: &Error) {
        self.retries.fetch_add(1, Relaxed);
        if let Some(mut recorded) = self.recorded() {
            recorded.retried(err);
        }
    }

    /// An attempt ended (answered, failed or timed out) after `took`.
    pub(crate) fn attempt_took(&self, took: Duration) {
        if let Some(mut recorded) = self.recorded() {
            recorded.attempt_took(took);
        }
    }

    fn recorded(&self) -> Option<std::sync::MutexGuard<'_, Recorded>> {
        let recorded = self.recorded.as_ref()?;
        Some(recorded.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// An attempt is on the wire until the returned guard is dropped.
    pub(crate) fn sending(&self) -> Gauge<'_> {
        Gauge::enter(&self.in_flight)
    }

    /// An attempt waits for a rate-limit token until the returned guard is dropped.
    pub(crate) fn waiting_for_token(&self) -> Gauge<'_> {
        Gauge::enter(&self.waiting_for_token)
    }

    /// An attempt is held back by the server's pause or quota until the returned guard
    /// is dropped.
    pub(crate) fn held_back(&self) -> Gauge<'_> {
        Gauge::enter(&self.held_back)
    }
}

/// Counts one in a gauge while it lives, so that a cancelled attempt is counted out
/// too.
#[derive(Debug)]
pub(crate) struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A handle on a running batch's progress, made by
/// [`Batch::progress`](crate::Batch::progress). Cheap to clone and to read from any
/// task or thread while the batch runs; it does not keep the batch running.
///
/// ```no_run
/// # async fn run(players: fanout::FanOut<u32, serde_json::Value>) {
/// use std::time::Duration;
/// use futures::StreamExt;
///
/// let batch = players.fan_out(1..=100_000);
/// let progress = batch.progress();
/// let reporter = tokio::spawn(async move {
///     loop {
///         tokio::time::sleep(Duration::from_secs(5)).await;
///         let now = progress.snapshot();
///         eprintln!("{}/{:?} done, {:.0} requests/s", now.done(), now.total, now.rate);
///     }
/// });
/// let mut results = batch.as_completed();
/// while let Some((id, result)) = results.next().await {
///     // ...
/// }
/// reporter.abort();
/// # }
/// ```
#[derive(Clone)]
pub struct Progress {
    scope: Arc<Scope>,
    /// Recent (time, requests finished) pairs, for the rate. Touched only by
    /// `snapshot`, never by the requests.
    samples: Arc<Mutex<VecDeque<(Instant, u64)>>>,
}

impl Progress {
    pub(crate) fn new(scope: Arc<Scope>) -> Self {
        Progress {
            scope,
            samples: Arc::default(),
        }
    }

    /// A summary of the run so far, or of the whole run once the batch has finished:
    /// counts, wall time, throughput, latency percentiles, failures and retries by
    /// cause. `Display` renders it as a compact table.
    pub fn stats(&self) -> RunStats {
        let counters = &self.scope.progress;
        let now = Instant::now();
        let wall_time = match (counters.started.get(), counters.ended.get()) {
            (Some(started), Some(ended)) => ended.duration_since(*started),
            (Some(started), None) => now.duration_since(*started),
            (None, _) => Duration::ZERO,
        };
        // Copied out, so that the summary's work holds up no request.
        let recorded = counters
            .recorded()
            .map(|recorded| recorded.clone())
            .unwrap_or_default();
        let (succeeded, failed) = (
            counters.succeeded.load(Acquire),
            counters.failed.load(Acquire),
        );
        recorded.summary(
            counters.admitted.load(Relaxed),
            succeeded,
            failed,
            counters.retries.load(Relaxed),
            wall_time,
        )
    }

    /// The counts as they are now.
    ///
    /// Each count is read on its own, so while requests run, a snapshot may catch one
    /// request counted in one place and not yet in the next (finished, say, but still
    /// in flight). Once the batch has finished, the counts are final; ids cancelled by
    /// an output that stopped early (`try_collect_ordered` at its first error, a
    /// dropped stream) are admitted but neither succeeded nor failed.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.counts();
        // Requests: each id's first attempt, and its retries.
        let requests = snapshot.done() + snapshot.retries;
        snapshot.rate = self.rate(Instant::now(), requests, snapshot.elapsed);
        snapshot
    }

    /// The counts, without a rate (and without taking a sample for one).
    fn counts(&self) -> Snapshot {
        let counters = &self.scope.progress;
        let now = Instant::now();
        let succeeded = counters.succeeded.load(Acquire);
        let failed = counters.failed.load(Acquire);
        let retries = counters.retries.load(Relaxed);
        let elapsed = match (counters.started.get(), counters.ended.get()) {
            (Some(started), Some(ended)) => ended.duration_since(*started),
            (Some(started), None) => now.duration_since(*started),
            (None, _) => Duration::ZERO,
        };
        Snapshot {
            admitted: counters.admitted.load(Relaxed),
            succeeded,
            failed,
            retries,
            in_flight: counters.in_flight.load(Relaxed),
            waiting_for_token: counters.waiting_for_token.load(Relaxed),
            held_back: counters.held_back.load(Relaxed),
            concurrency_limit: self.scope.shared.slots.limit(),
            in_backoff: self.scope.sleepers.in_backoff() as u64,
            total: counters.total.get().copied(),
            elapsed,
            rate: 0.0,
        }
    }

    /// Requests finished per second over about the last [`RATE_WINDOW`]: since the
    /// newest earlier snapshot at least that old (or the oldest kept, or the start).
    fn rate(&self, now: Instant, requests: u64, elapsed: Duration) -> f64 {
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        // Drop samples while the next one is old enough to be the baseline.
        while samples
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= RATE_WINDOW)
        {
            samples.pop_front();
        }
        let (since, before) = samples.front().map_or((elapsed, 0), |(at, count)| {
            (now.duration_since(*at), *count)
        });
        // One sample per window / RATE_SAMPLES at most, however often snapshots come.
        let spacing = RATE_WINDOW / RATE_SAMPLES;
        if samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= spacing)
        {
            samples.push_back((now, requests));
        }
        if since < RATE_SHORTEST {
            // Too short to say: the average since the start.
            let seconds = elapsed.as_secs_f64();
            return if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            };
        }
        requests.saturating_sub(before) as f64 / since.as_secs_f64()
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Progress").field(&self.counts()).finish()
    }
}

/// A batch's counts at one moment; see [`Progress::snapshot`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Ids taken from the input so far (repeats dropped by `dedup_ids` not counted).
    pub admitted: u64,
    /// Ids whose outcome is a value.
    pub succeeded: u64,
    /// Ids whose outcome is an error.
    pub failed: u64,
    /// Retries planned after a failed attempt, across all ids (a retry cancelled
    /// while it waited is counted too).
    pub retries: u64,
    /// Attempts on the wire now: sent or being sent, the answer not yet read.
    pub in_flight: u64,
    /// Attempts holding a slot and waiting for a rate-limit token.
    pub waiting_for_token: u64,
    /// Attempts held back by their host: because its server asked for a pause
    /// (`Retry-After` on a 429 or 503), because its quota is running low
    /// ([`respect_rate_limit_headers`](crate::FanOutBuilder::respect_rate_limit_headers)),
    /// or waiting for a slot under its own limit
    /// ([`per_host_concurrency`](crate::FanOutBuilder::per_host_concurrency)).
    pub held_back: u64,
    /// The concurrency limit now: the fixed one, or where an
    /// [adaptive](crate::Concurrency::adaptive) one stands. Shared by all batches of
    /// the `FanOut`.
    pub concurrency_limit: usize,
    /// Ids waiting out the delay before a retry (they hold no slot).
    pub in_backoff: u64,
    /// How many ids the batch has, when known: from an input whose size is exact (a
    /// `Vec`, a range, an `ExactSizeIterator`), or from a list page that says so
    /// ([`total_at`](crate::FanOutBuilder::total_at)); never with `dedup_ids` on.
    pub total: Option<u64>,
    /// Time since the batch was first polled, until its last outcome (or until it was
    /// dropped).
    pub elapsed: Duration,
    /// Requests (attempts, retries included) finished per second recently: since the
    /// newest earlier snapshot (from this handle or its clones) at least 5 seconds
    /// old, or the oldest one kept; since the start for a first snapshot, or one less
    /// than 0.1 s after the last.
    pub rate: f64,
}

impl Snapshot {
    /// Ids with an outcome: succeeded and failed.
    pub fn done(&self) -> u64 {
        self.succeeded + self.failed
    }
}
