//! A fault-injecting HTTP server on loopback.
//!
//! [`ChaosServer`] serves `GET /items/{id}` with `{"id": "<id>"}`, except when its
//! [`Plan`] says otherwise: per request, an error status, a 429 with `Retry-After`, an
//! answer slower than the client's timeout, a connection closed before the status line,
//! a body cut off half-way, malformed JSON, JSON of the wrong shape, an oversized or
//! endless body, a redirect loop, or a redirect elsewhere. A plan is a script (a
//! function of the id and the attempt) or a seeded [`Mix`] of faults by probability;
//! either way the fault depends only on the id and the attempt number, never on arrival
//! order, so a failing run replays exactly.
//!
//! It is plain hyper rather than axum or wiremock so that a fault can break the
//! connection where a real server or network would. It runs on a thread and runtime of
//! its own, so it keeps answering whatever the client's runtime does, and the client's
//! runtime metrics count only the client's tasks.
//!
//! Every request is recorded ([`Visit`]: path, id, attempt, time, fault, headers), and [`ChaosServer::in_flight`] counts requests
//! whose handler or body is still running.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt, stream};
use http_body_util::StreamBody;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};

/// What the server does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 200 with `{"id": "<id>"}`.
    Fine,
    /// This status, with a short JSON body.
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    TooMany { retry_after: u32 },
    /// Waits this long, then answers 200: longer than the client's timeout.
    Slow(Duration),
    /// Reads the request, then closes the connection before the status line.
    Close,
    /// 200 with a `Content-Length`, then the connection closes half-way through the body.
    CutBody,
    /// 200 with a body that is not JSON.
    BadJson,
    /// 200 with JSON of the wrong shape (`id` is a number).
    WrongShape,
    /// 200 with a valid JSON body of exactly this many bytes, sent in 16 KiB chunks,
    /// with or without a `Content-Length` saying so.
    Large { bytes: usize, declared: bool },
    /// 200 with a chunked body that never ends: a 1 KiB chunk every millisecond.
    Endless,
    /// 302 to `/loop/<n+1>`, which redirects on forever.
    RedirectLoop,
    /// 302 to this absolute URL.
    RedirectTo(String),
    /// This status with these headers; the body is `{"id": "<id>"}` for a 2xx status,
    /// a short JSON error otherwise.
    Answer {
        status: u16,
        headers: Vec<(&'static str, String)>,
    },
}

impl Fault {
    /// Whether another attempt may get a different answer (what fanout retries).
    pub fn is_transient(&self) -> bool {
        match self {
            Fault::Status(status) | Fault::Answer { status, .. } => {
                matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
            }
            Fault::TooMany { .. } | Fault::Slow(_) | Fault::Close | Fault::CutBody => true,
            _ => false,
        }
    }
}

/// Decides the fault for each request as it arrives.
pub type Script = dyn Fn(&Arrival<'_>) -> Fault + Send + Sync;

/// A request as it arrives, for a [`ChaosServer::dynamic`] script.
#[derive(Debug)]
pub struct Arrival<'a> {
    pub id: &'a str,
    /// The id's how-manieth request, counting from 1 (0 when unrecorded).
    pub attempt: u32,
    /// Requests in flight, this one included.
    pub in_flight: usize,
    pub at: Instant,
}

/// Faults by probability, seeded: the same seed, id and attempt always give the same
/// fault.
#[derive(Debug, Clone)]
pub struct Mix {
    seed: u64,
    /// Each fault with its probability per request; the rest answer [`Fault::Fine`].
    faults: Vec<(f64, Fault)>,
}

impl Mix {
    pub fn new(seed: u64, faults: Vec<(f64, Fault)>) -> Self {
        let total: f64 = faults.iter().map(|(p, _)| p).sum();
        assert!(total <= 1.0, "probabilities add up to {total}");
        Mix { seed, faults }
    }

    pub fn pick(&self, id: &str, attempt: u32) -> Fault {
        let mut draw = unit(self.seed, id, attempt);
        for (probability, fault) in &self.faults {
            if draw < *probability {
                return fault.clone();
            }
            draw -= probability;
        }
        Fault::Fine
    }
}

