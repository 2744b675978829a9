//! Reading `Retry-After` (RFC 9110 §10.2.3): delta-seconds or an HTTP-date.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// How long the server asked the client to wait, if it said so in a form we can read.
///
/// A malformed value is ignored (`None`), never an error: the header is advice, and a
/// bad one must not turn a retryable answer into a failure. A date in the past means
/// "now" (zero).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only (so no sign); too many digits for a u64 is far past any cap anyway.
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds));
    }
    // httpdate accepts the three forms RFC 9110 requires recipients to read
    // (IMF-fixdate, RFC 850, asctime).
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn parse(value: &'static str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        retry_after(&headers, now)
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            parse("99999999999999999999999"),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        let ten = Some(Duration::from_secs(10));
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:47 GMT"), ten);
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:47 GMT"), ten);
        assert_eq!(parse("Sun Nov  6 08:49:47 1994"), ten);
    }

    #[test]
    fn a_date_in_the_past_means_now() {
        assert_eq!(parse("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
    }

    #[test]
    fn malformed_values_are_ignored() {
        for value in [
            "",
            "soon",
            "-5",
            "+5",
            "1.5",
            "5s",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse(value), None, "{value:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), SystemTime::now()), None);
    }
}
