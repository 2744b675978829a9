//! `fanout`: calls a detail endpoint once per id, from the command line, and writes one
//! JSON line per id. See `fanout --help`, and the crate's README.

mod args;
mod ids;
mod output;
mod resume;

use std::fs::File;
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::pin::pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use fanout::{BoxError, Error, FanOut, Pagination, Quota, RetryPolicy, RunStats};
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use serde_json::value::RawValue;

use crate::args::Args;
use crate::ids::{Id, Seen};
use crate::output::{FLUSH_EVERY, Lines};
use crate::resume::Failures;

/// What is fetched: the body as it came, checked to be JSON and copied into the line.
type Record = Box<RawValue>;

/// How a run that could be made ended.
enum Ended {
    AllSucceeded,
    SomeFailed,
    Interrupted,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            // --help and --version go to standard output; the rest is a usage error.
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() { 1 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let ended = runtime.block_on(run(args));
    // Whatever is still running (a DNS lookup on a blocking thread) is not waited for.
    runtime.shutdown_background();
    match ended {
        Ok(Ended::AllSucceeded) => ExitCode::SUCCESS,
        Ok(Ended::SomeFailed) => ExitCode::from(2),
        Ok(Ended::Interrupted) => ExitCode::from(130),
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("fanout: error: {message}");
    ExitCode::from(1)
}

/// The run's counts, shared with the filter on the ids.
#[derive(Default)]
struct Counts {
    /// Ids not fetched: done in an earlier run, or repeated in the input.
    skipped: AtomicU64,
    /// Ids handed to the fan-out.
    admitted: AtomicU64,
    /// How many ids the input has (fetched or skipped), once known; 0 before.
    total: AtomicU64,
}

async fn run(args: Args) -> Result<Ended, String> {
    let fan = build(&args)?;
    let notes = Notes { quiet: args.quiet };
    // A bar on standard error, if it is a terminal that the lines do not go to too.
    let lines_on_terminal = args.output.is_none() && std::io::stdout().is_terminal();
    let show_bar = !args.quiet && !lines_on_terminal && std::io::stderr().is_terminal();
    // The ids' source first: a mistake there must not touch the output.
    let counts = Arc::new(Counts::default());
    let source = id_source(&args, &fan, &notes, show_bar.then_some(&counts))?;
    let mut seen = Seen::default();
    let Output {
        mut lines,
        destination,
        mut failures,
    } = output(&args, &mut seen, &notes)?;
    let batch = fan.fan_out_try_stream(first_times(source, seen, &counts));
    let mut bar = Bar::new(show_bar);
    let progress = batch.progress();
    let mut outcomes = if args.ordered {
        batch.try_in_order().boxed()
    } else {
        batch.try_as_completed().boxed()
    };

    let cannot_write = |err: std::io::Error| format!("cannot write {destination}: {err}");
    let (mut succeeded, mut failed) = (0u64, 0u64);
    let mut input_error: Option<Error> = None;
    let mut interrupt = pin!(tokio::signal::ctrl_c());
    let mut signals = true;
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    let interrupted = loop {
        tokio::select! {
            item = outcomes.next() => match item {
                None => break false,
                Some(Ok((id, result))) => {
                    if result.is_ok() { succeeded += 1 } else { failed += 1 }
                    lines.outcome(&id, &result).map_err(cannot_write)?;
                    if let Some(failures) = &mut failures {
                        failures.written(&id);
                    }
                }
                // The input's failure, after every id before it.
                Some(Err(err)) => input_error = Some(err),
            },
            _ = tick.tick() => {
                lines.flush().map_err(cannot_write)?;
                let skipped = counts.skipped.load(Ordering::Relaxed);
                let total = counts.total.load(Ordering::Relaxed);
                bar.show(succeeded + failed + skipped, failed, (total > 0).then_some(total));
            }
            caught = &mut interrupt, if signals => match caught {
                Ok(()) => break true,
                // No signal handling here: run on without it.
                Err(_) => signals = false,
            },
        }
    };
    if signals {
        // From here on, Ctrl-C (a second one, if it ended the run) does not wait for
        // the lines to be written out.
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    }
    // Cancels whatever is still in flight.
    drop(outcomes);
    bar.finish();
    let file = lines.finish().map_err(cannot_write)?;
    if let (Some(failures), Some(file)) = (failures, &file) {
        let removed = failures.compact(file).map_err(|err| {
            format!("{err}; the next --resume removes the failed lines that have new ones")
        })?;
        if removed > 0 {
            notes.say(format_args!(
                "removed the {removed} earlier failure lines of ids tried again"
            ));
        }
    }

    if !args.quiet {
        summary(
            &progress.stats(),
            succeeded,
            failed,
            counts.skipped.load(Ordering::Relaxed),
        );
    }
    let resume_hint = match &args.output {
        Some(path) => format!("; `--resume -o {}` continues from here", path.display()),
        None => String::new(),
    };
    if let Some(err) = input_error {
        return Err(format!(
            "the ids could not be read to the end: {err}; the {} before it were fetched{resume_hint}",
            succeeded + failed
        ));
    }
    if interrupted {
        notes.say(format_args!("interrupted{resume_hint}"));
        return Ok(Ended::Interrupted);
    }
    Ok(if failed == 0 {
        Ended::AllSucceeded
    } else {
        Ended::SomeFailed
    })
}

/// What goes to standard error besides errors, unless `--quiet`.
struct Notes {
    quiet: bool,
}

impl Notes {
    fn say(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("fanout: {message}");
        }
    }
}

/// The ids, from the list endpoint, the ids file or standard input.
/// With `counts` (a progress bar is shown), an ids file is counted on a thread of its
/// own meanwhile, for the bar's total.
fn id_source(
    args: &Args,
    fan: &FanOut<Id, Record>,
    notes: &Notes,
    counts: Option<&Arc<Counts>>,
) -> Result<BoxStream<'static, Result<Id, BoxError>>, String> {
    if args.list_url.is_some() {
        return Ok(fan.list_ids_stream().map_err(BoxError::from).boxed());
    }
    let path = args
        .ids_file
        .as_deref()
        .filter(|path| path.as_os_str() != "-");
    if path.is_none() && std::io::stdin().is_terminal() {
        notes.say("reading ids from the terminal, one per line; Ctrl-D ends them");
    }
    let lines = ids::lines(path).map_err(|err| err.to_string())?;
    if let (Some(path), Some(counts)) = (path.map(std::path::Path::to_path_buf), counts) {
        let counts = Arc::clone(counts);
        // Only a guess until the input ends, which sets the exact count.
        let _ = std::thread::Builder::new()
            .name("fanout-count".to_owned())
            .spawn(move || {
                if let Ok(ids) = ids::count(&path) {
                    let _ =
                        counts
                            .total
                            .compare_exchange(0, ids, Ordering::Relaxed, Ordering::Relaxed);
                }
            });
    }
    Ok(lines.map_err(BoxError::from).boxed())
}