/// A number in [0, 1) from the seed, the id and the attempt (FNV-1a, then splitmix64).
fn unit(seed: u64, id: &str, attempt: u32) -> f64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for byte in id.bytes().chain(attempt.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Visit {
    /// The path as sent, still percent-encoded.
    pub path: String,
    /// The query as sent, if any.
    pub query: Option<String>,
    /// The last path segment, percent-decoded; for `/items/{id}`, the id.
    pub id: String,
    /// Which request this was for this path, counting from 1.
    pub attempt: u32,
    pub at: Instant,
    pub fault: Fault,
    /// Every request header, as sent.
    pub headers: hyper::HeaderMap,
}

impl Visit {
    /// The `Authorization` header, if one came.
    pub fn authorization(&self) -> Option<&str> {
        self.headers.get(AUTHORIZATION)?.to_str().ok()
    }
}

#[derive(Default)]
struct Record {
    /// Off for memory measurements: then only the counters grow, and every request is
    /// attempt 0.
    keep_visits: bool,
    requests: AtomicU64,
    visits: Mutex<Vec<Visit>>,
    attempts: Mutex<HashMap<String, u32>>,
    in_flight: AtomicUsize,
    body_bytes_sent: AtomicU64,
}

pub struct ChaosServer {
    pub addr: SocketAddr,
    record: Arc<Record>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChaosServer {
    /// Every request answered by `script(id, attempt)`.
    pub fn scripted(script: impl Fn(&str, u32) -> Fault + Send + Sync + 'static) -> Self {
        Self::dynamic(move |arrival| script(arrival.id, arrival.attempt))
    }

    /// Every request answered by `script`, which sees the load as well as the id: how
    /// many requests are in flight, and when it arrived. For servers that slow down or
    /// refuse work under load.
    pub fn dynamic(script: impl Fn(&Arrival<'_>) -> Fault + Send + Sync + 'static) -> Self {
        Self::start(Arc::new(script), true)
    }

    /// Every request answered by the mix.
    pub fn mixed(mix: Mix) -> Self {
        Self::scripted(move |id, attempt| mix.pick(id, attempt))
    }

    /// Every request answered with the same fault.
    pub fn always(fault: Fault) -> Self {
        Self::scripted(move |_, _| fault.clone())
    }

    /// Like [`scripted`](Self::scripted), but keeps no record of each request, only
    /// the counts: for measuring the client's memory, which the record would swamp.
    /// The script always sees attempt 0.
    pub fn unrecorded(script: impl Fn(&str, u32) -> Fault + Send + Sync + 'static) -> Self {
        Self::start(
            Arc::new(move |arrival: &Arrival<'_>| script(arrival.id, arrival.attempt)),
            false,
        )
    }

    fn start(script: Arc<Script>, keep_visits: bool) -> Self {
        let record = Arc::new(Record {
            keep_visits,
            ..Record::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::clone(&record);
        let thread = std::thread::Builder::new()
            .name("chaos-server".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("server runtime");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = accept(listener, script, state) => {}
                    }
                });
                // Dropping the runtime cancels every connection still open.
            })
            .expect("server thread");
        ChaosServer {
            addr,
            record,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The detail-URL template for this server.
    pub fn template(&self) -> String {
        format!("http://{}/items/{{id}}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn visits(&self) -> Vec<Visit> {
        self.record.visits.lock().unwrap().clone()
    }

    /// The requests for `/items/<id>`, by id, each id's in attempt order.
    pub fn visits_by_id(&self) -> HashMap<String, Vec<Visit>> {
        let mut by_id: HashMap<String, Vec<Visit>> = HashMap::new();
        for visit in self.visits() {
            if visit.path.starts_with("/items/") {
                by_id.entry(visit.id.clone()).or_default().push(visit);
            }
        }
        for visits in by_id.values_mut() {
            visits.sort_by_key(|visit| visit.attempt);
        }
        by_id
    }

    /// How many requests arrived, recorded or not.
    pub fn requests(&self) -> u64 {
        self.record.requests.load(Ordering::SeqCst)
    }

    /// Requests whose handler or response body is still running.
    pub fn in_flight(&self) -> usize {
        self.record.in_flight.load(Ordering::SeqCst)
    }

    /// Body bytes handed to the connections so far (streamed bodies count as they go).
    pub fn body_bytes_sent(&self) -> u64 {
        self.record.body_bytes_sent.load(Ordering::SeqCst)
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: tokio::net::TcpListener, script: Arc<Script>, record: Arc<Record>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            // Out of file descriptors, say: wait for some to close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let script = Arc::clone(&script);
        let record = Arc::clone(&record);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                answer(request, Arc::clone(&script), Arc::clone(&record))
            });
            // A connection ends in an error whenever a fault breaks it: that is the point.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                .await;
        });
    }
}

/// Counts a request as in flight until dropped: with the handler if it is cancelled,
/// otherwise with the response body once hyper has sent it or given up on it.
struct InFlight(Arc<Record>);

impl InFlight {
    fn enter(record: &Arc<Record>) -> Self {
        record.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(record))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Why the server broke a connection on purpose.
#[derive(Debug)]
struct Broken(&'static str);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Broken {}

async fn answer(
    request: Request<Incoming>,
    script: Arc<Script>,
    record: Arc<Record>,
) -> Result<Response<Body>, Broken> {
    let guard = InFlight::enter(&record);
    record.requests.fetch_add(1, Ordering::SeqCst);
    if !record.keep_visits {
        let id = request.uri().path().rsplit('/').next().unwrap_or_default();
        let fault = script(&Arrival {
            id,
            attempt: 0,
            in_flight: record.in_flight.load(Ordering::SeqCst),
            at: Instant::now(),
        });
        return respond_with(fault, id, &record, guard).await;
    }
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let last = path.rsplit('/').next().unwrap_or_default();
    let id = percent_encoding::percent_decode_str(last)
        .decode_utf8_lossy()
        .into_owned();
    let attempt = {
        let mut attempts = record.attempts.lock().unwrap();
        let count = attempts.entry(path.clone()).or_default();
        *count += 1;
        *count
    };
    let fault = if let Some(hop) = path.strip_prefix("/loop/") {
        let next = hop.parse::<u64>().unwrap_or(0) + 1;
        Fault::RedirectTo(format!("/loop/{next}"))
    } else {
        script(&Arrival {
            id: &id,
            attempt,
            in_flight: record.in_flight.load(Ordering::SeqCst),
            at: Instant::now(),
        })
    };
    record.visits.lock().unwrap().push(Visit {
        path,
        query,
        id: id.clone(),
        attempt,
        at: Instant::now(),
        fault: fault.clone(),
        headers: request.headers().clone(),
    });
    respond_with(fault, &id, &record, guard).await
}

async fn respond_with(
    fault: Fault,
    id: &str,
    record: &Arc<Record>,
    guard: InFlight,
) -> Result<Response<Body>, Broken> {
    let json = || serde_json::json!({ "id": id }).to_string();
    let (status, body, length) = match fault {
        Fault::Fine => (200, once(json()), None),
        Fault::Status(status) => (
            status,
            once(format!("{{\"error\":\"chaos {status}\"}}")),
            None,
        ),
        Fault::TooMany { retry_after } => {
            let body = once("{\"error\":\"slow down\"}".to_owned());
            let response = respond(429, body, None, record, guard).map(|mut response| {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, retry_after.into());
                response
            });
            return response;
        }
        Fault::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (200, once(json()), None)
        }
        Fault::Close => return Err(Broken("closed before the status line")),
        Fault::CutBody => {
            let full = json();
            let half = full[..full.len() / 2].to_owned();
            // The pause lets hyper flush the status line, headers and first half
            // before the error makes it drop the connection.
            let cut = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(std::io::Error::other("cut off mid-body"))
            };
            let chunks = stream::iter([Ok(Bytes::from(half))]).chain(stream::once(cut));
            (200, Box::pin(chunks) as Chunks, Some(full.len()))
        }
        Fault::BadJson => (200, once("{\"id\": \"unterminated".to_owned()), None),
        Fault::WrongShape => (200, once("{\"id\": 42}".to_owned()), None),
        Fault::Large { bytes, declared } => (200, padded_json(bytes), declared.then_some(bytes)),
        Fault::Endless => {
            let chunk = Bytes::from(vec![b' '; 1024]);
            let chunks = stream::unfold((), move |()| {
                let chunk = chunk.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    Some((Ok(chunk), ()))
                }
            });
            (200, Box::pin(chunks) as Chunks, None)
        }
        Fault::RedirectLoop => {
            return redirect("/loop/1".to_owned(), record, guard);
        }
        Fault::RedirectTo(location) => return redirect(location, record, guard),
        Fault::Answer { status, headers } => {
            let body = if (200..300).contains(&status) {
                json()
            } else {
                format!("{{\"error\":\"chaos {status}\"}}")
            };
            return respond(status, once(body), None, record, guard).map(|mut response| {
                for (name, value) in headers {
                    let value = value.parse().expect("a valid header value");
                    response.headers_mut().append(name, value);
                }
                response
            });
        }
    };
    respond(status, body, length, record, guard)
}

