//! The main job, end to end, with no outside network: start a local players API (a
//! paginated list of player ids, and one detail record per id, with some latency, a few
//! missing records and some flaky answers), list the ids page by page, fetch every
//! player's record as the pages arrive with a progress bar on the terminal, and print
//! the run's statistics.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- 20000 128   # ids, concurrency
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fanout::{FanOut, Pagination, Progress, RetryPolicy};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
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

    let api = Arc::new(Api {
        players: ids,
        ..Api::default()
    });
    let addr = start_players_api(Arc::clone(&api)).await?;
    println!(
        "players API listening on http://{addr}: {ids} players listed {PAGE_SIZE} a page; \
         details take 5-25 ms, ~1% missing, ~3% fail once with 503"
    );

    let players = FanOut::<u64, Player>::builder()
        .list_url(&format!("http://{addr}/players?per_page={PAGE_SIZE}"))
        .ids_at("/data")
        .total_at("/meta/total")
        .paginate(Pagination::link_header())
        .detail_url(&format!("http://{addr}/players/{{id}}"))
        .query(&[("include", "career")])
        .concurrency(concurrency)
        .retry(RetryPolicy::default()) // the default, spelled out: transient failures, 3 retries
        .timeout(Duration::from_secs(5))
        .build()?;

    // Ids flow from each list page straight into detail requests; a list page that
    // cannot be read would end the stream with an `Err` (hence the `try_` form).
    let batch = players.fan_out_listed();
    let progress = batch.progress();
    let bar = progress_bar(progress.clone());
    let mut ok = 0u64;
    let mut runs = 0u64;
    let mut first_failure = None;
    let mut done = batch.try_as_completed();
    while let Some((_id, result)) = done.try_next().await? {
        match result {
            Ok(player) => {
                ok += 1;
                runs += u64::from(player.runs);
            }
            Err(err) => {
                first_failure.get_or_insert_with(|| err.to_string());
            }
        }
    }
    bar.abort();
    let _ = bar.await;

    println!("\n{}", progress.stats());
    println!("{:<12} {ok} players, {runs} runs between them", "fetched");
    if let Some(example) = first_failure {
        println!("{:<12} {example}", "e.g.");
    }
    println!(
        "{:<12} {} detail requests and {} list pages, concurrency {concurrency}",
        "server saw",
        api.requests.load(Ordering::Relaxed),
        api.pages.load(Ordering::Relaxed),
    );
    Ok(())
}

/// A progress bar on stderr (drawn only when it is a terminal), fed from the batch's
/// progress handle ten times a second. Its length is the total the list's first page
/// gives (`total_at`), as soon as that has been read.
fn progress_bar(progress: Progress) -> tokio::task::JoinHandle<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40.cyan/blue} {pos}/{len} ids  {msg}  elapsed {elapsed}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    tokio::spawn(async move {
        let _clear = ClearOnDrop(bar.clone());
        loop {
            let now = progress.snapshot();
            bar.set_length(now.total.unwrap_or(now.admitted));
            bar.set_position(now.done());
            bar.set_message(format!(
                "{:.0} req/s, {} in flight, {} failed, {} retries",
                now.rate, now.in_flight, now.failed, now.retries
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Clears the bar when its task ends (it is aborted once the run is done).
struct ClearOnDrop(ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

const PAGE_SIZE: u64 = 100;

/// What the demo API knows: how many players there are, requests served, and which
/// flaky ids already failed.
#[derive(Default)]
struct Api {
    players: u64,
    requests: AtomicU64,
    pages: AtomicU64,
    failed_once: Mutex<HashSet<u64>>,
}

/// Starts the demo API on a free loopback port and returns its address.
async fn start_players_api(api: Arc<Api>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/players", get(list))
        .route("/players/{id}", get(player))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[derive(Deserialize)]
struct ListQuery {
    page: Option<u64>,
    per_page: u64,
}

/// `GET /players?per_page=100&page=2`: `{"data": [{"id": 101}, ...], "meta": {"total": 3000}}`,
/// with a `Link` header to the next page.
async fn list(State(api): State<Arc<Api>>, Query(query): Query<ListQuery>) -> Response {
    api.pages.fetch_add(1, Ordering::Relaxed);
    let page = query.page.unwrap_or(1).max(1);
    let per_page = query.per_page.clamp(1, 1000);
    let first = (page - 1).saturating_mul(per_page).saturating_add(1);
    let last = first.saturating_add(per_page - 1).min(api.players);
    let data: Vec<_> = (first..=last)
        .map(|id| serde_json::json!({ "id": id }))
        .collect();
    let body = serde_json::json!({ "data": data, "meta": { "total": api.players } });
    let mut response = axum::Json(body).into_response();
    if last < api.players {
        let next = format!(
            "</players?per_page={per_page}&page={}>; rel=\"next\"",
            page + 1
        );
        if let Ok(value) = next.parse() {
            response
                .headers_mut()
                .insert(axum::http::header::LINK, value);
        }
    }
    response
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
