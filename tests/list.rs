//! List endpoints: page shapes, every pagination style, loop and page-count guards,
//! wrong shapes, redirects, retries of pages and dropping repeated ids.

mod support;

use std::time::Duration;

use fanout::reqwest::StatusCode;
use fanout::{ErrorKind, FanOut, FanOutBuilder, Pagination, RetryPolicy};
use futures::StreamExt;
use serde_json::json;
use support::{Arrivals, Item};
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn builder<Id>(server: &MockServer, list: &str) -> FanOutBuilder<Id, Item> {
    FanOut::builder()
        .list_url(&format!("{}{list}", server.uri()))
        .detail_url(&format!("{}/items/{{id}}", server.uri()))
}

async fn answer(server: &MockServer, at: &str, body: serde_json::Value) {
    Mock::given(method("GET"))
        .and(path(at))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(server)
        .await;
}

/// The number in query parameter `name`, if there is one.
fn query_number(request: &wiremock::Request, name: &str) -> Option<u64> {
    let (_, value) = request.url.query_pairs().find(|(key, _)| key == name)?;
    Some(value.parse().unwrap())
}

#[tokio::test]
async fn a_bare_array_of_strings_or_numbers() {
    let server = MockServer::start().await;
    answer(&server, "/videos/", json!(["student", "draw", "yes"])).await;
    answer(&server, "/numbers", json!([1, 2, 3])).await;
    let videos = builder::<String>(&server, "/videos/?n=3").build().unwrap();
    assert_eq!(videos.list_ids().await.unwrap(), ["student", "draw", "yes"]);
    let numbers = builder::<u64>(&server, "/numbers").build().unwrap();
    assert_eq!(numbers.list_ids().await.unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn objects_with_an_id_field_under_a_pointer() {
    let server = MockServer::start().await;
    answer(
        &server,
        "/plain",
        json!([{"id": 1, "name": "a"}, {"id": 2}]),
    )
    .await;
    answer(
        &server,
        "/wrapped",
        json!({"data": {"players": [{"player_id": 7}, {"player_id": 9}]}, "meta": {}}),
    )
    .await;
    let plain = builder::<u64>(&server, "/plain").build().unwrap();
    assert_eq!(plain.list_ids().await.unwrap(), [1, 2]);
    let wrapped = builder::<u64>(&server, "/wrapped")
        .ids_at("/data/players")
        .id_field("player_id")
        .build()
        .unwrap();
    assert_eq!(wrapped.list_ids().await.unwrap(), [7, 9]);
}

#[tokio::test]
async fn a_wrong_shape_names_the_url_the_pointer_and_what_was_found() {
    let server = MockServer::start().await;
    answer(&server, "/wrapped", json!({"data": [1], "meta": {"n": 1}})).await;
    let err = builder::<u64>(&server, "/wrapped")
        .build()
        .unwrap()
        .list_ids()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert_eq!(err.url().unwrap().path(), "/wrapped");
    let message = err.to_string();
    assert!(
        message.contains("at the top level, found an object with keys data, meta"),
        "{message}"
    );

    let err = builder::<u64>(&server, "/wrapped")
        .ids_at("/items")
        .build()
        .unwrap()
        .list_ids()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing at \"/items\""), "{err}");

    answer(&server, "/html", json!("<html>")).await;
    let err = builder::<u64>(&server, "/html")
        .build()
        .unwrap()
        .list_ids()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("found a string"), "{err}");
}

