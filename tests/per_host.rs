//! Ids that map to several hosts (`detail_url_with`): limits per host as well as
//! overall, and a pause one host asks for that holds back that host alone. Three local
//! servers on three ports are three origins.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fanout::{ErrorKind, FanOut, RetryPolicy};
use support::Item;
use support::chaos::{ChaosServer, Fault};
use url::Url;

/// Ids go to server `id % 3`, as `/items/{id}`.
fn sharded(servers: &[ChaosServer; 3]) -> fanout::FanOutBuilder<u32, Item> {
    let addrs: Vec<_> = servers.iter().map(|server| server.addr).collect();
    FanOut::builder().detail_url_with(move |id: &u32| {
        Url::parse(&format!("http://{}/items/{id}", addrs[*id as usize % 3]))
    })
}

fn slow_servers(delay: Duration) -> [ChaosServer; 3] {
    std::array::from_fn(|_| ChaosServer::always(Fault::Slow(delay)))
}

/// Samples the servers' requests in flight every 2 ms: the most at each, and the most
/// at all three together.
fn sample(
    servers: &Arc<[ChaosServer; 3]>,
    done: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<([usize; 3], usize)> {
    let (servers, done) = (Arc::clone(servers), Arc::clone(done));
    std::thread::spawn(move || {
        let (mut each, mut all) = ([0; 3], 0);
        while !done.load(Ordering::SeqCst) {
            let now: Vec<usize> = servers.iter().map(ChaosServer::in_flight).collect();
            for (most, now) in each.iter_mut().zip(&now) {
                *most = (*most).max(*now);
            }
            all = all.max(now.iter().sum());
            std::thread::sleep(Duration::from_millis(2));
        }
        (each, all)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_host_gets_at_most_its_own_limit_and_all_together_the_overall_one() {
    let servers = Arc::new(slow_servers(Duration::from_millis(40)));
    let fan = sharded(&servers)
        .concurrency(5)
        .per_host_concurrency(2)
        .build()
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample(&servers, &done);
    let all = fan.fan_out(0..90).try_collect_ordered().await.unwrap();
    done.store(true, Ordering::SeqCst);
    let (each, together) = sampler.join().unwrap();
    assert_eq!(all.len(), 90);
    println!("most in flight: {each:?} per host, {together} together");
    assert!(each.iter().all(|&most| most <= 2), "{each:?}");
    assert!(
        each.iter().all(|&most| most == 2),
        "a host never had 2: {each:?}"
    );
    assert!((4..=5).contains(&together), "{together} together");
    for server in servers.iter() {
        assert_eq!(server.requests(), 30);
    }
}

/// One host much slower than the others: its ids wait for its slot without holding
/// overall slots, and the other hosts' ids are admitted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_host_does_not_hold_up_the_others() {
    let servers: [ChaosServer; 3] = std::array::from_fn(|n| {
        let delay = if n == 0 { 300 } else { 20 };
        ChaosServer::always(Fault::Slow(Duration::from_millis(delay)))
    });
    let fan = sharded(&servers)
        .concurrency(4)
        .per_host_concurrency(1)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut fast_done = None;
    let mut done = fan.fan_out(0..30).as_completed();
    let mut count = [0; 3];
    while let Some((id, result)) = futures::StreamExt::next(&mut done).await {
        result.unwrap();
        count[id as usize % 3] += 1;
        if count[1] == 10 && count[2] == 10 && fast_done.is_none() {
            fast_done = Some(started.elapsed());
        }
    }
    let took = started.elapsed();
    let fast_done = fast_done.unwrap();
    println!("fast hosts done after {fast_done:?}, all after {took:?}");
    // The slow host alone takes 10 × 300 ms; the fast ones 10 × 20 ms each, if they
    // are not stuck behind it.
    assert!(took >= Duration::from_millis(3000), "{took:?}");
    assert!(fast_done < Duration::from_millis(1500), "{fast_done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_host_rate_spaces_each_host_and_the_hosts_run_side_by_side() {
    let servers = slow_servers(Duration::ZERO);
    let quota = fanout::Quota::per_second(std::num::NonZeroU32::new(10).unwrap())
        .allow_burst(std::num::NonZeroU32::new(1).unwrap());
    let fan = sharded(&servers)
        .concurrency(8)
        .per_host_rate_limit(quota)
        .build()
        .unwrap();
    let started = Instant::now();
    let all = fan.fan_out(0..30).try_collect_ordered().await.unwrap();
    let took = started.elapsed();
    assert_eq!(all.len(), 30);
    for server in &servers {
        let times: Vec<Instant> = server.visits().iter().map(|visit| visit.at).collect();
        assert_eq!(times.len(), 10);
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            // 100 ms apart, less what the server's clock and scheduling shave off.
            assert!(
                gap >= Duration::from_millis(90),
                "{gap:?} between two requests"
            );
        }
    }
    // Each host's 10 requests take 0.9 s; one after another it would be 2.9 s.
    println!("30 ids over 3 hosts at 10/s each: {took:?}");
    assert!(took < Duration::from_millis(1800), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_one_host_asks_for_holds_back_that_host_alone() {
    let asked = Arc::new(AtomicBool::new(false));
    let servers: [ChaosServer; 3] = std::array::from_fn(|n| {
        let asked = Arc::clone(&asked);
        ChaosServer::scripted(move |_, _| {
            if n == 0 && !asked.swap(true, Ordering::SeqCst) {
                Fault::TooMany { retry_after: 1 }
            } else {
                Fault::Slow(Duration::from_millis(10))
            }
        })
    });
    let fan = sharded(&servers)
        .concurrency(3)
        .retry(RetryPolicy::exponential().max_retries(2))
        .build()
        .unwrap();
    let all = fan.fan_out(0..60).try_collect_ordered().await.unwrap();
    assert_eq!(all.len(), 60);
    let refused = servers[0].visits()[0].at;
    let paused_until = refused + Duration::from_secs(1);
    let during = |server: &ChaosServer| {
        server
            .visits()
            .iter()
            .filter(|visit| {
                visit.at > refused + Duration::from_millis(20) && visit.at < paused_until
            })
            .count()
    };
    println!(
        "requests during host 0's pause: {} to host 0, {} and {} to the others",
        during(&servers[0]),
        during(&servers[1]),
        during(&servers[2])
    );
    assert_eq!(during(&servers[0]), 0);
    // The others go on until the ids admitted at once (4 × concurrency, 12) are all
    // host 0's, waiting: in this input one in three is.
    let others = during(&servers[1]) + during(&servers[2]);
    assert!(others >= 12, "only {others} requests to the others");
}

#[tokio::test]
async fn a_url_function_that_refuses_fails_that_id_alone_and_sends_nothing() {
    let server = ChaosServer::always(Fault::Fine);
    let addr = server.addr;
    let fan: FanOut<u32, Item> = FanOut::builder()
        .detail_url_with(move |id: &u32| match id {
            0 => Err("no shard for 0".to_owned()),
            1 => Ok(Url::parse("file:///etc/passwd").unwrap()),
            2 => panic!("a bug in the caller's function"),
            _ => Ok(Url::parse(&format!("http://{addr}/items/{id}")).unwrap()),
        })
        .query(&[("key", "v")])
        .build()
        .unwrap();
    let all = fan.fan_out(0..5).collect_ordered().await;
    let kinds: Vec<_> = all
        .iter()
        .map(|r| r.as_ref().err().map(|e| e.kind()))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(ErrorKind::InvalidId),
            Some(ErrorKind::InvalidId),
            Some(ErrorKind::Panic),
            None,
            None
        ]
    );
    assert_eq!(all[0].as_ref().unwrap_err().id(), Some("0"));
    let visits = server.visits();
    assert_eq!(visits.len(), 2);
    assert!(
        visits
            .iter()
            .all(|visit| visit.query.as_deref() == Some("key=v"))
    );
}

/// Most ids on one host with a per-host rate: while they wait for that host's tokens
/// they hold no overall slot, so the other host's ids are admitted and done early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_one_hosts_tokens_does_not_hold_up_the_other_host() {
    let busy = ChaosServer::always(Fault::Fine);
    let other = ChaosServer::always(Fault::Fine);
    let (busy_addr, other_addr) = (busy.addr, other.addr);
    let quota = fanout::Quota::per_second(std::num::NonZeroU32::new(20).unwrap())
        .allow_burst(std::num::NonZeroU32::new(1).unwrap());
    let fan: FanOut<u32, Item> = FanOut::builder()
        .detail_url_with(move |id: &u32| {
            let addr = if id.is_multiple_of(10) {
                other_addr
            } else {
                busy_addr
            };
            Url::parse(&format!("http://{addr}/items/{id}"))
        })
        .concurrency(4)
        .per_host_rate_limit(quota)
        .build()
        .unwrap();
    let started = Instant::now();
    let mut done = fan.fan_out(0..40).as_completed();
    let mut other_done = Duration::ZERO;
    while let Some((id, result)) = futures::StreamExt::next(&mut done).await {
        result.unwrap();
        if id.is_multiple_of(10) {
            other_done = started.elapsed();
        }
    }
    let took = started.elapsed();
    println!("the other host's 4 ids done after {other_done:?}, all 40 after {took:?}");
    // 36 ids at 20/s take 1.75 s; the other host's last id (30) is admitted once 16
    // ids are out of the way, not once 26 are.
    assert!(took >= Duration::from_millis(1700), "{took:?}");
    assert!(other_done * 2 < took, "{other_done:?} of {took:?}");
}

/// A per-host rate holds when the server is slower than the spacing and attempts queue
/// for slots: a token is taken only with a slot in hand, so they do not go out in a
/// burst when slots free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_host_rate_holds_while_attempts_queue_for_slots() {
    let server = ChaosServer::always(Fault::Slow(Duration::from_millis(300)));
    let quota = fanout::Quota::per_second(std::num::NonZeroU32::new(10).unwrap())
        .allow_burst(std::num::NonZeroU32::new(1).unwrap());
    let fan: FanOut<u32, Item> = FanOut::builder()
        .detail_url(&server.template())
        .concurrency(2)
        .per_host_rate_limit(quota)
        .build()
        .unwrap();
    let all = fan.fan_out(0..12).try_collect_ordered().await.unwrap();
    assert_eq!(all.len(), 12);
    let times: Vec<Instant> = server.visits().iter().map(|visit| visit.at).collect();
    let closest = times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .min()
        .unwrap();
    println!("closest two requests: {closest:?}");
    assert!(closest >= Duration::from_millis(90), "{closest:?} apart");
}
