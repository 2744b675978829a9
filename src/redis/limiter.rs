//! A rate limit that any number of processes share: GCRA in one Lua script on Redis.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use tokio::time::Instant;

use super::unreachable;
use crate::Quota;
use crate::error::{Error, ErrorKind};
use crate::rate::{Acquire, BoxError, RateLimit, Throttle};

/// The generic cell rate algorithm, as governor runs it, on the server's clock.
///
/// KEYS[1] holds the theoretical arrival time (TAT) in microseconds. A call reserves
/// one token: it moves the TAT on by one interval and answers how many microseconds
/// the caller must wait before it may send (0 for now). A TAT that has fallen behind
/// the clock is brought up to it, so at most `burst` go at once after a quiet spell.
/// The key expires when its TAT passes: a full bucket is no key.
///
/// A token is reserved only if it is due within ARGV[3] microseconds; otherwise the
/// answer is negative, how long to wait before asking again. Tokens reserved for
/// waiters that never send (cancelled, or on a worker that died) are so at most that
/// far ahead, rather than every waiter's worth.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local ahead = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local next = tat + interval
local wait = next - tolerance - now
if wait < 0 then wait = 0 end
if wait > ahead then
  return -(wait - ahead)
end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1)
return wait
";

/// How long tokens come from the local fallback after Redis failed, before Redis is
/// asked again.
const FALLBACK_SPELL: Duration = Duration::from_secs(1);

/// A token bucket on Redis, shared by every process that names the same quota: they
/// stay within its rate and burst together, exactly as one [`RateLimiter`](crate::RateLimiter) would
/// keep one process.
///
/// It is governor's algorithm (GCRA) in one atomic Lua script, on the Redis server's
/// clock, so the workers' clocks do not matter. Each token costs one round trip: a
/// waiting attempt whose token is due within a second (or a burst and an interval,
/// if longer) is given its own time and sleeps until then, without polling. Waiters
/// further back queue in their process, and only the first of them asks Redis again,
/// once per interval; so tokens reserved for waiters that never send are at most a
/// second's worth, and a crowd of waiters does not flood Redis.
///
/// Pass it to [`FanOutBuilder::rate_limiter`](crate::FanOutBuilder::rate_limiter):
///
/// ```no_run
/// use std::num::NonZeroU32;
/// use std::sync::Arc;
/// use fanout::{FanOut, Quota};
/// use fanout::redis::RedisRateLimiter;
///
/// # #[derive(serde::Deserialize)] struct Player;
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let redis = fanout::redis::redis::Client::open("redis://127.0.0.1/")?;
/// let quota = Quota::per_second(NonZeroU32::new(50).unwrap())
///     .allow_burst(NonZeroU32::new(5).unwrap());
/// let limiter = RedisRateLimiter::builder(redis, "players-api", quota)
///     .connect()
///     .await?;
/// let players = FanOut::<u64, Player>::builder()
///     .detail_url("https://api.example.com/players/{id}")
///     .rate_limiter(Arc::new(limiter))
///     .build()?;
/// # Ok(()) }
/// ```
///
/// # When Redis cannot be reached
///
/// By default an attempt that cannot get a token fails unsent with
/// [`ErrorKind::RateLimiter`], which the retry policy treats as transient: the id
/// tries again after a backoff, and fails with that error once its retries are spent.
/// Requests are never sent unlimited.
///
/// [`fall_back_to_local`](RedisRateLimiterBuilder::fall_back_to_local) chooses
/// instead to go on at this process's share of the quota (rate and burst divided by
/// the number of workers) while Redis is unreachable, asking Redis again after a
/// second.
pub struct RedisRateLimiter {
    connection: ConnectionManager,
    script: Script,
    name: String,
    key: String,
    quota: Quota,
    /// The quota's interval and burst tolerance, in microseconds.
    interval_us: u64,
    tolerance_us: u64,
    /// How far ahead a token may be reserved.
    ahead_us: u64,
    response_timeout: Duration,
    fallback: Option<Fallback>,
    /// Where this process's waiters that are too far back queue; see `acquire`.
    line: tokio::sync::Mutex<()>,
}