#[tokio::test]
async fn link_header_pagination() {
    let server = MockServer::start().await;
    let uri = server.uri();
    Mock::given(path("/items"))
        .and(query_param("page", "2"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([3, 4]))
                .insert_header(
                    "Link",
                    format!(r#"<{uri}/items?page=1>; rel="prev", </items?page=3>; rel="next""#)
                        .as_str(),
                ),
        )
        .mount(&server)
        .await;
    Mock::given(path("/items"))
        .and(query_param("page", "3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([5])))
        .mount(&server)
        .await;
    Mock::given(path("/items"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([1, 2]))
                .insert_header(
                    "Link",
                    format!(r#"<{uri}/items?page=2>; rel="next""#).as_str(),
                ),
        )
        .mount(&server)
        .await;
    let fan = builder::<u64>(&server, "/items")
        .paginate(Pagination::link_header())
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn next_url_in_the_body_relative_or_absolute() {
    let server = MockServer::start().await;
    let uri = server.uri();
    answer(
        &server,
        "/v1/items",
        json!({"data": [1], "links": {"next": "page2"}}),
    )
    .await;
    answer(
        &server,
        "/v1/page2",
        json!({"data": [2], "links": {"next": format!("{uri}/v1/page3")}}),
    )
    .await;
    answer(
        &server,
        "/v1/page3",
        json!({"data": [3], "links": {"next": null}}),
    )
    .await;
    let fan = builder::<u64>(&server, "/v1/items")
        .ids_at("/data")
        .paginate(Pagination::next_url_at("/links/next"))
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn offset_and_limit_parameters() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    // The server caps pages at 2 items although 3 were asked for.
    let served = arrivals.clone();
    Mock::given(path("/items"))
        .respond_with(served.answer(|request: &wiremock::Request| {
            let offset = query_number(request, "offset").unwrap() as usize;
            let all = [10, 11, 12, 13, 14];
            let page: Vec<u32> = all.iter().copied().skip(offset).take(2).collect();
            ResponseTemplate::new(200).set_body_json(page)
        }))
        .mount(&server)
        .await;
    let fan = builder::<u64>(&server, "/items?sort=asc")
        .paginate(Pagination::offset_limit("offset", "limit", 3))
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [10, 11, 12, 13, 14]);
    // Offsets 0, 2, 4, then 5 gives the empty page that ends the list.
    assert_eq!(arrivals.count(), 4);
}

#[tokio::test]
async fn page_numbers_and_a_cursor() {
    let server = MockServer::start().await;
    for (page, ids) in [("0", json!([1, 2])), ("1", json!([3])), ("2", json!([]))] {
        Mock::given(path("/pages"))
            .and(query_param("p", page))
            .respond_with(ResponseTemplate::new(200).set_body_json(ids))
            .mount(&server)
            .await;
    }
    let fan = builder::<u64>(&server, "/pages")
        .paginate(Pagination::page_number("p").first_page(0))
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1, 2, 3]);

    Mock::given(path("/cursor"))
        .and(query_param("after", "c2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"items": [3], "next": null})))
        .mount(&server)
        .await;
    Mock::given(path("/cursor"))
        .and(query_param("after", "17"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"items": [2], "next": "c2"})))
        .mount(&server)
        .await;
    answer(&server, "/cursor", json!({"items": [1], "next": 17})).await;
    let fan = builder::<u64>(&server, "/cursor")
        .ids_at("/items")
        .paginate(Pagination::cursor("/next", "after"))
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn a_next_link_back_to_a_fetched_page_is_a_loop() {
    let server = MockServer::start().await;
    answer(&server, "/a", json!({"ids": [1], "next": "/b"})).await;
    answer(&server, "/b", json!({"ids": [2], "next": "/a"})).await;
    let fan = builder::<u64>(&server, "/a")
        .ids_at("/ids")
        .paginate(Pagination::next_url_at("/next"))
        .build()
        .unwrap();
    let err = fan.list_ids().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pagination);
    assert!(err.to_string().contains("fetched before"), "{err}");
    assert_eq!(err.url().unwrap().path(), "/a");
}

#[tokio::test]
async fn a_server_ignoring_the_page_parameter_is_a_loop() {
    let server = MockServer::start().await;
    answer(&server, "/same", json!([1, 2, 3])).await;
    let fan = builder::<u64>(&server, "/same")
        .paginate(Pagination::page_number("page"))
        .build()
        .unwrap();
    let err = fan.list_ids().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pagination);
    assert!(
        err.to_string()
            .contains("three pages in a row list the same ids"),
        "{err}"
    );
}

#[tokio::test]
async fn more_pages_than_max_pages_is_an_error_not_a_short_list() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(path("/endless"))
        .respond_with(arrivals.answer(|request: &wiremock::Request| {
            let page = query_number(request, "page").unwrap_or(1);
            ResponseTemplate::new(200).set_body_json(json!([page]))
        }))
        .mount(&server)
        .await;
    let fan = builder::<u64>(&server, "/endless")
        .paginate(Pagination::page_number("page"))
        .max_pages(5)
        .build()
        .unwrap();
    let err = fan.list_ids().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pagination);
    assert!(err.to_string().contains("more than max_pages (5)"), "{err}");
    // The sixth page, had it been empty, would have ended the list without error.
    assert_eq!(arrivals.count(), 6);
}