/// Where the lines go, and what `--resume` found there.
struct Output {
    lines: Lines,
    /// For messages: the file's name, or "standard output".
    destination: String,
    /// The failed ids' lines that `--resume` found, to remove once replaced.
    failures: Option<Failures>,
}

/// Opens the output: standard output, a new file, or with `--resume` the file an
/// earlier run left, whose finished ids go into `seen`.
fn output(args: &Args, seen: &mut Seen, notes: &Notes) -> Result<Output, String> {
    let Some(path) = &args.output else {
        return Ok(Output {
            lines: Lines::stdout(std::io::stdout().is_terminal()),
            destination: "standard output".to_owned(),
            failures: None,
        });
    };
    let shown = path.display().to_string();
    let (file, failures) = if args.resume {
        let resumed = resume::open(path, seen)?;
        let mut note = format!(
            "resuming {shown}: {} ids done before, {} failed ids to try again",
            resumed.done,
            resumed.failures.len()
        );
        if resumed.torn > 0 {
            note.push_str(&format!(
                "; cut off a torn last line ({} bytes) left by an interrupted run",
                resumed.torn
            ));
        }
        notes.say(note);
        (resumed.file, Some(resumed.failures))
    } else {
        (create(path, args.overwrite)?, None)
    };
    Ok(Output {
        lines: Lines::file(file),
        destination: shown,
        failures,
    })
}

/// The ids not in `seen` yet, each once, counted in `counts`; `counts.total` is set
/// when the source ends.
fn first_times(
    source: BoxStream<'static, Result<Id, BoxError>>,
    mut seen: Seen,
    counts: &Arc<Counts>,
) -> impl futures::Stream<Item = Result<Id, BoxError>> + Send + 'static {
    let (counted, end) = (Arc::clone(counts), Arc::clone(counts));
    source
        .try_filter(move |id| {
            let first = seen.insert(&id.text());
            let count = if first {
                &counted.admitted
            } else {
                &counted.skipped
            };
            count.fetch_add(1, Ordering::Relaxed);
            std::future::ready(first)
        })
        .chain(stream::poll_fn(move |_| {
            let read = end.admitted.load(Ordering::Relaxed) + end.skipped.load(Ordering::Relaxed);
            end.total.store(read, Ordering::Relaxed);
            std::task::Poll::Ready(None)
        }))
}

