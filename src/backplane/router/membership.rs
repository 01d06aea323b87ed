//! Membership: who belongs to which conversation, since when (on this node), and the index from a user to its
//! conversations (for the SSE and poll cursors). Also the access rule every read goes through.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{Refusal, Router, refuse};
use corelay_proto::cursor::{self, Kind};

struct Conversation {
    members: BTreeSet<Arc<str>>,
    /// Members added while this node was running → the conversation's last offset (as this node knew it)
    /// when they were added. A poll that meets the conversation for the first time mid-session starts there
    /// (unknown, e.g. after a restart: from the start).
    joined: HashMap<Arc<str>, u64>,
}

#[derive(Default)]
pub(super) struct Membership {
    conversations: HashMap<String, Conversation>,
    /// user → conversations it belongs to (for the SSE cursor).
    of_user: HashMap<Arc<str>, BTreeSet<String>>,
}

/// What a change of a conversation's members did, in the order the bus interest must follow.
pub(super) struct MemberChange {
    pub(super) removed: Vec<Arc<str>>,
    pub(super) added: Vec<Arc<str>>,
}

impl Membership {
    pub(super) fn exists(&self, id: &str) -> bool {
        self.conversations.contains_key(id)
    }

    pub(super) fn members(&self, id: &str) -> Option<&BTreeSet<Arc<str>>> {
        self.conversations.get(id).map(|c| &c.members)
    }

    pub(super) fn is_member(&self, id: &str, user: &str) -> bool {
        self.conversations
            .get(id)
            .is_some_and(|c| c.members.contains(user))
    }

    /// The conversations `user` belongs to (ids).
    pub(super) fn of(&self, user: &str) -> impl Iterator<Item = &String> {
        self.of_user.get(user).into_iter().flatten()
    }

    /// Where `user` joined a conversation channel (0 when unknown), or None for other channels.
    pub(super) fn joined_at(&self, channel: &str, user: &str) -> Option<u64> {
        let c = self
            .conversations
            .get(channel.strip_prefix("conversation:")?)?;
        Some(c.joined.get(user).copied().unwrap_or(0))
    }

    /// A conversation read from the store at start (no join points: its members predate this run).
    pub(super) fn load(&mut self, id: String, members: BTreeSet<Arc<str>>) {
        for m in &members {
            self.of_user
                .entry(m.clone())
                .or_default()
                .insert(id.clone());
        }
        self.conversations.insert(
            id,
            Conversation {
                members,
                joined: HashMap::new(),
            },
        );
    }

    /// Sets a conversation's members (creating it); members added now joined at `at` (its last offset here).
    pub(super) fn set(&mut self, id: &str, members: BTreeSet<Arc<str>>, at: u64) -> MemberChange {
        let c = self
            .conversations
            .entry(id.to_string())
            .or_insert_with(|| Conversation {
                members: BTreeSet::new(),
                joined: HashMap::new(),
            });
        let old = std::mem::replace(&mut c.members, members.clone());
        let removed: Vec<Arc<str>> = old.difference(&members).cloned().collect();
        let added: Vec<Arc<str>> = members.difference(&old).cloned().collect();
        for m in &added {
            c.joined.insert(m.clone(), at);
        }
        for m in &removed {
            c.joined.remove(m);
            if let Some(set) = self.of_user.get_mut(m) {
                set.remove(id);
            }
        }
        for m in &added {
            self.of_user
                .entry(m.clone())
                .or_default()
                .insert(id.to_string());
        }
        MemberChange { removed, added }
    }

    /// May `user` read `channel`?
    pub(super) fn check_access(&self, user: &str, channel: &str) -> Result<Kind, Refusal> {
        let kind = cursor::kind(channel).map_err(|e| refuse("bad_channel", 400, e.0))?;
        match kind {
            Kind::Conversation => {
                let id = &channel["conversation:".len()..];
                if !self.is_member(id, user) {
                    return Err(refuse("not_member", 403, format!("not a member of {id}")));
                }
            }
            Kind::User if &channel["user:".len()..] != user => {
                return Err(refuse(
                    "forbidden",
                    403,
                    format!("{channel} belongs to another user"),
                ));
            }
            _ => {}
        }
        Ok(kind)
    }
}

impl Router {
    /// Sets a conversation's members (locally created, loaded, or announced by another node), keeping its
    /// window, the memberships index and the bus interest of locally connected members in step.
    pub(super) fn set_members(&mut self, id: &str, members: BTreeSet<Arc<str>>) {
        let at = self.channels.add_conversation(id);
        let change = self.members.set(id, members, at);
        let channel = format!("conversation:{id}");
        for m in &change.removed {
            if self.presence.is_online(m) {
                self.interest(&channel, -1);
            }
        }
        for m in &change.added {
            if self.presence.is_online(m) {
                self.interest(&channel, 1);
                // A connected user who just joined a conversation may not have been announced (nodes announce
                // only users in some conversation): announce now, so the other nodes' presence caches know it.
                self.announce_present(m);
            }
        }
    }
}
