//! A consistent-hash ring over node ids.
//!
//! Each node is placed on a 64-bit circle at `vnodes` points, the hashes of `"{node}#{i}"` for `i` in
//! `0..vnodes`. A key belongs to the node owning the first point at or after the key's hash, wrapping past
//! the top of the circle to the first point. Adding a node therefore moves only the keys that now land on its
//! points (about `1/n` of them, all to the new node), and removing one moves only the keys it owned.
//!
//! The hash is fixed and stable across processes, platforms and versions: 64-bit FNV-1a over the UTF-8
//! bytes, followed by murmur3's `fmix64` finalizer so that short, similar strings (`"node#1"`, `"node#2"`)
//! spread over the whole circle. Changing it would move every key: the tests pin a few owners to catch that.
#![forbid(unsafe_code)]

/// A consistent-hash ring. Cheap to query (`O(log(nodes × vnodes))`), rebuilt in part on `add`/`remove`.
#[derive(Debug, Clone)]
pub struct Ring {
    /// `(point, index into nodes)`, sorted by point, ties broken by node id (so the ring does not depend on
    /// the order nodes were added in).
    points: Vec<(u64, u32)>,
    /// Node ids in the order they were first added, without duplicates.
    nodes: Vec<String>,
    vnodes: usize,
}

impl Ring {
    /// Points per node when the caller has no better figure: keeps each node within a few percent of its
    /// fair share for small clusters.
    pub const DEFAULT_VNODES: usize = 160;

    /// A ring over `nodes` (duplicates are ignored) with `vnodes` points per node (at least 1).
    pub fn new(nodes: impl IntoIterator<Item = impl Into<String>>, vnodes: usize) -> Self {
        let mut ring = Ring {
            points: Vec::new(),
            nodes: Vec::new(),
            vnodes: vnodes.max(1),
        };
        for node in nodes {
            let node = node.into();
            if !ring.nodes.contains(&node) {
                ring.nodes.push(node);
            }
        }
        ring.rebuild_points();
        ring
    }

    /// The node that owns `key`, or `None` when the ring has no nodes.
    pub fn node_for(&self, key: &str) -> Option<&str> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let i = self.points.partition_point(|&(p, _)| p < h);
        let (_, node) = self.points[if i == self.points.len() { 0 } else { i }];
        Some(&self.nodes[node as usize])
    }

    /// Node ids, in the order they were added.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Points per node.
    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds `node`; a node already on the ring is left as it is.
    pub fn add(&mut self, node: &str) {
        if self.nodes.iter().any(|n| n == node) {
            return;
        }
        let index = self.nodes.len();
        self.nodes.push(node.to_owned());
        self.push_points(index);
        self.sort_points();
    }

    /// Removes `node`; a node not on the ring is ignored.
    pub fn remove(&mut self, node: &str) {
        let Some(index) = self.nodes.iter().position(|n| n == node) else {
            return;
        };
        self.nodes.remove(index);
        let index = index as u32;
        self.points.retain(|&(_, n)| n != index);
        for (_, n) in &mut self.points {
            if *n > index {
                *n -= 1;
            }
        }
    }

    fn rebuild_points(&mut self) {
        self.points.clear();
        self.points.reserve(self.nodes.len() * self.vnodes);
        for index in 0..self.nodes.len() {
            self.push_points(index);
        }
        self.sort_points();
    }

    /// Appends the points of `nodes[index]`, unsorted.
    fn push_points(&mut self, index: usize) {
        let node = &self.nodes[index];
        let index = u32::try_from(index).expect("more than u32::MAX nodes");
        let mut label = String::with_capacity(node.len() + 8);
        for i in 0..self.vnodes {
            label.clear();
            label.push_str(node);
            label.push('#');
            label.push_str(&i.to_string());
            self.points.push((hash(label.as_bytes()), index));
        }
    }

    fn sort_points(&mut self) {
        let nodes = &self.nodes;
        self.points.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| nodes[a.1 as usize].cmp(&nodes[b.1 as usize]))
        });
    }
}

