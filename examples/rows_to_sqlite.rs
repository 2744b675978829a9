//! Recipe: millions of ids from a database table, one detail call each, results written
//! back in batches, in bounded memory, resumable after a crash (the 4-million-row job
//! of the write-up this crate grew from).
//!
//! - A blocking thread walks a SQLite cursor over the ids that have no result yet and
//!   hands them over a bounded channel: ids are read only as the fan-out takes them.
//! - Outcomes go over another bounded channel to a writer thread, which commits them
//!   1,000 at a time: a location row per success, a failure row per failed id.
//! - Killed at any point, a rerun starts the cursor again and skips every id with a
//!   result: at most the last uncommitted batch is fetched twice.
//!
//! ```text
//! cargo run --release --example rows_to_sqlite                  # 200,000 ids
//! cargo run --release --example rows_to_sqlite -- 4000000       # the full job
//! cargo run --release --example rows_to_sqlite -- 200000 50000  # stop after 50,000, as if killed
//! ```
//!
//! The database is `fanout-rows.db` in the temporary directory; run again to resume,
//! delete it to start over.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::Path as UrlPath;
use axum::routing::get;
use fanout::{Error, FanOut};
use futures::StreamExt;
use rusqlite::{Connection, params};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

#[derive(Debug, Deserialize)]
struct Entity {
    label: String,
    location: Option<Location>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Location {
    city_label: Option<String>,
    country: Option<String>,
    lat: f64,
    long: f64,
}

const BATCH: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: i64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200_000);
    let stop_after: Option<u64> = args.next().map(|a| a.parse()).transpose()?;
    let db = std::env::temp_dir().join("fanout-rows.db");
    prepare(&db, rows)?;

    let addr = start_entity_api().await?;
    let entities = FanOut::<i64, Entity>::builder()
        .detail_url(&format!(
            "http://{addr}/api/v2/entities/{{id}}?select=id,label,location"
        ))
        .concurrency(64)
        .requests_per_second(20_000)
        .timeout(Duration::from_secs(10))
        .build()?;

    // Ids: a cursor on its own thread, a thousand ahead at most.
    let (id_sender, id_receiver) = mpsc::channel::<i64>(BATCH);
    let cursor_db = db.clone();
    let reader = std::thread::spawn(move || read_ids(&cursor_db, &id_sender));
    let ids = futures::stream::unfold(id_receiver, |mut ids| async move {
        let id = ids.recv().await?;
        Some((id, ids))
    });

    // Outcomes: a writer on its own thread, committing a batch at a time.
    let (sink, outcomes) = mpsc::channel::<(i64, Result<Entity, Error>)>(4 * BATCH);
    let writer_db = db.clone();
    let writer = std::thread::spawn(move || write_outcomes(&writer_db, outcomes));

    let started = Instant::now();
    let mut done = entities.fan_out_stream(ids).as_completed();
    let mut handed = 0u64;
    while let Some(outcome) = done.next().await {
        if sink.send(outcome).await.is_err() {
            break; // the writer failed: its error is reported below
        }
        handed += 1;
        if stop_after == Some(handed) {
            println!("stopping after {handed} outcomes, as if killed; run again to resume");
            break;
        }
    }
    drop((done, sink));
    let written = writer.join().map_err(|_| "the writer panicked")??;
    reader.join().map_err(|_| "the reader panicked")??;

    let (located, failed, remaining) = tally(&db)?;
    println!(
        "{written} outcomes written in {:.1} s; the table now has {located} results and \
         {failed} failures, {remaining} ids without a result (a rerun tries them); peak memory {} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_mib(),
    );
    Ok(())
}

