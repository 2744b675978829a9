//! Adaptive concurrency and pauses the server asks for, against servers that react to
//! load (tests/support/load.rs): what arrives is measured on the server's side.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fanout::{Concurrency, FanOut, RetryPolicy};
use support::Item;
use support::chaos::{ChaosServer, Fault, Visit};
use support::load::{capacity_server, quota_server};

/// The tests of this file measure time: they run one at a time, not side by side.
static ONE_AT_A_TIME: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

const CAPACITY: usize = 10;
const BASE: Duration = Duration::from_millis(50);
const PER_EXTRA: Duration = Duration::from_millis(100);
const IDS: u32 = 600;

fn client(server: &ChaosServer, concurrency: impl Into<Concurrency>) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&server.template())
        .concurrency(concurrency)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Each value with how many times in a row it came.
fn runs(values: &[usize]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &value in values {
        match runs.last_mut() {
            Some((last, count)) if *last == value => *count += 1,
            _ => runs.push((value, 1)),
        }
    }
    runs
}

/// Samples a batch's concurrency limit every 10 ms until aborted.
fn watch(progress: fanout::Progress) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<usize>>>) {
    let limits = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn({
        let limits = Arc::clone(&limits);
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = progress.snapshot();
                limits.lock().unwrap().push(now.concurrency_limit);
            }
        }
    });
    (watcher, limits)
}

/// Runs 600 ids against a fresh capacity server; every one must succeed.
async fn run(concurrency: Concurrency) -> Duration {
    let server = capacity_server(CAPACITY, BASE, PER_EXTRA);
    let started = Instant::now();
    let all = client(&server, concurrency)
        .fan_out(0..IDS)
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(all.len(), IDS as usize);
    started.elapsed()
}

/// The benchmark as a test: a server that gets 100 ms slower per request over
/// its capacity of 10. The full curve is in benches/adaptive.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_finds_the_capacity_of_a_server_that_slows_down() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // Adaptive, watched: where the limit stands, and what the server sees.
    let server = capacity_server(CAPACITY, BASE, PER_EXTRA);
    let fan = client(&server, Concurrency::adaptive(1, 100));
    let batch = fan.fan_out(0..IDS);
    let (watcher, limits) = watch(batch.progress());
    let started = Instant::now();
    let all = batch.try_collect_ordered().await.unwrap();
    let adaptive = started.elapsed();
    watcher.abort();
    assert_eq!(all.len(), IDS as usize);

    let limits = limits.lock().unwrap().clone();
    println!("limit, and for how many 10 ms: {:?}", runs(&limits));
    let later = &limits[limits.len() / 3..];
    let mean = later.iter().sum::<usize>() as f64 / later.len() as f64;
    let most = *later.iter().max().unwrap();
    // The load the server saw on arrival, after the first third of the requests.
    let visits = server.visits();
    let settled: Vec<_> = visits[visits.len() / 3..].iter().collect();
    let over = settled
        .iter()
        .filter(|visit| matches!(visit.fault, Fault::Slow(delay) if delay > BASE))
        .count();
    println!(
        "adaptive: {adaptive:?}; limit after the first third: mean {mean:.1}, most {most}; \
         {over} of {} later requests arrived over capacity",
        settled.len()
    );
    assert!(
        (CAPACITY as f64 * 0.6..=CAPACITY as f64 * 1.3).contains(&mean),
        "the limit settled at {mean:.1} on average, not near {CAPACITY}: {limits:?}"
    );
    assert!(most <= 2 * CAPACITY, "the limit went back up to {most}");
    assert!(
        over * 4 <= settled.len(),
        "{over} of {} later requests arrived over capacity",
        settled.len()
    );

    // Against the best fixed limit (the capacity: see benches/adaptive.rs for the curve).
    let best = run(Concurrency::fixed(CAPACITY)).await;
    println!("fixed {CAPACITY}: {best:?}");
    assert!(
        adaptive.as_secs_f64() <= 1.3 * best.as_secs_f64(),
        "adaptive took {adaptive:?}, fixed {CAPACITY} {best:?}"
    );
    // Fixed 100 takes about a minute; it must not finish within 3 × adaptive's time.
    let budget = adaptive * 3;
    let fixed = tokio::time::timeout(budget, run(Concurrency::fixed(100))).await;
    assert!(
        fixed.is_err(),
        "fixed concurrency 100 finished within 3 × adaptive's {adaptive:?}: {fixed:?}"
    );
}

