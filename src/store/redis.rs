//! The Redis store: cluster mode's shared state (`--redis redis://host:port`, with no `--scylla`), so any node
//! can serve any user.
//!
//! | data | key |
//! |---|---|
//! | channel offsets | `offset:{channel}` (`INCR`: unique, increasing, whichever node appends) |
//! | message log | `log:{channel}`, a Redis Stream whose entry id is `{offset}-1` |
//! | dedupe | `dedupe:{user}:{channel}:{client_id}` = `offset,ts`, with a TTL |
//! | offline queue | `user:{id}:offline_messages`, a list of `channel\toffset` |
//! | receipts | `receipts:{conversation}`, a hash member → `delivered,read` |
//! | conversations | `conversations`, a hash id → members (JSON) |
//! | devices | `devices:{user}`, a set of `platform\ttoken` |
//! | presence | `presence:user:{id}`, a hash node → expiry (ms), refreshed by the node |
//!
//! Each append is one Lua script (dedupe check, `INCR`, `XADD`, dedupe record, offline queueing for members
//! with no live presence on any node), so it is atomic however many nodes append to one conversation. A group
//! commit sends all of its scripts in one pipeline: one round trip. Durability is Redis's: run it with
//! `appendonly yes` and `appendfsync always` for "sent = on disk", or `everysec` to trade up to a second of
//! acknowledged messages for throughput (docs/OPERATIONS.md).
//!
//! Redis Cluster: every key of a channel would carry the channel in a hash tag (`log:{conversation:c1}`) so the
//! script's keys land in one slot; the offline queue and presence keys are per user and touched by separate
//! scripts. This store targets a single Redis (with replicas/Sentinel for failover).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use redis::{Client, Connection, Value};

use super::{
    Appended, ReceiptState, Receipts, Result, Store, StoreError, StoredMessage, Write, WriteResult,
    conversation_of, still_member,
};

const APPEND: &str = r#"
local ch, from, cid, ts, json = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, maxlen = tonumber(ARGV[6]), tonumber(ARGV[7])
local dkey = nil
if from ~= '' and cid ~= '' then
  dkey = 'dedupe:' .. from .. ':' .. ch .. ':' .. cid
  local d = redis.call('GET', dkey)
  if d then return {0, d} end
end
local off = redis.call('INCR', 'offset:' .. ch)
if maxlen > 0 then
  redis.call('XADD', 'log:' .. ch, 'MAXLEN', '~', maxlen, off .. '-1', 'f', from, 't', ts, 'j', json)
else
  redis.call('XADD', 'log:' .. ch, off .. '-1', 'f', from, 't', ts, 'j', json)
end
if dkey then redis.call('SET', dkey, off .. ',' .. ts, 'EX', ttl) end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for i = 8, #ARGV do
  local u = ARGV[i]
  local live = false
  local p = redis.call('HGETALL', 'presence:user:' .. u)
  for j = 2, #p, 2 do
    if tonumber(p[j]) > now_ms then live = true; break end
  end
  if not live then redis.call('RPUSH', 'user:' .. u .. ':offline_messages', ch .. '\t' .. off) end
end
return {1, tostring(off)}
"#;

const RECEIPT: &str = r#"
local key, member, state, off = 'receipts:' .. ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local cur = redis.call('HGET', key, member)
local d, r = 0, 0
if cur then
  local c = string.find(cur, ',')
  d, r = tonumber(string.sub(cur, 1, c - 1)), tonumber(string.sub(cur, c + 1))
end
local nd, nr = math.max(d, off), r
if state == 'read' then nr = math.max(r, off) end
if nd ~= d or nr ~= r then redis.call('HSET', key, member, nd .. ',' .. nr) end
return {d, r}
"#;

