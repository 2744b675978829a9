//! Retries: which failures are retried, how long the waits are (measured on the server
//! side), `Retry-After`, the limits on retrying, and slots freed while waiting.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use fanout::reqwest::StatusCode;
use fanout::{ErrorKind, FanOut, RetryPolicy};
use futures::StreamExt;
use support::{Arrivals, Item, echo_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Retries after a few milliseconds, so that waits in these tests come from
/// `Retry-After` or not at all.
fn quick() -> RetryPolicy {
    RetryPolicy::exponential()
        .initial_delay(Duration::from_millis(5))
        .max_delay(Duration::from_millis(20))
}

fn client(server: &MockServer, policy: RetryPolicy) -> FanOut<String, Item> {
    FanOut::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .retry(policy)
        .build()
        .unwrap()
}

async fn fetch_one(fan: &FanOut<String, Item>, id: &str) -> Result<Item, fanout::Error> {
    fan.fan_out([id.to_owned()])
        .collect_ordered()
        .await
        .remove(0)
}

/// A server answering every request with `answer`, expecting `times` of them.
async fn answering(answer: impl wiremock::Respond + 'static, times: u64) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(answer)
        .expect(times)
        .mount(&server)
        .await;
    server
}

/// Answers `first` for the first `times` requests to `/items/{id}`, then echoes the id.
async fn failing_then_ok(
    server: &MockServer,
    arrivals: &Arrivals,
    id: &str,
    first: ResponseTemplate,
    times: u64,
) {
    Mock::given(method("GET"))
        .and(path(format!("/items/{id}")))
        .respond_with(arrivals.answer(first))
        .up_to_n_times(times)
        .expect(times)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/items/{id}")))
        .respond_with(arrivals.answer(echo_id))
        .expect(1)
        .mount(server)
        .await;
}

#[tokio::test]
async fn two_503s_then_a_200_succeed_on_the_third_attempt() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    failing_then_ok(&server, &arrivals, "a", ResponseTemplate::new(503), 2).await;
    let item = fetch_one(&client(&server, quick()), "a").await.unwrap();
    assert_eq!(item.id, "a");
    assert_eq!(arrivals.count(), 3);
}

#[tokio::test]
async fn a_404_is_an_answer_and_is_tried_exactly_once() {
    let server = answering(ResponseTemplate::new(404), 1).await;
    let err = fetch_one(&client(&server, quick()), "gone")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.attempts(), 1);
}

#[tokio::test]
async fn malformed_json_is_final_too() {
    let server = answering(ResponseTemplate::new(200).set_body_string("{\"id\": "), 1).await;
    let err = fetch_one(&client(&server, quick()), "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert_eq!(err.attempts(), 1);
}

#[tokio::test]
async fn when_retries_run_out_the_error_is_the_last_failure_with_its_attempts() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(ResponseTemplate::new(500).set_body_string("busy")))
        .expect(4)
        .mount(&server)
        .await;
    let err = fetch_one(&client(&server, quick().max_retries(3)), "b")
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(err.attempts(), 4);
    assert_eq!(err.id(), Some("b"));
    assert_eq!(err.body_snippet(), Some("busy"));
    assert!(err.to_string().contains("after 4 attempts"), "{err}");
}

#[tokio::test]
async fn max_retries_zero_means_one_attempt() {
    let server = answering(ResponseTemplate::new(503), 2).await;
    let err = fetch_one(&client(&server, quick().max_retries(0)), "c")
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1);
    let err = fetch_one(&client(&server, RetryPolicy::none()), "c")
        .await
        .unwrap_err();
    assert_eq!(err.attempts(), 1);
}

/// How long after a first answer of `busy` the (successful) retry arrived.
async fn gap_before_retry(busy: ResponseTemplate) -> Duration {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    failing_then_ok(&server, &arrivals, "d", busy, 1).await;
    fetch_one(&client(&server, quick()), "d").await.unwrap();
    arrivals.span()
}

#[tokio::test]
async fn retry_after_in_seconds_is_waited_out() {
    let gap = gap_before_retry(ResponseTemplate::new(429).insert_header("Retry-After", "1")).await;
    assert!(gap >= Duration::from_millis(980), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(3), "retried after {gap:?}");
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_waited_out() {
    // Dates have whole seconds: three seconds ahead is at least two seconds ahead.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3));
    let busy = ResponseTemplate::new(503).insert_header("Retry-After", date.as_str());
    let gap = gap_before_retry(busy).await;
    assert!(gap >= Duration::from_millis(1500), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(5), "retried after {gap:?}");
}

#[tokio::test]
async fn a_malformed_retry_after_is_ignored() {
    let busy = ResponseTemplate::new(503).insert_header("Retry-After", "soon-ish");
    let gap = gap_before_retry(busy).await;
    assert!(gap < Duration::from_millis(500), "retried after {gap:?}");
}

#[tokio::test]
async fn a_retry_after_beyond_the_cap_fails_at_once_and_says_why() {
    let server = answering(
        ResponseTemplate::new(429).insert_header("Retry-After", "1728000"),
        1,
    )
    .await;
    let started = Instant::now();
    let err = fetch_one(&client(&server, quick()), "g").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(err.attempts(), 1);
    let message = err.to_string();
    assert!(
        message.contains("1728000 s") && message.contains("max_retry_after (60 s)"),
        "{message}"
    );
}

#[tokio::test]
async fn a_longer_cap_lets_a_longer_retry_after_through() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    let busy = ResponseTemplate::new(503).insert_header("Retry-After", "1");
    failing_then_ok(&server, &arrivals, "h", busy, 1).await;
    let policy = quick().max_retry_after(Duration::from_millis(500));
    let err = fetch_one(&client(&server, policy), "h").await.unwrap_err();
    assert!(err.to_string().contains("max_retry_after (0.5 s)"), "{err}");

    // The same answer with the cap at 2 s is waited out.
    server.reset().await;
    failing_then_ok(
        &server,
        &arrivals,
        "h",
        ResponseTemplate::new(503).insert_header("Retry-After", "1"),
        1,
    )
    .await;
    let policy = quick().max_retry_after(Duration::from_secs(2));
    fetch_one(&client(&server, policy), "h").await.unwrap();
}

