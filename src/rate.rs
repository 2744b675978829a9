//! The token bucket every attempt passes before it is sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The token bucket `fanout` uses: governor's direct (unkeyed) GCRA limiter on its
/// default clock.
///
/// Make one and hand it to several builders with
/// [`FanOutBuilder::rate_limiter`](crate::FanOutBuilder::rate_limiter) when different
/// endpoints of one API share one quota:
///
/// ```
/// use std::num::NonZeroU32;
/// use std::sync::Arc;
/// use fanout::{Quota, RateLimiter};
///
/// let quota = Quota::per_second(NonZeroU32::new(50).unwrap());
/// let limiter = Arc::new(RateLimiter::direct(quota));
/// ```
pub type RateLimiter = governor::DefaultDirectRateLimiter;

/// A rate limiter plus the queue in front of it.
///
/// Attempts of one `FanOut` (all its clones and batches) wait their turn in a FIFO
/// queue, and only the head of the queue sleeps on the limiter. `FanOut`s sharing a
/// limiter have a queue each, whose heads take turns at the limiter. Without the queue
/// every waiting attempt would wake at the same instant for each token and all but one
/// would go back to sleep. While nobody waits, an attempt takes its token with two
/// atomic operations and never touches the queue.
pub(crate) struct Throttle {
    limiter: Arc<RateLimiter>,
    queue: tokio::sync::Mutex<()>,
    /// How many attempts are in the queue (waiting for it or at its head).
    queued: AtomicUsize,
}

impl Throttle {
    pub(crate) fn new(limiter: Arc<RateLimiter>) -> Self {
        Throttle {
            limiter,
            queue: tokio::sync::Mutex::new(()),
            queued: AtomicUsize::new(0),
        }
    }

    /// Takes a token if one is free and nobody is queued for one: two atomic
    /// operations. (One that joins the queue just now may lose a token to this
    /// attempt; the queue orders the waiting, it is not a ticket system.)
    pub(crate) fn try_take(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0 && self.limiter.check().is_ok()
    }

    /// Queues for a token, waits until it is available and takes it.
    pub(crate) async fn wait(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _queued = Queued(&self.queued);
        // The guard is held across the wait on purpose: it is the queue.
        let _turn = self.queue.lock().await;
        // governor's own wait sleeps on a timer with sub-millisecond precision; Tokio's
        // millisecond ticks would waste part of every interval at high rates with a
        // small burst.
        self.limiter.until_ready().await;
    }
}

/// Leaves the queue count when the attempt got its token, or was cancelled waiting.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
