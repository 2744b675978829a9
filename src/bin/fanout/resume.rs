//! `--resume`: what an earlier run left in the output file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::{Id, Seen};

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
    /// Failed ids whose lines were removed: they are tried again.
    pub(crate) retried: u64,
    /// The bytes of a torn last line that were cut off, if there was one.
    pub(crate) torn: u64,
}

/// Reads the output file an earlier run left at `path` (an empty one if there is none),
/// adding the ids it holds a success for to `seen`. Then makes every id appear at most
/// once, and only as a success: failed ids' lines are removed (the file is rewritten
/// without them, through a temporary file renamed over it), and so is a torn last line,
/// left by a run killed as it wrote.
///
/// A complete line that is not one this command writes is an error: the file is not
/// touched.
pub(crate) fn open(path: &Path, seen: &mut Seen) -> Result<Resumed, String> {
    let shown = path.display();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|err| format!("cannot open {shown}: {err}"))?;
    lock(&file, path)?;
    // A link is followed: the file it leads to is rewritten, not the link replaced.
    let path = &std::fs::canonicalize(path).map_err(|err| format!("cannot open {shown}: {err}"))?;

    let mut reader = BufReader::with_capacity(256 * 1024, &file);
    let mut line = Vec::new();
    let (mut at, mut lines, mut done, mut retried) = (0u64, 0u64, 0u64, 0u64);
    // Lines to leave out: failed ids, and any second line for an id.
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
            // Cut off only what looks like the start of one of our lines: a file of
            // someone else's that lacks a final line break is not ours to shorten.
            const START: &[u8] = b"{\"id\":";
            if !(line.starts_with(START) || START.starts_with(&line)) {
                return Err(format!(
                    "{shown} ends in something that is not a line this command writes; \
                     not resuming into it"
                ));
            }
            break read;
        }
        lines += 1;
        let parsed: Line = serde_json::from_slice(&line).map_err(|err| {
            format!(
                "line {lines} of {shown} is not a line this command writes ({err}); \
                 not resuming into it"
            )
        })?;
        let span = at..at + read;
        if !parsed.ok {
            retried += 1;
            removed.push(span);
        } else if seen.insert(&parsed.id.to_string()) {
            done += 1;
        } else {
            removed.push(span);
        }
        at += read;
    };
    drop(reader);

    let file = if !removed.is_empty() {
        let file = rewrite(path, &file, at, &removed)
            .map_err(|err| format!("cannot rewrite {shown}: {err}"))?;
        lock(&file, path)?;
        file
    } else {
        if torn > 0 {
            file.set_len(at)
                .map_err(|err| format!("cannot cut the torn last line off {shown}: {err}"))?;
        }
        file
    };
    Ok(Resumed {
        file,
        done,
        retried,
        torn,
    })
}

/// Copies the first `end` bytes of `file` without the `removed` spans to a temporary
/// file beside it, then renames that over `path`: at every moment `path` is the old
/// file or the new one, whole.
fn rewrite(path: &Path, file: &File, end: u64, removed: &[Range<u64>]) -> io::Result<File> {
    let temporary = sibling(path);
    let copied = copy_without(file, &temporary, end, removed);
    if copied.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    copied?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // The rename itself, on disk; not every platform lets a directory be synced.
        let _ = File::open(dir).and_then(|dir| dir.sync_all());
    }
    OpenOptions::new().read(true).append(true).open(path)
}

/// Writes the first `end` bytes of `file`, less the `removed` spans, to `to`, with the
/// same permissions, and syncs it to disk.
fn copy_without(file: &File, to: &Path, end: u64, removed: &[Range<u64>]) -> io::Result<()> {
    let mut out = io::BufWriter::new(File::create(to)?);
    out.get_ref()
        .set_permissions(file.metadata()?.permissions())?;
    let mut input = BufReader::new(file);
    std::io::Seek::rewind(&mut input)?;
    let mut at = 0;
    for span in removed.iter().chain(std::iter::once(&(end..end))) {
        io::copy(&mut (&mut input).take(span.start - at), &mut out)?;
        io::copy(
            &mut (&mut input).take(span.end - span.start),
            &mut io::sink(),
        )?;
        at = span.end;
    }
    out.into_inner()
        .map_err(io::IntoInnerError::into_error)?
        .sync_all()
}

/// Takes the output file for this run alone, or says that another run has it.
pub(crate) fn lock(file: &File, path: &Path) -> Result<(), String> {
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

/// `path` with `.resume-tmp` added to its name.
fn sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".resume-tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(content: &str) -> (Result<(u64, u64, u64), String>, String, usize) {
        let dir = std::env::temp_dir().join(format!("fanout-resume-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.ndjson");
        std::fs::write(&path, content).unwrap();
        let mut seen = Seen::default();
        let result = open(&path, &mut seen).map(|r| (r.done, r.retried, r.torn));
        let after = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (result, after, seen.len())
    }

    const OK1: &str = "{\"id\":1,\"ok\":true,\"data\":{\"n\":1}}\n";
    const OK2: &str = "{\"id\":\"b\",\"ok\":true,\"data\":[]}\n";
    const FAILED3: &str = "{\"id\":3,\"ok\":false,\"error\":{\"kind\":\"status\"}}\n";

    #[test]
    fn successes_are_kept_and_failures_removed() {
        let (result, after, seen) = resume(&format!("{OK1}{FAILED3}{OK2}"));
        assert_eq!(result, Ok((2, 1, 0)));
        assert_eq!(after, format!("{OK1}{OK2}"));
        assert_eq!(seen, 2);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let (result, after, _) = resume(&format!("{OK1}{OK2}{{\"id\":4,\"ok\":tr"));
        assert_eq!(result, Ok((2, 0, 15)));
        assert_eq!(after, format!("{OK1}{OK2}"));
        // With a failure to remove as well.
        let (result, after, _) = resume(&format!("{FAILED3}{OK1}{{\"id\""));
        assert_eq!(result, Ok((1, 1, 5)));
        assert_eq!(after, OK1);
    }

    #[test]
    fn a_second_line_for_an_id_is_removed() {
        let (result, after, _) = resume(&format!("{OK1}{OK1}{OK2}"));
        assert_eq!(result, Ok((2, 0, 0)));
        assert_eq!(after, format!("{OK1}{OK2}"));
    }

    #[test]
    fn a_file_that_is_not_ours_is_left_alone() {
        let content = format!("{OK1}name,views\n{OK2}");
        let (result, after, _) = resume(&content);
        assert!(result.unwrap_err().contains("line 2 of"));
        assert_eq!(after, content);
        // Nor is one that merely lacks its last line break.
        for content in ["{\"token\": \"x\"}", &format!("{OK1}precious")] {
            let (result, after, _) = resume(content);
            assert!(
                result
                    .unwrap_err()
                    .contains("not a line this command writes")
            );
            assert_eq!(after, content);
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
    fn an_empty_or_missing_file_is_a_fresh_start() {
        let (result, after, _) = resume("");
        assert_eq!(result, Ok((0, 0, 0)));
        assert_eq!(after, "");
    }
}
