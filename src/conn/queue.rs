//! A connection's outbound queue: shared immutable buffers (`Bytes`), written with `writev`.
//!
//! Fan-out puts the same `Bytes` in many queues (a reference count each, never a copy). The queue counts its
//! bytes so the loop can enforce `max_write_queue_bytes` (slow-consumer policy, `docs/ARCHITECTURE.md`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// iovecs per `writev` call.
const MAX_IOVECS: usize = 64;

/// The first buffer lives inline (`head`), so the usual connection, one frame queued and written at once,
/// never touches the heap for its queue: a ring (`rest`) is allocated only while two or more buffers wait,
/// and freed as soon as it empties. An idle WebSocket that once had output keeps no queue memory (before
/// this, the ring's first allocation, 144 B with malloc's header, stayed with every connection that had
/// ever been pinged: a quarter of an idle WebSocket's cost).
#[derive(Default)]
pub struct WriteQueue {
    /// The oldest unwritten buffer; `None` only when the queue is empty.
    head: Option<Bytes>,
    /// The buffers after `head`, oldest first.
    rest: VecDeque<Bytes>,
    /// Bytes of `head` already written.
    head_written: usize,
    /// Unwritten bytes in the queue.
    len: usize,
}

impl WriteQueue {
    pub fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if self.head.is_none() {
            self.head = Some(b);
        } else {
            self.rest.push_back(b);
        }
    }

    pub fn push_vec(&mut self, v: Vec<u8>) {
        self.push(Bytes::from(v));
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Unwritten bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Drops everything queued and releases the queue's memory.
    pub fn clear(&mut self) {
        self.head = None;
        self.rest = VecDeque::new();
        self.head_written = 0;
        self.len = 0;
    }

    pub fn heap_bytes(&self) -> usize {
        self.rest.capacity() * std::mem::size_of::<Bytes>()
    }

    /// Writes as much as the socket takes. Returns the bytes written; `WouldBlock` is not an error here:
    /// it returns what was written so far, and the caller checks `is_empty()`.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while let Some(head) = &self.head {
            let r = if self.rest.is_empty() {
                // One buffer (the usual case): a plain write, which spares the kernel the iovec copy.
                w.write(&head[self.head_written..])
            } else {
                let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
                slices[0] = IoSlice::new(&head[self.head_written..]);
                let mut n = 1;
                for b in self.rest.iter().take(MAX_IOVECS - 1) {
                    slices[n] = IoSlice::new(b);
                    n += 1;
                }
                w.write_vectored(&slices[..n])
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    total += written;
                    self.advance(written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            // Two or more buffers waited at once (a burst, an SSE event and its cursor); once written, the
            // connection goes back to holding no queue memory.
            self.rest = VecDeque::new();
        }
        Ok(total)
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(head) = &self.head else { break };
            let head_left = head.len() - self.head_written;
            if n >= head_left {
                n -= head_left;
                self.head = self.rest.pop_front();
                self.head_written = 0;
            } else {
                self.head_written += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call, then would block after `calls` calls.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.calls == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls -= 1;
            let n = buf.len().min(self.cap);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_in_order() {
        let mut q = WriteQueue::default();
        q.push(Bytes::from_static(b"hello "));
        q.push_vec(b"wide ".to_vec());
        q.push(Bytes::from_static(b"world"));
        assert_eq!(q.len(), 16);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 4,
            calls: 2,
        };
        // Two calls of at most 4 bytes; the default write_vectored writes one slice per call: "hell", "o ".
        assert_eq!(q.write_to(&mut w).unwrap(), 6);
        assert_eq!(q.len(), 10);
        w.calls = 100;
        q.write_to(&mut w).unwrap();
        assert!(q.is_empty());
        assert_eq!(w.got, b"hello wide world");
    }

    /// The point of `head`: a connection that writes one buffer at a time never allocates, and a burst's
    /// ring is given back once it is written.
    #[test]
    fn an_emptied_queue_holds_no_heap() {
        let mut q = WriteQueue::default();
        let mut w = Trickle {
            got: Vec::new(),
            cap: usize::MAX,
            calls: usize::MAX,
        };
        for _ in 0..3 {
            q.push(Bytes::from_static(b"ping"));
            assert_eq!(q.heap_bytes(), 0, "one buffer waits inline");
            q.write_to(&mut w).unwrap();
        }
        for i in 0..20u8 {
            q.push_vec(vec![i; 3]);
        }
        assert!(q.heap_bytes() > 0, "a burst needs the ring");
        assert_eq!(q.len(), 60);
        q.write_to(&mut w).unwrap();
        assert!(q.is_empty());
        assert_eq!(q.heap_bytes(), 0, "the written burst's ring is freed");
        assert_eq!(w.got.len(), 12 + 60);
        assert_eq!(&w.got[12..15], &[0, 0, 0]);
        assert_eq!(&w.got[69..], &[19, 19, 19]);
    }

    /// More buffers than one `writev` takes, written in order across calls, with partial writes.
    #[test]
    fn long_queues_go_out_in_order() {
        let mut q = WriteQueue::default();
        let mut want = Vec::new();
        for i in 0..200u32 {
            let b = i.to_le_bytes().to_vec();
            want.extend_from_slice(&b);
            q.push_vec(b);
        }
        let mut w = Trickle {
            got: Vec::new(),
            cap: 7,
            calls: usize::MAX,
        };
        q.write_to(&mut w).unwrap();
        assert!(q.is_empty());
        assert_eq!(w.got, want);
    }
}
