//! Several workers on one job, coordinated through Redis: a rate limit they share and
//! a crash-safe queue of ids. Needs the `redis` cargo feature.
//!
//! When one process takes too long, users run N. Two things then break in every
//! hand-rolled script: the workers together blow the API's quota, since each has its
//! own token bucket; and a worker that dies loses the ids it had taken. Both are
//! solved here with what Redis already does well, not with a protocol of our own:
//!
//! - [`RedisRateLimiter`]: governor's algorithm (GCRA) as one atomic Lua script, keyed
//!   by the quota's name, so any number of processes share one rate and burst exactly.
//!   It goes wherever the in-process limiter goes:
//!   [`FanOutBuilder::rate_limiter`](crate::FanOutBuilder::rate_limiter).
//! - [`RedisIdQueue`]: a Redis stream with a consumer group. Ids are acknowledged only
//!   after the sink has their outcome, ids of a dead worker are reclaimed by the live
//!   ones, and failed ids go to a dead-letter stream with their error. Delivery is at
//!   least once.
//!
//! `docs/fleet.md` covers deployment: how many workers, what happens on a crash, how
//! the quota is shared. For a static list of ids and no Redis, see
//! [`shard`](crate::shard).

mod limiter;
mod queue;

use crate::error::{Error, ErrorKind};

pub use self::limiter::{RedisRateLimiter, RedisRateLimiterBuilder};
pub use self::queue::{DeadLetter, RedisIdQueue, RedisIdQueueBuilder, WorkReport};

/// The `redis` crate `fanout` is built with, so that the [`Client`](redis::Client) you
/// pass is of the same version.
pub use ::redis;

/// The Redis client and the workers' tasks need a Tokio runtime: without one, a typed
/// error rather than a panic.
fn in_runtime() -> Result<(), Error> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(Error::new(
            ErrorKind::Runtime,
            "Redis coordination must run inside a Tokio runtime",
        )),
    }
}

/// Whether a Redis error means it could not be reached (or not now), rather than
/// that it refused the command.
fn unreachable(err: &::redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
        || matches!(
            err.code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN")
        )
}

/// Whether `err` is a Redis failure that may pass: Redis out of reach for now.
fn passing(err: &Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<::redis::RedisError>())
        .is_some_and(unreachable)
}
