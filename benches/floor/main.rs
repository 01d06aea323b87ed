//! The floor reference for the benchmarks: a minimal WebSocket echo written for measurement only, so that every
//! server CPU figure can also be given as a ratio to the least work this kernel allows for an echoed message.
//! It is not a server anyone should run: it exists to be the denominator.
//!
//! ```text
//! cargo run --release --example floor -- --listen 127.0.0.1:0 [--threads N]
//! ```
//!
//! What it does, and nothing more: one `mio::Poll` per thread, each with its own `SO_REUSEPORT` listener on the same
//! address; per connection a fixed 4 KiB read buffer and a write buffer, both allocated once when the connection is
//! accepted; edge-triggered wakes with one `read` (a short read means the socket is drained: see `on_ready`) and one
//! `write` per wake carrying every echo gathered in it; frames parsed and unmasked in place and re-framed
//! (FIN + same opcode, unmasked) straight into the write buffer; pings answered with pongs, a close with a close;
//! TCP_NODELAY on. No allocation per message.
//!
//! What it deliberately skips: UTF-8 validation of text messages, fragmentation (a continuation or a non-final
//! frame is answered with close 1003), extensions and subprotocols, any limit beyond the read buffer (a frame that
//! does not fit in 4 KiB is answered with close 1009), handshake validation beyond finding `Sec-WebSocket-Key`,
//! close-code validation, timeouts and heartbeats, metrics, logging. Any path is served.
//!
//! Prints `floor listening on ADDR (N threads)` like `baseline` and corelay, so the same scripts parse it.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;

use clap::Parser;
use corelay_proto::ws::{CloseCode, Opcode, apply_mask, decode_header, encode_close};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Socket, Type};

/// The read buffer of a connection: the largest frame (header included) it can echo.
const READ_BUF: usize = 4096;
/// The listener's token; connections use their slab index.
const LISTENER: Token = Token(usize::MAX);

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Event loops, one thread and one listener each (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // With port 0 the first listener picks the port and the others join it.
    let mut addr = args.listen;
    let mut listeners = Vec::with_capacity(threads);
    for _ in 0..threads {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        let l = TcpListener::from_std(socket.into());
        addr = l.local_addr()?;
        listeners.push(l);
    }
    println!("floor listening on {addr} ({threads} threads)");
    std::io::stdout().flush()?;
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|l| std::thread::spawn(move || run(l)))
        .collect();
    for l in loops {
        l.join().expect("event loop panicked")?;
    }
    Ok(())
}

struct Conn {
    sock: TcpStream,
    rbuf: Box<[u8; READ_BUF]>,
    /// Bytes in `rbuf` not consumed yet (a partial frame, or a partial request head).
    rlen: usize,
    /// Bytes to write; `wpos` of them are written (a partial write waits for a writable wake).
    wbuf: Vec<u8>,
    wpos: usize,
    upgraded: bool,
    /// A close was sent (or the peer is to be dropped): flush, then drop.
    closing: bool,
}

