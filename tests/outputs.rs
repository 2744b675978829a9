//! The four outputs: order, completeness, and cancellation on the first error.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use axum::http::StatusCode;
use fanout::{ErrorKind, FanOut};
use futures::StreamExt;
use support::{GaugeServer, Item};

const SLOW: Duration = Duration::from_millis(400);

/// Even ids are slow, odd ids answer at once: the server finishes out of input order.
async fn out_of_order_server() -> GaugeServer {
    GaugeServer::scripted(|id| {
        let slow = id.parse::<u32>().is_ok_and(|n| n.is_multiple_of(2));
        (if slow { SLOW } else { Duration::ZERO }, StatusCode::OK)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_ordered_keeps_input_order_when_answers_come_out_of_order() {
    let server = out_of_order_server().await;
    let items = server.client(10).fan_out(0..10).collect_ordered().await;
    let ids: Vec<String> = items.into_iter().map(|r| r.unwrap().id).collect();
    assert_eq!(ids, (0..10).map(|n| n.to_string()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_collect_ordered_keeps_input_order() {
    let server = out_of_order_server().await;
    let items = server
        .client(10)
        .fan_out(0..10)
        .try_collect_ordered()
        .await
        .unwrap();
    let ids: Vec<u32> = items.iter().map(|i| i.id.parse().unwrap()).collect();
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_order_streams_in_input_order() {
    let server = out_of_order_server().await;
    let pairs: Vec<(u32, String)> = server
        .client(10)
        .fan_out(0..10)
        .in_order()
        .map(|(id, r)| (id, r.unwrap().id))
        .collect()
        .await;
    for (n, (id, body_id)) in pairs.iter().enumerate() {
        assert_eq!(*id as usize, n);
        assert_eq!(body_id, &n.to_string());
    }
    assert_eq!(pairs.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_completed_yields_the_fast_ones_first() {
    let server = out_of_order_server().await;
    let ids: Vec<u32> = server
        .client(10)
        .fan_out(0..10)
        .as_completed()
        .map(|(id, r)| {
            assert_eq!(r.unwrap().id, id.to_string());
            id
        })
        .collect()
        .await;
    let (fast, slow) = ids.split_at(5);
    assert!(
        fast.iter().all(|n| !n.is_multiple_of(2)),
        "fast ids first: {ids:?}"
    );
    assert!(
        slow.iter().all(|n| n.is_multiple_of(2)),
        "slow ids last: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_order_window_pauses_admission_behind_a_slow_head() {
    // Id 0 is slow; the rest are instant. With a window of 5 the stream may not run
    // more than 5 positions ahead of id 0 while id 0 is still pending.
    const HEAD: Duration = Duration::from_secs(1);
    let server = GaugeServer::scripted(|id| {
        let delay = if id == "0" { HEAD } else { Duration::ZERO };
        (delay, StatusCode::OK)
    })
    .await;
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(3)
        .reorder_window(5)
        .build()
        .unwrap();
    let mut stream = fan.fan_out(0..100).in_order();
    let gauge = std::sync::Arc::clone(&server.gauge);
    let watcher = tokio::spawn(async move {
        // While id 0 is pending, count what else reached the server.
        tokio::time::sleep(HEAD / 2).await;
        gauge.requests()
    });
    let (first, _) = stream.next().await.unwrap();
    assert_eq!(first, 0);
    let while_head_was_slow = watcher.await.unwrap();
    assert_eq!(
        while_head_was_slow, 5,
        "window of 5 positions, head included"
    );
    let rest: Vec<u32> = stream.map(|(id, _)| id).collect().await;
    assert_eq!(rest, (1..100).collect::<Vec<_>>());
}

/// Ids divisible by 7 are 404s; the rest succeed after a short, id-dependent delay.
async fn mixed_server() -> GaugeServer {
    GaugeServer::scripted(|id| {
        let n: u64 = id.parse().unwrap();
        let delay = Duration::from_millis((n * 7919) % 13);
        let status = if n.is_multiple_of(7) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        (delay, status)
    })
    .await
}

fn assert_exactly_once(outcomes: &[(u32, bool)], n: u32) {
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (id, ok) in outcomes {
        *seen.entry(*id).or_default() += 1;
        assert_eq!(*ok, !id.is_multiple_of(7), "id {id} has the wrong outcome");
    }
    assert_eq!(seen.len(), n as usize, "every id has an outcome");
    assert!(seen.values().all(|&c| c == 1), "no id has two outcomes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_gives_every_id_exactly_one_outcome() {
    const N: u32 = 500;
    let server = mixed_server().await;
    let fan = server.client(32);

    let collected = fan.fan_out(0..N).collect_ordered().await;
    assert_eq!(collected.len(), N as usize);
    let outcomes: Vec<(u32, bool)> = collected
        .iter()
        .enumerate()
        .map(|(n, r)| {
            if let Err(err) = r {
                assert_eq!(err.kind(), ErrorKind::Status);
                assert_eq!(err.id(), Some(n.to_string().as_str()));
            }
            (n as u32, r.is_ok())
        })
        .collect();
    assert_exactly_once(&outcomes, N);

    let completed: Vec<(u32, bool)> = fan
        .fan_out(0..N)
        .as_completed()
        .map(|(id, r)| (id, r.is_ok()))
        .collect()
        .await;
    assert_exactly_once(&completed, N);

    let ordered: Vec<(u32, bool)> = fan
        .fan_out(0..N)
        .in_order()
        .map(|(id, r)| (id, r.is_ok()))
        .collect()
        .await;
    assert_exactly_once(&ordered, N);
    assert!(ordered.windows(2).all(|w| w[0].0 < w[1].0));

    // Three full runs: each id reached the server exactly three times.
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for id in server.gauge.ids() {
        *per_id.entry(id).or_default() += 1;
    }
    assert_eq!(per_id.len(), N as usize);
    assert!(per_id.values().all(|&c| c == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_collect_ordered_returns_the_first_error_and_cancels_the_rest() {
    // Id 3 fails at once; everything else takes long enough that it is still running.
    let server = GaugeServer::scripted(|id| {
        // A final answer: a retryable one would free its slot while waiting to retry.
        if id == "3" {
            (Duration::ZERO, StatusCode::NOT_FOUND)
        } else {
            (Duration::from_secs(2), StatusCode::OK)
        }
    })
    .await;
    let err = server
        .client(8)
        .fan_out(0..1000)
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Status);
    assert_eq!(err.status(), Some(fanout::reqwest::StatusCode::NOT_FOUND));
    assert_eq!(err.id(), Some("3"));

    // The other requests were cancelled: they leave the server, and no new ones arrive
    // (once any request already being written at the cancellation has landed).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gauge = &server.gauge;
    assert!(
        support::eventually(Duration::from_secs(1), || gauge.in_flight() == 0).await,
        "{} requests still in flight on the server",
        gauge.in_flight()
    );
    let sent = gauge.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gauge.requests(), sent);
    // The error frees no slot: nothing beyond the first eight ids was ever sent.
    assert!(
        sent <= 8,
        "only the first slots' worth were sent, got {sent}"
    );
    assert!(gauge.ids().iter().all(|id| id.parse::<u32>().unwrap() < 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_collect_ordered_ends_an_endless_input_at_the_first_error() {
    // "Scan ids until the first 404": an endless input must not be sized up front.
    let server = GaugeServer::scripted(|id| {
        let status = if id == "40" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        (Duration::ZERO, status)
    })
    .await;
    let err = server
        .client(4)
        .fan_out(0u32..)
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.id(), Some("40"));
    // The scan ends there: after any request already on its way lands, no more arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = server.gauge.requests();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.gauge.requests(), sent);
}

#[test]
fn outside_a_tokio_runtime_every_id_fails_with_a_runtime_error() {
    let fan = FanOut::<u32, Item>::builder()
        .detail_url("http://127.0.0.1:9/items/{id}")
        .build()
        .unwrap();
    let results = futures::executor::block_on(fan.fan_out(0..3).collect_ordered());
    assert_eq!(results.len(), 3);
    for (n, r) in results.iter().enumerate() {
        let err = r.as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Runtime);
        assert_eq!(err.id(), Some(n.to_string().as_str()));
    }
}
