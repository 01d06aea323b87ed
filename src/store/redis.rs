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
//! | presence | `presence:user:{id}`, a hash node → the lease token of the node instance that wrote it; counts while `corelay:lease:{node}` holds that token |
//! | device owners | `device_owner:{platform}\t{token}` = user (a token belongs to one user) |
//! | push rows | `push:row:{kind}:{user}\t{conversation}`, a hash `upto`, `from`, `count`, `due`, `attempts` and `preview` (absent: none); kind `1` alert, `2` clear |
//! | push due index | `push:due`, a sorted set of `{kind}\t{user}\t{conversation}` scored by the row's due time (ms): every row is in it |
//! | alerted conversations | `push:alerted`, a hash `{user}\t{conversation}` → highest offset an alert was pushed for |
//!
//! Each append is one Lua script (dedupe check, `INCR`, `XADD`, dedupe record, offline queueing for members
//! with no live presence on any node, the members' push rows), so it is atomic however many nodes append to one
//! conversation. A receipt's script also fulfils the alert row it covers and creates the clear row of a read
//! of an alerted conversation; push writes (`PushDone`, `PushRetry`, `PushDrop`) and device registrations (with
//! the token's owner) are one script each. A group commit sends all of its scripts in one pipeline: one round
//! trip. A claim ([`Store::push_claim`]) is one script too: the due rows off `push:due`, each re-checked and
//! leased, so whichever nodes claim at once, a row goes to exactly one of them per lease. A new message's due
//! time is the member's `online_due_ms` when the script finds them live on any node, else `due_ms`. Ids and
//! tokens never hold a tab (ids are `[A-Za-z0-9_.@-]`, tokens printable ASCII), so it separates the parts of
//! push keys. Device tokens registered before `device_owner` existed have no owner entry: they move only once
//! registered again. Durability is Redis's: run it with `appendonly yes` and `appendfsync always` for "sent =
//! on disk", or `everysec` to trade up to a second of acknowledged messages for throughput
//! (docs/OPERATIONS.md). Replication is Redis's too, asynchronous: with `--redis-min-replicas N` a group commit
//! ends with `WAIT N timeout` in the same pipeline, and fails (retryable) unless N replicas have it, so a
//! failover to one of them loses nothing acknowledged.
//!
//! Redis Cluster: every key of a channel would carry the channel in a hash tag (`log:{conversation:c1}`) so the
//! script's keys land in one slot; the offline queue and presence keys are per user and touched by separate
//! scripts. This store targets a single Redis (with replicas/Sentinel for failover).
//!
//! Longer than 600 lines: the whole `Store` trait over Redis, most of it the Lua scripts that make each write
//! atomic (one script per write kind); the last 340 lines are tests against a real redis-server (one with a
//! replica).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use redis::{Client, Connection, Value};

use super::{
    Appended, PushJob, PushKind, PushRow, ReceiptState, Receipts, Result, Store, StoreError,
    StoredMessage, Write, WriteResult, conversation_of, still_member,
};

/// Lua helpers for push rows (see the key table): `num(n)` formats a number as an integer (Lua's own `..` would
/// write large ones in exponent form), `push_get(kind, u, c)` reads a row (nil when absent), `push_put` writes
/// one and its due index entry, `push_remove` deletes both.
macro_rules! push_lua {
    () => {
        r#"
local function num(n) return string.format('%.0f', n) end
local function push_member(kind, u, c) return kind .. '\t' .. u .. '\t' .. c end
local function push_key(kind, u, c) return 'push:row:' .. kind .. ':' .. u .. '\t' .. c end
local function push_get(kind, u, c)
  local h = redis.call('HGETALL', push_key(kind, u, c))
  if #h == 0 then return nil end
  local r = {}
  for i = 1, #h, 2 do r[h[i]] = h[i + 1] end
  return {upto = tonumber(r.upto) or 0, from = r.from or '', count = tonumber(r.count) or 0,
          due = tonumber(r.due) or 0, attempts = tonumber(r.attempts) or 0, preview = r.preview}
end
local function push_put(kind, u, c, row)
  local key = push_key(kind, u, c)
  redis.call('HSET', key, 'upto', num(row.upto), 'from', row.from, 'count', num(row.count),
             'due', num(row.due), 'attempts', num(row.attempts))
  if row.preview then redis.call('HSET', key, 'preview', row.preview) else redis.call('HDEL', key, 'preview') end
  redis.call('ZADD', 'push:due', num(row.due), push_member(kind, u, c))
end
local function push_remove(kind, u, c)
  redis.call('DEL', push_key(kind, u, c))
  redis.call('ZREM', 'push:due', push_member(kind, u, c))
end
"#
    };
}

