//! Channels and cursors.
//!
//! A channel is `conversation:{id}`, `user:{id}`, or a topic `{kind}:{name}` (`scores:m42`, `dash:cpu`).
//! A cursor maps channels to the last offset the client has seen. Its text form, used by SSE `id:` /
//! `Last-Event-ID` and by `?cursor=`, is `channel=offset` pairs joined by `;`
//! (`conversation:c1=118;scores:m42=7`); channel names never contain `=` or `;`.

use std::collections::BTreeMap;

/// Longest channel name.
pub const MAX_CHANNEL_LEN: usize = 200;
/// Most channels one request may follow.
pub const MAX_CHANNELS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Conversation,
    User,
    Topic,
}

/// Why a channel list or cursor was refused (→ HTTP 400 or an `error` frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorError(pub String);

impl std::fmt::Display for CursorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest id (user, conversation, topic) we accept: ids travel in every message, key and cursor.
pub const MAX_ID_LEN: usize = 128;

/// User, conversation and topic ids: 1..=128 bytes of `[A-Za-z0-9_.@-]` (safe in keys, logs and cursors).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@'))
}

fn id_ok(s: &str) -> bool {
    valid_id(s)
}

/// Classifies a channel name; `Err` says why it is not one.
pub fn kind(channel: &str) -> Result<Kind, CursorError> {
    let bad = |why: &str| CursorError(format!("channel {channel:?}: {why}"));
    if channel.len() > MAX_CHANNEL_LEN {
        return Err(bad("name too long"));
    }
    let (prefix, name) = channel
        .split_once(':')
        .ok_or_else(|| bad("unknown channel kind (want conversation:ID, user:ID or topic:NAME)"))?;
    if !id_ok(prefix) || name.is_empty() || !name.split(':').all(id_ok) {
        return Err(bad("names are [A-Za-z0-9_.@-] separated by ':'"));
    }
    Ok(match prefix {
        "conversation" if id_ok(name) => Kind::Conversation,
        "user" if id_ok(name) => Kind::User,
        "conversation" | "user" => return Err(bad("the id must not contain ':'")),
        _ => Kind::Topic,
    })
}

/// Parses a comma-separated channel list (`?channels=a:b,c:d`).
pub fn parse_channels(list: &str) -> Result<Vec<String>, CursorError> {
    let chans: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if chans.len() > MAX_CHANNELS {
        return Err(CursorError(format!("at most {MAX_CHANNELS} channels")));
    }
    for c in &chans {
        kind(c)?;
    }
    Ok(chans)
}

/// Parses the text form. An empty string is an empty cursor.
pub fn parse(text: &str) -> Result<BTreeMap<String, u64>, CursorError> {
    let mut out = BTreeMap::new();
    for pair in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (ch, off) = pair
            .rsplit_once('=')
            .ok_or_else(|| CursorError(format!("cursor entry {pair:?} is not channel=offset")))?;
        kind(ch)?;
        let off: u64 = off
            .parse()
            .map_err(|_| CursorError(format!("cursor offset {off:?} is not a number")))?;
        out.insert(ch.to_string(), off);
        if out.len() > MAX_CHANNELS {
            return Err(CursorError(format!(
                "at most {MAX_CHANNELS} channels in a cursor"
            )));
        }
    }
    Ok(out)
}

/// The text form of a cursor.
pub fn format<'a>(entries: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut s = String::new();
    for (ch, off) in entries {
        if !s.is_empty() {
            s.push(';');
        }
        s.push_str(ch);
        s.push('=');
        s.push_str(&off.to_string());
    }
    s
}

/// A cursor as the gateway keeps it per connection: (channel, last offset seen), sorted by channel.
pub type CursorVec = Vec<(std::sync::Arc<str>, u64)>;

/// Moves the cursor entry of `channel` to `offset`; false (and no change) if the client already has it.
pub fn advance(cursor: &mut CursorVec, channel: &std::sync::Arc<str>, offset: u64) -> bool {
    match cursor.binary_search_by(|(c, _)| (**c).cmp(&**channel)) {
        Ok(i) if cursor[i].1 >= offset => false,
        Ok(i) => {
            cursor[i].1 = offset;
            true
        }
        Err(i) => {
            cursor.insert(i, (channel.clone(), offset));
            true
        }
    }
}

/// The text form of a cursor (SSE `id:`, poll answers).
pub fn cursor_text(cursor: &CursorVec) -> String {
    format(cursor.iter().map(|(c, o)| (&**c, *o)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind("conversation:c1").unwrap(), Kind::Conversation);
        assert_eq!(kind("user:alice").unwrap(), Kind::User);
        assert_eq!(kind("scores:m42").unwrap(), Kind::Topic);
        assert_eq!(kind("dash:eu:cpu").unwrap(), Kind::Topic);
        assert!(kind("nocolon").is_err());
        assert!(kind("scores:").is_err());
        assert!(kind("scores:a b").is_err());
        assert!(kind("user:a:b").is_err());
        assert!(kind("x=y:z").is_err());
    }

    #[test]
    fn round_trip() {
        let c = parse("conversation:c1=118;scores:m42=7").unwrap();
        assert_eq!(c["conversation:c1"], 118);
        assert_eq!(
            format(c.iter().map(|(k, v)| (k.as_str(), *v))),
            "conversation:c1=118;scores:m42=7"
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("%%%garbage").is_err());
        assert!(parse("scores:m42=x").is_err());
        assert!(parse("scores:m42").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_errors(s in ".{0,100}") {
            let _ = parse(&s);
            let _ = parse_channels(&s);
        }
    }
}
