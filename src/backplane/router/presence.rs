//! Presence and follows: the live connections of each user on this node (WebSocket and SSE connections register
//! on open) and the connections that follow a channel explicitly (topic subscribers, held long polls).
//!
//! The two sets never overlap: a connection in presence never follows a conversation or user channel
//! explicitly. Each local reason to receive a channel is also bus interest in cluster mode; the `impl Router`
//! below keeps the two in step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use indexmap::IndexSet;

use super::{ConnRef, Router};

#[derive(Default)]
pub(super) struct Presence {
    /// user → its live connections on this node.
    conns: HashMap<Arc<str>, Vec<ConnRef>>,
    /// channel → connections following it explicitly (insertion order; O(1) removal).
    followers: HashMap<Arc<str>, IndexSet<ConnRef>>,
    /// connection → channels it follows explicitly (to clean up), at most `bounds.max_follows` each.
    following: HashMap<ConnRef, HashSet<Arc<str>>>,
}

/// What [`Presence::follow`] did.
#[derive(PartialEq, Eq)]
pub(super) enum Followed {
    Already,
    Now,
    /// The connection follows the most channels it may.
    Full,
}

impl Presence {
    /// Connections of a user on this node.
    pub(super) fn connections(&self, user: &str) -> &[ConnRef] {
        self.conns.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether the user has a live connection on this node.
    pub(super) fn is_online(&self, user: &str) -> bool {
        self.conns.contains_key(user)
    }

    pub(super) fn users(&self) -> impl Iterator<Item = &Arc<str>> {
        self.conns.keys()
    }

    /// Registers a connection; true when it is the user's first on this node.
    pub(super) fn add(&mut self, conn: ConnRef, user: &Arc<str>) -> bool {
        let conns = self.conns.entry(user.clone()).or_default();
        conns.push(conn);
        conns.len() == 1
    }

    /// Forgets a connection; true when it was the user's last on this node.
    pub(super) fn remove(&mut self, conn: ConnRef, user: &str) -> bool {
        let Some(conns) = self.conns.get_mut(user) else {
            return false;
        };
        conns.retain(|c| *c != conn);
        if conns.is_empty() {
            self.conns.remove(user);
            return true;
        }
        false
    }

    pub(super) fn follow(&mut self, conn: ConnRef, channel: Arc<str>, max: usize) -> Followed {
        let set = self.following.entry(conn).or_default();
        if set.contains(&channel) {
            return Followed::Already;
        }
        if set.len() >= max {
            return Followed::Full;
        }
        set.insert(channel.clone());
        self.followers.entry(channel).or_default().insert(conn);
        Followed::Now
    }

    /// Stops following; true when the connection did follow the channel.
    pub(super) fn unfollow(&mut self, conn: ConnRef, channel: &str) -> bool {
        let was = self
            .following
            .get_mut(&conn)
            .is_some_and(|set| set.remove(channel));
        self.drop_follower(channel, conn);
        was
    }

    /// Stops every follow of a connection; returns the channels it followed.
    pub(super) fn unfollow_all(&mut self, conn: ConnRef) -> Vec<Arc<str>> {
        let chans: Vec<Arc<str>> = self
            .following
            .remove(&conn)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for ch in &chans {
            self.drop_follower(ch, conn);
        }
        chans
    }

    fn drop_follower(&mut self, channel: &str, conn: ConnRef) {
        if let Some(f) = self.followers.get_mut(channel) {
            f.swap_remove(&conn);
            if f.is_empty() {
                self.followers.remove(channel);
            }
        }
    }

    pub(super) fn followers_of(&self, channel: &str) -> Vec<ConnRef> {
        self.followers
            .get(channel)
            .map(|f| f.iter().copied().collect())
            .unwrap_or_default()
    }
}

impl Router {
    /// Registers a live connection of `user` (its first one makes the user present in the cluster).
    pub(super) fn add_presence(&mut self, conn: ConnRef, user: &Arc<str>) {
        if self.presence.add(conn, user) {
            self.user_presence(user, true);
        }
    }

    /// Connections of a user on this node.
    pub fn connections(&self, user: &str) -> &[ConnRef] {
        self.presence.connections(user)
    }

    /// Follows a topic; false when the connection already follows `bounds.max_follows` others.
    pub(super) fn follow(&mut self, conn: ConnRef, channel: Arc<str>) -> bool {
        match self
            .presence
            .follow(conn, channel.clone(), self.bounds.max_follows)
        {
            Followed::Already => true,
            Followed::Full => false,
            Followed::Now => {
                self.interest(&channel, 1);
                true
            }
        }
    }

    pub(super) fn unfollow(&mut self, conn: ConnRef, channel: &str) {
        if self.presence.unfollow(conn, channel) {
            self.interest(channel, -1);
        }
    }

    pub(super) fn unfollow_all(&mut self, conn: ConnRef) {
        for ch in self.presence.unfollow_all(conn) {
            self.interest(&ch, -1);
        }
    }
}
