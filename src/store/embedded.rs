//! The embedded store (the default): one `redb` file under `--data-dir`.
//!
//! Longer than 600 lines on purpose: it implements the whole `Store` trait over one set of tables (messages,
//! dedupe, offline queue, receipts, conversations, devices, push rows) that one group commit writes in one
//! transaction; the contract suite in `tests/support/store_contract.rs` tests it as one.
//!
//! Why redb: a pure-Rust, well-kept, ACID B-tree with copy-on-write pages and checksummed commits, so a
//! `kill -9` or power cut leaves the last committed transaction intact; one file; and a per-transaction
//! durability switch, which is exactly the group-commit knob we need (see `docs/ARCHITECTURE.md` for the
//! comparison with fjall and a hand-written log).
//!
//! Durability policies: `Always` fsyncs every group commit before "sent" is answered. `Interval(d)` commits
//! without fsync and makes everything durable with an fsyncing commit at most every `d` (a crash can lose the
//! last `d` of acknowledged messages; documented as such).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    Appended, PushJob, PushKind, PushRow, Receipts, Result, Store, StoreError, StoredMessage,
    Write, WriteResult, conversation_of, still_member,
};

/// (channel, offset) → message record.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// channel → last offset.
const LAST: TableDefinition<&str, u64> = TableDefinition::new("last_offset");
/// (user, channel, client_id) → (offset, ts).
const DEDUPE: TableDefinition<(&str, &str, &str), (u64, u64)> = TableDefinition::new("dedupe");
/// (user, channel, offset) → ().
const OFFLINE: TableDefinition<(&str, &str, u64), ()> = TableDefinition::new("offline");
/// (conversation, member) → (delivered, read).
const RECEIPTS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("receipts");
/// conversation → members (JSON array).
const CONVERSATIONS: TableDefinition<&str, &str> = TableDefinition::new("conversations");
/// (user, platform, token) → ().
const DEVICES: TableDefinition<(&str, &str, &str), ()> = TableDefinition::new("devices");

/// (platform, token) → user: a token belongs to one user.
const TOKENS: TableDefinition<(&str, &str), &str> = TableDefinition::new("device_tokens");
/// (kind, user, conversation) → push row (JSON [`PushRecord`]).
const PUSH: TableDefinition<(u8, &str, &str), &[u8]> = TableDefinition::new("push");
/// (due_ms, kind, user, conversation) → (): the claim index over [`PUSH`].
const PUSH_DUE: TableDefinition<(u64, u8, &str, &str), ()> = TableDefinition::new("push_due");
/// (user, conversation) → highest offset an alert was pushed for (cleared by a read).
const ALERTED: TableDefinition<(&str, &str), u64> = TableDefinition::new("push_alerted");

/// Sorts after every valid id (ids are ASCII), for prefix ranges over tuple keys.
const MAX_STR: &str = "\u{10FFFF}";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// fsync every group commit before acknowledging (the default).
    Always,
    /// fsync at most this often; acknowledged messages of the last interval can be lost in a crash.
    Interval(Duration),
}

#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    ts: u64,
    json: String,
}

/// The stored part of a [`PushRow`] (the key holds kind, user and conversation).
#[derive(Serialize, Deserialize)]
struct PushRecord {
    upto: u64,
    from: String,
    count: u32,
    due: u64,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    preview: Option<String>,
}

type PushTable<'t> = redb::Table<'t, (u8, &'static str, &'static str), &'static [u8]>;
type DueTable<'t> = redb::Table<'t, (u64, u8, &'static str, &'static str), ()>;

fn push_get(t: &PushTable, kind: PushKind, user: &str, conv: &str) -> Result<Option<PushRecord>> {
    match t.get((kind as u8, user, conv)).map_err(backend)? {
        Some(v) => serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("push row {user}/{conv}: {e}"))),
        None => Ok(None),
    }
}

/// Writes (or replaces) a row and keeps the due index in step.
fn push_put(
    t: &mut PushTable,
    due: &mut DueTable,
    kind: PushKind,
    user: &str,
    conv: &str,
    old_due: Option<u64>,
    rec: &PushRecord,
) -> Result<()> {
    if let Some(d) = old_due {
        due.remove((d, kind as u8, user, conv)).map_err(backend)?;
    }
    let v = serde_json::to_vec(rec).map_err(backend)?;
    t.insert((kind as u8, user, conv), v.as_slice())
        .map_err(backend)?;
    due.insert((rec.due, kind as u8, user, conv), ())
        .map_err(backend)?;
    Ok(())
}

