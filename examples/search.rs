//! Recipe: one search query POSTed per id, with `request_with`: the id travels in a JSON
//! body to one fixed URL, with a bearer token, under a rate limit, and the answers
//! come back in input order.
//!
//! ```text
//! cargo run --example search
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use fanout::{FanOut, RetryPolicy};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
struct Hits {
    total: u64,
    hits: Vec<Hit>,
}

#[derive(Debug, Deserialize)]
struct Hit {
    label: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = start_search_api().await?;
    let queries = [
        "ada lovelace",
        "grace hopper",
        "edsger dijkstra",
        "barbara liskov",
    ];

    let search = FanOut::<&'static str, Hits>::builder()
        // No `{id}` in the URL: with `request_with` the id may travel in the body only.
        .detail_url(&format!("http://{addr}/api/v2/search"))
        .request_with(|client, query: &&str, url| {
            client
                .post(url)
                .json(&json!({ "query": query, "select": ["id", "label"], "limit": 3 }))
        })
        .bearer_auth("s3cret") // added to every request the function makes
        .requests_per_second(20)
        .concurrency(4)
        // A search is safe to repeat; a POST that is not wants RetryPolicy::none().
        .retry(RetryPolicy::exponential().max_retries(3))
        .timeout(Duration::from_secs(10))
        .build()?;

    let results = search.fan_out(queries).collect_ordered().await;
    for (query, result) in queries.iter().zip(results) {
        match result {
            Ok(found) => {
                let labels: Vec<&str> = found.hits.iter().map(|hit| hit.label.as_str()).collect();
                println!("{query:<16} {} hits, first: {labels:?}", found.total);
            }
            Err(err) => println!("{query:<16} failed: {err}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The stand-in search API: POST /api/v2/search with {"query", "limit"} and a bearer token.

async fn start_search_api() -> std::io::Result<SocketAddr> {
    let app = Router::new().route("/api/v2/search", post(search));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn search(headers: HeaderMap, Json(body): Json<Value>) -> Result<Json<Value>, StatusCode> {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer s3cret") {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let query = body["query"].as_str().ok_or(StatusCode::BAD_REQUEST)?;
    let limit = body["limit"].as_u64().unwrap_or(10);
    let total = query.len() as u64 * 7;
    let hits: Vec<Value> = (1..=limit.min(total))
        .map(|n| json!({ "id": n, "label": format!("{query} #{n}") }))
        .collect();
    Ok(Json(json!({ "total": total, "hits": hits })))
}