/// Lua: `filter_list(key, drop)` removes the entries of the list at `key` for which `drop(entry)` is true,
/// keeps the others in their order, and returns how many went. Nothing is removed before the kept entries are
/// safely in place, and it works at any length (no `unpack` of the whole list): a removed head is one `LTRIM`;
/// otherwise the kept entries are pushed, in chunks, to a scratch key that then replaces the list (`RENAME`).
macro_rules! filter_list_lua {
    () => {
        r#"
local function filter_list(key, drop)
  local n, chunk = redis.call('LLEN', key), 1000
  local removed, kept, head = 0, 0, true
  for start = 0, n - 1, chunk do
    for _, e in ipairs(redis.call('LRANGE', key, start, start + chunk - 1)) do
      if drop(e) then
        removed = removed + 1
        if kept > 0 then head = false end
      else
        kept = kept + 1
      end
    end
  end
  if removed == 0 then return 0 end
  if head then
    redis.call('LTRIM', key, removed, -1)
    return removed
  end
  local scratch = key .. ':rewrite'
  redis.call('DEL', scratch)
  for start = 0, n - 1, chunk do
    local keep = {}
    for _, e in ipairs(redis.call('LRANGE', key, start, start + chunk - 1)) do
      if not drop(e) then keep[#keep + 1] = e end
    end
    if #keep > 0 then redis.call('RPUSH', scratch, unpack(keep)) end
  end
  redis.call('RENAME', scratch, key)
  return removed
end
"#
    };
}

/// Removes `user`'s offline entries of `channel` up to `upto`.
const TRIM: &str = concat!(
    filter_list_lua!(),
    r#"
local key, prefix, upto = 'user:' .. ARGV[1] .. ':offline_messages', ARGV[2] .. '\t', tonumber(ARGV[3])
return filter_list(key, function(e)
  return string.sub(e, 1, #prefix) == prefix and tonumber(string.sub(e, #prefix + 1)) <= upto
end)
"#
);

/// Stores a conversation's members (`ARGV[1]` id, `ARGV[2]` members as JSON, then each member); members it
/// removes lose their offline entries of the conversation, in the same script.
const PUT_CONVERSATION: &str = concat!(
    filter_list_lua!(),
    r#"
local id, json = ARGV[1], ARGV[2]
local old = redis.call('HGET', 'conversations', id)
local dropped = 0
if old then
  local now = {}
  for i = 3, #ARGV do now[ARGV[i]] = true end
  local prefix = 'conversation:' .. id .. '\t'
  for _, m in ipairs(cjson.decode(old)) do
    if not now[m] then
      dropped = dropped + filter_list('user:' .. m .. ':offline_messages', function(e)
        return string.sub(e, 1, #prefix) == prefix
      end)
    end
  end
end
redis.call('HSET', 'conversations', id, json)
return dropped
"#
);

#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: String,
    pub dedupe_ttl: Duration,
    /// Approximate cap of each topic stream (`XADD MAXLEN ~`); conversation and user logs are never trimmed.
    pub topic_maxlen: usize,
}

pub struct RedisStore {
    client: Client,
    conn: Option<Connection>,
    cfg: RedisConfig,
    append: redis::Script,
    receipt: redis::Script,
    trim: redis::Script,
    put_conversation: redis::Script,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

impl RedisStore {
    pub fn connect(cfg: RedisConfig) -> Result<Self> {
        let client = Client::open(cfg.url.as_str()).map_err(backend)?;
        let mut s = RedisStore {
            client,
            conn: None,
            cfg,
            append: redis::Script::new(APPEND),
            receipt: redis::Script::new(RECEIPT),
            trim: redis::Script::new(TRIM),
            put_conversation: redis::Script::new(PUT_CONVERSATION),
        };
        s.conn()?;
        Ok(s)
    }

    /// The connection, reconnecting (and reloading the scripts) after a failure.
    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            let mut c = self
                .client
                .get_connection_with_timeout(Duration::from_secs(2))
                .map_err(unavailable)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(unavailable)?;
            c.set_write_timeout(Some(Duration::from_secs(5)))
                .map_err(unavailable)?;
            for s in [
                &self.append,
                &self.receipt,
                &self.trim,
                &self.put_conversation,
            ] {
                s.prepare_invoke().load(&mut c).map_err(unavailable)?;
            }
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just connected"))
    }

    /// Runs `f` on the connection; a connection error drops it so the next call reconnects.
    fn with<T>(&mut self, f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>) -> Result<T> {
        let c = self.conn()?;
        match f(c) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                {
                    self.conn = None;
                }
                Err(unavailable(e))
            }
        }
    }

    fn parse_entries(channel: &str, v: Value) -> Result<Vec<StoredMessage>> {
        let Value::Array(entries) = v else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let Value::Array(pair) = e else { continue };
            let (Some(id), Some(Value::Array(fields))) =
                (pair.first().and_then(text), pair.get(1).cloned())
            else {
                continue;
            };
            let offset: u64 = id
                .split('-')
                .next()
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("stream id {id}")))?;
            let mut m = StoredMessage {
                channel: channel.to_string(),
                offset,
                from: None,
                ts: 0,
                json: String::new(),
            };
            for kv in fields.chunks(2) {
                let (Some(k), Some(v)) = (kv.first().and_then(text), kv.get(1).and_then(text))
                else {
                    continue;
                };
                match k.as_str() {
                    "f" if !v.is_empty() => m.from = Some(v),
                    "t" => m.ts = v.parse().unwrap_or(0),
                    "j" => m.json = v,
                    _ => {}
                }
            }
            out.push(m);
        }
        Ok(out)
    }

    /// Marks `user` live on `node` until `until_ms` (cluster presence; see the module doc).
    pub fn presence_key(user: &str) -> String {
        format!("presence:user:{user}")
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn commit(&mut self, batch: &[Write]) -> Result<Vec<WriteResult>> {
        let ttl = self.cfg.dedupe_ttl.as_secs().max(1);
        let maxlen = self.cfg.topic_maxlen;
        let mut pipe = redis::pipe();
        for w in batch {
            match w {
                Write::Append(m) => {
                    let is_topic =
                        !m.channel.starts_with("conversation:") && !m.channel.starts_with("user:");
                    let mut inv = self.append.prepare_invoke();
                    inv.arg(&m.channel)
                        .arg(m.from.as_deref().unwrap_or(""))
                        .arg(m.client_id.as_deref().unwrap_or(""))
                        .arg(m.ts)
                        .arg(&m.json)
                        .arg(ttl)
                        .arg(if is_topic { maxlen } else { 0 });
                    for u in &m.offline {
                        inv.arg(u);
                    }
                    pipe.invoke_script(&inv);
                }
                Write::Receipt {
                    conversation,
                    member,
                    state,
                    offset,
                } => {
                    let mut inv = self.receipt.prepare_invoke();
                    inv.arg(conversation)
                        .arg(member)
                        .arg(if *state == ReceiptState::Read {
                            "read"
                        } else {
                            "delivered"
                        })
                        .arg(*offset);
                    pipe.invoke_script(&inv);
                }
                Write::TrimOffline {
                    user,
                    channel,
                    upto,
                } => {
                    let mut inv = self.trim.prepare_invoke();
                    inv.arg(user).arg(channel).arg(*upto);
                    pipe.invoke_script(&inv);
                }
                Write::PutConversation { id, members } => {
                    let json = serde_json::to_string(members).map_err(backend)?;
                    let mut inv = self.put_conversation.prepare_invoke();
                    inv.arg(id).arg(json);
                    for m in members {
                        inv.arg(m);
                    }
                    pipe.invoke_script(&inv);
                }
                Write::PutDevice {
                    user,
                    platform,
                    token,
                } => {
                    pipe.cmd("SADD")
                        .arg(format!("devices:{user}"))
                        .arg(format!("{platform}\t{token}"));
                }
                Write::DeleteDevice {
                    user,
                    platform,
                    token,
                } => {
                    pipe.cmd("SREM")
                        .arg(format!("devices:{user}"))
                        .arg(format!("{platform}\t{token}"));
                }
            }
        }
        let values: Vec<Value> = match self.with(|c| pipe.query(c)) {
            // Redis restarted and lost its script cache: reconnect (which reloads them) and retry once. The
            // failed pipeline ran none of its scripts; its plain SADD writes are idempotent.
            Err(StoreError::Unavailable(e))
                if e.contains("NOSCRIPT") || e.to_lowercase().contains("no script") =>
            {
                self.conn = None;
                self.with(|c| pipe.query(c))?
            }
            other => other?,
        };
        let mut results = Vec::with_capacity(batch.len());
        for (w, v) in batch.iter().zip(values) {
            let r = match (w, v) {
                (Write::Append(_), Value::Array(a)) if a.len() == 2 => {
                    let new = matches!(a[0], Value::Int(1));
                    let payload = text(&a[1]).unwrap_or_default();
                    if new {
                        WriteResult::Appended(Appended::New {
                            offset: payload.parse().map_err(backend)?,
                        })
                    } else {
                        let (o, t) = payload.split_once(',').unwrap_or((&payload, "0"));
                        WriteResult::Appended(Appended::Duplicate {
                            offset: o.parse().map_err(backend)?,
                            ts: t.parse().unwrap_or(0),
                        })
                    }
                }
                (Write::Receipt { .. }, Value::Array(a)) if a.len() == 2 => {
                    let n = |v: &Value| match v {
                        Value::Int(i) => *i as u64,
                        _ => 0,
                    };
                    WriteResult::Receipt {
                        prev_delivered: n(&a[0]),
                        prev_read: n(&a[1]),
                    }
                }
                (Write::Append(_) | Write::Receipt { .. }, other) => {
                    return Err(StoreError::Corrupt(format!(
                        "unexpected script reply {other:?}"
                    )));
                }
                _ => WriteResult::Done,
            };
            results.push(r);
        }
        Ok(results)
    }

    fn history(
        &mut self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let end = match before {
            Some(0) | Some(1) => return Ok(Vec::new()),
            Some(b) => format!("{}-1", b - 1),
            None => "+".to_string(),
        };
        let key = format!("log:{channel}");
        let v: Value = self.with(|c| {
            redis::cmd("XREVRANGE")
                .arg(&key)
                .arg(&end)
                .arg("-")
                .arg("COUNT")
                .arg(limit)
                .query(c)
        })?;
        Self::parse_entries(channel, v)
    }

    fn read_after(
        &mut self,
        channel: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let key = format!("log:{channel}");
        let start = format!("{}-0", after.saturating_add(1));
        let v: Value = self.with(|c| {
            redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(limit)
                .query(c)
        })?;
        Self::parse_entries(channel, v)
    }

    fn last_offset(&mut self, channel: &str) -> Result<u64> {
        let v: Option<u64> =
            self.with(|c| redis::cmd("GET").arg(format!("offset:{channel}")).query(c))?;
        Ok(v.unwrap_or(0))
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
        let key = format!("user:{user}:offline_messages");
        // Entries of a conversation the user has left since they were queued are skipped, and read past, so
        // they never hold back the entries behind them.
        let page = limit.min(10_000);
        let mut members: HashMap<String, Option<Vec<String>>> = HashMap::new();
        let mut parsed: Vec<(String, u64)> = Vec::new();
        let mut start = 0usize;
        // The whole list is read (ids only, paged by LRANGE): pages must follow (channel, offset) order, which
        // is not the list's order across channels.
        loop {
            let entries: Vec<String> = self.with(|c| {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(start)
                    .arg(start + page - 1)
                    .query(c)
            })?;
            let read = entries.len();
            let entries: Vec<(String, u64)> = entries
                .iter()
                .filter_map(|e| {
                    let (ch, off) = e.split_once('\t')?;
                    Some((ch.to_string(), off.parse().ok()?))
                })
                .collect();
            let unknown: BTreeSet<&str> = entries
                .iter()
                .filter_map(|(ch, _)| conversation_of(ch))
                .filter(|id| !members.contains_key(*id))
                .collect();
            if !unknown.is_empty() {
                let mut pipe = redis::pipe();
                for id in &unknown {
                    pipe.cmd("HGET").arg("conversations").arg(*id);
                }
                let got: Vec<Option<String>> = self.with(|c| pipe.query(c))?;
                for (id, json) in unknown.into_iter().zip(got) {
                    let m = json
                        .map(|j| serde_json::from_str(&j))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    members.insert(id.to_string(), m);
                }
            }
            for (ch, off) in entries {
                let m = conversation_of(&ch).and_then(|id| members.get(id)?.as_deref());
                if still_member(m, user) && after.is_none_or(|a| (ch.as_str(), off) > a) {
                    parsed.push((ch, off));
                }
            }
            if read < page {
                break;
            }
            start += read;
        }
        parsed.sort();
        parsed.dedup();
        parsed.truncate(limit);
        if parsed.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (ch, off) in &parsed {
            pipe.cmd("XRANGE")
                .arg(format!("log:{ch}"))
                .arg(format!("{off}-1"))
                .arg(format!("{off}-1"));
        }
        let values: Vec<Value> = self.with(|c| pipe.query(c))?;
        let mut out = Vec::with_capacity(parsed.len());
        for ((ch, _), v) in parsed.iter().zip(values) {
            out.extend(Self::parse_entries(ch, v)?);
        }
        Ok(out)
    }

    fn conversations(&mut self) -> Result<Vec<(String, Vec<String>)>> {
        let all: Vec<(String, String)> =
            self.with(|c| redis::cmd("HGETALL").arg("conversations").query(c))?;
        all.into_iter()
            .map(|(id, m)| {
                Ok((
                    id,
                    serde_json::from_str(&m).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ))
            })
            .collect()
    }

    fn receipts(&mut self, conversation: &str) -> Result<Vec<Receipts>> {
        let all: Vec<(String, String)> = self.with(|c| {
            redis::cmd("HGETALL")
                .arg(format!("receipts:{conversation}"))
                .query(c)
        })?;
        Ok(all
            .into_iter()
            .map(|(member, v)| {
                let (d, r) = v.split_once(',').unwrap_or(("0", "0"));
                Receipts {
                    member,
                    delivered: d.parse().unwrap_or(0),
                    read: r.parse().unwrap_or(0),
                }
            })
            .collect())
    }

    fn devices(&mut self, user: &str) -> Result<Vec<(String, String)>> {
        let all: Vec<String> = self.with(|c| {
            redis::cmd("SMEMBERS")
                .arg(format!("devices:{user}"))
                .query(c)
        })?;
        Ok(all
            .into_iter()
            .filter_map(|e| {
                e.split_once('\t')
                    .map(|(p, t)| (p.to_string(), t.to_string()))
            })
            .collect())
    }
}
