//! `AsCompleted`: outcomes in the order they finish.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::de::DeserializeOwned;

use super::driven::Driven;
use super::engine::Core;
use crate::error::Error;

/// A stream of `(id, result)` in completion order, made by
/// [`Batch::as_completed`](crate::Batch::as_completed).
///
/// Like Python's `asyncio.as_completed`, but each item says which id it belongs to and
/// ids are admitted only as slots free up. Dropping the stream cancels the requests
/// still running.
#[must_use = "streams do nothing unless polled"]
pub struct AsCompleted<Id, T> {
    core: Driven<Id, T>,
}

impl<Id, T> AsCompleted<Id, T>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(core: Core<Id, T>) -> Self {
        AsCompleted {
            core: Driven::new(core),
        }
    }

    /// Why the ids' source failed, once the stream has ended; see
    /// [`Batch::try_as_completed`](crate::Batch::try_as_completed).
    pub(crate) fn take_input_error(&mut self) -> Option<Error> {
        self.core.look(|core| core.take_input_error())
    }
}

impl<Id, T> Stream for AsCompleted<Id, T>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    type Item = (Id, Result<T, Error>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .core
            .poll_with(cx, |core, cx| core.poll_done(cx, u64::MAX))
            .map(|done| done.map(|done| (done.id, done.result)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.core.peek(|core| core.size_hint()).unwrap_or((0, None))
    }
}

impl<Id, T> fmt::Debug for AsCompleted<Id, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsCompleted").finish_non_exhaustive()
    }
}
