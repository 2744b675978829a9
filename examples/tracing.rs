//! What a run writes to `tracing`, for a small run with retries and failures against a
//! local API (no outside network): the spans say which batch, id and attempt each
//! event belongs to.
//!
//! ```text
//! cargo run --example tracing
//! ```
//!
//! Ten ids: ids 3 and 6 answer 503 the first time (retried), id 7 answers 404 (failed),
//! and a rate limit of 3 requests a second with a burst of 2 makes the later attempts
//! wait for a token (logged when the wait reaches a second); the run takes about 4 s. Only `fanout`'s own events are
//! shown; drop the filter to see hyper's connection events inside the same spans.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fanout::{FanOut, Quota, RetryPolicy};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Item {
    id: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_ansi(false))
        .with(Targets::new().with_target("fanout", Level::DEBUG))
        .init();

    let failed_once: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let app = Router::new()
        .route("/items/{id}", get(item))
        .with_state(failed_once);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let three_a_second = Quota::per_second(NonZeroU32::new(3).ok_or("zero")?)
        .allow_burst(NonZeroU32::new(2).ok_or("zero")?);
    let items = FanOut::<u64, Item>::builder()
        .detail_url(&format!("http://{addr}/items/{{id}}"))
        .bearer_auth("never-shown") // secrets appear in no span and no event
        .concurrency(4)
        .rate_limit(three_a_second)
        .retry(RetryPolicy::exponential().initial_delay(Duration::from_millis(50)))
        .build()?;
    let (_results, stats) = items.fan_out(0..10).collect_ordered_with_stats().await;
    println!("\n{stats}");
    Ok(())
}

/// `GET /items/{id}`: ids 3 and 6 answer 503 the first time, id 7 is missing.
async fn item(
    State(failed_once): State<Arc<Mutex<HashSet<u64>>>>,
    Path(id): Path<u64>,
) -> Response {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let first_time = failed_once
        .lock()
        .map(|mut seen| seen.insert(id))
        .unwrap_or(false);
    match id {
        7 => (StatusCode::NOT_FOUND, "{\"error\":\"no such item\"}").into_response(),
        3 | 6 if first_time => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        _ => axum::Json(serde_json::json!({ "id": id })).into_response(),
    }
}