/// One append. `ARGV`: channel, sender, client id, ts, JSON, dedupe TTL, stream cap, the conversation id ('' for
/// other channels), the number of offline users, those users, then five per push obligation: user, due, due when
/// live on some node, whether there is a preview ('1' or '0'), the preview.
const APPEND: &str = concat!(
    push_lua!(),
    r#"
local ch, from, cid, ts, json = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, maxlen = tonumber(ARGV[6]), tonumber(ARGV[7])
local conv, noff = ARGV[8], tonumber(ARGV[9])
local dkey = nil
if from ~= '' and cid ~= '' then
  dkey = 'dedupe:' .. from .. ':' .. ch .. ':' .. cid
  local d = redis.call('GET', dkey)
  if d then
    -- A retry. Write anyway (the TTL again, a write that replicates): with --redis-min-replicas the commit's
    -- WAIT waits for this connection's last replicated write, and a reply that wrote nothing would leave
    -- that at an older write (or at none after a reconnect, or when the first try came through another
    -- node), acking a message the replicas may not have. Replication is in order, so once this write is
    -- on a replica the original append is too. (Redis 7.0 happens to wait for its current offset after any
    -- script, but WAIT is documented for the client's last write: this does not rely on the former.)
    redis.call('EXPIRE', dkey, ttl)
    return {0, d}
  end
end
local off = redis.call('INCR', 'offset:' .. ch)
if maxlen > 0 then
  redis.call('XADD', 'log:' .. ch, 'MAXLEN', '~', maxlen, off .. '-1', 'f', from, 't', ts, 'j', json)
else
  redis.call('XADD', 'log:' .. ch, off .. '-1', 'f', from, 't', ts, 'j', json)
end
if dkey then redis.call('SET', dkey, off .. ',' .. ts, 'EX', ttl) end
-- A user is live while a node instance that wrote one of its presence fields (node -> that instance's lease
-- token) still holds its lease. A field whose node's lease is held by another instance is stale (that node
-- restarted) and removed; one whose lease is missing is kept (the node may be cut off from Redis and come back
-- with the same token) but does not count.
local function live(u)
  local key = 'presence:user:' .. u
  local p = redis.call('HGETALL', key)
  local found = false
  for j = 1, #p, 2 do
    local held = redis.call('GET', 'corelay:lease:' .. p[j])
    if held == p[j + 1] then
      found = true
    elseif held then
      redis.call('HDEL', key, p[j])
    end
  end
  return found
end
for i = 10, 9 + noff do
  local u = ARGV[i]
  if not live(u) then redis.call('RPUSH', 'user:' .. u .. ':offline_messages', ch .. '\t' .. off) end
end
if conv ~= '' then
  for i = 10 + noff, #ARGV - 4, 5 do
    local u = ARGV[i]
    local due = tonumber(ARGV[i + 1])
    -- The node already counted the member live (here, or elsewhere by its presence cache): no check.
    if due < tonumber(ARGV[i + 2]) and live(u) then due = tonumber(ARGV[i + 2]) end
    local preview = nil
    if ARGV[i + 3] == '1' then preview = ARGV[i + 4] end
    -- Collapse: one row per (member, conversation). A claimed row keeps its lease (its push is out; the
    -- rest follows).
    local old = push_get('1', u, conv)
    local row
    if old then
      local d = old.due
      if old.attempts == 0 then d = math.min(d, due) end
      row = {upto = off, from = from, count = math.min(old.count + 1, 4294967295), due = d,
             attempts = old.attempts, preview = preview}
    else
      row = {upto = off, from = from, count = 1, due = due, attempts = 0, preview = preview}
    end
    push_put('1', u, conv, row)
  end
end
return {1, tostring(off)}
"#
);

