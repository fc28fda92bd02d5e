//! Ordered structures with ranks, for answering "which position is this task in?"
//! without walking the queue.
//!
//! - [`RankedMap`]: an ordered map that also tells how many keys are smaller than a
//!   given one (a treap in an arena, O(log n) expected per operation).
//! - [`PositionIndex`]: the admission order of every queued task, kept up to date as
//!   sessions change, so that a task's position costs O(log² n) instead of a rebuild of
//!   the whole table.
//!
//! Neither `std` nor a well-kept crate offers an order-statistic map, hence the treap.

use std::cmp::Ordering;
use std::num::NonZeroU32;

use crate::queue::Priority;
use crate::task::{Millis, TaskId};

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node<K, V> {
    key: K,
    value: V,
    /// The heap priority (the high half of the generator's output).
    priority: u32,
    left: u32,
    right: u32,
    /// Nodes in this subtree, this one included: never zero, which lets
    /// `Option<Node>` (a slot of the arena) be no larger than a node.
    size: NonZeroU32,
}

/// An ordered map with ranks. Keys are unique.
#[derive(Debug, Clone)]
pub(crate) struct RankedMap<K, V> {
    nodes: Vec<Option<Node<K, V>>>,
    free: Vec<u32>,
    root: u32,
    /// State of the generator of the treap's heap priorities (deterministic).
    seed: u64,
}

