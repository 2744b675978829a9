//! The `fanout` command against the program a library user would write for the same
//! job, side by side on one server; and the command's memory as the ids grow.
//!
//! ```text
//! cargo bench --bench cli                     # 3 rounds, 100,000 ids, then the memory runs
//! cargo bench --bench cli -- 5 200000         # rounds, ids
//! ```
//!
//! **Overhead.** An in-process server answers every `GET /items/{id}` at once with the
//! same 230-byte JSON record. Both clients read the ids from one file (one per line),
//! fetch each at concurrency 64 and write one JSON line per id to a file of their own:
//!
//! - `library`: this binary as a child process (`--client`): ids read line by line
//!   into `fan_out_stream`, each record decoded into a `serde_json::Value` and written
//!   as `{"id":…,"ok":true,"data":…}` through a `BufWriter`;
//! - `command`: `fanout --ids-file ids.txt --detail-url … -c 64 -o out.ndjson -q`.
//!
//! Each is a process of its own, so its CPU time and peak RSS (from `wait4`) are its
//! own; the server's are not counted. The two run back to back, in alternating order,
//! and the ratio command / library is taken per round; the medians are reported.
//!
//! **Memory.** The command's peak RSS at 100,000 and at 1,000,000 ids, fresh and then
//! resuming a complete file (every id skipped): what its set of seen ids costs.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use fanout::FanOut;
use futures::StreamExt;

const BODY: &str = r#"{"id":1234567,"name":"Player Name","country":"ZA","role":"batter","stats":{"matches":112,"runs":8420,"average":45.3,"strike_rate":88.1,"hundreds":21,"fifties":40},"career":{"debut":"2012-03-01","last":"2024-11-30"},"active":true}"#;
const CONCURRENCY: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--client") {
        return library_client(&args[1], Path::new(&args[2]), Path::new(&args[3]));
    }
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(3);
    let ids: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let addr = runtime.block_on(serve());
    let template = format!("http://{addr}/items/{{id}}");
    let dir = std::env::temp_dir().join(format!("fanout-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    println!("overhead: {ids} ids, concurrency {CONCURRENCY}, {rounds} rounds");
    let id_file = write_ids(&dir, ids);
    let mut ratios = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let library = || run_library(&template, &id_file, &dir.join("library.ndjson"));
        let command = || run_command(&template, &id_file, &dir.join("command.ndjson"), false);
        let (lib, cmd) = if round % 2 == 0 {
            let lib = library();
            (lib, command())
        } else {
            let cmd = command();
            (library(), cmd)
        };
        println!("  round {round}: library {lib}");
        println!("  round {round}: command {cmd}");
        ratios.0.push(cmd.wall / lib.wall);
        ratios.1.push(cmd.cpu / lib.cpu);
        ratios.2.push(cmd.rss_kib as f64 / lib.rss_kib as f64);
    }
    println!(
        "command / library, median of {rounds}: wall time {:.3}, CPU time {:.3}, peak RSS {:.2}",
        median(ratios.0),
        median(ratios.1),
        median(ratios.2)
    );

    println!("memory of the command:");
    let mut peaks = Vec::new();
    for ids in [100_000u64, 1_000_000] {
        let id_file = write_ids(&dir, ids);
        let out = dir.join("memory.ndjson");
        let _ = std::fs::remove_file(&out);
        let fresh = run_command(&template, &id_file, &out, false);
        let resumed = run_command(&template, &id_file, &out, true);
        println!("  {ids:>9} ids: fresh {fresh}; resuming the complete file {resumed}");
        peaks.push((ids, fresh.rss_kib));
    }
    let ((few, low), (many, high)) = (peaks[0], peaks[1]);
    println!(
        "  each id beyond {few} added {:.0} bytes to the peak (the set of ids seen)",
        (high.saturating_sub(low) as f64 * 1024.0) / (many - few) as f64
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/items/{id}",
        get(|| async { ([(CONTENT_TYPE, "application/json")], BODY) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn write_ids(dir: &Path, ids: u64) -> PathBuf {
    let path = dir.join(format!("ids-{ids}.txt"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for id in 0..ids {
        writeln!(file, "{}", 1_000_000 + id).unwrap();
    }
    file.flush().unwrap();
    path
}

struct Run {
    wall: f64,
    cpu: f64,
    rss_kib: u64,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} s, CPU {:.2} s, peak RSS {:.1} MiB",
            self.wall,
            self.cpu,
            self.rss_kib as f64 / 1024.0
        )
    }
}

fn run_library(template: &str, ids: &Path, out: &Path) -> Run {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.arg("--client").arg(template).arg(ids).arg(out);
    measure(command)
}

fn run_command(template: &str, ids: &Path, out: &Path, resume: bool) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command
        .args(["--detail-url", template, "-c", "64", "-q", "--ids-file"])
        .arg(ids)
        .arg("-o")
        .arg(out)
        .arg(if resume { "--resume" } else { "--overwrite" });
    measure(command)
}

/// Runs `command` to its end; its wall time, CPU time and peak RSS, from `wait4`.
fn measure(mut command: Command) -> Run {
    let started = Instant::now();
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by wait4, which also gives its resource usage"
    )]
    let child = command.spawn().unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid, and wait4 fills it for the child it reaps.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to the two out-values.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(reaped, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} ended with status {status}"
    );
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Run {
        wall,
        cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    }
}

/// What a library user would write for the job: ids from a file, one JSON line each.
fn library_client(template: &str, ids: &Path, out: &Path) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let fan = FanOut::<String, serde_json::Value>::builder()
            .detail_url(template)
            .concurrency(CONCURRENCY)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let lines = std::io::BufReader::new(std::fs::File::open(ids).unwrap()).lines();
        let ids = futures::stream::iter(lines.map(Result::unwrap));
        let mut out = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
        let mut done = fan.fan_out_stream(ids).as_completed();
        while let Some((id, result)) = done.next().await {
            let line = match result {
                Ok(data) => serde_json::json!({"id": id, "ok": true, "data": data}),
                Err(err) => serde_json::json!({"id": id, "ok": false, "error": err.to_string()}),
            };
            serde_json::to_writer(&mut out, &line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        out.flush().unwrap();
    });
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