/// 64-bit FNV-1a, then murmur3's `fmix64`. Stable: part of the ring's contract.
pub fn hash(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEYS: usize = 100_000;

    fn key(i: usize) -> String {
        format!("user:{i}")
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn owners(ring: &Ring) -> Vec<String> {
        (0..KEYS)
            .map(|i| ring.node_for(&key(i)).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn hash_is_pinned() {
        // FNV-1a 64 then fmix64; values computed independently (Python) from the published constants.
        assert_eq!(hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(hash(b"node-0#0"), 0xf489_257a_27d6_2d0a);
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = Ring::new(Vec::<String>::new(), Ring::DEFAULT_VNODES);
        assert!(ring.is_empty());
        assert_eq!(ring.node_for("anyone"), None);
        let mut ring = Ring::new(["a"], 4);
        ring.remove("a");
        assert_eq!(ring.node_for("anyone"), None);
        assert!(ring.points.is_empty());
    }

    #[test]
    fn deterministic_and_pinned() {
        let a = Ring::new(["alpha", "beta", "gamma"], Ring::DEFAULT_VNODES);
        let b = Ring::new(["gamma", "alpha", "beta"], Ring::DEFAULT_VNODES);
        for i in 0..1000 {
            assert_eq!(a.node_for(&key(i)), b.node_for(&key(i)));
        }
        // Pinned owners: a change of hash, label format or tie-break moves keys between processes and
        // versions, which this catches.
        assert_eq!(a.node_for("user:1"), Some("gamma"));
        assert_eq!(a.node_for("user:2"), Some("beta"));
        assert_eq!(a.node_for("user:3"), Some("alpha"));
    }

    #[test]
    fn dedupes_and_keeps_order() {
        let mut ring = Ring::new(["b", "a", "b", "c", "a"], 8);
        assert_eq!(ring.nodes(), ["b", "a", "c"]);
        assert_eq!(ring.points.len(), 3 * 8);
        ring.add("a");
        assert_eq!(ring.nodes(), ["b", "a", "c"]);
        assert_eq!(ring.points.len(), 3 * 8);
        ring.remove("zzz");
        assert_eq!(ring.nodes(), ["b", "a", "c"]);
        ring.remove("b");
        assert_eq!(ring.nodes(), ["a", "c"]);
        assert_eq!(ring.points.len(), 2 * 8);
        assert!(
            ring.points
                .iter()
                .all(|&(_, n)| (n as usize) < ring.nodes().len())
        );
        // Zero vnodes still gives every node a point.
        let ring = Ring::new(["x"], 0);
        assert_eq!(ring.vnodes(), 1);
        assert_eq!(ring.node_for("k"), Some("x"));
    }

    #[test]
    fn wraps_past_the_last_point() {
        let ring = Ring::new(["a", "b"], 3);
        let (last, _) = *ring.points.last().unwrap();
        let (_, first_owner) = ring.points[0];
        // Find a key hashing above the last point: it must go to the owner of the first point.
        let k = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| hash(k.as_bytes()) > last)
            .unwrap();
        assert_eq!(
            ring.node_for(&k),
            Some(ring.nodes()[first_owner as usize].as_str())
        );
    }

    #[test]
    fn add_then_remove_restores_the_ring() {
        let mut ring = Ring::new(names(3), Ring::DEFAULT_VNODES);
        let before = ring.points.clone();
        ring.add("node-9");
        ring.remove("node-9");
        assert_eq!(ring.points, before);
        // Building in one go or by `add` gives the same ring.
        let mut grown = Ring::new(Vec::<String>::new(), Ring::DEFAULT_VNODES);
        for n in names(3) {
            grown.add(&n);
        }
        assert_eq!(grown.points, before);
    }

    #[test]
    fn balanced_within_15_percent() {
        for n in [3, 5, 10] {
            let ring = Ring::new(names(n), Ring::DEFAULT_VNODES);
            let mut counts = vec![0usize; n];
            for i in 0..KEYS {
                let owner = ring.node_for(&key(i)).unwrap();
                counts[ring.nodes().iter().position(|x| x == owner).unwrap()] += 1;
            }
            let fair = KEYS as f64 / n as f64;
            for (node, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - fair).abs() / fair;
                assert!(
                    dev <= 0.15,
                    "{n} nodes: node-{node} has {c} keys, fair share {fair:.0} ({counts:?})"
                );
            }
        }
    }

    #[test]
    fn adding_a_node_moves_a_quarter_all_to_it() {
        let mut ring = Ring::new(names(3), Ring::DEFAULT_VNODES);
        let before = owners(&ring);
        ring.add("node-3");
        let after = owners(&ring);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                moved += 1;
                assert_eq!(
                    a, "node-3",
                    "a key moved from {b} to {a}, not to the new node"
                );
            }
        }
        let share = moved as f64 / KEYS as f64;
        assert!(
            (0.20..=0.30).contains(&share),
            "moved {share:.3} of the keys"
        );
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let mut ring = Ring::new(names(5), Ring::DEFAULT_VNODES);
        let before = owners(&ring);
        ring.remove("node-2");
        let after = owners(&ring);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b == "node-2" {
                moved += 1;
                assert_ne!(a, "node-2");
            } else {
                assert_eq!(a, b, "a key of {b} moved to {a}");
            }
        }
        assert!(moved > 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn removing_one_node_moves_only_its_keys(
            nodes in proptest::collection::vec("[a-z0-9.:-]{1,12}", 1..8),
            victim in any::<prop::sample::Index>(),
            keys in proptest::collection::vec(".{0,16}", 1..200),
            vnodes in 1usize..64,
        ) {
            let mut ring = Ring::new(nodes.iter().cloned(), vnodes);
            let victim = ring.nodes()[victim.index(ring.nodes().len())].clone();
            let before: Vec<String> = keys.iter().map(|k| ring.node_for(k).unwrap().to_owned()).collect();
            ring.remove(&victim);
            prop_assert!(!ring.nodes().contains(&victim));
            for (k, b) in keys.iter().zip(&before) {
                let a = ring.node_for(k);
                if *b == victim {
                    prop_assert_ne!(a, Some(victim.as_str()));
                } else {
                    prop_assert_eq!(a, Some(b.as_str()), "key {:?} moved off {}", k, b);
                }
            }
            // And adding it back restores every owner.
            ring.add(&victim);
            for (k, b) in keys.iter().zip(&before) {
                prop_assert_eq!(ring.node_for(k), Some(b.as_str()));
            }
        }
    }
}
