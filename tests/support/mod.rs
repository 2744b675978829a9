//! Test servers on loopback.
//!
//! wiremock covers scripted answers; [`GaugeServer`] is a small axum server whose handler
//! is async, so it can count requests in flight from arrival until the answer is sent
//! (or the client goes away), which wiremock's synchronous responders cannot.
#![allow(dead_code, unreachable_pub)]

pub mod chaos;
pub mod load;
#[cfg(feature = "redis")]
pub mod redis;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Decides, per id, how long the server waits and what it answers.
pub type Script = dyn Fn(&str) -> (Duration, StatusCode) + Send + Sync;

/// Serves `GET /items/{id}` with `{"id": "<id>"}` after a per-id delay, and measures
/// what arrives.
pub struct GaugeServer {
    pub addr: SocketAddr,
    pub gauge: Arc<Gauge>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct Gauge {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
    ids: Mutex<Vec<String>>,
}

impl Gauge {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    /// Every id requested, in arrival order.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap().clone()
    }
}

/// Decrements the in-flight count when the handler ends, also when it is cancelled
/// because the client closed the connection.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        let now = gauge.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        gauge.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct AppState {
    gauge: Arc<Gauge>,
    script: Arc<Script>,
}

async fn item(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let gauge = &state.gauge;
    gauge.requests.fetch_add(1, Ordering::SeqCst);
    gauge.ids.lock().unwrap().push(id.clone());
    let _in_flight = InFlight::enter(gauge);
    let (delay, status) = (state.script)(&id);
    // Even a zero sleep waits for the timer's next millisecond tick.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if status.is_success() {
        axum::Json(serde_json::json!({ "id": id })).into_response()
    } else {
        (
            status,
            format!("{{\"error\":\"scripted {status} for {id}\"}}"),
        )
            .into_response()
    }
}

impl GaugeServer {
    /// Every id answers 200 after `delay`.
    pub async fn with_delay(delay: Duration) -> Self {
        Self::scripted(move |_| (delay, StatusCode::OK)).await
    }

    pub async fn scripted(
        script: impl Fn(&str) -> (Duration, StatusCode) + Send + Sync + 'static,
    ) -> Self {
        let gauge = Arc::new(Gauge::default());
        let state = AppState {
            gauge: Arc::clone(&gauge),
            script: Arc::new(script),
        };
        let app = Router::new()
            .route("/items/{id}", get(item))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GaugeServer { addr, gauge, task }
    }

    /// The detail-URL template for this server.
    pub fn template(&self) -> String {
        format!("http://{}/items/{{id}}", self.addr)
    }

    /// A `FanOut` for this server with the given concurrency and defaults otherwise.
    pub fn client(&self, concurrency: usize) -> fanout::FanOut<u32, Item> {
        fanout::FanOut::builder()
            .detail_url(&self.template())
            .concurrency(concurrency)
            .build()
            .unwrap()
    }
}

impl Drop for GaugeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the test servers answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Item {
    pub id: String,
}

/// Waits until `check` holds, polling for up to `limit`. For facts that become true
/// eventually (a cancelled request leaving the server), not for timing assertions.
pub async fn eventually(limit: Duration, check: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// When each request arrived at a wiremock server, and for which path: timing facts
/// measured on the server side.
#[derive(Clone, Default)]
pub struct Arrivals(Arc<Mutex<Vec<(std::time::Instant, String)>>>);

impl Arrivals {
    /// Answers like `answer`, after noting the request's arrival.
    pub fn answer(&self, answer: impl wiremock::Respond + 'static) -> Stamp {
        Stamp {
            arrivals: self.clone(),
            answer: Box::new(answer),
        }
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn times(&self) -> Vec<std::time::Instant> {
        self.0.lock().unwrap().iter().map(|(at, _)| *at).collect()
    }

    /// Arrival times of requests for `path`.
    pub fn times_of(&self, path: &str) -> Vec<std::time::Instant> {
        let log = self.0.lock().unwrap();
        log.iter()
            .filter(|(_, p)| p == path)
            .map(|(at, _)| *at)
            .collect()
    }

    /// Paths in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// The most requests that arrived within any span of `window` (inclusive).
    pub fn most_within(&self, window: Duration) -> usize {
        let mut times = self.times();
        times.sort();
        let mut most = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] > window {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    }

    /// Time from the first arrival to the last.
    pub fn span(&self) -> Duration {
        let times = self.times();
        match (times.iter().min(), times.iter().max()) {
            (Some(first), Some(last)) => *last - *first,
            _ => Duration::ZERO,
        }
    }
}

/// A responder that notes arrivals; made by [`Arrivals::answer`].
pub struct Stamp {
    arrivals: Arrivals,
    answer: Box<dyn wiremock::Respond>,
}

impl wiremock::Respond for Stamp {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let now = std::time::Instant::now();
        let path = request.url.path().to_owned();
        self.arrivals.0.lock().unwrap().push((now, path));
        self.answer.respond(request)
    }
}

/// A 200 answer with `{"id": "<last path segment>"}`.
pub fn echo_id(request: &wiremock::Request) -> wiremock::ResponseTemplate {
    let id = request.url.path().rsplit('/').next().unwrap_or_default();
    wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({ "id": id }))
}

/// The expected encoding of an id, written out independently of the crate: every byte
/// that is not an RFC 3986 unreserved character becomes `%XX`.
pub fn percent_encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Collects what a `tracing` subscriber writes.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<u8>>>);

impl Log {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Log {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
