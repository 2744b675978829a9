//! `Event`: what `FanOutBuilder::on_event` callbacks are told.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;

/// Something that happened to one id, passed to the callback set with
/// [`FanOutBuilder::on_event`](crate::FanOutBuilder::on_event). Ids are given in
/// their `Display` form.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// An attempt has its concurrency slot and rate-limit token and is being sent.
    #[non_exhaustive]
    Started {
        /// The id.
        id: &'a str,
        /// Which attempt, counting from 1.
        attempt: u32,
    },
    /// An attempt failed, and the id tries again after `delay`.
    #[non_exhaustive]
    Retrying {
        /// The id.
        id: &'a str,
        /// The attempt that failed.
        attempt: u32,
        /// How long the id waits before its next attempt.
        delay: Duration,
        /// Why the attempt failed.
        error: &'a Error,
    },
    /// The id's outcome is a value.
    #[non_exhaustive]
    Succeeded {
        /// The id.
        id: &'a str,
        /// How many attempts it took.
        attempts: u32,
    },
    /// The id's outcome is this error (which names the id and the attempts made).
    #[non_exhaustive]
    Failed {
        /// The id.
        id: &'a str,
        /// The id's error.
        error: &'a Error,
    },
}

/// The callback, shared by every request of a `FanOut`.
#[derive(Clone)]
pub(crate) struct OnEvent(Arc<dyn Fn(&Event<'_>) + Send + Sync>);

impl OnEvent {
    pub(crate) fn new(callback: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        OnEvent(Arc::new(callback))
    }

    /// Calls the callback. A panic in it is caught and logged: it must not decide an
    /// id's outcome, nor reach the consumer.
    pub(crate) fn call(&self, event: &Event<'_>) {
        let called = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.0)(event)));
        if called.is_err() {
            tracing::warn!(
                ?event,
                "the on_event callback panicked; the panic was caught"
            );
        }
    }
}

impl fmt::Debug for OnEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnEvent(..)")
    }
}
