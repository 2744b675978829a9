//! Hostile ids are percent-encoded for where they land, checked on what the server
//! actually received.

mod support;

use fanout::{ErrorKind, FanOut};
use support::percent_encode;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn echo_server() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200).set_body_string("{}"))
        .mount(&server)
        .await;
    server
}

#[tokio::test]
async fn hostile_ids_stay_inside_their_path_segment_and_query_value() {
    let server = echo_server().await;
    let fan = FanOut::<String, serde_json::Value>::builder()
        .detail_url(&format!(
            "{}/items/{{id}}/detail?q={{id}}&fixed=1",
            server.uri()
        ))
        .build()
        .unwrap();
    let hostile = [
        "../admin",
        "a/b",
        "x?y#z",
        "名前",
        "with space",
        "@evil.test",
        "%2e%2e",
        "a\\b",
        "ctl\u{1}\u{7f}\r\n",
        "k=v&fixed=2",
        "...",
    ];
    let results = fan
        .fan_out(hostile.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .collect_ordered()
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), hostile.len());
    for id in hostile {
        let encoded: String = percent_encode(id);
        let request = received
            .iter()
            .find(|r| r.url.path() == format!("/items/{encoded}/detail"))
            .unwrap_or_else(|| panic!("no request for {id:?} at /items/{encoded}/detail"));
        let segments: Vec<_> = request.url.path_segments().unwrap().collect();
        assert_eq!(segments.len(), 3, "{id:?} kept the path's shape");
        let query: Vec<(String, String)> = request.url.query_pairs().into_owned().collect();
        assert_eq!(
            query,
            vec![
                ("q".to_owned(), id.to_owned()),
                ("fixed".to_owned(), "1".to_owned())
            ],
            "{id:?} stayed one query value"
        );
    }
}

#[tokio::test]
async fn ids_that_would_change_the_path_fail_without_being_sent() {
    let server = echo_server().await;
    let fan = FanOut::<&str, serde_json::Value>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .build()
        .unwrap();
    let results = fan.fan_out(["ok", "..", ".", ""]).collect_ordered().await;
    assert!(results[0].is_ok());
    for (result, id) in results[1..].iter().zip(["..", ".", ""]) {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidId);
        assert_eq!(err.id(), Some(id));
        assert_eq!(err.attempts(), 0);
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}
