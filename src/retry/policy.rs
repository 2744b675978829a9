//! `RetryPolicy`: which failures are retried, and how long to wait before each retry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use crate::error::{Error, ErrorKind};

const DEFAULT_MAX_RETRIES: u32 = 3;
const DEFAULT_INITIAL_DELAY: Duration = Duration::from_millis(200);
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(10);
const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

type Classifier = dyn Fn(&FailedAttempt<'_>) -> bool + Send + Sync;

/// Which failed attempts are tried again, and how long to wait before each retry.
///
/// Delays grow exponentially (×2 per retry) from [`initial_delay`](Self::initial_delay)
/// up to [`max_delay`](Self::max_delay), with *full jitter*: each delay is drawn
/// uniformly between zero and that bound, so ids that failed together do not retry
/// together. When a retried answer carries `Retry-After`, the retry waits at least
/// that long.
///
/// Transient failures are retried by default: connection failures, per-attempt
/// timeouts, a connection dropped before or during the response, and the statuses
/// 408, 429, 500, 502, 503 and 504. Every other answer is final on the first attempt:
/// a 404 is an answer, not a glitch. [`retry_if`](Self::retry_if) changes that.
///
/// The [`Default`] (also [`RetryPolicy::exponential`], and what a
/// [`FanOut`](crate::FanOut) uses unless told otherwise): up to 3 retries, delays from
/// 200 ms up to 10 s with full jitter, no overall time limit, `Retry-After` obeyed up to
/// 60 s.
///
/// Every retry takes a concurrency slot and a rate-limit token of its own, like a first
/// attempt; while it waits out its delay it holds neither.
///
/// ```
/// use std::time::Duration;
/// use fanout::reqwest::StatusCode;
/// use fanout::RetryPolicy;
///
/// let policy = RetryPolicy::exponential()
///     .max_retries(5)
///     .initial_delay(Duration::from_millis(500))
///     .max_elapsed(Duration::from_secs(120))
///     // This API answers 409 while a record is being rebuilt: worth another try.
///     .retry_if(|failure| {
///         failure.is_transient() || failure.status() == Some(StatusCode::CONFLICT)
///     });
/// ```
#[derive(Clone)]
#[must_use = "a RetryPolicy does nothing until given to FanOutBuilder::retry"]
pub struct RetryPolicy {
    max_retries: u32,
    initial_delay: Duration,
    max_delay: Duration,
    max_elapsed: Option<Duration>,
    max_retry_after: Duration,
    jitter: bool,
    classifier: Option<Arc<Classifier>>,
}

impl RetryPolicy {
    /// Exponential backoff with full jitter and the default settings listed on
    /// [`RetryPolicy`]; the same as `RetryPolicy::default()`.
    pub fn exponential() -> Self {
        RetryPolicy {
            max_retries: DEFAULT_MAX_RETRIES,
            initial_delay: DEFAULT_INITIAL_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
            max_elapsed: None,
            max_retry_after: DEFAULT_MAX_RETRY_AFTER,
            jitter: true,
            classifier: None,
        }
    }

    /// One attempt per id, never retried.
    pub fn none() -> Self {
        RetryPolicy::exponential().max_retries(0)
    }

    /// Retries after the first attempt; `0` means one attempt only.
    ///
    /// Default: 3 (so up to 4 attempts).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Upper bound of the first retry's delay; each later retry doubles it, up to
    /// [`max_delay`](Self::max_delay). Zero (with a zero `max_delay`) retries at once.
    ///
    /// Default: 200 ms.
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Largest delay the exponential growth reaches. (A `Retry-After` may ask for
    /// longer; that is bounded by [`max_retry_after`](Self::max_retry_after).)
    ///
    /// Default: 10 s.
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Stops retrying an id once another retry would start more than this long after
    /// its first attempt was sent. An attempt already running is not cut short: for a
    /// hard limit on an id use [`FanOutBuilder::deadline`](crate::FanOutBuilder::deadline).
    ///
    /// Default: no limit (the number of retries bounds the time).
    pub fn max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Longest `Retry-After` obeyed. A server that asks for a longer wait gets no
    /// retry: the id fails at once with the answer it got, and the error's message
    /// says how long the server asked for. A batch never hangs on "retry in 20 days".
    ///
    /// Default: 60 s.
    pub fn max_retry_after(mut self, limit: Duration) -> Self {
        self.max_retry_after = limit;
        self
    }

    /// Whether delays are drawn at random below their exponential bound (full jitter)
    /// or are the bound itself. Turning jitter off makes ids that fail together retry
    /// together, which is rarely what a struggling server needs.
    ///
    /// Default: on.
    pub fn jitter(mut self, enabled: bool) -> Self {
        self.jitter = enabled;
        self
    }

    /// Decides which failed attempts are retried, replacing the default rule. The
    /// closure sees the attempt's [`Error`], its HTTP status and response headers (when
    /// a response arrived), the attempt number, and
    /// [`is_transient`](FailedAttempt::is_transient), the default rule's answer.
    ///
    /// Only whether to retry changes: the limits (`max_retries`, `max_elapsed`,
    /// `max_retry_after`, the id's deadline) still apply.
    ///
    /// Default: retry exactly the transient failures.
    pub fn retry_if<F>(mut self, classify: F) -> Self
    where
        F: Fn(&FailedAttempt<'_>) -> bool + Send + Sync + 'static,
    {
        self.classifier = Some(Arc::new(classify));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.initial_delay.is_zero() && !self.max_delay.is_zero() {
            // Doubling zero stays zero: max_delay would never be reached.
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the retry policy's initial_delay is zero, so every delay would be zero; \
                 make it longer, or set max_delay to zero too for immediate retries",
            ));
        }
        if self.max_delay < self.initial_delay {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "the retry policy's max_delay ({:?}) is shorter than its initial_delay ({:?})",
                    self.max_delay, self.initial_delay
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn should_retry(&self, failure: &FailedAttempt<'_>) -> bool {
        match &self.classifier {
            Some(classify) => classify(failure),
            None => failure.transient,
        }
    }

    /// The sequence of delay bounds for one id: `max_retries` of them, growing from
    /// `initial_delay` to `max_delay`.
    pub(crate) fn delays(&self) -> ExponentialBackoff {
        ExponentialBuilder::new()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(usize::try_from(self.max_retries).unwrap_or(usize::MAX))
            .build()
    }

    /// The delay to sleep for a bound taken from [`delays`](Self::delays).
    pub(crate) fn jittered(&self, bound: Duration) -> Duration {
        if self.jitter {
            // Full jitter: uniform over [0, bound). (backon's own jitter adds to the
            // bound instead, so that ids never retry earlier than it.)
            // (Computed in f64 seconds, which cannot overflow below a bound that fits.)
            Duration::try_from_secs_f64(bound.as_secs_f64() * fastrand::f64()).unwrap_or(bound)
        } else {
            bound
        }
    }

    pub(crate) fn max_elapsed_limit(&self) -> Option<Duration> {
        self.max_elapsed
    }

    pub(crate) fn retry_after_limit(&self) -> Duration {
        self.max_retry_after
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::exponential()
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_retries", &self.max_retries)
            .field("initial_delay", &self.initial_delay)
            .field("max_delay", &self.max_delay)
            .field("max_elapsed", &self.max_elapsed)
            .field("max_retry_after", &self.max_retry_after)
            .field("jitter", &self.jitter)
            .field("retry_if", &self.classifier.as_ref().map(|_| "<closure>"))
            .finish()
    }
}

/// One failed attempt, as shown to a [`RetryPolicy::retry_if`] closure.
#[derive(Debug)]
pub struct FailedAttempt<'a> {
    pub(crate) error: &'a Error,
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) attempt: u32,
    pub(crate) transient: bool,
}

impl FailedAttempt<'_> {
    /// What went wrong. Its [`url`](Error::url) and [`body_snippet`](Error::body_snippet)
    /// are set; its [`id`](Error::id) is not yet.
    pub fn error(&self) -> &Error {
        self.error
    }

    /// The response's status, if a response arrived.
    pub fn status(&self) -> Option<StatusCode> {
        self.error.status()
    }

    /// The response's headers, if the attempt failed on a non-success status.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.headers
    }

    /// Which attempt this was: 1 for the first.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The default rule's answer: true for connection failures, timeouts, a connection
    /// dropped before or during the response, and the statuses 408, 429, 500, 502, 503
    /// and 504.
    pub fn is_transient(&self) -> bool {
        self.transient
    }
}

