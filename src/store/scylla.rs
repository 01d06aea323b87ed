//! The Scylla store (`--scylla host:9042[,host…]`), on the `scylla` driver.
//!
//! Schema (created at start if missing; the keyspace's replication is configurable):
//! `messages` has `PRIMARY KEY ((conversation_id), "offset")` with `CLUSTERING ORDER BY ("offset" DESC)`, so a
//! conversation is one partition read newest-first for history and by range for resume; `dedupe` entries
//! expire after a TTL; `offline`, `receipts`, `conversations` and `devices` are small tables keyed by user or
//! conversation. Every statement is prepared once. A group commit runs its inserts concurrently (at most
//! [`MAX_IN_FLIGHT`] at once) and retries a timed-out statement with backoff (they are idempotent: same key,
//! same value).
//!
//! Offsets: several gateway nodes may write one conversation (`--redis` cluster mode with `--scylla`), so an
//! append claims its offset with a lightweight transaction: `INSERT … IF NOT EXISTS` at the channel's last
//! offset + 1 (cached per channel after the first look-up). When another writer holds that offset the store
//! re-reads the channel's last offset and tries after it ([`OffsetClaim`]); an insert that got no answer is
//! retried at the same offset and counts as won when the row there turns out to be this very message. So no
//! message overwrites another, offsets stay dense, and one writer's appends keep their order. The message's
//! dedupe record and offline entries then go in a logged batch (all or none; a long offline list in several of
//! [`BATCH_MAX`] statements). A group commit runs the claims one after another (Paxos round trips: the price of
//! several writers), everything else concurrently.
//!
//! Still read-then-write across nodes: dedupe (two nodes taking the same retry at the same instant can both
//! store it: a duplicate, never a loss) and receipts (two nodes moving one member's receipt at once can keep the
//! smaller step).
//!
//! Push obligations ([`super::PushRow`]): `push_rows` holds one row per (user, kind, conversation), partitioned by
//! user; `push_alerted` the conversations a user was alerted for; `device_owner` the user a (platform, token)
//! belongs to, so registering a token for another user moves it. A group commit reads the rows it touches once
//! (concurrently), applies its writes to them in order in memory ([`PushOp`]) and writes each touched row once,
//! with its final value, like the embedded store's transaction would leave it.
//!
//! The claim index is `push_due`, keyed by ((bucket), due, kind, user, conversation) with [`PUSH_BUCKETS`]
//! buckets (a stable hash of user and conversation, [`push_bucket`]), so no single partition takes every
//! row's churn. A claim reads every bucket's entries due by now (one query per bucket, concurrently), and for
//! each candidate re-reads the row and moves its due time with a lightweight transaction,
//! `UPDATE … SET due = now + lease, attempts = attempts + 1 IF due = <read due>`: of several nodes claiming at
//! once exactly one wins a row per lease. An unanswered claim counts as lost (if it was applied, the row
//! waits out its lease: a late push, not a lost one). The index is a hint, never the truth: a new entry is
//! written before the row it points to and the old one deleted after, so a failure leaves a stale entry, never
//! a row that no entry points to; a claim skips entries whose row is gone or due at another time, and deletes
//! those written more than [`PUSH_INDEX_GRACE`] ago (younger ones may belong to a write in flight). Limits:
//! deleted index entries are tombstones that claims scan past until compaction (`push_due` has
//! `gc_grace_seconds = 3600`: a delete lost on a replica and resurrected is harmless, the claim re-checks the
//! row); rows are written with plain writes, so two nodes collapsing messages into one row at the same instant
//! can lose a count increment, and a collapse racing a claim of the same row can undo the lease (the row is
//! pushed twice); both are read-then-write across nodes, like receipts. A claim reads at most `limit` entries
//! per bucket, so young stale entries at the head of a bucket can hold back the rows behind them for up to
//! the grace. Device tokens registered before the owner table existed have no owner and move only once
//! registered again.
//!
//! No Scylla server can run on the development machines: the contract suite runs against a real cluster
//! whenever `SCYLLA_NODES` is set (`tests/store_contract.rs`) and says it was skipped otherwise.
//!
//! Longer than 600 lines: the whole `Store` trait over Scylla: schema, prepared statements, the offset and
//! dedupe plans (lightweight transactions) and their retries, each unit-tested without a server (the last 700
//! lines). A candidate to split into schema / writes / reads once a Scylla server can run its contract here.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::future::join_all;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

use super::{
    Appended, NewMessage, PushJob, PushKind, PushRow, ReceiptState, Receipts, Result, Store,
    StoreError, StoredMessage, Write, WriteResult, conversation_of, still_member,
};

/// Concurrent statements per group commit.
pub const MAX_IN_FLIGHT: usize = 256;
/// Statements per logged batch (a message's dedupe record and offline entries).
pub const BATCH_MAX: usize = 100;
const RETRIES: u32 = 3;
/// Offsets found taken by other writers before one append gives up (the client retries with its client id).
pub const CLAIM_CONFLICTS: u32 = 64;
/// Partitions of the push claim index (`push_due`); a claim reads each of them.
pub const PUSH_BUCKETS: i32 = 16;
/// How old a stale push index entry must be before a claim deletes it (a younger one may be a write's first
/// step, with the row still to come).
pub const PUSH_INDEX_GRACE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ScyllaConfig {
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// The replication map of `CREATE KEYSPACE`, e.g. `{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}`.
    pub replication: String,
    pub dedupe_ttl: Duration,
    pub connect_timeout: Duration,
}

impl ScyllaConfig {
    pub fn new(nodes: Vec<String>, keyspace: String) -> Self {
        ScyllaConfig {
            nodes,
            keyspace,
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".into(),
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The schema: keyspace and tables, each created if missing.
pub fn schema(ks: &str, replication: &str, dedupe_ttl: Duration) -> Vec<String> {
    let ttl = dedupe_ttl.as_secs();
    vec![
        format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.messages (conversation_id text, \"offset\" bigint, sender text, ts bigint, json text, PRIMARY KEY ((conversation_id), \"offset\")) WITH CLUSTERING ORDER BY (\"offset\" DESC)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.dedupe (sender text, conversation_id text, client_id text, \"offset\" bigint, ts bigint, PRIMARY KEY ((sender, conversation_id), client_id)) WITH default_time_to_live = {ttl}"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.offline (user_id text, conversation_id text, \"offset\" bigint, PRIMARY KEY ((user_id), conversation_id, \"offset\"))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.receipts (conversation_id text, member text, delivered bigint, read bigint, PRIMARY KEY ((conversation_id), member))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.conversations (id text PRIMARY KEY, members list<text>)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.devices (user_id text, platform text, token text, PRIMARY KEY ((user_id), platform, token))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.device_owner (platform text, token text, user_id text, PRIMARY KEY ((platform, token)))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.push_rows (user_id text, kind int, conversation_id text, upto bigint, sender text, msg_count int, due bigint, attempts int, preview text, PRIMARY KEY ((user_id), kind, conversation_id))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.push_due (bucket int, due bigint, kind int, user_id text, conversation_id text, written bigint, PRIMARY KEY ((bucket), due, kind, user_id, conversation_id)) WITH gc_grace_seconds = 3600"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ks}.push_alerted (user_id text, conversation_id text, upto bigint, PRIMARY KEY ((user_id), conversation_id))"
        ),
    ]
}

/// The text of every statement the store prepares.
#[derive(Clone, Debug)]
pub struct Cql {
    /// Conditional: the offset claim (see [`OffsetClaim`]).
    pub insert_message: String,
    pub last_offset: String,
    pub history: String,
    pub history_before: String,
    pub read_after: String,
    pub message: String,
    pub get_dedupe: String,
    pub insert_dedupe: String,
    pub insert_offline: String,
    pub offline: String,
    pub trim_offline: String,
    /// A removed member's offline entries of one conversation.
    pub drop_offline: String,
    pub get_receipt: String,
    pub put_receipt: String,
    pub receipts: String,
    pub put_conversation: String,
    pub get_conversation: String,
    pub conversations: String,
    pub put_device: String,
    pub delete_device: String,
    pub devices: String,
    pub get_device_owner: String,
    pub put_device_owner: String,
    pub delete_device_owner: String,
    pub get_push: String,
    pub put_push: String,
    pub delete_push: String,
    /// Conditional: a claim moves the row's due time only if it is still the one read.
    pub claim_push: String,
    pub push_rows: String,
    pub put_push_due: String,
    pub delete_push_due: String,
    /// One bucket's index entries due by a time, earliest first.
    pub push_due: String,
    pub get_alerted: String,
    pub put_alerted: String,
    pub delete_alerted: String,
}

impl Cql {
    pub fn new(ks: &str) -> Cql {
        let cols = "\"offset\", sender, ts, json";
        let push_cols = "upto, sender, msg_count, due, attempts, preview";
        Cql {
            insert_message: format!(
                "INSERT INTO {ks}.messages (conversation_id, \"offset\", sender, ts, json) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
            ),
            last_offset: format!(
                "SELECT \"offset\" FROM {ks}.messages WHERE conversation_id = ? LIMIT 1"
            ),
            history: format!("SELECT {cols} FROM {ks}.messages WHERE conversation_id = ? LIMIT ?"),
            history_before: format!(
                "SELECT {cols} FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" < ? LIMIT ?"
            ),
            read_after: format!(
                "SELECT {cols} FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" > ? ORDER BY \"offset\" ASC LIMIT ?"
            ),
            message: format!(
                "SELECT {cols} FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" = ?"
            ),
            get_dedupe: format!(
                "SELECT \"offset\", ts FROM {ks}.dedupe WHERE sender = ? AND conversation_id = ? AND client_id = ?"
            ),
            insert_dedupe: format!(
                "INSERT INTO {ks}.dedupe (sender, conversation_id, client_id, \"offset\", ts) VALUES (?, ?, ?, ?, ?)"
            ),
            insert_offline: format!(
                "INSERT INTO {ks}.offline (user_id, conversation_id, \"offset\") VALUES (?, ?, ?)"
            ),
            // Paged, and read past entries the user may no longer get (see `still_member`).
            offline: format!(
                "SELECT conversation_id, \"offset\" FROM {ks}.offline WHERE user_id = ?"
            ),
            trim_offline: format!(
                "DELETE FROM {ks}.offline WHERE user_id = ? AND conversation_id = ? AND \"offset\" <= ?"
            ),
            drop_offline: format!(
                "DELETE FROM {ks}.offline WHERE user_id = ? AND conversation_id = ?"
            ),
            get_receipt: format!(
                "SELECT delivered, read FROM {ks}.receipts WHERE conversation_id = ? AND member = ?"
            ),
            put_receipt: format!(
                "INSERT INTO {ks}.receipts (conversation_id, member, delivered, read) VALUES (?, ?, ?, ?)"
            ),
            receipts: format!(
                "SELECT member, delivered, read FROM {ks}.receipts WHERE conversation_id = ?"
            ),
            put_conversation: format!("INSERT INTO {ks}.conversations (id, members) VALUES (?, ?)"),
            get_conversation: format!("SELECT members FROM {ks}.conversations WHERE id = ?"),
            conversations: format!("SELECT id, members FROM {ks}.conversations"),
            put_device: format!(
                "INSERT INTO {ks}.devices (user_id, platform, token) VALUES (?, ?, ?)"
            ),
            delete_device: format!(
                "DELETE FROM {ks}.devices WHERE user_id = ? AND platform = ? AND token = ?"
            ),
            devices: format!("SELECT platform, token FROM {ks}.devices WHERE user_id = ?"),
            get_device_owner: format!(
                "SELECT user_id FROM {ks}.device_owner WHERE platform = ? AND token = ?"
            ),
            put_device_owner: format!(
                "INSERT INTO {ks}.device_owner (platform, token, user_id) VALUES (?, ?, ?)"
            ),
            delete_device_owner: format!(
                "DELETE FROM {ks}.device_owner WHERE platform = ? AND token = ?"
            ),
            get_push: format!(
                "SELECT {push_cols} FROM {ks}.push_rows WHERE user_id = ? AND kind = ? AND conversation_id = ?"
            ),
            put_push: format!(
                "INSERT INTO {ks}.push_rows (user_id, kind, conversation_id, {push_cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            delete_push: format!(
                "DELETE FROM {ks}.push_rows WHERE user_id = ? AND kind = ? AND conversation_id = ?"
            ),
            claim_push: format!(
                "UPDATE {ks}.push_rows SET due = ?, attempts = ? WHERE user_id = ? AND kind = ? AND conversation_id = ? IF due = ?"
            ),
            push_rows: format!(
                "SELECT user_id, kind, conversation_id, {push_cols} FROM {ks}.push_rows"
            ),
            put_push_due: format!(
                "INSERT INTO {ks}.push_due (bucket, due, kind, user_id, conversation_id, written) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            delete_push_due: format!(
                "DELETE FROM {ks}.push_due WHERE bucket = ? AND due = ? AND kind = ? AND user_id = ? AND conversation_id = ?"
            ),
            push_due: format!(
                "SELECT due, kind, user_id, conversation_id, written FROM {ks}.push_due WHERE bucket = ? AND due <= ? LIMIT ?"
            ),
            get_alerted: format!(
                "SELECT upto FROM {ks}.push_alerted WHERE user_id = ? AND conversation_id = ?"
            ),
            put_alerted: format!(
                "INSERT INTO {ks}.push_alerted (user_id, conversation_id, upto) VALUES (?, ?, ?)"
            ),
            delete_alerted: format!(
                "DELETE FROM {ks}.push_alerted WHERE user_id = ? AND conversation_id = ?"
            ),
        }
    }
}

/// A message row as the offset claim compares it: is the row at an offset this append's own?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRow {
    pub sender: Option<String>,
    pub ts: i64,
    pub json: String,
}

impl MessageRow {
    pub fn of(m: &NewMessage) -> MessageRow {
        MessageRow {
            sender: m.from.clone(),
            ts: m.ts as i64,
            json: m.json.clone(),
        }
    }
}

/// What Scylla answered to one conditional insert of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Applied,
    /// Not applied: the row already at that offset.
    Taken(MessageRow),
    /// No answer (timeout, lost connection): applied or not, unknown.
    Failed,
}

impl Reply {
    /// Reads a conditional insert's answer: its `[applied]` column and, when not applied, the row in the way
    /// (columns found by name: Scylla and Cassandra do not return them in the same order).
    pub fn from_columns(names: &[&str], columns: &[Option<CqlValue>]) -> Result<Reply> {
        let col = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .and_then(|i| columns.get(i)?.as_ref())
        };
        let applied = col("[applied]")
            .and_then(CqlValue::as_boolean)
            .ok_or_else(|| StoreError::Corrupt("conditional insert: no [applied] column".into()))?;
        if applied {
            return Ok(Reply::Applied);
        }
        Ok(Reply::Taken(MessageRow {
            sender: col("sender").and_then(CqlValue::as_text).cloned(),
            ts: col("ts").and_then(CqlValue::as_bigint).unwrap_or(0),
            json: col("json")
                .and_then(CqlValue::as_text)
                .cloned()
                .unwrap_or_default(),
        }))
    }
}

