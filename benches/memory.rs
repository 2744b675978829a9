//! Memory stays flat however many ids there are: peak RSS of a client process that
//! fans out to 100k and to 1M ids (a lazy `0..n` iterator, `as_completed`, each result
//! dropped as it arrives) against a fast local server.
//!
//! ```text
//! cargo bench --bench memory               # 100k and 1M ids, concurrency 64
//! cargo bench --bench memory -- 3          # 3 rounds of each, alternating
//! ```
//!
//! The server runs in this process; each client run is a child process (this same
//! binary, started with `--client <ids>`), so that its peak RSS (`VmHWM` from
//! `/proc/self/status`) is the client's alone. The ratio of the 1M run's peak to the
//! 100k run's is the figure of merit: flat memory means about 1.0.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Instant;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use fanout::FanOut;
use futures::StreamExt;
use support::peak_rss_kb;

const CONCURRENCY: usize = 64;
const SIZES: [u64; 2] = [100_000, 1_000_000];

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Item {
    id: u64,
    name: String,
}

async fn item(Path(id): Path<u64>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "id": id, "name": "a fixed, small record" }))
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    match args.next().as_deref() {
        Some("--client") => {
            let addr: SocketAddr = args.next().unwrap().parse().unwrap();
            let ids: u64 = args.next().unwrap().parse().unwrap();
            client(addr, ids);
        }
        rounds => {
            let rounds = rounds.map_or(1, |r| r.parse().expect("rounds must be a number"));
            compare(rounds);
        }
    }
}

/// One client run: fan out to `ids` ids and print "<peak RSS kB> <seconds>".
fn client(addr: SocketAddr, ids: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let ok = runtime.block_on(async {
        let fan = FanOut::<u64, Item>::builder()
            .detail_url(&format!("http://{addr}/items/{{id}}"))
            .concurrency(CONCURRENCY)
            .build()
            .unwrap();
        let mut done = fan.fan_out(0..ids).as_completed();
        let mut ok = 0u64;
        while let Some((_, result)) = done.next().await {
            ok += u64::from(result.is_ok());
        }
        ok
    });
    assert_eq!(ok, ids, "every id succeeded");
    println!("{} {:.2}", peak_rss_kb(), started.elapsed().as_secs_f64());
}

fn compare(rounds: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/items/{id}", get(item));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    let me = std::env::current_exe().unwrap();

    println!("peak RSS of the client, as_completed over a lazy 0..n, concurrency {CONCURRENCY}");
    let mut peaks = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        for (which, ids) in SIZES.iter().enumerate() {
            let output = runtime.block_on(async {
                tokio::task::spawn_blocking({
                    let me = me.clone();
                    move || {
                        Command::new(me)
                            .args(["--client", &addr.to_string(), &ids.to_string()])
                            .output()
                            .unwrap()
                    }
                })
                .await
                .unwrap()
            });
            assert!(output.status.success(), "{output:?}");
            let text = String::from_utf8(output.stdout).unwrap();
            let mut fields = text.split_whitespace();
            let peak: u64 = fields.next().unwrap().parse().unwrap();
            let seconds: f64 = fields.next().unwrap().parse().unwrap();
            println!(
                "round {round}: {ids:>9} ids  peak RSS {:>7.1} MiB  {seconds:>6.1} s  {:>6.0} req/s",
                peak as f64 / 1024.0,
                *ids as f64 / seconds
            );
            peaks[which].push(peak);
        }
    }
    let median = |values: &mut Vec<u64>| {
        values.sort_unstable();
        values[values.len() / 2]
    };
    let (small, large) = (median(&mut peaks[0]), median(&mut peaks[1]));
    println!(
        "median peak RSS: 100k ids {:.1} MiB, 1M ids {:.1} MiB, ratio {:.3}",
        small as f64 / 1024.0,
        large as f64 / 1024.0,
        large as f64 / small as f64
    );
}
