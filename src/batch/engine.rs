//! The engine every output shares: admits ids as slots free up, polls their requests,
//! and hands back outcomes in completion order, tagged with their position.
//!
//! The requests are futures owned by the engine, not tasks of their own: whoever polls
//! the engine drives them (see `driven.rs` for who that is while a stream's consumer is
//! busy elsewhere).

use std::any::Any;
use std::collections::VecDeque;
use std::fmt::{Display, Write as _};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::StreamExt;
use futures::stream::{BoxStream, FuturesUnordered};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;
use tokio::task::JoinError;

use crate::dedup::Seen;
use crate::error::{Error, ErrorKind};
use crate::fanout::Shared;
use crate::retry::{Scope, fetch};

/// How many ids may be admitted per concurrency slot, counting those asleep between
/// retries. Sleeping ids free their slot for another id, but a server that fails
/// everything must not make the number of admitted ids (and memory) grow without end.
const ADMITTED_PER_SLOT: usize = 4;

/// One id's outcome and its position in the input.
pub(crate) struct Done<Id, T> {
    pub(crate) seq: u64,
    pub(crate) id: Id,
    pub(crate) result: Result<T, Error>,
}

pub(crate) struct Core<Id, T> {
    scope: Arc<Scope>,
    /// `None` once the input is exhausted (or failed).
    ids: Option<BoxStream<'static, Result<Id, Error>>>,
    /// Why the input ended early, if it failed (a list page that could not be read).
    input_error: Option<Error>,
    running: FuturesUnordered<Running<Id, T>>,
    /// Outcomes taken from `running` by [`drive_one`](Core::drive_one), not yet handed out.
    finished: VecDeque<Done<Id, T>>,
    /// Most ids admitted at once, asleep or not, finished or not, until handed out.
    max_admitted: usize,
    /// The ids admitted so far, when repeats are dropped.
    seen: Option<Seen>,
    next_seq: u64,
    /// Whether this runs inside a Tokio runtime, which the HTTP client needs. Looked up
    /// on first poll, so that building a batch needs no runtime.
    in_runtime: Option<bool>,
    /// Scratch space reused for every rendered URL.
    url_text: String,
    /// Set by outputs that end at the first error, so that an error frees no slot
    /// for a request nobody will wait for.
    stop_on_error: bool,
}

impl<Id, T> Core<Id, T>
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(shared: Arc<Shared>, ids: BoxStream<'static, Result<Id, Error>>) -> Self {
        let max_admitted = shared.concurrency.saturating_mul(ADMITTED_PER_SLOT);
        let seen = shared.dedup_ids.then(Seen::default);
        Core {
            scope: Scope::new(shared),
            ids: Some(ids),
            input_error: None,
            running: FuturesUnordered::new(),
            finished: VecDeque::new(),
            max_admitted,
            seen,
            next_seq: 0,
            in_runtime: None,
            url_text: String::new(),
            stop_on_error: false,
        }
    }

    /// Makes the engine admit no new id after an error: the caller stops there.
    pub(crate) fn stop_on_error(&mut self) {
        self.stop_on_error = true;
    }

    /// The input's failure, once every outcome has been handed out.
    pub(crate) fn take_input_error(&mut self) -> Option<Error> {
        if self.is_finished() {
            self.input_error.take()
        } else {
            None
        }
    }

    /// The input's failure as soon as it is known, for outputs that stop at the first
    /// error.
    pub(crate) fn take_input_error_now(&mut self) -> Option<Error> {
        self.input_error.take()
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.scope.shared
    }

    /// Every id admitted and its outcome handed out, and no more ids to come.
    pub(crate) fn is_finished(&self) -> bool {
        self.ids.is_none() && self.running.is_empty() && self.finished.is_empty()
    }

    /// The next outcome to finish. New ids are admitted while fewer than `concurrency`
    /// are running and awake (ids asleep between retries hold no slot), at most
    /// `max_admitted` in all, and while their position is below `admit_below` (the
    /// in-order output's window; `u64::MAX` for none).
    pub(crate) fn poll_done(
        &mut self,
        cx: &mut Context<'_>,
        admit_below: u64,
    ) -> Poll<Option<Done<Id, T>>> {
        self.admit(cx, admit_below);
        let done = match self.finished.pop_front() {
            Some(done) => done,
            None => match self.running.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => done,
                Poll::Ready(None) if self.ids.is_none() => return Poll::Ready(None),
                // Nothing running: the input is pending (its waker is registered) or
                // the caller's window is full, which it resolves before polling again.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            },
        };
        // Refill the freed slot now rather than on the consumer's next poll.
        if !(self.stop_on_error && done.result.is_err()) {
            self.admit(cx, admit_below);
        }
        Poll::Ready(Some(done))
    }

    /// Polls the requests that are ready to go on, without admitting new ids, and sets
    /// aside the outcome of the first to finish. Returns whether one finished: `false`
    /// means none is left to poll until a new wake-up.
    pub(crate) fn drive_one(&mut self, cx: &mut Context<'_>) -> bool {
        match self.running.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => {
                self.finished.push_back(done);
                true
            }
            Poll::Ready(None) | Poll::Pending => false,
        }
    }

    /// Bounds on how many outcomes are still to come.
    pub(crate) fn size_hint(&self) -> (usize, Option<usize>) {
        let (low, high) = self
            .ids
            .as_ref()
            .map_or((0, Some(0)), |ids| ids.size_hint());
        let running = self.running.len() + self.finished.len();
        // Repeats are dropped unseen: the input's lower bound no longer holds.
        let low = if self.seen.is_some() { 0 } else { low };
        (
            low.saturating_add(running),
            high.and_then(|h| h.checked_add(running)),
        )
    }

    fn admit(&mut self, cx: &mut Context<'_>, admit_below: u64) {
        // Registered before counting, so that an id falling asleep after the count
        // wakes us to admit another.
        self.scope.sleepers.register(cx.waker());
        loop {
            // Outcomes set aside count as running: they are not handed out yet.
            let admitted = self.running.len() + self.finished.len();
            let awake = admitted - self.scope.sleepers.count().min(self.running.len());
            if admitted >= self.max_admitted
                || awake >= self.scope.shared.concurrency
                || self.next_seq >= admit_below
            {
                return;
            }
            let Some(ids) = self.ids.as_mut() else { return };
            let id = match ids.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(id))) => id,
                Poll::Ready(Some(Err(err))) => {
                    // The ids admitted so far still get their outcomes; none follow.
                    self.input_error = Some(err);
                    self.ids = None;
                    return;
                }
                Poll::Ready(None) => {
                    self.ids = None;
                    return;
                }
                Poll::Pending => return,
            };
            let mut id_text = String::new();
            // Writing to a String only fails if the `Display` impl itself reports an error.
            let displayed = write!(id_text, "{id}").is_ok();
            if displayed
                && let Some(seen) = &mut self.seen
                && !seen.first_time_text(&id_text)
            {
                continue; // a repeat: it has had (or will have) its one outcome
            }
            let state = if displayed {
                self.start(id_text)
            } else {
                State::Decided(Some(Error::new(
                    ErrorKind::InvalidId,
                    "the id's Display implementation returned an error",
                )))
            };
            self.running.push(Running {
                seq: self.next_seq,
                id: Some(id),
                state,
            });
            self.next_seq += 1;
        }
    }

    /// Renders the id's URL and makes its request, or returns why it cannot run.
    fn start(&mut self, id_text: String) -> State<T> {
        if !*self
            .in_runtime
            .get_or_insert_with(|| Handle::try_current().is_ok())
        {
            return State::Decided(Some(
                Error::new(
                    ErrorKind::Runtime,
                    "fanout's batches must be polled inside a Tokio runtime",
                )
                .with_id_text(id_text),
            ));
        }
        match self
            .scope
            .shared
            .template
            .render(&id_text, &mut self.url_text)
        {
            Ok(url) => State::Request(Box::pin(fetch(Arc::clone(&self.scope), id_text, url))),
            Err(err) => State::Decided(Some(err.with_id_text(id_text))),
        }
    }
}

