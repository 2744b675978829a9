//! `--resume`: what an earlier run left in the output file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::{Id, Keys, Seen};

/// The part of a line that resuming reads.
#[derive(Deserialize)]
struct Line {
    id: Id,
    ok: bool,
}

/// An output file made ready to append to.
pub(crate) struct Resumed {
    pub(crate) file: File,
    /// Ids the file holds a success for: they are skipped.
    pub(crate) done: u64,
    /// The failed ids' lines, replaced once those ids have new ones.
    pub(crate) failures: Failures,
    /// The bytes of a torn last line that were cut off, if there was one.
    pub(crate) torn: u64,
}

/// The lines of ids that failed in an earlier run, which this run tries again. Each
/// stays in the file until its id has a new line; [`compact`](Failures::compact) then
/// removes it.
pub(crate) struct Failures {
    /// Where the output file really is (a link followed), for the rewrite.
    path: PathBuf,
    keys: Keys,
    /// Each failed id's line, by key.
    lines: HashMap<u128, Range<u64>>,
    /// The lines of ids that have a new line now.
    replaced: Vec<Range<u64>>,
}

impl Failures {
    /// How many failed ids the file held.
    pub(crate) fn len(&self) -> usize {
        self.lines.len() + self.replaced.len()
    }

    /// Notes that `id` has a new line: its old one, if it failed before, can go.
    pub(crate) fn written(&mut self, id: &Id) {
        if !self.lines.is_empty()
            && let Some(line) = self.lines.remove(&self.keys.of(&id.text()))
        {
            self.replaced.push(line);
        }
    }

    /// Removes the lines of the failed ids that have new lines, rewriting the file;
    /// returns how many. Until this runs (a run killed first), the next resume sees
    /// both lines of such an id and keeps the newer.
    ///
    /// `file` is the output file, still open and locked: the lock must be held until
    /// the rewrite is in place.
    pub(crate) fn compact(mut self, file: &File) -> Result<usize, String> {
        if self.replaced.is_empty() {
            return Ok(0);
        }
        let shown = self.path.display();
        let end = file
            .metadata()
            .map_err(|err| format!("cannot read {shown}: {err}"))?
            .len();
        self.replaced.sort_by_key(|line| line.start);
        rewrite(&self.path, file, end, &self.replaced)
            .map_err(|err| format!("cannot rewrite {shown}: {err}"))?;
        Ok(self.replaced.len())
    }
}

