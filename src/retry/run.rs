//! One id from its first attempt to its outcome: retries, their delays, `Retry-After`,
//! `max_elapsed` and the id's deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::ExponentialBackoff;
use serde::de::DeserializeOwned;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument;
use url::Url;

use super::policy::FailedAttempt;
use super::retry_after::retry_after;
use crate::batch::Sleepers;
use crate::error::{Error, ErrorKind};
use crate::event::Event;
use crate::fanout::Shared;
use crate::limit::Signal;
use crate::progress::Counters;
use crate::request::{Answer, Failure, Made, decode, ready, send};

/// What every request of one batch reads: the `FanOut`'s settings, and the batch's ids
/// asleep between retries. One `Arc` clone per id; a list page has one of its own,
/// whose count of sleepers goes unread.
pub(crate) struct Scope {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sleepers: Sleepers,
    /// What `Batch::progress` reads.
    pub(crate) progress: Counters,
}

impl Scope {
    pub(crate) fn new(shared: Arc<Shared>) -> Arc<Self> {
        Self::with_progress(shared, Counters::default())
    }

    pub(crate) fn with_progress(shared: Arc<Shared>, progress: Counters) -> Arc<Self> {
        Arc::new(Scope {
            shared,
            sleepers: Sleepers::default(),
            progress,
        })
    }
}

/// Fetches and decodes the record for `id` at `url`, retrying as the policy allows.
/// Every error names the id and how many attempts were made.
///
/// Runs in a `fanout.id` span (at debug level) with the id and the URL; each attempt
/// in a `fanout.attempt` span within it, with its number.
pub(crate) fn fetch<T: DeserializeOwned>(
    scope: Arc<Scope>,
    id: String,
    url: Url,
    made: Option<Made>,
) -> impl Future<Output = Result<T, Error>> + Send {
    let span = tracing::debug_span!("fanout.id", id = %id, url = %url);
    attempts(scope, Some(id), url, made, decode).instrument(span)
}

/// Fetches `url` (a list page, not an id's record), retrying as the policy allows, and
/// makes what it needs of the answer with `read`.
pub(crate) fn fetch_with<T>(
    shared: &Arc<Shared>,
    url: Url,
    read: impl FnMut(Answer) -> Result<T, Failure> + Send,
) -> impl Future<Output = Result<T, Error>> + Send {
    // Nobody admits others in place of a sleeping list page, and nobody reads its
    // counts: a scope of its own, which records nothing for `RunStats`.
    attempts(Scope::new(Arc::clone(shared)), None, url, None, read)
}