/// One receipt (`ARGV`: conversation id, member, 'read' or 'delivered', offset): moves the receipt forward,
/// removes the alert row it covers, and a read of an alerted conversation creates the clear row.
const RECEIPT: &str = concat!(
    push_lua!(),
    r#"
local conv, member, state, off = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = 'receipts:' .. conv
local cur = redis.call('HGET', key, member)
local d, r = 0, 0
if cur then
  local c = string.find(cur, ',')
  d, r = tonumber(string.sub(cur, 1, c - 1)), tonumber(string.sub(cur, c + 1))
end
local nd, nr = math.max(d, off), r
if state == 'read' then nr = math.max(r, off) end
-- Written even when unchanged (a retry after a refused commit): the commit's WAIT then covers the first write
-- too (see APPEND's dedupe hit).
if cur or nd ~= d or nr ~= r then redis.call('HSET', key, member, num(nd) .. ',' .. num(nr)) end
-- An ack on any device fulfils the alert it covers.
local alert = push_get('1', member, conv)
if alert and alert.upto <= nd then push_remove('1', member, conv) end
-- A read of an alerted conversation: tell the other devices to clear it.
if state == 'read' and nr > r then
  local mk = member .. '\t' .. conv
  local a = redis.call('HGET', 'push:alerted', mk)
  if a then
    push_put('2', member, conv, {upto = nr, from = '', count = 1, due = 0, attempts = 0, preview = nil})
    if nr >= (tonumber(a) or 0) then redis.call('HDEL', 'push:alerted', mk) end
  end
end
return {d, r}
"#
);

/// A push write (`ARGV`: 'done', 'retry' or 'drop', kind, user, conversation id, then `upto` (done, drop) or
/// the due time (retry), and for done the count pushed). A done alert marks the conversation alerted, or, when
/// the member has already read up to it (on another device), creates the clear row at once.
const PUSH_WRITE: &str = concat!(
    push_lua!(),
    r#"
local op, kind, u, c, a = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local row = push_get(kind, u, c)
if op == 'done' then
  if row then
    if row.upto <= a then
      push_remove(kind, u, c)
    else
      -- Newer messages arrived while this push was out: they are due now.
      row.count = math.max(1, row.count - tonumber(ARGV[6]))
      row.due = 0
      row.attempts = 0
      push_put(kind, u, c, row)
    end
  end
  if kind == '1' then
    local read = 0
    local cur = redis.call('HGET', 'receipts:' .. c, u)
    if cur then
      local comma = string.find(cur, ',')
      read = tonumber(string.sub(cur, comma + 1)) or 0
    end
    if read >= a then
      -- Read on another device while this alert was out: clear it at once.
      push_put('2', u, c, {upto = read, from = '', count = 1, due = 0, attempts = 0, preview = nil})
    else
      local mk = u .. '\t' .. c
      local old = tonumber(redis.call('HGET', 'push:alerted', mk) or '0') or 0
      redis.call('HSET', 'push:alerted', mk, num(math.max(old, a)))
    end
  end
elseif op == 'retry' then
  if row then
    row.due = a
    push_put(kind, u, c, row)
  end
elseif op == 'drop' then
  if row and row.upto <= a then push_remove(kind, u, c) end
end
return 0
"#
);

/// Claims the rows due at `ARGV[1]` (ms) for `ARGV[2]` ms, at most `ARGV[3]` of them: each comes back as
/// kind, user, conversation, upto, from, count, due, attempts, '1'/'0' (preview or not), preview, and the
/// user's devices (`platform\ttoken`).
const PUSH_CLAIM: &str = concat!(
    push_lua!(),
    r#"
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', 'push:due', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, m in ipairs(due) do
  local t1 = string.find(m, '\t', 1, true)
  local t2 = t1 and string.find(m, '\t', t1 + 1, true)
  if t2 then
    local kind, u, c = string.sub(m, 1, t1 - 1), string.sub(m, t1 + 1, t2 - 1), string.sub(m, t2 + 1)
    local row = push_get(kind, u, c)
    if not row then
      redis.call('ZREM', 'push:due', m)
    elseif row.due <= now then
      row.due = now + lease
      row.attempts = row.attempts + 1
      push_put(kind, u, c, row)
      local has, preview = '0', ''
      if row.preview then has, preview = '1', row.preview end
      out[#out + 1] = {kind, u, c, num(row.upto), row.from, num(row.count), num(row.due),
                       num(row.attempts), has, preview, redis.call('SMEMBERS', 'devices:' .. u)}
    end
  else
    redis.call('ZREM', 'push:due', m)
  end
end
return out
"#
);

/// Registers a device (`ARGV`: user, platform, token); a token registered to another user moves.
const PUT_DEVICE: &str = r#"
local u, dev = ARGV[1], ARGV[2] .. '\t' .. ARGV[3]
local okey = 'device_owner:' .. dev
local o = redis.call('GET', okey)
if o and o ~= u then redis.call('SREM', 'devices:' .. o, dev) end
redis.call('SET', okey, u)
redis.call('SADD', 'devices:' .. u, dev)
return 0
"#;

/// Forgets a device (`ARGV`: user, platform, token), and its owner entry when it was this user's.
const DELETE_DEVICE: &str = r#"
local u, dev = ARGV[1], ARGV[2] .. '\t' .. ARGV[3]
local okey = 'device_owner:' .. dev
if redis.call('SREM', 'devices:' .. u, dev) == 1 and redis.call('GET', okey) == u then
  redis.call('DEL', okey)
else
  -- Already gone (a retry after a refused commit): write something that replicates, so that the commit's
  -- WAIT covers the first try's removal (see APPEND's dedupe hit). Only the commit's WAIT reads it.
  redis.call('INCR', 'corelay:replicated')
end
return 0
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
    /// `--redis-min-replicas`: a commit succeeds only once this many replicas have its writes (`WAIT`); 0 =
    /// acknowledged when the master has them (Redis's asynchronous replication).
    pub min_replicas: u32,
    /// `--redis-replica-timeout`: how long a commit's `WAIT` waits for them before the commit fails.
    pub replica_timeout: Duration,
}

