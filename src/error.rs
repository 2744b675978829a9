//! The crate's one error type.

use std::fmt;

use reqwest::StatusCode;
use url::Url;

use crate::rate::BoxError;

/// How many bytes of a response body an error keeps, for the message.
const SNIPPET_BYTES: usize = 256;

/// Everything that can go wrong in `fanout`: a bad builder setting, or one id's request.
///
/// One pointer wide (the details live in a `Box`), so `Result<T, Error>` stays cheap to
/// move around a million times. The accessors give what a caller needs to act on a
/// failure: which id, which URL, which HTTP status, how many attempts were made.
///
/// ```
/// # fn check(err: fanout::Error) {
/// match err.kind() {
///     fanout::ErrorKind::Status if err.status().map(|s| s.as_u16()) == Some(404) => {
///         println!("no such record: {}", err.id().unwrap_or("?"));
///     }
///     _ => eprintln!("{err}"),
/// }
/// # }
/// ```
#[derive(thiserror::Error)]
#[error(transparent)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(thiserror::Error)]
struct Inner {
    kind: ErrorKind,
    message: String,
    id: Option<String>,
    url: Option<Url>,
    status: Option<StatusCode>,
    attempts: u32,
    body: Option<String>,
    #[source]
    source: Option<BoxError>,
}

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The URL template given to the builder is not usable: no `{id}`, an unknown
    /// placeholder, an unbalanced brace, a relative or non-http(s) URL.
    InvalidTemplate,
    /// A header name or value given to the builder is not valid HTTP.
    InvalidHeader,
    /// Another builder setting is out of range (concurrency 0, a zero timeout, ...), or
    /// the default HTTP client could not be created.
    InvalidConfig,
    /// The id cannot be placed in the URL template without changing the URL's structure,
    /// for example `..` or an empty string as a whole path segment. Nothing was sent.
    InvalidId,
    /// The connection to the server could not be established.
    Connect,
    /// The attempt did not finish within the configured timeout.
    Timeout,
    /// The request failed on the wire before a response arrived (connection closed
    /// before the status line, protocol error, ...).
    Request,
    /// The response body could not be read to the end (connection dropped mid-body).
    Body,
    /// The server answered with a non-success status; see [`Error::status`].
    Status,
    /// The body is not JSON of the expected shape; the message names the path
    /// inside the document and quotes the first bytes of the body.
    Decode,
    /// The response body is larger than the configured maximum; reading stopped at the cap.
    TooLarge,
    /// The list endpoint's pages cannot be followed: a next link that leads back to a
    /// page already fetched, a page repeating the one before, an unusable next link or
    /// cursor, or more pages than `max_pages`.
    Pagination,
    /// The request's task panicked (a panic in `T`'s `Deserialize` impl or in a
    /// [`RetryPolicy::retry_if`](crate::RetryPolicy::retry_if) closure); the panic was
    /// caught so that the rest of the batch goes on. (The id's `Display` impl runs in
    /// the consumer's task, where a panic is not caught.)
    Panic,
    /// The batch was polled outside a Tokio runtime, or the runtime shut down while
    /// the request was running.
    Runtime,
    /// A rate limiter outside this process (a [`RateLimit`](crate::RateLimit) such as
    /// the shared one on Redis) could not hand out a token, so the attempt was not
    /// sent. Retried as a transient failure.
    RateLimiter,
    /// The work queue's store (Redis) could not be read or written.
    Queue,
    /// The caller's sink refused an outcome; the id was not acknowledged, so it will
    /// be delivered again.
    Sink,
    /// The source of ids given to [`FanOut::fan_out_try_stream`](crate::FanOut::fan_out_try_stream)
    /// failed (its error is the [`source`](std::error::Error::source)); the ids before
    /// it got their outcomes.
    Input,
}