/// The local limiter used while Redis is unreachable, by choice.
struct Fallback {
    throttle: Throttle,
    workers: NonZeroU32,
    /// Until when the fallback hands out tokens without asking Redis.
    until: Mutex<Option<Instant>>,
    /// Whether a waiter is asking Redis whether it is back.
    probing: AtomicBool,
}

enum Route<'a> {
    Redis(Option<Probe<'a>>),
    Local,
}

/// The one waiter asking Redis whether it is back, until dropped.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl RedisRateLimiter {
    /// Starts a limiter for the quota called `name` on the Redis server `client`
    /// points at. Every process that uses the same name on the same server shares
    /// the rate; they should give the same `quota`.
    pub fn builder(
        client: Client,
        name: impl Into<String>,
        quota: Quota,
    ) -> RedisRateLimiterBuilder {
        RedisRateLimiterBuilder {
            client,
            name: name.into(),
            quota,
            workers: None,
            response_timeout: Duration::from_millis(500),
        }
    }

    /// The quota's name, as given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quota that all processes share.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Asks Redis for a token: `Ok(wait)` if one is reserved for `wait` from now,
    /// `Err(later)` if none is due soon enough to reserve, and Redis should be asked
    /// again after `later`. Bounded by the response timeout however Redis fails:
    /// while the connection is being re-established, a command would otherwise wait
    /// for every reconnection attempt.
    async fn reserve(&self) -> Result<Result<Duration, Duration>, ::redis::RedisError> {
        let mut connection = self.connection.clone();
        let mut call = self.script.key(&self.key);
        call.arg(self.interval_us)
            .arg(self.tolerance_us)
            .arg(self.ahead_us);
        let answer = call.invoke_async::<i64>(&mut connection);
        match tokio::time::timeout(self.response_timeout, answer).await {
            Ok(answer) => {
                let answer = answer?;
                let micros = Duration::from_micros(answer.unsigned_abs());
                Ok(if answer >= 0 { Ok(micros) } else { Err(micros) })
            }
            Err(_) => Err(::redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.response_timeout),
            ))),
        }
    }
}

impl RateLimit for RedisRateLimiter {
    /// Always `false`: only Redis can tell, and asking it means waiting.
    fn try_acquire(&self) -> bool {
        false
    }

    fn acquire(&self) -> Acquire<'_> {
        Box::pin(async move {
            // While Redis is away (by choice of a fallback), one waiter at a time asks
            // it again; the others take local tokens meanwhile.
            let _probe = match &self.fallback {
                Some(fallback) => match fallback.route() {
                    Route::Local => return fallback.take().await,
                    Route::Redis(probe) => probe,
                },
                None => None,
            };
            // Held by the first waiter of this process that is too far back to be
            // given a time: it alone asks again, once per interval, and the others
            // queue behind it, so that a crowd of waiters does not poll Redis.
            let mut turn = None;
            loop {
                match self.reserve().await {
                    Ok(answer) => {
                        if let Some(fallback) = &self.fallback {
                            fallback.recovered(&self.name);
                        }
                        match answer {
                            Ok(wait) => {
                                drop(turn);
                                if !wait.is_zero() {
                                    tokio::time::sleep(wait).await;
                                }
                                return Ok(());
                            }
                            Err(later) => match turn {
                                // Next in line: ask again at once, the one before
                                // may have left room.
                                None => turn = Some(self.line.lock().await),
                                Some(_) => tokio::time::sleep(later).await,
                            },
                        }
                    }
                    Err(err) if !unreachable(&err) => {
                        // A refusal (a wrong type at the key, no permission, a
                        // read-only replica, ...) is a setting to fix, not an outage:
                        // no fallback hides it.
                        return Err(failure(&self.name, &err).into());
                    }
                    Err(err) => match &self.fallback {
                        Some(fallback) => {
                            fallback.begin(&self.name, &err);
                            drop(turn);
                            return fallback.take().await;
                        }
                        None => return Err(failure(&self.name, &err).into()),
                    },
                }
            }
        })
    }
}

