//! Throughput and CPU per request of `fanout` against the loop a user would write by
//! hand, side by side on one server; how close a fan-out over a slow server comes to
//! the ideal makespan; and the instructions each client spends per request.
//!
//! ```text
//! cargo bench --bench throughput                          # 5 rounds, 30,000 requests per run
//! cargo bench --bench throughput -- --rounds 15 --requests 30000
//! cargo bench --bench throughput -- --only throughput     # or: schedule, instructions
//! ```
//!
//! **Throughput.** A server process (this binary, started with `--serve`) answers
//! every `GET /items/{id}` at once with the same 230-byte JSON record. Each run is a
//! client process of its own (`--client`), so that peak RSS and CPU time are that
//! client's alone and no connection pool carries over. A run warms up (2 ×
//! concurrency requests) and then times `--requests` requests, all decoded into the
//! same struct, with one of six clients:
//!
//! - `buffered`: `stream::iter(ids).map(|id| fetch(id)).buffer_unordered(n)`, the
//!   hand-written reqwest loop;
//! - `spawned`: the same with `tokio::spawn` around each request;
//! - `buffered_timeout`: `buffered` with a 30 s per-request timeout (reqwest's), the
//!   one safeguard such a loop should have, to tell the cost of a timer per request
//!   from the rest of `fanout`'s;
//! - `as_completed` and `collect_ordered`: `fanout`, with a retry policy, a rate
//!   limit set too high to bind, a body size cap and a per-attempt timeout;
//! - `watched`: `as_completed` with what a user watching a long run adds: an
//!   `on_event` callback counting events, a task reading `progress()` ten times a
//!   second, and `stats()` at the end.
//!
//! Within a round the six run back to back, in an order shuffled from round to round.
//! Each variant's ratio to `buffered` is taken within a round and the median over the
//! rounds is reported, so slow phases of a noisy machine hit both sides of a ratio.
//! "Best a/b" is whichever of (a) and (b) has the higher median rate.
//!
//! **Scheduling.** A second server delays every answer by 20 ms; 5,000 ids at
//! concurrency 100 should take 5000 / 100 × 20 ms = 1 s. Reported: makespan / ideal,
//! and makespan / floor, the floor being 50 requests sent one at a time (each round
//! trip wakes idle threads on both sides, which costs this machine most of a
//! millisecond beyond the 20 ms; no client can schedule 50 waves faster than that).
//!
//! **Instructions.** Each client runs under callgrind (`valgrind` must be installed)
//! for 2,000 and for 10,000 requests; the difference in instructions over the 8,000
//! requests between is the cost of one request, free of start-up and warm-up. Unlike
//! CPU time this hardly moves from run to run (about 1%), but valgrind runs one thread
//! at a time, so it leaves out what threads cost each other.

mod support;

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use fanout::{FanOut, Quota, RetryPolicy, reqwest};
use futures::StreamExt;
use support::peak_rss_kb;

const CONCURRENCIES: [usize; 3] = [16, 64, 256];
const SCHEDULE_IDS: u64 = 5_000;
const SCHEDULE_CONCURRENCY: usize = 100;
const SCHEDULE_DELAY: Duration = Duration::from_millis(20);

/// What every request gets back.
const BODY: &str = r#"{"id":7,"name":"Jordan Example","team":"Riverside Comets","position":"guard","active":true,"stats":{"games":82,"points":2140,"assists":512,"rebounds":388,"minutes":2877.5},"tags":["all-star","veteran","captain"]}"#;

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Player {
    id: u64,
    name: String,
    team: String,
    position: String,
    active: bool,
    stats: Stats,
    tags: Vec<String>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Stats {
    games: u32,
    points: u32,
    assists: u32,
    rebounds: u32,
    minutes: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Buffered,
    Spawned,
    TimedOut,
    AsCompleted,
    Ordered,
    Watched,
}

const VARIANTS: [Variant; 6] = [
    Variant::Buffered,
    Variant::Spawned,
    Variant::TimedOut,
    Variant::AsCompleted,
    Variant::Ordered,
    Variant::Watched,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Buffered => "buffered",
            Variant::Spawned => "spawned",
            Variant::TimedOut => "buffered_timeout",
            Variant::AsCompleted => "as_completed",
            Variant::Ordered => "collect_ordered",
            Variant::Watched => "watched",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Buffered => "(a) buffer_unordered",
            Variant::Spawned => "(b) spawn + buffer_unordered",
            Variant::TimedOut => "(a') (a) + 30 s timeout",
            Variant::AsCompleted => "(c) fanout as_completed",
            Variant::Ordered => "(d) fanout collect_ordered",
            Variant::Watched => "(e) (c), watched",
        }
    }
}

