//! JSON rendering: messages as delivered (chat, topic and `user:` channel entries), `sent` answers, history
//! pages, poll answers, and the `reset` that stands for what a replay could not read.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::channels::Entry;
use super::{CursorVec, Delivery};
use crate::store::StoredMessage;
use corelay_proto::cursor;
use corelay_proto::msg;

/// The error of a client read refused while the store is behind.
pub(super) fn busy_error() -> String {
    msg::error(
        "store_busy",
        "the message store is behind; retry in a moment",
        None,
    )
}

/// Messages read from the store after the positions in `from`, with a `reset` before any jump in a channel's
/// offsets: what the store no longer has (a topic stream trimmed by `MAXLEN`) is announced, never skipped in
/// silence.
pub(super) fn with_resets(from: &[(String, u64)], msgs: &[StoredMessage]) -> Vec<Arc<Delivery>> {
    let mut at: HashMap<&str, u64> = from.iter().map(|(c, o)| (c.as_str(), *o)).collect();
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let ch: Arc<str> = Arc::from(m.channel.as_str());
        if let Some(pos) = at.get_mut(m.channel.as_str()) {
            if m.offset > pos.saturating_add(1) {
                out.push(super::super::sequencer::reset(&ch, m.offset - 1));
            }
            *pos = (*pos).max(m.offset);
        }
        out.push(Delivery::new(ch, m.offset, render(m)));
    }
    out
}

/// `{"messages":[…],"cursor":"…"}`, embedding each message's JSON as it is.
pub fn poll_body(items: &[Arc<Delivery>], cur: &CursorVec) -> String {
    let mut s = String::from("{\"messages\":[");
    for (i, d) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(std::str::from_utf8(&d.json).unwrap_or("null"));
    }
    s.push_str("],\"cursor\":");
    let text = cursor::format(cur.iter().map(|(c, o)| (&**c, *o)));
    s.push_str(&serde_json::to_string(&text).unwrap_or_default());
    s.push('}');
    s
}

/// A page `{"type":"history",…}` from store messages read newest first. The store read asked for `limit + 1`
/// rows, so more than `limit` means there is more; so does a page the store cut at its byte budget (`cut`).
pub(super) fn history_json(
    conversation: &str,
    msgs: &[StoredMessage],
    limit: usize,
    cut: bool,
) -> String {
    let more = msgs.len() > limit || cut;
    let shown = &msgs[..msgs.len().min(limit)];
    let mut s = String::from("{\"type\":\"history\",\"conversation\":");
    s.push_str(&serde_json::to_string(conversation).unwrap_or_default());
    s.push_str(",\"messages\":[");
    for (i, m) in shown.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&render(m));
    }
    s.push_str(if more {
        "],\"more\":true}"
    } else {
        "],\"more\":false}"
    });
    s
}

/// The JSON of a chat or topic message.
pub(super) fn message_json(
    channel: &str,
    offset: u64,
    from: Option<&str>,
    ts: u64,
    body: &RawValue,
) -> String {
    serde_json::to_string(&msg::Message {
        ty: "message",
        channel,
        offset,
        from,
        ts,
        body,
    })
    .unwrap_or_default()
}

/// A `user:` channel payload (an object) with its channel and offset added.
pub(super) fn render_user(channel: &str, offset: u64, payload: &str) -> String {
    let trimmed = payload.trim_end();
    match trimmed.strip_suffix('}') {
        Some(head) if head.trim_start().starts_with('{') => {
            let sep = if head.trim_end().ends_with('{') {
                ""
            } else {
                ","
            };
            format!(
                "{head}{sep}\"channel\":{},\"channel_offset\":{offset}}}",
                serde_json::to_string(channel).unwrap_or_default()
            )
        }
        _ => payload.to_string(),
    }
}

/// The delivered JSON of a stored message: chat and topic messages carry their body; `user:` channel entries
/// are whole objects (receipts, notices).
pub(super) fn render(m: &StoredMessage) -> String {
    if m.channel.starts_with("user:") {
        return render_user(&m.channel, m.offset, &m.json);
    }
    let body = RawValue::from_string(m.json.clone())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("valid JSON"));
    message_json(&m.channel, m.offset, m.from.as_deref(), m.ts, &body)
}

pub(super) fn entry_of(channel: &Arc<str>, m: StoredMessage) -> Entry {
    let json = render(&m);
    Entry {
        ts: m.ts,
        from: m.from.map(|f| Arc::from(f.as_str())),
        delivery: Delivery::new(channel.clone(), m.offset, json),
    }
}

pub(super) fn sent_json(client_id: &str, conversation: &str, offset: u64, ts: u64) -> String {
    serde_json::to_string(&msg::Sent {
        ty: "sent",
        client_id,
        conversation,
        offset,
        ts,
    })
    .unwrap_or_default()
}
