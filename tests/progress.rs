//! `Batch::progress` and `RunStats`: the counts add up against the server's record
//! once a batch has finished, snapshots taken while it runs are consistent with its
//! limits, and latency percentiles match a server's known delays.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fanout::{FanOut, Progress, RetryPolicy, Snapshot};
use futures::StreamExt;
use support::Item;
use support::chaos::{ChaosServer, Fault};

fn quick_retries() -> RetryPolicy {
    RetryPolicy::exponential()
        .initial_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .max_retries(2)
}

/// Concurrency 8, quick retries.
fn retrying(server: &ChaosServer) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&server.template())
        .concurrency(8)
        .retry(quick_retries())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counts_add_up_against_the_servers_record() {
    // Ids ending in 0 answer 404; ids ending in 1 fail once with a 503, then succeed;
    // ids ending in 2 fail with 503 every time (three attempts, then an error).
    let server = ChaosServer::scripted(|id, attempt| match id.chars().last() {
        Some('0') => Fault::Status(404),
        Some('1') if attempt == 1 => Fault::Status(503),
        Some('2') => Fault::Status(503),
        _ => Fault::Fine,
    });
    let fan = retrying(&server);
    let batch = fan.fan_out(0..500);
    let progress = batch.progress();
    assert_eq!(
        progress.snapshot().admitted,
        0,
        "nothing runs until consumed"
    );
    let (results, stats) = batch.collect_ordered_with_stats().await;
    let failed = results.iter().filter(|result| result.is_err()).count() as u64;

    let end = progress.snapshot();
    let requests = server.visits().len() as u64;
    assert_eq!(stats, progress.stats(), "a finished run's stats stay put");
    assert_eq!(
        (stats.ids, stats.succeeded, stats.failed, stats.retries),
        (500, 400, 100, 150)
    );
    assert_eq!(stats.requests, requests);
    assert_eq!(stats.failures_with_status(404), 50);
    assert_eq!(stats.failures_with_status(503), 50);
    assert_eq!(stats.failures_of_kind(fanout::ErrorKind::Status), 100);
    let retried: Vec<(String, u64)> = stats
        .retry_causes
        .iter()
        .map(|(cause, n)| (cause.to_string(), *n))
        .collect();
    assert_eq!(retried, [("503 Service Unavailable".to_owned(), 150)]);
    assert!(stats.wall_time <= end.elapsed && stats.throughput() > 0.0);
    let table = stats.to_string();
    assert!(
        table.starts_with("ids          500 (400 succeeded, 100 failed)\n"),
        "{table}"
    );
    assert!(table.contains("failures     "), "{table}");
    assert_eq!(failed, 100);
    assert_eq!(end.admitted, 500);
    assert_eq!(end.succeeded, 400);
    assert_eq!(end.failed, 100);
    assert_eq!(end.done(), 500);
    // 50 ids retried once, 50 twice.
    assert_eq!(end.retries, 150);
    assert_eq!(requests, 500 + end.retries);
    assert_eq!(
        (end.in_flight, end.waiting_for_token, end.in_backoff),
        (0, 0, 0)
    );
    assert_eq!(end.total, Some(500));
    assert!(end.elapsed > Duration::ZERO);
    assert!(end.rate > 0.0);
}

/// Snapshots every few milliseconds until told to stop.
fn watch(progress: Progress, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Snapshot>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            seen.push(progress.snapshot());
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        seen.push(progress.snapshot());
        seen
    })
}