/// What the claim wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// The message is stored at this offset.
    Won(u64),
    /// Try the same offset again (after a backoff): the last try got no answer.
    Again,
    /// Another writer holds the offset: re-read the channel's last offset and pass it to
    /// [`OffsetClaim::reread`].
    Reread,
    GiveUp(String),
}

/// One append's offset under concurrent writers, as a state machine the store feeds with Scylla's answers: try
/// the last known offset + 1 with `INSERT … IF NOT EXISTS`; when it is taken, move past it and past the last
/// offset re-read from the table; when a try got no answer, try the same offset again and take a row there that
/// is this very message as won (the unanswered try was applied).
#[derive(Clone, Debug)]
pub struct OffsetClaim {
    offset: u64,
    /// An unanswered try at `offset` may have been applied.
    unsure: bool,
    conflicts: u32,
    /// Unanswered tries in a row.
    failures: u32,
}

impl OffsetClaim {
    pub fn new(last_known: u64) -> OffsetClaim {
        OffsetClaim {
            offset: last_known + 1,
            unsure: false,
            conflicts: 0,
            failures: 0,
        }
    }

    /// The offset to try now.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn reply(&mut self, reply: Reply, ours: &MessageRow) -> Next {
        match reply {
            Reply::Applied => Next::Won(self.offset),
            Reply::Taken(row) if self.unsure && row == *ours => Next::Won(self.offset),
            Reply::Taken(_) => {
                // An answer: failures count again from zero (they are bounded per offset tried).
                self.failures = 0;
                self.conflicts += 1;
                if self.conflicts > CLAIM_CONFLICTS {
                    Next::GiveUp(format!(
                        "offset still taken by other writers after {CLAIM_CONFLICTS} tries"
                    ))
                } else {
                    Next::Reread
                }
            }
            Reply::Failed => {
                self.unsure = true;
                self.failures += 1;
                if self.failures > RETRIES {
                    Next::GiveUp(format!("no answer to {} tries", self.failures))
                } else {
                    Next::Again
                }
            }
        }
    }

    /// After a conflict: `last_now` is the channel's last offset as re-read (possibly not yet showing the row
    /// in the way); the next try is past both.
    pub fn reread(&mut self, last_now: u64) {
        self.offset = self.offset.max(last_now) + 1;
        self.unsure = false;
    }
}

/// The stored part of a push row (the key holds kind, user and conversation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRecord {
    pub upto: u64,
    pub from: String,
    pub count: u32,
    pub due: u64,
    pub attempts: u32,
    pub preview: Option<String>,
}

impl PushRecord {
    pub fn row(&self, kind: PushKind, user: &str, conversation: &str) -> PushRow {
        PushRow {
            kind,
            user: user.to_string(),
            conversation: conversation.to_string(),
            upto: self.upto,
            from: self.from.clone(),
            count: self.count,
            due_ms: self.due,
            attempts: self.attempts,
            preview: self.preview.clone(),
        }
    }
}

/// One change a write makes to a push row, with the embedded store's semantics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOp {
    /// A new message for the member (alert rows): raises `upto`, counts it, keeps the earliest due time
    /// unless the row is claimed (its push is out or backing off: it keeps its due time).
    Collapse {
        upto: u64,
        from: String,
        due: u64,
        preview: Option<String>,
    },
    /// The member's delivered offset is now this (alert rows): a row it covers is fulfilled.
    Delivered(u64),
    /// A read of an alerted conversation up to this offset (clear rows): the row is (re)set, due now.
    Read(u64),
    /// See [`Write::PushDone`].
    Done { upto: u64, count: u32 },
    /// See [`Write::PushRetry`].
    Retry(u64),
    /// See [`Write::PushDrop`].
    Drop(u64),
}

impl PushOp {
    /// The row after this change (`None`: no row).
    pub fn apply(&self, row: Option<PushRecord>) -> Option<PushRecord> {
        match (self, row) {
            (
                PushOp::Collapse {
                    upto,
                    from,
                    due,
                    preview,
                },
                old,
            ) => Some(match old {
                Some(o) => PushRecord {
                    upto: *upto,
                    from: from.clone(),
                    count: o.count.saturating_add(1),
                    due: if o.attempts > 0 {
                        o.due
                    } else {
                        o.due.min(*due)
                    },
                    attempts: o.attempts,
                    preview: preview.clone(),
                },
                None => PushRecord {
                    upto: *upto,
                    from: from.clone(),
                    count: 1,
                    due: *due,
                    attempts: 0,
                    preview: preview.clone(),
                },
            }),
            (PushOp::Delivered(d), Some(o)) if o.upto <= *d => None,
            (PushOp::Read(upto), _) => Some(PushRecord {
                upto: *upto,
                from: String::new(),
                count: 1,
                due: 0,
                attempts: 0,
                preview: None,
            }),
            (PushOp::Done { upto, .. }, Some(o)) if o.upto <= *upto => None,
            // Newer messages arrived while this push was out: they are due now.
            (PushOp::Done { count, .. }, Some(o)) => Some(PushRecord {
                count: o.count.saturating_sub(*count).max(1),
                due: 0,
                attempts: 0,
                ..o
            }),
            (PushOp::Retry(due), Some(o)) => Some(PushRecord { due: *due, ..o }),
            (PushOp::Drop(upto), Some(o)) if o.upto <= *upto => None,
            (_, row) => row,
        }
    }
}

/// The claim index bucket of a (user, conversation): FNV-1a, stable across processes and versions.
pub fn push_bucket(user: &str, conversation: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user
        .bytes()
        .chain(std::iter::once(b'\t'))
        .chain(conversation.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % PUSH_BUCKETS as u64) as i32
}

/// A time or offset as a CQL `bigint` (saturating: a due time past `i64::MAX` is "never" either way).
fn big(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn now_wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a claim does with one index entry, given the row it points to as read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// The row is due at the entry's time: try to lease it.
    Claim(PushRecord),
    /// The entry is stale (the row is gone or due at another time, with its own entry) and old enough to go.
    DeleteStale,
    /// Stale but young (perhaps a write's first step): leave it.
    Skip,
}

impl Candidate {
    /// `entry_due` and `written_ms` are the entry's, `now_ms` the claim's time, `wall_ms` the clock's now.
    pub fn of(
        entry_due: u64,
        written_ms: i64,
        row: Option<PushRecord>,
        now_ms: u64,
        wall_ms: i64,
    ) -> Candidate {
        match row {
            Some(r) if r.due == entry_due && r.due <= now_ms => Candidate::Claim(r),
            Some(r) if r.due == entry_due => Candidate::Skip,
            _ if wall_ms.saturating_sub(written_ms) > PUSH_INDEX_GRACE.as_millis() as i64 => {
                Candidate::DeleteStale
            }
            _ => Candidate::Skip,
        }
    }
}