/// Reads the output file an earlier run left at `path` (an empty one if there is none),
/// adding the ids it holds a success for to `seen`, and noting the lines of those that
/// failed. Where an id has more than one line (a run killed before it could
/// [`compact`](Failures::compact)), the newest is kept: a success over any failure, a
/// later failure over an earlier one; the others are removed, rewriting the file
/// through a temporary one renamed over it. A torn last line, left by a run killed as
/// it wrote, is cut off.
///
/// A complete line that is not one this command writes is an error: the file is not
/// touched.
pub(crate) fn open(path: &Path, seen: &mut Seen) -> Result<Resumed, String> {
    let shown = path.display();
    let file = open_locked(
        path,
        OpenOptions::new().read(true).append(true).create(true),
    )?;
    // A link is followed: the file it leads to is rewritten, not the link replaced.
    let path = std::fs::canonicalize(path).map_err(|err| format!("cannot open {shown}: {err}"))?;

    let mut reader = BufReader::with_capacity(256 * 1024, &file);
    let mut line = Vec::new();
    let (mut at, mut lines, mut done) = (0u64, 0u64, 0u64);
    let mut failed: HashMap<u128, Range<u64>> = HashMap::new();
    // Lines to leave out: those of ids with a newer line.
    let mut removed: Vec<Range<u64>> = Vec::new();
    let torn = loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|err| format!("cannot read {shown}: {err}"))?;
        if read == 0 {
            break 0;
        }
        let read = read as u64;
        if line.last() != Some(&b'\n') {
            // Cut off only what is one of our lines, or the start of one: a file of
            // someone else's that lacks a final line break is not ours to shorten.
            match serde_json::from_slice::<Line>(&line) {
                Ok(_) => break read,
                Err(err) if err.is_eof() => break read,
                Err(_) => {
                    return Err(format!(
                        "{shown} ends in something that is not a line this command \
                         writes; not resuming into it"
                    ));
                }
            }
        }
        lines += 1;
        let parsed: Line = serde_json::from_slice(&line).map_err(|err| {
            format!(
                "line {lines} of {shown} is not a line this command writes ({err}); \
                 not resuming into it"
            )
        })?;
        let span = at..at + read;
        let key = seen.keys().of(&parsed.id.text());
        if parsed.ok {
            if seen.insert_key(key) {
                done += 1;
                removed.extend(failed.remove(&key));
            } else {
                removed.push(span);
            }
        } else if seen.contains_key(key) {
            removed.push(span);
        } else {
            removed.extend(failed.insert(key, span));
        }
        at += read;
    };
    drop(reader);

    let file = if !removed.is_empty() {
        removed.sort_by_key(|line| line.start);
        // The failed lines kept move up by the bytes removed before them.
        let gone_before: Vec<u64> = removed
            .iter()
            .scan(0, |gone, line| {
                *gone += line.end - line.start;
                Some(*gone)
            })
            .collect();
        for line in failed.values_mut() {
            let before = removed.partition_point(|r| r.start < line.start);
            let gone = before.checked_sub(1).map_or(0, |last| gone_before[last]);
            *line = line.start - gone..line.end - gone;
        }
        rewrite(&path, &file, at, &removed)
            .map_err(|err| format!("cannot rewrite {shown}: {err}"))?
    } else {
        if torn > 0 {
            file.set_len(at)
                .map_err(|err| format!("cannot cut the torn last line off {shown}: {err}"))?;
        }
        file
    };
    let failures = Failures {
        path,
        keys: seen.keys().clone(),
        lines: failed,
        replaced: Vec::new(),
    };
    Ok(Resumed {
        file,
        done,
        failures,
        torn,
    })
}

/// Copies the first `end` bytes of `file` without the `removed` spans (each a whole
/// line of ours, or nothing is changed) to a new file beside it, locks that, and
/// renames it over `path`: at every moment `path` is the old file or the new one,
/// whole, and the lock never lapses. Returns the new file, open to append to.
fn rewrite(path: &Path, file: &File, end: u64, removed: &[Range<u64>]) -> io::Result<File> {
    let (temporary, out) = beside(path, file)?;
    let written = lock(&out, &temporary)
        .map_err(io::Error::other)
        .and_then(|()| copy_without(file, &out, end, removed))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // The rename itself, on disk; not every platform lets a directory be synced.
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok(out)
}

