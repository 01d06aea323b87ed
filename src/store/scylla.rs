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
//! No Scylla server can run on the development machines: the contract suite runs against a real cluster
//! whenever `SCYLLA_NODES` is set (`tests/store_contract.rs`) and says it was skipped otherwise.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

use super::{
    Appended, NewMessage, ReceiptState, Receipts, Result, Store, StoreError, StoredMessage, Write,
    WriteResult, conversation_of, still_member,
};

/// Concurrent statements per group commit.
pub const MAX_IN_FLIGHT: usize = 256;
/// Statements per logged batch (a message's dedupe record and offline entries).
pub const BATCH_MAX: usize = 100;
const RETRIES: u32 = 3;
/// Offsets found taken by other writers before one append gives up (the client retries with its client id).
pub const CLAIM_CONFLICTS: u32 = 64;

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
}

impl Cql {
    pub fn new(ks: &str) -> Cql {
        let cols = "\"offset\", sender, ts, json";
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
}

impl Scylla {
    /// Decides one write of a group commit (dedupe, offset claim, receipt values, removed members) and queues
    /// what remains to be written.
    fn plan(&mut self, w: &Write, plan: &mut Plan) -> Result<WriteResult> {
        Ok(match w {
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
                let offset = self.claim(m)?;
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
                let (d, r) = match plan.receipts.get(&k) {
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
                            Ok::<_, StoreError>(row.map_or((0, 0), |(d, r)| (d as u64, r as u64)))
                        })?
                    }
                };
                let nd = d.max(*offset);
                let nr = if *state == ReceiptState::Read {
                    r.max(*offset)
                } else {
                    r
                };
                plan.receipts.insert(k, (nd, nr));
                if (nd, nr) != (d, r) {
                    plan.inserts.push(Insert::Receipt(
                        conversation.clone(),
                        member.clone(),
                        nd as i64,
                        nr as i64,
                    ));
                }
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
                plan.inserts.push(Insert::Device(
                    user.clone(),
                    platform.clone(),
                    token.clone(),
                ));
                WriteResult::Done
            }
            Write::DeleteDevice {
                user,
                platform,
                token,
            } => {
                plan.inserts.push(Insert::DeleteDevice(
                    user.clone(),
                    platform.clone(),
                    token.clone(),
                ));
                WriteResult::Done
            }
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
    members: HashMap<String, Vec<String>>,
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
        ];
        for stmt in all {
            assert!(stmt.contains(" ks1."), "{stmt}");
            assert_eq!(
                stmt.contains("IF NOT EXISTS"),
                std::ptr::eq(stmt, &q.insert_message),
                "only the claim is a lightweight transaction: {stmt}"
            );
        }
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
    }
}