#[tokio::test]
async fn a_307_on_the_list_url_is_followed() {
    let server = MockServer::start().await;
    Mock::given(path("/videos"))
        .respond_with(ResponseTemplate::new(307).insert_header("Location", "/videos/?n=5"))
        .expect(1)
        .mount(&server)
        .await;
    answer(&server, "/videos/", json!(["a", "b"])).await;
    let fan = builder::<String>(&server, "/videos?n=5").build().unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), ["a", "b"]);
}

#[tokio::test]
async fn list_pages_are_retried_like_details() {
    let server = MockServer::start().await;
    Mock::given(path("/flaky"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    answer(&server, "/flaky", json!([1])).await;
    let fan = builder::<u64>(&server, "/flaky")
        .retry(RetryPolicy::exponential().initial_delay(Duration::from_millis(5)))
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1]);

    let gone = builder::<u64>(&server, "/gone").build().unwrap();
    let err = gone.list_ids().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.attempts(), 1);
}

#[tokio::test]
async fn repeated_ids_are_dropped_when_asked() {
    let server = MockServer::start().await;
    answer(&server, "/p", json!({"ids": [1, 2, 3], "next": "/q"})).await;
    answer(&server, "/q", json!({"ids": [3, 4, 1], "next": null})).await;
    let listed = |dedup| {
        builder::<u64>(&server, "/p")
            .ids_at("/ids")
            .paginate(Pagination::next_url_at("/next"))
            .dedup_ids(dedup)
            .build()
            .unwrap()
    };
    assert_eq!(listed(false).list_ids().await.unwrap(), [1, 2, 3, 3, 4, 1]);
    assert_eq!(listed(true).list_ids().await.unwrap(), [1, 2, 3, 4]);

    // In a batch too: each distinct id is fetched once and has one outcome.
    Mock::given(path_prefix_items())
        .respond_with(support::echo_id)
        .mount(&server)
        .await;
    let results = listed(true)
        .fan_out([5, 6, 5, 7, 6])
        .collect_ordered()
        .await;
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap().id).collect();
    assert_eq!(ids, ["5", "6", "7"]);
}

fn path_prefix_items() -> wiremock::matchers::PathRegexMatcher {
    wiremock::matchers::path_regex("^/items/")
}

#[test]
fn bad_list_settings_are_refused_by_build() {
    let base = || FanOut::<u64, Item>::builder().detail_url("http://h/items/{id}");
    let err = base().list_url("ftp://h/list").build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
    let err = base().list_url("http://u:p@h/list").build().unwrap_err();
    assert!(!err.to_string().contains("u:p"), "{err}");
    let err = base()
        .list_url("http://h/l")
        .ids_at("data")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let err = base()
        .list_url("http://h/l")
        .max_pages(0)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("max_pages"), "{err}");
    let err = base()
        .list_url("http://h/l")
        .paginate(Pagination::offset_limit("offset", "limit", 0))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("page size"), "{err}");
}

#[tokio::test]
async fn list_ids_without_a_list_url_says_what_to_do() {
    let fan = FanOut::<u64, Item>::builder()
        .detail_url("http://127.0.0.1:1/items/{id}")
        .build()
        .unwrap();
    let err = fan.list_ids().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("list_url"), "{err}");
}

/// `/list?page=1` lists ids 0..20 and links to page 2 (ids 20..25); details echo.
async fn two_pages(server: &MockServer, arrivals: &Arrivals, second: ResponseTemplate) {
    Mock::given(path("/list"))
        .and(query_param("page", "2"))
        .respond_with(arrivals.answer(second))
        .mount(server)
        .await;
    Mock::given(path("/list"))
        .respond_with(
            arrivals.answer(
                ResponseTemplate::new(200)
                    .set_body_json((0..20).collect::<Vec<u32>>())
                    .insert_header("Link", "</list?page=2>; rel=\"next\""),
            ),
        )
        .mount(server)
        .await;
    Mock::given(path_prefix_items())
        .respond_with(arrivals.answer(|request: &wiremock::Request| {
            support::echo_id(request).set_delay(Duration::from_millis(5))
        }))
        .mount(server)
        .await;
}