impl<K: Ord, V> Default for RankedMap<K, V> {
    fn default() -> RankedMap<K, V> {
        RankedMap {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl<K: Ord, V> RankedMap<K, V> {
    fn node(&self, i: u32) -> &Node<K, V> {
        self.nodes[i as usize].as_ref().expect("live treap node")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node<K, V> {
        self.nodes[i as usize].as_mut().expect("live treap node")
    }

    fn size(&self, i: u32) -> u32 {
        if i == NIL {
            0
        } else {
            self.node(i).size.get()
        }
    }

    fn update(&mut self, i: u32) {
        let n = self.node(i);
        let size = NonZeroU32::MIN.saturating_add(self.size(n.left) + self.size(n.right));
        self.node_mut(i).size = size;
    }

    fn next_priority(&mut self) -> u32 {
        // xorshift64*: any fixed sequence of distinct-looking numbers will do.
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        (self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    pub fn len(&self) -> usize {
        self.size(self.root) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.root == NIL
    }

    /// Splits `t` into keys below `key` (or at most `key` when `inclusive`) and the rest.
    fn split(&mut self, t: u32, key: &K, inclusive: bool) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        let goes_left = match self.node(t).key.cmp(key) {
            Ordering::Less => true,
            Ordering::Equal => inclusive,
            Ordering::Greater => false,
        };
        if goes_left {
            let right = self.node(t).right;
            let (l, r) = self.split(right, key, inclusive);
            self.node_mut(t).right = l;
            self.update(t);
            (t, r)
        } else {
            let left = self.node(t).left;
            let (l, r) = self.split(left, key, inclusive);
            self.node_mut(t).left = r;
            self.update(t);
            (l, t)
        }
    }

    /// Joins two treaps whose keys are all in order (`a` below `b`).
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.node(a).priority > self.node(b).priority {
            let right = self.node(a).right;
            let merged = self.merge(right, b);
            self.node_mut(a).right = merged;
            self.update(a);
            a
        } else {
            let left = self.node(b).left;
            let merged = self.merge(a, left);
            self.node_mut(b).left = merged;
            self.update(b);
            b
        }
    }

    fn find(&self, key: &K) -> u32 {
        let mut t = self.root;
        while t != NIL {
            let n = self.node(t);
            t = match key.cmp(&n.key) {
                Ordering::Less => n.left,
                Ordering::Greater => n.right,
                Ordering::Equal => return t,
            };
        }
        NIL
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        match self.find(key) {
            NIL => None,
            t => Some(&self.node(t).value),
        }
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.find(key) {
            NIL => None,
            t => Some(&mut self.node_mut(t).value),
        }
    }

    /// Inserts `key` (replacing the value of an equal key).
    pub fn insert(&mut self, key: K, value: V) {
        let found = self.find(&key);
        if found != NIL {
            self.node_mut(found).value = value;
            return;
        }
        let root = self.root;
        let (l, r) = self.split(root, &key, false);
        let priority = self.next_priority();
        let node = Node {
            key,
            value,
            priority,
            left: NIL,
            right: NIL,
            size: NonZeroU32::MIN,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                (self.nodes.len() - 1) as u32
            }
        };
        let left = self.merge(l, i);
        self.root = self.merge(left, r);
    }

    /// Removes `key`, returning its value: one descent to its node, whose children
    /// are merged in its place (a find and two splits and a merge before: this runs
    /// several times per admitted task, on trees as large as the queue).
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let root = self.root;
        let (root, taken) = self.take_out(root, key);
        self.root = root;
        let taken = taken?;
        let node = self.nodes[taken as usize].take().expect("live treap node");
        self.free.push(taken);
        if self.root == NIL {
            // Nothing live: give the arena back.
            self.nodes.clear();
            self.free.clear();
        }
        Some(node.value)
    }

    /// Unlinks `key`'s node from the subtree `t`: the subtree's root after that, and
    /// the node unlinked (`None`: `key` is not in it, and nothing changed).
    fn take_out(&mut self, t: u32, key: &K) -> (u32, Option<u32>) {
        if t == NIL {
            return (NIL, None);
        }
        let n = self.node(t);
        let (left, right) = (n.left, n.right);
        match key.cmp(&n.key) {
            Ordering::Equal => (self.merge(left, right), Some(t)),
            Ordering::Less => {
                let (sub, taken) = self.take_out(left, key);
                if taken.is_some() {
                    self.node_mut(t).left = sub;
                    self.update(t);
                }
                (t, taken)
            }
            Ordering::Greater => {
                let (sub, taken) = self.take_out(right, key);
                if taken.is_some() {
                    self.node_mut(t).right = sub;
                    self.update(t);
                }
                (t, taken)
            }
        }
    }

    /// How many keys are below `key`.
    pub fn rank(&self, key: &K) -> usize {
        let mut t = self.root;
        let mut below = 0;
        while t != NIL {
            let n = self.node(t);
            if *key <= n.key {
                t = n.left;
            } else {
                below += self.size(n.left) + 1;
                t = n.right;
            }
        }
        below as usize
    }

    /// The smallest key and its value.
    pub fn first(&self) -> Option<(&K, &V)> {
        let mut t = self.root;
        if t == NIL {
            return None;
        }
        while self.node(t).left != NIL {
            t = self.node(t).left;
        }
        let n = self.node(t);
        Some((&n.key, &n.value))
    }

    /// The largest key and its value.
    #[cfg(test)]
    pub fn last(&self) -> Option<(&K, &V)> {
        let mut t = self.root;
        if t == NIL {
            return None;
        }
        while self.node(t).right != NIL {
            t = self.node(t).right;
        }
        let n = self.node(t);
        Some((&n.key, &n.value))
    }

    /// Every entry in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        let mut iter = Iter {
            map: self,
            stack: Vec::new(),
        };
        iter.push_left(self.root);
        iter
    }
}

#[cfg(test)]
impl<K: Ord + Clone, V> RankedMap<K, V> {
    /// Removes the smallest entry.
    pub fn pop_first(&mut self) -> Option<(K, V)> {
        let key = self.first()?.0.clone();
        let value = self.remove(&key)?;
        Some((key, value))
    }
}

/// In-order iterator of a [`RankedMap`].
pub(crate) struct Iter<'a, K, V> {
    map: &'a RankedMap<K, V>,
    stack: Vec<u32>,
}

