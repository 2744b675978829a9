//! Splitting a static list of ids between workers, without any coordination.

use std::fmt::{self, Write};

use crate::error::{Error, ErrorKind};

/// Shard `index` of `count`: keeps the ids whose stable hash falls in it.
///
/// For N workers with one static list of ids and no Redis: worker k of N keeps the ids
/// of shard k, and every id belongs to exactly one shard. The hash depends only on the
/// id's `Display` text, the same on every machine, process and version of this crate,
/// so the workers need not talk to each other:
///
/// ```
/// let mine = fanout::shard(1, 3)?; // this worker is number 1 of 3, counting from 0
/// let ids = (1..=9_u64).filter(|id| mine.contains(id));
/// # let ids: Vec<u64> = ids.collect();
/// # assert!(!ids.is_empty());
/// # Ok::<(), fanout::Error>(())
/// ```
///
/// The hash is 64-bit FNV-1a over the UTF-8 text, finished with SplitMix64's mixer;
/// the shard is the hash times `count`, divided by 2⁶⁴. Another program can compute the
/// same split (`tests/shard.rs` has reference values).
///
/// A shard does not rebalance: a worker that dies leaves its shard undone, and changing
/// `count` moves most ids to other shards. [`crate::redis::RedisIdQueue`] (the `redis`
/// feature) hands ids out as workers free up, and reclaims those of a dead worker.
///
/// # Errors
///
/// [`ErrorKind::InvalidConfig`] if `count` is 0 or `index` is not below it.
pub fn shard(index: u32, count: u32) -> Result<Shard, Error> {
    if index >= count {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("shard {index} of {count} does not exist: shards are numbered 0 to count - 1"),
        ));
    }
    Ok(Shard { index, count })
}

/// One shard of ids; made by [`shard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: u32,
    count: u32,
}

impl Shard {
    /// Whether `id` belongs to this shard.
    pub fn contains<Id: fmt::Display + ?Sized>(&self, id: &Id) -> bool {
        Self::of(id, self.count) == self.index
    }

    /// The shard `id` belongs to, of `count` (which must not be 0).
    fn of<Id: fmt::Display + ?Sized>(id: &Id, count: u32) -> u32 {
        let mut hasher = Fnv1a(0xcbf2_9ce4_8422_2325);
        // Writing to the hasher cannot fail; a `Display` that fails is hashed as far as
        // it got.
        let _ = write!(hasher, "{id}");
        let hash = mix(hasher.0);
        // Lemire's multiply-shift: uniform, and no division.
        u32::try_from((u128::from(hash) * u128::from(count)) >> 64).unwrap_or(0)
    }

    /// This shard's number, from 0.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.count
    }
}

/// 64-bit FNV-1a, fed by `Display` without a `String` in between.
struct Fnv1a(u64);

impl Write for Fnv1a {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(())
    }
}

/// SplitMix64's finalizer: spreads FNV's weak high bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_published_vectors() {
        let fnv = |text: &str| {
            let mut hasher = Fnv1a(0xcbf2_9ce4_8422_2325);
            hasher.write_str(text).unwrap();
            hasher.0
        };
        // From the FNV reference test suite.
        assert_eq!(fnv(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn split_text_hashes_as_whole_text() {
        struct Pieces;
        impl fmt::Display for Pieces {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("play")?;
                f.write_str("er-42")
            }
        }
        assert_eq!(Shard::of(&Pieces, 97), Shard::of("player-42", 97));
    }
}
