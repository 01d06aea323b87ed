//! The store thread: owns the [`Store`], turns queued writes into group commits, answers reads.
//!
//! Every request carries a token; every completion goes back to the backplane on an unbounded tokio channel
//! whose length is bounded by the backplane's own cap on requests in flight (`max_pending_writes`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::{Store, StoredMessage, Write, WriteResult};

pub type Token = u64;

#[derive(Debug)]
pub enum Request {
    Commit {
        token: Token,
        batch: Vec<Write>,
    },
    History {
        token: Token,
        channel: String,
        before: Option<u64>,
        limit: usize,
    },
    ReadAfter {
        token: Token,
        channel: String,
        after: u64,
        limit: usize,
    },
    /// A page of the user's offline queue, after `after` = (channel, offset) when continuing.
    Offline {
        token: Token,
        user: String,
        after: Option<(String, u64)>,
        limit: usize,
    },
    LastOffset {
        token: Token,
        channel: String,
    },
    Conversations {
        token: Token,
    },
    /// Several `ReadAfter`s answered as one `Messages` completion (channel by channel, each oldest first),
    /// at most `limit` messages in all.
    ReadMany {
        token: Token,
        reads: Vec<(String, u64)>,
        limit: usize,
    },
    /// Claims due push obligations ([`super::Store::push_claim`]).
    PushClaim {
        token: Token,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    },
}

#[derive(Debug)]
pub enum Completion {
    Committed {
        token: Token,
        result: Result<Vec<WriteResult>, super::StoreError>,
    },
    Messages {
        token: Token,
        result: Result<Vec<StoredMessage>, super::StoreError>,
    },
    Offset {
        token: Token,
        result: Result<u64, super::StoreError>,
    },
    Conversations {
        token: Token,
        result: Result<Vec<(String, Vec<String>)>, super::StoreError>,
    },
    PushJobs {
        token: Token,
        result: Result<Vec<super::PushJob>, super::StoreError>,
    },
}

/// Most writes folded into one transaction.
pub const MAX_GROUP: usize = 4096;

/// Most messages read from the store per call while a reply is assembled.
pub const READ_CHUNK: usize = 256;
/// Offline-queue entries read per call.
pub const OFFLINE_CHUNK: usize = 256;

/// How many messages to ask the store for next: as many as the rest of the byte budget holds at the average
/// size read so far (4 before anything is read), so a reply of large messages decodes about one message more
/// than it keeps, and small ones come in few calls.
fn next_chunk(read: usize, bytes: usize, max_bytes: usize, left: usize, cap: usize) -> usize {
    let want = match bytes.checked_div(read) {
        None => 4,
        Some(avg) => max_bytes.saturating_sub(bytes) / avg.max(1) + 1,
    };
    want.clamp(1, cap).min(left)
}

/// Replies are cut once they reach `max_bytes` of message JSON (at least one message always goes, so a reader
/// makes progress); the caller continues from the last offset it got.
fn over(bytes: usize, max_bytes: usize) -> bool {
    bytes >= max_bytes
}

/// Reads pages with `read(want, last message so far)` until `limit` messages or `max_bytes` of message JSON are
/// in (always at least one), or a page comes back short (the end). Each page asks for what the budget left
/// holds ([`next_chunk`]), at most `cap`.
fn paged(
    limit: usize,
    max_bytes: usize,
    cap: usize,
    mut read: impl FnMut(usize, Option<&StoredMessage>) -> super::Result<Vec<StoredMessage>>,
) -> super::Result<Vec<StoredMessage>> {
    let mut all: Vec<StoredMessage> = Vec::new();
    let mut bytes = 0;
    while all.len() < limit && !over(bytes, max_bytes) {
        let want = next_chunk(all.len(), bytes, max_bytes, limit - all.len(), cap);
        let page = read(want, all.last())?;
        let n = page.len();
        for m in page {
            if over(bytes, max_bytes) {
                return Ok(all);
            }
            bytes += m.json.len();
            all.push(m);
        }
        if n < want {
            break;
        }
    }
    Ok(all)
}

