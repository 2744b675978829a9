//! Recipe: string ids from `/videos/?n=100`, one detail call per video, against a server
//! that gets slower once more than 10 requests are in flight. A fixed concurrency must
//! be guessed; `Concurrency::adaptive` finds the server's pace by itself. Runs the job
//! three ways and prints how long each took.
//!
//! ```text
//! cargo run --release --example videos
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use fanout::{Concurrency, FanOut};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
struct Video {
    id: String,
    title: String,
    views: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = start_video_api().await?;
    for (name, concurrency) in [
        ("fixed 10 (the right guess)", Concurrency::fixed(10)),
        ("fixed 100 (a bad guess)", Concurrency::fixed(100)),
        ("adaptive 1..100", Concurrency::adaptive(1, 100)),
    ] {
        let videos = FanOut::<String, Video>::builder()
            .list_url(&format!("http://{addr}/videos/?n=300")) // ["student", "draw", ...]
            .detail_url(&format!("http://{addr}/videos/{{id}}"))
            .concurrency(concurrency)
            .timeout(Duration::from_secs(30))
            .build()?;
        let started = Instant::now();
        let batch = videos.fan_out_listed();
        let progress = batch.progress();
        let all = batch.try_collect_ordered().await?;
        let views: u64 = all.iter().map(|video| video.views).sum();
        println!(
            "{name:<28} {} videos in {:>5.2} s, {views} views; limit at the end: {}",
            all.len(),
            started.elapsed().as_secs_f64(),
            progress.snapshot().concurrency_limit,
        );
        if let Some(video) = all.first() {
            assert!(!video.title.is_empty() && !video.id.is_empty());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The stand-in API. `/videos/?n=N` lists N string ids; a detail takes 20 ms with up to
// 10 requests in flight, and 30 ms more for each request beyond 10.

const WORDS: [&str; 12] = [
    "student", "draw", "yes", "river", "orbit", "lantern", "copper", "meadow", "signal", "harbor",
    "quartz", "violet",
];

#[derive(Deserialize)]
struct ListQuery {
    n: Option<usize>,
}

async fn start_video_api() -> std::io::Result<SocketAddr> {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/videos/",
            get(|Query(query): Query<ListQuery>| async move {
                let ids: Vec<String> = (0..query.n.unwrap_or(100))
                    .map(|n| format!("{}-{n}", WORDS[n % WORDS.len()]))
                    .collect();
                Json(ids)
            }),
        )
        .route("/videos/{id}", get(video))
        .with_state(in_flight);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn video(
    State(in_flight): State<Arc<AtomicUsize>>,
    Path(id): Path<String>,
) -> Json<serde_json::Value> {
    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let over = u64::try_from(now.saturating_sub(10)).unwrap_or(u64::MAX);
    tokio::time::sleep(Duration::from_millis(20 + 30 * over)).await;
    in_flight.fetch_sub(1, Ordering::SeqCst);
    let views = id.bytes().map(u64::from).sum::<u64>() * 1000;
    Json(json!({"id": id, "title": format!("All about {id}"), "views": views}))
}
