//! `request_with`: a request of the caller's making per id (a POST with a body, headers
//! of its own), under the same limits, retries and decoding as the default GET.

use std::time::Duration;

use fanout::{ErrorKind, FanOut, RetryPolicy};
use serde_json::{Value, json};
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn quick_retries() -> RetryPolicy {
    RetryPolicy::exponential()
        .max_retries(2)
        .initial_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
}

/// Answers a POST to /search whose body asks for `entity` with that entity's result.
async fn search_server(entities: &[u64]) -> MockServer {
    let server = MockServer::start().await;
    for &entity in entities {
        Mock::given(method("POST"))
            .and(path("/search"))
            .and(body_json(json!({ "entity": entity })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "found": entity * 10 })))
            .mount(&server)
            .await;
    }
    server
}

#[tokio::test]
async fn one_post_per_id_with_its_body_and_one_url_for_all() {
    let server = search_server(&[1, 2, 3]).await;
    // No `{id}` in the URL: the id travels in the body.
    let searches = FanOut::<u64, Value>::builder()
        .detail_url(&format!("{}/search", server.uri()))
        .request_with(|client, id: &u64, url| client.post(url).json(&json!({ "entity": id })))
        .build()
        .unwrap();

    let found: Vec<Value> = searches
        .fan_out([3, 1, 2])
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(
        found,
        [
            json!({"found": 30}),
            json!({"found": 10}),
            json!({"found": 20})
        ]
    );
    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.method.as_str() == "POST"));
}

#[tokio::test]
async fn without_a_request_function_the_template_still_needs_its_id() {
    let err = FanOut::<u64, Value>::builder()
        .detail_url("http://127.0.0.1:9/search")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
    assert!(err.to_string().contains("no `{id}`"), "{err}");
}

#[tokio::test]
async fn a_retry_sends_the_same_request_again() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(body_json(json!({ "entity": 7 })))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "found": 70 })))
        .mount(&server)
        .await;
    let searches = FanOut::<u64, Value>::builder()
        .detail_url(&format!("{}/search?id={{id}}", server.uri()))
        .request_with(|client, id: &u64, url| client.post(url).json(&json!({ "entity": id })))
        .retry(quick_retries())
        .build()
        .unwrap();

    let found = searches.fan_out([7]).try_collect_ordered().await.unwrap();
    assert_eq!(found, [json!({"found": 70})]);
    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].body, received[1].body);
    assert_eq!(received[1].url.query(), Some("id=7"));
}

#[tokio::test]
async fn the_fanouts_headers_apply_unless_the_function_sets_its_own() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(header("authorization", "Bearer shared"))
        .and(header("x-trace", "id-5"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&server)
        .await;
    // With fanout's own client (default headers) and with one of the caller's.
    for client in [None, Some(reqwest::Client::new())] {
        let mut builder = FanOut::<u64, Value>::builder()
            .detail_url(&format!("{}/items/{{id}}", server.uri()))
            .bearer_auth("shared")
            .header("x-trace", "default")
            .request_with(|client, id: &u64, url| {
                client.get(url).header("x-trace", format!("id-{id}"))
            });
        if let Some(client) = client {
            builder = builder.client(client);
        }
        let fan = builder.build().unwrap();
        let outcomes = fan.fan_out([5]).collect_ordered().await;
        assert!(outcomes[0].is_ok(), "{:?}", outcomes[0]);
    }
}

#[tokio::test]
async fn a_bad_request_fails_its_id_alone_and_sends_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&server)
        .await;
    let fan = FanOut::<u64, Value>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .request_with(|client, id: &u64, url| match id {
            1 => client.get(url).header("x-bad", "line\nbreak"),
            2 => client.get("ftp://example.com/x"),
            3 => panic!("no request for 3"),
            _ => client.get(url),
        })
        .build()
        .unwrap();

    let outcomes = fan.fan_out([1, 2, 3, 4]).collect_ordered().await;
    let kinds: Vec<_> = outcomes
        .iter()
        .map(|o| o.as_ref().err().map(fanout::Error::kind))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(ErrorKind::InvalidId),
            Some(ErrorKind::InvalidId),
            Some(ErrorKind::Panic),
            None
        ]
    );
    for outcome in &outcomes[..3] {
        let err = outcome.as_ref().unwrap_err();
        assert_eq!(err.attempts(), 0, "{err}");
    }
    assert!(
        outcomes[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("could not be built"),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_streamed_body_is_sent_once_and_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let fan = FanOut::<u64, Value>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .request_with(|client, id: &u64, url| {
            let chunks = [Ok::<_, std::io::Error>(format!("{{\"entity\":{id}}}"))];
            client
                .put(url)
                .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        })
        .retry(quick_retries())
        .build()
        .unwrap();

    let batch = fan.fan_out([9]);
    let progress = batch.progress();
    let outcomes = batch.collect_ordered().await;
    assert_eq!(progress.stats().retries, 0, "no retry planned for it");
    let err = outcomes[0].as_ref().unwrap_err();
    assert_eq!(
        err.status(),
        Some(reqwest::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );
    assert!(err.to_string().contains("cannot be sent twice"), "{err}");
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
