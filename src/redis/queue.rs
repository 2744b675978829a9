//! A crash-safe queue of ids on a Redis stream, read by any number of workers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::streams::{
    StreamId, StreamPendingReply, StreamRangeReply, StreamReadOptions, StreamReadReply,
};
use ::redis::{AsyncCommands, Client, RedisError, Script};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::FanOut;
use crate::error::{Error, ErrorKind};
use crate::rate::BoxError;

/// The field of a stream entry that holds the id.
const ID_FIELD: &str = "id";

/// How many ids one round trip pushes.
const PUSH_CHUNK: usize = 1_000;

/// How many finished entries the acker takes in at a time, at most.
const ACK_CHUNK: usize = 256;

/// Acknowledges one entry, and only if that took it off the pending list (nobody
/// acknowledged it before) adds it to the dead-letter stream: an id that two workers
/// both finished is dead-lettered once.
///
/// KEYS: the stream, the dead-letter stream. ARGV: the group, the entry, then the
/// dead letter's field/value pairs.
const DEAD_LETTER: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
";

/// Takes over entries idle past the visibility timeout (`XAUTOCLAIM`), and gives up
/// on those delivered more than `max_deliveries` times: they are acknowledged and
/// dead-lettered (kind `TooManyDeliveries`) in the same step, so an id that brings
/// down every worker that takes it is not reclaimed for ever.
///
/// KEYS: the stream, the dead-letter stream. ARGV: the group, the consumer, the
/// visibility timeout in ms, the cursor, the count, `max_deliveries`. Answers the next
/// cursor, the entries kept (as `XAUTOCLAIM` gives them) and how many were given up.
const RECLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local limit = tonumber(ARGV[6])
local kept = {}
local given_up = 0
for _, e in ipairs(r[2]) do
  if e then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local delivered = p[1] and p[1][4] or 0
    if delivered > limit then
      local id = ''
      for i = 1, #e[2], 2 do
        if e[2][i] == 'id' then id = e[2][i + 1] end
      end
      if redis.call('XACK', KEYS[1], ARGV[1], e[1]) == 1 then
        redis.call('XADD', KEYS[2], '*', 'id', id, 'queued_as', e[1],
          'kind', 'TooManyDeliveries', 'status', '', 'attempts', 0,
          'error', 'delivered ' .. delivered .. ' times and never acknowledged: ' ..
            'every worker that took it stopped before it was done')
        given_up = given_up + 1
      end
    else
      kept[#kept + 1] = e
    end
  end
end
return {r[1], kept, given_up}
";

/// Removes a consumer from the group, but only if nothing is pending on it (which
/// `XGROUP DELCONSUMER` would drop for good).
///
/// KEYS: the stream. ARGV: the group, the consumer.
const LEAVE: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
";

/// Keeps this worker's entries from being reclaimed: resets the idle time of those
/// still pending on it (an entry another worker has taken over meanwhile is left
/// alone).
///
/// KEYS: the stream. ARGV: the group, the consumer, then the entries.
const HEARTBEAT: &str = r"
local mine = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then mine[#mine + 1] = ARGV[i] end
end
local n = #mine
if n > 0 then
  mine[n + 1] = 'JUSTID'
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(mine))
end
return n
";

/// How many entries one heartbeat call touches at most (Lua's `unpack` has a limit).
const HEARTBEAT_CHUNK: usize = 1_000;

/// The bounds of the builder's durations and batch: Redis takes milliseconds as
/// 64-bit integers, and a batch is held in memory.
const MIN_VISIBILITY: Duration = Duration::from_millis(3);
const MAX_VISIBILITY: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_POLL: Duration = Duration::from_secs(3600);
const MAX_READ_BATCH: usize = 100_000;

/// How many deliveries an id gets before it is given up, unless set.
const DEFAULT_MAX_DELIVERIES: u32 = 10;

/// How often a worker with nothing left to read looks whether the others are done.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// A queue of ids on a Redis stream, which any number of workers, in any number of
/// processes, work through together; a worker that dies loses nothing.
///
/// - A producer [`push`](Self::push)es ids (from [`FanOut::list_ids`], a file,
///   anything) and [`close`](Self::close)s the queue when there are no more.
/// - Each worker calls [`work`](Self::work) with its [`FanOut`] and a sink. It reads
///   ids with `XREADGROUP` (a consumer group: each id goes to one worker), feeds them
///   to [`FanOut::fan_out_stream`], hands each outcome to the sink, and only then
///   acknowledges the id (`XACK`).
/// - An id that ends in failure (after its last retry) also goes to the dead-letter
///   stream, with its error.
/// - Ids still pending on a worker that has not been heard of for the visibility
///   timeout (it crashed, or was killed) are reclaimed with `XAUTOCLAIM` by the
///   workers still running. A running worker keeps its ids from being reclaimed
///   however long they take, by resetting their idle time every third of the timeout.
/// - [`work`](Self::work) returns once the queue is closed and every id in it has been
///   acknowledged.
///
/// # At least once
///
/// Delivery is at least once: a worker that dies after the sink took an outcome but
/// before the acknowledgement reached Redis leaves that id pending, and another worker
/// fetches it again. Make the sink idempotent, keyed by the id (an upsert, a `UNIQUE`
/// column, a set). Dead letters are written exactly once per id entry: the
/// acknowledgement and the dead letter are one atomic script.
///
/// ```no_run
/// use fanout::FanOut;
/// use fanout::redis::RedisIdQueue;
///
/// # #[derive(serde::Deserialize)] struct Player;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = fanout::redis::redis::Client::open("redis://127.0.0.1/")?;
/// let queue = RedisIdQueue::builder(client, "players").build().await?;
///
/// // The producer, once:
/// queue.push(1..=100_000_u64).await?;
/// queue.close().await?;
///
/// // Each worker:
/// let players = FanOut::<u64, Player>::builder()
///     .detail_url("https://api.example.com/players/{id}")
///     .build()?;
/// let report = queue
///     .work(&players, |id, result| async move {
///         // Store `result` under `id`, idempotently.
///         Ok::<(), std::io::Error>(())
///     })
///     .await?;
/// println!("{} stored, {} dead-lettered", report.succeeded, report.dead_lettered);
/// # Ok(()) }
/// ```
///
/// Ids are stored as their `Display` text in the entry's `id` field and parsed back
/// with `FromStr`, so `redis-cli XADD players '*' id 42` queues an id too. An entry
/// whose id cannot be parsed goes to the dead-letter stream.
pub struct RedisIdQueue {
    keys: Arc<Keys>,
    client: Client,
    connection: ConnectionManager,
    visibility: Duration,
    poll: Duration,
    read_batch: Option<usize>,
    max_deliveries: u32,
}

/// The names the queue lives under.
struct Keys {
    stream: String,
    group: String,
    dead: String,
    closed: String,
    consumer_prefix: String,
}

/// What one call of [`RedisIdQueue::work`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkReport {
    /// Ids whose successful outcome the sink took, and which were acknowledged.
    pub succeeded: u64,
    /// Ids whose failure the sink took, and which went to the dead-letter stream.
    pub dead_lettered: u64,
    /// Entries whose id could not be parsed; they went to the dead-letter stream
    /// without reaching the sink.
    pub unreadable: u64,
    /// Entries taken over from workers that were not heard of within the visibility
    /// timeout.
    pub reclaimed: u64,
    /// Entries given up after `max_deliveries`: dead-lettered without reaching the
    /// sink.
    pub too_many_deliveries: u64,
}

