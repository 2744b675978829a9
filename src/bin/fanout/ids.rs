//! The ids: as the list endpoint or the input gave them, and which of them to fetch.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufRead};
use std::path::Path;

use futures::Stream;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::mpsc;

/// An id, kept as it came: a JSON number from a list stays a number in the output, a
/// line of input is a string. Its `Display` form (the number's digits, the string's
/// text) goes into the URL and identifies it on resume.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Id {
    Number(serde_json::Number),
    Text(String),
}

impl Id {
    /// Its `Display` form, borrowed where the id is text already (most are).
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match self {
            Id::Number(number) => Cow::Owned(number.to_string()),
            Id::Text(text) => Cow::Borrowed(text),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Number(number) => fmt::Display::fmt(number, f),
            Id::Text(text) => f.write_str(text),
        }
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Id::Number(number) => number.serialize(serializer),
            Id::Text(text) => serializer.serialize_str(text),
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = Id;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an id: a string or a number")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Id, E> {
                Ok(Id::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<Id, E> {
                Ok(Id::Text(text))
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Id, E> {
                Ok(Id::Number(number.into()))
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Id, E> {
                Ok(Id::Number(number.into()))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Id, E> {
                // A fraction does not read back to the same digits every time, and a
                // whole number past 2^64 arrives as one: neither would be one id.
                Err(E::custom(
                    "an id must be a string or an integer (a number with a fraction or \
                     beyond 64 bits cannot be kept exactly; list it as a string)",
                ))
            }
        }

        deserializer.deserialize_any(IdVisitor)
    }
}

/// An id's key: a 128-bit hash of its `Display` form (16 bytes, whatever the id's
/// length). Two distinct ids share a key with a chance of about 10^-21 in a billion.
#[derive(Clone, Default)]
pub(crate) struct Keys(RandomState, RandomState);

impl Keys {
    pub(crate) fn of(&self, id: &str) -> u128 {
        (u128::from(self.0.hash_one(id)) << 64) | u128::from(self.1.hash_one(id))
    }
}

/// The ids seen so far, by key: those an earlier run finished, then each one admitted,
/// so that every id is fetched once.
#[derive(Default)]
pub(crate) struct Seen {
    hashes: HashSet<u128>,
    keys: Keys,
}

impl Seen {
    /// True the first time an id with this `Display` form is offered.
    pub(crate) fn insert(&mut self, id: &str) -> bool {
        self.insert_key(self.keys.of(id))
    }

    pub(crate) fn insert_key(&mut self, key: u128) -> bool {
        self.hashes.insert(key)
    }

    pub(crate) fn contains_key(&self, key: u128) -> bool {
        self.hashes.contains(&key)
    }

    /// How this set makes its keys.
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.hashes.len()
    }
}

/// The ids in `path` (standard input for `None`), one per line, trimmed, blank lines
/// skipped. A reader thread keeps up to a thousand ids ahead of the fan-out; a line
/// that is not UTF-8, or a read that fails, ends the stream with an error naming the
/// line.
pub(crate) fn lines(
    path: Option<&Path>,
) -> io::Result<impl Stream<Item = io::Result<Id>> + Send + 'static> {
    let (name, input): (String, Box<dyn BufRead + Send>) = match path {
        None => (
            "standard input".to_owned(),
            Box::new(io::BufReader::new(io::stdin())),
        ),
        Some(path) => {
            let file = std::fs::File::open(path).map_err(|err| {
                io::Error::new(err.kind(), format!("cannot open {}: {err}", path.display()))
            })?;
            (
                path.display().to_string(),
                Box::new(io::BufReader::new(file)),
            )
        }
    };
    let (sender, receiver) = mpsc::channel(1024);
    std::thread::Builder::new()
        .name("fanout-ids".to_owned())
        .spawn(move || read_lines(&name, input, &sender))?;
    Ok(futures::stream::unfold(
        receiver,
        |mut receiver| async move {
            let id = receiver.recv().await?;
            Some((id, receiver))
        },
    ))
}

/// How many ids the file at `path` holds: its lines that are not blank.
pub(crate) fn count(path: &Path) -> io::Result<u64> {
    let mut input = io::BufReader::with_capacity(256 * 1024, std::fs::File::open(path)?);
    let (mut line, mut ids) = (Vec::new(), 0);
    while input.read_until(b'\n', &mut line)? > 0 {
        if !line.trim_ascii().is_empty() {
            ids += 1;
        }
        line.clear();
    }
    Ok(ids)
}

fn read_lines(
    name: &str,
    mut input: Box<dyn BufRead + Send>,
    sender: &mpsc::Sender<io::Result<Id>>,
) {
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let id = match input.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => match std::str::from_utf8(&line) {
                Ok(text) => match text.trim() {
                    "" => continue,
                    id => Ok(Id::Text(id.to_owned())),
                },
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line {number} of {name} is not UTF-8 text"),
                )),
            },
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!("reading line {number} of {name}: {err}"),
            )),
        };
        let failed = id.is_err();
        // The fan-out stopped reading: nothing more to do.
        if sender.blocking_send(id).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_json_type_and_display_their_text() {
        let ids: Vec<Id> = serde_json::from_str(r#"[7, "a b", -3]"#).unwrap();
        assert_eq!(serde_json::to_string(&ids).unwrap(), r#"[7,"a b",-3]"#);
        let shown: Vec<String> = ids.iter().map(Id::to_string).collect();
        assert_eq!(shown, ["7", "a b", "-3"]);
        let texts: Vec<Cow<'_, str>> = ids.iter().map(Id::text).collect();
        assert_eq!(texts, shown);
        assert!(serde_json::from_str::<Id>("1.5").is_err());
        assert!(serde_json::from_str::<Id>("1.0").is_err());
        assert!(serde_json::from_str::<Id>("null").is_err());
        assert!(serde_json::from_str::<Id>("18446744073709551617").is_err());
        assert!(serde_json::from_str::<Id>(r#"{"id":1}"#).is_err());
    }

    #[test]
    fn seen_once() {
        let mut seen = Seen::default();
        assert!(seen.insert("7"));
        assert!(!seen.insert("7"));
        assert!(seen.insert("07"));
        assert_eq!(seen.len(), 2);
    }
}