fn run(mut listener: TcpListener) -> std::io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Conn> = Slab::new();
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events {
            if ev.token() == LISTENER {
                // Accept until the queue is empty (edge-triggered).
                loop {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            sock.set_nodelay(true)?;
                            let entry = conns.vacant_entry();
                            poll.registry().register(
                                &mut sock,
                                Token(entry.key()),
                                Interest::READABLE,
                            )?;
                            entry.insert(Conn {
                                sock,
                                rbuf: Box::new([0; READ_BUF]),
                                rlen: 0,
                                wbuf: Vec::with_capacity(2 * READ_BUF),
                                wpos: 0,
                                upgraded: false,
                                closing: false,
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let key = ev.token().0;
            let Some(c) = conns.get_mut(key) else {
                continue;
            };
            let was_pending = c.wpos < c.wbuf.len();
            let keep = on_ready(c);
            let pending = c.wpos < c.wbuf.len();
            if !keep {
                let mut c = conns.remove(key);
                poll.registry().deregister(&mut c.sock).ok();
            } else if pending != was_pending {
                // Writable interest only while a partial write waits: no EPOLLOUT wakes otherwise.
                let interest = if pending {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                poll.registry()
                    .reregister(&mut c.sock, Token(key), interest)?;
            }
        }
    }
}

/// One wake: read, handle every complete frame, write once. `false` drops the connection.
fn on_ready(c: &mut Conn) -> bool {
    // Under backpressure (a large unwritten backlog) read nothing: the writable wake that drains it comes back here.
    while !c.closing && c.wbuf.len() - c.wpos < 64 * 1024 {
        let free = READ_BUF - c.rlen;
        match c.sock.read(&mut c.rbuf[c.rlen..]) {
            Ok(0) => return false,
            Ok(n) => {
                c.rlen += n;
                let consumed = if c.upgraded { frames(c) } else { handshake(c) };
                c.rbuf.copy_within(consumed..c.rlen, 0);
                c.rlen -= consumed;
                // A read shorter than the space offered drained the socket; on Linux, data arriving after it
                // raises a new edge, so the WouldBlock read mio's contract asks for would only cost a syscall.
                if n < free {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    if c.wpos < c.wbuf.len() {
        match c.sock.write(&c.wbuf[c.wpos..]) {
            Ok(n) => c.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
        if c.wpos == c.wbuf.len() {
            c.wbuf.clear();
            c.wpos = 0;
        }
    }
    !(c.closing && c.wbuf.is_empty())
}

/// The HTTP upgrade, parsed by hand: answers 101 (or 400) once the request head is complete. Returns the bytes
/// consumed; frames sent right behind the head are handled in the same wake.
fn handshake(c: &mut Conn) -> usize {
    let buf = &c.rbuf[..c.rlen];
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if c.rlen == READ_BUF {
            c.closing = true; // a head larger than the buffer: drop
        }
        return 0;
    };
    let key = buf[..end].split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"sec-websocket-key")
            .then(|| value[1..].trim_ascii())
    });
    match key {
        Some(key) => {
            // One String per connection, not per message.
            let accept = corelay_proto::ws::accept_key(key);
            c.wbuf.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
            c.wbuf.extend_from_slice(accept.as_bytes());
            c.wbuf.extend_from_slice(b"\r\n\r\n");
            c.upgraded = true;
            // Shift the frames behind the head to the front, then handle them.
            let head = end + 4;
            c.rbuf.copy_within(head..c.rlen, 0);
            c.rlen -= head;
            frames(c)
        }
        None => {
            c.wbuf.extend_from_slice(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            c.closing = true;
            end + 4
        }
    }
}

/// Echoes every complete frame in the read buffer into the write buffer; returns the bytes consumed.
fn frames(c: &mut Conn) -> usize {
    let mut pos = 0;
    while !c.closing {
        let (h, hlen) = match decode_header(&c.rbuf[pos..c.rlen]) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(_) => return close(c, CloseCode::PROTOCOL),
        };
        if hlen as u64 + h.payload_len > READ_BUF as u64 {
            return close(c, CloseCode::TOO_BIG);
        }
        let end = pos + hlen + h.payload_len as usize;
        if end > c.rlen {
            break; // the rest of the frame has not arrived yet
        }
        let (Some(key), 0) = (h.mask, h.rsv) else {
            return close(c, CloseCode::PROTOCOL); // client frames are masked; no extensions
        };
        let payload = &mut c.rbuf[pos + hlen..end];
        apply_mask(payload, key, 0);
        match Opcode::from_u8(h.opcode) {
            Some(_) if !h.fin => return close(c, CloseCode::UNSUPPORTED),
            Some(op @ (Opcode::Text | Opcode::Binary)) => reply(&mut c.wbuf, op, payload),
            Some(Opcode::Ping) => reply(&mut c.wbuf, Opcode::Pong, payload),
            Some(Opcode::Pong) => {}
            Some(Opcode::Close) => {
                // Echo the peer's close (its code, if any), then drop once it is written.
                reply(&mut c.wbuf, Opcode::Close, payload);
                c.closing = true;
            }
            Some(Opcode::Continuation) => return close(c, CloseCode::UNSUPPORTED),
            None => return close(c, CloseCode::PROTOCOL),
        }
        pos = end;
    }
    pos
}

/// Appends one server frame: FIN, `op`, no mask, the shortest length encoding.
fn reply(out: &mut Vec<u8>, op: Opcode, payload: &[u8]) {
    let b0 = 0x80 | op.as_u8();
    match payload.len() {
        n @ 0..=125 => out.extend_from_slice(&[b0, n as u8]),
        n => {
            // READ_BUF bounds every payload well below 64 KiB.
            out.extend_from_slice(&[b0, 126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Queues a close frame with `code` and marks the connection for dropping; the rest of the read buffer is discarded.
fn close(c: &mut Conn, code: CloseCode) -> usize {
    encode_close(code, "", &mut c.wbuf);
    c.closing = true;
    c.rlen
}
