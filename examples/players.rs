//! Recipe: a list endpoint gives the player ids, then one detail call per player, with
//! an API token and `include=` as query parameters on every call (the cricket API of
//! the write-up this crate grew from). A local API stands in for the real one.
//!
//! ```text
//! cargo run --example players
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use fanout::{FanOut, Pagination};
use serde::Deserialize;
use serde_json::json;

const TOKEN: &str = "demo-token";
const PLAYERS: u64 = 250;

/// Only the fields we need; serde ignores the rest.
#[derive(Debug, Deserialize)]
struct Player {
    id: u64,
    fullname: String,
    career: Vec<Season>,
}

#[derive(Debug, Deserialize)]
struct Season {
    runs: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = start_cricket_api().await?;
    // In real use the token comes from the environment, not from the source.
    let token = std::env::var("CRICKET_API_TOKEN").unwrap_or_else(|_| TOKEN.to_owned());

    let players = FanOut::<u64, Player>::builder()
        // The list URL is used as given: its own query carries the token.
        .list_url(&format!(
            "http://{addr}/players?country_id=7&api_token={token}"
        ))
        .ids_at("/data")
        .paginate(Pagination::page_number("page"))
        .detail_url(&format!("http://{addr}/players/{{id}}"))
        // Appended to every detail URL: /players/42?api_token=...&include=career
        .query(&[("api_token", token.as_str()), ("include", "career")])
        .concurrency(16)
        .requests_per_second(100)
        .timeout(Duration::from_secs(10))
        .build()?;

    let ids = players.list_ids().await?;
    println!("{} players listed", ids.len());
    let results = players.fan_out(ids.clone()).collect_ordered().await;

    let mut best: Option<(u32, String)> = None;
    for (id, result) in ids.iter().zip(results) {
        match result {
            Ok(player) => {
                let runs = player.career.iter().map(|season| season.runs).sum();
                if best.as_ref().is_none_or(|(most, _)| runs > *most) {
                    best = Some((runs, format!("{} (id {})", player.fullname, player.id)));
                }
            }
            // Errors name the id and the URL; with the token in the query, so does
            // the URL: log them where secrets may go, or put the token in a header.
            Err(err) => println!("player {id}: {}", err.kind()),
        }
    }
    if let Some((runs, who)) = best {
        println!("most career runs: {who}, {runs}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The stand-in API: 250 players, listed 100 a page; every call needs the token.

async fn start_cricket_api() -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/players", get(list))
        .route("/players/{id}", get(player));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[derive(Deserialize)]
struct Params {
    api_token: Option<String>,
    page: Option<u64>,
    include: Option<String>,
}

fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": "api_token"})),
    )
        .into_response()
}

async fn list(Query(params): Query<Params>) -> Response {
    if params.api_token.as_deref() != Some(TOKEN) {
        return unauthorised();
    }
    let page = params.page.unwrap_or(1).max(1);
    let ids: Vec<_> = (1..=PLAYERS)
        .skip(usize::try_from((page - 1) * 100).unwrap_or(usize::MAX))
        .take(100)
        .map(|id| json!({"id": id, "country_id": 7}))
        .collect();
    Json(json!({ "data": ids })).into_response()
}

async fn player(Path(id): Path<u64>, Query(params): Query<Params>) -> Response {
    if params.api_token.as_deref() != Some(TOKEN) {
        return unauthorised();
    }
    tokio::time::sleep(Duration::from_millis(5 + id % 20)).await;
    let career = if params.include.as_deref() == Some("career") {
        (0..id % 7)
            .map(|season| json!({"season": 2010 + season, "runs": (id * 37 + season * 11) % 900}))
            .collect()
    } else {
        Vec::new()
    };
    Json(json!({"id": id, "fullname": format!("Player {id}"), "career": career})).into_response()
}
