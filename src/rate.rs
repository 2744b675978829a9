//! The token bucket every attempt passes before it is sent.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, ErrorKind};

/// The error a [`RateLimit`] gives when it cannot hand out a token.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

/// Where rate-limit tokens come from: every attempt (retries too) takes one before it
/// is sent.
///
/// Two come with `fanout`: governor's in-process [`RateLimiter`], which
/// [`requests_per_second`](crate::FanOutBuilder::requests_per_second) and
/// [`rate_limit`](crate::FanOutBuilder::rate_limit) build, and, with the `redis`
/// feature, `fanout::redis::RedisRateLimiter`, which any number of processes share.
/// Implement it to take tokens from somewhere else, and pass it to
/// [`FanOutBuilder::rate_limiter`](crate::FanOutBuilder::rate_limiter).
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use fanout::{BoxError, RateLimit};
///
/// /// Lets through a fixed number of requests in all, then refuses.
/// #[derive(Debug)]
/// struct Allowance(AtomicU64);
///
/// impl RateLimit for Allowance {
///     fn try_acquire(&self) -> bool {
///         self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
///     }
///
///     fn acquire(&self) -> fanout::Acquire<'_> {
///         let granted = self.try_acquire();
///         Box::pin(async move {
///             if granted { Ok(()) } else { Err(BoxError::from("the allowance is spent")) }
///         })
///     }
/// }
/// ```
pub trait RateLimit: Any + fmt::Debug + Send + Sync {
    /// Takes a token if one is free now, without waiting. A limiter that cannot tell
    /// without waiting (one across a network) returns `false`, and
    /// [`acquire`](Self::acquire) is called instead.
    fn try_acquire(&self) -> bool;

    /// Waits until a token is free and takes it.
    ///
    /// An error fails the attempt, which is not sent, with
    /// [`ErrorKind::RateLimiter`]; the retry policy treats it as transient, so the id
    /// tries again after a backoff. Dropping the future gives up the wait.
    fn acquire(&self) -> Acquire<'_>;
}

/// The future [`RateLimit::acquire`] returns.
pub type Acquire<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

impl RateLimit for RateLimiter {
    fn try_acquire(&self) -> bool {
        self.check().is_ok()
    }

    fn acquire(&self) -> Acquire<'_> {
        Box::pin(async move {
            self.until_ready().await;
            Ok(())
        })
    }
}

/// The rate limiter of one `FanOut`, and for governor's the queue in front of it.
pub(crate) enum Throttle {
    /// governor's limiter. Attempts of one `FanOut` (all its clones and batches) wait
    /// their turn in a FIFO queue, and only the head of the queue sleeps on the
    /// limiter. `FanOut`s sharing a limiter have a queue each, whose heads take turns
    /// at the limiter. Without the queue every waiting attempt would wake at the same
    /// instant for each token and all but one would go back to sleep. While nobody
    /// waits, an attempt takes its token with two atomic operations and never touches
    /// the queue.
    Local {
        limiter: Arc<RateLimiter>,
        queue: tokio::sync::Mutex<()>,
        /// How many attempts are in the queue (waiting for it or at its head).
        queued: AtomicUsize,
    },
    /// Any other limiter: each attempt asks it on its own, and it decides the order.
    /// (A `RedisRateLimiter` gives each waiter near its turn a time of its own, and
    /// queues the rest itself.)
    Other(Arc<dyn RateLimit>),
}

impl Throttle {
    /// A throttle on a limiter of its own for `quota`.
    pub(crate) fn local(quota: crate::Quota) -> Self {
        Throttle::new(Arc::new(RateLimiter::direct(quota)))
    }

    /// The throttle for `limiter`: governor's gets the queue.
    pub(crate) fn new<L: RateLimit>(limiter: Arc<L>) -> Self {
        let any: Arc<dyn Any + Send + Sync> = limiter.clone();
        match any.downcast::<RateLimiter>() {
            Ok(limiter) => Throttle::Local {
                limiter,
                queue: tokio::sync::Mutex::new(()),
                queued: AtomicUsize::new(0),
            },
            Err(_) => Throttle::Other(limiter),
        }
    }

    /// Takes a token if one is free and nobody is queued for one: for governor's, two
    /// atomic operations. (One that joins the queue just now may lose a token to this
    /// attempt; the queue orders the waiting, it is not a ticket system.)
    pub(crate) fn try_take(&self) -> bool {
        match self {
            Throttle::Local {
                limiter, queued, ..
            } => queued.load(Ordering::Acquire) == 0 && limiter.check().is_ok(),
            Throttle::Other(limiter) => limiter.try_acquire(),
        }
    }

    /// Waits until a token is available and takes it.
    pub(crate) async fn wait(&self) -> Result<(), Error> {
        match self {
            Throttle::Local {
                limiter,
                queue,
                queued,
            } => {
                queued.fetch_add(1, Ordering::AcqRel);
                let _queued = Queued(queued);
                // The guard is held across the wait on purpose: it is the queue.
                let _turn = queue.lock().await;
                // governor's own wait sleeps on a timer with sub-millisecond
                // precision; Tokio's millisecond ticks would waste part of every
                // interval at high rates with a small burst.
                limiter.until_ready().await;
                Ok(())
            }
            Throttle::Other(limiter) => limiter.acquire().await.map_err(|err| {
                Error::new(
                    ErrorKind::RateLimiter,
                    format!("no rate-limit token, so nothing was sent: {err}"),
                )
                .with_source(err)
            }),
        }
    }
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Throttle::Local { .. } => f.write_str("governor"),
            Throttle::Other(limiter) => fmt::Debug::fmt(limiter, f),
        }
    }
}

/// Leaves the queue count when the attempt got its token, or was cancelled waiting.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::Quota;

    #[derive(Debug)]
    struct Refuses;

    impl RateLimit for Refuses {
        fn try_acquire(&self) -> bool {
            false
        }

        fn acquire(&self) -> Acquire<'_> {
            Box::pin(async { Err(BoxError::from("store unreachable")) })
        }
    }

    #[test]
    fn governor_gets_the_queue_and_others_are_asked_directly() {
        let quota = Quota::per_second(NonZeroU32::new(1).unwrap());
        let local = Throttle::new(Arc::new(RateLimiter::direct(quota)));
        assert!(matches!(local, Throttle::Local { .. }));
        assert!(local.try_take());
        assert!(!local.try_take(), "the one token is spent");
        let other = Throttle::new(Arc::new(Refuses));
        assert!(matches!(other, Throttle::Other(_)));
        assert!(!other.try_take());
    }

    #[tokio::test]
    async fn a_limiter_that_fails_gives_a_typed_error() {
        let err = Throttle::new(Arc::new(Refuses)).wait().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RateLimiter);
        assert!(err.to_string().contains("store unreachable"), "{err}");
    }
}
