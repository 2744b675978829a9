//! `Batch`: one fan-out, waiting to be consumed in the shape the caller wants.

mod completed;
mod driven;
mod engine;
mod fallible;
mod ordered;
mod reorder;
mod sleepers;

use std::fmt;
use std::sync::{Arc, OnceLock};

use futures::stream::BoxStream;
use serde::de::DeserializeOwned;

pub use self::completed::AsCompleted;
pub(crate) use self::engine::join_failure;
pub use self::fallible::{TryAsCompleted, TryInOrder};
pub use self::ordered::InOrder;
pub(crate) use self::sleepers::Sleepers;

use self::engine::Core;
use crate::error::Error;
use crate::fanout::Shared;
use crate::progress::Progress;
use crate::stats::RunStats;

/// The requests for one set of ids, made by [`FanOut::fan_out`](crate::FanOut::fan_out).
///
/// A batch is lazy: nothing is sent until it is consumed by one of its four outputs.
/// All four run the same engine (at most `concurrency` requests on the wire, ids pulled
/// only as slots free up; the streams' requests keep going while the consumer is busy
/// elsewhere, driven by a background task until it is back) and give every id exactly
/// one outcome. Dropping the batch, the stream made
/// from it, or the future of a collecting output cancels the requests still running.
///
/// | output | order | memory | on failure |
/// |---|---|---|---|
/// | [`collect_ordered`](Batch::collect_ordered) | input | all results | kept in place |
/// | [`try_collect_ordered`](Batch::try_collect_ordered) | input | all values | first error cancels the rest |
/// | [`as_completed`](Batch::as_completed) | completion | in-flight only | yielded as an item |
/// | [`in_order`](Batch::in_order) | input | bounded window | yielded as an item |
///
/// Batches must be consumed inside a Tokio runtime; elsewhere every id fails with
/// [`ErrorKind::Runtime`](crate::ErrorKind::Runtime). A batch belongs to the runtime
/// it is first polled in (its streams' background task and its requests' timers live
/// there): consume it there to the end, rather than moving it to another runtime.
#[must_use = "a batch sends nothing until it is consumed"]
pub struct Batch<Id, T> {
    core: Core<Id, T>,
}

impl<Id, T> Batch<Id, T>
where
    Id: fmt::Display + Send + 'static,
    T: DeserializeOwned + Send + 'static,
{
    pub(crate) fn new(shared: Arc<Shared>, ids: BoxStream<'static, Result<Id, Error>>) -> Self {
        Self::with_total(shared, ids, Arc::default())
    }

    /// A batch whose number of ids whoever holds `total` may learn as it goes.
    pub(crate) fn with_total(
        shared: Arc<Shared>,
        ids: BoxStream<'static, Result<Id, Error>>,
        total: Arc<OnceLock<u64>>,
    ) -> Self {
        Batch {
            core: Core::new(shared, ids, total),
        }
    }

    /// Admits every id, repeats too, whatever the `FanOut`'s `dedup_ids` says.
    #[cfg(feature = "redis")]
    pub(crate) fn keep_repeats(mut self) -> Self {
        self.core.keep_repeats();
        self
    }

    /// A handle on this batch's progress, to read from another task while it runs:
    /// ids admitted, succeeded and failed, retries, requests in flight, and more (see
    /// [`Snapshot`](crate::Snapshot)). Take it before consuming the batch; it stays
    /// readable after.
    pub fn progress(&self) -> Progress {
        Progress::new(Arc::clone(self.core.scope()))
    }

    /// One result per id, in input order, failures included: the equivalent of
    /// `asyncio.gather(..., return_exceptions=True)`.
    ///
    /// ```no_run
    /// # async fn run(players: fanout::FanOut<u32, serde_json::Value>) {
    /// let results = players.fan_out(1..=1000).collect_ordered().await;
    /// let failed = results.iter().filter(|r| r.is_err()).count();
    /// println!("{} ok, {failed} failed", results.len() - failed);
    /// # }
    /// ```
    pub async fn collect_ordered(self) -> Vec<Result<T, Error>> {
        ordered::collect_ordered(self.core).await
    }

    /// [`collect_ordered`](Batch::collect_ordered), and the run's [`RunStats`] once
    /// every id has its outcome.
    ///
    /// ```no_run
    /// # async fn run(players: fanout::FanOut<u32, serde_json::Value>) {
    /// let (results, stats) = players.fan_out(1..=1000).collect_ordered_with_stats().await;
    /// eprintln!("{stats}");
    /// # }
    /// ```
    pub async fn collect_ordered_with_stats(self) -> (Vec<Result<T, Error>>, RunStats) {
        let progress = self.progress();
        let results = self.collect_ordered().await;
        (results, progress.stats())
    }

    /// Every value in input order, or the first error to happen (in time, not in input
    /// order). That error cancels every request still running, unlike
    /// `asyncio.gather`, which leaves them going.
    ///
    /// # Errors
    ///
    /// The first failing id's [`Error`], which names the id.
    pub async fn try_collect_ordered(self) -> Result<Vec<T>, Error> {
        ordered::try_collect_ordered(self.core).await
    }

    /// A stream of `(id, result)` as each request finishes: the equivalent of
    /// `asyncio.as_completed`, with the id attached and memory bounded by the
    /// concurrency.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// # async fn run(players: fanout::FanOut<u32, serde_json::Value>) {
    /// let mut done = players.fan_out(1..=1000).as_completed();
    /// while let Some((id, result)) = done.next().await {
    ///     match result {
    ///         Ok(player) => println!("{id}: {player}"),
    ///         Err(err) => eprintln!("{err}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn as_completed(self) -> AsCompleted<Id, T> {
        AsCompleted::new(self.core)
    }

    /// A stream of `(id, result)` in input order, with bounded memory: at most
    /// [`reorder_window`](crate::FanOutBuilder::reorder_window) results wait for a slow
    /// head of the line. Suits writing results to an ordered sink as they arrive.
    pub fn in_order(self) -> InOrder<Id, T> {
        InOrder::new(self.core)
    }

    /// [`as_completed`](Batch::as_completed) for a batch whose ids come from a source
    /// that can fail: [`FanOut::fan_out_listed`](crate::FanOut::fan_out_listed). Each
    /// outcome comes as `Ok((id, result))`; if listing failed, one `Err` with the list's
    /// error follows the outcomes of every id listed before the failure.
    /// (`as_completed` itself has no room for an error that belongs to no id.)
    ///
    /// ```no_run
    /// use futures::TryStreamExt;
    /// # async fn run(videos: fanout::FanOut<String, serde_json::Value>) -> Result<(), fanout::Error> {
    /// let mut done = videos.fan_out_listed().try_as_completed();
    /// while let Some((id, result)) = done.try_next().await? {
    ///     // one outcome per listed id
    /// }
    /// # Ok(()) }
    /// ```
    pub fn try_as_completed(self) -> TryAsCompleted<Id, T> {
        TryAsCompleted::new(self.as_completed())
    }

    /// [`in_order`](Batch::in_order) for a batch whose ids come from a source that can
    /// fail, like [`try_as_completed`](Batch::try_as_completed).
    pub fn try_in_order(self) -> TryInOrder<Id, T> {
        TryInOrder::new(self.in_order())
    }
}

impl<Id, T> fmt::Debug for Batch<Id, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}
