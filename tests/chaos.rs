//! fanout against a server that misbehaves on purpose (`support::chaos`): each fault
//! ends in the error kind it should, transient ones retried and final ones not, and
//! 20,000 ids through a 10% mix of transient faults get exactly one outcome each, in
//! every output mode, agreeing with the server's own record of what it did.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use fanout::{Error, ErrorKind, FanOut, RetryPolicy};
use futures::StreamExt;
use support::Item;
use support::chaos::{ChaosServer, Fault, Mix, Visit};

const IDS: u32 = 20_000;
const CONCURRENCY: usize = 64;
const RETRIES: u32 = 5;
/// Per attempt: long enough that no healthy answer on a busy test machine runs into it
/// (one that did would be retried, and the server's record would disagree with the
/// plan).
const TIMEOUT: Duration = Duration::from_millis(2500);
const SLOW: Duration = Duration::from_secs(10);

fn quick_retries(max_retries: u32) -> RetryPolicy {
    RetryPolicy::exponential()
        .initial_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(20))
        .max_retries(max_retries)
}

/// The chaos server's 429s are faults of one id, drawn at random, not a server asking
/// every client to slow down: they do not pause the other ids (tests/adaptive.rs covers
/// the pause).
fn client(server: &ChaosServer, retry: RetryPolicy, timeout: Duration) -> FanOut<u32, Item> {
    FanOut::builder()
        .detail_url(&server.template())
        .concurrency(CONCURRENCY)
        .pause_on_retry_after(false)
        .retry(retry)
        .timeout(timeout)
        .max_body_bytes(64 * 1024)
        .build()
        .unwrap()
}

/// What a fault becomes on the client: its error kind and status, or success.
fn expected_outcome(fault: &Fault) -> Result<(), (ErrorKind, Option<u16>)> {
    match fault {
        Fault::Fine => Ok(()),
        Fault::Status(status) => Err((ErrorKind::Status, Some(*status))),
        Fault::TooMany { .. } => Err((ErrorKind::Status, Some(429))),
        Fault::Slow(_) => Err((ErrorKind::Timeout, None)),
        Fault::Close => Err((ErrorKind::Request, None)),
        Fault::CutBody => Err((ErrorKind::Body, Some(200))),
        Fault::BadJson | Fault::WrongShape => Err((ErrorKind::Decode, Some(200))),
        Fault::Large { .. } | Fault::Endless => Err((ErrorKind::TooLarge, Some(200))),
        Fault::RedirectLoop | Fault::RedirectTo(_) => Err((ErrorKind::Request, None)),
        Fault::Answer { status, .. } if (200..300).contains(status) => Ok(()),
        Fault::Answer { status, .. } => Err((ErrorKind::Status, Some(*status))),
    }
}