/// Up to `limit` messages of `channel` after `after`, oldest first, cut at `max_bytes`.
fn read_after_bounded(
    store: &mut dyn Store,
    channel: &str,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> super::Result<Vec<StoredMessage>> {
    paged(limit, max_bytes, READ_CHUNK, |want, last| {
        store.read_after(channel, last.map_or(after, |m| m.offset), want)
    })
}

/// Starts the thread. It ends when every sender of requests is dropped.
/// `max_bytes`: the most message JSON one read reply carries (see [`answer`]).
pub fn spawn(
    mut store: Box<dyn Store>,
    done: UnboundedSender<Completion>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    max_bytes: usize,
) -> std::io::Result<(mpsc::Sender<Request>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Request>();
    let handle = std::thread::Builder::new()
        .name("corelay-store".into())
        .spawn(move || {
            let mut commits: Vec<(Token, Vec<Write>)> = Vec::new();
            let mut reads: Vec<Request> = Vec::new();
            loop {
                // With interval fsync, wait for requests only until the oldest unsynced ack is due: a burst
                // followed by silence is made durable by this timer, not by the next commit.
                let first = match store.sync_deadline() {
                    Some(at) => {
                        match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                            Ok(r) => r,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                if let Err(e) = store.sync() {
                                    tracing::warn!(store = store.name(), error = %e, "interval fsync failed");
                                    metrics.store_errors.fetch_add(1, Relaxed);
                                }
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => {
                                let _ = store.sync();
                                break;
                            }
                        }
                    }
                    None => match rx.recv() {
                        Ok(r) => r,
                        Err(_) => break,
                    },
                };
                // Take everything that queued up while the last commit ran: that is the group.
                let mut next = Some(first);
                let mut writes = 0;
                while let Some(req) = next.take() {
                    match req {
                        Request::Commit { token, batch } => {
                            writes += batch.len();
                            commits.push((token, batch));
                        }
                        other => reads.push(other),
                    }
                    if writes < MAX_GROUP {
                        next = rx.try_recv().ok();
                    }
                }
                let failed = |ok: bool| {
                    if !ok {
                        metrics.store_errors.fetch_add(1, Relaxed);
                    }
                };
                if !commits.is_empty() {
                    failed(group_commit(&mut *store, &mut commits, &done));
                }
                for c in answer_all(&mut *store, &mut reads, max_bytes) {
                    failed(!matches!(
                        &c,
                        Completion::Messages { result: Err(_), .. }
                            | Completion::Offset { result: Err(_), .. }
                            | Completion::Conversations { result: Err(_), .. }
                            | Completion::PushJobs { result: Err(_), .. }
                    ));
                    let _ = done.send(c);
                }
            }
        })?;
    Ok((tx, handle))
}

/// Answers a group of reads (queued together, after the group's commits). The `LastOffset`s go to the store
/// as one [`Store::last_offsets`], the first pages of the `ReadAfter`s as one [`Store::read_after_many`], and
/// the starts of offline flushes ask [`Store::offline_empty`] first (one round trip each with Redis): after a connect storm a node has a sync read and a fill per followed
/// channel, and one round trip each kept a 16,000-connection node's store thread busy for over a minute on a
/// loaded host, with every publish queued behind. Reads do not depend on each other, so answering them out of
/// their queue order is safe (every completion carries its token).
pub fn answer_all(
    store: &mut dyn Store,
    reads: &mut Vec<Request>,
    max_bytes: usize,
) -> Vec<Completion> {
    let mut out = Vec::with_capacity(reads.len());
    let mut lasts: Vec<(Token, String)> = Vec::new();
    let mut afters: Vec<(Token, String, u64, usize)> = Vec::new();
    let mut flushes: Vec<Request> = Vec::new();
    for r in reads.drain(..) {
        match r {
            // The start of a user's flush: most queues are empty, which the store may tell for all at once.
            r @ Request::Offline { after: None, .. } => flushes.push(r),
            Request::LastOffset { token, channel } => lasts.push((token, channel)),
            Request::ReadAfter {
                token,
                channel,
                after,
                limit,
            } if limit > 0 => afters.push((token, channel, after, limit)),
            other => out.push(answer(store, other, max_bytes)),
        }
    }
    if !flushes.is_empty() {
        let users: Vec<&str> = flushes
            .iter()
            .map(|r| match r {
                Request::Offline { user, .. } => user.as_str(),
                _ => unreachable!("only offline reads are gathered here"),
            })
            .collect();
        let empty = store.offline_empty(&users);
        for (r, empty) in flushes.into_iter().zip(empty) {
            match (r, empty) {
                (Request::Offline { token, .. }, Ok(true)) => out.push(Completion::Messages {
                    token,
                    result: Ok(Vec::new()),
                }),
                (r, _) => out.push(answer(store, r, max_bytes)),
            }
        }
    }
    if !lasts.is_empty() {
        let chans: Vec<&str> = lasts.iter().map(|(_, c)| c.as_str()).collect();
        let results = store.last_offsets(&chans);
        for ((token, _), result) in lasts.iter().zip(results) {
            out.push(Completion::Offset {
                token: *token,
                result,
            });
        }
    }
    if !afters.is_empty() {
        // The first page of each, as `paged` would ask for it; the rest (rare: a channel with more new
        // messages than a first page) page on one by one.
        let wants: Vec<usize> = afters
            .iter()
            .map(|(_, _, _, limit)| next_chunk(0, 0, max_bytes, *limit, READ_CHUNK))
            .collect();
        let firsts = {
            let reqs: Vec<(&str, u64, usize)> = afters
                .iter()
                .zip(&wants)
                .map(|((_, c, after, _), want)| (c.as_str(), *after, *want))
                .collect();
            store.read_after_many(&reqs)
        };
        for ((token, channel, after, limit), first) in afters.into_iter().zip(firsts) {
            let mut first = Some(first);
            let result = paged(limit, max_bytes, READ_CHUNK, |want, last| {
                match first.take() {
                    Some(page) => page,
                    None => store.read_after(&channel, last.map_or(after, |m| m.offset), want),
                }
            });
            out.push(Completion::Messages { token, result });
        }
    }
    out
}

