//! Durable state behind one trait: channel message logs (`conversation:` and `user:` channels), offsets,
//! dedupe of `(user, client_id)`, per-user offline queues, receipts, conversations and members, device tokens.
//!
//! Implementations are synchronous and owned by one store thread ([`thread`]), which batches every write that
//! queued up while the previous commit ran into one transaction: group commit, one fsync for many sends.
//! The backplane never blocks on it: it sends requests and gets completions back on a channel.
//! Every implementation passes the same contract suite (`tests/support/store_contract.rs`).

pub mod embedded;
pub mod redis;
pub mod scylla;
pub mod thread;

use thiserror::Error;

/// A message to append. The store assigns the offset (the channel's last offset + 1) inside the transaction,
/// so offsets stay dense and increasing in commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    pub channel: String,
    /// The sender (chat messages) or none (receipts and notices on `user:` channels).
    pub from: Option<String>,
    /// With `from`, the dedupe key: a second append with the same `(from, channel, client_id)` stores nothing
    /// and returns the first one's offset.
    pub client_id: Option<String>,
    pub ts: u64,
    /// The message's JSON, as it will be delivered (the store does not look inside).
    pub json: String,
    /// Users whose offline queue gets `(channel, offset)` in the same transaction.
    pub offline: Vec<String>,
    /// Push obligations created by this message (conversation messages only; none for a duplicate): each
    /// member's alert row for the conversation is raised to this message's offset, in the same transaction.
    pub push: Vec<PushFor>,
}

/// One member's push obligation for a new message (see [`PushRow`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushFor {
    pub user: String,
    /// When to push unless a delivery ack comes first: now for an offline member, now + `--push-delay` for
    /// an online one, as the router sees presence. Collapsing keeps the earliest due time of the burst,
    /// except that a row already claimed (attempts > 0) keeps its due time: its push is out or backing off.
    pub due_ms: u64,
    /// The due time for a member who is live on any node. A store that sees cluster-wide presence (Redis)
    /// uses it instead of `due_ms` when the member is live somewhere; others ignore it.
    pub online_due_ms: u64,
    /// The body's text for the notification (only with `--push-include-body`; bounded by the router).
    pub preview: Option<String>,
}

/// What a push row asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PushKind {
    /// A visible alert for unacknowledged messages up to `upto`.
    Alert = 1,
    /// A background push telling the user's devices that the conversation was read up to `upto`.
    Clear = 2,
}

impl PushKind {
    pub fn from_u8(v: u8) -> Option<PushKind> {
        match v {
            1 => Some(PushKind::Alert),
            2 => Some(PushKind::Clear),
            _ => None,
        }
    }
}

/// A durable push obligation: at most one per (kind, user, conversation); a burst of messages raises
/// `upto` and `count` of the one alert row (collapse). Created with the message in one transaction, removed
/// by a delivery receipt that covers `upto` (an ack on any device), by [`Write::PushDone`] or
/// [`Write::PushDrop`]. A read receipt on a conversation that was alerted creates the `Clear` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRow {
    pub kind: PushKind,
    pub user: String,
    pub conversation: String,
    pub upto: u64,
    /// The sender of the latest message (alerts).
    pub from: String,
    /// Messages collapsed into this row since it was created (or last pushed).
    pub count: u32,
    pub due_ms: u64,
    /// Claims so far (for backoff).
    pub attempts: u32,
    pub preview: Option<String>,
}

