//! The one-minute picture from the API contract, as far as it has landed (retries, the
//! rate limit and list endpoints come later), plus the auto traits users rely on.

use std::time::Duration;

use fanout::{AsCompleted, Batch, Error, FanOut, InOrder};
use futures::StreamExt;
use wiremock::matchers::{header, method, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

#[derive(Debug, serde::Deserialize)]
struct Video {
    id: String,
    title: String,
    views: u64,
}

#[tokio::test]
async fn the_one_minute_picture() -> Result<(), Error> {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex("^/videos/[a-z]+$"))
        .and(query_param("lang", "en"))
        .and(header("x-client", "contract-test"))
        .and(header("authorization", "Bearer t0ken"))
        .and(header("accept", "application/json"))
        .respond_with(|req: &Request| {
            let id = req.url.path().rsplit('/').next().unwrap_or_default();
            ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "id": id, "title": format!("all about {id}"), "views": id.len(),
            }))
        })
        .expect(6)
        .mount(&server)
        .await;

    let videos = FanOut::<String, Video>::builder()
        .detail_url(&format!("{}/videos/{{id}}", server.uri()))
        .concurrency(10)
        .timeout(Duration::from_secs(10))
        .header("x-client", "contract-test")
        .bearer_auth("t0ken")
        .query(&[("lang", "en")])
        .build()?;

    let ids: Vec<String> = ["student", "draw", "yes"].map(String::from).to_vec();

    let all: Vec<Result<Video, Error>> = videos.fan_out(ids.clone()).collect_ordered().await;
    let titles: Vec<String> = all.into_iter().map(|r| r.unwrap().title).collect();
    assert_eq!(
        titles,
        ["all about student", "all about draw", "all about yes"]
    );

    let mut done = videos.fan_out(ids).as_completed();
    let mut seen = Vec::new();
    while let Some((id, result)) = done.next().await {
        let video = result?;
        assert_eq!(video.id, id);
        assert_eq!(video.views, id.len() as u64);
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, ["draw", "student", "yes"]);
    Ok(())
}

#[test]
fn the_types_can_cross_tasks() {
    fn send_sync<X: Send + Sync>() {}
    fn send<X: Send>(_: &X) {}
    fn clone<X: Clone>() {}

    send_sync::<FanOut<String, Video>>();
    clone::<FanOut<String, Video>>();
    send_sync::<Error>();

    let fan = FanOut::<u64, Video>::builder()
        .detail_url("http://127.0.0.1:9/videos/{id}")
        .build()
        .unwrap();
    let batch: Batch<u64, Video> = fan.fan_out(0..3);
    send(&batch);
    send(&batch.collect_ordered());
    send(&fan.fan_out(0..3).try_collect_ordered());
    let completed: AsCompleted<u64, Video> = fan.fan_out(0..3).as_completed();
    send(&completed);
    let ordered: InOrder<u64, Video> = fan.fan_out(0..3).in_order();
    send(&ordered);
}
