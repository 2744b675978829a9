//! `RunStats`: a summary of a batch's run, and what is recorded for it as it runs.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::StatusCode;

use crate::error::{Error, ErrorKind};

/// The longest attempt the latency histogram tells apart (longer ones count as this).
const LATENCY_MAX_MICROS: u64 = 3_600_000_000;
/// Two significant digits: percentiles within 1%, in about 25 KiB per batch.
const LATENCY_DIGITS: u8 = 2;

/// What a run records beyond its counts, for [`RunStats`].
#[derive(Debug, Default, Clone)]
pub(crate) struct Recorded {
    /// Attempt latencies in microseconds; made at the first attempt.
    latency: Option<Histogram<u64>>,
    failures: HashMap<Cause, u64>,
    retries: HashMap<Cause, u64>,
}

impl Recorded {
    pub(crate) fn attempt_took(&mut self, took: Duration) {
        if self.latency.is_none() {
            self.latency = Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, LATENCY_DIGITS).ok();
        }
        if let Some(latency) = &mut self.latency {
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            latency.saturating_record(micros.max(1));
        }
    }

    pub(crate) fn failed(&mut self, err: &Error) {
        *self.failures.entry(Cause::of(err)).or_default() += 1;
    }

    pub(crate) fn retried(&mut self, err: &Error) {
        *self.retries.entry(Cause::of(err)).or_default() += 1;
    }

    pub(crate) fn summary(
        &self,
        ids: u64,
        succeeded: u64,
        failed: u64,
        retries: u64,
        wall_time: Duration,
    ) -> RunStats {
        let latency = self
            .latency
            .as_ref()
            .filter(|latency| !latency.is_empty())
            .map(|latency| {
                let at = |quantile| Duration::from_micros(latency.value_at_quantile(quantile));
                Latency {
                    p50: at(0.5),
                    p90: at(0.9),
                    p99: at(0.99),
                    max: Duration::from_micros(latency.max()),
                }
            });
        RunStats {
            ids,
            succeeded,
            failed,
            retries,
            requests: self.latency.as_ref().map_or(0, Histogram::len),
            wall_time,
            latency,
            failures: by_count(&self.failures),
            retry_causes: by_count(&self.retries),
        }
    }
}

/// The most frequent first, then by cause, so that the order is stable.
fn by_count(counts: &HashMap<Cause, u64>) -> Vec<(Cause, u64)> {
    let mut counts: Vec<(Cause, u64)> = counts.iter().map(|(cause, n)| (*cause, *n)).collect();
    counts.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| a.0.to_string().cmp(&b.0.to_string()))
    });
    counts
}

/// Why an attempt or an id failed: the error's kind and, for answers, the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Cause {
    /// The error's kind.
    pub kind: ErrorKind,
    /// The HTTP status, when the server answered.
    pub status: Option<StatusCode>,
}

impl Cause {
    fn of(err: &Error) -> Self {
        Cause {
            kind: err.kind(),
            status: err.status(),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.status) {
            (ErrorKind::Status, Some(status)) => write!(f, "{status}"),
            (kind, Some(status)) => write!(f, "{kind} ({})", status.as_u16()),
            (kind, None) => write!(f, "{kind}"),
        }
    }
}

/// Latency percentiles of a run's attempts, each from when it had its slot and token
/// until its answer had been read and decoded, or it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// The median.
    pub p50: Duration,
    /// 90% of attempts took at most this long.
    pub p90: Duration,
    /// 99% of attempts took at most this long.
    pub p99: Duration,
    /// The longest attempt.
    pub max: Duration,
}

/// A summary of a batch's run: from [`Progress::stats`](crate::Progress::stats) at any
/// time, or with the results from
/// [`Batch::collect_ordered_with_stats`](crate::Batch::collect_ordered_with_stats).
///
/// `Display` renders it as a compact table:
///
/// ```text
/// ids          4000 (3920 succeeded, 80 failed)
/// requests     4203 (203 retries)
/// wall time    2.41 s, 1660 ids/s
/// latency      p50 9.40 ms, p90 23.0 ms, p99 61.0 ms, max 512 ms
/// failures     404 Not Found: 80
/// retried on   503 Service Unavailable: 180, timed out: 23
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RunStats {
    /// Ids admitted.
    pub ids: u64,
    /// Ids whose outcome is a value.
    pub succeeded: u64,
    /// Ids whose outcome is an error.
    pub failed: u64,
    /// Retries planned after failed attempts (a retry cancelled while it waited is
    /// counted too).
    pub retries: u64,
    /// Attempts that ended (answered, failed or timed out); attempts cancelled, and
    /// ids that failed before sending (an invalid id), are not counted.
    pub requests: u64,
    /// From the batch's first poll to its last outcome (or to now, if it has not
    /// finished).
    pub wall_time: Duration,
    /// Attempt latency percentiles; `None` before the first attempt has ended.
    pub latency: Option<Latency>,
    /// Failed ids by the cause of their final error, the most frequent first.
    pub failures: Vec<(Cause, u64)>,
    /// Retries by the cause of the attempt that failed, the most frequent first.
    pub retry_causes: Vec<(Cause, u64)>,
}