struct Prepared {
    insert_message: PreparedStatement,
    last_offset: PreparedStatement,
    history: PreparedStatement,
    history_before: PreparedStatement,
    read_after: PreparedStatement,
    message: PreparedStatement,
    get_dedupe: PreparedStatement,
    insert_dedupe: PreparedStatement,
    insert_offline: PreparedStatement,
    offline: PreparedStatement,
    trim_offline: PreparedStatement,
    drop_offline: PreparedStatement,
    get_receipt: PreparedStatement,
    put_receipt: PreparedStatement,
    receipts: PreparedStatement,
    put_conversation: PreparedStatement,
    get_conversation: PreparedStatement,
    conversations: PreparedStatement,
    put_device: PreparedStatement,
    delete_device: PreparedStatement,
    devices: PreparedStatement,
    get_device_owner: PreparedStatement,
    put_device_owner: PreparedStatement,
    delete_device_owner: PreparedStatement,
    get_push: PreparedStatement,
    put_push: PreparedStatement,
    delete_push: PreparedStatement,
    claim_push: PreparedStatement,
    push_rows: PreparedStatement,
    put_push_due: PreparedStatement,
    delete_push_due: PreparedStatement,
    push_due: PreparedStatement,
    get_alerted: PreparedStatement,
    put_alerted: PreparedStatement,
    delete_alerted: PreparedStatement,
}