#[tokio::test]
async fn retry_if_replaces_the_default_rule() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    failing_then_ok(&server, &arrivals, "i", ResponseTemplate::new(409), 2).await;
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let policy = quick().retry_if(move |failure| {
        counter.fetch_add(1, Ordering::SeqCst);
        assert!(!failure.is_transient());
        assert!(failure.headers().is_some());
        assert_eq!(failure.error().kind(), ErrorKind::Status);
        failure.status() == Some(StatusCode::CONFLICT)
    });
    fetch_one(&client(&server, policy), "i").await.unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 2);

    // And can refuse what the default rule would retry.
    let server = answering(ResponseTemplate::new(503), 1).await;
    let policy = quick().retry_if(|failure| failure.is_transient() && failure.status().is_none());
    let err = fetch_one(&client(&server, policy), "j").await.unwrap_err();
    assert_eq!(err.attempts(), 1);
}

#[tokio::test]
async fn max_elapsed_stops_retrying() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(ResponseTemplate::new(503)))
        .mount(&server)
        .await;
    // Delays of 200 ms, then 400 ms: the second retry would start after 600 ms.
    let policy = RetryPolicy::exponential()
        .max_retries(10)
        .initial_delay(Duration::from_millis(200))
        .jitter(false)
        .max_elapsed(Duration::from_millis(500));
    let err = fetch_one(&client(&server, policy), "k").await.unwrap_err();
    assert_eq!(arrivals.count(), 2);
    assert_eq!(err.attempts(), 2);
    assert!(err.to_string().contains("max_elapsed (0.5 s)"), "{err}");
}

#[tokio::test]
async fn a_deadline_cuts_an_id_short_across_its_attempts() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("GET"))
        .respond_with(
            arrivals.answer(ResponseTemplate::new(503).set_delay(Duration::from_millis(300))),
        )
        .mount(&server)
        .await;
    // Attempts at 0–300 ms and 350–650 ms, then a third from 750 ms.
    let policy = RetryPolicy::exponential()
        .max_retries(100)
        .initial_delay(Duration::from_millis(50))
        .jitter(false);
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .retry(policy)
        .deadline(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = fetch_one(&fan, "l").await.unwrap_err();
    let took = started.elapsed();
    // Normally the third attempt is cut off at 1 s; on a slow machine the deadline
    // may instead stop the third attempt from starting. Both are a timeout.
    assert!(err.is_timeout(), "{err}");
    assert!(err.attempts() >= 2, "{err}");
    assert_eq!(arrivals.count() as u32, err.attempts());
    assert!(err.to_string().contains("deadline (1 s)"), "{err}");
    assert!(
        err.to_string()
            .contains("had failed: unsuccessful HTTP status 503"),
        "{err}"
    );
    let before = std::error::Error::source(&err)
        .and_then(|source| source.downcast_ref::<fanout::Error>())
        .expect("the failure before the deadline is the source");
    assert_eq!(before.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_deadline_shorter_than_the_timeout_wins() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .timeout(Duration::from_secs(10))
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = fetch_one(&fan, "m").await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.attempts(), 1);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn per_attempt_timeouts_are_retried_and_counted() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(|request: &wiremock::Request| {
            echo_id(request).set_delay(Duration::from_secs(2))
        }))
        .mount(&server)
        .await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .timeout(Duration::from_millis(150))
        .retry(quick().max_retries(2))
        .build()
        .unwrap();
    let err = fetch_one(&fan, "o").await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(err.attempts(), 3);
    assert_eq!(arrivals.count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_can_end_a_retry_waiting_for_a_token_without_stalling_the_queue() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/items/a"))
        .respond_with(arrivals.answer(ResponseTemplate::new(503)))
        .mount(&server)
        .await;
    Mock::given(path("/items/b"))
        .respond_with(arrivals.answer(echo_id))
        .mount(&server)
        .await;
    // One token a second: "a" sends at once and fails; "b" heads the queue for the
    // next token; a's retry queues behind it until a's deadline ends it.
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(2)
        .rate_limit(fanout::Quota::per_second(
            std::num::NonZeroU32::new(1).unwrap(),
        ))
        .retry(quick())
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut results = fan
        .fan_out(["a".to_owned(), "b".to_owned()])
        .collect_ordered()
        .await;
    let b = results.pop().unwrap();
    let a = results.pop().unwrap().unwrap_err();
    assert!(a.is_timeout(), "{a}");
    assert_eq!(a.attempts(), 1);
    assert!(
        a.to_string()
            .contains("waited for a slot or a rate-limit token"),
        "{a}"
    );
    assert_eq!(b.unwrap().id, "b");
    assert_eq!(arrivals.paths(), ["/items/a", "/items/b"]);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn limits_too_large_to_represent_mean_no_limit() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    failing_then_ok(&server, &arrivals, "q", ResponseTemplate::new(503), 2).await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .retry(quick().max_elapsed(Duration::MAX))
        .deadline(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(fetch_one(&fan, "q").await.unwrap().id, "q");

    // A Retry-After of 10^22 seconds, allowed by the cap, cannot be waited for.
    let server = answering(
        ResponseTemplate::new(429).insert_header("Retry-After", "9999999999999999999999"),
        1,
    )
    .await;
    let policy = quick().max_retry_after(Duration::MAX);
    let err = fetch_one(&client(&server, policy), "r").await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    assert!(err.to_string().contains("too long"), "{err}");
}

/// A hand-written HTTP server: connection `n` (from 0) is answered by `answer(n, ..)`.
async fn raw(
    answer: impl Fn(usize) -> &'static [u8] + Send + Sync + 'static,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = count.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 2048];
            let _ = socket.read(&mut request).await;
            let _ = socket.write_all(answer(n)).await;
            // Dropping the socket closes the connection, whatever was (not) said.
        }
    });
    (addr, connections)
}

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\":\"n\"}";

