//! The token bucket, measured on the server side: the rate holds, every attempt takes a
//! token, and the quota is shared by clones, concurrent batches and `FanOut`s given
//! the same limiter. (governor waits in real time, so these tests take a few seconds.)

mod support;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fanout::{ErrorKind, FanOut, Quota, RateLimiter, RetryPolicy};
use support::{Arrivals, Item, echo_id};
use wiremock::matchers::path_regex;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn per_second(rate: u32, burst: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(rate).unwrap()).allow_burst(NonZeroU32::new(burst).unwrap())
}

async fn echo_server(arrivals: &Arrivals) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path_regex("^/(items|other)/"))
        .respond_with(arrivals.answer(echo_id))
        .mount(&server)
        .await;
    server
}

fn client(server: &MockServer, quota: Quota) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(8)
        .rate_limit(quota)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_requests_at_twenty_a_second_take_three_seconds() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let results = client(&server, per_second(20, 1))
        .fan_out(0..60)
        .collect_ordered()
        .await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(arrivals.count(), 60);
    // 59 gaps of 50 ms, less some slack for the first request's connection set-up.
    let span = arrivals.span();
    assert!(
        span >= Duration::from_millis(2850),
        "60 requests in {span:?}"
    );
    let most = arrivals.most_within(Duration::from_secs(1));
    assert!(most <= 21, "{most} requests within one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_second_allows_a_burst_of_one_seconds_worth() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(64)
        .requests_per_second(25)
        .build()
        .unwrap();
    fan.fan_out(0..50).try_collect_ordered().await.unwrap();
    // 25 at once, then 25 more at 40 ms intervals: about one second in all.
    let span = arrivals.span();
    assert!(
        span >= Duration::from_millis(900),
        "50 requests in {span:?}"
    );
    assert!(
        span < Duration::from_millis(1600),
        "50 requests in {span:?}"
    );
    let most = arrivals.most_within(Duration::from_millis(200));
    assert!(most >= 25, "the burst was not let through: {most}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_and_concurrent_batches_share_one_quota() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let fan = client(&server, per_second(20, 1));
    let clone = fan.clone();
    let (a, b, c) = tokio::join!(
        fan.fan_out(0..15).collect_ordered(),
        fan.fan_out(15..30).collect_ordered(),
        clone.fan_out(30..45).collect_ordered(),
    );
    assert_eq!(a.len() + b.len() + c.len(), 45);
    assert_eq!(arrivals.count(), 45);
    // One quota for all three: 44 gaps of 50 ms. Three separate ones would take 0.7 s.
    let span = arrivals.span();
    assert!(
        span >= Duration::from_millis(2100),
        "45 requests in {span:?}"
    );
    let most = arrivals.most_within(Duration::from_secs(1));
    assert!(most <= 21, "{most} requests within one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_outs_given_one_limiter_share_its_quota() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let limiter = Arc::new(RateLimiter::direct(per_second(20, 1)));
    let items = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .rate_limiter(Arc::clone(&limiter))
        .build()
        .unwrap();
    let other = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/other/{{id}}", server.uri()))
        .rate_limiter(limiter)
        .build()
        .unwrap();
    let (a, b) = tokio::join!(
        items.fan_out(0..20).try_collect_ordered(),
        other.fan_out(0..20).try_collect_ordered(),
    );
    a.unwrap();
    b.unwrap();
    let span = arrivals.span();
    assert!(
        span >= Duration::from_millis(1850),
        "40 requests in {span:?}"
    );
    let most = arrivals.most_within(Duration::from_secs(1));
    assert!(most <= 21, "{most} requests within one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_retry_takes_a_token_of_its_own() {
    let arrivals = Arrivals::default();
    let server = MockServer::start().await;
    // Each id fails once, then succeeds: 20 attempts for 10 ids.
    let tried = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    Mock::given(path_regex("^/items/"))
        .respond_with(arrivals.answer(move |request: &wiremock::Request| {
            if tried.lock().unwrap().insert(request.url.path().to_owned()) {
                ResponseTemplate::new(503)
            } else {
                echo_id(request)
            }
        }))
        .mount(&server)
        .await;
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(8)
        .rate_limit(per_second(10, 1))
        .retry(RetryPolicy::exponential().initial_delay(Duration::from_millis(5)))
        .build()
        .unwrap();
    fan.fan_out(0..10).try_collect_ordered().await.unwrap();
    assert_eq!(arrivals.count(), 20);
    let span = arrivals.span();
    assert!(
        span >= Duration::from_millis(1800),
        "20 attempts in {span:?}"
    );
    let most = arrivals.most_within(Duration::from_secs(1));
    assert!(most <= 11, "{most} attempts within one second");
}

#[test]
fn a_rate_of_zero_is_refused() {
    let err = FanOut::<u32, Item>::builder()
        .detail_url("http://127.0.0.1:1/items/{id}")
        .requests_per_second(0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("requests_per_second"), "{err}");
}

/// A limiter of the caller's own that answers its first `first` requests for a token
/// one way and every later one the other: it refuses first and then grants, or grants
/// first and then refuses (the store went away).
#[derive(Debug)]
struct Flaky {
    first: std::sync::atomic::AtomicU32,
    grants_first: bool,
    asked: std::sync::atomic::AtomicU32,
}

impl Flaky {
    fn refusing(first: u32) -> Arc<Self> {
        Self::new(first, false)
    }

    fn granting(first: u32) -> Arc<Self> {
        Self::new(first, true)
    }

    fn new(first: u32, grants_first: bool) -> Arc<Self> {
        Arc::new(Flaky {
            first: first.into(),
            grants_first,
            asked: 0.into(),
        })
    }
}

impl fanout::RateLimit for Flaky {
    fn try_acquire(&self) -> bool {
        false
    }

    fn acquire(&self) -> fanout::Acquire<'_> {
        use std::sync::atomic::Ordering;
        self.asked.fetch_add(1, Ordering::SeqCst);
        let among_first = self
            .first
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let granted = among_first == self.grants_first;
        Box::pin(async move {
            if granted {
                Ok(())
            } else {
                Err(fanout::BoxError::from("the token store is down"))
            }
        })
    }
}

#[tokio::test]
async fn a_limiter_of_ones_own_is_asked_for_every_attempt_and_its_failures_are_retried() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let retry = RetryPolicy::exponential()
        .max_retries(2)
        .initial_delay(Duration::from_millis(1));
    let limiter = Flaky::refusing(2);
    let api = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(1)
        .rate_limiter(Arc::clone(&limiter))
        .retry(retry.clone())
        .build()
        .unwrap();
    // The first id is refused twice, then sent on its third attempt.
    let results = api.fan_out([1, 2]).collect_ordered().await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(limiter.asked.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert_eq!(arrivals.count(), 2, "refused attempts are not sent");

    // A limiter that keeps refusing fails the id with a typed error, unsent.
    let limiter = Flaky::refusing(u32::MAX);
    let api = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .rate_limiter(limiter)
        .retry(retry)
        .build()
        .unwrap();
    let err = api
        .fan_out([3])
        .collect_ordered()
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimiter);
    assert_eq!(err.attempts(), 3);
    assert_eq!(err.id(), Some("3"));
    assert!(err.to_string().contains("the token store is down"), "{err}");
    assert_eq!(arrivals.count(), 2);
}

/// Refused attempts send nothing, so the id's deadline does not start with them: it
/// bounds the time from the first attempt actually sent.
#[tokio::test]
async fn refusals_do_not_start_the_deadline() {
    let arrivals = Arrivals::default();
    let server = echo_server(&arrivals).await;
    let api = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .rate_limiter(Flaky::refusing(3))
        .retry(
            RetryPolicy::exponential()
                .max_retries(5)
                .initial_delay(Duration::from_millis(80))
                .max_delay(Duration::from_millis(80))
                .jitter(false),
        )
        .deadline(Duration::from_millis(150))
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let results = api.fan_out([1]).collect_ordered().await;
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(arrivals.count(), 1);
    // Three backoffs of 80 ms, longer than the deadline, which did not end the id.
    assert!(started.elapsed() >= Duration::from_millis(240));
}

/// An id whose deadline runs out while its limiter refuses ends with the limiter's
/// error, not a timeout: a work queue must not take it for the id's own failure.
#[tokio::test]
async fn a_deadline_passing_while_the_limiter_refuses_keeps_the_limiters_error() {
    let server = MockServer::start().await;
    Mock::given(path_regex("^/items/"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let api = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .rate_limiter(Flaky::granting(1))
        .retry(
            RetryPolicy::exponential()
                .max_retries(5)
                .initial_delay(Duration::from_millis(80))
                .max_delay(Duration::from_millis(80))
                .jitter(false),
        )
        .deadline(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = api
        .fan_out([1])
        .collect_ordered()
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimiter, "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
}
