//! The output: one JSON line per id, written only as whole lines.

use std::fs::File;
use std::io::{self, Write};
use std::time::Duration;

use fanout::Error;
use serde_json::value::RawValue;

use crate::ids::Id;

/// How often the run hands the lines waiting to the file or stream (they also go
/// whenever 64 KiB are waiting), so that a killed run loses little.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(200);
const FLUSH_BYTES: usize = 64 * 1024;

/// Where the lines go. Lines wait in a buffer that is written out only up to its last
/// complete line, so a crash leaves at most a torn last line, which `--resume` removes.
pub(crate) struct Lines {
    target: Target,
    buffer: Vec<u8>,
}

enum Target {
    /// Synced to disk at the end.
    File(File),
    /// Written line by line when `eager` (a terminal).
    Stdout { eager: bool },
}

impl Lines {
    pub(crate) fn file(file: File) -> Self {
        Self::to(Target::File(file))
    }

    pub(crate) fn stdout(eager: bool) -> Self {
        Self::to(Target::Stdout { eager })
    }

    fn to(target: Target) -> Self {
        Lines {
            target,
            buffer: Vec::with_capacity(FLUSH_BYTES),
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
        let eager = matches!(self.target, Target::Stdout { eager: true });
        if eager || self.buffer.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes out the lines waiting, if any.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        match &mut self.target {
            Target::File(file) => file.write_all(&self.buffer)?,
            Target::Stdout { .. } => {
                let mut out = io::stdout().lock();
                out.write_all(&self.buffer)?;
                out.flush()?;
            }
        }
        self.buffer.clear();
        Ok(())
    }

    /// Writes out the rest and, for a file, waits until it is on disk. Gives the file
    /// back, still open (and so still locked).
    pub(crate) fn finish(mut self) -> io::Result<Option<File>> {
        self.flush()?;
        match self.target {
            // Devices and pipes (`-o /dev/stdout`) have nothing to sync.
            Target::File(file) => {
                if file.metadata()?.is_file() {
                    file.sync_data()?;
                }
                Ok(Some(file))
            }
            Target::Stdout { .. } => Ok(None),
        }
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
