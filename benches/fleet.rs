//! What the Redis coordination costs (the `redis` feature), against the same work
//! without it, side by side on loopback. Starts its own `redis-server`.
//!
//! ```text
//! cargo bench --features redis --bench fleet          # 3 rounds
//! cargo bench --features redis --bench fleet -- 5     # rounds
//! ```
//!
//! **Queue.** 20,000 ids against a loopback server that answers at once, concurrency
//! 64: `fan_out` over the ids in memory, against one worker working them through a
//! `RedisIdQueue` (the push timed apart), and three workers on one queue.
//!
//! **Shared quota.** 10,000 requests under a quota of 5,000/s (burst 50): governor's
//! in-process limiter, against a `RedisRateLimiter` asked by one worker, and by three
//! workers sharing the quota. The achieved rate is shown against the quota.

#[path = "../tests/support/chaos.rs"]
#[allow(dead_code, unreachable_pub)]
mod chaos;
#[path = "../tests/support/redis.rs"]
#[allow(dead_code, unreachable_pub)]
mod redis;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos::{ChaosServer, Fault};
use fanout::redis::{RedisIdQueue, RedisRateLimiter};
use fanout::{FanOut, Quota};
use futures::StreamExt;

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Item {
    id: String,
}

const QUEUE_IDS: u32 = 20_000;
const QUOTA_REQUESTS: u32 = 10_000;
const RATE: u32 = 5_000;

fn api(server: &ChaosServer) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&server.template())
        .concurrency(64)
        .build()
        .unwrap()
}

async fn in_memory(server: &ChaosServer) -> Duration {
    let api = api(server);
    let started = Instant::now();
    let mut done = api.fan_out(0..QUEUE_IDS).as_completed();
    let mut ok = 0;
    while let Some((_, result)) = done.next().await {
        ok += u32::from(result.is_ok());
    }
    assert_eq!(ok, QUEUE_IDS);
    started.elapsed()
}

/// (push, work) times for `workers` workers on one queue.
async fn queued(
    redis: &redis::RedisServer,
    server: &ChaosServer,
    workers: usize,
) -> (Duration, Duration) {
    let name = format!("bench-{:08x}", fastrand::u32(..));
    let queue = Arc::new(
        RedisIdQueue::builder(redis.client(), &name)
            .build()
            .await
            .unwrap(),
    );
    let started = Instant::now();
    queue.push(0..QUEUE_IDS).await.unwrap();
    queue.close().await.unwrap();
    let pushed = started.elapsed();
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (queue, api) = (Arc::clone(&queue), api(server));
            tokio::spawn(async move {
                queue
                    .work(&api, |_, result| {
                        assert!(result.is_ok());
                        async { Ok::<(), std::convert::Infallible>(()) }
                    })
                    .await
                    .unwrap()
                    .succeeded
            })
        })
        .collect();
    let mut succeeded = 0;
    for task in tasks {
        succeeded += task.await.unwrap();
    }
    assert_eq!(succeeded, u64::from(QUEUE_IDS));
    let worked = started.elapsed();
    Arc::try_unwrap(queue).unwrap().delete().await.unwrap();
    (pushed, worked)
}

fn quota() -> Quota {
    Quota::per_second(NonZeroU32::new(RATE).unwrap()).allow_burst(NonZeroU32::new(50).unwrap())
}

