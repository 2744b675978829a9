//! Retrying transient failures: the policy, `Retry-After`, and the per-id loop.

mod policy;
mod retry_after;
mod run;

pub use self::policy::{FailedAttempt, RetryPolicy};

pub(crate) use self::policy::is_transient_status;
pub(crate) use self::retry_after::retry_after;
pub(crate) use self::run::{Scope, fetch, fetch_with};
