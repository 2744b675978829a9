//! `FanOutBuilder`: every setting of a `FanOut`, validated in one place.

use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;

use reqwest::header::{
    ACCEPT, AUTHORIZATION, COOKIE, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHORIZATION,
};
use url::Url;

use crate::detail::{DetailUrl, ErasedRequestFn, ErasedUrlFn, RequestFn, UrlFn, erase};
use crate::error::{Error, ErrorKind};
use crate::event::{Event, OnEvent};
use crate::fanout::{FanOut, Shared};
use crate::limit::{Concurrency, Hosts, Slots};
use crate::list::{ListSettings, Pagination};
use crate::rate::{RateLimit, Throttle};
use crate::redirect;
use crate::retry::RetryPolicy;
use crate::template::{UrlTemplate, redact_userinfo};

const DEFAULT_CONCURRENCY: usize = 16;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const REORDER_WINDOW_PER_SLOT: usize = 4;
const DEFAULT_MAX_PAGES: usize = 100_000;
const USER_AGENT: &str = concat!("fanout/", env!("CARGO_PKG_VERSION"));

/// Configures a [`FanOut`]. Made by [`FanOut::builder`].
///
/// Setters take and return the builder by value and never fail; every check happens in
/// [`build`](FanOutBuilder::build), which lists them.
///
/// ```
/// use std::time::Duration;
/// use fanout::{FanOut, RetryPolicy};
///
/// #[derive(serde::Deserialize)]
/// struct Player { id: u64, name: String }
///
/// let players = FanOut::<u64, Player>::builder()
///     .detail_url("https://api.example.com/players/{id}")
///     .query(&[("include", "stats")])
///     .bearer_auth("s3cret")
///     .concurrency(32)
///     .requests_per_second(50)
///     .retry(RetryPolicy::exponential().max_retries(5))
///     .timeout(Duration::from_secs(10))
///     .build()?;
/// # Ok::<(), fanout::Error>(())
/// ```
#[must_use = "a builder does nothing until `.build()` is called"]
pub struct FanOutBuilder<Id, T> {
    client: Option<reqwest::Client>,
    detail: Option<Detail>,
    request: Option<ErasedRequestFn>,
    list_url: Option<String>,
    ids_at: String,
    id_field: String,
    pagination: Pagination,
    max_pages: usize,
    total_at: Option<String>,
    dedup_ids: bool,
    concurrency: Concurrency,
    rate: Option<Rate>,
    pause_on_retry_after: bool,
    respect_rate_limit_headers: bool,
    per_host_concurrency: Option<usize>,
    per_host_rate: Option<Rate>,
    retry: RetryPolicy,
    timeout: Duration,
    deadline: Option<Duration>,
    max_body_bytes: usize,
    reorder_window: Option<usize>,
    headers: HeaderMap,
    query: Vec<(String, String)>,
    /// The first bad header, reported by `build()` so that setters never fail.
    header_error: Option<Error>,
    on_event: Option<OnEvent>,
    _types: PhantomData<fn(Id) -> T>,
}

impl<Id, T> FanOutBuilder<Id, T> {
    pub(crate) fn new() -> Self {
        FanOutBuilder {
            client: None,
            detail: None,
            request: None,
            list_url: None,
            ids_at: String::new(),
            id_field: "id".to_owned(),
            pagination: Pagination::none(),
            max_pages: DEFAULT_MAX_PAGES,
            total_at: None,
            dedup_ids: false,
            concurrency: Concurrency::fixed(DEFAULT_CONCURRENCY),
            rate: None,
            pause_on_retry_after: true,
            respect_rate_limit_headers: false,
            per_host_concurrency: None,
            per_host_rate: None,
            retry: RetryPolicy::default(),
            timeout: DEFAULT_TIMEOUT,
            deadline: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            reorder_window: None,
            headers: HeaderMap::new(),
            query: Vec::new(),
            header_error: None,
            on_event: None,
            _types: PhantomData,
        }
    }