/// One entry of the dead-letter stream: an id that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The dead letter's own entry id in the dead-letter stream.
    pub entry: String,
    /// The id: as the worker wrote it (its `Display`), or for an entry that could not
    /// be parsed, as it was queued.
    pub id: String,
    /// The id's entry in the queue's stream.
    pub queued_as: String,
    /// The [`ErrorKind`], by name (`"Status"`, `"Timeout"`, ...), or
    /// `"TooManyDeliveries"` for an id given up after
    /// [`max_deliveries`](RedisIdQueueBuilder::max_deliveries).
    pub kind: String,
    /// The HTTP status of the last answer, if the failure was one.
    pub status: Option<u16>,
    /// How many attempts were made.
    pub attempts: u32,
    /// The error's message.
    pub error: String,
}

impl RedisIdQueue {
    /// Starts a queue on the stream `name` on the Redis server `client` points at.
    pub fn builder(client: Client, name: impl Into<String>) -> RedisIdQueueBuilder {
        RedisIdQueueBuilder {
            client,
            name: name.into(),
            group: "fanout".to_owned(),
            dead: None,
            consumer_prefix: "worker".to_owned(),
            visibility: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            read_batch: None,
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }

    /// The stream that holds the ids.
    pub fn stream(&self) -> &str {
        &self.keys.stream
    }

    /// The stream that holds the ids that failed.
    pub fn dead_letter_stream(&self) -> &str {
        &self.keys.dead
    }

    /// Adds ids to the queue, a thousand to a round trip; returns how many.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails. The ids of earlier round trips are queued,
    /// and some of the failed round trip's may be.
    pub async fn push<I>(&self, ids: I) -> Result<u64, Error>
    where
        I: IntoIterator,
        I::Item: fmt::Display,
    {
        self.push_stream(futures::stream::iter(ids)).await
    }

    /// Adds the ids of a stream to the queue (say, pages of a list endpoint as they
    /// arrive), a thousand to a round trip; returns how many.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails. The ids of earlier round trips are queued,
    /// and some of the failed round trip's may be.
    pub async fn push_stream<S>(&self, ids: S) -> Result<u64, Error>
    where
        S: Stream,
        S::Item: fmt::Display,
    {
        let mut connection = self.connection.clone();
        let mut chunks = std::pin::pin!(ids.ready_chunks(PUSH_CHUNK));
        let mut pushed = 0_u64;
        while let Some(chunk) = chunks.next().await {
            let mut pipe = ::redis::pipe();
            for id in &chunk {
                pipe.xadd(&self.keys.stream, "*", &[(ID_FIELD, id.to_string())])
                    .ignore();
            }
            pipe.query_async::<()>(&mut connection)
                .await
                .map_err(|err| queue_error("pushing ids failed", err))?;
            pushed += chunk.len() as u64;
        }
        Ok(pushed)
    }

    /// Marks the queue as complete: workers return from [`work`](Self::work) once
    /// every id in it has been acknowledged. Call it after the last
    /// [`push`](Self::push) has returned.
    ///
    /// The mark stays until [`reopen`](Self::reopen) or [`delete`](Self::delete): a
    /// worker started on a closed queue returns as soon as it is empty, so a second job
    /// on the same queue must reopen it before its workers start (or use a queue name
    /// of its own).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails.
    pub async fn close(&self) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        connection
            .set::<_, _, ()>(&self.keys.closed, 1)
            .await
            .map_err(|err| queue_error("closing the queue failed", err))
    }

