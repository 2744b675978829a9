//! What is kept per origin (scheme, host and port): the pause its server asked for,
//! and, when set, a concurrency limit and a token bucket of its own.
//!
//! A `FanOut` with a URL template sends every detail request to one origin, kept at
//! hand; one with a URL function may send each id elsewhere, and list pages may be
//! served from another origin too. Those are looked up by origin in a map that forgets
//! origins nobody is using once it holds many.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use governor::Quota;
use governor::clock::Clock;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use url::Url;

use super::pause::Pause;
use crate::error::{Error, ErrorKind};

/// Past this many origins in the map, those not in use (and not paused) are forgotten,
/// and so are their states in the keyed rate limiter.
const ORIGINS_KEPT: usize = 1024;

type KeyedLimiter = governor::DefaultKeyedRateLimiter<String>;

/// One origin's state.
pub(crate) struct Host {
    pub(crate) pause: Pause,
    /// A concurrency limit of its own, when one is set.
    slots: Option<Arc<Semaphore>>,
    /// `scheme://host:port`, its key in the keyed rate limiter.
    key: String,
}

impl Host {
    /// Whether the origin has a concurrency limit of its own.
    pub(crate) fn has_own_slots(&self) -> bool {
        self.slots.is_some()
    }

    /// Waits for one of the origin's own slots, if it has a limit of its own.
    pub(crate) async fn slot(&self) -> Result<Option<OwnedSemaphorePermit>, Error> {
        let Some(slots) = &self.slots else {
            return Ok(None);
        };
        // Never closed: acquiring fails only if that invariant breaks.
        Arc::clone(slots)
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|_| Error::new(ErrorKind::Runtime, "a per-host limiter was closed"))
    }
}

/// A host's state, borrowed (the detail endpoint's) or shared (any other).
pub(crate) enum HostRef<'a> {
    Detail(&'a Host),
    Other(Arc<Host>),
}

impl Deref for HostRef<'_> {
    type Target = Host;

    fn deref(&self) -> &Host {
        match self {
            HostRef::Detail(host) => host,
            HostRef::Other(host) => host,
        }
    }
}

/// The origins other than the detail template's.
#[derive(Default)]
struct Others {
    map: HashMap<String, Arc<Host>>,
    /// The size at which to forget those not in use: [`ORIGINS_KEPT`], or twice what
    /// was kept last time, so that a map of origins all in use is not swept at
    /// every new one.
    prune_at: usize,
}

/// Every origin's state, shared by all batches and clones of a `FanOut`.
pub(crate) struct Hosts {
    epoch: Instant,
    /// The detail template's origin (scheme, host, port) and its state.
    detail: Option<(String, String, Option<u16>, Host)>,
    others: Mutex<Others>,
    per_host_concurrency: Option<usize>,
    per_host_rate: Option<KeyedLimiter>,
}

impl Hosts {
    /// `detail` is the template's origin, if the detail URLs come from a template.
    pub(crate) fn new(
        detail: Option<&Url>,
        per_host_concurrency: Option<usize>,
        per_host_quota: Option<Quota>,
    ) -> Self {
        let epoch = Instant::now();
        let mut hosts = Hosts {
            epoch,
            detail: None,
            others: Mutex::new(Others {
                map: HashMap::new(),
                prune_at: ORIGINS_KEPT,
            }),
            per_host_concurrency,
            per_host_rate: per_host_quota.map(KeyedLimiter::keyed),
        };
        hosts.detail = detail.map(|url| {
            let host = hosts.host(key(url));
            (
                url.scheme().to_owned(),
                url.host_str().unwrap_or_default().to_owned(),
                url.port_or_known_default(),
                host,
            )
        });
        hosts
    }

    fn host(&self, key: String) -> Host {
        Host {
            pause: Pause::new(self.epoch),
            slots: self
                .per_host_concurrency
                .map(|limit| Arc::new(Semaphore::new(limit))),
            key,
        }
    }

