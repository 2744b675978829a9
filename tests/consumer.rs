//! Requests keep going while the consumer of a stream is away, whatever shape "away"
//! takes: busy between items, asking only for a size hint, or gone after a poll that
//! came back empty (a `select!`, a timeout around `next()`).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use fanout::{ErrorKind, FanOut, RetryPolicy};
use futures::{Stream, StreamExt};
use serde_json::json;
use support::{GaugeServer, Item, eventually};
use wiremock::matchers::{any, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Decodes an item and counts it: decoding happens wherever the requests are polled.
fn counted<'de, D: serde::Deserializer<'de>>(de: D, counter: &AtomicUsize) -> Result<(), D::Error> {
    <Item as serde::Deserialize>::deserialize(de)?;
    counter.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// One counter per test, as the tests run at the same time.
macro_rules! counted_type {
    ($name:ident, $counter:ident) => {
        static $counter: AtomicUsize = AtomicUsize::new(0);
        #[derive(Debug)]
        struct $name;
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                counted(de, &$counter).map(|()| $name)
            }
        }
    };
}

fn fan_out<T: serde::de::DeserializeOwned + Send + 'static>(
    server: &GaugeServer,
    timeout: Duration,
) -> FanOut<u32, T> {
    FanOut::<u32, T>::builder()
        .detail_url(&server.template())
        .concurrency(8)
        .timeout(timeout)
        .build()
        .unwrap()
}

async fn all_decoded(counter: &AtomicUsize, expected: usize) -> bool {
    eventually(Duration::from_secs(3), || {
        counter.load(Ordering::SeqCst) == expected
    })
    .await
}

counted_type!(Sized1, SIZED);

/// One quick answer (id 0), then the others while the consumer holds the first.
async fn one_quick_then_slow() -> GaugeServer {
    GaugeServer::scripted(|id| {
        let delay = if id == "0" { 20 } else { 300 };
        (Duration::from_millis(delay), StatusCode::OK)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_for_a_size_hint_does_not_stall_the_requests() {
    let server = one_quick_then_slow().await;
    let fan = fan_out::<Sized1>(&server, Duration::from_secs(5));
    let mut stream = fan.fan_out(0..8).as_completed();
    stream.next().await.unwrap().1.unwrap();
    // Away from the stream, but looking at it all the time.
    let started = std::time::Instant::now();
    while SIZED.load(Ordering::SeqCst) < 8 && started.elapsed() < Duration::from_secs(3) {
        let (low, high) = stream.size_hint();
        assert!(high.is_none_or(|high| low <= high));
        std::thread::sleep(Duration::from_micros(200));
        tokio::task::yield_now().await;
    }
    assert_eq!(
        SIZED.load(Ordering::SeqCst),
        8,
        "decoded while the consumer was away"
    );
    assert_eq!(stream.count().await, 7);
}

counted_type!(Abandoned, ABANDONED);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gone_after_an_empty_poll_is_taken_over() {
    let server = GaugeServer::with_delay(Duration::from_millis(100)).await;
    let fan = fan_out::<Abandoned>(&server, Duration::from_secs(5));
    let mut stream = fan.fan_out(0..8).as_completed();
    // The stream says "not yet" and the consumer turns to something else, as a
    // `select!` or a timeout around `next()` does, and does not poll again.
    let first = tokio::time::timeout(Duration::from_millis(10), stream.next()).await;
    assert!(first.is_err(), "nothing can be done within 10 ms");
    assert!(
        all_decoded(&ABANDONED, 8).await,
        "only {} of 8 decoded while the consumer was elsewhere",
        ABANDONED.load(Ordering::SeqCst)
    );
    assert_eq!(stream.count().await, 8);
}

counted_type!(Chunked, CHUNKED);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_chunks_with_a_slow_consumer_keeps_the_requests_going() {
    // One quick answer, then the rest while the consumer works on its first chunk.
    let server = one_quick_then_slow().await;
    let fan = fan_out::<Chunked>(&server, Duration::from_secs(5));
    // `ready_chunks` polls until the stream says "not yet", then hands over a chunk:
    // the last word the stream heard was a poll, not an outcome taken.
    let mut chunks = fan.fan_out(0..8).as_completed().ready_chunks(8);
    let first = chunks.next().await.unwrap();
    let taken = first.len();
    assert_eq!(taken, 1, "the quick answer alone");
    assert!(
        all_decoded(&CHUNKED, 8).await,
        "only {} of 8 decoded while the consumer worked on its chunk",
        CHUNKED.load(Ordering::SeqCst)
    );
    let rest: usize = chunks
        .map(|chunk| chunk.len())
        .collect::<Vec<_>>()
        .await
        .iter()
        .sum();
    assert_eq!(taken + rest, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_away_longer_than_the_timeout_causes_no_timeouts() {
    // Bodies larger than the socket buffers: an answer is read only while someone
    // polls its request.
    let server = MockServer::start().await;
    Mock::given(path("/items/0"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "0"})))
        .mount(&server)
        .await;
    let pad = "x".repeat(12 << 20);
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_millis(200))
                .set_body_json(json!({"id": "n", "pad": pad})),
        )
        .mount(&server)
        .await;
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .concurrency(8)
        .timeout(Duration::from_millis(1500))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let mut stream = fan.fan_out(0..8).as_completed();
    let mut outcomes = Vec::new();
    while let Some((id, result)) = stream.next().await {
        // A consumer that takes 2.5 s over its first result, longer than the timeout:
        // the other answers, which start within 200 ms, must not time out meanwhile.
        if outcomes.is_empty() {
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        outcomes.push((id, result.map(|_| ())));
    }
    assert_eq!(outcomes.len(), 8);
    for (id, result) in outcomes {
        assert!(result.is_ok(), "id {id}: {:?}", result.err());
    }
}

/// An id whose `Display` fails.
#[derive(Clone)]
struct Unprintable;

impl std::fmt::Display for Unprintable {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Err(std::fmt::Error)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_whose_display_fails_is_an_invalid_id_outcome() {
    let server = GaugeServer::with_delay(Duration::ZERO).await;
    let fan = FanOut::<Unprintable, Item>::builder()
        .detail_url(&server.template())
        .build()
        .unwrap();
    let outcomes: Vec<_> = fan
        .fan_out_stream(futures::stream::iter([Unprintable, Unprintable]))
        .as_completed()
        .collect()
        .await;
    assert_eq!(outcomes.len(), 2);
    for (_, result) in outcomes {
        let err = result.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidId, "{err}");
        assert_eq!(err.id(), None);
    }
    assert_eq!(server.gauge.requests(), 0);
}
