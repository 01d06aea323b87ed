//! The connection: resume from a cursor, an outbox that survives reconnects, backoff, liveness.
//!
//! Longer than 600 lines: it is one concern, the life of one client connection (the public handle, the task
//! that connects, resumes, resends the outbox, checks liveness and reconnects, and its writer task); the wire
//! types live in `types.rs` and the internal API in `api.rs`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Cursor;
use crate::cursor::{backoff_delay, client_id, cursor_text, enc, is_durable, random_unit};
use crate::types::*;

/// Errors a token source may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future a [`TokenSource`] returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>>;

/// Where fresh tokens come from: asked once before the first connection and again whenever the gateway says
/// the token expired (close 4001, or a 401 at the upgrade). Any `Fn() -> impl Future<Output = Result<String,
/// E>>` is one.
pub trait TokenSource: Send + Sync + 'static {
    fn token(&self) -> TokenFuture;
}

impl<F, Fut, E> TokenSource for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn token(&self) -> TokenFuture {
        let f = self();
        Box::pin(async move { f.await.map_err(Into::into) })
    }
}

/// A fixed token, or a source of fresh ones.
#[derive(Clone)]
pub enum Token {
    Static(String),
    Source(Arc<dyn TokenSource>),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Token::Static(_) => "Token::Static(…)",
            Token::Source(_) => "Token::Source(…)",
        })
    }
}

/// How to connect. Build with [`ClientOptions::new`] or [`ClientOptions::with_token_source`] and adjust the
/// public fields.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The gateway's base URL: `http://host:port` or `ws://host:port` (a path prefix is kept).
    pub url: String,
    pub token: Token,
    /// Topics to follow (conversations and the own `user:` channel arrive without subscribing).
    pub channels: Vec<String>,
    /// Where to resume from: channel → last offset seen.
    pub cursor: Cursor,
    /// Sends left over from an earlier session (see [`Client::outbox`]): resent until acknowledged, with no
    /// future awaiting them.
    pub outbox: Vec<OutboxEntry>,
    /// Reconnect delays: full jitter in `[0, min(backoff_max, backoff_base * 2^attempt)]`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Bound on the TCP connect, the upgrade and the `welcome`.
    pub connect_timeout: Duration,
    /// Liveness defaults when the `welcome` does not announce `heartbeat_s` / `heartbeat_timeout_s`.
    pub heartbeat: Duration,
    pub heartbeat_timeout: Duration,
    /// Bound on a `history` request.
    pub request_timeout: Duration,
}

impl ClientOptions {
    /// Options with a fixed token (reconnects reuse it; once it expired the client keeps retrying with it).
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> ClientOptions {
        ClientOptions::with(url.into(), Token::Static(token.into()))
    }

    /// Options with a token source, asked again whenever the token expired.
    pub fn with_token_source(url: impl Into<String>, source: impl TokenSource) -> ClientOptions {
        ClientOptions::with(url.into(), Token::Source(Arc::new(source)))
    }