impl RunStats {
    /// Ids with an outcome per second of wall time.
    pub fn throughput(&self) -> f64 {
        let seconds = self.wall_time.as_secs_f64();
        if seconds > 0.0 {
            (self.succeeded + self.failed) as f64 / seconds
        } else {
            0.0
        }
    }

    /// Failed ids whose final error is of this kind.
    pub fn failures_of_kind(&self, kind: ErrorKind) -> u64 {
        self.failures
            .iter()
            .filter(|(cause, _)| cause.kind == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// Failed ids whose final error carries this HTTP status.
    pub fn failures_with_status(&self, status: u16) -> u64 {
        self.failures
            .iter()
            .filter(|(cause, _)| cause.status.is_some_and(|s| s.as_u16() == status))
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for RunStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<12} {} ({} succeeded, {} failed)",
            "ids", self.ids, self.succeeded, self.failed
        )?;
        writeln!(
            f,
            "{:<12} {} ({} retries)",
            "requests", self.requests, self.retries
        )?;
        write!(
            f,
            "{:<12} {}, {:.0} ids/s",
            "wall time",
            Short(self.wall_time),
            self.throughput()
        )?;
        if let Some(latency) = &self.latency {
            write!(
                f,
                "\n{:<12} p50 {}, p90 {}, p99 {}, max {}",
                "latency",
                Short(latency.p50),
                Short(latency.p90),
                Short(latency.p99),
                Short(latency.max)
            )?;
        }
        for (title, causes) in [
            ("failures", &self.failures),
            ("retried on", &self.retry_causes),
        ] {
            if causes.is_empty() {
                continue;
            }
            write!(f, "\n{title:<12} ")?;
            for (i, (cause, n)) in causes.iter().enumerate() {
                let comma = if i == 0 { "" } else { ", " };
                write!(f, "{comma}{cause}: {n}")?;
            }
        }
        Ok(())
    }
}

/// A duration in two or three significant digits and the unit that suits it.
struct Short(Duration);

impl fmt::Display for Short {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (value, unit) = match self.0.as_secs_f64() {
            s if s >= 1.0 => (s, "s"),
            s if s >= 1e-3 => (s * 1e3, "ms"),
            s => (s * 1e6, "µs"),
        };
        let decimals = if value >= 100.0 {
            0
        } else if value >= 10.0 {
            1
        } else {
            2
        };
        write!(f, "{value:.decimals$} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_short() {
        let short = |d| Short(d).to_string();
        assert_eq!(short(Duration::from_micros(250)), "250 µs");
        assert_eq!(short(Duration::from_micros(9_400)), "9.40 ms");
        assert_eq!(short(Duration::from_millis(23)), "23.0 ms");
        assert_eq!(short(Duration::from_millis(2_410)), "2.41 s");
        assert_eq!(short(Duration::from_secs(3_725)), "3725 s");
    }

    #[test]
    fn the_table_lists_causes_most_frequent_first() {
        let mut recorded = Recorded::default();
        for millis in [10, 20, 30, 40, 1_000] {
            recorded.attempt_took(Duration::from_millis(millis));
        }
        let not_found = Error::new(ErrorKind::Status, "").with_status(StatusCode::NOT_FOUND);
        let busy = Error::new(ErrorKind::Status, "").with_status(StatusCode::SERVICE_UNAVAILABLE);
        let late = Error::new(ErrorKind::Timeout, "");
        recorded.failed(&not_found);
        recorded.retried(&late);
        recorded.retried(&busy);
        recorded.retried(&busy);
        let stats = recorded.summary(4, 3, 1, 3, Duration::from_secs(2));
        // Percentiles are within 1%: 30 ms is in the bucket that ends at 30.08 ms.
        assert_eq!(stats.requests, 5);
        assert_eq!(stats.failures_with_status(404), 1);
        assert_eq!(stats.failures_of_kind(ErrorKind::Timeout), 0);
        assert_eq!(
            stats.to_string(),
            "ids          4 (3 succeeded, 1 failed)\n\
             requests     5 (3 retries)\n\
             wall time    2.00 s, 2 ids/s\n\
             latency      p50 30.1 ms, p90 1.00 s, p99 1.00 s, max 1.00 s\n\
             failures     404 Not Found: 1\n\
             retried on   503 Service Unavailable: 2, timed out: 1"
        );
    }
}
