//! `FanOut`: the configured client that turns ids into batches of requests.

use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;

use crate::batch::Batch;
use crate::builder::FanOutBuilder;
use crate::dedup::Seen;
use crate::detail::{DetailUrl, ErasedRequestFn};
use crate::error::Error;
use crate::event::OnEvent;
use crate::limit::{Concurrency, Hosts, Slots};
use crate::list::{ListSettings, Lister, listed_ids};
use crate::rate::BoxError;
use crate::rate::Throttle;
use crate::retry::RetryPolicy;

/// Fetches one JSON record per id from a detail endpoint, many at a time.
///
/// Build one with [`FanOut::builder`], then call [`fan_out`](FanOut::fan_out) with the
/// ids and pick how to receive the results from the returned [`Batch`].
///
/// `FanOut` is cheap to clone (an `Arc` inside). Clones, and the batches they run at the
/// same time, share one concurrency limit and one rate limit: the limits belong to the
/// API being called, not to one call.
///
/// `Id` is anything with a `Display` form to put in the URL (numbers, strings, your own
/// types); `T` is what each response body is decoded into.
pub struct FanOut<Id, T> {
    shared: Arc<Shared>,
    _types: PhantomData<fn(Id) -> T>,
}

/// The settings and state that every request of every batch reads.
pub(crate) struct Shared {
    pub(crate) client: reqwest::Client,
    pub(crate) detail: DetailUrl,
    /// Makes each id's request, when set with `request_with`; a GET of its URL otherwise.
    pub(crate) request: Option<ErasedRequestFn>,
    /// Headers for every request that the client does not send by default.
    pub(crate) headers: HeaderMap,
    /// Per attempt.
    pub(crate) timeout: Duration,
    /// Per id, across its attempts.
    pub(crate) deadline: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    /// Shared by all batches and clones; the limiter inside may be shared further.
    pub(crate) throttle: Option<Throttle>,
    pub(crate) max_body_bytes: usize,
    pub(crate) concurrency: Concurrency,
    pub(crate) reorder_window: usize,
    /// One permit per request on the wire, shared by all batches and clones.
    pub(crate) slots: Slots,
    /// Per origin: pauses its server asked for, and its own limits if set; shared by
    /// all batches and clones.
    pub(crate) hosts: Hosts,
    /// A 429 or 503 with `Retry-After` pauses every request to its origin.
    pub(crate) pause_on_retry_after: bool,
    /// Rate-limit headers spread out or hold back requests as the quota runs out.
    pub(crate) respect_rate_limit_headers: bool,
    pub(crate) list: Option<ListSettings>,
    /// Drop ids seen before in the same batch or listing.
    pub(crate) dedup_ids: bool,
    /// The client is fanout's own and does not follow redirects to another host,
    /// because a header set with `header()` would go along.
    pub(crate) redirects_stay_on_host: bool,
    /// The callback set with `on_event`, if any.
    pub(crate) on_event: Option<OnEvent>,
}

impl<Id, T> FanOut<Id, T> {
    /// Starts configuring a `FanOut`. See [`FanOutBuilder`] for the settings.
    pub fn builder() -> FanOutBuilder<Id, T> {
        FanOutBuilder::new()
    }

    /// The settings every batch reads.
    #[cfg(any(test, feature = "redis"))]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        FanOut {
            shared,
            _types: PhantomData,
        }
    }
}