/// The ids table, filled once, and the tables the results go to.
fn prepare(db: &Path, rows: i64) -> rusqlite::Result<()> {
    let conn = Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS master (id INTEGER PRIMARY KEY);
         CREATE TABLE IF NOT EXISTS location (
             id INTEGER PRIMARY KEY, label TEXT, city TEXT, country TEXT, lat REAL, long REAL);
         CREATE TABLE IF NOT EXISTS failure (id INTEGER PRIMARY KEY, kind TEXT, status INTEGER, message TEXT);",
    )?;
    let have: i64 = conn.query_row("SELECT count(*) FROM master", [], |row| row.get(0))?;
    if have < rows {
        println!("filling master with {rows} ids");
        conn.execute(
            "INSERT OR IGNORE INTO master (id)
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             SELECT i FROM n",
            params![rows],
        )?;
    }
    Ok(())
}

/// Sends every id without a location yet, in id order; failed ids are tried again.
fn read_ids(db: &Path, ids: &mpsc::Sender<i64>) -> rusqlite::Result<()> {
    let conn = Connection::open(db)?;
    let mut statement = conn.prepare(
        "SELECT m.id FROM master m LEFT JOIN location l ON l.id = m.id
         WHERE l.id IS NULL ORDER BY m.id",
    )?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        if ids.blocking_send(row.get(0)?).is_err() {
            break; // the fan-out stopped
        }
    }
    Ok(())
}

/// Commits outcomes `BATCH` at a time; returns how many it wrote.
fn write_outcomes(
    db: &Path,
    mut outcomes: mpsc::Receiver<(i64, Result<Entity, Error>)>,
) -> rusqlite::Result<u64> {
    let mut conn = Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut written = 0;
    while outcomes.blocking_recv_many(&mut batch, BATCH) > 0 {
        let tx = conn.transaction()?;
        {
            let mut located = tx.prepare_cached(
                "INSERT OR REPLACE INTO location VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut failed =
                tx.prepare_cached("INSERT OR REPLACE INTO failure VALUES (?1, ?2, ?3, ?4)")?;
            let mut cleared = tx.prepare_cached("DELETE FROM failure WHERE id = ?1")?;
            for (id, outcome) in batch.drain(..) {
                match outcome {
                    Ok(Entity { label, location }) => {
                        let (city, country, lat, long) = match location {
                            Some(at) => (at.city_label, at.country, Some(at.lat), Some(at.long)),
                            None => (None, None, None, None),
                        };
                        located.execute(params![id, label, city, country, lat, long])?;
                        cleared.execute(params![id])?;
                    }
                    Err(err) => {
                        let status = err.status().map(|status| status.as_u16());
                        failed.execute(params![
                            id,
                            err.kind().as_str(),
                            status,
                            err.to_string()
                        ])?;
                    }
                }
                written += 1;
            }
        }
        tx.commit()?;
    }
    Ok(written)
}

fn tally(db: &Path) -> rusqlite::Result<(i64, i64, i64)> {
    let conn = Connection::open(db)?;
    let count = |sql: &str| conn.query_row(sql, [], |row| row.get::<_, i64>(0));
    let located = count("SELECT count(*) FROM location")?;
    let failed = count("SELECT count(*) FROM failure")?;
    let all = count("SELECT count(*) FROM master")?;
    Ok((located, failed, all - located))
}

/// The process's peak resident memory (Linux), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    kib / 1024
}

// ---------------------------------------------------------------------------------
// The stand-in API: every id has an entity; one in 50 has no location, one in 1,000
// is missing (404).

async fn start_entity_api() -> std::io::Result<SocketAddr> {
    let app = Router::new().route("/api/v2/entities/{id}", get(entity));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn entity(
    UrlPath(id): UrlPath<i64>,
) -> Result<Json<serde_json::Value>, axum::http::StatusCode> {
    if id % 1000 == 999 {
        return Err(axum::http::StatusCode::NOT_FOUND);
    }
    let country = ["ZA", "NL", "US", "JP"][usize::try_from(id % 4).unwrap_or(0)];
    let location = (id % 50 != 0).then(|| {
        json!({
            "geoLabel": format!("Site {id}"),
            "cityLabel": format!("City {}", id % 700),
            "country": country,
            "lat": (id % 180) as f64 - 90.0,
            "long": (id % 360) as f64 - 180.0,
        })
    });
    Ok(Json(
        json!({"id": id, "label": format!("Entity {id}"), "location": location}),
    ))
}
