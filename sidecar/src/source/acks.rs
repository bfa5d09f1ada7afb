//! Batched acknowledgements: which delivered messages are settled, in channel
//! order, so that one `basic.ack` with `multiple` can acknowledge a whole run.
//!
//! A message settled out of order waits until every message before it is
//! settled, but not for long: settled messages stuck behind one that has been
//! pending longer than a threshold (a slow delivery, a duplicate waiting to be
//! requeued) are acknowledged one by one. Otherwise they would hold prefetch
//! slots and the broker would stop delivering. Messages given back with a nack
//! count as settled but are never acknowledged (the broker no longer holds them
//! as outstanding, and acking them would be an error).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Pending {
    received: Instant,
    /// None: not settled; Some(true): to ack; Some(false): nacked.
    settled: Option<bool>,
}

/// Which delivered messages are settled, in channel order.
#[derive(Debug, Default)]
pub struct AckTracker {
    pending: BTreeMap<u64, Pending>,
    /// How many of `pending` are settled: waiting behind an unsettled one.
    settled: usize,
}

/// The acknowledgements to send now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acks {
    /// Ack this tag with `multiple`: it covers the settled prefix.
    pub multiple: Option<u64>,
    /// Ack each of these alone: settled, but behind a message stuck pending.
    pub single: Vec<u64>,
}

impl AckTracker {
    pub fn received(&mut self, tag: u64, now: Instant) {
        self.pending.insert(
            tag,
            Pending {
                received: now,
                settled: None,
            },
        );
    }

    pub fn settle(&mut self, tag: u64, ack: bool) {
        if let Some(p) = self.pending.get_mut(&tag) {
            if p.settled.is_none() {
                self.settled += 1;
            }
            p.settled = Some(ack);
        }
    }

    /// Whether settled messages wait behind an unsettled one: only then can
    /// the wait make one stuck, and is a timer needed to look again.
    pub fn holds_settled(&self) -> bool {
        self.settled > 0
    }

    /// Takes what can be acknowledged at `now`: the settled prefix, and the
    /// settled messages behind a message pending for longer than `stuck_after`.
    pub fn take(&mut self, now: Instant, stuck_after: Duration) -> Acks {
        let mut acks = Acks::default();
        while let Some(entry) = self.pending.first_entry() {
            match entry.get().settled {
                None => break,
                Some(ack) => {
                    if ack {
                        acks.multiple = Some(*entry.key());
                    }
                    entry.remove();
                    self.settled -= 1;
                }
            }
        }
        let stuck = self
            .pending
            .first_key_value()
            .is_some_and(|(_, p)| now.saturating_duration_since(p.received) >= stuck_after);
        if stuck {
            self.pending.retain(|tag, p| match p.settled {
                None => true,
                Some(ack) => {
                    if ack {
                        acks.single.push(*tag);
                    }
                    false
                }
            });
            self.settled = 0;
        }
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STUCK: Duration = Duration::from_millis(20);

    fn tracker(tags: std::ops::RangeInclusive<u64>, at: Instant) -> AckTracker {
        let mut t = AckTracker::default();
        for tag in tags {
            t.received(tag, at);
        }
        t
    }

    #[test]
    fn acks_the_settled_prefix_with_one_multiple_ack() {
        let t0 = Instant::now();
        let mut t = tracker(1..=5, t0);
        t.settle(2, true);
        assert_eq!(
            t.take(t0, STUCK),
            Acks::default(),
            "tag 1 is not settled yet"
        );
        t.settle(1, true);
        t.settle(3, false);
        assert_eq!(
            t.take(t0, STUCK).multiple,
            Some(2),
            "3 was nacked: ack up to 2"
        );
        t.settle(5, true);
        assert_eq!(t.take(t0, STUCK), Acks::default(), "4 is pending, briefly");
        assert!(t.holds_settled(), "5 waits behind 4");
        t.settle(4, false);
        assert_eq!(t.take(t0, STUCK).multiple, Some(5));
        assert!(t.pending.is_empty());
        assert!(!t.holds_settled());
    }

    #[test]
    fn a_nacked_prefix_gives_nothing_to_ack() {
        let t0 = Instant::now();
        let mut t = tracker(1..=1, t0);
        t.settle(1, false);
        assert_eq!(t.take(t0, STUCK), Acks::default());
        assert!(t.pending.is_empty());
    }

    #[test]
    fn settled_messages_behind_a_stuck_one_are_acked_alone() {
        let t0 = Instant::now();
        let mut t = tracker(1..=4, t0);
        t.settle(2, true);
        t.settle(3, false);
        t.settle(4, true);
        assert_eq!(
            t.take(t0 + Duration::from_millis(5), STUCK),
            Acks::default()
        );
        let acks = t.take(t0 + STUCK, STUCK);
        assert_eq!(
            acks,
            Acks {
                multiple: None,
                single: vec![2, 4]
            }
        );
        assert!(
            !t.holds_settled(),
            "tag 1 is pending, nothing settled waits"
        );
        // Tag 1 is still outstanding and is acked alone (by multiple) later.
        t.settle(1, true);
        t.settle(1, true);
        assert!(t.holds_settled(), "settling a tag twice counts it once");
        assert_eq!(t.take(t0 + STUCK, STUCK).multiple, Some(1));
        assert!(t.pending.is_empty());
        assert!(!t.holds_settled());
    }
}