impl<Id, T> FanOut<Id, T>
where
    Id: fmt::Display + Clone + Send + Sync + 'static,
    T: DeserializeOwned + Send + 'static,
{
    /// Prepares one request per id. Nothing is sent until the returned [`Batch`] is
    /// consumed, and `ids` is pulled only as slots free up: a million ids never become a
    /// million pending requests, so memory stays proportional to the concurrency.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), fanout::Error> {
    /// # #[derive(serde::Deserialize)] struct Player;
    /// let players = fanout::FanOut::<u32, Player>::builder()
    ///     .detail_url("https://api.example.com/players/{id}")
    ///     .build()?;
    /// let all: Vec<Player> = players.fan_out(1..=10_000).try_collect_ordered().await?;
    /// # Ok(()) }
    /// ```
    pub fn fan_out<I>(&self, ids: I) -> Batch<Id, T>
    where
        I: IntoIterator<Item = Id>,
        I::IntoIter: Send + 'static,
    {
        let ids = futures::stream::iter(ids).map(Ok);
        Batch::new(Arc::clone(&self.shared), ids.boxed())
    }

    /// Like [`fan_out`](FanOut::fan_out), with ids from an async source: a database
    /// cursor, lines of a file, a channel. The stream is polled only as slots free up,
    /// so it is never drained into memory: at most 4 × `concurrency` ids are taken and
    /// unfinished at any time, and no more than `concurrency` unless some are waiting
    /// to retry.
    ///
    /// ```no_run
    /// use futures::{Stream, StreamExt};
    /// use tokio::io::AsyncBufReadExt;
    /// # async fn run(players: fanout::FanOut<String, serde_json::Value>) -> std::io::Result<()> {
    /// let file = tokio::io::BufReader::new(tokio::fs::File::open("ids.txt").await?);
    /// // One id per line, read as the fan-out asks for more.
    /// let ids = futures::stream::unfold(file.lines(), |mut lines| async move {
    ///     let line = lines.next_line().await.ok().flatten()?;
    ///     Some((line, lines))
    /// });
    /// let mut done = players.fan_out_stream(ids).as_completed();
    /// while let Some((id, result)) = done.next().await {
    ///     // write the result somewhere
    /// }
    /// # Ok(()) }
    /// ```
    pub fn fan_out_stream<S>(&self, ids: S) -> Batch<Id, T>
    where
        S: Stream<Item = Id> + Send + 'static,
    {
        Batch::new(Arc::clone(&self.shared), ids.map(Ok).boxed())
    }

    /// Like [`fan_out_stream`](FanOut::fan_out_stream), from a source that can fail: a
    /// file that cannot be read to the end, a database cursor that loses its
    /// connection, the listed ids of [`list_ids_stream`](FanOut::list_ids_stream)
    /// after a filter. The first `Err` ends the input: every id before it still gets
    /// its outcome, and then the batch reports the error as
    /// [`fan_out_listed`](FanOut::fan_out_listed) reports a list's (an extra `Err` at the
    /// end of [`collect_ordered`](Batch::collect_ordered), the last item of the `try_`
    /// streams).
    ///
    /// A [`fanout::Error`](Error) from the source is kept as it is; any other error
    /// becomes one of kind [`ErrorKind::Input`](crate::ErrorKind::Input), with the
    /// original as its source.
    ///
    /// ```no_run
    /// use futures::{StreamExt, TryStreamExt};
    /// # async fn run(players: fanout::FanOut<u64, serde_json::Value>, done: std::collections::HashSet<u64>) -> Result<(), fanout::Error> {
    /// // The listed ids, less those fetched by an earlier run.
    /// let ids = players.list_ids_stream().try_filter(move |id| futures::future::ready(!done.contains(id)));
    /// let mut outcomes = players.fan_out_try_stream(ids).try_as_completed();
    /// while let Some((id, result)) = outcomes.try_next().await? {
    ///     // ...
    /// }
    /// # Ok(()) }
    /// ```
    pub fn fan_out_try_stream<S, E>(&self, ids: S) -> Batch<Id, T>
    where
        S: Stream<Item = Result<Id, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let ids = ids.map(|id| id.map_err(Error::from_source));
        Batch::new(Arc::clone(&self.shared), ids.boxed())
    }
}

