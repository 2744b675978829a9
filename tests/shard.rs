//! `fanout::shard`: a split of a static id list that every worker computes alike.

use fanout::{ErrorKind, shard};

/// The shard of `id` among `count`, by trying each.
fn which<Id: std::fmt::Display + ?Sized>(id: &Id, count: u32) -> Vec<u32> {
    (0..count)
        .filter(|&k| shard(k, count).unwrap().contains(id))
        .collect()
}

#[test]
fn the_split_is_the_documented_one() {
    // Computed outside Rust from the documented recipe (FNV-1a 64 of the text,
    // SplitMix64's finalizer, times count, the high 64 bits): a change of hash would
    // move ids between the workers of a running job.
    let expected: [(&str, [u32; 4]); 6] = [
        ("1", [0, 0, 2, 275]),
        ("42", [1, 1, 6, 641]),
        ("1000000", [0, 0, 0, 36]),
        ("player-7", [1, 1, 5, 550]),
        ("ü", [0, 1, 4, 465]),
        ("", [1, 2, 9, 957]),
    ];
    for (id, shards) in expected {
        for (count, k) in [2, 3, 10, 1000].into_iter().zip(shards) {
            assert_eq!(which(id, count), [k], "id {id:?} of {count} shards");
        }
    }
    // Numbers are hashed as their text.
    assert_eq!(which(&42_u64, 1000), which("42", 1000));
}

#[test]
fn every_id_is_in_exactly_one_shard_and_the_shards_are_even() {
    let count = 7;
    let shards: Vec<_> = (0..count).map(|k| shard(k, count).unwrap()).collect();
    let mut sizes = vec![0_u32; count as usize];
    for id in 0..70_000_u32 {
        let holders: Vec<_> = shards.iter().filter(|s| s.contains(&id)).collect();
        assert_eq!(holders.len(), 1, "id {id}");
        sizes[holders[0].index() as usize] += 1;
    }
    // 10,000 each on average; a binomial spread is about ±100.
    for size in &sizes {
        assert!((9_600..=10_400).contains(size), "{sizes:?}");
    }
    assert!(shard(0, 1).unwrap().contains("anything"));
}

#[test]
fn a_shard_that_does_not_exist_is_an_error() {
    for (k, n) in [(3, 3), (0, 0), (7, 2)] {
        let err = shard(k, n).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(
            err.to_string().contains(&format!("shard {k} of {n}")),
            "{err}"
        );
    }
}
