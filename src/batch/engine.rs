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
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures::future::Either;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::runtime::Handle;
use tokio::task::JoinError;
use url::Url;

use crate::dedup::Seen;
use crate::error::{Error, ErrorKind};
use crate::event::Event;
use crate::fanout::Shared;
use crate::progress::Counters;
use crate::request::Made;
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
    /// The admitted ids' requests, each one allocation (see [`Requests`]).
    running: Box<dyn Requests<Id, T>>,
    /// Outcomes taken from `running` by [`drive_one`](Core::drive_one), not yet handed out.
    finished: VecDeque<Done<Id, T>>,
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
    /// `fanout.batch`, entered while the engine polls: the parent of its ids' spans.
    span: tracing::Span,
}

impl<Id, T> Core<Id, T>
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    /// `total` is the batch's number of ids, once someone (a list page) says it; an
    /// input of exact size sets it here.
    pub(crate) fn new(
        shared: Arc<Shared>,
        ids: BoxStream<'static, Result<Id, Error>>,
        total: Arc<OnceLock<u64>>,
    ) -> Self {
        let seen = shared.dedup_ids.then(Seen::default);
        let scope = Scope::with_progress(shared, Counters::with_total(total));
        // Repeats dropped unseen would make the input's size a wrong total.
        if let (low, Some(high)) = ids.size_hint()
            && low == high
            && seen.is_none()
        {
            scope.progress.set_total(low as u64);
        }
        let span = tracing::debug_span!("fanout.batch", total = tracing::field::Empty);
        if let Some(total) = scope.progress.total() {
            span.record("total", total);
        }
        Core {
            scope,
            ids: Some(ids),
            input_error: None,
            running: requests(request::<Id, T>),
            finished: VecDeque::new(),
            seen,
            next_seq: 0,
            in_runtime: None,
            url_text: String::new(),
            stop_on_error: false,
            span,
        }
    }

    /// Admits every id, repeats too, whatever the `FanOut`'s `dedup_ids` says: for
    /// inputs whose repeats are separate pieces of work (a queue's entries).
    #[cfg(feature = "redis")]
    pub(crate) fn keep_repeats(&mut self) {
        self.seen = None;
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

    /// The batch's settings and counts, shared with its requests and progress handles.
    pub(crate) fn scope(&self) -> &Arc<Scope> {
        &self.scope
    }

    /// Every id admitted and its outcome handed out, and no more ids to come.
    pub(crate) fn is_finished(&self) -> bool {
        self.ids.is_none() && self.running.is_empty() && self.finished.is_empty()
    }

    /// The next outcome to finish. New ids are admitted while fewer than the
    /// concurrency limit (as it is now, if it adapts) are running and awake (ids asleep
    /// between retries, or set aside waiting for their host, hold no slot), at most
    /// 4 × the limit in all, and while their position is below `admit_below` (the
    /// in-order output's window; `u64::MAX` for none).
    pub(crate) fn poll_done(
        &mut self,
        cx: &mut Context<'_>,
        admit_below: u64,
    ) -> Poll<Option<Done<Id, T>>> {
        let span = self.span.clone();
        let _entered = span.enter();
        self.scope.progress.start();
        self.admit(cx, admit_below);
        let done = match self.finished.pop_front() {
            Some(done) => done,
            None => match self.running.poll_next(cx) {
                Poll::Ready(Some(done)) => self.counted(done),
                Poll::Ready(None) if self.ids.is_none() => {
                    self.scope.progress.end();
                    return Poll::Ready(None);
                }
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
        let _entered = self.span.enter();
        match self.running.poll_next(cx) {
            Poll::Ready(Some(done)) => {
                let done = self.counted(done);
                self.finished.push_back(done);
                true
            }
            Poll::Ready(None) | Poll::Pending => false,
        }
    }

    /// An outcome as it leaves the running requests, counted for `Batch::progress`.
    fn counted(&self, done: Done<Id, T>) -> Done<Id, T> {
        self.scope.progress.finished(&done.result);
        done
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
            // At most a few ids per slot of the limit as it is now, asleep or not,
            // finished or not, until handed out.
            let limit = self.scope.shared.slots.limit();
            if admitted >= limit.saturating_mul(ADMITTED_PER_SLOT)
                || awake >= limit
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
            let start = if displayed {
                self.start(&id, id_text)
            } else {
                Err(Error::new(
                    ErrorKind::InvalidId,
                    "the id's Display implementation returned an error",
                ))
            };
            if let Err(error) = &start {
                // Never sent: the request will not say so itself.
                tracing::debug!(%error, "failed");
                if let Some(on_event) = &self.scope.shared.on_event {
                    let id = error.id().unwrap_or_default();
                    on_event.call(&Event::Failed { id, error });
                }
            }
            self.running.push(self.next_seq, id, start);
            self.scope.progress.admitted();
            self.next_seq += 1;
        }
    }

    /// Renders the id's URL, or returns why its request cannot run.
    fn start(&mut self, id: &Id, id_text: String) -> Start {
        if !*self
            .in_runtime
            .get_or_insert_with(|| Handle::try_current().is_ok())
        {
            return Err(Error::new(
                ErrorKind::Runtime,
                "fanout's batches must be polled inside a Tokio runtime",
            )
            .with_id_text(id_text));
        }
        let shared = &self.scope.shared;
        let made = shared
            .detail
            .url(id, &id_text, &mut self.url_text)
            .and_then(|url| match &shared.request {
                None => Ok((url, None)),
                Some(make) => {
                    let request = make.make(&shared.client, &shared.headers, id, url)?;
                    Ok((request.url().clone(), Some(Made::new(request))))
                }
            });
        match made {
            Ok((url, request)) => Ok((Arc::clone(&self.scope), id_text, url, request)),
            Err(err) => Err(err.with_id_text(id_text)),
        }
    }
}

impl<Id, T> Drop for Core<Id, T> {
    fn drop(&mut self) {
        // An output that stopped early (at an error, or dropped) ends the run here.
        self.scope.progress.end();
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

/// What an admitted id's request needs (its batch's scope, its text, its URL and the
/// request `request_with` made for it), or the outcome it gets without sending anything.
type Start = Result<(Arc<Scope>, String, Url, Option<Made>), Error>;

/// The admitted ids' requests, polled as one stream of outcomes. Behind a trait object
/// because a request's future has a type that cannot be written down: this way each
/// one lives in its `FuturesUnordered` node, one allocation per id, where a boxed
/// future would be a second one and a pointer to follow on every poll.
trait Requests<Id, T>: Send {
    fn push(&mut self, seq: u64, id: Id, start: Start);
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Done<Id, T>>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `FuturesUnordered` of requests, and the function that makes each one.
struct RequestSet<Id, F> {
    futures: FuturesUnordered<F>,
    make: fn(u64, Id, Start) -> F,
}

impl<Id, T, F> Requests<Id, T> for RequestSet<Id, F>
where
    F: Future<Output = Done<Id, T>> + Send,
{
    fn push(&mut self, seq: u64, id: Id, start: Start) {
        self.futures.push((self.make)(seq, id, start));
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Done<Id, T>>> {
        self.futures.poll_next_unpin(cx)
    }

    fn len(&self) -> usize {
        self.futures.len()
    }
}

/// The set of requests whose futures `make` makes.
fn requests<Id, T, F>(make: fn(u64, Id, Start) -> F) -> Box<dyn Requests<Id, T>>
where
    Id: 'static,
    T: 'static,
    F: Future<Output = Done<Id, T>> + Send + 'static,
{
    Box::new(RequestSet {
        futures: FuturesUnordered::new(),
        make,
    })
}

/// One admitted id, from its request (if it has one) to its outcome. Dropping it
/// cancels the request.
///
/// Combinators rather than an `async` block, which would keep room for `start` beside
/// the request it became. No part holds a `T` while it waits: the outcome is made as
/// the request ends, so a large record does not make every id's node larger.
fn request<Id, T>(seq: u64, id: Id, start: Start) -> impl Future<Output = Done<Id, T>> + Send
where
    Id: Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    let attempt = match start {
        Ok((scope, id_text, url, made)) => Either::Left(fetch::<T>(scope, id_text, url, made)),
        Err(err) => Either::Right(async move { Err(err) }),
    };
    // A panic in a request (in `T`'s `Deserialize`, say) fails that id alone.
    AssertUnwindSafe(attempt).catch_unwind().map(move |caught| {
        let result = caught.unwrap_or_else(|payload| Err(panic_error(payload)));
        Done {
            seq,
            result: result.map_err(|err| named(err, &id)),
            id,
        }
    })
}

/// The error, named after its id if it is not yet. Errors from the request and from
/// rendering name their id already. Naming it here (a panic in the request, an id whose
/// `Display` failed) runs the id's `Display`, perhaps in the keeper: a panic there
/// leaves the error unnamed.
fn named(err: Error, id: &impl Display) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FanOut;
    use crate::request::send;

    /// A record far larger than the request's own state.
    #[derive(serde::Deserialize)]
    struct Large {
        _a: [u64; 32],
        _b: [u64; 32],
        _c: [u64; 32],
        _d: [u64; 32],
    }

    /// An id's two allocations, its `FuturesUnordered` node (holding its whole retry
    /// loop) and the attempt in flight, stay within glibc's per-thread cache (1,032
    /// bytes), whatever the record's size. They were 952 and 752 bytes (plus a node)
    /// while values no longer needed kept their room, and every byte is copied into its
    /// allocation and touched again per request. The bound leaves room for compilers to
    /// lay them out differently, not for that.
    #[test]
    fn an_ids_futures_stay_small_whatever_the_record() {
        fn sizes<T: DeserializeOwned + Send + 'static>() -> (usize, usize) {
            let fan = FanOut::<u64, T>::builder()
                .detail_url("http://127.0.0.1:9/items/{id}")
                .build()
                .unwrap();
            let shared = Arc::clone(fan.shared());
            let url = Url::parse("http://127.0.0.1:9/items/1").unwrap();
            let pause = &shared.hosts.of(&url).pause;
            let attempt = size_of_val(&send(&shared, pause, url.clone(), None));
            let start = Ok((Scope::new(shared), "1".into(), url, None));
            (size_of_val(&request::<u64, T>(0, 1, start)), attempt)
        }
        assert!(size_of::<Large>() >= 1024);
        let ((small, attempt), (large, _)) = (sizes::<serde_json::Value>(), sizes::<Large>());
        assert_eq!(small, large, "a 1 KiB record made the node larger");
        assert!(small <= 640, "an id's future is {small} bytes");
        eprintln!("an id's future: {small} bytes, an attempt's: {attempt} bytes");
        assert!(attempt <= 640, "the attempt's future is {attempt} bytes");
    }
}
