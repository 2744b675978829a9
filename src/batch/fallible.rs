//! The streaming outputs for a batch whose source of ids can fail (a list endpoint):
//! the outcomes as `Ok` items, then the source's failure, if any, as one `Err`.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use serde::de::DeserializeOwned;

use super::{AsCompleted, InOrder};
use crate::error::Error;

/// [`AsCompleted`], with the ids' source's failure as a final `Err` item; made by
/// [`Batch::try_as_completed`](crate::Batch::try_as_completed).
#[must_use = "streams do nothing unless polled"]
pub struct TryAsCompleted<Id, T> {
    inner: AsCompleted<Id, T>,
    ended: bool,
}

/// [`InOrder`], with the ids' source's failure as a final `Err` item; made by
/// [`Batch::try_in_order`](crate::Batch::try_in_order).
#[must_use = "streams do nothing unless polled"]
pub struct TryInOrder<Id, T> {
    inner: InOrder<Id, T>,
    ended: bool,
}

impl<Id, T> TryAsCompleted<Id, T> {
    pub(crate) fn new(inner: AsCompleted<Id, T>) -> Self {
        TryAsCompleted {
            inner,
            ended: false,
        }
    }
}

impl<Id, T> TryInOrder<Id, T> {
    pub(crate) fn new(inner: InOrder<Id, T>) -> Self {
        TryInOrder {
            inner,
            ended: false,
        }
    }
}

/// Passes outcomes through as `Ok`; at the end, the source's failure once.
macro_rules! fallible_stream {
    ($outer:ident) => {
        impl<Id, T> Stream for $outer<Id, T>
        where
            Id: fmt::Display + Send + 'static,
            T: DeserializeOwned + Send + 'static,
        {
            type Item = Result<(Id, Result<T, Error>), Error>;

            fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                let this = self.get_mut();
                if this.ended {
                    return Poll::Ready(None);
                }
                match Pin::new(&mut this.inner).poll_next(cx) {
                    Poll::Ready(Some(outcome)) => Poll::Ready(Some(Ok(outcome))),
                    Poll::Ready(None) => {
                        this.ended = true;
                        Poll::Ready(this.inner.take_input_error().map(Err))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }

            fn size_hint(&self) -> (usize, Option<usize>) {
                let (low, high) = self.inner.size_hint();
                (low, high.and_then(|high| high.checked_add(1)))
            }
        }

        impl<Id, T> fmt::Debug for $outer<Id, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($outer)).finish_non_exhaustive()
            }
        }
    };
}

fallible_stream!(TryAsCompleted);
fallible_stream!(TryInOrder);
