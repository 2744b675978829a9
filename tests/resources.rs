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
    eprintln!("endless body, cap {CAP}: the server sent {sent} bytes");
    // Past the cap by what the server sends before it sees the close: about 1 KiB
    // here; the bound leaves a stalled client a second. An uncapped read never ends.
    assert!(
        (CAP as u64) < sent && sent < 1 << 20,
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
        eprintln!("64 MiB body, declared {declared}, cap {CAP}: the server sent {sent} bytes");
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

const DROP_CONCURRENCY: usize = 16;

/// Runs `run`, which drops the run it started once requests are running on the server,
/// then checks that the server sees every request go away, that at most one
/// concurrency's worth of requests (already on their way) arrives after the drop, and
/// that no task of the run outlives it.
async fn nothing_survives_a_drop<F>(run: F)
where
    F: AsyncFnOnce(FanOut<u32, Item>, &ChaosServer),
{
    let server = busy_server();
    let before = alive_tasks();
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(DROP_CONCURRENCY)
        .max_body_bytes(1 << 30)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    run(fan, &server).await;
    let sent_at_drop = server.requests();
    // The FanOut is gone too, and with it reqwest's pool and its connection tasks.
    assert!(
        eventually(Duration::from_secs(5), || server.in_flight() == 0).await,
        "{} requests still running on the server",
        server.in_flight()
    );
    assert!(
        eventually(Duration::from_secs(5), || alive_tasks() == before).await,
        "{} tasks alive, {before} before the run",
        alive_tasks()
    );
    eprintln!(
        "tasks alive: {before} before the run, {} after",
        alive_tasks()
    );
    let sent = server.requests();
    assert!(
        sent <= sent_at_drop + DROP_CONCURRENCY as u64,
        "{sent} sent, {sent_at_drop} at the drop"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.requests(), sent, "requests after the drop");
}

/// Requests are running on the server, some waiting for their answer, some mid-body,
/// and tasks of the run in the client.
async fn assert_busy(server: &ChaosServer) {
    assert!(
        eventually(Duration::from_secs(5), || server.in_flight() > 0).await,
        "nothing running to cancel"
    );
    eprintln!("before the drop: {} tasks alive", alive_tasks());
    assert!(alive_tasks() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_as_completed_midway_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan, server| {
        let mut stream = fan.fan_out(0..100_000).as_completed();
        for _ in 0..5 {
            let _ = stream.next().await.unwrap();
        }
        assert_busy(server).await;
        drop(stream);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_in_order_midway_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan, server| {
        // Id 0 is slow: nothing comes out, but requests are running when it is dropped.
        let mut stream = fan.fan_out(0..100_000).in_order();
        let waited = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
        assert!(waited.is_err(), "id 0 answers only after 30 s");
        assert_busy(server).await;
        drop(stream);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_collecting_future_ends_every_request_and_task() {
    nothing_survives_a_drop(async |fan, server| {
        let mut collect = std::pin::pin!(fan.fan_out(0..100_000).collect_ordered());
        let waited = tokio::time::timeout(Duration::from_millis(500), &mut collect).await;
        assert!(waited.is_err(), "some ids answer only after 30 s");
        assert_busy(server).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_sleeping_2_s_between_items_causes_no_timeouts() {
    // Bodies of 8 MiB: an answer is read only while something polls its request,
    // chunk by chunk (about 0.3 s here), and an attempt may take 1.5 s. While the
    // consumer sleeps, the answers of the requests it is not reading must be read in
    // time.
    let body = 8 << 20;
    let server = ChaosServer::always(Fault::Large {
        bytes: body,
        declared: true,
    });
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(2)
        .max_body_bytes(body)
        .timeout(Duration::from_millis(1500))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let mut stream = fan.fan_out(0..8).as_completed();
    let mut outcomes = Vec::new();
    while let Some((id, result)) = stream.next().await {
        if outcomes.len() < 3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        outcomes.push((id, result.map(|item| item.id.len())));
    }
    assert_eq!(outcomes.len(), 8);
    for (id, result) in &outcomes {
        assert!(result.is_ok(), "id {id}: {:?}", result.as_ref().err());
    }
    // One request an id: none timed out and was sent again.
    assert_eq!(server.requests(), 8);
}
