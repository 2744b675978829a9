//! Each way a request can fail becomes the right `ErrorKind`, with the id attached.
//! Retries are off here: each test is about what one attempt makes of one failure.

use std::time::Duration;

use fanout::reqwest::StatusCode;
use fanout::{Error, ErrorKind, FanOut, RetryPolicy};
use serde::Deserialize;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[derive(Debug, Deserialize)]
struct Video {
    #[allow(dead_code)]
    id: String,
    #[allow(dead_code)]
    stats: Stats,
}

#[derive(Debug, Deserialize)]
struct Stats {
    #[allow(dead_code)]
    views: u64,
}

async fn server_answering(id: &str, answer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(format!("/videos/{id}")))
        .respond_with(answer)
        .expect(1)
        .mount(&server)
        .await;
    server
}

async fn fetch_one(server: &MockServer, id: &str) -> Error {
    fetch_one_with(server, id, |b| b).await
}

async fn fetch_one_with(
    server: &MockServer,
    id: &str,
    configure: impl FnOnce(fanout::FanOutBuilder<String, Video>) -> fanout::FanOutBuilder<String, Video>,
) -> Error {
    let fan = configure(
        FanOut::builder()
            .detail_url(&format!("{}/videos/{{id}}", server.uri()))
            .retry(RetryPolicy::none()),
    )
    .build()
    .unwrap();
    let mut results = fan.fan_out([id.to_owned()]).collect_ordered().await;
    let err = results.pop().unwrap().unwrap_err();
    assert_eq!(err.id(), Some(id), "{err}");
    assert_eq!(
        err.url().map(|u| u.path().to_owned()),
        Some(format!("/videos/{id}")),
        "{err}"
    );
    err
}

#[tokio::test]
async fn not_found_is_a_status_error_with_the_body() {
    let server = server_answering(
        "v1",
        ResponseTemplate::new(404).set_body_string("no such video"),
    )
    .await;
    let err = fetch_one(&server, "v1").await;
    assert_eq!(err.kind(), ErrorKind::Status);
    assert!(err.is_status());
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert_eq!(err.attempts(), 1);
    assert_eq!(err.body_snippet(), Some("no such video"));
    let message = err.to_string();
    assert!(message.contains("404 Not Found"), "{message}");
    assert!(message.contains("\"v1\""), "{message}");
}

#[tokio::test]
async fn server_error_is_a_status_error() {
    let server = server_answering("v2", ResponseTemplate::new(500)).await;
    let err = fetch_one(&server, "v2").await;
    assert_eq!(err.kind(), ErrorKind::Status);
    assert_eq!(err.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(err.body_snippet(), None);
}

#[tokio::test]
async fn malformed_json_is_a_decode_error() {
    let server = server_answering(
        "v3",
        ResponseTemplate::new(200).set_body_string("{\"id\": \"v3\", "),
    )
    .await;
    let err = fetch_one(&server, "v3").await;
    assert_eq!(err.kind(), ErrorKind::Decode);
    assert!(err.is_decode());
    assert_eq!(err.status(), Some(StatusCode::OK));
    assert_eq!(err.body_snippet(), Some("{\"id\": \"v3\", "));
    assert!(err.to_string().contains("EOF while parsing"), "{err}");
}

#[tokio::test]
async fn wrong_shape_names_the_serde_path() {
    let body = serde_json::json!({"id": "v4", "stats": {"views": "lots"}});
    let server = server_answering("v4", ResponseTemplate::new(200).set_body_json(body)).await;
    let err = fetch_one(&server, "v4").await;
    assert_eq!(err.kind(), ErrorKind::Decode);
    let message = err.to_string();
    assert!(message.contains("at `stats.views`"), "{message}");
    assert!(
        message.contains("invalid type: string \"lots\", expected u64"),
        "{message}"
    );
    assert!(message.contains("/videos/v4"), "{message}");
    assert!(
        message.contains(r#"body starts: "{\"id\":\"v4\""#),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_the_cap_is_too_large() {
    let server = server_answering(
        "v5",
        ResponseTemplate::new(200).set_body_string("x".repeat(2000)),
    )
    .await;
    let err = fetch_one_with(&server, "v5", |b| b.max_body_bytes(1000)).await;
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert!(
        err.to_string().contains("2000 bytes; the limit is 1000"),
        "{err}"
    );
}

#[tokio::test]
async fn a_body_exactly_at_the_cap_is_read() {
    let server = MockServer::start().await;
    let body = serde_json::json!({"id": "v6", "stats": {"views": 1}}).to_string();
    Mock::given(path("/videos/v6"))
        .respond_with(ResponseTemplate::new(200).set_body_string(body.clone()))
        .mount(&server)
        .await;
    let fan = FanOut::<String, Video>::builder()
        .detail_url(&format!("{}/videos/{{id}}", server.uri()))
        .max_body_bytes(body.len())
        .build()
        .unwrap();
    let video = fan
        .fan_out(["v6".to_owned()])
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(video.len(), 1);
}

#[tokio::test]
async fn a_slow_answer_is_a_timeout() {
    let answer = ResponseTemplate::new(200).set_delay(Duration::from_secs(3));
    let server = server_answering("v7", answer).await;
    let err = fetch_one_with(&server, "v7", |b| b.timeout(Duration::from_millis(200))).await;
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(err.is_timeout());
    assert_eq!(err.status(), None);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fan = FanOut::<String, Video>::builder()
        .detail_url(&format!("http://127.0.0.1:{port}/videos/{{id}}"))
        .build()
        .unwrap();
    let err = fan
        .fan_out(["v8".to_owned()])
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect, "{err}");
    assert!(err.is_connect());
    assert_eq!(err.id(), Some("v8"));
    assert_eq!(err.url().unwrap().path(), "/videos/v8");
}

/// A record whose decoding panics for one id.
#[derive(Debug)]
struct Fragile;

impl<'de> Deserialize<'de> for Fragile {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(de)?;
        assert!(value["id"] != "boom", "decoder bug for boom");
        Ok(Fragile)
    }
}

#[tokio::test]
async fn a_panicking_decoder_fails_only_its_id() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(|req: &wiremock::Request| {
            let id = req.url.path().rsplit('/').next().unwrap().to_owned();
            ResponseTemplate::new(200).set_body_json(serde_json::json!({ "id": id }))
        })
        .mount(&server)
        .await;
    let fan = FanOut::<&'static str, Fragile>::builder()
        .detail_url(&format!("{}/videos/{{id}}", server.uri()))
        .build()
        .unwrap();
    let results = fan.fan_out(["a", "boom", "c"]).collect_ordered().await;
    assert!(results[0].is_ok() && results[2].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Panic);
    assert_eq!(err.id(), Some("boom"));
    assert!(err.to_string().contains("decoder bug for boom"), "{err}");
}

