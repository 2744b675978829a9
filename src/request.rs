//! One attempt: take a slot and a token, send, read the body under the size cap, decode.

use bytes::{Bytes, BytesMut};
use reqwest::header::HeaderMap;
use reqwest::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::OwnedSemaphorePermit;
use url::Url;

use crate::error::{Error, ErrorKind};
use crate::fanout::Shared;
use crate::limit::{Host, Pause, Signal, Slot, Turn};
use crate::redirect;
use crate::retry::Scope;
use crate::retry::{is_transient_status, retry_after};

/// A wait for a rate-limit token at least this long is logged (at debug level).
const LONG_TOKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How much of an error response's body is read, for the message, before giving up
/// on it. Reading small error bodies to the end lets the connection be reused.
const ERROR_BODY_BYTES: usize = 64 * 1024;

/// The most that is reserved up front for a body from its `Content-Length`; a longer
/// body grows as it arrives, so a lying header cannot make us allocate for nothing.
const PREALLOCATE_AT_MOST: usize = 1024 * 1024;

/// One failed attempt: the error, plus what the retry policy needs to judge it.
pub(crate) struct Failure {
    pub(crate) error: Error,
    /// The response headers, kept when the attempt failed on its status.
    pub(crate) headers: Option<HeaderMap>,
    /// The default classification: worth another attempt.
    pub(crate) transient: bool,
}

impl Failure {
    pub(crate) fn new(error: Error, transient: bool) -> Self {
        Failure {
            error,
            headers: None,
            transient,
        }
    }

    /// What the failure says about the server's load, for an adaptive limit.
    pub(crate) fn signal(&self) -> Signal {
        let overloaded = matches!(
            self.error.status(),
            Some(
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            )
        );
        match self.error.kind() {
            _ if overloaded => Signal::Overloaded,
            ErrorKind::Timeout => Signal::Overloaded,
            // A whole answer: its latency says how busy the server is.
            ErrorKind::Status | ErrorKind::Decode => Signal::Answered,
            _ => Signal::Unknown,
        }
    }
}

/// What an attempt holds while it is on the wire: a slot under the concurrency limit,
/// and one under its host's own limit if it has one.
pub(crate) struct Permit<'a> {
    slot: Slot<'a>,
    /// Boxed: most requests have no per-host limit, and every one would have room.
    _host_slot: Option<Box<OwnedSemaphorePermit>>,
}

impl Permit<'_> {
    /// Gives the slots back, telling an adaptive limit how the attempt ended.
    pub(crate) fn finish(self, took: std::time::Duration, signal: Signal) {
        self.slot.finish(took, signal);
    }
}

