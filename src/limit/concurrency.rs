//! The concurrency limit: a semaphore whose size is fixed, or moved by the adaptive
//! controller between two bounds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

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
    /// - It starts at `min` and grows by a quarter each round while the server keeps
    ///   up (slow start), then by one each round.
    /// - It drops by 10% when an attempt ends in 429, 503 or 504, or times out; and
    ///   when more than one answer in ten of a round is over twice the server's usual
    ///   latency (the lowest median of 32 answers seen), so that a server that does
    ///   not refuse work but slows down under load is detected too. A growth that
    ///   overloads the server is undone, and tried again ever more rarely.
    /// - It grows only while it is in use: an input that supplies ids slower than the
    ///   server answers does not inflate it.
    ///
    /// A round is the next attempts sent, as many as the limit, so each decision
    /// judges the limit as it is now. The current limit is in
    /// [`Snapshot::concurrency_limit`](crate::Snapshot::concurrency_limit).
    ///
    /// One limit applies to all of a `FanOut`'s requests, with the signal from all of
    /// them. `docs/performance.md` shows how it compares with fixed limits against a
    /// server that slows down past its capacity, and `docs/design.md` why it works as
    /// it does.
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
    /// Nothing to learn: the connection failed, say, or the attempt was cancelled.
    Unknown,
}

/// One permit per request on the wire, shared by all batches and clones of a `FanOut`.
pub(crate) struct Slots {
    semaphore: Semaphore,
    /// The current limit.
    limit: AtomicUsize,
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
    /// Numbers the slots as they are taken, so that a round of the controller is the
    /// next so many attempts sent, however late each answers.
    tickets: AtomicU64,
}

impl Slots {
    /// Slots for a validated `Concurrency`.
    pub(crate) fn new(concurrency: Concurrency) -> Self {
        let (start, adaptive) = match concurrency.0 {
            Kind::Fixed(limit) => (limit, None),
            Kind::Adaptive { min, max } => (
                min,
                Some(Adaptive {
                    controller: std::sync::Mutex::new(Controller::new(min, max)),
                    debt: AtomicUsize::new(0),
                    in_flight: AtomicUsize::new(0),
                    peak: AtomicUsize::new(0),
                    tickets: AtomicU64::new(0),
                }),
            ),
        };
        Slots {
            semaphore: Semaphore::new(start),
            limit: AtomicUsize::new(start),
            adaptive,
        }
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
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
        let mut ticket = 0;
        if let Some(adaptive) = &self.adaptive {
            let now = adaptive.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            adaptive.peak.fetch_max(now, Ordering::Relaxed);
            ticket = adaptive.tickets.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Slot {
            permit: Some(permit),
            slots: self,
            ticket,
        })
    }

    /// Tells an adaptive limit how the attempt holding slot `ticket` ended after `took`.
    fn report(&self, adaptive: &Adaptive, ticket: u64, took: Duration, signal: Signal) {
        let mut controller = adaptive
            .controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let peak = adaptive.peak.load(Ordering::Relaxed);
        let issued = adaptive.tickets.load(Ordering::Relaxed);
        let Some(ended) = controller.observe(ticket, took, signal, peak, issued) else {
            return;
        };
        // A new round: the peak counts from what is in flight now.
        let in_flight = adaptive.in_flight.load(Ordering::Relaxed);
        adaptive.peak.store(in_flight, Ordering::Relaxed);
        let Some(change) = ended else { return };
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
    /// `None` once given back.
    permit: Option<SemaphorePermit<'a>>,
    slots: &'a Slots,
    /// Its number, for an adaptive limit.
    ticket: u64,
}

impl Slot<'_> {
    /// Gives the slot back, telling an adaptive limit how the attempt ended after
    /// `took`. (Dropped without this, a cancelled attempt, it says nothing.)
    pub(crate) fn finish(mut self, took: Duration, signal: Signal) {
        self.give_back(took, signal);
    }

    fn give_back(&mut self, took: Duration, signal: Signal) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let Some(adaptive) = &self.slots.adaptive else {
            return; // the permit goes back to the semaphore
        };
        self.slots.report(adaptive, self.ticket, took, signal);
        adaptive.in_flight.fetch_sub(1, Ordering::Relaxed);
        let owed = adaptive
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                debt.checked_sub(1)
            })
            .is_ok();
        if owed {
            permit.forget(); // the limit went down while it was in use
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // Cancelled: nothing learned, but the round must not wait for it forever.
        self.give_back(Duration::ZERO, Signal::Unknown);
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

    /// Good rounds, each with the limit in use, until the limit is `target`.
    async fn grow_to(slots: &Slots, target: usize) {
        while slots.limit() < target {
            let round = futures::future::join_all((0..slots.limit()).map(|_| slots.acquire()));
            for slot in round.await {
                slot.unwrap()
                    .finish(Duration::from_millis(5), Signal::Answered);
            }
        }
        assert_eq!(slots.limit(), target);
    }

    async fn hold(slots: &Slots, count: usize) -> Vec<Slot<'_>> {
        let mut held = Vec::new();
        for _ in 0..count {
            held.push(slots.acquire().await.unwrap());
        }
        held
    }

    #[tokio::test]
    async fn a_refusal_cuts_the_limit_and_slots_in_use_are_owed() {
        let slots = Slots::new(Concurrency::adaptive(1, 100));
        grow_to(&slots, 12).await;
        let mut held = hold(&slots, 12).await;
        assert_eq!(available(&slots), 0);

        // All 12 in use when a 429 cuts the limit to 10: the refused slot is kept.
        let refused = held.pop().unwrap();
        refused.finish(Duration::from_millis(5), Signal::Overloaded);
        assert_eq!(slots.limit(), 10);
        assert_eq!(available(&slots), 0, "11 in use, one still owed");
        held.truncate(9);
        assert_eq!(available(&slots), 1, "of two back, the first was kept");
        drop(held);
        assert_eq!(available(&slots), 10);
    }

    #[tokio::test]
    async fn a_slow_answer_in_slow_start_goes_back_to_the_limit_before() {
        let slots = Slots::new(Concurrency::adaptive(1, 100));
        grow_to(&slots, 12).await;
        let mut held = hold(&slots, 12).await;
        // One slow answer in a round of 12 may be the server's usual spread; two are not.
        for _ in 0..2 {
            held.pop()
                .unwrap()
                .finish(Duration::from_millis(500), Signal::Answered);
        }
        assert_eq!(slots.limit(), 9);
        // 10 still in use: the first one back is kept, the rest go back.
        held.truncate(8);
        assert_eq!(available(&slots), 1);
        drop(held);
        assert_eq!(available(&slots), 9);
        // Cancelled attempts say nothing, and take nothing.
        let cancelled = slots.acquire().await.unwrap();
        drop(cancelled);
        assert_eq!((slots.limit(), available(&slots)), (9, 9));
    }

    #[tokio::test]
    async fn a_fixed_limit_never_moves() {
        let slots = Slots::new(Concurrency::fixed(3));
        let held = hold(&slots, 3).await;
        for slot in held {
            slot.finish(Duration::from_secs(9), Signal::Overloaded);
        }
        assert_eq!((slots.limit(), available(&slots)), (3, 3));
    }
}