/// Runs `ids` through `as_completed`, snapshotting all along.
async fn watched_run(fan: &FanOut<u32, Item>, ids: u32) -> Vec<Snapshot> {
    let batch = fan.fan_out(0..ids);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(batch.progress(), Arc::clone(&stop));
    let outcomes = batch.as_completed().count().await;
    assert_eq!(outcomes, ids as usize);
    stop.store(true, Ordering::SeqCst);
    watcher.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_during_a_run_stay_within_its_limits_and_never_go_back() {
    let server = ChaosServer::scripted(|id, attempt| match id.chars().last() {
        Some('3') if attempt == 1 => Fault::Status(503),
        _ => Fault::Slow(Duration::from_millis(20)),
    });
    let fan = retrying(&server);
    let seen = watched_run(&fan, 300).await;
    assert!(seen.len() > 10, "{} snapshots", seen.len());
    for snapshot in &seen {
        assert!(snapshot.in_flight <= 8, "{snapshot:?}");
        assert!(snapshot.done() <= snapshot.admitted, "{snapshot:?}");
        assert!(snapshot.admitted <= 300 && snapshot.total == Some(300));
    }
    for pair in seen.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.admitted >= before.admitted,
            "{before:?} then {after:?}"
        );
        assert!(
            after.succeeded >= before.succeeded,
            "{before:?} then {after:?}"
        );
        assert!(after.failed >= before.failed, "{before:?} then {after:?}");
        assert!(after.retries >= before.retries, "{before:?} then {after:?}");
        assert!(after.elapsed >= before.elapsed, "{before:?} then {after:?}");
    }
    // The run was seen under way, with requests on the wire.
    assert!(seen.iter().any(|snapshot| snapshot.in_flight > 0));
    let last = seen.last().unwrap();
    assert_eq!((last.succeeded, last.retries, last.in_flight), (300, 30, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_waiting_for_a_token_or_a_retry_are_counted_as_such() {
    // 40 requests a second, at most 2 at once: most of the 8 slots wait for a token.
    let server = ChaosServer::always(Fault::Fine);
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(8)
        .rate_limit(
            fanout::Quota::per_second(std::num::NonZeroU32::new(40).unwrap())
                .allow_burst(std::num::NonZeroU32::new(2).unwrap()),
        )
        .build()
        .unwrap();
    let seen = watched_run(&fan, 20).await;
    assert!(seen.iter().any(|snapshot| snapshot.waiting_for_token > 0));
    assert!(seen.iter().all(|snapshot| snapshot.waiting_for_token <= 8));

    // Every first attempt fails and waits 100 ms before its retry, holding no slot.
    let server = ChaosServer::scripted(|_, attempt| match attempt {
        1 => Fault::Status(503),
        _ => Fault::Fine,
    });
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(4)
        .retry(
            RetryPolicy::exponential()
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(100))
                .jitter(false)
                .max_retries(1),
        )
        .build()
        .unwrap();
    let seen = watched_run(&fan, 20).await;
    assert!(seen.iter().any(|snapshot| snapshot.in_backoff > 0));
    // Asleep ids free their slot, so more may wait than the concurrency, but no more
    // than the 4 × 4 a batch admits.
    assert!(seen.iter().all(|snapshot| snapshot.in_backoff <= 16));
    assert_eq!(seen.last().unwrap().in_backoff, 0);
}

#[tokio::test]
async fn the_total_is_known_only_for_an_input_of_exact_size() {
    let fan = |dedup| {
        FanOut::<u32, Item>::builder()
            .detail_url("http://127.0.0.1:9/items/{id}")
            .dedup_ids(dedup)
            .build()
            .unwrap()
    };
    assert_eq!(
        fan(false)
            .fan_out(vec![1, 2, 3])
            .progress()
            .snapshot()
            .total,
        Some(3)
    );
    assert_eq!(
        fan(false).fan_out(0..10).progress().snapshot().total,
        Some(10)
    );
    let filtered = (0..10).filter(|n| n % 2 == 0);
    assert_eq!(
        fan(false).fan_out(filtered).progress().snapshot().total,
        None
    );
    let stream = futures::stream::iter(0..10);
    assert_eq!(
        fan(false)
            .fan_out_stream(stream)
            .progress()
            .snapshot()
            .total,
        Some(10)
    );
    // Repeats would be dropped: the input's size is no longer the number of ids.
    assert_eq!(
        fan(true).fan_out(vec![1, 1, 2]).progress().snapshot().total,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_percentiles_match_the_servers_delays() {
    // One id in five takes 300 ms, the others 50 ms.
    let server = ChaosServer::scripted(|id, _| {
        let slow = id.parse::<u32>().unwrap_or(0) % 5 == 4;
        Fault::Slow(Duration::from_millis(if slow { 300 } else { 50 }))
    });
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(20)
        .build()
        .unwrap();
    let (results, stats) = fan.fan_out(0..100).collect_ordered_with_stats().await;
    assert!(results.iter().all(Result::is_ok));
    let latency = stats.latency.expect("attempts were made");
    let ms = Duration::from_millis;
    // No attempt is quicker than the server's delay; the slack above it is for a busy
    // machine, well short of the next group's delay.
    assert!(ms(50) <= latency.p50 && latency.p50 < ms(300), "{stats}");
    assert!(
        ms(300) <= latency.p90 && latency.p90 <= latency.p99,
        "{stats}"
    );
    assert!(
        latency.p99 <= latency.max && latency.max < ms(5000),
        "{stats}"
    );
    assert_eq!(stats.requests, 100);
    // 20 at a time, each 50 or 300 ms: at least 5 rounds, one of them slow.
    assert!(stats.wall_time >= ms(300), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_match_the_servers_record_and_the_run_stats() {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use fanout::Event;

    // Ids ending in 0 answer 404; ids ending in 1 fail once with a 503.
    let server = ChaosServer::scripted(|id, attempt| match id.chars().last() {
        Some('0') => Fault::Status(404),
        Some('1') if attempt == 1 => Fault::Status(503),
        _ => Fault::Fine,
    });
    let seen: Arc<Mutex<HashMap<&'static str, Vec<String>>>> = Arc::default();
    let record = Arc::clone(&seen);
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&server.template())
        .concurrency(8)
        .retry(quick_retries())
        .on_event(move |event| {
            let (what, id) = match event {
                Event::Started { id, attempt, .. } => ("started", format!("{id}#{attempt}")),
                Event::Retrying { id, attempt, .. } => ("retrying", format!("{id}#{attempt}")),
                Event::Succeeded { id, attempts, .. } => ("succeeded", format!("{id}#{attempts}")),
                Event::Failed { id, error, .. } => ("failed", format!("{id}#{}", error.attempts())),
                _ => ("other", String::new()),
            };
            record.lock().unwrap().entry(what).or_default().push(id);
        })
        .build()
        .unwrap();
    // 100 ids, and one (`..`) that fails without being sent.
    let ids = (0..100).map(|n| n.to_string()).chain(["..".to_owned()]);
    let (results, stats) = fan.fan_out(ids).collect_ordered_with_stats().await;
    assert_eq!(results.len(), 101);

    let seen = seen.lock().unwrap();
    let count = |what| seen.get(what).map_or(0, Vec::len) as u64;
    assert_eq!(count("started"), server.visits().len() as u64);
    assert_eq!(count("started"), stats.requests);
    assert_eq!(count("retrying"), stats.retries);
    assert_eq!(count("retrying"), 10);
    assert_eq!(count("succeeded"), stats.succeeded);
    assert_eq!(count("failed"), stats.failed);
    assert_eq!((stats.succeeded, stats.failed), (90, 11));
    assert!(seen["retrying"].contains(&"1#1".to_owned()));
    assert!(seen["succeeded"].contains(&"1#2".to_owned()));
    assert!(seen["failed"].contains(&"10#1".to_owned()));
    assert!(seen["failed"].contains(&"..#0".to_owned()));
    assert_eq!(count("other"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_says_how_many_ids_it_has_gives_the_total() {
    use wiremock::matchers::path;
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let server = MockServer::start().await;
    let page = |ids: std::ops::Range<u32>, next: Option<&str>| {
        let ids: Vec<u32> = ids.collect();
        ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"data": ids, "meta": {"total": 150}, "next": next}))
    };
    Mock::given(path("/list"))
        .respond_with(page(0..100, Some("/list2")))
        .mount(&server)
        .await;
    Mock::given(path("/list2"))
        .respond_with(page(100..150, None))
        .mount(&server)
        .await;
    Mock::given(wiremock::matchers::path_regex("^/items/"))
        .respond_with(support::echo_id)
        .mount(&server)
        .await;
    let listed = |total_at: &str, dedup| {
        FanOut::<u32, Item>::builder()
            .list_url(&format!("{}/list", server.uri()))
            .ids_at("/data")
            .paginate(fanout::Pagination::next_url_at("/next"))
            .total_at(total_at)
            .dedup_ids(dedup)
            .detail_url(&format!("{}/items/{{id}}", server.uri()))
            .build()
            .unwrap()
    };

    let batch = listed("/meta/total", false).fan_out_listed();
    let progress = batch.progress();
    assert_eq!(progress.snapshot().total, None, "no page read yet");
    let results = batch.collect_ordered().await;
    assert_eq!(results.len(), 150);
    assert_eq!(progress.snapshot().total, Some(150));

    // A pointer to nothing, or repeats dropped: no total.
    for (total_at, dedup) in [("/meta/count", false), ("/meta/total", true)] {
        let batch = listed(total_at, dedup).fan_out_listed();
        let progress = batch.progress();
        assert_eq!(batch.collect_ordered().await.len(), 150);
        assert_eq!(progress.snapshot().total, None, "{total_at} {dedup}");
    }
    let err = FanOut::<u32, Item>::builder()
        .detail_url("http://127.0.0.1:9/items/{id}")
        .list_url("http://127.0.0.1:9/list")
        .total_at("meta/total")
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("total_at"), "{err}");
}