    /// Uses this `reqwest::Client` (its pool, TLS, proxy and default headers) for every
    /// request.
    ///
    /// Default: a client made by `fanout`, with reqwest's defaults and a
    /// `fanout/<version>` user agent.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The URL of one record, with `{id}` where the id goes, e.g.
    /// `https://api.example.com/players/{id}` or `https://api.example.com/v1/item?id={id}`.
    ///
    /// `{id}` may appear in the path and the query string, more than once. `{{` and `}}`
    /// are literal braces. The id is percent-encoded for where it lands, so an id such
    /// as `../admin`, `a/b` or `x?y#z` stays inside its one path segment or query value;
    /// an id that would make a whole path segment empty, `.` or `..` fails with
    /// [`ErrorKind::InvalidId`] without being sent.
    ///
    /// Required, or [`detail_url_with`](Self::detail_url_with): there is no default.
    /// Replaces an earlier `detail_url_with`.
    pub fn detail_url(mut self, template: &str) -> Self {
        self.detail = Some(Detail::Template(template.to_owned()));
        self
    }

    /// Makes each id's URL with a function instead of a template: for ids that are
    /// whole URLs, or that map to several hosts (shards, regions, tenants). The
    /// [`query`](Self::query) pairs are appended to every URL it gives.
    ///
    /// ```
    /// use fanout::FanOut;
    /// use url::Url;
    ///
    /// // Players live on one of four shards.
    /// let players = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url_with(|id: &u64| {
    ///         Url::parse(&format!("https://shard{}.example.com/players/{id}", id % 4))
    ///     })
    ///     .per_host_concurrency(8)
    ///     .build()?;
    /// # Ok::<(), fanout::Error>(())
    /// ```
    ///
    /// The function's `Err` fails that id with [`ErrorKind::InvalidId`] (its message
    /// says why), as does a URL that is not http(s), has no host, or carries a user
    /// name or password (set credentials with [`bearer_auth`](Self::bearer_auth) or
    /// [`header`](Self::header)); a panic fails that id with [`ErrorKind::Panic`].
    /// Nothing is sent for such an id. Unlike a template, a function is free to put
    /// the id anywhere unencoded: encoding it is then up to the function.
    ///
    /// Replaces an earlier `detail_url`.
    pub fn detail_url_with<E, F>(mut self, make: F) -> Self
    where
        Id: 'static,
        E: fmt::Display,
        F: Fn(&Id) -> Result<Url, E> + Send + Sync + 'static,
    {
        let make: UrlFn<Id> = Box::new(move |id| make(id).map_err(|err| err.to_string()));
        self.detail = Some(Detail::Function(erase(make)));
        self
    }