/// Queues (or raises) the background push that tells `user`'s devices `conv` was read up to `upto`.
fn queue_clear(
    t: &mut PushTable,
    due: &mut DueTable,
    user: &str,
    conv: &str,
    upto: u64,
) -> Result<()> {
    let old = push_get(t, PushKind::Clear, user, conv)?;
    let rec = PushRecord {
        upto,
        from: String::new(),
        count: 1,
        due: 0,
        attempts: 0,
        preview: None,
    };
    push_put(
        t,
        due,
        PushKind::Clear,
        user,
        conv,
        old.map(|o| o.due),
        &rec,
    )
}

fn push_remove(
    t: &mut PushTable,
    due: &mut DueTable,
    kind: PushKind,
    user: &str,
    conv: &str,
    rec: &PushRecord,
) -> Result<()> {
    due.remove((rec.due, kind as u8, user, conv))
        .map_err(backend)?;
    t.remove((kind as u8, user, conv)).map_err(backend)?;
    Ok(())
}

pub struct Embedded {
    db: Database,
    fsync: Fsync,
    last_sync: Instant,
    /// The oldest commit that is acknowledged but not yet durable (interval fsync only).
    unsynced_since: Option<Instant>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Embedded {
    /// Opens (or creates) `dir/corelay.redb`.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<Self> {
        Self::open_with_cache(dir, fsync, crate::config::DEFAULT_STORE_CACHE_BYTES)
    }

    /// Opens with a page cache of `cache_bytes` (redb's own default, 1 GiB, would let the cache alone grow to a
    /// gigabyte as messages are written).
    pub fn open_with_cache(dir: &Path, fsync: Fsync, cache_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(backend)?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(dir.join("corelay.redb"))
            .map_err(backend)?;
        Self::with_database(db, fsync)
    }

    /// A store in memory only: the same tables and transactions, nothing on disk (the seeded simulation,
    /// `tests/simulation.rs`, runs thousands of these).
    pub fn in_memory() -> Result<Self> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(backend)?;
        Self::with_database(db, Fsync::Interval(Duration::from_secs(3600)))
    }

    fn with_database(db: Database, fsync: Fsync) -> Result<Self> {
        // Create every table up front so readers never see "table does not exist".
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(MESSAGES).map_err(backend)?;
        txn.open_table(LAST).map_err(backend)?;
        txn.open_table(DEDUPE).map_err(backend)?;
        txn.open_table(OFFLINE).map_err(backend)?;
        txn.open_table(RECEIPTS).map_err(backend)?;
        txn.open_table(CONVERSATIONS).map_err(backend)?;
        txn.open_table(DEVICES).map_err(backend)?;
        txn.open_table(TOKENS).map_err(backend)?;
        txn.open_table(PUSH).map_err(backend)?;
        txn.open_table(PUSH_DUE).map_err(backend)?;
        txn.open_table(ALERTED).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Embedded {
            db,
            fsync,
            last_sync: Instant::now(),
            unsynced_since: None,
        })
    }

    fn decode(channel: &str, offset: u64, raw: &[u8]) -> Result<StoredMessage> {
        let r: Record = serde_json::from_slice(raw)
            .map_err(|e| StoreError::Corrupt(format!("{channel}@{offset}: {e}")))?;
        Ok(StoredMessage {
            channel: channel.to_string(),
            offset,
            from: r.from,
            ts: r.ts,
            json: r.json,
        })
    }
}

