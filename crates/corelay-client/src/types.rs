//! What the gateway sends, typed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Cursor;

/// A chat or topic message (`{"type":"message",…}`), live, replayed, or in a history page.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    /// `conversation:{id}` or a topic (`scores:m42`).
    #[serde(default)]
    pub channel: String,
    pub offset: u64,
    /// The sender (chat messages; absent on topic messages published through the API).
    #[serde(default)]
    pub from: Option<String>,
    /// Milliseconds since the Unix epoch, when the gateway stored it.
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(default)]
    pub body: Value,
}

/// A delivery or read receipt on the user's own `user:` channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Receipt {
    pub conversation: String,
    /// The conversation offset the receipt is about.
    pub offset: u64,
    /// `delivered` or `read`.
    pub state: String,
    pub by: String,
    pub channel: String,
    pub channel_offset: u64,
}

/// A notice published to the user's `user:` channel through the API.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Notice {
    #[serde(default)]
    pub body: Value,
    pub channel: String,
    pub channel_offset: u64,
}

/// The history of `channel` before `offset` is gone: the stream continues after `offset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Reset {
    pub channel: String,
    pub offset: u64,
}

/// The gateway's answer to a send, once the message is durable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Sent {
    pub client_id: String,
    pub conversation: String,
    pub offset: u64,
    #[serde(default)]
    pub ts: Option<u64>,
}

/// A page of a conversation's history, newest first.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HistoryPage {
    pub conversation: String,
    pub messages: Vec<Message>,
    /// There are older messages (ask again with `before` = the last offset of this page).
    pub more: bool,
}

/// An `{"type":"error",…}` from the gateway.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServerError {
    pub code: String,
    #[serde(default)]
    pub message: Option<String>,
    /// The `client_id` of the request it answers, when it had one.
    #[serde(default, rename = "ref")]
    pub reference: Option<String>,
}

/// The connection's state. `Reconnecting` holds from a lost connection until the next `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Connecting,
    Open,
    Reconnecting,
    Closed,
}

/// What the client reports, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new message (repeats at or below the cursor are dropped, never reported).
    Message(Message),
    Receipt(Receipt),
    Notice(Notice),
    /// A gap the gateway could not fill: the cursor moved to `offset`.
    Reset(Reset),
    /// The connection's state changed.
    State(State),
    /// A `subscribe` (at connect or later) was answered: where each channel stands.
    Subscribed(Cursor),
    /// An error not tied to a send (sends fail their own future).
    Error(ServerError),
    /// Any other server object (forward compatibility).
    Other(Value),
}

/// A send not yet acknowledged: resent with the same `client_id` until the gateway answers `sent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub client_id: String,
    pub conversation: String,
    pub body: Value,
}