impl FromStr for Variant {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        VARIANTS
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| format!("unknown variant {name:?}"))
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| arg != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("--serve") => serve(Duration::from_millis(number(&args, 1))),
        Some("--client") => {
            let variant: Variant = args[1].parse().unwrap();
            let addr: SocketAddr = args[2].parse().unwrap();
            let run = client(variant, addr, number(&args, 3), number(&args, 4));
            println!("{run}");
        }
        _ => compare(&Options::parse(&args)),
    }
}

fn number<N: FromStr>(args: &[String], at: usize) -> N
where
    N::Err: fmt::Debug,
{
    args[at].parse().unwrap()
}

struct Options {
    rounds: usize,
    requests: u64,
    throughput: bool,
    schedule: bool,
    instructions: bool,
}

impl Options {
    fn parse(args: &[String]) -> Self {
        let mut options = Options {
            rounds: 5,
            requests: 30_000,
            throughput: true,
            schedule: true,
            instructions: true,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().expect("a value after the option").as_str();
            match arg.as_str() {
                "--rounds" => options.rounds = value().parse().expect("--rounds N"),
                "--requests" => options.requests = value().parse().expect("--requests N"),
                "--only" => {
                    let only = value();
                    options.throughput = only == "throughput";
                    options.schedule = only == "schedule";
                    options.instructions = only == "instructions";
                    assert!(
                        options.throughput || options.schedule || options.instructions,
                        "--only throughput|schedule|instructions, not {only:?}"
                    );
                }
                other => panic!("unknown option {other:?}"),
            }
        }
        options
    }
}

// ---------------------------------------------------------------------------------
// The server process.

/// Serves `GET /items/{id}` with [`BODY`] after `delay`, prints its address, and
/// exits when its standard input closes (when the harness is done or gone).
fn serve(delay: Duration) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    println!("{}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    let timer = (!delay.is_zero()).then(Timer::start);
    let app = Router::new().route(
        "/items/{id}",
        get(move || async move {
            if let Some(timer) = timer {
                timer.sleep(delay).await;
            }
            ([(CONTENT_TYPE, "application/json")], BODY)
        }),
    );
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Sleeps timed by a thread of their own, to a fraction of a millisecond. Tokio's
/// timer works in whole milliseconds and rounds up, which would add about half a
/// millisecond to every 20 ms answer: the harness's error, not the client's.
#[derive(Clone)]
struct Timer {
    requests: std::sync::mpsc::Sender<(Instant, Wake)>,
}

type Wake = tokio::sync::oneshot::Sender<()>;

impl Timer {
    fn start() -> Self {
        let (requests, incoming) = std::sync::mpsc::channel::<(Instant, Wake)>();
        std::thread::spawn(move || {
            // Earliest deadline first; the counter keeps entries distinct.
            let mut due = std::collections::BTreeMap::<(Instant, u64), Wake>::new();
            let mut next_key = 0u64;
            loop {
                let now = Instant::now();
                while let Some(entry) = due.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let _ = entry.remove().send(());
                }
                let request = match due.first_key_value() {
                    Some(((at, _), _)) => {
                        match incoming.recv_timeout(at.saturating_duration_since(now)) {
                            Ok(request) => request,
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    None => match incoming.recv() {
                        Ok(request) => request,
                        Err(_) => return,
                    },
                };
                due.insert((request.0, next_key), request.1);
                next_key += 1;
            }
        });
        Timer { requests }
    }

    async fn sleep(&self, delay: Duration) {
        let (wake, woken) = tokio::sync::oneshot::channel();
        if self.requests.send((Instant::now() + delay, wake)).is_ok() {
            let _ = woken.await;
        }
    }
}

struct Server {
    process: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(delay: Duration) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["--serve", &delay.as_millis().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(process.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().parse().unwrap();
        Server { process, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.process.stdin.take()); // end of input: the server exits
        let _ = self.process.wait();
    }
}

// ---------------------------------------------------------------------------------
// The client process: one timed run of one variant.

/// One timed run, as a client process reports it.
struct Run {
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_kb: u64,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.seconds, self.cpu_seconds, self.peak_rss_kb
        )
    }
}

impl FromStr for Run {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [seconds, cpu, peak] = fields[..] else {
            return Err(format!("not a run: {line:?}"));
        };
        let bad = |err: &dyn fmt::Display| format!("{err} in {line:?}");
        Ok(Run {
            seconds: seconds.parse().map_err(|e| bad(&e))?,
            cpu_seconds: cpu.parse().map_err(|e| bad(&e))?,
            peak_rss_kb: peak.parse().map_err(|e| bad(&e))?,
        })
    }
}