    /// Takes the closed mark away: workers started after it wait for ids until the
    /// next [`close`](Self::close). (Workers that saw the mark still return once the
    /// queue is empty.)
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails.
    pub async fn reopen(&self) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        connection
            .del::<_, ()>(&self.keys.closed)
            .await
            .map_err(|err| queue_error("reopening the queue failed", err))
    }

    /// Deletes the queue: its stream, its dead letters and its closed mark. The next
    /// [`RedisIdQueueBuilder::build`] starts it afresh.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails.
    pub async fn delete(self) -> Result<(), Error> {
        let mut connection = self.connection.clone();
        let keys = [&self.keys.stream, &self.keys.dead, &self.keys.closed];
        connection
            .del::<_, ()>(&keys)
            .await
            .map_err(|err| queue_error("deleting the queue failed", err))
    }

    /// The first `count` entries of the dead-letter stream, oldest first.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Queue`] if Redis fails.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<DeadLetter>, Error> {
        let mut connection = self.connection.clone();
        let reply: StreamRangeReply = connection
            .xrange_count(&self.keys.dead, "-", "+", count.min(i64::MAX as usize))
            .await
            .map_err(|err| queue_error("reading the dead letters failed", err))?;
        Ok(reply.ids.into_iter().map(DeadLetter::from_entry).collect())
    }

    /// Works through the queue with `fanout` until it is closed and every id in it has
    /// been acknowledged, handing each id's outcome to `sink`.
    ///
    /// Each call is one worker, with a consumer name of its own. Run it in as many
    /// tasks and processes as the job needs; see `docs/fleet.md`. An id is
    /// acknowledged only once `sink` has returned `Ok` for its outcome; a failure is
    /// also written to the dead-letter stream. Dropping the future stops the worker:
    /// its pending ids are reclaimed by other workers after the visibility timeout.
    ///
    /// # Errors
    ///
    /// - [`ErrorKind::Sink`] when `sink` returns an error. The worker stops there; that
    ///   id and the others it held are not acknowledged, and will be delivered again.
    /// - [`ErrorKind::Queue`] when Redis fails for longer than half the visibility
    ///   timeout (at least a second; shorter outages are waited out). Outcomes that
    ///   reached the sink before are kept; unacknowledged ids will be delivered again.
    /// - [`ErrorKind::RateLimiter`] when an id ran out of retries waiting for a shared
    ///   rate limiter that could not be reached (its last attempt was not sent). The
    ///   worker stops rather than dead-letter the queue while the limiter is down, and
    ///   the id comes again. So does [`ErrorKind::Runtime`], for an id whose runtime
    ///   shut down.
    /// - [`ErrorKind::Runtime`] outside a Tokio runtime.
    ///
    /// A sink that never returns keeps its worker's ids for ever (the worker keeps
    /// refreshing them), and other workers wait for them: bound the sink's time
    /// yourself, say with `tokio::time::timeout`.
    ///
    /// The outcomes the sink took before the worker stopped are acknowledged first.
    pub async fn work<Id, T, S, Fut, E>(
        &self,
        fanout: &FanOut<Id, T>,
        mut sink: S,
    ) -> Result<WorkReport, Error>
    where
        Id: FromStr + fmt::Display + Clone + Send + Sync + 'static,
        Id::Err: fmt::Display,
        T: DeserializeOwned + Send + 'static,
        S: FnMut(Id, Result<T, Error>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<BoxError>,
    {
        super::in_runtime()?;
        let consumer = format!(
            "{}-{}-{:08x}",
            self.keys.consumer_prefix,
            std::process::id(),
            fastrand::u32(..)
        );
        let held = Arc::new(Mutex::new(Held::default()));
        // Blocking reads get a connection of their own: on the shared one they would
        // hold up every acknowledgement behind them.
        let reads = ConnectionManager::new_with_config(
            self.client.clone(),
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(self.poll.saturating_add(Duration::from_secs(5))))
                .set_connection_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .map_err(|err| queue_error("connecting to Redis failed", err))?;
        let reader = Reader {
            connection: reads,
            keys: Arc::clone(&self.keys),
            consumer: consumer.clone(),
            visibility_ms: millis(self.visibility),
            poll_ms: millis(self.poll),
            batch: self
                .read_batch
                .unwrap_or_else(|| fanout.shared().concurrency.max().clamp(16, 1_000)),
            cursor: "0-0".to_owned(),
            closed: false,
            next_reclaim: Instant::now(),
            reclaim_every: (self.visibility / 4).min(self.poll),
            patience: Patience::new(self.visibility),
            reclaim: Script::new(RECLAIM),
            max_deliveries: self.max_deliveries,
            buffer: VecDeque::new(),
            held: Arc::clone(&held),
            counts: Counts::default(),
            _id: std::marker::PhantomData,
        };
        let _heartbeat = Heartbeat::start(
            self.connection.clone(),
            Arc::clone(&self.keys),
            consumer.clone(),
            Arc::clone(&held),
            self.visibility / 3,
        );
        // The reader reads ahead in a task of its own, up to a batch ahead of the
        // fan-out, so that no request waits for a read.
        let (sender, receiver) = tokio::sync::mpsc::channel(reader.batch);
        let mut reading = AbortOnDrop(tokio::spawn(reader.run(sender)));
        let ids = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|id| (id, receiver))
        });
        // Every entry needs its outcome, repeats of an id too: `dedup_ids` would leave
        // a repeat pending for ever.
        let mut done = fanout.fan_out_stream(ids).keep_repeats().as_completed();
        // Acknowledgements go out from a task of their own, as many in a round trip as
        // came in during the last one, so that no outcome waits for Redis.
        let acker = Acker::start(
            self.connection.clone(),
            Arc::clone(&self.keys),
            Arc::clone(&held),
            Patience::new(self.visibility),
        );
        let mut report = WorkReport::default();
        let mut refused = None;
        // Whether every id was read and has its outcome (rather than a stop).
        let mut drained = false;
        loop {
            let Some((id, result)) = done.next().await else {
                drained = true;
                break;
            };
            let text = id.to_string();
            // A shared rate limiter that stayed out of reach through every retry, or a
            // runtime shutting down, is not the id's failure: the worker stops and
            // leaves the id to come again, rather than dead-letter the queue while the
            // trouble lasts.
            if let Err(err) = &result
                && matches!(err.kind(), ErrorKind::RateLimiter | ErrorKind::Runtime)
            {
                refused = result.err();
                break;
            }
            // The entry stays refreshed until it is acknowledged, however long the
            // sink and the acknowledgement take.
            let entry = held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .finishing(&text);
            let letter = result.as_ref().err().map(|err| letter_of(&text, err));
            if let Err(err) = sink(id, result).await {
                let err = err.into();
                refused = Some(
                    Error::new(
                        ErrorKind::Sink,
                        format!("the sink refused the outcome of id {text:?}: {err}"),
                    )
                    .with_source(err)
                    .with_id_text(text),
                );
                break;
            }
            let Some(entry) = entry else {
                // Every id the stream gave has an entry; nothing else reaches here.
                tracing::warn!(id = %text, "an outcome for an id this worker did not read");
                continue;
            };
            let ack = match letter {
                None => {
                    report.succeeded += 1;
                    Ack::Done(entry)
                }
                Some(letter) => Ack::Failed(entry, letter),
            };
            if !acker.send(ack) {
                break; // the acker failed: its error is returned below
            }
        }
        // The outcomes the sink took before a refusal or a failure are acknowledged
        // all the same; the ids still in flight are not, and will come again. The
        // reader stops first, so that it takes no more ids meanwhile.
        if !drained {
            reading.0.abort();
        }
        drop(done);
        let acknowledged = acker.finish().await;
        if let Some(err) = refused {
            if let Err(ack) = acknowledged {
                tracing::warn!(error = %ack, "acknowledging the outcomes before the stop failed");
            }
            return Err(err);
        }
        report.dead_lettered = acknowledged?;
        // The reader ended the stream: its error, if Redis failed, or its counts.
        let counts = reading.join("reading").await?;
        report.unreadable = counts.unreadable;
        report.reclaimed = counts.reclaimed;
        report.too_many_deliveries = counts.given_up;
        // Done, and holding nothing: leave the group, so that finished workers do not
        // pile up in it. (Never with entries pending: they would be lost with it.)
        let mut connection = self.connection.clone();
        let leave = Script::new(LEAVE);
        if let Err(err) = leave
            .key(&self.keys.stream)
            .arg(&self.keys.group)
            .arg(&consumer)
            .invoke_async::<i64>(&mut connection)
            .await
        {
            tracing::warn!(error = %err, consumer, "leaving the consumer group failed");
        }
        Ok(report)
    }
}

