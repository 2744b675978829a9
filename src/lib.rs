//! Call a detail endpoint once per id — thousands to millions of times — with a cap on
//! concurrent requests, results in input order or as they complete, and one typed
//! error per failed id that says which id, which URL and what went wrong.
//!
//! `fanout` replaces the hand-rolled `asyncio.gather` + semaphore loop (or its Rust
//! twin, `buffer_unordered`) with one that gets the details right: ids are pulled
//! lazily so memory stays flat however many there are; requests keep going while the
//! consumer is busy and are cancelled when the results are dropped; ids are percent-encoded so
//! no id can change the URL; bodies are read under a size cap; and every id ends in
//! exactly one outcome.
//!
//! # Example
//!
//! ```
//! use fanout::FanOut;
//! use futures::StreamExt;
//!
//! #[derive(Debug, serde::Deserialize)]
//! struct Video {
//!     id: String,
//!     views: u64,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), fanout::Error> {
//! # let server = wiremock::MockServer::start().await;
//! # wiremock::Mock::given(wiremock::matchers::any())
//! #     .respond_with(|req: &wiremock::Request| {
//! #         let id = req.url.path().rsplit('/').next().unwrap().to_owned();
//! #         wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({"id": id, "views": 7}))
//! #     })
//! #     .mount(&server)
//! #     .await;
//! # let api = server.uri();
//! let videos = FanOut::<String, Video>::builder()
//!     .detail_url(&format!("{api}/videos/{{id}}")) // e.g. https://api.example.com/videos/{id}
//!     .concurrency(10)
//!     .build()?;
//!
//! let ids = vec!["student".to_owned(), "draw".to_owned(), "yes".to_owned()];
//!
//! // gather-style: one result per id, in input order, failures included.
//! let all: Vec<Result<Video, fanout::Error>> = videos.fan_out(ids.clone()).collect_ordered().await;
//! assert_eq!(all[1].as_ref().unwrap().id, "draw");
//!
//! // as_completed-style: (id, result) pairs as they finish.
//! let mut done = videos.fan_out(ids).as_completed();
//! while let Some((id, result)) = done.next().await {
//!     match result {
//!         Ok(video) => println!("{id}: {} views", video.views),
//!         Err(err) => eprintln!("{err}"), // names the id, the URL and the cause
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # How a request runs
//!
//! For each attempt at an id: wait out any pause its server asked for → take its
//! host's slot (if limited per host), then a concurrency slot → take its host's token
//! and a rate-limit token (if rates are set) → wait its turn (if the server's quota is
//! being spread out) → send, with the configured headers, query and per-attempt
//! timeout → read the body, stopping at the size cap → decode the JSON into `T` →
//! release the slot. Non-2xx answers, transport failures, oversized bodies and
//! undecodable JSON each become an [`Error`] of their own [`ErrorKind`].
//!
//! No task is spawned per request: the consumer of a stream polls the requests while it
//! waits for the next outcome, as a `buffer_unordered` loop would, and a background
//! task (one per stream) polls them while the consumer is busy elsewhere, so answers are
//! read and timeouts do not fire on answers that have arrived. See `docs/performance.md`
//! for what this costs against a hand-written loop.
//!
//! Transient failures (connection errors, timeouts, a dropped connection, 408, 429,
//! 500, 502, 503, 504) are retried by the [`RetryPolicy`]: by default up to 3 times,
//! after exponentially growing delays with full jitter, or after the server's
//! `Retry-After` when that is longer. An id waiting to retry holds no slot, but every
//! retry takes a token. When retries run out, the id's error is its last failure and
//! [`Error::attempts`] says how many were made.
//!
//! ```no_run
//! use std::time::Duration;
//! use fanout::{FanOut, RetryPolicy};
//!
//! # #[derive(serde::Deserialize)] struct Player;
//! let players = FanOut::<u64, Player>::builder()
//!     .detail_url("https://api.example.com/players/{id}")
//!     .concurrency(32)
//!     .requests_per_second(50) // token bucket, shared by clones and batches
//!     .retry(RetryPolicy::exponential().max_retries(5))
//!     .timeout(Duration::from_secs(10)) // per attempt
//!     .deadline(Duration::from_secs(60)) // per id, across attempts
//!     .build()?;
//! # Ok::<(), fanout::Error>(())
//! ```
//!
//! # Finding the right speed
//!
//! Few users know the concurrency an API copes with. [`Concurrency::adaptive`] finds
//! it: the limit starts at `min`, grows while answers come back at a steady latency,
//! and is cut when the server answers 429, 503 or 504, times out, or gets slower under
//! the load; never outside `min..=max`. Whatever the limit, a 429 or 503 with
//! `Retry-After` holds back every request to that server for that long
//! ([`pause_on_retry_after`](FanOutBuilder::pause_on_retry_after)), and
//! [`respect_rate_limit_headers`](FanOutBuilder::respect_rate_limit_headers) slows down
//! before a quota the server announces runs out. Ids on several hosts
//! ([`detail_url_with`](FanOutBuilder::detail_url_with)) can be limited per host too.
//!
//! ```no_run
//! use fanout::{Concurrency, FanOut};
//!
//! # #[derive(serde::Deserialize)] struct Video;
//! let videos = FanOut::<String, Video>::builder()
//!     .detail_url("https://api.example.com/videos/{id}")
//!     .concurrency(Concurrency::adaptive(1, 100))
//!     .respect_rate_limit_headers(true)
//!     .build()?;
//! # Ok::<(), fanout::Error>(())
//! ```
//!
//! # Where ids come from
//!
//! Any iterator ([`FanOut::fan_out`]) or stream ([`FanOut::fan_out_stream`], or
//! [`FanOut::fan_out_try_stream`] for a source that can fail), pulled only as slots
//! free up; or a list endpoint ([`FanOutBuilder::list_url`]), read whole with
//! [`FanOut::list_ids`], page by page into the detail requests with
//! [`FanOut::fan_out_listed`], or as a stream to filter first with
//! [`FanOut::list_ids_stream`], following its [`Pagination`].
//!
//! A request other than a `GET` of the id's URL (a `POST` with a body per id, headers
//! of its own) comes from [`FanOutBuilder::request_with`].
//!
//! # Features
//!
//! - `rustls` and `http2` (default): TLS through rustls, HTTP/2 by ALPN.
//! - `cli` (default): the `fanout` command, so that `cargo install fanout` builds it;
//!   it brings clap and indicatif. A library user who does not want them compiled sets
//!   `default-features = false, features = ["rustls", "http2"]`.
//! - `redis`: several workers on one job (below).
//!
//! # More than one machine
//!
//! With the `redis` feature, any number of workers share one quota
//! (`redis::RedisRateLimiter`, passed to [`FanOutBuilder::rate_limiter`]) and work
//! through one queue of ids that loses nothing when a worker dies
//! (`redis::RedisIdQueue`). Without Redis, [`shard`] splits a static list of ids between
//! workers. `docs/fleet.md` covers deployment.
//!
//! # Choosing an output
//!
//! See [`Batch`]: [`collect_ordered`](Batch::collect_ordered),
//! [`try_collect_ordered`](Batch::try_collect_ordered),
//! [`as_completed`](Batch::as_completed) and [`in_order`](Batch::in_order).
#![forbid(unsafe_code)]
// Nothing a server or a caller sends may panic the crate: no unwrap or expect outside
// tests (clippy.toml allows them there).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod batch;
mod builder;
mod dedup;
mod detail;
mod error;
mod event;
mod fanout;
mod limit;
mod list;
mod progress;
mod rate;
mod redirect;
mod request;
mod retry;
mod shard;
mod stats;
mod template;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

