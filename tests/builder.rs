//! Every invalid setting is a typed error from `build()`, with a message that says
//! what to fix; nothing panics.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fanout::{ErrorKind, FanOut, FanOutBuilder, Quota, RateLimiter, RetryPolicy};

type Builder = FanOutBuilder<u32, serde_json::Value>;

fn builder() -> Builder {
    FanOut::builder().detail_url("https://api.example.com/items/{id}")
}

#[track_caller]
fn assert_fails(builder: Builder, kind: ErrorKind, says: &str) {
    let err = builder.build().unwrap_err();
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.is_builder());
    let message = err.to_string();
    assert!(
        message.contains(says),
        "{message:?} should mention {says:?}"
    );
}

#[test]
fn a_valid_builder_builds() {
    let fan = builder()
        .concurrency(64)
        .timeout(Duration::from_secs(5))
        .header("x-api-key", "k")
        .bearer_auth("t")
        .query(&[("include", "stats")])
        .max_body_bytes(1024)
        .reorder_window(10)
        .build()
        .unwrap();
    let debug = format!("{fan:?}");
    assert!(
        debug.contains("https://api.example.com/items/{id}?include=stats"),
        "{debug}"
    );
}

#[test]
fn template_problems() {
    let with = |t: &str| FanOut::builder().detail_url(t);
    assert_fails(
        FanOut::builder(),
        ErrorKind::InvalidTemplate,
        "no detail URL",
    );
    assert_fails(
        with("https://h.test/items"),
        ErrorKind::InvalidTemplate,
        "no `{id}`",
    );
    assert_fails(
        with("https://h.test/{name}"),
        ErrorKind::InvalidTemplate,
        "unknown placeholder `{name}`",
    );
    assert_fails(
        with("https://h.test/{id"),
        ErrorKind::InvalidTemplate,
        "not closed",
    );
    assert_fails(
        with("https://h.test/}{id}"),
        ErrorKind::InvalidTemplate,
        "no opening `{`",
    );
    assert_fails(
        with("/items/{id}"),
        ErrorKind::InvalidTemplate,
        "relative URL",
    );
    assert_fails(
        with("ftp://h.test/{id}"),
        ErrorKind::InvalidTemplate,
        "only http and https",
    );
    assert_fails(
        with("mailto:{id}@h.test"),
        ErrorKind::InvalidTemplate,
        "only http and https",
    );
    assert_fails(
        with("https://{id}/x"),
        ErrorKind::InvalidTemplate,
        "path or the query",
    );
}

#[test]
fn number_problems() {
    assert_fails(
        builder().concurrency(0),
        ErrorKind::InvalidConfig,
        "concurrency must be at least 1",
    );
    assert_fails(
        builder().concurrency(usize::MAX),
        ErrorKind::InvalidConfig,
        "too large",
    );
    assert_fails(
        builder().concurrency(fanout::Concurrency::adaptive(0, 8)),
        ErrorKind::InvalidConfig,
        "concurrency must be at least 1",
    );
    assert_fails(
        builder().concurrency(fanout::Concurrency::adaptive(9, 8)),
        ErrorKind::InvalidConfig,
        "min (9) is above its max (8)",
    );
    assert_fails(
        builder().concurrency(fanout::Concurrency::adaptive(1, usize::MAX)),
        ErrorKind::InvalidConfig,
        "too large",
    );
    for limit in [0, usize::MAX] {
        assert_fails(
            builder().per_host_concurrency(limit),
            ErrorKind::InvalidConfig,
            "per_host_concurrency must be between 1 and",
        );
    }
    assert_fails(
        builder().per_host_requests_per_second(0),
        ErrorKind::InvalidConfig,
        "per_host_requests_per_second must be at least 1",
    );
    assert_fails(
        builder().timeout(Duration::ZERO),
        ErrorKind::InvalidConfig,
        "timeout",
    );
    assert_fails(
        builder().max_body_bytes(0),
        ErrorKind::InvalidConfig,
        "max_body_bytes",
    );
    assert_fails(
        builder().reorder_window(0),
        ErrorKind::InvalidConfig,
        "reorder_window",
    );
    assert_fails(
        builder().deadline(Duration::ZERO),
        ErrorKind::InvalidConfig,
        "deadline",
    );
    assert_fails(
        builder().requests_per_second(0),
        ErrorKind::InvalidConfig,
        "requests_per_second must be at least 1",
    );
    assert_fails(
        builder().retry(
            RetryPolicy::exponential()
                .initial_delay(Duration::from_secs(2))
                .max_delay(Duration::from_secs(1)),
        ),
        ErrorKind::InvalidConfig,
        "max_delay (1s) is shorter than its initial_delay (2s)",
    );
}

#[test]
fn the_last_rate_setting_wins() {
    let quota = Quota::per_minute(NonZeroU32::new(60).unwrap());
    // A bad earlier setting is replaced, not reported.
    builder()
        .requests_per_second(0)
        .rate_limit(quota)
        .build()
        .unwrap();
    let limiter = Arc::new(RateLimiter::direct(quota));
    builder()
        .requests_per_second(0)
        .rate_limiter(limiter)
        .build()
        .unwrap();
    assert_fails(
        builder().rate_limit(quota).requests_per_second(0),
        ErrorKind::InvalidConfig,
        "requests_per_second",
    );
}

#[test]
fn header_problems() {
    assert_fails(
        builder().header("bad name", "v"),
        ErrorKind::InvalidHeader,
        "\"bad name\" is not a valid header name",
    );
    assert_fails(
        builder().header("", "v"),
        ErrorKind::InvalidHeader,
        "not a valid header name",
    );
    assert_fails(
        builder().header("x-ok", "line\nbreak"),
        ErrorKind::InvalidHeader,
        "header `x-ok`",
    );
    assert_fails(
        builder().bearer_auth("tok\nen"),
        ErrorKind::InvalidHeader,
        "bearer token",
    );
}

#[test]
fn secrets_are_not_echoed_in_errors_or_debug() {
    let err = builder()
        .header("x-api-key", "sec\nret")
        .build()
        .unwrap_err();
    assert!(!err.to_string().contains("sec"));
    let err = builder().bearer_auth("sec\nret").build().unwrap_err();
    assert!(!err.to_string().contains("sec"));
    let debug = format!("{:?}", builder().bearer_auth("hunter2"));
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn the_first_header_problem_is_reported() {
    assert_fails(
        builder().header("first bad", "v").header("second bad", "v"),
        ErrorKind::InvalidHeader,
        "first bad",
    );
}
