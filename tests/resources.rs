//! What a run holds on to, against a server that misbehaves: bodies are read no
//! further than the cap, dropping a run mid-way leaves nothing running on either side,
//! and a slow consumer does not make the requests it is not reading time out.

mod support;

use std::time::Duration;

use fanout::{ErrorKind, FanOut, RetryPolicy};
use futures::StreamExt;
use support::Item;
use support::chaos::{ChaosServer, Fault};
use support::eventually;

const CAP: usize = 64 * 1024;

fn capped(server: &ChaosServer) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&server.template())
        .max_body_bytes(CAP)
        .retry(RetryPolicy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn too_large(server: &ChaosServer) {
    let err = capped(server)
        .fan_out([1])
        .collect_ordered()
        .await
        .remove(0)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert!(err.to_string().contains("max_body_bytes"), "{err}");
    // The connection is closed, not drained: the server's body ends.
    assert!(
        eventually(Duration::from_secs(2), || server.in_flight() == 0).await,
        "the server is still sending"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_body_is_read_up_to_the_cap_and_no_further() {
    // 1 KiB a millisecond: the server sends only about as fast as the client reads, so
    // what it sent is what the client took in, give or take what sits in the sockets.
    let server = ChaosServer::always(Fault::Endless);
    too_large(&server).await;
    let sent = server.body_bytes_sent();
    assert!(
        (CAP as u64) < sent && sent < (CAP + 32 * 1024) as u64,
        "the server sent {sent} bytes for a cap of {CAP}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_body_is_refused_at_the_cap_with_or_without_content_length() {
    let huge = 64 << 20;
    // Declared: refused on the header, before reading any of it. Undeclared: read up
    // to the cap. Either way the server gets rid of little more than the socket
    // buffers hold (a few MiB on loopback), not 64 MiB.
    for declared in [true, false] {
        let server = ChaosServer::always(Fault::Large {
            bytes: huge,
            declared,
        });
        too_large(&server).await;
        let sent = server.body_bytes_sent();
        assert!(sent < 16 << 20, "declared {declared}: sent {sent} bytes");
    }
}

/// Slow answers, endless bodies and quick ones: when the run is dropped, some
/// requests are waiting for their status line and some are mid-body.
fn busy_server() -> ChaosServer {
    ChaosServer::scripted(|id, _| match id.parse::<u32>().unwrap_or(0) % 3 {
        0 => Fault::Slow(Duration::from_secs(30)),
        1 => Fault::Endless,
        _ => Fault::Fine,
    })
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Drops whatever `run` started once it has made progress, then checks that the
/// server sees every request go away and that no task of the run outlives it.
async fn nothing_survives_a_drop<F>(run: F)
where
    F: AsyncFnOnce(FanOut<u32, Item>),
{
    let server = busy_server();
    let before = alive_tasks();
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(16)
        .max_body_bytes(1 << 30)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    run(fan).await;
    // The FanOut is gone too, and with it reqwest's pool and its connection tasks.
    assert!(
        eventually(Duration::from_secs(2), || server.in_flight() == 0).await,
        "{} requests still running on the server",
        server.in_flight()
    );
    assert!(
        eventually(Duration::from_secs(2), || alive_tasks() == before).await,
        "{} tasks alive, {before} before the run",
        alive_tasks()
    );
    let sent = server.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.requests(), sent, "requests after the drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_as_completed_midway_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan| {
        let mut stream = fan.fan_out(0..100_000).as_completed();
        for _ in 0..5 {
            let _ = stream.next().await.unwrap();
        }
        assert!(alive_tasks() > 0);
        drop(stream);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_in_order_midway_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan| {
        // Id 0 is slow: nothing comes out, but requests are running when it is dropped.
        let mut stream = fan.fan_out(0..100_000).in_order();
        let waited = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
        assert!(waited.is_err(), "id 0 answers only after 30 s");
        drop(stream);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_collecting_future_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan| {
        let collect = fan.fan_out(0..100_000).collect_ordered();
        let waited = tokio::time::timeout(Duration::from_millis(500), collect).await;
        assert!(waited.is_err(), "some ids answer only after 30 s");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sleeping_2_s_between_items_causes_no_timeouts() {
    // Answers take 150 ms; an attempt may take 500 ms. While the consumer sleeps,
    // the requests it is not reading go on, and their answers are read in time.
    let server = ChaosServer::always(Fault::Slow(Duration::from_millis(150)));
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(4)
        .timeout(Duration::from_millis(500))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let mut stream = fan.fan_out(0..40).as_completed();
    let mut outcomes = Vec::new();
    while let Some((id, result)) = stream.next().await {
        if outcomes.len() < 3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        outcomes.push((id, result));
    }
    assert_eq!(outcomes.len(), 40);
    for (id, result) in &outcomes {
        assert!(result.is_ok(), "id {id}: {:?}", result.as_ref().err());
    }
    // One request an id: none timed out and was sent again.
    assert_eq!(server.requests(), 40);
}