impl fmt::Debug for RedisIdQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdQueue")
            .field("stream", &self.keys.stream)
            .field("group", &self.keys.group)
            .field("dead_letter_stream", &self.keys.dead)
            .field("visibility_timeout", &self.visibility)
            .field("poll_interval", &self.poll)
            .finish_non_exhaustive()
    }
}

/// Sets up a [`RedisIdQueue`]; made by [`RedisIdQueue::builder`].
#[must_use]
pub struct RedisIdQueueBuilder {
    client: Client,
    name: String,
    group: String,
    dead: Option<String>,
    consumer_prefix: String,
    visibility: Duration,
    poll: Duration,
    read_batch: Option<usize>,
    max_deliveries: u32,
}

impl RedisIdQueueBuilder {
    /// The consumer group the workers share. Two groups on one stream each see every
    /// id.
    ///
    /// Default: `"fanout"`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The stream that failed ids go to.
    ///
    /// Default: the queue's name followed by `:dead`.
    pub fn dead_letter_stream(mut self, name: impl Into<String>) -> Self {
        self.dead = Some(name.into());
        self
    }

    /// How long an id may stay pending on a worker that is not heard of before other
    /// workers take it over. A running worker refreshes its ids every third of this,
    /// so it bounds how long a dead worker's ids wait, not how long an id may take.
    ///
    /// Default: 30 seconds.
    pub fn visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility = timeout;
        self
    }

    /// How long a worker with nothing to read waits for new ids before it looks
    /// again for ids to reclaim, and whether the queue is done.
    ///
    /// Default: 1 second.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll = interval;
        self
    }

    /// How many ids a worker reads in one round trip. They are pending on it from
    /// then on, so a larger batch means fewer round trips but more ids to reclaim if
    /// it dies.
    ///
    /// Default: the `FanOut`'s concurrency (its maximum, if adaptive), from 16 to
    /// 1,000.
    pub fn read_batch(mut self, ids: usize) -> Self {
        self.read_batch = Some(ids);
        self
    }

    /// After how many deliveries an id that was never acknowledged is given up: when
    /// reclaimed once more, it goes to the dead letters (kind `TooManyDeliveries`)
    /// instead of to another worker. So an id that brings down every worker that
    /// takes it (a panic in the sink, say) is not passed around for ever. Deliveries
    /// count each time a worker reads or reclaims the id, not each attempt at it.
    ///
    /// Default: 10.
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries;
        self
    }

    /// The start of each worker's consumer name, which goes on with the process id and
    /// a random number.
    ///
    /// Default: `"worker"`.
    pub fn consumer_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.consumer_prefix = prefix.into();
        self
    }

    /// Connects to Redis and creates the stream and its consumer group, unless they
    /// exist.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] for an empty name or group, a visibility timeout
    /// outside 3 ms to 7 days, a poll interval outside 1 ms to 1 hour, a read batch
    /// outside 1 to 100,000, or a dead-letter stream named like the queue;
    /// [`ErrorKind::Queue`] when Redis cannot be reached or refuses;
    /// [`ErrorKind::Runtime`] outside a Tokio runtime.
    pub async fn build(self) -> Result<RedisIdQueue, Error> {
        let config = |message: &str| Error::new(ErrorKind::InvalidConfig, message);
        if self.name.is_empty() || self.group.is_empty() {
            return Err(config("the queue needs a name and a group"));
        }
        if !(MIN_VISIBILITY..=MAX_VISIBILITY).contains(&self.visibility) {
            return Err(config(
                "visibility_timeout must be from 3 ms (workers refresh their ids every \
                 third of it) to 7 days",
            ));
        }
        if !(Duration::from_millis(1)..=MAX_POLL).contains(&self.poll) {
            return Err(config(
                "poll_interval must be from 1 ms (Redis blocks in whole milliseconds) to \
                 1 hour",
            ));
        }
        if self.max_deliveries == 0 {
            return Err(config("max_deliveries must be at least 1"));
        }
        if self
            .read_batch
            .is_some_and(|ids| !(1..=MAX_READ_BATCH).contains(&ids))
        {
            return Err(config("read_batch must be from 1 to 100,000 ids"));
        }
        let dead = self.dead.unwrap_or_else(|| format!("{}:dead", self.name));
        let closed = format!("{}:closed", self.name);
        if dead == self.name || dead == closed {
            return Err(config(
                "the dead-letter stream must not be the queue's stream or its closed mark",
            ));
        }
        super::in_runtime()?;
        let mut connection = ConnectionManager::new_with_config(
            self.client.clone(),
            ConnectionManagerConfig::new()
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_connection_timeout(Some(Duration::from_secs(5))),
        )
        .await
        .map_err(|err| queue_error("connecting to Redis failed", err))?;
        match connection
            .xgroup_create_mkstream::<_, _, _, ()>(&self.name, &self.group, "0")
            .await
        {
            Ok(()) => {}
            Err(err) if err.code() == Some("BUSYGROUP") => {}
            Err(err) => return Err(queue_error("creating the consumer group failed", err)),
        }
        let keys = Keys {
            dead,
            closed,
            stream: self.name,
            group: self.group,
            consumer_prefix: self.consumer_prefix,
        };
        Ok(RedisIdQueue {
            keys: Arc::new(keys),
            client: self.client,
            connection,
            visibility: self.visibility,
            poll: self.poll,
            read_batch: self.read_batch,
            max_deliveries: self.max_deliveries,
        })
    }
}

