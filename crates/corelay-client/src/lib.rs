//! Rust client for the corelay gateway, on tokio: the semantics of the JavaScript SDK
//! (`clients/js/src/corelay.js`) over WebSocket. The wire protocol is `docs/PROTOCOL.md` of the repository.
//!
//! - **Resume**: the client keeps a cursor (channel → last offset seen). It reconnects with
//!   `/ws?cursor=` for conversations and its `user:` channel, and re-subscribes to topics with their offsets,
//!   so nothing is missed; repeats (offset ≤ cursor) are dropped, never reported.
//! - **Outbox**: [`Client::send`] gives each send a random client id and resolves once the gateway answers
//!   `sent` (the message is durable). Unanswered sends survive reconnects and are resent in order with the
//!   same id, which the gateway dedupes; `overloaded`, `store_busy` and `store_unavailable` are retried,
//!   other refusals fail the future.
//! - **Reconnect** with exponential backoff and full jitter; a [`TokenSource`] is asked for a fresh token
//!   when the gateway closes with 4001 (token expired). **Liveness**: an application-level `ping` after
//!   the welcome's `heartbeat_s` of silence; no answer `heartbeat_timeout_s` later → reconnect.
//! - [`Api`]: the internal API (`/api/conversations`, `/api/publish`, `/api/history`) with typed errors.
//!
//! ```no_run
//! use corelay_client::{Api, Client, ClientOptions, Event};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let api = Api::new("http://127.0.0.1:8080", "API_KEY");
//! api.create_conversation("c1", &["alice", "bob"]).await?;
//!
//! // A token source is asked again whenever the token expired.
//! let options = ClientOptions::with_token_source("http://127.0.0.1:8080", || async {
//!     Ok::<_, std::io::Error>("a JWT for alice".to_string())
//! })
//! .channels(["scores:m42"]);
//! let (alice, mut events) = Client::connect(options);
//!
//! let sent = alice.send("c1", serde_json::json!({"text": "hi"})).await?;
//! println!("stored at offset {}", sent.offset);
//!
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{} #{}: {}", m.channel, m.offset, m.body);
//!         alice.ack("c1", m.offset);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod api;
mod client;
mod cursor;
mod types;

pub use api::{Api, ApiError, Created};
pub use client::{BoxError, Client, ClientOptions, Error, Events, Token, TokenFuture, TokenSource};
pub use cursor::{Cursor, backoff_delay, cursor_text, is_durable, parse_cursor};
pub use types::{
    Event, HistoryPage, Message, Notice, OutboxEntry, Receipt, Reset, Sent, ServerError, State,
};
