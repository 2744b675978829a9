//! Puts outcomes that finish in any order back into input order.

use std::collections::VecDeque;

/// Holds outcomes that finished ahead of the head of the line, indexed by position.
///
/// Memory is proportional to how far ahead of the head outcomes have finished, which
/// the in-order output bounds by admitting no id past `head() + window`.
#[derive(Debug)]
pub(crate) struct Reorder<V> {
    /// Position of `slots[0]`: the next outcome to hand out.
    head: u64,
    slots: VecDeque<Option<V>>,
}

impl<V> Reorder<V> {
    pub(crate) fn new() -> Self {
        Reorder {
            head: 0,
            slots: VecDeque::new(),
        }
    }

    /// The position of the next outcome to hand out.
    pub(crate) fn head(&self) -> u64 {
        self.head
    }

    /// Stores the outcome at `seq`, which must not have been handed out yet.
    pub(crate) fn insert(&mut self, seq: u64, value: V) {
        debug_assert!(seq >= self.head, "outcome {seq} arrived twice");
        let Ok(offset) = usize::try_from(seq - self.head) else {
            return;
        };
        if offset >= self.slots.len() {
            self.slots.resize_with(offset + 1, || None);
        }
        self.slots[offset] = Some(value);
    }

    /// The head outcome, if it has arrived.
    pub(crate) fn pop(&mut self) -> Option<V> {
        let value = self.slots.front_mut()?.take()?;
        self.slots.pop_front();
        self.head += 1;
        Some(value)
    }

    /// Every outcome that is now in order.
    pub(crate) fn drain_ready(&mut self) -> impl Iterator<Item = V> + '_ {
        std::iter::from_fn(|| self.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_values_only_in_order() {
        let mut r = Reorder::new();
        r.insert(2, 'c');
        r.insert(1, 'b');
        assert_eq!(r.pop(), None);
        r.insert(0, 'a');
        assert_eq!(r.drain_ready().collect::<String>(), "abc");
        assert_eq!(r.head(), 3);
        assert_eq!(r.pop(), None);
        r.insert(4, 'e');
        r.insert(3, 'd');
        assert_eq!(r.drain_ready().collect::<String>(), "de");
        assert!(r.slots.is_empty());
    }

    #[test]
    fn any_permutation_comes_out_sorted() {
        // A fixed pseudo-random permutation of 0..500 (multiplication by a unit mod 500).
        let order: Vec<u64> = (0..500u64).map(|i| (i * 317) % 500).collect();
        let mut r = Reorder::new();
        let mut out = Vec::new();
        for seq in order {
            r.insert(seq, seq);
            out.extend(r.drain_ready());
        }
        assert_eq!(out, (0..500).collect::<Vec<_>>());
    }
}