/// A claimed row with the user's devices (platform, token) at claim time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushJob {
    pub row: PushRow,
    pub devices: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub channel: String,
    pub offset: u64,
    pub from: Option<String>,
    pub ts: u64,
    pub json: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    New {
        offset: u64,
    },
    /// A retry: `offset` and `ts` of the message first stored under this `(user, client_id)`.
    Duplicate {
        offset: u64,
        ts: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReceiptState {
    Delivered = 1,
    Read = 2,
}

/// One write of a group commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Append(NewMessage),
    /// Moves a member's receipt state forward (never backwards; "read" implies "delivered").
    Receipt {
        conversation: String,
        member: String,
        state: ReceiptState,
        offset: u64,
    },
    /// Removes `user`'s offline entries of `channel` up to and including `upto`.
    TrimOffline {
        user: String,
        channel: String,
        upto: u64,
    },
    /// Sets a conversation's members. Members it removes lose their offline entries of the conversation in
    /// the same write: they can no longer ack them.
    PutConversation {
        id: String,
        members: Vec<String>,
    },
    /// Registers a device token for `user`. A token belongs to one user: registering it for another user
    /// moves it (the previous owner loses it).
    PutDevice {
        user: String,
        platform: String,
        token: String,
    },
    /// Forgets one of the user's devices (absent: nothing happens).
    DeleteDevice {
        user: String,
        platform: String,
        token: String,
    },
    /// A push for the row went out up to `upto` with `count` messages: the row is removed, or, when newer
    /// messages raised it meanwhile, left with the rest and due now. An alert marks the conversation alerted
    /// (so that a later read sends the background push); if the member has already read up to `upto` (a
    /// read on another device while the alert was out), the background push is queued at once instead.
    PushDone {
        kind: PushKind,
        user: String,
        conversation: String,
        upto: u64,
        count: u32,
    },
    /// Try the row again at `due_ms` (provider outage, rate limit).
    PushRetry {
        kind: PushKind,
        user: String,
        conversation: String,
        due_ms: u64,
    },
    /// Give up on the row up to `upto` (no devices, permanent provider error).
    PushDrop {
        kind: PushKind,
        user: String,
        conversation: String,
        upto: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteResult {
    Appended(Appended),
    /// Receipt: the previous (delivered, read) offsets of that member, before this write.
    Receipt {
        prev_delivered: u64,
        prev_read: u64,
    },
    Done,
}

/// A member's receipt state in a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipts {
    pub member: String,
    pub delivered: u64,
    pub read: u64,
}

/// Which side failed, so logs, metrics and answers can tell a full disk from corrupt data. Client input never
/// reaches the store unchecked (the router refuses it with its own codes), so a store error is either the
/// backend's (worth retrying: 503) or ours (not: 500). It travels typed in every completion.
#[derive(Clone, Debug, Error)]
pub enum StoreError {
    /// The backend failed the operation (I/O error, full disk, a script error).
    #[error("store backend: {0}")]
    Backend(String),
    /// The backend cannot be reached (connection refused, timed out).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A request the store thread cannot serve as asked (a bug on our side).
    #[error("internal: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying later can succeed (the backend's side), as opposed to our own fault.
    pub fn retryable(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Unavailable(_))
    }

    /// The HTTP status and error code a client is answered with: 503 `store_unavailable` (retry with the same
    /// `client_id`) for the backend's side, 500 `internal` for ours.
    pub fn status(&self) -> (u16, &'static str) {
        if self.retryable() {
            (503, "store_unavailable")
        } else {
            (500, "internal")
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The conversation id of a `conversation:` channel.
pub fn conversation_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("conversation:")
}

/// Whether an offline entry of a channel is still `user`'s to receive, given the members stored for the
/// channel's conversation (`None`: not a conversation, or none stored). A member removed after the entry was
/// queued (by a node that had not yet heard of the removal, or before removals dropped entries) cannot ack it,
/// so it must not be handed out on every connect.
pub fn still_member(members: Option<&[String]>, user: &str) -> bool {
    members.is_none_or(|m| m.iter().any(|u| u == user))
}

/// The durable store. All writes go through [`Store::commit`] so that one call is one transaction.
pub trait Store: Send {
    /// Applies `batch` atomically and durably (per the store's durability policy), in order; returns one
    /// result per write.
    fn commit(&mut self, batch: &[Write]) -> Result<Vec<WriteResult>>;
    /// Up to `limit` messages of `channel` with offset < `before` (all when None), newest first.
    fn history(
        &mut self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
    /// Up to `limit` messages of `channel` with offset > `after`, oldest first.
    fn read_after(&mut self, channel: &str, after: u64, limit: usize)
    -> Result<Vec<StoredMessage>>;
    fn last_offset(&mut self, channel: &str) -> Result<u64>;
    /// Several [`Store::last_offset`]s, one result each, in order. A store that can pipeline them (Redis)
    /// answers them in one round trip: a node that just accepted thousands of connections syncs their channels
    /// without one round trip each.
    fn last_offsets(&mut self, channels: &[&str]) -> Vec<Result<u64>> {
        channels.iter().map(|c| self.last_offset(c)).collect()
    }
    /// Which of these users' offline queues are certainly empty (one answer each, in order): a connect storm
    /// flushes every user's queue, nearly all of them empty, and a store that can tell in one round trip
    /// (Redis: pipelined `EXISTS`) saves a read per user. The default knows nothing (`false`: read it).
    fn offline_empty(&mut self, users: &[&str]) -> Vec<Result<bool>> {
        users.iter().map(|_| Ok(false)).collect()
    }
    /// Several [`Store::read_after`]s (channel, after, limit), one result each, in order; pipelined like
    /// [`Store::last_offsets`].
    fn read_after_many(&mut self, reads: &[(&str, u64, usize)]) -> Vec<Result<Vec<StoredMessage>>> {
        reads
            .iter()
            .map(|(c, after, limit)| self.read_after(c, *after, *limit))
            .collect()
    }
    /// The user's offline queue: up to `limit` messages, ordered by channel then offset. Entries of a
    /// conversation the user is no longer a member of are skipped (see [`still_member`]).
    fn offline(&mut self, user: &str, limit: usize) -> Result<Vec<StoredMessage>> {
        self.offline_after(user, None, limit)
    }
    /// The same, starting strictly after `after` = (channel, offset) in that order: the next page of a flush.
    fn offline_after(
        &mut self,
        user: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
    fn conversations(&mut self) -> Result<Vec<(String, Vec<String>)>>;
    fn receipts(&mut self, conversation: &str) -> Result<Vec<Receipts>>;
    fn devices(&mut self, user: &str) -> Result<Vec<(String, String)>>;
    /// Claims up to `limit` push rows due at `now_ms`: each is returned with the user's devices, its
    /// `attempts` counted, and its due time moved to `now_ms + lease_ms` so that no other node (or this one)
    /// claims it again before the lease runs out. Atomic per row: in a cluster exactly one node gets a row
    /// per lease.
    fn push_claim(&mut self, now_ms: u64, lease_ms: u64, limit: usize) -> Result<Vec<PushJob>>;
    /// Every push row (tests and the admin view; bounded by the number of (user, conversation) pairs).
    fn push_rows(&mut self) -> Result<Vec<PushRow>>;
    /// A short name for logs ("embedded", "scylla").
    fn name(&self) -> &'static str;
    /// When acknowledged writes are not durable yet (interval fsync): the moment by which [`Store::sync`]
    /// must run so that every ack is durable within the configured interval. `None`: nothing is pending.
    fn sync_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// Makes every committed write durable now.
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_error_says_which_side_failed() {
        for e in [
            StoreError::Backend("disk full".into()),
            StoreError::Unavailable("connection refused".into()),
        ] {
            assert!(e.retryable(), "{e}");
            assert_eq!(e.status(), (503, "store_unavailable"));
        }
        for e in [
            StoreError::Corrupt("c1@7".into()),
            StoreError::Internal("a commit is not a read".into()),
        ] {
            assert!(!e.retryable(), "{e}");
            assert_eq!(e.status(), (500, "internal"));
        }
    }

    #[test]
    fn offline_entries_stay_deliverable_only_to_members() {
        let members = ["alice".to_string(), "bob".to_string()];
        assert!(still_member(Some(&members), "bob"));
        assert!(!still_member(Some(&members), "carol"));
        assert!(!still_member(Some(&[]), "bob"));
        assert!(
            still_member(None, "bob"),
            "no stored members: nothing to check"
        );
        assert_eq!(conversation_of("conversation:c1"), Some("c1"));
        assert_eq!(conversation_of("user:bob"), None);
    }
}
