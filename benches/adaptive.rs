//! Adaptive concurrency against fixed limits, and the pause a 429 asks for.
//!
//! ```text
//! cargo bench --bench adaptive             # 2 rounds
//! cargo bench --bench adaptive -- 3        # rounds
//! cargo bench --bench adaptive -- quota    # only the quota part (or: capacity)
//! cargo bench --bench adaptive -- 10 short # capacity: fixed 10 and adaptive only
//! ```
//!
//! **Capacity.** A loopback server with room for 10 requests at once: a request that
//! arrives with at most 10 in flight (itself included) takes 50 ms, and each request
//! over 10 adds 100 ms. It never refuses work; it only gets slower. Each client fetches
//! 600 ids from a fresh server: fixed concurrency 5, 10, 20, 50 and 100, and
//! `Concurrency::adaptive(1, 100)`. Shown per client: the median time over the rounds
//! (and the range), the ratio to the best fixed limit and to fixed 100, and the share
//! of requests that arrived over capacity.
//!
//! **Quota.** A server that answers at most 20 requests per one-second window and 429
//! with `Retry-After: 1` past it. 100 ids at concurrency 8, with and without the pause
//! (`pause_on_retry_after`), fixed and adaptive: the 429s, and the time. Then the same
//! with the server's `RateLimit-Remaining` / `RateLimit-Reset` headers (20 per 2-second
//! window, 80 ids), read or not (`respect_rate_limit_headers`).

#[path = "../tests/support/chaos.rs"]
#[allow(dead_code, unreachable_pub)]
mod chaos;
#[path = "../tests/support/load.rs"]
#[allow(dead_code, unreachable_pub)]
mod load;

use std::time::{Duration, Instant};

use chaos::{ChaosServer, Fault};
use fanout::{Concurrency, FanOut, RetryPolicy};

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Item {
    id: String,
}

const IDS: u32 = 600;

struct Run {
    took: Duration,
    over_capacity: f64,
}

async fn capacity_run(concurrency: Concurrency) -> Run {
    let server = load::capacity_server(10, Duration::from_millis(50), Duration::from_millis(100));
    let fan: FanOut<u32, Item> = FanOut::builder()
        .detail_url(&server.template())
        .concurrency(concurrency)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let started = Instant::now();
    let all = fan.fan_out(0..IDS).try_collect_ordered().await.unwrap();
    let took = started.elapsed();
    assert_eq!(all.len(), IDS as usize);
    let visits = server.visits();
    let over = visits
        .iter()
        .filter(
            |visit| matches!(visit.fault, Fault::Slow(delay) if delay > Duration::from_millis(50)),
        )
        .count();
    Run {
        took,
        over_capacity: over as f64 / visits.len() as f64,
    }
}

/// The median; for an even count, the mean of the middle two.
fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2
    } else {
        values[middle]
    }
}

async fn capacity(rounds: usize, short: bool) {
    let all = [
        ("fixed 5", Concurrency::fixed(5)),
        ("fixed 10", Concurrency::fixed(10)),
        ("fixed 20", Concurrency::fixed(20)),
        ("fixed 50", Concurrency::fixed(50)),
        ("fixed 100", Concurrency::fixed(100)),
        ("adaptive(1, 100)", Concurrency::adaptive(1, 100)),
    ];
    // The best fixed limit and adaptive, for more rounds in the time of one.
    let clients: Vec<_> = if short {
        vec![all[1], all[5]]
    } else {
        all.to_vec()
    };
    let mut times = vec![Vec::new(); clients.len()];
    let mut over = vec![Vec::new(); clients.len()];
    for round in 0..rounds {
        for (i, (name, concurrency)) in clients.iter().enumerate() {
            let run = capacity_run(*concurrency).await;
            eprintln!("round {}: {name}: {:.2?}", round + 1, run.took);
            times[i].push(run.took);
            over[i].push(run.over_capacity);
        }
    }
    let medians: Vec<Duration> = times.iter().map(|t| median(t.clone())).collect();
    let fixed = clients.len() - 1;
    let best_fixed = medians[..fixed].iter().min().copied().unwrap();
    let fixed_100 = *medians.get(4).unwrap_or(&medians[fixed]);
    println!("\n600 ids, capacity 10 (+100 ms per request over it), {rounds} rounds:\n");
    println!("(time: the median over the rounds)\n");
    let last = if short { "/ adaptive" } else { "/ fixed 100" };
    println!(
        "{:<18} {:>9} {:>19} {:>12} {:>12} {:>14}",
        "client", "time (s)", "range (s)", "/ best fixed", last, "over capacity"
    );
    for (i, (name, _)) in clients.iter().enumerate() {
        let low = times[i].iter().min().unwrap().as_secs_f64();
        let high = times[i].iter().max().unwrap().as_secs_f64();
        let share = over[i].iter().sum::<f64>() / over[i].len() as f64;
        println!(
            "{name:<18} {:>9.2} {:>19} {:>12.2} {:>12.2} {:>13.1}%",
            medians[i].as_secs_f64(),
            format!("{low:.2}-{high:.2}"),
            medians[i].as_secs_f64() / best_fixed.as_secs_f64(),
            medians[i].as_secs_f64() / fixed_100.as_secs_f64(),
            share * 100.0,
        );
    }
}

