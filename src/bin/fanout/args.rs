//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};

/// Calls a detail endpoint once per id and writes one JSON line per id.
///
/// Ids come from a list endpoint (--list-url), a file (--ids-file, one per line) or
/// standard input. Each line of output is {"id":…,"ok":true,"data":{…}} or
/// {"id":…,"ok":false,"error":{"kind":…,"status":…,"message":…,"attempts":…}}.
/// Each id is fetched once: the command remembers every id it has seen, in about 56
/// bytes each.
///
/// Exit status: 0 when every id succeeded, 2 when some failed, 1 when the run could
/// not be made or finished (a usage or configuration error, the ids or the output
/// could not be read or written), 130 when interrupted.
#[derive(Debug, Parser)]
#[command(name = "fanout", version, max_term_width = 100)]
#[command(group(ArgGroup::new("source").args(["list_url", "ids_file"])))]
#[command(group(ArgGroup::new("pages").args(["link_header", "next_url_at", "cursor_at", "offset_param", "page_param"])))]
pub(crate) struct Args {
    /// Where each id's record is, with {id} where the id goes:
    /// 'https://api.example.com/players/{id}?include=career'
    #[arg(long, value_name = "TEMPLATE")]
    pub(crate) detail_url: String,

    /// Read the ids from this list endpoint (see the pagination options).
    #[arg(long, value_name = "URL", help_heading = "Ids")]
    pub(crate) list_url: Option<String>,

    /// Read the ids from this file, one per line; blank lines are skipped. Without
    /// --list-url or --ids-file, ids are read from standard input.
    #[arg(long, value_name = "FILE", help_heading = "Ids")]
    pub(crate) ids_file: Option<PathBuf>,