/// The statuses that say "not now" rather than "no".
pub(crate) fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stop_after_max_retries() {
        let policy = RetryPolicy::exponential()
            .max_retries(6)
            .initial_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(500))
            .jitter(false);
        let delays: Vec<_> = policy
            .delays()
            .map(|bound| policy.jittered(bound).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 500, 500, 500]);
        assert_eq!(RetryPolicy::none().delays().count(), 0);
    }

    #[test]
    fn full_jitter_stays_below_the_bound_and_spreads() {
        let policy = RetryPolicy::default();
        let bound = Duration::from_secs(1);
        let draws: Vec<_> = (0..1000).map(|_| policy.jittered(bound)).collect();
        assert!(draws.iter().all(|d| *d < bound));
        let low = draws.iter().filter(|d| **d < bound / 2).count();
        assert!((350..=650).contains(&low), "{low} of 1000 below half");
    }

    #[test]
    fn jitter_near_the_largest_duration_does_not_overflow() {
        let policy = RetryPolicy::default();
        for _ in 0..1000 {
            assert!(policy.jittered(Duration::MAX) < Duration::MAX);
        }
        let zero = RetryPolicy::exponential()
            .initial_delay(Duration::ZERO)
            .max_delay(Duration::ZERO);
        zero.validate().unwrap();
        assert!(zero.delays().all(|bound| zero.jittered(bound).is_zero()));
    }

    #[test]
    fn a_zero_initial_delay_with_room_to_grow_is_refused() {
        let err = RetryPolicy::default()
            .initial_delay(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("initial_delay is zero"), "{err}");
    }

    #[test]
    fn transient_statuses() {
        let transient: Vec<u16> = (100..600)
            .filter(|&code| is_transient_status(StatusCode::from_u16(code).unwrap()))
            .collect();
        assert_eq!(transient, [408, 429, 500, 502, 503, 504]);
    }

    #[test]
    fn a_max_delay_below_the_initial_delay_is_refused() {
        let err = RetryPolicy::default()
            .initial_delay(Duration::from_secs(5))
            .max_delay(Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("max_delay"), "{err}");
    }
}