impl Fallback {
    /// Where the next token comes from: Redis, as usual or as the one waiter that
    /// sees whether it is back; or the local limiter, while Redis is away.
    fn route(&self) -> Route<'_> {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        match until {
            None => Route::Redis(None),
            Some(until) if Instant::now() < until => Route::Local,
            Some(_) => match self.probing.compare_exchange(
                false,
                true,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => Route::Redis(Some(Probe(&self.probing))),
                Err(_) => Route::Local,
            },
        }
    }

    /// Redis failed: tokens come from here for a while.
    fn begin(&self, name: &str, err: &::redis::RedisError) {
        let mut until = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        if until.is_none() {
            tracing::warn!(
                quota = name,
                workers = self.workers.get(),
                error = %err,
                "the shared rate limit on Redis cannot be reached: going on at this \
                 worker's share of the quota",
            );
        }
        *until = Some(Instant::now() + FALLBACK_SPELL);
    }

    /// Redis answered again.
    fn recovered(&self, name: &str) {
        let mut until = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        if until.take().is_some() {
            tracing::info!(quota = name, "the shared rate limit on Redis is back");
        }
    }

    async fn take(&self) -> Result<(), BoxError> {
        if self.throttle.try_take() {
            return Ok(());
        }
        self.throttle.wait().await.map_err(BoxError::from)
    }
}

impl fmt::Debug for RedisRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiter")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field(
                "fall_back_to_local",
                &self.fallback.as_ref().map(|fallback| fallback.workers),
            )
            .finish_non_exhaustive()
    }
}

/// Sets up a [`RedisRateLimiter`]; made by [`RedisRateLimiter::builder`].
#[must_use]
pub struct RedisRateLimiterBuilder {
    client: Client,
    name: String,
    quota: Quota,
    workers: Option<u32>,
    response_timeout: Duration,
}

impl RedisRateLimiterBuilder {
    /// While Redis cannot be reached, takes tokens from a limiter in this process at
    /// its share of the quota: rate and burst divided by `workers`, the number of
    /// processes sharing it (a burst of at least 1). Redis is asked again a second
    /// after it failed. Switching either way is logged, at warn and info level.
    ///
    /// Default: no fallback; attempts fail with [`ErrorKind::RateLimiter`] and are
    /// retried.
    pub fn fall_back_to_local(mut self, workers: u32) -> Self {
        self.workers = Some(workers);
        self
    }

