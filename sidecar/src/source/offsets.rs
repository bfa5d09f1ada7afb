//! Which Kafka offsets may be committed: per partition, everything below the
//! lowest offset that is taken and not yet settled.
//!
//! The Kafka form of the batched `multiple` acks of [`super::acks`]: a record
//! settled out of order waits until every record before it on its partition
//! is settled too, and a committed offset never passes an unsettled record.
//! Each assignment of a partition gets a new *generation*, so a record still
//! finishing after its partition was revoked (and perhaps assigned back)
//! cannot move the offsets of the new assignment.

use std::collections::{BTreeMap, HashMap};

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_string(),
            partition,
        }
    }
}

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    /// Taken offsets → settled yet.
    pending: BTreeMap<i64, bool>,
    /// The next offset after the highest taken one.
    next: Option<i64>,
    /// The last offset committed (or handed out to commit).
    committed: Option<i64>,
}

impl Partition {
    /// The offset to commit: the lowest unsettled one, or the next after
    /// everything taken when all is settled.
    fn commit_point(&self) -> Option<i64> {
        self.pending
            .iter()
            .find(|(_, settled)| !**settled)
            .map(|(offset, _)| *offset)
            .or(self.next)
    }
}

/// Offsets taken and settled, per assigned partition.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: HashMap<TopicPartition, Partition>,
    generations: u64,
}

impl Offsets {
    /// Starts tracking an assigned partition; returns its generation.
    pub fn assign(&mut self, tp: TopicPartition) -> u64 {
        self.generations += 1;
        let generation = self.generations;
        self.partitions.insert(
            tp,
            Partition {
                generation,
                ..Partition::default()
            },
        );
        generation
    }

    /// Stops tracking a revoked partition.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// The generation of an assigned partition, if it is assigned.
    pub fn generation(&self, tp: &TopicPartition) -> Option<u64> {
        self.partitions.get(tp).map(|p| p.generation)
    }

    /// Records that `offset` was taken; false when the partition is not assigned.
    pub fn taken(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        p.pending.insert(offset, false);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        true
    }

    /// Records that `offset` is settled, unless its partition was revoked
    /// since it was taken (another `generation`).
    pub fn settled(&mut self, tp: &TopicPartition, generation: u64, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.generation == generation {
                if let Some(settled) = p.pending.get_mut(&offset) {
                    *settled = true;
                }
                // The settled prefix is no longer needed.
                while let Some(entry) = p.pending.first_entry() {
                    if !*entry.get() {
                        break;
                    }
                    entry.remove();
                }
            }
        }
    }

    /// Records taken and not settled on `tps` (all partitions when `None`).
    pub fn unsettled(&self, tps: Option<&[TopicPartition]>) -> usize {
        self.partitions
            .iter()
            .filter(|(tp, _)| tps.is_none_or(|tps| tps.contains(tp)))
            .map(|(_, p)| p.pending.values().filter(|s| !**s).count())
            .sum()
    }

    /// The offsets to commit now on `tps` (all when `None`): each partition's
    /// commit point, when it moved since the last commit. They count as
    /// committed from here on.
    pub fn take_commits(&mut self, tps: Option<&[TopicPartition]>) -> Vec<(TopicPartition, i64)> {
        let mut commits = Vec::new();
        for (tp, p) in &mut self.partitions {
            if tps.is_some_and(|tps| !tps.contains(tp)) {
                continue;
            }
            if let Some(point) = p.commit_point() {
                if p.committed.is_none_or(|c| point > c) {
                    p.committed = Some(point);
                    commits.push((tp.clone(), point));
                }
            }
        }
        commits.sort();
        commits
    }

    /// A commit of `offset` was refused: commit it again with the next batch.
    pub fn commit_failed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.committed == Some(offset) {
                p.committed = None;
            }
        }
    }

    /// The assigned partitions.
    pub fn assigned(&self) -> Vec<TopicPartition> {
        let mut tps: Vec<_> = self.partitions.keys().cloned().collect();
        tps.sort();
        tps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("orders", p)
    }

    #[test]
    fn commits_never_pass_an_unsettled_record() {
        let mut o = Offsets::default();
        let g = o.assign(tp(0));
        for offset in 10..15 {
            assert!(o.taken(&tp(0), offset));
        }
        assert_eq!(o.take_commits(None), [(tp(0), 10)], "nothing settled yet");
        o.settled(&tp(0), g, 11);
        o.settled(&tp(0), g, 12);
        assert_eq!(o.take_commits(None), [], "10 is still unsettled");
        o.settled(&tp(0), g, 10);
        assert_eq!(o.take_commits(None), [(tp(0), 13)]);
        o.settled(&tp(0), g, 14);
        assert_eq!(o.take_commits(None), [], "13 holds the line");
        o.settled(&tp(0), g, 13);
        assert_eq!(o.take_commits(None), [(tp(0), 15)]);
        assert_eq!(o.unsettled(None), 0);
    }

    #[test]
    fn partitions_commit_independently() {
        let mut o = Offsets::default();
        let g0 = o.assign(tp(0));
        let g1 = o.assign(tp(1));
        o.taken(&tp(0), 0);
        o.taken(&tp(1), 0);
        o.taken(&tp(1), 1);
        o.settled(&tp(1), g1, 0);
        o.settled(&tp(1), g1, 1);
        assert_eq!(o.take_commits(None), [(tp(0), 0), (tp(1), 2)]);
        assert_eq!(o.unsettled(Some(&[tp(0)])), 1);
        assert_eq!(o.unsettled(Some(&[tp(1)])), 0);
        o.settled(&tp(0), g0, 0);
        assert_eq!(o.take_commits(Some(&[tp(1)])), [], "only partition 1 asked");
        assert_eq!(o.take_commits(Some(&[tp(0)])), [(tp(0), 1)]);
    }

    #[test]
    fn a_settlement_from_an_earlier_assignment_is_ignored() {
        let mut o = Offsets::default();
        let old = o.assign(tp(0));
        o.taken(&tp(0), 5);
        o.revoke(&tp(0));
        assert!(!o.taken(&tp(0), 6), "revoked: nothing is taken");
        let new = o.assign(tp(0));
        assert_ne!(old, new);
        o.taken(&tp(0), 5);
        o.settled(&tp(0), old, 5);
        assert_eq!(
            o.unsettled(None),
            1,
            "the old holder's settlement is ignored"
        );
        o.settled(&tp(0), new, 5);
        assert_eq!(o.take_commits(None), [(tp(0), 6)]);
    }
}
