//! The backplane: one tokio (current-thread) thread that owns routing, presence and chat state.
//!
//! Loops send it [`Event`]s over a bounded crossbeam channel and wake it with a `tokio::sync::Notify`; it
//! answers with [`LoopCmd`]s over one bounded channel per loop, waking the loop with its `mio::Waker`. It never
//! touches a socket. Fan-out sends one command per loop carrying the shared encoded frame, never one per
//! subscriber.

pub mod bus;
pub mod lease;
pub mod router;
pub mod sequencer;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use corelay_proto::msg::ClientMsg;
use corelay_proto::ws::{Opcode, encode_frame};

/// A connection anywhere on this node: its loop, its slab index, and the generation that guards against a
/// reused slot receiving a stale command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub worker: u16,
    pub index: u32,
    pub generation: u32,
}

impl ConnRef {
    /// The id an SSE stream is told in its first event (`worker.index.generation`), by which `POST /send`
    /// operations (`subscribe`, `unsubscribe`, `refresh`) name it. Only the stream's own user may use it.
    pub fn stream_id(&self) -> String {
        format!("{}.{}.{}", self.worker, self.index, self.generation)
    }

    pub fn parse_stream_id(s: &str) -> Option<ConnRef> {
        let mut it = s.split('.');
        let c = ConnRef {
            worker: it.next()?.parse().ok()?,
            index: it.next()?.parse().ok()?,
            generation: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(c)
    }
}

pub use corelay_proto::cursor::CursorVec;

/// One message of a channel, encoded once per transport and shared by every recipient on every loop.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub offset: u64,
    /// The message as JSON (one line): poll answers embed it, history pages list it.
    pub json: Bytes,
    /// A complete WebSocket text frame carrying `json`.
    pub ws: Bytes,
    /// `event:` + `data:` lines for SSE, made by the first loop that needs them.
    sse: OnceLock<Bytes>,
    /// `ws` compressed (permessage-deflate, RSV1 set, 15-bit window), made once by the first loop with a
    /// deflate subscriber and shared by all of them; `None` when compressing does not make it smaller.
    ws_deflate: OnceLock<Option<Bytes>>,
}

impl Delivery {
    pub fn new(channel: Arc<str>, offset: u64, json: String) -> Arc<Delivery> {
        let mut ws = Vec::with_capacity(json.len() + 10);
        encode_frame(Opcode::Text, true, json.as_bytes(), &mut ws);
        Arc::new(Delivery {
            channel,
            offset,
            json: Bytes::from(json),
            ws: Bytes::from(ws),
            sse: OnceLock::new(),
            ws_deflate: OnceLock::new(),
        })
    }

    /// The compressed frame for deflate subscribers, compressed by `compress` (a loop's deflater: the JSON
    /// → a complete frame with RSV1 set, or `None`) the first time any loop asks; later calls, from any loop,
    /// share that result.
    pub fn ws_deflate(&self, compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>) -> Option<&Bytes> {
        self.ws_deflate
            .get_or_init(|| compress(&self.json).map(Bytes::from))
            .as_ref()
    }

    /// The event type for SSE: the message's `type` (`message`, `receipt`, …).
    pub fn sse(&self) -> &Bytes {
        self.sse.get_or_init(|| {
            let ty = serde_json::from_slice::<TypeOnly>(&self.json)
                .map(|t| t.ty)
                .unwrap_or_else(|_| "message".into());
            let mut v = Vec::with_capacity(self.json.len() + 32);
            corelay_proto::sse::encode_body(&ty, &self.json, &mut v);
            Bytes::from(v)
        })
    }
}

#[derive(serde::Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    ty: String,
}

/// Loop → backplane.
#[derive(Debug)]
pub enum Event {
    /// A long-lived authenticated connection (WebSocket, SSE stream) opened: it receives the user's
    /// conversations and `user:` channel from now on.
    Opened {
        conn: ConnRef,
        user: Arc<str>,
        /// `GET /ws?cursor=…`: resume these channels from here. They are replayed from the store in order
        /// and left out of the offline flush, in one catch-up, so that the connection gets each message once,
        /// in offset order.
        cursor: BTreeMap<String, u64>,
    },
    /// A connection that was `Opened`, or that followed channels, is gone.
    Closed {
        conn: ConnRef,
        user: Option<Arc<str>>,
    },
    /// A WebSocket request.
    Received {
        conn: ConnRef,
        user: Arc<str>,
        msg: ClientMsg,
    },
    /// `POST /send`: a `send` answered over HTTP.
    Send {
        conn: ConnRef,
        user: Arc<str>,
        msg: ClientMsg,
        /// The SSE stream a `subscribe`/`unsubscribe`/`refresh` is for (`"stream"` in the body).
        stream: Option<ConnRef>,
        /// A `refresh`'s new token expiry (Unix seconds), verified on the loop.
        expires: Option<u64>,
    },
    /// `GET /sse`: check access, answer `StreamStart` (or an HTTP error), replay after `cursor`, then go live.
    Stream {
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        cursor: BTreeMap<String, u64>,
    },
    /// `GET /poll`: answer from history, or hold for up to `hold_ms`.
    Poll {
        conn: ConnRef,
        user: Arc<str>,
        channels: Vec<String>,
        cursor: Option<BTreeMap<String, u64>>,
        hold_ms: u64,
    },
    /// A held poll was answered or timed out: stop routing to it.
    Unfollow { conn: ConnRef },
    /// An internal API call (already authenticated with the API key); answered with [`LoopCmd::Respond`].
    Api { conn: ConnRef, req: ApiRequest },
}

