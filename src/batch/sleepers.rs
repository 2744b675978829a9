//! The ids of one batch that are waiting out a retry delay.
//!
//! A sleeping id holds no concurrency slot, so the engine may admit another id in its
//! place. The count tells the engine how many of its running ids are asleep; the waker
//! lets a request that falls asleep prompt the engine to admit that other id now rather
//! than when the next outcome arrives.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

use futures::task::AtomicWaker;
use tokio::time::Instant;

#[derive(Default)]
pub(crate) struct Sleepers {
    count: AtomicUsize,
    engine: AtomicWaker,
}

impl Sleepers {
    /// Sleeps until `at`, counted as asleep meanwhile (also if the task is cancelled).
    pub(crate) async fn sleep_until(&self, at: Instant) {
        self.count.fetch_add(1, Ordering::SeqCst);
        let _awake = Awake(self);
        self.engine.wake();
        tokio::time::sleep_until(at).await;
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Registers the engine's waker; call before reading [`count`](Self::count).
    pub(crate) fn register(&self, waker: &Waker) {
        self.engine.register(waker);
    }
}

struct Awake<'a>(&'a Sleepers);

impl Drop for Awake<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}