fn client(variant: Variant, addr: SocketAddr, concurrency: usize, requests: u64) -> Run {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base: Arc<str> = format!("http://{addr}").into();
    let warm_up = 0..2 * concurrency as u64;
    let ids = 0..requests;
    let (seconds, cpu_seconds, ok) = runtime.block_on(async {
        match variant {
            Variant::Buffered | Variant::Spawned | Variant::TimedOut => {
                let client = if variant == Variant::TimedOut {
                    // The loop with the one safeguard every such loop should have.
                    reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()
                        .unwrap()
                } else {
                    reqwest::Client::new()
                };
                let run = |ids| by_hand(variant, &client, &base, ids, concurrency);
                run(warm_up).await;
                timed(run(ids)).await
            }
            Variant::AsCompleted | Variant::Ordered | Variant::Watched => {
                let events = Arc::new(AtomicU64::new(0));
                let counted = Arc::clone(&events);
                let mut builder = FanOut::<u64, Player>::builder()
                    .detail_url(&format!("{base}/items/{{id}}"))
                    .concurrency(concurrency)
                    .retry(RetryPolicy::exponential().max_retries(3))
                    .rate_limit(Quota::per_second(NonZeroU32::MAX))
                    .max_body_bytes(1 << 20)
                    .timeout(Duration::from_secs(30));
                if variant == Variant::Watched {
                    // What a user wiring metrics would do: count every event.
                    builder = builder.on_event(move |_| {
                        counted.fetch_add(1, Ordering::Relaxed);
                    });
                }
                let fan = builder.build().unwrap();
                let run = |ids| with_fanout(variant, &fan, ids);
                run(warm_up).await;
                timed(run(ids)).await
            }
        }
    });
    assert_eq!(ok, requests, "every request succeeded");
    Run {
        seconds,
        cpu_seconds,
        peak_rss_kb: peak_rss_kb(),
    }
}

/// Runs `work` (which counts successes) and returns (wall seconds, CPU seconds, count).
async fn timed(work: impl Future<Output = u64>) -> (f64, f64, u64) {
    let (cpu, started) = (cpu_seconds(), Instant::now());
    let ok = work.await;
    (started.elapsed().as_secs_f64(), cpu_seconds() - cpu, ok)
}

/// The hand-written loops: (a), (b) and (a').
async fn by_hand(
    variant: Variant,
    client: &reqwest::Client,
    base: &Arc<str>,
    ids: std::ops::Range<u64>,
    concurrency: usize,
) -> u64 {
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    // What `Response::json` does (reqwest's `json` feature is not enabled here).
    async fn fetch(client: &reqwest::Client, base: &str, id: u64) -> Result<Player, BoxError> {
        let response = client
            .get(format!("{base}/items/{id}"))
            .send()
            .await?
            .error_for_status()?;
        Ok(serde_json::from_slice(&response.bytes().await?)?)
    }
    let ids = futures::stream::iter(ids);
    if variant == Variant::Spawned {
        ids.map(|id| {
            let (client, base) = (client.clone(), Arc::clone(base));
            tokio::spawn(async move { fetch(&client, &base, id).await })
        })
        .buffer_unordered(concurrency)
        .fold(0, |ok, joined| async move {
            ok + u64::from(matches!(joined, Ok(Ok(_))))
        })
        .await
    } else {
        ids.map(|id| fetch(client, base, id))
            .buffer_unordered(concurrency)
            .fold(
                0,
                |ok, result| async move { ok + u64::from(result.is_ok()) },
            )
            .await
    }
}

/// `fanout`'s two outputs, (c) and (d), and (c) watched as a user would: (e).
async fn with_fanout(
    variant: Variant,
    fan: &FanOut<u64, Player>,
    ids: std::ops::Range<u64>,
) -> u64 {
    let batch = fan.fan_out(ids);
    if variant == Variant::Watched {
        // A progress reader ten times a second, as a progress bar would be, and the
        // run's statistics at the end.
        let progress = batch.progress();
        let reader = progress.clone();
        let watcher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::hint::black_box(reader.snapshot());
            }
        });
        let ok = batch
            .as_completed()
            .fold(0, |ok, (_, result)| async move {
                ok + u64::from(result.is_ok())
            })
            .await;
        watcher.abort();
        std::hint::black_box(progress.stats());
        return ok;
    }
    if variant == Variant::AsCompleted {
        batch
            .as_completed()
            .fold(0, |ok, (_, result)| async move {
                ok + u64::from(result.is_ok())
            })
            .await
    } else {
        let all = batch.collect_ordered().await;
        all.iter().filter(|result| result.is_ok()).count() as u64
    }
}