impl fmt::Debug for RedisIdQueueBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdQueueBuilder")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("dead_letter_stream", &self.dead)
            .field("visibility_timeout", &self.visibility)
            .field("poll_interval", &self.poll)
            .field("read_batch", &self.read_batch)
            .field("max_deliveries", &self.max_deliveries)
            .finish_non_exhaustive()
    }
}

/// The entries this worker has read and not yet acknowledged: waiting or in flight,
/// keyed by the id's text (the same id queued twice has two entries), and finishing
/// (with the sink or waiting to be acknowledged). The heartbeat refreshes them all.
#[derive(Default)]
struct Held {
    by_id: HashMap<String, VecDeque<String>>,
    finishing: HashSet<String>,
}

impl Held {
    fn put(&mut self, id: String, entry: String) {
        self.by_id.entry(id).or_default().push_back(entry);
    }

    /// The entry an outcome for `id` finishes, from now on finishing.
    fn finishing(&mut self, id: &str) -> Option<String> {
        let entries = self.by_id.get_mut(id)?;
        let entry = entries.pop_front();
        if entries.is_empty() {
            self.by_id.remove(id);
        }
        if let Some(entry) = &entry {
            self.finishing.insert(entry.clone());
        }
        entry
    }

    /// Acknowledged: nothing more to refresh.
    fn finished(&mut self, entry: &str) {
        self.finishing.remove(entry);
    }