impl Store for Embedded {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn commit(&mut self, batch: &[Write]) -> Result<Vec<WriteResult>> {
        let mut txn = self.db.begin_write().map_err(backend)?;
        let sync_now = match self.fsync {
            Fsync::Always => true,
            Fsync::Interval(d) => self.last_sync.elapsed() >= d,
        };
        txn.set_durability(if sync_now {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(backend)?;
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut messages = txn.open_table(MESSAGES).map_err(backend)?;
            let mut last = txn.open_table(LAST).map_err(backend)?;
            let mut dedupe = txn.open_table(DEDUPE).map_err(backend)?;
            let mut offline = txn.open_table(OFFLINE).map_err(backend)?;
            let mut receipts = txn.open_table(RECEIPTS).map_err(backend)?;
            let mut conversations = txn.open_table(CONVERSATIONS).map_err(backend)?;
            let mut devices = txn.open_table(DEVICES).map_err(backend)?;
            let mut tokens = txn.open_table(TOKENS).map_err(backend)?;
            let mut push = txn.open_table(PUSH).map_err(backend)?;
            let mut push_due = txn.open_table(PUSH_DUE).map_err(backend)?;
            let mut alerted = txn.open_table(ALERTED).map_err(backend)?;
            for w in batch {
                let r = match w {
                    Write::Append(m) => {
                        let key = match (&m.from, &m.client_id) {
                            (Some(f), Some(c)) => {
                                Some((f.as_str(), m.channel.as_str(), c.as_str()))
                            }
                            _ => None,
                        };
                        let dup = match key {
                            Some(k) => dedupe.get(k).map_err(backend)?.map(|v| v.value()),
                            None => None,
                        };
                        if let Some((offset, ts)) = dup {
                            WriteResult::Appended(Appended::Duplicate { offset, ts })
                        } else {
                            let offset = last
                                .get(m.channel.as_str())
                                .map_err(backend)?
                                .map_or(0, |v| v.value())
                                + 1;
                            last.insert(m.channel.as_str(), offset).map_err(backend)?;
                            let rec = serde_json::to_vec(&Record {
                                from: m.from.clone(),
                                ts: m.ts,
                                json: m.json.clone(),
                            })
                            .map_err(backend)?;
                            messages
                                .insert((m.channel.as_str(), offset), rec.as_slice())
                                .map_err(backend)?;
                            if let Some(k) = key {
                                dedupe.insert(k, (offset, m.ts)).map_err(backend)?;
                            }
                            for u in &m.offline {
                                offline
                                    .insert((u.as_str(), m.channel.as_str(), offset), ())
                                    .map_err(backend)?;
                            }
                            if let Some(conv) = conversation_of(&m.channel) {
                                let from = m.from.clone().unwrap_or_default();
                                for p in &m.push {
                                    let old = push_get(&push, PushKind::Alert, &p.user, conv)?;
                                    let rec = match &old {
                                        // Collapse: one row per (member, conversation). A claimed
                                        // row keeps its lease (its push is out; the rest follows).
                                        Some(o) => PushRecord {
                                            upto: offset,
                                            from: from.clone(),
                                            count: o.count.saturating_add(1),
                                            due: if o.attempts > 0 {
                                                o.due
                                            } else {
                                                o.due.min(p.due_ms)
                                            },
                                            attempts: o.attempts,
                                            preview: p.preview.clone(),
                                        },
                                        None => PushRecord {
                                            upto: offset,
                                            from: from.clone(),
                                            count: 1,
                                            due: p.due_ms,
                                            attempts: 0,
                                            preview: p.preview.clone(),
                                        },
                                    };
                                    push_put(
                                        &mut push,
                                        &mut push_due,
                                        PushKind::Alert,
                                        &p.user,
                                        conv,
                                        old.map(|o| o.due),
                                        &rec,
                                    )?;
                                }
                            }
                            WriteResult::Appended(Appended::New { offset })
                        }
                    }
                    Write::Receipt {
                        conversation,
                        member,
                        state,
                        offset,
                    } => {
                        let k = (conversation.as_str(), member.as_str());
                        let (d, rd) = receipts
                            .get(k)
                            .map_err(backend)?
                            .map_or((0, 0), |v| v.value());
                        let nd = d.max(*offset);
                        let nr = if *state == super::ReceiptState::Read {
                            rd.max(*offset)
                        } else {
                            rd
                        };
                        if (nd, nr) != (d, rd) {
                            receipts.insert(k, (nd, nr)).map_err(backend)?;
                        }
                        // An ack on any device fulfils the alert it covers.
                        if let Some(o) = push_get(&push, PushKind::Alert, member, conversation)?
                            && o.upto <= nd
                        {
                            push_remove(
                                &mut push,
                                &mut push_due,
                                PushKind::Alert,
                                member,
                                conversation,
                                &o,
                            )?;
                        }
                        // A read of an alerted conversation: tell the other devices to clear it.
                        let was_alerted = alerted
                            .get((member.as_str(), conversation.as_str()))
                            .map_err(backend)?
                            .map(|v| v.value());
                        if *state == super::ReceiptState::Read
                            && let Some(a) = was_alerted
                            && nr > rd
                        {
                            queue_clear(&mut push, &mut push_due, member, conversation, nr)?;
                            if nr >= a {
                                alerted
                                    .remove((member.as_str(), conversation.as_str()))
                                    .map_err(backend)?;
                            }
                        }
                        WriteResult::Receipt {
                            prev_delivered: d,
                            prev_read: rd,
                        }
                    }
                    Write::TrimOffline {
                        user,
                        channel,
                        upto,
                    } => {
                        let lo = (user.as_str(), channel.as_str(), 0u64);
                        let hi = (user.as_str(), channel.as_str(), *upto);
                        offline.retain_in(lo..=hi, |_, _| false).map_err(backend)?;
                        WriteResult::Done
                    }
                    Write::PutConversation { id, members } => {
                        let old: Vec<String> =
                            match conversations.get(id.as_str()).map_err(backend)? {
                                Some(v) => serde_json::from_str(v.value())
                                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                                None => Vec::new(),
                            };
                        // Removed members lose their offline entries of the conversation.
                        let channel = format!("conversation:{id}");
                        for m in old.iter().filter(|m| !members.contains(m)) {
                            let lo = (m.as_str(), channel.as_str(), 0u64);
                            let hi = (m.as_str(), channel.as_str(), u64::MAX);
                            offline.retain_in(lo..=hi, |_, _| false).map_err(backend)?;
                        }
                        let json = serde_json::to_string(members).map_err(backend)?;
                        conversations
                            .insert(id.as_str(), json.as_str())
                            .map_err(backend)?;
                        WriteResult::Done
                    }
                    Write::PutDevice {
                        user,
                        platform,
                        token,
                    } => {
                        let owner = tokens
                            .get((platform.as_str(), token.as_str()))
                            .map_err(backend)?
                            .map(|v| v.value().to_string());
                        if let Some(o) = owner.filter(|o| o != user) {
                            // The token moved to another user (a shared phone, a new login).
                            devices
                                .remove((o.as_str(), platform.as_str(), token.as_str()))
                                .map_err(backend)?;
                        }
                        tokens
                            .insert((platform.as_str(), token.as_str()), user.as_str())
                            .map_err(backend)?;
                        devices
                            .insert((user.as_str(), platform.as_str(), token.as_str()), ())
                            .map_err(backend)?;
                        WriteResult::Done
                    }
                    Write::DeleteDevice {
                        user,
                        platform,
                        token,
                    } => {
                        let removed = devices
                            .remove((user.as_str(), platform.as_str(), token.as_str()))
                            .map_err(backend)?
                            .is_some();
                        if removed {
                            tokens
                                .remove((platform.as_str(), token.as_str()))
                                .map_err(backend)?;
                        }
                        WriteResult::Done
                    }
                    Write::PushDone {
                        kind,
                        user,
                        conversation,
                        upto,
                        count,
                    } => {
                        if let Some(o) = push_get(&push, *kind, user, conversation)? {
                            if o.upto <= *upto {
                                push_remove(
                                    &mut push,
                                    &mut push_due,
                                    *kind,
                                    user,
                                    conversation,
                                    &o,
                                )?;
                            } else {
                                // Newer messages arrived while this push was out: they are due now.
                                let rest = PushRecord {
                                    count: o.count.saturating_sub(*count).max(1),
                                    due: 0,
                                    attempts: 0,
                                    ..o
                                };
                                push_put(
                                    &mut push,
                                    &mut push_due,
                                    *kind,
                                    user,
                                    conversation,
                                    Some(o.due),
                                    &rest,
                                )?;
                            }
                        }
                        if *kind == PushKind::Alert {
                            let read = receipts
                                .get((conversation.as_str(), user.as_str()))
                                .map_err(backend)?
                                .map_or(0, |v| v.value().1);
                            if read >= *upto {
                                // Read on another device while this alert was out: clear it at once.
                                queue_clear(&mut push, &mut push_due, user, conversation, read)?;
                            } else {
                                let k = (user.as_str(), conversation.as_str());
                                let a = alerted.get(k).map_err(backend)?.map_or(0, |v| v.value());
                                alerted.insert(k, a.max(*upto)).map_err(backend)?;
                            }
                        }
                        WriteResult::Done
                    }
                    Write::PushRetry {
                        kind,
                        user,
                        conversation,
                        due_ms,
                    } => {
                        if let Some(o) = push_get(&push, *kind, user, conversation)? {
                            let old_due = o.due;
                            let rec = PushRecord { due: *due_ms, ..o };
                            push_put(
                                &mut push,
                                &mut push_due,
                                *kind,
                                user,
                                conversation,
                                Some(old_due),
                                &rec,
                            )?;
                        }
                        WriteResult::Done
                    }
                    Write::PushDrop {
                        kind,
                        user,
                        conversation,
                        upto,
                    } => {
                        if let Some(o) = push_get(&push, *kind, user, conversation)?
                            && o.upto <= *upto
                        {
                            push_remove(&mut push, &mut push_due, *kind, user, conversation, &o)?;
                        }
                        WriteResult::Done
                    }
                };
                results.push(r);
            }
        }
        txn.commit().map_err(backend)?;
        if sync_now {
            self.last_sync = Instant::now();
            self.unsynced_since = None;
        } else if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        Ok(results)
    }