/// Latency that varies by id (20 to 60 ms, and 200 ms for one id in 50) but not with
/// load: the spread must not pass for overload, and the limit must reach its max.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_latency_varies_but_not_with_load_gets_the_max() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = ChaosServer::dynamic(|arrival| {
        let id: u64 = arrival.id.parse().unwrap_or(0);
        let ms = if id % 50 == 7 {
            200
        } else {
            20 + id * 7919 % 41
        };
        Fault::Slow(Duration::from_millis(ms))
    });
    let fan = client(&server, Concurrency::adaptive(1, 64));
    let batch = fan.fan_out(0..4000);
    let (watcher, limits) = watch(batch.progress());
    let started = Instant::now();
    let all = batch.try_collect_ordered().await.unwrap();
    let took = started.elapsed();
    watcher.abort();
    assert_eq!(all.len(), 4000);
    let limits = limits.lock().unwrap().clone();
    let reached = limits.iter().position(|&limit| limit == 64);
    println!(
        "{took:?}; limit, and for how many 10 ms: {:?}",
        runs(&limits)
    );
    let reached = reached.expect("the limit never reached its max of 64");
    let after = &limits[reached..];
    let mean = after.iter().sum::<usize>() as f64 / after.len() as f64;
    assert!(
        mean >= 56.0,
        "after reaching 64 the limit averaged {mean:.1}"
    );
}

/// A quota of `rate` requests a second, past which the server answers 429 with
/// `Retry-After: 1`. Returns the server after 100 ids have all succeeded.
async fn through_quota(concurrency: impl Into<Concurrency>, pause: bool) -> ChaosServer {
    let server = quota_server(20, Duration::from_secs(1), false);
    let fan: FanOut<u32, Item> = FanOut::builder()
        .detail_url(&server.template())
        .concurrency(concurrency)
        .pause_on_retry_after(pause)
        .retry(RetryPolicy::exponential().max_retries(20))
        .build()
        .unwrap();
    let all = fan.fan_out(0..100).try_collect_ordered().await.unwrap();
    assert_eq!(all.len(), 100);
    server
}

fn refusals(visits: &[Visit]) -> usize {
    visits
        .iter()
        .filter(|visit| matches!(visit.fault, Fault::Answer { status: 429, .. }))
        .count()
}

/// Requests that arrived within a second of a 429 that began a pause: those already on
/// their way (within `grace` of it), the latest of those, and the others.
fn arrivals_during_pauses(visits: &[Visit], grace: Duration) -> (usize, Duration, usize) {
    let (mut on_their_way, mut latest, mut during) = (0, Duration::ZERO, 0);
    let mut paused_until = None;
    for visit in visits {
        if paused_until.is_some_and(|(from, until)| visit.at >= from && visit.at < until) {
            let (from, _) = paused_until.unwrap();
            let after = visit.at.duration_since(from);
            if after < grace {
                on_their_way += 1;
                latest = latest.max(after);
            } else {
                during += 1;
            }
            continue;
        }
        if matches!(visit.fault, Fault::Answer { status: 429, .. }) {
            paused_until = Some((visit.at, visit.at + Duration::from_secs(1)));
        }
    }
    (on_their_way, latest, during)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_pauses_every_request_to_the_server() {
    let _alone = ONE_AT_A_TIME.lock().await;
    // Requests sent before the client read the 429 (under a millisecond here).
    let grace = Duration::from_millis(20);
    // What a fixed concurrency without the pause produces.
    let unpaused = refusals(&through_quota(Concurrency::fixed(8), false).await.visits());
    for concurrency in [Concurrency::fixed(8), Concurrency::adaptive(1, 8)] {
        let paused = through_quota(concurrency, true).await.visits();
        let (on_their_way, latest, during) = arrivals_during_pauses(&paused, grace);
        println!(
            "{concurrency:?}: 429s with the pause {}, fixed 8 without it {unpaused}; \
             {on_their_way} requests were on their way when a pause began (the latest \
             {latest:?} after its 429), {during} arrived during one",
            refusals(&paused),
        );
        assert_eq!(during, 0, "requests arrived during a pause");
        assert!(on_their_way <= 8 * 5, "{on_their_way} on their way");
        assert!(
            refusals(&paused) * 3 <= unpaused,
            "the pause did not save many 429s: {} with, {unpaused} without",
            refusals(&paused),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_spread_the_quota_and_avoid_429s() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut counts = Vec::new();
    for respect in [true, false] {
        let server = quota_server(20, Duration::from_secs(2), true);
        let fan: FanOut<u32, Item> = FanOut::builder()
            .detail_url(&server.template())
            .concurrency(8)
            .respect_rate_limit_headers(respect)
            .retry(RetryPolicy::exponential().max_retries(20))
            .build()
            .unwrap();
        let started = Instant::now();
        let all = fan.fan_out(0..80).try_collect_ordered().await.unwrap();
        assert_eq!(all.len(), 80);
        counts.push((refusals(&server.visits()), started.elapsed()));
    }
    let [(with, took_with), (without, took_without)] = counts[..] else {
        unreachable!()
    };
    println!(
        "429s reading the headers: {with} in {took_with:?}; not reading them: {without} in \
         {took_without:?}"
    );
    assert!(
        with * 4 <= without,
        "{with} 429s reading the headers, {without} not"
    );
}