fn refusals(server: &ChaosServer) -> usize {
    server
        .visits()
        .iter()
        .filter(|visit| matches!(visit.fault, Fault::Answer { status: 429, .. }))
        .count()
}

async fn quota_run(
    concurrency: Concurrency,
    pause: bool,
    headers: Option<bool>,
    ids: u32,
) -> (usize, usize, Duration) {
    let (server, builder) = match headers {
        None => (
            load::quota_server(20, Duration::from_secs(1), false),
            FanOut::builder(),
        ),
        Some(read) => (
            load::quota_server(20, Duration::from_secs(2), true),
            FanOut::builder().respect_rate_limit_headers(read),
        ),
    };
    let fan: FanOut<u32, Item> = builder
        .detail_url(&server.template())
        .concurrency(concurrency)
        .pause_on_retry_after(pause)
        .retry(RetryPolicy::exponential().max_retries(30))
        .build()
        .unwrap();
    let started = Instant::now();
    let all = fan.fan_out(0..ids).try_collect_ordered().await.unwrap();
    let took = started.elapsed();
    assert_eq!(all.len(), ids as usize);
    (refusals(&server), server.visits().len(), took)
}

async fn quota() {
    println!("\nA quota of 20 requests a second, 429 with Retry-After: 1 past it; 100 ids:\n");
    println!(
        "{:<34} {:>6} {:>9} {:>9}",
        "client", "429s", "requests", "time (s)"
    );
    let clients = [
        ("fixed 8, no pause", Concurrency::fixed(8), false),
        ("fixed 8, pause (default)", Concurrency::fixed(8), true),
        (
            "adaptive(1, 8), no pause",
            Concurrency::adaptive(1, 8),
            false,
        ),
        ("adaptive(1, 8), pause", Concurrency::adaptive(1, 8), true),
    ];
    for (name, concurrency, pause) in clients {
        let (refused, requests, took) = quota_run(concurrency, pause, None, 100).await;
        println!(
            "{name:<34} {refused:>6} {requests:>9} {:>9.2}",
            took.as_secs_f64()
        );
    }
    println!(
        "\nA quota of 20 requests per 2 s with RateLimit-Remaining / RateLimit-Reset; 80 ids:\n"
    );
    println!(
        "{:<34} {:>6} {:>9} {:>9}",
        "client", "429s", "requests", "time (s)"
    );
    for (name, read) in [
        ("fixed 8, headers not read", false),
        ("fixed 8, headers read", true),
    ] {
        let (refused, requests, took) =
            quota_run(Concurrency::fixed(8), true, Some(read), 80).await;
        println!(
            "{name:<34} {refused:>6} {requests:>9} {:>9.2}",
            took.as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = args.iter().find_map(|arg| arg.parse().ok()).unwrap_or(2);
    let only = |part: &str| {
        let named = ["capacity", "quota"];
        !args.iter().any(|arg| named.contains(&arg.as_str())) || args.iter().any(|arg| arg == part)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        if only("capacity") || args.iter().any(|arg| arg == "short") {
            capacity(rounds, args.iter().any(|arg| arg == "short")).await;
        }
        if only("quota") && !args.iter().any(|arg| arg == "short") {
            quota().await;
        }
    });
}