/// The `FanOut` the arguments describe.
fn build(args: &Args) -> Result<FanOut<Id, Record>, String> {
    let mut builder = FanOut::<Id, Record>::builder()
        .detail_url(&args.detail_url)
        .concurrency(args.concurrency)
        .retry(RetryPolicy::exponential().max_retries(args.retries))
        .timeout(args.timeout);
    if let Some(rps) = args.rps {
        let rate = NonZeroU32::new(rps).ok_or("--rps must be at least 1")?;
        let quota = Quota::per_second(rate);
        builder = builder.rate_limit(match args.burst {
            None => quota,
            Some(burst) => {
                quota.allow_burst(NonZeroU32::new(burst).ok_or("--burst must be at least 1")?)
            }
        });
    }
    for (name, value) in &args.headers {
        builder = builder.header(name, value.as_str());
    }
    if let Some(var) = &args.bearer_env {
        if args
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        {
            return Err(
                "--bearer-env and -H 'Authorization: ...' both set the Authorization header; \
                 give one"
                    .to_owned(),
            );
        }
        let token = std::env::var(var).map_err(|err| match err {
            std::env::VarError::NotPresent => {
                format!("--bearer-env: the environment variable {var} is not set")
            }
            std::env::VarError::NotUnicode(_) => {
                format!("--bearer-env: the environment variable {var} is not text")
            }
        })?;
        if token.is_empty() {
            return Err(format!(
                "--bearer-env: the environment variable {var} is empty"
            ));
        }
        builder = builder.bearer_auth(token);
    }
    if let Some(url) = &args.list_url {
        builder = builder.list_url(url).paginate(pagination(args));
        if let Some(pointer) = &args.ids_at {
            builder = builder.ids_at(pointer);
        }
        if let Some(field) = &args.id_field {
            builder = builder.id_field(field);
        }
        if let Some(pages) = args.max_pages {
            builder = builder.max_pages(pages);
        }
    }
    builder.build().map_err(|err| err.to_string())
}

fn pagination(args: &Args) -> Pagination {
    if args.link_header {
        Pagination::link_header()
    } else if let Some(pointer) = &args.next_url_at {
        Pagination::next_url_at(pointer)
    } else if let (Some(pointer), Some(param)) = (&args.cursor_at, &args.cursor_param) {
        Pagination::cursor(pointer, param)
    } else if let (Some(offset), Some(limit), Some(size)) =
        (&args.offset_param, &args.limit_param, args.page_size)
    {
        Pagination::offset_limit(offset, limit, size)
    } else if let Some(param) = &args.page_param {
        Pagination::page_number(param).first_page(args.first_page.unwrap_or(1))
    } else {
        Pagination::none()
    }
}

/// A new output file; an existing one only with `--overwrite`.
fn create(path: &std::path::Path, overwrite: bool) -> Result<File, String> {
    let shown = path.display();
    let exists = std::fs::metadata(path).is_ok_and(|meta| meta.len() > 0);
    if exists && !overwrite {
        return Err(format!(
            "{shown} exists; --resume continues the run it holds, --overwrite replaces it"
        ));
    }
    // Emptied only once it is ours: another run may be writing it.
    let file = resume::open_locked(
        path,
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false),
    )?;
    file.set_len(0)
        .map_err(|err| format!("cannot empty {shown}: {err}"))?;
    Ok(file)
}

/// The progress bar on standard error, when shown: ids done (fetched or
/// skipped), out of the input's ids once their number is known.
struct Bar {
    bar: ProgressBar,
    sized: bool,
}

impl Bar {
    fn new(shown: bool) -> Self {
        let bar = if shown {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(Self::style(
                "{spinner} {elapsed_precise} {human_pos} ids  {rate}  {msg}",
            ));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Bar { bar, sized: false }
    }

    fn style(template: &str) -> ProgressStyle {
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "rate",
                |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                    let _ = write!(out, "{:.0}/s", state.per_sec());
                },
            )
    }

    fn show(&mut self, done: u64, failed: u64, total: Option<u64>) {
        if let Some(total) = total {
            self.bar.set_length(total);
            if !self.sized {
                self.sized = true;
                self.bar.set_style(Self::style(
                    "{spinner} {elapsed_precise} {wide_bar} {human_pos}/{human_len} ids  \
                     {rate}  eta {eta}  {msg}",
                ));
            }
        }
        self.bar.set_position(done);
        if failed > 0 {
            self.bar.set_message(format!("{failed} failed"));
        }
    }

    fn finish(self) {
        self.bar.finish_and_clear();
    }
}

fn summary(stats: &RunStats, succeeded: u64, failed: u64, skipped: u64) {
    let seconds = stats.wall_time.as_secs_f64();
    let mut line = format!(
        "fanout: {} ids in {seconds:.2} s ({:.0}/s): {succeeded} succeeded, {failed} failed",
        succeeded + failed,
        stats.throughput(),
    );
    if !stats.failures.is_empty() {
        let causes: Vec<String> = stats
            .failures
            .iter()
            .map(|(cause, count)| format!("{cause}: {count}"))
            .collect();
        line.push_str(&format!(" ({})", causes.join(", ")));
    }
    if stats.retries > 0 {
        line.push_str(&format!("; {} retries", stats.retries));
    }
    if skipped > 0 {
        line.push_str(&format!(
            "; {skipped} skipped (done before, or repeated in the input)"
        ));
    }
    eprintln!("{line}");
}