impl ErrorKind {
    /// A short, stable, machine-readable name: `"status"`, `"timeout"`, `"invalid_id"`,
    /// ... (the variant's name in snake case), for metrics labels and output files.
    /// `Display` gives a phrase for people instead.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidTemplate => "invalid_template",
            ErrorKind::InvalidHeader => "invalid_header",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::InvalidId => "invalid_id",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Request => "request",
            ErrorKind::Body => "body",
            ErrorKind::Status => "status",
            ErrorKind::Decode => "decode",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Pagination => "pagination",
            ErrorKind::Panic => "panic",
            ErrorKind::Runtime => "runtime",
            ErrorKind::RateLimiter => "rate_limiter",
            ErrorKind::Queue => "queue",
            ErrorKind::Sink => "sink",
            ErrorKind::Input => "input",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::InvalidTemplate => "invalid URL template",
            ErrorKind::InvalidHeader => "invalid header",
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::InvalidId => "id cannot be used in the URL",
            ErrorKind::Connect => "connection failed",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Request => "request failed",
            ErrorKind::Body => "reading the response body failed",
            ErrorKind::Status => "unsuccessful HTTP status",
            ErrorKind::Decode => "could not decode the JSON body",
            ErrorKind::TooLarge => "response body too large",
            ErrorKind::Pagination => "cannot follow the list's pages",
            ErrorKind::Panic => "request task panicked",
            ErrorKind::Runtime => "no Tokio runtime",
            ErrorKind::RateLimiter => "rate limiter unavailable",
            ErrorKind::Queue => "work queue unavailable",
            ErrorKind::Sink => "the sink refused an outcome",
            ErrorKind::Input => "the source of ids failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                id: None,
                url: None,
                status: None,
                attempts: 0,
                body: None,
                source: None,
            }),
        }
    }

    /// The error a caller's source of ids gave: kept if it is one of ours.
    pub(crate) fn from_source(err: impl Into<BoxError>) -> Self {
        match err.into().downcast::<Error>() {
            Ok(err) => *err,
            Err(other) => Error::new(ErrorKind::Input, other.to_string()).with_source(other),
        }
    }

    /// An error from one attempt at `url`.
    pub(crate) fn request(kind: ErrorKind, url: Url, message: impl Into<String>) -> Self {
        let mut err = Error::new(kind, message);
        err.inner.url = Some(url);
        err.inner.attempts = 1;
        err
    }

    /// Classifies a transport error from reqwest.
    pub(crate) fn from_reqwest(err: reqwest::Error, url: Url, reading_body: bool) -> Self {
        let kind = if err.is_timeout() {
            ErrorKind::Timeout
        } else if err.is_connect() {
            ErrorKind::Connect
        } else if reading_body || err.is_body() || err.is_decode() {
            ErrorKind::Body
        } else {
            ErrorKind::Request
        };
        let message = match kind {
            ErrorKind::Timeout => "no complete response within the timeout".to_owned(),
            _ => root_cause(&err),
        };
        Error::request(kind, url, message).with_source(err)
    }

    pub(crate) fn with_url(mut self, url: Url) -> Self {
        self.inner.url = Some(url);
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.inner.status = Some(status);
        self
    }

    /// Keeps the first bytes of `body` (lossily decoded) for the message.
    pub(crate) fn with_body(mut self, body: &[u8]) -> Self {
        if !body.is_empty() {
            self.inner.body = Some(snippet(body));
        }
        self
    }

    pub(crate) fn with_id_text(mut self, id: String) -> Self {
        self.inner.id = Some(id);
        self
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.inner.attempts = attempts;
        self
    }

    /// Adds a sentence to the message, e.g. why no retry followed.
    pub(crate) fn with_note(mut self, note: impl AsRef<str>) -> Self {
        let message = &mut self.inner.message;
        if !message.is_empty() {
            message.push_str("; ");
        }
        message.push_str(note.as_ref());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The id whose request failed (its `Display` form), if the error belongs to one id.
    pub fn id(&self) -> Option<&str> {
        self.inner.id.as_deref()
    }

    /// The URL that was requested, if a request was made.
    pub fn url(&self) -> Option<&Url> {
        self.inner.url.as_ref()
    }

    /// The HTTP status of the response, if one arrived.
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// How many attempts were made for this id (0 when nothing was sent).
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// The first bytes of the response body (up to 256, lossily decoded as UTF-8), if a
    /// body was read: useful with [`ErrorKind::Status`] and [`ErrorKind::Decode`].
    pub fn body_snippet(&self) -> Option<&str> {
        self.inner.body.as_deref()
    }

    /// True for [`ErrorKind::Timeout`].
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
    }

    /// True for [`ErrorKind::Status`]: the server answered with a non-success status.
    pub fn is_status(&self) -> bool {
        self.inner.kind == ErrorKind::Status
    }

    /// True for [`ErrorKind::Decode`]: the body was not the expected JSON.
    pub fn is_decode(&self) -> bool {
        self.inner.kind == ErrorKind::Decode
    }

    /// True for [`ErrorKind::Connect`].
    pub fn is_connect(&self) -> bool {
        self.inner.kind == ErrorKind::Connect
    }

    /// True for the kinds that [`build()`](crate::FanOutBuilder::build) returns.
    pub fn is_builder(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::InvalidTemplate | ErrorKind::InvalidHeader | ErrorKind::InvalidConfig
        )
    }
}