    /// The state of `url`'s origin.
    pub(crate) fn of(&self, url: &Url) -> HostRef<'_> {
        if let Some((scheme, host, port, state)) = &self.detail
            && url.scheme() == scheme
            && url.host_str() == Some(host.as_str())
            && url.port_or_known_default() == *port
        {
            return HostRef::Detail(state);
        }
        let key = key(url);
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = others.map.get(&key) {
            return HostRef::Other(Arc::clone(host));
        }
        if others.map.len() >= others.prune_at {
            // Those only the map holds, with no pause or spread-out quota to remember.
            others
                .map
                .retain(|_, host| Arc::strong_count(host) > 1 || !host.pause.is_quiet());
            others.prune_at = ORIGINS_KEPT.max(others.map.len().saturating_mul(2));
            if let Some(limiter) = &self.per_host_rate {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        let host = Arc::new(self.host(key.clone()));
        others.map.insert(key, Arc::clone(&host));
        HostRef::Other(host)
    }

    /// Takes a token from `host`'s own bucket if one is free now; if not, how long
    /// until one is. `None` also when there is no per-host rate.
    pub(crate) fn try_token(&self, host: &Host) -> Option<Duration> {
        let limiter = self.per_host_rate.as_ref()?;
        match limiter.check_key(&host.key) {
            Ok(()) => None,
            Err(not_until) => Some(not_until.wait_time_from(limiter.clock().now())),
        }
    }

    /// How many origins are remembered besides the detail template's.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.others.lock().unwrap().map.len()
    }
}

/// `scheme://host:port`.
fn key(url: &Url) -> String {
    let port = url.port_or_known_default().unwrap_or(0);
    format!(
        "{}://{}:{port}",
        url.scheme(),
        url.host_str().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    #[test]
    fn the_detail_origin_is_at_hand_and_others_are_shared() {
        let hosts = Hosts::new(Some(&url("https://api.example.com/items/")), None, None);
        assert!(matches!(
            hosts.of(&url("https://api.example.com:443/items/7")),
            HostRef::Detail(_)
        ));
        let other = hosts.of(&url("https://list.example.com/page/1"));
        let again = hosts.of(&url("https://list.example.com/page/2"));
        let (HostRef::Other(a), HostRef::Other(b)) = (other, again) else {
            panic!("not the detail origin");
        };
        assert!(Arc::ptr_eq(&a, &b));
        assert!(matches!(
            hosts.of(&url("http://api.example.com/items/7")),
            HostRef::Other(_)
        ));
    }

    #[test]
    fn origins_nobody_uses_are_forgotten_past_the_limit() {
        let quota = Quota::per_second(NonZeroU32::new(5).unwrap());
        let hosts = Hosts::new(None, Some(2), Some(quota));
        let in_use = hosts.of(&url("http://kept.example/"));
        let paused = hosts.of(&url("http://paused.example/"));
        paused
            .pause
            .pause(Instant::now(), std::time::Duration::from_secs(60));
        drop(paused);
        let limiter = hosts.per_host_rate.as_ref().unwrap();
        let visit = |range: std::ops::Range<usize>| {
            for n in range {
                let host = hosts.of(&url(&format!("http://h{n}.example/")));
                assert!(limiter.check_key(&host.key).is_ok());
            }
        };
        visit(0..2 * ORIGINS_KEPT);
        assert!(hosts.remembered() <= ORIGINS_KEPT, "{}", hosts.remembered());
        // A bucket is forgotten once it is full again, and then one token's time
        // (two fifths of a second here, at 5/s).
        std::thread::sleep(std::time::Duration::from_millis(500));
        visit(2 * ORIGINS_KEPT..4 * ORIGINS_KEPT);
        assert!(hosts.remembered() <= ORIGINS_KEPT, "{}", hosts.remembered());
        assert!(
            limiter.len() <= 2 * ORIGINS_KEPT + 2,
            "{} buckets for {} origins",
            limiter.len(),
            4 * ORIGINS_KEPT
        );
        // The one in use and the paused one are the same as before.
        let HostRef::Other(kept) = hosts.of(&url("http://kept.example/")) else {
            panic!()
        };
        let HostRef::Other(before) = in_use else {
            panic!()
        };
        assert!(Arc::ptr_eq(&kept, &before));
        assert!(hosts.of(&url("http://paused.example/")).pause.is_paused());
    }
}