/// User plus system CPU time of this process so far, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The arguments that make this binary one client process (see `main`).
fn client_args(
    variant: Variant,
    addr: SocketAddr,
    concurrency: usize,
    requests: u64,
) -> [String; 5] {
    [
        "--client".into(),
        variant.name().into(),
        addr.to_string(),
        concurrency.to_string(),
        requests.to_string(),
    ]
}

/// Starts a client process for one run and waits for its report.
fn run_client(variant: Variant, addr: SocketAddr, concurrency: usize, requests: u64) -> Run {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(client_args(variant, addr, concurrency, requests))
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "{} failed", variant.name());
    String::from_utf8(output.stdout).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------
// The harness.

fn compare(options: &Options) {
    println!(
        "{} cores; {} rounds; client and server are separate processes on loopback",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        options.rounds
    );
    if options.throughput {
        throughput(options);
    }
    if options.schedule {
        schedule(options.rounds);
    }
    if options.instructions {
        instructions();
    }
}

fn throughput(options: &Options) {
    let server = Server::start(Duration::ZERO);
    let requests = options.requests;
    println!(
        "\nthroughput: {requests} requests per run (after a warm-up), a {}-byte JSON body",
        BODY.len()
    );
    for concurrency in CONCURRENCIES {
        // runs[variant][round]
        let mut runs: Vec<Vec<Run>> = VARIANTS.iter().map(|_| Vec::new()).collect();
        let mut order = Order::new(concurrency as u64);
        for _ in 0..options.rounds {
            for which in order.next_round() {
                let run = run_client(VARIANTS[which], server.addr, concurrency, requests);
                runs[which].push(run);
            }
        }
        print_table(concurrency, requests, &runs);
    }
}

fn print_table(concurrency: usize, requests: u64, runs: &[Vec<Run>]) {
    let rate = |run: &Run| requests as f64 / run.seconds;
    let cpu = |run: &Run| run.cpu_seconds / requests as f64 * 10_000.0;
    let base = &runs[0];
    // The faster of (a) and (b) over the rounds. (Not the faster in each round: the
    // larger of two noisy figures is biased upwards, and even (a) would fall short of it.)
    let median_rate = |runs: &[Run]| median(runs.iter().map(rate));
    let best_by_hand = if median_rate(&runs[0]) >= median_rate(&runs[1]) {
        &runs[0]
    } else {
        &runs[1]
    };
    println!(
        "\nconcurrency {concurrency}\n{:<30} {:>9} {:>9} {:>11} {:>9} {:>9} {:>9}",
        "client", "req/s", "vs (a)", "vs best a/b", "CPU s/10k", "vs (a)", "peak RSS"
    );
    for (variant, runs) in VARIANTS.iter().zip(runs) {
        let speed = median(runs.iter().zip(base).map(|(r, a)| rate(r) / rate(a)));
        let vs_best = median(
            runs.iter()
                .zip(best_by_hand)
                .map(|(r, best)| rate(r) / rate(best)),
        );
        let cpu_ratio = median(runs.iter().zip(base).map(|(r, a)| cpu(r) / cpu(a)));
        println!(
            "{:<30} {:>9.0} {:>9.3} {:>11.3} {:>9.3} {:>9.3} {:>6.1} MiB",
            variant.label(),
            median(runs.iter().map(rate)),
            speed,
            vs_best,
            median(runs.iter().map(cpu)),
            cpu_ratio,
            median(runs.iter().map(|r| r.peak_rss_kb as f64)) / 1024.0,
        );
    }
}