impl<K: Ord, V> Iter<'_, K, V> {
    fn push_left(&mut self, mut t: u32) {
        while t != NIL {
            self.stack.push(t);
            t = self.map.node(t).left;
        }
    }
}

impl<'a, K: Ord, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<(&'a K, &'a V)> {
        let t = self.stack.pop()?;
        let map: &'a RankedMap<K, V> = self.map;
        let n = map.node(t);
        self.push_left(n.right);
        Some((&n.key, &n.value))
    }
}

/// Where a session with queued work stands in the admission order of
/// [`crate::Dispatcher::positions`]: ready sessions in ring order (interactive, then
/// background), then sessions waiting for quiet by name, then busy sessions in the
/// order their runs started. A session keeps its key while it stays where it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum OrderKey {
    Ready {
        class: Priority,
        seq: u64,
    },
    Quiet(String),
    Busy {
        started_at: Option<Millis>,
        task: TaskId,
    },
}

/// The admission order of every queued task, kept incrementally.
///
/// Round `r` of the admission order admits the `r`-th queued task of each session
/// (sessions in [`OrderKey`] order), so the task at index `i` of session `S` has
/// position `1 + Σ_T min(len_T, i) + #{T before S : len_T > i}`. The first term comes
/// from Fenwick trees over queue lengths (count and sum of sessions by length); the
/// second from a Fenwick tree over lengths whose nodes are [`RankedMap`]s of the
/// sessions with a length in the node's range. A change of one session (its key or its
/// length) and a position both cost O(log L · log n) for the longest queue L and n
/// sessions.
#[derive(Debug, Clone, Default)]
pub(crate) struct PositionIndex {
    /// Every session with queued work, by key, with its number of queued tasks.
    sessions: RankedMap<OrderKey, u32>,
    /// Fenwick nodes `1..=max_len` (index 0 unused): node `j` holds the sessions whose
    /// length is in `(j - lowbit(j), j]`, with their count and the sum of their lengths.
    by_len: Vec<RankedMap<OrderKey, ()>>,
    n_by_len: Vec<u64>,
    sum_by_len: Vec<u64>,
    n_queued: usize,
}

fn lowbit(j: usize) -> usize {
    j & j.wrapping_neg()
}

impl PositionIndex {
    fn max_len(&self) -> usize {
        self.by_len.len().saturating_sub(1)
    }

    /// Number of queued tasks.
    pub fn n_queued(&self) -> usize {
        self.n_queued
    }

    /// Number of sessions with queued work.
    pub fn n_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The keys of every session with queued work, in admission order.
    pub fn keys_in_order(&self) -> impl Iterator<Item = &OrderKey> {
        self.sessions.iter().map(|(k, _)| k)
    }

    /// The queue length recorded for a session's key.
    pub fn len_of(&self, key: &OrderKey) -> Option<u32> {
        self.sessions.get(key).copied()
    }

    fn fenwick_add(&mut self, key: &OrderKey, len: u32) {
        let mut j = len as usize;
        while j <= self.max_len() {
            self.by_len[j].insert(key.clone(), ());
            self.n_by_len[j] += 1;
            self.sum_by_len[j] += u64::from(len);
            j += lowbit(j);
        }
    }

    fn fenwick_remove(&mut self, key: &OrderKey, len: u32) {
        let mut j = len as usize;
        while j <= self.max_len() {
            self.by_len[j].remove(key);
            self.n_by_len[j] -= 1;
            self.sum_by_len[j] -= u64::from(len);
            j += lowbit(j);
        }
    }

    /// Makes room for queues of `len` tasks (rebuilding the Fenwick trees, which
    /// happens O(log L) times in all).
    fn grow(&mut self, len: usize) {
        let max_len = len.max(2 * self.max_len()).max(16);
        self.by_len = (0..=max_len).map(|_| RankedMap::default()).collect();
        self.n_by_len = vec![0; max_len + 1];
        self.sum_by_len = vec![0; max_len + 1];
        let entries: Vec<(OrderKey, u32)> =
            self.sessions.iter().map(|(k, l)| (k.clone(), *l)).collect();
        for (key, len) in &entries {
            self.fenwick_add(key, *len);
        }
    }