/// A new file beside `path`, with a name of its own and the permission bits of `file`
/// from the start, open to read and append.
fn beside(path: &Path, file: &File) -> io::Result<(PathBuf, File)> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(file.metadata()?.permissions().mode() & 0o7777);
    }
    #[cfg(not(unix))]
    let _ = file;
    loop {
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!(".resume-{:016x}", fastrand::u64(..)));
        let temporary = path.with_file_name(name);
        match options.open(&temporary) {
            Ok(out) => return Ok((temporary, out)),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Writes the first `end` bytes of `file`, less the `removed` spans, to `out`, and
/// syncs it to disk. A span that is not one whole line of ours (the file changed under
/// us) stops the copy with an error.
fn copy_without(file: &File, out: &File, end: u64, removed: &[Range<u64>]) -> io::Result<()> {
    let mut out = io::BufWriter::with_capacity(256 * 1024, out);
    let mut input = BufReader::new(file);
    std::io::Seek::rewind(&mut input)?;
    let mut at = 0;
    let mut line = Vec::new();
    for span in removed {
        io::copy(&mut (&mut input).take(span.start - at), &mut out)?;
        line.clear();
        (&mut input)
            .take(span.end - span.start)
            .read_to_end(&mut line)?;
        if line.last() != Some(&b'\n') || serde_json::from_slice::<Line>(&line).is_err() {
            return Err(io::Error::other(
                "the file changed while it was being rewritten; nothing was removed",
            ));
        }
        at = span.end;
    }
    io::copy(&mut (&mut input).take(end - at), &mut out)?;
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()
}

/// Opens `path` with `options` for this run alone: locked, and still the file at
/// `path` once locked (another run may have renamed a rewrite over it meanwhile, and
/// a lock on the file it replaced would guard nothing).
pub(crate) fn open_locked(path: &Path, options: &OpenOptions) -> Result<File, String> {
    let shown = path.display();
    for _ in 0..10 {
        let file = options
            .open(path)
            .map_err(|err| format!("cannot open {shown}: {err}"))?;
        lock(&file, path)?;
        if is_at(&file, path) {
            return Ok(file);
        }
    }
    Err(format!("{shown} keeps being replaced by another program"))
}

/// Whether `file` is the file at `path` now.
fn is_at(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// Takes the output file for this run alone, or says that another run has it.
fn lock(file: &File, path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock only reads the descriptor, which `file` keeps open.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let err = io::Error::last_os_error();
            return Err(match err.kind() {
                io::ErrorKind::WouldBlock => format!(
                    "another fanout run is writing {}; wait for it to end",
                    path.display()
                ),
                _ => format!("cannot lock {}: {err}", path.display()),
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Outcome {
        result: Result<(u64, usize, u64), String>,
        after: String,
        seen: usize,
        failures: Option<Failures>,
        dir: PathBuf,
    }

    impl Drop for Outcome {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn resume(content: &str) -> Outcome {
        let dir = std::env::temp_dir().join(format!("fanout-resume-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.ndjson");
        std::fs::write(&path, content).unwrap();
        let mut seen = Seen::default();
        let (result, failures) = match open(&path, &mut seen) {
            Ok(r) => (Ok((r.done, r.failures.len(), r.torn)), Some(r.failures)),
            Err(err) => (Err(err), None),
        };
        let after = std::fs::read_to_string(&path).unwrap();
        Outcome {
            result,
            after,
            seen: seen.len(),
            failures,
            dir,
        }
    }

    const OK1: &str = "{\"id\":1,\"ok\":true,\"data\":{\"n\":1}}\n";
    const OK2: &str = "{\"id\":\"b\",\"ok\":true,\"data\":[]}\n";
    const FAILED3: &str = "{\"id\":3,\"ok\":false,\"error\":{\"kind\":\"status\"}}\n";
    const FAILED3_AGAIN: &str = "{\"id\":3,\"ok\":false,\"error\":{\"kind\":\"timeout\"}}\n";
    const OK3: &str = "{\"id\":3,\"ok\":true,\"data\":{}}\n";

    #[test]
    fn failures_stay_until_their_ids_have_new_lines() {
        let mut outcome = resume(&format!("{OK1}{FAILED3}{OK2}"));
        assert_eq!(outcome.result, Ok((2, 1, 0)));
        assert_eq!(outcome.after, format!("{OK1}{FAILED3}{OK2}"));
        assert_eq!(outcome.seen, 2, "the failed id is fetched again");

        // The run writes id 3 again; compacting removes its old line.
        let path = outcome.dir.join("out.ndjson");
        let mut failures = outcome.failures.take().unwrap();
        std::fs::write(&path, format!("{OK1}{FAILED3}{OK2}{OK3}")).unwrap();
        failures.written(&Id::Text("b".into()));
        failures.written(&Id::Number(3.into()));
        let file = File::open(&path).unwrap();
        assert_eq!(failures.compact(&file), Ok(1));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{OK1}{OK2}{OK3}")
        );
    }

    #[test]
    fn after_a_crash_before_compacting_the_newest_line_is_kept() {
        let outcome = resume(&format!("{FAILED3}{OK1}{OK3}"));
        assert_eq!(outcome.result, Ok((2, 0, 0)));
        assert_eq!(outcome.after, format!("{OK1}{OK3}"));
        let mut outcome = resume(&format!("{FAILED3}{OK1}{FAILED3_AGAIN}{OK2}"));
        assert_eq!(outcome.result, Ok((2, 1, 0)));
        assert_eq!(outcome.after, format!("{OK1}{FAILED3_AGAIN}{OK2}"));
        // The kept failure's line moved up; compacting still finds it.
        let mut failures = outcome.failures.take().unwrap();
        failures.written(&Id::Number(3.into()));
        let path = outcome.dir.join("out.ndjson");
        let file = File::open(&path).unwrap();
        assert_eq!(failures.compact(&file), Ok(1));
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            format!("{OK1}{OK2}")
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let outcome = resume(&format!("{OK1}{OK2}{{\"id\":4,\"ok\":tr"));
        assert_eq!(outcome.result, Ok((2, 0, 15)));
        assert_eq!(outcome.after, format!("{OK1}{OK2}"));
        // A whole line of ours that lost only its line break goes too: its id is
        // fetched again.
        let outcome = resume(&format!("{OK1}{}", OK2.trim_end()));
        assert_eq!(outcome.result, Ok((1, 0, OK2.len() as u64 - 1)));
        assert_eq!(outcome.after, OK1);
        // With a repeated line to remove as well.
        let outcome = resume(&format!("{OK1}{OK1}{{\"id\""));
        assert_eq!(outcome.result, Ok((1, 0, 5)));
        assert_eq!(outcome.after, OK1);
    }

    #[test]
    fn a_file_changed_under_a_rewrite_is_left_as_it_is() {
        let mut outcome = resume(&format!("{OK1}{FAILED3}{OK2}"));
        let path = outcome.dir.join("out.ndjson");
        let mut failures = outcome.failures.take().unwrap();
        failures.written(&Id::Number(3.into()));
        // Someone rewrote the file: the failure's line is no longer where it was.
        let changed = format!("{OK2}{OK1}{FAILED3}");
        std::fs::write(&path, &changed).unwrap();
        let file = File::open(&path).unwrap();
        let err = failures.compact(&file).unwrap_err();
        assert!(
            err.contains("changed while it was being rewritten"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), changed);
        let names: Vec<_> = std::fs::read_dir(&outcome.dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_second_line_for_an_id_is_removed() {
        let outcome = resume(&format!("{OK1}{OK1}{OK2}"));
        assert_eq!(outcome.result, Ok((2, 0, 0)));
        assert_eq!(outcome.after, format!("{OK1}{OK2}"));
    }

    #[test]
    fn a_file_that_is_not_ours_is_left_alone() {
        let content = format!("{OK1}name,views\n{OK2}");
        let outcome = resume(&content);
        assert!(outcome.result.as_ref().unwrap_err().contains("line 2 of"));
        assert_eq!(outcome.after, content);
        // Nor is one that merely lacks its last line break.
        let saved_record = "{\"id\":\"abc\",\"token\":\"x\"}";
        for content in [
            "{\"token\": \"x\"}",
            saved_record,
            &format!("{OK1}precious"),
        ] {
            let outcome = resume(content);
            let err = outcome.result.as_ref().unwrap_err();
            assert!(err.contains("not a line this command writes"), "{err}");
            assert_eq!(outcome.after, content);
        }
    }

    #[test]
    fn one_run_at_a_time() {
        let path = std::env::temp_dir().join(format!("fanout-lock-{}", fastrand::u64(..)));
        let first = File::create(&path).unwrap();
        lock(&first, &path).unwrap();
        let second = OpenOptions::new().append(true).open(&path).unwrap();
        assert!(
            lock(&second, &path)
                .unwrap_err()
                .contains("another fanout run")
        );
        drop(first);
        lock(&second, &path).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_empty_file_is_a_fresh_start() {
        let outcome = resume("");
        assert_eq!(outcome.result, Ok((0, 0, 0)));
        assert_eq!(outcome.after, "");
    }
}