#[tokio::test]
async fn a_connection_closed_before_the_answer_is_retried() {
    let (addr, connections) = raw(|n| if n == 0 { b"" } else { OK }).await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("http://{addr}/items/{{id}}"))
        .retry(quick())
        .build()
        .unwrap();
    let item = fetch_one(&fan, "n").await.unwrap();
    assert_eq!(item.id, "n");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_cut_off_midway_is_retried() {
    const CUT: &[u8] =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{\"id\"";
    let (addr, connections) = raw(|n| if n < 2 { CUT } else { OK }).await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("http://{addr}/items/{{id}}"))
        .retry(quick())
        .build()
        .unwrap();
    let item = fetch_one(&fan, "n").await.unwrap();
    assert_eq!(item.id, "n");
    assert_eq!(connections.load(Ordering::SeqCst), 3);

    // Without retries the same cut is a body error.
    let (addr, _) = raw(|_| CUT).await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("http://{addr}/items/{{id}}"))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let err = fetch_one(&fan, "n").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Body, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_waiting_to_retry_frees_its_slot_for_others() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    let busy = ResponseTemplate::new(429).insert_header("Retry-After", "1");
    failing_then_ok(&server, &arrivals, "0", busy, 1).await;
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(|request: &wiremock::Request| {
            echo_id(request).set_delay(Duration::from_millis(50))
        }))
        .mount(&server)
        .await;
    // Without the pause that a 429's Retry-After starts for every request to the
    // server (tests/adaptive.rs), which would hold ids 1–5 back too.
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(1)
        .pause_on_retry_after(false)
        .retry(quick())
        .build()
        .unwrap();
    let ids: Vec<String> = (0..6).map(|n| n.to_string()).collect();
    let results = fan.fan_out(ids).collect_ordered().await;
    assert!(results.iter().all(Result::is_ok));

    // Ids 1–5 were all served while id 0 waited out its second.
    let paths = arrivals.paths();
    assert_eq!(paths.first().map(String::as_str), Some("/items/0"));
    assert_eq!(
        paths.last().map(String::as_str),
        Some("/items/0"),
        "{paths:?}"
    );
    let zero = arrivals.times_of("/items/0");
    assert!(zero[1] - zero[0] >= Duration::from_millis(980));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failing_everything_keeps_admitted_ids_bounded() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(2)
        .retry(
            RetryPolicy::exponential()
                .max_retries(3)
                .initial_delay(Duration::from_millis(20))
                .jitter(false),
        )
        .build()
        .unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let ids = (0..120).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let mut done = fan.fan_out(ids).as_completed();
    let (mut finished, mut most_admitted) = (0, 0);
    while let Some((_, result)) = done.next().await {
        assert_eq!(result.unwrap_err().attempts(), 4);
        finished += 1;
        // The engine refills a slot before handing an outcome out, so this is the
        // number of ids admitted and not yet finished.
        most_admitted = most_admitted.max(pulled.load(Ordering::SeqCst) - finished);
    }
    assert_eq!(finished, 120);
    // Sleeping ids let others in (more than 2 admitted), but never more than 4 per slot.
    assert!(most_admitted > 2, "{most_admitted}");
    assert!(most_admitted <= 8, "{most_admitted} ids admitted at once");
}