impl<Id, T> FanOut<Id, T>
where
    Id: DeserializeOwned + fmt::Display + Clone + Send + Sync + 'static,
    T: DeserializeOwned + Send + 'static,
{
    /// The list endpoint's ids as a stream, page by page, fetched as the stream is
    /// polled: for filtering or mapping them before
    /// [`fan_out_try_stream`](FanOut::fan_out_try_stream). A failure ends the stream
    /// with its error (see [`list_ids`](FanOut::list_ids) for which). Repeats are
    /// kept: a batch drops them if [`dedup_ids`](FanOutBuilder::dedup_ids) is set.
    pub fn list_ids_stream(&self) -> impl Stream<Item = Result<Id, Error>> + Send + 'static {
        listed_ids::<Id>(Arc::clone(&self.shared), Arc::default())
    }

    /// Fetches the list endpoint's pages as the fan-out needs more ids, and each
    /// listed id's record: details start as soon as the first page has arrived, and a
    /// page is fetched only when the ids of the one before have been admitted, so
    /// memory stays flat however long the list.
    ///
    /// If listing fails part-way (a page that cannot be fetched or read, a pagination
    /// loop), every id listed before still gets its outcome, and then:
    /// [`collect_ordered`](Batch::collect_ordered) ends with one extra `Err` (the list's
    /// error), [`try_collect_ordered`](Batch::try_collect_ordered) returns it, and
    /// [`try_as_completed`](Batch::try_as_completed) and
    /// [`try_in_order`](Batch::try_in_order) end with it as an `Err` item. The plain
    /// [`as_completed`](Batch::as_completed) and [`in_order`](Batch::in_order) streams,
    /// whose items each belong to an id, end without it: use their `try_` forms here.
    ///
    /// ```no_run
    /// use futures::TryStreamExt;
    /// # async fn run() -> Result<(), fanout::Error> {
    /// # #[derive(serde::Deserialize)] struct Video;
    /// let videos = fanout::FanOut::<String, Video>::builder()
    ///     .list_url("https://api.example.com/videos/?n=100")
    ///     .detail_url("https://api.example.com/videos/{id}")
    ///     .paginate(fanout::Pagination::link_header())
    ///     .build()?;
    /// let mut done = videos.fan_out_listed().try_as_completed();
    /// while let Some((id, result)) = done.try_next().await? {
    ///     // ...
    /// }
    /// # Ok(()) }
    /// ```
    pub fn fan_out_listed(&self) -> Batch<Id, T> {
        let total = Arc::new(OnceLock::new());
        let pages = listed_ids::<Id>(Arc::clone(&self.shared), Arc::clone(&total));
        Batch::with_total(Arc::clone(&self.shared), pages, total)
    }

    /// Every id the list endpoint ([`FanOutBuilder::list_url`]) gives, following its
    /// [`Pagination`](crate::Pagination) to the last page. Pages are fetched one after
    /// another through the same client, headers, concurrency limit, rate limit and
    /// retry policy as the detail requests; redirects are followed.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), fanout::Error> {
    /// # #[derive(serde::Deserialize)] struct Video;
    /// let videos = fanout::FanOut::<String, Video>::builder()
    ///     .list_url("https://api.example.com/videos/?n=100") // ["student", "draw", ...]
    ///     .detail_url("https://api.example.com/videos/{id}")
    ///     .build()?;
    /// let ids = videos.list_ids().await?;
    /// let all = videos.fan_out(ids).collect_ordered().await;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) without a list
    /// URL; the page's [`Error`] when a page cannot be fetched (after retries) or its
    /// body is not the expected shape ([`ErrorKind::Decode`](crate::ErrorKind::Decode),
    /// naming the URL, the pointer and what was found there);
    /// [`ErrorKind::Pagination`](crate::ErrorKind::Pagination) for a pagination loop or
    /// more pages than `max_pages`.
    pub async fn list_ids(&self) -> Result<Vec<Id>, Error> {
        let mut lister = Lister::<Id>::new(Arc::clone(&self.shared))?;
        let mut seen = self.shared.dedup_ids.then(Seen::default);
        let mut ids = Vec::new();
        while let Some(page) = lister.next_page().await {
            let page = page?;
            match &mut seen {
                Some(seen) => ids.extend(page.into_iter().filter(|id| seen.first_time(id))),
                None => ids.extend(page),
            }
        }
        Ok(ids)
    }
}

impl<Id, T> Clone for FanOut<Id, T> {
    fn clone(&self) -> Self {
        FanOut::from_shared(Arc::clone(&self.shared))
    }
}

impl<Id, T> fmt::Debug for FanOut<Id, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FanOut")
            .field("detail_url", &self.shared.detail)
            .field("concurrency", &self.shared.concurrency)
            .field("timeout", &self.shared.timeout)
            .field("deadline", &self.shared.deadline)
            .field("retry", &self.shared.retry)
            .field("rate_limited", &self.shared.throttle.is_some())
            .field("max_body_bytes", &self.shared.max_body_bytes)
            .finish_non_exhaustive()
    }
}
