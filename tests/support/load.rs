//! Servers that react to load, built on the chaos server: one that slows down past its
//! capacity, and one that refuses work past a quota.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::chaos::{Arrival, ChaosServer, Fault};

/// A server with room for `capacity` requests at once: a request that arrives with no
/// more than `capacity` in flight (itself included) takes `base`; each request over
/// capacity adds `per_extra` to it. It never refuses work, it only gets slower.
pub fn capacity_server(capacity: usize, base: Duration, per_extra: Duration) -> ChaosServer {
    ChaosServer::dynamic(move |arrival: &Arrival<'_>| {
        let over = arrival.in_flight.saturating_sub(capacity) as u32;
        Fault::Slow(base + per_extra * over)
    })
}

/// A server that answers at most `quota` requests in each `window` (fixed windows from
/// the server's start), and 429 past it, with `Retry-After` in whole seconds until the
/// window ends (at least 1). With `headers`, every answer also says how much of the
/// quota is left and when it resets, in `RateLimit-Remaining` and `RateLimit-Reset`.
pub fn quota_server(quota: u32, window: Duration, headers: bool) -> ChaosServer {
    let start = Instant::now();
    let used = Mutex::new((0u64, 0u32)); // (window number, requests in it)
    ChaosServer::dynamic(move |_: &Arrival<'_>| {
        // The clock is read under the lock, so that two arrivals at a window's end
        // count in the order of their times.
        let mut used = used.lock().unwrap();
        let since = start.elapsed();
        let number = (since.as_nanos() / window.as_nanos()) as u64;
        let ends = window * (number as u32 + 1);
        let reset = (ends - since).as_secs_f64().ceil().max(1.0) as u64;
        if used.0 != number {
            *used = (number, 0);
        }
        used.1 += 1;
        let count = used.1;
        drop(used);
        let mut sent = Vec::new();
        if headers {
            let remaining = quota.saturating_sub(count);
            sent.push(("ratelimit-remaining", remaining.to_string()));
            sent.push(("ratelimit-reset", reset.to_string()));
        }
        if count > quota {
            sent.push(("retry-after", reset.to_string()));
            Fault::Answer {
                status: 429,
                headers: sent,
            }
        } else {
            Fault::Answer {
                status: 200,
                headers: sent,
            }
        }
    })
}