/// Attempts `url` until `read` accepts an answer or the policy gives up; an id's
/// errors are named after it.
///
/// An `async` block rather than an `async fn`: the future is most of an id's memory,
/// and an `async fn` would keep a second copy of each argument in it.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a copy of each argument beside the one it uses"
)]
fn attempts<T>(
    scope: Arc<Scope>,
    id: Option<String>,
    url: Url,
    mut prepared: Option<Made>,
    mut read: impl FnMut(Answer) -> Result<T, Failure> + Send,
) -> impl Future<Output = Result<T, Error>> + Send {
    async move {
        let (shared, sleepers, progress) = (&*scope.shared, &scope.sleepers, &scope.progress);
        // The state of the URL's origin: its pause, and its own limits if set.
        let host = shared.hosts.of(&url);
        let mut made: u32 = 0;
        // Both clocks start when the first attempt is sent, not when the id was
        // admitted: time spent waiting for a slot or a rate-limit token is not the
        // server's fault.
        let mut first_sent = None;
        let mut deadline = None;
        // Made at the first retry; boxed, as most ids never need it.
        let mut delays: Option<Box<ExponentialBackoff>> = None;
        // The previous attempt's failure, for the message if the deadline ends the id.
        let mut last: Option<Error> = None;

        let outcome = 'id: loop {
            // In a block of its own, so that the attempt's result takes no room in the
            // future while it sleeps before the next attempt.
            let failure = 'attempt: {
                let slot = match deadline {
                    None => ready(shared, &host, &scope).await,
                    // Boxed: only ids with a deadline need room for its timer here.
                    Some(at) => {
                        match timeout_at(at, Box::pin(ready(shared, &host, &scope))).await {
                            Ok(slot) => slot,
                            Err(_) => {
                                let when = format!(
                                    "passed while attempt {} waited for a slot or a rate-limit token",
                                    made + 1
                                );
                                break 'id Err(past_deadline(shared, url, made, &when, last));
                            }
                        }
                    }
                };
                let slot = match slot {
                    Ok(slot) => slot,
                    // A shared rate limiter out of reach: the attempt fails unsent, and is
                    // retried as a transient failure. Nothing was sent, so neither the
                    // deadline nor `max_elapsed` starts counting.
                    Err(err) if err.kind() == ErrorKind::RateLimiter => {
                        made = made.saturating_add(1);
                        break 'attempt Failure::new(err.with_url(url.clone()), true);
                    }
                    Err(err) => break 'id Err(err),
                };
                made = made.saturating_add(1);
                if let (Some(on_event), Some(id)) = (&shared.on_event, &id) {
                    on_event.call(&Event::Started { id, attempt: made });
                }
                let on_the_wire = progress.sending();
                let now = Instant::now();
                let first = *first_sent.get_or_insert(now);
                if deadline.is_none() {
                    // A deadline too far ahead to represent is no deadline.
                    deadline = shared.deadline.and_then(|limit| first.checked_add(limit));
                }
                // The attempt ends at its timeout or the id's deadline, whichever is first.
                // A limit too far ahead to represent is no limit.
                let attempt_end = now.checked_add(shared.timeout);
                let end = match (attempt_end, deadline) {
                    (Some(attempt_end), Some(deadline)) => Some(attempt_end.min(deadline)),
                    (attempt_end, deadline) => attempt_end.or(deadline),
                };
                // Boxed: the attempt is most of an id's state, and both halves are then
                // small enough for the allocator's per-thread cache, which one large box
                // is not.
                // The request `request_with` made, copied for this attempt (taken only
                // now, so that no id's future has room for one while it waits).
                let request = prepared.as_mut().and_then(Made::next);
                let sending = Box::pin(
                    send(shared, &host.pause, url.clone(), request)
                        .instrument(tracing::debug_span!("fanout.attempt", n = made)),
                );
                let result = match end {
                    None => sending.await,
                    Some(at) => match sleepers.within(at, sending).await {
                        Ok(result) => result,
                        Err(_) if deadline.is_some_and(|deadline| deadline <= at) => {
                            progress.attempt_took(now.elapsed());
                            let when = format!("passed during attempt {made}");
                            break 'id Err(past_deadline(shared, url, made, &when, last));
                        }
                        Err(_) => Err(timed_out(shared, &url)),
                    },
                }
                .and_then(&mut read);
                let took = now.elapsed();
                let signal = if shared.slots.is_adaptive() {
                    result
                        .as_ref()
                        .map_or_else(Failure::signal, |_| Signal::Answered)
                } else {
                    Signal::Unknown
                };
                slot.finish(took, signal);
                drop(on_the_wire);
                progress.attempt_took(took);
                match result {
                    Ok(value) => break 'id Ok(value),
                    Err(failure) => failure,
                }
            };
            if prepared.as_ref().is_some_and(Made::is_spent) {
                let note = "not retried: the request's body is a stream, which cannot be \
                            sent twice";
                break 'id Err(failure.error.with_note(note).with_attempts(made));
            }
            let first = first_sent.unwrap_or_else(Instant::now);
            let (error, resume, delay) =
                match plan_retry(shared, failure, made, first, deadline, &mut delays, &url) {
                    Ok(retry) => retry,
                    Err(error) => break 'id Err(error),
                };
            tracing::debug!(
                id = id.as_deref(),
                attempt = made,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                reason = %error,
                "retrying",
            );
            progress.retried(&error);
            if let (Some(on_event), Some(id)) = (&shared.on_event, &id) {
                on_event.call(&Event::Retrying {
                    id,
                    attempt: made,
                    delay,
                    error: &error,
                });
            }
            last = Some(error);
            sleepers.sleep_until(resume).await;
        };
        if let Err(err) = &outcome {
            tracing::debug!(error = %err, attempts = err.attempts(), "failed");
        }
        let Some(id) = id else { return outcome };
        match outcome {
            Ok(value) => {
                if let Some(on_event) = &shared.on_event {
                    on_event.call(&Event::Succeeded {
                        id: &id,
                        attempts: made,
                    });
                }
                Ok(value)
            }
            Err(err) => {
                let err = err.with_id_text(id);
                if let Some(on_event) = &shared.on_event {
                    let id = err.id().unwrap_or_default();
                    on_event.call(&Event::Failed { id, error: &err });
                }
                Err(err)
            }
        }
    }
}