impl<Id, T> Drop for Core<Id, T> {
    fn drop(&mut self) {
        // The plain streams have no item for an error that belongs to no id; say it
        // somewhere rather than nowhere.
        if let Some(err) = &self.input_error {
            tracing::warn!(
                error = %err,
                "the batch's source of ids failed and the error was not taken \
                 (the try_ forms of the streams yield it)",
            );
        }
    }
}

/// One admitted id: its request, or an outcome decided without sending anything.
/// Dropping it cancels the request.
struct Running<Id, T> {
    seq: u64,
    id: Option<Id>,
    state: State<T>,
}

type Request<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

enum State<T> {
    Request(Request<T>),
    /// Decided without a request (nothing sent), or the request's outcome already taken.
    Decided(Option<Error>),
}

// No field is structurally pinned: the request is boxed, and `id` is only moved out.
impl<Id, T> Unpin for Running<Id, T> {}

impl<Id: Display, T> Future for Running<Id, T> {
    type Output = Done<Id, T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match &mut self.state {
            State::Request(request) => {
                // A panic in a request (in `T`'s `Deserialize`, say) fails that id alone.
                let result = match std::panic::catch_unwind(AssertUnwindSafe(|| {
                    request.as_mut().poll(cx)
                })) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(result)) => result,
                    Err(payload) => Err(panic_error(payload)),
                };
                self.state = State::Decided(None);
                result
            }
            State::Decided(err) => Err(err
                .take()
                .unwrap_or_else(|| Error::new(ErrorKind::Runtime, "outcome already taken"))),
        };
        let seq = self.seq;
        let Some(id) = self.id.take() else {
            // FuturesUnordered never polls a future again after it completed.
            return Poll::Pending;
        };
        // Errors from the request and from rendering name their id already. Naming it
        // here (a panic in the request, an id whose `Display` failed) runs the id's
        // `Display`, perhaps in the keeper: a panic there leaves the error unnamed.
        let result = result.map_err(|err| {
            if err.id().is_some() {
                return err;
            }
            let text = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut text = String::new();
                write!(text, "{id}").ok().map(|()| text)
            }));
            match text {
                Ok(Some(text)) => err.with_id_text(text),
                Ok(None) | Err(_) => err,
            }
        });
        Poll::Ready(Done { seq, id, result })
    }
}

/// The error for a task that did not finish: it panicked, or its runtime shut down.
pub(crate) fn join_failure(err: JoinError) -> Error {
    if err.is_panic() {
        panic_error(err.into_panic())
    } else {
        Error::new(
            ErrorKind::Runtime,
            "the Tokio runtime shut down before the request finished",
        )
    }
}

fn panic_error(payload: Box<dyn Any + Send>) -> Error {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_owned());
    Error::new(ErrorKind::Panic, message)
}
