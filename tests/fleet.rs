//! Several workers on one job through a real Redis (the `redis` feature): a shared
//! quota, a work queue that loses nothing when a worker dies, and the errors when Redis
//! is away. Each test starts its own `redis-server` on a free loopback port.
#![cfg(feature = "redis")]

mod support;

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout::redis::redis::AsyncCommands;
use fanout::redis::redis::streams::StreamPendingReply;
use fanout::redis::{RedisIdQueue, RedisRateLimiter};
use fanout::{ErrorKind, FanOut, Quota, RetryPolicy};
use futures::FutureExt;
use support::Item;
use support::chaos::{ChaosServer, Fault};
use support::redis::{RedisServer, free_port};

/// Tests that measure time, or that depend on timeouts of a few hundred milliseconds,
/// run one at a time, and not beside the one that loads the machine.
static ONE_AT_A_TIME: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

fn quota(rate: u32, burst: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(rate).unwrap()).allow_burst(NonZeroU32::new(burst).unwrap())
}

/// A fan-out to the test server's `/items/{id}`.
fn api(server: &ChaosServer) -> fanout::FanOutBuilder<u32, Item> {
    FanOut::builder().detail_url(&server.template())
}

/// A connection of the test's own, to look at Redis or act on it.
async fn connect(redis: &RedisServer) -> fanout::redis::redis::aio::MultiplexedConnection {
    redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// One worker through the whole queue: every (id, succeeded) its sink took, sorted, and
/// its report.
async fn work_through(
    queue: &RedisIdQueue,
    api: &FanOut<u32, Item>,
) -> (Vec<(u32, bool)>, fanout::redis::WorkReport) {
    let mut sunk = Vec::new();
    let report = queue
        .work(api, |id, result: Result<Item, fanout::Error>| {
            sunk.push((id, result.is_ok()));
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    sunk.sort_unstable();
    (sunk, report)
}

/// The most arrivals in any window of `width`, over sorted arrival times.
fn busiest_window(times: &[Instant], width: Duration) -> usize {
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_quota() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let (rate, burst, per_worker) = (50, 5, 100_u32);

    let workers: Vec<_> = (0..3_u32)
        .map(|worker| {
            // Each worker has its own connection, as separate processes would.
            let client = redis.client();
            let template = server.template();
            tokio::spawn(async move {
                let limiter = RedisRateLimiter::builder(client, "api", quota(rate, burst))
                    .connect()
                    .await
                    .unwrap();
                let api = FanOut::<u32, Item>::builder()
                    .detail_url(&template)
                    .concurrency(8)
                    .rate_limiter(Arc::new(limiter))
                    .build()
                    .unwrap();
                let ids = (0..per_worker).map(move |i| worker * 1_000 + i);
                let results = api.fan_out(ids).collect_ordered().await;
                assert!(results.iter().all(Result::is_ok));
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }

    let mut times: Vec<Instant> = server.visits().iter().map(|visit| visit.at).collect();
    times.sort();
    assert_eq!(times.len(), 3 * per_worker as usize);
    let busiest = busiest_window(&times, Duration::from_secs(1));
    assert!(
        busiest <= (rate + burst) as usize,
        "{busiest} requests in one second, over the shared quota of {rate} + a burst of {burst}"
    );
    // After the burst, one every 1/rate seconds.
    let span = (*times.last().unwrap() - times[0]).as_secs_f64();
    let combined = (times.len() - burst as usize) as f64 / span;
    assert!(
        combined >= 0.95 * f64::from(rate),
        "the three workers together made {combined:.1} requests/s of the {rate} allowed"
    );
    eprintln!("busiest second: {busiest}; combined rate: {combined:.2}/s over {span:.2} s");
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_error_unless_a_fallback_is_chosen() {
    let nowhere =
        fanout::redis::redis::Client::open(format!("redis://127.0.0.1:{}/", free_port())).unwrap();
    let err = RedisRateLimiter::builder(nowhere.clone(), "api", quota(40, 4))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimiter);
    assert!(
        err.to_string()
            .contains("\"api\" on Redis could not be reached"),
        "{err}"
    );

    // By choice: this worker's share of the quota (2 workers: 20/s, burst 2), never
    // unlimited.
    let limiter = RedisRateLimiter::builder(nowhere, "api", quota(40, 4))
        .fall_back_to_local(2)
        .connect()
        .await
        .unwrap();
    let server = ChaosServer::always(Fault::Fine);
    let api = api(&server)
        .rate_limiter(Arc::new(limiter))
        .build()
        .unwrap();
    let started = Instant::now();
    let results = api.fan_out(0..20).collect_ordered().await;
    let took = started.elapsed();
    assert!(results.iter().all(Result::is_ok));
    // 2 at once, then 18 at 20/s: 0.9 s. Unlimited would take milliseconds; the
    // whole quota (40/s, burst 4) 0.4 s.
    assert!(took >= Duration::from_millis(800), "took {took:?}");
}

#[tokio::test]
async fn redis_going_away_fails_attempts_unsent_and_they_are_retried() {
    let mut redis = RedisServer::start();
    let limiter = RedisRateLimiter::builder(redis.client(), "api", quota(100, 10))
        .connect()
        .await
        .unwrap();
    let server = ChaosServer::always(Fault::Fine);
    let api = api(&server)
        .rate_limiter(Arc::new(limiter))
        .retry(
            RetryPolicy::exponential()
                .max_retries(2)
                .initial_delay(Duration::from_millis(10)),
        )
        .build()
        .unwrap();
    assert!(
        api.fan_out(0..3)
            .collect_ordered()
            .await
            .iter()
            .all(Result::is_ok)
    );
    redis.kill();

    let results = api.fan_out(3..8).collect_ordered().await;
    for result in results {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RateLimiter, "{err}");
        assert_eq!(err.attempts(), 3, "the first attempt and 2 retries: {err}");
        assert!(err.id().is_some() && err.url().is_some(), "{err:?}");
    }
    assert_eq!(server.requests(), 3, "nothing is sent without a token");
}

/// The queue's main promise: 5,000 ids, 3 workers, one killed mid-run. Every id ends
/// with exactly one success in the sink (deduplicated by id), none is lost, the dead
/// worker's ids are reclaimed, and the dead letters are exactly the 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let missing = |id: u32| id.is_multiple_of(97);
    let server = ChaosServer::scripted(move |id, _| match id.parse::<u32>() {
        Ok(id) if missing(id) => Fault::Status(404),
        _ => Fault::Slow(Duration::from_millis(2)),
    });
    let queue = Arc::new(
        RedisIdQueue::builder(redis.client(), "players")
            .visibility_timeout(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(100))
            .build()
            .await
            .unwrap(),
    );
    let api = api(&server).concurrency(16).build().unwrap();

    // (worker, id, succeeded) for every outcome any sink took.
    let sunk = Arc::new(Mutex::new(Vec::<(usize, u32, bool)>::new()));
    let taken_by_first = Arc::new(AtomicUsize::new(0));
    // The workers start before there is anything to read: they wait for the producer.
    let workers: Vec<_> = (0..3)
        .map(|worker| {
            let (queue, api, sunk) = (Arc::clone(&queue), api.clone(), Arc::clone(&sunk));
            let taken_by_first = Arc::clone(&taken_by_first);
            tokio::spawn(async move {
                queue
                    .work(&api, |id: u32, result: Result<Item, fanout::Error>| {
                        if let Ok(item) = &result {
                            assert_eq!(item.id, id.to_string());
                        }
                        sunk.lock().unwrap().push((worker, id, result.is_ok()));
                        if worker == 0 {
                            taken_by_first.fetch_add(1, Ordering::SeqCst);
                        }
                        async { Ok::<(), std::convert::Infallible>(()) }
                    })
                    .await
            })
        })
        .collect();
    let all: Vec<u32> = (1..=5_000).collect();
    assert_eq!(queue.push(all.iter()).await.unwrap(), 5_000);
    queue.close().await.unwrap();

    let mut workers = workers.into_iter();
    let first = workers.next().unwrap();
    let started = support::eventually(Duration::from_secs(30), || {
        taken_by_first.load(Ordering::SeqCst) >= 300
    })
    .await;
    assert!(started, "the first worker never took 300 outcomes");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let mut connection = connect(&redis).await;
    let pending: StreamPendingReply = connection.xpending("players", "fanout").await.unwrap();
    assert!(pending.count() > 0, "the killed worker held ids");

    let mut reclaimed = 0;
    let mut dead_lettered = 0;
    for worker in workers {
        let report = worker.await.unwrap().unwrap();
        reclaimed += report.reclaimed;
        dead_lettered += report.dead_lettered;
    }
    assert!(reclaimed > 0, "the killed worker's ids were taken over");

    let sunk = std::mem::take(&mut *sunk.lock().unwrap());
    let succeeded: HashSet<u32> = sunk.iter().filter(|s| s.2).map(|s| s.1).collect();
    let expected: HashSet<u32> = all.iter().copied().filter(|&id| !missing(id)).collect();
    assert_eq!(
        succeeded, expected,
        "every id but the 404s succeeded, in some sink"
    );
    assert!(sunk.iter().all(|&(_, id, ok)| ok != missing(id)));
    let mut outcomes: HashMap<u32, usize> = HashMap::new();
    for &(_, id, _) in sunk.iter() {
        *outcomes.entry(id).or_default() += 1;
    }
    let repeated = outcomes.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} outcomes for 5000 ids ({repeated} delivered more than once), {reclaimed} reclaimed",
        sunk.len()
    );

    let letters = queue.dead_letters(10_000).await.unwrap();
    let mut dead: Vec<u32> = letters
        .iter()
        .map(|letter| letter.id.parse().unwrap())
        .collect();
    dead.sort_unstable();
    let not_found: Vec<u32> = all.iter().copied().filter(|&id| missing(id)).collect();
    assert_eq!(
        dead, not_found,
        "the dead letters are exactly the 404s, each once"
    );
    assert!(
        letters
            .iter()
            .all(|l| l.kind == "Status" && l.status == Some(404))
    );
    assert!(dead_lettered <= not_found.len() as u64);

    let pending: StreamPendingReply = connection.xpending("players", "fanout").await.unwrap();
    assert_eq!(pending.count(), 0, "every entry is acknowledged");
}

/// A queue polled every 50 ms, with `ids` pushed and closed.
async fn queue(
    redis: &RedisServer,
    name: &str,
    visibility: Duration,
    ids: impl IntoIterator<Item = u32>,
) -> Arc<RedisIdQueue> {
    let queue = RedisIdQueue::builder(redis.client(), name)
        .visibility_timeout(visibility)
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    queue.push(ids).await.unwrap();
    queue.close().await.unwrap();
    Arc::new(queue)
}

/// Ids that take longer than the visibility timeout stay with the worker that has
/// them: it refreshes them, so the other worker, polling all along, reclaims none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_keeps_ids_that_outlast_the_visibility_timeout() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Slow(Duration::from_millis(1_500)));
    let queue = queue(&redis, "slow", Duration::from_millis(600), 0..8).await;
    let api = api(&server).concurrency(4).build().unwrap();
    let sunk = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (queue, api, sunk) = (Arc::clone(&queue), api.clone(), Arc::clone(&sunk));
            tokio::spawn(async move {
                queue
                    .work(&api, |id: u32, result: Result<Item, fanout::Error>| {
                        sunk.lock().unwrap().push((id, result.is_ok()));
                        async { Ok::<(), std::io::Error>(()) }
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for worker in workers {
        let report = worker.await.unwrap();
        assert_eq!(report.reclaimed, 0, "{report:?}");
    }
    let mut sunk = std::mem::take(&mut *sunk.lock().unwrap());
    sunk.sort_unstable();
    assert_eq!(sunk, (0..8).map(|id| (id, true)).collect::<Vec<_>>());
    assert_eq!(server.requests(), 8, "each id was fetched once");
}

/// An entry whose id does not parse, or that has no id, is dead-lettered without
/// reaching the sink; the rest go on.
#[tokio::test]
async fn unreadable_entries_go_to_the_dead_letters() {
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    // 9 is queued and the queue closed first; the other entries join it before any
    // worker runs.
    let queue = queue(&redis, "mixed", Duration::from_secs(5), [9]).await;
    let mut connection = connect(&redis).await;
    let _: String = connection.xadd("mixed", "*", &[("id", "7")]).await.unwrap();
    let _: String = connection
        .xadd("mixed", "*", &[("id", "seven")])
        .await
        .unwrap();
    let _: String = connection
        .xadd("mixed", "*", &[("name", "8")])
        .await
        .unwrap();
    let api = api(&server).build().unwrap();
    let (sunk, report) = work_through(&queue, &api).await;
    assert_eq!(sunk, [(7, true), (9, true)]);
    assert_eq!((report.succeeded, report.unreadable), (2, 2), "{report:?}");
    let letters = queue.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 2);
    assert!(letters.iter().all(|letter| letter.kind == "InvalidId"));
    assert_eq!(letters[0].id, "seven");
    assert!(letters[0].error.contains("cannot be parsed"), "{letters:?}");
    assert!(letters[1].error.contains("no \"id\" field"), "{letters:?}");
}

/// A sink that fails stops its worker with a typed error naming the id; the id is not
/// acknowledged, and the next worker gets it.
#[tokio::test]
async fn a_sink_that_fails_leaves_the_id_for_another_worker() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = queue(&redis, "picky", Duration::from_millis(200), 0..20).await;
    let api = api(&server).concurrency(1).build().unwrap();
    let mut kept = Vec::new();
    let err = queue
        .work(&api, |id, _| {
            kept.push(id);
            async move {
                if id == 5 {
                    Err(std::io::Error::other("disk full"))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Sink);
    assert_eq!(err.id(), Some("5"));
    assert!(err.to_string().contains("disk full"), "{err}");

    let report = queue
        .work(&api, |id, _| {
            kept.push(id);
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    assert!(report.reclaimed >= 1, "{report:?}");
    let delivered: HashSet<u32> = kept.iter().copied().collect();
    assert_eq!(delivered, (0..20).collect(), "every id reached a sink");
    assert_eq!(
        kept.iter().filter(|&&id| id == 5).count(),
        2,
        "5 came again"
    );
}

/// Ids queued twice are two pieces of work: both get an outcome and are acknowledged,
/// even with `dedup_ids`, which would otherwise drop the repeat unseen.
#[tokio::test]
async fn repeated_ids_each_get_an_outcome_even_with_dedup() {
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = queue(&redis, "twice", Duration::from_secs(5), [1, 2, 1, 3, 2]).await;
    let api = api(&server).dedup_ids(true).build().unwrap();
    let (sunk, report) = work_through(&queue, &api).await;
    assert_eq!(
        sunk,
        [(1, true), (1, true), (2, true), (2, true), (3, true)]
    );
    assert_eq!(report.succeeded, 5);
    let mut connection = connect(&redis).await;
    let pending: StreamPendingReply = connection.xpending("twice", "fanout").await.unwrap();
    assert_eq!(pending.count(), 0);
}

/// A sink slower than the visibility timeout does not lose the worker its ids: they
/// are refreshed until acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_keeps_its_ids() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = queue(&redis, "slow-sink", Duration::from_millis(600), 0..6).await;
    let api = api(&server).build().unwrap();
    let sunk = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (queue, api, sunk) = (Arc::clone(&queue), api.clone(), Arc::clone(&sunk));
            tokio::spawn(async move {
                queue
                    .work(&api, |id: u32, _| {
                        sunk.lock().unwrap().push(id);
                        tokio::time::sleep(Duration::from_millis(800))
                            .then(|()| async { Ok::<(), std::io::Error>(()) })
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for worker in workers {
        assert_eq!(worker.await.unwrap().reclaimed, 0);
    }
    let mut sunk = std::mem::take(&mut *sunk.lock().unwrap());
    sunk.sort_unstable();
    assert_eq!(sunk, [0, 1, 2, 3, 4, 5], "each id once");
}

#[tokio::test]
async fn out_of_range_settings_are_typed_errors() {
    let redis = RedisServer::start();
    let builder = || RedisIdQueue::builder(redis.client(), "settings");
    let cases = [
        builder().poll_interval(Duration::from_micros(500)),
        builder().poll_interval(Duration::MAX),
        builder().visibility_timeout(Duration::from_millis(2)),
        builder().visibility_timeout(Duration::MAX),
        builder().read_batch(0),
        builder().read_batch(usize::MAX),
        builder().dead_letter_stream("settings"),
        builder().dead_letter_stream("settings:closed"),
        builder().group(""),
    ];
    for case in cases {
        let debug = format!("{case:?}");
        let err = case.build().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{debug}: {err}");
    }
    let limiter = RedisRateLimiter::builder(redis.client(), "api", quota(10, 1));
    let err = limiter.fall_back_to_local(0).connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}

/// A shared limiter that stays away through every retry stops the worker: nothing was
/// sent for the id, so it is not dead-lettered, and it stays queued.
#[tokio::test]
async fn a_worker_stops_when_its_shared_limiter_is_gone() {
    let queue_redis = RedisServer::start();
    let mut limiter_redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = queue(&queue_redis, "limited", Duration::from_secs(5), 0..10).await;
    let limiter = RedisRateLimiter::builder(limiter_redis.client(), "api", quota(100, 10))
        .connect()
        .await
        .unwrap();
    limiter_redis.kill();
    let api = api(&server)
        .rate_limiter(Arc::new(limiter))
        .retry(
            RetryPolicy::exponential()
                .max_retries(1)
                .initial_delay(Duration::from_millis(1)),
        )
        .build()
        .unwrap();
    let mut sunk = 0;
    let err = queue
        .work(&api, |_, _| {
            sunk += 1;
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimiter, "{err}");
    assert_eq!(sunk, 0);
    assert_eq!(server.requests(), 0);
    assert!(queue.dead_letters(100).await.unwrap().is_empty());
    let mut connection = connect(&queue_redis).await;
    let pending: StreamPendingReply = connection.xpending("limited", "fanout").await.unwrap();
    assert_eq!(
        pending.count(),
        10,
        "every id is still there for the next worker"
    );
}

/// Waiters that give up leave at most about a second of tokens reserved: the next
/// request does not wait behind all of them.
#[tokio::test]
async fn abandoned_waiters_reserve_only_a_second_ahead() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let limiter = Arc::new(
        RedisRateLimiter::builder(redis.client(), "slow", quota(2, 1))
            .connect()
            .await
            .unwrap(),
    );
    let api = api(&server)
        .concurrency(20)
        .rate_limiter(Arc::clone(&limiter))
        .build()
        .unwrap();
    // 20 attempts wait for tokens at 2 a second, then are dropped: had each reserved
    // its own, the next one would wait 10 s.
    let batch = api.fan_out(0..20).collect_ordered();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), batch)
            .await
            .is_err()
    );
    let started = Instant::now();
    let results = api.fan_out([100]).collect_ordered().await;
    assert!(results[0].is_ok());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// A key of the wrong type is a setting to fix: Redis refuses, and no fallback hides
/// it.
#[tokio::test]
async fn a_refusal_is_not_an_outage() {
    let redis = RedisServer::start();
    let mut connection = connect(&redis).await;
    let _: () = connection
        .hset("fanout:rate:taken", "field", 1)
        .await
        .unwrap();
    let limiter = RedisRateLimiter::builder(redis.client(), "taken", quota(100, 10))
        .fall_back_to_local(2)
        .connect()
        .await
        .unwrap();
    let server = ChaosServer::always(Fault::Fine);
    let api = api(&server)
        .rate_limiter(Arc::new(limiter))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let err = api
        .fan_out([1])
        .collect_ordered()
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimiter);
    assert!(
        err.to_string()
            .contains("Redis refused the shared rate limit \"taken\""),
        "{err}"
    );
    assert_eq!(server.requests(), 0);
}

/// How many times Redis ran the scripts (the limiter's among them) so far.
async fn script_calls(redis: &RedisServer) -> u64 {
    let mut connection = connect(redis).await;
    let stats: String = fanout::redis::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Waiters too far back to be given a time queue in their process: only the first
/// asks Redis again, so a crowd of them does not poll Redis once per interval each.
#[tokio::test]
async fn a_crowd_of_waiters_does_not_flood_redis() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let limiter = RedisRateLimiter::builder(redis.client(), "crowd", quota(10, 1))
        .connect()
        .await
        .unwrap();
    let api = api(&server)
        .concurrency(40)
        .rate_limiter(Arc::new(limiter))
        .build()
        .unwrap();
    let before = script_calls(&redis).await;
    let started = Instant::now();
    let results = api.fan_out(0..25).collect_ordered().await;
    assert!(results.iter().all(Result::is_ok));
    let took = started.elapsed();
    let calls = script_calls(&redis).await - before;
    // 25 tokens at 10/s: 2.4 s. Each of the 25 asks once at first; those within a
    // second get their time, the rest queue, and the first of them asks again every
    // 100 ms: about 25 + 25 + 24. Had every waiter asked every 100 ms, about 250.
    assert!(took >= Duration::from_millis(2_300), "took {took:?}");
    assert!(calls <= 90, "{calls} script calls for 25 tokens");
    eprintln!("{calls} script calls for 25 tokens in {took:?}");
}

/// A worker rides out Redis dropping its connections (as in a restart or a failover):
/// it tries again, and every id still ends in the sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rides_out_dropped_connections() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Slow(Duration::from_millis(20)));
    let queue = queue(&redis, "dropped", Duration::from_secs(5), 0..400).await;
    let api = api(&server).concurrency(16).build().unwrap();
    let sunk = Arc::new(Mutex::new(HashSet::new()));
    let worker = {
        let (queue, api, sunk) = (Arc::clone(&queue), api.clone(), Arc::clone(&sunk));
        tokio::spawn(async move {
            queue
                .work(&api, |id: u32, result: Result<Item, fanout::Error>| {
                    assert!(result.is_ok());
                    sunk.lock().unwrap().insert(id);
                    async { Ok::<(), std::io::Error>(()) }
                })
                .await
        })
    };
    let mut admin = connect(&redis).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Every client connection but this one.
        let _: u64 = fanout::redis::redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let report = worker.await.unwrap().unwrap();
    assert_eq!(sunk.lock().unwrap().len(), 400);
    assert!(report.succeeded <= 400);
}

/// An id that was delivered again and again and never acknowledged (every worker that
/// took it died) is given up at the next reclaim: dead-lettered, not passed on.
#[tokio::test]
async fn an_id_delivered_too_often_is_given_up() {
    let _alone = ONE_AT_A_TIME.lock().await;
    use fanout::redis::redis::streams::{StreamReadOptions, StreamReadReply};
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = RedisIdQueue::builder(redis.client(), "poison")
        .visibility_timeout(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(20))
        .max_deliveries(2)
        .build()
        .await
        .unwrap();
    queue.push([7_u32, 8]).await.unwrap();
    queue.close().await.unwrap();
    let mut connection = connect(&redis).await;
    // A worker took 7 and 8 and died; another reclaimed them and died: two deliveries.
    let options = StreamReadOptions::default()
        .group("fanout", "ghost-1")
        .count(10);
    let read: Option<StreamReadReply> = connection
        .xread_options(&["poison"], &[">"], &options)
        .await
        .unwrap();
    let entries: Vec<String> = read.unwrap().keys[0]
        .ids
        .iter()
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(entries.len(), 2);
    let _: fanout::redis::redis::Value = fanout::redis::redis::cmd("XCLAIM")
        .arg(&["poison", "fanout", "ghost-2", "0"])
        .arg(&entries)
        .query_async(&mut connection)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    let api = api(&server).build().unwrap();
    let mut sunk = 0;
    let report = queue
        .work(&api, |_, _| {
            sunk += 1;
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    assert_eq!(sunk, 0, "given up, not fetched");
    assert_eq!(report.too_many_deliveries, 2, "{report:?}");
    assert_eq!(server.requests(), 0);
    let letters = queue.dead_letters(10).await.unwrap();
    let mut ids: Vec<&str> = letters.iter().map(|letter| letter.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["7", "8"]);
    assert!(
        letters
            .iter()
            .all(|letter| letter.kind == "TooManyDeliveries")
    );
    assert!(
        letters[0].error.contains("delivered 3 times"),
        "{letters:?}"
    );
}

/// A worker that finished with nothing pending leaves the consumer group; the group
/// does not fill up with finished workers.
#[tokio::test]
async fn a_finished_worker_leaves_the_group() {
    use fanout::redis::redis::streams::StreamInfoConsumersReply;
    let redis = RedisServer::start();
    let server = ChaosServer::always(Fault::Fine);
    let queue = queue(&redis, "leaving", Duration::from_secs(5), 0..10).await;
    let api = api(&server).build().unwrap();
    for _ in 0..2 {
        queue
            .work(&api, |_, _| async { Ok::<(), std::io::Error>(()) })
            .await
            .unwrap();
    }
    let mut connection = connect(&redis).await;
    let consumers: StreamInfoConsumersReply = connection
        .xinfo_consumers("leaving", "fanout")
        .await
        .unwrap();
    assert!(consumers.consumers.is_empty(), "{consumers:?}");
}
