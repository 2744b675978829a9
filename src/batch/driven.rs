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
//! Leaving, the consumer first moves on every request that is ready. A wake-up that
//! comes during that last pass went to the consumer; rather than wake the keeper for
//! it (the consumer is usually back within microseconds), the keeper's tick, every
//! 10 ms, polls the requests once the consumer has been away for a whole tick. The tick
//! also notices a consumer that stopped polling after being told to wait (`select!`, a
//! timeout around `next()`, `ready_chunks`): woken at two ticks in a row and not back,
//! it is treated as away.
//!
//! The engine is behind a lock that both sides only try: neither ever blocks a thread.
//! A keeper that finds it taken has nothing to do (the consumer is polling). A consumer
//! that finds it taken waits; the keeper stops as soon as it sees the consumer back, and
//! wakes it as it lets go. The lock's flag and the switch's state are sequentially
//! consistent atomics, so of a consumer arriving (state, then flag) and a keeper letting
//! go (flag, then state), at least one sees the other.

use std::fmt::Display;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::{ArcWake, AtomicWaker, waker_ref};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;
use tokio::time::{Interval, MissedTickBehavior};

use super::engine::Core;

/// How often the keeper looks for a consumer that was woken and has not polled since.
const TICK: Duration = Duration::from_millis(10);

/// The consumer has taken an outcome and not yet asked for the next (or stopped
/// polling, as far as the keeper can tell).
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
    /// Polls of the consumer so far, for the keeper's tick.
    polls: AtomicU64,
    /// Set with each wake-up meant for the keeper (rather than its tick).
    keeper_called: AtomicBool,
    consumer: AtomicWaker,
    keeper: AtomicWaker,
}

impl Switch {
    fn call_keeper(&self) {
        self.keeper_called.store(true, SeqCst);
        self.keeper.wake();
    }
}

impl ArcWake for Switch {
    fn wake_by_ref(switch: &Arc<Self>) {
        let mut state = switch.state.load(SeqCst);
        loop {
            match state {
                PRESENT => {
                    match switch
                        .state
                        .compare_exchange(PRESENT, PRESENT_WOKEN, SeqCst, SeqCst)
                    {
                        Ok(_) => return switch.consumer.wake(),
                        Err(now) => state = now,
                    }
                }
                PRESENT_WOKEN => return switch.consumer.wake(),
                AWAY => return switch.call_keeper(),
                _ => return,
            }
        }
    }
}

/// The engine, behind a lock that is only ever tried.
struct Shared<Id, T> {
    busy: AtomicBool,
    core: Mutex<Core<Id, T>>,
}

impl<Id, T> Shared<Id, T> {
    fn try_lock(&self) -> Option<Held<'_, Id, T>> {
        if self.busy.swap(true, SeqCst) {
            return None;
        }
        // Uncontended: whoever set `busy` is the only one to lock. A panic while a
        // request was polled is caught where it is polled; one elsewhere (an id's
        // `Display`) leaves the engine usable.
        let core = self.core.lock().unwrap_or_else(PoisonError::into_inner);
        Some(Held {
            core,
            busy: &self.busy,
        })
    }
}

/// The engine while held; letting go clears the flag. (The mutex itself is released
/// a moment later, as the guard field drops: one who sets the flag in between waits
/// that moment in `lock`.)
struct Held<'a, Id, T> {
    core: MutexGuard<'a, Core<Id, T>>,
    busy: &'a AtomicBool,
}

impl<Id, T> Deref for Held<'_, Id, T> {
    type Target = Core<Id, T>;

    fn deref(&self) -> &Core<Id, T> {
        &self.core
    }
}

impl<Id, T> DerefMut for Held<'_, Id, T> {
    fn deref_mut(&mut self) -> &mut Core<Id, T> {
        &mut self.core
    }
}

impl<Id, T> Drop for Held<'_, Id, T> {
    fn drop(&mut self) {
        self.busy.store(false, SeqCst);
    }
}

