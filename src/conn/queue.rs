//! A connection's outbound queue: shared immutable buffers (`Bytes`), written with `writev`.
//!
//! Fan-out puts the same `Bytes` in many queues (a reference count each, never a copy). The queue counts its
//! bytes so the loop can enforce `max_write_queue_bytes` (slow-consumer policy, `docs/ARCHITECTURE.md`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// iovecs per `writev` call.
const MAX_IOVECS: usize = 64;

#[derive(Default)]
pub struct WriteQueue {
    bufs: VecDeque<Bytes>,
    /// Bytes of `bufs[0]` already written.
    head_written: usize,
    /// Unwritten bytes in the queue.
    len: usize,
}

impl WriteQueue {
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.bufs.push_back(b);
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
        self.bufs = VecDeque::new();
        self.head_written = 0;
        self.len = 0;
    }

    pub fn heap_bytes(&self) -> usize {
        self.bufs.capacity() * std::mem::size_of::<Bytes>()
    }

    /// Writes as much as the socket takes. Returns the bytes written; `WouldBlock` is not an error here:
    /// it returns what was written so far, and the caller checks `is_empty()`.
    pub fn write_to<W: Write>(&mut self, w: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while !self.bufs.is_empty() {
            let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, b) in self.bufs.iter().take(MAX_IOVECS).enumerate() {
                let start = if i == 0 { self.head_written } else { 0 };
                slices[i] = IoSlice::new(&b[start..]);
                n += 1;
            }
            match w.write_vectored(&slices[..n]) {
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
        if self.bufs.is_empty() && self.bufs.capacity() > 8 {
            // A burst grew the ring; an idle connection should not keep it.
            self.bufs = VecDeque::new();
        }
        Ok(total)
    }

    fn advance(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let head_left = self.bufs[0].len() - self.head_written;
            if n >= head_left {
                n -= head_left;
                self.bufs.pop_front();
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
}