    fn with(url: String, token: Token) -> ClientOptions {
        ClientOptions {
            url,
            token,
            channels: Vec::new(),
            cursor: Cursor::new(),
            outbox: Vec::new(),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Topics to follow.
    pub fn channels<S: Into<String>>(mut self, channels: impl IntoIterator<Item = S>) -> Self {
        self.channels = channels.into_iter().map(Into::into).collect();
        self
    }

    /// Where to resume from.
    pub fn cursor(mut self, cursor: Cursor) -> Self {
        self.cursor = cursor;
        self
    }

    /// Reconnect backoff bounds.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The gateway refused it for good (`not_member`, `too_big`, `bad_request`, …). Retryable codes
    /// (`overloaded`, `store_busy`, `store_unavailable`) are retried, never reported here.
    #[error("refused by the gateway: {code}: {message}")]
    Refused { code: String, message: String },
    /// The client was closed (or dropped) first.
    #[error("the client is closed")]
    Closed,
    /// The request needs an open connection (`history`).
    #[error("not connected")]
    NotConnected,
    /// The connection was lost before the answer (`history`; sends are resent instead).
    #[error("the connection was lost before the answer")]
    ConnectionLost,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

const RETRYABLE: [&str; 4] = [
    "overloaded",
    "store_busy",
    "store_unavailable",
    "internal_retry",
];

enum Command {
    Send(OutboxEntry, oneshot::Sender<Result<Sent, Error>>),
    Retransmit(String),
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// A fire-and-forget request, sent only while open (`ack`, `read`, device registration).
    Request(Value),
    History(Value, oneshot::Sender<Result<HistoryPage, Error>>),
    Refresh(String),
    Close,
}

#[derive(Default)]
struct Shared {
    cursor: Cursor,
    outbox: Vec<OutboxEntry>,
}

/// A handle on a connection to a corelay gateway. Cheap to clone; the connection closes when
/// [`Client::close`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    shared: Arc<Mutex<Shared>>,
    state: watch::Receiver<State>,
}

/// The events of a client, in order (see [`Event`]). Unbounded: read them, or drop the receiver.
pub type Events = mpsc::UnboundedReceiver<Event>;

impl Client {
    /// Starts connecting (on the current tokio runtime) and returns at once: the handle and its events.
    /// Requests made before the connection opens wait for it (sends) or are kept for it (subscriptions).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect(options: ClientOptions) -> (Client, Events) {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(State::Connecting);
        let shared = Arc::new(Mutex::new(Shared {
            cursor: options.cursor.clone(),
            outbox: options.outbox.clone(),
        }));
        let driver = Driver {
            token: match &options.token {
                Token::Static(t) => Some(t.clone()),
                Token::Source(_) => None,
            },
            topics: options.channels.iter().cloned().collect(),
            opts: options,
            pending: HashMap::new(),
            histories: VecDeque::new(),
            shared: shared.clone(),
            events: ev_tx,
            state: state_tx,
            cmd_rx,
            cmd_weak: cmd_tx.downgrade(),
            attempt: 0,
            closed: false,
        };
        tokio::spawn(driver.run());
        (
            Client {
                cmd: cmd_tx,
                shared,
                state: state_rx,
            },
            ev_rx,
        )
    }

    /// Sends `body` to a conversation; resolves with the gateway's `sent` once the message is durable.
    /// The send is resent (same client id, so never stored twice) across reconnects until it is answered.
    pub async fn send(&self, conversation: &str, body: impl Into<Value>) -> Result<Sent, Error> {
        let entry = OutboxEntry {
            client_id: client_id(),
            conversation: conversation.to_string(),
            body: body.into(),
        };
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Send(entry, tx))
            .map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Follows topics, from the cursor's position on them when it has one (replayed first), else from now.
    pub fn subscribe<S: Into<String>>(&self, channels: impl IntoIterator<Item = S>) {
        let _ = self.cmd.send(Command::Subscribe(
            channels.into_iter().map(Into::into).collect(),
        ));
    }

    pub fn unsubscribe<S: Into<String>>(&self, channels: impl IntoIterator<Item = S>) {
        let _ = self.cmd.send(Command::Unsubscribe(
            channels.into_iter().map(Into::into).collect(),
        ));
    }

    /// Marks a conversation delivered up to `offset` (only while open, like the JavaScript SDK).
    pub fn ack(&self, conversation: &str, offset: u64) {
        self.request(json!({"type": "ack", "conversation": conversation, "offset": offset}));
    }

    /// Marks a conversation read up to `offset` (only while open).
    pub fn read(&self, conversation: &str, offset: u64) {
        self.request(json!({"type": "read", "conversation": conversation, "offset": offset}));
    }

    /// Registers a push device (`apns` or `fcm`) for this user (only while open).
    pub fn register_device(&self, platform: &str, token: &str) {
        self.request(json!({"type": "register_device", "platform": platform, "token": token}));
    }

    pub fn unregister_device(&self, platform: &str, token: &str) {
        self.request(json!({"type": "unregister_device", "platform": platform, "token": token}));
    }

    /// Hands the open connection a fresh token of the same user before the current one expires (the gateway
    /// answers `refreshed`, reported as [`Event::Other`]); later reconnects use it too. Without it the
    /// gateway closes with 4001 at expiry and the client reconnects with a token from its source.
    pub fn refresh(&self, token: &str) {
        let _ = self.cmd.send(Command::Refresh(token.to_string()));
    }

    fn request(&self, v: Value) {
        let _ = self.cmd.send(Command::Request(v));
    }

    /// A page of history, newest first, over the connection (`before` exclusive, `limit` 1–200).
    pub async fn history(
        &self,
        conversation: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, Error> {
        let mut req = json!({"type": "history", "conversation": conversation});
        if let Some(b) = before {
            req["before"] = b.into();
        }
        if let Some(l) = limit {
            req["limit"] = l.into();
        }
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::History(req, tx))
            .map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Closes for good: no reconnect; sends not yet answered fail with [`Error::Closed`] (they stay in
    /// [`Client::outbox`] to be handed to a later client).
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }

    /// Channel → last offset seen (what to resume from).
    pub fn cursor(&self) -> Cursor {
        lock(&self.shared).cursor.clone()
    }

    /// Sends not yet acknowledged, in order.
    pub fn outbox(&self) -> Vec<OutboxEntry> {
        lock(&self.shared).outbox.clone()
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// The state, watchable (`wait_for`, `changed`).
    pub fn states(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Waits until the connection is open; [`Error::Closed`] if the client closes first.
    pub async fn opened(&self) -> Result<(), Error> {
        let mut rx = self.state.clone();
        match rx
            .wait_for(|s| matches!(s, State::Open | State::Closed))
            .await
        {
            Ok(s) if *s == State::Open => Ok(()),
            _ => Err(Error::Closed),
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &self.state())
            .field("cursor", &self.cursor())
            .field("outbox", &lock(&self.shared).outbox.len())
            .finish()
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reader = futures_util::stream::SplitStream<Ws>;
/// The queue to the writer task.
type Out = mpsc::UnboundedSender<tungstenite::Message>;

/// Why a connection ended, for the next attempt.
#[derive(Default, Debug)]
struct Hint {
    /// The token expired (close 4001, 401 at the upgrade): ask the token source for a fresh one.
    expired: bool,
    /// Reconnect soon (1013: slow consumer / try again).
    fast: bool,
    /// The gateway said when (`Retry-After` on a refused upgrade).
    retry_after: Option<Duration>,
}

struct Welcome {
    heartbeat: Duration,
    timeout: Duration,
}

struct Driver {
    opts: ClientOptions,
    token: Option<String>,
    topics: BTreeSet<String>,
    pending: HashMap<String, oneshot::Sender<Result<Sent, Error>>>,
    histories: VecDeque<(String, oneshot::Sender<Result<HistoryPage, Error>>)>,
    shared: Arc<Mutex<Shared>>,
    events: mpsc::UnboundedSender<Event>,
    state: watch::Sender<State>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    /// For retry timers; weak so that dropping every `Client` still ends the driver.
    cmd_weak: mpsc::WeakUnboundedSender<Command>,
    attempt: u32,
    closed: bool,
}

impl Driver {
    async fn run(mut self) {
        self.emit(Event::State(State::Connecting));
        let mut hint = Hint::default();
        while !self.closed {
            hint = self.attempt_once(hint.expired).await;
            if self.closed {
                break;
            }
            self.set_state(State::Reconnecting);
            let mut delay = backoff_delay(
                self.attempt,
                self.opts.backoff_base,
                self.opts.backoff_max,
                random_unit(),
            );
            self.attempt = self.attempt.saturating_add(1);
            if hint.fast {
                delay = delay.min(Duration::from_millis(250));
            }
            if let Some(ra) = hint.retry_after {
                delay = delay.max(ra + Duration::from_millis(500).mul_f64(random_unit()));
            }
            let until = Instant::now() + delay;
            while !self.closed {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = self.cmd_rx.recv() => self.offline(cmd),
                }
            }
        }
        self.finish();
    }

    /// One connection: token, connect, session. Returns how it ended.
    async fn attempt_once(&mut self, fresh_token: bool) -> Hint {
        let source = match &self.opts.token {
            Token::Source(src) if fresh_token || self.token.is_none() => Some(src.clone()),
            _ => None,
        };
        if let Some(src) = source {
            let fut = tokio::time::timeout(self.opts.connect_timeout, src.token());
            let problem = match self.while_offline(fut).await {
                None => return Hint::default(),
                Some(Ok(Ok(t))) => {
                    self.token = Some(t);
                    None
                }
                Some(Ok(Err(e))) => Some(e.to_string()),
                Some(Err(_)) => Some("the token source did not answer in time".to_string()),
            };
            if let Some(message) = problem {
                self.emit(Event::Error(ServerError {
                    code: "token_source".into(),
                    message: Some(message),
                    reference: None,
                }));
                // Ask again next time.
                return Hint {
                    expired: true,
                    ..Hint::default()
                };
            }
        }
        let token = self.token.clone().unwrap_or_default();
        let cursor = cursor_text(&lock(&self.shared).cursor, is_durable);
        let fut = open(
            self.opts.url.clone(),
            token,
            cursor,
            self.opts.connect_timeout,
        );
        match self.while_offline(fut).await {
            None => Hint::default(),
            Some(Err(hint)) => hint,
            Some(Ok((ws, (heartbeat, timeout)))) => {
                let welcome = Welcome {
                    heartbeat: heartbeat.unwrap_or(self.opts.heartbeat),
                    timeout: timeout.unwrap_or(self.opts.heartbeat_timeout),
                };
                self.session(ws, welcome).await
            }
        }
    }

    /// Runs `fut` while handling commands as when offline; None if the client closed meanwhile.
    async fn while_offline<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = self.cmd_rx.recv() => {
                    self.offline(cmd);
                    if self.closed {
                        return None;
                    }
                }
            }
        }
    }

    /// A command while there is no open connection.
    fn offline(&mut self, cmd: Option<Command>) {
        match cmd {
            None | Some(Command::Close) => self.closed = true,
            Some(Command::Send(entry, reply)) => {
                self.pending.insert(entry.client_id.clone(), reply);
                lock(&self.shared).outbox.push(entry);
            }
            Some(Command::Subscribe(chs)) => self.topics.extend(chs),
            Some(Command::Unsubscribe(chs)) => {
                for c in chs {
                    self.topics.remove(&c);
                }
            }
            Some(Command::History(_, reply)) => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Some(Command::Refresh(t)) => self.token = Some(t),
            // Resent when the connection opens; acks and reads need a connection (as in the JS SDK).
            Some(Command::Retransmit(_)) | Some(Command::Request(_)) => {}
        }
    }

    async fn session(&mut self, ws: Ws, welcome: Welcome) -> Hint {
        self.attempt = 0;
        self.set_state(State::Open);
        // Writes go through a queue to a task of their own, so the connection task never waits on a socket
        // that does not drain (a gateway pausing its reads, a dead peer): it keeps reading answers and
        // running the liveness check.
        let (mut sink, mut read) = ws.split();
        let (out, mut queue) = mpsc::unbounded_channel::<tungstenite::Message>();
        let writer = tokio::spawn(async move {
            while let Some(m) = queue.recv().await {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let hint = self.serve(&mut read, &out, &welcome).await;
        for (_, h) in self.histories.drain(..) {
            let _ = h.send(Err(Error::ConnectionLost));
        }
        if self.closed {
            // A normal close, written after what is queued.
            let _ = out.send(tungstenite::Message::Close(Some(
                tungstenite::protocol::CloseFrame {
                    code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                    reason: "client closed".into(),
                },
            )));
            drop(out);
            let abort = writer.abort_handle();
            if tokio::time::timeout(Duration::from_secs(1), writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        } else {
            writer.abort();
        }
        hint
    }

    async fn serve(&mut self, ws: &mut Reader, out: &Out, welcome: &Welcome) -> Hint {
        let topics: Vec<String> = self.topics.iter().cloned().collect();
        if !topics.is_empty() && self.subscribe(out, topics).is_err() {
            return Hint::default();
        }
        let outbox: Vec<OutboxEntry> = lock(&self.shared).outbox.clone();
        for e in &outbox {
            if transmit(out, e).is_err() {
                return Hint::default();
            }
        }
        let (every, timeout) = (welcome.heartbeat, welcome.timeout);
        let mut tick =
            tokio::time::interval((every.min(timeout) / 2).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_rx = Instant::now();
        let mut pinged = false;
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let Some(Ok(frame)) = frame else { return Hint::default() };
                    last_rx = Instant::now();
                    pinged = false;
                    match frame {
                        tungstenite::Message::Text(t) => self.incoming(t.as_str()),
                        tungstenite::Message::Close(f) => {
                            let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                            return Hint {
                                expired: code == 4001,
                                fast: code == 1013,
                                retry_after: None,
                            };
                        }
                        _ => {}
                    }
                }
                cmd = self.cmd_rx.recv() => {
                    if self.online(out, cmd).is_err() {
                        return Hint::default();
                    }
                    if self.closed {
                        return Hint::default();
                    }
                }
                _ = tick.tick() => {
                    let idle = last_rx.elapsed();
                    if idle > every + timeout {
                        // Silent: the connection may be dead without knowing it.
                        return Hint::default();
                    }
                    if idle >= every && !pinged {
                        pinged = true;
                        if send_json(out, &json!({"type": "ping"})).is_err() {
                            return Hint::default();
                        }
                    }
                }
            }
        }
    }

    /// A command while open. Err: the writer is gone (the socket failed).
    fn online(&mut self, out: &Out, cmd: Option<Command>) -> Result<(), Gone> {
        match cmd {
            None | Some(Command::Close) => {
                self.closed = true;
                Ok(())
            }
            Some(Command::Send(entry, reply)) => {
                self.pending.insert(entry.client_id.clone(), reply);
                lock(&self.shared).outbox.push(entry.clone());
                transmit(out, &entry)
            }
            Some(Command::Retransmit(id)) => {
                let entry = lock(&self.shared)
                    .outbox
                    .iter()
                    .find(|e| e.client_id == id)
                    .cloned();
                match entry {
                    Some(e) => transmit(out, &e),
                    None => Ok(()),
                }
            }
            Some(Command::Subscribe(chs)) => {
                self.topics.extend(chs.iter().cloned());
                self.subscribe(out, chs)
            }
            Some(Command::Unsubscribe(chs)) => {
                for c in &chs {
                    self.topics.remove(c);
                }
                send_json(out, &json!({"type": "unsubscribe", "channels": chs}))
            }
            Some(Command::Request(v)) => send_json(out, &v),
            Some(Command::Refresh(t)) => {
                self.token = Some(t.clone());
                send_json(out, &json!({"type": "refresh", "token": t}))
            }
            Some(Command::History(req, reply)) => {
                let conversation = req["conversation"].as_str().unwrap_or("").to_string();
                // A request whose caller gave up is dropped here, never matched to a later answer.
                self.histories.retain(|(_, h)| !h.is_closed());
                let (tx, rx) = oneshot::channel();
                self.histories.push_back((conversation, tx));
                let timeout = self.opts.request_timeout;
                tokio::spawn(async move {
                    let out = match tokio::time::timeout(timeout, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(Error::ConnectionLost),
                        Err(_) => Err(Error::Timeout(timeout)),
                    };
                    let _ = reply.send(out);
                });
                send_json(out, &req)
            }
        }
    }

    fn subscribe(&mut self, out: &Out, channels: Vec<String>) -> Result<(), Gone> {
        let cursor: serde_json::Map<String, Value> = {
            let shared = lock(&self.shared);
            channels
                .iter()
                .filter_map(|c| shared.cursor.get(c).map(|o| (c.clone(), (*o).into())))
                .collect()
        };
        send_json(
            out,
            &json!({"type": "subscribe", "channels": channels, "cursor": cursor}),
        )
    }

    /// A server object.
    fn incoming(&mut self, text: &str) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let ty = msg["type"].as_str().unwrap_or("").to_string();
        match ty.as_str() {
            "message" | "reset" | "receipt" | "notice" => {
                let channel = msg["channel"].as_str().map(str::to_string);
                let offset = if ty == "message" || ty == "reset" {
                    msg["offset"].as_u64()
                } else {
                    msg["channel_offset"].as_u64()
                };
                if let (Some(channel), Some(offset)) = (channel, offset) {
                    let mut shared = lock(&self.shared);
                    // A repeat (replay overlap, a resend) is dropped; a reset moves the cursor as told.
                    let seen = shared.cursor.get(&channel).copied();
                    if ty != "reset" && seen.is_some_and(|seen| offset <= seen) {
                        return;
                    }
                    shared.cursor.insert(channel, offset);
                }
                let ev = match ty.as_str() {
                    "message" => serde_json::from_value(msg.clone()).map(Event::Message),
                    "reset" => serde_json::from_value(msg.clone()).map(Event::Reset),
                    "receipt" => serde_json::from_value(msg.clone()).map(Event::Receipt),
                    _ => serde_json::from_value(msg.clone()).map(Event::Notice),
                };
                self.emit(ev.unwrap_or(Event::Other(msg)));
            }
            "sent" => {
                let Ok(sent) = serde_json::from_value::<Sent>(msg) else {
                    return;
                };
                lock(&self.shared)
                    .outbox
                    .retain(|e| e.client_id != sent.client_id);
                if let Some(p) = self.pending.remove(&sent.client_id) {
                    let _ = p.send(Ok(sent));
                }
            }
            "error" => {
                let Ok(err) = serde_json::from_value::<ServerError>(msg.clone()) else {
                    return;
                };
                let ours = err
                    .reference
                    .as_ref()
                    .is_some_and(|r| lock(&self.shared).outbox.iter().any(|e| &e.client_id == r));
                if !ours {
                    self.emit(Event::Error(err));
                    return;
                }
                let id = err.reference.clone().unwrap_or_default();
                if RETRYABLE.contains(&err.code.as_str()) {
                    let delay = backoff_delay(
                        1,
                        Duration::from_millis(500),
                        Duration::from_secs(5),
                        random_unit(),
                    );
                    if let Some(tx) = self.cmd_weak.upgrade() {
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(Command::Retransmit(id));
                        });
                    }
                    return;
                }
                lock(&self.shared).outbox.retain(|e| e.client_id != id);
                match self.pending.remove(&id) {
                    Some(p) => {
                        let _ = p.send(Err(Error::Refused {
                            code: err.code,
                            message: err.message.unwrap_or_default(),
                        }));
                    }
                    // A send restored from an earlier session: nobody awaits it.
                    None => self.emit(Event::Error(err)),
                }
            }
            "history" => {
                let conversation = msg["conversation"].as_str().unwrap_or("");
                if let Some(i) = self.histories.iter().position(|(c, _)| c == conversation) {
                    let (_, reply) = self.histories.remove(i).unwrap();
                    let page =
                        serde_json::from_value::<HistoryPage>(msg).map_err(|e| Error::Refused {
                            code: "bad_answer".into(),
                            message: e.to_string(),
                        });
                    let _ = reply.send(page);
                } else {
                    self.emit(Event::Other(msg));
                }
            }
            "subscribed" => {
                let cursor = msg["cursor"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                self.emit(Event::Subscribed(cursor));
            }
            "pong" | "welcome" => {}
            _ => self.emit(Event::Other(msg)),
        }
    }

    fn emit(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    fn set_state(&self, s: State) {
        if *self.state.borrow() != s {
            self.state.send_replace(s);
            self.emit(Event::State(s));
        }
    }

    fn finish(&mut self) {
        for (_, p) in self.pending.drain() {
            let _ = p.send(Err(Error::Closed));
        }
        for (_, h) in self.histories.drain(..) {
            let _ = h.send(Err(Error::Closed));
        }
        self.set_state(State::Closed);
    }
}

/// The writer task ended: the socket failed.
struct Gone;

fn send_json(out: &Out, v: &Value) -> Result<(), Gone> {
    out.send(tungstenite::Message::text(v.to_string()))
        .map_err(|_| Gone)
}

fn transmit(out: &Out, e: &OutboxEntry) -> Result<(), Gone> {
    send_json(
        out,
        &json!({"type": "send", "conversation": e.conversation, "client_id": e.client_id, "body": e.body}),
    )
}

/// The `/ws` URL for a base URL, a token and a durable cursor.
pub(crate) fn ws_url(base: &str, token: &str, cursor: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        base.to_string()
    };
    let mut url = format!("{base}/ws?token={}", enc(token));
    if !cursor.is_empty() {
        url.push_str(&format!("&cursor={}", enc(cursor)));
    }
    url
}

/// Connects, upgrades with `corelay.v1` and reads the `welcome`, within `within`.
/// The welcome's `heartbeat_s` and `heartbeat_timeout_s`.
type Liveness = (Option<Duration>, Option<Duration>);

async fn open(
    base: String,
    token: String,
    cursor: String,
    within: Duration,
) -> Result<(Ws, Liveness), Hint> {
    let attempt = async {
        let mut req = ws_url(&base, &token, &cursor)
            .into_client_request()
            .map_err(|_| Hint::default())?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            http::HeaderValue::from_static("corelay.v1"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => Hint {
                    expired: resp.status() == http::StatusCode::UNAUTHORIZED,
                    fast: false,
                    retry_after: resp
                        .headers()
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
                        .map(Duration::from_secs),
                },
                _ => Hint::default(),
            })?;
        loop {
            match ws.next().await {
                Some(Ok(tungstenite::Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).map_err(|_| Hint::default())?;
                    if v["type"] != "welcome" {
                        return Err(Hint::default());
                    }
                    let secs = |k: &str| v[k].as_u64().filter(|s| *s > 0).map(Duration::from_secs);
                    return Ok((ws, (secs("heartbeat_s"), secs("heartbeat_timeout_s"))));
                }
                Some(Ok(tungstenite::Message::Close(f))) => {
                    let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Err(Hint {
                        expired: code == 4001,
                        fast: code == 1013,
                        retry_after: None,
                    });
                }
                Some(Ok(_)) => continue,
                _ => return Err(Hint::default()),
            }
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Hint::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        assert_eq!(
            ws_url("http://127.0.0.1:8080/", "t.k", "conversation:c1=3"),
            "ws://127.0.0.1:8080/ws?token=t.k&cursor=conversation%3Ac1%3D3"
        );
        assert_eq!(ws_url("https://h/p", "t", ""), "wss://h/p/ws?token=t");
        assert_eq!(ws_url("ws://h", "t", ""), "ws://h/ws?token=t");
    }
}