/// A batch's engine, polled by a stream's consumer and, while it is away, by the keeper.
pub(crate) struct Driven<Id, T> {
    shared: Arc<Shared<Id, T>>,
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
            shared: Arc::new(Shared {
                busy: AtomicBool::new(false),
                core: Mutex::new(core),
            }),
            switch: Arc::new(Switch {
                state: AtomicU8::new(AWAY),
                polls: AtomicU64::new(0),
                keeper_called: AtomicBool::new(false),
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
        let switch = &self.switch;
        switch.consumer.register(cx.waker());
        switch.polls.fetch_add(1, SeqCst);
        switch.state.store(PRESENT, SeqCst);
        if !self.keeper_started {
            self.keeper_started = true;
            start_keeper(&self.shared, switch);
        }
        // The keeper is setting outcomes aside. It stops as it sees us back, and wakes
        // us as it lets go.
        let Some(mut core) = self.shared.try_lock() else {
            return Poll::Pending;
        };
        let waker = waker_ref(switch);
        let mut cx = Context::from_waker(&waker);
        let polled = poll(&mut core, &mut cx);
        if polled.is_pending() {
            return polled;
        }
        // Leaving. Requests that are ready but were not polled (their wake-ups may have
        // come before this poll, and been spent) would wait for the consumer's return:
        // move them on now. Each pass forgets the wake-ups before it, whose requests it
        // polls; one that comes after the last pass began waits (see below).
        loop {
            switch.state.store(PRESENT, SeqCst);
            if !core.drive_one(&mut cx) {
                break;
            }
        }
        drop(core);
        // A wake-up that came during the last pass is not handed over at once: the
        // consumer is usually back within microseconds, and waking the keeper for it
        // would cost more than the request. If it stays away, the keeper's next tick but
        // one finds it quiet and takes over.
        switch.state.store(AWAY, SeqCst);
        polled
    }

    /// A look at the core outside a poll (a size hint); `None` if the keeper holds it
    /// this instant.
    pub(crate) fn peek<R>(&self, look: impl FnOnce(&mut Core<Id, T>) -> R) -> Option<R> {
        let mut core = self.shared.try_lock()?;
        let seen = look(&mut core);
        drop(core);
        // A keeper woken while we held the core found it taken and did nothing.
        if self.switch.state.load(SeqCst) == AWAY {
            self.switch.call_keeper();
        }
        Some(seen)
    }

    /// Like [`peek`](Self::peek), but waits out the keeper, which never holds the core
    /// for longer than it takes to poll the requests that are ready.
    pub(crate) fn look<R>(&self, mut look: impl FnMut(&mut Core<Id, T>) -> R) -> R {
        loop {
            if let Some(seen) = self.peek(&mut look) {
                return seen;
            }
            std::thread::yield_now();
        }
    }
}

fn start_keeper<Id, T>(shared: &Arc<Shared<Id, T>>, switch: &Arc<Switch>)
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    // Outside a runtime the core fails every id without sending anything.
    let Ok(runtime) = Handle::try_current() else {
        return;
    };
    let mut keeper = Keeper {
        shared: Arc::downgrade(shared),
        switch: Arc::clone(switch),
        tick: None,
        polls_at_tick: 0,
        woken_at_tick: false,
    };
    runtime.spawn(std::future::poll_fn(move |cx| keeper.turn(cx)));
}

/// The background task that polls a stream's requests while its consumer is away.
struct Keeper<Id, T> {
    shared: Weak<Shared<Id, T>>,
    switch: Arc<Switch>,
    /// Made on the first turn, inside the runtime.
    tick: Option<Interval>,
    /// The consumer's poll count at the last tick, and whether it had been woken.
    polls_at_tick: u64,
    woken_at_tick: bool,
}

impl<Id, T> Keeper<Id, T>
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    /// One turn: take over from a consumer that stopped polling, then poll the requests
    /// while the consumer is away. Ends when the stream is dropped or done.
    fn turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let switch = &*self.switch;
        switch.keeper.register(cx.waker());
        if switch.state.load(SeqCst) == CLOSED {
            return Poll::Ready(());
        }
        let tick = self.tick.get_or_insert_with(|| {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        });
        // Whether the consumer has been quiet (not polled) for a whole tick, in which
        // case requests whose wake-ups went to it, or that it left ready, are ours.
        let mut quiet = false;
        while tick.poll_tick(cx).is_ready() {
            let polls = switch.polls.load(SeqCst);
            let woken = switch.state.load(SeqCst) == PRESENT_WOKEN;
            quiet = polls == self.polls_at_tick;
            // Woken at the last tick already, and no poll since: it stopped polling
            // (it waits on something else, `select!`-style). Treat it as away until it
            // is back.
            if quiet && woken && self.woken_at_tick {
                let _ = switch
                    .state
                    .compare_exchange(PRESENT_WOKEN, AWAY, SeqCst, SeqCst);
            }
            self.polls_at_tick = polls;
            self.woken_at_tick = woken;
        }
        // Called by a wake-up while the consumer is away, or the tick found it quiet.
        let called = switch.keeper_called.swap(false, SeqCst);
        if switch.state.load(SeqCst) != AWAY || !(called || quiet) {
            return Poll::Pending;
        }
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Ready(());
        };
        // The consumer is polling: it polls every request that is ready, and hands
        // over any wake-up it leaves behind.
        let Some(mut core) = shared.try_lock() else {
            return Poll::Pending;
        };
        let finished = core.is_finished();
        if !finished {
            let waker = waker_ref(&self.switch);
            let mut cx = Context::from_waker(&waker);
            // Only while the consumer is away: one that is back polls the requests itself.
            while switch.state.load(SeqCst) == AWAY && core.drive_one(&mut cx) {}
        }
        drop(core);
        // A consumer that came back while we held the core found it taken and waits
        // for this wake-up.
        if switch.state.load(SeqCst) != AWAY {
            switch.consumer.wake();
        }
        if finished {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl<Id, T> Drop for Driven<Id, T> {
    fn drop(&mut self) {
        self.switch.state.store(CLOSED, SeqCst);
        self.switch.keeper.wake();
    }
}