fn listed(server: &MockServer) -> FanOut<u32, Item> {
    builder::<u32>(server, "/list")
        .paginate(Pagination::link_header())
        .concurrency(4)
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_listed_starts_details_before_the_next_page() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    let second = ResponseTemplate::new(200).set_body_json((20..25).collect::<Vec<u32>>());
    two_pages(&server, &arrivals, second).await;
    let results = listed(&server).fan_out_listed().collect_ordered().await;
    let ids: Vec<String> = results.into_iter().map(|r| r.unwrap().id).collect();
    let expected: Vec<String> = (0..25).map(|n| n.to_string()).collect();
    assert_eq!(ids, expected);

    // Page 2 was asked for only once page 1's ids were nearly all admitted: at least
    // 20 - 4 details had arrived before it.
    let paths = arrivals.paths();
    let list_requests: Vec<usize> = (0..paths.len())
        .filter(|&at| paths[at] == "/list")
        .collect();
    assert_eq!(list_requests.len(), 2, "{paths:?}");
    let second_page = list_requests[1];
    assert_eq!(list_requests[0], 0);
    assert!(paths[1].starts_with("/items/"), "{paths:?}");
    let details_before = paths[..second_page]
        .iter()
        .filter(|p| p.starts_with("/items/"))
        .count();
    assert!(
        details_before >= 16,
        "{details_before} details before page 2: {paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_failure_midway_ends_with_one_error_after_every_listed_id() {
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    two_pages(&server, &arrivals, ResponseTemplate::new(404)).await;
    let fan = listed(&server);

    let results = fan.fan_out_listed().collect_ordered().await;
    assert_eq!(results.len(), 21);
    assert!(results[..20].iter().all(Result::is_ok));
    let err = results[20].as_ref().unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.url().unwrap().query(), Some("page=2"));
    assert_eq!(err.id(), None);

    let items: Vec<_> = fan.fan_out_listed().try_as_completed().collect().await;
    assert_eq!(items.len(), 21);
    assert!(
        items[..20]
            .iter()
            .all(|item| matches!(item, Ok((_, Ok(_)))))
    );
    assert!(
        items[20]
            .as_ref()
            .is_err_and(|err| err.status() == Some(StatusCode::NOT_FOUND))
    );

    let in_order: Vec<_> = fan.fan_out_listed().try_in_order().collect().await;
    let ids: Vec<u32> = in_order[..20]
        .iter()
        .map(|item| item.as_ref().unwrap().0)
        .collect();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    assert!(in_order[20].is_err());

    // The plain stream has every listed id's outcome, and no item for the list error.
    assert_eq!(fan.fan_out_listed().as_completed().count().await, 20);

    let err = fan
        .fan_out_listed()
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
}

#[tokio::test]
async fn fan_out_listed_without_a_list_url_is_one_error() {
    let fan = FanOut::<u64, Item>::builder()
        .detail_url("http://127.0.0.1:1/items/{id}")
        .build()
        .unwrap();
    let results = fan.fan_out_listed().collect_ordered().await;
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].as_ref().unwrap_err().kind(),
        ErrorKind::InvalidConfig
    );
}