#[derive(Debug)]
pub enum ApiRequest {
    CreateConversation {
        id: String,
        members: Vec<String>,
    },
    Publish {
        channel: String,
        body: Box<serde_json::value::RawValue>,
    },
    History {
        conversation: String,
        before: Option<u64>,
        limit: Option<usize>,
    },
    /// `POST` (register) / `DELETE` (unregister) `/api/devices`.
    Device {
        register: bool,
        user: String,
        platform: String,
        token: String,
    },
}

/// Backplane → loop.
#[derive(Debug)]
pub enum LoopCmd {
    /// A channel message for these connections of the loop; each is written in its transport's encoding.
    Deliver {
        conns: Vec<(u32, u32)>,
        delivery: Arc<Delivery>,
    },
    /// A direct WebSocket frame (replies, errors) for these connections.
    Frame {
        conns: Vec<(u32, u32)>,
        frame: Bytes,
    },
    /// The answer to an HTTP request the loop handed over.
    Respond {
        index: u32,
        generation: u32,
        status: u16,
        body: String,
    },
    /// An SSE stream is accepted: send the head and start with this cursor.
    StreamStart {
        index: u32,
        generation: u32,
        cursor: CursorVec,
    },
    /// A long poll found nothing new: hold it until a delivery or `hold_ms`.
    PollHold {
        index: u32,
        generation: u32,
        cursor: CursorVec,
        hold_ms: u64,
    },
    /// An SSE stream's token was refreshed (`POST /send` `refresh`): it now expires at `exp` (Unix seconds).
    Refresh {
        index: u32,
        generation: u32,
        exp: u64,
    },
    /// Close this connection (a bound refused it): a WebSocket gets a close frame with `code`.
    Close {
        index: u32,
        generation: u32,
        code: u16,
        reason: &'static str,
    },
    /// Stop accepting, close clients with 1001, exit when they are gone or the drain time is up.
    Shutdown,
}

/// A loop's end of its command channel.
#[derive(Clone)]
pub struct LoopHandle {
    pub tx: Sender<LoopCmd>,
    pub waker: Arc<mio::Waker>,
}

