//! The concurrency limit: a semaphore whose size is fixed, or moved by the adaptive
//! controller between two bounds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::adaptive::Controller;
use crate::error::{Error, ErrorKind};

/// How many requests may be on the wire at once: a fixed number, or a limit that finds
/// the server's capacity by itself.
///
/// [`FanOutBuilder::concurrency`](crate::FanOutBuilder::concurrency) takes either;
/// a plain number means [`Concurrency::fixed`].
///
/// ```
/// use fanout::{Concurrency, FanOut};
///
/// let videos = FanOut::<String, serde_json::Value>::builder()
///     .detail_url("https://api.example.com/videos/{id}")
///     // Start at 2, never more than 64 at once: as many as the server copes with.
///     .concurrency(Concurrency::adaptive(2, 64))
///     .build()?;
/// # Ok::<(), fanout::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fixed(usize),
    Adaptive { min: usize, max: usize },
}

impl Concurrency {
    /// Exactly `limit` requests at most, always.
    pub const fn fixed(limit: usize) -> Self {
        Concurrency(Kind::Fixed(limit))
    }

    /// A limit that adapts, within `min..=max`, to how the server copes, in the manner
    /// of TCP's congestion control and Netflix's concurrency-limits:
    ///
    /// - It starts at `min` and doubles while the server keeps up (slow start).
    /// - It drops by 10% when an attempt ends in 429, 503 or 504, or times out.
    /// - It drops in proportion (by 10% to 50%) when the median latency of the latest
    ///   round of requests is more than twice the lowest seen. A server that does not
    ///   refuse work but slows down under load is detected this way.
    /// - Otherwise it grows by one per round, but only while it is in use: an input
    ///   that supplies ids slower than the server answers does not inflate it.
    ///
    /// A round is as many answers as the limit, from requests sent after the last
    /// change, so each decision judges the current limit. The current limit is in
    /// [`Snapshot::concurrency_limit`](crate::Snapshot::concurrency_limit).
    ///
    /// One limit applies to all of a `FanOut`'s requests, with the signal from all of
    /// them. `docs/performance.md` shows how it compares with fixed limits against a
    /// server that slows down past its capacity.
    pub const fn adaptive(min: usize, max: usize) -> Self {
        Concurrency(Kind::Adaptive { min, max })
    }

    /// The most requests that may ever be on the wire at once.
    pub(crate) fn max(self) -> usize {
        match self.0 {
            Kind::Fixed(limit) => limit,
            Kind::Adaptive { max, .. } => max,
        }
    }

    pub(crate) fn validate(self) -> Result<(), Error> {
        let (low, high) = match self.0 {
            Kind::Fixed(limit) => (limit, limit),
            Kind::Adaptive { min, max } => (min, max),
        };
        let config = |message: String| Error::new(ErrorKind::InvalidConfig, message);
        if low == 0 {
            return Err(config("concurrency must be at least 1".to_owned()));
        }
        if low > high {
            return Err(config(format!(
                "adaptive concurrency's min ({low}) is above its max ({high})"
            )));
        }
        if high > Semaphore::MAX_PERMITS {
            return Err(config(format!(
                "concurrency {high} is too large; the most is {}",
                Semaphore::MAX_PERMITS
            )));
        }
        Ok(())
    }
}

impl From<usize> for Concurrency {
    /// A fixed limit.
    fn from(limit: usize) -> Self {
        Concurrency::fixed(limit)
    }
}

/// What an attempt's end says about the server's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// An answer, whatever its status: its latency is a sample.
    Answered,
    /// 429, 503, 504 or a timeout: the server has too much to do.
    Overloaded,
    /// Nothing to learn (the connection failed, say).
    Unknown,
}

/// One permit per request on the wire, shared by all batches and clones of a `FanOut`.
pub(crate) struct Slots {
    semaphore: Semaphore,
    /// The current limit.
    limit: AtomicUsize,
    max: usize,
    adaptive: Option<Adaptive>,
}

/// The moving part of an adaptive limit.
struct Adaptive {
    controller: std::sync::Mutex<Controller>,
    /// Permits to forget as they come back, because the limit went down while they
    /// were in use.
    debt: AtomicUsize,
    in_flight: AtomicUsize,
    /// The most in flight at once since the controller last looked.
    peak: AtomicUsize,
}

