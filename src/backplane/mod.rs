//! The backplane: one tokio (current-thread) thread that owns routing, presence and chat state.
//!
//! Loops send it [`Event`]s over a bounded crossbeam channel and wake it with a `tokio::sync::Notify`; it
//! answers with [`LoopCmd`]s over one bounded channel per loop, waking the loop with its `mio::Waker`. It never
//! touches a socket. Fan-out sends one command per loop carrying the shared encoded frame, never one per
//! subscriber.

pub mod chat;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::proto::msg::ClientMsg;

/// A connection anywhere on this node: its loop, its slab index, and the generation that guards against a
/// reused slot receiving a stale command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub worker: u16,
    pub index: u32,
    pub generation: u32,
}

/// Loop → backplane.
#[derive(Debug)]
pub enum Event {
    /// An authenticated client connection opened (it has already been sent `welcome`).
    Opened {
        conn: ConnRef,
        user: Arc<str>,
    },
    Closed {
        conn: ConnRef,
        user: Arc<str>,
    },
    Received {
        conn: ConnRef,
        user: Arc<str>,
        msg: ClientMsg,
    },
    /// An internal API call (already authenticated with the API key); answered with [`LoopCmd::Respond`].
    Api {
        conn: ConnRef,
        req: ApiRequest,
    },
}

#[derive(Debug)]
pub enum ApiRequest {
    CreateConversation { id: String, members: Vec<String> },
}

/// Backplane → loop.
#[derive(Debug)]
pub enum LoopCmd {
    /// Write `frame` (an encoded WebSocket frame shared by every recipient) to these connections of the loop.
    Deliver {
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

/// Runs the backplane on the current thread until every loop has hung up.
pub fn run(
    mut chat: chat::Chat,
    rx: Receiver<Event>,
    notify: Arc<Notify>,
    loops: Vec<LoopHandle>,
    metrics: Arc<Metrics>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio current-thread runtime");
    rt.block_on(async move {
        let mut out = Vec::new();
        loop {
            // Drain in batches so one burst of events yields one round of commands per loop.
            let mut got_any = false;
            for _ in 0..1024 {
                match rx.try_recv() {
                    Ok(ev) => {
                        got_any = true;
                        chat.handle(ev, chat::unix_ms(), &mut out);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return,
                }
            }
            metrics
                .backplane_queue_depth
                .store(rx.len() as u64, Relaxed);
            if !out.is_empty() {
                dispatch(&mut out, &loops, &metrics).await;
            }
            if !got_any {
                // The permit stored by notify_one() means a send between try_recv and here is not lost.
                tokio::select! {
                    _ = notify.notified() => {}
                    // Notice that the loops hung up (the channel disconnects) even when nobody sends.
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    });
}

/// Groups outputs by loop: one `Deliver` per (loop, frame).
async fn dispatch(out: &mut Vec<chat::Out>, loops: &[LoopHandle], metrics: &Metrics) {
    for o in out.drain(..) {
        match o {
            chat::Out::Frame { to, frame } => {
                let mut per_loop: BTreeMap<u16, Vec<(u32, u32)>> = BTreeMap::new();
                for c in to {
                    per_loop
                        .entry(c.worker)
                        .or_default()
                        .push((c.index, c.generation));
                }
                for (w, conns) in per_loop {
                    if let Some(l) = loops.get(w as usize) {
                        l.send(
                            LoopCmd::Deliver {
                                conns,
                                frame: frame.clone(),
                            },
                            metrics,
                        )
                        .await;
                    }
                }
                metrics.messages_routed.fetch_add(1, Relaxed);
            }
            chat::Out::Http { conn, status, body } => {
                if let Some(l) = loops.get(conn.worker as usize) {
                    l.send(
                        LoopCmd::Respond {
                            index: conn.index,
                            generation: conn.generation,
                            status,
                            body,
                        },
                        metrics,
                    )
                    .await;
                }
            }
        }
    }
}