fn once(text: String) -> Chunks {
    Box::pin(stream::iter([Ok(Bytes::from(text))]))
}

/// `{"id": "      ..."}` of exactly `bytes` bytes (at least 10), in 16 KiB chunks.
fn padded_json(bytes: usize) -> Chunks {
    const CHUNK: usize = 16 * 1024;
    let mut text = String::with_capacity(bytes);
    text.push_str("{\"id\": \"");
    text.extend(std::iter::repeat_n(' ', bytes.saturating_sub(10)));
    text.push_str("\"}");
    let all = Bytes::from(text);
    let chunks: Vec<_> = (0..all.len())
        .step_by(CHUNK)
        .map(|start| Ok(all.slice(start..(start + CHUNK).min(all.len()))))
        .collect();
    Box::pin(stream::iter(chunks))
}

fn redirect(
    location: String,
    record: &Arc<Record>,
    guard: InFlight,
) -> Result<Response<Body>, Broken> {
    respond(302, once(String::new()), None, record, guard).map(|mut response| {
        let location = location.parse().expect("a valid Location");
        response.headers_mut().insert(LOCATION, location);
        response
    })
}

/// A response whose body holds the in-flight guard and counts the bytes it sends.
fn respond(
    status: u16,
    chunks: Chunks,
    length: Option<usize>,
    record: &Arc<Record>,
    guard: InFlight,
) -> Result<Response<Body>, Broken> {
    let record = Arc::clone(record);
    let frames = chunks.map(move |chunk| {
        let _held = &guard;
        chunk.map(|bytes| {
            record
                .body_bytes_sent
                .fetch_add(bytes.len() as u64, Ordering::SeqCst);
            Frame::data(bytes)
        })
    });
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).expect("a valid status"))
        .header(CONTENT_TYPE, "application/json");
    if let Some(length) = length {
        builder = builder.header(CONTENT_LENGTH, length);
    }
    Ok(builder
        .body(UnsyncBoxBody::new(StreamBody::new(frames)))
        .expect("a valid response"))
}