pub struct Scylla {
    rt: tokio::runtime::Runtime,
    session: Session,
    st: Prepared,
    /// The last offset of each channel this store has written or looked up (other writers may be ahead).
    last: HashMap<String, u64>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Scylla {
    /// Connects, creates the keyspace and tables if missing, and prepares every statement.
    pub fn connect(cfg: &ScyllaConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(backend)?;
        let (session, st) = rt.block_on(async {
            let session = SessionBuilder::new()
                .known_nodes(&cfg.nodes)
                .connection_timeout(cfg.connect_timeout)
                .build()
                .await
                .map_err(unavailable)?;
            for stmt in schema(&cfg.keyspace, &cfg.replication, cfg.dedupe_ttl) {
                session.query_unpaged(stmt, &[]).await.map_err(backend)?;
            }
            let p = |q: String| {
                let session = &session;
                async move { session.prepare(q).await.map_err(backend) }
            };
            let q = Cql::new(&cfg.keyspace);
            let mut offline = p(q.offline).await?;
            offline.set_page_size(1000);
            let mut push_rows = p(q.push_rows).await?;
            push_rows.set_page_size(1000);
            let st = Prepared {
                insert_message: p(q.insert_message).await?,
                last_offset: p(q.last_offset).await?,
                history: p(q.history).await?,
                history_before: p(q.history_before).await?,
                read_after: p(q.read_after).await?,
                message: p(q.message).await?,
                get_dedupe: p(q.get_dedupe).await?,
                insert_dedupe: p(q.insert_dedupe).await?,
                insert_offline: p(q.insert_offline).await?,
                offline,
                trim_offline: p(q.trim_offline).await?,
                drop_offline: p(q.drop_offline).await?,
                get_receipt: p(q.get_receipt).await?,
                put_receipt: p(q.put_receipt).await?,
                receipts: p(q.receipts).await?,
                put_conversation: p(q.put_conversation).await?,
                get_conversation: p(q.get_conversation).await?,
                conversations: p(q.conversations).await?,
                put_device: p(q.put_device).await?,
                delete_device: p(q.delete_device).await?,
                devices: p(q.devices).await?,
                get_device_owner: p(q.get_device_owner).await?,
                put_device_owner: p(q.put_device_owner).await?,
                delete_device_owner: p(q.delete_device_owner).await?,
                get_push: p(q.get_push).await?,
                put_push: p(q.put_push).await?,
                delete_push: p(q.delete_push).await?,
                claim_push: p(q.claim_push).await?,
                push_rows,
                put_push_due: p(q.put_push_due).await?,
                delete_push_due: p(q.delete_push_due).await?,
                push_due: p(q.push_due).await?,
                get_alerted: p(q.get_alerted).await?,
                put_alerted: p(q.put_alerted).await?,
                delete_alerted: p(q.delete_alerted).await?,
            };
            Ok::<_, StoreError>((session, st))
        })?;
        Ok(Scylla {
            rt,
            session,
            st,
            last: HashMap::new(),
        })
    }

    /// The channel's last offset: this store's own if it has one, else read from the table.
    fn last_of(&mut self, channel: &str) -> Result<u64> {
        if let Some(&n) = self.last.get(channel) {
            return Ok(n);
        }
        let n = self
            .rt
            .block_on(read_last(&self.session, &self.st, channel))?;
        self.last.insert(channel.to_string(), n);
        Ok(n)
    }

    /// Stores `m` at the channel's next free offset (see [`OffsetClaim`]) and returns that offset.
    fn claim(&mut self, m: &NewMessage) -> Result<u64> {
        let mut claim = OffsetClaim::new(self.last_of(&m.channel)?);
        let ours = MessageRow::of(m);
        let (session, st) = (&self.session, &self.st);
        let won = self.rt.block_on(async {
            let mut delay = Duration::from_millis(20);
            let mut last_error = String::new();
            loop {
                let values = (
                    &m.channel,
                    claim.offset() as i64,
                    &m.from,
                    m.ts as i64,
                    &m.json,
                );
                let reply = match session.execute_unpaged(&st.insert_message, values).await {
                    Ok(r) => lwt_reply(r)?,
                    Err(e) => {
                        tracing::warn!(error = %e, channel = %m.channel, "scylla offset claim got no answer; retrying");
                        last_error = e.to_string();
                        Reply::Failed
                    }
                };
                match claim.reply(reply, &ours) {
                    Next::Won(offset) => return Ok(offset),
                    Next::Again => {
                        tokio::time::sleep(delay).await;
                        delay *= 4;
                    }
                    Next::Reread => {
                        // An answer: the backoff for unanswered tries starts over.
                        delay = Duration::from_millis(20);
                        claim.reread(read_last(session, st, &m.channel).await?);
                    }
                    Next::GiveUp(why) => {
                        return Err(unavailable(format!(
                            "{}: {why} (last error: {last_error})",
                            m.channel
                        )));
                    }
                }
            }
        });
        match won {
            Ok(offset) => {
                self.last.insert(m.channel.clone(), offset);
                Ok(offset)
            }
            Err(e) => {
                self.last.remove(&m.channel);
                Err(e)
            }
        }
    }

    /// A conversation's members as stored (None: no such conversation).
    fn members(&self, id: &str) -> Result<Option<Vec<String>>> {
        self.rt.block_on(members_of(&self.session, &self.st, id))
    }

    fn rows(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        channel: &str,
    ) -> Result<Vec<StoredMessage>> {
        self.rt.block_on(rows(&self.session, stmt, values, channel))
    }
}

async fn rows(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl scylla::serialize::row::SerializeRow,
    channel: &str,
) -> Result<Vec<StoredMessage>> {
    let r = session
        .execute_unpaged(stmt, values)
        .await
        .map_err(unavailable)?;
    let rows = r.into_rows_result().map_err(backend)?;
    let mut out = Vec::new();
    for row in rows
        .rows::<(i64, Option<String>, i64, String)>()
        .map_err(backend)?
    {
        let (offset, from, ts, json) = row.map_err(backend)?;
        out.push(StoredMessage {
            channel: channel.to_string(),
            offset: offset as u64,
            from,
            ts: ts as u64,
            json,
        });
    }
    Ok(out)
}

/// A conversation's members as stored (None: no such conversation).
async fn members_of(session: &Session, st: &Prepared, id: &str) -> Result<Option<Vec<String>>> {
    let r = session
        .execute_unpaged(&st.get_conversation, (id,))
        .await
        .map_err(unavailable)?;
    let row: Option<(Option<Vec<String>>,)> = r
        .into_rows_result()
        .map_err(backend)?
        .maybe_first_row()
        .map_err(backend)?;
    Ok(row.map(|(m,)| m.unwrap_or_default()))
}

/// The channel's last offset, read from the table.
async fn read_last(session: &Session, st: &Prepared, channel: &str) -> Result<u64> {
    let r = session
        .execute_unpaged(&st.last_offset, (channel,))
        .await
        .map_err(unavailable)?;
    let rows = r.into_rows_result().map_err(backend)?;
    let row: Option<(i64,)> = rows.maybe_first_row().map_err(backend)?;
    Ok(row.map_or(0, |(o,)| o as u64))
}

/// A push row's stored columns, as `get_push` reads them.
type PushColumns = (i64, Option<String>, i32, i64, i32, Option<String>);
/// A whole push row, as `push_rows` reads it.
type PushRowColumns = (
    String,
    i32,
    String,
    i64,
    Option<String>,
    i32,
    i64,
    i32,
    Option<String>,
);

fn record((upto, from, count, due, attempts, preview): PushColumns) -> PushRecord {
    PushRecord {
        upto: upto.max(0) as u64,
        from: from.unwrap_or_default(),
        count: count.max(0) as u32,
        due: due.max(0) as u64,
        attempts: attempts.max(0) as u32,
        preview,
    }
}

/// One push row, or none.
async fn read_push(
    session: &Session,
    st: &Prepared,
    kind: PushKind,
    user: &str,
    conversation: &str,
) -> Result<Option<PushRecord>> {
    let r = session
        .execute_unpaged(&st.get_push, (user, kind as i32, conversation))
        .await
        .map_err(unavailable)?;
    let row: Option<PushColumns> = r
        .into_rows_result()
        .map_err(backend)?
        .maybe_first_row()
        .map_err(backend)?;
    Ok(row.map(record))
}

/// A user's devices (platform, token).
async fn devices_of(session: &Session, st: &Prepared, user: &str) -> Result<Vec<(String, String)>> {
    let r = session
        .execute_unpaged(&st.devices, (user,))
        .await
        .map_err(unavailable)?;
    let rows = r.into_rows_result().map_err(backend)?;
    rows.rows::<(String, String)>()
        .map_err(backend)?
        .map(|r| r.map_err(backend))
        .collect()
}

/// A claim index entry: (due, kind, user, conversation, written at (ms)).
type DueEntry = (u64, PushKind, String, String, i64);

/// One bucket's index entries due by `now_ms`, earliest first.
async fn due_entries(
    session: &Session,
    st: &Prepared,
    bucket: i32,
    now_ms: u64,
    limit: i32,
) -> Result<Vec<DueEntry>> {
    let r = session
        .execute_unpaged(&st.push_due, (bucket, big(now_ms), limit))
        .await
        .map_err(unavailable)?;
    let rows = r.into_rows_result().map_err(backend)?;
    let mut out = Vec::new();
    for row in rows
        .rows::<(i64, i32, String, String, Option<i64>)>()
        .map_err(backend)?
    {
        let (due, kind, user, conversation, written) = row.map_err(backend)?;
        // An unknown kind (a newer version's) is not this node's to claim.
        if let Some(kind) = u8::try_from(kind).ok().and_then(PushKind::from_u8) {
            out.push((
                due.max(0) as u64,
                kind,
                user,
                conversation,
                written.unwrap_or(0),
            ));
        }
    }
    Ok(out)
}

/// Writes a push row's final value and keeps its index entry in step: the new entry before the row, the old
/// one deleted after it (see the module doc).
async fn write_push(
    session: &Session,
    st: &Prepared,
    kind: PushKind,
    user: &str,
    conversation: &str,
    old_due: Option<u64>,
    row: &Option<PushRecord>,
) -> Result<()> {
    let (k, b) = (kind as i32, push_bucket(user, conversation));
    let new_due = row.as_ref().map(|r| r.due);
    if let Some(r) = row {
        if old_due != new_due {
            let entry = (b, big(r.due), k, user, conversation, now_wall_ms());
            run(session, &st.put_push_due, entry).await?;
        }
        let values = (
            user,
            k,
            conversation,
            big(r.upto),
            &r.from,
            r.count.min(i32::MAX as u32) as i32,
            big(r.due),
            r.attempts.min(i32::MAX as u32) as i32,
            &r.preview,
        );
        run(session, &st.put_push, values).await?;
    } else {
        run(session, &st.delete_push, (user, k, conversation)).await?;
    }
    if let Some(d) = old_due
        && old_due != new_due
    {
        run(
            session,
            &st.delete_push_due,
            (b, big(d), k, user, conversation),
        )
        .await?;
    }
    Ok(())
}

/// Tries to lease the row one index entry points to (see [`Candidate`]): the job when this call won it.
async fn claim_one(
    session: &Session,
    st: &Prepared,
    entry: &DueEntry,
    now_ms: u64,
    lease_ms: u64,
    wall_ms: i64,
) -> Result<Option<PushJob>> {
    let (due, kind, user, conversation, written) = entry;
    let (k, b) = (*kind as i32, push_bucket(user, conversation));
    let row = read_push(session, st, *kind, user, conversation).await?;
    let r = match Candidate::of(*due, *written, row, now_ms, wall_ms) {
        Candidate::Skip => return Ok(None),
        Candidate::DeleteStale => {
            run(
                session,
                &st.delete_push_due,
                (b, big(*due), k, user, conversation),
            )
            .await?;
            return Ok(None);
        }
        Candidate::Claim(r) => r,
    };
    let leased = PushRecord {
        due: now_ms.saturating_add(lease_ms),
        attempts: r.attempts.saturating_add(1),
        ..r
    };
    // The new entry first: a failure from here on leaves a stale entry, never a row no entry points to.
    let entry_new = (b, big(leased.due), k, user, conversation, wall_ms);
    run(session, &st.put_push_due, entry_new).await?;
    let values = (
        big(leased.due),
        leased.attempts.min(i32::MAX as u32) as i32,
        user,
        k,
        conversation,
        big(*due),
    );
    let applied = match session.execute_unpaged(&st.claim_push, values).await {
        Ok(res) => lwt_reply(res)? == Reply::Applied,
        Err(e) => {
            // Applied or not, unknown: if it was, the row waits out its lease and is claimed again.
            tracing::warn!(error = %e, user = %user, conversation = %conversation, "scylla push claim got no answer");
            false
        }
    };
    // Not applied: another node leased (or a write moved) the row. The entry written above may be that node's
    // own (same time, same lease): it stays.
    if !applied {
        return Ok(None);
    }
    if big(*due) != big(leased.due)
        && let Err(e) = run(
            session,
            &st.delete_push_due,
            (b, big(*due), k, user, conversation),
        )
        .await
    {
        tracing::warn!(error = %e, "scylla push index entry left stale");
    }
    let devices = devices_of(session, st, user).await?;
    Ok(Some(PushJob {
        row: leased.row(*kind, user, conversation),
        devices,
    }))
}

/// A conditional insert's answer (see [`Reply::from_columns`]).
fn lwt_reply(r: QueryResult) -> Result<Reply> {
    let rows = r.into_rows_result().map_err(backend)?;
    let specs = rows.column_specs();
    let names: Vec<&str> = specs.iter().map(|c| c.name()).collect();
    let row: Row = rows
        .maybe_first_row::<Row>()
        .map_err(backend)?
        .ok_or_else(|| StoreError::Corrupt("conditional insert: no answer row".into()))?;
    Reply::from_columns(&names, &row.columns)
}

/// Runs a statement, retrying timeouts and unavailability with exponential backoff.
async fn run(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl scylla::serialize::row::SerializeRow + Clone,
) -> Result<()> {
    let mut delay = Duration::from_millis(20);
    for attempt in 0..=RETRIES {
        match session.execute_unpaged(stmt, values.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < RETRIES => {
                tracing::warn!(error = %e, attempt, "scylla write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    unreachable!("the loop returns")
}

/// Runs a logged batch, retrying like [`run`] (its statements are idempotent).
async fn run_batch(session: &Session, batch: &Batch, values: &[Vec<CqlValue>]) -> Result<()> {
    let mut delay = Duration::from_millis(20);
    for attempt in 0..=RETRIES {
        match session.batch(batch, values).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < RETRIES => {
                tracing::warn!(error = %e, attempt, "scylla batch failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    unreachable!("the loop returns")
}

/// One write of a group commit once its values are decided, owned so the batch can run concurrently.
#[derive(Debug, PartialEq, Eq)]
enum Insert {
    /// A stored message's dedupe record and offline entries: a logged batch.
    Appended {
        dedupe: Option<(String, String, String, i64, i64)>,
        channel: String,
        offset: i64,
        offline: Vec<String>,
    },
    TrimOffline(String, String, i64),
    DropOffline(String, String),
    Receipt(String, String, i64, i64),
    Conversation(String, Vec<String>),
    Device(String, String, String),
    DeleteDevice(String, String, String),
    /// A push row's final value (`None`: deleted), and the due time of its index entry as read (none: no row
    /// was there).
    Push {
        kind: PushKind,
        user: String,
        conversation: String,
        old_due: Option<u64>,
        row: Option<PushRecord>,
    },
    /// (user, conversation) alerted up to this offset (`None`: not alerted).
    Alerted(String, String, Option<u64>),
    /// (platform, token) belongs to this user (`None`: to nobody).
    Owner(String, String, Option<String>),
}

/// (kind, user, conversation): one push row.
type PushKey = (PushKind, String, String);

impl Scylla {
    /// Decides one write of a group commit (dedupe, offset claim, receipt values, removed members) and queues
    /// what remains to be written.
    fn plan(&mut self, w: &Write, plan: &mut Plan) -> Result<WriteResult> {
        Ok(match w {
            Write::PushDone {
                kind,
                user,
                conversation,
                upto,
                count,
            } => {
                let mut keys = vec![(*kind, user.clone(), conversation.clone())];
                let mut marks = Vec::new();
                let mut read = 0;
                if *kind == PushKind::Alert {
                    keys.push((PushKind::Clear, user.clone(), conversation.clone()));
                    marks.push((user.clone(), conversation.clone()));
                    read = self.receipt_of(plan, conversation, user)?.1;
                }
                self.load(plan, keys, marks, Vec::new())?;
                plan.push_done(*kind, user, conversation, *upto, *count, read);
                WriteResult::Done
            }
            Write::PushRetry {
                kind,
                user,
                conversation,
                due_ms,
            } => {
                self.load(
                    plan,
                    vec![(*kind, user.clone(), conversation.clone())],
                    Vec::new(),
                    Vec::new(),
                )?;
                plan.push_op(*kind, user, conversation, &PushOp::Retry(*due_ms));
                WriteResult::Done
            }
            Write::PushDrop {
                kind,
                user,
                conversation,
                upto,
            } => {
                self.load(
                    plan,
                    vec![(*kind, user.clone(), conversation.clone())],
                    Vec::new(),
                    Vec::new(),
                )?;
                plan.push_op(*kind, user, conversation, &PushOp::Drop(*upto));
                WriteResult::Done
            }
            Write::Append(m) => {
                let key = match (&m.from, &m.client_id) {
                    (Some(f), Some(c)) => Some((f.clone(), m.channel.clone(), c.clone())),
                    _ => None,
                };
                let mut dup = key.as_ref().and_then(|k| plan.seen.get(k).copied());
                if dup.is_none()
                    && let Some((f, ch, c)) = &key
                {
                    let (session, st) = (&self.session, &self.st);
                    dup = self.rt.block_on(async {
                        let r = session
                            .execute_unpaged(&st.get_dedupe, (f, ch, c))
                            .await
                            .map_err(unavailable)?;
                        let row: Option<(i64, i64)> = r
                            .into_rows_result()
                            .map_err(backend)?
                            .maybe_first_row()
                            .map_err(backend)?;
                        Ok::<_, StoreError>(row.map(|(o, t)| (o as u64, t as u64)))
                    })?;
                }
                if let Some((offset, ts)) = dup {
                    return Ok(WriteResult::Appended(Appended::Duplicate { offset, ts }));
                }
                // The push rows are read before the message is stored: a failure here stores nothing, so the
                // client's retry is not taken for a duplicate and gets its rows.
                let conv = conversation_of(&m.channel).filter(|_| !m.push.is_empty());
                if let Some(conv) = conv {
                    let keys = m
                        .push
                        .iter()
                        .map(|p| (PushKind::Alert, p.user.clone(), conv.to_string()))
                        .collect();
                    self.load(plan, keys, Vec::new(), Vec::new())?;
                }
                let offset = self.claim(m)?;
                if let Some(conv) = conv {
                    let from = m.from.clone().unwrap_or_default();
                    for p in &m.push {
                        let op = PushOp::Collapse {
                            upto: offset,
                            from: from.clone(),
                            due: p.due_ms,
                            preview: p.preview.clone(),
                        };
                        plan.push_op(PushKind::Alert, &p.user, conv, &op);
                    }
                }
                if let Some(k) = &key {
                    plan.seen.insert(k.clone(), (offset, m.ts));
                }
                plan.inserts.push(Insert::Appended {
                    dedupe: key.map(|(f, ch, c)| (f, ch, c, offset as i64, m.ts as i64)),
                    channel: m.channel.clone(),
                    offset: offset as i64,
                    offline: m.offline.clone(),
                });
                WriteResult::Appended(Appended::New { offset })
            }
            Write::Receipt {
                conversation,
                member,
                state,
                offset,
            } => {
                let k = (conversation.clone(), member.clone());
                let (d, r) = self.receipt_of(plan, conversation, member)?;
                let nd = d.max(*offset);
                let nr = if *state == ReceiptState::Read {
                    r.max(*offset)
                } else {
                    r
                };
                let mut keys = vec![(PushKind::Alert, member.clone(), conversation.clone())];
                let mut marks = Vec::new();
                if *state == ReceiptState::Read && nr > r {
                    keys.push((PushKind::Clear, member.clone(), conversation.clone()));
                    marks.push((member.clone(), conversation.clone()));
                }
                self.load(plan, keys, marks, Vec::new())?;
                plan.receipt_push(conversation, member, *state, r, nd, nr);
                if (nd, nr) != (d, r) {
                    // Written once, with the batch's last value, by `Plan::flush` (the inserts of a batch run
                    // concurrently: two writes of one row could land in either order).
                    plan.receipts_changed.insert(k.clone());
                }
                plan.receipts.insert(k, (nd, nr));
                WriteResult::Receipt {
                    prev_delivered: d,
                    prev_read: r,
                }
            }
            Write::TrimOffline {
                user,
                channel,
                upto,
            } => {
                plan.inserts.push(Insert::TrimOffline(
                    user.clone(),
                    channel.clone(),
                    *upto as i64,
                ));
                WriteResult::Done
            }
            Write::PutConversation { id, members } => {
                let old = match plan.members.get(id) {
                    Some(m) => m.clone(),
                    None => self.members(id)?.unwrap_or_default(),
                };
                // Removed members lose their offline entries of the conversation.
                let channel = format!("conversation:{id}");
                for m in old.iter().filter(|m| !members.contains(m)) {
                    plan.inserts
                        .push(Insert::DropOffline(m.clone(), channel.clone()));
                }
                plan.members.insert(id.clone(), members.clone());
                plan.inserts
                    .push(Insert::Conversation(id.clone(), members.clone()));
                WriteResult::Done
            }
            Write::PutDevice {
                user,
                platform,
                token,
            } => {
                let owner = vec![(platform.clone(), token.clone())];
                self.load(plan, Vec::new(), Vec::new(), owner)?;
                plan.put_device(user, platform, token);
                WriteResult::Done
            }
            Write::DeleteDevice {
                user,
                platform,
                token,
            } => {
                let owner = vec![(platform.clone(), token.clone())];
                self.load(plan, Vec::new(), Vec::new(), owner)?;
                plan.delete_device(user, platform, token);
                WriteResult::Done
            }
        })
    }

    /// A member's (delivered, read) offsets: as the batch left them, else as stored.
    fn receipt_of(&self, plan: &Plan, conversation: &str, member: &str) -> Result<(u64, u64)> {
        if let Some(v) = plan
            .receipts
            .get(&(conversation.to_string(), member.to_string()))
        {
            return Ok(*v);
        }
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            let res = session
                .execute_unpaged(&st.get_receipt, (conversation, member))
                .await
                .map_err(unavailable)?;
            let row: Option<(i64, i64)> = res
                .into_rows_result()
                .map_err(backend)?
                .maybe_first_row()
                .map_err(backend)?;
            Ok(row.map_or((0, 0), |(d, r)| (d as u64, r as u64)))
        })
    }

    /// Reads into the plan the push rows, alert marks (user, conversation) and token owners (platform, token)
    /// it does not hold yet, concurrently.
    fn load(
        &self,
        plan: &mut Plan,
        push: Vec<PushKey>,
        marks: Vec<(String, String)>,
        owners: Vec<(String, String)>,
    ) -> Result<()> {
        let mut push: Vec<PushKey> = push
            .into_iter()
            .filter(|k| !plan.push.contains_key(k))
            .collect();
        push.sort();
        push.dedup();
        let marks: Vec<(String, String)> = marks
            .into_iter()
            .filter(|k| !plan.alerted.contains_key(k))
            .collect();
        let owners: Vec<(String, String)> = owners
            .into_iter()
            .filter(|k| !plan.owners.contains_key(k))
            .collect();
        if push.is_empty() && marks.is_empty() && owners.is_empty() {
            return Ok(());
        }
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            for chunk in push.chunks(MAX_IN_FLIGHT) {
                let futs = chunk
                    .iter()
                    .map(|(k, u, c)| read_push(session, st, *k, u, c));
                for (key, r) in chunk.iter().zip(join_all(futs).await) {
                    let r = r?;
                    plan.push.insert(key.clone(), (r.clone(), r));
                }
            }
            for (u, c) in marks {
                let r = session
                    .execute_unpaged(&st.get_alerted, (&u, &c))
                    .await
                    .map_err(unavailable)?;
                let row: Option<(i64,)> = r
                    .into_rows_result()
                    .map_err(backend)?
                    .maybe_first_row()
                    .map_err(backend)?;
                let a = row.map(|(a,)| a as u64);
                plan.alerted.insert((u, c), (a, a));
            }
            for (p, t) in owners {
                let r = session
                    .execute_unpaged(&st.get_device_owner, (&p, &t))
                    .await
                    .map_err(unavailable)?;
                let row: Option<(String,)> = r
                    .into_rows_result()
                    .map_err(backend)?
                    .maybe_first_row()
                    .map_err(backend)?;
                let o = row.map(|(o,)| o);
                plan.owners.insert((p, t), (o.clone(), o));
            }
            Ok(())
        })
    }

    /// Writes what [`Scylla::plan`] queued, concurrently.
    fn write(&self, inserts: &[Insert]) -> Result<()> {
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            for chunk in inserts.chunks(MAX_IN_FLIGHT) {
                let futs = chunk.iter().map(|i| async move {
                    match i {
                        Insert::Appended {
                            dedupe,
                            channel,
                            offset,
                            offline,
                        } => {
                            let mut rows: Vec<(&PreparedStatement, Vec<CqlValue>)> = Vec::new();
                            if let Some((f, c, id, o, t)) = dedupe {
                                rows.push((
                                    &st.insert_dedupe,
                                    vec![
                                        CqlValue::Text(f.clone()),
                                        CqlValue::Text(c.clone()),
                                        CqlValue::Text(id.clone()),
                                        CqlValue::BigInt(*o),
                                        CqlValue::BigInt(*t),
                                    ],
                                ));
                            }
                            for u in offline {
                                rows.push((
                                    &st.insert_offline,
                                    vec![
                                        CqlValue::Text(u.clone()),
                                        CqlValue::Text(channel.clone()),
                                        CqlValue::BigInt(*offset),
                                    ],
                                ));
                            }
                            for part in rows.chunks(BATCH_MAX) {
                                let mut batch = Batch::new(BatchType::Logged);
                                let mut values = Vec::with_capacity(part.len());
                                for (stmt, v) in part {
                                    batch.append_statement((*stmt).clone());
                                    values.push(v.clone());
                                }
                                run_batch(session, &batch, &values).await?;
                            }
                            Ok(())
                        }
                        Insert::TrimOffline(u, c, o) => {
                            run(session, &st.trim_offline, (u, c, o)).await
                        }
                        Insert::DropOffline(u, c) => run(session, &st.drop_offline, (u, c)).await,
                        Insert::Receipt(c, m, d, r) => {
                            run(session, &st.put_receipt, (c, m, d, r)).await
                        }
                        Insert::Conversation(id, m) => {
                            run(session, &st.put_conversation, (id, m)).await
                        }
                        Insert::Device(u, p, t) => run(session, &st.put_device, (u, p, t)).await,
                        Insert::DeleteDevice(u, p, t) => {
                            run(session, &st.delete_device, (u, p, t)).await
                        }
                        Insert::Push {
                            kind,
                            user,
                            conversation,
                            old_due,
                            row,
                        } => {
                            write_push(session, st, *kind, user, conversation, *old_due, row).await
                        }
                        Insert::Alerted(u, c, Some(a)) => {
                            run(session, &st.put_alerted, (u, c, big(*a))).await
                        }
                        Insert::Alerted(u, c, None) => {
                            run(session, &st.delete_alerted, (u, c)).await
                        }
                        Insert::Owner(p, t, Some(u)) => {
                            run(session, &st.put_device_owner, (p, t, u)).await
                        }
                        Insert::Owner(p, t, None) => {
                            run(session, &st.delete_device_owner, (p, t)).await
                        }
                    }
                });
                for r in join_all(futs).await {
                    r?;
                }
            }
            Ok::<_, StoreError>(())
        })
    }
}

/// A group commit's decisions so far: later writes of the batch see earlier ones.
#[derive(Default)]
struct Plan {
    inserts: Vec<Insert>,
    seen: HashMap<(String, String, String), (u64, u64)>,
    receipts: HashMap<(String, String), (u64, u64)>,
    /// Receipts the batch moved (their final values are in `receipts`).
    receipts_changed: std::collections::BTreeSet<(String, String)>,
    members: HashMap<String, Vec<String>>,
    /// Push rows the batch reads or writes: (as read, as the batch leaves it). Each is written once, by
    /// [`Plan::flush`].
    push: BTreeMap<PushKey, (Option<PushRecord>, Option<PushRecord>)>,
    /// Alert marks of (user, conversation): (as read, now).
    alerted: BTreeMap<(String, String), (Option<u64>, Option<u64>)>,
    /// Owners of (platform, token): (as read, now).
    owners: BTreeMap<(String, String), (Option<String>, Option<String>)>,
    /// (user, platform, token) registered (true) or forgotten (false) by the batch, last write wins.
    devices: BTreeMap<(String, String, String), bool>,
}

impl Plan {
    /// Applies `op` to a row loaded into the plan.
    fn push_op(&mut self, kind: PushKind, user: &str, conversation: &str, op: &PushOp) {
        let e = self
            .push
            .get_mut(&(kind, user.to_string(), conversation.to_string()))
            .expect("push row loaded before it is changed");
        e.1 = op.apply(e.1.take());
    }

    fn alerted_mut(&mut self, user: &str, conversation: &str) -> &mut Option<u64> {
        &mut self
            .alerted
            .get_mut(&(user.to_string(), conversation.to_string()))
            .expect("alert mark loaded before it is used")
            .1
    }

    /// A receipt's push side effects (rows loaded: the alert row; with a new read, the clear row and the mark).
    fn receipt_push(
        &mut self,
        conversation: &str,
        member: &str,
        state: ReceiptState,
        prev_read: u64,
        delivered: u64,
        read: u64,
    ) {
        // An ack on any device fulfils the alert it covers.
        self.push_op(
            PushKind::Alert,
            member,
            conversation,
            &PushOp::Delivered(delivered),
        );
        // A read of an alerted conversation: tell the other devices to clear it.
        if state == ReceiptState::Read
            && read > prev_read
            && let Some(a) = *self.alerted_mut(member, conversation)
        {
            self.push_op(PushKind::Clear, member, conversation, &PushOp::Read(read));
            if read >= a {
                *self.alerted_mut(member, conversation) = None;
            }
        }
    }

    /// A push went out (rows loaded: the row; for an alert, the clear row and the mark; `read` is the user's
    /// read offset in the conversation).
    fn push_done(
        &mut self,
        kind: PushKind,
        user: &str,
        conversation: &str,
        upto: u64,
        count: u32,
        read: u64,
    ) {
        self.push_op(kind, user, conversation, &PushOp::Done { upto, count });
        if kind == PushKind::Alert {
            if read >= upto {
                // Read on another device while this alert was out: clear it at once.
                self.push_op(PushKind::Clear, user, conversation, &PushOp::Read(read));
            } else {
                let a = self.alerted_mut(user, conversation);
                *a = Some(a.unwrap_or(0).max(upto));
            }
        }
    }

    /// Registers a device (owner loaded): a token another user had moves.
    fn put_device(&mut self, user: &str, platform: &str, token: &str) {
        let owner = &mut self
            .owners
            .get_mut(&(platform.to_string(), token.to_string()))
            .expect("owner loaded before a device is registered")
            .1;
        if let Some(o) = owner.as_deref()
            && o != user
        {
            // The token moved to another user (a shared phone, a new login).
            self.devices.insert(
                (o.to_string(), platform.to_string(), token.to_string()),
                false,
            );
        }
        *owner = Some(user.to_string());
        self.devices.insert(
            (user.to_string(), platform.to_string(), token.to_string()),
            true,
        );
    }

    /// Forgets a device (owner loaded), and the token's owner when it was this user.
    fn delete_device(&mut self, user: &str, platform: &str, token: &str) {
        let owner = &mut self
            .owners
            .get_mut(&(platform.to_string(), token.to_string()))
            .expect("owner loaded before a device is forgotten")
            .1;
        if owner.as_deref() == Some(user) {
            *owner = None;
        }
        self.devices.insert(
            (user.to_string(), platform.to_string(), token.to_string()),
            false,
        );
    }

    /// Queues the final value of every receipt, push row, mark, owner and device the batch changed.
    fn flush(&mut self) {
        for k in std::mem::take(&mut self.receipts_changed) {
            let (d, r) = self.receipts[&k];
            self.inserts.push(Insert::Receipt(k.0, k.1, big(d), big(r)));
        }
        for ((kind, user, conversation), (old, row)) in std::mem::take(&mut self.push) {
            if old != row {
                self.inserts.push(Insert::Push {
                    kind,
                    user,
                    conversation,
                    old_due: old.map(|o| o.due),
                    row,
                });
            }
        }
        for ((user, conversation), (old, now)) in std::mem::take(&mut self.alerted) {
            if old != now {
                self.inserts.push(Insert::Alerted(user, conversation, now));
            }
        }
        for ((platform, token), (old, now)) in std::mem::take(&mut self.owners) {
            if old != now {
                self.inserts.push(Insert::Owner(platform, token, now));
            }
        }
        for ((user, platform, token), present) in std::mem::take(&mut self.devices) {
            self.inserts.push(if present {
                Insert::Device(user, platform, token)
            } else {
                Insert::DeleteDevice(user, platform, token)
            });
        }
    }
}

impl Store for Scylla {
    fn name(&self) -> &'static str {
        "scylla"
    }

    fn commit(&mut self, batch: &[Write]) -> Result<Vec<WriteResult>> {
        // Decide dedupe, offsets (each message is stored as its offset is claimed) and receipt values in order,
        // then write everything else concurrently.
        let mut plan = Plan::default();
        let mut results = Vec::with_capacity(batch.len());
        let mut failed = None;
        for w in batch {
            match self.plan(w, &mut plan) {
                Ok(r) => results.push(r),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Messages already stored get their dedupe records and offline entries even when a later write of the
        // batch failed, so that the client's retry finds them.
        plan.flush();
        let written = self.write(&plan.inserts);
        if written.is_err() || failed.is_some() {
            // Offsets cached in this batch may be ahead of what was written: reload them.
            self.last.clear();
        }
        match (failed, written) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(results),
        }
    }

    fn history(
        &mut self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let limit = limit.min(i32::MAX as usize) as i32;
        match before {
            None => self.rows(&self.st.history, (channel, limit), channel),
            Some(b) => self.rows(&self.st.history_before, (channel, b as i64, limit), channel),
        }
    }

    fn read_after(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let limit = limit.min(i32::MAX as usize) as i32;
        self.rows(&self.st.read_after, (channel, after as i64, limit), channel)
    }

    fn last_offset(&mut self, channel: &str) -> Result<u64> {
        // From the table: other writers may be ahead of this store's cache.
        let n = self
            .rt
            .block_on(read_last(&self.session, &self.st, channel))?;
        self.last.insert(channel.to_string(), n);
        Ok(n)
    }

    fn offline_after(
        &mut self,
        user: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            // Paged: entries of a conversation the user has left since they were queued are skipped, and read
            // past, so they never hold back the entries behind them.
            let stream = session
                .execute_iter(st.offline.clone(), (user,))
                .await
                .map_err(unavailable)?
                .rows_stream::<(String, i64)>()
                .map_err(backend)?;
            let mut stream = std::pin::pin!(stream);
            let mut allowed: HashMap<String, bool> = HashMap::new();
            let mut entries = Vec::new();
            while entries.len() < limit {
                let Some(row) = stream.next().await else {
                    break;
                };
                let (channel, offset) = row.map_err(unavailable)?;
                // Rows come in clustering order (channel, offset): skip up to the page's start.
                if after.is_some_and(|a| (channel.as_str(), offset as u64) <= a) {
                    continue;
                }
                let ok = match allowed.get(&channel) {
                    Some(&ok) => ok,
                    None => {
                        let members = match conversation_of(&channel) {
                            Some(id) => members_of(session, st, id).await?,
                            None => None,
                        };
                        let ok = still_member(members.as_deref(), user);
                        allowed.insert(channel.clone(), ok);
                        ok
                    }
                };
                if ok {
                    entries.push((channel, offset));
                }
            }
            let mut out = Vec::with_capacity(entries.len());
            for chunk in entries.chunks(MAX_IN_FLIGHT) {
                let futs = chunk
                    .iter()
                    .map(|(c, o)| rows(session, &st.message, (c, *o), c));
                for r in join_all(futs).await {
                    out.extend(r?);
                }
            }
            Ok(out)
        })
    }

