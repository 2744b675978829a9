//! Outcomes in input order: the `InOrder` stream and the two collecting outputs.

use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::de::DeserializeOwned;

use super::driven::Driven;
use super::engine::{Core, Done};
use super::reorder::Reorder;
use crate::error::Error;

/// A stream of `(id, result)` in input order, made by
/// [`Batch::in_order`](crate::Batch::in_order).
///
/// Results that finish early wait for the ones before them, but only so far: no id is
/// admitted more than [`reorder_window`](crate::FanOutBuilder::reorder_window)
/// positions past the oldest unfinished one, so a slow head of the line pauses
/// admission instead of letting results pile up. Dropping the stream cancels the
/// requests still running.
#[must_use = "streams do nothing unless polled"]
pub struct InOrder<Id, T> {
    core: Driven<Id, T>,
    reorder: Reorder<(Id, Result<T, Error>)>,
    window: u64,
    ended: bool,
}

// Nothing in the stream is structurally pinned; buffered outcomes are only moved.
impl<Id, T> Unpin for InOrder<Id, T> {}

impl<Id, T> InOrder<Id, T>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(core: Core<Id, T>) -> Self {
        let window = u64::try_from(core.shared().reorder_window).unwrap_or(u64::MAX);
        InOrder {
            core: Driven::new(core),
            reorder: Reorder::new(),
            window,
            ended: false,
        }
    }

    /// Why the ids' source failed, once the stream has ended; see
    /// [`Batch::try_in_order`](crate::Batch::try_in_order).
    pub(crate) fn take_input_error(&mut self) -> Option<Error> {
        if self.ended {
            self.core.look(|core| core.take_input_error())
        } else {
            None
        }
    }
}

impl<Id, T> Stream for InOrder<Id, T>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    type Item = (Id, Result<T, Error>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(item) = this.reorder.pop() {
            return Poll::Ready(Some(item));
        }
        let (reorder, window) = (&mut this.reorder, this.window);
        let polled = this.core.poll_with(cx, |core, cx| {
            loop {
                let admit_below = reorder.head().saturating_add(window);
                match core.poll_done(cx, admit_below) {
                    Poll::Ready(Some(Done { seq, id, result })) => {
                        reorder.insert(seq, (id, result));
                        if let Some(item) = reorder.pop() {
                            return Poll::Ready(Some(item));
                        }
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            }
        });
        if let Poll::Ready(None) = polled {
            this.ended = true;
        }
        polled
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.peek(|core| core.size_hint()).unwrap_or((0, None))
    }
}

impl<Id, T> fmt::Debug for InOrder<Id, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InOrder")
            .field("head", &self.reorder.head())
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// The most result slots reserved up front from the input's size hint: an endless
/// `1..` says `usize::MAX`, and a huge range should grow as results arrive.
const PREALLOCATE_AT_MOST: usize = 64 * 1024;

/// Every result, in input order. Admission is not windowed: the output holds every
/// result anyway, so a slow head of the line never holds the others back.
pub(crate) async fn collect_ordered<Id, T>(mut core: Core<Id, T>) -> Vec<Result<T, Error>>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    let mut out = Vec::with_capacity(core.size_hint().0.min(PREALLOCATE_AT_MOST));
    let mut reorder = Reorder::new();
    while let Some(done) = poll_fn(|cx| core.poll_done(cx, u64::MAX)).await {
        reorder.insert(done.seq, done.result);
        out.extend(reorder.drain_ready());
    }
    out.extend(core.take_input_error().map(Err));
    out
}

/// Every value in input order, or the first error to happen. Returning drops `core`,
/// which cancels the requests still running.
pub(crate) async fn try_collect_ordered<Id, T>(mut core: Core<Id, T>) -> Result<Vec<T>, Error>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    core.stop_on_error();
    let mut out = Vec::with_capacity(core.size_hint().0.min(PREALLOCATE_AT_MOST));
    let mut reorder = Reorder::new();
    loop {
        let next = poll_fn(|cx| {
            let next = core.poll_done(cx, u64::MAX);
            // A failed source of ids is an error too, the moment it is known.
            match core.take_input_error_now() {
                Some(err) => Poll::Ready(Err(err)),
                None => next.map(Ok),
            }
        })
        .await?;
        let Some(done) = next else {
            return Ok(out);
        };
        reorder.insert(done.seq, done.result?);
        out.extend(reorder.drain_ready());
    }
}
