//! Memory stays bounded while a server fails everything: ids waiting to retry hold no
//! slot, so without a cap they would pile up. The ids held at once are counted, and
//! the heap's peak is measured by a counting allocator (this test binary's alone), for
//! 1,000 and for 10,000 ids.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fanout::{FanOut, RetryPolicy};
use futures::StreamExt;
use support::Item;

use support::chaos::{ChaosServer, Fault};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is passed on to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `layout` are System's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` or `realloc` above, that is from System.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc` and `dealloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CONCURRENCY: usize = 64;

/// Ids of 2 KB each, so that the ids a run holds show in its heap.
fn long_ids(count: u32) -> impl Iterator<Item = String> {
    (0..count).map(|n| format!("{n:x<2000}"))
}

/// The most heap in use at once, above what was in use before, while `ids` ids all
/// fail with 503 after three attempts each, consumed with `as_completed`. Checks on
/// the way that the ids taken from the input and not yet handed back never exceed
/// the batch's admission limit, 4 × concurrency.
async fn peak_heap(fan: &FanOut<String, Item>, ids: u32) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let pulled = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&pulled);
    let input = long_ids(ids).inspect(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let mut stream = fan.fan_out(input).as_completed();
    let mut failed = 0;
    let mut most_held = 0;
    while let Some((id, result)) = stream.next().await {
        let err = result.expect_err("the server fails everything");
        assert_eq!(err.attempts(), 3, "id {id}: {err}");
        failed += 1;
        most_held = most_held.max(pulled.load(Ordering::SeqCst) - failed);
    }
    assert_eq!(failed, ids as usize);
    assert!(most_held <= 4 * CONCURRENCY, "{most_held} ids held at once");
    PEAK.load(Ordering::Relaxed) - base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_ids_against_a_server_failing_everything_keep_memory_bounded() {
    let server = ChaosServer::unrecorded(|_, _| Fault::Status(503));
    let fan = FanOut::<String, Item>::builder()
        .detail_url(&server.template())
        .concurrency(CONCURRENCY)
        .retry(
            RetryPolicy::exponential()
                // Long enough that, uncapped, thousands of ids would be asleep at once.
                .initial_delay(Duration::from_millis(100))
                .max_delay(Duration::from_millis(100))
                .jitter(false)
                .max_retries(2),
        )
        .build()
        .unwrap();
    // Warm up: connections, the runtime's and the allocator's own structures.
    peak_heap(&fan, 1_000).await;

    let small = peak_heap(&fan, 1_000).await;
    let large = peak_heap(&fan, 10_000).await;
    eprintln!("peak heap above the start: {small} bytes for 1,000 ids, {large} for 10,000");
    assert_eq!(server.requests(), 3 * 12_000);
    // Not the same to the byte (timers, buffers), but not ten times either; and about
    // 3 MiB here, where 256 ids of 2 KB and their URLs and errors take well under 6.
    assert!(
        large < 2 * small && large < 6 << 20,
        "10× the ids took {large} bytes at the peak, against {small} for 1,000"
    );
}