    /// Records a session with `len >= 1` queued tasks under `key`.
    pub fn add(&mut self, key: OrderKey, len: u32) {
        debug_assert!(len >= 1 && self.sessions.get(&key).is_none());
        if len as usize > self.max_len() {
            self.grow(len as usize);
        }
        self.fenwick_add(&key, len);
        self.sessions.insert(key, len);
        self.n_queued += len as usize;
    }

    /// Changes the length recorded for the session under `key` to `len >= 1` (records
    /// it if it is not recorded yet). Cheaper than a [`PositionIndex::remove`] and an
    /// [`PositionIndex::add`]: the Fenwick nodes on the paths of both lengths keep the
    /// key (only their counts change), and the session's entry is updated in place,
    /// so a message into a queue costs a few treap operations, not 2 · log L + 2.
    pub fn set_len(&mut self, key: &OrderKey, len: u32) {
        debug_assert!(len >= 1);
        let Some(&old) = self.sessions.get(key) else {
            self.add(key.clone(), len);
            return;
        };
        if old == len {
            return;
        }
        if len as usize > self.max_len() {
            // Rebuilt with the old length, which the walk below then changes.
            self.grow(len as usize);
        }
        let max = self.max_len();
        let next = |j: usize| {
            let n = j + lowbit(j);
            (n <= max).then_some(n)
        };
        // Both paths ascend; once they meet they are one.
        let (mut a, mut b) = (Some(old as usize), Some(len as usize));
        while a.is_some() || b.is_some() {
            match (a, b) {
                (Some(i), Some(j)) if i == j => {
                    self.sum_by_len[i] = self.sum_by_len[i] - u64::from(old) + u64::from(len);
                    a = next(i);
                    b = next(j);
                }
                (Some(i), j) if j.is_none_or(|j| i < j) => {
                    self.by_len[i].remove(key);
                    self.n_by_len[i] -= 1;
                    self.sum_by_len[i] -= u64::from(old);
                    a = next(i);
                }
                (_, Some(j)) => {
                    self.by_len[j].insert(key.clone(), ());
                    self.n_by_len[j] += 1;
                    self.sum_by_len[j] += u64::from(len);
                    b = next(j);
                }
                _ => unreachable!("the loop ends first"),
            }
        }
        if let Some(recorded) = self.sessions.get_mut(key) {
            *recorded = len;
        }
        self.n_queued = self.n_queued - old as usize + len as usize;
    }

    /// Forgets the session recorded under `key`.
    pub fn remove(&mut self, key: &OrderKey) {
        if let Some(len) = self.sessions.remove(key) {
            self.fenwick_remove(key, len);
            self.n_queued -= len as usize;
        }
    }

    /// Once nothing is queued, gives back what a long queue made the trees grow to.
    /// (Not done in [`PositionIndex::remove`]: a session's move is a remove and an
    /// add, and must not rebuild the trees each time.)
    pub fn shrink_if_empty(&mut self) {
        if self.sessions.is_empty() && self.max_len() > 16 {
            *self = PositionIndex::default();
        }
    }