    /// Where the ids are in a list page, as a JSON pointer (e.g. /data).
    #[arg(
        long,
        value_name = "POINTER",
        requires = "list_url",
        help_heading = "Ids"
    )]
    pub(crate) ids_at: Option<String>,

    /// The field holding the id when the list holds objects.
    #[arg(long, value_name = "NAME", requires = "list_url", help_heading = "Ids")]
    pub(crate) id_field: Option<String>,

    /// Follow the Link header's rel="next" from page to page.
    #[arg(long, requires = "list_url", help_heading = "Ids")]
    pub(crate) link_header: bool,

    /// Follow the next page's URL found at this JSON pointer (e.g. /links/next).
    #[arg(
        long,
        value_name = "POINTER",
        requires = "list_url",
        help_heading = "Ids"
    )]
    pub(crate) next_url_at: Option<String>,

    /// Follow the cursor found at this JSON pointer, sent back as --cursor-param.
    #[arg(long, value_name = "POINTER", requires_all = ["list_url", "cursor_param"], help_heading = "Ids")]
    pub(crate) cursor_at: Option<String>,

    /// The query parameter that takes the cursor.
    #[arg(
        long,
        value_name = "NAME",
        requires = "cursor_at",
        help_heading = "Ids"
    )]
    pub(crate) cursor_param: Option<String>,

    /// Page by offset: the offset's query parameter (with --limit-param and --page-size).
    #[arg(long, value_name = "NAME", requires_all = ["list_url", "limit_param", "page_size"], help_heading = "Ids")]
    pub(crate) offset_param: Option<String>,

    /// The page size's query parameter, for --offset-param.
    #[arg(
        long,
        value_name = "NAME",
        requires = "offset_param",
        help_heading = "Ids"
    )]
    pub(crate) limit_param: Option<String>,

    /// How many ids to ask for per page, for --offset-param.
    #[arg(
        long,
        value_name = "N",
        requires = "offset_param",
        help_heading = "Ids"
    )]
    pub(crate) page_size: Option<u64>,

    /// Page by number: the page number's query parameter (pages count from 1).
    #[arg(long, value_name = "NAME", requires = "list_url", help_heading = "Ids")]
    pub(crate) page_param: Option<String>,

    /// The first page's number, for --page-param.
    #[arg(long, value_name = "N", requires = "page_param", help_heading = "Ids")]
    pub(crate) first_page: Option<u64>,

    /// Stop with an error after this many list pages.
    #[arg(long, value_name = "N", requires = "list_url", help_heading = "Ids")]
    pub(crate) max_pages: Option<usize>,

    /// Requests on the wire at once.
    #[arg(
        short = 'c',
        long,
        value_name = "N",
        default_value_t = 16,
        help_heading = "Requests"
    )]
    pub(crate) concurrency: usize,

    /// Requests per second, at most (a token bucket); unlimited if not given.
    #[arg(long, value_name = "N", help_heading = "Requests")]
    pub(crate) rps: Option<u32>,

    /// How many requests may go at once after a quiet spell, for --rps [default: the
    /// --rps value, one second's worth].
    #[arg(long, value_name = "N", requires = "rps", help_heading = "Requests")]
    pub(crate) burst: Option<u32>,

    /// Retries of an id after a transient failure (a connection error, a timeout,
    /// 408, 429, 500, 502, 503, 504), with exponential backoff; Retry-After is obeyed.
    #[arg(long, value_name = "N", default_value_t = 3, help_heading = "Requests")]
    pub(crate) retries: u32,

    /// Time allowed for each attempt: 30, 1.5s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration, help_heading = "Requests")]
    pub(crate) timeout: Duration,

    /// A header for every request, 'Name: value'; can be given more than once.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE", value_parser = header, help_heading = "Requests")]
    pub(crate) headers: Vec<(String, String)>,

    /// Send 'Authorization: Bearer <token>' with the token taken from this environment
    /// variable (never from the command line, where other users could see it).
    #[arg(long, value_name = "VAR", help_heading = "Requests")]
    pub(crate) bearer_env: Option<String>,

    /// Write to this file instead of standard output.
    #[arg(short, long, value_name = "FILE", help_heading = "Output")]
    pub(crate) output: Option<PathBuf>,

    /// Continue an earlier run into --output: ids it holds with "ok":true are skipped,
    /// its failed ids are tried again, and new lines are appended.
    #[arg(
        long,
        requires = "output",
        conflicts_with = "overwrite",
        help_heading = "Output"
    )]
    pub(crate) resume: bool,

    /// Replace --output if it exists (without this or --resume, an existing file is
    /// an error, so that a finished or interrupted run is never lost by mistake).
    #[arg(long, requires = "output", help_heading = "Output")]
    pub(crate) overwrite: bool,

    /// Write the lines in the order of the ids, not as they complete.
    #[arg(long, help_heading = "Output")]
    pub(crate) ordered: bool,

    /// No progress bar and no summary on standard error.
    #[arg(short, long, help_heading = "Output")]
    pub(crate) quiet: bool,
}

/// A duration: seconds (`30`, `1.5`), or a number with `ms`, `s` or `m`.
fn duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let not_a_duration = || format!("{text:?} is not a duration; e.g. 30, 1.5s, 500ms, 2m");
    if number.trim().is_empty() {
        return Err(not_a_duration());
    }
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}; use ms, s or m (e.g. 500ms, 10s)"
            ));
        }
    };
    let value: f64 = number.trim().parse().map_err(|_| not_a_duration())?;
    Duration::try_from_secs_f64(value * scale)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// A header, `Name: value`.
fn header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| "expected 'Name: value', with a colon".to_owned())?;
    let name = name.trim();
    if name.is_empty() {
        return Err("the header name is empty".to_owned());
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("0").is_err());
        assert!(duration("-1").is_err());
        assert!(duration("5h").unwrap_err().contains("unknown unit"));
        assert!(duration("soon").is_err());
        assert!(duration("1e300").is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(
            header("X-Api-Key:  k:1 "),
            Ok(("X-Api-Key".to_owned(), "k:1".to_owned()))
        );
        assert!(header("no colon").is_err());
        assert!(header(": v").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