#[tokio::test]
async fn a_next_page_on_another_origin_is_not_followed() {
    let server = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([9])))
        .expect(0)
        .mount(&elsewhere)
        .await;
    answer(
        &server,
        "/list",
        json!({"ids": [1, 2], "next": format!("{}/list?page=2", elsewhere.uri())}),
    )
    .await;
    let fan = builder::<u64>(&server, "/list")
        .ids_at("/ids")
        .paginate(Pagination::next_url_at("/next"))
        .bearer_auth("s3cret")
        .build()
        .unwrap();
    let err = fan.list_ids().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Pagination);
    assert!(
        err.to_string().contains("not on the list URL's origin"),
        "{err}"
    );
    // Streaming, the first page's ids still get their outcomes before the error.
    Mock::given(path_prefix_items())
        .respond_with(support::echo_id)
        .mount(&server)
        .await;
    let results = fan.fan_out_listed().collect_ordered().await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[1].is_ok() && results[2].is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_consumer_does_not_stall_a_list_page_into_its_timeout() {
    let server = MockServer::start().await;
    for (page, ids) in [("2", json!([3, 4])), ("3", json!([]))] {
        Mock::given(path("/slowly"))
            .and(query_param("page", page))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(ids)
                    .set_delay(Duration::from_millis(100)),
            )
            .mount(&server)
            .await;
    }
    answer(&server, "/slowly", json!([1, 2])).await;
    Mock::given(path_prefix_items())
        .respond_with(support::echo_id)
        .mount(&server)
        .await;
    let fan = builder::<u64>(&server, "/slowly")
        .paginate(Pagination::page_number("page"))
        .timeout(Duration::from_millis(300))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let mut done = fan.fan_out_listed().try_as_completed();
    let mut ids = Vec::new();
    while let Some(item) = done.next().await {
        let (id, result) = item.unwrap();
        result.unwrap();
        ids.push(id);
        // Busy longer than a page takes to time out.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_collect_ordered_returns_a_list_failure_at_once() {
    let server = MockServer::start().await;
    Mock::given(path("/fails"))
        .and(query_param("page", "2"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    answer(&server, "/fails", json!([1, 2])).await;
    Mock::given(path_prefix_items())
        .respond_with(|request: &wiremock::Request| {
            support::echo_id(request).set_delay(Duration::from_secs(2))
        })
        .mount(&server)
        .await;
    let fan = builder::<u64>(&server, "/fails")
        .paginate(Pagination::page_number("page"))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let err = fan
        .fan_out_listed()
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn list_pages_carry_the_configured_headers_and_max_pages_may_be_exact() {
    let server = MockServer::start().await;
    for (page, ids) in [("1", json!([1])), ("2", json!([2])), ("3", json!([]))] {
        Mock::given(path("/private"))
            .and(query_param("page", page))
            .and(wiremock::matchers::header("authorization", "Bearer t0ken"))
            .and(wiremock::matchers::header("x-api-key", "k"))
            .respond_with(ResponseTemplate::new(200).set_body_json(ids))
            .expect(1)
            .mount(&server)
            .await;
    }
    let fan = builder::<u64>(&server, "/private")
        .paginate(Pagination::page_number("page"))
        .bearer_auth("t0ken")
        .header("x-api-key", "k")
        .max_pages(2)
        .build()
        .unwrap();
    assert_eq!(fan.list_ids().await.unwrap(), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_ids_can_be_filtered_before_the_fan_out_and_a_failure_still_ends_it() {
    use futures::TryStreamExt;
    let server = MockServer::start().await;
    let arrivals = Arrivals::default();
    two_pages(&server, &arrivals, ResponseTemplate::new(404)).await;
    let fan = listed(&server);

    // The even ids of page 1 (an earlier run fetched the odd ones), then page 2 fails.
    let ids = fan
        .list_ids_stream()
        .try_filter(|id| futures::future::ready(id % 2 == 0));
    let results = fan.fan_out_try_stream(ids).collect_ordered().await;
    assert_eq!(results.len(), 11);
    let fetched: Vec<String> = results[..10]
        .iter()
        .map(|r| r.as_ref().unwrap().id.clone())
        .collect();
    let even: Vec<String> = (0..20).step_by(2).map(|n: u32| n.to_string()).collect();
    assert_eq!(fetched, even);
    let err = results[10].as_ref().unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err}");
    // Only the even ids' details were asked for.
    let details = arrivals
        .paths()
        .iter()
        .filter(|p| p.starts_with("/items/"))
        .count();
    assert_eq!(details, 10);
}

#[tokio::test]
async fn a_source_of_ids_that_fails_is_an_input_error_after_the_ids_before_it() {
    use futures::TryStreamExt;
    let server = MockServer::start().await;
    Mock::given(path_prefix_items())
        .respond_with(support::echo_id)
        .mount(&server)
        .await;
    let fan = builder::<u32>(&server, "/list").build().unwrap();
    let broken = std::io::Error::new(std::io::ErrorKind::InvalidData, "line 3 is not UTF-8");
    let source = futures::stream::iter([Ok(1), Ok(2), Err(broken), Ok(4)]);

    let outcomes: Vec<_> = fan
        .fan_out_try_stream(source)
        .try_in_order()
        .collect()
        .await;
    assert_eq!(outcomes.len(), 3);
    assert!(matches!(outcomes[0], Ok((1, Ok(_)))));
    assert!(matches!(outcomes[1], Ok((2, Ok(_)))));
    let err = outcomes[2].as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Input);
    assert!(err.to_string().contains("line 3 is not UTF-8"), "{err}");
    let source = std::error::Error::source(err).unwrap();
    assert!(source.downcast_ref::<std::io::Error>().is_some());
    let _ = fan
        .fan_out_try_stream(futures::stream::empty::<Result<u32, std::io::Error>>())
        .try_in_order()
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
}
