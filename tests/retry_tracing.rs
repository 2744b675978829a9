//! The debug event each retry emits. In a test binary of its own: tracing caches
//! whether anyone listens per call site, process-wide, and tests on other threads
//! without a subscriber would otherwise decide that for this one.

mod support;

use std::time::Duration;

use fanout::{FanOut, RetryPolicy};
use support::{Arrivals, Item, Log, echo_id};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn each_retry_is_logged_at_debug_with_id_attempt_delay_and_reason() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(ResponseTemplate::new(503)))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(arrivals.answer(echo_id))
        .mount(&server)
        .await;
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
        .bearer_auth("s3cret-token")
        .retry(RetryPolicy::exponential().initial_delay(Duration::from_millis(5)))
        .build()
        .unwrap();
    let item = fan
        .fan_out(["p".to_owned()])
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(item[0].id, "p");
    assert_eq!(arrivals.count(), 3);

    let text = log.text();
    let retries: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("retrying"))
        .collect();
    assert_eq!(retries.len(), 2, "{text}");
    for (n, line) in retries.iter().enumerate() {
        assert!(line.contains("DEBUG"), "{line}");
        assert!(line.contains("id=\"p\"") || line.contains("id=p"), "{line}");
        assert!(line.contains(&format!("attempt={}", n + 1)), "{line}");
        assert!(line.contains("delay_ms="), "{line}");
        assert!(line.contains("503 Service Unavailable"), "{line}");
    }
    assert!(!text.contains("s3cret"), "{text}");
}
