//! A fleet of workers on one job through Redis: a producer queues the ids of a local
//! players API, three workers fetch them under one shared quota, and one of them is
//! killed a quarter of the way through. Nothing is lost: its ids are reclaimed by the
//! other two, and the ids the API does not have end in the dead-letter stream.
//!
//! It needs a Redis server (6.2 or newer); start one first:
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no &    # apt-get install redis-server
//! cargo run --release --features redis --example fleet
//! cargo run --release --features redis --example fleet -- 5000 4   # ids, workers
//! REDIS_URL=redis://10.0.0.5:6379/ cargo run --release --features redis --example fleet
//! ```
//!
//! The workers are tasks here, each with its own Redis connections, as separate
//! processes would have; `docs/fleet.md` covers running them as processes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fanout::redis::redis::Client;
use fanout::redis::{RedisIdQueue, RedisRateLimiter, WorkReport};
use fanout::{FanOut, Quota, RetryPolicy};
use serde::Deserialize;

/// The quota the API gives all workers together.
const RATE: u32 = 500;
const BURST: u32 = 25;

#[derive(Debug, Deserialize)]
struct Player {
    runs: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let ids: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3_000);
    let workers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let redis = Client::open(url.as_str())?;

    let api = Arc::new(Api::default());
    let addr = start_players_api(Arc::clone(&api)).await?;
    println!("players API on http://{addr}: {ids} players, 5-25 ms each, ~1% missing");

    // The producer: one queue per run, so that runs do not mix.
    let name = format!("fanout-fleet-{:08x}", fastrand::u32(..));
    let queue = match RedisIdQueue::builder(redis.clone(), &name)
        .visibility_timeout(Duration::from_secs(2))
        .build()
        .await
    {
        Ok(queue) => Arc::new(queue),
        Err(err) => {
            eprintln!("{err}\n\nStart Redis first: redis-server --port 6379 --save '' &");
            std::process::exit(1);
        }
    };
    queue.push(1..=ids).await?;
    queue.close().await?;
    println!(
        "queued {ids} ids on the stream {name:?}; {workers} workers, sharing {RATE} requests/s"
    );

    // The sink: results by id, so that an id delivered twice is stored once.
    let stored = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (redis, queue) = (redis.clone(), Arc::clone(&queue));
        let (stored, done) = (Arc::clone(&stored), Arc::clone(&done));
        let detail = format!("http://{addr}/players/{{id}}");
        tasks.push(tokio::spawn(async move {
            let quota = Quota::per_second(NonZeroU32::new(RATE).unwrap())
                .allow_burst(NonZeroU32::new(BURST).unwrap());
            let limiter = RedisRateLimiter::builder(redis, "players-api", quota)
                .connect()
                .await?;
            let players = FanOut::<u64, Player>::builder()
                .detail_url(&detail)
                .concurrency(32)
                .rate_limiter(Arc::new(limiter))
                .retry(RetryPolicy::exponential().max_retries(3))
                .build()?;
            queue
                .work(&players, |id, result| {
                    if let Ok(player) = result {
                        stored.lock().unwrap().insert(id, player.runs);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<(), std::io::Error>(()) }
                })
                .await
        }));
    }

    // A quarter of the way through, worker 0 dies without a word.
    while done.load(Ordering::Relaxed) < ids / 4 && !tasks.iter().any(|task| task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tasks[0].abort();
    println!(
        "worker 0 killed after {} outcomes",
        done.load(Ordering::Relaxed)
    );

    let mut reports = Vec::new();
    for (worker, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(report) => reports.push((worker, report?)),
            Err(err) if err.is_cancelled() => {}
            Err(err) => return Err(err.into()),
        }
    }
    let took = started.elapsed();

    for (
        worker,
        WorkReport {
            succeeded,
            dead_lettered,
            reclaimed,
            ..
        },
    ) in &reports
    {
        println!(
            "worker {worker}: {succeeded} stored, {dead_lettered} dead-lettered, \
             {reclaimed} reclaimed from the dead worker"
        );
    }
    let stored = stored.lock().unwrap().len() as u64;
    let letters = queue.dead_letters(usize::MAX).await?;
    println!(
        "{stored} players stored and {} dead letters = {} of {ids} ids, in {:.1} s",
        letters.len(),
        stored + letters.len() as u64,
        took.as_secs_f64()
    );
    if let Some(letter) = letters.first() {
        println!(
            "e.g. dead letter: id {} ({}): {}",
            letter.id, letter.kind, letter.error
        );
    }
    let busiest = api.busiest_second();
    println!(
        "the API saw {} requests, at most {busiest} in any one second (quota {RATE} + burst {BURST})",
        api.requests.load(Ordering::Relaxed)
    );
    Arc::try_unwrap(queue)
        .map_err(|_| "the queue is still shared")?
        .delete()
        .await?;
    Ok(())
}

#[derive(Default)]
struct Api {
    requests: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
}

impl Api {
    /// The most requests that arrived in any one-second window.
    fn busiest_second(&self) -> usize {
        let mut times = self.arrivals.lock().unwrap().clone();
        times.sort();
        let (mut most, mut start) = (0, 0);
        for end in 0..times.len() {
            while times[end] - times[start] >= Duration::from_secs(1) {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }
}

async fn start_players_api(api: Arc<Api>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/players/{id}", get(player))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn player(State(api): State<Arc<Api>>, Path(id): Path<u64>) -> Response {
    api.requests.fetch_add(1, Ordering::Relaxed);
    api.arrivals.lock().unwrap().push(Instant::now());
    let mix = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    tokio::time::sleep(Duration::from_millis(5 + mix % 21)).await;
    if mix % 97 == 0 {
        return (StatusCode::NOT_FOUND, "{\"error\":\"no such player\"}").into_response();
    }
    axum::Json(serde_json::json!({ "id": id, "runs": mix % 15_000 })).into_response()
}