    fn sync_deadline(&self) -> Option<Instant> {
        match self.fsync {
            Fsync::Always => None,
            // The first unsynced ack must be durable within `d` of its commit; later ones are younger.
            Fsync::Interval(d) => self.unsynced_since.map(|t| t + d),
        }
    }

    fn sync(&mut self) -> Result<()> {
        if self.unsynced_since.is_none() {
            return Ok(());
        }
        // An empty transaction committed with `Immediate` makes every earlier non-durable commit durable.
        let mut txn = self.db.begin_write().map_err(backend)?;
        txn.set_durability(Durability::Immediate).map_err(backend)?;
        txn.commit().map_err(backend)?;
        self.last_sync = Instant::now();
        self.unsynced_since = None;
        Ok(())
    }

    fn history(
        &mut self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(MESSAGES).map_err(backend)?;
        let hi = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for item in t
            .range((channel, 0u64)..(channel, hi))
            .map_err(backend)?
            .rev()
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            out.push(Self::decode(channel, k.value().1, v.value())?);
        }
        Ok(out)
    }

    fn read_after(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(MESSAGES).map_err(backend)?;
        let mut out = Vec::new();
        for item in t
            .range((channel, after.saturating_add(1))..=(channel, u64::MAX))
            .map_err(backend)?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            out.push(Self::decode(channel, k.value().1, v.value())?);
        }
        Ok(out)
    }

    fn last_offset(&mut self, channel: &str) -> Result<u64> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(LAST).map_err(backend)?;
        Ok(t.get(channel).map_err(backend)?.map_or(0, |v| v.value()))
    }

    fn offline_after(
        &mut self,
        user: &str,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let q = txn.open_table(OFFLINE).map_err(backend)?;
        let m = txn.open_table(MESSAGES).map_err(backend)?;
        let convs = txn.open_table(CONVERSATIONS).map_err(backend)?;
        // Whether the user may still get each channel's entries (see `still_member`), looked up once.
        let mut allowed: HashMap<String, bool> = HashMap::new();
        let mut out = Vec::new();
        let start = match after {
            Some((ch, off)) => std::ops::Bound::Excluded((user, ch, off)),
            None => std::ops::Bound::Included((user, "", 0u64)),
        };
        let end = std::ops::Bound::Included((user, MAX_STR, u64::MAX));
        for item in q
            .range::<(&str, &str, u64)>((start, end))
            .map_err(backend)?
        {
            if out.len() >= limit {
                break;
            }
            let (k, _) = item.map_err(backend)?;
            let (_, channel, offset) = k.value();
            let ok = match allowed.get(channel) {
                Some(&ok) => ok,
                None => {
                    let members: Option<Vec<String>> = match conversation_of(channel) {
                        Some(id) => match convs.get(id).map_err(backend)? {
                            Some(v) => Some(
                                serde_json::from_str(v.value())
                                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                            ),
                            None => None,
                        },
                        None => None,
                    };
                    let ok = still_member(members.as_deref(), user);
                    allowed.insert(channel.to_string(), ok);
                    ok
                }
            };
            if !ok {
                continue;
            }
            if let Some(v) = m.get((channel, offset)).map_err(backend)? {
                out.push(Self::decode(channel, offset, v.value())?);
            }
        }
        Ok(out)
    }

    fn conversations(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(CONVERSATIONS).map_err(backend)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let members: Vec<String> =
                serde_json::from_str(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push((k.value().to_string(), members));
        }
        Ok(out)
    }

    fn receipts(&mut self, conversation: &str) -> Result<Vec<Receipts>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(RECEIPTS).map_err(backend)?;
        let mut out = Vec::new();
        for item in t
            .range((conversation, "")..=(conversation, MAX_STR))
            .map_err(backend)?
        {
            let (k, v) = item.map_err(backend)?;
            let (delivered, read) = v.value();
            out.push(Receipts {
                member: k.value().1.to_string(),
                delivered,
                read,
            });
        }
        Ok(out)
    }

    fn devices(&mut self, user: &str) -> Result<Vec<(String, String)>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(DEVICES).map_err(backend)?;
        let mut out = Vec::new();
        for item in t
            .range((user, "", "")..=(user, MAX_STR, MAX_STR))
            .map_err(backend)?
        {
            let (k, _) = item.map_err(backend)?;
            let (_, p, tok) = k.value();
            out.push((p.to_string(), tok.to_string()));
        }
        Ok(out)
    }

    fn push_claim(&mut self, now_ms: u64, lease_ms: u64, limit: usize) -> Result<Vec<PushJob>> {
        // Most polls find nothing due: look first in a read transaction.
        let due: Vec<(u64, u8, String, String)> = {
            let txn = self.db.begin_read().map_err(backend)?;
            let t = txn.open_table(PUSH_DUE).map_err(backend)?;
            let mut v = Vec::new();
            for item in t
                .range((0u64, 0u8, "", "")..=(now_ms, u8::MAX, MAX_STR, MAX_STR))
                .map_err(backend)?
                .take(limit)
            {
                let (k, _) = item.map_err(backend)?;
                let (d, kind, u, c) = k.value();
                v.push((d, kind, u.to_string(), c.to_string()));
            }
            v
        };
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs = Vec::with_capacity(due.len());
        let mut txn = self.db.begin_write().map_err(backend)?;
        // A lost claim only means an earlier retry; no fsync for it.
        txn.set_durability(Durability::None).map_err(backend)?;
        {
            let mut push = txn.open_table(PUSH).map_err(backend)?;
            let mut push_due = txn.open_table(PUSH_DUE).map_err(backend)?;
            let devices = txn.open_table(DEVICES).map_err(backend)?;
            for (_, kind_u8, user, conv) in due {
                let Some(kind) = PushKind::from_u8(kind_u8) else {
                    continue;
                };
                let Some(o) = push_get(&push, kind, &user, &conv)? else {
                    continue;
                };
                if o.due > now_ms {
                    continue;
                }
                let old_due = o.due;
                let rec = PushRecord {
                    due: now_ms.saturating_add(lease_ms),
                    attempts: o.attempts.saturating_add(1),
                    ..o
                };
                push_put(
                    &mut push,
                    &mut push_due,
                    kind,
                    &user,
                    &conv,
                    Some(old_due),
                    &rec,
                )?;
                let mut devs = Vec::new();
                for item in devices
                    .range((user.as_str(), "", "")..=(user.as_str(), MAX_STR, MAX_STR))
                    .map_err(backend)?
                {
                    let (k, _) = item.map_err(backend)?;
                    let (_, p, tok) = k.value();
                    devs.push((p.to_string(), tok.to_string()));
                }
                let raw = serde_json::to_vec(&rec).map_err(backend)?;
                jobs.push(PushJob {
                    row: Self::row_of(kind_u8, &user, &conv, &raw)?,
                    devices: devs,
                });
            }
        }
        txn.commit().map_err(backend)?;
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        Ok(jobs)
    }

    fn push_rows(&mut self) -> Result<Vec<PushRow>> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = txn.open_table(PUSH).map_err(backend)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(backend)? {
            let (k, v) = item.map_err(backend)?;
            let (kind, u, c) = k.value();
            out.push(Self::row_of(kind, u, c, v.value())?);
        }
        Ok(out)
    }
}

impl Embedded {
    fn row_of(kind: u8, user: &str, conv: &str, raw: &[u8]) -> Result<PushRow> {
        let r: PushRecord = serde_json::from_slice(raw)
            .map_err(|e| StoreError::Corrupt(format!("push row {user}/{conv}: {e}")))?;
        Ok(PushRow {
            kind: PushKind::from_u8(kind)
                .ok_or_else(|| StoreError::Corrupt(format!("push kind {kind}")))?,
            user: user.to_string(),
            conversation: conv.to_string(),
            upto: r.upto,
            from: r.from,
            count: r.count,
            due_ms: r.due,
            attempts: r.attempts,
            preview: r.preview,
        })
    }
}