/// Answers one read request (the store thread's, and the router tests' synchronous driver). Message replies
/// are bounded in bytes as well as in count: they stop once `max_bytes` of message JSON is in (always at least
/// one message), reading the store in chunks of [`READ_CHUNK`].
pub fn answer(store: &mut dyn Store, r: Request, max_bytes: usize) -> Completion {
    let err = |e: super::StoreError| e;
    match r {
        Request::PushClaim {
            token,
            now_ms,
            lease_ms,
            limit,
        } => Completion::PushJobs {
            token,
            result: store.push_claim(now_ms, lease_ms, limit).map_err(err),
        },
        Request::History {
            token,
            channel,
            before,
            limit,
        } => Completion::Messages {
            token,
            // Newest first, in pages going back; cut at the byte budget.
            result: paged(limit, max_bytes, READ_CHUNK, |want, last| {
                store.history(&channel, last.map(|m| m.offset).or(before), want)
            })
            .map_err(err),
        },
        Request::ReadAfter {
            token,
            channel,
            after,
            limit,
        } => Completion::Messages {
            token,
            result: read_after_bounded(store, &channel, after, limit, max_bytes).map_err(err),
        },
        Request::ReadMany {
            token,
            reads,
            limit,
        } => {
            let mut all = Vec::new();
            let mut bytes = 0;
            let mut result = Ok(());
            for (channel, after) in reads {
                let left = limit.saturating_sub(all.len());
                if left == 0 || over(bytes, max_bytes) {
                    break;
                }
                match read_after_bounded(store, &channel, after, left, max_bytes - bytes) {
                    Ok(msgs) => {
                        bytes += msgs.iter().map(|m| m.json.len()).sum::<usize>();
                        all.extend(msgs);
                    }
                    Err(e) => {
                        result = Err(err(e));
                        break;
                    }
                }
            }
            Completion::Messages {
                token,
                result: result.map(|()| all),
            }
        }
        Request::Offline {
            token,
            user,
            after,
            limit,
        } => Completion::Messages {
            token,
            // In pages after the last entry read (a store's offline read lists the whole queue's ids, so pages
            // are larger than for channel reads), cut at the byte budget.
            result: paged(limit, max_bytes, OFFLINE_CHUNK, |want, last| {
                let at = match last {
                    Some(m) => Some((m.channel.as_str(), m.offset)),
                    None => after.as_ref().map(|(c, o)| (c.as_str(), *o)),
                };
                store.offline_after(&user, at, want)
            })
            .map_err(err),
        },
        Request::LastOffset { token, channel } => Completion::Offset {
            token,
            result: store.last_offset(&channel).map_err(err),
        },
        Request::Conversations { token } => Completion::Conversations {
            token,
            result: store.conversations().map_err(err),
        },
        Request::Commit { token, .. } => Completion::Committed {
            token,
            result: Err(super::StoreError::Internal("a commit is not a read".into())),
        },
    }
}

/// Commits every queued batch as one transaction; false when it failed.
fn group_commit(
    store: &mut dyn Store,
    commits: &mut Vec<(Token, Vec<Write>)>,
    done: &UnboundedSender<Completion>,
) -> bool {
    let mut sizes = Vec::with_capacity(commits.len());
    let mut all = Vec::new();
    for (token, batch) in commits.drain(..) {
        sizes.push((token, batch.len()));
        all.extend(batch);
    }
    match store.commit(&all) {
        Ok(results) => {
            let mut it = results.into_iter();
            for (token, n) in sizes {
                let mine: Vec<WriteResult> = it.by_ref().take(n).collect();
                let _ = done.send(Completion::Committed {
                    token,
                    result: Ok(mine),
                });
            }
            true
        }
        Err(e) => {
            // Once a second at most: an outage fails every group, and each request is answered anyway.
            static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            static SUPPRESSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now_s = crate::clock::unix_ms() / 1000;
            if LAST.swap(now_s, Relaxed) != now_s {
                let also = SUPPRESSED.swap(0, Relaxed);
                tracing::warn!(store = store.name(), error = %e, writes = all.len(), failed_since_last_log = also, "group commit failed");
            } else {
                SUPPRESSED.fetch_add(1, Relaxed);
            }
            for (token, _) in sizes {
                let _ = done.send(Completion::Committed {
                    token,
                    result: Err(e.clone()),
                });
            }
            false
        }
    }
}