    /// How long to wait for Redis to answer a request for a token before counting it
    /// unreachable.
    ///
    /// Default: 500 ms.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Connects to Redis and loads the script.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidConfig`] for an empty name, a zero response timeout or a
    /// fallback for 0 workers; [`ErrorKind::RateLimiter`] when Redis cannot be reached
    /// and no fallback was chosen, or refuses to load the script;
    /// [`ErrorKind::Runtime`] outside a Tokio runtime. With a fallback, an unreachable
    /// Redis is not an error: tokens come from the fallback until Redis answers.
    pub async fn connect(self) -> Result<RedisRateLimiter, Error> {
        let config = |message: &str| Error::new(ErrorKind::InvalidConfig, message);
        if self.name.is_empty() {
            return Err(config("the shared rate limit needs a name"));
        }
        if self.response_timeout.is_zero() {
            return Err(config("response_timeout must be longer than zero"));
        }
        super::in_runtime()?;
        let fallback = match self.workers {
            None => None,
            Some(workers) => {
                let workers = NonZeroU32::new(workers).ok_or_else(|| {
                    config("fall_back_to_local needs the number of workers, at least 1")
                })?;
                Some(Fallback {
                    throttle: Throttle::local(share(self.quota, workers)),
                    workers,
                    until: Mutex::new(None),
                    probing: AtomicBool::new(false),
                })
            }
        };
        // One reconnection attempt per failure, not the default six with growing
        // delays: an attempt waiting for a token should hear soon that there is none.
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(self.response_timeout))
            .set_number_of_retries(1);
        let failed = |err: ::redis::RedisError| {
            Error::new(ErrorKind::RateLimiter, failure(&self.name, &err)).with_source(err)
        };
        let script = Script::new(GCRA);
        let connection =
            match ConnectionManager::new_with_config(self.client.clone(), manager.clone()).await {
                Ok(mut connection) => match (script.load_async(&mut connection).await, &fallback) {
                    (Ok(_), _) => connection,
                    (Err(err), Some(fallback)) if unreachable(&err) => {
                        fallback.begin(&self.name, &err);
                        connection
                    }
                    (Err(err), _) => return Err(failed(err)),
                },
                Err(err) => match &fallback {
                    Some(fallback) if unreachable(&err) => {
                        fallback.begin(&self.name, &err);
                        ConnectionManager::new_lazy_with_config(self.client, manager)
                            .map_err(failed)?
                    }
                    _ => return Err(failed(err)),
                },
            };
        // Rounded up to whole microseconds: never faster than the quota.
        let micros = |d: Duration| u64::try_from(d.as_nanos().div_ceil(1_000)).unwrap_or(u64::MAX);
        let interval_us = micros(self.quota.replenish_interval());
        let tolerance_us = interval_us.saturating_mul(u64::from(self.quota.burst_size().get()));
        Ok(RedisRateLimiter {
            connection,
            script,
            key: format!("fanout:rate:{}", self.name),
            name: self.name,
            quota: self.quota,
            interval_us,
            tolerance_us,
            ahead_us: tolerance_us.saturating_add(interval_us).max(1_000_000),
            response_timeout: self.response_timeout,
            fallback,
            line: tokio::sync::Mutex::new(()),
        })
    }
}

impl fmt::Debug for RedisRateLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimiterBuilder")
            .field("name", &self.name)
            .field("quota", &self.quota)
            .field("fall_back_to_local", &self.workers)
            .field("response_timeout", &self.response_timeout)
            .finish_non_exhaustive()
    }
}

/// What went wrong with the quota `name` on Redis: out of reach, or refused.
fn failure(name: &str, err: &::redis::RedisError) -> String {
    if unreachable(err) {
        format!("the shared rate limit {name:?} on Redis could not be reached: {err}")
    } else {
        format!("Redis refused the shared rate limit {name:?}: {err}")
    }
}

/// One worker's share of `quota`: the rate and the burst divided by `workers`.
fn share(quota: Quota, workers: NonZeroU32) -> Quota {
    let interval = quota
        .replenish_interval()
        .saturating_mul(workers.get())
        .max(Duration::from_nanos(1));
    let burst =
        NonZeroU32::new(quota.burst_size().get() / workers.get()).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(interval)
        .unwrap_or(quota)
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_divides_rate_and_burst() {
        let quota = Quota::per_second(NonZeroU32::new(60).unwrap());
        let third = share(quota, NonZeroU32::new(3).unwrap());
        // 1/60 s is 16,666,666 ns: three of them are 2 ns short of 50 ms.
        let interval = third.replenish_interval();
        assert!(interval.abs_diff(Duration::from_millis(50)) < Duration::from_micros(1));
        assert_eq!(third.burst_size().get(), 20);
        let small = Quota::per_second(NonZeroU32::new(2).unwrap());
        let tenth = share(small, NonZeroU32::new(10).unwrap());
        assert_eq!(tenth.replenish_interval(), Duration::from_secs(5));
        assert_eq!(tenth.burst_size().get(), 1, "never less than one");
    }
}