/// Waits for what an attempt needs before it may be sent: the end of any pause its
/// host's server asked for; a slot under the host's own limit (if set); a slot under
/// the concurrency limit; a token from the host's own bucket (if set) and from the rate
/// limit (if set), taken while holding the slots so that no token is spent by a
/// request that then queues for a slot; and last, if the server's quota is being spread
/// out, its turn.
///
/// While it waits for its host (a pause, the host's own slot, a token from its bucket,
/// its turn) it holds no overall slot and is set aside, so that the engine may admit
/// ids for other hosts meanwhile: a host's token or turn that is not free yet sends it
/// back to wait, without its slot, and take one again after. At most as many attempts
/// as the concurrency limit pass the turn check at once, so that no more than that
/// many go out unspaced when a quota window begins.
pub(crate) async fn ready<'a>(
    shared: &'a Shared,
    host: &Host,
    scope: &Scope,
) -> Result<Permit<'a>, Error> {
    let progress = &scope.progress;
    loop {
        // Each rare wait is boxed: every request's future would otherwise have room
        // for it.
        if let Some(until) = host.pause.paused_until() {
            let _held = progress.held_back();
            let pause = Box::pin(tokio::time::sleep_until(until));
            scope.sleepers.aside(pause).await;
        }
        let host_slot = if host.has_own_slots() {
            let _held = progress.held_back();
            Box::pin(scope.sleepers.aside(host.slot()))
                .await?
                .map(Box::new)
        } else {
            None
        };
        let mut slot = shared.slots.acquire().await?;
        if let Some(wait) = shared.hosts.try_token(host) {
            drop((slot, host_slot));
            let _waiting = progress.waiting_for_token();
            let token = Box::pin(tokio::time::sleep(wait));
            scope.sleepers.aside(token).await;
            continue;
        }
        if let Some(throttle) = &shared.throttle
            && !throttle.try_take()
        {
            let _waiting = progress.waiting_for_token();
            let started = std::time::Instant::now();
            Box::pin(throttle.wait()).await?;
            let waited = started.elapsed();
            if waited >= LONG_TOKEN_WAIT {
                tracing::debug!(
                    waited_ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    "waited for a rate-limit token",
                );
            }
        }
        if host.pause.is_paused() {
            continue; // the server asked for a pause meanwhile: the slots go back
        }
        match host.pause.pace() {
            Turn::Now => {}
            Turn::At(due) => {
                drop(slot);
                let _held = progress.held_back();
                let turn = Box::pin(tokio::time::sleep_until(due));
                scope.sleepers.aside(turn).await;
                // The turn is its own: a slot again, and no second token.
                slot = Box::pin(shared.slots.acquire()).await?;
                if host.pause.is_paused() {
                    continue; // the quota ran out while it waited its turn
                }
            }
            Turn::AfterReset(reset) => {
                drop(slot);
                let _held = progress.held_back();
                let wait = Box::pin(tokio::time::sleep_until(reset));
                scope.sleepers.aside(wait).await;
                continue; // the next window's answers will say how it goes
            }
        }
        return Ok(Permit {
            slot,
            _host_slot: host_slot,
        });
    }
}

/// Heeds what a response says about the server's load: `Retry-After` on a 429 or 503
/// pauses every request to its origin, and rate-limit headers, when asked to, spread
/// out or hold back the rest of the quota. Neither waits longer than
/// `max_retry_after`.
fn heed(shared: &Shared, gate: &Pause, status: StatusCode, headers: &HeaderMap) {
    // The clock is read only for an answer that asks for something: most do not.
    let longest = shared.retry.retry_after_limit();
    if shared.pause_on_retry_after
        && matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        )
        && let Some(wait) = retry_after(headers, std::time::SystemTime::now())
    {
        gate.pause(tokio::time::Instant::now(), wait.min(longest));
    }
    if shared.respect_rate_limit_headers {
        // Spread out once what is left would not cover two full rounds of requests.
        let low = u64::try_from(shared.slots.limit().saturating_mul(2)).unwrap_or(u64::MAX);
        gate.observe_quota(headers, tokio::time::Instant::now(), low, longest);
    }
}

/// A successful answer, its body read in full.
pub(crate) struct Answer {
    response: Response,
    body: Bytes,
}

impl Answer {
    /// The URL that answered, after any redirects.
    pub(crate) fn url(&self) -> &Url {
        self.response.url()
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }

    /// A failure of this answer that another attempt would not fix: its content is
    /// not what was expected.
    pub(crate) fn unusable(&self, kind: ErrorKind, message: impl Into<String>) -> Failure {
        let error = Error::request(kind, self.url().clone(), message)
            .with_status(self.response.status())
            .with_body(&self.body);
        Failure::new(error, false)
    }
}

/// Decodes an answer's JSON body into `T`.
pub(crate) fn decode<T: DeserializeOwned>(answer: Answer) -> Result<T, Failure> {
    decode_json(&answer.body).map_err(|message| answer.unusable(ErrorKind::Decode, message))
}

/// The request `request_with` made for an id. Each attempt sends a copy; a request
/// whose body is a stream, which cannot be copied, is sent once.
pub(crate) struct Made(Option<Box<Request>>);