/// After a failed attempt: when to try again and the error that made it necessary, or
/// the error to give up with. (Not part of the async loop, so that nothing it reads,
/// such as the response headers, takes room in every id's future.)
fn plan_retry(
    shared: &Shared,
    failure: Failure,
    made: u32,
    first: Instant,
    deadline: Option<Instant>,
    delays: &mut Option<Box<ExponentialBackoff>>,
    url: &Url,
) -> Result<(Error, Instant, Duration), Error> {
    let policy = &shared.retry;
    let Failure {
        error,
        headers,
        transient,
    } = failure;
    let error = error.with_attempts(made);
    let seen = FailedAttempt {
        error: &error,
        headers: headers.as_ref(),
        attempt: made,
        transient,
    };
    if !policy.should_retry(&seen) {
        return Err(error);
    }
    let Some(bound) = delays
        .get_or_insert_with(|| Box::new(policy.delays()))
        .next()
    else {
        return Err(error); // retries used up
    };

    let mut delay = policy.jittered(bound);
    if let Some(asked) = headers
        .as_ref()
        .and_then(|headers| retry_after(headers, SystemTime::now()))
    {
        let limit = policy.retry_after_limit();
        if asked > limit {
            return Err(error.with_note(format!(
                "not retried: the server asked to wait {} (Retry-After), longer than \
                 max_retry_after ({})",
                seconds(asked),
                seconds(limit)
            )));
        }
        delay = delay.max(asked);
    }

    // Delays are bounded by max_delay and max_retry_after, which a caller may set to
    // absurd values: a resume time past what an Instant holds is "never".
    let Some(resume) = Instant::now().checked_add(delay) else {
        return Err(error.with_note("not retried: the retry delay is too long"));
    };
    if let Some(limit) = policy.max_elapsed_limit()
        && first.checked_add(limit).is_some_and(|end| resume > end)
    {
        return Err(error.with_note(format!(
            "not retried: the next attempt would start after max_elapsed ({})",
            seconds(limit)
        )));
    }
    if let Some(at) = deadline
        && resume >= at
    {
        let when = format!("would pass before attempt {} could start", made + 1);
        if error.kind() == ErrorKind::RateLimiter {
            // The limiter's failure stays the error: it is not the server's slowness,
            // and whoever reads it (a work queue) must not take it for the id's.
            return Err(error.with_note(format!("not retried: the deadline {when}")));
        }
        return Err(past_deadline(shared, url.clone(), made, &when, Some(error)));
    }
    Ok((error, resume, delay))
}

/// The error of an id that its deadline ended: a timeout, whatever the attempts before
/// it ran into, which is kept as the source and summed up in the message.
fn past_deadline(shared: &Shared, url: Url, made: u32, when: &str, last: Option<Error>) -> Error {
    let limit = shared.deadline.unwrap_or_default();
    let mut message = format!("the id's deadline ({}) {when}", seconds(limit));
    if let Some(last) = &last {
        message.push_str(&format!(
            "; attempt {} had failed: {}",
            last.attempts(),
            last.kind()
        ));
        if let Some(status) = last.status() {
            message.push_str(&format!(" {status}"));
        }
    }
    let error = Error::request(ErrorKind::Timeout, url, message).with_attempts(made);
    match last {
        Some(last) => error.with_source(last),
        None => error,
    }
}

/// An attempt that got no complete answer within the timeout; another may.
fn timed_out(shared: &Shared, url: &Url) -> Failure {
    let message = format!(
        "no complete response within the timeout ({})",
        seconds(shared.timeout)
    );
    Failure::new(
        Error::request(ErrorKind::Timeout, url.clone(), message),
        true,
    )
}

/// `1.5 s`, `60 s`: what a person reads in an error message.
fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}
