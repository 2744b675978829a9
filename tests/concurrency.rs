//! The concurrency cap, lazy pulling of ids, and cancellation on drop, measured on the
//! server side.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fanout::FanOut;
use futures::StreamExt;
use support::{GaugeServer, Item, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_reach_the_cap_and_never_exceed_it() {
    for cap in [1, 4, 12] {
        let server = GaugeServer::with_delay(Duration::from_millis(40)).await;
        let results = server.client(cap).fan_out(0..60).collect_ordered().await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(server.gauge.requests(), 60);
        assert_eq!(server.gauge.max_in_flight(), cap, "cap {cap}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_is_shared_by_concurrent_batches_and_clones() {
    let server = GaugeServer::with_delay(Duration::from_millis(40)).await;
    let fan = server.client(5);
    let clone = fan.clone();
    let (a, b, c) = tokio::join!(
        fan.fan_out(0..30).collect_ordered(),
        fan.fan_out(30..60).collect_ordered(),
        clone.fan_out(60..90).as_completed().collect::<Vec<_>>(),
    );
    assert_eq!(a.len() + b.len() + c.len(), 90);
    assert_eq!(server.gauge.requests(), 90);
    assert_eq!(server.gauge.max_in_flight(), 5);
}

/// An endless id source that counts how many ids were taken from it.
fn counted_ids(pulled: &Arc<AtomicUsize>) -> impl Iterator<Item = u32> + Send + 'static {
    let pulled = Arc::clone(pulled);
    (0..).inspect(move |_| {
        pulled.fetch_add(1, Ordering::SeqCst);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_pulled_only_as_slots_free_up() {
    let server = GaugeServer::with_delay(Duration::from_millis(5)).await;
    let pulled = Arc::new(AtomicUsize::new(0));
    let batch = server.client(4).fan_out(counted_ids(&pulled));
    assert_eq!(pulled.load(Ordering::SeqCst), 0, "a batch is lazy");

    let mut stream = batch.as_completed();
    for taken in 1..=50 {
        stream.next().await.unwrap().1.unwrap();
        let pulled = pulled.load(Ordering::SeqCst);
        // Pulled = handed out + running, and running never exceeds the cap.
        assert!(pulled <= taken + 4, "{pulled} pulled after {taken} taken");
    }
    drop(stream);
    assert!(pulled.load(Ordering::SeqCst) <= 54);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_midway_stops_requests_reaching_the_server() {
    let server = GaugeServer::with_delay(Duration::from_millis(100)).await;
    let mut stream = server.client(4).fan_out(0..10_000).as_completed();
    for _ in 0..6 {
        stream.next().await.unwrap().1.unwrap();
    }
    drop(stream);
    // A request already being written when the stream was dropped may still land (an
    // abort takes effect at the task's next poll); after that, nothing more.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let gauge = &server.gauge;
    // The requests that were running are cancelled: the server sees them go away.
    assert!(
        eventually(Duration::from_secs(2), || gauge.in_flight() == 0).await,
        "{} requests still in flight on the server",
        gauge.in_flight()
    );
    let sent = gauge.requests();
    assert!(
        sent <= 6 + 4,
        "at most the taken ones plus one cap's worth: {sent}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(gauge.requests(), sent, "no request after the drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_unpolled_batch_sends_nothing() {
    let server = GaugeServer::with_delay(Duration::ZERO).await;
    let fan = server.client(4);
    drop(fan.fan_out(0..100));
    drop(fan.fan_out(0..100).in_order());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.gauge.requests(), 0);
}

/// Counts how many bodies have been decoded, which happens inside the request tasks.
static DECODED: AtomicUsize = AtomicUsize::new(0);

struct Counted;

impl<'de> serde::Deserialize<'de> for Counted {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        Item::deserialize(de)?;
        DECODED.fetch_add(1, Ordering::SeqCst);
        Ok(Counted)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_progress_while_the_consumer_is_busy() {
    let server = GaugeServer::with_delay(Duration::from_millis(100)).await;
    let fan = FanOut::<u32, Counted>::builder()
        .detail_url(&server.template())
        .concurrency(8)
        .build()
        .unwrap();
    let mut stream = fan.fan_out(0..8).as_completed();
    stream.next().await.unwrap().1.unwrap();
    // The consumer does not poll the stream now; the other seven requests must still
    // be answered, read and decoded, because each runs as its own task.
    assert!(
        eventually(Duration::from_secs(3), || DECODED.load(Ordering::SeqCst)
            == 8)
        .await,
        "only {} of 8 decoded while the consumer was busy",
        DECODED.load(Ordering::SeqCst)
    );
    assert_eq!(stream.count().await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_200k_ids_is_pulled_only_as_capacity_frees_up() {
    let server = GaugeServer::with_delay(Duration::ZERO).await;
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    // An async source, as a database cursor would be: it yields now and then.
    let ids = futures::stream::iter(0..200_000u32).then(move |id| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if id % 1000 == 0 {
                tokio::task::yield_now().await;
            }
            id
        }
    });
    let mut done = server.client(8).fan_out_stream(ids).as_completed();
    let (mut finished, mut most_unfinished) = (0usize, 0usize);
    while let Some((_, result)) = done.next().await {
        result.unwrap();
        finished += 1;
        most_unfinished = most_unfinished.max(pulled.load(Ordering::SeqCst) - finished);
    }
    assert_eq!(finished, 200_000);
    assert_eq!(server.gauge.requests(), 200_000);
    // The documented bound is 4 × concurrency; with nothing retried it is the
    // concurrency itself.
    assert!(
        most_unfinished <= 8,
        "{most_unfinished} ids pulled and unfinished"
    );
}
