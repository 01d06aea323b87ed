//! Channels and replay: every channel's recent messages and last offset on this node (a conversation's
//! window, a topic's or `user:` channel's bounded history), and what a client that has seen an offset missed.
//!
//! Conversations and `user:` channels are durable (the store keeps every message; memory keeps a recent window
//! for replay, receipts and offsets). Topics live here only, with a history bounded by count, bytes and age.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::render::{entry_of, message_json};
use super::{Delivery, HistoryLimits};
use crate::store::Store;

pub(super) struct Entry {
    pub(super) ts: u64,
    pub(super) from: Option<Arc<str>>,
    pub(super) delivery: Arc<Delivery>,
}

/// A channel's recent messages, oldest first, and its last offset (the first message gets 1).
#[derive(Default)]
pub(super) struct Log {
    pub(super) last_offset: u64,
    entries: VecDeque<Entry>,
    /// Bytes the entries hold (each message's JSON and its WebSocket frame).
    bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    e.delivery.json.len() + e.delivery.ws.len()
}

impl Log {
    /// Appends, then drops the oldest entries past `max` messages or `max_bytes`.
    fn push(&mut self, e: Entry, max: usize, max_bytes: usize) {
        self.bytes += entry_bytes(&e);
        self.entries.push_back(e);
        while self.entries.len() > max || self.bytes > max_bytes {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= entry_bytes(&e);
        }
    }

    fn expire(&mut self, now_ms: u64, max_age_ms: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| now_ms.saturating_sub(e.ts) > max_age_ms)
        {
            self.pop();
        }
    }

    /// The offset a cursor must have seen for a replay to have no gap.
    pub(super) fn oldest_replayable_cursor(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.last_offset, |e| e.delivery.offset - 1)
    }

    pub(super) fn after(&self, offset: u64) -> impl Iterator<Item = &Entry> {
        let skip = self
            .entries
            .partition_point(|e| e.delivery.offset <= offset);
        self.entries.iter().skip(skip)
    }
}

/// The logs of every channel this node knows.
pub(super) struct Channels {
    history: HistoryLimits,
    /// Conversation id → its recent window (the store has everything). One exists for every conversation the
    /// membership knows, created with it.
    conversations: HashMap<String, Log>,
    /// Topics and `user:` channels.
    others: HashMap<Arc<str>, Log>,
}

impl Channels {
    pub(super) fn new(history: HistoryLimits) -> Self {
        Channels {
            history,
            conversations: HashMap::new(),
            others: HashMap::new(),
        }
    }

    pub(super) fn log(&self, channel: &str) -> Option<&Log> {
        match channel.strip_prefix("conversation:") {
            Some(id) => self.conversations.get(id),
            None => self.others.get(channel),
        }
    }

    /// A conversation's window (by id).
    pub(super) fn conversation(&self, id: &str) -> Option<&Log> {
        self.conversations.get(id)
    }

    pub(super) fn last_offset(&self, channel: &str) -> u64 {
        self.log(channel).map_or(0, |l| l.last_offset)
    }

    /// Makes sure a conversation has a window (a new one is empty); returns its last offset.
    pub(super) fn add_conversation(&mut self, id: &str) -> u64 {
        if let Some(log) = self.conversations.get(id) {
            return log.last_offset;
        }
        self.conversations.insert(id.to_string(), Log::default());
        0
    }

    /// Reads a conversation's last offset and the newest messages that fit its window from the store (at start).
    pub(super) fn load_conversation(
        &mut self,
        store: &mut dyn Store,
        id: &str,
    ) -> crate::store::Result<()> {
        let (window, window_bytes) = (
            self.history.conversation_count,
            self.history.conversation_bytes,
        );
        let channel: Arc<str> = Arc::from(format!("conversation:{id}"));
        let mut log = Log {
            last_offset: store.last_offset(&channel)?,
            ..Log::default()
        };
        // The newest messages that fit the window, read in small pages (large messages never pile up).
        let mut before = None;
        let mut newest_first = Vec::new();
        let mut bytes = 0;
        while newest_first.len() < window && bytes < window_bytes {
            let page = store.history(&channel, before, 16)?;
            let n = page.len();
            for m in page {
                bytes += 2 * m.json.len();
                before = Some(m.offset);
                newest_first.push(m);
            }
            if n < 16 {
                break;
            }
        }
        for m in newest_first.into_iter().rev() {
            log.push(entry_of(&channel, m), window, window_bytes);
        }
        self.conversations.insert(id.to_string(), log);
        Ok(())
    }

    /// Keeps a routed message in its channel's recent window (a `reset` from the sequencer is not history;
    /// an unknown conversation keeps nothing). Topic and `user:` windows are created on first use.
    pub(super) fn record(
        &mut self,
        d: &Arc<Delivery>,
        from: Option<Arc<str>>,
        ts: u64,
        reset: bool,
    ) {
        let entry = Entry {
            ts,
            from,
            delivery: d.clone(),
        };
        if let Some(id) = d.channel.strip_prefix("conversation:") {
            let (max, max_bytes) = (
                self.history.conversation_count,
                self.history.conversation_bytes,
            );
            if let Some(log) = self.conversations.get_mut(id)
                && !reset
            {
                log.last_offset = log.last_offset.max(d.offset);
                log.push(entry, max, max_bytes);
            }
        } else {
            let limits = self.history;
            let log = self.others.entry(d.channel.clone()).or_default();
            if !reset {
                log.expire(ts, limits.topic_age_ms);
                log.last_offset = log.last_offset.max(d.offset);
                log.push(entry, limits.topic_count, limits.topic_bytes);
            }
        }
    }

    /// Appends a message to a topic (memory only, bounded history) at its next offset; returns the delivery.
    pub(super) fn append_topic(
        &mut self,
        channel: &str,
        body: &serde_json::value::RawValue,
        now_ms: u64,
    ) -> Arc<Delivery> {
        let key: Arc<str> = Arc::from(channel);
        let limits = self.history;
        let log = self.others.entry(key.clone()).or_default();
        log.expire(now_ms, limits.topic_age_ms);
        log.last_offset += 1;
        let offset = log.last_offset;
        let json = message_json(channel, offset, None, now_ms, body);
        let delivery = Delivery::new(key, offset, json);
        log.push(
            Entry {
                ts: now_ms,
                from: None,
                delivery: delivery.clone(),
            },
            limits.topic_count,
            limits.topic_bytes,
        );
        delivery
    }

    /// What a client that has seen `after` on `channel` missed: a `reset` when history no longer reaches back
    /// that far, then the messages, at most `budget` of them and until `bytes` of JSON are spent (a poll answer
    /// copies them; the first message always goes). Returns the offset the client is at afterwards.
    pub(super) fn replay(
        &self,
        channel: &str,
        after: u64,
        budget: &mut usize,
        bytes: &mut usize,
        items: &mut Vec<Arc<Delivery>>,
    ) -> u64 {
        let Some(log) = self.log(channel) else {
            return after;
        };
        let mut at = after.min(log.last_offset);
        let oldest = log.oldest_replayable_cursor();
        if at < oldest {
            // The gap cannot be filled: say so explicitly, then continue from what is kept.
            let json = serde_json::json!({"type": "reset", "channel": channel, "offset": oldest})
                .to_string();
            items.push(Delivery::new(channel.into(), oldest, json));
            at = oldest;
        }
        for e in log.after(at) {
            if *budget == 0 || *bytes == 0 {
                break;
            }
            *budget -= 1;
            *bytes = bytes.saturating_sub(e.delivery.json.len());
            at = e.delivery.offset;
            items.push(e.delivery.clone());
        }
        at
    }
}
