//! Which redirects `fanout`'s own client follows, and what an error says about one it
//! did not.
//!
//! On a redirect to another origin reqwest drops the credentials (`Authorization`,
//! `Cookie`, ...) but forwards every other header, so a custom header that holds an API
//! key would reach whatever host the server names. With such a header the client
//! follows redirects only where the first URL's host, scheme and port stay the same.

use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, COOKIE, HeaderMap, HeaderName, LOCATION, PROXY_AUTHORIZATION,
};
use reqwest::redirect::Policy;
use url::Url;

use crate::fanout::Shared;
use crate::template::redact_userinfo;

/// The most redirects followed for one request, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// Headers that may follow a redirect to another host: `Accept` tells nothing, and
/// reqwest removes the credentials itself.
const HARMLESS_ACROSS_HOSTS: [HeaderName; 4] = [ACCEPT, AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE];

/// How much of an unfollowed redirect's `Location` an error quotes.
const LOCATION_CHARS: usize = 200;

/// Whether a redirect to another host would carry one of these headers along.
pub(crate) fn would_leak(headers: &HeaderMap) -> bool {
    !headers
        .keys()
        .all(|name| HARMLESS_ACROSS_HOSTS.contains(name))
}

/// reqwest's default policy (up to 10 redirects), or with `stay_on_host` the same but
/// only while [`stays_on_host`] holds for the first URL and the next.
pub(crate) fn policy(stay_on_host: bool) -> Policy {
    if !stay_on_host {
        return Policy::limited(MAX_REDIRECTS);
    }
    Policy::custom(|attempt| {
        let same_host = attempt
            .previous()
            .first()
            .is_none_or(|first| stays_on_host(first, attempt.url()));
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else if same_host {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// Whether a redirect from `first` to `next` stays on its host: the same host, scheme
/// and port, or an upgrade from http to https on the same host and default ports.
fn stays_on_host(first: &Url, next: &Url) -> bool {
    let upgrade = first.scheme() == "http"
        && next.scheme() == "https"
        && first.port().is_none()
        && next.port().is_none();
    next.host_str() == first.host_str()
        && ((next.scheme() == first.scheme() && next.port() == first.port()) || upgrade)
}

/// For a redirect from `url` that came back as the answer: where it led, and why it was
/// not followed when it is the policy above that stopped it.
pub(crate) fn unfollowed(
    shared: &Shared,
    url: &Url,
    status: StatusCode,
    headers: &HeaderMap,
) -> Option<String> {
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = String::from_utf8_lossy(headers.get(LOCATION)?.as_bytes()).into_owned();
    // The server's text: no password, and not all of a long one.
    let redacted = redact_userinfo(&location);
    let mut shown: String = redacted.chars().take(LOCATION_CHARS).collect();
    if shown.len() < redacted.len() {
        shown.push('…');
    }
    let held = shared.redirects_stay_on_host
        && url
            .join(&location)
            .is_ok_and(|next| !stays_on_host(url, &next));
    let why = if held {
        " (it leaves the host, scheme or port, where fanout's client does not carry the \
         headers set with FanOutBuilder::header)"
    } else {
        ""
    };
    Some(format!("the redirect to {shown:?} was not followed{why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_stays_on_host_only_on_the_same_host_scheme_and_port() {
        let stays = |from: &str, to: &str| {
            stays_on_host(&Url::parse(from).unwrap(), &Url::parse(to).unwrap())
        };
        assert!(stays("http://api.test/a", "http://API.test:80/b"));
        assert!(stays("http://api.test/a", "https://api.test/b"));
        assert!(stays("https://[::1]:8443/a", "https://[0:0::1]:8443/b"));
        assert!(!stays("http://api.test/a", "http://api.test:8080/b"));
        assert!(!stays("http://api.test:8080/a", "https://api.test:8443/b"));
        assert!(!stays("http://api.test:8080/a", "https://api.test:8080/b"));
        assert!(!stays("https://api.test/a", "http://api.test/b"));
        assert!(!stays("https://api.test:8443/a", "http://api.test:8443/b"));
        assert!(!stays("http://127.0.0.1:8080/a", "http://localhost:8080/b"));
        assert!(!stays("http://api.test/a", "http://api.test.evil.test/b"));
    }
}
