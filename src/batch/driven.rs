//! Who polls a streamed batch's requests: the consumer's own task while it waits for
//! the next outcome, and a background task, the keeper, while it is away.
//!
//! A task per request would make every request progress on its own, but it costs a
//! spawn and cross-thread wake-ups per request: 30–50% more CPU per request than a
//! `buffer_unordered` loop, on two cores. Polling the requests only from the consumer,
//! as `buffer_unordered` does, is cheap but stalls them while the consumer is busy
//! elsewhere (writing the last result to a database, say): answers wait unread, the
//! server's connections stay busy, and a per-attempt timeout can expire on an answer
//! that arrived long before.
//!
//! So every wake-up of the batch (a request ready to go on, the source of ids ready, an
//! id falling asleep) goes through a [`Switch`] that knows where the consumer is:
//!
//! - *present* (polling, or waiting for a wake-up): the consumer is woken and polls the
//!   requests itself, exactly as a `buffer_unordered` loop would;
//! - *away* (it has taken an outcome and not asked for the next): the keeper is woken
//!   and polls the requests, setting aside the outcomes of those that finish. It admits
//!   no new ids, so what it sets aside is bounded by the batch's admission limit.
//!
//! A wake-up that arrives while the consumer is polling may be one it does not act on
//! before it leaves; the switch remembers it and hands it to the keeper as the consumer
//! leaves. The core sits behind a mutex that both only `try_lock`, so neither ever
//! blocks a thread: a keeper that finds it taken has nothing to do (the consumer is
//! polling); a consumer that finds it taken waits, and the keeper stops as soon as it
//! sees the consumer back and wakes it as it lets go.

use std::sync::atomic::{AtomicU8, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::task::{Context, Poll};

use std::fmt::Display;

use futures::task::{ArcWake, AtomicWaker, waker_ref};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;

use super::engine::Core;

/// The consumer has taken an outcome and not yet asked for the next.
const AWAY: u8 = 0;
/// The consumer is polling, or waiting to be woken.
const PRESENT: u8 = 1;
/// Present, and woken since its poll began.
const PRESENT_WOKEN: u8 = 2;
/// The stream was dropped: the keeper ends.
const CLOSED: u8 = 3;

/// Routes the batch's wake-ups to the consumer or to the keeper.
struct Switch {
    state: AtomicU8,
    consumer: AtomicWaker,
    keeper: AtomicWaker,
}

impl ArcWake for Switch {
    fn wake_by_ref(switch: &Arc<Self>) {
        let mut state = switch.state.load(Ordering::SeqCst);
        loop {
            match state {
                PRESENT => match switch.state.compare_exchange(
                    PRESENT,
                    PRESENT_WOKEN,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => return switch.consumer.wake(),
                    Err(now) => state = now,
                },
                PRESENT_WOKEN => return switch.consumer.wake(),
                AWAY => return switch.keeper.wake(),
                _ => return,
            }
        }
    }
}

/// A batch's engine, polled by a stream's consumer and, while it is away, by the keeper.
pub(crate) struct Driven<Id, T> {
    core: Arc<Mutex<Core<Id, T>>>,
    switch: Arc<Switch>,
    keeper_started: bool,
}

impl<Id, T> Driven<Id, T>
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(core: Core<Id, T>) -> Self {
        Driven {
            core: Arc::new(Mutex::new(core)),
            switch: Arc::new(Switch {
                state: AtomicU8::new(AWAY),
                consumer: AtomicWaker::new(),
                keeper: AtomicWaker::new(),
            }),
            keeper_started: false,
        }
    }

    /// Runs one poll of the consumer: `poll` gets the core and a context whose waker is
    /// the switch. An outcome (`Ready`) means the consumer leaves until its next poll.
    pub(crate) fn poll_with<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Core<Id, T>, &mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.switch.consumer.register(cx.waker());
        self.switch.state.store(PRESENT, Ordering::SeqCst);
        if !self.keeper_started {
            self.start_keeper();
        }
        // Pairs with the keeper's fence between unlocking and reading the state: either
        // this `try_lock` succeeds or the keeper sees `PRESENT` and wakes us.
        fence(Ordering::SeqCst);
        let mut core = match self.core.try_lock() {
            Ok(core) => core,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // The keeper is setting outcomes aside. It stops as it sees us back, and
            // wakes us as it lets go.
            Err(TryLockError::WouldBlock) => return Poll::Pending,
        };
        let waker = waker_ref(&self.switch);
        let mut cx = Context::from_waker(&waker);
        let polled = poll(&mut core, &mut cx);
        if polled.is_pending() {
            return polled;
        }
        // Leaving. Requests that are ready but were not polled (their wake-ups may have
        // come before this poll, and been spent) would wait for the consumer's return:
        // move them on now. Each pass forgets the wake-ups before it, whose requests it
        // polls; one that comes after the last pass began is left to the keeper.
        loop {
            self.switch.state.store(PRESENT, Ordering::SeqCst);
            if !core.drive_one(&mut cx) {
                break;
            }
        }
        drop(core);
        if self.switch.state.swap(AWAY, Ordering::SeqCst) == PRESENT_WOKEN {
            self.switch.keeper.wake();
        }
        polled
    }

    /// The core, for a quick look outside a poll (`size_hint`, the input's error).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core<Id, T>> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start_keeper(&mut self) {
        self.keeper_started = true;
        // Outside a runtime the core fails every id without sending anything.
        if let Ok(runtime) = Handle::try_current() {
            let core = Arc::downgrade(&self.core);
            let switch = Arc::clone(&self.switch);
            runtime.spawn(std::future::poll_fn(move |cx| keep(&core, &switch, cx)));
        }
    }
}

/// One turn of the keeper: while the consumer is away, poll the requests it was woken
/// for. Ends when the stream is dropped or done.
fn keep<Id, T>(
    core: &Weak<Mutex<Core<Id, T>>>,
    switch: &Arc<Switch>,
    cx: &mut Context<'_>,
) -> Poll<()>
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    switch.keeper.register(cx.waker());
    if switch.state.load(Ordering::SeqCst) == CLOSED {
        return Poll::Ready(());
    }
    let Some(core) = core.upgrade() else {
        return Poll::Ready(());
    };
    let mut core = match core.try_lock() {
        Ok(core) => core,
        // The consumer panicked while polling: the stream is of no more use.
        Err(TryLockError::Poisoned(_)) => return Poll::Ready(()),
        // The consumer is polling: it polls every request that is ready, and hands
        // over any wake-up it leaves behind.
        Err(TryLockError::WouldBlock) => return Poll::Pending,
    };
    if core.is_finished() {
        return Poll::Ready(());
    }
    let waker = waker_ref(switch);
    let mut cx = Context::from_waker(&waker);
    // Only while the consumer is away: one that is back polls the requests itself.
    while switch.state.load(Ordering::SeqCst) == AWAY && core.drive_one(&mut cx) {}
    drop(core);
    // A consumer that came back while we held the core found it taken and waits for
    // this wake-up.
    fence(Ordering::SeqCst);
    if switch.state.load(Ordering::SeqCst) != AWAY {
        switch.consumer.wake();
    }
    Poll::Pending
}

impl<Id, T> Drop for Driven<Id, T> {
    fn drop(&mut self) {
        self.switch.state.store(CLOSED, Ordering::SeqCst);
        self.switch.keeper.wake();
    }
}
