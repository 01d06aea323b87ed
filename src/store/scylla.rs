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
//! Offsets: this store assigns them from a per-channel counter it loads once (`SELECT "offset" … LIMIT 1`) and
//! then owns. That is right for one writer per channel (a single node, or a cluster that routes each
//! conversation's writes to one node); a cluster where several nodes write one conversation takes offsets from
//! Redis `INCR` instead (see `docs/ARCHITECTURE.md`). Dedupe and receipts are read-then-write for the same
//! reason.
//!
//! No Scylla server can run on the development machines: the contract suite runs against a real cluster
//! whenever `SCYLLA_NODES` is set (`tests/store_contract.rs`) and says it was skipped otherwise.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;

use super::{
    Appended, ReceiptState, Receipts, Result, Store, StoreError, StoredMessage, Write, WriteResult,
};

/// Concurrent statements per group commit.
pub const MAX_IN_FLIGHT: usize = 256;
const RETRIES: u32 = 3;

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
    get_receipt: PreparedStatement,
    put_receipt: PreparedStatement,
    receipts: PreparedStatement,
    put_conversation: PreparedStatement,
    conversations: PreparedStatement,
    put_device: PreparedStatement,
    devices: PreparedStatement,
}

pub struct Scylla {
    rt: tokio::runtime::Runtime,
    session: Session,
    st: Prepared,
    /// The last offset of each channel this store has written or looked up.
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
            let ks = &cfg.keyspace;
            let ttl = cfg.dedupe_ttl.as_secs();
            let ddl = [
                format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {}", cfg.replication),
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
                format!("CREATE TABLE IF NOT EXISTS {ks}.conversations (id text PRIMARY KEY, members list<text>)"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.devices (user_id text, platform text, token text, PRIMARY KEY ((user_id), platform, token))"
                ),
            ];
            for stmt in ddl {
                session.query_unpaged(stmt, &[]).await.map_err(backend)?;
            }
            let p = |q: String| {
                let session = &session;
                async move { session.prepare(q).await.map_err(backend) }
            };
            let st = Prepared {
                insert_message: p(format!(
                    "INSERT INTO {ks}.messages (conversation_id, \"offset\", sender, ts, json) VALUES (?, ?, ?, ?, ?)"
                ))
                .await?,
                last_offset: p(format!("SELECT \"offset\" FROM {ks}.messages WHERE conversation_id = ? LIMIT 1")).await?,
                history: p(format!(
                    "SELECT \"offset\", sender, ts, json FROM {ks}.messages WHERE conversation_id = ? LIMIT ?"
                ))
                .await?,
                history_before: p(format!(
                    "SELECT \"offset\", sender, ts, json FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" < ? LIMIT ?"
                ))
                .await?,
                read_after: p(format!(
                    "SELECT \"offset\", sender, ts, json FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" > ? ORDER BY \"offset\" ASC LIMIT ?"
                ))
                .await?,
                message: p(format!(
                    "SELECT \"offset\", sender, ts, json FROM {ks}.messages WHERE conversation_id = ? AND \"offset\" = ?"
                ))
                .await?,
                get_dedupe: p(format!(
                    "SELECT \"offset\", ts FROM {ks}.dedupe WHERE sender = ? AND conversation_id = ? AND client_id = ?"
                ))
                .await?,
                insert_dedupe: p(format!(
                    "INSERT INTO {ks}.dedupe (sender, conversation_id, client_id, \"offset\", ts) VALUES (?, ?, ?, ?, ?)"
                ))
                .await?,
                insert_offline: p(format!(
                    "INSERT INTO {ks}.offline (user_id, conversation_id, \"offset\") VALUES (?, ?, ?)"
                ))
                .await?,
                offline: p(format!("SELECT conversation_id, \"offset\" FROM {ks}.offline WHERE user_id = ? LIMIT ?")).await?,
                trim_offline: p(format!(
                    "DELETE FROM {ks}.offline WHERE user_id = ? AND conversation_id = ? AND \"offset\" <= ?"
                ))
                .await?,
                get_receipt: p(format!(
                    "SELECT delivered, read FROM {ks}.receipts WHERE conversation_id = ? AND member = ?"
                ))
                .await?,
                put_receipt: p(format!(
                    "INSERT INTO {ks}.receipts (conversation_id, member, delivered, read) VALUES (?, ?, ?, ?)"
                ))
                .await?,
                receipts: p(format!("SELECT member, delivered, read FROM {ks}.receipts WHERE conversation_id = ?")).await?,
                put_conversation: p(format!("INSERT INTO {ks}.conversations (id, members) VALUES (?, ?)")).await?,
                conversations: p(format!("SELECT id, members FROM {ks}.conversations")).await?,
                put_device: p(format!("INSERT INTO {ks}.devices (user_id, platform, token) VALUES (?, ?, ?)")).await?,
                devices: p(format!("SELECT platform, token FROM {ks}.devices WHERE user_id = ?")).await?,
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

    fn last_of(&mut self, channel: &str) -> Result<u64> {
        if let Some(&n) = self.last.get(channel) {
            return Ok(n);
        }
        let (session, st) = (&self.session, &self.st);
        let n = self.rt.block_on(async {
            let r = session
                .execute_unpaged(&st.last_offset, (channel,))
                .await
                .map_err(unavailable)?;
            let rows = r.into_rows_result().map_err(backend)?;
            let row: Option<(i64,)> = rows.maybe_first_row().map_err(backend)?;
            Ok::<_, StoreError>(row.map_or(0, |(o,)| o as u64))
        })?;
        self.last.insert(channel.to_string(), n);
        Ok(n)
    }

    fn rows(
        &self,
        stmt: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        channel: &str,
    ) -> Result<Vec<StoredMessage>> {
        self.rt.block_on(async {
            let r = self
                .session
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
        })
    }
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

/// One insert of a group commit, owned so the batch can run concurrently.
enum Insert {
    Message(String, i64, Option<String>, i64, String),
    Dedupe(String, String, String, i64, i64),
    Offline(String, String, i64),
    TrimOffline(String, String, i64),
    Receipt(String, String, i64, i64),
    Conversation(String, Vec<String>),
    Device(String, String, String),
}

impl Store for Scylla {
    fn name(&self) -> &'static str {
        "scylla"
    }

    fn commit(&mut self, batch: &[Write]) -> Result<Vec<WriteResult>> {
        // Decide offsets, dedupe and receipt values in order (this store is the channel's only writer), then
        // write everything concurrently.
        let mut inserts = Vec::new();
        let mut results = Vec::with_capacity(batch.len());
        let mut seen: HashMap<(String, String, String), (u64, u64)> = HashMap::new();
        let mut receipts_now: HashMap<(String, String), (u64, u64)> = HashMap::new();
        for w in batch {
            match w {
                Write::Append(m) => {
                    let key = match (&m.from, &m.client_id) {
                        (Some(f), Some(c)) => Some((f.clone(), m.channel.clone(), c.clone())),
                        _ => None,
                    };
                    let mut dup = key.as_ref().and_then(|k| seen.get(k).copied());
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
                        results.push(WriteResult::Appended(Appended::Duplicate { offset, ts }));
                        continue;
                    }
                    let offset = self.last_of(&m.channel)? + 1;
                    self.last.insert(m.channel.clone(), offset);
                    inserts.push(Insert::Message(
                        m.channel.clone(),
                        offset as i64,
                        m.from.clone(),
                        m.ts as i64,
                        m.json.clone(),
                    ));
                    if let Some(k) = key {
                        inserts.push(Insert::Dedupe(
                            k.0.clone(),
                            k.1.clone(),
                            k.2.clone(),
                            offset as i64,
                            m.ts as i64,
                        ));
                        seen.insert(k, (offset, m.ts));
                    }
                    for u in &m.offline {
                        inserts.push(Insert::Offline(u.clone(), m.channel.clone(), offset as i64));
                    }
                    results.push(WriteResult::Appended(Appended::New { offset }));
                }
                Write::Receipt {
                    conversation,
                    member,
                    state,
                    offset,
                } => {
                    let k = (conversation.clone(), member.clone());
                    let (d, r) = match receipts_now.get(&k) {
                        Some(v) => *v,
                        None => {
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
                                Ok::<_, StoreError>(
                                    row.map_or((0, 0), |(d, r)| (d as u64, r as u64)),
                                )
                            })?
                        }
                    };
                    let nd = d.max(*offset);
                    let nr = if *state == ReceiptState::Read {
                        r.max(*offset)
                    } else {
                        r
                    };
                    receipts_now.insert(k, (nd, nr));
                    if (nd, nr) != (d, r) {
                        inserts.push(Insert::Receipt(
                            conversation.clone(),
                            member.clone(),
                            nd as i64,
                            nr as i64,
                        ));
                    }
                    results.push(WriteResult::Receipt {
                        prev_delivered: d,
                        prev_read: r,
                    });
                }
                Write::TrimOffline {
                    user,
                    channel,
                    upto,
                } => {
                    inserts.push(Insert::TrimOffline(
                        user.clone(),
                        channel.clone(),
                        *upto as i64,
                    ));
                    results.push(WriteResult::Done);
                }
                Write::PutConversation { id, members } => {
                    inserts.push(Insert::Conversation(id.clone(), members.clone()));
                    results.push(WriteResult::Done);
                }
                Write::PutDevice {
                    user,
                    platform,
                    token,
                } => {
                    inserts.push(Insert::Device(
                        user.clone(),
                        platform.clone(),
                        token.clone(),
                    ));
                    results.push(WriteResult::Done);
                }
            }
        }
        let (session, st) = (&self.session, &self.st);
        let outcome = self.rt.block_on(async {
            for chunk in inserts.chunks(MAX_IN_FLIGHT) {
                let futs = chunk.iter().map(|i| async move {
                    match i {
                        Insert::Message(c, o, f, t, j) => {
                            run(session, &st.insert_message, (c, o, f, t, j)).await
                        }
                        Insert::Dedupe(f, c, id, o, t) => {
                            run(session, &st.insert_dedupe, (f, c, id, o, t)).await
                        }
                        Insert::Offline(u, c, o) => {
                            run(session, &st.insert_offline, (u, c, o)).await
                        }
                        Insert::TrimOffline(u, c, o) => {
                            run(session, &st.trim_offline, (u, c, o)).await
                        }
                        Insert::Receipt(c, m, d, r) => {
                            run(session, &st.put_receipt, (c, m, d, r)).await
                        }
                        Insert::Conversation(id, m) => {
                            run(session, &st.put_conversation, (id, m)).await
                        }
                        Insert::Device(u, p, t) => run(session, &st.put_device, (u, p, t)).await,
                    }
                });
                for r in join_all(futs).await {
                    r?;
                }
            }
            Ok::<_, StoreError>(())
        });
        if outcome.is_err() {
            // Offsets handed out in this batch may or may not be written: forget them and reload.
            self.last.clear();
        }
        outcome.map(|()| results)
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
        self.last_of(channel)
    }

    fn offline(&mut self, user: &str, limit: usize) -> Result<Vec<StoredMessage>> {
        let entries: Vec<(String, i64)> = self.rt.block_on(async {
            let r = self
                .session
                .execute_unpaged(
                    &self.st.offline,
                    (user, limit.min(i32::MAX as usize) as i32),
                )
                .await
                .map_err(unavailable)?;
            let rows = r.into_rows_result().map_err(backend)?;
            rows.rows::<(String, i64)>()
                .map_err(backend)?
                .map(|r| r.map_err(backend))
                .collect::<Result<Vec<_>>>()
        })?;
        let mut out = Vec::with_capacity(entries.len());
        for (channel, offset) in entries {
            out.extend(self.rows(&self.st.message, (&channel, offset), &channel)?);
        }
        Ok(out)
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

    fn devices(&mut self, user: &str) -> Result<Vec<(String, String)>> {
        self.rt.block_on(async {
            let r = self
                .session
                .execute_unpaged(&self.st.devices, (user,))
                .await
                .map_err(unavailable)?;
            let rows = r.into_rows_result().map_err(backend)?;
            rows.rows::<(String, String)>()
                .map_err(backend)?
                .map(|r| r.map_err(backend))
                .collect()
        })
    }
}