fn schedule(rounds: usize) {
    let server = Server::start(SCHEDULE_DELAY);
    let waves = SCHEDULE_IDS / SCHEDULE_CONCURRENCY as u64;
    let ideal = waves as f64 * SCHEDULE_DELAY.as_secs_f64();
    println!(
        "\nscheduling: {SCHEDULE_IDS} ids at concurrency {SCHEDULE_CONCURRENCY}, every answer \
         delayed {} ms; ideal {ideal:.3} s",
        SCHEDULE_DELAY.as_millis()
    );
    let mut runs: Vec<Vec<Run>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    // One request at a time, `waves` of them: the makespan of a perfect scheduler on
    // this machine, whose every round trip (waking the client and the server from idle)
    // takes longer than the 20 ms the server waits.
    let mut alone = Vec::new();
    let mut order = Order::new(SCHEDULE_IDS);
    for _ in 0..rounds {
        alone.push(run_client(Variant::Buffered, server.addr, 1, waves).seconds);
        for which in order.next_round() {
            let run = run_client(
                VARIANTS[which],
                server.addr,
                SCHEDULE_CONCURRENCY,
                SCHEDULE_IDS,
            );
            runs[which].push(run);
        }
    }
    let floor = median(alone.iter().copied());
    println!(
        "{waves} requests one at a time take {floor:.3} s ({:.3} × ideal): the floor of this \
         machine",
        floor / ideal
    );
    println!(
        "{:<30} {:>11} {:>21} {:>15}",
        "client", "makespan", "makespan/ideal", "makespan/floor"
    );
    for (variant, runs) in VARIANTS.iter().zip(&runs) {
        let seconds: Vec<f64> = runs.iter().map(|run| run.seconds).collect();
        let makespan = median(seconds.iter().copied());
        let (low, high) = min_max(&seconds);
        let vs_floor = median(seconds.iter().zip(&alone).map(|(s, a)| s / a));
        println!(
            "{:<30} {:>9.3} s {:>8.3} ({:.3}-{:.3}) {:>15.3}",
            variant.label(),
            makespan,
            makespan / ideal,
            low / ideal,
            high / ideal,
            vs_floor
        );
    }
}

/// Requests in the two runs of each client under callgrind: the difference between
/// their instruction counts, over the difference in requests, is the cost of one
/// request, without the start-up, the warm-up and the connections' set-up.
const COUNTED_RUNS: [u64; 2] = [2_000, 10_000];

/// Instructions per request of each client, counted by callgrind: the stable measure of
/// CPU per request on a machine whose timings wander (client and server threads run
/// one at a time under valgrind, so this leaves out contention between them).
fn instructions() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("\ninstructions: skipped, valgrind is not installed (apt-get install valgrind)");
        return;
    }
    let server = Server::start(Duration::ZERO);
    let [few, many] = COUNTED_RUNS;
    println!(
        "\ninstructions per request (callgrind; runs of {many} and {few} requests, \
         the difference over {})",
        many - few
    );
    for concurrency in CONCURRENCIES {
        println!(
            "\nconcurrency {concurrency}\n{:<30} {:>12} {:>9}",
            "client", "instr/req", "vs (a)"
        );
        let mut base = None;
        for variant in VARIANTS {
            let count = |requests| count_instructions(variant, server.addr, concurrency, requests);
            let per_request = (count(many) - count(few)) as f64 / (many - few) as f64;
            let base = *base.get_or_insert(per_request);
            println!(
                "{:<30} {:>12.0} {:>9.3}",
                variant.label(),
                per_request,
                per_request / base
            );
        }
    }
}

/// Instructions a client process executes for one run, start to end.
fn count_instructions(
    variant: Variant,
    addr: SocketAddr,
    concurrency: usize,
    requests: u64,
) -> i64 {
    let output = Command::new("valgrind")
        .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
        .arg(std::env::current_exe().unwrap())
        .args(client_args(variant, addr, concurrency, requests))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} failed under valgrind",
        variant.name()
    );
    let report = String::from_utf8_lossy(&output.stderr);
    report
        .lines()
        .find_map(|line| {
            line.split_once("Collected : ")
                .map(|(_, n)| n.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no instruction count from callgrind:\n{report}"))
}

/// The order of the variants in each round: shuffled, from a fixed seed. Rotating the
/// order gave every variant the same predecessor in every round, and a run's
/// after-effects on the server and the machine then counted for or against the same
/// variant each time (over eight pairs, `fanout`'s CPU ratio to (a) was 1.19 when it
/// ran second and 1.06 when it ran first).
struct Order(u64);

impl Order {
    fn new(seed: u64) -> Self {
        Order(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_round(&mut self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..VARIANTS.len()).collect();
        for i in (1..order.len()).rev() {
            // xorshift64
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            order.swap(i, (self.0 % (i as u64 + 1)) as usize);
        }
        order
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), &v| {
            (low.min(v), high.max(v))
        })
}
