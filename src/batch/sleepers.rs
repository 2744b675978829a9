//! What the requests of one batch share about time: the ids waiting out a retry
//! delay, and the timers that bound their attempts.
//!
//! A sleeping id holds no concurrency slot, so the engine may admit another id in its
//! place. The count tells the engine how many of its running ids are asleep; the waker
//! lets a request that falls asleep prompt the engine to admit that other id now rather
//! than when the next outcome arrives.
//!
//! An attempt's timer is lent from the batch and given back when the attempt ends, for
//! the next attempt to reset. Making a Tokio timer and dropping it takes the timer
//! wheel's lock twice (to insert the entry and to remove it), a lock the worker threads
//! also take as they turn the wheel; resetting a kept timer to a later deadline is one
//! atomic operation on the attempt's side. The entry stays where it is until its old
//! deadline comes round; then the wheel files it again under its new deadline, or, for
//! a timer lying unused in the batch, fires it and wakes the request that last had it,
//! which has finished and ignores the wake-up. At most as many timers are kept as
//! attempts ran at once (no more than the concurrency), and they belong to the runtime
//! that made them, as a batch does.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Poll, Waker};

use futures::task::AtomicWaker;
use tokio::task::coop;
use tokio::time::{Instant, Sleep};

#[derive(Default)]
pub(crate) struct Sleepers {
    /// Ids holding no slot: asleep before a retry, or set aside (below).
    count: AtomicUsize,
    /// Of those, the ones set aside rather than asleep.
    aside: AtomicUsize,
    engine: AtomicWaker,
    /// Timers given back by finished attempts.
    timers: Mutex<Vec<Pin<Box<Sleep>>>>,
}

/// An attempt ran past its time.
#[derive(Debug)]
pub(crate) struct Elapsed;

impl Sleepers {
    /// Sleeps until `at`, counted as asleep meanwhile (also if the task is cancelled).
    pub(crate) async fn sleep_until(&self, at: Instant) {
        self.count.fetch_add(1, Ordering::SeqCst);
        let _awake = Awake(self);
        self.engine.wake();
        tokio::time::sleep_until(at).await;
    }

    /// Runs `future` counted as holding no slot, so that the engine may admit another
    /// id meanwhile: for an id waiting for its host (a pause its server asked for, the
    /// host's own slot or token, its turn as a quota is spread out) while other hosts
    /// could take requests.
    pub(crate) async fn aside<F: Future>(&self, future: F) -> F::Output {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.aside.fetch_add(1, Ordering::SeqCst);
        let _back = Aside(self);
        self.engine.wake();
        future.await
    }

    /// Ids holding no slot: asleep before a retry, or set aside.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Ids asleep before a retry.
    pub(crate) fn in_backoff(&self) -> usize {
        self.count()
            .saturating_sub(self.aside.load(Ordering::SeqCst))
    }

    /// Registers the engine's waker; call before reading [`count`](Self::count).
    pub(crate) fn register(&self, waker: &Waker) {
        self.engine.register(waker);
    }

    /// Runs `future` until `at`, as `tokio::time::timeout_at` does, on a lent timer.
    pub(crate) async fn within<F: Future>(
        &self,
        at: Instant,
        future: F,
    ) -> Result<F::Output, Elapsed> {
        let mut lent = self.lend(at);
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            let had_budget = coop::has_budget_remaining();
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            let Some(timer) = &mut lent.timer else {
                return Poll::Pending; // never: it is given back only as the attempt ends
            };
            // As `timeout_at` does: an attempt that used up the task's budget must not
            // keep its timer from being looked at, or it would never time out.
            let fired = if had_budget && !coop::has_budget_remaining() {
                pin!(coop::unconstrained(timer.as_mut())).poll(cx)
            } else {
                timer.as_mut().poll(cx)
            };
            fired.map(|()| Err(Elapsed))
        })
        .await
    }

    fn lend(&self, at: Instant) -> Lent<'_> {
        let kept = self.kept().pop();
        let timer = match kept {
            Some(mut timer) => {
                timer.as_mut().reset(at);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Lent {
            from: self,
            timer: Some(timer),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Pin<Box<Sleep>>>> {
        // Nothing panics while the list is held; a poisoned one is still a list.
        self.timers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A timer lent to one attempt; given back when the attempt ends or is dropped.
struct Lent<'a> {
    from: &'a Sleepers,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            self.from.kept().push(timer);
        }
    }
}

struct Awake<'a>(&'a Sleepers);

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an id set aside back in.
struct Aside<'a>(&'a Sleepers);

impl Drop for Aside<'_> {
    fn drop(&mut self) {
        self.0.aside.fetch_sub(1, Ordering::SeqCst);
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_kept_timer_fires_at_each_attempts_own_deadline() {
        let sleepers = Sleepers::default();
        let ms = Duration::from_millis;

        // Done at once: its timer, still pending, is kept.
        let first = Instant::now() + ms(100);
        assert!(sleepers.within(first, async {}).await.is_ok());
        assert_eq!(sleepers.kept().len(), 1);

        // Reset to a later deadline (the entry stays in the wheel): it must not fire
        // at the first deadline.
        let later = Instant::now() + ms(300);
        assert!(sleepers.within(later, pending::<()>()).await.is_err());
        assert!(Instant::now() >= later);

        // Reset to an earlier deadline than a kept one, and after it fired.
        let far = Instant::now() + Duration::from_secs(30);
        assert!(sleepers.within(far, async {}).await.is_ok());
        let started = Instant::now();
        let near = started + ms(50);
        assert!(sleepers.within(near, pending::<()>()).await.is_err());
        assert!(Instant::now() >= near);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "fired at the far deadline"
        );
        assert_eq!(sleepers.kept().len(), 1, "one timer served every attempt");
    }

    #[tokio::test]
    async fn an_attempt_that_spends_the_tasks_budget_still_times_out() {
        let sleepers = Sleepers::default();
        let at = Instant::now() + Duration::from_millis(50);
        let busy = async {
            loop {
                coop::consume_budget().await;
            }
        };
        // The outer timeout is tokio's own, which copes: it ends the test if ours does not.
        let outcome = tokio::time::timeout(Duration::from_secs(5), sleepers.within(at, busy)).await;
        assert!(matches!(outcome, Ok(Err(Elapsed))), "{outcome:?}");
    }

    #[tokio::test]
    async fn attempts_at_once_each_get_a_timer_and_all_are_kept() {
        let sleepers = Sleepers::default();
        let at = Instant::now() + Duration::from_secs(30);
        let (a, b) = tokio::join!(
            sleepers.within(at, tokio::time::sleep(Duration::from_millis(20))),
            sleepers.within(at, tokio::time::sleep(Duration::from_millis(40))),
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(sleepers.kept().len(), 2);
    }
}
