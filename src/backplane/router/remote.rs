//! The presence cache (cluster mode): which users of the other nodes have a live connection there, fed by
//! their announcements on the bus, so that a send does not ask Redis about every member who is not connected
//! here (a 1,000-member conversation over three nodes used to cost ~670 presence reads per message).
//!
//! Only positive knowledge is kept, and only of users in some conversation (the only ones a send asks about):
//! a node announces a user when its first connection opens if the user is in a conversation, and when a
//! connected user joins one. A user absent from the cache may still be live (a member added after it connected, an
//! announcement not seen yet): the append script checks it in Redis, as before the cache existed, so a stale
//! *absence* costs one Redis read. A stale *presence* would cost that member its offline-queue entry and its
//! immediate push, so every way one can go stale removes it:
//! - the node announces the user's last close (`down`);
//! - a node restarted with the same id has a new lease token: its old entries go at its first announcement;
//! - a node that dies stops refreshing its lease: the lease check every `presence_ttl / 3` drops its entries,
//!   so they outlive the node by at most `presence_ttl` + a third (the time Redis itself would count them);
//! - our own bus reconnecting (announcements missed) clears the cache and asks every node to announce again.
//!
//! What remains is the race every presence check has: a user who closes on another node while a message is
//! being sent here is treated as present if the `down` has not arrived yet (milliseconds), so that message
//! waits for the user's resume (the SDK's cursor) instead of the offline queue, and its push comes after
//! `--push-delay` instead of at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What this node knows of the other nodes' users.
#[derive(Default)]
pub(super) struct RemotePresence {
    nodes: HashMap<Arc<str>, NodeUsers>,
}

struct NodeUsers {
    /// The instance whose announcements these are.
    token: String,
    users: HashSet<Arc<str>>,
}

/// A parsed announcement (see `bus::announcement`).
#[derive(serde::Deserialize)]
pub(super) struct Announcement {
    #[serde(rename = "n")]
    pub node: String,
    #[serde(rename = "t")]
    pub token: String,
    #[serde(rename = "k")]
    pub kind: String,
    #[serde(rename = "u", default)]
    pub users: Vec<String>,
}

impl RemotePresence {
    /// Whether `user` is known to be live on another node.
    pub(super) fn is_live(&self, user: &str) -> bool {
        self.nodes.values().any(|n| n.users.contains(user))
    }

    /// Applies an announcement (`up`, `down` or `reset`).
    pub(super) fn apply(&mut self, a: &Announcement) {
        let entry = self
            .nodes
            .entry(Arc::from(a.node.as_str()))
            .or_insert_with(|| NodeUsers {
                token: a.token.clone(),
                users: HashSet::new(),
            });
        if entry.token != a.token || a.kind == "reset" {
            // A new instance of the node, or a full announcement: what we knew of it is void.
            entry.token = a.token.clone();
            entry.users.clear();
        }
        match a.kind.as_str() {
            "up" | "reset" => entry
                .users
                .extend(a.users.iter().map(|u| Arc::from(u.as_str()))),
            "down" => {
                for u in &a.users {
                    entry.users.remove(u.as_str());
                }
            }
            _ => {}
        }
        if entry.users.is_empty() {
            self.nodes.remove(a.node.as_str());
        }
    }

    /// Drops what a dead instance announced.
    pub(super) fn forget(&mut self, node: &str, token: &str) {
        if self.nodes.get(node).is_some_and(|n| n.token == token) {
            self.nodes.remove(node);
        }
    }

    pub(super) fn clear(&mut self) {
        self.nodes.clear();
    }

    /// The instances whose users are cached (to check their leases).
    pub(super) fn instances(&self) -> Vec<(String, String)> {
        self.nodes
            .iter()
            .map(|(n, u)| (n.to_string(), u.token.clone()))
            .collect()
    }

    /// Users cached, over all nodes.
    pub(super) fn len(&self) -> usize {
        self.nodes.values().map(|n| n.users.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(node: &str, token: &str, kind: &str, users: &[&str]) -> Announcement {
        Announcement {
            node: node.into(),
            token: token.into(),
            kind: kind.into(),
            users: users.iter().map(|u| u.to_string()).collect(),
        }
    }

    #[test]
    fn up_down_reset_and_a_new_instance() {
        let mut p = RemotePresence::default();
        p.apply(&a("n1", "t1", "up", &["bob", "carol"]));
        p.apply(&a("n2", "t2", "up", &["bob"]));
        assert!(p.is_live("bob") && p.is_live("carol"));
        p.apply(&a("n1", "t1", "down", &["bob"]));
        assert!(p.is_live("bob"), "still live on n2");
        p.apply(&a("n2", "t2", "down", &["bob"]));
        assert!(!p.is_live("bob"));
        // n1 restarted (new token): carol's entry from the dead instance is void.
        p.apply(&a("n1", "t9", "up", &["dave"]));
        assert!(!p.is_live("carol") && p.is_live("dave"));
        // A full announcement replaces.
        p.apply(&a("n1", "t9", "reset", &["erin"]));
        assert!(!p.is_live("dave") && p.is_live("erin"));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_dead_instance_is_forgotten_but_not_its_successor() {
        let mut p = RemotePresence::default();
        p.apply(&a("n1", "t1", "up", &["bob"]));
        p.forget("n1", "t0");
        assert!(
            p.is_live("bob"),
            "another instance's death says nothing of t1"
        );
        assert_eq!(p.instances(), vec![("n1".to_string(), "t1".to_string())]);
        p.forget("n1", "t1");
        assert!(!p.is_live("bob"));
        assert!(p.instances().is_empty());
    }

    #[test]
    fn clear_forgets_everything() {
        let mut p = RemotePresence::default();
        p.apply(&a("n1", "t1", "up", &["bob"]));
        p.clear();
        assert!(!p.is_live("bob") && p.instances().is_empty());
    }
}