impl LoopHandle {
    /// Sends without blocking the backplane: while the loop's queue is full, yield and retry. The loop drains
    /// its whole queue on every wake, so a full queue means it is busy, and waiting here pushes back on the
    /// producers (the loops' event queue fills and clients get `overloaded`) rather than dropping anything.
    pub async fn send(&self, mut cmd: LoopCmd, metrics: &Metrics) {
        loop {
            match self.tx.try_send(cmd) {
                Ok(()) => {
                    let _ = self.waker.wake();
                    return;
                }
                Err(TrySendError::Full(c)) => {
                    cmd = c;
                    metrics.backplane_stalls.fetch_add(1, Relaxed);
                    let _ = self.waker.wake();
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// The loops' end of the event channel.
#[derive(Clone)]
pub struct BackplaneHandle {
    tx: Sender<Event>,
    notify: Arc<Notify>,
}

impl BackplaneHandle {
    /// Never blocks: a full queue is reported to the caller, which answers the client (`overloaded`).
    pub fn try_send(&self, ev: Event) -> Result<(), Event> {
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.notify.notify_one();
                Ok(())
            }
            Err(TrySendError::Full(ev)) | Err(TrySendError::Disconnected(ev)) => Err(ev),
        }
    }

    pub fn queue_len(&self) -> usize {
        self.tx.len()
    }
}

pub fn channel(capacity: usize) -> (BackplaneHandle, Receiver<Event>, Arc<Notify>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let notify = Arc::new(Notify::new());
    (
        BackplaneHandle {
            tx,
            notify: notify.clone(),
        },
        rx,
        notify,
    )
}

/// The backplane's links to the store thread and (in cluster mode) the Redis bus threads.
pub struct Links {
    pub store: std::sync::mpsc::Sender<crate::store::thread::Request>,
    pub done: tokio::sync::mpsc::UnboundedReceiver<crate::store::thread::Completion>,
    pub bus: Option<(bus::BusHandle, tokio::sync::mpsc::Receiver<bus::BusEvent>)>,
    /// Outcomes from the push thread (when mobile push is on). Bounded by `--push-queue`: the router never
    /// has more jobs out than that.
    pub push: Option<tokio::sync::mpsc::UnboundedReceiver<crate::push::engine::Done>>,
}

/// Runs the backplane on the current thread until every loop has hung up and the store has answered every
/// request in flight.
pub fn run(
    mut router: router::Router,
    rx: Receiver<Event>,
    notify: Arc<Notify>,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
    links: Links,
) {
    let Links {
        store: store_tx,
        done: mut done_rx,
        bus,
        push: mut push_rx,
    } = links;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio current-thread runtime");
    rt.block_on(async move {
        let mut out = Vec::new();
        let mut loops_gone = false;
        let (bus_tx, mut bus_rx) = match bus {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        let mut tick = tokio::time::interval(Duration::from_millis(25));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            // Drain in batches so one burst of events yields one round of commands per loop and one group
            // commit in the store.
            let mut got_any = false;
            while let Ok(c) = done_rx.try_recv() {
                got_any = true;
                router.on_completion(c, crate::clock::unix_ms(), &mut out);
            }
            if let Some(rx) = bus_rx.as_mut() {
                while let Ok(ev) = rx.try_recv() {
                    got_any = true;
                    router.on_bus(ev, crate::clock::unix_ms(), &mut out);
                }
                metrics.bus_up.store(router.bus_up(), Relaxed);
                metrics.bus_channels.store(router.bus_channels() as u64, Relaxed);
                metrics
                    .presence_cache_users
                    .store(router.remote_presence() as u64, Relaxed);
                metrics
                    .sequencer_resets
                    .store(router.sequencer_resets(), Relaxed);
            }
            for _ in 0..1024 {
                match rx.try_recv() {
                    Ok(ev) => {
                        got_any = true;
                        router.handle(ev, crate::clock::unix_ms(), &mut out);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        loops_gone = true;
                        break;
                    }
                }
            }
            if let Some(rx) = push_rx.as_mut() {
                while let Ok(d) = rx.try_recv() {
                    got_any = true;
                    router.on_push_done(d);
                }
            }
            if bus_tx.is_some() {
                router.tick(crate::clock::unix_ms());
            }
            if !loops_gone {
                router.push_tick(crate::clock::unix_ms());
            }
            for req in router.take_requests() {
                if store_tx.send(req).is_err() {
                    tracing::error!("store thread is gone");
                }
            }
            if let Some(tx) = &bus_tx {
                for cmd in router.take_bus_cmds() {
                    if !tx.send(cmd) {
                        metrics.bus_dropped.fetch_add(1, Relaxed);
                    }
                }
            }
            metrics.backplane_queue_depth.store(rx.len() as u64, Relaxed);
            metrics
                .subscriptions_refused
                .store(router.refused_subscriptions(), Relaxed);
            if !out.is_empty() {
                dispatch(&mut out, &loops, &metrics).await;
            }
            if loops_gone && router.pending_requests() == 0 {
                return;
            }
            if !got_any {
                // The permit stored by notify_one() means a send between try_recv and here is not lost.
                let bus_next = async {
                    match bus_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let push_next = async {
                    match push_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let ticking = router.needs_fast_tick();
                tokio::select! {
                    _ = notify.notified() => {}
                    Some(c) = done_rx.recv() => router.on_completion(c, crate::clock::unix_ms(), &mut out),
                    Some(ev) = bus_next => router.on_bus(ev, crate::clock::unix_ms(), &mut out),
                    Some(d) = push_next => router.on_push_done(d),
                    _ = tick.tick(), if ticking => {}
                    // Notice that the loops hung up (the channel disconnects) even when nobody sends.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    });
}

/// Groups outputs by loop: one command per (loop, output).
async fn dispatch(out: &mut Vec<router::Out>, loops: &[LoopHandle], metrics: &Metrics) {
    for o in out.drain(..) {
        match o {
            router::Out::Message { to, delivery } => {
                for (w, conns) in per_loop(to) {
                    if let Some(l) = loops.get(w as usize) {
                        let delivery = delivery.clone();
                        l.send(LoopCmd::Deliver { conns, delivery }, metrics).await;
                    }
                }
                metrics.messages_routed.fetch_add(1, Relaxed);
            }
            router::Out::Frame { to, frame } => {
                for (w, conns) in per_loop(to) {
                    if let Some(l) = loops.get(w as usize) {
                        let frame = frame.clone();
                        l.send(LoopCmd::Frame { conns, frame }, metrics).await;
                    }
                }
            }
            router::Out::Loop { conn, cmd } => {
                if let Some(l) = loops.get(conn.worker as usize) {
                    l.send(cmd, metrics).await;
                }
            }
        }
    }
}

fn per_loop(to: Vec<ConnRef>) -> BTreeMap<u16, Vec<(u32, u32)>> {
    let mut m: BTreeMap<u16, Vec<(u32, u32)>> = BTreeMap::new();
    for c in to {
        m.entry(c.worker).or_default().push((c.index, c.generation));
    }
    m
}