impl RedisConfig {
    /// No replica waits (the master's acknowledgement is enough), dedupe records kept a week, topics capped
    /// at `topic_maxlen`.
    pub fn new(url: impl Into<String>, topic_maxlen: usize) -> Self {
        RedisConfig {
            url: url.into(),
            dedupe_ttl: Duration::from_secs(7 * 24 * 3600),
            topic_maxlen,
            min_replicas: 0,
            replica_timeout: Duration::from_secs(1),
        }
    }
}

pub struct RedisStore {
    client: Client,
    conn: Option<Connection>,
    cfg: RedisConfig,
    append: redis::Script,
    receipt: redis::Script,
    trim: redis::Script,
    put_conversation: redis::Script,
    push_write: redis::Script,
    push_claim: redis::Script,
    put_device: redis::Script,
    delete_device: redis::Script,
    /// Commits refused because fewer than `min_replicas` replicas acknowledged them in time.
    replication_timeouts: std::sync::Arc<std::sync::atomic::AtomicU64>,
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

/// A push row's hash key (see the key table).
fn row_key(kind: PushKind, user: &str, conversation: &str) -> String {
    format!("push:row:{}:{user}\t{conversation}", kind as u8)
}

/// (kind, user, conversation) of a `push:due` member.
fn parse_member(m: &str) -> Option<(PushKind, String, String)> {
    let (kind, rest) = m.split_once('\t')?;
    let (u, c) = rest.split_once('\t')?;
    Some((
        PushKind::from_u8(kind.parse().ok()?)?,
        u.to_string(),
        c.to_string(),
    ))
}

/// A number as the scripts write it (`%.0f`): an integer, saturating past `u64::MAX`.
fn number(s: &str) -> Result<u64> {
    s.parse::<u64>().or_else(|_| {
        s.parse::<f64>()
            .ok()
            .filter(|f| *f >= 0.0)
            .map(|f| f as u64)
            .ok_or_else(|| StoreError::Corrupt(format!("push row number {s:?}")))
    })
}

fn row_of(
    kind: PushKind,
    user: String,
    conversation: String,
    h: &HashMap<String, String>,
) -> Result<PushRow> {
    let n = |f: &str| h.get(f).map_or(Ok(0), |v| number(v));
    Ok(PushRow {
        kind,
        upto: n("upto")?,
        from: h.get("from").cloned().unwrap_or_default(),
        count: n("count")?.min(u32::MAX as u64) as u32,
        due_ms: n("due")?,
        attempts: n("attempts")?.min(u32::MAX as u64) as u32,
        preview: h.get("preview").cloned(),
        user,
        conversation,
    })
}

/// One job of the claim script's reply (see [`PUSH_CLAIM`]).
fn parse_job(v: &Value) -> Result<PushJob> {
    let bad = || StoreError::Corrupt(format!("push claim job {v:?}"));
    let Value::Array(f) = v else {
        return Err(bad());
    };
    if f.len() != 11 {
        return Err(bad());
    }
    let t = |i: usize| text(&f[i]).ok_or_else(bad);
    let kind = PushKind::from_u8(t(0)?.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    let mut h = HashMap::new();
    for (i, name) in [
        (3, "upto"),
        (4, "from"),
        (5, "count"),
        (6, "due"),
        (7, "attempts"),
    ] {
        h.insert(name.to_string(), t(i)?);
    }
    if t(8)? == "1" {
        h.insert("preview".to_string(), t(9)?);
    }
    let devices = match &f[10] {
        Value::Array(d) => d
            .iter()
            .filter_map(|e| {
                let e = text(e)?;
                let (p, tok) = e.split_once('\t')?;
                Some((p.to_string(), tok.to_string()))
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(PushJob {
        row: row_of(kind, t(1)?, t(2)?, &h)?,
        devices,
    })
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
            push_write: redis::Script::new(PUSH_WRITE),
            push_claim: redis::Script::new(PUSH_CLAIM),
            put_device: redis::Script::new(PUT_DEVICE),
            delete_device: redis::Script::new(DELETE_DEVICE),
            replication_timeouts: Default::default(),
        };
        s.conn()?;
        Ok(s)
    }

    /// Counts the commits refused for want of replicas in `counter` (`/metrics`) from now on.
    pub fn count_replication_timeouts_in(
        mut self,
        counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.replication_timeouts = counter;
        self
    }

    /// The connection, reconnecting (and reloading the scripts) after a failure.
    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            let mut c = self
                .client
                .get_connection_with_timeout(Duration::from_secs(2))
                .map_err(unavailable)?;
            // A commit's WAIT blocks for up to `replica_timeout` before Redis answers.
            let read_timeout = Duration::from_secs(5)
                + if self.cfg.min_replicas > 0 {
                    self.cfg.replica_timeout
                } else {
                    Duration::ZERO
                };
            c.set_read_timeout(Some(read_timeout))
                .map_err(unavailable)?;
            c.set_write_timeout(Some(Duration::from_secs(5)))
                .map_err(unavailable)?;
            for s in [
                &self.append,
                &self.receipt,
                &self.trim,
                &self.put_conversation,
                &self.push_write,
                &self.push_claim,
                &self.put_device,
                &self.delete_device,
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

    /// The node-id lease of `node_id` (held by the backplane's `lease`; read by the append script's presence
    /// check, which counts an entry while the lease holds the token the entry carries).
    pub fn lease_key(node_id: &str) -> String {
        format!("corelay:lease:{node_id}")
    }

    /// The presence hash of `user` (cluster presence; see the module doc).
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
                Write::PushDone {
                    kind,
                    user,
                    conversation,
                    upto,
                    count,
                } => {
                    let mut inv = self.push_write.prepare_invoke();
                    inv.arg("done")
                        .arg(*kind as u8)
                        .arg(user)
                        .arg(conversation)
                        .arg(*upto)
                        .arg(*count);
                    pipe.invoke_script(&inv);
                }
                Write::PushRetry {
                    kind,
                    user,
                    conversation,
                    due_ms,
                } => {
                    let mut inv = self.push_write.prepare_invoke();
                    inv.arg("retry")
                        .arg(*kind as u8)
                        .arg(user)
                        .arg(conversation)
                        .arg(*due_ms);
                    pipe.invoke_script(&inv);
                }
                Write::PushDrop {
                    kind,
                    user,
                    conversation,
                    upto,
                } => {
                    let mut inv = self.push_write.prepare_invoke();
                    inv.arg("drop")
                        .arg(*kind as u8)
                        .arg(user)
                        .arg(conversation)
                        .arg(*upto);
                    pipe.invoke_script(&inv);
                }
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
                    // Push obligations are a conversation message's only.
                    let conv = conversation_of(&m.channel).unwrap_or("");
                    inv.arg(conv).arg(m.offline.len());
                    for u in &m.offline {
                        inv.arg(u);
                    }
                    if !conv.is_empty() {
                        for p in &m.push {
                            inv.arg(&p.user)
                                .arg(p.due_ms)
                                .arg(p.online_due_ms)
                                .arg(if p.preview.is_some() { "1" } else { "0" })
                                .arg(p.preview.as_deref().unwrap_or(""));
                        }
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
                    let mut inv = self.put_device.prepare_invoke();
                    inv.arg(user).arg(platform).arg(token);
                    pipe.invoke_script(&inv);
                }
                Write::DeleteDevice {
                    user,
                    platform,
                    token,
                } => {
                    let mut inv = self.delete_device.prepare_invoke();
                    inv.arg(user).arg(platform).arg(token);
                    pipe.invoke_script(&inv);
                }
            }
        }
        // --redis-min-replicas: the last command, so one round trip. `WAIT` waits until the replicas have this
        // connection's last replicated write, which is this pipeline's last write, and so everything before it
        // (replication is in order). Every script a client's answer depends on writes, even a retry that finds
        // its work done (see APPEND); push bookkeeping and offline trims may write nothing, and nobody is
        // answered on their account.
        let min = self.cfg.min_replicas;
        let wait = min > 0 && !batch.is_empty();
        if wait {
            pipe.cmd("WAIT")
                .arg(min)
                .arg(self.cfg.replica_timeout.as_millis().max(1) as u64);
        }
        let mut values: Vec<Value> = match self.with(|c| pipe.query(c)) {
            // Redis restarted and lost its script cache: reconnect (which reloads them) and retry once. Every
            // write is a script, so the failed pipeline ran none of them.
            Err(StoreError::Unavailable(e))
                if e.contains("NOSCRIPT") || e.to_lowercase().contains("no script") =>
            {
                self.conn = None;
                self.with(|c| pipe.query(c))?
            }
            other => other?,
        };
        if wait {
            let acked = match values.pop() {
                Some(Value::Int(n)) => n,
                other => return Err(StoreError::Corrupt(format!("WAIT reply {other:?}"))),
            };
            if acked < i64::from(min) {
                // The writes are on the master, maybe on some replicas: not acknowledged, so the senders
                // retry (a message with a client id is not stored twice: the retry finds its dedupe record).
                self.replication_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "not replicated: {acked} of {min} replicas acknowledged within {}",
                    humantime::format_duration(self.cfg.replica_timeout)
                )));
            }
        }
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

    fn last_offsets(&mut self, channels: &[&str]) -> Vec<Result<u64>> {
        let mut pipe = redis::pipe();
        for ch in channels {
            pipe.cmd("GET").arg(format!("offset:{ch}"));
        }
        match self.with(|c| pipe.query::<Vec<Option<u64>>>(c)) {
            Ok(v) => v.into_iter().map(|o| Ok(o.unwrap_or(0))).collect(),
            Err(e) => channels.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn offline_empty(&mut self, users: &[&str]) -> Vec<Result<bool>> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("EXISTS").arg(format!("user:{u}:offline_messages"));
        }
        match self.with(|c| pipe.query::<Vec<u64>>(c)) {
            Ok(v) => v.into_iter().map(|n| Ok(n == 0)).collect(),
            Err(e) => users.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn read_after_many(&mut self, reads: &[(&str, u64, usize)]) -> Vec<Result<Vec<StoredMessage>>> {
        let mut pipe = redis::pipe();
        for (ch, after, limit) in reads {
            pipe.cmd("XRANGE")
                .arg(format!("log:{ch}"))
                .arg(format!("{}-0", after.saturating_add(1)))
                .arg("+")
                .arg("COUNT")
                .arg(*limit);
        }
        match self.with(|c| pipe.query::<Vec<Value>>(c)) {
            Ok(v) => reads
                .iter()
                .zip(v)
                .map(|((ch, _, _), v)| Self::parse_entries(ch, v))
                .collect(),
            Err(e) => reads.iter().map(|_| Err(e.clone())).collect(),
        }
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

    fn push_claim(&mut self, now_ms: u64, lease_ms: u64, limit: usize) -> Result<Vec<PushJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mut inv = self.push_claim.prepare_invoke();
        inv.arg(now_ms).arg(lease_ms).arg(limit);
        pipe.invoke_script(&inv);
        drop(inv);
        let (v,): (Value,) = match self.with(|c| pipe.query(c)) {
            // Redis lost its script cache: reconnect (which reloads the scripts) and retry once.
            Err(StoreError::Unavailable(e))
                if e.contains("NOSCRIPT") || e.to_lowercase().contains("no script") =>
            {
                self.conn = None;
                self.with(|c| pipe.query(c))?
            }
            other => other?,
        };
        let Value::Array(jobs) = v else {
            return Err(StoreError::Corrupt(format!("push claim reply {v:?}")));
        };
        jobs.iter().map(parse_job).collect()
    }

    fn push_rows(&mut self) -> Result<Vec<PushRow>> {
        // ZSCAN, not ranks: claims move rows within `push:due` meanwhile, and a scan still returns every member
        // that stays in the set throughout (perhaps twice: deduplicated).
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, flat): (u64, Vec<String>) = self.with(|c| {
                redis::cmd("ZSCAN")
                    .arg("push:due")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)
            })?;
            // Member, score, member, score…
            let ids: Vec<(PushKind, String, String)> = flat
                .iter()
                .step_by(2)
                .filter(|m| seen.insert((*m).clone()))
                .filter_map(|m| parse_member(m))
                .collect();
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                for (kind, u, c) in &ids {
                    pipe.cmd("HGETALL").arg(row_key(*kind, u, c));
                }
                let got: Vec<HashMap<String, String>> = self.with(|c| pipe.query(c))?;
                for ((kind, u, c), h) in ids.into_iter().zip(got) {
                    // Removed since the index was read.
                    if h.is_empty() {
                        continue;
                    }
                    out.push(row_of(kind, u, c, &h)?);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewMessage, PushFor};
    use std::process::{Child, Command, Stdio};

    /// A throwaway `redis-server` (`tests/run.sh` installs it; without one these tests fail, saying so).
    struct Server {
        child: Child,
        port: u16,
        dir: std::path::PathBuf,
    }

    impl Server {
        fn start(name: &str) -> Server {
            Server::start_with(name, &[])
        }

        /// With more `redis-server` arguments (`--replicaof 127.0.0.1 PORT`).
        fn start_with(name: &str, args: &[&str]) -> Server {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let dir = std::env::temp_dir()
                .join(format!("corelay-redis-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a temp dir");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0"])
                .args(args)
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server (apt-get install redis-server; tests/run.sh does)");
            Server { child, port, dir }
        }

        fn store(&self) -> RedisStore {
            self.store_waiting(0, Duration::from_secs(1))
        }

        /// `STOP`, `CONT`: freezes and resumes the server.
        fn signal(&self, sig: &str) {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &self.child.id().to_string()])
                .status();
        }

        fn store_waiting(&self, min_replicas: u32, replica_timeout: Duration) -> RedisStore {
            let cfg = RedisConfig {
                url: format!("redis://127.0.0.1:{}", self.port),
                dedupe_ttl: Duration::from_secs(3600),
                topic_maxlen: 1000,
                min_replicas,
                replica_timeout,
            };
            for _ in 0..200 {
                if let Ok(s) = RedisStore::connect(cfg.clone()) {
                    return s;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            panic!("redis-server did not come up");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn message(conv: &str, cid: &str, push: Vec<PushFor>) -> Write {
        Write::Append(NewMessage {
            channel: format!("conversation:{conv}"),
            from: Some("alice".into()),
            client_id: Some(cid.into()),
            ts: 1,
            json: "{}".into(),
            offline: Vec::new(),
            push,
        })
    }

    fn push_for(user: &str, due_ms: u64, online_due_ms: u64, preview: Option<&str>) -> PushFor {
        PushFor {
            user: user.into(),
            due_ms,
            online_due_ms,
            preview: preview.map(str::to_string),
        }
    }

    #[test]
    fn a_member_live_on_any_node_gets_the_online_due_time() {
        let server = Server::start("presence");
        let mut s = server.store();
        // Bob is live on node-b (its lease holds the token of the instance that wrote his entry). Carol's
        // entry is from an instance of node-c that died (node-c's lease is gone), Dave's from an instance of
        // node-d that was replaced (node-d's lease holds another token): neither counts, and Dave's stale
        // field is removed.
        let _: () = s
            .with(|c| {
                redis::pipe()
                    .cmd("SET")
                    .arg(RedisStore::lease_key("node-b"))
                    .arg("tb")
                    .ignore()
                    .cmd("HSET")
                    .arg(RedisStore::presence_key("bob"))
                    .arg("node-b")
                    .arg("tb")
                    .ignore()
                    .cmd("HSET")
                    .arg(RedisStore::presence_key("carol"))
                    .arg("node-c")
                    .arg("tc")
                    .ignore()
                    .cmd("SET")
                    .arg(RedisStore::lease_key("node-d"))
                    .arg("td-new")
                    .ignore()
                    .cmd("HSET")
                    .arg(RedisStore::presence_key("dave"))
                    .arg("node-d")
                    .arg("td-old")
                    .ignore()
                    .query(c)
            })
            .unwrap();
        let big_due = 1_700_000_000_123_u64;
        s.commit(&[message(
            "c1",
            "m1",
            vec![
                push_for("bob", 1000, big_due, Some("hi\tthere")),
                push_for("carol", 1000, big_due, None),
                push_for("dave", 1000, big_due, None),
                // Erin has no entry at all, but the node counted her live (its presence cache): no check.
                push_for("erin", big_due, big_due, None),
            ],
        )])
        .unwrap();
        let mut rows = s.push_rows().unwrap();
        rows.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(
            rows.iter()
                .map(|r| (r.user.as_str(), r.due_ms, r.preview.as_deref()))
                .collect::<Vec<_>>(),
            [
                ("bob", big_due, Some("hi\tthere")),
                ("carol", 1000, None),
                ("dave", 1000, None),
                ("erin", big_due, None)
            ],
            "large times are kept exactly; a preview may hold any text"
        );
        let fields = |s: &mut RedisStore, u: &str| -> Vec<String> {
            s.with(|c| {
                redis::cmd("HKEYS")
                    .arg(RedisStore::presence_key(u))
                    .query(c)
            })
            .unwrap()
        };
        assert_eq!(fields(&mut s, "bob"), ["node-b"]);
        assert_eq!(
            fields(&mut s, "carol"),
            ["node-c"],
            "kept: its node may come back"
        );
        assert!(
            fields(&mut s, "dave").is_empty(),
            "a replaced instance's entry is removed"
        );
        // A later message for the live member keeps the earlier due time, and its preview.
        s.commit(&[message(
            "c1",
            "m2",
            vec![push_for("bob", 1000, big_due + 5, Some("second"))],
        )])
        .unwrap();
        let bob = s
            .push_rows()
            .unwrap()
            .into_iter()
            .find(|r| r.user == "bob")
            .unwrap();
        assert_eq!(
            (bob.upto, bob.count, bob.due_ms, bob.preview.as_deref()),
            (2, 2, big_due, Some("second"))
        );
        // Claimed with the preview and the user's devices.
        s.commit(&[Write::PutDevice {
            user: "bob".into(),
            platform: "apns".into(),
            token: "phone".into(),
        }])
        .unwrap();
        let jobs = s.push_claim(big_due, 30_000, 10).unwrap();
        let job = jobs.iter().find(|j| j.row.user == "bob").unwrap();
        assert_eq!(job.row.preview.as_deref(), Some("second"));
        assert_eq!(job.row.due_ms, big_due + 30_000);
        assert_eq!(job.devices, [("apns".to_string(), "phone".to_string())]);
        assert_eq!(s.push_claim(big_due, 30_000, 0).unwrap(), []);
    }

    #[test]
    fn pipelined_reads_answer_as_one_by_one() {
        let server = Server::start("batched");
        crate::store::thread::check_batched_reads_match_one_by_one(&mut server.store());
    }

    #[test]
    fn nodes_claiming_at_once_get_each_row_exactly_once() {
        let server = Server::start("claim");
        let mut s = server.store();
        let n = 300;
        let writes: Vec<Write> = (0..n)
            .map(|i| {
                message(
                    &format!("c{i}"),
                    "m",
                    vec![push_for(&format!("u{i}"), i as u64, i as u64, None)],
                )
            })
            .collect();
        s.commit(&writes).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mut s = server.store();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        let jobs = s.push_claim(10_000, 60_000, 7).unwrap();
                        if jobs.is_empty() {
                            return got;
                        }
                        assert!(jobs.len() <= 7, "at most the limit");
                        got.extend(jobs.into_iter().map(|j| j.row.user));
                    }
                })
            })
            .collect();
        let mut all: Vec<String> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort();
        let mut want: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
        want.sort();
        assert_eq!(all, want, "every row claimed, none twice");
        assert!(s.push_rows().unwrap().iter().all(|r| r.attempts == 1));
        assert_eq!(s.push_claim(69_999, 60_000, 1000).unwrap(), [], "leased");
        assert_eq!(s.push_claim(70_000, 60_000, 1000).unwrap().len(), n);
    }

    #[test]
    fn forgetting_a_token_leaves_its_new_owner_alone() {
        let server = Server::start("owner");
        let mut s = server.store();
        let put = |u: &str| Write::PutDevice {
            user: u.into(),
            platform: "fcm".into(),
            token: "t".into(),
        };
        let delete = |u: &str| Write::DeleteDevice {
            user: u.into(),
            platform: "fcm".into(),
            token: "t".into(),
        };
        s.commit(&[put("erin"), put("fay"), delete("erin")])
            .unwrap();
        assert_eq!(s.devices("erin").unwrap(), []);
        assert_eq!(s.devices("fay").unwrap().len(), 1);
        // Still fay's: registering it for gus moves it from her.
        s.commit(&[put("gus")]).unwrap();
        assert_eq!(s.devices("fay").unwrap(), []);
        assert_eq!(s.devices("gus").unwrap().len(), 1);
        s.commit(&[delete("gus")]).unwrap();
        let owner: Option<String> = s
            .with(|c| redis::cmd("GET").arg("device_owner:fcm\tt").query(c))
            .unwrap();
        assert_eq!(owner, None, "the owner entry goes with its device");
    }

    /// `WAIT` waits for the connection's last replicated write. A retry whose script finds its work done (a
    /// dedupe hit, a receipt already there) must still write, or on a fresh connection (a reconnect, another
    /// node) `WAIT` would count a frozen replica that never got the first try as having it.
    #[test]
    fn a_retry_that_finds_its_write_done_still_waits_for_the_replicas() {
        let master = Server::start("wait-master");
        let port = master.port.to_string();
        let replica = Server::start_with("wait-replica", &["--replicaof", "127.0.0.1", &port]);
        let timeout = Duration::from_millis(300);
        let mut a = master.store_waiting(1, timeout);
        let receipt = Write::Receipt {
            conversation: "w".into(),
            member: "bob".into(),
            state: ReceiptState::Read,
            offset: 2,
        };
        // Acknowledged once the replica has synced.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while a.commit(&[message("w", "m0", vec![])]).is_err() {
            assert!(std::time::Instant::now() < deadline, "replica never synced");
        }
        replica.signal("STOP");
        let not_replicated = |r: Result<Vec<WriteResult>>| match r {
            Err(StoreError::Unavailable(e)) => {
                assert_eq!(
                    e,
                    "not replicated: 0 of 1 replicas acknowledged within 300ms"
                );
            }
            other => panic!("acknowledged without the replica: {other:?}"),
        };
        let started = std::time::Instant::now();
        not_replicated(a.commit(&[message("w", "m1", vec![])]));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        not_replicated(a.commit(std::slice::from_ref(&receipt)));
        // The retries, each on a fresh connection: the first tries are on the master, not on the replica.
        not_replicated(
            master
                .store_waiting(1, timeout)
                .commit(&[message("w", "m1", vec![])]),
        );
        not_replicated(
            master
                .store_waiting(1, timeout)
                .commit(std::slice::from_ref(&receipt)),
        );
        // Counted (here: a's two, and any while the replica was syncing).
        assert!(
            a.replication_timeouts
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        );
        replica.signal("CONT");
        let mut b = master.store_waiting(1, Duration::from_secs(5));
        let r = b.commit(&[message("w", "m1", vec![]), receipt]).unwrap();
        assert!(
            matches!(
                r[0],
                WriteResult::Appended(Appended::Duplicate { offset: 2, .. })
            ),
            "{r:?}"
        );
        // Without min_replicas nothing waits: the master's word is enough.
        replica.signal("STOP");
        master
            .store()
            .commit(&[message("w", "m2", vec![])])
            .unwrap();
        replica.signal("CONT");
    }
}