    /// Position (1 = admitted next) of the task at index `idx` (0-based) of the queue
    /// of the session recorded under `key`.
    pub fn position(&self, key: &OrderKey, idx: usize) -> usize {
        // Sessions whose queue is at most `idx` long: how many, and their tasks.
        let (mut n_short, mut short_tasks, mut short_before) = (0u64, 0u64, 0usize);
        let mut j = idx.min(self.max_len());
        while j > 0 {
            n_short += self.n_by_len[j];
            short_tasks += self.sum_by_len[j];
            short_before += self.by_len[j].rank(key);
            j -= lowbit(j);
        }
        let n_long = self.sessions.len() as u64 - n_short;
        let earlier_rounds = short_tasks + idx as u64 * n_long;
        let long_before = self.sessions.rank(key) - short_before;
        1 + earlier_rounds as usize + long_before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_slot_of_a_session_queue_costs_no_more_than_its_node() {
        // A queued task's entry in its session's queue: key, task id, three links and
        // the priority, with the slot's `None` in the size's niche.
        assert_eq!(std::mem::size_of::<Option<Node<i64, TaskId>>>(), 40);
    }

    #[test]
    fn set_len_agrees_with_remove_and_add() {
        let key = |i: u64| OrderKey::Quiet(format!("s{i:03}"));
        let (mut fast, mut slow) = (PositionIndex::default(), PositionIndex::default());
        let mut lens = BTreeMap::new();
        let mut x: u64 = 99;
        for _ in 0..3_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = key((x >> 33) % 40);
            // Lengths from 1 to 70: past the trees' first size, so they grow too.
            let len = 1 + ((x >> 45) % 70) as u32;
            if (x >> 20).is_multiple_of(5) {
                fast.remove(&k);
                slow.remove(&k);
                lens.remove(&k);
            } else {
                fast.set_len(&k, len);
                slow.remove(&k);
                slow.add(k.clone(), len);
                lens.insert(k, len);
            }
            assert_eq!(fast.n_queued(), slow.n_queued());
            assert_eq!(fast.n_sessions(), slow.n_sessions());
            for (k, len) in &lens {
                assert_eq!(fast.len_of(k), Some(*len));
                for idx in [0, 1, (*len / 2) as usize, *len as usize - 1] {
                    assert_eq!(fast.position(k, idx), slow.position(k, idx), "{k:?} {idx}");
                }
            }
        }
    }

    impl<K: Ord, V> RankedMap<K, V> {
        /// Panics unless every node's size counts its subtree, keys are in order
        /// and no child's priority is above its parent's (the treap's shape).
        fn check_shape(&self) {
            fn walk<K: Ord, V>(m: &RankedMap<K, V>, t: u32) -> u32 {
                if t == NIL {
                    return 0;
                }
                let n = m.node(t);
                for (child, below) in [(n.left, true), (n.right, false)] {
                    if child != NIL {
                        let c = m.node(child);
                        assert!(c.priority <= n.priority, "heap order");
                        assert_eq!(c.key < n.key, below, "key order");
                    }
                }
                let size = 1 + walk(m, n.left) + walk(m, n.right);
                assert_eq!(n.size.get(), size, "subtree size");
                size
            }
            walk(self, self.root);
        }
    }

    #[test]
    fn ranked_map_agrees_with_a_btreemap() {
        let mut ours = RankedMap::default();
        let mut reference = BTreeMap::new();
        let mut x: u64 = 12345;
        for step in 0..20_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 33) % 500;
            if (x >> 20).is_multiple_of(3) {
                assert_eq!(ours.remove(&key), reference.remove(&key));
            } else {
                ours.insert(key, step);
                reference.insert(key, step);
            }
            assert_eq!(ours.len(), reference.len());
            ours.check_shape();
            let probe = (x >> 40) % 520;
            assert_eq!(ours.rank(&probe), reference.range(..probe).count());
            assert_eq!(ours.get(&probe), reference.get(&probe));
            assert_eq!(
                ours.first().map(|(k, v)| (*k, *v)),
                reference.first_key_value().map(|(k, v)| (*k, *v))
            );
            assert_eq!(
                ours.last().map(|(k, v)| (*k, *v)),
                reference.last_key_value().map(|(k, v)| (*k, *v))
            );
        }
        let all: Vec<(u64, u32)> = ours.iter().map(|(k, v)| (*k, *v)).collect();
        let want: Vec<(u64, u32)> = reference.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(all, want);
        while let Some((k, v)) = ours.pop_first() {
            assert_eq!(reference.pop_first(), Some((k, v)));
        }
        assert!(reference.is_empty() && ours.is_empty());
    }
}