impl fmt::Display for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.describe())?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        if let Some(url) = &self.url {
            write!(f, " from {url}")?;
        }
        if let Some(id) = &self.id {
            write!(f, " (id {id:?})")?;
        }
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(body) = &self.body {
            write!(f, "; body starts: {body:?}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(id) = &self.id {
            d.field("id", id);
        }
        if let Some(url) = &self.url {
            d.field("url", &url.as_str());
        }
        if let Some(status) = &self.status {
            d.field("status", status);
        }
        if self.attempts > 0 {
            d.field("attempts", &self.attempts);
        }
        if !self.message.is_empty() {
            d.field("message", &self.message);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

fn snippet(body: &[u8]) -> String {
    let cut = &body[..body.len().min(SNIPPET_BYTES)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if body.len() > SNIPPET_BYTES {
        text.push('…');
    }
    text
}

/// The innermost cause of a reqwest error, which says what actually happened
/// ("connection refused") rather than reqwest's generic "error sending request".
fn root_cause(err: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static_and_one_pointer_wide() {
        fn assert_traits<E: std::error::Error + Send + Sync + 'static>() {}
        assert_traits::<Error>();
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
        assert_eq!(
            std::mem::size_of::<Result<(), Error>>(),
            std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn kind_names_are_the_variants_in_snake_case() {
        let kinds = [
            (ErrorKind::InvalidTemplate, "InvalidTemplate"),
            (ErrorKind::InvalidId, "InvalidId"),
            (ErrorKind::TooLarge, "TooLarge"),
            (ErrorKind::RateLimiter, "RateLimiter"),
            (ErrorKind::Status, "Status"),
        ];
        for (kind, variant) in kinds {
            assert_eq!(format!("{kind:?}"), variant);
            let snake: String = variant
                .chars()
                .enumerate()
                .flat_map(|(at, c)| {
                    let gap = (at > 0 && c.is_ascii_uppercase()).then_some('_');
                    gap.into_iter()
                        .chain(std::iter::once(c.to_ascii_lowercase()))
                })
                .collect();
            assert_eq!(kind.as_str(), snake);
        }
    }

    #[test]
    fn display_carries_the_context() {
        let url = Url::parse("http://127.0.0.1:1/items/7").unwrap();
        let err = Error::request(ErrorKind::Status, url, "")
            .with_status(StatusCode::NOT_FOUND)
            .with_body(br#"{"error":"no such item"}"#)
            .with_id_text("7".to_owned());
        assert_eq!(
            err.to_string(),
            r#"unsuccessful HTTP status 404 Not Found from http://127.0.0.1:1/items/7 (id "7"); body starts: "{\"error\":\"no such item\"}""#
        );
        assert_eq!(err.id(), Some("7"));
        assert_eq!(err.attempts(), 1);
        assert!(err.is_status() && !err.is_timeout() && !err.is_builder());
    }

    #[test]
    fn long_bodies_are_cut_even_inside_a_character() {
        // One ASCII byte first, so that the cut at SNIPPET_BYTES falls inside an `é`.
        let body = format!("a{}", "é".repeat(SNIPPET_BYTES));
        let err = Error::new(ErrorKind::Decode, "x").with_body(body.as_bytes());
        let kept = err.body_snippet().unwrap();
        let expected = format!("a{}\u{FFFD}…", "é".repeat((SNIPPET_BYTES - 1) / 2));
        assert_eq!(kept, expected);
    }
}