    fn conversations(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        self.rt.block_on(async {
            let r = self
                .session
                .execute_unpaged(&self.st.conversations, &[])
                .await
                .map_err(unavailable)?;
            let rows = r.into_rows_result().map_err(backend)?;
            rows.rows::<(String, Option<Vec<String>>)>()
                .map_err(backend)?
                .map(|r| {
                    r.map(|(id, m)| (id, m.unwrap_or_default()))
                        .map_err(backend)
                })
                .collect()
        })
    }

    fn receipts(&mut self, conversation: &str) -> Result<Vec<Receipts>> {
        self.rt.block_on(async {
            let r = self
                .session
                .execute_unpaged(&self.st.receipts, (conversation,))
                .await
                .map_err(unavailable)?;
            let rows = r.into_rows_result().map_err(backend)?;
            rows.rows::<(String, i64, i64)>()
                .map_err(backend)?
                .map(|r| {
                    r.map(|(member, d, rd)| Receipts {
                        member,
                        delivered: d as u64,
                        read: rd as u64,
                    })
                    .map_err(backend)
                })
                .collect()
        })
    }

    fn push_claim(&mut self, now_ms: u64, lease_ms: u64, limit: usize) -> Result<Vec<PushJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            let per_bucket = limit.min(i32::MAX as usize) as i32;
            let futs = (0..PUSH_BUCKETS).map(|b| due_entries(session, st, b, now_ms, per_bucket));
            let mut candidates = Vec::new();
            for r in join_all(futs).await {
                candidates.extend(r?);
            }
            candidates.sort();
            let wall = now_wall_ms();
            let (mut jobs, mut first_error) = (Vec::new(), None);
            let mut rest = candidates.as_slice();
            while jobs.len() < limit && !rest.is_empty() {
                let n = (limit - jobs.len()).min(MAX_IN_FLIGHT).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let futs = chunk
                    .iter()
                    .map(|e| claim_one(session, st, e, now_ms, lease_ms, wall));
                for r in join_all(futs).await {
                    match r {
                        Ok(Some(job)) => jobs.push(job),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "scylla push claim of one row failed");
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            // Rows already leased are handed out even when others failed (theirs would wait out the lease).
            match first_error {
                Some(e) if jobs.is_empty() => Err(e),
                _ => Ok(jobs),
            }
        })
    }

    fn push_rows(&mut self) -> Result<Vec<PushRow>> {
        let (session, st) = (&self.session, &self.st);
        self.rt.block_on(async {
            let stream = session
                .execute_iter(st.push_rows.clone(), ())
                .await
                .map_err(unavailable)?
                .rows_stream::<PushRowColumns>()
                .map_err(backend)?;
            let mut stream = std::pin::pin!(stream);
            let mut out = Vec::new();
            while let Some(row) = stream.next().await {
                let (user, kind, conversation, upto, from, count, due, attempts, preview) =
                    row.map_err(unavailable)?;
                let Some(kind) = u8::try_from(kind).ok().and_then(PushKind::from_u8) else {
                    return Err(StoreError::Corrupt(format!("push kind {kind}")));
                };
                let rec = record((upto, from, count, due, attempts, preview));
                out.push(rec.row(kind, &user, &conversation));
            }
            Ok(out)
        })
    }

    fn devices(&mut self, user: &str) -> Result<Vec<(String, String)>> {
        self.rt.block_on(devices_of(&self.session, &self.st, user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn row(n: i64) -> MessageRow {
        MessageRow {
            sender: Some("alice".into()),
            ts: n,
            json: format!("{{\"n\":{n}}}"),
        }
    }

    #[test]
    fn a_free_offset_is_won_at_once() {
        let mut c = OffsetClaim::new(5);
        assert_eq!(c.offset(), 6);
        assert_eq!(c.reply(Reply::Applied, &row(1)), Next::Won(6));
        assert_eq!(OffsetClaim::new(0).offset(), 1, "a new channel starts at 1");
    }

    #[test]
    fn a_taken_offset_moves_past_it_and_past_the_reread_last() {
        let mut c = OffsetClaim::new(5);
        assert_eq!(c.reply(Reply::Taken(row(2)), &row(1)), Next::Reread);
        c.reread(9);
        assert_eq!(c.offset(), 10, "past the last offset read");
        assert_eq!(c.reply(Reply::Taken(row(3)), &row(1)), Next::Reread);
        c.reread(3);
        assert_eq!(
            c.offset(),
            11,
            "a stale read still moves past the taken offset"
        );
        assert_eq!(c.reply(Reply::Applied, &row(1)), Next::Won(11));
    }

    #[test]
    fn an_unanswered_try_that_was_applied_is_recognised() {
        let mut c = OffsetClaim::new(5);
        assert_eq!(c.reply(Reply::Failed, &row(1)), Next::Again);
        assert_eq!(c.offset(), 6, "the same offset again");
        assert_eq!(
            c.reply(Reply::Taken(row(1)), &row(1)),
            Next::Won(6),
            "the row there is this message: the first try was applied"
        );
    }

    #[test]
    fn an_identical_row_is_ours_only_after_an_unanswered_try() {
        // Never failed: an equal row at the offset is another writer's message.
        let mut c = OffsetClaim::new(5);
        assert_eq!(c.reply(Reply::Taken(row(1)), &row(1)), Next::Reread);
        // Failed, then another writer's row: move on; the earlier doubt does not carry to the next offset.
        let mut c = OffsetClaim::new(5);
        assert_eq!(c.reply(Reply::Failed, &row(1)), Next::Again);
        assert_eq!(c.reply(Reply::Taken(row(2)), &row(1)), Next::Reread);
        c.reread(6);
        assert_eq!(c.reply(Reply::Taken(row(1)), &row(1)), Next::Reread);
    }

    #[test]
    fn a_claim_gives_up_after_bounded_tries() {
        let mut c = OffsetClaim::new(0);
        for _ in 0..RETRIES {
            assert_eq!(c.reply(Reply::Failed, &row(1)), Next::Again);
        }
        assert!(matches!(c.reply(Reply::Failed, &row(1)), Next::GiveUp(_)));
        // Failures are counted in a row: an answer in between starts them again.
        let mut c = OffsetClaim::new(0);
        for _ in 0..RETRIES {
            assert_eq!(c.reply(Reply::Failed, &row(1)), Next::Again);
        }
        assert_eq!(c.reply(Reply::Taken(row(2)), &row(1)), Next::Reread);
        c.reread(1);
        assert_eq!(c.reply(Reply::Failed, &row(1)), Next::Again);
        let mut c = OffsetClaim::new(0);
        for i in 0..CLAIM_CONFLICTS {
            assert_eq!(c.reply(Reply::Taken(row(2)), &row(1)), Next::Reread);
            c.reread(i as u64);
        }
        assert!(matches!(
            c.reply(Reply::Taken(row(2)), &row(1)),
            Next::GiveUp(_)
        ));
    }

    /// A model of the `messages` partition: `INSERT … IF NOT EXISTS` and the last-offset read.
    struct Table(BTreeMap<u64, MessageRow>);

    impl Table {
        fn insert_if_not_exists(&mut self, offset: u64, r: &MessageRow) -> Reply {
            match self.0.get(&offset) {
                Some(existing) => Reply::Taken(existing.clone()),
                None => {
                    self.0.insert(offset, r.clone());
                    Reply::Applied
                }
            }
        }
        fn last(&self) -> u64 {
            self.0.keys().next_back().copied().unwrap_or(0)
        }
    }

    /// One writer with its own offset cache, as a `Scylla` store keeps it.
    struct Writer {
        cached: u64,
        claim: Option<(OffsetClaim, MessageRow)>,
        won: Vec<(u64, MessageRow)>,
    }

    #[test]
    fn writers_interleaving_on_one_channel_never_overwrite_and_stay_dense() {
        for (n, seed) in [(2, 1u64), (2, 7), (3, 11), (5, 42), (8, 2024)] {
            let mut t = Table(BTreeMap::new());
            let mut ws: Vec<Writer> = (0..n)
                .map(|_| Writer {
                    cached: 0,
                    claim: None,
                    won: Vec::new(),
                })
                .collect();
            let per = 40;
            let (mut rng, mut w0_tries, mut gave_up) = (seed, 0u32, 0u32);
            // Each step, a writer picked at random takes one action of its claim.
            while ws.iter().any(|w| w.won.len() < per) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % n as u64) as usize;
                let w = &mut ws[i];
                if w.won.len() == per {
                    continue;
                }
                let (mut claim, ours) = w.claim.take().unwrap_or_else(|| {
                    let k = w.won.len() as i64;
                    (OffsetClaim::new(w.cached), row(i as i64 * 1000 + k))
                });
                let mut reply = t.insert_if_not_exists(claim.offset(), &ours);
                // Every fifth try of writer 0 is applied but unanswered (a timeout).
                if i == 0 {
                    w0_tries += 1;
                    if w0_tries % 5 == 0 {
                        reply = Reply::Failed;
                    }
                }
                match claim.reply(reply, &ours) {
                    Next::Won(o) => {
                        w.cached = o;
                        w.won.push((o, ours));
                    }
                    Next::Again => w.claim = Some((claim, ours)),
                    Next::Reread => {
                        claim.reread(t.last());
                        w.claim = Some((claim, ours));
                    }
                    // The commit fails, the store forgets its cached offset, the client sends again.
                    Next::GiveUp(_) => {
                        gave_up += 1;
                        w.cached = t.last();
                    }
                }
            }
            let total = (n * per) as u64;
            assert_eq!(
                t.0.keys().copied().collect::<Vec<_>>(),
                (1..=total).collect::<Vec<_>>(),
                "dense offsets, one message each ({n} writers, seed {seed})"
            );
            for w in &ws {
                for (o, r) in &w.won {
                    assert_eq!(&t.0[o], r, "each writer's message is at the offset it won");
                }
                assert!(
                    w.won.windows(2).all(|p| p[0].0 < p[1].0),
                    "one writer's appends keep their order"
                );
            }
            assert_eq!(gave_up, 0, "{n} writers, seed {seed}");
        }
    }

    #[test]
    fn a_conditional_insert_answer_is_read_by_column_name() {
        assert_eq!(
            Reply::from_columns(&["[applied]"], &[Some(CqlValue::Boolean(true))]).unwrap(),
            Reply::Applied
        );
        // Scylla also returns the (empty) columns when applied.
        assert_eq!(
            Reply::from_columns(
                &["[applied]", "conversation_id", "offset"],
                &[Some(CqlValue::Boolean(true)), None, None]
            )
            .unwrap(),
            Reply::Applied
        );
        let names = [
            "[applied]",
            "conversation_id",
            "offset",
            "json",
            "sender",
            "ts",
        ];
        let taken = Reply::from_columns(
            &names,
            &[
                Some(CqlValue::Boolean(false)),
                Some(CqlValue::Text("conversation:c1".into())),
                Some(CqlValue::BigInt(7)),
                Some(CqlValue::Text("{}".into())),
                None,
                Some(CqlValue::BigInt(42)),
            ],
        )
        .unwrap();
        assert_eq!(
            taken,
            Reply::Taken(MessageRow {
                sender: None,
                ts: 42,
                json: "{}".into()
            })
        );
        assert!(matches!(
            Reply::from_columns(&["offset"], &[Some(CqlValue::BigInt(1))]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn statements_name_the_keyspace_and_the_claim_is_conditional() {
        let q = Cql::new("ks1");
        assert_eq!(
            q.insert_message,
            "INSERT INTO ks1.messages (conversation_id, \"offset\", sender, ts, json) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS"
        );
        assert_eq!(
            q.drop_offline,
            "DELETE FROM ks1.offline WHERE user_id = ? AND conversation_id = ?"
        );
        assert!(!q.offline.contains("LIMIT"), "paged, not cut by a limit");
        let all = [
            &q.insert_message,
            &q.last_offset,
            &q.history,
            &q.history_before,
            &q.read_after,
            &q.message,
            &q.get_dedupe,
            &q.insert_dedupe,
            &q.insert_offline,
            &q.offline,
            &q.trim_offline,
            &q.drop_offline,
            &q.get_receipt,
            &q.put_receipt,
            &q.receipts,
            &q.put_conversation,
            &q.get_conversation,
            &q.conversations,
            &q.put_device,
            &q.delete_device,
            &q.devices,
            &q.get_device_owner,
            &q.put_device_owner,
            &q.delete_device_owner,
            &q.get_push,
            &q.put_push,
            &q.delete_push,
            &q.claim_push,
            &q.push_rows,
            &q.put_push_due,
            &q.delete_push_due,
            &q.push_due,
            &q.get_alerted,
            &q.put_alerted,
            &q.delete_alerted,
        ];
        for stmt in all {
            assert!(stmt.contains(" ks1."), "{stmt}");
            assert_eq!(
                stmt.contains("IF NOT EXISTS"),
                std::ptr::eq(stmt, &q.insert_message),
                "only the offset claim is an insert-if-absent: {stmt}"
            );
            assert_eq!(
                stmt.contains(" IF "),
                std::ptr::eq(stmt, &q.insert_message) || std::ptr::eq(stmt, &q.claim_push),
                "the offset claim and the push claim are the only lightweight transactions: {stmt}"
            );
            // Every `?` of a statement is bound: as many as the values the store passes.
            let binds = stmt.matches('?').count();
            let expected = match stmt {
                s if std::ptr::eq(s, &q.put_push) => 9,
                s if std::ptr::eq(s, &q.claim_push) || std::ptr::eq(s, &q.put_push_due) => 6,
                s if std::ptr::eq(s, &q.delete_push_due) => 5,
                _ => binds,
            };
            assert_eq!(binds, expected, "{stmt}");
        }
        assert_eq!(
            q.claim_push,
            "UPDATE ks1.push_rows SET due = ?, attempts = ? WHERE user_id = ? AND kind = ? AND conversation_id = ? IF due = ?"
        );
        assert_eq!(
            q.push_due,
            "SELECT due, kind, user_id, conversation_id, written FROM ks1.push_due WHERE bucket = ? AND due <= ? LIMIT ?"
        );
        assert!(!q.push_rows.contains("LIMIT"), "paged, not cut by a limit");
        let ddl = schema(
            "ks1",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
            Duration::from_secs(60),
        );
        assert_eq!(
            ddl[0],
            "CREATE KEYSPACE IF NOT EXISTS ks1 WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        assert!(ddl[2].contains("ks1.dedupe") && ddl[2].ends_with("default_time_to_live = 60"));
        assert!(ddl.iter().all(|d| d.contains("IF NOT EXISTS")));
        for table in ["push_rows", "push_due", "push_alerted", "device_owner"] {
            assert!(
                ddl.iter()
                    .any(|d| d.contains(&format!("TABLE IF NOT EXISTS ks1.{table} "))),
                "{table}"
            );
        }
        let due = ddl.iter().find(|d| d.contains("ks1.push_due ")).unwrap();
        assert!(due.contains("PRIMARY KEY ((bucket), due, kind, user_id, conversation_id)"));
    }

    fn rec(upto: u64, count: u32, due: u64, attempts: u32) -> PushRecord {
        PushRecord {
            upto,
            from: "alice".into(),
            count,
            due,
            attempts,
            preview: None,
        }
    }

    fn collapse(upto: u64, due: u64) -> PushOp {
        PushOp::Collapse {
            upto,
            from: "alice".into(),
            due,
            preview: Some(format!("m{upto}")),
        }
    }

    #[test]
    fn push_ops_follow_the_embedded_semantics() {
        // A new row; a burst collapses into it, keeping the earliest due time.
        let r = collapse(1, 1000).apply(None).unwrap();
        assert_eq!((r.upto, r.count, r.due, r.attempts), (1, 1, 1000, 0));
        assert_eq!(r.preview.as_deref(), Some("m1"));
        let r = collapse(2, 2000).apply(Some(r)).unwrap();
        assert_eq!(
            (r.upto, r.count, r.due, r.preview.as_deref()),
            (2, 2, 1000, Some("m2"))
        );
        let r = collapse(3, 10).apply(Some(r)).unwrap();
        assert_eq!(r.due, 10, "an earlier due time wins");
        // A claimed row keeps its lease.
        let claimed = rec(3, 3, 50_000, 1);
        let r = collapse(4, 0).apply(Some(claimed)).unwrap();
        assert_eq!((r.upto, r.count, r.due, r.attempts), (4, 4, 50_000, 1));
        // Delivery: a partial ack keeps the row, a covering one removes it; no row stays none.
        assert_eq!(
            PushOp::Delivered(3).apply(Some(rec(4, 2, 5, 0))),
            Some(rec(4, 2, 5, 0))
        );
        assert_eq!(PushOp::Delivered(4).apply(Some(rec(4, 2, 5, 0))), None);
        assert_eq!(PushOp::Delivered(4).apply(None), None);
        // Done: covered → gone; newer messages meanwhile → the rest, due now, attempts over.
        let done = PushOp::Done { upto: 3, count: 1 };
        assert_eq!(done.apply(Some(rec(3, 1, 9, 1))), None);
        assert_eq!(done.apply(Some(rec(4, 2, 9, 1))), Some(rec(4, 1, 0, 0)));
        assert_eq!(
            PushOp::Done { upto: 3, count: 5 }.apply(Some(rec(4, 2, 9, 1))),
            Some(rec(4, 1, 0, 0)),
            "at least one message left"
        );
        assert_eq!(done.apply(None), None);
        // Retry moves the due time of an existing row only; drop removes a covered row only.
        assert_eq!(
            PushOp::Retry(90).apply(Some(rec(4, 1, 0, 2))),
            Some(rec(4, 1, 90, 2))
        );
        assert_eq!(PushOp::Retry(90).apply(None), None);
        assert_eq!(
            PushOp::Drop(3).apply(Some(rec(4, 1, 0, 2))),
            Some(rec(4, 1, 0, 2))
        );
        assert_eq!(PushOp::Drop(4).apply(Some(rec(4, 1, 0, 2))), None);
        // A read of an alerted conversation (re)sets the clear row, due now.
        let clear = PushOp::Read(7).apply(Some(rec(5, 1, 99, 3))).unwrap();
        assert_eq!(
            clear,
            PushRecord {
                upto: 7,
                from: String::new(),
                count: 1,
                due: 0,
                attempts: 0,
                preview: None
            }
        );
    }

    /// A plan with these rows, marks and owners as read.
    fn loaded(
        push: &[(PushKind, Option<PushRecord>)],
        alerted: Option<u64>,
        owner: Option<&str>,
    ) -> Plan {
        let mut p = Plan::default();
        for (k, r) in push {
            p.push
                .insert((*k, "bob".into(), "c1".into()), (r.clone(), r.clone()));
        }
        p.alerted
            .insert(("bob".into(), "c1".into()), (alerted, alerted));
        p.owners.insert(
            ("fcm".into(), "t1".into()),
            (owner.map(str::to_string), owner.map(str::to_string)),
        );
        p
    }

    #[test]
    fn a_plan_writes_each_touched_row_once_with_its_final_value() {
        let mut p = loaded(&[(PushKind::Alert, None)], None, None);
        p.push_op(PushKind::Alert, "bob", "c1", &collapse(1, 1000));
        p.push_op(PushKind::Alert, "bob", "c1", &collapse(2, 500));
        p.flush();
        let mut want = rec(2, 2, 500, 0);
        want.preview = Some("m2".into());
        assert_eq!(
            p.inserts,
            [Insert::Push {
                kind: PushKind::Alert,
                user: "bob".into(),
                conversation: "c1".into(),
                old_due: None,
                row: Some(want)
            }]
        );
        // Unchanged rows, marks and owners write nothing.
        let mut p = loaded(
            &[(PushKind::Alert, Some(rec(3, 1, 5, 0)))],
            Some(2),
            Some("bob"),
        );
        p.push_op(PushKind::Alert, "bob", "c1", &PushOp::Delivered(2));
        p.flush();
        assert_eq!(p.inserts, []);
        // A removed row names the index entry to delete.
        let mut p = loaded(&[(PushKind::Alert, Some(rec(3, 1, 5, 1)))], None, None);
        p.push_op(PushKind::Alert, "bob", "c1", &PushOp::Drop(3));
        p.flush();
        assert_eq!(
            p.inserts,
            [Insert::Push {
                kind: PushKind::Alert,
                user: "bob".into(),
                conversation: "c1".into(),
                old_due: Some(5),
                row: None
            }]
        );
    }

    #[test]
    fn receipts_fulfil_alerts_and_a_read_of_an_alerted_conversation_clears() {
        let both = [
            (PushKind::Alert, Some(rec(4, 2, 5, 1))),
            (PushKind::Clear, None),
        ];
        // A read up to 4 of a conversation alerted up to 3: the alert is fulfilled, the clear row created,
        // the mark gone.
        let mut p = loaded(&both, Some(3), None);
        p.receipt_push("c1", "bob", ReceiptState::Read, 1, 4, 4);
        p.flush();
        assert_eq!(
            p.inserts,
            [
                Insert::Push {
                    kind: PushKind::Alert,
                    user: "bob".into(),
                    conversation: "c1".into(),
                    old_due: Some(5),
                    row: None
                },
                Insert::Push {
                    kind: PushKind::Clear,
                    user: "bob".into(),
                    conversation: "c1".into(),
                    old_due: None,
                    row: Some(PushOp::Read(4).apply(None).unwrap())
                },
                Insert::Alerted("bob".into(), "c1".into(), None),
            ]
        );
        // Alerted further than the read: the mark stays.
        let mut p = loaded(&both, Some(9), None);
        p.receipt_push("c1", "bob", ReceiptState::Read, 1, 4, 4);
        assert_eq!(p.alerted[&("bob".into(), "c1".into())].1, Some(9));
        assert!(
            p.push[&(PushKind::Clear, "bob".into(), "c1".into())]
                .1
                .is_some()
        );
        // Never alerted, no new read, or only delivered: no clear row.
        for (alerted, state, prev_read, read) in [
            (None, ReceiptState::Read, 1, 4),
            (Some(3), ReceiptState::Read, 4, 4),
            (Some(3), ReceiptState::Delivered, 1, 1),
        ] {
            let mut p = loaded(&both, alerted, None);
            p.receipt_push("c1", "bob", state, prev_read, 4, read);
            assert_eq!(
                p.push[&(PushKind::Clear, "bob".into(), "c1".into())].1,
                None
            );
            assert_eq!(p.alerted[&("bob".into(), "c1".into())].1, alerted);
        }
        // A delivered ack short of the alert keeps it.
        let mut p = loaded(&both, None, None);
        p.receipt_push("c1", "bob", ReceiptState::Delivered, 0, 3, 0);
        p.flush();
        assert_eq!(p.inserts, []);
    }

    #[test]
    fn a_batch_writes_a_receipt_once_with_its_last_value() {
        let mut p = Plan::default();
        let k = ("c1".to_string(), "bob".to_string());
        for v in [(4, 0), (4, 2)] {
            p.receipts.insert(k.clone(), v);
            p.receipts_changed.insert(k.clone());
        }
        p.flush();
        assert_eq!(
            p.inserts,
            [Insert::Receipt("c1".into(), "bob".into(), 4, 2)]
        );
    }

    #[test]
    fn a_done_alert_marks_the_conversation_alerted() {
        let alert_and_clear = |alert| [(PushKind::Alert, alert), (PushKind::Clear, None)];
        let mut p = loaded(&alert_and_clear(Some(rec(2, 2, 9, 1))), Some(5), None);
        p.push_done(PushKind::Alert, "bob", "c1", 2, 2, 0);
        assert_eq!(
            p.alerted[&("bob".into(), "c1".into())].1,
            Some(5),
            "never lowered"
        );
        let mut p = loaded(&alert_and_clear(None), None, None);
        p.push_done(PushKind::Alert, "bob", "c1", 3, 1, 2);
        p.flush();
        assert_eq!(
            p.inserts,
            [Insert::Alerted("bob".into(), "c1".into(), Some(3))],
            "marked even when the row is gone"
        );
        // Read up to it on another device while it was out: the clear row at once, no mark.
        let mut p = loaded(&alert_and_clear(Some(rec(6, 1, 9, 1))), None, None);
        p.push_done(PushKind::Alert, "bob", "c1", 6, 1, 7);
        p.flush();
        assert_eq!(
            p.inserts,
            [
                Insert::Push {
                    kind: PushKind::Alert,
                    user: "bob".into(),
                    conversation: "c1".into(),
                    old_due: Some(9),
                    row: None
                },
                Insert::Push {
                    kind: PushKind::Clear,
                    user: "bob".into(),
                    conversation: "c1".into(),
                    old_due: None,
                    row: Some(PushOp::Read(7).apply(None).unwrap())
                },
            ]
        );
        // A clear push does not mark.
        let mut p = Plan::default();
        p.push.insert(
            (PushKind::Clear, "bob".into(), "c1".into()),
            (Some(rec(4, 1, 9, 1)), Some(rec(4, 1, 9, 1))),
        );
        p.push_done(PushKind::Clear, "bob", "c1", 4, 1, 9);
        p.flush();
        assert!(matches!(p.inserts[..], [Insert::Push { row: None, .. }]));
    }

    #[test]
    fn a_token_belongs_to_one_user() {
        // Registered for bob while carol had it: it moves.
        let mut p = loaded(&[], None, Some("carol"));
        p.put_device("bob", "fcm", "t1");
        p.flush();
        assert_eq!(
            p.inserts,
            [
                Insert::Owner("fcm".into(), "t1".into(), Some("bob".into())),
                Insert::Device("bob".into(), "fcm".into(), "t1".into()),
                Insert::DeleteDevice("carol".into(), "fcm".into(), "t1".into()),
            ]
        );
        // Registered twice for one user: one owner, one device.
        let mut p = loaded(&[], None, Some("bob"));
        p.put_device("bob", "fcm", "t1");
        p.flush();
        assert_eq!(
            p.inserts,
            [Insert::Device("bob".into(), "fcm".into(), "t1".into())]
        );
        // In one batch: bob, then carol, then carol forgets it: nobody has it.
        let mut p = loaded(&[], None, None);
        p.put_device("bob", "fcm", "t1");
        p.put_device("carol", "fcm", "t1");
        p.delete_device("carol", "fcm", "t1");
        p.flush();
        assert_eq!(
            p.inserts,
            [
                Insert::DeleteDevice("bob".into(), "fcm".into(), "t1".into()),
                Insert::DeleteDevice("carol".into(), "fcm".into(), "t1".into()),
            ]
        );
        // Forgetting another user's token leaves its owner alone.
        let mut p = loaded(&[], None, Some("carol"));
        p.delete_device("bob", "fcm", "t1");
        p.flush();
        assert_eq!(
            p.inserts,
            [Insert::DeleteDevice(
                "bob".into(),
                "fcm".into(),
                "t1".into()
            )]
        );
    }

    #[test]
    fn a_claim_leases_due_rows_and_cleans_only_old_stale_entries() {
        let wall = 10_000_000;
        let young = wall - 1000;
        let old = wall - PUSH_INDEX_GRACE.as_millis() as i64 - 1;
        assert_eq!(
            Candidate::of(100, young, Some(rec(1, 1, 100, 0)), 150, wall),
            Candidate::Claim(rec(1, 1, 100, 0))
        );
        // The row is gone, or due at another time (with its own entry): stale.
        assert_eq!(
            Candidate::of(100, old, None, 150, wall),
            Candidate::DeleteStale
        );
        assert_eq!(
            Candidate::of(100, old, Some(rec(1, 1, 900, 1)), 150, wall),
            Candidate::DeleteStale
        );
        // ...but a young entry may be a write's first step: left alone.
        assert_eq!(Candidate::of(100, young, None, 150, wall), Candidate::Skip);
        assert_eq!(
            Candidate::of(0, young, Some(rec(1, 1, 900, 1)), 150, wall),
            Candidate::Skip
        );
        // Not due yet.
        assert_eq!(
            Candidate::of(200, old, Some(rec(1, 1, 200, 0)), 150, wall),
            Candidate::Skip
        );
    }

    #[test]
    fn push_buckets_are_stable_and_spread() {
        let b = push_bucket("bob", "c1");
        assert_eq!(b, push_bucket("bob", "c1"));
        assert!((0..PUSH_BUCKETS).contains(&b));
        // The separator keeps ("ab", "c") and ("a", "bc") apart, and the hash is FNV-1a (not per process).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in b"bob\tc1" {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        assert_eq!(b as u64, h % PUSH_BUCKETS as u64);
        let used: std::collections::BTreeSet<i32> = (0..200)
            .map(|i| push_bucket(&format!("u{i}"), "c1"))
            .collect();
        assert_eq!(used.len(), PUSH_BUCKETS as usize, "every bucket gets rows");
        assert_eq!(big(u64::MAX), i64::MAX);
        assert_eq!(big(7), 7);
    }
}