/// Checks that [`answer_all`] answers a mixed group of reads exactly as [`answer`] does one by one (run against
/// the embedded store here and against a real Redis in `store::redis`'s tests).
#[cfg(test)]
pub(crate) fn check_batched_reads_match_one_by_one(store: &mut dyn Store) {
    use super::NewMessage;
    let msg = |ch: &str, i: usize| {
        Write::Append(NewMessage {
            channel: ch.into(),
            from: None,
            client_id: None,
            ts: i as u64,
            json: format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(80)),
            offline: Vec::new(),
            push: Vec::new(),
        })
    };
    let mut batch: Vec<Write> = (0..10).map(|i| msg("topic:a", i)).collect();
    batch.extend((0..3).map(|i| msg("topic:c", i)));
    // Two notices for carol, queued offline; dave's queue is empty.
    for i in 0..2 {
        let Write::Append(mut m) = msg("user:carol", i) else {
            unreachable!()
        };
        m.offline = vec!["carol".into()];
        batch.push(Write::Append(m));
    }
    store.commit(&batch).unwrap();
    let reqs = || {
        let after = |token, channel: &str, after, limit| Request::ReadAfter {
            token,
            channel: channel.into(),
            after,
            limit,
        };
        let last = |token, channel: &str| Request::LastOffset {
            token,
            channel: channel.into(),
        };
        vec![
            last(1, "topic:a"),
            after(2, "topic:a", 0, 1000),
            last(3, "topic:b"),
            after(4, "topic:a", 8, 1000),
            after(5, "topic:b", 0, 1000),
            Request::History {
                token: 6,
                channel: "topic:a".into(),
                before: None,
                limit: 3,
            },
            after(7, "topic:c", 1, 1),
            after(8, "topic:a", 0, 0),
            last(9, "topic:c"),
            after(10, "topic:a", 2, 6),
            Request::Offline {
                token: 11,
                user: "carol".into(),
                after: None,
                limit: 10,
            },
            Request::Offline {
                token: 12,
                user: "dave".into(),
                after: None,
                limit: 10,
            },
            Request::Offline {
                token: 13,
                user: "carol".into(),
                after: Some(("user:carol".into(), 1)),
                limit: 10,
            },
        ]
    };
    fn key(c: &Completion) -> (Token, Vec<u64>) {
        match c {
            Completion::Messages { token, result } => (
                *token,
                result.as_ref().unwrap().iter().map(|m| m.offset).collect(),
            ),
            Completion::Offset { token, result } => (*token, vec![*result.as_ref().unwrap()]),
            _ => panic!("unexpected completion"),
        }
    }
    // 400 bytes of JSON: a reply is cut after 4 of these ~100-byte messages.
    for max_bytes in [400, 1 << 20] {
        let mut one: Vec<_> = reqs()
            .into_iter()
            .map(|r| key(&answer(store, r, max_bytes)))
            .collect();
        let mut all: Vec<_> = answer_all(store, &mut reqs(), max_bytes)
            .iter()
            .map(key)
            .collect();
        one.sort();
        all.sort();
        assert_eq!(all, one, "max_bytes {max_bytes}");
    }
}

#[cfg(test)]
mod tests {
    use super::next_chunk;

    #[test]
    fn batched_reads_answer_as_one_by_one_on_the_embedded_store() {
        let mut store = crate::store::embedded::Embedded::in_memory().unwrap();
        super::check_batched_reads_match_one_by_one(&mut store);
    }

    #[test]
    fn chunks_follow_the_budget() {
        assert_eq!(next_chunk(0, 0, 256 << 10, 1000, 256), 4, "start small");
        // 60 KiB messages, 4 read (240 KiB of 256 KiB): one more fits.
        assert_eq!(next_chunk(4, 240 << 10, 256 << 10, 996, 256), 1);
        // 300-byte messages: as many as the cap allows.
        assert_eq!(next_chunk(4, 1200, 256 << 10, 996, 256), 256);
        assert_eq!(
            next_chunk(4, 1200, 256 << 10, 7, 256),
            7,
            "never past the count left"
        );
        assert_eq!(
            next_chunk(4, 300 << 10, 256 << 10, 10, 256),
            1,
            "past the budget: one"
        );
    }
}