impl Made {
    pub(crate) fn new(request: Request) -> Self {
        Made(Some(Box::new(request)))
    }

    /// True once a request whose body is a stream was sent: there is no other.
    pub(crate) fn is_spent(&self) -> bool {
        self.0.is_none()
    }

    /// The request for the next attempt, or `None` once a stream body was sent.
    pub(crate) fn next(&mut self) -> Option<Request> {
        let copy = self.0.as_deref()?.try_clone();
        copy.or_else(|| self.0.take().map(|request| *request))
    }
}

/// Sends one attempt (a GET of `url`, or the `request` made for it) and reads its body
/// under the size cap. The caller bounds it in time.
///
/// The request is handed to the client before the future is made, so that neither it
/// nor `url` takes room in the future.
pub(crate) fn send<'a>(
    shared: &'a Shared,
    gate: &'a Pause,
    url: Url,
    request: Option<Request>,
) -> impl Future<Output = Result<Answer, Failure>> + Send + 'a {
    let request = request.unwrap_or_else(|| {
        let mut request = Request::new(Method::GET, url);
        if !shared.headers.is_empty() {
            *request.headers_mut() = shared.headers.clone();
        }
        request
    });
    receive(shared, gate, shared.client.execute(request))
}

/// Waits for the answer to a request sent with `send`, and reads its body.
async fn receive(
    shared: &Shared,
    gate: &Pause,
    pending: impl Future<Output = reqwest::Result<Response>>,
) -> Result<Answer, Failure> {
    let mut response = pending.await.map_err(|err| {
        // A redirect loop or a request reqwest refuses to build will not get better.
        let transient = !(err.is_redirect() || err.is_builder());
        let url = err.url().cloned();
        Failure::new(classify(err, url, false), transient)
    })?;

    let status = response.status();
    heed(shared, gate, status, response.headers());
    if !status.is_success() {
        let body = read_prefix(&mut response, shared.max_body_bytes.min(ERROR_BODY_BYTES)).await;
        let mut error = Error::request(ErrorKind::Status, response.url().clone(), "")
            .with_status(status)
            .with_body(&body);
        if let Some(note) = redirect::unfollowed(shared, response.url(), status, response.headers())
        {
            error = error.with_note(note);
        }
        return Err(Failure {
            error,
            headers: Some(std::mem::take(response.headers_mut())),
            transient: is_transient_status(status),
        });
    }

    let body = read_capped(&mut response, shared.max_body_bytes)
        .await
        .map_err(|failure| match failure {
            ReadFailure::TooLarge(message) => Failure::new(
                Error::request(ErrorKind::TooLarge, response.url().clone(), message)
                    .with_status(status),
                false,
            ),
            // The connection broke mid-body: the next attempt may well get all of it.
            ReadFailure::Transport(err) => Failure::new(
                classify(err, Some(response.url().clone()), true).with_status(status),
                true,
            ),
        })?;
    Ok(Answer { response, body })
}

fn classify(err: reqwest::Error, url: Option<Url>, reading_body: bool) -> Error {
    match url {
        Some(url) => Error::from_reqwest(err, url, reading_body),
        None => Error::new(ErrorKind::Request, err.to_string()).with_source(err),
    }
}

enum ReadFailure {
    TooLarge(String),
    Transport(reqwest::Error),
}