/// A one-connection server that reads the request and then runs `answer` on the socket.
async fn raw_server<F, Fut>(answer: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<usize>)
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 1024];
        let _ = socket.read(&mut request).await.unwrap();
        answer(socket).await
    });
    (addr, task)
}

const CHUNKED_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";

/// Answers with `parts` as separate chunks of a chunked body, flushed one by one.
async fn chunked(parts: &'static [&'static str]) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let (addr, _) = raw_server(move |mut socket| async move {
        socket.write_all(CHUNKED_HEAD).await.unwrap();
        for part in parts {
            let chunk = format!("{:x}\r\n{part}\r\n", part.len());
            socket.write_all(chunk.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        socket.write_all(b"0\r\n\r\n").await.unwrap();
        0
    })
    .await;
    addr
}

fn numbers(addr: std::net::SocketAddr, cap: usize) -> FanOut<u32, Vec<u32>> {
    FanOut::builder()
        .detail_url(&format!("http://{addr}/n/{{id}}"))
        .max_body_bytes(cap)
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_chunked_body_exactly_at_the_cap_is_assembled() {
    let addr = chunked(&["[1,", "22,", "333]"]).await;
    let values = numbers(addr, 10)
        .fan_out([1])
        .try_collect_ordered()
        .await
        .unwrap();
    assert_eq!(values, vec![vec![1, 22, 333]]);
}

#[tokio::test]
async fn a_chunked_body_one_byte_over_the_cap_is_too_large() {
    let addr = chunked(&["[1,", "22,", "333]"]).await;
    let err = numbers(addr, 9)
        .fan_out([1])
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
}

#[tokio::test]
async fn a_lying_content_length_does_not_reserve_memory_for_it() {
    use tokio::io::AsyncWriteExt;
    // 200 GB announced, a few bytes sent, then the connection closes.
    let (addr, _) = raw_server(|mut socket| async move {
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 200000000000\r\n\r\n[1,")
            .await
            .unwrap();
        socket.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        socket.write_all(b"2,").await.unwrap();
        socket.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        0
    })
    .await;
    let err = numbers(addr, usize::MAX)
        .fan_out([1])
        .try_collect_ordered()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Body, "{err}");
}

#[tokio::test]
async fn an_endless_chunked_body_stops_at_the_cap() {
    use tokio::io::AsyncWriteExt;

    let (addr, server) = raw_server(|mut socket| async move {
        socket.write_all(CHUNKED_HEAD).await.unwrap();
        let chunk = format!("400\r\n{}\r\n", "7".repeat(0x400));
        let mut sent = 0usize;
        // Endless, until the client hangs up (bounded so a broken client cannot hang CI).
        while sent < 64 * 1024 * 1024 && socket.write_all(chunk.as_bytes()).await.is_ok() {
            sent += 0x400;
        }
        sent
    })
    .await;
    let fan = FanOut::<u32, u64>::builder()
        .detail_url(&format!("http://{addr}/n/{{id}}"))
        .max_body_bytes(64 * 1024)
        .build()
        .unwrap();
    let err = fan.fan_out([1]).try_collect_ordered().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert!(
        err.to_string()
            .contains("longer than the limit of 65536 bytes"),
        "{err}"
    );
    let sent = server.await.unwrap();
    assert!(
        sent < 64 * 1024 * 1024,
        "the client hung up early, after {sent} bytes"
    );
}

#[tokio::test]
async fn a_long_error_body_is_quoted_from_its_start() {
    let body = format!("upstream exploded{}", " ".repeat(200_000));
    let server = server_answering("v9", ResponseTemplate::new(502).set_body_string(body)).await;
    let err = fetch_one(&server, "v9").await;
    assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY));
    let snippet = err.body_snippet().unwrap();
    assert!(snippet.starts_with("upstream exploded"), "{snippet:?}");
    assert!(snippet.ends_with('…'));
}
