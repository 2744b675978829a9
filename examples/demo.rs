//! The main job, end to end, with no outside network: start a local players API with
//! some latency, a few missing records and some flaky answers, fan out to a few
//! thousand ids, and print a summary.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- 20000 128   # ids, concurrency
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fanout::{FanOut, RetryPolicy};
use futures::StreamExt;
use serde::Deserialize;

/// What the detail endpoint returns for one player.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Player {
    id: u64,
    name: String,
    country: String,
    matches: u32,
    runs: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let ids: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3_000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);

    let api = Arc::new(Api::default());
    let addr = start_players_api(Arc::clone(&api)).await?;
    println!(
        "players API listening on http://{addr} \
         (5-25 ms per answer, ~1% missing, ~3% fail once with 503)"
    );

    let players = FanOut::<u64, Player>::builder()
        .detail_url(&format!("http://{addr}/players/{{id}}"))
        .query(&[("include", "career")])
        .concurrency(concurrency)
        .retry(RetryPolicy::default()) // the default, spelled out: transient failures, 3 retries
        .timeout(Duration::from_secs(5))
        .build()?;

    let started = Instant::now();
    let mut ok = 0u64;
    let mut runs = 0u64;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_failure = None;
    let mut done = players.fan_out(1..=ids).as_completed();
    while let Some((_id, result)) = done.next().await {
        match result {
            Ok(player) => {
                ok += 1;
                runs += u64::from(player.runs);
            }
            Err(err) => {
                let reason = match err.status() {
                    Some(status) => status.to_string(),
                    None => err.kind().to_string(),
                };
                *failures.entry(reason).or_default() += 1;
                first_failure.get_or_insert_with(|| err.to_string());
            }
        }
    }
    let wall = started.elapsed();
    let failed: u64 = failures.values().sum();

    println!();
    println!("ids          {ids}");
    println!("concurrency  {concurrency}");
    println!("ok           {ok}  (total runs {runs})");
    println!("failed       {failed}");
    for (reason, count) in &failures {
        println!("  {reason:<22} {count}");
    }
    if let Some(example) = first_failure {
        println!("  e.g. {example}");
    }
    let requests = api.requests.load(Ordering::Relaxed);
    println!(
        "requests     {requests}  ({} retries after a 503)",
        requests.saturating_sub(ids)
    );
    println!("wall time    {:.2} s", wall.as_secs_f64());
    println!("requests/s   {:.0}", ids as f64 / wall.as_secs_f64());
    Ok(())
}

/// What the demo API remembers: requests served, and which flaky ids already failed.
#[derive(Default)]
struct Api {
    requests: AtomicU64,
    failed_once: Mutex<HashSet<u64>>,
}

/// Starts the demo API on a free loopback port and returns its address.
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
    // Deterministic per id, so runs are comparable: latency 5-25 ms, ~1% not found,
    // ~3% answer 503 the first time they are asked for.
    let mix = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    tokio::time::sleep(Duration::from_millis(5 + mix % 21)).await;
    if mix % 97 == 0 {
        return (StatusCode::NOT_FOUND, "{\"error\":\"no such player\"}").into_response();
    }
    if mix % 31 == 7 && api.failed_once.lock().unwrap().insert(id) {
        return (StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"try again\"}").into_response();
    }
    const COUNTRIES: [&str; 5] = [
        "India",
        "Australia",
        "England",
        "South Africa",
        "New Zealand",
    ];
    axum::Json(serde_json::json!({
        "id": id,
        "name": format!("Player {id}"),
        "country": COUNTRIES[(mix % 5) as usize],
        "matches": mix % 300,
        "runs": mix % 15_000,
    }))
    .into_response()
}