impl Slots {
    /// Slots for a validated `Concurrency`.
    pub(crate) fn new(concurrency: Concurrency) -> Self {
        let (start, max, adaptive) = match concurrency.0 {
            Kind::Fixed(limit) => (limit, limit, None),
            Kind::Adaptive { min, max } => (
                min,
                max,
                Some(Adaptive {
                    controller: std::sync::Mutex::new(Controller::new(min, max, Instant::now())),
                    debt: AtomicUsize::new(0),
                    in_flight: AtomicUsize::new(0),
                    peak: AtomicUsize::new(0),
                }),
            ),
        };
        Slots {
            semaphore: Semaphore::new(start),
            limit: AtomicUsize::new(start),
            max,
            adaptive,
        }
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// The highest the limit may go.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// Waits for a slot.
    pub(crate) async fn acquire(&self) -> Result<Slot<'_>, Error> {
        // The semaphore is never closed, so acquiring only fails if that invariant breaks.
        let permit =
            self.semaphore.acquire().await.map_err(|_| {
                Error::new(ErrorKind::Runtime, "the concurrency limiter was closed")
            })?;
        if let Some(adaptive) = &self.adaptive {
            let now = adaptive.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            adaptive.peak.fetch_max(now, Ordering::Relaxed);
        }
        Ok(Slot {
            permit: Some(permit),
            slots: self,
        })
    }

    /// Tells an adaptive limit how an attempt sent at `sent` ended after `took`.
    pub(crate) fn observe(&self, sent: Instant, took: Duration, signal: Signal) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        if signal == Signal::Unknown {
            return;
        }
        let mut controller = adaptive
            .controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let peak = adaptive.peak.load(Ordering::Relaxed);
        let Some(change) = controller.observe(sent, took, signal, peak, Instant::now()) else {
            return;
        };
        // A new round: the peak counts from what is in flight now.
        let in_flight = adaptive.in_flight.load(Ordering::Relaxed);
        adaptive.peak.store(in_flight, Ordering::Relaxed);
        let (from, to) = (change.from, change.to);
        tracing::debug!(from, to, reason = change.reason, "concurrency limit");
        // Under the controller's lock, so that changes apply in order.
        if to < from {
            let cut = from - to;
            let forgotten = self.semaphore.forget_permits(cut);
            adaptive.debt.fetch_add(cut - forgotten, Ordering::AcqRel);
        } else {
            let added = to - from;
            let mut repaid = 0;
            let _ = adaptive
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    repaid = debt.min(added);
                    Some(debt - repaid)
                });
            self.semaphore.add_permits(added - repaid);
        }
        self.limit.store(to, Ordering::Relaxed);
    }
}

/// A request's place on the wire, given back when dropped.
pub(crate) struct Slot<'a> {
    permit: Option<SemaphorePermit<'a>>,
    slots: &'a Slots,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let Some(adaptive) = &self.slots.adaptive else {
            return; // the permit goes back to the semaphore
        };
        adaptive.in_flight.fetch_sub(1, Ordering::Relaxed);
        let owed = adaptive
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                debt.checked_sub(1)
            })
            .is_ok();
        if owed && let Some(permit) = self.permit.take() {
            permit.forget(); // the limit went down while it was in use
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available(slots: &Slots) -> usize {
        slots.semaphore.available_permits()
    }

    #[test]
    fn bounds_are_checked() {
        assert!(Concurrency::fixed(0).validate().is_err());
        assert!(Concurrency::adaptive(0, 4).validate().is_err());
        assert!(Concurrency::adaptive(5, 4).validate().is_err());
        assert!(Concurrency::adaptive(4, 4).validate().is_ok());
        assert!(Concurrency::fixed(usize::MAX).validate().is_err());
        assert_eq!(Concurrency::from(7), Concurrency::fixed(7));
    }

    #[tokio::test]
    async fn a_lower_limit_takes_slots_back_as_they_come_back() {
        let slots = Slots::new(Concurrency::adaptive(1, 100));
        let mut held = Vec::new();
        // Four good rounds with the limit in use: 1 → 2 → 4 → 8 → 16.
        for _ in 0..4 {
            while held.len() < slots.limit() {
                held.push(slots.acquire().await.unwrap());
            }
            let sent = Instant::now();
            for _ in 0..slots.limit() {
                slots.observe(sent, Duration::from_millis(5), Signal::Answered);
            }
        }
        assert_eq!(slots.limit(), 16);
        while held.len() < 16 {
            held.push(slots.acquire().await.unwrap());
        }
        assert_eq!(available(&slots), 0);

        // All 16 in use when a 429 cuts the limit to 14: two slots are owed.
        slots.observe(Instant::now(), Duration::from_millis(5), Signal::Overloaded);
        assert_eq!(slots.limit(), 14);
        held.truncate(13);
        assert_eq!(
            available(&slots),
            1,
            "of three back, the first two were kept"
        );
        held.push(slots.acquire().await.unwrap());
        assert_eq!(available(&slots), 0, "14 in use: the limit");

        // A good round in use grows it by one (no more slow start).
        let sent = Instant::now();
        for _ in 0..14 {
            slots.observe(sent, Duration::from_millis(5), Signal::Answered);
        }
        assert_eq!(slots.limit(), 15);
        assert_eq!(available(&slots), 1);
        drop(held);
        assert_eq!(available(&slots), 15);
    }
}