pub use crate::batch::{AsCompleted, Batch, InOrder, TryAsCompleted, TryInOrder};
pub use crate::builder::FanOutBuilder;
pub use crate::error::{Error, ErrorKind};
pub use crate::event::Event;
pub use crate::fanout::FanOut;
pub use crate::limit::Concurrency;
pub use crate::list::Pagination;
pub use crate::progress::{Progress, Snapshot};
pub use crate::rate::{Acquire, BoxError, RateLimit, RateLimiter};
pub use crate::retry::{FailedAttempt, RetryPolicy};
pub use crate::shard::{Shard, shard};
pub use crate::stats::{Cause, Latency, RunStats};

/// A rate limit: so many requests per period, with a burst allowance. This is
/// governor's `Quota`, re-exported so that you name the version `fanout` was built with.
///
/// ```
/// use std::num::NonZeroU32;
/// use fanout::Quota;
///
/// // 600 a minute, evenly spread, at most 5 at once after a quiet spell.
/// let quota = Quota::per_minute(NonZeroU32::new(600).unwrap())
///     .allow_burst(NonZeroU32::new(5).unwrap());
/// ```
pub use governor::Quota;

/// The `reqwest` crate `fanout` is built with, so that a client you pass to
/// [`FanOutBuilder::client`] is of the same version.
pub use reqwest;