    /// Makes each id's request with a function: another method, a body, headers of
    /// its own. It is given the `FanOut`'s client, the id, and the id's URL (from
    /// [`detail_url`](Self::detail_url) or [`detail_url_with`](Self::detail_url_with),
    /// [`query`](Self::query) pairs included), and returns a `reqwest::RequestBuilder`.
    ///
    /// ```
    /// use fanout::FanOut;
    /// use serde_json::json;
    ///
    /// // One search per id: POST a query, decode the JSON answer.
    /// let searches = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url("https://api.example.com/search")
    ///     .request_with(|client, id: &u64, url| {
    ///         client.post(url).json(&json!({ "entity": id, "select": ["label", "location"] }))
    ///     })
    ///     .build()?;
    /// # Ok::<(), fanout::Error>(())
    /// ```
    ///
    /// With a request function, the `detail_url` template may leave out `{id}`: every
    /// id then gets the same URL, and the function puts the id where it belongs.
    ///
    /// Everything else applies as it does to the default `GET`: the concurrency and rate
    /// limits, the timeout, the body cap, decoding into `T`, and the
    /// [`header`](Self::header)s and [`bearer_auth`](Self::bearer_auth) (where the
    /// function set no header of the same name). The function runs once per id, as the
    /// id is admitted; each attempt sends a copy of its request. The retry policy
    /// applies whatever the method: a `POST` that must not be repeated wants
    /// [`RetryPolicy::none()`] or a [`retry_if`](RetryPolicy::retry_if) that says so.
    /// A request whose body is a stream cannot be copied: it is sent once, and not
    /// retried.
    ///
    /// A request that cannot be built (reqwest's builder error), or whose URL is not
    /// http(s) with a host, fails its id with
    /// [`ErrorKind::InvalidId`]; a panic fails it with [`ErrorKind::Panic`]. Nothing is
    /// sent for such an id. The request is sent with the `FanOut`'s client, whichever
    /// client built it. With fanout's own client, redirects are then followed only on
    /// the same host (see [`header`](Self::header)), since the function's headers and
    /// body may be meant for this server alone.
    ///
    /// Default: a `GET` of the id's URL.
    pub fn request_with<F>(mut self, make: F) -> Self
    where
        Id: 'static,
        F: Fn(&reqwest::Client, &Id, Url) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        let make: RequestFn<Id> = Box::new(make);
        self.request = Some(ErasedRequestFn::new(make));
        self
    }

    /// The list endpoint that [`FanOut::list_ids`] reads the ids from, e.g.
    /// `https://api.example.com/videos/?n=100`. Its pages may be a bare array of ids
    /// (`["student", "draw"]`, `[1, 2, 3]`), an array of objects holding the id
    /// ([`id_field`](Self::id_field)), or either of those inside a wrapper object
    /// ([`ids_at`](Self::ids_at)); see [`paginate`](Self::paginate) for more than one
    /// page. The query parameters of [`query`](Self::query) are not added to it.
    ///
    /// Default: none; `list_ids` then fails with [`ErrorKind::InvalidConfig`].
    pub fn list_url(mut self, url: &str) -> Self {
        self.list_url = Some(url.to_owned());
        self
    }

    /// Where in a list page's JSON the array of ids is, as a JSON pointer (RFC 6901):
    /// `/data` for `{"data": [...]}`, `/result/items` for deeper ones.
    ///
    /// Default: `""`, the whole body is the array.
    pub fn ids_at(mut self, pointer: impl Into<String>) -> Self {
        self.ids_at = pointer.into();
        self
    }

    /// For a list of objects (`[{"id": 1, "title": ...}]`), the field that holds each
    /// object's id. Elements that are not objects are taken as ids themselves.
    ///
    /// Default: `id`.
    pub fn id_field(mut self, name: impl Into<String>) -> Self {
        self.id_field = name.into();
        self
    }

    /// Where in a list page's JSON the number of ids in the whole list is, as a JSON
    /// pointer (`/meta/total` for `{"data": [...], "meta": {"total": 4000000}}`). The
    /// first page that has it gives [`fan_out_listed`](FanOut::fan_out_listed)'s
    /// [`Progress`](crate::Progress) its total (unless [`dedup_ids`](Self::dedup_ids)
    /// is on, since repeats would make it wrong).
    ///
    /// Default: none; a listed batch's total is unknown.
    pub fn total_at(mut self, pointer: impl Into<String>) -> Self {
        self.total_at = Some(pointer.into());
        self
    }

    /// How the list endpoint's pages link up; see [`Pagination`].
    ///
    /// Default: [`Pagination::none`], a single page.
    pub fn paginate(mut self, pagination: Pagination) -> Self {
        self.pagination = pagination;
        self
    }

    /// The most list pages fetched. A list with more pages is an
    /// [`ErrorKind::Pagination`] error rather than a silently shortened list: this is
    /// a guard against runaway pagination, not a way to sample.
    ///
    /// Default: 100,000.
    pub fn max_pages(mut self, pages: usize) -> Self {
        self.max_pages = pages;
        self
    }

    /// Drops ids already seen: in [`FanOut::list_ids`], and in each batch (an id that
    /// comes again is not fetched again and gets no second outcome). List endpoints
    /// often repeat ids across pages when data shifts while they are read.
    ///
    /// Ids are compared by their `Display` form. Memory grows with the number of
    /// distinct ids: a 128-bit hash each, not the id, which with the set's overhead is
    /// about 36 bytes an id (up to 54 while the set grows), so 150–220 MB for four
    /// million ids. With repeats dropped, [`Batch::collect_ordered`](crate::Batch::collect_ordered)
    /// has one result per distinct id, in the order of first appearance.
    ///
    /// Default: off.
    pub fn dedup_ids(mut self, enabled: bool) -> Self {
        self.dedup_ids = enabled;
        self
    }

    /// At most this many requests are on the wire at once, across all batches and
    /// clones of the built `FanOut`. Ids are taken from the input only as slots free up.
    ///
    /// A number is a fixed limit. [`Concurrency::adaptive(min, max)`](Concurrency::adaptive)
    /// finds the server's capacity instead: it starts at `min`, grows while the server
    /// keeps up, and backs off when it answers 429 or 503, times out, or slows down
    /// under the load; never beyond `max`.
    ///
    /// ```
    /// # use fanout::{Concurrency, FanOut};
    /// let fixed = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url("https://api.example.com/items/{id}")
    ///     .concurrency(32);
    /// let adaptive = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url("https://api.example.com/items/{id}")
    ///     .concurrency(Concurrency::adaptive(1, 100));
    /// ```
    ///
    /// Default: 16, fixed.
    pub fn concurrency(mut self, limit: impl Into<Concurrency>) -> Self {
        self.concurrency = limit.into();
        self
    }

    /// Whether a 429 or 503 answer with a `Retry-After` header holds back every
    /// request to that server (scheme, host and port) for that long, not only the
    /// retry of the id that got it: the server is asking the client to slow down.
    /// Requests already sent are not recalled. The pause is capped by the retry
    /// policy's [`max_retry_after`](crate::RetryPolicy::max_retry_after), and is
    /// shared by all batches and clones of the built `FanOut`.
    ///
    /// Turn it off for an API whose `Retry-After` concerns one resource only.
    ///
    /// Default: on.
    pub fn pause_on_retry_after(mut self, enabled: bool) -> Self {
        self.pause_on_retry_after = enabled;
        self
    }

    /// Whether to read the server's rate-limit headers and slow down before its quota
    /// runs out. Read are the IETF draft's `RateLimit` field (`remaining=…, reset=…`,
    /// or `r=…;t=…` per policy, of which the most pressing counts), its older
    /// `RateLimit-Remaining` and `RateLimit-Reset` pair, and the common
    /// `X-RateLimit-Remaining` and `X-RateLimit-Reset` pair (the reset in seconds from
    /// now, or as a Unix time).
    ///
    /// While fewer requests remain than two rounds of the concurrency limit, sends are
    /// spread evenly until the reset; with none left, every request to that server
    /// waits for the reset (at least a second, at most
    /// [`max_retry_after`](crate::RetryPolicy::max_retry_after)). Answers arriving out
    /// of order may say more remain than do; the spacing is a courtesy, and a
    /// [`rate_limit`](Self::rate_limit) is still the way to a hard bound.
    ///
    /// Default: off.
    pub fn respect_rate_limit_headers(mut self, enabled: bool) -> Self {
        self.respect_rate_limit_headers = enabled;
        self
    }

    /// At most this many requests on the wire at once to any one origin (scheme, host
    /// and port), besides the overall [`concurrency`](Self::concurrency): for ids that
    /// map to several hosts ([`detail_url_with`](Self::detail_url_with)). An attempt
    /// waiting for its host's slot holds no overall slot.
    ///
    /// Default: no per-host limit.
    pub fn per_host_concurrency(mut self, limit: usize) -> Self {
        self.per_host_concurrency = Some(limit);
        self
    }

    /// At most `rate` requests per second to any one origin, counting every attempt,
    /// besides any overall rate limit: `Quota::per_second(rate)` per host, with
    /// governor's keyed limiter. See
    /// [`per_host_rate_limit`](Self::per_host_rate_limit) for a burst or another
    /// period. Replaces an earlier per-host rate.
    ///
    /// Memory stays bounded however many hosts there are: past 1,024 origins, those
    /// with no request in flight and no pause to keep are forgotten, and so is their
    /// bucket once it has been full again for one token's time.
    ///
    /// Default: no per-host rate limit.
    pub fn per_host_requests_per_second(mut self, rate: u32) -> Self {
        self.per_host_rate = Some(Rate::PerSecond(rate));
        self
    }

    /// Limits the requests to any one origin to this [`Quota`], counting every attempt,
    /// besides any overall rate limit. Replaces an earlier per-host rate.
    ///
    /// Default: no per-host rate limit.
    pub fn per_host_rate_limit(mut self, quota: Quota) -> Self {
        self.per_host_rate = Some(Rate::Quota(quota));
        self
    }

    /// Sends at most `rate` requests per second, counting every attempt (retries
    /// too), across all batches and clones of the built `FanOut`.
    ///
    /// This is `Quota::per_second(rate)`: a token bucket that holds `rate` tokens, so
    /// up to `rate` requests may go at once after a quiet spell, and on average never
    /// more than `rate` a second. For even spacing, or a quota per minute or hour, use
    /// [`rate_limit`](Self::rate_limit). Replaces an earlier rate setting.
    ///
    /// Default: no rate limit.
    pub fn requests_per_second(mut self, rate: u32) -> Self {
        self.rate = Some(Rate::PerSecond(rate));
        self
    }

    /// Limits requests to this [`Quota`] (rate and burst), counting every attempt,
    /// across all batches and clones of the built `FanOut`.
    ///
    /// ```
    /// # use std::num::NonZeroU32;
    /// # use fanout::{FanOut, Quota};
    /// // 20 a second, one at a time: at least 50 ms between two requests.
    /// let quota = Quota::per_second(NonZeroU32::new(20).unwrap())
    ///     .allow_burst(NonZeroU32::new(1).unwrap());
    /// let api = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url("https://api.example.com/items/{id}")
    ///     .rate_limit(quota)
    ///     .build()?;
    /// # Ok::<(), fanout::Error>(())
    /// ```
    ///
    /// A burst of 1 spaces requests strictly, but then any time a waiting request wakes
    /// late is lost: at 1,000 requests/s that cost about 13% of the rate in
    /// `benches/rate.rs`. A burst of about rate / 100 keeps the steady rate exact.
    ///
    /// Replaces an earlier rate setting. Default: no rate limit.
    pub fn rate_limit(mut self, quota: Quota) -> Self {
        self.rate = Some(Rate::Quota(quota));
        self
    }

    /// Takes tokens from this limiter, which others may share: other `FanOut`s (say,
    /// other endpoints of the same API) with a [`RateLimiter`](crate::RateLimiter), or other processes with
    /// a `fanout::redis::RedisRateLimiter`. Together they stay within its quota.
    ///
    /// Any [`RateLimit`] will do. Attempts waiting for governor's [`RateLimiter`](crate::RateLimiter)
    /// queue in front of it, so that only the first of them sleeps on it; any other
    /// limiter is asked by each attempt on its own.
    ///
    /// Replaces an earlier rate setting. Default: no rate limit.
    pub fn rate_limiter<L: RateLimit>(mut self, limiter: Arc<L>) -> Self {
        self.rate = Some(Rate::Shared(Throttle::new(limiter)));
        self
    }

    /// Which failures are retried and how long to wait in between; see
    /// [`RetryPolicy`]. `RetryPolicy::none()` turns retries off.
    ///
    /// Default: `RetryPolicy::default()`: transient failures, up to 3 retries.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Time allowed for one attempt, from connecting until the body has been read.
    /// A retry gets the full time again; see [`deadline`](Self::deadline) for a limit
    /// on an id as a whole.
    ///
    /// Default: 30 seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time allowed for one id across all its attempts and the delays between them,
    /// counted from when its first attempt is sent (waiting for that first attempt's
    /// slot and token does not count; a retry's wait does). When the deadline passes
    /// during an attempt, the attempt is cancelled; when a retry could not start before
    /// it, none is made. Either way the id fails with [`ErrorKind::Timeout`],
    /// [`Error::attempts`] says how many attempts ran, and the previous attempt's
    /// failure, if any, is the error's `source()`.
    ///
    /// Default: none; each attempt is bounded by [`timeout`](Self::timeout) and the
    /// number of attempts by the [`RetryPolicy`].
    pub fn deadline(mut self, limit: Duration) -> Self {
        self.deadline = Some(limit);
        self
    }

    /// Largest response body read, in bytes. A larger (or endless) body fails that id
    /// with [`ErrorKind::TooLarge`]; reading stops at the cap.
    ///
    /// Default: 16 MiB.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// How far [`Batch::in_order`](crate::Batch::in_order) may run ahead of the
    /// slowest unfinished id: at most this many ids are admitted but not yet handed
    /// out. While the head of the line is slow, new ids wait rather than results piling
    /// up. Values below the concurrency limit the in-order stream to fewer requests.
    ///
    /// Default: 4 × the concurrency (its `max` if it adapts).
    pub fn reorder_window(mut self, ids: usize) -> Self {
        self.reorder_window = Some(ids);
        self
    }

    /// Adds a header to every request. Repeating a name sends it more than once.
    ///
    /// Values of `Authorization`, `Proxy-Authorization` and `Cookie` are marked
    /// sensitive, as [`bearer_auth`](Self::bearer_auth)'s is. No header value is
    /// shown in `Debug` output or errors, only header names: a custom header such as
    /// `X-Api-Key` is safe to log the builder with too.
    ///
    /// A redirect to another host would carry any other header along (reqwest drops
    /// only those three there). So once a header other than them or `Accept` is set,
    /// fanout's own client follows a redirect only on the same host name, scheme and
    /// port, or from http to https on the same host name and default ports; for any
    /// other, the id fails with its 3xx status, saying where the redirect led. To follow
    /// them anyway, pass a [`client`](Self::client) of your own, whose redirect policy
    /// applies.
    ///
    /// Default: only `Accept: application/json` (replaced if you set `Accept`).
    pub fn header<V>(mut self, name: impl AsRef<str>, value: V) -> Self
    where
        V: TryInto<HeaderValue>,
        V::Error: fmt::Display,
    {
        let name_text = name.as_ref();
        let name = match HeaderName::from_bytes(name_text.as_bytes()) {
            Ok(name) => name,
            Err(err) => {
                return self.header_failed(format!(
                    "{name_text:?} is not a valid header name ({err}); use letters, digits and `-`"
                ));
            }
        };
        match value.try_into() {
            Ok(mut value) => {
                if [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE].contains(&name) {
                    value.set_sensitive(true);
                }
                self.headers.append(name, value);
                self
            }
            // The value is not echoed: headers often carry secrets.
            Err(err) => self.header_failed(format!(
                "the value of header `{name}` is not valid ({err}); header values are \
                 printable ASCII without control characters or line breaks"
            )),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every request. The header is marked
    /// sensitive, and the token never appears in errors or `Debug` output.
    ///
    /// Default: no authorization.
    pub fn bearer_auth(mut self, token: impl fmt::Display) -> Self {
        match HeaderValue::try_from(format!("Bearer {token}")) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.headers.insert(AUTHORIZATION, value);
                self
            }
            Err(_) => self.header_failed(
                "the bearer token is not a valid header value; it must be printable ASCII \
                 without control characters or line breaks"
                    .to_owned(),
            ),
        }
    }

    /// Appends these query parameters (URL-encoded) to every request, after any query
    /// the template has. Can be called more than once.
    ///
    /// They become part of each request's URL, so they also appear in
    /// [`Error::url`](crate::Error::url), error messages and the `fanout.id` tracing
    /// span. Prefer
    /// [`bearer_auth`](Self::bearer_auth) or [`header`](Self::header) for secrets when
    /// the API accepts them there.
    ///
    /// Default: none.
    pub fn query<K: fmt::Display, V: fmt::Display>(mut self, pairs: &[(K, V)]) -> Self {
        self.query
            .extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Calls `callback` for what happens to each id: an attempt started, a retry
    /// planned, the id succeeded or failed (see [`Event`]). For wiring your own
    /// metrics (Prometheus, StatsD) or logs.
    ///
    /// It runs inline, on the task that polls the requests, so it must be quick and
    /// must not block: increment a counter, send on a channel. A panic in it is caught
    /// and logged (a `warn` event), and changes nothing else. An id whose request
    /// panicked (in `T`'s `Deserialize`, say) gets no `Failed` event. Replaces an
    /// earlier callback.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use fanout::{Event, FanOut};
    ///
    /// let retries = Arc::new(AtomicU64::new(0));
    /// let counted = Arc::clone(&retries);
    /// let api = FanOut::<u64, serde_json::Value>::builder()
    ///     .detail_url("https://api.example.com/items/{id}")
    ///     .on_event(move |event| {
    ///         if let Event::Retrying { .. } = event {
    ///             counted.fetch_add(1, Ordering::Relaxed);
    ///         }
    ///     })
    ///     .build()?;
    /// # Ok::<(), fanout::Error>(())
    /// ```
    ///
    /// Default: none.
    pub fn on_event(mut self, callback: impl Fn(&Event<'_>) + Send + Sync + 'static) -> Self {
        self.on_event = Some(OnEvent::new(callback));
        self
    }

    fn header_failed(mut self, message: String) -> Self {
        self.header_error
            .get_or_insert_with(|| Error::new(ErrorKind::InvalidHeader, message));
        self
    }

    /// Checks every setting and builds the [`FanOut`].
    ///
    /// # Errors
    ///
    /// - [`ErrorKind::InvalidTemplate`]: no `detail_url` was given, or it has no `{id}`,
    ///   an unknown placeholder such as `{name}`, an unbalanced `{` or `}`, is relative
    ///   or not http(s), has no host, carries a user name or password, or puts `{id}`
    ///   outside the path and query.
    /// - [`ErrorKind::InvalidTemplate`] also: a `list_url` that is not an http(s) URL
    ///   with a host, or carries a user name or password.
    /// - [`ErrorKind::InvalidHeader`]: a `header` name or value, or the `bearer_auth`
    ///   token, is not valid HTTP (the first such problem is reported).
    /// - [`ErrorKind::InvalidConfig`]: `concurrency` (a fixed one, or an adaptive one's
    ///   `min`), `per_host_concurrency`, `max_body_bytes`, `reorder_window`,
    ///   `requests_per_second` or `per_host_requests_per_second` is 0, an adaptive
    ///   concurrency's `min` is above its `max`, a concurrency exceeds
    ///   2<sup>60</sup>, `timeout` or `deadline` is zero, the retry policy's
    ///   `max_delay` is shorter than its `initial_delay` (or its `initial_delay` is
    ///   zero and its `max_delay` is not), `max_pages` is 0, `ids_at`, `total_at` or a
    ///   pagination pointer is not a JSON pointer, a pagination parameter name is empty or its
    ///   page size 0, or the default HTTP client cannot be created.
    pub fn build(self) -> Result<FanOut<Id, T>, Error> {
        if let Some(err) = self.header_error {
            return Err(err);
        }
        let list = match &self.list_url {
            None => None,
            Some(url) => Some(self.list_settings(url)?),
        };
        let detail = match self.detail {
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidTemplate,
                    "no detail URL; call .detail_url(\"https://api.example.com/items/{id}\")",
                ));
            }
            Some(Detail::Template(ref template)) => {
                // With a request function the id may travel in the body alone.
                let needs_id = self.request.is_none();
                DetailUrl::Template(UrlTemplate::parse_with(template, &self.query, needs_id)?)
            }
            Some(Detail::Function(make)) => DetailUrl::Function {
                make,
                query: self.query.clone(),
            },
        };

        self.concurrency.validate()?;
        if self.timeout.is_zero() {
            return Err(config(
                "timeout must be longer than zero; it bounds each attempt",
            ));
        }
        if self.deadline.is_some_and(|limit| limit.is_zero()) {
            return Err(config(
                "deadline must be longer than zero; it bounds all attempts of an id",
            ));
        }
        self.retry.validate()?;
        let throttle = match self.rate {
            None => None,
            Some(Rate::PerSecond(rate)) => {
                let Some(rate) = NonZeroU32::new(rate) else {
                    return Err(config(
                        "requests_per_second must be at least 1; leave it unset for no limit",
                    ));
                };
                Some(Throttle::local(Quota::per_second(rate)))
            }
            Some(Rate::Quota(quota)) => Some(Throttle::local(quota)),
            Some(Rate::Shared(throttle)) => Some(throttle),
        };
        if self.max_body_bytes == 0 {
            return Err(config("max_body_bytes must be at least 1"));
        }
        let reorder_window = match self.reorder_window {
            Some(0) => return Err(config("reorder_window must be at least 1")),
            Some(ids) => ids,
            None => self
                .concurrency
                .max()
                .saturating_mul(REORDER_WINDOW_PER_SLOT),
        };

        let mut headers = self.headers;
        if !headers.contains_key(ACCEPT) {
            headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        }
        // A request function's own headers and body are not known here: its requests
        // follow redirects on the same host only, like requests with secret headers.
        let redirects_stay_on_host =
            self.client.is_none() && (redirect::would_leak(&headers) || self.request.is_some());
        let client = match self.client {
            Some(client) => client,
            // A client of our own sends the headers by default: cheaper than copying
            // them into every request, which a caller's client needs.
            None => reqwest::Client::builder()
                // Static: reqwest copies this value into every request (and clones its
                // connector, which holds it, more than once a request); a value made
                // from a `&str` would be a reference count that every one of those
                // copies and the worker threads dropping them contend on.
                .user_agent(HeaderValue::from_static(USER_AGENT))
                .redirect(redirect::policy(redirects_stay_on_host))
                // A Referer would carry the URL, query parameters included, to
                // wherever a redirect leads.
                .referer(false)
                .default_headers(std::mem::take(&mut headers))
                .build()
                .map_err(|err| {
                    config("the default HTTP client could not be created").with_source(err)
                })?,
        };

        if let Some(limit) = self.per_host_concurrency {
            Concurrency::fixed(limit).validate().map_err(|_| {
                config(format!(
                    "per_host_concurrency must be between 1 and {}",
                    tokio::sync::Semaphore::MAX_PERMITS
                ))
            })?;
        }
        let per_host_quota = match self.per_host_rate {
            None => None,
            Some(Rate::PerSecond(rate)) => match NonZeroU32::new(rate) {
                Some(rate) => Some(Quota::per_second(rate)),
                None => {
                    return Err(config(
                        "per_host_requests_per_second must be at least 1; leave it unset \
                         for no limit",
                    ));
                }
            },
            Some(Rate::Quota(quota)) => Some(quota),
            // No setter makes it.
            Some(Rate::Shared(_)) => None,
        };
        let hosts = Hosts::new(detail.origin(), self.per_host_concurrency, per_host_quota);
        Ok(FanOut::from_shared(Arc::new(Shared {
            client,
            detail,
            request: self.request,
            headers,
            timeout: self.timeout,
            deadline: self.deadline,
            retry: self.retry,
            throttle,
            max_body_bytes: self.max_body_bytes,
            concurrency: self.concurrency,
            reorder_window,
            slots: Slots::new(self.concurrency),
            hosts,
            pause_on_retry_after: self.pause_on_retry_after,
            respect_rate_limit_headers: self.respect_rate_limit_headers,
            list,
            dedup_ids: self.dedup_ids,
            redirects_stay_on_host,
            on_event: self.on_event,
        })))
    }

    fn list_settings(&self, url: &str) -> Result<ListSettings, Error> {
        let invalid = |message: String| Error::new(ErrorKind::InvalidTemplate, message);
        // Quoted without any password it may carry.
        let quoted = redact_userinfo(url);
        let parsed = Url::parse(url).map_err(|err| {
            invalid(format!(
                "the list URL {quoted:?} is not a valid URL ({err})"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
            return Err(invalid(format!(
                "the list URL {quoted:?} must be an http or https URL with a host"
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(invalid(
                "the list URL must not carry a user name or password; use bearer_auth or header"
                    .to_owned(),
            ));
        }
        if let Some(at) = self.total_at.as_ref().filter(|at| !at.starts_with('/')) {
            return Err(config(format!(
                "total_at {at:?} must be a JSON pointer starting with `/`"
            )));
        }
        if !self.ids_at.is_empty() && !self.ids_at.starts_with('/') {
            return Err(config(format!(
                "ids_at {:?} must be a JSON pointer: empty, or starting with `/`",
                self.ids_at
            )));
        }
        if let Some(problem) = self.pagination.problem() {
            return Err(config(problem));
        }
        if self.max_pages == 0 {
            return Err(config("max_pages must be at least 1"));
        }
        Ok(ListSettings {
            url: parsed,
            ids_at: self.ids_at.clone(),
            total_at: self.total_at.clone(),
            id_field: self.id_field.clone(),
            pagination: self.pagination.style.clone(),
            max_pages: self.max_pages,
        })
    }
}

/// Where the detail URLs come from, as set.
enum Detail {
    Template(String),
    Function(ErasedUrlFn),
}

impl fmt::Debug for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Without any password it may carry.
            Detail::Template(template) => fmt::Debug::fmt(&redact_userinfo(template), f),
            Detail::Function(_) => f.write_str("<function>"),
        }
    }
}

/// Where the rate limit comes from.
enum Rate {
    PerSecond(u32),
    Quota(Quota),
    Shared(Throttle),
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate} per second"),
            Rate::Quota(quota) => fmt::Debug::fmt(quota, f),
            Rate::Shared(throttle) => write!(f, "shared limiter: {throttle:?}"),
        }
    }
}

fn config(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidConfig, message)
}

impl<Id, T> fmt::Debug for FanOutBuilder<Id, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOutBuilder")
            .field("detail_url", &self.detail)
            .field("request_with", &self.request)
            .field("list_url", &self.list_url)
            .field("pagination", &self.pagination)
            .field("concurrency", &self.concurrency)
            .field("rate", &self.rate)
            .field("pause_on_retry_after", &self.pause_on_retry_after)
            .field(
                "respect_rate_limit_headers",
                &self.respect_rate_limit_headers,
            )
            .field("per_host_concurrency", &self.per_host_concurrency)
            .field("per_host_rate", &self.per_host_rate)
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("reorder_window", &self.reorder_window)
            // Names only: any header may carry a secret.
            .field("headers", &HeaderNames(&self.headers))
            .field("query", &self.query.len())
            .field("on_event", &self.on_event.is_some())
            .finish_non_exhaustive()
    }
}

/// A header map's names, for `Debug` output that shows no value.
struct HeaderNames<'a>(&'a HeaderMap);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}
