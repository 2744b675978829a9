//! What the Redis coordination costs (the `redis` feature), against the same work
//! without it, side by side on loopback. Starts its own `redis-server`.
//!
//! ```text
//! cargo bench --features redis --bench fleet             # 3 rounds
//! cargo bench --features redis --bench fleet -- 5        # rounds
//! cargo bench --features redis --bench fleet -- queue    # the queue part only
//! ```
//!
//! **Queue.** 20,000 ids against a loopback server that answers at once, then one
//! that takes 10 ms, at concurrency 64: `fan_out` over the ids in memory, against one
//! worker working them through a `RedisIdQueue` (the push timed apart), and three
//! workers on one queue (each at concurrency 64). The Redis server, the HTTP server
//! and the client share the machine's cores.
//!
//! **Shared quota.** 10,000 requests under a quota of 5,000/s (burst 50): governor's
//! in-process limiter, against a `RedisRateLimiter` asked by one worker, and by three
//! workers sharing the quota. The achieved rate after the burst (the requests past
//! the first 50, over the time) is shown against the quota.

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
    // The first 50 go at once (the burst); the rest at the rate.
    f64::from(per_worker * workers - 50) / started.elapsed().as_secs_f64()
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
    let only_queue = std::env::args().any(|arg| arg == "queue");
    let redis = redis::RedisServer::start();

    for latency in [0, 10] {
        let server = ChaosServer::unrecorded(move |_, _| match latency {
            0 => Fault::Fine,
            ms => Fault::Slow(Duration::from_millis(ms)),
        });
        println!(
            "\nQueue: {QUEUE_IDS} ids, concurrency 64, a server answering in {latency} ms; \
             {rounds} rounds (median)"
        );
        let (mut plain, mut push, mut one, mut three) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            plain.push(in_memory(&server).await.as_secs_f64());
            let (pushed, worked) = queued(&redis, &server, 1).await;
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
    }
    if only_queue {
        return;
    }

    let server = ChaosServer::unrecorded(|_, _| Fault::Fine);
    println!(
        "\nShared quota: {QUOTA_REQUESTS} requests at {RATE}/s (burst 50), {rounds} rounds \
         (median)"
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