    fn entries(&self) -> Vec<String> {
        let waiting = self.by_id.values().flatten();
        waiting.chain(&self.finishing).cloned().collect()
    }
}

/// What the reader did besides handing ids on, for the report.
#[derive(Default)]
struct Counts {
    reclaimed: u64,
    unreadable: u64,
    given_up: u64,
}

/// Where the worker's ids come from: entries reclaimed from dead workers first, then
/// new ones; the end once the queue is closed and nobody else holds an id.
struct Reader<Id> {
    connection: ConnectionManager,
    keys: Arc<Keys>,
    consumer: String,
    visibility_ms: u64,
    poll_ms: u64,
    batch: usize,
    /// Where the next `XAUTOCLAIM` goes on scanning the pending entries.
    cursor: String,
    /// Whether the queue was closed, as last read (it stays closed).
    closed: bool,
    /// When to look next for ids to reclaim, and how often.
    next_reclaim: Instant,
    reclaim_every: Duration,
    /// How long to wait for Redis to come back.
    patience: Patience,
    /// The reclaiming script, and after how many deliveries it gives an id up.
    reclaim: Script,
    max_deliveries: u32,
    buffer: VecDeque<Id>,
    held: Arc<Mutex<Held>>,
    counts: Counts,
    _id: std::marker::PhantomData<fn() -> Id>,
}