fn assert_outcome(id: &str, result: &Result<Item, Error>, fault: &Fault, attempts: u32) {
    match (expected_outcome(fault), result) {
        (Ok(()), Ok(item)) => assert_eq!(item.id, id),
        (Err((kind, status)), Err(err)) => {
            assert_eq!(err.kind(), kind, "id {id} after {fault:?}: {err}");
            assert_eq!(err.status().map(|s| s.as_u16()), status, "id {id}: {err}");
            assert_eq!(err.id(), Some(id), "{err}");
            assert_eq!(err.attempts(), attempts, "id {id}: {err}");
        }
        (expected, got) => panic!("id {id} after {fault:?}: expected {expected:?}, got {got:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_ends_in_its_error_kind_retried_only_when_transient() {
    let cap = 64 * 1024;
    let faults = [
        Fault::Fine,
        Fault::Status(500),
        Fault::Status(503),
        Fault::Status(404),
        Fault::TooMany { retry_after: 0 },
        Fault::Slow(Duration::from_secs(2)),
        Fault::Close,
        Fault::CutBody,
        Fault::BadJson,
        Fault::WrongShape,
        Fault::Large {
            bytes: cap + 1,
            declared: true,
        },
        Fault::Large {
            bytes: cap + 1,
            declared: false,
        },
        Fault::Endless,
        Fault::RedirectLoop,
    ];
    for fault in faults {
        let server = ChaosServer::always(fault.clone());
        // Only the slow answer should run into the timeout.
        let timeout = match fault {
            Fault::Slow(_) => Duration::from_millis(300),
            _ => Duration::from_secs(10),
        };
        let fan = client(&server, quick_retries(2), timeout);
        let result = fan.fan_out([7]).collect_ordered().await.remove(0);
        let attempts = if fault.is_transient() { 3 } else { 1 };
        assert_outcome("7", &result, &fault, attempts);
        let visits = server.visits_by_id().remove("7").unwrap_or_default();
        assert_eq!(visits.len(), attempts as usize, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_just_under_the_cap_is_read_whatever_its_framing() {
    for declared in [true, false] {
        let server = ChaosServer::always(Fault::Large {
            bytes: 64 * 1024,
            declared,
        });
        let fan = client(&server, RetryPolicy::none(), TIMEOUT);
        let item = fan.fan_out([1]).collect_ordered().await.remove(0).unwrap();
        assert_eq!(item.id.len(), 64 * 1024 - 10);
    }
}

/// 10% of requests fail with a transient fault; ids ending in 07 answer 404 and ids
/// ending in 13 malformed JSON once the transient faults let them through.
fn plan(seed: u64) -> impl Fn(&str, u32) -> Fault + Send + Sync + Clone + 'static {
    let mix = Mix::new(
        seed,
        vec![
            (0.025, Fault::Status(500)),
            (0.02, Fault::Status(503)),
            (0.01, Fault::TooMany { retry_after: 1 }),
            (0.005, Fault::Slow(SLOW)),
            (0.02, Fault::Close),
            (0.02, Fault::CutBody),
        ],
    );
    move |id: &str, attempt: u32| match mix.pick(id, attempt) {
        Fault::Fine if id.ends_with("07") => Fault::Status(404),
        Fault::Fine if id.ends_with("13") => Fault::BadJson,
        fault => fault,
    }
}

/// From the plan alone: how many attempts an id takes, and the fault of the last.
fn expected_attempts(plan: &dyn Fn(&str, u32) -> Fault, id: &str) -> (u32, Fault) {
    let most = RETRIES + 1;
    for attempt in 1..=most {
        let fault = plan(id, attempt);
        if !fault.is_transient() || attempt == most {
            return (attempt, fault);
        }
    }
    unreachable!()
}

/// Checks every id's outcome against the plan and the server's record: one outcome
/// per id, as many requests as the plan says and no more, the right kind for each.
fn check_against_record(
    server: &ChaosServer,
    plan: &dyn Fn(&str, u32) -> Fault,
    outcomes: &[(u32, Result<Item, Error>)],
) {
    let mut seen = vec![false; IDS as usize];
    for (id, _) in outcomes {
        assert!(
            !std::mem::replace(&mut seen[*id as usize], true),
            "id {id} came twice"
        );
    }
    assert_eq!(outcomes.len(), IDS as usize, "an id got no outcome");

    let record = server.visits_by_id();
    assert_eq!(
        record.len(),
        IDS as usize,
        "ids the server never saw, or did not expect"
    );
    let mut totals: HashMap<&'static str, usize> = HashMap::new();
    for (id, result) in outcomes {
        let id = id.to_string();
        let visits = &record[&id];
        let (attempts, last) = expected_attempts(plan, &id);
        let attempt_numbers: Vec<u32> = visits.iter().map(|v| v.attempt).collect();
        assert_eq!(
            attempt_numbers,
            (1..=attempts).collect::<Vec<_>>(),
            "id {id}: the server saw {visits:?}"
        );
        assert_eq!(visits.last().map(|v| &v.fault), Some(&last));
        assert_outcome(&id, result, &last, attempts);
        check_retry_after_was_waited_out(visits);
        for visit in visits {
            *totals.entry(name(&visit.fault)).or_default() += 1;
        }
        let outcome = match result {
            Ok(_) => "succeeded",
            Err(err) if err.status().map(|s| s.as_u16()) == Some(404) => "failed: 404",
            Err(err) if err.is_decode() => "failed: bad JSON",
            Err(_) => "failed: retries ran out",
        };
        *totals.entry(outcome).or_default() += 1;
    }
    // The mix really happened: every kind of fault, many times over.
    for fault in ["500", "503", "429", "slow", "close", "cut body"] {
        assert!(totals.get(fault).copied().unwrap_or(0) >= 50, "{totals:?}");
    }
    assert!(
        totals["failed: 404"] >= 150 && totals["failed: bad JSON"] >= 150,
        "{totals:?}"
    );
    eprintln!("requests and outcomes: {totals:?}");
}

fn name(fault: &Fault) -> &'static str {
    match fault {
        Fault::Fine => "200",
        Fault::Status(500) => "500",
        Fault::Status(503) => "503",
        Fault::Status(404) => "404",
        Fault::TooMany { .. } => "429",
        Fault::Slow(_) => "slow",
        Fault::Close => "close",
        Fault::CutBody => "cut body",
        Fault::BadJson => "bad JSON",
        _ => "other",
    }
}

/// A retry after a 429 with `Retry-After: 1` arrives at least a second later.
fn check_retry_after_was_waited_out(visits: &[Visit]) {
    for pair in visits.windows(2) {
        if let Fault::TooMany { retry_after } = pair[0].fault {
            let gap = pair[1].at - pair[0].at;
            assert!(
                gap >= Duration::from_secs(retry_after.into()),
                "retried {gap:?} after a 429 asking for {retry_after} s"
            );
        }
    }
}

fn chaos(seed: u64) -> (ChaosServer, FanOut<u32, Item>) {
    let server = ChaosServer::scripted(plan(seed));
    let fan = client(&server, quick_retries(RETRIES), TIMEOUT);
    (server, fan)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collect_ordered_gives_every_id_exactly_one_outcome_under_faults() {
    let (server, fan) = chaos(1);
    let results = fan.fan_out(0..IDS).collect_ordered().await;
    assert_eq!(results.len(), IDS as usize);
    let outcomes: Vec<_> = (0..IDS).zip(results).collect();
    check_against_record(&server, &plan(1), &outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_completed_gives_every_id_exactly_one_outcome_under_faults() {
    let (server, fan) = chaos(2);
    let outcomes: Vec<_> = fan.fan_out(0..IDS).as_completed().collect().await;
    check_against_record(&server, &plan(2), &outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_order_gives_every_id_exactly_one_outcome_in_input_order_under_faults() {
    let server = ChaosServer::scripted(plan(3));
    // The default window (4 × 64 ids) stalls behind every head of the line that waits
    // out a timeout or a Retry-After, about 300 times here; a window that covers a
    // second or two of requests lets those waits overlap.
    let fan = FanOut::<u32, Item>::builder()
        .detail_url(&server.template())
        .concurrency(CONCURRENCY)
        .pause_on_retry_after(false)
        .reorder_window(4096)
        .retry(quick_retries(RETRIES))
        .timeout(TIMEOUT)
        .build()
        .unwrap();
    let outcomes: Vec<_> = fan.fan_out(0..IDS).in_order().collect().await;
    let order: Vec<u32> = outcomes.iter().map(|(id, _)| *id).collect();
    assert!(order.iter().copied().eq(0..IDS), "out of input order");
    check_against_record(&server, &plan(3), &outcomes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_collect_ordered_gets_every_value_through_transient_faults() {
    // Transient faults only: every id gets through unless six attempts in a row fail.
    let mix = Mix::new(
        4,
        vec![
            (0.03, Fault::Status(503)),
            (0.01, Fault::TooMany { retry_after: 1 }),
            (0.03, Fault::Close),
            (0.03, Fault::CutBody),
        ],
    );
    let plan = move |id: &str, attempt: u32| mix.pick(id, attempt);
    let server = ChaosServer::scripted(plan.clone());
    let fan = client(&server, quick_retries(RETRIES), TIMEOUT);
    let exhausted: Vec<u32> = (0..IDS)
        .filter(|id| expected_attempts(&plan, &id.to_string()).1 != Fault::Fine)
        .collect();
    match fan.fan_out(0..IDS).try_collect_ordered().await {
        Ok(items) => {
            assert!(exhausted.is_empty(), "{exhausted:?} should have failed");
            assert!(
                items
                    .iter()
                    .map(|item| item.id.parse::<u32>().unwrap())
                    .eq(0..IDS)
            );
            // Each id was fetched until its first success, and never again.
            let record = server.visits_by_id();
            for id in 0..IDS {
                let id = id.to_string();
                let (attempts, _) = expected_attempts(&plan, &id);
                assert_eq!(record[&id].len(), attempts as usize, "id {id}");
            }
        }
        Err(err) => {
            let id: u32 = err.id().unwrap().parse().unwrap();
            assert!(exhausted.contains(&id), "{err}");
            assert_eq!(err.attempts(), RETRIES + 1);
        }
    }
}