/// Reads the whole body, failing as soon as it is known to exceed `cap` bytes: from
/// `Content-Length` before reading anything, otherwise once the bytes read pass the cap.
async fn read_capped(response: &mut Response, cap: usize) -> Result<Bytes, ReadFailure> {
    let declared = response.content_length();
    if let Some(len) = declared.filter(|&len| len > cap as u64) {
        return Err(ReadFailure::TooLarge(format!(
            "Content-Length is {len} bytes; the limit is {cap} (see max_body_bytes)"
        )));
    }
    let too_large = || {
        ReadFailure::TooLarge(format!(
            "the body is longer than the limit of {cap} bytes (see max_body_bytes)"
        ))
    };

    // Most bodies arrive as one chunk: hand it over without copying.
    let Some(first) = next_chunk(response).await? else {
        return Ok(Bytes::new());
    };
    if first.len() > cap {
        return Err(too_large());
    }
    let Some(second) = next_chunk(response).await? else {
        return Ok(first);
    };

    // Content-Length is the server's word, not a promise: trust it only so far.
    let expected = declared.map_or(0, |len| usize::try_from(len).unwrap_or(usize::MAX));
    let mut body = BytesMut::with_capacity(
        expected
            .min(PREALLOCATE_AT_MOST)
            .max(first.len() + second.len()),
    );
    body.extend_from_slice(&first);
    let mut chunk = second;
    loop {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
        match next_chunk(response).await? {
            Some(next) => chunk = next,
            None => return Ok(body.freeze()),
        }
    }
}

/// Reads the start of an error response's body, up to about `limit` bytes. The status
/// is the error: a body that is long or breaks off only shortens what is quoted.
async fn read_prefix(response: &mut Response, limit: usize) -> Vec<u8> {
    let mut prefix = Vec::new();
    while prefix.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => prefix.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    prefix
}

async fn next_chunk(response: &mut Response) -> Result<Option<Bytes>, ReadFailure> {
    response.chunk().await.map_err(ReadFailure::Transport)
}

/// Decodes `body` as JSON into `T`. On failure the message names the path inside the
/// document where decoding stopped (`data.items[3].views`), which plain serde_json
/// errors do not; that slower second pass runs only for bodies that failed.
fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let err = match serde_json::from_slice(body) {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Err(traced) if traced.path().iter().next().is_some() => {
            Err(format!("at `{}`: {}", traced.path(), traced.inner()))
        }
        _ => Err(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Video {
        id: String,
        stats: Stats,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Stats {
        views: u64,
    }

    #[test]
    fn what_a_failure_says_about_the_servers_load() {
        let url = Url::parse("http://h/items/1").unwrap();
        let failure = |kind, status: Option<u16>| {
            let mut error = Error::request(kind, url.clone(), "");
            if let Some(status) = status {
                error = error.with_status(StatusCode::from_u16(status).unwrap());
            }
            Failure::new(error, true).signal()
        };
        for status in [429, 503, 504] {
            assert_eq!(failure(ErrorKind::Status, Some(status)), Signal::Overloaded);
        }
        assert_eq!(failure(ErrorKind::Timeout, None), Signal::Overloaded);
        // Whole answers: their latency is a sample.
        assert_eq!(failure(ErrorKind::Status, Some(404)), Signal::Answered);
        assert_eq!(failure(ErrorKind::Status, Some(500)), Signal::Answered);
        assert_eq!(failure(ErrorKind::Decode, Some(200)), Signal::Answered);
        // No whole answer: nothing to learn.
        assert_eq!(failure(ErrorKind::Connect, None), Signal::Unknown);
        assert_eq!(failure(ErrorKind::Body, Some(200)), Signal::Unknown);
    }

    #[test]
    fn decode_errors_name_the_path() {
        let err = decode_json::<Video>(br#"{"id":"a","stats":{"views":"many"}}"#).unwrap_err();
        assert!(
            err.starts_with("at `stats.views`: invalid type: string"),
            "{err}"
        );
    }

    #[test]
    fn decode_errors_without_a_path_keep_serde_json_message() {
        let err = decode_json::<Video>(b"not json").unwrap_err();
        assert!(
            err.starts_with("expected ident at line 1 column 2"),
            "{err}"
        );
        let err = decode_json::<Vec<u8>>(b"[1,2] trailing").unwrap_err();
        assert!(err.contains("trailing characters"), "{err}");
    }
}