/// Requests per second achieved by `workers` workers, each with its own limiter.
async fn limited(redis: Option<&redis::RedisServer>, server: &ChaosServer, workers: u32) -> f64 {
    let name = format!("bench-{:08x}", fastrand::u32(..));
    let mut apis = Vec::new();
    let local = Arc::new(fanout::RateLimiter::direct(quota()));
    for _ in 0..workers {
        let builder = FanOut::<u32, Item>::builder()
            .detail_url(&server.template())
            .concurrency(64);
        let builder = match redis {
            Some(redis) => {
                let limiter = RedisRateLimiter::builder(redis.client(), &name, quota())
                    .connect()
                    .await
                    .unwrap();
                builder.rate_limiter(Arc::new(limiter))
            }
            None => builder.rate_limiter(Arc::clone(&local)),
        };
        apis.push(builder.build().unwrap());
    }
    let per_worker = QUOTA_REQUESTS / workers;
    let started = Instant::now();
    let tasks: Vec<_> = apis
        .into_iter()
        .map(|api| {
            tokio::spawn(async move {
                let results = api.fan_out(0..per_worker).collect_ordered().await;
                assert!(results.iter().all(Result::is_ok));
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    f64::from(per_worker * workers) / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(3);
    let redis = redis::RedisServer::start();
    let lat: u64 = std::env::var("LAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let server = ChaosServer::unrecorded(move |_, _| {
        if lat == 0 {
            Fault::Fine
        } else {
            Fault::Slow(Duration::from_millis(lat))
        }
    });
    ping_latency(&redis).await;

    println!("Queue: {QUEUE_IDS} ids, concurrency 64, {rounds} rounds (median)");
    let (mut plain, mut push, mut one, mut three) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let c0 = cpu();
        plain.push(in_memory(&server).await.as_secs_f64());
        let c1 = cpu();
        if std::env::var("CHANNEL").is_ok() {
            println!("channel: {:?}", via_channel(&server).await);
        }
        let (pushed, worked) = queued(&redis, &server, 1).await;
        let c2 = cpu();
        eprintln!("cpu in memory {:.3} queue {:.3}", c1 - c0, c2 - c1);
        push.push(pushed.as_secs_f64());
        one.push(worked.as_secs_f64());
        three.push(queued(&redis, &server, 3).await.1.as_secs_f64());
    }
    let base = median(plain.clone());
    let ids = f64::from(QUEUE_IDS);
    println!("| | time (s) | ids/s | vs in memory |");
    println!("|---|---|---|---|");
    for (name, times) in [
        ("fan_out, ids in memory", plain),
        ("push to the queue", push),
        ("1 worker on the queue", one),
        ("3 workers on the queue", three),
    ] {
        let time = median(times);
        println!(
            "| {name} | {time:.3} | {:.0} | {:.2} |",
            ids / time,
            time / base
        );
    }

    if std::env::args().any(|arg| arg == "queue") {
        return;
    }
    println!(
        "\nShared quota: {QUOTA_REQUESTS} requests at {RATE}/s (burst 50), {rounds} rounds (median)"
    );
    let (mut local, mut shared1, mut shared3) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        local.push(limited(None, &server, 1).await);
        shared1.push(limited(Some(&redis), &server, 1).await);
        shared3.push(limited(Some(&redis), &server, 3).await);
    }
    println!("| limiter | requests/s | of the quota |");
    println!("|---|---|---|");
    for (name, rates) in [
        ("governor, in process", local),
        ("Redis, 1 worker", shared1),
        ("Redis, 3 workers sharing it", shared3),
    ] {
        let rate = median(rates);
        println!("| {name} | {rate:.0} | {:.3} |", rate / f64::from(RATE));
    }
}

#[allow(dead_code)]
async fn via_channel(server: &ChaosServer) -> Duration {
    let api = api(server);
    let started = Instant::now();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for id in 0..QUEUE_IDS {
            tx.send(id).await.unwrap();
        }
    });
    let ids = futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|id| (id, rx)) },
    );
    let mut done = api.fan_out_stream(ids).as_completed();
    let mut ok = 0;
    while let Some((_, result)) = done.next().await {
        ok += u32::from(result.is_ok());
    }
    assert_eq!(ok, QUEUE_IDS);
    started.elapsed()
}

fn cpu() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

#[allow(dead_code)]
async fn ping_latency(redis: &redis::RedisServer) {
    use fanout::redis::redis::AsyncCommands;
    let mut c = redis.client().get_connection_manager().await.unwrap();
    let t = Instant::now();
    for _ in 0..500 {
        let _: usize = c.xlen("nothing").await.unwrap();
    }
    eprintln!("idle round trip: {:?}", t.elapsed() / 500);
    use fanout::redis::redis::streams::{StreamReadOptions, StreamReadReply};
    for i in 0..20000u32 {
        let _: String = c.xadd("lat", "*", &[("id", i)]).await.unwrap();
    }
    let _: () = c.xgroup_create("lat", "g", "0").await.unwrap();
    let mut c = fanout::redis::redis::aio::ConnectionManager::new_with_config(
        redis.client(),
        fanout::redis::redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(6)))
            .set_connection_timeout(Some(Duration::from_secs(5))),
    )
    .await
    .unwrap();
    for block in [None, Some(1000usize)] {
        let mut o = StreamReadOptions::default()
            .group("g", format!("me{block:?}"))
            .count(64);
        if let Some(b) = block {
            o = o.block(b);
        }
        let t = Instant::now();
        for _ in 0..100 {
            let _: Option<StreamReadReply> = c.xread_options(&["lat"], &[">"], &o).await.unwrap();
        }
        eprintln!("xreadgroup block {block:?}: {:?}", t.elapsed() / 100);
    }
}
