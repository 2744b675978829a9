//! The output: one JSON line per id, written only as whole lines.

use std::fs::File;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use fanout::Error;
use serde_json::value::RawValue;

use crate::ids::Id;

/// Lines are handed to the file or stream at least this often (and whenever this many
/// bytes are waiting), so that a killed run loses little.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 64 * 1024;

/// Where the lines go. Lines wait in a buffer that is written out only up to its last
/// complete line, so a crash leaves at most a torn last line, which `--resume` removes.
pub(crate) struct Lines {
    out: Box<dyn Write + Send>,
    /// The output file, synced to disk at the end; `None` for standard output.
    file: Option<File>,
    buffer: Vec<u8>,
    flushed: Instant,
    /// Every line is written at once (standard output on a terminal).
    eager: bool,
}

impl Lines {
    pub(crate) fn file(file: File) -> io::Result<Self> {
        Ok(Lines {
            out: Box::new(file.try_clone()?),
            file: Some(file),
            buffer: Vec::with_capacity(FLUSH_BYTES),
            flushed: Instant::now(),
            eager: false,
        })
    }

    pub(crate) fn stdout(eager: bool) -> Self {
        Lines {
            out: Box::new(io::stdout()),
            file: None,
            buffer: Vec::with_capacity(FLUSH_BYTES),
            flushed: Instant::now(),
            eager,
        }
    }

    /// Adds the line for one id's outcome.
    pub(crate) fn outcome(
        &mut self,
        id: &Id,
        result: &Result<Box<RawValue>, Error>,
    ) -> io::Result<()> {
        let line = &mut self.buffer;
        line.extend_from_slice(b"{\"id\":");
        serde_json::to_writer(&mut *line, id)?;
        match result {
            Ok(data) => {
                line.extend_from_slice(b",\"ok\":true,\"data\":");
                compact_into(data.get().as_bytes(), line);
            }
            Err(err) => {
                line.extend_from_slice(b",\"ok\":false,\"error\":");
                let error = serde_json::json!({
                    "kind": err.kind().as_str(),
                    "status": err.status().map(|status| status.as_u16()),
                    "message": err.to_string(),
                    "attempts": err.attempts(),
                });
                serde_json::to_writer(&mut *line, &error)?;
            }
        }
        line.extend_from_slice(b"}\n");
        if self.eager || self.buffer.len() >= FLUSH_BYTES || self.flushed.elapsed() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes out the lines waiting, if any.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.out.write_all(&self.buffer)?;
            self.out.flush()?;
            self.buffer.clear();
        }
        self.flushed = Instant::now();
        Ok(())
    }

    /// Writes out the rest and, for a file, waits until it is on disk. Gives the file
    /// back, still open (and so still locked).
    pub(crate) fn finish(mut self) -> io::Result<Option<File>> {
        self.flush()?;
        match &self.file {
            // Devices and pipes (`-o /dev/stdout`) have nothing to sync.
            Some(file) if file.metadata()?.is_file() => file.sync_data()?,
            _ => {}
        }
        Ok(self.file)
    }
}

/// Appends `json` without the whitespace between its tokens, so that a pretty-printed
/// body stays on one line. Strings are copied as they are: a raw line break cannot be
/// inside one in valid JSON, which the body was decoded as.
fn compact_into(json: &[u8], out: &mut Vec<u8>) {
    if !json.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        out.extend_from_slice(json);
        return;
    }
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        } else if byte == b'"' {
            in_string = true;
        }
        out.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(json: &str) -> String {
        let mut out = Vec::new();
        compact_into(json.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pretty_bodies_become_one_line_and_strings_are_kept() {
        assert_eq!(
            compact("{\"a\": 1}"),
            "{\"a\": 1}",
            "no line break: as it is"
        );
        assert_eq!(
            compact("{\n  \"a b\": \"x \\\" y\\\\\",\r\n  \"c\": [1, 2]\n}"),
            "{\"a b\":\"x \\\" y\\\\\",\"c\":[1,2]}"
        );
    }
}