impl<Id> Reader<Id>
where
    Id: FromStr + fmt::Display,
    Id::Err: fmt::Display,
{
    /// Reads ids and hands them to the fan-out until the queue is done or the fan-out
    /// is gone; an error if Redis failed for good. Its counts, for the report.
    async fn run(mut self, ids: tokio::sync::mpsc::Sender<Id>) -> Result<Counts, Error> {
        loop {
            while let Some(id) = self.buffer.pop_front() {
                if ids.send(id).await.is_err() {
                    return Ok(self.counts);
                }
            }
            match self.fill().await {
                Ok(true) => self.patience.reset(),
                Ok(false) => return Ok(self.counts),
                Err(err) if self.patience.again(&err).await => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Reads more entries; `false` when the queue is done.
    async fn fill(&mut self) -> Result<bool, Error> {
        let keys = Arc::clone(&self.keys);
        // Whether the queue is closed is read before the read for entries: every id
        // pushed before it was closed is then in the stream when the read looks.
        // (Read after, a push and close between the two would end every worker with
        // those ids unread.)
        if !self.closed {
            self.closed = self
                .connection
                .exists(&keys.closed)
                .await
                .map_err(|err| queue_error("reading the queue's state failed", err))?;
        }
        // A dead worker's ids become free only after the visibility timeout: looking
        // for them once in a while is enough, not on every read.
        if Instant::now() >= self.next_reclaim {
            let mut call = self.reclaim.key(&keys.stream);
            call.key(&keys.dead)
                .arg(&keys.group)
                .arg(&self.consumer)
                .arg(self.visibility_ms)
                .arg(&self.cursor)
                .arg(self.batch)
                .arg(self.max_deliveries);
            let (cursor, kept, given_up): (String, Vec<RawEntry>, u64) = call
                .invoke_async(&mut self.connection)
                .await
                .map_err(|err| queue_error("reclaiming ids failed", err))?;
            self.cursor = cursor;
            let found = !kept.is_empty() || given_up > 0;
            if given_up > 0 {
                tracing::warn!(
                    entries = given_up,
                    max_deliveries = self.max_deliveries,
                    "dead-lettered ids delivered too often",
                );
                self.counts.given_up += given_up;
            }
            if !kept.is_empty() {
                let n = kept.len() as u64;
                tracing::info!(entries = n, "reclaimed ids from a worker not heard of");
                self.counts.reclaimed += n;
                let entries = kept
                    .into_iter()
                    .map(|(entry, fields)| (entry, id_field(fields)))
                    .collect();
                self.accept(entries).await?;
            }
            if found {
                return Ok(true); // and look again next time: there may be more
            }
            // The scan goes on from its cursor next time.
            self.next_reclaim = Instant::now() + self.reclaim_every;
        }
        let mut options = StreamReadOptions::default()
            .group(&keys.group, &self.consumer)
            .count(self.batch);
        if !self.closed {
            // Nothing new may come yet: wait for it on the server.
            options = options.block(usize::try_from(self.poll_ms).unwrap_or(usize::MAX));
        }
        let read: Option<StreamReadReply> = self
            .connection
            .xread_options(&[&keys.stream], &[">"], &options)
            .await
            .map_err(|err| queue_error("reading ids failed", err))?;
        let entries: Vec<(String, Option<String>)> = read
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .map(|entry| {
                let text = entry.get(ID_FIELD);
                (entry.id, text)
            })
            .collect();
        if !entries.is_empty() {
            self.accept(entries).await?;
            return Ok(true);
        }
        if !self.closed {
            return Ok(true);
        }
        if self.others_done().await? {
            return Ok(false);
        }
        // Closed, but another worker holds ids: look again soon, as the last of them
        // are likely to be finishing (and they come back here if it dies).
        tokio::time::sleep(Duration::from_millis(self.poll_ms).min(DRAIN_POLL)).await;
        Ok(true)
    }

    /// Whether no other worker holds an id (one that dies holding some would leave
    /// them to be reclaimed).
    async fn others_done(&mut self) -> Result<bool, Error> {
        let keys = Arc::clone(&self.keys);
        let pending: StreamPendingReply = self
            .connection
            .xpending(&keys.stream, &keys.group)
            .await
            .map_err(|err| queue_error("reading the queue's state failed", err))?;
        Ok(match pending {
            StreamPendingReply::Data(data) => data
                .consumers
                .iter()
                .all(|consumer| consumer.name == self.consumer || consumer.pending == 0),
            _ => true,
        })
    }

    /// Takes read entries in, each its entry id and the text of its `id` field (`None`
    /// if it has none, or it is not UTF-8): ids into the buffer, unparseable entries to
    /// the dead letters.
    async fn accept(&mut self, entries: Vec<(String, Option<String>)>) -> Result<(), Error> {
        let mut unreadable = Vec::new();
        {
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            for (entry, text) in entries {
                match text.as_deref().map(Id::from_str) {
                    Some(Ok(id)) => {
                        held.put(id.to_string(), entry);
                        self.buffer.push_back(id);
                    }
                    Some(Err(err)) => {
                        let text = text.unwrap_or_default();
                        let message = format!("the queued id {text:?} cannot be parsed: {err}");
                        unreadable.push((entry, text, message));
                    }
                    None => {
                        let message = format!("the entry has no {ID_FIELD:?} field in UTF-8");
                        unreadable.push((entry, String::new(), message));
                    }
                }
            }
        }
        if unreadable.is_empty() {
            return Ok(());
        }
        let script = Script::new(DEAD_LETTER);
        for (entry, id, message) in unreadable {
            let letter = Letter {
                id,
                kind: format!("{:?}", ErrorKind::InvalidId),
                status: None,
                attempts: 0,
                error: message,
            };
            let added =
                dead_letter(&mut self.connection, &script, &self.keys, &entry, &letter).await?;
            if added {
                self.counts.unreadable += 1;
            }
        }
        Ok(())
    }
}

/// What the acker is asked to do with a finished entry.
enum Ack {
    /// Acknowledge it.
    Done(String),
    /// Acknowledge it and write its dead letter, atomically.
    Failed(String, Letter),
}

/// The task that acknowledges finished entries; aborted when dropped.
struct Acker {
    sender: tokio::sync::mpsc::UnboundedSender<Ack>,
    task: AbortOnDrop<Result<u64, Error>>,
}

impl Acker {
    fn start(
        mut connection: ConnectionManager,
        keys: Arc<Keys>,
        held: Arc<Mutex<Held>>,
        mut patience: Patience,
    ) -> Self {
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let script = Script::new(DEAD_LETTER);
            let mut dead_lettered = 0;
            let mut batch = Vec::new();
            let mut done = Vec::new();
            while receiver.recv_many(&mut batch, ACK_CHUNK).await > 0 {
                for ack in batch.drain(..) {
                    match ack {
                        Ack::Done(entry) => done.push(entry),
                        Ack::Failed(entry, letter) => {
                            // Both are idempotent: the script writes the letter only
                            // if its acknowledgement took the entry off the list.
                            let added = loop {
                                match dead_letter(&mut connection, &script, &keys, &entry, &letter)
                                    .await
                                {
                                    Ok(added) => break added,
                                    Err(err) if patience.again(&err).await => {}
                                    Err(err) => return Err(err),
                                }
                            };
                            patience.reset();
                            dead_lettered += u64::from(added);
                            held.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .finished(&entry);
                        }
                    }
                }
                while !done.is_empty() {
                    match connection
                        .xack::<_, _, _, ()>(&keys.stream, &keys.group, &done)
                        .await
                        .map_err(|err| queue_error("acknowledging ids failed", err))
                    {
                        Ok(()) => {
                            patience.reset();
                            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
                            for entry in done.drain(..) {
                                held.finished(&entry);
                            }
                        }
                        Err(err) if patience.again(&err).await => {}
                        Err(err) => return Err(err),
                    }
                }
            }
            Ok(dead_lettered)
        });
        Acker {
            sender,
            task: AbortOnDrop(task),
        }
    }

    /// Hands an entry over; `false` if the acker has stopped on an error.
    fn send(&self, ack: Ack) -> bool {
        self.sender.send(ack).is_ok()
    }

    /// Waits until everything handed over is acknowledged; how many dead letters
    /// were written.
    async fn finish(self) -> Result<u64, Error> {
        let Acker { sender, mut task } = self;
        drop(sender);
        task.join("acknowledging").await
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<Result<T, Error>> {
    /// Waits for the task's result; a task that panicked or was cancelled is a
    /// [`ErrorKind::Queue`] error naming `what` it was doing.
    async fn join(&mut self, what: &str) -> Result<T, Error> {
        match (&mut self.0).await {
            Ok(result) => result,
            Err(err) => Err(Error::new(
                ErrorKind::Queue,
                format!("the {what} task failed: {err}"),
            )),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a dead letter says.
struct Letter {
    id: String,
    kind: String,
    status: Option<u16>,
    attempts: u32,
    error: String,
}

fn letter_of(id: &str, err: &Error) -> Letter {
    Letter {
        id: id.to_owned(),
        kind: format!("{:?}", err.kind()),
        status: err.status().map(|status| status.as_u16()),
        attempts: err.attempts(),
        error: err.to_string(),
    }
}

/// Acknowledges `entry` and writes its dead letter, atomically; `false` if somebody
/// had acknowledged it already (and written its letter).
async fn dead_letter(
    connection: &mut ConnectionManager,
    script: &Script,
    keys: &Keys,
    entry: &str,
    letter: &Letter,
) -> Result<bool, Error> {
    let status = letter.status.map(|s| s.to_string()).unwrap_or_default();
    let added: u8 = script
        .key(&keys.stream)
        .key(&keys.dead)
        .arg(&keys.group)
        .arg(entry)
        .arg("id")
        .arg(&letter.id)
        .arg("queued_as")
        .arg(entry)
        .arg("kind")
        .arg(&letter.kind)
        .arg("status")
        .arg(status)
        .arg("attempts")
        .arg(letter.attempts)
        .arg("error")
        .arg(&letter.error)
        .invoke_async(connection)
        .await
        .map_err(|err| queue_error("writing a dead letter failed", err))?;
    Ok(added == 1)
}

impl DeadLetter {
    fn from_entry(entry: StreamId) -> Self {
        let text = |field: &str| entry.get::<String>(field).unwrap_or_default();
        DeadLetter {
            id: text("id"),
            queued_as: text("queued_as"),
            kind: text("kind"),
            status: text("status").parse().ok(),
            attempts: text("attempts").parse().unwrap_or(0),
            error: text("error"),
            entry: entry.id,
        }
    }
}

/// Refreshes this worker's entries every third of the visibility timeout, until it
/// is dropped.
struct Heartbeat {
    _task: AbortOnDrop<()>,
}

impl Heartbeat {
    fn start(
        mut connection: ConnectionManager,
        keys: Arc<Keys>,
        consumer: String,
        held: Arc<Mutex<Held>>,
        every: Duration,
    ) -> Self {
        let task = tokio::spawn(async move {
            let script = Script::new(HEARTBEAT);
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // the first tick is now
            loop {
                ticks.tick().await;
                let entries = held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries();
                for chunk in entries.chunks(HEARTBEAT_CHUNK) {
                    let mut call = script.key(&keys.stream);
                    call.arg(&keys.group).arg(&consumer).arg(chunk);
                    if let Err(err) = call.invoke_async::<u64>(&mut connection).await {
                        // The next tick tries again; if Redis stays away, the ids are
                        // reclaimed by others, which is what at-least-once allows.
                        tracing::warn!(error = %err, "refreshing this worker's ids failed");
                        break;
                    }
                }
            }
        });
        Heartbeat {
            _task: AbortOnDrop(task),
        }
    }
}

/// How long a worker waits for Redis to come back (a restart, a failover) before it
/// gives up: half the visibility timeout, and at least a second, with pauses growing
/// from 50 ms to a second. Past it, other workers may reclaim its ids anyway.
struct Patience {
    limit: Duration,
    since: Option<Instant>,
    pause: Duration,
}

impl Patience {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);

    fn new(visibility: Duration) -> Self {
        Patience {
            limit: (visibility / 2).max(Duration::from_secs(1)),
            since: None,
            pause: Self::FIRST_PAUSE,
        }
    }

    /// After a failure: pauses and says to try again if Redis is only out of reach
    /// and patience lasts; `false` to give up.
    async fn again(&mut self, err: &Error) -> bool {
        if !super::passing(err) {
            return false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() + self.pause > self.limit {
            return false;
        }
        tracing::warn!(error = %err, "Redis is out of reach: trying again");
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        true
    }

    /// Redis answered.
    fn reset(&mut self) {
        self.since = None;
        self.pause = Self::FIRST_PAUSE;
    }
}

/// A stream entry as a script returns it: its id, and its fields and values in turn.
type RawEntry = (String, Vec<Vec<u8>>);

/// The text of the `id` field among an entry's field/value pairs.
fn id_field(fields: Vec<Vec<u8>>) -> Option<String> {
    let mut pairs = fields.chunks_exact(2);
    let value = pairs.find(|pair| pair[0] == ID_FIELD.as_bytes())?[1].clone();
    String::from_utf8(value).ok()
}

fn queue_error(what: &str, err: RedisError) -> Error {
    Error::new(ErrorKind::Queue, format!("{what}: {err}")).with_source(err)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
