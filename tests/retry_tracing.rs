//! What a run writes to `tracing`: a span per batch, per id and per attempt, and
//! debug events for each retry, each failed id and each long wait for a rate-limit
//! token. In a test binary of its own: tracing caches whether anyone listens per call
//! site, process-wide, and tests on other threads without a subscriber would otherwise
//! decide that for this one.

mod support;

use std::time::Duration;

use fanout::{FanOut, RetryPolicy};
use support::{Arrivals, Item, Log, echo_id};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn spans_and_events_say_which_batch_id_and_attempt() {
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
    // Each within its batch's and its id's spans; each attempt in one of its own.
    for line in &retries {
        assert!(
            line.contains("fanout.batch{total=1}:fanout.id{id=p url=http://"),
            "{line}"
        );
    }
    for n in 1..=3 {
        let attempt = format!("}}:fanout.attempt{{n={n}}}: ");
        assert!(text.contains(&attempt), "no {attempt} in {text}");
    }
    assert!(!text.contains("s3cret"), "{text}");

    // A final failure, and a wait of over a second for a token.
    let missing = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&missing)
        .await;
    let slow = fanout::Quota::with_period(Duration::from_millis(1500)).unwrap();
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&format!("{}/items/{{id}}", missing.uri()))
        .rate_limit(slow)
        // Both hold a slot at once: the second waits the whole period for its token,
        // however long the first one's request takes.
        .concurrency(2)
        .build()
        .unwrap();
    let results = fan
        .fan_out(["q".to_owned(), "r".to_owned()])
        .collect_ordered()
        .await;
    assert!(results.iter().all(Result::is_err));
    let text = log.text();
    let failed: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(" failed "))
        .collect();
    assert_eq!(failed.len(), 2, "{text}");
    assert!(
        failed[0].contains("fanout.id{id=q url=http://"),
        "{}",
        failed[0]
    );
    assert!(
        failed[0].contains("attempts=1") && failed[0].contains("404"),
        "{}",
        failed[0]
    );
    let waited: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("waited for a rate-limit token"))
        .collect();
    assert_eq!(waited.len(), 1, "{text}");
    assert!(waited[0].contains("fanout.id{id=r "), "{}", waited[0]);
}
