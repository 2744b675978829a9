//! Rate-limiter accuracy: how close the request rate a server sees comes to the
//! configured rate, for `fanout` and for a hand-written loop around governor's own
//! `until_ready`, side by side in one run.
//!
//! ```text
//! cargo bench --bench rate               # 3 rounds per configuration
//! cargo bench --bench rate -- 5          # rounds
//! ```
//!
//! The server runs on its own thread and runtime and stamps each arrival. Each run
//! sends `6 r + b` requests for a quota of rate `r` and burst `b`: the burst, then
//! about six seconds at the rate. The steady rate is measured over the arrivals after
//! the first second (so neither the burst nor connection set-up counts):
//! `(arrivals - 1) / (last - first of them)`. Also shown: the most requests seen in
//! any one-second window, against the quota's bound of `b + r` (the server stamps
//! arrivals when it gets to them, so a few that were sent apart can be stamped
//! together).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use fanout::{FanOut, Quota, RateLimiter, reqwest};
use futures::StreamExt;

const SECONDS: u32 = 6;
const CONCURRENCY: usize = 64;

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Item {
    id: u64,
}

type Arrivals = Arc<Mutex<Vec<Instant>>>;

async fn item(
    State(arrivals): State<Arrivals>,
    Path(id): Path<u64>,
) -> axum::Json<serde_json::Value> {
    arrivals.lock().unwrap().push(Instant::now());
    axum::Json(serde_json::json!({ "id": id }))
}

/// Starts the server on a thread of its own; returns its address and arrival log.
fn start_server() -> (SocketAddr, Arrivals) {
    let arrivals = Arrivals::default();
    let state = Arc::clone(&arrivals);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let app = Router::new()
                .route("/items/{id}", get(item))
                .with_state(state);
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), arrivals)
}

struct Measured {
    steady: f64,
    most_in_a_second: usize,
}

fn measure(arrivals: &Arrivals) -> Measured {
    let mut times = std::mem::take(&mut *arrivals.lock().unwrap());
    times.sort();
    let settled = times[0] + Duration::from_secs(1);
    let steady_times: Vec<Instant> = times.iter().copied().filter(|&at| at >= settled).collect();
    let span = (*steady_times.last().unwrap() - steady_times[0]).as_secs_f64();
    let steady = (steady_times.len() - 1) as f64 / span;
    let mut most_in_a_second = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] > Duration::from_secs(1) {
            start += 1;
        }
        most_in_a_second = most_in_a_second.max(end - start + 1);
    }
    Measured {
        steady,
        most_in_a_second,
    }
}

async fn run_fanout(addr: SocketAddr, quota: Quota, ids: u64) {
    let fan = FanOut::<u64, Item>::builder()
        .detail_url(&format!("http://{addr}/items/{{id}}"))
        .concurrency(CONCURRENCY)
        .rate_limit(quota)
        .build()
        .unwrap();
    let results = fan.fan_out(0..ids).collect_ordered().await;
    assert!(results.iter().all(Result::is_ok));
}

/// The loop a user would write: `until_ready` before each request, `buffer_unordered`.
async fn run_by_hand(addr: SocketAddr, quota: Quota, ids: u64) {
    let client = reqwest::Client::new();
    let limiter = RateLimiter::direct(quota);
    let (client, limiter) = (&client, &limiter);
    let ok = futures::stream::iter(0..ids)
        .map(|id| async move {
            limiter.until_ready().await;
            let response = client
                .get(format!("http://{addr}/items/{id}"))
                .send()
                .await
                .map_err(|err| err.to_string())?;
            let body = response.bytes().await.map_err(|err| err.to_string())?;
            serde_json::from_slice::<Item>(&body).map_err(|err| err.to_string())
        })
        .buffer_unordered(CONCURRENCY)
        .filter(|result| std::future::ready(result.is_ok()))
        .count()
        .await;
    assert_eq!(ok as u64, ids);
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map_or(3, |arg| arg.parse().expect("rounds must be a number"));
    let (addr, arrivals) = start_server();

    println!(
        "rate limiter accuracy, {rounds} rounds, median (min-max) of steady rate / configured rate"
    );
    println!(
        "{:>6} {:>6} {:<10} {:>22} {:>20}",
        "rate", "burst", "client", "achieved / configured", "max in 1 s (bound)"
    );
    for rate in [100u32, 1000] {
        // Burst 2 is the smallest that absorbs a late wake-up (up to one interval).
        let mut bursts = vec![rate, rate / 100, 2, 1];
        bursts.sort_unstable_by(|a, b| b.cmp(a));
        bursts.dedup();
        for burst in bursts {
            let quota = Quota::per_second(NonZeroU32::new(rate).unwrap())
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let ids = u64::from(rate * SECONDS + burst);
            let mut ratios = [Vec::new(), Vec::new()];
            let mut most = [0, 0];
            for _ in 0..rounds {
                // Alternate the two clients so that drift on the machine hits both.
                for (which, ratio) in ratios.iter_mut().enumerate() {
                    if which == 0 {
                        run_fanout(addr, quota, ids).await;
                    } else {
                        run_by_hand(addr, quota, ids).await;
                    }
                    let measured = measure(&arrivals);
                    ratio.push(measured.steady / f64::from(rate));
                    most[which] = most[which].max(measured.most_in_a_second);
                }
            }
            for (which, name) in ["fanout", "by hand"].iter().enumerate() {
                let values = &mut ratios[which];
                let (low, high) = (
                    values.iter().copied().fold(f64::INFINITY, f64::min),
                    values.iter().copied().fold(0.0, f64::max),
                );
                println!(
                    "{rate:>6} {burst:>6} {name:<10} {:>10.4} ({low:.4}-{high:.4}) {:>12} ({})",
                    median(values),
                    most[which],
                    rate + burst
                );
            }
        }
    }
}
