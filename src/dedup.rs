//! Remembering which ids were seen, for `dedup_ids`.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, RandomState};

/// The ids seen so far, by a 128-bit hash of their `Display` form: 16 bytes an id
/// (about 36 with the set's overhead, 54 while it grows), whatever the id's length. With 128 bits, the
/// chance that two of a billion distinct ids collide (and one is wrongly dropped) is
/// about 10<sup>-21</sup>.
#[derive(Default)]
pub(crate) struct Seen {
    hashes: HashSet<u128>,
    /// Two independently keyed hashers make the 128 bits.
    keys: (RandomState, RandomState),
    text: String,
}

impl Seen {
    /// True the first time an id with this `Display` form is offered.
    pub(crate) fn first_time(&mut self, id: &impl fmt::Display) -> bool {
        self.text.clear();
        // A Display impl that fails leaves a partial text; the id is then judged by it.
        let _ = write!(self.text, "{id}");
        let key = key(&self.keys, &self.text);
        self.hashes.insert(key)
    }

    /// The same, for an id already rendered.
    pub(crate) fn first_time_text(&mut self, text: &str) -> bool {
        let key = key(&self.keys, text);
        self.hashes.insert(key)
    }
}

fn key(keys: &(RandomState, RandomState), text: &str) -> u128 {
    (u128::from(keys.0.hash_one(text)) << 64) | u128::from(keys.1.hash_one(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_caught_by_display_form() {
        let mut seen = Seen::default();
        assert!(seen.first_time(&1));
        assert!(seen.first_time(&2));
        assert!(!seen.first_time(&1));
        assert!(!seen.first_time(&"1"));
        assert!(seen.first_time(&"01"));
    }
}
